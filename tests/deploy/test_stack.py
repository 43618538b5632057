"""The deployment's real parts together, without Docker (tests/deploy/conftest.py starts them): two Triton servers
behind nginx (deploy/nginx/nginx.conf), the gateway on nginx over HTTP, Prometheus with deploy/prometheus/.

* Every PromQL expression of the Grafana dashboards and every recording rule returns data from live traffic.
* Both replicas serve requests; jets through the balancer equal the gateway's local backend.
* Killing one replica (SIGKILL) keeps ``/v1/detect`` answering, TritonReplicaDown goes pending; restarting it
  puts it back into rotation and the alert clears. The numbers (failed requests, seconds) are printed.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import httpx
import numpy as np
import pytest
from deploy_config import (
    TRITON_METRICS,
    alerting_rules,
    dashboard_expressions,
    metric_names,
    recording_rules,
    substitute_variables,
)
from deploy_stack import VARIANT, DeployStack, wait_until
from prometheus_client.parser import text_string_to_metric_families

from jetssd.event import SparsePixels

pytestmark = [pytest.mark.triton, pytest.mark.slow, pytest.mark.timeout(300)]

SSD_MODEL = f"pfjet_ssd_{VARIANT}"
QUERY_TIMEOUT = 45.0
"""Seconds a query may take to return data: a few 1 s scrapes and rule evaluations, generous for 2 busy cores."""


def pixels_body(events: Sequence[SparsePixels], backend: str | None = None) -> bytes:
    """A /v1/detect body with ``events`` as sparse pixels."""
    body: dict[str, Any] = {"events": [
        {"id": f"e{i}", "pixels": {"channel": p.channel.tolist(), "ieta": p.ieta.tolist(), "iphi": p.iphi.tolist(),
                                   "value": p.value.tolist()}} for i, p in enumerate(events)]}
    if backend is not None:
        body["backend"] = backend
    return json.dumps(body).encode()


@dataclass(frozen=True)
class Outcome:
    """One request of the load: when it was sent and ended (time.monotonic), its status and error code."""

    sent: float
    ended: float
    status: int
    code: str | None


class Load:
    """``clients`` threads sending /v1/detect requests one after the other until :meth:`stop`."""

    def __init__(self, url: str, bodies: Sequence[bytes], clients: int = 2) -> None:
        self.url = url
        self.bodies = list(bodies)
        self.outcomes: list[Outcome] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> list[Outcome]:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)
        return self.snapshot()

    def snapshot(self) -> list[Outcome]:
        with self._lock:
            return list(self.outcomes)

    def count(self, since: float = 0.0, status: int | None = None) -> int:
        return sum(1 for o in self.snapshot() if o.sent >= since and (status is None or o.status == status))

    def _run(self, index: int) -> None:
        headers = {"content-type": "application/json"}
        with httpx.Client(base_url=self.url, timeout=30.0) as client:
            i = index
            while not self._stop.is_set():
                sent = time.monotonic()
                try:
                    response = client.post("/v1/detect", content=self.bodies[i % len(self.bodies)], headers=headers)
                    status = response.status_code
                    code = None if status == 200 else response.json().get("error", {}).get("code")
                except httpx.HTTPError as exc:
                    status, code = 0, type(exc).__name__
                with self._lock:
                    self.outcomes.append(Outcome(sent, time.monotonic(), status, code))
                i += 1


def triton_count(metrics_url: str, model: str = SSD_MODEL) -> float:
    """``nv_inference_count`` of ``model`` read from one Triton's own metrics endpoint."""
    text = httpx.get(metrics_url, timeout=2.0).text
    return sum(sample.value for family in text_string_to_metric_families(text) if family.name == "nv_inference_count"
               for sample in family.samples if sample.labels.get("model") == model)


def report(capsys: pytest.CaptureFixture[str], lines: Sequence[str]) -> None:
    """Print measured numbers into the test output even when pytest captures it."""
    with capsys.disabled():
        print()
        for line in lines:
            print(f"    {line}")


def test_dashboards_and_rules_return_data_and_both_replicas_serve(
        deploy_stack: DeployStack, generated_events: list[SparsePixels], capsys: pytest.CaptureFixture[str]) -> None:
    stack = deploy_stack
    bad = httpx.post(f"{stack.gateway_url}/v1/detect", content=b"{not json",
                     headers={"content-type": "application/json"}, timeout=30)
    assert bad.status_code == 400
    assert bad.json()["error"]["code"] == "invalid_json"

    # Jets through the balancer equal the gateway's in-process model on the same events.
    through_lb = httpx.post(f"{stack.gateway_url}/v1/detect", content=pixels_body(generated_events[:3]),
                            headers={"content-type": "application/json"}, timeout=60).json()
    local = httpx.post(f"{stack.gateway_url}/v1/detect", content=pixels_body(generated_events[:3], "local"),
                       headers={"content-type": "application/json"}, timeout=60).json()
    assert through_lb["backend"] == "triton"
    assert local["backend"] == "local"
    for remote_event, local_event in zip(through_lb["events"], local["events"], strict=True):
        assert [j["label"] for j in remote_event["jets"]] == [j["label"] for j in local_event["jets"]]
        np.testing.assert_allclose([j["score"] for j in remote_event["jets"]],
                                   [j["score"] for j in local_event["jets"]], atol=1e-4)

    # nginx's gRPC server (h2c, grpc_pass) reaches the replicas too: the ensemble over gRPC through the balancer.
    import tritonclient.grpc as grpcclient

    from jetssd.rasterize import densify
    from jetssd.triton import unpack_jets

    with grpcclient.InferenceServerClient(stack.lb_grpc) as client:
        assert client.is_model_ready(f"pfjet_{VARIANT}")
        dense = densify(generated_events[0])[None]
        image = grpcclient.InferInput("image", list(dense.shape), "FP32")
        image.set_data_from_numpy(dense)
        result = client.infer(f"pfjet_{VARIANT}", [image])
    (grpc_jets,) = unpack_jets(result.as_numpy("jets"), result.as_numpy("num_jets"))
    assert len(grpc_jets.score) == len(through_lb["events"][0]["jets"])
    np.testing.assert_allclose(grpc_jets.score, [j["score"] for j in through_lb["events"][0]["jets"]],
                               atol=1e-4)

    bodies = [pixels_body([event]) for event in generated_events]
    with Load(stack.gateway_url, bodies, clients=2) as load:
        wait_until(lambda: load.count(status=200) >= 12, 120, "12 requests answered")

        expressions = [(where, substitute_variables(expr)) for where, expr in dashboard_expressions()]
        expressions += [(f"rule {name}", expr) for name, expr in recording_rules().items()]
        expressions += [(f"recorded {name}", name) for name in recording_rules()]
        for where, expr in expressions:
            result = wait_until(partial(stack.query, expr), QUERY_TIMEOUT, f"{where}: data for {expr}")
            assert all(len(series["value"]) == 2 for series in result), where

        # Both replicas ran the SSD model, seen by Prometheus and by each server itself.
        def per_instance() -> dict[str, float]:
            rows = stack.query(f'sum by (instance) (nv_inference_count{{model="{SSD_MODEL}"}})')
            return {row["metric"]["instance"]: float(row["value"][1]) for row in rows}

        def both_served() -> dict[str, float] | None:
            counts = per_instance()
            return counts if all(counts.get(i, 0) > 0 for i in stack.triton_instances()) else None

        counts = wait_until(both_served, QUERY_TIMEOUT, "inferences on both replicas in Prometheus")
        direct = [triton_count(server.metrics_url) for server in stack.tritons]
        assert all(n > 0 for n in direct), direct
        ok = load.count(status=200)
    outcomes = load.stop()
    assert all(o.status == 200 for o in outcomes), {o.code for o in outcomes}

    # The Triton names the dashboards and rules read are really exported by Triton 2.51 (the static test's list).
    exported = {family.name for server in stack.tritons
                for family in text_string_to_metric_families(httpx.get(server.metrics_url, timeout=2).text)}
    used = set().union(*(metric_names(substitute_variables(e)) for _, e in dashboard_expressions()),
                       *(metric_names(e) for e in recording_rules().values()))
    assert used & TRITON_METRICS <= exported, (used & TRITON_METRICS) - exported
    report(capsys, [f"{len(expressions)} PromQL expressions returned data; {ok} requests answered under load",
                    f"SSD inferences per replica (Prometheus): {counts}; direct: {direct}"])


def test_killed_replica_is_routed_around_alerted_and_rejoins(
        deploy_stack: DeployStack, generated_events: list[SparsePixels], capsys: pytest.CaptureFixture[str]) -> None:
    stack = deploy_stack
    victim = stack.tritons[0]
    instance = stack.triton_instances()[0]
    assert alerting_rules()["TritonReplicaDown"]["expr"] == 'up{job="triton"} == 0'

    def replica_down_state() -> str | None:
        states = [a["state"] for a in stack.alerts()
                  if a["labels"].get("alertname") == "TritonReplicaDown" and a["labels"].get("instance") == instance]
        return states[0] if states else None

    bodies = [pixels_body([event]) for event in generated_events]
    with Load(stack.gateway_url, bodies, clients=2) as load:
        wait_until(lambda: load.count(status=200) >= 6, 120, "load running")
        assert replica_down_state() is None
        assert victim.pid is not None

        killed = time.monotonic()
        os.kill(victim.pid, signal.SIGKILL)
        state = wait_until(replica_down_state, QUERY_TIMEOUT, "TritonReplicaDown pending or firing")
        alerted = time.monotonic()
        assert state in ("pending", "firing")
        wait_until(lambda: load.count(since=alerted) >= 10, 120, "10 requests while the replica is down")

        victim.stop()  # reap it, end its stubs, remove its shared-memory regions
        restarted = time.monotonic()
        down_requests = load.count(since=killed)
        victim.start()  # same ports
        ready = time.monotonic()
        wait_until(lambda: triton_count(victim.metrics_url) > 0, QUERY_TIMEOUT, "restarted replica serving again")
        back = time.monotonic()
        wait_until(lambda: replica_down_state() is None, QUERY_TIMEOUT, "TritonReplicaDown cleared")
        cleared = time.monotonic()
        wait_until(lambda: load.count(since=back, status=200) >= 4, 120, "requests after the replica is back")
    outcomes = load.stop()

    during = [o for o in outcomes if o.sent >= killed and o.sent <= back]
    failed = [o for o in during if o.status != 200]
    latencies = sorted(o.ended - o.sent for o in during)
    report(capsys, [
        f"failover: {len(failed)} of {len(during)} requests failed between the SIGKILL and the replica's return "
        f"({down_requests} sent in the {restarted - killed:.1f} s before its restart); "
        f"slowest of them {1e3 * latencies[-1]:.0f} ms",
        f"TritonReplicaDown {state} {alerted - killed:.1f} s after the kill (firing needs its `for: 1m`); "
        f"cleared {cleared - back:.1f} s after the replica served again",
        f"restart: Triton ready {ready - restarted:.1f} s after start; back in rotation (first inference) "
        f"{back - restarted:.1f} s after start, {back - ready:.2f} s after ready",
    ])
    assert not failed, [(o.status, o.code) for o in failed]
    assert all(o.status == 200 for o in outcomes), {(o.status, o.code) for o in outcomes}
    assert victim.running
    assert stack.tritons[1].running
