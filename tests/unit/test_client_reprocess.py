"""`jetssd-client reprocess` against the fake gateway: outputs, resume after failures and kills (exactly once,
in input order), the run manifest, unreadable inputs, an unreachable service, the Dask path."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from jetssd_client import ApiError, RetryPolicy
from jetssd_client import reprocess as rp
from jetssd_client.cli import app
from jetssd_client.encode import encode_event
from jetssd_client.outputs import read_tables
from jetssd_client.testing import FakeGateway, fake_jets
from typer.testing import CliRunner

from jetssd.event import Event, PFCandidates, SparsePixels
from jetssd.io import open_events, write_events

URL = "http://gateway.test"


def pf_events(rng: np.random.Generator, n: int) -> list[Event]:
    out = []
    for _ in range(n):
        k = int(rng.integers(0, 40))
        pf = PFCandidates.from_arrays(rng.uniform(0, 50, k), rng.uniform(-2.5, 2.5, k), rng.uniform(-3, 3, k),
                                      rng.integers(0, 3, k))
        out.append(Event(SparsePixels.empty(), pf=pf))
    return out


def px_events(rng: np.random.Generator, n: int) -> list[Event]:
    out = []
    for _ in range(n):
        k = int(rng.integers(1, 30))
        out.append(Event(SparsePixels.from_arrays(rng.integers(0, 3, k), rng.integers(0, 340, k),
                                                  rng.integers(0, 360, k), rng.uniform(0, 10, k))))
    return out


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two files in our format (PF candidates) and one in the reference layout (pixels only): 23 events."""
    d = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(5)
    paths = [d / "tt_0000.h5", d / "ww_0001.h5", d / "ref_0002.h5"]
    write_events(paths[0], pf_events(rng, 9), format="jetssd")
    write_events(paths[1], pf_events(rng, 6), format="jetssd")
    write_events(paths[2], px_events(rng, 8), format="reference")
    return paths


def expected(paths: list[Path]) -> list[dict[str, Any]]:
    """What the fake gateway answers for every event: the reference output, in input order."""
    out = []
    for path in paths:
        with open_events(path) as f:
            for i in range(len(f)):
                rid = f"{path.stem}:{i}"
                out.append({"id": rid, "jets": fake_jets(encode_event(f[i], rid))})
    return out


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def run(paths: list[Path], out: Path, fake: FakeGateway, **kw: Any) -> dict[str, Any]:
    opts = rp.Options(inputs=rp.inspect_inputs(paths), out=out, url=URL, transport=fake.async_transport(),
                      retry=kw.pop("retry", RetryPolicy(max_attempts=2, backoff_base_s=0.001)), **kw)
    r = rp.Run(opts, log=lambda m: None)
    try:
        if not r.prepare():
            return {"complete": True}
        r.process()
        return r.finish(1.0)
    finally:
        r.close()


def test_jsonl_holds_every_event_once_in_input_order(inputs: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "jets.jsonl"
    fake = FakeGateway()
    summary = run(inputs, out, fake, batch=4, concurrency=3)
    assert lines(out) == expected(inputs)
    assert summary["events"] == 23
    assert summary["this_run"]["requests"] == 6
    assert sum(summary["jets"].values()) == sum(len(r["jets"]) for r in expected(inputs))
    assert summary["events_without_jets"] == sum(not r["jets"] for r in expected(inputs)) > 0
    forms = [next(k for k in e if k != "id") for req in fake.requests for e in req["events"]]
    assert forms == ["pf_candidates"] * 15 + ["pixels"] * 8  # PF candidates when present, pixels otherwise
    manifest = json.loads((tmp_path / "jets.jsonl.run.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["served_by"] == {"model": "twn", "model_version": 1}
    assert run(inputs, out, fake) == {"complete": True}  # nothing left to do
    assert fake.detect_requests == 6


@pytest.mark.parametrize("suffix", [".parquet", ".h5"])
def test_parquet_and_h5_have_an_events_table_and_a_jets_table(inputs: list[Path], tmp_path: Path,
                                                               suffix: str) -> None:
    out = tmp_path / f"jets{suffix}"
    run(inputs, out, FakeGateway(), batch=5)
    events, jets = read_tables(out)
    want = expected(inputs)
    assert events["id"] == [r["id"] for r in want]
    assert events["n_jets"] == [len(r["jets"]) for r in want]
    assert 0 in events["n_jets"]  # events without jets are rows too
    assert events["source"][0] == "tt_0000"
    assert events["index"][:3] == [0, 1, 2]
    flat = [(row, j) for row, r in enumerate(want) for j in r["jets"]]
    assert jets["event"] == [row for row, _ in flat]
    for name in ("label", "score", "eta", "phi", "pt"):
        assert jets[name] == [j[name] for _, j in flat]
    assert not (tmp_path / f"jets{suffix}.journal.jsonl").exists()
    assert json.loads((tmp_path / f"jets{suffix}.run.json").read_text())["status"] == "complete"


@pytest.mark.parametrize("concurrency", [1, 4])
def test_a_failed_run_resumes_to_exactly_once(inputs: list[Path], tmp_path: Path, concurrency: int) -> None:
    out = tmp_path / "jets.jsonl"
    broken = FakeGateway(fail=lambda n: (500, "internal_error", {}) if n >= 4 else None)
    with pytest.raises(ApiError, match="internal_error"):
        run(inputs, out, broken, batch=2, concurrency=concurrency)
    partial = lines(out)
    assert partial == expected(inputs)[:len(partial)]
    assert 0 < len(partial) <= 6
    fake = FakeGateway()
    summary = run(inputs, out, fake, batch=2, concurrency=concurrency)
    assert lines(out) == expected(inputs)
    assert summary["this_run"]["events"] == 23 - len(partial) == summary["events"] - summary["resumed_with"]
    sent = [e["id"] for req in fake.requests for e in req["events"]]
    assert sent == [r["id"] for r in expected(inputs)[len(partial):]]  # only what was missing


def test_503_with_retry_after_is_waited_out(inputs: list[Path], tmp_path: Path) -> None:
    fake = FakeGateway(fail=lambda n: (503, "backend_unavailable", {"Retry-After": "0"}) if n in (2, 3) else None)
    summary = run(inputs, tmp_path / "jets.jsonl", fake, batch=8, concurrency=1,
                  retry=RetryPolicy(max_attempts=3, backoff_base_s=0.001))
    assert summary["this_run"]["retries"] == 2
    assert lines(tmp_path / "jets.jsonl") == expected(inputs)


def test_a_torn_line_and_a_partial_parquet_journal_are_recovered(inputs: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "jets.jsonl"
    with pytest.raises(ApiError):
        run(inputs, out, FakeGateway(fail=lambda n: (500, "internal_error", {}) if n >= 3 else None), batch=3,
            concurrency=1)
    with out.open("ab") as f:
        f.write(b'{"id":"ww_0001:0","je')  # killed in the middle of a write
    run(inputs, out, FakeGateway(), batch=3)
    assert lines(out) == expected(inputs)
    # A .parquet run killed after the final file but before the journal was removed: finishes again, same file.
    pq = tmp_path / "jets.parquet"
    run(inputs, pq, FakeGateway())
    journal = tmp_path / "jets.parquet.journal.jsonl"
    journal.write_text("".join(json.dumps(r, separators=(",", ":")) + "\n" for r in expected(inputs)))
    fake = FakeGateway()
    run(inputs, pq, fake)
    assert fake.detect_requests == 0
    assert not journal.exists()
    assert read_tables(pq)[0]["id"] == [r["id"] for r in expected(inputs)]


def test_an_output_of_another_run_is_refused(inputs: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "jets.jsonl"
    run(inputs[:1], out, FakeGateway())
    with pytest.raises(rp.ResumeError, match=r"another run.*inputs"):
        run(inputs, out, FakeGateway())
    with pytest.raises(rp.ResumeError, match=r"another run.*model"):
        run(inputs[:1], out, FakeGateway(), model="fpn")
    run(inputs, out, FakeGateway(), overwrite=True)
    assert lines(out) == expected(inputs)
    stranger = tmp_path / "mine.jsonl"
    stranger.write_text('{"id": "x", "jets": []}\n')
    with pytest.raises(rp.ResumeError, match="no run manifest"):
        run(inputs, stranger, FakeGateway())


def test_a_new_model_version_mid_run_is_refused(inputs: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "jets.jsonl"
    with pytest.raises(ApiError):
        run(inputs, out, FakeGateway(fail=lambda n: (500, "internal_error", {}) if n >= 2 else None), batch=4,
            concurrency=1)
    with pytest.raises(rp.ReprocessError, match=r"v2.*v1"):
        run(inputs, out, FakeGateway(model_version=2), batch=4)
    assert lines(out) == expected(inputs)[:4]


def test_unreadable_inputs_are_refused_before_any_request(inputs: list[Path], tmp_path: Path) -> None:
    (tmp_path / "notes.h5").write_text("not an HDF5 file")
    with pytest.raises(rp.InputError, match=r"notes.h5.*not an HDF5 file"):
        rp.inspect_inputs([inputs[0], tmp_path / "notes.h5"])
    with pytest.raises(rp.InputError, match="no such file"):
        rp.inspect_inputs([tmp_path / "missing.h5"])
    twin = tmp_path / "tt_0000.h5"
    twin.write_bytes(inputs[0].read_bytes())
    with pytest.raises(rp.InputError, match="same file stem"):
        rp.inspect_inputs([inputs[0], twin])
    with pytest.raises(rp.InputError, match="unknown output format"):
        run(inputs, tmp_path / "jets.csv", FakeGateway())


# ------------------------------------------------------------------------------------------------- the CLI


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_cli_reprocess_over_http(inputs: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "jets.jsonl"
    fake = FakeGateway()
    with fake.serve() as url:
        result = CliRunner().invoke(app, ["reprocess", *map(str, inputs), "--url", url, "--out", str(out),
                                          "--batch", "5"])  # with the progress bar
    assert result.exit_code == 0, result.output
    assert "events 23" in result.output
    assert "events/s" in result.output
    assert lines(out) == expected(inputs)


def test_cli_bad_input_exits_2_without_a_request(inputs: list[Path], tmp_path: Path) -> None:
    bad = tmp_path / "broken.h5"
    bad.write_bytes(inputs[0].read_bytes()[:3000])  # truncated
    fake = FakeGateway()
    with fake.serve() as url:
        result = CliRunner().invoke(app, ["reprocess", str(inputs[0]), str(bad), "--url", url, "--out",
                                          str(tmp_path / "o.jsonl")])
    assert result.exit_code == 2, result.output
    assert "broken.h5" in result.output
    assert fake.detect_requests == 0
    assert not (tmp_path / "o.jsonl").exists()


def test_cli_unreachable_service_exits_1_with_a_clear_message(inputs: list[Path], tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result = CliRunner().invoke(app, ["reprocess", str(inputs[0]), "--url", url, "--out", str(tmp_path / "o.jsonl"),
                                      "--retries", "1"])
    assert result.exit_code == 1, result.output
    assert f"cannot reach the service at {url} after 2 attempts" in result.output


def test_cli_server_failure_exits_1_and_says_how_to_resume(inputs: list[Path], tmp_path: Path) -> None:
    fake = FakeGateway(fail=lambda n: (502, "backend_error", {}) if n == 2 else None)
    with fake.serve() as url:
        result = CliRunner().invoke(app, ["reprocess", *map(str, inputs), "--url", url, "--out",
                                          str(tmp_path / "o.jsonl"), "--batch", "4", "--concurrency", "1",
                                          "--no-progress"])
    assert result.exit_code == 1
    assert "502 backend_error" in result.output
    assert "4 of 23 events" in result.output
    assert "run the same command again to resume" in result.output
    assert "sent 1 time(s)" in result.output  # a 502 is not retried


@pytest.mark.slow
def test_sigkill_at_any_moment_then_resume_gives_every_event_once(tmp_path: Path) -> None:
    src = tmp_path / "many_0000.h5"
    write_events(src, pf_events(np.random.default_rng(2), 80), format="jetssd")
    out = tmp_path / "jets.jsonl"
    fake = FakeGateway(delay_s=0.01)
    cmd = [sys.executable, "-m", "jetssd_client.cli", "reprocess", str(src), "--out", str(out), "--batch", "1",
           "--concurrency", "2", "--no-progress"]
    with fake.serve() as url:
        for kill_at in (15, 40):  # killed twice, mid-stream
            proc = subprocess.Popen([*cmd, "--url", url], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            deadline = time.monotonic() + 30
            while (not out.exists() or out.read_bytes().count(b"\n") < kill_at) and proc.poll() is None:
                assert time.monotonic() < deadline
                time.sleep(0.002)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            assert proc.returncode == -signal.SIGKILL
        final = subprocess.run([*cmd, "--url", url], capture_output=True, text=True, timeout=60)
    assert final.returncode == 0, final.stderr
    assert "resuming:" in final.stderr
    assert lines(out) == expected([src])


@pytest.mark.slow
def test_dask_local_cluster(inputs: list[Path], tmp_path: Path) -> None:
    pytest.importorskip("distributed")
    out = tmp_path / "jets.h5"
    fake = FakeGateway(fail=lambda n: (500, "internal_error", {}) if n == 5 else None)
    with fake.serve() as url:
        args = ["reprocess", *map(str, inputs), "--url", url, "--out", str(out), "--batch", "2", "--dask",
                "local:2", "--dask-chunk", "3", "--no-progress"]
        failed = CliRunner().invoke(app, args)
        assert failed.exit_code == 1, failed.output
        assert "internal_error" in failed.output
        result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "resuming:" in result.output
    events, _ = read_tables(out)
    assert events["id"] == [r["id"] for r in expected(inputs)]
    assert events["n_jets"] == [len(r["jets"]) for r in expected(inputs)]


def test_pipeline_writes_in_order_when_later_requests_finish_first() -> None:
    import asyncio

    import httpx
    from jetssd_client import AsyncClient

    fake = FakeGateway()

    async def handler(request: httpx.Request) -> httpx.Response:
        ids = [e["id"] for e in json.loads(request.content)["events"]]
        if ids[0] in ("b0", "b3"):  # the first and a later batch are slow
            await asyncio.sleep(0.05)
        status, headers, body = fake.answer("POST", "/v1/detect", request.content)
        return httpx.Response(status, headers=headers, content=body)

    batches = [rp.Batch(k, [f"b{k}"], json.dumps({"events": [{"id": f"b{k}", "pixels": {}}]}).encode())
               for k in range(8)]
    seen: list[int] = []

    async def go() -> None:
        async with AsyncClient(URL, transport=httpx.MockTransport(handler)) as client:
            await rp.run_pipeline(iter(batches), client, 4, lambda b, r: seen.append(b.seq))

    asyncio.run(go())
    assert seen == list(range(8))


def test_a_refused_event_is_named_by_its_id(inputs: list[Path], tmp_path: Path) -> None:
    fake = FakeGateway()
    answer = fake.answer

    def refuse_third(method: str, path: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
        if path == "/v1/detect" and b'"tt_0000:2"' in body:
            return fake._error(413, "too_many_candidates", "42 candidates, the limit is 41",
                               field="events[2].pf_candidates")
        return answer(method, path, body)

    fake.answer = refuse_third  # type: ignore[method-assign]
    with pytest.raises(rp.ReprocessError, match=r"refused event tt_0000:2: 413 too_many_candidates"):
        run(inputs, tmp_path / "jets.jsonl", fake, batch=4, concurrency=1)
