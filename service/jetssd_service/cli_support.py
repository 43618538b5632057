"""What the ``jetssd-service`` commands share: settings from options, logging, the Triton endpoint banner.

Imports stay light (typer only at module level): the commands import the app and the launcher when they run.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

if TYPE_CHECKING:
    from jetssd_service.settings import Settings
    from jetssd_service.triton_server import TritonServer


def settings_from_options(**options: Any) -> Settings:
    """:class:`Settings` from the ``JETSSD_*`` environment, overridden by the options given (None = not given).

    A bad value ends the command with exit code 2 and pydantic's message, which names the setting.
    """
    from jetssd_service.settings import Settings

    given = {name: value for name, value in options.items() if value is not None}
    try:
        return Settings(**given)
    except ValueError as exc:  # pydantic's ValidationError names the bad setting
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


def configure_logging(level: str = "info") -> None:
    """Timestamped log lines of the service's own loggers (next to uvicorn's); httpx's per-request lines off."""
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)


def triton_work_dir(settings: Settings) -> Path:
    """The launcher's backend copy and log: ``$TMPDIR/jetssd-triton-<http port>``, reused across runs."""
    return Path(tempfile.gettempdir()) / f"jetssd-triton-{settings.triton_http_port}"


def triton_endpoints(server: TritonServer) -> str:
    """The lines that tell a user where a started Triton listens and logs."""
    return (f"  HTTP     http://{server.http_url}\n"
            f"  gRPC     {server.grpc_url}\n"
            f"  metrics  {server.metrics_url}\n"
            f"  log      {server.log_file}")
