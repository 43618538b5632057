"""The FastAPI app: ``create_app(settings)`` wires routes, errors, metrics and the backends' lifespan.

Routes: ``POST /v1/detect``, ``GET /v1/models``, ``GET /healthz``, ``GET /readyz``, ``GET /metrics``; the
OpenAPI document at ``/openapi.json``, rendered at ``/docs``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response

from jetssd_service.errors import ApiError, install_handlers
from jetssd_service.gateway import Gateway
from jetssd_service.metrics import MetricsMiddleware
from jetssd_service.schemas import (
    DetectRequest,
    DetectResponse,
    ErrorBody,
    HealthResponse,
    ModelsResponse,
    ReadyResponse,
)
from jetssd_service.settings import Settings

log = logging.getLogger(__name__)

VERSION = "0.1.0"
DESCRIPTION = """\
Jets (top, W/Z, Higgs) of LHC collision events with PFJet-SSD, a single-shot detector.

Send events as particle-flow candidates (preferred: compact), sparse pixels or dense images; choose the
backend (`triton`, `local`, `dsp`) and model variant per request. Errors are JSON
`{"error": {"code", "field", "message"}}` with a stable `code`.
"""


def get_gateway(request: Request) -> Gateway:
    gateway: Gateway = request.app.state.gateway
    return gateway


GatewayDep = Annotated[Gateway, Depends(get_gateway)]

_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "Body is not JSON (`invalid_json`)."},
    413: {"model": ErrorBody, "description": "Body, events or candidates over the limits (`body_too_large`, "
                                              "`too_many_events`, `too_many_candidates`)."},
    422: {"model": ErrorBody, "description": "Invalid input (`invalid_input`, `unknown_model`, `unknown_backend`); "
                                             "`field` names the culprit."},
    501: {"model": ErrorBody, "description": "Backend not implemented yet (`not_implemented`: dsp)."},
    502: {"model": ErrorBody, "description": "The backend answered with an error (`backend_error`)."},
    503: {"model": ErrorBody, "description": "Backend unreachable or model not loaded (`backend_unavailable`, "
                                             "`model_unavailable`); see `Retry-After`."},
}


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing more than ``limit`` bytes (413) before reading it all."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError("body_too_large", f"body of {int(declared)} bytes, the limit is {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError("body_too_large", f"body over {limit} bytes, the limit")
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(settings: Settings | None = None, gateway: Gateway | None = None) -> FastAPI:
    """The gateway app. ``settings`` default to the ``JETSSD_*`` environment; ``gateway`` overrides (tests)."""
    settings = settings or Settings()
    gw = gateway or Gateway(settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await gw.start()
        log.info("gateway ready to serve: default backend %s, model %s, variants %s", settings.default_backend,
                 settings.default_model, gw.repository.variants)
        try:
            yield
        finally:
            await gw.close()

    app = FastAPI(title="PFJet-SSD gateway", version=VERSION, description=DESCRIPTION, lifespan=lifespan)
    app.state.gateway = gw
    install_handlers(app, on_error=lambda error: gw.metrics.errors.labels(error.code).inc())
    app.add_middleware(MetricsMiddleware, metrics=gw.metrics)

    @app.post("/v1/detect", response_model=DetectResponse, responses=_ERRORS, tags=["detect"],
              openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                  "schema": {"$ref": "#/components/schemas/DetectRequest"}}}}})
    async def detect(request: Request, gateway: GatewayDep) -> Response:
        """Detect the jets of one or more events.

        Body: a `DetectRequest`. Each event gives exactly one of `pf_candidates`, `pixels` or `image`; all events
        are validated before any runs. With `backend: "triton"` and Triton unreachable the answer is 503 with
        `Retry-After`, or, when the gateway allows it, the local backend's answer with `fallback_from`.
        """
        started = time.perf_counter()
        body = await read_body(request, gateway.settings.max_body_bytes)
        outcome = await gateway.detect(body, request.scope.setdefault("state", {}), started)
        return JSONResponse(outcome.body, headers=outcome.headers)

    @app.get("/v1/models", response_model=ModelsResponse, tags=["models"])
    async def models(gateway: GatewayDep) -> dict[str, Any]:
        """Model variants, their versions and test-set metrics, and which backends can serve each now."""
        return await gateway.models()

    @app.get("/healthz", response_model=HealthResponse, tags=["health"])
    async def healthz() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/readyz", response_model=ReadyResponse, tags=["health"],
             responses={503: {"model": ReadyResponse, "description": "Not ready (see `detail`, `Retry-After`)."}})
    async def readyz(gateway: GatewayDep) -> JSONResponse:
        """Readiness: 200 when the default backend can serve the default model now, else 503."""
        backend, model = gateway.settings.default_backend, gateway.settings.default_model
        status = await gateway.status(backend, model)
        body = {"ready": status.available, "backend": backend, "model": model, "detail": status.detail}
        if status.available:
            return JSONResponse(body)
        return JSONResponse(body, status_code=503,
                            headers={"Retry-After": str(gateway.settings.triton_retry_after_s)})

    @app.get("/metrics", tags=["health"], response_class=Response,
             responses={200: {"content": {"text/plain": {}}, "description": "Prometheus exposition format."}})
    async def metrics(gateway: GatewayDep) -> Response:
        """Prometheus metrics of this gateway process."""
        content, media_type = gateway.metrics.render()
        return Response(content, media_type=media_type)

    def openapi() -> dict[str, Any]:
        """The generated schema plus DetectRequest (the body is parsed from bytes, so FastAPI cannot see it)."""
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            request_schema = DetectRequest.model_json_schema(ref_template="#/components/schemas/{model}")
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            components.update(request_schema.pop("$defs", {}))
            components["DetectRequest"] = request_schema
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app

