"""The deployment stack of ``docker-compose.yml`` without Docker: process helpers and :class:`DeployStack`.

The fixture ``deploy_stack`` (tests/deploy/conftest.py, module scope) starts, on free local ports:

* two real Triton servers (:class:`jetssd_service.triton_server.TritonServer`, the project's launcher) on a copy of
  the committed repository's ``twn`` models;
* real nginx with ``deploy/nginx/nginx.conf`` rendered for them (``deploy_config.render_nginx``);
* the real gateway (``python -m jetssd_service.cli gateway``, uvicorn) pointed at nginx over HTTP, as the compose
  file configures it;
* real Prometheus with ``deploy/prometheus/prometheus.yml`` rendered with static targets and 1 s intervals and the
  committed rule files.

nginx and Prometheus are Debian's packages: without them the tests skip, unless ``JETSSD_REQUIRE_DEPLOY_TOOLS`` is
set (CI), when they fail. Everything started is stopped at the end, by process id.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from deploy_config import find_tool, tools_required
from subprocesses import stop_process

VARIANT = "twn"
MODELS = (f"pfjet_ssd_{VARIANT}", f"pfjet_nms_{VARIANT}", f"pfjet_{VARIANT}")
"""The one variant the stack serves (the gateway's default): 2 python stubs per server instead of 6."""
START_TIMEOUT = 120.0


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    """Poll ``predicate`` until it returns something truthy (returned); AssertionError naming ``what`` after
    ``timeout`` seconds. Exceptions of the predicate count as "not yet", except an AssertionError (re-raised)."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except AssertionError:  # a process died: no point in waiting
            raise
        except Exception as exc:  # not up yet
            last = exc
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f} s (last error: {last!r})")
        time.sleep(interval)


def http_ok(url: str) -> bool:
    """``GET url`` answers 200."""
    return httpx.get(url, timeout=2.0).status_code == 200


@dataclass
class Service:
    """A process the stack started: its command, log file and Popen."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    def output(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def check_alive(self) -> bool:
        """True while the process runs; AssertionError with its log once it has exited."""
        assert self.proc.poll() is None, f"{self.name} exited with {self.proc.returncode}:\n{self.output()}"
        return True

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> None:
        stop_process(self.proc, sig, timeout)


def launch(name: str, args: list[str], work: Path, env: dict[str, str] | None = None) -> Service:
    """Start ``args`` with stdout + stderr into ``work/<name>.log``."""
    log = work / f"{name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                env=env, cwd=work)
    return Service(name, proc, log)


@dataclass
class DeployStack:
    """The running stack (see the module docstring)."""

    tritons: list[Any]
    """Two :class:`jetssd_service.triton_server.TritonServer`."""
    nginx: Service
    gateway: Service
    prometheus: Service
    gateway_url: str
    prometheus_url: str
    lb_http: str
    """``127.0.0.1:PORT`` of nginx's Triton HTTP server."""
    lb_grpc: str
    """``127.0.0.1:PORT`` of nginx's Triton gRPC server."""
    work: Path
    services: list[Service] = field(default_factory=list)

    def triton_instances(self) -> list[str]:
        """Prometheus ``instance`` label of each Triton (its metrics endpoint)."""
        return [f"127.0.0.1:{server.metrics_port}" for server in self.tritons]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant query through Prometheus's HTTP API; the result vector (error → AssertionError)."""
        response = httpx.get(f"{self.prometheus_url}/api/v1/query", params={"query": expr}, timeout=10.0)
        body = response.json()
        assert response.status_code == 200, f"{expr}: {body}"
        assert body["status"] == "success", f"{expr}: {body}"
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def alerts(self) -> list[dict[str, Any]]:
        """Active (pending or firing) alerts."""
        body = httpx.get(f"{self.prometheus_url}/api/v1/alerts", timeout=10.0).json()
        alerts: list[dict[str, Any]] = body["data"]["alerts"]
        return alerts


def require_tool(name: str, package: str) -> str:
    path = find_tool(name)
    if path is None:
        message = f"{name} not found (apt-get install {package}); tests/deploy runs the real one"
        if tools_required():
            pytest.fail(f"{message}; JETSSD_REQUIRE_DEPLOY_TOOLS is set")
        pytest.skip(message)
    return path
