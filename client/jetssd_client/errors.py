"""Exceptions of the client: one base class, the gateway's error bodies, and an unreachable service.

The gateway answers every error with ``{"error": {"code", "field", "message"}}`` (docs/serving.md §4); an
:class:`ApiError` carries those three plus the HTTP status, so programs branch on ``code``.
"""

from __future__ import annotations

from typing import Any

import httpx

from jetssd_client.retry import parse_retry_after


class JetSSDClientError(Exception):
    """Base class of every error this package raises on purpose."""


class ApiError(JetSSDClientError):
    """The gateway answered with an error status (after any retries).

    Attributes:
        status_code: the HTTP status (422, 503, …).
        code: the gateway's stable error code (``invalid_input``, ``backend_unavailable``, …); ``http_<status>``
            when the body was not the gateway's JSON error body (e.g. a proxy's HTML page).
        field: the offending request field (``events[3].pf_candidates.pt``), or None.
        message: the gateway's message, for people.
        retry_after: seconds from ``Retry-After``, when the response had one.
        attempts: how many times the request was sent.
    """

    def __init__(self, status_code: int, code: str, message: str, field: str | None = None,
                 retry_after: float | None = None, attempts: int = 1) -> None:
        where = f" at {field}" if field else ""
        super().__init__(f"{status_code} {code}{where}: {message}")
        self.status_code = status_code
        self.code = code
        self.field = field
        self.message = message
        self.retry_after = retry_after
        self.attempts = attempts

    def __reduce__(self) -> tuple[Any, ...]:  # picklable: Dask re-raises a task's error on the driver
        return (type(self), (self.status_code, self.code, self.message, self.field, self.retry_after, self.attempts))

    @property
    def retryable(self) -> bool:
        """True for statuses a later attempt may fix (503: backend or model not available yet)."""
        return self.status_code == 503

    @classmethod
    def from_response(cls, response: httpx.Response, attempts: int = 1) -> ApiError:
        """Build from a gateway error response (any body: non-JSON bodies are quoted, shortened)."""
        code, field, message = f"http_{response.status_code}", None, ""
        try:
            body: Any = response.json()
        except ValueError:
            body = None
        error = body.get("error") if isinstance(body, dict) else None
        if isinstance(error, dict) and isinstance(error.get("code"), str):
            code = error["code"]
            field = error.get("field") if isinstance(error.get("field"), str) else None
            message = str(error.get("message", ""))
        else:
            text = response.text.strip().replace("\n", " ")
            message = (text[:200] + "…") if len(text) > 200 else (text or response.reason_phrase)
        return cls(response.status_code, code, message, field,
                   parse_retry_after(response.headers.get("retry-after")), attempts)


class ServiceUnreachableError(JetSSDClientError):
    """No HTTP answer from the service (connection refused, reset, DNS, timeout), after every retry."""

    def __init__(self, url: str, cause: BaseException, attempts: int) -> None:
        kind = type(cause).__name__
        detail = str(cause) or kind
        tries = f" after {attempts} attempt{'s' if attempts != 1 else ''}"
        super().__init__(f"cannot reach the service at {url}{tries}: {kind}: {detail}")
        self.url = url
        self.cause = cause
        self.attempts = attempts

    def __reduce__(self) -> tuple[Any, ...]:
        # Picklable for Dask; the httpx cause may not pickle, so it travels as its text.
        state = {**self.__dict__, "cause": RuntimeError(f"{type(self.cause).__name__}: {self.cause}")}
        return (_restore, (type(self), self.args, state))


def _restore(cls: type[Exception], args: tuple[Any, ...], state: dict[str, Any]) -> Exception:
    obj = cls.__new__(cls)
    Exception.__init__(obj, *args)
    obj.__dict__.update(state)
    return obj


class ServiceTimeoutError(ServiceUnreachableError):
    """The service accepted the request but sent no complete answer within the timeout."""

    def __init__(self, url: str, cause: BaseException, attempts: int) -> None:
        super().__init__(url, cause, attempts)
        tries = f" (attempt {attempts})" if attempts > 1 else ""
        self.args = (f"no answer from the service at {url} within the timeout{tries}: {type(cause).__name__}",)


class ProtocolError(JetSSDClientError):
    """A 200 response whose body is not what the API documents (wrong service at that URL?)."""
