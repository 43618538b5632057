"""jetssd.io, our own "jetssd" format: superset of the reference layout, exact round trips, attributes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import h5py
import numpy as np
import pytest

from jetssd import geometry
from jetssd.event import BaselineJets, Event, PFCandidates, SparsePixels, TruthObjects
from jetssd.io import (
    PROCESS_NAMES,
    REFERENCE_DATASETS,
    DatasetFormatError,
    NativeFile,
    NativeWriter,
    ReferenceFile,
    open_events,
    write_events,
)
from jetssd.rasterize import rasterize_sparse


def make_event(rng: np.random.Generator, n_pf: int = 300, n_truth: int = 3, n_base: int = 3) -> Event:
    """Random event with every optional field set; some objects lie outside the η acceptance."""
    pf = PFCandidates.from_arrays(rng.exponential(3.0, n_pf), rng.uniform(-3.2, 3.2, n_pf),
                                  rng.uniform(-4.0, 4.0, n_pf), rng.integers(0, 3, n_pf))

    def truth(n: int) -> TruthObjects:
        return TruthObjects.from_arrays(rng.integers(0, 3, n), rng.uniform(-3.5, 3.5, n),
                                        rng.uniform(-math.pi, math.pi, n), rng.uniform(200, 900, n),
                                        rng.uniform(50, 200, n))

    baseline = BaselineJets.from_arrays(rng.integers(0, 3, n_base), rng.uniform(-3.5, 3.5, n_base),
                                        rng.uniform(-math.pi, math.pi, n_base), rng.uniform(200, 900, n_base),
                                        rng.uniform(0, 1, n_base), rng.uniform(60, 220, n_base))
    return Event(pixels=SparsePixels.empty(), truth=truth(n_truth), baseline=baseline, pf=pf,
                 truth_lastcopy=truth(n_truth + 1) if rng.random() < 0.7 else None,
                 process=str(rng.choice(["", *PROCESS_NAMES])), n_pileup=int(rng.integers(-1, 200)))


@pytest.fixture
def events() -> list[Event]:
    rng = np.random.default_rng(11)
    return [make_event(rng, n_truth=int(rng.integers(0, 4)), n_base=int(rng.integers(0, 4))) for _ in range(20)]


def assert_columns_equal(a: object, b: object, mask: np.ndarray | None = None) -> None:
    for name in a.__dataclass_fields__:  # type: ignore[attr-defined]
        want = getattr(b, name) if mask is None else getattr(b, name)[mask]
        got = getattr(a, name)
        assert got.dtype == want.dtype, name
        np.testing.assert_array_equal(got, want, err_msg=name)


SETTINGS = {"seed": 7, "pileup": 50, "processes": ["WW", "tt"], "sqrt_s_tev": 14.0}


def test_round_trip_is_exact(tmp_path: Path, events: list[Event]) -> None:
    path = tmp_path / "gen.h5"
    with NativeWriter(path, SETTINGS, attrs={"run": 3}) as w:
        w.append(events[:8])
        w.append(events[8:])
    with NativeFile(path) as f:
        assert len(f) == len(events)
        assert f.format == "jetssd"
        read = [e for chunk in f.iter_chunks(6) for e in chunk]
    for original, got in zip(events, read, strict=True):
        assert original.pf is not None
        assert got.pf is not None
        assert_columns_equal(got.pf, original.pf)
        assert_columns_equal(got.pixels, rasterize_sparse(original.pf))
        assert_columns_equal(got.truth, original.truth)  # continuous, all objects, mass included
        if original.truth_lastcopy is None:
            assert got.truth_lastcopy is None
        else:
            assert got.truth_lastcopy is not None
            assert_columns_equal(got.truth_lastcopy, original.truth_lastcopy)
        # Baseline jets outside the acceptance have no `baseline` row (as in the reference) and are dropped.
        assert_columns_equal(got.baseline, original.baseline, geometry.in_acceptance(original.baseline.eta))
        assert got.process == original.process
        assert got.n_pileup == original.n_pileup


def test_attributes_and_layout(tmp_path: Path, events: list[Event]) -> None:
    path = tmp_path / "gen.h5"
    write_events(path, events[:3], format="jetssd", generator_settings=SETTINGS, attrs={"comment": "test"})
    with h5py.File(path, "r") as f:
        assert f.attrs["format"] == "jetssd"
        assert f.attrs["format_version"] == 1
        assert json.loads(f.attrs["generator_settings"]) == SETTINGS
        assert list(f.attrs["process_names"]) == ["WW", "ZZ", "HH", "tt", "QCD"]
        assert f.attrs["comment"] == "test"
        assert set(REFERENCE_DATASETS) <= set(f.keys())
        vlen = {"PF_PT": np.float32, "PF_Eta": np.float32, "PF_Phi": np.float32, "PF_Kind": np.int8,
                "Truth_Class": np.int8, "TruthLastCopy_Class": np.int8, "Baseline_MSD": np.float32,
                **{f"{p}_{c}": np.float32 for p in ("Truth", "TruthLastCopy") for c in ("Eta", "Phi", "PT", "Mass")},
                "Baseline_Eta": np.float32, "Baseline_Phi": np.float32, "EFlowTrack_Eta": np.int16}
        for name, dtype in vlen.items():
            assert h5py.check_vlen_dtype(f[name].dtype) == np.dtype(dtype), name
            assert f[name].shape == (3,)
        assert f["Process"].dtype == np.int8
        assert f["NPileup"].dtype == np.int16
        assert f["Process"].shape == f["NPileup"].shape == (3,)
    with open_events(path) as f:
        assert isinstance(f, NativeFile)
        assert f.generator_settings == SETTINGS
        assert f.process_names == PROCESS_NAMES
        assert f.attrs["comment"] == "test"
        assert f.attrs["format_version"] == 1


def test_reference_reader_reads_native_files(tmp_path: Path, events: list[Event]) -> None:
    path = tmp_path / "gen.h5"
    write_events(path, events, format="jetssd")
    with ReferenceFile(path) as ref, NativeFile(path) as nat:
        assert ref.format == "reference"
        assert len(ref) == len(nat)
        for k in range(len(ref)):
            r, n = ref[k], nat[k]
            assert r.pf is None
            assert_columns_equal(r.pixels, n.pixels)
            inside = geometry.in_acceptance(n.truth.eta)
            np.testing.assert_array_equal(geometry.eta_to_index(r.truth.eta),
                                          geometry.eta_to_index(n.truth.eta[inside]))
            np.testing.assert_array_equal(geometry.phi_to_index(r.truth.phi),
                                          geometry.phi_to_index(n.truth.phi[inside]))
            np.testing.assert_array_equal(r.baseline.tau_ratio, n.baseline.tau_ratio)


def test_random_access_equals_chunks_and_pixels_fast_path(tmp_path: Path, events: list[Event]) -> None:
    path = tmp_path / "gen.h5"
    write_events(path, events, format="jetssd")
    with NativeFile(path) as f:
        streamed = next(f.iter_chunks(100, start=-5))
        assert len(streamed) == 5
        for k, e in enumerate(streamed, start=len(events) - 5):
            direct = f[k]
            assert direct.pf is not None
            assert e.pf is not None
            assert_columns_equal(direct.pf, e.pf)
            assert_columns_equal(direct.pixels, e.pixels)
            assert_columns_equal(f.read_pixels(k), e.pixels)
            assert direct.process == e.process


def test_empty_events(tmp_path: Path) -> None:
    empty = Event(SparsePixels.empty(), pf=PFCandidates.empty())
    outside = Event(SparsePixels.empty(), pf=PFCandidates.from_arrays([5.0], [4.0], [0.0], [0]),
                    truth=TruthObjects.from_arrays([0], [3.0], [0.0], [500.0], [170.0]),
                    baseline=BaselineJets.from_arrays([0], [3.0], [0.0], [480.0], [0.4], [168.0]))
    path = tmp_path / "e.h5"
    write_events(path, [empty, empty, outside], format="jetssd")
    with NativeFile(path) as f:
        a, _, c = next(f.iter_chunks())
    assert len(a.pixels) == len(a.truth) == len(a.baseline) == 0
    assert a.pf is not None
    assert len(a.pf) == 0
    assert a.truth_lastcopy is None
    assert a.process == ""
    assert a.n_pileup == -1
    assert c.pf is not None
    assert len(c.pf) == 1
    assert len(c.pixels) == 0
    assert len(c.truth) == 1
    assert c.truth.eta[0] == np.float32(3.0)
    assert len(c.baseline) == 0


def test_writer_validation(tmp_path: Path) -> None:
    path = tmp_path / "v.h5"
    good = Event(SparsePixels.empty(), pf=PFCandidates.empty())
    with NativeWriter(path, {}) as w:
        w.append([good])
        with pytest.raises(ValueError, match="event 1: no PF candidates"):
            w.append([Event(SparsePixels.empty())])
        with pytest.raises(ValueError, match="unknown process"):
            w.append([Event(SparsePixels.empty(), pf=PFCandidates.empty(), process="bb")])
        with pytest.raises(ValueError, match="n_pileup"):
            w.append([Event(SparsePixels.empty(), pf=PFCandidates.empty(), n_pileup=70000)])
        z = np.zeros(1, np.float32)
        raw_pf = PFCandidates(z + np.nan, z, z, np.zeros(1, np.int8))  # bypasses from_arrays' validation
        with pytest.raises(ValueError, match="NaN"):
            w.append([Event(SparsePixels.empty(), pf=raw_pf)])
        w.append([good])
    with NativeFile(path) as f:
        assert len(f) == 2
    with pytest.raises(TypeError):
        NativeWriter(tmp_path / "t.h5", {"bad": object()})
    with pytest.raises(ValueError, match="may not set"):
        NativeWriter(tmp_path / "t.h5", {}, attrs={"format_version": 2})
    assert list(tmp_path.iterdir()) == [path]


def test_native_reader_rejects_other_files(tmp_path: Path, events: list[Event]) -> None:
    ref = tmp_path / "ref.h5"
    write_events(ref, events[:2])
    with pytest.raises(DatasetFormatError, match=r"ref\.h5.*not a jetssd-format file"):
        NativeFile(ref)
    newer = tmp_path / "newer.h5"
    write_events(newer, events[:2], format="jetssd")
    with h5py.File(newer, "a") as f:
        f.attrs["format_version"] = 2
    with pytest.raises(DatasetFormatError, match=r"newer\.h5.*format_version 2"):
        open_events(newer)
