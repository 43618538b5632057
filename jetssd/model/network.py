"""The PFJet-SSD network (reference §3.2–3.3) and its ONNX export.

``backbone[k]`` is the reference's ``mobilenet[k]`` for k = 0 … 14 (inference graph: 0 … 11), so pruning, TWN
and the DSP compiler can address layers by the reference's indices:

====  ========  ===============  ==========================
idx   op        widths index     output H×W on 340×360
====  ========  ===============  ==========================
0     ConvBN    0                340×360
1     AvgPool   —                171×181
2–4   ConvDW    1, 2, 3          171×181
5     AvgPool   —                86×91
6–8   ConvDW    4, 5, 6          86×91
9     AvgPool   —                44×46
10–11 ConvDW    7, 8             44×46 → source 1
12    AvgPool   —                23×24     (training only)
13–14 ConvDW    9, 10            23×24 → source 2 (training only)
====  ========  ===============  ==========================

Each source goes through L2Norm → ECA (:class:`~jetssd.model.layers.SourceAttention`) and a
:class:`~jetssd.model.layers.DetectionHead`. Outputs are flattened per source NHWC (η outer, φ inner) and
concatenated source-major, the order of :mod:`jetssd.anchors`.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from jetssd.model.config import NetConfig
from jetssd.model.layers import (
    ConvBN,
    ConvDW,
    DetectionHead,
    InputTransform,
    PhiPad,
    SourceAttention,
    avg_pool,
    prelu_as_max,
)

POOL_INDICES = (1, 5, 9, 12)
"""Backbone indices of the average pools (reference §3.2)."""
SOURCE1_INDEX = 11
"""Backbone index whose output is source 1 (the inference graph ends here)."""
SOURCE2_INDEX = 14
"""Backbone index whose output is source 2 (training graph only)."""
SOURCE_SHAPES: tuple[tuple[int, int], ...] = ((44, 46), (23, 24))
"""(n_η, n_φ) of source 1 and source 2 for the full 340×360 image."""
N_ANCHORS_INFERENCE = 44 * 46
"""P of the inference graph: 2024 cells of source 1."""
N_ANCHORS_TRAINING = N_ANCHORS_INFERENCE + 23 * 24
"""P of the training graph: 2576 = 2024 + 552."""
BACKGROUND_PRIOR = 0.99
"""Initial softmax probability of the background class (focal-loss prior init of the cls bias)."""
REG_BIAS_INIT = math.log(0.8)
"""Initial reg output: targets are ln(pT / 1 TeV) and typical jets have 0.4–2 TeV, so start at ln 0.8."""
ONNX_INPUT = "image"
ONNX_OUTPUTS = ("loc", "cls_logits", "reg")


def source_shape(height: int, width: int, n_pools: int) -> tuple[int, int]:
    """Map size after ``n_pools`` reference pools (n → ⌊n/2⌋ + 1 each): (340, 360, 3) → (44, 46)."""
    for _ in range(n_pools):
        height, width = height // 2 + 1, width // 2 + 1
    return height, width


def build_backbone(config: NetConfig, training_head: bool) -> nn.ModuleList:
    """The reference's ``mobilenet`` ModuleList: indices 0 … 14 (training) or 0 … 11 (inference)."""
    last = SOURCE2_INDEX if training_head else SOURCE1_INDEX
    widths = iter(config.widths)
    layers: list[nn.Module] = []
    c_in = 3
    for idx in range(last + 1):
        if idx in POOL_INDICES:
            layers.append(avg_pool())
            continue
        c_out = next(widths)
        if idx == 0:
            layers.append(ConvBN(c_in, c_out, config.activation, config.circular_phi, config.dropblock))
        else:
            layers.append(ConvDW(c_in, c_out, config.activation, config.circular_phi))
        c_in = c_out
    return nn.ModuleList(layers)


class PFJetSSD(nn.Module):
    """PFJet-SSD: image → per-anchor box offsets, class logits and pT regression.

    Args:
        config: architecture (:class:`~jetssd.model.config.NetConfig`).
        training_head: build idx 12–14 and the second source/head (P = 2576). ``False`` builds the inference
            graph only (P = 2024), which is what gets exported.

    Attributes:
        inference_only: when set, ``forward`` stops at source 1 (P = 2024) even if the training head exists.
    """

    def __init__(self, config: NetConfig | None = None, training_head: bool = True) -> None:
        super().__init__()
        self.config = config if config is not None else NetConfig()
        self.training_head = training_head
        self.inference_only = False
        cfg = self.config
        c1, c2 = cfg.source_widths
        self.normalise = InputTransform(cfg.normalisation)
        self.backbone = build_backbone(cfg, training_head)
        self.source1 = SourceAttention(c1)
        self.head1 = DetectionHead(c1, cfg.n_classes, cfg.circular_phi)
        self.source2: SourceAttention | None = SourceAttention(c2) if training_head else None
        self.head2: DetectionHead | None = DetectionHead(c2, cfg.n_classes, cfg.circular_phi) if training_head else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Xavier-uniform convs (ECA's Conv1d included), BN γ=1 β=0, PReLU 0.25, L2Norm 20, prior-init heads."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.Conv1d):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                m.reset_parameters()
            elif isinstance(m, nn.PReLU):
                m.weight.fill_(0.25)
        for head in self.heads():
            head.init_bias(BACKGROUND_PRIOR, REG_BIAS_INIT)

    def heads(self) -> list[DetectionHead]:
        """The detection heads that exist (1 or 2)."""
        return [h for h in (self.head1, self.head2) if h is not None]

    @property
    def n_sources(self) -> int:
        """Sources the next ``forward`` uses: 1 (inference) or 2 (training graph)."""
        return 2 if self.training_head and not self.inference_only else 1

    def set_phi_wrap(self, enabled: bool) -> None:
        """Toggle circular φ padding at run time (``config.circular_phi`` models only). Off = zero padding: use it
        for training on crops, whose left and right edges are not φ neighbours; weights are unchanged."""
        if not self.config.circular_phi:
            raise ValueError("this model was built with circular_phi=False: it has no φ padding to toggle")
        for m in self.modules():
            if isinstance(m, PhiPad):
                m.wrap = enabled

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Raw image [N, 3, H, W] in GeV (float32; 340×360 for the anchor contract, any size works) →

        ``loc`` [N, P, 2], ``cls_logits`` [N, P, n_classes + 1], ``reg`` [N, P, 1] with P = 2024 (one source) or
        2576 (two sources) on 340×360; anchor p = i_η·n_φ + j_φ within a source, sources concatenated.
        """
        x = self.normalise(image)
        for idx in range(SOURCE1_INDEX + 1):
            x = self.backbone[idx](x)
        outputs = [self.head1(self.source1(x))]
        if self.n_sources == 2:
            assert self.source2 is not None
            assert self.head2 is not None
            for idx in range(SOURCE1_INDEX + 1, SOURCE2_INDEX + 1):
                x = self.backbone[idx](x)
            outputs.append(self.head2(self.source2(x)))
        if len(outputs) == 1:
            return outputs[0]
        loc, cls, reg = (torch.cat(parts, dim=1) for parts in zip(*outputs, strict=True))
        return loc, cls, reg

    def inference_model(self) -> PFJetSSD:
        """A new eval-mode inference graph (idx 0–11 + head 1, P = 2024) holding a copy of these weights.

        The copy is loaded strictly from the matching subset of this model's state dict (no ``strict=False``
        that could hide a mismatch, §10.11); this model is left untouched and can keep training.
        """
        net = PFJetSSD(self.config, training_head=False)
        net.load_state_dict(inference_state_dict(self.state_dict()), strict=True)
        ref = next(self.parameters())
        return net.to(ref.device).eval()


def inference_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The entries of a (training or inference) state dict that the inference graph has."""
    def keep(key: str) -> bool:
        if key.startswith(("source2.", "head2.")):
            return False
        if key.startswith("backbone."):
            return int(key.split(".")[1]) <= SOURCE1_INDEX
        return True

    return {k: v for k, v in state.items() if keep(k)}


def export_onnx(model: PFJetSSD, path: str | Path, opset: int = 17, prelu_max: bool = True) -> Path:
    """Export the inference graph (P = 2024) of ``model`` to ONNX; returns the path.

    Input ``image`` [N, 3, 340, 360] float32 raw GeV, outputs ``loc`` [N, 2024, 2], ``cls_logits``
    [N, 2024, n_classes + 1], ``reg`` [N, 2024, 1]; the batch axis is dynamic. ``model`` is not modified (an
    fp32 CPU copy is exported). BN is folded into the convs by the exporter (eval mode).

    ``prelu_max``: write each PReLU whose slopes lie in [0, 1] as ``Max(x, Mul(x, a))`` instead of ``PRelu``
    (bit-identical, see :class:`~jetssd.model.layers.PReLUMax`): ONNX Runtime's CPU PRelu kernel takes ~60 % of
    the graph's time, the rewrite halves the latency. PReLUs with other slopes stay ``PRelu`` nodes.

    Uses the TorchScript-based exporter (``dynamo=False``): the torch.export-based one needs ``onnxscript``,
    which is not a dependency. Its deprecation warning is silenced here on purpose.
    """
    if opset < 17:
        raise ValueError(f"opset must be ≥ 17, got {opset}")
    path = Path(path)
    net = model.inference_model().float().cpu()  # fresh parameters: contiguous whatever ``model``'s layout
    if prelu_max:
        prelu_as_max(net)
    dummy = torch.zeros(1, 3, 340, 360)
    batch_axis = {0: "batch"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            net, (dummy,), str(path), dynamo=False, opset_version=opset,
            input_names=[ONNX_INPUT], output_names=list(ONNX_OUTPUTS),
            dynamic_axes={name: batch_axis for name in (ONNX_INPUT, *ONNX_OUTPUTS)},
            do_constant_folding=True,
        )
    return path


def calibrate_batchnorm(model: nn.Module, images: Tensor) -> nn.Module:
    """Set every BatchNorm's running statistics to the batch statistics of ``images``; return it in eval mode.

    Args:
        model: any module containing BatchNorm2d layers (modified in place).
        images: [N, 3, 340, 360] GeV, a representative batch.

    Used to re-estimate statistics after surgery (pruning, quantization) and, in tests and benchmarks, to give
    a random-weight network realistic activations: with default statistics (μ = 0, σ² = 1) each depthwise block
    shrinks them ~10×, so a random net in eval mode outputs little more than its head biases.
    """
    momenta = {}
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            momenta[m] = m.momentum
            m.momentum = None  # cumulative average: one batch gives exactly its statistics
    model.train()
    with torch.no_grad():
        model(images)
    for m, momentum in momenta.items():
        m.momentum = momentum
    return model.eval()
