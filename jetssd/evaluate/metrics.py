"""Precision-recall, three AP integrations, precision at fixed recall, per-class summaries, fake rate.

All functions work on one sample of predictions (``scores`` [n], ``tp`` [n]) plus the number of truth
objects ``n_truth`` of that sample, as produced by one matcher (:mod:`jetssd.evaluate.matching`); only
the integration of the precision-recall curve differs:

* :func:`ap_voc` — PASCAL VOC 2010+ "all-point": area under the precision envelope (max to the right).
* :func:`ap_coco` — COCO: the envelope sampled at recall 0, 0.01, …, 1 (101 points), as pycocotools.
* :func:`ap_reference` — the PF-Jet-SSD number (reference §6.3), reproduced quirks included, so our
  models can be compared with the paper's table. It is **not** an interpolated AP; see its docstring.

Ties: :func:`precision_recall` keeps one point per distinct score (like sklearn), because predictions
with equal scores cannot be separated by any threshold; VOC/COCO code that walks the sorted list one
prediction at a time gives an answer that depends on the order of tied predictions. Without ties the
two agree exactly.

n_truth = 0 (e.g. a class absent from a QCD sample): recall is undefined, every AP and P@R is NaN.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, cast

import numpy as np
from numpy.typing import ArrayLike, NDArray

from jetssd import geometry
from jetssd.evaluate.matching import DetectionRecords, JetsLike
from jetssd.event import CLASS_NAMES

COCO_RECALL_GRID: NDArray[np.float64] = np.linspace(0.0, 1.0, 101)
"""The 101 recall thresholds of pycocotools (``np.linspace(.0, 1.00, 101)``, same floats: k·0.01 is not
always the double nearest to k/100, and matching pycocotools bit for bit keeps ties at grid points equal)."""
REFERENCE_RECALLS = tuple(x / 10.0 for x in range(11))
"""The reference's 11 recall points, computed as it does (``x / 10.0``)."""
REFERENCE_TOLERANCE = 0.01
"""A recall point r is reachable in the reference if the maximum recall is ≥ r − 0.01."""


SEAM_WINDOW = 0.8
"""Half-width (rad) of the band around the image's φ = ±π edge scored by :func:`seam_sample`: an AK8 jet
(R = 0.8) whose axis is in it reaches across the edge, where circular and zero padding differ."""

FloatArray = NDArray[np.float64]


def _sample(scores: ArrayLike, tp: ArrayLike, n_truth: int) -> tuple[FloatArray, NDArray[np.bool_]]:
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    t = np.asarray(tp).astype(np.bool_).reshape(-1)
    if len(s) != len(t):
        raise ValueError(f"scores ({len(s)}) and tp ({len(t)}) differ in length")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    if n_truth < 0 or int(t.sum()) > n_truth:
        raise ValueError(f"{int(t.sum())} true positives but n_truth = {n_truth}")
    return s, t


def precision_recall(scores: ArrayLike, tp: ArrayLike, n_truth: int) -> tuple[FloatArray, FloatArray, FloatArray]:
    """The precision-recall curve of one sample, in descending score (ascending recall).

    Args:
        scores: float [n], prediction confidences.
        tp: bool [n], true positive flags from the matcher.
        n_truth: number of truth objects in the sample (TP + FN).

    Returns:
        ``(precision, recall, thresholds)``, each float64 [k] with k = number of distinct scores: point i
        counts every prediction with score ≥ thresholds[i]; recall = cumulative TP / n_truth (NaN if
        n_truth = 0). Empty arrays when there are no predictions.
    """
    s, t = _sample(scores, tp, n_truth)
    order = np.argsort(-s, kind="stable")
    s, t = s[order], t[order]
    # Last index of each run of equal scores: the operating points a threshold can actually select.
    last = np.r_[np.flatnonzero(np.diff(s) != 0), len(s) - 1] if len(s) else np.zeros(0, np.int64)
    tps = np.cumsum(t)[last].astype(np.float64)
    n_sel = (last + 1).astype(np.float64)
    precision = tps / n_sel
    recall = tps / n_truth if n_truth > 0 else np.full(len(tps), np.nan)
    return precision, recall, s[last]


def _envelope(precision: FloatArray) -> FloatArray:
    """Precision made monotone from the right: p̂(i) = max_{j ≥ i} p(j)."""
    return np.maximum.accumulate(precision[::-1])[::-1] if len(precision) else precision


def ap_voc(precision: ArrayLike, recall: ArrayLike) -> float:
    """VOC all-point AP: Σ Δrecall × envelope precision (VOC 2010+ devkit ``VOCap``).

    Args: the output of :func:`precision_recall` (ascending recall). Returns 0 for an empty curve and
    NaN if recall is NaN (no truth objects).
    """
    p = np.asarray(precision, dtype=np.float64)
    r = np.asarray(recall, dtype=np.float64)
    if np.isnan(r).any():
        return math.nan
    # Sentinels as in the devkit: recall 0 and 1, precision 0 at both ends.
    mrec = np.r_[0.0, r, 1.0]
    mpre = _envelope(np.r_[0.0, p, 0.0])
    step = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[step + 1] - mrec[step]) * mpre[step + 1]))


def ap_coco(precision: ArrayLike, recall: ArrayLike) -> float:
    """COCO 101-point AP: the mean of the envelope precision at recall 0, 0.01, …, 1.

    At each grid recall t the precision is the envelope at the first point with recall ≥ t
    (``searchsorted(recall, t, 'left')``); grid points beyond the maximum recall count 0 (pycocotools
    ``cocoeval.accumulate``, which also adds an ε = 2.2e-16 to the precision denominator: not repeated).
    Returns 0 for an empty curve and NaN if recall is NaN.
    """
    p = np.asarray(precision, dtype=np.float64)
    r = np.asarray(recall, dtype=np.float64)
    if np.isnan(r).any():
        return math.nan
    env = _envelope(p)
    idx = np.searchsorted(r, COCO_RECALL_GRID, side="left")
    ok = idx < len(r)
    q = np.zeros(len(COCO_RECALL_GRID))
    q[ok] = env[idx[ok]]
    return float(q.mean())


def precision_recall_reference(scores: ArrayLike, tp: ArrayLike,
                               n_truth: int) -> tuple[FloatArray, FloatArray, FloatArray]:
    """The curve the reference integrates: sklearn 0.23 ``precision_recall_curve`` over TP, FP and FN rows.

    The reference (jet-ssd-eval.py) appends every missed truth object as a row with score 0 and label 1,
    so the sample is the predictions plus n_truth − ΣTP rows (0, True), and recall reaches 1 only at
    threshold 0 whenever something was missed. sklearn 0.23.2 (the reference's pinned version) then:

    * keeps one point per distinct score, precision = TP/(TP+FP), recall = TP / total positives;
    * stops at the first (highest) threshold reaching full recall, dropping lower ones (sklearn ≥ 1.1
      no longer does this);
    * reverses the order (recall decreasing) and appends the terminal point (precision 1, recall 0).

    Returns ``(precision, recall, thresholds)`` in that order and form: [k + 1], [k + 1], [k].
    n_truth must be > 0.
    """
    s, t = _sample(scores, tp, n_truth)
    if n_truth <= 0:
        raise ValueError("the reference curve needs n_truth > 0")
    n_fn = n_truth - int(t.sum())
    precision, recall, thresholds = precision_recall(np.r_[s, np.zeros(n_fn)], np.r_[t, np.ones(n_fn, bool)],
                                                     n_truth)
    # recall is TP / n_truth and the last point holds all n_truth positives, so full recall is exactly 1.0.
    stop = int(np.argmax(recall >= 1.0))
    keep = slice(stop, None, -1)
    return np.r_[precision[keep], 1.0], np.r_[recall[keep], 0.0], thresholds[keep]


def ap_reference(scores: ArrayLike, tp: ArrayLike, n_truth: int) -> float:
    """The reference's "11-point" AP (``utils.Plotting.average_precision_score``), exactly.

    On the curve of :func:`precision_recall_reference` (recall decreasing, index 0 = lowest threshold):

    1. recall[0] := 1 and precision[0] := 0 (overwrites the threshold-0 point).
    2. For r in 0, 0.1, …, 1.0: skip r if recall[1] < r − 0.01. recall[1] is the recall at the second
       lowest threshold, i.e. the detector's maximum recall when something was missed (FN rows fill the
       lowest threshold 0); with nothing missed it is one step below full recall (truncation above).
       Otherwise take i = argmin |recall − r| (first minimum: among equal recalls the lowest-threshold,
       lowest-precision point) and add precision[i] **without interpolation**, unless i == 0 (the
       reference's ``if x:`` treats index 0 as "none").
    3. Divide by 11.

    Consequences, all faithful to the reference: the r = 0 term lands on the terminal point (recall 0,
    precision 1) and adds 1/11 whenever the top-scored row is a TP (if the top rows are FPs their
    recall-0 points come first and it adds their precision 0); the r = 1 term always hits the forced
    index 0 and adds nothing, so the maximum is 10/11 on a large sample; a sample with no predictions at
    all scores 1/11. NaN when n_truth = 0 (the reference would divide by zero).
    """
    if n_truth <= 0:
        _sample(scores, tp, n_truth)  # still validate the input
        return math.nan
    precision, recall, _ = precision_recall_reference(scores, tp, n_truth)
    recall[0] = 1.0
    precision[0] = 0.0
    total = 0.0
    for r in REFERENCE_RECALLS:
        if recall[1] < r - REFERENCE_TOLERANCE:
            continue
        i = int(np.argmin(np.abs(recall - r)))
        if i:
            total += float(precision[i])
    return total / 11.0


def precision_at_recall(precision: ArrayLike, recall: ArrayLike, r: float) -> float:
    """Precision at the curve point whose recall is nearest to ``r`` (the reference's P@R, §6.3).

    Args: the output of :func:`precision_recall` (ascending recall) and the target recall.

    NaN if the curve is empty or its maximum recall is < r − 0.01. Among points equally near (equal
    recalls, or one on each side), the one with the lower threshold wins, as in the reference (its
    curve is in the opposite order and numpy's argmin takes the first). Unlike the reference this uses
    the curve's true maximum recall and never the artificial terminal (recall 0, precision 1) point.
    """
    p = np.asarray(precision, dtype=np.float64)
    rec = np.asarray(recall, dtype=np.float64)
    if len(rec) == 0 or np.isnan(rec).any() or rec.max() < r - REFERENCE_TOLERANCE:
        return math.nan
    dist = np.abs(rec - r)[::-1]
    return float(p[len(p) - 1 - int(np.argmin(dist))])


def class_sample(records: DetectionRecords, cls: int | None = None) -> tuple[FloatArray, NDArray[np.bool_], int]:
    """``(scores, tp, n_truth)`` of one class (0 t, 1 V, 2 H), or pooled over classes for ``None``."""
    if cls is None:
        return records.pred_score, records.pred_tp, records.n_truth
    sel = records.pred_cls == cls
    return records.pred_score[sel], records.pred_tp[sel], int(np.sum(records.truth_cls == cls))


def seam_sample(records: DetectionRecords,
                window: float = SEAM_WINDOW) -> tuple[FloatArray, NDArray[np.bool_], int]:
    """``(scores, tp, n_truth)`` pooled over classes, restricted to the band π − |φ| < ``window`` (rad).

    A truth is in the band by its own φ; a true positive by the φ of the truth it matched (so a detection
    reported just outside the band still counts for a truth inside), a false positive by its own φ. This is
    the sample where the image's φ edge matters (COCO does the same for its object-size ranges).
    """
    def near(phi: FloatArray) -> NDArray[np.bool_]:
        return math.pi - np.abs(geometry.wrap_phi(phi)) < window

    tp = records.pred_tp
    pred_in = np.where(tp, near(records.pred_truth_phi), near(records.pred_phi))
    return records.pred_score[pred_in], tp[pred_in], int(np.count_nonzero(near(records.truth_phi)))


def average_precisions(scores: ArrayLike, tp: ArrayLike, n_truth: int) -> dict[str, float]:
    """``{"reference", "voc", "coco"}`` AP of one sample (NaN if n_truth = 0)."""
    p, r, _ = precision_recall(scores, tp, n_truth)
    if n_truth == 0:  # also without predictions, where the empty curve alone would give 0
        return {"reference": math.nan, "voc": math.nan, "coco": math.nan}
    return {"reference": ap_reference(scores, tp, n_truth), "voc": ap_voc(p, r), "coco": ap_coco(p, r)}


def _json_float(x: float) -> float | None:
    return None if not math.isfinite(x) else float(x)


def summarize(records: DetectionRecords) -> dict[str, Any]:
    """All headline numbers of one model, JSON-serialisable (NaN → None).

    Returns::

        {"events": N, "max_dr": float | None, "n_truth": int, "n_pred": int,
         "ap": {"reference", "voc", "coco"},                 # pooled over classes
         "per_class": {"t" | "V" | "H": {"ap_reference", "ap_voc", "ap_coco",
                                        "p_at_r30", "p_at_r50", "n_truth", "n_pred"}},
         "seam": {"window_rad", "n_truth", "n_pred", "ap_voc", "ap_coco"}}  # jets near φ = ±π, pooled
    """
    pooled = average_precisions(*class_sample(records))
    per_class: dict[str, dict[str, float | int | None]] = {}
    for c, name in enumerate(CLASS_NAMES):
        scores, tp, n_truth = class_sample(records, c)
        ap = average_precisions(scores, tp, n_truth)
        p, r, _ = precision_recall(scores, tp, n_truth)
        per_class[name] = {
            "ap_reference": _json_float(ap["reference"]),
            "ap_voc": _json_float(ap["voc"]),
            "ap_coco": _json_float(ap["coco"]),
            "p_at_r30": _json_float(precision_at_recall(p, r, 0.3)),
            "p_at_r50": _json_float(precision_at_recall(p, r, 0.5)),
            "n_truth": n_truth,
            "n_pred": len(scores),
        }
    return {
        "events": records.events,
        "max_dr": records.max_dr,
        "n_truth": records.n_truth,
        "n_pred": records.n_pred,
        "ap": {k: _json_float(v) for k, v in pooled.items()},
        "per_class": per_class,
        "seam": _seam_summary(records),
    }


def _seam_summary(records: DetectionRecords, window: float = SEAM_WINDOW) -> dict[str, float | int | None]:
    """Pooled AP of the jets near the image's φ edge (:func:`seam_sample`), for the φ-padding comparison."""
    scores, tp, n_truth = seam_sample(records, window)
    ap = average_precisions(scores, tp, n_truth)
    return {"window_rad": window, "n_truth": n_truth, "n_pred": len(scores),
            "ap_voc": _json_float(ap["voc"]), "ap_coco": _json_float(ap["coco"])}


QCD_RATES = (0.1, 0.3)
"""Background levels (detections per QCD event) of :func:`recall_at_fake_rate` in the report."""


def recall_at_fake_rate(records: DetectionRecords, background_scores: ArrayLike, background_events: int,
                        rates: Iterable[float] = QCD_RATES) -> dict[str, dict[str, float | None]]:
    """Signal efficiency at a fixed background: the trigger's way to compare detectors with different fake rates.

    For each rate ρ (detections per background event): the lowest score threshold t at which the background
    sample has at most ⌊ρ · background_events⌋ detections with score ≥ t, and the pooled recall there (true
    positives with score ≥ t over all truth objects of ``records``).

    Args:
        records: matched predictions of the whole sample (signal and background events).
        background_scores: [n] scores of every detection on the background (QCD) events.
        background_events: number of background events (all values are None when 0).

    Returns:
        ``{str(ρ): {"threshold": t, "recall": r}}``; t = 0 where even the lowest score stays under the rate.
    """
    bkg = np.sort(np.asarray(background_scores, np.float64))[::-1]
    out: dict[str, dict[str, float | None]] = {}
    for rate in rates:
        if background_events <= 0 or records.n_truth == 0:
            out[str(rate)] = {"threshold": None, "recall": None}
            continue
        allowed = math.floor(rate * background_events + 1e-9)  # + 1e-9: 0.1 · 30 must allow 3
        # Just above the first background score that would exceed the allowance (scores ≥ t pass).
        threshold = float(np.nextafter(bkg[allowed], math.inf)) if allowed < len(bkg) else 0.0
        passed = records.pred_tp & (records.pred_score >= threshold)
        out[str(rate)] = {"threshold": threshold, "recall": float(np.count_nonzero(passed)) / records.n_truth}
    return out


def fake_rate(records_or_preds: DetectionRecords | Iterable[JetsLike] | ArrayLike, events: int | None = None,
              threshold: float = 0.5, *, fp_only: bool = False) -> float:
    """Mean number of predictions with score ≥ ``threshold`` per event (the QCD false-positive rate).

    Args:
        records_or_preds: :class:`DetectionRecords` (events defaults to ``records.events``); an iterable
            of per-event :class:`JetsLike` (events defaults to its length); or a flat array of scores
            (``events`` required).
        events: number of events to divide by (NaN if 0).
        threshold: score cut.
        fp_only: count only false positives (records only): the fake rate on a signal sample. On QCD
            every prediction is a false positive, so the default counts all.
    """
    if isinstance(records_or_preds, DetectionRecords):
        scores = records_or_preds.pred_score
        if fp_only:
            scores = scores[~records_or_preds.pred_tp]
        n_events = records_or_preds.events if events is None else events
    else:
        if fp_only:
            raise ValueError("fp_only needs DetectionRecords (matched predictions)")
        if hasattr(records_or_preds, "score") or isinstance(records_or_preds, np.ndarray):
            # One JetsLike holding many events' predictions, or a flat score array: events is needed.
            flat = records_or_preds.score if hasattr(records_or_preds, "score") else records_or_preds
            scores = np.asarray(flat, dtype=np.float64).reshape(-1)
            n_events = _required(events)
        else:
            items = list(cast(Iterable[Any], records_or_preds))
            if all(hasattr(x, "score") for x in items):  # per-event predictions (an empty list: 0 events)
                scores = np.concatenate([np.asarray(x.score, dtype=np.float64).reshape(-1) for x in items] or
                                        [np.zeros(0)])
                n_events = len(items) if events is None else events
            else:
                scores = np.asarray(items, dtype=np.float64).reshape(-1)
                n_events = _required(events)
    if n_events <= 0:
        return math.nan
    return float(np.count_nonzero(scores >= threshold)) / n_events


def _required(events: int | None) -> int:
    if events is None:
        raise ValueError("events is required with a flat array of scores")
    return events


# Binned quantities for the plots -------------------------------------------------------------------

BIN_VARIABLES = ("eta", "phi", "pt")


def _bin_index(values: FloatArray, edges: FloatArray) -> NDArray[np.int64]:
    """Bin of each value; values outside [edges[0], edges[-1]] go to the first / last bin."""
    idx = np.searchsorted(edges, values, side="right") - 1
    return np.clip(idx, 0, len(edges) - 2).astype(np.int64)


def binned_precision_at_recall(records: DetectionRecords, variable: str, edges: ArrayLike, recall: float = 0.3,
                               cls: int | None = None, min_truth: int = 1) -> FloatArray:
    """Precision at ``recall`` (:func:`precision_at_recall`) in bins of η, φ or pT (reference §6.4).

    A truth object and a true positive are binned by the **truth** value, a false positive by its
    predicted value, so each bin is a complete sample (its TPs, FPs and truth objects). φ is wrapped
    into [−π, π) first. Values outside the edges fall into the first / last bin, so the bins partition
    the whole sample (a false positive with a predicted pT below the lowest edge still counts).

    Args:
        records: matched records of one model.
        variable: "eta", "phi" or "pt".
        edges: float [nbins + 1], increasing.
        recall: the recall at which the precision is read.
        cls: class id, or None for all classes pooled.
        min_truth: bins with fewer truth objects are NaN. With a handful of objects recall moves in big
            steps and the nearest point to R = 0.3 can be the recall-0 point of the top-scored fakes
            (precision 0), which says nothing about the detector.

    Returns:
        float64 [nbins], NaN where the bin has fewer than ``min_truth`` (or no) truth objects or the recall
        is not reached.
    """
    if variable not in BIN_VARIABLES:
        raise ValueError(f"variable must be one of {BIN_VARIABLES}, got {variable!r}")
    e = np.asarray(edges, dtype=np.float64)
    pred_val = getattr(records, f"pred_{variable}")
    truth_of_pred = getattr(records, f"pred_truth_{variable}")
    truth_val = getattr(records, f"truth_{variable}")
    tp = records.pred_tp
    pv = np.where(tp, truth_of_pred, pred_val)
    if variable == "phi":
        pv, truth_val = geometry.wrap_phi(pv), geometry.wrap_phi(truth_val)
    psel = np.ones(len(pv), bool) if cls is None else records.pred_cls == cls
    tsel = np.ones(len(truth_val), bool) if cls is None else records.truth_cls == cls
    pbin = _bin_index(pv, e)
    tbin = _bin_index(truth_val, e)
    out = np.full(len(e) - 1, np.nan)
    for b in range(len(e) - 1):
        pm = psel & (pbin == b)
        n_truth = int(np.sum(tsel & (tbin == b)))
        if n_truth == 0 or n_truth < min_truth:
            continue
        p, r, _ = precision_recall(records.pred_score[pm], tp[pm], n_truth)
        out[b] = precision_at_recall(p, r, recall)
    return out


def residuals(records: DetectionRecords, cls: int | None = None) -> dict[str, FloatArray]:
    """Resolution of the found truth objects, each float64 [n_found]:

    ``pt_true`` (GeV), ``deta`` = η_pred − η_true, ``dphi`` = φ_pred − φ_true wrapped into [−π, π) (signed;
    the reference's Δφ was always ≥ 0, §10.15), ``pt_ratio`` = pT_pred / pT_true.
    """
    sel = records.truth_found if cls is None else records.truth_found & (records.truth_cls == cls)
    pt_true = records.truth_pt[sel]
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = records.truth_pred_pt[sel] / pt_true
    return {
        "pt_true": pt_true,
        "deta": records.truth_pred_eta[sel] - records.truth_eta[sel],
        "dphi": geometry.delta_phi(records.truth_pred_phi[sel], records.truth_phi[sel]),
        "pt_ratio": ratio,
    }


def binned_mean_std(x: ArrayLike, y: ArrayLike, edges: ArrayLike) -> tuple[FloatArray, FloatArray, NDArray[np.int64]]:
    """Mean, standard deviation and count of ``y`` in bins of ``x`` (x outside the edges is dropped).

    Returns float64 [nbins] mean and std (NaN in empty bins) and int64 [nbins] counts. Non-finite y are
    ignored.
    """
    xa = np.asarray(x, dtype=np.float64)
    ya = np.asarray(y, dtype=np.float64)
    e = np.asarray(edges, dtype=np.float64)
    nb = len(e) - 1
    ok = np.isfinite(ya) & (xa >= e[0]) & (xa <= e[-1])
    b = _bin_index(xa[ok], e)
    yv = ya[ok]
    count = np.bincount(b, minlength=nb).astype(np.int64)
    s1 = np.bincount(b, weights=yv, minlength=nb)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = s1 / count
        # Two-pass variance: subtracting the bin mean first avoids the cancellation of E[y²] − E[y]².
        var = np.bincount(b, weights=(yv - mean[b]) ** 2, minlength=nb) / count
    mean[count == 0] = np.nan
    return mean, np.sqrt(var), count
