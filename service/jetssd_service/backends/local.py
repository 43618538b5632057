"""The ``local`` backend: the exported ONNX graph and the shared post-processing, in the gateway's process.

One :class:`jetssd.inference.OnnxDetector` per variant (its anchors and thresholds come from that variant's
metadata), run in a worker thread (ONNX Runtime releases the GIL), at most ``max_concurrency`` batches at once:
with ``threads`` intra-op threads each, more would only oversubscribe the cores. It is also the CPU fallback
when Triton is unreachable (SONIC's local fallback server).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

import anyio
import numpy as np
from numpy.typing import NDArray

from jetssd.inference import OnnxDetector
from jetssd.postprocess import Detections, postprocess
from jetssd_service.backends.base import BackendStatus, BatchResult, ImageDetector
from jetssd_service.errors import ApiError
from jetssd_service.repository import ModelEntry, ModelRepository

log = logging.getLogger(__name__)


class LocalBackend:
    """ONNX Runtime in-process.

    Args:
        repository: the variants and their version directories.
        threads: ONNX Runtime intra-op threads per model.
        max_concurrency: batches running at once; further requests wait their turn.
        batch_size: events per ONNX Runtime run (bounds the activation memory of large requests).
        preload: load every variant in :meth:`start` instead of on first use.
    """

    name = "local"

    def __init__(self, repository: ModelRepository, *, threads: int = 1, max_concurrency: int = 1,
                 batch_size: int = 16, preload: bool = True) -> None:
        self._repository = repository
        self._threads = threads
        self._batch_size = batch_size
        self._preload = preload
        self._max_concurrency = max_concurrency
        self._limiter: asyncio.Semaphore | None = None
        self._detectors: dict[str, ImageDetector] = {}
        self._load_lock = threading.Lock()

    async def start(self) -> None:
        await self.start_variants(self._repository.variants)

    async def start_variants(self, variants: list[str]) -> None:
        """Create the concurrency limiter and, with ``preload``, load ``variants``."""
        self._limiter = asyncio.Semaphore(self._max_concurrency)
        if self._preload:
            for variant in variants:
                try:
                    await anyio.to_thread.run_sync(self._detector, variant)
                except ApiError as exc:  # reported by status() too; the other variants still load
                    log.error("%s backend: %s", self.name, exc.message)

    async def close(self) -> None:
        self._detectors.clear()

    def _load(self, entry: ModelEntry) -> ImageDetector:
        """The detector of a repository entry (subclasses run other executors on the same models)."""
        return OnnxDetector(entry.version_dir, threads=self._threads)

    def _detector(self, variant: str) -> ImageDetector:
        """The variant's detector, loaded on first use (thread-safe)."""
        detector = self._detectors.get(variant)
        if detector is not None:
            return detector
        with self._load_lock:
            if variant not in self._detectors:
                try:
                    self._detectors[variant] = self._load(self._repository[variant])
                except ApiError:
                    raise
                except Exception as exc:  # missing file, bad metadata, or the runtime refusing the model
                    raise ApiError("model_unavailable", f"{self.name} backend cannot load model {variant!r}: {exc}",
                                   field="model") from exc
                log.info("%s backend: loaded %r", self.name, self._detectors[variant])
            return self._detectors[variant]

    async def status(self, variant: str) -> BackendStatus:
        if variant not in self._repository:
            return BackendStatus(False, f"no model {variant!r} in {self._repository.root}")
        try:  # loads the model if it is not yet: ready means the model really runs here
            await anyio.to_thread.run_sync(self._detector, variant)
        except ApiError as exc:
            return BackendStatus(False, exc.message)
        return BackendStatus(True)

    async def detect(self, variant: str, images: NDArray[np.float32]) -> BatchResult:
        if self._limiter is None:
            raise RuntimeError(f"{type(self).__name__}.start() was not called")
        async with self._limiter:
            return await anyio.to_thread.run_sync(self._detect_sync, variant, images)

    def _detect_sync(self, variant: str, images: NDArray[np.float32]) -> BatchResult:
        """The detector's run then the shared post-processing, as its detect does, timing the two apart."""
        detector = self._detector(variant)
        detections: list[Detections] = []
        infer_s = post_s = 0.0
        for first in range(0, len(images), self._batch_size):
            t0 = time.perf_counter()
            loc, cls_logits, reg = detector.run(images[first:first + self._batch_size])
            t1 = time.perf_counter()
            detections.extend(postprocess(cls_logits, loc, reg, detector.anchors, detector.anchor_config,
                                          detector.postprocess_config))
            post_s += time.perf_counter() - t1
            infer_s += t1 - t0
        return BatchResult(detections, detector.version, 1e3 * infer_s, 1e3 * post_s, self._extra(detector))

    def _extra(self, detector: ImageDetector) -> dict[str, Any] | None:
        """Backend-specific response fields for a batch (:attr:`BatchResult.extra`); none here."""
        return None
