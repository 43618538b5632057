"""The gateway's work, independent of HTTP: parse → validate → rasterize → backend → jets, with metrics.

:class:`Gateway` owns the settings, the model repository, the backends and the metrics; ``app.py`` maps
routes onto it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import anyio
import numpy as np
from pydantic import ValidationError

from jetssd.event import CLASS_NAMES
from jetssd_service.backends.base import Backend, BackendStatus, BatchResult
from jetssd_service.backends.dsp import DspBackend
from jetssd_service.backends.local import LocalBackend
from jetssd_service.backends.triton import TritonBackend
from jetssd_service.errors import ApiError, BackendUnavailableError, from_validation_errors
from jetssd_service.inputs import PreparedBatch, prepare_events
from jetssd_service.metrics import GatewayMetrics
from jetssd_service.repository import ModelRepository
from jetssd_service.schemas import DetectRequest
from jetssd_service.settings import BACKENDS, Settings

log = logging.getLogger(__name__)

FALLBACK_HEADER = "X-JetSSD-Fallback"


@dataclass
class DetectOutcome:
    """A /v1/detect answer: the JSON body, extra headers, and the (backend, model) for the metric labels."""

    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class _Parsed:
    backend: str
    model: str
    batch: PreparedBatch


class Gateway:
    """Backends, repository and metrics of one gateway process.

    Args:
        settings: the configuration.
        backends: override the backends by name (tests); default local, triton and dsp from ``settings``.
    """

    def __init__(self, settings: Settings, backends: dict[str, Backend] | None = None) -> None:
        self.settings = settings
        self.repository = ModelRepository(settings.model_repository)
        self.metrics = GatewayMetrics()
        self.backends: dict[str, Backend] = backends or {
            "local": LocalBackend(self.repository, threads=settings.local_threads,
                                  max_concurrency=settings.local_max_concurrency,
                                  batch_size=settings.local_batch_size, preload=settings.local_preload),
            "triton": TritonBackend(settings, self.repository),
            "dsp": DspBackend(self.repository, max_concurrency=settings.dsp_max_concurrency,
                              batch_size=settings.dsp_batch_size, preload=settings.local_preload),
        }
        if settings.default_model not in self.repository:
            log.warning("default model %r is not in %s (variants: %s)", settings.default_model,
                        self.repository.root, ", ".join(self.repository.variants) or "none")

    async def start(self) -> None:
        for backend in self.backends.values():
            await backend.start()

    async def close(self) -> None:
        for backend in self.backends.values():
            try:
                await backend.close()
            except Exception:  # shutting down: log and go on with the others
                log.exception("closing backend %s", backend.name)

    # ------------------------------------------------------------------------------------------ status

    async def status(self, backend: str, model: str) -> BackendStatus:
        status = await self.backends[backend].status(model)
        self.metrics.backend_up.labels(backend, model).set(1 if status.available else 0)
        return status

    # ------------------------------------------------------------------------------------------ detect

    def _parse(self, body: bytes, labels: dict[str, Any]) -> _Parsed:
        """JSON → validated dense batch (CPU work: runs in a worker thread)."""
        t0 = time.perf_counter()
        try:
            request = DetectRequest.model_validate_json(body)
        except ValidationError as exc:
            raise from_validation_errors(exc.errors(include_url=False)) from None
        json_seconds = time.perf_counter() - t0
        backend = request.backend or self.settings.default_backend
        model = request.model or self.settings.default_model
        if model not in self.repository:
            available = ", ".join(self.repository.variants) or "none"
            raise ApiError("unknown_model", f"unknown model {model!r}; available: {available}", field="model")
        labels["metric_labels"] = (backend, model)  # known names only: no label per user typo
        limit = self.settings.max_events_per_request
        if len(request.events) > limit:
            raise ApiError("too_many_events", f"{len(request.events)} events, the limit is {limit} per request",
                           field="events")
        batch = prepare_events(request.events, self.settings.max_candidates_per_event, json_seconds)
        return _Parsed(backend, model, batch)

    async def detect(self, body: bytes, labels: dict[str, Any], started: float) -> DetectOutcome:
        """Answer one /v1/detect body.

        Args:
            body: the raw request body (size already checked).
            labels: the request's state; ``metric_labels`` is set to (backend, model) once known.
            started: ``time.perf_counter()`` when the request arrived (for ``timing_ms.total``).

        Raises:
            ApiError: any error the API reports.
        """
        parsed = await anyio.to_thread.run_sync(self._parse, body, labels)
        backend, model, batch = parsed.backend, parsed.model, parsed.batch
        used, fallback_from = backend, None
        try:
            result = await self.backends[backend].detect(model, batch.images)
        except BackendUnavailableError:
            self.metrics.backend_up.labels(backend, model).set(0)
            if not (backend == "triton" and self.settings.fallback_to_local):
                raise
            used, fallback_from = "local", backend
            result = await self.backends[used].detect(model, batch.images)
            self.metrics.fallbacks.labels(backend, used).inc()
        self.metrics.backend_up.labels(used, model).set(1)
        labels["metric_labels"] = (used, model)
        body_out = self._response(used, model, fallback_from, batch, result, started)
        return DetectOutcome(body_out, {FALLBACK_HEADER: fallback_from} if fallback_from else {})

    def _response(self, backend: str, model: str, fallback_from: str | None, batch: PreparedBatch,
                  result: BatchResult, started: float) -> dict[str, Any]:
        m = self.metrics
        m.stage.labels("parse", backend, model).observe(1e-3 * sum(batch.parse_ms))
        m.stage.labels("rasterize", backend, model).observe(1e-3 * sum(batch.rasterize_ms))
        m.stage.labels("infer", backend, model).observe(1e-3 * result.infer_ms)
        m.stage.labels("postprocess", backend, model).observe(1e-3 * result.postprocess_ms)
        m.events.labels(backend, model).inc(len(batch))
        if result.detections:
            counts = np.bincount(np.concatenate([d.label for d in result.detections]).astype(np.int64),
                                 minlength=len(CLASS_NAMES))
            for name, count in zip(CLASS_NAMES, counts.tolist(), strict=False):
                if count:
                    m.jets.labels(backend, model, name).inc(count)
        total_ms = 1e3 * (time.perf_counter() - started)
        events = [
            {"id": event_id, "jets": detections.to_jets(),
             "timing_ms": {"parse": parse_ms, "rasterize": raster_ms, "infer": result.infer_ms,
                           "postprocess": result.postprocess_ms, "total": total_ms}}
            for event_id, detections, parse_ms, raster_ms in zip(batch.ids, result.detections, batch.parse_ms,
                                                                 batch.rasterize_ms, strict=True)
        ]
        return {"backend": backend, "model": model, "model_version": result.model_version,
                "fallback_from": fallback_from, **(result.extra or {}), "events": events}

    # ------------------------------------------------------------------------------------------ models

    async def models(self) -> dict[str, Any]:
        models = []
        for entry in self.repository.entries():
            statuses = {}
            for name in BACKENDS:
                status = await self.status(name, entry.variant)
                statuses[name] = {"available": status.available, "detail": status.detail}
            models.append({"name": entry.variant, "version": entry.version, "versions": list(entry.versions),
                           "description": entry.description, "metrics": entry.summary_metrics,
                           "backends": statuses})
        return {"default_backend": self.settings.default_backend, "default_model": self.settings.default_model,
                "models": models}
