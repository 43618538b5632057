"""`jetssd-client` against the real service (gateway + Triton) on events of the project's generator:
hlt, reprocess (equal to /v1/detect event by event; killed and resumed; on a Dask cluster), monitor, and the
clear failures (bad input, unreachable service)."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from jetssd_client.cli import app
from jetssd_client.encode import encode_event
from jetssd_client.outputs import read_tables
from typer.testing import CliRunner

from jetssd.io import open_events, write_events

pytestmark = [pytest.mark.triton, pytest.mark.slow]

CLI = [sys.executable, "-m", "jetssd_client.cli"]


@pytest.fixture(scope="module")
def inputs(generated_event_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The generated files (our format: PF candidates) and a reference-layout copy of one (pixels only)."""
    files = sorted(generated_event_dir.glob("*.h5"))
    ref = tmp_path_factory.mktemp("reference") / "reference_copy.h5"
    with open_events(files[0]) as f:
        write_events(ref, [f[i] for i in range(len(f))], format="reference")
    return [*files, ref]


@pytest.fixture(scope="module")
def direct(inputs: list[Path], jetssd_service: Any) -> dict[str, list[dict[str, Any]]]:
    """What POST /v1/detect answers for each event alone (plain httpx, no client code): id → jets."""
    out = {}
    with httpx.Client(base_url=jetssd_service.url, timeout=60) as http:
        for path in inputs:
            with open_events(path) as f:
                for i in range(len(f)):
                    rid = f"{path.stem}:{i}"
                    r = http.post("/v1/detect", json={"events": [encode_event(f[i], rid)]})
                    assert r.status_code == 200, r.text
                    (event,) = r.json()["events"]
                    assert event["id"] == rid
                    out[rid] = event["jets"]
    return out


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def close(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> bool:
    """Same jets up to the last float bits (Triton's dynamic batching and batch sizes change those, docs §1)."""
    return len(a) == len(b) and all(x["label"] == y["label"] and all(
        math.isclose(x[k], y[k], rel_tol=1e-4, abs_tol=1e-4) for k in ("score", "eta", "phi", "pt"))
        for x, y in zip(a, b, strict=True))


def test_hlt_on_a_few_events(inputs: list[Path], jetssd_service: Any, tmp_path: Path) -> None:
    result = subprocess.run([*CLI, "hlt", str(inputs[1]), "--url", jetssd_service.url, "--events", "8",
                             "--warmup", "2", "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((tmp_path / "hlt_summary.json").read_text())
    assert summary["requests"] == summary["ok"] == 8
    assert summary["error_count"] == 0
    assert summary["backends"] == {"triton": 8}
    assert summary["models"][0].startswith("twn v")
    lat = summary["latency_ms"]
    assert 0 < lat["p50"] <= lat["p99"] <= lat["max"]
    assert (tmp_path / "hlt_latency.png").stat().st_size > 1000
    print(f"hlt closed loop, {summary['requests']} events: p50 {lat['p50']} ms, p99 {lat['p99']} ms")


def test_dsp_backend_over_http_with_the_hlt_client(inputs: list[Path], jetssd_service: Any, tmp_path: Path) -> None:
    """The SensPro emulator behind the real gateway: the client's hlt command on backend dsp, and /v1/detect's
    jets equal the in-process emulator's to the bit (integer arithmetic, the same rasterizer and decoder)."""
    from jetssd.dsp.detector import DspDetector
    from jetssd.rasterize import rasterize_batch

    result = subprocess.run([*CLI, "hlt", str(inputs[0]), "--url", jetssd_service.url, "--events", "2",
                             "--warmup", "0", "--backend", "dsp", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((tmp_path / "hlt_summary.json").read_text())
    assert summary["backends"] == {"dsp": 2}
    with open_events(inputs[0]) as f:  # our format: the events carry PF candidates, sent as such
        pfs = [f[i].pf for i in range(2)]
    with httpx.Client(base_url=jetssd_service.url, timeout=60) as http:
        r = http.post("/v1/detect", json={"backend": "dsp", "events": [encode_event(pf, str(i))
                                                                       for i, pf in enumerate(pfs)]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["backend"] == "dsp"
    assert body["dsp"]["latency_ms"]["1_core"] > body["dsp"]["latency_ms"]["10_cores"] > 0
    repository = Path(__file__).resolve().parents[2] / "model_repository"
    want = DspDetector(repository / "pfjet_ssd_twn").detect(rasterize_batch(pfs))
    for event, w in zip(body["events"], want, strict=True):
        assert event["jets"] == w.to_jets()


def test_reprocess_jsonl_equals_detect_event_by_event(inputs: list[Path], jetssd_service: Any,
                                                      direct: dict[str, list[dict[str, Any]]], tmp_path: Path) -> None:
    out = tmp_path / "jets.jsonl"
    result = subprocess.run([*CLI, "reprocess", *map(str, inputs), "--url", jetssd_service.url, "--out", str(out),
                             "--batch", "1", "--concurrency", "1", "--no-progress"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    got = records(out)
    assert [r["id"] for r in got] == list(direct)  # every event once, in input order
    assert {r["id"]: r["jets"] for r in got} == direct  # one event per request: the very same floats
    assert any(r["jets"] for r in got)
    assert "events 8" in result.stdout

    batched = tmp_path / "batched.jsonl"  # batched and concurrent: the same jets up to float rounding
    result = subprocess.run([*CLI, "reprocess", *map(str, inputs), "--url", jetssd_service.url, "--out",
                             str(batched), "--batch", "3", "--concurrency", "2", "--no-progress"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert [r["id"] for r in records(batched)] == list(direct)
    assert all(close(r["jets"], direct[r["id"]]) for r in records(batched))


def test_reprocess_killed_midway_then_resumed_holds_every_event_once(inputs: list[Path], jetssd_service: Any,
                                                                    direct: dict[str, list[dict[str, Any]]],
                                                                    tmp_path: Path) -> None:
    sources = [(path, i) for path in inputs[:3] for i in range(2)]  # the generated events, repeated 5 times
    big = tmp_path / "big_0000.h5"
    events = []
    for path, i in sources * 5:
        with open_events(path) as f:
            events.append(f[i])
    write_events(big, events, format="jetssd")
    out = tmp_path / "jets.h5"
    journal = tmp_path / "jets.h5.journal.jsonl"
    cmd = [*CLI, "reprocess", str(big), "--url", jetssd_service.url, "--out", str(out), "--batch", "1",
           "--concurrency", "2", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while (not journal.exists() or journal.read_bytes().count(b"\n") < 8) and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not out.exists()
    done = journal.read_bytes().count(b"\n")
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"resuming: {done} of 30 events" in result.stderr or "resuming:" in result.stderr
    table, _ = read_tables(out)
    assert table["id"] == [f"big_0000:{k}" for k in range(30)]  # exactly once each, no gap, in order
    with open_events(big) as f:
        assert len(f) == 30
    jets = {}
    for row, rid in enumerate(table["id"]):
        jets[rid] = table["n_jets"][row]
    for k, (path, i) in enumerate(sources * 5):
        assert jets[f"big_0000:{k}"] == len(direct[f"{path.stem}:{i}"])


def test_reprocess_on_a_dask_cluster(inputs: list[Path], jetssd_service: Any,
                                     direct: dict[str, list[dict[str, Any]]], tmp_path: Path) -> None:
    distributed = pytest.importorskip("distributed")
    out = tmp_path / "jets.parquet"
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                                  dashboard_address=":0") as cluster:
        result = CliRunner().invoke(app, ["reprocess", *map(str, inputs), "--url", jetssd_service.url, "--out",
                                          str(out), "--batch", "2", "--dask", cluster.scheduler_address,
                                          "--dask-chunk", "2", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "dask: 2 workers" in result.output
    events, jets = read_tables(out)
    assert events["id"] == list(direct)
    for row, rid in enumerate(events["id"]):
        mine = [{k: jets[k][j] for k in ("label", "score", "eta", "phi", "pt")}
                for j in range(len(jets["event"])) if jets["event"][j] == row]
        assert close(mine, direct[rid]), rid


def test_monitor_once_after_traffic(jetssd_service: Any, direct: dict[str, list[dict[str, Any]]]) -> None:
    assert direct  # traffic: every event sent once
    result = subprocess.run([*CLI, "monitor", "--url", jetssd_service.url, "--triton-metrics",
                             jetssd_service.triton_metrics_url, "--once", "--json"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    snap = json.loads(result.stdout)
    g = snap["gateway"]
    assert g["up"]
    assert g["requests"]["detect_total"] >= len(direct)
    twn = g["backends"]["triton/twn"]
    assert twn["events_total"] >= len(direct)
    assert twn["latency_total"]["p50_ms"] > 0
    assert g["backend_up"]["triton/twn"] is True
    ssd = snap["triton"]["models"]["pfjet_ssd_twn"]
    assert ssd["requests"] > 0
    assert ssd["ms_per_request"]["compute_infer"] > 0


def test_bad_input_and_unreachable_service_fail_clearly(inputs: list[Path], jetssd_service: Any,
                                                         tmp_path: Path) -> None:
    exe = str(Path(sys.executable).parent / "jetssd-client")  # the installed console script
    bad = tmp_path / "broken_0000.h5"
    bad.write_bytes(inputs[0].read_bytes()[:2048])  # truncated
    result = subprocess.run([exe, "reprocess", str(inputs[0]), str(bad), "--url", jetssd_service.url, "--out",
                             str(tmp_path / "o.jsonl")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert "cannot read input" in result.stderr
    assert "broken_0000.h5" in result.stderr
    assert not (tmp_path / "o.jsonl").exists()

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        nobody = f"http://127.0.0.1:{s.getsockname()[1]}"
    for command in (["reprocess", str(inputs[0]), "--out", str(tmp_path / "o.jsonl")], ["hlt", str(inputs[0])],
                    ["monitor", "--once"]):
        result = subprocess.run([exe, *command, "--url", nobody, *(["--retries", "1"] if command[0] != "monitor"
                                                                     else [])],
                                capture_output=True, text=True, timeout=60, cwd=tmp_path)
        assert result.returncode == 1, (command, result.stdout, result.stderr)
        assert nobody in result.stderr
        assert "cannot reach the service" in result.stderr or "cannot read the gateway's metrics" in result.stderr
