"""jetssd.io error handling: every bad file is a DatasetFormatError naming it; writers never leave junk."""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest

from jetssd.event import Event, PFCandidates, SparsePixels
from jetssd.io import (
    REFERENCE_DATASETS,
    DatasetFormatError,
    EventWriter,
    NativeFile,
    NativeWriter,
    ReferenceFile,
    ReferenceWriter,
    open_events,
    write_events,
)

INT16 = {"EFlowTrack_Eta", "EFlowTrack_Phi", "EFlowPhoton_Eta", "EFlowPhoton_Phi", "EFlowNeutralHadron_Eta",
         "EFlowNeutralHadron_Phi"}
OPENERS: list[Callable[[Path], object]] = [ReferenceFile, NativeFile, open_events]


def good_columns() -> dict[str, list[list[float]]]:
    """Two valid events in the reference layout."""
    cols: dict[str, list[list[float]]] = {name: [[], []] for name in REFERENCE_DATASETS}
    cols.update({"labels": [[0, 10, 20, 400.0], []], "baseline": [[1, 10, 20, 380.0, 0.4], []],
                 "EFlowTrack_Eta": [[1, 2], [3]], "EFlowTrack_Phi": [[4, 5], [6]],
                 "EFlowTrack_PT": [[1.0, 2.0], [3.0]]})
    return cols


def write_columns(path: Path, cols: dict[str, list[list[float]]], float_indices: bool = False) -> Path:
    with h5py.File(path, "w") as f:
        for name, rows in cols.items():
            dt = np.int16 if name in INT16 and not float_indices else np.float32
            ds = f.create_dataset(name, (len(rows),), dtype=h5py.vlen_dtype(dt))
            for k, row in enumerate(rows):
                ds[k] = np.asarray(row, dt)
    return path


def read_everything(path: Path) -> None:
    with ReferenceFile(path) as f:
        for _ in f.iter_chunks():
            pass


@pytest.mark.parametrize("opener", OPENERS)
def test_missing_file(tmp_path: Path, opener: Callable[[Path], object]) -> None:
    with pytest.raises(DatasetFormatError, match=r"nothere\.h5: no such file"):
        opener(tmp_path / "nothere.h5")


@pytest.mark.parametrize("opener", OPENERS)
def test_not_hdf5(tmp_path: Path, opener: Callable[[Path], object]) -> None:
    text = tmp_path / "notes.h5"
    text.write_text("eta,phi,pt\n0.1,0.2,30\n")
    with pytest.raises(DatasetFormatError, match=r"notes\.h5: not an HDF5 file"):
        opener(text)
    with pytest.raises(DatasetFormatError, match="directory"):
        opener(tmp_path)


@pytest.mark.parametrize("fraction", [0.5, 0.9])
def test_truncated_file(tmp_path: Path, fraction: float) -> None:
    path = tmp_path / "cut.h5"
    rng = np.random.default_rng(0)
    pf = PFCandidates.from_arrays(rng.exponential(3, 500), rng.uniform(-3, 3, 500), rng.uniform(-3, 3, 500),
                                  rng.integers(0, 3, 500))
    write_events(path, [Event(SparsePixels.empty(), pf=pf)] * 20, format="jetssd")
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(DatasetFormatError, match=r"cut\.h5.*truncated or corrupt"), open_events(path) as f:
        for _ in f.iter_chunks():
            pass


def test_missing_dataset(tmp_path: Path) -> None:
    cols = good_columns()
    del cols["EFlowPhoton_ET"]
    path = write_columns(tmp_path / "m.h5", cols)
    with pytest.raises(DatasetFormatError, match=r"m\.h5: dataset 'EFlowPhoton_ET': missing"):
        open_events(path)


def test_datasets_of_different_lengths(tmp_path: Path) -> None:
    cols = good_columns()
    cols["baseline"] = [[], [], []]
    path = write_columns(tmp_path / "len.h5", cols)
    with pytest.raises(DatasetFormatError, match=r"len\.h5: dataset 'baseline': has 3 events but 'labels' has 2"):
        ReferenceFile(path)


def test_not_variable_length(tmp_path: Path) -> None:
    path = write_columns(tmp_path / "fixed.h5", good_columns())
    with h5py.File(path, "a") as f:
        del f["labels"]
        f.create_dataset("labels", data=np.zeros(2, np.float32))
    with pytest.raises(DatasetFormatError, match=r"fixed\.h5: dataset 'labels': must be variable-length"):
        ReferenceFile(path)


@pytest.mark.parametrize(("name", "row", "message"), [
    ("labels", [0, 10, 20, 400.0, 1], "5 values, not a multiple of the row length 4"),
    ("baseline", [1, 10, 20, 380.0], "4 values, not a multiple of the row length 5"),
    ("labels", [3, 10, 20, 400.0], "class id 3 in event 0 is outside 0…2"),
    ("labels", [0, 340, 20, 400.0], "index 340 in event 0 is outside 0…339"),
    ("baseline", [0, 10, 360, 380.0, 0.4], "index 360 in event 0 is outside 0…359"),
    ("labels", [0, 10.5, 20, 400.0], "non-integer index 10.5 in event 0"),
    ("EFlowTrack_PT", [1.0, float("nan")], "non-finite or negative value nan in event 0"),
    ("EFlowTrack_PT", [1.0, -2.0], "non-finite or negative value -2.0 in event 0"),
    ("EFlowTrack_Eta", [1, 340], "index 340 in event 0 is outside 0…339"),
    ("EFlowTrack_Phi", [1, -1], "index -1 in event 0 is outside 0…359"),
    ("EFlowTrack_Phi", [1], "event 0 has 1 values but 'EFlowTrack_Eta' has 2"),
])
def test_bad_rows(tmp_path: Path, name: str, row: list[float], message: str) -> None:
    cols = good_columns()
    cols[name][0] = row
    path = write_columns(tmp_path / "rows.h5", cols)
    with pytest.raises(DatasetFormatError, match=rf"rows\.h5: dataset '{name}': ") as info:
        read_everything(path)
    assert message in str(info.value)
    assert info.value.dataset == name
    assert info.value.path == str(path)
    with ReferenceFile(path) as f:  # the other event is still readable on its own
        assert len(f[1].pixels) == 1


def test_non_integer_index_in_mixed_file(tmp_path: Path) -> None:
    cols = good_columns()
    cols["EFlowTrack_Eta"][1] = [3.25]
    path = write_columns(tmp_path / "mix.h5", cols, float_indices=True)
    with pytest.raises(DatasetFormatError, match=r"non-integer index 3\.25 in event 1"):
        read_everything(path)


def test_native_baseline_extras_must_match_rows(tmp_path: Path) -> None:
    path = tmp_path / "n.h5"
    write_events(path, [Event(SparsePixels.empty(), pf=PFCandidates.empty())], format="jetssd")
    with h5py.File(path, "a") as f:
        f["Baseline_MSD"][0] = np.array([100.0], np.float32)
    with pytest.raises(DatasetFormatError, match=r"n\.h5: dataset 'Baseline_MSD': event 0 has 1 values but "
                       "'Baseline_Eta' has 0"), NativeFile(path) as nf:
        nf[0]
    with h5py.File(path, "a") as f:
        for name in ("Baseline_Eta", "Baseline_Phi"):
            f[name][0] = np.array([0.5], np.float32)
    with pytest.raises(DatasetFormatError, match=r"n\.h5: dataset 'Baseline_Eta': event 0 has 1 values but 0 "
                       "'baseline' rows"), NativeFile(path) as nf:
        nf[0]
    with h5py.File(path, "a") as f:
        for name in ("Baseline_Eta", "Baseline_Phi", "Baseline_MSD"):
            f[name][0] = np.zeros(0, np.float32)
        f["Process"][0] = 9
    with pytest.raises(DatasetFormatError, match="process index 9"), NativeFile(path) as nf:
        nf[0]


def test_error_survives_pickling() -> None:
    err = DatasetFormatError("f.h5: dataset 'labels': bad", path="f.h5", dataset="labels")
    clone = pickle.loads(pickle.dumps(err))
    assert str(clone) == str(err)
    assert clone.dataset == "labels"
    assert clone.path == "f.h5"


# -- writers ------------------------------------------------------------------------------------------


def some_events() -> list[Event]:
    pf = PFCandidates.from_arrays([10.0, 5.0], [0.1, -0.2], [0.3, 1.0], [0, 2])
    return [Event(SparsePixels.empty(), pf=pf)] * 3


def crash_while_writing(writer: EventWriter, path: Path) -> None:
    with writer as w:
        w.append(some_events())
        assert Path(str(path) + ".partial").exists()
        assert not path.exists()
        raise RuntimeError("generator died")


@pytest.mark.parametrize("make_writer", [
    lambda p: ReferenceWriter(p), lambda p: NativeWriter(p, {"seed": 1})])
def test_crash_inside_with_leaves_nothing(tmp_path: Path, make_writer: Callable[[Path], EventWriter]) -> None:
    path = tmp_path / "out.h5"
    with pytest.raises(RuntimeError, match="generator died"):
        crash_while_writing(make_writer(path), path)
    assert list(tmp_path.iterdir()) == []


def test_bad_event_inside_with_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no PF candidates"):
        write_events(tmp_path / "out.h5", [*some_events(), Event(SparsePixels.empty())], format="jetssd")
    assert list(tmp_path.iterdir()) == []


def test_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "out.h5"
    write_events(path, some_events())
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        ReferenceWriter(path)
    with pytest.raises(FileExistsError):
        write_events(path, some_events()[:1], format="jetssd")
    assert path.read_bytes() == before
    assert sorted(tmp_path.iterdir()) == [path]
    write_events(path, some_events()[:1], format="jetssd", overwrite=True)
    with open_events(path) as f:
        assert isinstance(f, NativeFile)
        assert len(f) == 1


def test_file_appearing_during_write_is_not_clobbered(tmp_path: Path) -> None:
    path = tmp_path / "out.h5"
    w = ReferenceWriter(path)
    w.append(some_events())
    path.write_text("someone else's")
    with pytest.raises(FileExistsError):
        w.close()
    assert path.read_text() == "someone else's"
    assert sorted(tmp_path.iterdir()) == [path]


def test_explicit_close_publishes_once(tmp_path: Path) -> None:
    path = tmp_path / "out.h5"
    w = NativeWriter(path, {})
    w.append(some_events())
    assert not path.exists()
    w.close()
    w.close()  # idempotent
    assert sorted(tmp_path.iterdir()) == [path]
    with pytest.raises(ValueError, match="closed"):
        w.append(some_events())
    with NativeFile(path) as f:
        assert len(f) == 3


def test_file_already_open_with_plain_h5py_can_be_read(tmp_path: Path) -> None:
    """HDF5 refuses a second open with another locking flag; the reader must cope, not call the file corrupt."""
    path = write_columns(tmp_path / "open.h5", good_columns())
    with h5py.File(path, "r"), open_events(path) as f:
        assert len(f) == len(good_columns()["labels"])
        read_everything(path)
