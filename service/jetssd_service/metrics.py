"""Prometheus metrics of the gateway (DESIGN §4.8), in a registry of its own per app.

Names follow Triton's vocabulary where they mean the same thing (requests, queue vs compute), prefixed
``jetssd_gateway_``. Triton's own ``nv_inference_*`` counters stay on Triton's metrics port.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

# 0.5 ms … 30 s: an HLT request is tens of ms, a 64-event offline request seconds.
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15,
                   0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 30.0)
STAGES = ("parse", "rasterize", "infer", "postprocess")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class GatewayMetrics:
    """The gateway's metrics. ``registry`` is private to this object, so several apps can coexist (tests)."""

    def __init__(self) -> None:
        disable_created_metrics()  # the *_created series only add noise to every scrape
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("jetssd_gateway_requests", "HTTP requests by endpoint and status code.",
                                ["endpoint", "method", "status"], registry=r)
        self.latency = Histogram("jetssd_gateway_request_duration_seconds",
                                 "Request latency, arrival to last byte, by endpoint, backend and model "
                                 "(backend and model empty outside /v1/detect).",
                                 ["endpoint", "backend", "model"], buckets=LATENCY_BUCKETS, registry=r)
        self.stage = Histogram("jetssd_gateway_stage_duration_seconds",
                               "Time per /v1/detect request in each stage: parse (JSON → arrays), rasterize, infer "
                               "(backend round trip), postprocess.",
                               ["stage", "backend", "model"], buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("jetssd_gateway_in_flight_requests", "Requests being served now.", registry=r)
        self.errors = Counter("jetssd_gateway_errors", "Error responses by API error code.", ["code"], registry=r)
        self.events = Counter("jetssd_gateway_events", "Events processed.", ["backend", "model"], registry=r)
        self.jets = Counter("jetssd_gateway_jets", "Jets returned, by class label.", ["backend", "model", "label"],
                            registry=r)
        self.fallbacks = Counter("jetssd_gateway_fallbacks", "Requests answered by a fallback backend.",
                                 ["requested", "used"], registry=r)
        self.backend_up = Gauge("jetssd_gateway_backend_up",
                                "1 when the backend could serve the model at the last check or request, else 0.",
                                ["backend", "model"], registry=r)

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class MetricsMiddleware:
    """ASGI middleware: in-flight gauge, request counter and latency histogram for every HTTP request.

    The endpoint label is the route's path template (``/v1/detect``), or ``unmatched`` for unknown paths, so
    scanners cannot blow up the label set. A handler sets ``request.state.metric_labels = (backend, model)``
    to label its latency.
    """

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        start = time.perf_counter()

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        m = self.metrics
        m.in_flight.inc()
        try:
            await self.app(scope, receive, send_and_record)
        finally:
            m.in_flight.dec()
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            backend, model = (scope.get("state") or {}).get("metric_labels", ("", ""))
            m.requests.labels(endpoint, scope.get("method", ""), str(status)).inc()
            m.latency.labels(endpoint, backend, model).observe(time.perf_counter() - start)
