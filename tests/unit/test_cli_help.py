"""Every `jetssd` command explains itself: `--help` renders (rich markup in help texts can break it)."""

from __future__ import annotations

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
