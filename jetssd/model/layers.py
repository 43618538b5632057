"""Building blocks of PFJet-SSD (reference §3.1), with the production fixes of §10.

Shapes use N = batch, C = channels, H = η rows, W = φ columns. Every block works on contiguous (NCHW) and
channels_last tensors alike: nothing here calls ``.view`` on a tensor that may be non-contiguous.
"""

from __future__ import annotations

import contextlib
import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LEAKY_SLOPE = 0.25
"""Negative slope of ``activation="leaky_relu"``. It equals PReLU's initial slope, so a leaky-ReLU network is a
PReLU network with the slopes frozen at their init, and 0.25 = 2⁻² is an exact shift in fixed point (DSP)."""
L2NORM_INIT = 20.0
"""Initial per-channel scale of :class:`L2Norm` (reference §3.1)."""
L2NORM_EPS = 1e-6
"""Added to ‖x‖² inside the square root of :class:`L2Norm`: the reference's 1e-10 added to ‖x‖ underflows in
fp16 (§10.10). Here the norm is computed in fp32 anyway; the eps only keeps the gradient finite at x = 0."""
ECA_KERNEL = 3
"""Kernel of ECA's channel Conv1d (fixed, no adaptive-k formula, like the reference)."""

ACTIVATION_TYPES: tuple[type[nn.Module], ...] = (nn.PReLU, nn.ReLU, nn.LeakyReLU, nn.ReLU6)
"""Module types :func:`make_activation` returns (used by :mod:`jetssd.model.complexity` to count ops)."""


def fp32_region(x: Tensor) -> contextlib.AbstractContextManager[object]:
    """Context that turns autocast off for ``x``'s device when it is on (a no-op otherwise, e.g. in ONNX export)."""
    device = x.device.type
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        return torch.autocast(device_type=device, enabled=False)
    return contextlib.nullcontext()


def make_activation(name: str, channels: int) -> nn.Module:
    """Activation module by config name: ``prelu`` is per-channel with init slope 0.25 (reference §3.1)."""
    if name == "prelu":
        return nn.PReLU(channels, init=0.25)
    if name == "relu":
        return nn.ReLU(inplace=True)
    if name == "leaky_relu":
        return nn.LeakyReLU(LEAKY_SLOPE, inplace=True)
    if name == "relu6":
        return nn.ReLU6(inplace=True)
    raise ValueError(f"unknown activation {name!r}")


class PReLUMax(nn.Module):
    """PReLU written as max(x, a·x), exact for slopes 0 ≤ a ≤ 1: an export-time stand-in for :class:`nn.PReLU`.

    ONNX Runtime's CPU ``PRelu`` kernel is slow with per-channel slopes (~60 % of this graph's time); with
    ``Mul`` + ``Max`` instead the whole graph runs ~1.7× faster (benchmarks/bench_model.py). For a ≤ 1,
    a·x ≤ x when x ≥ 0 and a·x ≥ x when x < 0, so the maximum picks exactly PReLU's branch: bit-identical.
    """

    slope: Tensor

    def __init__(self, prelu: nn.PReLU) -> None:
        super().__init__()
        slope = prelu.weight.detach().clone()
        if slope.numel() > 0 and not bool(((slope >= 0) & (slope <= 1)).all()):
            raise ValueError("PReLUMax needs all slopes in [0, 1]")
        self.register_buffer("slope", slope)

    def forward(self, x: Tensor) -> Tensor:
        a = self.slope.reshape(1, -1, 1, 1) if self.slope.numel() > 1 else self.slope
        return torch.maximum(x, x * a.to(x.dtype))


def prelu_as_max(model: nn.Module) -> int:
    """Replace, in place, every :class:`nn.PReLU` whose slopes all lie in [0, 1] by :class:`PReLUMax`.

    Returns how many were replaced; a PReLU with a slope outside [0, 1] is kept (max(x, a·x) would be wrong).
    """
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.PReLU) and bool(((child.weight >= 0) & (child.weight <= 1)).all()):
                setattr(parent, name, PReLUMax(child))
                replaced += 1
    return replaced


class InputTransform(nn.Module):
    """The model's first op: raw image [N, 3, H, W] in GeV → network input [N, 3, H, W] (dimensionless).

    ``"log1p"``: x ← log1p(x / 1 GeV). Pixel values span ~0.1 GeV (pile-up) to ~1 TeV (jet cores); the log
    compresses that range into [0, ~7] with a fixed, event-independent map that a quantizer can cover with one
    scale and the DSP can evaluate with a lookup table. Inputs must be ≥ 0 (pT and ET are; the gateway rejects
    negative values), since log1p(x) is −inf at x = −1. ``"none"``: identity.
    """

    def __init__(self, kind: str) -> None:
        super().__init__()
        if kind not in ("log1p", "none"):
            raise ValueError(f"unknown normalisation {kind!r}")
        self.kind = kind

    def forward(self, x: Tensor) -> Tensor:
        if self.kind == "log1p":
            return torch.log1p(x)  # the image is already in GeV: x / 1 GeV is x
        return x

    def extra_repr(self) -> str:
        return self.kind


class PhiPad(nn.Module):
    """Pads φ (the last axis) by ``pad`` columns on each side: [N, C, H, W] → [N, C, H, W + 2·pad].

    ``wrap=True`` copies the opposite edge (φ is periodic: column 0 neighbours column 359, fixes §10.7);
    ``wrap=False`` pads zeros (for training on crops, whose φ edges are not neighbours: see
    :meth:`jetssd.model.network.PFJetSSD.set_phi_wrap`). η is padded by the following conv itself, with zeros.
    """

    def __init__(self, pad: int = 1, wrap: bool = True) -> None:
        super().__init__()
        self.pad = pad
        self.wrap = wrap

    def forward(self, x: Tensor) -> Tensor:
        p = self.pad
        if not self.wrap:
            return F.pad(x, (p, p, 0, 0))  # zeros; keeps channels_last
        # torch.cat keeps channels_last (F.pad(mode="circular") returns NCHW and is ~8× slower on it) and
        # exports to ONNX as Slice + Concat.
        return torch.cat([x[..., -p:], x, x[..., :p]], dim=-1)

    def extra_repr(self) -> str:
        return f"pad={self.pad}, wrap={self.wrap}"


def conv3x3(c_in: int, c_out: int, circular_phi: bool, groups: int = 1,
            bias: bool = False) -> list[tuple[str, nn.Module]]:
    """A 3×3 stride-1 'same' conv as named modules: ``[("pad", PhiPad), ("conv", Conv2d)]`` when φ wraps,
    ``[("conv", Conv2d(padding=1))]`` (zeros on both axes, the reference) otherwise."""
    if circular_phi:
        return [("pad", PhiPad(1)), ("conv", nn.Conv2d(c_in, c_out, 3, padding=(1, 0), groups=groups, bias=bias))]
    return [("conv", nn.Conv2d(c_in, c_out, 3, padding=1, groups=groups, bias=bias))]


class DropBlock2d(nn.Module):
    """DropBlock (Ghiasi et al. 2018) as in ``dropblock==0.3.0``, which the reference uses: [N, C, H, W] → same.

    In training, block centres are drawn per sample and position at rate ``drop_prob / block_size²``, shared
    across channels, grown to ``block_size``² squares, zeroed, and the kept activations are rescaled by
    numel / Σ kept so the mean activation is preserved. Identity in eval or with ``drop_prob == 0``.
    """

    def __init__(self, drop_prob: float, block_size: int = 3) -> None:
        super().__init__()
        if block_size % 2 != 1:
            raise ValueError("block_size must be odd (the block is centred on its seed)")
        self.drop_prob = drop_prob
        self.block_size = block_size

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.drop_prob == 0.0:
            return x
        n, _, h, w = x.shape
        gamma = self.drop_prob / self.block_size**2
        seeds = (torch.rand(n, 1, h, w, device=x.device) < gamma).float()
        dropped = F.max_pool2d(seeds, self.block_size, stride=1, padding=self.block_size // 2)
        keep = 1.0 - dropped
        # The rescale is computed in fp32 and guarded: an all-dropped batch (tiny maps) must not divide by 0.
        scale = keep.numel() / keep.sum().clamp_min(1.0)
        return x * (keep * scale).to(x.dtype)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}, block_size={self.block_size}"


class ConvBN(nn.Sequential):
    """Reference ``conv_bn`` (idx 0): 3×3 conv (no bias) → BN → DropBlock → act. [N, C_in, H, W] → [N, C_out, H, W].

    Named children (``pad``?, ``conv``, ``bn``, ``drop``, ``act``) let pruning, TWN and Conv-BN fusion address
    the layers by name.
    """

    def __init__(self, c_in: int, c_out: int, activation: str, circular_phi: bool, dropblock: float) -> None:
        super().__init__(OrderedDict([
            *conv3x3(c_in, c_out, circular_phi),
            ("bn", nn.BatchNorm2d(c_out)),
            ("drop", DropBlock2d(dropblock, 3)),
            ("act", make_activation(activation, c_out)),
        ]))


class ConvDW(nn.Sequential):
    """Reference ``conv_dw`` (MobileNet-v1 separable block): [N, C_in, H, W] → [N, C_out, H, W].

    depthwise 3×3 (groups = C_in, no bias) → BN → act → pointwise 1×1 (no bias) → BN → act. Children:
    ``dw_pad``?, ``dw``, ``dw_bn``, ``dw_act``, ``pw``, ``pw_bn``, ``pw_act``.
    """

    def __init__(self, c_in: int, c_out: int, activation: str, circular_phi: bool) -> None:
        dw = [("dw_" + name if name == "pad" else "dw", m)
              for name, m in conv3x3(c_in, c_in, circular_phi, groups=c_in)]
        super().__init__(OrderedDict([
            *dw,
            ("dw_bn", nn.BatchNorm2d(c_in)),
            ("dw_act", make_activation(activation, c_in)),
            ("pw", nn.Conv2d(c_in, c_out, 1, bias=False)),
            ("pw_bn", nn.BatchNorm2d(c_out)),
            ("pw_act", make_activation(activation, c_out)),
        ]))


def avg_pool() -> nn.AvgPool2d:
    """Reference pool (idx 1, 5, 9, 12): k2 s2 p1, zeros counted (PyTorch defaults). n → ⌊n/2⌋ + 1.

    The padding stays zeros even with circular φ: the map sizes (44×46, 23×24) are part of the anchor contract.
    """
    return nn.AvgPool2d(kernel_size=2, stride=2, padding=1, count_include_pad=True, ceil_mode=False)


class L2Norm(nn.Module):
    """Per-pixel L2 normalisation over channels times a learnable per-channel scale (init 20). [N, C, H, W] → same.

    Computed in fp32 whatever the input dtype (fp16/bf16 autocast): the sum of C squares overflows fp16 for
    |x| ≳ 20 and the reference's eps of 1e-10 underflows (§10.10). The result is cast back to the input dtype.
    """

    def __init__(self, channels: int, scale: float = L2NORM_INIT, eps: float = L2NORM_EPS) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.full((channels,), scale))

    def forward(self, x: Tensor) -> Tensor:
        with fp32_region(x):
            x32 = x.float()
            inv_norm = torch.rsqrt(x32.pow(2).sum(dim=1, keepdim=True) + self.eps)
            y = x32 * inv_norm * self.weight.reshape(1, -1, 1, 1)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.numel()}, eps={self.eps}"


class ECA(nn.Module):
    """Efficient channel attention (reference ``AttentionLayer``). [N, C, H, W] → same.

    Global average pool → Conv1d(1→1, k=3, pad 1, no bias) across channels → sigmoid → channel-wise rescale.
    The pool and the gate are computed in fp32 (a bf16 mean over ~2k pixels loses ~3 significant digits).
    """

    def __init__(self, kernel_size: int = ECA_KERNEL) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, 1, kernel_size, padding=kernel_size // 2, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        with fp32_region(x):
            pooled = x.float().mean(dim=(2, 3)).unsqueeze(1)  # [N, 1, C]
            gate = torch.sigmoid(self.conv(pooled))  # [N, 1, C]
        return x * gate.transpose(1, 2).unsqueeze(-1).to(x.dtype)  # [N, C, 1, 1] broadcast


class SourceAttention(nn.Sequential):
    """A detection source's feature refinement: L2Norm then ECA, **in that order** (the reference's last
    commit; earlier commits discarded the L2Norm output, §10.10). [N, C, H, W] → same."""

    def __init__(self, channels: int) -> None:
        super().__init__(OrderedDict([("l2norm", L2Norm(channels)), ("eca", ECA())]))


class DetectionHead(nn.Module):
    """Per-source heads: three 3×3 convs with bias, one anchor per cell (reference §3.3, bias added per §10.9).

    Input [N, C, H, W]; outputs, flattened NHWC (cell p = i_η·W + j_φ):
    ``loc`` [N, H·W, 2] (Δη, Δφ offsets), ``cls`` [N, H·W, n_classes + 1] logits (background first),
    ``reg`` [N, H·W, 1] (ln(pT / 1 TeV) target scale). φ is padded once for the three convs.
    """

    def __init__(self, channels: int, n_classes: int, circular_phi: bool) -> None:
        super().__init__()
        pad = 0 if circular_phi else 1
        self.pad: nn.Module = PhiPad(1) if circular_phi else nn.Identity()
        self.loc = nn.Conv2d(channels, 2, 3, padding=(1, pad))
        self.cls = nn.Conv2d(channels, n_classes + 1, 3, padding=(1, pad))
        self.reg = nn.Conv2d(channels, 1, 3, padding=(1, pad))

    @staticmethod
    def _flatten(y: Tensor) -> Tensor:
        """[N, A, H, W] → [N, H·W, A] with η outer, φ inner (reshape: channels_last-safe)."""
        return y.permute(0, 2, 3, 1).flatten(1, 2)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x = self.pad(x)
        return self._flatten(self.loc(x)), self._flatten(self.cls(x)), self._flatten(self.reg(x))

    @torch.no_grad()
    def init_bias(self, background_prior: float, reg_init: float) -> None:
        """Prior-probability init (focal-loss trick): cls bias = log of the class prior, so the initial softmax
        gives P(background) = ``background_prior`` and each of the n_classes foreground classes
        (1 − background_prior) / n_classes; as independent sigmoids the foreground logits then also start near
        that small prior. ``reg`` bias = ``reg_init`` (typical target), ``loc`` bias = 0 (offset from the cell)."""
        n_fg = self.cls.out_channels - 1
        assert self.cls.bias is not None
        assert self.reg.bias is not None
        assert self.loc.bias is not None
        self.cls.bias.fill_(math.log((1.0 - background_prior) / n_fg))
        self.cls.bias[0] = math.log(background_prior)
        self.reg.bias.fill_(reg_init)
        self.loc.bias.zero_()
