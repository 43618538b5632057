"""Model size: parameters, conv MACs and the reference's "ops" (reference §3.4).

Counts come from forward hooks on a shape-only pass (``meta`` device: no memory, no arithmetic), so they
follow the actual graph, circular-padding copies and all, rather than a hand-kept formula.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from jetssd.model.config import NetConfig
from jetssd.model.layers import ACTIVATION_TYPES
from jetssd.model.network import PFJetSSD

INPUT_SHAPE = (1, 3, 340, 360)
"""One event, as the reference counts (batch 1)."""


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters (``requires_grad``), BN γ/β, PReLU slopes, L2Norm and ECA included (reference §3.4)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@dataclass(frozen=True)
class Complexity:
    """Per-event counts of one graph on a 340×360 input.

    Attributes:
        conv_macs: Σ over Conv2d of output elements × C_in/groups × k² (heads included; ECA's Conv1d is not
            counted, like the reference, which skips L2Norm and ECA: 384 MACs per source).
        bn_elements: Σ over BatchNorm2d of input elements.
        activation_elements: Σ over activations (PReLU/ReLU/LeakyReLU/ReLU6) of input elements.
    """

    conv_macs: int
    bn_elements: int
    activation_elements: int

    @property
    def reference_ops(self) -> int:
        """The reference's counting rule (``utils.GetResources``): conv MACs + 2 × BN + 1 × activation elements.

        The reference's float model has only PReLU activations and counts 1 op per PReLU input element; we
        count every activation type the same way.
        """
        return self.conv_macs + 2 * self.bn_elements + self.activation_elements


def measure(config: NetConfig, training_head: bool = False) -> Complexity:
    """Count the inference graph (idx 0–11 + head 1) or, with ``training_head``, the training graph."""
    with torch.device("meta"):
        model = PFJetSSD(config, training_head=training_head).eval()
    totals = {"conv": 0, "bn": 0, "act": 0}

    def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        if isinstance(module, nn.Conv2d):
            k = module.weight[0].numel()  # C_in/groups × kernel elements
            totals["conv"] += output.numel() * k
        elif isinstance(module, nn.BatchNorm2d):
            totals["bn"] += inputs[0].numel()
        else:
            totals["act"] += inputs[0].numel()

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, *ACTIVATION_TYPES))]
    try:
        with torch.no_grad():
            model(torch.empty(INPUT_SHAPE, device="meta"))
    finally:
        for h in handles:
            h.remove()
    return Complexity(conv_macs=totals["conv"], bn_elements=totals["bn"], activation_elements=totals["act"])


def conv_macs(config: NetConfig, training_head: bool = False) -> int:
    """Conv2d multiply-accumulates per 340×360 event (backbone + heads)."""
    return measure(config, training_head).conv_macs


def reference_ops(config: NetConfig, training_head: bool = False) -> int:
    """Ops per event by the reference's rule (§3.4): conv MACs + 2 × BN + 1 × activation input elements."""
    return measure(config, training_head).reference_ops
