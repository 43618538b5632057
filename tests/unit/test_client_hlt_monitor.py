"""`jetssd-client hlt` and `monitor` against the fake gateway; the Prometheus arithmetic of the monitor."""

from __future__ import annotations

import json
import math
import socket
from pathlib import Path

import numpy as np
import pytest
from jetssd_client.cli import app
from jetssd_client.monitor import Monitor, gateway_stats, render, triton_stats
from jetssd_client.prom import Histogram, Scrape
from jetssd_client.testing import FakeGateway
from typer.testing import CliRunner

from jetssd.event import Event, PFCandidates, SparsePixels
from jetssd.io import write_events


@pytest.fixture(scope="module")
def events_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(1)
    path = tmp_path_factory.mktemp("hlt") / "tt_0000.h5"
    events = [Event(SparsePixels.empty(), pf=PFCandidates.from_arrays(rng.uniform(0, 50, 20), rng.uniform(-2, 2, 20),
                                                                    rng.uniform(-3, 3, 20), rng.integers(0, 3, 20)))
              for _ in range(6)]
    write_events(path, events, format="jetssd")
    return path


def test_hlt_closed_loop(events_file: Path, tmp_path: Path) -> None:
    fake = FakeGateway()
    with fake.serve() as url:
        result = CliRunner().invoke(app, ["hlt", str(events_file), "--url", url, "--events", "10", "--warmup", "2",
                                          "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "p50" in result.output
    assert "p99" in result.output
    assert "errors 0" in result.output
    assert [len(r["events"]) for r in fake.requests] == [1] * 12  # one event per request
    ids = [r["events"][0]["id"] for r in fake.requests]
    assert ids == [f"tt_0000:{i % 6}" for i in range(12)]  # in file order, cycling
    summary = json.loads((tmp_path / "hlt_summary.json").read_text())
    assert summary["requests"] == 10
    assert summary["warmup_requests"] == 2
    assert summary["ok"] == 10
    assert summary["mode"] == "closed loop"
    assert 0 < summary["latency_ms"]["p50"] <= summary["latency_ms"]["p99"] <= summary["latency_ms"]["max"]
    assert (tmp_path / "hlt_latency.png").read_bytes()[:4] == b"\x89PNG"
    assert len((tmp_path / "hlt_latencies.csv").read_text().splitlines()) == 13


def test_hlt_fixed_rate_counts_errors_and_exits_1(events_file: Path, tmp_path: Path) -> None:
    fake = FakeGateway(fail=lambda n: (503, "backend_unavailable", {"Retry-After": "2"}) if n % 4 == 0 else None)
    with fake.serve() as url:
        result = CliRunner().invoke(app, ["hlt", str(events_file), "--url", url, "--rate", "200", "--events", "12",
                                          "--warmup", "0", "--out", str(tmp_path)])
    assert result.exit_code == 1, result.output
    summary = json.loads((tmp_path / "hlt_summary.json").read_text())
    assert summary["mode"].startswith("fixed rate")
    assert summary["rate_hz"] == 200
    assert summary["errors"] == {"backend_unavailable": 3}
    assert summary["ok"] == 9
    assert summary["achieved_rate_hz"] > 50


def test_hlt_unreachable_and_unreadable(events_file: Path, tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = CliRunner().invoke(app, ["hlt", str(events_file), "--url", f"http://127.0.0.1:{port}",
                                      "--out", str(tmp_path)])
    assert result.exit_code == 1
    assert "cannot reach the service" in result.output
    (tmp_path / "x.h5").write_text("nope")
    result = CliRunner().invoke(app, ["hlt", str(tmp_path / "x.h5"), "--url", f"http://127.0.0.1:{port}"])
    assert result.exit_code == 2
    assert "not an HDF5 file" in result.output


GATEWAY_TEXT = """
# TYPE jetssd_gateway_requests_total counter
jetssd_gateway_requests_total{endpoint="/v1/detect",method="POST",status="200"} 90.0
jetssd_gateway_requests_total{endpoint="/v1/detect",method="POST",status="503"} 10.0
jetssd_gateway_requests_total{endpoint="/metrics",method="GET",status="200"} 3.0
# TYPE jetssd_gateway_request_duration_seconds histogram
jetssd_gateway_request_duration_seconds_bucket{backend="triton",endpoint="/v1/detect",le="0.01",model="twn"} 40.0
jetssd_gateway_request_duration_seconds_bucket{backend="triton",endpoint="/v1/detect",le="0.02",model="twn"} 80.0
jetssd_gateway_request_duration_seconds_bucket{backend="triton",endpoint="/v1/detect",le="0.05",model="twn"} 90.0
jetssd_gateway_request_duration_seconds_bucket{backend="triton",endpoint="/v1/detect",le="+Inf",model="twn"} 90.0
jetssd_gateway_request_duration_seconds_count{backend="triton",endpoint="/v1/detect",model="twn"} 90.0
jetssd_gateway_request_duration_seconds_sum{backend="triton",endpoint="/v1/detect",model="twn"} 1.35
# TYPE jetssd_gateway_stage_duration_seconds histogram
jetssd_gateway_stage_duration_seconds_bucket{backend="triton",le="+Inf",model="twn",stage="infer"} 90.0
jetssd_gateway_stage_duration_seconds_count{backend="triton",model="twn",stage="infer"} 90.0
jetssd_gateway_stage_duration_seconds_sum{backend="triton",model="twn",stage="infer"} 0.9
# TYPE jetssd_gateway_errors_total counter
jetssd_gateway_errors_total{code="backend_unavailable"} 10.0
# TYPE jetssd_gateway_events_total counter
jetssd_gateway_events_total{backend="triton",model="twn"} 720.0
# TYPE jetssd_gateway_jets_total counter
jetssd_gateway_jets_total{backend="triton",label="t",model="twn"} 33.0
# TYPE jetssd_gateway_in_flight_requests gauge
jetssd_gateway_in_flight_requests 1.0
# TYPE jetssd_gateway_backend_up gauge
jetssd_gateway_backend_up{backend="triton",model="twn"} 1.0
"""

TRITON_TEXT = """
# HELP nv_inference_request_success Number of successful inference requests, all batch sizes
# TYPE nv_inference_request_success counter
nv_inference_request_success{model="pfjet_ssd_twn",version="1"} 50
nv_inference_request_failure{model="pfjet_ssd_twn",reason="OTHER",version="1"} 1
# TYPE nv_inference_count counter
nv_inference_count{model="pfjet_ssd_twn",version="1"} 200
nv_inference_exec_count{model="pfjet_ssd_twn",version="1"} 25
nv_inference_pending_request_count{model="pfjet_ssd_twn",version="1"} 2
nv_inference_queue_duration_us{model="pfjet_ssd_twn",version="1"} 100000
nv_inference_compute_infer_duration_us{model="pfjet_ssd_twn",version="1"} 1500000
nv_inference_compute_input_duration_us{model="pfjet_ssd_twn",version="1"} 5000
nv_inference_compute_output_duration_us{model="pfjet_ssd_twn",version="1"} 5000
nv_inference_request_duration_us{model="pfjet_ssd_twn",version="1"} 1700000
"""


def test_the_parser_keeps_names_as_written_and_reads_escapes() -> None:
    text = (TRITON_TEXT + 'odd{path="a\\"b,c}d",n="x\\ny"} 2.5 1700000000\nnot a sample line\n'
            'torn{a="1" 3\nnan_value NaN\n')
    values = Scrape.parse(text, 0.0).values
    assert values["nv_inference_count"] == {(("model", "pfjet_ssd_twn"), ("version", "1")): 200.0}
    assert "nv_inference_count_total" not in values  # counters keep their name (Triton's have no _total)
    assert values["odd"] == {(("n", "x\ny"), ("path", 'a"b,c}d')): 2.5}
    assert "torn" not in values
    assert math.isnan(values["nan_value"][()])


def test_histogram_quantiles_follow_prometheus() -> None:
    h = Histogram(((0.01, 40.0), (0.02, 80.0), (0.05, 90.0), (float("inf"), 90.0)), 1.35, 90.0)
    assert h.quantile(0.5) == pytest.approx(0.01 + 0.01 * (45 - 40) / 40)
    assert h.quantile(0.25) == pytest.approx(0.01 * 22.5 / 40)
    assert h.quantile(0.99) == pytest.approx(0.02 + 0.03 * (89.1 - 80) / 10)
    assert Histogram(((0.01, 0.0), (float("inf"), 0.0)), 0, 0).quantile(0.5) is None
    assert Histogram(((0.01, 0.0), (float("inf"), 5.0)), 1, 5).quantile(0.5) == 0.01  # in +Inf: highest bound
    earlier = Histogram(((0.01, 10.0), (0.02, 10.0), (0.05, 10.0), (float("inf"), 10.0)), 0.05, 10.0)
    window = h.minus(earlier)
    assert window.count == 80
    assert window.buckets[0] == (0.01, 30.0)
    assert h.minus(Histogram(((0.01, 999.0),), 0, 999.0)) is h  # a restart: counters went down


def test_gateway_and_triton_stats() -> None:
    g = gateway_stats(Scrape.parse(GATEWAY_TEXT, 100.0))
    assert g["requests"]["detect_total"] == 100
    assert g["requests"]["detect_failed_total"] == 10
    assert g["requests"]["detect_by_status"] == {"200": 90, "503": 10}
    b = g["backends"]["triton/twn"]
    assert b["events_total"] == 720
    assert b["latency_total"]["count"] == 90
    assert b["latency_total"]["p50_ms"] == pytest.approx(11.25)
    assert b["latency_total"]["mean_ms"] == 15.0
    assert b["stage_mean_ms"]["infer"] == 10.0
    assert g["errors_total"] == {"backend_unavailable": 10}
    assert g["jets_total"] == {"t": 33}
    assert g["backend_up"] == {"triton/twn": True}
    later = Scrape.parse(GATEWAY_TEXT.replace('status="200"} 90.0', 'status="200"} 110.0'), 110.0)
    w = gateway_stats(later, Scrape.parse(GATEWAY_TEXT, 100.0))
    assert w["requests"]["detect_per_s"] == 2.0
    t = triton_stats(Scrape.parse(TRITON_TEXT, 0.0))["models"]["pfjet_ssd_twn"]
    assert (t["requests"], t["failures"], t["avg_batch"], t["pending"]) == (50, 1, 8.0, 2)
    assert t["ms_per_request"]["queue"] == 2.0
    assert t["ms_per_request"]["compute_infer"] == 30.0


def test_monitor_once_json_and_live(tmp_path: Path) -> None:
    fake = FakeGateway()
    from jetssd_client import Client

    with fake.serve() as url:
        with Client(url) as c:
            for _ in range(3):
                c.detect([{"pixels": {}}])
        result = CliRunner().invoke(app, ["monitor", "--url", url, "--once", "--json", "--window", "0.05"])
        assert result.exit_code == 0, result.output
        snap = json.loads(result.output)
        assert snap["gateway"]["up"]
        assert snap["gateway"]["requests"]["detect_total"] == 3
        assert snap["gateway"]["backends"]["triton/twn"]["events_total"] == 3
        assert snap["window_s"] is not None
        live = CliRunner().invoke(app, ["monitor", "--url", url, "--interval", "0.05", "--count", "2"])
        assert live.exit_code == 0, live.output
        assert "triton/twn" in live.output
        text = CliRunner().invoke(app, ["monitor", "--url", url, "--once", "--triton-metrics", url + "/nothing"])
        assert text.exit_code == 0
        assert "DOWN" in text.output
    down = CliRunner().invoke(app, ["monitor", "--url", url, "--once", "--json"])
    assert down.exit_code == 1
    assert "cannot read the gateway's metrics" in down.output


def test_render_a_full_snapshot() -> None:
    import httpx
    from rich.console import Console

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, text=TRITON_TEXT if request.url.port == 8002 else GATEWAY_TEXT)

    mon = Monitor("http://g:8080", "http://t:8002/metrics", transport=httpx.MockTransport(handler))
    mon.poll()
    snap = mon.poll()
    mon.close()
    console = Console(record=True, width=200)
    console.print(render(snap))
    text = console.export_text()
    assert "pfjet_ssd_twn" in text
    assert "triton/twn" in text
    assert "backend_unavailable 10" in text


@pytest.mark.parametrize("command", ["hlt", "reprocess", "monitor"])
def test_help_renders(command: str) -> None:
    result = CliRunner().invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output
