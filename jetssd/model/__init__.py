"""PFJet-SSD network in PyTorch (optional ``train`` extra).

:mod:`jetssd.model.config` is plain stdlib, so ``from jetssd.model import NetConfig`` works without torch.
``PFJetSSD`` and ``export_onnx`` (from :mod:`jetssd.model.network`) are imported lazily on first access.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from jetssd.model.config import NetConfig

if TYPE_CHECKING:
    from jetssd.model.network import PFJetSSD, calibrate_batchnorm, export_onnx

__all__ = ["NetConfig", "PFJetSSD", "calibrate_batchnorm", "export_onnx"]


def __getattr__(name: str) -> Any:
    if name in ("PFJetSSD", "export_onnx", "calibrate_batchnorm"):
        from jetssd.model import network

        return getattr(network, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
