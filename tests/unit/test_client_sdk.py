"""The client SDK against httpx.MockTransport: encoding, typed results, retries (backoff, jitter, Retry-After),
4xx never retried, errors carrying the gateway's code/field/message, batching; Client and AsyncClient alike."""

from __future__ import annotations

import asyncio
import json
import pickle
import random
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import httpx
import numpy as np
import pytest
from jetssd_client import (
    ApiError,
    AsyncClient,
    Client,
    DetectResponse,
    ProtocolError,
    RetryPolicy,
    ServiceTimeoutError,
    ServiceUnreachableError,
    batched,
    encode_event,
)
from jetssd_client.retry import parse_retry_after
from jetssd_client.testing import FakeGateway

from jetssd.event import Event, PFCandidates, SparsePixels

URL = "http://gateway.test"
Handler = Callable[[httpx.Request], httpx.Response]


def pf_event() -> Event:
    pf = PFCandidates.from_arrays([10.5, 3.25], [0.5, -1.0], [1.0, 3.0], [0, 2])
    return Event(SparsePixels.empty(), pf=pf)


def px_event() -> Event:
    return Event(SparsePixels.from_arrays([0, 1], [170, 171], [10, 10], [120.5, 33.0]))


def ok_body(request: httpx.Request) -> dict[str, Any]:
    events = json.loads(request.content)["events"]
    return {"backend": "triton", "model": "twn", "model_version": 3, "fallback_from": None,
            "events": [{"id": e.get("id") or str(k), "jets": [
                {"label": "t", "score": 0.9, "eta": 0.1, "phi": -0.2, "pt": 612.5}],
                "timing_ms": {"total": 2.0}} for k, e in enumerate(events)]}


def error(status: int, code: str, field: str | None = None, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.Response(status, json={"error": {"code": code, "field": field, "message": f"{code} happened"}},
                          headers=headers)


class Script:
    """A MockTransport handler replaying a list of outcomes (a response factory or an exception)."""

    def __init__(self, *outcomes: Any) -> None:
        self.outcomes = list(outcomes)
        self.calls: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.calls.append(request)
        outcome = self.outcomes.pop(0) if len(self.outcomes) > 1 else self.outcomes[0]
        if isinstance(outcome, Exception):
            raise outcome
        if callable(outcome):
            return outcome(request)
        return outcome


def call(kind: str, handler: Handler, method: str, *args: Any, retry: RetryPolicy | None = None,
         **kwargs: Any) -> tuple[Any, list[float]]:
    """Run ``method`` on a Client or an AsyncClient (kind) with the handler; returns (result, recorded waits)."""
    waits: list[float] = []
    if kind == "sync":
        with Client(URL, transport=httpx.MockTransport(handler), retry=retry, sleep=waits.append) as c:
            return getattr(c, method)(*args, **kwargs), waits

    async def sleep(s: float) -> None:
        waits.append(s)

    async def go() -> Any:
        async with AsyncClient(URL, transport=httpx.MockTransport(handler), retry=retry, sleep=sleep) as c:
            return await getattr(c, method)(*args, **kwargs)

    return asyncio.run(go()), waits


KINDS = ["sync", "async"]


@pytest.mark.parametrize("kind", KINDS)
def test_detect_encodes_events_and_returns_typed_results(kind: str) -> None:
    script = Script(ok_body)
    result, _ = call(kind, lambda r: httpx.Response(200, json=script(r)), "detect", [pf_event(), px_event()],
                     ids=["a", "b"], backend="local", model="fpn")
    assert isinstance(result, DetectResponse)
    assert (result.backend, result.model, result.model_version, result.fallback, result.attempts) == (
        "triton", "twn", 3, False, 1)
    assert [e.id for e in result.events] == ["a", "b"]
    jet = result.events[0].jets[0]
    assert (jet.label, jet.score, jet.pt) == ("t", 0.9, 612.5)
    body = json.loads(script.calls[0].content)
    assert body["backend"] == "local"
    assert body["model"] == "fpn"
    first, second = body["events"]
    assert first["pf_candidates"] == {"pt": [10.5, 3.25], "eta": [0.5, -1.0], "phi": [1.0, 3.0], "kind": [0, 2]}
    assert second["pixels"] == {"channel": [0, 1], "ieta": [170, 171], "iphi": [10, 10], "value": [120.5, 33.0]}


def test_client_defaults_and_per_request_override() -> None:
    script = Script(lambda r: httpx.Response(200, json=ok_body(r)))
    with Client(URL, backend="local", model="twn", transport=httpx.MockTransport(script)) as c:
        c.detect([px_event()])
        c.detect([px_event()], model="fpn")
    bodies = [json.loads(r.content) for r in script.calls]
    assert [(b["backend"], b["model"]) for b in bodies] == [("local", "twn"), ("local", "fpn")]
    assert script.calls[0].url == URL + "/v1/detect"


def test_encode_event_forms() -> None:
    assert "pf_candidates" in encode_event(pf_event())
    assert "pixels" in encode_event(pf_event(), form="pixels")
    assert "pixels" in encode_event(px_event())
    with pytest.raises(ValueError, match="no PF candidates"):
        encode_event(px_event(), form="pf_candidates")
    image = encode_event(np.zeros((3, 340, 360), np.float32), "img")
    assert image["id"] == "img"
    assert image["image"]["shape"] == [3, 340, 360]
    with pytest.raises(ValueError, match="shape"):
        encode_event(np.zeros((2, 2)))
    assert encode_event({"id": "x", "pixels": {}}) == {"id": "x", "pixels": {}}
    with pytest.raises(TypeError):
        encode_event(42)  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", KINDS)
def test_503_is_retried_honouring_retry_after(kind: str) -> None:
    script = Script(error(503, "backend_unavailable", "backend", {"Retry-After": "2"}),
                    error(503, "backend_unavailable", "backend", {"Retry-After": "3"}),
                    lambda r: httpx.Response(200, json=ok_body(r)))
    result, waits = call(kind, script, "detect", [px_event()], retry=RetryPolicy(backoff_base_s=0.01))
    assert result.attempts == 3
    assert len(script.calls) == 3
    assert waits[0] >= 2.0
    assert waits[1] >= 3.0
    assert waits == [2.0, 3.0]


@pytest.mark.parametrize("kind", KINDS)
def test_connection_errors_are_retried_with_growing_backoff_then_reported(kind: str) -> None:
    refused = httpx.ConnectError("connection refused")
    script = Script(refused)
    policy = RetryPolicy(max_attempts=5, backoff_base_s=0.1, backoff_max_s=0.3, jitter=0.5)
    with pytest.raises(ServiceUnreachableError, match="after 5 attempts: ConnectError: connection refused") as info:
        call(kind, script, "detect", [px_event()], retry=policy)
    assert info.value.attempts == 5
    assert len(script.calls) == 5


def test_backoff_is_exponential_jittered_and_capped() -> None:
    policy = RetryPolicy(backoff_base_s=0.1, backoff_max_s=1.0, jitter=0.5)
    rng = random.Random(1)
    for retry, base in ((1, 0.1), (2, 0.2), (3, 0.4), (4, 0.8), (5, 1.0), (9, 1.0)):
        waits = [policy.backoff(retry, rng) for _ in range(200)]
        assert all(base * 0.5 <= w <= base for w in waits)
        assert max(waits) - min(waits) > base * 0.3  # jitter spreads the waits
    assert RetryPolicy(jitter=0).backoff(2) == 0.5
    assert policy.delay(1, retry_after=7.0, rng=rng) == 7.0
    assert RetryPolicy(retry_after_max_s=5).delay(1, retry_after=600) == 5
    assert RetryPolicy(honour_retry_after=False, jitter=0).delay(1, retry_after=600) == 0.25
    with pytest.raises(ValueError, match="4xx"):
        RetryPolicy(retry_statuses=frozenset({429, 503}))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("status", "code", "field"), [(422, "invalid_input", "events[0].pf_candidates.pt"),
                                                        (413, "too_many_events", None),
                                                        (422, "unknown_model", "model"),
                                                        (502, "backend_error", None),
                                                        (501, "not_implemented", "backend")])
def test_errors_other_than_503_are_not_retried(kind: str, status: int, code: str, field: str | None) -> None:
    script = Script(error(status, code, field))
    with pytest.raises(ApiError) as info:
        call(kind, script, "detect", [px_event()])
    assert len(script.calls) == 1
    e = info.value
    assert (e.status_code, e.code, e.field, e.message, e.attempts) == (status, code, field, f"{code} happened", 1)
    assert code in str(e)
    assert (field is None or field in str(e))


@pytest.mark.parametrize("kind", KINDS)
def test_503_after_the_last_attempt_raises_with_the_gateway_code(kind: str) -> None:
    script = Script(error(503, "model_unavailable", "backend", {"Retry-After": "1"}))
    with pytest.raises(ApiError) as info:
        call(kind, script, "detect", [px_event()], retry=RetryPolicy(max_attempts=3))
    assert (info.value.code, info.value.attempts, info.value.retry_after) == ("model_unavailable", 3, 1.0)
    assert info.value.retryable


def test_a_body_that_is_not_the_gateways_becomes_http_code() -> None:
    script = Script(httpx.Response(502, text="<html>Bad gateway</html>"))
    with pytest.raises(ApiError) as info:
        call("sync", script, "detect", [px_event()])
    assert info.value.code == "http_502"
    assert "Bad gateway" in info.value.message


def test_read_timeouts_are_not_retried_unless_asked() -> None:
    script = Script(httpx.ReadTimeout("slow"))
    with pytest.raises(ServiceTimeoutError, match="no answer"):
        call("sync", script, "detect", [px_event()])
    assert len(script.calls) == 1
    script = Script(httpx.ReadTimeout("slow"), lambda r: httpx.Response(200, json=ok_body(r)))
    result, _ = call("sync", script, "detect", [px_event()], retry=RetryPolicy(retry_read_timeouts=True))
    assert result.attempts == 2


def test_protocol_errors() -> None:
    script = Script(httpx.Response(200, json={"backend": "triton", "model": "twn", "model_version": 1,
                                              "fallback_from": None, "events": []}))
    with pytest.raises(ProtocolError, match="sent 1 events"):
        call("sync", script, "detect", [px_event()])
    with pytest.raises(ProtocolError, match="jetssd gateway"):
        call("sync", Script(httpx.Response(200, text="hello")), "detect", [px_event()])


def test_fallback_is_visible() -> None:
    def answer(r: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={**ok_body(r), "backend": "local", "fallback_from": "triton"})

    result, _ = call("sync", answer, "detect", [px_event()])
    assert result.fallback
    assert result.backend == "local"
    assert result.fallback_from == "triton"


def test_retry_after_parsing() -> None:
    assert parse_retry_after("2") == 2.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    when = datetime.now(UTC) + timedelta(seconds=30)
    assert 25 <= parse_retry_after(format_datetime(when, usegmt=True)) <= 31  # type: ignore[operator]


def test_on_retry_sees_each_wait() -> None:
    notices = []
    script = Script(httpx.ConnectError("refused"), lambda r: httpx.Response(200, json=ok_body(r)))
    with Client(URL, transport=httpx.MockTransport(script), on_retry=notices.append, sleep=lambda s: None) as c:
        c.detect([px_event()])
    assert len(notices) == 1
    assert notices[0].attempt == 1
    assert "ConnectError" in notices[0].reason


def test_detect_many_batches_in_order() -> None:
    fake = FakeGateway()
    events = [px_event()] * 10
    ids = [f"e{i}" for i in range(10)]
    with Client(URL, transport=fake.transport()) as c:
        results = list(c.detect_many(events, batch_size=4, ids=ids))
    assert [r.id for r in results] == ids
    assert [len(b["events"]) for b in fake.requests] == [4, 4, 2]

    async def go() -> list[str]:
        async with AsyncClient(URL, transport=fake.async_transport()) as c:
            return [r.id async for r in c.detect_many(events, batch_size=3, concurrency=3, ids=ids)]

    assert asyncio.run(go()) == ids
    assert list(batched(range(5), 2)) == [[0, 1], [2, 3], [4]]


def test_models_health_ready_metrics() -> None:
    fake = FakeGateway(model_version=7)
    with Client(URL, transport=fake.transport()) as c:
        assert c.health()
        assert c.ready()["ready"] is True
        assert c.models()["models"][0]["version"] == 7
        assert "jetssd_gateway_requests_total" in c.metrics()
    with Client(URL, transport=httpx.MockTransport(Script(httpx.ConnectError("refused")))) as c:
        assert not c.health()
        with pytest.raises(ServiceUnreachableError):
            c.ready()


def test_errors_pickle() -> None:  # Dask sends a task's exception back to the driver
    e = pickle.loads(pickle.dumps(ApiError(503, "backend_unavailable", "down", "backend", 2.0, 4)))
    assert (e.status_code, e.code, e.field, e.retry_after, e.attempts) == (503, "backend_unavailable", "backend", 2.0,
                                                                          4)
    u = pickle.loads(pickle.dumps(ServiceUnreachableError(URL, httpx.ConnectError("refused"), 3)))
    assert isinstance(u, ServiceUnreachableError)
    assert u.attempts == 3
    assert "refused" in str(u)


def test_bad_url_is_refused() -> None:
    with pytest.raises(ValueError, match="http"):
        Client("127.0.0.1:8080")


def test_connections_are_reused() -> None:
    fake = FakeGateway()
    with fake.serve() as url, Client(url) as c:
        for _ in range(5):
            c.detect([px_event()])
        c.health()
    assert fake.detect_requests == 5
    assert len(fake.connections) == 1  # keep-alive: one TCP connection for all six requests
