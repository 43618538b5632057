"""The gateway in front of the real Triton server (the session's ``triton_server`` fixture).

* ``triton`` and ``local`` give identical jets for the same events, over each transport (shm, http, grpc);
* Triton stopped → /readyz 503 (ready false) and /v1/detect 503 with Retry-After, or the local answer when the
  fallback is on; Triton back → recovery, also when it restarted unseen (shared memory registered again);
* end to end over real HTTP: ``jetssd-service gateway`` as a subprocess, driven with httpx.

Events come from the project's generator (the session's ``generated_event_dir``). The server is shared by the
whole session: tests that stop it start it again before they finish.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("pythia8mc")
pytest.importorskip("tritonclient")

import httpx
from fastapi.testclient import TestClient
from jetssd_client.encode import pf_candidates
from jetssd_service.app import create_app
from jetssd_service.settings import Settings

from jetssd.event import PFCandidates

pytestmark = [pytest.mark.triton, pytest.mark.slow]

VARIANTS = ("fpn", "twn")


# --------------------------------------------------------------------------------------------- helpers


def pf_event(pf: PFCandidates, event_id: str) -> dict[str, Any]:
    return {"id": event_id, "pf_candidates": pf_candidates(pf)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ports(server: Any) -> tuple[str, int, int]:
    host, http_port = server.http_url.rsplit(":", 1)
    return host, int(http_port), int(server.grpc_url.rsplit(":", 1)[1])


def gateway_settings(server: Any, **overrides: Any) -> Settings:
    host, http_port, grpc_port = ports(server)
    values: dict[str, Any] = {
        "model_repository": server.repository, "triton_host": host, "triton_http_port": http_port,
        "triton_grpc_port": grpc_port, "default_backend": "triton", "local_threads": 1, "local_batch_size": 16,
        "triton_retry_after_s": 1, **overrides}
    return Settings(**values)


def post(client: TestClient | httpx.Client, events: list[dict[str, Any]], **params: Any) -> httpx.Response:
    return client.post("/v1/detect", json={**params, "events": events})


def jets_of(response: httpx.Response) -> list[list[dict[str, Any]]]:
    assert response.status_code == 200, response.text
    return [e["jets"] for e in response.json()["events"]]


def wait_until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def events(generated_event_dir: Path) -> list[PFCandidates]:
    """The PF candidates of the session's generated events (WW, tt, HH; μ = 10)."""
    from jetssd.io import open_events

    pfs: list[PFCandidates] = []
    for path in sorted(generated_event_dir.glob("*.h5")):
        with open_events(path) as f:
            pfs.extend(event.pf for chunk in f.iter_chunks() for event in chunk if event.pf is not None)
    assert pfs
    return pfs


@pytest.fixture(scope="module")
def request_events(events: list[PFCandidates]) -> list[dict[str, Any]]:
    return [pf_event(pf, f"ev{i}") for i, pf in enumerate(events)]


@pytest.fixture
def running_triton(triton_server: Any) -> Iterator[Any]:
    """The shared server, guaranteed running again after the test (whatever the test did to it)."""
    yield triton_server
    triton_server.start()


# ---------------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("transport", ["shm", "http", "grpc"])
def test_triton_and_local_give_identical_jets(triton_server: Any, request_events: list[dict[str, Any]],
                                              transport: str) -> None:
    with TestClient(create_app(gateway_settings(triton_server, triton_transport=transport))) as c:
        assert c.app.state.gateway.backends["triton"].transport == transport  # type: ignore[attr-defined]
        for variant in VARIANTS:
            remote = post(c, request_events, backend="triton", model=variant)
            local = post(c, request_events, backend="local", model=variant)
            assert remote.json()["backend"] == "triton"
            assert remote.json()["model_version"] == local.json()["model_version"]
            assert sum(map(len, jets_of(remote))) > 0
            assert jets_of(remote) == jets_of(local)
        assert c.get("/readyz").json()["ready"] is True
        models = {m["name"]: m for m in c.get("/v1/models").json()["models"]}
        assert all(models[v]["backends"]["triton"]["available"] for v in VARIANTS)


def test_more_events_than_a_triton_batch_are_split(triton_server: Any, events: list[PFCandidates]) -> None:
    many = [pf_event(events[i % len(events)], f"e{i}") for i in range(20)]  # > max_batch_size 16
    with TestClient(create_app(gateway_settings(triton_server, max_events_per_request=32))) as c:
        remote = jets_of(post(c, many, backend="triton"))
    assert len(remote) == 20
    # the same event gives the same jets wherever it sits in the request (up to batch-size rounding)
    for i in range(len(events), 20):
        first = remote[i % len(events)]
        assert [j["label"] for j in remote[i]] == [j["label"] for j in first]
        np.testing.assert_allclose([j["score"] for j in remote[i]], [j["score"] for j in first], atol=1e-5)


# ----------------------------------------------------------------------------------------- resilience


def test_triton_stopped_then_back(running_triton: Any, request_events: list[dict[str, Any]]) -> None:
    strict = gateway_settings(running_triton)
    with TestClient(create_app(strict)) as c, \
            TestClient(create_app(strict.model_copy(update={"fallback_to_local": True}))) as f:
        assert c.get("/readyz").status_code == 200
        expected = jets_of(post(c, request_events[:1]))
        running_triton.stop()

        r = c.get("/readyz")
        assert r.status_code == 503
        assert r.json()["ready"] is False
        assert r.headers["Retry-After"] == "1"
        r = post(c, request_events[:1])
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "backend_unavailable"
        assert int(r.headers["Retry-After"]) >= 1
        r = post(f, request_events[:1])
        assert r.status_code == 200, r.text
        assert r.json()["backend"] == "local"
        assert r.json()["fallback_from"] == "triton"
        assert r.headers["X-JetSSD-Fallback"] == "triton"
        assert jets_of(r) == expected

        running_triton.start()
        wait_until(lambda: c.get("/readyz").status_code == 200, 30, "/readyz after Triton restarted")
        r = post(c, request_events[:1])
        assert r.json()["backend"] == "triton"
        assert jets_of(r) == expected
        time.sleep(1.1)  # the fallback gateway waits Retry-After before it tries Triton again
        r = post(f, request_events[:1])
        assert r.json()["backend"] == "triton"
        assert "X-JetSSD-Fallback" not in r.headers


def test_triton_restarted_between_two_requests(running_triton: Any, request_events: list[dict[str, Any]]) -> None:
    """A restart the gateway never saw: the new server does not know the shared-memory regions; one retry."""
    with TestClient(create_app(gateway_settings(running_triton, triton_transport="shm"))) as c:
        expected = jets_of(post(c, request_events[:1]))
        running_triton.stop()
        running_triton.start()
        r = post(c, request_events[:1])
        assert r.status_code == 200, r.text
        assert jets_of(r) == expected


def test_gateway_started_before_triton(running_triton: Any, request_events: list[dict[str, Any]]) -> None:
    running_triton.stop()
    with TestClient(create_app(gateway_settings(running_triton))) as c:  # starts fine without Triton
        assert c.get("/healthz").status_code == 200
        assert c.get("/readyz").status_code == 503
        running_triton.start()
        wait_until(lambda: c.get("/readyz").status_code == 200, 30, "/readyz once Triton is up")
        assert jets_of(post(c, request_events[:1]))


# -------------------------------------------------------------------------------------- real HTTP, e2e


@pytest.fixture(scope="module")
def gateway_process(triton_server: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``jetssd-service gateway`` as a user runs it, configured by JETSSD_* variables; yields its base URL."""
    host, http_port, grpc_port = ports(triton_server)
    port = free_port()
    env = {**os.environ, "JETSSD_TRITON_HOST": host, "JETSSD_TRITON_HTTP_PORT": str(http_port),
           "JETSSD_TRITON_GRPC_PORT": str(grpc_port), "JETSSD_MODEL_REPOSITORY": str(triton_server.repository),
           "JETSSD_LOCAL_THREADS": "1"}
    log = (tmp_path_factory.mktemp("gateway") / "gateway.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "jetssd_service.cli", "gateway", "--port", str(port)],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        def up() -> bool:
            assert proc.poll() is None, "the gateway exited"
            try:
                return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False
        wait_until(up, 60, "the gateway to listen")
        yield url
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        log.close()
        leftovers = list(Path("/dev/shm").glob(f"jetssd_gw_{proc.pid}_*"))
        assert not leftovers, f"shared-memory regions left behind: {leftovers}"


def test_end_to_end_over_http(gateway_process: str, request_events: list[dict[str, Any]]) -> None:
    with httpx.Client(base_url=gateway_process, timeout=60) as client:
        assert client.get("/readyz").json()["ready"] is True
        remote = post(client, request_events)  # default backend (triton) and model (twn)
        assert remote.json()["backend"] == "triton"
        assert remote.json()["model"] == "twn"
        local = post(client, request_events, backend="local")
        assert jets_of(remote) == jets_of(local)
        assert client.get("/docs").status_code == 200
        metrics = client.get("/metrics").text
    assert f'jetssd_gateway_events_total{{backend="triton",model="twn"}} {float(len(request_events))}' in metrics
    assert 'jetssd_gateway_stage_duration_seconds_count{backend="triton",model="twn",stage="infer"} 1.0' in metrics


def test_concurrent_clients(gateway_process: str, request_events: list[dict[str, Any]]) -> None:
    """Many one-event requests at once (Triton batches them dynamically): all answered, the same jets."""
    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=gateway_process, timeout=120) as client:
            calls = [client.post("/v1/detect", json={"events": [request_events[i % len(request_events)]]})
                     for i in range(12)]
            return list(await asyncio.gather(*calls))

    with httpx.Client(base_url=gateway_process, timeout=60) as client:
        serial = [jets_of(post(client, [event]))[0] for event in request_events]
    for i, response in enumerate(asyncio.run(run())):
        got, want = jets_of(response)[0], serial[i % len(request_events)]
        assert [j["label"] for j in got] == [j["label"] for j in want]
        np.testing.assert_allclose([j["score"] for j in got], [j["score"] for j in want], atol=1e-5)
