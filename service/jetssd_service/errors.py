"""Errors of the HTTP API: one exception type, a stable ``code`` per failure class, JSON bodies.

Every error response has the body ``{"error": {"code": ..., "field": ..., "message": ...}}``; ``field`` names the
offending request field in the form ``events[0].pf_candidates.pt`` (null when no field is to blame). Clients
branch on ``code``; ``message`` is for people and may change.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

# code → HTTP status. The codes are part of the API: add, never rename.
STATUS_BY_CODE: dict[str, int] = {
    "invalid_json": 400,            # the body is not JSON
    "invalid_input": 422,           # a field has a wrong type, shape or value (NaN, negative pT, unknown kind, …)
    "unknown_model": 422,           # no such model variant in the repository
    "unknown_backend": 422,         # backend is not triton, local or dsp
    "unsupported_model": 422,       # the backend cannot run this model (dsp: only models with a DSP program)
    "body_too_large": 413,          # request body over max_body_bytes
    "too_many_events": 413,         # more events than max_events_per_request
    "too_many_candidates": 413,     # an event with more PF candidates / pixels than max_candidates_per_event
    "not_found": 404,
    "method_not_allowed": 405,
    "not_implemented": 501,         # a feature this deployment does not have
    "backend_unavailable": 503,     # Triton unreachable or not ready: retry after Retry-After
    "model_unavailable": 503,       # the backend runs but has not loaded this model
    "backend_error": 502,           # the backend answered with an error
    "internal_error": 500,
}


class ApiError(Exception):
    """An error the API reports as ``{"error": {"code", "field", "message"}}`` with the status of its code.

    Args:
        code: a key of :data:`STATUS_BY_CODE`.
        message: what went wrong, for a person.
        field: the offending request field (``events[3].image.data``), or None.
        headers: extra response headers (``Retry-After`` for 503).
    """

    def __init__(self, code: str, message: str, field: str | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        if code not in STATUS_BY_CODE:
            raise ValueError(f"unknown error code {code!r}")
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field
        self.headers = dict(headers or {})

    @property
    def status_code(self) -> int:
        return STATUS_BY_CODE[self.code]

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "field": self.field, "message": self.message}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status_code, headers=self.headers)


class BackendUnavailableError(ApiError):
    """The backend cannot serve now (Triton down or not ready); 503 with ``Retry-After``."""

    def __init__(self, message: str, retry_after_s: int, code: str = "backend_unavailable") -> None:
        super().__init__(code, message, field="backend", headers={"Retry-After": str(retry_after_s)})
        self.retry_after_s = retry_after_s


def field_path(loc: Sequence[int | str]) -> str:
    """A pydantic error location as a field path: ``("events", 0, "pf_candidates", "pt", 3)`` →
    ``events[0].pf_candidates.pt[3]``. FastAPI's leading ``body`` is dropped."""
    parts = list(loc)
    if parts and parts[0] == "body":
        parts = parts[1:]
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def from_validation_errors(errors: Sequence[Mapping[str, Any]]) -> ApiError:
    """The first pydantic validation error as an :class:`ApiError` (a malformed body → ``invalid_json``)."""
    if not errors:
        return ApiError("invalid_input", "invalid request")
    first = errors[0]
    if first.get("type") == "json_invalid":
        ctx = first.get("ctx") or {}
        return ApiError("invalid_json", f"request body is not valid JSON: {ctx.get('error', first.get('msg'))}")
    path = field_path(first.get("loc", ()))
    message = str(first.get("msg", "invalid value"))
    code = "unknown_backend" if path == "backend" else "invalid_input"
    more = len(errors) - 1
    if more:
        message += f" (and {more} more error{'s' if more > 1 else ''})"
    return ApiError(code, message, field=path or None)


_CODE_BY_STATUS = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large", 501: "not_implemented",
                   503: "backend_unavailable"}


def install_handlers(app: Any, on_error: Callable[[ApiError], None] | None = None) -> None:
    """Make every error of ``app`` (a FastAPI app) a JSON error body with a stable code.

    ``on_error`` sees each error response before it is sent (the gateway counts them by code).
    """

    def respond(error: ApiError) -> JSONResponse:
        if on_error is not None:
            on_error(error)
        return error.response()

    async def api_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ApiError)
        return respond(exc)

    async def validation_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return respond(from_validation_errors(exc.errors()))

    async def http_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        code = _CODE_BY_STATUS.get(exc.status_code, "internal_error" if exc.status_code >= 500 else "invalid_input")
        error = ApiError(code, str(exc.detail), headers=exc.headers)
        response = respond(error)
        response.status_code = exc.status_code
        return response

    async def unexpected_error(_: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error", exc_info=exc)
        return respond(ApiError("internal_error", f"internal error ({type(exc).__name__}); see the gateway log"))

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected_error)
