"""Fixtures of the end-to-end tests: the real service (`jetssd-service serve`: Triton + the gateway) as a user runs it.

``launch_service()`` starts ``python -m jetssd_service.cli serve`` on free ports against a copy of the committed
``model_repository``, waits until ``/readyz`` answers 200 and returns a :class:`RunningService` (``url``,
``triton_metrics_url``, ``repository``, ``proc``, ``stop()``). Every service it started is stopped at the end
of the session. ``jetssd_service`` is one such service shared by the whole session (for tests that only send
requests); a test that stops its service launches its own.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from subprocesses import stop_process

REPOSITORY = Path(__file__).resolve().parents[2] / "model_repository"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RunningService:
    url: str
    """The gateway, ``http://127.0.0.1:PORT``."""
    triton_metrics_url: str
    repository: Path
    proc: subprocess.Popen[str]
    log: Path
    """stdout + stderr of ``serve``."""

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGINT, timeout: float = 60) -> str:
        """Send ``sig`` (SIGINT: what Ctrl-C sends), wait for the exit; returns everything ``serve`` printed."""
        stop_process(self.proc, sig, timeout)
        return self.output()


@pytest.fixture(scope="session")
def launch_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., RunningService]]:
    """A function starting `jetssd-service serve` (see the module docstring); everything it started is stopped."""
    pytest.importorskip("jetssd_service")
    from jetssd_service.triton_server import TritonInstallation

    try:
        TritonInstallation.from_wheel().stub()
    except FileNotFoundError as exc:
        pytest.skip(f"no Triton server here: {exc}")
    started: list[RunningService] = []

    def launch(env: Mapping[str, str] | None = None, startup_timeout: float = 180) -> RunningService:
        work = tmp_path_factory.mktemp("service")
        repo = work / "model_repository"
        shutil.copytree(REPOSITORY, repo, ignore=shutil.ignore_patterns("__pycache__"))
        gateway, metrics = free_port(), free_port()
        full_env = {**os.environ, "JETSSD_MODEL_REPOSITORY": str(repo), "JETSSD_GATEWAY_PORT": str(gateway),
                    "JETSSD_TRITON_HTTP_PORT": str(free_port()), "JETSSD_TRITON_GRPC_PORT": str(free_port()),
                    "JETSSD_TRITON_METRICS_PORT": str(metrics), **(env or {})}
        log = work / "serve.log"
        with log.open("w") as out:
            proc = subprocess.Popen([sys.executable, "-m", "jetssd_service.cli", "serve", "--log-level", "warning"],
                                    env=full_env, stdout=out, stderr=subprocess.STDOUT, text=True)
        service = RunningService(f"http://127.0.0.1:{gateway}", f"http://127.0.0.1:{metrics}/metrics", repo, proc,
                                 log)
        started.append(service)
        deadline = time.monotonic() + startup_timeout
        while True:
            assert proc.poll() is None, service.output()
            try:
                if httpx.get(f"{service.url}/readyz", timeout=1).status_code == 200:
                    return service
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"service not ready in {startup_timeout} s:\n{service.output()}"
            time.sleep(0.5)

    try:
        yield launch
    finally:
        for service in started:
            service.stop()


@pytest.fixture(scope="session")
def jetssd_service(launch_service: Callable[..., RunningService]) -> RunningService:
    """One running service (Triton + gateway) shared by the session's tests that only send requests."""
    return launch_service()
