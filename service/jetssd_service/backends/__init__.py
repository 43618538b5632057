"""Backends of the gateway: ``local`` (in-process ONNX Runtime), ``triton`` (the ensemble) and ``dsp``."""

from jetssd_service.backends.base import Backend, BackendStatus, BatchResult

__all__ = ["Backend", "BackendStatus", "BatchResult"]
