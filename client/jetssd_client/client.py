"""``Client`` and ``AsyncClient``: the gateway's HTTP API from Python, modelled on httpx's own pair.

Both take the same arguments and have the same methods (``async`` on :class:`AsyncClient`)::

    from jetssd.io import open_events
    from jetssd_client import Client

    with Client("http://127.0.0.1:8080", model="twn") as client, open_events("tt_0000.h5") as f:
        response = client.detect([f[0], f[1]], ids=["e0", "e1"])
        for event in response.events:
            print(event.id, [(j.label, round(j.score, 2)) for j in event.jets])

One connection pool per client (keep-alive: connections are reused across requests); retries with exponential
backoff and jitter on connection errors and 503, honouring ``Retry-After`` (:class:`RetryPolicy`); 4xx answers
raise :class:`ApiError` at once. ``transport=`` takes any httpx transport (``httpx.MockTransport`` in tests).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import httpx

from jetssd_client.encode import EventLike, batched, encode_event, request_body
from jetssd_client.errors import ApiError, ProtocolError, ServiceTimeoutError, ServiceUnreachableError
from jetssd_client.results import DetectResponse, EventResult
from jetssd_client.retry import RetryPolicy, parse_retry_after

DEFAULT_URL = "http://127.0.0.1:8080"
DEFAULT_TIMEOUT_S = 60.0
USER_AGENT = "jetssd-client/0.1.0"


@dataclass(frozen=True)
class RetryNotice:
    """Passed to ``on_retry`` before each wait: which attempt failed, why, and how long the client waits."""

    method: str
    url: str
    attempt: int
    reason: str
    delay_s: float


class _Base:
    """What both clients share: defaults, request encoding, response decoding, the retry decisions."""

    def __init__(self, base_url: str, backend: str | None, model: str | None, retry: RetryPolicy | None,
                 on_retry: Callable[[RetryNotice], None] | None) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"the service URL must start with http:// or https://, got {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self.backend = backend
        self.model = model
        self.retry = retry if retry is not None else RetryPolicy()
        self.on_retry = on_retry

    def encode(self, events: Sequence[EventLike], ids: Sequence[str | None] | None = None,
               backend: str | None = None, model: str | None = None) -> bytes:
        """The request body for ``events`` (per-request backend/model override the client's defaults)."""
        if ids is not None and len(ids) != len(events):
            raise ValueError(f"{len(ids)} ids for {len(events)} events")
        encoded = [encode_event(e, None if ids is None else ids[k]) for k, e in enumerate(events)]
        return request_body(encoded, backend or self.backend, model or self.model)

    @staticmethod
    def _decode(response: httpx.Response, elapsed: float, attempts: int, n_events: int | None) -> DetectResponse:
        try:
            data = response.json()
        except ValueError as exc:
            raise ProtocolError(f"/v1/detect answered {response.status_code} with a body that is not JSON; "
                                "is the URL a jetssd gateway?") from exc
        result = DetectResponse.from_json(data, elapsed_s=elapsed, attempts=attempts)
        if n_events is not None and len(result.events) != n_events:
            raise ProtocolError(f"sent {n_events} events, the gateway answered {len(result.events)}")
        return result

    def _failure(self, exc: httpx.TransportError, attempts: int) -> ServiceUnreachableError:
        if isinstance(exc, httpx.ReadTimeout | httpx.WriteTimeout):
            return ServiceTimeoutError(self.base_url, exc, attempts)
        return ServiceUnreachableError(self.base_url, exc, attempts)

    def _retry_delay(self, method: str, url: str, attempt: int, outcome: httpx.Response | Exception,
                     policy: RetryPolicy) -> float | None:
        """Seconds to wait before the next attempt, or None when the outcome is final."""
        if attempt >= policy.max_attempts:
            return None
        if isinstance(outcome, Exception):
            if not policy.retries_exception(outcome):
                return None
            reason, retry_after = f"{type(outcome).__name__}: {outcome}", None
        else:
            if not policy.retries_status(outcome.status_code):
                return None
            reason = f"HTTP {outcome.status_code}"
            retry_after = parse_retry_after(outcome.headers.get("retry-after"))
        delay = policy.delay(attempt, retry_after)
        if self.on_retry is not None:
            self.on_retry(RetryNotice(method, url, attempt, reason, delay))
        return delay


def _check(response: httpx.Response, attempts: int) -> httpx.Response:
    if response.status_code >= 400:
        raise ApiError.from_response(response, attempts)
    return response


_JSON = {"content-type": "application/json"}


class Client(_Base):
    """Synchronous client of the jetssd gateway.

    Args:
        base_url: the gateway, e.g. ``http://127.0.0.1:8080``.
        backend, model: defaults for every request (None: the gateway's defaults, triton and twn).
        timeout: seconds (or an :class:`httpx.Timeout`) per attempt.
        retry: the :class:`RetryPolicy` (default: 5 attempts, 0.25 s doubling to 8 s, half jitter, 503 and
            connection errors, Retry-After honoured). ``RetryPolicy.none()`` sends once.
        transport: an httpx transport (``httpx.MockTransport(handler)`` in tests).
        limits: connection-pool limits (keep-alive connections are reused across requests).
        headers: extra headers on every request.
        on_retry: called with a :class:`RetryNotice` before each wait (logging, counting).
        sleep: the wait function (tests replace it to record the waits).
    """

    def __init__(self, base_url: str = DEFAULT_URL, *, backend: str | None = None, model: str | None = None,
                 timeout: float | httpx.Timeout = DEFAULT_TIMEOUT_S, retry: RetryPolicy | None = None,
                 transport: httpx.BaseTransport | None = None, limits: httpx.Limits | None = None,
                 headers: Mapping[str, str] | None = None, on_retry: Callable[[RetryNotice], None] | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        super().__init__(base_url, backend, model, retry, on_retry)
        self._sleep = sleep
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout, transport=transport,
                                  limits=limits or httpx.Limits(max_connections=32, max_keepalive_connections=32),
                                  headers={"user-agent": USER_AGENT, **(headers or {})})

    # -- plumbing ------------------------------------------------------------------------------------

    def request(self, method: str, path: str, *, content: bytes | None = None,
                headers: Mapping[str, str] | None = None, timeout: float | None = None,
                retry: RetryPolicy | None = None) -> tuple[httpx.Response, int, float]:
        """Send with retries; returns (successful response, attempts, seconds of the last attempt).

        Raises :class:`ApiError` for an error status (once retries are spent, at once for 4xx) and
        :class:`ServiceUnreachableError` when no answer came.
        """
        policy = retry or self.retry
        kwargs: dict[str, Any] = {"content": content, "headers": headers}
        if timeout is not None:
            kwargs["timeout"] = timeout
        attempt = 0
        while True:
            attempt += 1
            t0 = time.perf_counter()
            outcome: httpx.Response | Exception
            try:
                outcome = self._http.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                outcome = exc
            elapsed = time.perf_counter() - t0
            delay = self._retry_delay(method, self.base_url + path, attempt, outcome, policy)
            if delay is None:
                if isinstance(outcome, httpx.TransportError):
                    raise self._failure(outcome, attempt) from outcome
                return _check(outcome, attempt), attempt, elapsed
            self._sleep(delay)

    # -- the API -------------------------------------------------------------------------------------

    def detect(self, events: Sequence[EventLike], *, ids: Sequence[str | None] | None = None,
               backend: str | None = None, model: str | None = None, timeout: float | None = None) -> DetectResponse:
        """Jets of ``events`` (one request; at most the gateway's limit, 64 by default)."""
        return self.detect_body(self.encode(events, ids, backend, model), len(events), timeout=timeout)

    def detect_body(self, body: bytes, n_events: int | None = None, *, timeout: float | None = None) -> DetectResponse:
        """Send an already encoded request body (:func:`jetssd_client.encode.request_body`)."""
        response, attempts, elapsed = self.request("POST", "/v1/detect", content=body, headers=_JSON,
                                                   timeout=timeout)
        return self._decode(response, elapsed, attempts, n_events)

    def detect_many(self, events: Iterable[EventLike], *, batch_size: int = 16,
                    ids: Iterable[str | None] | None = None, backend: str | None = None,
                    model: str | None = None) -> Iterator[EventResult]:
        """Stream any number of events through the service, ``batch_size`` per request, results in order."""
        pairs = zip(events, ids, strict=True) if ids is not None else ((e, None) for e in events)
        for batch in batched(pairs, batch_size):
            yield from self.detect([e for e, _ in batch], ids=[i for _, i in batch], backend=backend,
                                   model=model).events

    def models(self) -> dict[str, Any]:
        """``GET /v1/models``: variants, versions, metrics and backend availability (the JSON as is)."""
        data: dict[str, Any] = self.request("GET", "/v1/models")[0].json()
        return data

    def health(self) -> bool:
        """True when the gateway process answers ``/healthz`` (one attempt, no retries)."""
        try:
            self.request("GET", "/healthz", retry=RetryPolicy.none())
        except (ApiError, ServiceUnreachableError):
            return False
        return True

    def ready(self) -> dict[str, Any]:
        """``GET /readyz`` as JSON (``ready`` false with a ``detail`` when the default backend is not ready)."""
        try:
            response = self._http.get("/readyz")
        except httpx.TransportError as exc:
            raise self._failure(exc, 1) from exc
        return _ready_json(response)

    def metrics(self) -> str:
        """``GET /metrics``: the Prometheus text."""
        return self.request("GET", "/metrics")[0].text

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class AsyncClient(_Base):
    """The asyncio twin of :class:`Client`: same arguments (an async ``transport`` and ``sleep``), same methods.

    ``detect_many`` also takes ``concurrency``: that many requests in flight, results still in input order.
    """

    def __init__(self, base_url: str = DEFAULT_URL, *, backend: str | None = None, model: str | None = None,
                 timeout: float | httpx.Timeout = DEFAULT_TIMEOUT_S, retry: RetryPolicy | None = None,
                 transport: httpx.AsyncBaseTransport | None = None, limits: httpx.Limits | None = None,
                 headers: Mapping[str, str] | None = None, on_retry: Callable[[RetryNotice], None] | None = None,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        super().__init__(base_url, backend, model, retry, on_retry)
        self._sleep = sleep
        self._http = httpx.AsyncClient(base_url=self.base_url, timeout=timeout, transport=transport,
                                       limits=limits or httpx.Limits(max_connections=32,
                                                                     max_keepalive_connections=32),
                                       headers={"user-agent": USER_AGENT, **(headers or {})})

    async def request(self, method: str, path: str, *, content: bytes | None = None,
                      headers: Mapping[str, str] | None = None, timeout: float | None = None,
                      retry: RetryPolicy | None = None) -> tuple[httpx.Response, int, float]:
        """See :meth:`Client.request`."""
        policy = retry or self.retry
        kwargs: dict[str, Any] = {"content": content, "headers": headers}
        if timeout is not None:
            kwargs["timeout"] = timeout
        attempt = 0
        while True:
            attempt += 1
            t0 = time.perf_counter()
            outcome: httpx.Response | Exception
            try:
                outcome = await self._http.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                outcome = exc
            elapsed = time.perf_counter() - t0
            delay = self._retry_delay(method, self.base_url + path, attempt, outcome, policy)
            if delay is None:
                if isinstance(outcome, httpx.TransportError):
                    raise self._failure(outcome, attempt) from outcome
                return _check(outcome, attempt), attempt, elapsed
            await self._sleep(delay)

    async def detect(self, events: Sequence[EventLike], *, ids: Sequence[str | None] | None = None,
                     backend: str | None = None, model: str | None = None,
                     timeout: float | None = None) -> DetectResponse:
        """See :meth:`Client.detect`."""
        return await self.detect_body(self.encode(events, ids, backend, model), len(events), timeout=timeout)

    async def detect_body(self, body: bytes, n_events: int | None = None, *,
                          timeout: float | None = None) -> DetectResponse:
        """See :meth:`Client.detect_body`."""
        response, attempts, elapsed = await self.request("POST", "/v1/detect", content=body, headers=_JSON,
                                                         timeout=timeout)
        return self._decode(response, elapsed, attempts, n_events)

    async def detect_many(self, events: Iterable[EventLike], *, batch_size: int = 16, concurrency: int = 4,
                          ids: Iterable[str | None] | None = None, backend: str | None = None,
                          model: str | None = None) -> AsyncIterator[EventResult]:
        """See :meth:`Client.detect_many`; up to ``concurrency`` requests in flight, results in input order."""
        if concurrency < 1:
            raise ValueError(f"concurrency must be ≥ 1, got {concurrency}")
        pairs = zip(events, ids, strict=True) if ids is not None else ((e, None) for e in events)
        pending: deque[asyncio.Task[DetectResponse]] = deque()
        batches = batched(pairs, batch_size)
        try:
            for batch in batches:
                pending.append(asyncio.ensure_future(self.detect(
                    [e for e, _ in batch], ids=[i for _, i in batch], backend=backend, model=model)))
                if len(pending) >= concurrency:
                    for result in (await pending.popleft()).events:
                        yield result
            while pending:
                for result in (await pending.popleft()).events:
                    yield result
        finally:
            for task in pending:
                task.cancel()

    async def models(self) -> dict[str, Any]:
        """See :meth:`Client.models`."""
        data: dict[str, Any] = (await self.request("GET", "/v1/models"))[0].json()
        return data

    async def health(self) -> bool:
        """See :meth:`Client.health`."""
        try:
            await self.request("GET", "/healthz", retry=RetryPolicy.none())
        except (ApiError, ServiceUnreachableError):
            return False
        return True

    async def ready(self) -> dict[str, Any]:
        """See :meth:`Client.ready`."""
        try:
            response = await self._http.get("/readyz")
        except httpx.TransportError as exc:
            raise self._failure(exc, 1) from exc
        return _ready_json(response)

    async def metrics(self) -> str:
        """See :meth:`Client.metrics`."""
        return (await self.request("GET", "/metrics"))[0].text

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()


def _ready_json(response: httpx.Response) -> dict[str, Any]:
    if response.status_code not in (200, 503):
        raise ApiError.from_response(response)
    try:
        data = response.json()
    except json.JSONDecodeError as exc:
        raise ProtocolError("/readyz did not answer JSON; is the URL a jetssd gateway?") from exc
    if not isinstance(data, dict) or "ready" not in data:
        raise ProtocolError("/readyz answered without a 'ready' field; is the URL a jetssd gateway?")
    return data
