"""Quantization of PFJet-SSD (training extra): :mod:`jetssd.quantize.twn` — ternary weights (TWN).

The names below are imported lazily on first access, so ``import jetssd.quantize`` does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from jetssd.quantize.twn import (
        TernaryLayer,
        TWNQuantizer,
        attach_twn,
        bake_state_dict,
        dequantize,
        pattern_histogram,
        sparsity,
        ternarize,
        ternary_state,
        total_sparsity,
    )

__all__ = [
    "TWNQuantizer",
    "TernaryLayer",
    "attach_twn",
    "bake_state_dict",
    "dequantize",
    "pattern_histogram",
    "sparsity",
    "ternarize",
    "ternary_state",
    "total_sparsity",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from jetssd.quantize import twn

        return getattr(twn, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
