"""`jetssd-service serve` (what `make run` starts) as a user runs it: a real process with Triton and the gateway,
events over real HTTP, Ctrl-C, nothing left running."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

REPOSITORY = Path(__file__).resolve().parents[2] / "model_repository"
pytestmark = [pytest.mark.triton, pytest.mark.slow]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def processes_mentioning(text: str) -> list[int]:
    """PIDs whose command line contains ``text`` (this test's repository copy: Triton and its stubs)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text in cmdline and state != "Z":
            found.append(int(proc.name))
    return found


def pf_event(event: Any, event_id: str) -> dict[str, Any]:
    pf = event.pf
    return {"id": event_id, "pf_candidates": {"pt": pf.pt.tolist(), "eta": pf.eta.tolist(), "phi": pf.phi.tolist(),
                                              "kind": pf.kind.tolist()}}


def test_serve_answers_over_http_and_stops_cleanly_on_ctrl_c(generated_event_dir: Path, tmp_path: Path) -> None:
    from jetssd.io import open_events

    repo = tmp_path / "model_repository"
    shutil.copytree(REPOSITORY, repo, ignore=shutil.ignore_patterns("__pycache__"))
    with open_events(sorted(generated_event_dir.glob("*.h5"))[0]) as f:
        events = [pf_event(e, f"e{i}") for i, e in enumerate(next(iter(f.iter_chunks())))]
    gateway = free_port()
    env = {**os.environ, "JETSSD_MODEL_REPOSITORY": str(repo), "JETSSD_GATEWAY_PORT": str(gateway),
           "JETSSD_TRITON_HTTP_PORT": str(free_port()), "JETSSD_TRITON_GRPC_PORT": str(free_port()),
           "JETSSD_TRITON_METRICS_PORT": str(free_port())}
    proc = subprocess.Popen([sys.executable, "-m", "jetssd_service.cli", "serve", "--log-level", "warning"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{gateway}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.communicate()[0]
            try:
                if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "service not ready in 120 s"
            time.sleep(0.5)
        assert processes_mentioning(str(repo)), "Triton should be running on the repository copy"

        answers = {}
        for backend in ("triton", "local"):
            r = httpx.post(f"{base}/v1/detect", json={"backend": backend, "events": events}, timeout=60)
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["backend"] == backend
            assert body["model"] == "twn"  # the default model: the pruned ternary network
            assert [e["id"] for e in body["events"]] == [e["id"] for e in events]
            answers[backend] = [e["jets"] for e in body["events"]]
        assert answers["triton"] == answers["local"]
        assert any(answers["triton"]), "the signal events should have jets"
    finally:
        proc.send_signal(signal.SIGINT)  # what Ctrl-C in `make run` sends
        output = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, output
    assert "Gateway    " + base in output
    assert "stopped" in output
    assert processes_mentioning(str(repo)) == []
