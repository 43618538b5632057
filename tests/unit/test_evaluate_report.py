"""Tests of jetssd.evaluate.report: the ``jetssd evaluate`` run on small synthetic files (no Pythia, no model).

Each event carries one marker pixel whose value is its id + 1, so a fake detector can tell which event an
image came from and answer with that event's truth (perfect), with shifted copies, or with added fakes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from jetssd import geometry
from jetssd.evaluate.matching import PredictedJets
from jetssd.evaluate.report import PLOT_FILES, REPORT_FILE, Detector, evaluate
from jetssd.event import BaselineJets, Event, PFCandidates, SparsePixels, TruthObjects
from jetssd.io import open_events, write_events
from jetssd.strict_json import write_json_atomic

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NATIVE_ID0 = 100
"""Ids of the events of the jetssd-format file start here (the reference file's at 0)."""


# Synthetic files --------------------------------------------------------------------------------------

def objects(rows: list[tuple[int, float, float, float]]) -> TruthObjects:
    """Truth objects from (cls, eta, phi, pt) rows."""
    if not rows:
        return TruthObjects.empty()
    c, e, p, t = zip(*rows, strict=True)
    return TruthObjects.from_arrays(list(c), list(e), list(p), list(t))


def jets(rows: list[tuple[int, float, float, float, float]]) -> BaselineJets:
    """Baseline jets from (cls, eta, phi, pt, tau_ratio) rows."""
    if not rows:
        return BaselineJets.empty()
    c, e, p, t, r = zip(*rows, strict=True)
    return BaselineJets.from_arrays(list(c), list(e), list(p), list(t), list(r))


def marker_pixels(event_id: int) -> SparsePixels:
    return SparsePixels.from_arrays([0], [0], [0], [event_id + 1.0])


def marker_pf(event_id: int) -> PFCandidates:
    """One track on pixel (0, 0) with pT = id + 1: the jetssd writer rasterizes it into the marker pixel."""
    return PFCandidates.from_arrays([event_id + 1.0], [geometry.ETA_CENTERS[0]], [geometry.PHI_CENTERS[0]], [0])


def event_id(pixels: SparsePixels) -> int:
    return round(float(pixels.value.sum())) - 1


# Reference layout: 4 signal events (t 2, V 2, H 2) and 2 without truth; baseline jets on most.
REFERENCE_EVENTS = [
    ([(0, 0.5, 1.0, 500.0), (1, -1.0, -2.0, 400.0)], [(0, 0.5, 1.0, 480.0, 0.3), (1, -1.0, -2.0, 390.0, 0.4)]),
    ([(2, 1.2, 3.0, 600.0)], [(2, 1.2, 3.0, 610.0, 0.5), (0, -2.0, 0.0, 300.0, 0.2)]),
    ([(0, 0.0, 0.0, 700.0), (2, -2.0, -3.0, 350.0)], []),
    ([(1, 2.0, 2.5, 450.0)], [(1, 2.0, 2.5, 440.0, 0.6)]),
    ([], [(0, 0.3, 0.3, 250.0, 0.5)]),  # background by inference, with one baseline fake at score 0.5
    ([], []),
]
# jetssd format: process, truth, baseline. The V at η 3.2 lies outside the image and is dropped.
NATIVE_EVENTS = [
    ("tt", [(0, 0.1, 0.2, 800.0), (0, -0.5, 2.0, 650.0)], [(0, 0.1, 0.2, 790.0, 0.25)]),
    ("WW", [(1, 1.0, -1.0, 420.0), (1, 3.2, 0.0, 500.0)], []),
    ("HH", [(2, -1.5, 1.5, 900.0)], []),
    ("QCD", [], []),
    ("QCD", [], []),
    ("", [], []),  # unknown process without truth: background by inference
]
N_TRUTH = {"t": 4, "V": 3, "H": 3}
N_EVENTS = len(REFERENCE_EVENTS) + len(NATIVE_EVENTS)
N_BACKGROUND = 5  # 2 truth-less reference events + 2 QCD + 1 truth-less of unknown process
N_INFERRED = 3


def lastcopy_of(t: TruthObjects) -> TruthObjects:
    """A slightly different last-copy convention: same objects, η moved by 0.05."""
    return TruthObjects(t.cls, t.eta + np.float32(0.05), t.phi, t.pt, t.mass)


def reference_events(with_baseline: bool = True) -> list[Event]:
    return [Event(pixels=marker_pixels(i), truth=objects(t),
                  baseline=jets(b) if with_baseline else BaselineJets.empty())
            for i, (t, b) in enumerate(REFERENCE_EVENTS)]


def native_events(with_baseline: bool = True) -> list[Event]:
    out = []
    for k, (process, t, b) in enumerate(NATIVE_EVENTS):
        truth = objects(t)
        out.append(Event(pixels=SparsePixels.empty(), truth=truth, pf=marker_pf(NATIVE_ID0 + k),
                         baseline=jets(b) if with_baseline else BaselineJets.empty(),
                         truth_lastcopy=lastcopy_of(truth), process=process))
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("eval-data")
    paths = {"reference": d / "ref.h5", "native": d / "native.h5", "ref_nobase": d / "ref_nobase.h5",
             "native_nolastcopy": d / "native_nolastcopy.h5"}
    write_events(paths["reference"], reference_events(), "reference")
    write_events(paths["native"], native_events(), "jetssd")
    write_events(paths["ref_nobase"], reference_events(with_baseline=False), "reference")
    broken = native_events()
    broken[2].truth_lastcopy = None
    write_events(paths["native_nolastcopy"], broken, "jetssd")
    return paths


def truth_by_id(paths: Sequence[Path], lastcopy: bool = False) -> dict[int, TruthObjects]:
    """Every event's truth as read back from the files (reference: pixel centres), keyed by marker id."""
    out: dict[int, TruthObjects] = {}
    for path in paths:
        with open_events(path) as f:
            for chunk in f.iter_chunks(100):
                for ev in chunk:
                    t = ev.truth_lastcopy if lastcopy else ev.truth
                    assert t is not None
                    out[event_id(ev.pixels)] = t
    return out


# Fake detectors --------------------------------------------------------------------------------------

class FakeDetector:
    """Answers each image with its event's truth objects (score 0.9 − 0.01·j), optionally transformed.

    Args:
        truth: marker id → truth objects.
        shift_eta: added to every η (far enough and nothing matches).
        fakes: (score, cls) of extra detections put on every event at η −2.5, φ −3.0, where no truth is.
    """

    def __init__(self, truth: dict[int, TruthObjects], shift_eta: float = 0.0,
                 fakes: Sequence[tuple[float, int]] = ()) -> None:
        self.truth = truth
        self.shift_eta = shift_eta
        self.fakes = list(fakes)
        self.calls: list[tuple[int, int]] = []

    def detect_pixels(self, pixels: Sequence[SparsePixels], batch_size: int = 16) -> list[PredictedJets]:
        self.calls.append((len(pixels), batch_size))
        return [self._one(self.truth.get(event_id(p), TruthObjects.empty())) for p in pixels]

    def _one(self, t: TruthObjects) -> PredictedJets:
        t = t.select(geometry.in_acceptance(t.eta))  # a real detector sees nothing outside the image
        n = len(t)
        label = np.r_[t.cls.astype(np.int64), [c for _, c in self.fakes]].astype(np.int64)
        score = np.r_[0.9 - 0.01 * np.arange(n), [s for s, _ in self.fakes]]
        eta = np.r_[t.eta.astype(np.float64) + self.shift_eta, [-2.5] * len(self.fakes)]
        phi = np.r_[t.phi.astype(np.float64), [-3.0] * len(self.fakes)]
        pt = np.r_[t.pt.astype(np.float64) * 1.1, [100.0] * len(self.fakes)]
        return PredictedJets(label, score.astype(np.float64), eta, phi, pt.astype(np.float64))


def both(files: dict[str, Path]) -> list[Path]:
    return [files["reference"], files["native"]]


def strict_json(path: Path) -> dict[str, Any]:
    """report.json parsed with NaN/Infinity rejected (strict JSON)."""
    def no_constant(name: str) -> Any:
        raise AssertionError(f"non-strict JSON constant {name}")
    return json.loads(path.read_text(), parse_constant=no_constant)


# Tests ---------------------------------------------------------------------------------------------

def test_perfect_detector_on_both_layouts(files: dict[str, Path], tmp_path: Path) -> None:
    det = FakeDetector(truth_by_id(both(files)))
    detectors: dict[str, Detector] = {"perfect": det}
    report = evaluate(detectors, both(files), tmp_path / "out", batch_size=4, plots=False)
    assert strict_json(tmp_path / "out" / REPORT_FILE) == report

    assert report["events"] == N_EVENTS
    assert report["files"] == [str(p) for p in both(files)]
    assert report["file_events"] == [6, 6]
    assert report["truth"] == "labels"
    assert report["truth_outside_acceptance"] == 1
    model = report["models"]["perfect"]
    assert model["ap"]["voc"] == pytest.approx(1.0)
    assert model["ap"]["coco"] == pytest.approx(1.0)
    assert model["ap"]["reference"] is not None
    for name, n in N_TRUTH.items():
        pc = model["per_class"][name]
        assert pc["n_truth"] == n
        assert pc["ap_voc"] == pytest.approx(1.0)
        assert set(pc) >= {"ap_reference", "ap_voc", "p_at_r30", "p_at_r50", "n_truth"}
        assert pc["p_at_r30"] == pytest.approx(1.0)
    # The flat keys, from the only model.
    assert report["ap"] == model["ap"]
    assert report["ap"]["voc"] == pytest.approx(1.0)
    assert report["per_class"] == model["per_class"]
    assert model["qcd_events"] == N_BACKGROUND
    assert model["qcd_fake_rate_per_event"] == 0.0
    # The detector saw every event once, in chunks, with the batch size passed through.
    assert sum(n for n, _ in det.calls) == N_EVENTS
    assert {b for _, b in det.calls} == {4}


def test_baseline_on_the_same_events(files: dict[str, Path], tmp_path: Path) -> None:
    det = FakeDetector(truth_by_id(both(files)))
    report = evaluate({"perfect": det}, both(files), tmp_path, plots=False)
    base = report["baseline"]
    assert base is not None
    assert base["events"] == N_EVENTS
    assert {k: base["per_class"][k]["n_truth"] for k in N_TRUTH} == N_TRUTH
    assert set(base["per_class"]["t"]) >= {"ap_reference", "ap_voc", "p_at_r30", "p_at_r50", "n_truth"}
    # 7 baseline jets: 5 on truth objects (TP), the t at η −2 and the one on a truth-less event (FP).
    assert base["n_pred"] == 7
    assert base["per_class"]["t"]["n_pred"] == 4
    assert 0.0 < base["ap"]["voc"] < 1.0
    # Only the jet on the truth-less reference event (score 1 − 0.5 = 0.5 ≥ 0.5) is a QCD fake.
    assert base["qcd_events"] == N_BACKGROUND
    assert base["qcd_detections"] == 1
    assert base["qcd_fake_rate_per_event"] == pytest.approx(1 / N_BACKGROUND)
    ratio = report["models"]["perfect"]["ap_ratio_to_baseline"]
    assert ratio == pytest.approx(1.0 / base["ap"]["voc"])
    assert report["ap_ratio_to_baseline"] == ratio


def test_qcd_fake_rate_counts_background_events_only(files: dict[str, Path], tmp_path: Path) -> None:
    # Every event gets a fake at 0.7 and one at 0.3; only those on the 5 background events count.
    det = FakeDetector(truth_by_id(both(files)), fakes=[(0.7, 0), (0.3, 1)])
    report = evaluate({"noisy": det}, both(files), tmp_path / "a", plots=False)
    model = report["models"]["noisy"]
    assert report["qcd_events"] == N_BACKGROUND
    assert report["no_truth_events"] == N_INFERRED
    assert model["qcd_detections"] == N_BACKGROUND  # not N_EVENTS: signal events' fakes are not QCD fakes
    assert model["qcd_fake_rate_per_event"] == pytest.approx(1.0)
    # The fakes score below every true positive, so the AP stays perfect.
    assert model["ap"]["voc"] == pytest.approx(1.0)
    assert model["n_pred"] == 10 + 2 * N_EVENTS
    # 2 background detections per QCD event (0.7, 0.3): at ≤ 0.3 per event none may pass, so the cut sits
    # just above 0.7, under every true positive: the recall stays 1.
    at_rate = model["recall_at_qcd_rate"]["0.3"]
    assert at_rate["threshold"] == pytest.approx(0.7)
    assert at_rate["recall"] == 1.0

    low = evaluate({"noisy": det}, both(files), tmp_path / "b", qcd_threshold=0.2, plots=False)
    assert low["models"]["noisy"]["qcd_fake_rate_per_event"] == pytest.approx(2.0)

    # The jetssd file alone: 2 known QCD events + 1 truth-less of unknown process.
    native = evaluate({"noisy": det}, [files["native"]], tmp_path / "c", plots=False)
    assert (native["qcd_events"], native["no_truth_events"]) == (3, 1)


def test_shifted_and_several_models(files: dict[str, Path], tmp_path: Path) -> None:
    truth = truth_by_id(both(files))
    detectors: dict[str, Detector] = {"perfect": FakeDetector(truth), "shifted": FakeDetector(truth, shift_eta=1.0)}
    report = evaluate(detectors, both(files), tmp_path, plots=False)
    assert list(report["models"]) == ["perfect", "shifted"]
    shifted = report["models"]["shifted"]
    assert shifted["ap"]["voc"] == 0.0
    assert shifted["ap"]["coco"] == 0.0
    assert shifted["per_class"]["t"]["p_at_r30"] is None  # recall 0.3 never reached: NaN → null
    assert shifted["ap_ratio_to_baseline"] == 0.0
    # Several models: no flat top-level copy (which model would it be?).
    assert "ap" not in report
    assert "per_class" not in report


def test_plots_are_valid_pngs(files: dict[str, Path], tmp_path: Path) -> None:
    import matplotlib.image

    report = evaluate({"perfect": FakeDetector(truth_by_id(both(files)))}, both(files), tmp_path)
    assert report["plots"] == PLOT_FILES
    for name in PLOT_FILES.values():
        data = (tmp_path / name).read_bytes()
        assert data.startswith(PNG_MAGIC), name
        image = matplotlib.image.imread(tmp_path / name)
        assert image.ndim == 3
        assert image.shape[0] > 200
        assert image.shape[1] > 200
    # No temporary files left behind by the atomic writes.
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([REPORT_FILE, *PLOT_FILES.values()])


def test_lastcopy_truth(files: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"lastcopy.*jetssd-format"):
        evaluate({}, [files["native"], files["reference"]], tmp_path / "a", truth="lastcopy")
    assert not (tmp_path / "a").exists()  # refused before anything ran or was written

    paths = [files["native"]]
    on_lastcopy = FakeDetector(truth_by_id(paths, lastcopy=True))
    report = evaluate({"m": on_lastcopy}, paths, tmp_path / "b", truth="lastcopy", plots=False)
    assert report["truth"] == "lastcopy"
    assert report["ap"]["voc"] == pytest.approx(1.0)
    # Predictions on the labels are 0.05 in η away from the last copies: still inside ΔR 0.4, but not with
    # a tighter radius.
    on_labels = FakeDetector(truth_by_id(paths))
    tight = evaluate({"m": on_labels}, paths, tmp_path / "c", truth="lastcopy", max_dr=0.01, plots=False)
    assert tight["ap"]["voc"] == 0.0
    assert tight["max_dr"] == 0.01

    with pytest.raises(ValueError, match="event 2 has no last-copy truth"):
        evaluate({"m": on_labels}, [files["native_nolastcopy"]], tmp_path / "d", truth="lastcopy")


def test_max_events_across_files(files: dict[str, Path], tmp_path: Path) -> None:
    det = FakeDetector(truth_by_id(both(files)))
    seen: list[tuple[int, int]] = []
    report = evaluate({"m": det}, both(files), tmp_path / "a", max_events=8, plots=False,
                      progress=lambda d, t: seen.append((d, t)))
    assert report["events"] == 8
    assert report["file_events"] == [6, 2]
    assert sum(n for n, _ in det.calls) == 8
    assert seen[-1] == (8, 8)
    assert report["models"]["m"]["events"] == 8
    assert report["baseline"]["events"] == 8

    small = evaluate({"m": det}, both(files), tmp_path / "b", max_events=3, plots=False)
    assert small["file_events"] == [3, 0]
    assert small["per_class"]["t"]["n_truth"] == 2  # events 0–2 of the reference file


def test_no_baseline_is_null_with_a_note(files: dict[str, Path], tmp_path: Path) -> None:
    det = FakeDetector(truth_by_id([files["ref_nobase"]]))
    report = evaluate({"m": det}, [files["ref_nobase"]], tmp_path)
    assert report["baseline"] is None
    assert any("baseline" in note for note in report["notes"])
    assert report["ap_ratio_to_baseline"] is None
    assert strict_json(tmp_path / REPORT_FILE)["baseline"] is None
    assert (tmp_path / PLOT_FILES["pr_curves"]).exists()


def test_bad_arguments_and_bad_detectors(files: dict[str, Path], tmp_path: Path) -> None:
    det = FakeDetector({})
    bad: list[tuple[Callable[[], Any], str]] = [
        (lambda: evaluate({"baseline": det}, both(files), tmp_path), "reserved"),
        (lambda: evaluate({"m": det}, [], tmp_path), "no event files"),
        (lambda: evaluate({"m": det}, both(files), tmp_path, max_events=-1), "max_events"),
        (lambda: evaluate({"m": det}, both(files), tmp_path, batch_size=0), "batch_size"),
        (lambda: evaluate({"m": det}, both(files), tmp_path, truth="status22"), "truth"),  # type: ignore[arg-type]
        (lambda: evaluate({"m": det}, both(files), tmp_path, max_dr=math.nan), "max_dr"),
    ]
    for call, message in bad:
        with pytest.raises(ValueError, match=message):
            call()

    class Short(FakeDetector):
        def detect_pixels(self, pixels: Sequence[SparsePixels], batch_size: int = 16) -> list[PredictedJets]:
            return super().detect_pixels(pixels, batch_size)[:-1]

    with pytest.raises(ValueError, match="returned 5 results for 6 events"):
        evaluate({"short": Short({})}, [files["reference"]], tmp_path)


def test_write_json_atomic_is_strict(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    write_json_atomic(path, {"a": math.nan, "b": [np.float32(1.5), math.inf], "c": np.int64(3)})
    assert strict_json(path) == {"a": None, "b": [1.5, None], "c": 3}
    write_json_atomic(path, {"a": 1})  # replaces
    assert strict_json(path) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]
