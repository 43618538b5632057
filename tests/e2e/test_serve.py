"""`jetssd-service serve` (what `make run` starts) as a user runs it: a real process with Triton and the gateway,
events over real HTTP, Ctrl-C, nothing left running."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from jetssd_client.encode import pf_candidates

pytestmark = [pytest.mark.triton, pytest.mark.slow]


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
    return {"id": event_id, "pf_candidates": pf_candidates(event.pf)}


def test_serve_answers_over_http_and_stops_cleanly_on_ctrl_c(generated_event_dir: Path,
                                                             launch_service: Callable[..., Any]) -> None:
    from jetssd.io import open_events

    with open_events(sorted(generated_event_dir.glob("*.h5"))[0]) as f:
        events = [pf_event(e, f"e{i}") for i, e in enumerate(next(iter(f.iter_chunks())))]
    service = launch_service()  # `serve` on free ports and a repository copy, ready (/readyz 200)
    base, repo = service.url, service.repository
    try:
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
        output = service.stop()  # SIGINT: what Ctrl-C in `make run` sends
    assert service.proc.returncode == 0, output
    assert "Gateway    " + base in output
    assert "stopped" in output
    assert processes_mentioning(str(repo)) == []
