"""Atomic file writes: a temporary file in the target's folder, renamed onto the target only when complete.

Every writer of the project that publishes a single file (reports, metadata, manifests, checkpoints) goes
through here, so a crash or a kill leaves either the old file or the new one, never half of one. (The
HDF5 writers and the model-repository publisher rename whole files and folders the same way.)
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | os.PathLike[str], mode: int = 0o644) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; after the block it is fsynced and renamed onto ``path``.

    If the block raises, the temporary file is removed and ``path`` is untouched. ``mode`` is applied
    before the rename (mkstemp creates 0600 files; published files are meant to be read by others).
    """
    target = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with tmp.open("rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    write_bytes_atomic(path, text.encode("utf-8"))
