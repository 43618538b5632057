"""Process handling shared by the test layers that start real servers (tests/e2e, tests/deploy).

Importable as ``subprocesses`` from any test module: ``tests/conftest.py`` puts this folder on ``sys.path``
(pytest's default "prepend" import mode, no ``__init__.py``), as it does for ``deploy_stack``.
"""

from __future__ import annotations

import contextlib
import subprocess
from typing import Any


def stop_process(proc: subprocess.Popen[Any], sig: int, timeout: float) -> None:
    """Send ``sig`` to ``proc`` unless it has exited, wait up to ``timeout`` s for it, then kill it."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):  # it may exit between the poll and the signal
        proc.send_signal(sig)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
