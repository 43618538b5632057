"""Every `jetssd` command explains itself: `--help` renders (rich markup in help texts can break it)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.main import get_command
from typer.testing import CliRunner

from jetssd.cli import app

COMMANDS = sorted(get_command(app).commands)  # type: ignore[attr-defined]


def test_the_cli_has_its_commands() -> None:
    assert {"generate", "info", "display", "train", "export", "evaluate", "prune", "quantize"} <= set(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_help_renders(command: str) -> None:
    result = CliRunner().invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output
    assert "--help" in result.output


@pytest.mark.parametrize(("command", "literal"), [("generate", "jetssd[datagen]"), ("train", "[compress]")])
def test_help_keeps_literal_brackets(command: str, literal: str) -> None:
    """rich drops "[datagen]"-like words as unknown style tags unless they are escaped."""
    result = CliRunner().invoke(app, [command, "--help"], terminal_width=200)
    assert literal in result.output


def test_errors_keep_literal_brackets(tmp_path: Path) -> None:
    missing = tmp_path / "run[old]" / "best.pt"  # "[old]" would be a style tag to rich
    result = CliRunner().invoke(app, ["export", str(missing), "--repository", str(tmp_path / "repo")],
                                terminal_width=400)
    assert result.exit_code == 2
    assert "run[old]" in result.output
