"""The resume bookkeeping of `jetssd-client reprocess`: torn last lines, duplicates, corrupt lines, appends."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from jetssd_client.journal import Journal, JournalError, read_records


def rec(i: int) -> dict[str, object]:
    return {"id": f"f:{i}", "jets": [{"label": "t", "score": 0.5, "eta": 0.0, "phi": 0.0, "pt": 1.0 * i}]}


def line(i: int) -> bytes:
    return json.dumps(rec(i), separators=(",", ":")).encode() + b"\n"


def test_new_journal_appends_complete_lines(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    journal, recovery = Journal.open(path)
    with journal:
        assert len(journal) == 0
        assert not recovery.repaired
        assert journal.append([rec(0), rec(1)]) == 2
        assert journal.append([]) == 0
        assert "f:1" in journal
        assert journal.ids == {"f:0", "f:1"}
        with pytest.raises(ValueError, match="already"):
            journal.append([rec(1)])
        with pytest.raises(ValueError, match="already"):
            journal.append([rec(2), rec(2)])
    assert path.read_bytes() == line(0) + line(1)
    assert [r["id"] for r in read_records(path)] == ["f:0", "f:1"]


@pytest.mark.parametrize("torn", [b"{", b'{"id":"f:2","jets":[{"label":"t"', b"\x00\x00\x00\x00"])
def test_a_torn_last_line_is_truncated_on_resume(tmp_path: Path, torn: bytes) -> None:
    path = tmp_path / "out.jsonl"
    path.write_bytes(line(0) + line(1) + torn)
    assert [r["id"] for r in read_records(path)] == ["f:0", "f:1"]  # readers skip it too
    journal, recovery = Journal.open(path)
    with journal:
        assert recovery.torn_bytes == len(torn)
        assert recovery.records == 2
        assert recovery.repaired
        assert journal.ids == {"f:0", "f:1"}
        journal.append([rec(2)])
    assert path.read_bytes() == line(0) + line(1) + line(2)


def test_duplicates_are_compacted_to_the_first_record(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    second_version = json.dumps({"id": "f:0", "jets": []}).encode() + b"\n"
    path.write_bytes(line(0) + line(1) + second_version + line(1) + b'{"id":')
    journal, recovery = Journal.open(path)
    journal.close()
    assert recovery.duplicates == 2
    assert set(recovery.duplicate_ids) == {"f:0", "f:1"}
    assert path.read_bytes() == line(0) + line(1)


@pytest.mark.parametrize("bad", [b"not json\n", b'{"jets": []}\n', b'{"id": 3, "jets": []}\n'])
def test_a_corrupt_complete_line_is_an_error_not_silently_dropped(tmp_path: Path, bad: bytes) -> None:
    path = tmp_path / "out.jsonl"
    content = line(0) + bad + line(1)
    path.write_bytes(content)
    with pytest.raises(JournalError, match="line 2"):
        Journal.open(path)
    assert path.read_bytes() == content  # untouched


def test_empty_and_missing_files(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_bytes(b"")
    journal, recovery = Journal.open(path)
    journal.close()
    assert recovery.records == 0
    assert not recovery.repaired
    journal, _ = Journal.open(tmp_path / "new.jsonl")
    journal.close()
    assert (tmp_path / "new.jsonl").exists()
