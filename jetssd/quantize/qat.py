"""INT8 quantization-aware training (QAT) of PFJet-SSD that simulates the graph ONNX Runtime runs (DESIGN §6).

The deployed int8 model is the QDQ graph of :mod:`jetssd.quantize.int8`: per-output-channel symmetric int8
weights (scale max|W_c|/127, codes in [−127, 127]), uint8 asymmetric activations, BatchNorm folded into the
convs, and ORT fusing DequantizeLinear → Conv → QuantizeLinear into ``QLinearConv`` (likewise
``QLinearAveragePool``, ``QLinearConcat``). QAT trains the network through the same rounding, so nothing is left
for a calibrator to guess, and the export forces the learned activation parameters onto the graph.

**Weights: Conv-BN folding.** Every quantized Conv2d that a BatchNorm2d follows (the ``conv``/``bn`` of
:class:`~jetssd.model.layers.ConvBN`, the ``dw``/``dw_bn`` and ``pw``/``pw_bn`` of
:class:`~jetssd.model.layers.ConvDW`; a φ :class:`~jetssd.model.layers.PhiPad` before the conv changes nothing,
it only moves pixels) computes, as in Jacob et al. 2018 and PyTorch's ``ConvBn2d``::

    f_c   = γ_c / sqrt(running_var_c + eps)          the factor the ONNX exporter folds into the weight
    W_q   = FQ(W · f)                                per-channel symmetric int8 fake quantization of the folded
                                                     weight, straight-through gradient to the latent W (and γ)
    y     = BN(conv(x, W_q / f))                     the BN module itself runs after the conv

With the BN on its running statistics (frozen, or in eval) ``y = conv(x, W_q) + (β − μ·f)``, exactly the
deployed folded conv. Before the freeze, training normalises with the batch statistics (which keeps BN's
regularisation and updates the running statistics) while the weight grid already follows the folded weight.
``freeze_bn_step`` sets when the statistics freeze; the default 0 freezes them from the start, which is the
right thing for a **fine-tune** of a trained network (the intended use): the running statistics are already
good, the network trains on exactly the weights it will deploy (no batch/running mismatch, no grid that jumps
every step with the batch variance), and small or cropped CPU batches (``data.crop``) cannot drag the
statistics away from full-image ones. A QAT run from scratch should use a positive step (a few epochs).

**Activations.** Fake quantization (uint8, asymmetric, ORT's ``compute_scale_zp`` and ``QuantizeLinear``
semantics) sits exactly where the QDQ quantizer puts QuantizeLinear, one set of parameters per graph tensor:

* the input of every quantized conv (after the φ padding, which only copies already quantized values) and of
  every average pool, whose output shares its input's parameters (``QLinearAveragePool``);
* the output of every quantized conv (``QLinearConv`` requires it): after BN, before the activation; for ReLU
  and ReLU6 after the activation, because ORT drops those and lets the output's zero point do the clipping.

The forward also reproduces the two roundings of the integer kernels that a plain fake quantizer misses: the
int32 quantization of the folded bias with step s_in·s_w,c (on running statistics), and ``QLinearAveragePool``
rounding avg/s + zp rather than avg/s (an average of four grid values is a tie one time in four). With them the
PyTorch QAT network and ORT's int8 graph agree up to float rounding; without them one-step differences
appear in ~1 % of the values of each layer and grow through the network.

PReLU (exported as ``Max(x, a·x)``) and LeakyReLU are left to run in float between the conv's
DequantizeLinear and the consumer's QuantizeLinear: quantizing them as ORT would by default adds two more
roundings per layer and rounds the PReLU slopes to a per-tensor int8 grid. (ORT's optimizer still turns
DequantizeLinear → LeakyRelu → QuantizeLinear into ``QLinearLeakyRelu``, a lookup table computing the same
values.) So a PReLU layer costs two quantization points (pre- and post-activation) and a ReLU layer one.

Kept in float, as in :data:`~jetssd.quantize.int8.DEFAULT_EXCLUDE`: the log1p normalisation (its *output*,
the first conv's input, is quantized), L2Norm, ECA; and by default the detection heads
(:data:`DEFAULT_FLOAT_LAYERS`): ~2 % of the MACs, and an int8 head output would put the logits, box offsets
and ln pT on a 256-step grid. Any other module can be kept in float with ``float_layers`` (e.g.
``"backbone.0"``, the first conv).

Ranges come from an exponential-moving-average min/max observer per tensor (the first batch sets them, then
``min ← min + c·(batch_min − min)`` with c = ``averaging``), updated on training forwards only and frozen after
``freeze_observer_step`` optimizer steps; after that the network adapts to a fixed grid. A tensor whose
observer has seen no batch yet passes through unquantized.

**State-dict keys.** ``attach`` changes the classes of the selected Conv2d/BatchNorm2d modules in place (their
forward; parameters, buffers and keys stay the same: ``<conv>.weight`` is the latent, unfolded weight) and adds
the observers as the submodule ``int8_qat`` of the network: ``int8_qat.step`` (optimizer steps so far, which
decides the BN and observer freezes) and ``int8_qat.observers.<tensor>.{min_val,max_val}`` (tensor ids with "."
replaced by "_"). Such a state dict loads strictly into a model with the quantizer attached (resume; the
freezes are re-derived from the step). :meth:`INT8QATQuantizer.baked_state_dict` gives a plain state dict whose
conv weights are the effective ``W_q / f``: after the exporter's BN folding they lie on the int8 grid.

**Export.** :func:`export_int8_qat` bakes a QAT checkpoint, exports the float graph with
:func:`jetssd.export.export_model`, and quantizes it with :func:`jetssd.quantize.int8.quantize_model` with the
learned scales and zero points forced on every activation tensor (``TensorQuantOverrides``); it refuses a graph
in which ORT quantized any activation with parameters QAT did not provide, and records the int8 graph's
agreement with the PyTorch QAT model (``quantization.qat_parity``). CLI: ``jetssd quantize --qat CHECKPOINT``.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, cast

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.utils.hooks import RemovableHandle

from jetssd.model.layers import ConvBN, ConvDW, fp32_region
from jetssd.model.network import PFJetSSD

if TYPE_CHECKING:
    from jetssd.event import SparsePixels

WEIGHT_QMAX = 127
"""Per-channel symmetric int8 weights take codes in [−127, 127] (ORT's symmetric int8 range)."""
ACTIVATION_QMIN, ACTIVATION_QMAX = 0, 255
"""uint8 activations (the u8·s8 kernels of x86 VNNI, :mod:`jetssd.quantize.int8`'s default)."""
EMA_AVERAGING = 0.01
"""Weight of a new batch's min/max in the observers' moving average."""
DEFAULT_FLOAT_LAYERS: tuple[str, ...] = ("head1", "head2")
"""Modules kept in float by default: the detection heads (see the module docstring)."""
DEFAULT_FREEZE_BN_STEP = 0
"""BN running statistics frozen from the first step (fine-tuning; see the module docstring)."""
DEFAULT_FREEZE_OBSERVER_STEP = 1000
"""Optimizer steps after which the activation ranges stop moving."""
STATE_MODULE = "int8_qat"
"""Name of the submodule holding the observers (state-dict key prefix ``int8_qat.``)."""
FOLD_EPS = 1e-12
"""|γ/σ| below this is replaced by ±FOLD_EPS in the weight fold (a BN with γ ≈ 0, e.g. a slimmed channel,
would otherwise divide by zero); that channel's output is β either way."""
QAT_PARITY_TOLERANCE = 0.01
"""Largest accepted mean |int8 ORT − QAT PyTorch| of each output (class probabilities, box offsets, ln pT) in the
export: the two differ only where float rounding puts a value on the other side of a rounding boundary (measured
≲ 3e-4 on the shipped FPN, ≲ 1e-4 on narrow test networks); more means the int8 graph is not the network QAT
trained (a simulation bug, or a CPU whose u8·s8 kernels saturate: no VNNI, see ``reduce_range`` in
:mod:`jetssd.quantize.int8`)."""

_REMOVABLE = (nn.ReLU, nn.ReLU6)
"""Activations ORT removes after a quantized conv (the uint8 output clips at its zero point / range instead)."""
_MOVERS = {"Slice": 1, "Concat": -1, "Transpose": 1, "Reshape": 1, "AveragePool": 1, "Squeeze": 1, "Unsqueeze": 1,
           "Flatten": 1, "Identity": 1}
"""ONNX ops whose output carries the same quantization parameters as their data input(s) (value: number of data
inputs, −1 = all): the φ padding's Slice + Concat, the heads' Transpose/Reshape, the pools."""


# ------------------------------------------------------------------------------------------ fake quantization


def weight_scale(weight: Tensor) -> Tensor:
    """Per-output-channel symmetric int8 scale, float32 [C_out]: max|W_c| / 127, or 1 for a channel whose scale
    would underflow (all zero), as ORT does."""
    absmax = weight.detach().float().abs().flatten(1).amax(dim=1)
    scale = absmax / WEIGHT_QMAX
    return torch.where(scale >= torch.finfo(torch.float32).tiny, scale, torch.ones_like(scale))


def quantize_weight(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Codes (int8, ``weight``'s shape, in [−127, 127]) and per-channel scales (float32 [C_out]) of a conv weight
    [C_out, C_in/groups, kH, kW]: codes = round_half_even(W / scale), computed in fp32 without gradient."""
    with torch.no_grad(), fp32_region(weight):
        scale = weight_scale(weight)
        w = weight.detach().float()
        codes = torch.round(w / scale.reshape(-1, *([1] * (w.dim() - 1)))).clamp(-WEIGHT_QMAX, WEIGHT_QMAX)
    return codes.to(torch.int8), scale


def fake_quant_weight(weight: Tensor) -> Tensor:
    """codes · scale in ``weight``'s dtype, with a straight-through gradient (∂/∂W := identity).

    ``q + (W − W.detach())`` (not ``W + (q − W).detach()``): x − x is exactly 0, so the forward values are the
    grid values bit for bit. Every W lies inside the grid's range (the scale comes from max|W|): no clipping mask.
    """
    codes, scale = quantize_weight(weight)
    q = (codes.float() * scale.reshape(-1, *([1] * (weight.dim() - 1)))).to(weight.dtype)
    if not (torch.is_grad_enabled() and weight.requires_grad):
        return q
    return q + (weight - weight.detach())


def activation_qparams(rmin: Tensor, rmax: Tensor) -> tuple[Tensor, Tensor]:
    """uint8 asymmetric scale (float32 scalar) and zero point (int32 scalar) of the range [rmin, rmax], computed
    as ORT's ``compute_scale_zp``: the range is widened to contain 0, scale = (rmax − rmin)/255 (float64, stored
    as float32), zero point = round(−rmin/scale); a range that is (almost) empty gives scale 1, zero point 0."""
    lo = torch.clamp(rmin.detach().double(), max=0.0)
    hi = torch.clamp(rmax.detach().double(), min=0.0)
    scale = (hi - lo) / (ACTIVATION_QMAX - ACTIVATION_QMIN)
    usable = scale >= torch.finfo(torch.float32).tiny
    zero_point = torch.round(ACTIVATION_QMIN - lo / torch.where(usable, scale, torch.ones_like(scale)))
    scale = torch.where(usable, scale, torch.ones_like(scale))
    zero_point = torch.where(usable, zero_point, torch.zeros_like(zero_point))
    return scale.float(), zero_point.clamp(ACTIVATION_QMIN, ACTIVATION_QMAX).to(torch.int32)


class _FakeQuantize(torch.autograd.Function):
    """uint8 fake quantization with ORT's rounding (x / scale, half to even; torch's fused
    ``fake_quantize_per_tensor_affine`` multiplies by 1/scale, which breaks ties differently) and the clipped
    straight-through gradient. ``pooled``: round x/scale + zp instead of x/scale, as ``QLinearAveragePool`` does
    (an average of four grid values is often a tie, and the parity of zp then decides). Saves a bool mask for
    backward, like the fused op."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: Tensor, zero_point: Tensor, pooled: bool = False) -> Tensor:
        q = x / scale  # in-place from here on: one activation-sized float buffer
        q = q.add_(zero_point).round_() if pooled else q.round_().add_(zero_point)
        inside = q.ge(ACTIVATION_QMIN).logical_and_(q.le(ACTIVATION_QMAX))
        ctx.save_for_backward(inside)
        return q.clamp_(ACTIVATION_QMIN, ACTIVATION_QMAX).sub_(zero_point).mul_(scale)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None, None


def fake_quant_activation(x: Tensor, scale: Tensor, zero_point: Tensor, pooled: bool = False) -> Tensor:
    """(clamp(round(x/scale) + zp, 0, 255) − zp) · scale, in fp32, returned in ``x``'s dtype; the gradient is the
    clipped straight-through estimator (1 inside the representable range, 0 outside). ``pooled``: the rounding
    of an average-pool output (see :class:`_FakeQuantize`)."""
    with fp32_region(x):
        y = cast(Tensor, _FakeQuantize.apply(x.float(), scale, zero_point.float(), pooled))
    return y.to(x.dtype)


def quantized_bias(bias: Tensor, input_scale: Tensor, weight_scales: Tensor) -> Tensor:
    """A conv bias [C] as ORT stores it: int32 codes round(b / (s_in·s_w,c)), clipped, times that scale (fp32,
    no gradient). The difference to ``bias`` is at most half a step of s_in·s_w,c: tiny, but it moves values
    across rounding boundaries of the output, so the QAT forward includes it to reproduce the int8 graph."""
    with torch.no_grad():
        step = (input_scale.float() * weight_scales.float()).double()
        codes = torch.round(bias.detach().double() / step).clamp(-(2**31), 2**31 - 1)
        return (codes * step).float()


def fold_factor(bn: nn.BatchNorm2d) -> Tensor:
    """f = γ / sqrt(running_var + eps), float32 [C], with |f| ≥ :data:`FOLD_EPS` (see there). Differentiable in γ."""
    assert bn.running_var is not None, "folding needs the BN's running statistics"
    gamma = bn.weight.float() if bn.weight is not None else torch.ones_like(bn.running_var, dtype=torch.float32)
    f = gamma / torch.sqrt(bn.running_var.float() + bn.eps)
    floor = torch.where(f >= 0, torch.full_like(f, FOLD_EPS), torch.full_like(f, -FOLD_EPS))
    return torch.where(f.abs() >= FOLD_EPS, f, floor)


def effective_weight(conv: nn.Conv2d, bn: nn.BatchNorm2d | None) -> Tensor:
    """The weight a QAT conv convolves with: FQ(W·f)/f before a BN, FQ(W) without one (fp32)."""
    with fp32_region(conv.weight):
        w = conv.weight.float()
        if bn is None:
            return fake_quant_weight(w)
        f = fold_factor(bn).reshape(-1, *([1] * (w.dim() - 1)))
        return fake_quant_weight(w * f) / f


class _QATConv2d(nn.Conv2d):
    """A Conv2d convolving with :func:`effective_weight` (its class is set in place by :class:`INT8QATQuantizer`).

    ``_qat_bn`` is the BN that follows it, or None; ``_qat_input`` the observer of its input. Both are plain
    attributes, deliberately not registered submodules (no duplicate state-dict keys). Without a BN the bias is
    the int32-quantized one (:func:`quantized_bias`, straight-through gradient).
    """

    _qat_bn: nn.BatchNorm2d | None
    _qat_input: ActivationObserver

    def forward(self, x: Tensor) -> Tensor:
        bias = self.bias
        scale = self._qat_input.active_scale()
        if bias is not None and self._qat_bn is None and scale is not None:
            bias = bias + (quantized_bias(bias, scale, weight_scale(self.weight)) - bias).detach()
        return self._conv_forward(x, effective_weight(self, self._qat_bn), bias)


class _QATBatchNorm2d(nn.BatchNorm2d):
    """A BatchNorm2d folded into the conv before it (``_qat_conv``, whose input observer gives the bias scale).

    Once ``_qat_frozen`` is set it stays in eval mode (running statistics, no update) even when its network is
    put in training mode. On running statistics it adds the rounding of the folded bias β − μ·f to int32 codes
    of step s_in·s_w (:func:`quantized_bias`), as the deployed QLinearConv does; with batch statistics the folded
    bias is not the deployed one anyway and nothing is added.
    """

    _qat_frozen: bool
    _qat_conv: _QATConv2d

    def train(self, mode: bool = True) -> _QATBatchNorm2d:
        return super().train(mode and not self._qat_frozen)

    def forward(self, x: Tensor) -> Tensor:
        y = super().forward(x)
        scale = self._qat_conv._qat_input.active_scale()
        if self.training or scale is None or self.running_mean is None:
            return y
        with torch.no_grad():
            f = fold_factor(self)
            beta = self.bias.float() if self.bias is not None else torch.zeros_like(f)
            folded = beta - self.running_mean.float() * f
            weight = self._qat_conv.weight.float()
            s_w = weight_scale(weight * f.reshape(-1, *([1] * (weight.dim() - 1))))
            delta = quantized_bias(folded, scale, s_w) - folded
        return y + delta.reshape(1, -1, 1, 1).to(y.dtype)


# -------------------------------------------------------------------------------------------------- observers


@dataclass(frozen=True)
class ActivationQuant:
    """Quantization of one activation tensor: observed range and the uint8 parameters derived from it."""

    rmin: float
    rmax: float
    scale: float
    zero_point: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ActivationObserver(nn.Module):
    """EMA min/max observer and uint8 fake quantizer of one activation tensor.

    ``forward(x, observe)`` updates the range from ``x`` when ``observe`` is set, the module is in training mode
    and :attr:`observing` (not frozen), then returns the fake-quantized ``x`` (``x`` itself while no batch has
    been seen or when :attr:`enabled` is off).
    """

    min_val: Tensor
    max_val: Tensor

    def __init__(self, averaging: float = EMA_AVERAGING) -> None:
        super().__init__()
        if not 0.0 < averaging <= 1.0:
            raise ValueError(f"averaging must be in (0, 1], got {averaging}")
        self.averaging = averaging
        self.register_buffer("min_val", torch.tensor(math.inf))
        self.register_buffer("max_val", torch.tensor(-math.inf))
        self.observing = True
        self.enabled = True
        self.initialized = False  # mirrors isfinite(min_val) without a device sync per forward

    @torch.no_grad()
    def observe(self, x: Tensor) -> None:
        """Fold the batch's min and max into the moving average (the first batch sets them)."""
        lo, hi = torch.aminmax(x.detach().float())
        if not self.initialized:
            self.min_val.copy_(lo)
            self.max_val.copy_(hi)
            self.initialized = True
        else:
            self.min_val.lerp_(lo, self.averaging)
            self.max_val.lerp_(hi, self.averaging)

    def qparams(self) -> tuple[Tensor, Tensor]:
        """(scale float32, zero point int32) of the current range, see :func:`activation_qparams`."""
        return activation_qparams(self.min_val, self.max_val)

    def active_scale(self) -> Tensor | None:
        """The scale when this observer fake-quantizes (enabled and initialized), else None."""
        return self.qparams()[0] if self.enabled and self.initialized else None

    def forward(self, x: Tensor, observe: bool = False, pooled: bool = False) -> Tensor:
        if observe and self.training and self.observing:
            self.observe(x)
        if not (self.enabled and self.initialized):
            return x
        scale, zero_point = self.qparams()
        return fake_quant_activation(x, scale, zero_point, pooled)

    def quant(self) -> ActivationQuant:
        """The range and parameters as plain numbers."""
        scale, zero_point = self.qparams()
        return ActivationQuant(float(self.min_val), float(self.max_val), float(scale), int(zero_point))

    def extra_repr(self) -> str:
        return f"min={float(self.min_val):.4g}, max={float(self.max_val):.4g}, averaging={self.averaging}"


def _key(tensor: str) -> str:
    """ModuleDict key of a tensor id ("backbone.2.dw" → "backbone_2_dw": keys may not contain dots)."""
    return tensor.replace(".", "_")


class QATState(nn.Module):
    """The ``int8_qat`` submodule: the optimizer-step counter and one observer per quantized tensor."""

    step: Tensor

    def __init__(self, tensors: Iterable[str], averaging: float) -> None:
        super().__init__()
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.observers = nn.ModuleDict({_key(t): ActivationObserver(averaging) for t in tensors})

    def forward(self, *args: Any) -> Any:
        raise RuntimeError("QATState holds observers; it is not a layer")


# ------------------------------------------------------------------------------------------------------ plan


@dataclass(frozen=True)
class _Site:
    """One fake-quantization point: the ``kind`` ("input" or "output") of ``module`` carries ``tensor``; the first
    site of a tensor in forward order updates its observer, the others only apply it."""

    module: nn.Module
    kind: Literal["input", "output"]
    tensor: str
    observe: bool


class _Plan:
    """Which convs are quantized and where the activation fake quantizers go (see the module docstring).

    Tensor ids are module paths: ``"normalise"`` (the first conv's input), ``"backbone.2.dw"`` (that conv's output
    before its activation), ``"backbone.2.dw_act"`` (the activation's output), ``"backbone.5"`` (a float pool's
    output), ``"source1.eca"`` (a head's input), ``"head1.cls"`` (a head conv's output).
    """

    def __init__(self, model: PFJetSSD, float_layers: Sequence[str]) -> None:
        for name in float_layers:
            try:
                model.get_submodule(name)
            except AttributeError:
                raise ValueError(f"float_layers: the network has no module {name!r}") from None
        self.float_layers = tuple(float_layers)
        self.convs: dict[str, tuple[nn.Conv2d, nn.BatchNorm2d | None]] = {}
        self.sites: list[_Site] = []
        self.tensors: list[str] = []
        self.float_activations: list[str] = []
        cur = "normalise"
        for idx, layer in enumerate(model.backbone):
            name = f"backbone.{idx}"
            if isinstance(layer, nn.AvgPool2d):
                if self.quantized(name):
                    self._site(layer, "input", cur)
                    self._site(layer, "output", cur)  # QLinearAveragePool: output on the input's grid
                else:
                    cur = name
                continue
            if isinstance(layer, ConvBN):
                triples = [("conv", "bn", "act")]
            elif isinstance(layer, ConvDW):
                triples = [("dw", "dw_bn", "dw_act"), ("pw", "pw_bn", "pw_act")]
            else:
                raise TypeError(f"{name}: unexpected layer {type(layer).__name__}")
            for c, b, a in triples:
                conv, bn, act = (layer.get_submodule(n) for n in (c, b, a))
                assert isinstance(conv, nn.Conv2d)
                assert isinstance(bn, nn.BatchNorm2d)
                path, act_path = f"{name}.{c}", f"{name}.{a}"
                if self.quantized(path):
                    self.convs[path] = (conv, bn)
                    self._site(conv, "input", cur)
                    if isinstance(act, _REMOVABLE):
                        self._site(act, "output", act_path)
                    else:
                        self._site(bn, "output", path)
                        self.float_activations.append(act_path)
                cur = act_path
        for k, head in ((1, model.head1), (2, model.head2)):
            if head is None:
                continue
            for c in ("loc", "cls", "reg"):
                path = f"head{k}.{c}"
                if self.quantized(path):
                    conv = getattr(head, c)
                    self.convs[path] = (conv, None)
                    self._site(conv, "input", f"source{k}.eca")
                    self._site(conv, "output", path)

    def quantized(self, path: str) -> bool:
        return not any(path == f or path.startswith(f + ".") for f in self.float_layers)

    def _site(self, module: nn.Module, kind: Literal["input", "output"], tensor: str) -> None:
        first = tensor not in self.tensors
        if first:
            self.tensors.append(tensor)
        self.sites.append(_Site(module, kind, tensor, first))

    def float_patterns(self) -> list[str]:
        """ONNX node-name fragments of what stays float besides DEFAULT_EXCLUDE: the float layers and the
        activations that ORT would otherwise quantize (PReLU's Mul/Max, LeakyRelu)."""
        return [onnx_scope(p) for p in (*self.float_layers, *self.float_activations)]


# ------------------------------------------------------------------------------------------------- quantizer


class INT8QATQuantizer:
    """INT8 quantization-aware training of a :class:`~jetssd.model.network.PFJetSSD` (see the module docstring).

    Args:
        model: the bare network (before DDP / ``torch.compile`` wrapping) with its trained weights and BN
            statistics loaded.
        float_layers: module paths kept in float (default: the detection heads), e.g. ``("head1", "head2",
            "backbone.0")``; the normalisation, L2Norm and ECA are always float.
        freeze_bn_step: optimizer step from which BN uses (and keeps) its running statistics; 0 = from the start.
        freeze_observer_step: optimizer step from which the activation ranges stop moving.
        averaging: weight of a new batch in the observers' moving min/max.

    Lifecycle: ``attach()`` → train, calling :meth:`after_step` after every ``optimizer.step()`` → ``bake()`` (a
    plain network with the effective weights) or ``detach()`` (the latent float network). Usable as a context
    manager (attaches on entry, detaches on exit unless baked).
    """

    def __init__(self, model: nn.Module, float_layers: Sequence[str] = DEFAULT_FLOAT_LAYERS,
                 freeze_bn_step: int = DEFAULT_FREEZE_BN_STEP,
                 freeze_observer_step: int = DEFAULT_FREEZE_OBSERVER_STEP, averaging: float = EMA_AVERAGING) -> None:
        if not isinstance(model, PFJetSSD):
            raise TypeError(f"INT8 QAT needs a PFJetSSD network, got {type(model).__name__}")
        if freeze_bn_step < 0 or freeze_observer_step < 0:
            raise ValueError("freeze_bn_step and freeze_observer_step must be ≥ 0")
        self.model = model
        self.freeze_bn_step = int(freeze_bn_step)
        self.freeze_observer_step = int(freeze_observer_step)
        self._plan = _Plan(model, float_layers)
        self.float_layers = self._plan.float_layers
        self.convs = self._plan.convs
        self.state = QATState(self._plan.tensors, averaging)
        self._handles: list[RemovableHandle] = []
        self._step = 0
        self._attached = False
        self._baked: dict[str, ActivationQuant] | None = None

    @property
    def attached(self) -> bool:
        """Whether the network currently runs with fake quantization."""
        return self._attached

    @property
    def tensors(self) -> list[str]:
        """Ids of the quantized activation tensors, in forward order (see :class:`_Plan`)."""
        return list(self._plan.tensors)

    @property
    def step(self) -> int:
        """Optimizer steps counted by :meth:`after_step` (restored by a strict state-dict load)."""
        return self._step

    def observer(self, tensor: str) -> ActivationObserver:
        """The observer of tensor id ``tensor``."""
        return cast(ActivationObserver, self.state.observers[_key(tensor)])

    def float_patterns(self) -> list[str]:
        """ONNX node-name fragments of the layers this QAT keeps in float (on top of DEFAULT_EXCLUDE)."""
        return self._plan.float_patterns()

    # -- lifecycle

    def attach(self) -> INT8QATQuantizer:
        """Switch the selected convs and BNs to their QAT forward, add the observers and their hooks."""
        if self._attached:
            raise RuntimeError("the INT8 QAT quantizer is already attached")
        if hasattr(self.model, STATE_MODULE):
            raise RuntimeError("the network already has an INT8 QAT quantizer attached")
        for name, (conv, _) in self.convs.items():
            if parametrize.is_parametrized(conv):
                raise RuntimeError(f"{name} is parametrized (TWN attached?): TWN and INT8 QAT do not combine")
        inputs = {id(site.module): site.tensor for site in self._plan.sites if site.kind == "input"}
        for conv, bn in self.convs.values():
            # Plain attributes (object.__setattr__): not submodules, so no duplicate state-dict keys.
            conv.__class__ = _QATConv2d
            object.__setattr__(conv, "_qat_bn", bn)
            object.__setattr__(conv, "_qat_input", self.observer(inputs[id(conv)]))
            if bn is not None:
                bn.__class__ = _QATBatchNorm2d
                object.__setattr__(bn, "_qat_frozen", False)
                object.__setattr__(bn, "_qat_conv", conv)
        self.model.add_module(STATE_MODULE, self.state)
        self.state.train(self.model.training)
        for site in self._plan.sites:
            obs, observe = self.observer(site.tensor), site.observe
            if site.kind == "input":
                self._handles.append(site.module.register_forward_pre_hook(_input_hook(obs, observe)))
            else:
                pooled = isinstance(site.module, nn.AvgPool2d)
                self._handles.append(site.module.register_forward_hook(_output_hook(obs, observe, pooled)))
        self._handles.append(self.state.register_load_state_dict_post_hook(lambda module, keys: self._sync()))
        self._attached = True
        self._baked = None
        self._sync()
        return self

    @torch.no_grad()
    def after_step(self) -> None:
        """Count an optimizer step; freeze BN statistics / activation ranges when their step is reached."""
        self._require_attached("after_step")
        self._step += 1
        self.state.step.fill_(self._step)
        if self._step in (self.freeze_bn_step, self.freeze_observer_step):
            self._apply_freezes()

    def freeze_bn(self) -> None:
        """Freeze every folded BN on its running statistics now (whatever ``freeze_bn_step`` says; not recorded in
        a checkpoint: a resumed run follows its configured step)."""
        self.freeze_bn_step = min(self.freeze_bn_step, self._step)
        self._apply_freezes()

    def freeze_observers(self) -> None:
        """Stop the activation ranges from moving now (like :meth:`freeze_bn`, not recorded in a checkpoint)."""
        self.freeze_observer_step = min(self.freeze_observer_step, self._step)
        self._apply_freezes()

    @property
    def bn_frozen(self) -> bool:
        return self._step >= self.freeze_bn_step

    @property
    def observers_frozen(self) -> bool:
        return self._step >= self.freeze_observer_step

    def fake_quant_activations(self, enabled: bool) -> None:
        """Turn the activation fake quantization on or off (weights stay fake-quantized; observers keep
        observing): for diagnostics, e.g. weight-only vs full int8."""
        for obs in self.state.observers.values():
            cast(ActivationObserver, obs).enabled = enabled

    def activation_qparams(self, require_all: bool = False) -> dict[str, ActivationQuant]:
        """Range, scale and zero point per tensor id, for the tensors whose observer has seen data (after
        :meth:`bake`, the values that were baked). ``require_all`` raises if some observer has seen nothing."""
        if self._baked is not None:
            return dict(self._baked)
        self._require_attached("activation_qparams")
        missing = [t for t in self._plan.tensors if not self.observer(t).initialized]
        if require_all and missing:
            raise ValueError(f"activation ranges never observed (no training step?): {missing}")
        return {t: self.observer(t).quant() for t in self._plan.tensors if t not in missing}

    @torch.no_grad()
    def baked_state_dict(self) -> dict[str, Tensor]:
        """The network's plain state dict (no ``int8_qat.`` keys) with each quantized conv's ``weight`` replaced by
        its effective weight W_q/f (W_q for the heads); the model itself is not changed."""
        self._require_attached("baked_state_dict")
        prefix = STATE_MODULE + "."
        state = {k: v for k, v in self.model.state_dict().items() if not k.startswith(prefix)}
        for path, (conv, bn) in self.convs.items():
            state[f"{path}.weight"] = effective_weight(conv, bn).to(conv.weight.dtype).detach().clone()
        return state

    @torch.no_grad()
    def bake(self) -> nn.Module:
        """Leave a plain network whose conv weights are the effective weights (the exporter's BN folding then puts
        them on the int8 grid) and remove the observers; :meth:`activation_qparams` keeps the baked ranges."""
        self._require_attached("bake")
        baked = self.activation_qparams()
        for conv, bn in self.convs.values():
            conv.weight.copy_(effective_weight(conv, bn))
        self._remove()
        self._baked = baked
        return self.model

    def detach(self) -> nn.Module:
        """Remove the fake quantization; the latent float weights are the plain ``weight``s again."""
        self._require_attached("detach")
        self._remove()
        return self.model

    # -- internals

    def _sync(self) -> None:
        """Re-derive the Python-side flags from the buffers (after attach or a state-dict load)."""
        self._step = int(self.state.step)
        for obs in self.state.observers.values():
            cast(ActivationObserver, obs).initialized = bool(torch.isfinite(cast(ActivationObserver, obs).min_val))
        self._apply_freezes()

    def _apply_freezes(self) -> None:
        frozen = self.bn_frozen
        for _, bn in self.convs.values():
            if isinstance(bn, _QATBatchNorm2d):
                object.__setattr__(bn, "_qat_frozen", frozen)
                bn.train(self.model.training)
        for obs in self.state.observers.values():
            cast(ActivationObserver, obs).observing = not self.observers_frozen

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for conv, bn in self.convs.values():
            conv.__class__ = nn.Conv2d
            for attr in ("_qat_bn", "_qat_input"):
                del conv.__dict__[attr]
            if bn is not None:
                bn.__class__ = nn.BatchNorm2d
                for attr in ("_qat_frozen", "_qat_conv"):
                    del bn.__dict__[attr]
                bn.train(self.model.training)
        delattr(self.model, STATE_MODULE)
        self._attached = False

    def _require_attached(self, what: str) -> None:
        if not self._attached:
            raise RuntimeError(f"{what}: the INT8 QAT quantizer is not attached")

    def __enter__(self) -> INT8QATQuantizer:
        return self if self._attached else self.attach()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._attached:
            self.detach()


def _input_hook(obs: ActivationObserver, observe: bool) -> Callable[[nn.Module, tuple[Any, ...]], tuple[Any, ...]]:
    def hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (obs(args[0], observe), *args[1:])
    return hook


def _output_hook(obs: ActivationObserver, observe: bool, pooled: bool
                 ) -> Callable[[nn.Module, tuple[Any, ...], Tensor], Tensor]:
    def hook(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor:
        return obs(output, observe, pooled)
    return hook


def attach_int8_qat(model: nn.Module, float_layers: Sequence[str] = DEFAULT_FLOAT_LAYERS,
                    freeze_bn_step: int = DEFAULT_FREEZE_BN_STEP,
                    freeze_observer_step: int = DEFAULT_FREEZE_OBSERVER_STEP,
                    averaging: float = EMA_AVERAGING) -> INT8QATQuantizer:
    """Create an :class:`INT8QATQuantizer` for ``model`` and attach it (the trainer's entry point)."""
    return INT8QATQuantizer(model, float_layers, freeze_bn_step, freeze_observer_step, averaging).attach()


def qat_options(compress: Mapping[str, Any]) -> dict[str, Any]:
    """The :class:`INT8QATQuantizer` keyword arguments of a training config's ``[compress]`` section (a checkpoint's
    ``config["compress"]``; missing keys take the defaults)."""
    return {"float_layers": tuple(compress.get("int8_float_layers", DEFAULT_FLOAT_LAYERS)),
            "freeze_bn_step": int(compress.get("int8_freeze_bn_step", DEFAULT_FREEZE_BN_STEP)),
            "freeze_observer_step": int(compress.get("int8_freeze_observer_step", DEFAULT_FREEZE_OBSERVER_STEP))}


# ------------------------------------------------------------------------------------------- ONNX Runtime side


def onnx_scope(path: str) -> str:
    """The node-name scope the TorchScript ONNX exporter gives module ``path``: ``"backbone.2.dw_act"`` →
    ``"/backbone.2/dw_act/"`` (a ModuleList index stays attached to its list, the list is never called)."""
    parts: list[str] = []
    for part in path.split("."):
        if part.isdigit() and parts:
            parts[-1] += "." + part
        else:
            parts.append(part)
    return "/" + "/".join(parts) + "/"


def onnx_tensor(graph: Any, tensor: str) -> str | None:
    """Name of the graph tensor that QAT tensor id ``tensor`` is: the output of the module's scope (the one output
    of its nodes that no node of the scope consumes); the graph input for a normalisation without nodes; None if
    the module is not in the graph (the training-only layers)."""
    scope = onnx_scope(tensor)
    nodes = [n for n in graph.node if n.name.startswith(scope)]
    if not nodes:
        return str(graph.input[0].name) if tensor == "normalise" else None
    consumed = {i for n in nodes for i in n.input}
    outputs = [o for n in nodes for o in n.output if o not in consumed]
    if len(outputs) != 1:
        raise ValueError(f"{tensor}: expected one output of scope {scope} in the graph, found {outputs}")
    return str(outputs[0])


def tensor_quant_overrides(model_path: Path, qparams: Mapping[str, ActivationQuant]
                           ) -> tuple[dict[str, list[dict[str, Any]]], dict[str, str]]:
    """ORT ``TensorQuantOverrides`` that put the QAT parameters on the tensors of the float graph ``model_path``.

    Each QAT tensor id is resolved to its graph tensor (:func:`onnx_tensor`); the parameters are then carried
    through the ops that only move values (the φ padding's Slice/Concat, pools, the heads' Transpose/Reshape),
    whose outputs ORT quantizes too. Returns ``(overrides, {tensor id: graph tensor name})``.
    """
    import onnx

    graph = onnx.load(str(model_path)).graph
    overrides: dict[str, list[dict[str, Any]]] = {}
    names: dict[str, str] = {}
    for tensor, q in qparams.items():
        name = onnx_tensor(graph, tensor)
        if name is None:
            continue
        names[tensor] = name
        overrides[name] = [{"scale": np.array(q.scale, dtype=np.float32),
                            "zero_point": np.array(q.zero_point, dtype=np.uint8)}]
    initializers = {i.name for i in graph.initializer}
    for node in graph.node:  # topological order: a mover's inputs are settled before its outputs
        n_data = _MOVERS.get(node.op_type)
        if n_data is None or not node.output or node.output[0] in overrides:
            continue
        inputs = [i for i in (node.input if n_data < 0 else node.input[:n_data]) if i and i not in initializers]
        params = [overrides.get(i) for i in inputs]
        if inputs and all(p is not None and _same(p, params[0]) for p in params):
            overrides[node.output[0]] = params[0]  # type: ignore[assignment]
    return overrides, names


def _same(a: list[dict[str, Any]] | None, b: list[dict[str, Any]] | None) -> bool:
    return (a is not None and b is not None and float(a[0]["scale"]) == float(b[0]["scale"])
            and int(a[0]["zero_point"]) == int(b[0]["zero_point"]))


def uncovered_tensors(int8_path: Path, overrides: Mapping[str, list[dict[str, Any]]]) -> list[str]:
    """Activation tensors of the QDQ graph ``int8_path`` quantized with parameters that are not the QAT ones."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(int8_path)).graph
    values = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    bad = []
    for node in graph.node:
        if node.op_type != "QuantizeLinear":
            continue
        tensor = node.input[1].removesuffix("_scale")
        want = overrides.get(tensor)
        scale, zero_point = values.get(node.input[1]), values.get(node.input[2])
        if (want is None or scale is None or zero_point is None or float(scale) != float(want[0]["scale"])
                or int(zero_point) != int(want[0]["zero_point"])):
            bad.append(node.input[0])
    return bad


def _quantized_tensors(int8_path: Path) -> set[str]:
    """Tensors of the QDQ graph that have quantization parameters (``<tensor>_scale`` initializers)."""
    import onnx

    graph = onnx.load(str(int8_path)).graph
    return {i.name.removesuffix("_scale") for i in graph.initializer if i.name.endswith("_scale")}


def compare_with_qat(model: PFJetSSD, int8_path: Path, events: Sequence[SparsePixels], threads: int | None = None
                     ) -> dict[str, Any]:
    """Agreement of the int8 ORT graph with the PyTorch QAT network (attached, eval mode) on ``events``:
    ``{"events", "mean_abs_diff", "max_abs_diff"}`` of ``cls_prob`` (softmax), ``loc`` and ``reg``."""
    from jetssd.inference import make_session
    from jetssd.model.network import ONNX_INPUT, ONNX_OUTPUTS
    from jetssd.quantize.int8 import _softmax
    from jetssd.rasterize import densify_batch

    session = make_session(int8_path, threads)
    was_training, was_inference_only = model.training, model.inference_only
    model.eval()
    model.inference_only = True
    sums = dict.fromkeys(("cls_prob", "loc", "reg"), 0.0)
    peaks = dict.fromkeys(sums, 0.0)
    count = dict.fromkeys(sums, 0)
    try:
        for first in range(0, len(events), 8):
            batch = densify_batch(events[first:first + 8])
            with torch.no_grad():
                want = dict(zip(ONNX_OUTPUTS, (t.float().numpy() for t in model(torch.from_numpy(batch))),
                                strict=True))
            got = dict(zip(ONNX_OUTPUTS, session.run(list(ONNX_OUTPUTS), {ONNX_INPUT: batch}), strict=True))
            pairs = {"cls_prob": (_softmax(want["cls_logits"]), _softmax(got["cls_logits"])),
                     "loc": (want["loc"], got["loc"]), "reg": (want["reg"], got["reg"])}
            for key, (a, b) in pairs.items():
                d = np.abs(np.asarray(a, np.float64) - b)
                sums[key] += float(d.sum())
                peaks[key] = max(peaks[key], float(d.max()))
                count[key] += d.size
    finally:
        model.train(was_training)
        model.inference_only = was_inference_only
    return {"events": len(events), "reference": "PyTorch QAT network (fake quantization, eval mode)",
            "mean_abs_diff": {k: sums[k] / max(count[k], 1) for k in sums}, "max_abs_diff": peaks,
            "tolerance_mean_abs_diff": QAT_PARITY_TOLERANCE}


def load_qat_checkpoint(checkpoint: Path) -> tuple[dict[str, Any], PFJetSSD, INT8QATQuantizer]:
    """A QAT training checkpoint → (its state, the network with the quantizer attached and loaded, eval mode)."""
    from jetssd.model.config import NetConfig
    from jetssd.train.trainer import load_checkpoint

    state = load_checkpoint(Path(checkpoint))
    config = json.loads(state["config"])
    compress = config.get("compress", {})
    if not compress.get("int8_qat", False):
        raise ValueError(f"{checkpoint} was not trained with compress.int8_qat = true; quantize its float export "
                         "after training instead (jetssd quantize --model)")
    model = PFJetSSD(NetConfig.from_dict(config["model"]), training_head=True)
    quantizer = attach_int8_qat(model, **qat_options(compress))
    model.load_state_dict(state["model"], strict=True)
    model.eval()
    return state, model, quantizer


def export_int8_qat(checkpoint: Path, repository: Path, events: Sequence[SparsePixels], *, version: int = 1,
                    calibration_sources: Sequence[str] = (), metrics: dict[str, Any] | None = None,
                    overwrite: bool = False) -> Path:
    """Export a QAT checkpoint as version ``version`` of ``pfjet_ssd_int8`` (integer kernels in ORT on CPU).

    The effective weights are baked, the float graph (BN folded, weights on the int8 grid) is exported and checked
    by :func:`jetssd.export.export_model` into a temporary repository, and
    :func:`jetssd.quantize.int8.quantize_model` quantizes it with the learned activation parameters forced on
    every tensor. ``events`` serve the parity checks (int8 vs the baked float graph, int8 vs the PyTorch QAT
    network: ``quantization.parity`` and ``quantization.qat_parity``) and ORT's one-event calibration pass, whose
    ranges are all overridden.

    Raises:
        ValueError: not a QAT checkpoint, an activation range never observed, a graph tensor ORT quantized
            without QAT parameters, or int8 outputs too far from the QAT network's.
        FileExistsError: the version exists and ``overwrite`` is False.
    """
    from jetssd.export import export_model, model_name, sha256_file
    from jetssd.quantize.int8 import DEFAULT_EXCLUDE, PARITY_EVENTS, VARIANT, FixedRanges, quantize_model

    if len(events) == 0:
        raise ValueError("events is empty: give at least one event")
    checkpoint = Path(checkpoint)
    final = Path(repository) / model_name(VARIANT) / str(version)
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} exists; pass overwrite=True to replace it")
    state, model, quantizer = load_qat_checkpoint(checkpoint)
    qparams = quantizer.activation_qparams(require_all=True)
    resolved: dict[str, Any] = {}

    def overrides(prepared: Path) -> dict[str, list[dict[str, Any]]]:
        table, names = tensor_quant_overrides(prepared, qparams)
        resolved.update(table=table, names=names)
        return table

    def check(int8_path: Path) -> dict[str, Any]:
        bad = uncovered_tensors(int8_path, resolved["table"])
        if bad:
            raise ValueError(f"ORT quantized activations that QAT did not simulate: {bad}")
        parity = compare_with_qat(model, int8_path, events[:PARITY_EVENTS])
        if not all(v <= QAT_PARITY_TOLERANCE for v in parity["mean_abs_diff"].values()):  # `not <=`: NaN fails
            raise ValueError(f"the int8 graph does not reproduce the QAT network (mean |Δ| above "
                             f"{QAT_PARITY_TOLERANCE}): {parity}")
        quantized = _quantized_tensors(int8_path)
        ranges = {tensor: {"onnx_tensor": name, **qparams[tensor].to_dict()}
                  for tensor, name in resolved["names"].items() if name in quantized}
        return {"qat_parity": parity, "activation_ranges": ranges}

    with tempfile.TemporaryDirectory() as work:
        baked = Path(work) / checkpoint.name
        torch.save({**state, "model": quantizer.baked_state_dict()}, baked)
        float_dir = export_model(baked, "fpn", Path(work) / "repository")
        float_meta = json.loads((float_dir / "metadata.json").read_text())
        fixed = FixedRanges(
            method="qat", overrides=overrides, exclude=quantizer.float_patterns(), check=check,
            settings={"qat": {"float_layers": list(quantizer.float_layers), "steps": quantizer.step,
                              "freeze_bn_step": quantizer.freeze_bn_step,
                              "freeze_observer_step": quantizer.freeze_observer_step,
                              "ranges": "EMA min/max observers of the QAT run, forced via TensorQuantOverrides"}},
            metadata={"checkpoint": {"file": checkpoint.name, "sha256": sha256_file(checkpoint),
                                     "epoch": int(state["epoch"])},
                      "float_model": {"dir": None, "name": "BN-folded float graph of the QAT checkpoint (not kept)",
                                      "version": None, "sha256": float_meta["model_sha256"],
                                      "parity_vs_pytorch": float_meta["parity"]}})
        return quantize_model(float_dir, repository, events, version=version, per_channel=True, fmt="qdq",
                              activation_type="uint8", reduce_range=False, exclude=DEFAULT_EXCLUDE,
                              calibration_sources=calibration_sources, metrics=metrics, overwrite=overwrite,
                              fixed=fixed)
