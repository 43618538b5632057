"""The evaluation run behind ``jetssd evaluate``: detectors + event files → ``report.json`` and PNG plots.

Typical use::

    from jetssd.evaluate.report import evaluate
    report = evaluate({"fpn": detector}, [Path("test.h5")], Path("report/"))
    report["ap"]["voc"]                          # single model: the issue's top-level keys
    report["models"]["fpn"]["per_class"]["H"]["p_at_r30"]
    report["baseline"]                           # the physics baseline on the same events, or None

What happens, per chunk of events (never the whole file in memory):

1. every detector runs on the chunk's pixels (:class:`Detector`, e.g. ``jetssd.inference.OnnxDetector``);
2. its predictions and the event's baseline jets (:func:`~jetssd.evaluate.matching.baseline_as_predictions`)
   are matched to the truth with the one matcher of :mod:`jetssd.evaluate.matching` and accumulated in
   :class:`~jetssd.evaluate.matching.DetectionRecords`;
3. background events (see below) also keep every detection's score, for the fake rate at score ≥
   ``qcd_threshold`` and the signal recall at a fixed QCD rate
   (:func:`~jetssd.evaluate.metrics.recall_at_fake_rate`: ``recall_at_qcd_rate`` in each model's summary).

At the end :func:`~jetssd.evaluate.metrics.summarize` gives AP (reference 11-point, VOC, COCO), P@R = 0.3 /
0.5 and truth counts per class, and :mod:`jetssd.evaluate.plots` draws the PR curves, the precision versus
η/φ/pT and the residuals.

Truth: ``"labels"`` is ``Event.truth`` (what the models are trained on, the ``labels`` of the reference
layout); ``"lastcopy"`` is ``Event.truth_lastcopy``, which only our format carries. Truth objects outside
the image's η acceptance are dropped, as the reference layout and the training targets drop them: no
detector can find them.

Background events: an event whose process is ``"QCD"`` (our format records it). Where the process is
unknown (every reference-layout event), an event without truth objects is taken as background-only and
counted in ``no_truth_events`` as well, so a reader can tell an inferred background from a known one.
Background events stay in the AP sample too (their detections are false positives there), as they
would in a real mixed sample.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
from numpy.typing import NDArray

from jetssd import geometry
from jetssd.atomic import write_bytes_atomic
from jetssd.evaluate.matching import (
    DEFAULT_MAX_DR,
    DetectionRecords,
    JetsLike,
    baseline_as_predictions,
    match_event,
)
from jetssd.evaluate.metrics import recall_at_fake_rate, summarize
from jetssd.event import Event, SparsePixels, TruthObjects
from jetssd.io import open_events
from jetssd.strict_json import write_json_atomic

BASELINE_NAME = "baseline"
"""Key of the physics baseline in the plots' legends (a detector may not use it)."""
QCD_PROCESS = "QCD"
READ_CHUNK_EVENTS = 512
"""Events read from a file at a time (at least ``batch_size``): one HDF5 read per dataset per chunk, a few
MB of sparse pixels, while the detector densifies only ``batch_size`` images at once."""
PLOT_FILES = {"pr_curves": "pr_curves.png", "precision_vs": "precision_vs.png", "residuals": "residuals.png"}
REPORT_FILE = "report.json"

TruthChoice = Literal["labels", "lastcopy"]


class Detector(Protocol):
    """Anything that turns event images into per-event predictions (``jetssd.inference.OnnxDetector``)."""

    def detect_pixels(self, pixels: Sequence[SparsePixels], batch_size: int = 16) -> Sequence[JetsLike]:
        """One :class:`~jetssd.evaluate.matching.JetsLike` (label/score/eta/phi/pt) per input event."""
        ...


@dataclass(eq=False)
class _Source:
    """Everything accumulated for one model or the baseline."""

    records: DetectionRecords
    background_events: int = 0
    background_scores: list[NDArray[np.float64]] = field(default_factory=list)
    """Scores of every detection on background events: the fake rate at the QCD threshold and the recall at a
    fixed QCD rate both come from them."""

    def add(self, truth: TruthObjects, pred: JetsLike, *, background: bool, max_dr: float) -> None:
        self.records.add(truth, pred, match_event(truth, pred, max_dr))
        if background:
            self.background_events += 1
            self.background_scores.append(np.asarray(pred.score, np.float64))

    def summary(self, threshold: float) -> dict[str, Any]:
        """summarize(records) plus the QCD fake rate at score ≥ ``threshold`` (None without background events)."""
        out = summarize(self.records)
        n = self.background_events
        scores = np.concatenate(self.background_scores) if self.background_scores else np.zeros(0)
        detections = int(np.count_nonzero(scores >= threshold))
        out["qcd_fake_rate_per_event"] = detections / n if n else None
        out["qcd_events"] = n
        out["qcd_detections"] = detections
        out["recall_at_qcd_rate"] = recall_at_fake_rate(self.records, scores, n)
        return out


@dataclass(eq=False)
class _Run:
    """State of one evaluation: the per-source accumulators and the event bookkeeping."""

    models: dict[str, _Source]
    baseline: _Source
    max_dr: float
    threshold: float
    events: int = 0
    qcd_events: int = 0
    no_truth_events: int = 0
    baseline_rows: int = 0
    truth_outside_acceptance: int = 0
    file_events: list[int] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------------
# Public entry point


def evaluate(detectors: Mapping[str, Detector], files: Sequence[str | os.PathLike[str]],
             report_dir: str | os.PathLike[str], *, max_events: int = 0, batch_size: int = 32,
             truth: TruthChoice = "labels", max_dr: float = DEFAULT_MAX_DR, qcd_threshold: float = 0.5,
             plots: bool = True, progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Run every detector on the events of ``files``, match to the truth, write ``report.json`` and plots.

    Args:
        detectors: ``{model name: detector}``; insertion order is the legend order. May be empty (then
            only the baseline is evaluated). The name ``"baseline"`` is reserved.
        files: event files, reference layout or ours (mixed freely), read in order.
        report_dir: created if needed; receives ``report.json``, ``pr_curves.png``, ``precision_vs.png``
            and ``residuals.png`` (each written to a temporary file and renamed, so a reader never sees a
            half-written one).
        max_events: stop after this many events over all files (0: all).
        batch_size: images per detector call.
        truth: ``"labels"`` (``Event.truth``) or ``"lastcopy"`` (``Event.truth_lastcopy``; ValueError for a
            reference-layout file or an event without it).
        max_dr: matching radius in ΔR (see :data:`~jetssd.evaluate.matching.DEFAULT_MAX_DR`).
        qcd_threshold: score cut of the QCD false-positive rate.
        plots: draw the PNGs (about a second each); False writes only ``report.json``.
        progress: called as ``progress(events_done, events_total)`` after each chunk.

    Returns:
        The report (also written as strict JSON, NaN → null)::

            {"events", "files", "file_events", "truth", "max_dr", "qcd_threshold", "qcd_events",
             "no_truth_events", "truth_outside_acceptance", "notes": [...],
             "plots": {name: file name} ({} without plots),
             "models": {name: summarize(...) + {"qcd_fake_rate_per_event", "qcd_events", "qcd_detections",
                                                "ap_ratio_to_baseline"}},
             "baseline": summarize(...) + {"qcd_fake_rate_per_event", "qcd_events", "qcd_detections"} | None,
             # exactly one model: its "ap", "per_class", "qcd_fake_rate_per_event", "ap_ratio_to_baseline"
            }

    Raises:
        ValueError: bad arguments, ``truth="lastcopy"`` without last-copy truth, a detector returning the
            wrong number of events, or no events at all.
        jetssd.io.DatasetFormatError: a file that cannot be read.
    """
    _check_arguments(detectors, files, max_events, batch_size, truth, max_dr)
    paths = [Path(f) for f in files]
    plan = _plan(paths, max_events, truth)
    total = sum(n for _, n in plan)
    if total == 0:
        raise ValueError(f"no events to evaluate in {', '.join(map(str, paths))}")
    run = _Run(models={name: _Source(DetectionRecords(max_dr=max_dr)) for name in detectors},
               baseline=_Source(DetectionRecords(max_dr=max_dr)), max_dr=max_dr, threshold=qcd_threshold)
    for path, n in plan:
        run.file_events.append(n)
        start = 0
        for chunk in _chunks(path, n, max(batch_size, READ_CHUNK_EVENTS)):
            _process_chunk(run, detectors, chunk, (path, start), batch_size, truth)
            start += len(chunk)
            if progress is not None:
                progress(run.events, total)

    out_dir = Path(report_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = _build_report(run, paths, truth)
    report["plots"] = _write_plots(run, out_dir) if plots else {}
    write_json_atomic(out_dir / REPORT_FILE, report)
    return report


# ---------------------------------------------------------------------------------------------------------
# Reading


def _check_arguments(detectors: Mapping[str, Detector], files: Sequence[Any], max_events: int, batch_size: int,
                     truth: str, max_dr: float) -> None:
    """Fail before any file is read or any model runs."""
    if BASELINE_NAME in detectors:
        raise ValueError(f"model name {BASELINE_NAME!r} is reserved for the physics baseline")
    if not files:
        raise ValueError("no event files given")
    if max_events < 0:
        raise ValueError(f"max_events must be ≥ 0 (0 = all), got {max_events}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    if truth not in ("labels", "lastcopy"):
        raise ValueError(f"truth must be 'labels' or 'lastcopy', got {truth!r}")
    if not (math.isfinite(max_dr) and max_dr > 0):
        raise ValueError(f"max_dr must be a positive number, got {max_dr}")


def _plan(paths: Sequence[Path], max_events: int, truth: str) -> list[tuple[Path, int]]:
    """``(file, events to read from it)`` for every file, honouring ``max_events``.

    Opens every file first (cheap: metadata only), so a missing or foreign file, or a reference-layout
    file asked for last-copy truth, fails before hours of inference rather than after.
    """
    plan: list[tuple[Path, int]] = []
    left = max_events if max_events > 0 else None
    for path in paths:
        with open_events(path) as f:
            if truth == "lastcopy" and f.format != "jetssd":
                raise ValueError(f"{path}: truth='lastcopy' needs a jetssd-format file; the {f.format} layout "
                                 "stores only the labels (use truth='labels')")
            n = len(f) if left is None else min(len(f), left)
        plan.append((path, n))
        if left is not None:
            left -= n
    return plan


def _chunks(path: Path, n: int, chunk_size: int) -> Iterator[list[Event]]:
    """The first ``n`` events of ``path`` in lists of at most ``chunk_size``."""
    if n == 0:
        return
    with open_events(path) as f:
        yield from f.iter_chunks(chunk_size, 0, n)


def _truth_of(event: Event, truth: str, path: Path, index: int) -> tuple[TruthObjects, int]:
    """The event's truth objects in the chosen convention inside the η acceptance, and how many lay outside."""
    objects = event.truth
    if truth == "lastcopy":
        if event.truth_lastcopy is None:
            raise ValueError(f"{path}: event {index} has no last-copy truth (TruthLastCopy_Known = 0); "
                             "evaluate with truth='labels'")
        objects = event.truth_lastcopy
    # The reference layout and the training targets drop objects outside the image; so must the truth
    # here, or every model would carry the same unfindable false negatives.
    inside = geometry.in_acceptance(objects.eta)
    return objects.select(inside), int(len(inside) - np.count_nonzero(inside))


# ---------------------------------------------------------------------------------------------------------
# Matching


def _process_chunk(run: _Run, detectors: Mapping[str, Detector], chunk: Sequence[Event], where: tuple[Path, int],
                   batch_size: int, truth: str) -> None:
    """Run every detector on one chunk (starting at event ``where[1]`` of file ``where[0]``) and accumulate
    the models and the baseline."""
    path, start = where
    truths: list[TruthObjects] = []
    background: list[bool] = []
    for k, event in enumerate(chunk):
        t, outside = _truth_of(event, truth, path, start + k)
        run.truth_outside_acceptance += outside
        is_bkg, inferred = _is_background(event, t)
        truths.append(t)
        background.append(is_bkg)
        run.qcd_events += is_bkg
        run.no_truth_events += inferred

    pixels = [event.pixels for event in chunk]
    for name, detector in detectors.items():
        preds = detector.detect_pixels(pixels, batch_size=batch_size)
        if len(preds) != len(chunk):
            raise ValueError(f"detector {name!r} returned {len(preds)} results for {len(chunk)} events")
        for t, pred, bkg in zip(truths, preds, background, strict=True):
            run.models[name].add(t, pred, background=bkg, max_dr=run.max_dr)

    for event, t, bkg in zip(chunk, truths, background, strict=True):
        run.baseline_rows += len(event.baseline)
        run.baseline.add(t, baseline_as_predictions(event.baseline), background=bkg, max_dr=run.max_dr)
    run.events += len(chunk)


def _is_background(event: Event, truth: TruthObjects) -> tuple[bool, bool]:
    """``(background, inferred)``: QCD by its recorded process, or, with the process unknown (reference
    layout), by having no truth object; ``inferred`` marks the second case."""
    if event.process:
        return event.process == QCD_PROCESS, False
    inferred = len(truth) == 0
    return inferred, inferred


# ---------------------------------------------------------------------------------------------------------
# Report


def _json_number(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def _ap_ratio(model: Mapping[str, Any], baseline: Mapping[str, Any] | None) -> float | None:
    """Pooled VOC AP of a model over the baseline's; None when either is missing or the baseline's is 0."""
    if baseline is None:
        return None
    num, den = model["ap"]["voc"], baseline["ap"]["voc"]
    if num is None or den is None or den == 0:
        return None
    return _json_number(num / den)


def _build_report(run: _Run, paths: Sequence[Path], truth: str) -> dict[str, Any]:
    """The report dict (strict-JSON values only)."""
    notes: list[str] = []
    baseline: dict[str, Any] | None = run.baseline.summary(run.threshold)
    if run.baseline_rows == 0:
        baseline = None
        notes.append("no event carries baseline jets (files without the physics baseline): baseline is null")
    if run.qcd_events == 0:
        notes.append("no background (QCD or truth-less) events: the QCD fake rate is null")
    if run.no_truth_events:
        notes.append(f"{run.no_truth_events} event(s) of unknown process without truth objects were counted as "
                     "background (QCD) for the fake rate")

    models: dict[str, dict[str, Any]] = {}
    for name, source in run.models.items():
        summary = source.summary(run.threshold)
        summary["ap_ratio_to_baseline"] = _ap_ratio(summary, baseline)
        models[name] = summary

    report: dict[str, Any] = {
        "events": run.events,
        "files": [str(p) for p in paths],
        "file_events": list(run.file_events),
        "truth": truth,
        "max_dr": run.max_dr,
        "qcd_threshold": run.threshold,
        "qcd_events": run.qcd_events,
        "no_truth_events": run.no_truth_events,
        "truth_outside_acceptance": run.truth_outside_acceptance,
        "models": models,
        "baseline": baseline,
        "notes": notes,
    }
    if len(models) == 1:
        # The flat keys (report["ap"]["voc"]) for the common one-model run.
        only = next(iter(models.values()))
        for key in ("ap", "per_class", "qcd_fake_rate_per_event", "ap_ratio_to_baseline"):
            report[key] = only[key]
    return report


def _write_plots(run: _Run, out_dir: Path) -> dict[str, str]:
    """The three comparison plots (all models and the baseline, when there is one); returns name → file."""
    # Imported here: matplotlib is slow to import and not needed by callers that only want the numbers.
    from jetssd.evaluate import plots

    sources: dict[str, DetectionRecords] = {name: s.records for name, s in run.models.items()}
    if run.baseline_rows:
        sources[BASELINE_NAME] = run.baseline.records
    figures = {
        "pr_curves": plots.plot_pr_curves(sources),
        "precision_vs": plots.plot_precision_vs(sources),
        "residuals": plots.plot_residuals(sources),
    }
    for key, fig in figures.items():
        buffer = io.BytesIO()  # rendered in memory (~100 kB), so the file itself appears in one rename
        fig.savefig(buffer, format="png")
        write_bytes_atomic(out_dir / PLOT_FILES[key], buffer.getvalue())
    return dict(PLOT_FILES)
