"""The resume bookkeeping of ``reprocess``: an append-only JSON-lines journal of completed events.

Every record is one line ``{"id": ..., "jets": [...]}\\n``, appended with ``os.write`` (all lines of a batch in
one call) and fsync'd, so after a kill at any moment the file holds complete lines, possibly followed by one
torn (incomplete) last line. :meth:`Journal.open` recovers such a file before appending:

* a torn tail (bytes after the last newline) is truncated away;
* a complete line that is not a JSON record is an error (:class:`JournalError`: the file was edited or is
  not ours), never silently dropped;
* duplicate ids (impossible with this writer, possible after a hand merge) are compacted to the first record,
  the file being rewritten atomically.

The ids read back are the completed events; the caller sends only the others, so the journal ends up with
every event exactly once.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from jetssd.atomic import atomic_path


class JournalError(Exception):
    """A journal that cannot be resumed safely (a corrupt line in the middle, a record without an id)."""


@dataclass
class Recovery:
    """What :meth:`Journal.open` found and repaired."""

    records: int = 0
    torn_bytes: int = 0
    duplicates: int = 0
    duplicate_ids: list[str] = field(default_factory=list)

    @property
    def repaired(self) -> bool:
        return bool(self.torn_bytes or self.duplicates)


def _parse(line: bytes, number: int, path: Path) -> str:
    try:
        rid = json.loads(line)["id"]
    except (ValueError, TypeError, KeyError) as exc:
        shown = line[:80].decode("utf-8", errors="replace")
        raise JournalError(f"{path}: line {number} is not a complete event record ({shown!r}); the file was "
                           "changed by something other than jetssd-client; fix or remove it") from exc
    if not isinstance(rid, str):
        raise JournalError(f"{path}: line {number} has a non-string id {rid!r}")
    return rid


def _scan(path: Path) -> tuple[set[str], int, int, list[str]]:
    """Stream the complete lines of ``path`` → (ids, end offset of the last complete line, file size, duplicate ids)."""
    ids: set[str] = set()
    duplicates: list[str] = []
    end = 0
    if not path.exists():
        return ids, 0, 0, duplicates
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if not line.endswith(b"\n"):
                break  # a torn last line: the writer was killed in the middle of it
            rid = _parse(line, number, path)
            if rid in ids:
                duplicates.append(rid)
            ids.add(rid)
            end += len(line)
        size = f.seek(0, os.SEEK_END)
    return ids, end, size, duplicates


def _compact(path: Path, end: int) -> None:
    """Rewrite ``path`` atomically with the first record of each id (complete lines up to ``end`` only)."""
    seen: set[str] = set()
    with atomic_path(path) as tmp, open(path, "rb") as src, open(tmp, "wb") as dst:
        done = 0
        for number, line in enumerate(src, 1):
            if done + len(line) > end:
                break
            done += len(line)
            rid = _parse(line, number, path)
            if rid not in seen:
                seen.add(rid)
                dst.write(line)


class Journal:
    """Append-only, crash-safe JSON-lines file of event records; use :meth:`open`."""

    def __init__(self, path: Path, fd: int, ids: set[str], fsync: bool) -> None:
        self.path = path
        self._fd = fd
        self._ids = ids
        self._fsync = fsync

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, fsync: bool = True) -> tuple[Journal, Recovery]:
        """Open (creating it if missing) and recover ``path``; returns the journal and what was repaired."""
        p = Path(path)
        existed = p.exists()
        ids, end, size, duplicates = _scan(p)
        recovery = Recovery(records=len(ids), torn_bytes=size - end, duplicates=len(duplicates),
                            duplicate_ids=duplicates[:10])
        if duplicates:
            _compact(p, end)
        elif recovery.torn_bytes:
            with open(p, "r+b") as f:
                f.truncate(end)
                f.flush()
                os.fsync(f.fileno())
        fd = os.open(p, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        if not existed:
            _fsync_dir(p.parent)  # the new file's name survives a crash too
        return cls(p, fd, ids, fsync), recovery

    @property
    def ids(self) -> set[str]:
        """Ids of the completed records (a copy)."""
        return set(self._ids)

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, rid: object) -> bool:
        return rid in self._ids

    def append(self, records: Iterable[Mapping[str, Any]]) -> int:
        """Append records (each with a string ``id`` not yet in the journal) in one write; returns their number.

        Raises ValueError for a duplicate id: the journal holds every event at most once.
        """
        lines: list[bytes] = []
        fresh: set[str] = set()
        for record in records:
            rid = record["id"]
            if rid in self._ids or rid in fresh:
                raise ValueError(f"event {rid!r} is already in {self.path}")
            fresh.add(rid)
            lines.append(json.dumps(record, separators=(",", ":"), allow_nan=False).encode("utf-8") + b"\n")
        if not lines:
            return 0
        view = memoryview(b"".join(lines))
        while view:  # os.write may write less than asked (signals, quotas); keep going
            view = view[os.write(self._fd, view):]
        if self._fsync:
            os.fsync(self._fd)
        self._ids |= fresh
        return len(fresh)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def read_records(path: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """The complete records of a journal (or a ``reprocess`` .jsonl output), in file order, streamed."""
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if not line.endswith(b"\n"):
                return
            try:
                record = json.loads(line)
            except ValueError as exc:
                raise JournalError(f"{path}: line {number} is not JSON") from exc
            yield record


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
