"""Session fixtures of the integration tests: one real Triton server, a few generated events.

``triton_server`` starts the real ``tritonserver`` (from the nvidia-pytriton wheel) once per session on free
ports against a temporary copy of the committed ``model_repository`` and yields the
:class:`jetssd_service.triton_server.TritonServer`: ``.http_url`` / ``.grpc_url`` ("127.0.0.1:PORT"),
``.metrics_url`` ("http://127.0.0.1:PORT/metrics"), ``.repository``, ``.stop()``, ``.start()`` (same ports).
A test that stops it must start it again. It is always stopped (and its work directory removed) at the end.

``generated_event_dir`` / ``generated_events`` (events of the project's generator) are in ``tests/conftest.py``.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[2] / "model_repository"


@pytest.fixture(scope="session")
def triton_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the committed model repository (tests may change the copy, never the tree)."""
    repo = tmp_path_factory.mktemp("triton") / "model_repository"
    shutil.copytree(REPOSITORY, repo, ignore=shutil.ignore_patterns("__pycache__"))
    return repo


@pytest.fixture(scope="session")
def triton_server(triton_repository: Path) -> Iterator[object]:
    """The real Triton server on ``triton_repository`` (see the module docstring)."""
    pytest.importorskip("tritonclient.http")
    from jetssd_service.triton_server import TritonInstallation, TritonServer

    try:
        TritonInstallation.from_wheel().stub()
    except FileNotFoundError as exc:
        pytest.skip(f"no Triton server here: {exc}")
    server = TritonServer(triton_repository, http_port=0, grpc_port=0, metrics_port=0, watchdog_interval=0.5,
                          exit_timeout=3, startup_timeout=120)
    try:
        server.start()
        yield server
    finally:
        server.close()
