"""Fixture ``deploy_stack`` of tests/deploy/test_stack.py: the compose topology without Docker (deploy_stack.py)."""

from __future__ import annotations

import os
import shutil
import signal
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from deploy_config import ROOT, render_nginx, render_prometheus, write_yaml
from deploy_stack import MODELS, START_TIMEOUT, VARIANT, DeployStack, Service, http_ok, launch, require_tool, wait_until


@pytest.fixture(scope="module")
def deploy_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DeployStack]:
    """Two Tritons behind nginx, the gateway on nginx, Prometheus scraping all (deploy_stack.py's docstring)."""
    nginx_bin = require_tool("nginx", "nginx")
    prometheus_bin = require_tool("prometheus", "prometheus")
    pytest.importorskip("tritonclient.http")
    from jetssd_service.triton_server import TritonInstallation, TritonServer, free_port

    try:
        TritonInstallation.from_wheel().stub()
    except FileNotFoundError as exc:
        pytest.skip(f"no Triton server here: {exc}")

    work = tmp_path_factory.mktemp("deploy")
    repo = work / "model_repository"
    for model in MODELS:
        shutil.copytree(ROOT / "model_repository" / model, repo / model,
                        ignore=shutil.ignore_patterns("__pycache__"))
    tritons: list[Any] = []
    services: list[Service] = []
    try:
        for i in range(2):
            server = TritonServer(repo, http_port=0, grpc_port=0, metrics_port=0, watchdog_interval=None,
                                  exit_timeout=3, startup_timeout=START_TIMEOUT, work_dir=work / f"triton{i}")
            tritons.append(server)
            server.start()  # from this (the main) thread: the server lives as long as the thread that started it

        lb_http, lb_grpc, lb_status = free_port(), free_port(), free_port()
        nginx_dir = work / "nginx"
        nginx_dir.mkdir()
        conf = nginx_dir / "nginx.conf"
        conf.write_text(render_nginx(nginx_dir, lb_http, lb_grpc, lb_status,
                                     [s.http_url for s in tritons], [s.grpc_url for s in tritons]))
        nginx = launch("nginx", [nginx_bin, "-p", str(nginx_dir), "-c", str(conf), "-g", "daemon off;"], work)
        services.append(nginx)
        wait_until(lambda: nginx.check_alive() and http_ok(f"http://127.0.0.1:{lb_status}/healthz"), 30, "nginx up")

        gateway_port = free_port()
        env = {**os.environ, "JETSSD_GATEWAY_PORT": str(gateway_port), "JETSSD_TRITON_HOST": "127.0.0.1",
               "JETSSD_TRITON_HTTP_PORT": str(lb_http), "JETSSD_TRITON_GRPC_PORT": str(lb_grpc),
               "JETSSD_TRITON_TRANSPORT": "http", "JETSSD_MODEL_REPOSITORY": str(repo),
               "JETSSD_DEFAULT_MODEL": VARIANT, "JETSSD_LOCAL_PRELOAD": "false"}
        gateway = launch("gateway", [sys.executable, "-m", "jetssd_service.cli", "gateway", "--log-level", "warning"],
                         work, env)
        services.append(gateway)
        gateway_url = f"http://127.0.0.1:{gateway_port}"
        wait_until(lambda: gateway.check_alive() and http_ok(f"{gateway_url}/readyz"), START_TIMEOUT, "gateway ready")

        prometheus_port = free_port()
        config = render_prometheus({"gateway": [f"127.0.0.1:{gateway_port}"],
                                    "triton": [f"127.0.0.1:{s.metrics_port}" for s in tritons],
                                    "prometheus": [f"127.0.0.1:{prometheus_port}"]})
        prometheus = launch("prometheus", [
            prometheus_bin, f"--config.file={write_yaml(work / 'prometheus.yml', config)}",
            f"--storage.tsdb.path={work / 'tsdb'}", f"--web.listen-address=127.0.0.1:{prometheus_port}"], work)
        services.append(prometheus)
        prometheus_url = f"http://127.0.0.1:{prometheus_port}"
        wait_until(lambda: prometheus.check_alive() and http_ok(f"{prometheus_url}/-/ready"), 60, "prometheus ready")

        yield DeployStack(tritons, nginx, gateway, prometheus, gateway_url, prometheus_url, f"127.0.0.1:{lb_http}",
                          f"127.0.0.1:{lb_grpc}", work, services)
    finally:
        for service in reversed(services):
            service.stop(signal.SIGINT if service.name == "gateway" else signal.SIGTERM)
        for server in tritons:
            server.close()
