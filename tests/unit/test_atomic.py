"""Atomic writes: complete files appear under their name, failures leave the old file and no debris."""

from pathlib import Path

import pytest

from jetssd.atomic import atomic_path, write_text_atomic


def test_write_replaces_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "report.json"
    write_text_atomic(target, "one")
    write_text_atomic(target, "two")
    assert target.read_text() == "two"
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]
    assert target.stat().st_mode & 0o777 == 0o644


def test_failure_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "ckpt.pt"
    target.write_text("old")

    def crash_while_writing() -> None:
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError, match="killed"):
        crash_while_writing()
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]
