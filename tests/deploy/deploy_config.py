"""The committed deployment configs (``deploy/``), read and rendered for runs without Docker.

The files under ``deploy/`` stay the source: :func:`render_nginx` and :func:`render_prometheus` change only what
differs between Docker Compose and a test on one host (addresses, ports, log and pid paths, intervals) and fail
when a line they rewrite is no longer in the committed file. The PromQL helpers list every expression of the
Grafana dashboards and the Prometheus rules and the metric names those expressions read.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
NGINX_CONF = DEPLOY / "nginx" / "nginx.conf"
PROMETHEUS_CONF = DEPLOY / "prometheus" / "prometheus.yml"
RULES_DIR = DEPLOY / "prometheus" / "rules"
RULE_TESTS_DIR = DEPLOY / "prometheus" / "tests"
DASHBOARDS_DIR = DEPLOY / "grafana" / "dashboards"
PROVISIONING_DIR = DEPLOY / "grafana" / "provisioning"
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILES = (ROOT / "Dockerfile", DEPLOY / "triton" / "Dockerfile")

REQUIRE_TOOLS_VARIABLE = "JETSSD_REQUIRE_DEPLOY_TOOLS"
"""Set (to anything non-empty) in CI: a missing nginx / prometheus / promtool fails the tests instead of skipping."""

TRITON_METRICS = frozenset({
    "nv_inference_request_success", "nv_inference_request_failure", "nv_inference_count", "nv_inference_exec_count",
    "nv_inference_request_duration_us", "nv_inference_queue_duration_us", "nv_inference_compute_input_duration_us",
    "nv_inference_compute_infer_duration_us", "nv_inference_compute_output_duration_us",
    "nv_inference_pending_request_count", "nv_cpu_utilization", "nv_cpu_memory_total_bytes",
    "nv_cpu_memory_used_bytes",
})
"""What Triton 2.51 exports on a CPU server (reference/triton-without-docker.md §4); test_stack checks them live."""
PROMETHEUS_METRICS = frozenset({"up"})
"""Series Prometheus makes itself for every target."""

GRAFANA_VARIABLES = {"$__rate_interval": "15s", "$__interval": "15s", "${model}": ".*", "$model": ".*"}
"""Values for the dashboards' template variables when an expression is sent to Prometheus directly."""

_PROMQL_KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset", "inf", "nan", "atan2"})


# ---------------------------------------------------------------------------------------------------- tools


def find_tool(name: str) -> str | None:
    """Path of an executable: this environment's bin (pip-installed tools), then PATH, then the sbin directories
    (nginx is in /usr/sbin, which a non-root PATH may lack)."""
    local = Path(sys.executable).parent / name
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    return shutil.which(name) or shutil.which(name, path="/usr/local/sbin:/usr/sbin:/sbin")


def tools_required() -> bool:
    """Whether CI asked for the deploy tools (``JETSSD_REQUIRE_DEPLOY_TOOLS``)."""
    return bool(os.environ.get(REQUIRE_TOOLS_VARIABLE))


# ---------------------------------------------------------------------------------------------------- nginx


def _replace_once(text: str, old: str, new: str, source: Path) -> str:
    count = text.count(old)
    if count != 1:
        raise ValueError(f"{source}: expected exactly one {old!r}, found {count}; update the renderer with the file")
    return text.replace(old, new)


def render_nginx(workdir: Path, http_port: int, grpc_port: int, status_port: int,
                 triton_http: Sequence[str], triton_grpc: Sequence[str], source: Path = NGINX_CONF) -> str:
    """``deploy/nginx/nginx.conf`` for local Triton servers (``host:port`` lists) and local ports.

    In Compose the replicas are the A records of ``triton`` (a variable upstream resolved per request). Here they
    are upstream groups named like the variables' new values, which nginx looks up before any resolver. Each
    server has ``max_fails=0``: no passive health state, like the per-request upstream of the Compose setup, so a
    dead replica costs a refused connection and the request goes on to the next one. Everything else (timeouts,
    retries, body limits, the gRPC server) is the committed file unchanged.
    """
    text = source.read_text()
    work = workdir.resolve()
    temp = "\n".join(f"    {name}_temp_path {work / name};" for name in ("client_body", "proxy", "fastcgi", "uwsgi",
                                                                            "scgi"))
    upstreams = "\n".join(
        f"    upstream {name} {{\n" + "".join(f"        server {address} max_fails=0;\n" for address in addresses)
        + "    }"
        for name, addresses in (("triton_http", triton_http), ("triton_grpc", triton_grpc)))
    for old, new in (
        ("error_log /dev/stderr warn;", f"error_log {work / 'error.log'} warn;"),
        ("pid /var/run/nginx.pid;", f"pid {work / 'nginx.pid'};"),
        ("access_log /dev/stdout upstream;", f"access_log {work / 'access.log'} upstream;\n{temp}\n{upstreams}"),
        ("listen 8000;", f"listen 127.0.0.1:{http_port};"),
        ("listen 8001 http2;", f"listen 127.0.0.1:{grpc_port} http2;"),
        ("listen 8081;", f"listen 127.0.0.1:{status_port};"),
        ("set $triton_http triton:8000;", "set $triton_http triton_http;"),
        ("set $triton_grpc triton:8001;", "set $triton_grpc triton_grpc;"),
    ):
        text = _replace_once(text, old, new, source)
    return text


# ----------------------------------------------------------------------------------------------- prometheus


def render_prometheus(targets: Mapping[str, Sequence[str]], interval: str = "1s",
                      source: Path = PROMETHEUS_CONF) -> dict[str, Any]:
    """``deploy/prometheus/prometheus.yml`` with static ``targets`` per job instead of DNS discovery.

    Every job of the committed file must get targets. Scrape and evaluation intervals become ``interval``; the
    rule files stay the committed ones (absolute paths, since the rendered file lives elsewhere).
    """
    config: dict[str, Any] = yaml.safe_load(source.read_text())
    config["global"].update({"scrape_interval": interval, "scrape_timeout": interval, "evaluation_interval": interval})
    config["rule_files"] = [str((source.parent / pattern).resolve()) for pattern in config["rule_files"]]
    jobs = {job["job_name"] for job in config["scrape_configs"]}
    if jobs != set(targets):
        raise ValueError(f"{source}: jobs {sorted(jobs)}, targets given for {sorted(targets)}")
    for job in config["scrape_configs"]:
        job.pop("dns_sd_configs", None)
        job["static_configs"] = [{"targets": list(targets[job["job_name"]])}]
    return config


def write_yaml(path: Path, data: Any) -> Path:
    """Write ``data`` as YAML; returns ``path``."""
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def rule_groups() -> list[dict[str, Any]]:
    """Every rule group of ``deploy/prometheus/rules/*.yml``."""
    groups: list[dict[str, Any]] = []
    for path in sorted(RULES_DIR.glob("*.yml")):
        groups.extend(yaml.safe_load(path.read_text())["groups"])
    return groups


def recording_rules() -> dict[str, str]:
    """Recorded series name → expression."""
    return {rule["record"]: rule["expr"] for group in rule_groups() for rule in group["rules"] if "record" in rule}


def alerting_rules() -> dict[str, dict[str, Any]]:
    """Alert name → rule."""
    return {rule["alert"]: rule for group in rule_groups() for rule in group["rules"] if "alert" in rule}


# ------------------------------------------------------------------------------------------------- grafana


def dashboards() -> dict[str, dict[str, Any]]:
    """File name → dashboard JSON of ``deploy/grafana/dashboards/``."""
    return {path.name: json.loads(path.read_text()) for path in sorted(DASHBOARDS_DIR.glob("*.json"))}


def _panels(panels: Iterable[dict[str, Any]]) -> Iterable[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def dashboard_panels(dashboard: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every panel, rows' nested panels included."""
    return list(_panels(dashboard.get("panels", [])))


def dashboard_expressions() -> list[tuple[str, str]]:
    """``(dashboard file / panel title / refId, expr)`` of every Prometheus target of every dashboard."""
    out = []
    for name, dashboard in dashboards().items():
        for panel in dashboard_panels(dashboard):
            for target in panel.get("targets", []):
                if target.get("expr"):
                    out.append((f"{name} / {panel['title']} / {target.get('refId', '?')}", target["expr"]))
    return out


def substitute_variables(expr: str) -> str:
    """An expression with Grafana's template variables replaced (:data:`GRAFANA_VARIABLES`)."""
    for variable in sorted(GRAFANA_VARIABLES, key=len, reverse=True):
        expr = expr.replace(variable, GRAFANA_VARIABLES[variable])
    if "$" in expr:
        raise ValueError(f"unknown template variable in {expr!r}")
    return expr


# -------------------------------------------------------------------------------------------------- PromQL


def metric_names(expr: str) -> set[str]:
    """Metric (and recorded series) names an expression reads.

    Strings, label matchers, range selectors and ``by``/``without``/``on``/``ignoring``/``group_*`` label lists
    are dropped first; then every identifier not followed by ``(`` (a function or an aggregation) and not a
    keyword or a number is a metric name.
    """
    text = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.:$])[A-Za-z_:][\w:]*", text):
        token = match.group()
        if text[match.end():].lstrip().startswith("(") or token.lower() in _PROMQL_KEYWORDS:
            continue
        names.add(token)
    return names


def gateway_metric_names() -> set[str]:
    """Every series name the gateway exports (service/jetssd_service/metrics.py), suffixes included."""
    from jetssd_service.metrics import GatewayMetrics

    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",),
                "summary": ("_sum", "_count", "")}
    names: set[str] = set()
    for family in GatewayMetrics().registry.collect():
        names.update(family.name + suffix for suffix in suffixes[family.type])
    return names
