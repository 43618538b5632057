"""``jetssd-service serve``: Triton and the gateway together, in the foreground (what ``make run`` starts).

Triton starts first (the gateway's default backend), then the gateway (uvicorn) in this process; Ctrl-C or
SIGTERM stops uvicorn, then Triton, and nothing is left running (stub processes, shared-memory regions).
Ports and the repository come from the ``JETSSD_*`` settings, as for ``jetssd-service triton`` and
``jetssd-service gateway``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from jetssd_service.cli_support import configure_logging, settings_from_options, triton_endpoints, triton_work_dir


def serve(
    model_repository: Annotated[Path | None, typer.Option(help="Model repository (default "
                                                               "JETSSD_MODEL_REPOSITORY).")] = None,
    gateway_port: Annotated[int | None, typer.Option(help="Gateway port (default JETSSD_GATEWAY_PORT, 8080).")] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
    startup_timeout: Annotated[float, typer.Option(help="Seconds to wait until Triton is ready.")] = 120.0,
) -> None:
    """Run Triton (ensembles pfjet_<variant>) and the HTTP gateway on it until Ctrl-C / SIGTERM.

    Prints where each listens. Requests that name no backend go to Triton, with the model of
    JETSSD_DEFAULT_MODEL (twn); `"backend": "local"` runs the same ONNX models in the gateway process.
    """
    import uvicorn

    from jetssd_service.app import create_app
    from jetssd_service.triton_server import TritonServer, TritonStartError

    configure_logging()
    settings = settings_from_options(model_repository=model_repository, gateway_port=gateway_port)
    server = TritonServer.from_settings(settings, work_dir=triton_work_dir(settings), startup_timeout=startup_timeout)
    try:
        server.start()  # from the main thread: the server's parent-death signal is tied to this thread
    except (TritonStartError, FileNotFoundError) as exc:
        server.stop()
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    try:
        base = f"http://{settings.gateway_host}:{settings.gateway_port}"
        typer.echo(f"Triton ready ({server.repository})\n{triton_endpoints(server)}\n"
                   f"Gateway    {base}  (POST {base}/v1/detect, docs {base}/docs, metrics {base}/metrics)\n"
                   "Ctrl-C stops both.")
        # uvicorn handles SIGINT/SIGTERM itself: it finishes the requests in flight and returns here.
        uvicorn.run(create_app(settings), host=settings.gateway_host, port=settings.gateway_port,
                    log_level=log_level, access_log=False)
    finally:
        typer.echo("stopping Triton …")
        server.stop()
        typer.echo("stopped")
