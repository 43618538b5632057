"""The ``jetssd-service`` command line: run the HTTP gateway (and, registered below, the Triton server).

Every option falls back to the ``JETSSD_*`` environment variables of :class:`jetssd_service.settings.Settings`,
so ``jetssd-service gateway`` and a container that only sets variables behave the same.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from jetssd_service import serve_cli, triton_cli
from jetssd_service.cli_support import configure_logging, settings_from_options

app = typer.Typer(
    name="jetssd-service",
    help="PFJet-SSD inference service: the HTTP gateway in front of Triton, ONNX Runtime and the DSP emulator.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.command()
def gateway(
    host: Annotated[str | None, typer.Option(help="Interface to listen on (default JETSSD_GATEWAY_HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="TCP port (default JETSSD_GATEWAY_PORT, 8080).")] = None,
    backend: Annotated[str | None, typer.Option(help="Default backend: triton, local or dsp "
                                                     "(default JETSSD_DEFAULT_BACKEND).")] = None,
    model: Annotated[str | None, typer.Option(help="Default model variant, e.g. twn "
                                                   "(default JETSSD_DEFAULT_MODEL).")] = None,
    model_repository: Annotated[Path | None, typer.Option(help="Model repository (default "
                                                               "JETSSD_MODEL_REPOSITORY).")] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
) -> None:
    """Run the HTTP gateway (POST /v1/detect, /v1/models, /healthz, /readyz, /metrics, /docs) with uvicorn.

    One process: the Prometheus metrics live in it and the local backend's ONNX Runtime sessions are
    shared by all requests. Scale out with several gateways behind a load balancer, not with workers.
    """
    import uvicorn

    from jetssd_service.app import create_app

    # The gateway's own lines ("connected to Triton", "ready to serve", fallbacks) next to uvicorn's.
    configure_logging(log_level)
    settings = settings_from_options(gateway_host=host, gateway_port=port, default_backend=backend,
                                     default_model=model, model_repository=model_repository)
    uvicorn.run(create_app(settings), host=settings.gateway_host, port=settings.gateway_port,
                log_level=log_level, access_log=False)


# Other commands register here, one line each (e.g. the Triton launcher from jetssd_service.triton_cli).
app.command("triton")(triton_cli.triton)
app.command("serve")(serve_cli.serve)


def main() -> None:
    """Console-script entry point (``jetssd-service``)."""
    app()


if __name__ == "__main__":
    main()
