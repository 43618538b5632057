"""jetssd.io, reference (Zenodo) layout: exact datasets, round trips, mixed float32 files, streaming, pickling."""

from __future__ import annotations

import math
import multiprocessing
import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest

from jetssd import geometry
from jetssd.event import BaselineJets, Event, PFCandidates, SparsePixels, TruthObjects
from jetssd.io import REFERENCE_DATASETS, ReferenceFile, ReferenceWriter, open_events, write_events
from jetssd.rasterize import rasterize_sparse

PIXELS = (("EFlowTrack_Eta", "EFlowTrack_Phi", "EFlowTrack_PT"),
          ("EFlowPhoton_Eta", "EFlowPhoton_Phi", "EFlowPhoton_ET"),
          ("EFlowNeutralHadron_Eta", "EFlowNeutralHadron_Phi", "EFlowNeutralHadron_ET"))


def make_event(rng: np.random.Generator, n_pf: int = 300, n_truth: int = 3, n_base: int = 3) -> Event:
    """Random event; η ranges reach past the acceptance so that some candidates/objects have no pixel."""
    pf = PFCandidates.from_arrays(rng.exponential(3.0, n_pf), rng.uniform(-3.2, 3.2, n_pf),
                                  rng.uniform(-4.0, 4.0, n_pf), rng.integers(0, 3, n_pf))
    truth = TruthObjects.from_arrays(rng.integers(0, 3, n_truth), rng.uniform(-3.5, 3.5, n_truth),
                                     rng.uniform(-math.pi, math.pi, n_truth), rng.uniform(200, 900, n_truth),
                                     rng.uniform(50, 200, n_truth))
    baseline = BaselineJets.from_arrays(rng.integers(0, 3, n_base), rng.uniform(-3.5, 3.5, n_base),
                                        rng.uniform(-math.pi, math.pi, n_base), rng.uniform(200, 900, n_base),
                                        rng.uniform(0, 1, n_base), rng.uniform(60, 220, n_base))
    return Event(pixels=rasterize_sparse(pf), truth=truth, baseline=baseline, pf=pf)


@pytest.fixture
def events() -> list[Event]:
    rng = np.random.default_rng(1)
    return [make_event(rng, n_truth=int(rng.integers(0, 4)), n_base=int(rng.integers(0, 4))) for _ in range(25)]


def assert_pixels_equal(a: SparsePixels, b: SparsePixels) -> None:
    assert a.channel.dtype == np.uint8
    assert a.ieta.dtype == np.int16
    assert a.iphi.dtype == np.int16
    assert a.value.dtype == np.float32
    np.testing.assert_array_equal(a.flat_index, b.flat_index)
    np.testing.assert_array_equal(a.value, b.value)


def assert_events_equal(a: Event, b: Event) -> None:
    assert_pixels_equal(a.pixels, b.pixels)
    for x, y in ((a.truth, b.truth), (a.baseline, b.baseline)):
        for name in x.__dataclass_fields__:
            np.testing.assert_array_equal(getattr(x, name), getattr(y, name))


def test_round_trip(tmp_path: Path, events: list[Event]) -> None:
    path = tmp_path / "ref.h5"
    assert write_events(path, events) == len(events)
    with ReferenceFile(path) as f:
        assert len(f) == len(events)
        assert f.format == "reference"
        read_all = [e for chunk in f.iter_chunks(10) for e in chunk]
    assert len(read_all) == len(events)
    for original, read in zip(events, read_all, strict=True):
        assert read.pf is None
        assert read.truth_lastcopy is None
        assert read.process == ""
        assert read.n_pileup == -1
        assert original.pf is not None
        assert_pixels_equal(read.pixels, rasterize_sparse(original.pf))
        # Truth: only objects inside the η acceptance, at the centre of their pixel, mass unknown.
        inside = geometry.in_acceptance(original.truth.eta)
        np.testing.assert_array_equal(read.truth.cls, original.truth.cls[inside])
        np.testing.assert_array_equal(geometry.eta_to_index(read.truth.eta),
                                      geometry.eta_to_index(original.truth.eta[inside]))
        np.testing.assert_array_equal(geometry.phi_to_index(read.truth.phi),
                                      geometry.phi_to_index(original.truth.phi[inside]))
        np.testing.assert_array_equal(read.truth.eta, geometry.index_to_eta(geometry.eta_to_index(read.truth.eta))
                                      .astype(np.float32))
        np.testing.assert_array_equal(read.truth.pt, original.truth.pt[inside])
        assert np.all(np.isnan(read.truth.mass))
        inside = geometry.in_acceptance(original.baseline.eta)
        np.testing.assert_array_equal(read.baseline.cls, original.baseline.cls[inside])
        np.testing.assert_array_equal(geometry.eta_to_index(read.baseline.eta),
                                      geometry.eta_to_index(original.baseline.eta[inside]))
        np.testing.assert_array_equal(read.baseline.pt, original.baseline.pt[inside])
        np.testing.assert_array_equal(read.baseline.tau_ratio, original.baseline.tau_ratio[inside])
        assert np.all(np.isnan(read.baseline.msd))


def test_exact_reference_layout(tmp_path: Path) -> None:
    """Dataset names, shapes and vlen dtypes as the reference's hdf5-generator.py writes them (§1.2)."""
    truth = TruthObjects.from_arrays([2, 0, 1], [0.01, 5.0, -2.9], [-3.14, 0.5, 3.1], [450.5, 300.0, 250.25])
    baseline = BaselineJets.from_arrays([1], [0.3], [1.0], [410.0], [0.25])
    pixels = SparsePixels.from_arrays([0, 0, 0, 2], [5, 5, 7, 339], [9, 3, 0, 359], [1.5, 2.5, 3.0, 4.0])
    path = tmp_path / "ref.h5"
    with ReferenceWriter(path) as w:
        w.append([Event(pixels, truth, baseline), Event(SparsePixels.empty())])
    expected = {"labels": np.float32, "baseline": np.float32,
                **{n: np.int16 for grp in PIXELS for n in grp[:2]}, **{grp[2]: np.float32 for grp in PIXELS}}
    with h5py.File(path, "r") as f:
        assert set(f.keys()) == set(REFERENCE_DATASETS) == set(expected)
        assert dict(f.attrs) == {"labels_truth": "status22"}
        for name, dtype in expected.items():
            assert f[name].shape == (2,)
            assert h5py.check_vlen_dtype(f[name].dtype) == np.dtype(dtype), name
        ieta, iphi = geometry.eta_to_index([0.01, -2.9]), geometry.phi_to_index([-3.14, 3.1])
        np.testing.assert_array_equal(f["labels"][0], np.array(
            [2, ieta[0], iphi[0], 450.5, 1, ieta[1], iphi[1], 250.25], np.float32))  # η = 5 skipped
        np.testing.assert_array_equal(f["baseline"][0], np.array(
            [1, geometry.eta_to_index(0.3), geometry.phi_to_index(1.0), 410.0, 0.25], np.float32))
        # Row-major (η then φ) within each channel.
        np.testing.assert_array_equal(f["EFlowTrack_Eta"][0], [5, 5, 7])
        np.testing.assert_array_equal(f["EFlowTrack_Phi"][0], [3, 9, 0])
        np.testing.assert_array_equal(f["EFlowTrack_PT"][0], np.array([2.5, 1.5, 3.0], np.float32))
        assert len(f["EFlowPhoton_Eta"][0]) == 0
        np.testing.assert_array_equal(f["EFlowNeutralHadron_Eta"][0], [339])
        assert all(len(f[name][1]) == 0 for name in expected)


def test_pf_overrides_pixels(tmp_path: Path) -> None:
    """With PF candidates the writer rasterizes them itself; stale event.pixels are ignored."""
    rng = np.random.default_rng(2)
    event = make_event(rng)
    assert event.pf is not None
    event.pixels = SparsePixels.from_arrays([1], [1], [1], [99.0])
    write_events(tmp_path / "a.h5", [event])
    with ReferenceFile(tmp_path / "a.h5") as f:
        assert_pixels_equal(f.read_pixels(0), rasterize_sparse(event.pf))


def write_by_hand(path: Path, columns: dict[str, list[list[float]]], dtypes: dict[str, type]) -> None:
    with h5py.File(path, "w") as f:
        for name, rows in columns.items():
            dt = dtypes.get(name, np.float32)
            ds = f.create_dataset(name, (len(rows),), dtype=h5py.vlen_dtype(dt))
            for k, row in enumerate(rows):
                ds[k] = np.asarray(row, dt)


def test_mixed_float32_file(tmp_path: Path) -> None:
    """§1.3 files store every dataset (indices too) as vlen float32; indices come back as integers.

    Also: the reference's argmax(edges ≥ v) − 1 gives −1 for φ = −π exactly; that belongs to bin 0.
    """
    cols: dict[str, list[list[float]]] = {
        "labels": [[0, 170, 180, 500.5, 2, 3, -1, 300.0], []],
        "baseline": [[1, 10, 20, 420.0, 0.3], []],
        "EFlowTrack_Eta": [[1, 1, 339], [0]], "EFlowTrack_Phi": [[2, 7, 0], [359]],
        "EFlowTrack_PT": [[1.0, 2.0, 3.0], [4.5]],
        "EFlowPhoton_Eta": [[], [12]], "EFlowPhoton_Phi": [[], [13]], "EFlowPhoton_ET": [[], [0.5]],
        "EFlowNeutralHadron_Eta": [[100], []], "EFlowNeutralHadron_Phi": [[200], []],
        "EFlowNeutralHadron_ET": [[7.25], []],
    }
    path = tmp_path / "train0.h5"
    write_by_hand(path, cols, {})
    with open_events(path) as f:
        assert isinstance(f, ReferenceFile)
        assert len(f) == 2
        e0, e1 = f[0], f[-1]
    np.testing.assert_array_equal(e0.pixels.channel, [0, 0, 0, 2])
    np.testing.assert_array_equal(e0.pixels.ieta, [1, 1, 339, 100])
    np.testing.assert_array_equal(e0.pixels.iphi, [2, 7, 0, 200])
    np.testing.assert_array_equal(e0.pixels.value, np.array([1, 2, 3, 7.25], np.float32))
    np.testing.assert_array_equal(e1.pixels.flat_index, [359, (1 * 340 + 12) * 360 + 13])
    np.testing.assert_array_equal(e0.truth.cls, [0, 2])
    np.testing.assert_array_equal(e0.truth.eta, geometry.index_to_eta([170, 3]).astype(np.float32))
    np.testing.assert_array_equal(e0.truth.phi, geometry.index_to_phi([180, 0]).astype(np.float32))
    np.testing.assert_array_equal(e0.truth.pt, np.array([500.5, 300.0], np.float32))
    np.testing.assert_array_equal(e0.baseline.cls, [1])
    np.testing.assert_array_equal(e0.baseline.tau_ratio, np.array([0.3], np.float32))
    assert len(e1.truth) == 0
    assert len(e1.baseline) == 0


def test_foreign_unsorted_pixels_are_canonicalised(tmp_path: Path) -> None:
    """A file from another tool with unsorted / duplicate pixels still gives canonical SparsePixels."""
    cols: dict[str, list[list[float]]] = {name: [[]] for name in REFERENCE_DATASETS}
    cols.update({"EFlowTrack_Eta": [[5, 1, 5]], "EFlowTrack_Phi": [[3, 2, 3]], "EFlowTrack_PT": [[1.0, 2.0, 0.5]]})
    write_by_hand(tmp_path / "x.h5", cols, {n: np.int16 for grp in PIXELS for n in grp[:2]})
    with ReferenceFile(tmp_path / "x.h5") as f:
        pixels = f.read_pixels(0)
    assert_pixels_equal(pixels, SparsePixels.from_arrays([0, 0], [1, 5], [2, 3], [2.0, 1.5]))


def test_empty_events_and_empty_file(tmp_path: Path) -> None:
    # Every event equally empty: the case where h5py's high-level vlen write builds a 2-D array.
    empty = [Event(SparsePixels.empty()) for _ in range(3)]
    write_events(tmp_path / "e.h5", empty)
    with ReferenceFile(tmp_path / "e.h5") as f:
        assert len(f) == 3
        for e in [*f.iter_chunks(2).__next__(), f[2]]:
            assert len(e.pixels) == len(e.truth) == len(e.baseline) == 0
    write_events(tmp_path / "none.h5", [])
    with open_events(tmp_path / "none.h5") as f:
        assert len(f) == 0
        assert list(f.iter_chunks()) == []
        with pytest.raises(IndexError):
            f[0]


def test_same_length_rows_round_trip(tmp_path: Path) -> None:
    """All events with exactly one truth object: equal-length vlen rows must stay 1-D per event."""
    rng = np.random.default_rng(3)
    evs = [make_event(rng, n_truth=1, n_base=1) for _ in range(4)]
    for e in evs:
        e.truth = TruthObjects.from_arrays([1], [0.5], [0.5], [300.0])
    write_events(tmp_path / "s.h5", evs)
    with ReferenceFile(tmp_path / "s.h5") as f:
        assert all(len(e.truth) == 1 for e in f.iter_chunks(10).__next__())


def test_chunks_equal_random_access(tmp_path: Path, events: list[Event]) -> None:
    path = tmp_path / "c.h5"
    with ReferenceWriter(path, attrs={"note": "three appends"}) as w:
        for a, b in ((0, 10), (10, 11), (11, 25)):
            w.append(events[a:b])
        assert len(w) == 25
    with ReferenceFile(path) as f:
        assert f.attrs == {"note": "three appends", "labels_truth": "status22"}
        chunks = list(f.iter_chunks(chunk_size=7, start=3, stop=-2))
        assert [len(c) for c in chunks] == [7, 7, 6]
        streamed = [e for c in chunks for e in c]
        for k, e in enumerate(streamed, start=3):
            assert_events_equal(e, f[k])
            assert_pixels_equal(f.read_pixels(k), e.pixels)
        assert_events_equal(f[-1], f[24])
        assert_events_equal(f[np.int64(4)], streamed[1])
        with pytest.raises(IndexError):
            f[25]
        with pytest.raises(IndexError):
            f[-26]
        with pytest.raises(ValueError, match="chunk_size"):
            list(f.iter_chunks(0))
        assert list(f.iter_chunks(5, start=30)) == []


def _pixels_in_child(f: ReferenceFile) -> int:
    return len(f.read_pixels(1))


def test_reader_is_picklable_and_fork_safe(tmp_path: Path, events: list[Event]) -> None:
    path = tmp_path / "p.h5"
    write_events(path, events)
    f = ReferenceFile(path)
    expected = len(f.read_pixels(1))
    clone = pickle.loads(pickle.dumps(f))
    assert clone._file is None  # no handle travels; the clone opens its own on first use
    assert len(clone.read_pixels(1)) == expected
    # A forked child (DataLoader workers on Linux) must open its own handle rather than reuse the parent's.
    with multiprocessing.get_context("fork").Pool(1) as pool:
        assert pool.apply(_pixels_in_child, (f,)) == expected
    f.close()
    assert len(f.read_pixels(1)) == expected  # a closed reader re-opens lazily
    f.close()
    clone.close()


def test_reference_writer_rejects_bad_events_without_writing(tmp_path: Path) -> None:
    bad_pixels = SparsePixels(np.array([0], np.uint8), np.array([400], np.int16), np.array([0], np.int16),
                              np.array([1.0], np.float32))
    path = tmp_path / "w.h5"
    with ReferenceWriter(path) as w:
        w.append([Event(SparsePixels.empty())])
        with pytest.raises(ValueError, match="event 2"):
            w.append([Event(SparsePixels.empty()), Event(bad_pixels)])
        nan_pixels = SparsePixels(np.array([0], np.uint8), np.array([4], np.int16), np.array([0], np.int16),
                                  np.array([np.nan], np.float32))
        with pytest.raises(ValueError, match="finite"):
            w.append([Event(nan_pixels)])
        assert len(w) == 1  # nothing of the rejected batches was written
    with ReferenceFile(path) as f:
        assert len(f) == 1
    write_events(tmp_path / "x.h5", [], generator_settings={"seed": 1}, attrs={"run": 2})
    with ReferenceFile(tmp_path / "x.h5") as f:
        assert f.attrs == {"generator_settings": '{"seed": 1}', "run": 2, "labels_truth": "status22"}
    with pytest.raises(ValueError, match="may not set"):
        ReferenceWriter(tmp_path / "y.h5", attrs={"format": "jetssd"})
    assert not (tmp_path / "y.h5").exists()
    assert not (tmp_path / "y.h5.partial").exists()


def test_labels_follow_the_chosen_truth_convention(tmp_path: Path) -> None:
    status22 = TruthObjects.from_arrays([0, 1], [0.5, 0.6], [1.0, 1.1], [900.0, 400.0])
    lastcopy = TruthObjects.from_arrays([0], [0.7], [1.3], [850.0])
    event = Event(SparsePixels.empty(), truth=status22, truth_lastcopy=lastcopy)
    for labels, expected in (("status22", status22), ("lastcopy", lastcopy)):
        path = tmp_path / f"{labels}.h5"
        with ReferenceWriter(path, labels=labels) as w:
            w.append([event])
        with ReferenceFile(path) as f:
            assert f.attrs["labels_truth"] == labels
            np.testing.assert_array_equal(f[0].truth.cls, expected.cls)
            np.testing.assert_allclose(f[0].truth.pt, expected.pt)
    writer = ReferenceWriter(tmp_path / "n.h5", labels="lastcopy")
    with pytest.raises(ValueError, match="no last-copy truth"), writer as w:
        w.append([Event(SparsePixels.empty(), truth=status22)])
    assert not (tmp_path / "n.h5").exists()
    with pytest.raises(ValueError, match="labels must be"):
        ReferenceWriter(tmp_path / "b.h5", labels="first")
