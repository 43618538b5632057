"""`jetssd-service` explains itself, and the gateway's settings come from JETSSD_* variables."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("fastapi")

from jetssd_service.cli import app
from jetssd_service.settings import Settings
from pydantic import ValidationError
from typer.main import get_command
from typer.testing import CliRunner

COMMANDS = sorted(get_command(app).commands)  # type: ignore[attr-defined]


def test_the_gateway_command_exists() -> None:
    assert "gateway" in COMMANDS


@pytest.mark.parametrize("command", COMMANDS)
def test_help_renders(command: str) -> None:
    result = CliRunner().invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_a_bad_option_is_refused_before_starting() -> None:
    result = CliRunner().invoke(app, ["gateway", "--backend", "gpu"])
    assert result.exit_code == 2
    assert "default_backend" in result.output


def test_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("JETSSD_GATEWAY_PORT", "9090")
    monkeypatch.setenv("JETSSD_TRITON_HOST", "triton.internal")
    monkeypatch.setenv("JETSSD_TRITON_GRPC_PORT", "9001")
    monkeypatch.setenv("JETSSD_DEFAULT_BACKEND", "local")
    monkeypatch.setenv("JETSSD_FALLBACK_TO_LOCAL", "true")
    monkeypatch.setenv("JETSSD_MODEL_REPOSITORY", str(tmp_path))
    s = Settings()
    assert (s.gateway_port, s.default_backend, s.fallback_to_local, s.model_repository) == (9090, "local", True,
                                                                                           tmp_path)
    assert s.triton_http_url == "triton.internal:8000"
    assert s.triton_grpc_url == "triton.internal:9001"
    assert s.default_model == "twn"


def test_the_default_repository_is_the_checkout_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JETSSD_MODEL_REPOSITORY", raising=False)
    assert Settings().model_repository == Path(__file__).resolve().parents[2] / "model_repository"


@pytest.mark.parametrize(("name", "value"), [("JETSSD_GATEWAY_PORT", "0"), ("JETSSD_DEFAULT_BACKEND", "gpu"),
                                             ("JETSSD_TRITON_TRANSPORT", "carrier-pigeon"),
                                             ("JETSSD_MAX_EVENTS_PER_REQUEST", "-1")])
def test_bad_settings_are_refused(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError, match=name.removeprefix("JETSSD_").lower()):
        Settings()
