"""``jetssd-service triton``: run the real Triton server on the model repository in the foreground.

Registered on the ``jetssd-service`` app by :mod:`jetssd_service.cli`. Options fall back to the ``JETSSD_*``
settings (ports, repository); the server runs until SIGINT or SIGTERM, then stops cleanly (no stub processes
or shared-memory regions left behind). Imports stay light: the launcher is imported when the command runs.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Annotated, Any

import typer

from jetssd_service.cli_support import configure_logging, settings_from_options, triton_endpoints, triton_work_dir


def triton(
    model_repository: Annotated[Path | None, typer.Option(help="Triton model repository (default "
                                                               "JETSSD_MODEL_REPOSITORY).")] = None,
    host: Annotated[str | None, typer.Option(help="Address the endpoints bind (default JETSSD_TRITON_HOST when it "
                                                  "is an IP address, else 0.0.0.0).")] = None,
    http_port: Annotated[int | None, typer.Option(help="HTTP port (default JETSSD_TRITON_HTTP_PORT, 8000).")] = None,
    grpc_port: Annotated[int | None, typer.Option(help="gRPC port (default JETSSD_TRITON_GRPC_PORT, 8001).")] = None,
    metrics_port: Annotated[int | None, typer.Option(help="Prometheus port (default JETSSD_TRITON_METRICS_PORT, "
                                                          "8002).")] = None,
    model: Annotated[list[str] | None, typer.Option("--model", help="Load only this model (repeatable; default: "
                                                                    "every model with a config.pbtxt).")] = None,
    work_dir: Annotated[Path | None, typer.Option(help="Backend copy and log (default: $TMPDIR/jetssd-triton-"
                                                       "<http port>, reused).")] = None,
    log_file: Annotated[Path | None, typer.Option(help="Server log, appended (default: WORK_DIR/tritonserver.log, "
                                                       "printed at start).")] = None,
    watchdog_interval: Annotated[float, typer.Option(help="Seconds between checks of the python stubs "
                                                          "(0: no watchdog).")] = 2.0,
    startup_timeout: Annotated[float, typer.Option(help="Seconds to wait until the server is ready.")] = 120.0,
) -> None:
    """Run Triton (from the nvidia-pytriton wheel, no Docker) on the model repository until Ctrl-C / SIGTERM.

    Loads pfjet_ssd_<variant>, pfjet_nms_<variant> and the ensembles pfjet_<variant>, prints the endpoints, and
    reloads a model whose python stub process died. Generate the configs first with `jetssd triton-repo`.
    """
    from jetssd_service.triton_server import TritonServer, TritonStartError

    configure_logging()
    settings = settings_from_options(model_repository=model_repository, triton_http_port=http_port,
                                     triton_grpc_port=grpc_port, triton_metrics_port=metrics_port)
    overrides: dict[str, Any] = {"models": model or None, "log_file": log_file,
                                    "watchdog_interval": watchdog_interval or None,
                                    "startup_timeout": startup_timeout}
    if host is not None:
        overrides["host"] = host
    overrides["work_dir"] = work_dir or triton_work_dir(settings)
    server = TritonServer.from_settings(settings, **overrides)

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            server.start()
        except (TritonStartError, FileNotFoundError) as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1) from None
        typer.echo(f"Triton ready on {server.repository}\n{triton_endpoints(server)}\nCtrl-C to stop.")
        while not stop.wait(0.5):
            if not server.running:
                typer.echo(f"error: tritonserver exited unexpectedly; see {server.log_file}", err=True)
                raise typer.Exit(1)
        typer.echo("stopping Triton …")
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    typer.echo("Triton stopped")
