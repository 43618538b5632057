"""Ternary-weight (TWN) quantization-aware training of PFJet-SSD (reference §3.5, with the bugs of §10.12 fixed).

Quantizer, per output filter c of a selected conv weight W [C_out, C_in/groups, k, k]::

    Δ_c = 0.7 · mean(|W_c|)                      threshold (mean over the C_in/groups·k·k entries; 9 for depthwise)
    α_c = mean(|W_c[|W_c| ≥ Δ_c]|)               scale (α_c = 0 and codes 0 for an all-zero filter: no NaN)
    W_t = α_c · sign(W) · 1[|W| ≥ Δ_c]           = α_c · codes, codes ∈ {-1, 0, +1} (int8)

**Which layers.** ``layers="depthwise"`` (default): the depthwise 3×3 convolution ``dw`` of every
:class:`~jetssd.model.layers.ConvDW` block, which is what the reference's predicate (3×3, in > 3, out > 4)
selects on its network, and what the DSP contract builds on (2-bit codes + per-channel scale).
``"depthwise+pointwise"`` also ternarizes the 1×1 ``pw`` convs. The first conv (3 input channels), the heads,
BN, PReLU, L2Norm and ECA always stay full precision; activations are not quantized.

**Training.** :class:`TWNQuantizer` registers a :mod:`torch.nn.utils.parametrize` parametrization on each
selected ``weight``. The full-precision *latent* weight lives on as ``<conv>.parametrizations.weight.original``
(the very same ``nn.Parameter`` object, so an optimizer built before or after :meth:`TWNQuantizer.attach` holds
it); every access to ``<conv>.weight`` returns the ternary W_t. Δ and α are **recomputed from the latent weight
at every forward pass** (every step, every validation batch), not frozen per epoch as in the reference. The
gradient is the plain straight-through estimator of the reference: ∂L/∂W_latent = ∂L/∂W_t, unchanged (no
masking, no α scaling). Unlike the reference, the latent weights are never overwritten by ternary values.

**State-dict keys.** While attached, a selected conv's weight is saved under
``<conv>.parametrizations.weight.original`` (e.g. ``backbone.2.dw.parametrizations.weight.original``) and holds
the *latent* weight; all other keys are unchanged. Such a state dict loads strictly into a model with the
quantizer attached (resume). :func:`bake_state_dict` turns it into a plain state dict (``<conv>.weight`` =
ternary values α·codes) that loads strictly into a plain :class:`~jetssd.model.network.PFJetSSD` (export).

Shapes: weights [C_out, C_in/groups, kH, kW]; codes the same shape (int8); alpha [C_out] (float32, in the units of
the weight, i.e. dimensionless).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from types import TracebackType
from typing import Literal, cast, get_args

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from jetssd.model.layers import ConvDW, fp32_region

LayerSelection = Literal["depthwise", "depthwise+pointwise"]
"""Which convolutions are ternarized (see the module docstring)."""
LAYER_SELECTIONS: tuple[str, ...] = get_args(LayerSelection)
THRESHOLD_FACTOR = 0.7
"""Δ_c = THRESHOLD_FACTOR · mean(|W_c|): the TWN paper's approximation of the optimal threshold (≈ 0.6σ for a
Gaussian filter), used by the reference."""
LATENT_SUFFIX = ".parametrizations.weight.original"
"""State-dict key suffix of a latent (full-precision) weight while the quantizer is attached."""
PATTERN_TOP = 36
"""Patterns :func:`pattern_histogram` returns by default (the reference's 6×6 show-filters grid)."""

Pattern = tuple[tuple[int, int, int], tuple[int, int, int], tuple[int, int, int]]
"""A 3×3 ternary kernel, rows = η (kernel row), columns = φ (kernel column)."""


# ---------------------------------------------------------------------------------------------- the quantizer


def ternarize(weight: Tensor) -> tuple[Tensor, Tensor]:
    """TWN codes and scales of a conv weight (no gradient).

    Args:
        weight: [C_out, C_in/groups, kH, kW] (any float dtype, any memory layout).

    Returns:
        ``codes``: int8, same shape as ``weight``, values in {-1, 0, +1} (contiguous);
        ``alpha``: float32 [C_out], ≥ 0. An all-zero filter gets α = 0 and all codes 0.
    """
    if weight.dim() < 2:
        raise ValueError(f"expected a weight with an output-filter axis, got shape {tuple(weight.shape)}")
    # fp32 whatever the weight dtype or autocast state: the threshold comparison must not see bf16 rounding.
    with torch.no_grad(), fp32_region(weight):
        flat = weight.detach().float().reshape(weight.shape[0], -1)  # [C_out, n]
        magnitude = flat.abs()
        delta = THRESHOLD_FACTOR * magnitude.mean(dim=1, keepdim=True)  # [C_out, 1]
        kept = magnitude >= delta
        # clamp_min(1): never 0/0 (the reference's NaN, §10.12); an all-zero filter keeps all entries (Δ = 0)
        # and its α is 0/n = 0.
        alpha = (magnitude * kept).sum(dim=1) / kept.sum(dim=1).clamp_min(1)
        kept &= (alpha > 0).unsqueeze(1)  # α = 0 (all zero, or an underflow) means codes 0, not ±0·sign
        codes = (torch.sign(flat) * kept).to(torch.int8).reshape(weight.shape)
    return codes, alpha


def dequantize(codes: Tensor, alpha: Tensor) -> Tensor:
    """Ternary weight α_c · codes: codes [C_out, ...] int8 in {-1, 0, 1}, alpha [C_out] → alpha.dtype, codes' shape."""
    if alpha.dim() != 1 or alpha.shape[0] != codes.shape[0]:
        raise ValueError(f"alpha must be [C_out] = [{codes.shape[0]}], got {tuple(alpha.shape)}")
    scale = alpha.reshape(-1, *([1] * (codes.dim() - 1)))
    return scale * codes.to(alpha.dtype)


def ternary_weight(weight: Tensor) -> Tensor:
    """W_t = dequantize(ternarize(W)), in ``weight``'s dtype and memory layout, without gradient."""
    codes, alpha = ternarize(weight)
    out = torch.empty_like(weight)  # keeps channels_last strides, so the conv sees the layout it was given
    with torch.no_grad():
        out.copy_(dequantize(codes, alpha))
    return out


class TernaryWeight(nn.Module):
    """Parametrization latent W → ternary W_t with a straight-through gradient (∂W_t/∂W := identity).

    ``W_t + (W − W.detach())`` rather than the textbook ``W + (W_t − W).detach()``: both have gradient 1 w.r.t.
    W, but x − x is exactly 0 in floating point while W + (W_t − W) can round W_t by an ulp, which would leave
    more than 3 distinct values per filter and break bit-equality with the baked model.
    """

    def forward(self, weight: Tensor) -> Tensor:
        ternary = ternary_weight(weight)
        if not (torch.is_grad_enabled() and weight.requires_grad):
            return ternary  # eval / no_grad: nothing to route a gradient to
        return ternary + (weight - weight.detach())


# ------------------------------------------------------------------------------------------ layer selection


def select_layers(model: nn.Module, layers: LayerSelection = "depthwise") -> dict[str, nn.Conv2d]:
    """The convs to ternarize, by qualified name (e.g. ``"backbone.2.dw"``), in network order.

    ``model`` is the bare network (attach before wrapping it in DDP or ``torch.compile``, whose names differ).
    """
    if layers not in LAYER_SELECTIONS:
        raise ValueError(f"layers must be one of {LAYER_SELECTIONS}, got {layers!r}")
    children = ("dw",) if layers == "depthwise" else ("dw", "pw")
    selected: dict[str, nn.Conv2d] = {}
    for name, module in model.named_modules():
        if isinstance(module, ConvDW):
            for child in children:
                conv = getattr(module, child)
                assert isinstance(conv, nn.Conv2d)
                selected[f"{name}.{child}" if name else child] = conv
    if not selected:
        raise ValueError("model has no ConvDW block: nothing to ternarize")
    return selected


def latent_weight(conv: nn.Conv2d) -> Tensor:
    """The full-precision weight of ``conv``: ``parametrizations.weight.original`` when the TWN parametrization is
    attached, else ``weight`` itself (a plain model, or a baked one whose weights are already ternary)."""
    if parametrize.is_parametrized(conv, "weight"):
        plist = cast(nn.ModuleDict, conv.parametrizations)["weight"]
        return cast(Tensor, plist.original)
    return conv.weight


# --------------------------------------------------------------------------------------------------- state


@dataclass(frozen=True)
class TernaryLayer:
    """One ternarized conv: ``codes`` int8 [C_out, C_in/groups, kH, kW] in {-1, 0, 1}, ``alpha`` float32 [C_out]."""

    codes: Tensor
    alpha: Tensor

    @property
    def weight(self) -> Tensor:
        """α_c · codes, float32, the shape of ``codes``."""
        return dequantize(self.codes, self.alpha)

    @property
    def sparsity(self) -> float:
        """Fraction of zero codes."""
        return float((self.codes == 0).float().mean())


def ternary_state(model: nn.Module, layers: LayerSelection = "depthwise") -> dict[str, TernaryLayer]:
    """Codes and scales of every selected conv, computed from its latent weight (attached quantizer) or from its
    plain weight (a plain or baked model; ternarizing ternary values gives the same codes, and α up to rounding)."""
    return {name: TernaryLayer(*ternarize(latent_weight(conv))) for name, conv in select_layers(model, layers).items()}


def sparsity(model: nn.Module, layers: LayerSelection = "depthwise") -> dict[str, float]:
    """Fraction of zero codes per selected layer (the reference reports ≈ 0.465–0.47 for trained depthwise
    filters; a uniform random init gives ≈ 0.35)."""
    return {name: layer.sparsity for name, layer in ternary_state(model, layers).items()}


def total_sparsity(model: nn.Module, layers: LayerSelection = "depthwise") -> float:
    """Fraction of zero codes over all selected weights together (layers weighted by their size)."""
    state = ternary_state(model, layers).values()
    zeros = sum(int((s.codes == 0).sum()) for s in state)
    return zeros / max(1, sum(s.codes.numel() for s in state))


def pattern_histogram(model: nn.Module, top: int = PATTERN_TOP,
                      layers: LayerSelection = "depthwise") -> list[tuple[Pattern, int]]:
    """The ``top`` most common 3×3 ternary kernels over all selected 3×3 convs, most common first.

    Each input-channel slice of each filter counts once (depthwise: one kernel per channel). Ties are broken by
    the pattern itself, so the order is deterministic. 1×1 (pointwise) convs have no 3×3 pattern and are skipped.
    """
    counts: Counter[Pattern] = Counter()
    for layer in ternary_state(model, layers).values():
        if tuple(layer.codes.shape[-2:]) != (3, 3):
            continue
        for kernel in layer.codes.reshape(-1, 3, 3).tolist():
            counts[cast(Pattern, tuple(tuple(row) for row in kernel))] += 1
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return ranked[:top]


def bake_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A state dict of a TWN-attached model → the plain state dict of the same model with ternary weights.

    Every ``<conv>.parametrizations.weight.original`` (latent) becomes ``<conv>.weight`` = α·codes (same dtype);
    other entries are passed through (shared, not copied). A plain state dict comes back unchanged, so an
    exporter can call this on any checkpoint. Every parametrized weight is assumed to be a TWN one: this project
    registers no other parametrization.
    """
    baked: dict[str, Tensor] = {}
    for key, value in state.items():
        if key.endswith(LATENT_SUFFIX):
            baked[key[: -len(LATENT_SUFFIX)] + ".weight"] = ternary_weight(value)
        else:
            baked[key] = value
    return baked


# ------------------------------------------------------------------------------------------- training API


class TWNQuantizer:
    """Ternary-weight QAT for the selected convs of ``model`` (see the module docstring for the semantics).

    Args:
        model: the bare network (before DDP / ``torch.compile`` wrapping), with its full-precision weights loaded.
        layers: ``"depthwise"`` (default, the reference's choice and the DSP contract) or
            ``"depthwise+pointwise"``.
        clamp_latent: :meth:`after_step` clamps the latent weights to [−clamp_latent, clamp_latent]; None turns
            the clamp off. Default 1.0, the reference's value. Why keep it: with a plain STE a latent weight gets
            gradient whatever its size, so it can drift far past Δ and then needs a long run of opposite
            gradients before its code can flip; a bound limits that drift. It is harmless here: the ternary
            output is α·codes, so the latent magnitude only matters relative to Δ, and every ternarized conv is
            followed by BN, which absorbs any per-channel scale. With the Xavier init (|W| ≲ 0.1 for a 3×3
            depthwise filter) the bound is rarely reached.

    Lifecycle: ``attach()`` → train (call :meth:`after_step` after every ``optimizer.step()``) → ``bake()`` for
    export (or ``detach()`` to get the full-precision latent model back). Usable as a context manager: attaches
    on entry, detaches on exit unless baked.
    """

    def __init__(self, model: nn.Module, layers: LayerSelection = "depthwise",
                 clamp_latent: float | None = 1.0) -> None:
        if clamp_latent is not None and not clamp_latent > 0:
            raise ValueError(f"clamp_latent must be > 0 or None, got {clamp_latent}")
        self.model = model
        self.layers: LayerSelection = layers
        self.clamp_latent = clamp_latent
        self.convs = select_layers(model, layers)
        self._attached = False
        self._baked_state: dict[str, TernaryLayer] | None = None

    @property
    def attached(self) -> bool:
        """Whether the selected weights are currently ternarized on the fly."""
        return self._attached

    def attach(self) -> TWNQuantizer:
        """Register the ternary parametrization on every selected weight; returns ``self``."""
        if self._attached:
            raise RuntimeError("the TWN quantizer is already attached")
        for name, conv in self.convs.items():
            if parametrize.is_parametrized(conv, "weight"):
                raise RuntimeError(f"{name}.weight is already parametrized (another quantizer attached?)")
        for conv in self.convs.values():
            parametrize.register_parametrization(conv, "weight", TernaryWeight())
        self._attached = True
        self._baked_state = None
        return self

    def latent_parameters(self) -> dict[str, Tensor]:
        """The latent full-precision weights by layer name (the ``nn.Parameter`` objects the optimizer updates)."""
        return {name: latent_weight(conv) for name, conv in self.convs.items()}

    @torch.no_grad()
    def after_step(self) -> None:
        """Clamp the latent weights to ±``clamp_latent`` (no-op when None). Call after every ``optimizer.step()``."""
        self._require_attached("after_step")
        if self.clamp_latent is None:
            return
        for weight in self.latent_parameters().values():
            weight.clamp_(-self.clamp_latent, self.clamp_latent)

    def state(self) -> dict[str, TernaryLayer]:
        """Codes + α per layer name, for the DSP compiler. After :meth:`bake`, the exact values that were baked."""
        if self._baked_state is not None:
            return self._baked_state
        return {name: TernaryLayer(*ternarize(latent_weight(conv))) for name, conv in self.convs.items()}

    def sparsity(self) -> dict[str, float]:
        """Fraction of zero codes per layer (see :func:`sparsity`)."""
        return {name: layer.sparsity for name, layer in self.state().items()}

    @torch.no_grad()
    def bake(self) -> nn.Module:
        """Remove the parametrizations and leave the ternary values α·codes in the plain ``weight``s.

        The model becomes an ordinary network (plain state-dict keys, ``inference_model()`` and ONNX export work)
        whose outputs equal the quantized model's. The latent weights are gone (the ``weight`` Parameter is the
        former latent Parameter object, now holding ternary values). Returns the model.
        """
        self._require_attached("bake")
        state = self.state()
        for conv in self.convs.values():
            parametrize.remove_parametrizations(conv, "weight", leave_parametrized=True)
        self._attached = False
        self._baked_state = state
        return self.model

    def detach(self) -> nn.Module:
        """Remove the parametrizations and put the latent full-precision weights back as plain ``weight``s."""
        self._require_attached("detach")
        for conv in self.convs.values():
            parametrize.remove_parametrizations(conv, "weight", leave_parametrized=False)
        self._attached = False
        return self.model

    def _require_attached(self, what: str) -> None:
        if not self._attached:
            raise RuntimeError(f"{what}: the TWN quantizer is not attached")

    def __enter__(self) -> TWNQuantizer:
        return self if self._attached else self.attach()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._attached:
            self.detach()


def attach_twn(model: nn.Module, layers: LayerSelection = "depthwise",
               clamp_latent: float | None = 1.0) -> TWNQuantizer:
    """Create a :class:`TWNQuantizer` for ``model`` and attach it (the trainer's entry point)."""
    return TWNQuantizer(model, layers, clamp_latent).attach()
