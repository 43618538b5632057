"""What every backend offers the gateway: jets for a dense batch of one model variant.

A backend turns float32 images [N, 3, 340, 360] into one :class:`jetssd.postprocess.Detections` per event with
the variant's own post-processing; the gateway does the rest (validation, rasterization, JSON, metrics).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray

from jetssd.anchors import AnchorConfig
from jetssd.postprocess import Detections, PostprocessConfig


@dataclass(frozen=True)
class BatchResult:
    """Jets of a batch and how long the backend took.

    Attributes:
        detections: one per event, in batch order, each sorted by score.
        model_version: the version of the model that ran.
        infer_ms: the model (for Triton: the whole ensemble round trip, post-processing included).
        postprocess_ms: decode + NMS in the gateway (local), or unpacking the server's jets (Triton).
        extra: backend-specific top-level response fields, e.g. ``{"dsp": {...}}`` (modelled DSP latency).
    """

    detections: list[Detections]
    model_version: int
    infer_ms: float
    postprocess_ms: float
    extra: dict[str, Any] | None = None


class ImageDetector(Protocol):
    """An in-process model executor (``jetssd.inference.OnnxDetector``, ``jetssd.dsp.detector.DspDetector``):
    raw head outputs of a batch plus what the shared post-processing needs to decode them."""

    @property
    def version(self) -> int: ...

    @property
    def anchors(self) -> NDArray[np.float64]: ...

    @property
    def anchor_config(self) -> AnchorConfig: ...

    @property
    def postprocess_config(self) -> PostprocessConfig: ...

    def run(self, images: NDArray[np.float32]) -> tuple[NDArray[np.float32], NDArray[np.float32],
                                                         NDArray[np.float32]]:
        """(loc [N, P, 2], cls_logits [N, P, 4], reg [N, P, 1]) of images [N, 3, 340, 360] (GeV)."""


@dataclass(frozen=True)
class BackendStatus:
    """Whether a backend can serve a variant now, and if not, why."""

    available: bool
    detail: str | None = None


class Backend(Protocol):
    """A place where models run. Implementations: local (ONNX Runtime in-process), triton, dsp."""

    name: str

    async def start(self) -> None:
        """Acquire resources (load models, connect); must not fail because a remote server is down."""

    async def close(self) -> None:
        """Release everything :meth:`start` acquired."""

    async def status(self, variant: str) -> BackendStatus:
        """Can :meth:`detect` serve ``variant`` now? Cheap enough for a readiness probe."""

    async def detect(self, variant: str, images: NDArray[np.float32]) -> BatchResult:
        """Jets of ``images`` (float32 [N, 3, 340, 360], GeV) with ``variant``.

        Raises:
            jetssd_service.errors.ApiError: ``backend_unavailable`` (503, Retry-After) when the backend cannot
                be reached, ``model_unavailable``, ``backend_error`` or ``not_implemented``.
        """
