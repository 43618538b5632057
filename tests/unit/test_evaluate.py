"""Tests of jetssd.evaluate: the ΔR matcher, the three AP integrations, P@R, summaries, fake rate, plots.

The AP values of the small cases are computed by hand in the comments; the randomised tests compare
with literal transcriptions of the code each flavour comes from (VOC devkit, pycocotools, sklearn 0.23 +
the reference's ``average_precision_score``), written here as slow obviously-correct oracles.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from numpy.typing import NDArray

from jetssd.evaluate import (
    DEFAULT_MAX_DR,
    DetectionRecords,
    PredictedJets,
    ap_coco,
    ap_reference,
    ap_voc,
    baseline_as_predictions,
    collect,
    fake_rate,
    match_event,
    precision_at_recall,
    precision_recall,
    precision_recall_reference,
    summarize,
)
from jetssd.evaluate.metrics import (
    binned_mean_std,
    binned_precision_at_recall,
    recall_at_fake_rate,
    residuals,
    seam_sample,
)
from jetssd.event import BaselineJets, TruthObjects


def truth(cls: list[int], eta: list[float], phi: list[float], pt: list[float] | None = None) -> TruthObjects:
    return TruthObjects.from_arrays(cls, eta, phi, pt if pt is not None else [500.0] * len(cls))


def preds(label: list[int], score: list[float], eta: list[float], phi: list[float],
          pt: list[float] | None = None) -> PredictedJets:
    return PredictedJets(np.asarray(label, np.int64), np.asarray(score, np.float64), np.asarray(eta, np.float64),
                         np.asarray(phi, np.float64), np.asarray(pt if pt is not None else [450.0] * len(label),
                                                                 np.float64))


# Matching ----------------------------------------------------------------------------------------

def test_match_across_phi_seam() -> None:
    # φ = 3.1 and −3.1 are 2π − 6.2 = 0.0832 rad apart the short way round, far inside 0.4.
    m = match_event(truth([0], [0.0], [3.1]), preds([0], [0.9], [0.0], [-3.1]))
    assert m.tp.tolist() == [True]
    assert m.matched_truth.tolist() == [0]
    assert m.matched_pred.tolist() == [0]
    assert m.dr[0] == pytest.approx(2 * math.pi - 6.2, abs=1e-6)  # float32 truth φ
    assert m.dr[0] == pytest.approx(0.0832, abs=1e-4)


def test_wrong_class_is_not_matched_and_counts_as_fp() -> None:
    t = truth([0], [0.5], [1.0])
    p = preds([1], [0.9], [0.5], [1.0])  # right place, wrong class (V on a top)
    m = match_event(t, p)
    assert m.tp.tolist() == [False]
    assert m.matched_truth.tolist() == [-1]
    assert m.matched_pred.tolist() == [-1]
    assert (m.n_tp, m.n_fp, m.n_fn) == (0, 1, 1)
    rec = DetectionRecords()
    rec.add(t, p, m)
    assert rec.pred_tp.tolist() == [False]
    assert rec.truth_found.tolist() == [False]
    assert np.isnan(rec.pred_truth_pt[0])


def test_one_prediction_cannot_match_two_truths() -> None:
    # Two tops 0.1 apart; one prediction between them, closer to the first. The reference (§10.15)
    # would count it as a TP for both.
    m = match_event(truth([0, 0], [0.0, 0.1], [0.0, 0.0]), preds([0], [0.9], [0.04], [0.0]))
    assert m.matched_truth.tolist() == [0]  # the closest
    assert m.matched_pred.tolist() == [0, -1]
    assert (m.n_tp, m.n_fp, m.n_fn) == (1, 0, 1)


def test_two_predictions_on_one_truth_give_one_tp_one_fp() -> None:
    m = match_event(truth([2], [1.0], [-1.0]), preds([2, 2], [0.8, 0.9], [1.01, 1.05], [-1.0, -1.0]))
    # The higher score (index 1) wins even though index 0 is closer; index 0 is a duplicate → FP.
    assert m.tp.tolist() == [False, True]
    assert m.matched_pred.tolist() == [1]


def test_greedy_by_score_not_by_distance() -> None:
    # One truth at η 0; a low-score prediction right on it and a high-score one 0.3 away (inside 0.4).
    # Greedy by score: the confident one takes the truth, the close one is left as FP, whatever the
    # input order.
    t = truth([1], [0.0], [0.0])
    for order in ([0, 1], [1, 0]):
        label, score, eta = [1, 1], [0.5, 0.9], [0.01, 0.3]
        p = preds([label[i] for i in order], [score[i] for i in order], [eta[i] for i in order], [0.0, 0.0])
        m = match_event(t, p)
        hi = order.index(1)
        assert m.tp.tolist() == [i == hi for i in range(2)]
        assert m.matched_pred.tolist() == [hi]


def test_each_prediction_takes_the_closest_free_truth() -> None:
    # Truths at η 0 and 0.3; p1 (0.9) at 0.2 takes the one at 0.3 (distance 0.1); p2 (0.8) at 0.25 then
    # finds 0.3 taken and falls back to η 0 (distance 0.25 < 0.4).
    m = match_event(truth([0, 0], [0.0, 0.3], [0.0, 0.0]), preds([0, 0], [0.9, 0.8], [0.2, 0.25], [0.0, 0.0]))
    assert m.matched_truth.tolist() == [1, 0]
    assert m.tp.all()


def test_max_dr_is_a_parameter_and_inclusive() -> None:
    t = truth([0], [0.0], [0.0])
    p = preds([0], [0.9], [0.3], [0.4])  # ΔR = 0.5 exactly (3-4-5)
    assert DEFAULT_MAX_DR == 0.4
    assert not match_event(t, p).tp[0]
    assert match_event(t, p, max_dr=0.5).tp[0]
    assert match_event(t, p, max_dr=0.6).tp[0]


def test_empty_inputs_and_bad_columns() -> None:
    m = match_event(TruthObjects.empty(), preds([0], [0.9], [0.0], [0.0]))
    assert m.tp.tolist() == [False]
    assert m.matched_pred.shape == (0,)
    m = match_event(truth([0], [0.0], [0.0]), preds([], [], [], []))
    assert m.tp.shape == (0,)
    assert m.matched_pred.tolist() == [-1]
    bad = PredictedJets(np.zeros(2, np.int64), np.zeros(1), np.zeros(2), np.zeros(2), np.zeros(2))
    with pytest.raises(ValueError, match="one length"):
        match_event(truth([0], [0.0], [0.0]), bad)


def test_baseline_as_predictions() -> None:
    b = BaselineJets.from_arrays([0, 2], [0.1, -1.0], [3.0, 0.5], [400.0, 600.0], [0.25, 0.6], [170.0, 125.0])
    p = baseline_as_predictions(b)
    np.testing.assert_allclose(p.score, [0.75, 0.4], rtol=1e-6)
    assert p.label.tolist() == [0, 2]
    np.testing.assert_allclose(p.pt, [400.0, 600.0])
    m = match_event(truth([0, 2], [0.1, -1.0], [3.0, 0.5]), p)
    assert m.tp.all()


def test_records_accumulate_over_events() -> None:
    rec = collect([
        (truth([0, 1], [0.0, 1.0], [0.0, 2.0], [300.0, 800.0]),
         preds([0, 2], [0.9, 0.4], [0.05, -2.0], [0.0, 1.0], [330.0, 100.0])),
        (TruthObjects.empty(), preds([1], [0.7], [0.0], [0.0])),  # a QCD event
        (TruthObjects.empty(), preds([], [], [], [])),  # an empty event still counts
    ])
    assert rec.events == 3
    assert rec.max_dr == DEFAULT_MAX_DR
    assert (rec.n_pred, rec.n_truth) == (3, 2)
    assert rec.pred_tp.tolist() == [True, False, False]
    assert rec.pred_event.tolist() == [0, 0, 1]
    np.testing.assert_allclose(rec.pred_truth_pt, [300.0, np.nan, np.nan])
    assert rec.truth_found.tolist() == [True, False]
    np.testing.assert_allclose(rec.truth_pred_pt, [330.0, np.nan])
    np.testing.assert_allclose(rec.truth_pred_eta, [0.05, np.nan])
    np.testing.assert_allclose(rec.truth_pred_score, [0.9, np.nan])
    assert rec.truth_cls.tolist() == [0, 1]

    other = collect([(truth([2], [0.0], [0.0]), preds([2], [0.6], [0.0], [0.1]))])
    rec.extend(other)
    assert rec.events == 4
    assert rec.truth_event.tolist() == [0, 0, 3]
    assert rec.pred_tp.tolist() == [True, False, False, True]


def test_records_reject_a_foreign_match() -> None:
    t = truth([0], [0.0], [0.0])
    p = preds([0, 0], [0.9, 0.8], [0.0, 1.0], [0.0, 0.0])
    m = match_event(t, preds([0], [0.9], [0.0], [0.0]))
    with pytest.raises(ValueError, match="match is for"):
        DetectionRecords().add(t, p, m)


# AP flavours on a hand-computed case ----------------------------------------------------------------
#
# scores [0.9, 0.8, 0.7, 0.6], tp [1, 0, 1, 0], n_truth 3 (one truth object never found).
# Curve, in descending score:   0.9: P 1,   R 1/3     0.8: P 1/2, R 1/3
#                               0.7: P 2/3, R 2/3     0.6: P 1/2, R 2/3
#
# VOC all-point: envelope = 1 up to R 1/3, 2/3 up to R 2/3, 0 after:
#   AP = 1/3 · 1 + 1/3 · 2/3 = 5/9 = 0.5556.
# COCO 101: grid t = 0, 0.01, …, 1. t ≤ 0.33 (34 points) → envelope at R 1/3 = 1; 0.34 ≤ t ≤ 0.66
#   (33 points) → envelope at R 2/3 = 2/3; t ≥ 0.67 (34 points) beyond max recall → 0:
#   AP = (34 · 1 + 33 · 2/3) / 101 = 56/101 = 0.5545.
# Reference 11-point: the missed truth adds a row (score 0, label 1). sklearn 0.23 curve, recall
#   decreasing, terminal point appended:
#     recall    [1,   2/3, 2/3, 1/3, 1/3, 0]
#     precision [3/5, 1/2, 2/3, 1/2, 1,   1]   → forced: precision[0] = 0, recall[0] = 1.
#   recall[1] = 2/3, so r = 0.7 … 1.0 are cut (2/3 < r − 0.01). For the others the nearest sample,
#   first index on ties:
#     r = 0, 0.1        → index 5 (recall 0, the terminal point)      → 1 each
#     r = 0.2, 0.3, 0.4 → index 3 (recall 1/3, the lower of the pair)  → 1/2 each
#     r = 0.5           → 1/3 and 2/3 are equally near on paper; as doubles 2/3 is stored a hair low and
#                         wins → index 1                              → 1/2
#     r = 0.6           → index 1                                     → 1/2
#   AP = (1 + 1 + 5 · 1/2) / 11 = 4.5/11 = 9/22 = 0.4091.
HAND_SCORES = [0.9, 0.8, 0.7, 0.6]
HAND_TP = [1, 0, 1, 0]


def test_precision_recall_hand_case() -> None:
    p, r, thr = precision_recall(HAND_SCORES, HAND_TP, 3)
    np.testing.assert_allclose(p, [1, 1 / 2, 2 / 3, 1 / 2])
    np.testing.assert_allclose(r, [1 / 3, 1 / 3, 2 / 3, 2 / 3])
    np.testing.assert_allclose(thr, HAND_SCORES)


def test_ap_flavours_hand_case() -> None:
    p, r, _ = precision_recall(HAND_SCORES, HAND_TP, 3)
    assert ap_voc(p, r) == pytest.approx(5 / 9, abs=1e-12)
    assert ap_coco(p, r) == pytest.approx(56 / 101, abs=1e-12)
    assert ap_reference(HAND_SCORES, HAND_TP, 3) == pytest.approx(9 / 22, abs=1e-12)
    # Input order does not matter.
    assert ap_reference(HAND_SCORES[::-1], HAND_TP[::-1], 3) == pytest.approx(9 / 22, abs=1e-12)


def test_reference_curve_hand_case() -> None:
    p, r, thr = precision_recall_reference(HAND_SCORES, HAND_TP, 3)
    np.testing.assert_allclose(r, [1, 2 / 3, 2 / 3, 1 / 3, 1 / 3, 0])
    np.testing.assert_allclose(p, [3 / 5, 1 / 2, 2 / 3, 1 / 2, 1, 1])
    np.testing.assert_allclose(thr, [0.0, 0.6, 0.7, 0.8, 0.9])


def test_perfect_detector() -> None:
    # Three TPs, nothing missed: VOC = COCO = 1. The reference curve then has no FN row, sklearn 0.23
    # stops at the first full-recall point and recall[1] = 2/3, so r ≥ 0.7 are cut:
    # recall [1→forced, 2/3, 1/3, 0], precision [0, 1, 1, 1]; r = 0…0.6 each add 1 → 7/11.
    # (On a large sample recall[1] → 1 and only r = 1.0 is lost: 10/11 is the reference's maximum.)
    s, t = [0.9, 0.8, 0.7], [1, 1, 1]
    p, r, _ = precision_recall(s, t, 3)
    assert ap_voc(p, r) == 1.0
    assert ap_coco(p, r) == 1.0
    assert ap_reference(s, t, 3) == pytest.approx(7 / 11, abs=1e-12)
    big = np.linspace(1.0, 0.5, 1000)
    assert ap_reference(big, np.ones(1000, bool), 1000) == pytest.approx(10 / 11, abs=1e-12)


def test_no_predictions() -> None:
    p, r, _ = precision_recall([], [], 4)
    assert ap_voc(p, r) == 0.0
    assert ap_coco(p, r) == 0.0
    # Reference: only FN rows → curve recall [1, 0], precision [1 → forced 0, 1]; r = 0 lands on the
    # terminal point (+1), every other r is cut (recall[1] = 0) → 1/11.
    assert ap_reference([], [], 4) == pytest.approx(1 / 11, abs=1e-12)
    assert math.isnan(precision_at_recall(p, r, 0.3))


def test_all_false_positives() -> None:
    s, t = [0.9, 0.5], [0, 0]
    p, r, _ = precision_recall(s, t, 2)
    assert ap_voc(p, r) == 0.0
    assert ap_coco(p, r) == 0.0
    # Reference: rows (0.9, 0), (0.5, 0), 2 × (0, 1); recall [1, 0, 0, 0], precision [0, 0, 0, 1]:
    # r = 0 → first recall-0 sample, index 1, precision 0 (not the terminal 1) → AP 0.
    assert ap_reference(s, t, 2) == 0.0


def test_no_truth_gives_nan() -> None:
    p, r, _ = precision_recall([0.9], [0], 0)
    assert math.isnan(r[0])
    assert math.isnan(ap_voc(p, r))
    assert math.isnan(ap_coco(p, r))
    assert math.isnan(ap_reference([0.9], [0], 0))
    assert math.isnan(precision_at_recall(p, r, 0.3))


def test_invalid_samples() -> None:
    with pytest.raises(ValueError, match="true positives"):
        precision_recall([0.9, 0.8], [1, 1], 1)
    with pytest.raises(ValueError, match="differ in length"):
        precision_recall([0.9, 0.8], [1], 1)
    with pytest.raises(ValueError, match="NaN"):
        precision_recall([np.nan], [1], 1)


def test_ties_are_one_operating_point() -> None:
    # Two predictions with the same score, one TP and one FP: one point (P 1/2, R 1/2), whatever the
    # order. VOC = 1/2 · 1/2 = 1/4 for both orders (walking one by one would give 1/2 or 1/4).
    for t in ([1, 0], [0, 1]):
        p, r, thr = precision_recall([0.7, 0.7], t, 2)
        assert p.tolist() == [0.5]
        assert r.tolist() == [0.5]
        assert thr.tolist() == [0.7]
        assert ap_voc(p, r) == 0.25


# Precision at recall -----------------------------------------------------------------------------

def test_precision_at_recall_hand_case() -> None:
    p, r, _ = precision_recall(HAND_SCORES, HAND_TP, 3)
    # R 0.3: nearest recall 1/3, two points → the lower threshold (P 1/2), as the reference.
    assert precision_at_recall(p, r, 0.3) == 0.5
    # R 0.5: 2/3 (stored a hair low) is nearer than 1/3 → lower threshold of that pair, P 1/2.
    assert precision_at_recall(p, r, 0.5) == 0.5
    # R 0.66: within 0.01 of the max recall 2/3 → reachable.
    assert precision_at_recall(p, r, 0.67) == 0.5
    # R 0.7: max recall 2/3 < 0.69 → NaN.
    assert math.isnan(precision_at_recall(p, r, 0.7))
    assert precision_at_recall(p, r, 0.1) == 0.5


def test_precision_at_recall_picks_nearest_not_interpolated() -> None:
    # 10 truths; TP, FP, TP, TP: recall 0.1, 0.1, 0.2, 0.3 with precision 1, 1/2, 2/3, 3/4.
    p, r, _ = precision_recall([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 1], 10)
    assert precision_at_recall(p, r, 0.3) == 0.75
    assert precision_at_recall(p, r, 0.19) == pytest.approx(2 / 3)
    assert precision_at_recall(p, r, 0.31) == 0.75  # 0.31 − 0.01 ≤ 0.3
    assert math.isnan(precision_at_recall(p, r, 0.32))


# Randomised comparisons with literal transcriptions of the originals ---------------------------------

def voc_devkit(scores: NDArray[np.float64], tp: NDArray[np.bool_], n_truth: int) -> float:
    """VOC devkit / rafaelpadilla EveryPointInterpolation, one detection at a time."""
    order = np.argsort(-scores, kind="stable")
    tps = np.cumsum(tp[order])
    fps = np.cumsum(~tp[order])
    rec = list(tps / n_truth)
    prec = list(tps / (tps + fps))
    mrec = [0.0, *rec, 1.0]
    mpre = [0.0, *prec, 0.0]
    for i in range(len(mpre) - 1, 0, -1):
        mpre[i - 1] = max(mpre[i - 1], mpre[i])
    return sum((mrec[i] - mrec[i - 1]) * mpre[i] for i in range(1, len(mrec)) if mrec[i] != mrec[i - 1])


def coco_accumulate(scores: NDArray[np.float64], tp: NDArray[np.bool_], n_truth: int) -> float:
    """pycocotools COCOeval.accumulate for one class/area/IoU, without its ε."""
    order = np.argsort(-scores, kind="mergesort")
    tps = np.cumsum(tp[order]).astype(float)
    fps = np.cumsum(~tp[order]).astype(float)
    rc = tps / n_truth
    pr = list(tps / (fps + tps))
    q = np.zeros(101)
    for i in range(len(pr) - 1, 0, -1):
        if pr[i] > pr[i - 1]:
            pr[i - 1] = pr[i]
    inds = np.searchsorted(rc, np.linspace(0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1), side="left")
    try:
        for ri, pi in enumerate(inds):
            q[ri] = pr[pi]
    except IndexError:
        pass
    return float(np.mean(q))


def sklearn023_pr_curve(y_true: NDArray[np.float64], y_score: NDArray[np.float64]
                        ) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """sklearn 0.23.2 precision_recall_curve (via _binary_clf_curve), transcribed."""
    desc = np.argsort(y_score, kind="mergesort")[::-1]
    y_score, y_true = y_score[desc], y_true[desc]
    distinct = np.where(np.diff(y_score))[0]
    thr_idx = np.r_[distinct, y_true.size - 1]
    tps = np.cumsum(y_true)[thr_idx]
    fps = 1 + thr_idx - tps
    precision = tps / (tps + fps)
    precision[np.isnan(precision)] = 0
    recall = tps / tps[-1]
    last_ind = tps.searchsorted(tps[-1])
    sl = slice(last_ind, None, -1)
    return np.r_[precision[sl], 1], np.r_[recall[sl], 0]


def reference_eval(scores: NDArray[np.float64], tp: NDArray[np.bool_], n_truth: int) -> tuple[float, float, float]:
    """jet-ssd-eval.py rows (TP/FP + FN with score 0) → utils.Plotting AP, P@R=.3, P@R=.5, transcribed."""
    n_fn = n_truth - int(tp.sum())
    truth_col = np.r_[tp.astype(float), np.ones(n_fn)]
    score_col = np.r_[scores, np.zeros(n_fn)]
    precision, recall = sklearn023_pr_curve(truth_col, score_col)

    def find_nearest(array: NDArray[np.float64], value: float) -> int | None:
        if array[1] < (value - .01):
            return None
        return int((np.abs(array - value)).argmin())

    recall[0] = 1.
    precision[0] = 0.
    cum_ap = 0.
    for i in [x / 10.0 for x in range(0, 11)]:
        x = find_nearest(recall, i)
        if x:
            cum_ap += precision[x]
    out = [cum_ap / 11.]
    for rr in (0.3, 0.5):
        x = find_nearest(recall, rr)
        out.append(math.nan if x is None else float(precision[x]))
    return out[0], out[1], out[2]


@pytest.mark.parametrize("seed", range(40))
def test_flavours_match_their_originals(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n_pred = int(rng.integers(0, 60))
    n_truth = int(rng.integers(1, 40))
    # Distinct continuous scores for VOC/COCO (whose originals walk tied detections one by one).
    scores = rng.uniform(0.02, 1.0, n_pred)
    tp = np.zeros(n_pred, bool)
    n_tp = int(rng.integers(0, min(n_pred, n_truth) + 1))
    tp[rng.choice(n_pred, n_tp, replace=False)] = True
    p, r, _ = precision_recall(scores, tp, n_truth)
    assert ap_voc(p, r) == pytest.approx(voc_devkit(scores, tp, n_truth), abs=1e-12)
    assert ap_coco(p, r) == pytest.approx(coco_accumulate(scores, tp, n_truth), abs=1e-12)
    # The reference with many tied scores (it collapses ties itself), including ties with the FN rows.
    coarse = np.round(scores * 8) / 8
    coarse[: n_pred // 5] = 0.0
    ref_ap, ref_p3, ref_p5 = reference_eval(coarse, tp, n_truth)
    assert ap_reference(coarse, tp, n_truth) == pytest.approx(ref_ap, abs=1e-12)
    ref_ap, ref_p3, ref_p5 = reference_eval(scores, tp, n_truth)
    assert ap_reference(scores, tp, n_truth) == pytest.approx(ref_ap, abs=1e-12)
    # P@R agrees with the reference where its quirks (recall[1] and the terminal point) do not bite:
    # something missed (so recall[1] is the max recall) and the first recall step small.
    if n_tp < n_truth and n_truth >= 10:
        for got, want in ((precision_at_recall(p, r, 0.3), ref_p3), (precision_at_recall(p, r, 0.5), ref_p5)):
            assert (math.isnan(got) and math.isnan(want)) or got == pytest.approx(want, abs=1e-12)


# Summary and fake rate ---------------------------------------------------------------------------

def small_records() -> DetectionRecords:
    return collect([
        # Event 0: a top found, a V missed, a fake H.
        (truth([0, 1], [0.0, 1.0], [3.1, -2.0], [400.0, 900.0]),
         preds([0, 2], [0.9, 0.6], [0.02, -1.5], [-3.1, 0.0], [380.0, 150.0])),
        # Event 1: QCD, one fake top.
        (TruthObjects.empty(), preds([0], [0.3], [1.0], [1.0])),
    ])


def test_summarize_json_round_trip() -> None:
    rec = small_records()
    s = summarize(rec)
    text = json.dumps(s, allow_nan=False)  # NaN must already be None
    back = json.loads(text)
    assert back == s
    assert s["events"] == 2
    assert s["max_dr"] == DEFAULT_MAX_DR
    assert set(s["ap"]) == {"reference", "voc", "coco"}
    assert set(s["per_class"]) == {"t", "V", "H"}
    t = s["per_class"]["t"]
    assert set(t) == {"ap_reference", "ap_voc", "ap_coco", "p_at_r30", "p_at_r50", "n_truth", "n_pred"}
    # t: scores 0.9 (TP) and 0.3 (FP), one truth: curve (P 1, R 1), (P 1/2, R 1) → VOC = COCO = 1.
    assert (t["n_truth"], t["n_pred"]) == (1, 2)
    assert t["ap_voc"] == 1.0
    assert t["ap_coco"] == 1.0
    assert t["p_at_r30"] == 0.5  # nearest recall is 1 (both points): the lower threshold, P 1/2
    # V: one truth, no prediction → AP 0, P@R undefined → None.
    v = s["per_class"]["V"]
    assert v["ap_voc"] == 0.0
    assert v["p_at_r30"] is None
    assert v["n_pred"] == 0
    # H: no truth → every number None.
    h = s["per_class"]["H"]
    assert h["ap_voc"] is None
    assert h["ap_reference"] is None
    assert h["n_truth"] == 0
    assert h["n_pred"] == 1
    # Pooled: scores 0.9 (TP), 0.6, 0.3 (FP), 2 truths: VOC = 1/2 · 1 = 0.5.
    assert s["ap"]["voc"] == 0.5


def test_seam_sample_keeps_the_jets_near_the_phi_edge() -> None:
    rec = collect([
        # A top at φ = 3.0 (in the 0.8 band) found across the edge at −3.1 by 0.9 → TP in the band.
        # A V at φ = 2.5 (in) found at φ = 2.2 (outside the band, ΔR 0.3) by 0.7 → counted by its truth: in.
        # An H at φ = 0.0 (out) found by 0.8 → out; a fake top at φ = −2.6 (in) by 0.95 → FP in the band.
        (truth([0, 1, 2], [0.0, 0.0, 0.0], [3.0, 2.5, 0.0]),
         preds([0, 1, 2, 0], [0.9, 0.7, 0.8, 0.95], [0.0, 0.0, 0.0, 1.0], [-3.1, 2.2, 0.0, -2.6])),
        # A missed top at φ = −2.5 (in the band).
        (truth([0], [0.5], [-2.5]), preds([], [], [], [])),
    ])
    scores, tp, n_truth = seam_sample(rec)
    assert n_truth == 3
    assert sorted(zip(scores.tolist(), tp.tolist(), strict=True)) == [(0.7, True), (0.9, True), (0.95, False)]
    # Sorted by score: FP (P 0), TP (1/2, R 1/3), TP (2/3, R 2/3) → VOC = 2/3 · 2/3.
    seam = summarize(rec)["seam"]
    assert (seam["n_truth"], seam["n_pred"], seam["window_rad"]) == (3, 3, 0.8)
    assert seam["ap_voc"] == pytest.approx(4 / 9)
    assert seam_sample(rec, window=0.1)[2] == 0  # no truth within 0.1 of the edge
    assert summarize(DetectionRecords())["seam"]["ap_voc"] is None


def test_recall_at_a_fixed_qcd_rate() -> None:
    # Four truths; true positives at 0.9, 0.6, 0.3; a signal-event fake at 0.8.
    rec = collect([
        (truth([0, 1, 1, 2], [0.0, 1.0, -1.0, 0.5], [0.0, 1.0, 2.0, -2.0]),
         preds([0, 1, 1, 0], [0.9, 0.6, 0.3, 0.8], [0.0, 1.0, -1.0, 1.5], [0.0, 1.0, 2.0, -1.0])),
    ])
    # 20 QCD events with these detection scores: at ≤ 0.1 per event 2 may pass (0.95, 0.7), so the cut sits
    # just above 0.5 and keeps the 0.9 and 0.6 TPs; at ≤ 0.3 per event 6 may pass: all 5 do, cut 0.
    background = [0.95, 0.7, 0.5, 0.2, 0.1]
    out = recall_at_fake_rate(rec, background, 20, rates=(0.1, 0.3))
    assert out["0.1"]["threshold"] == pytest.approx(0.5)
    assert out["0.1"]["threshold"] > 0.5
    assert out["0.1"]["recall"] == 0.5
    assert out["0.3"] == {"threshold": 0.0, "recall": 0.75}
    # ≤ 0.05 per event allows one: the cut lands just above 0.7 and keeps only the 0.9 TP.
    assert recall_at_fake_rate(rec, background, 20, rates=(0.05,))["0.05"]["recall"] == 0.25
    assert recall_at_fake_rate(rec, background, 0)["0.1"] == {"threshold": None, "recall": None}


def test_summarize_empty_records() -> None:
    s = summarize(DetectionRecords())
    assert json.loads(json.dumps(s, allow_nan=False))["events"] == 0
    assert s["ap"] == {"reference": None, "voc": None, "coco": None}


def test_fake_rate() -> None:
    rec = small_records()
    # Scores ≥ 0.5: 0.9 and 0.6 → 2 predictions / 2 events.
    assert fake_rate(rec, threshold=0.5) == 1.0
    assert fake_rate(rec, threshold=0.95) == 0.0
    # Only false positives: 0.6 → 0.5 per event; over 4 events (caller's count) → 0.25.
    assert fake_rate(rec, threshold=0.5, fp_only=True) == 0.5
    assert fake_rate(rec, 4, 0.5, fp_only=True) == 0.25
    # Per-event predictions (QCD): 3 events, scores ≥ 0.5: 2 + 0 + 1.
    qcd = [preds([0, 1], [0.9, 0.5], [0, 0], [0, 0]), preds([], [], [], []), preds([2, 2], [0.7, 0.1], [0, 1], [0, 0])]
    assert fake_rate(qcd, threshold=0.5) == 1.0
    assert fake_rate([0.9, 0.5, 0.7, 0.1], events=3, threshold=0.5) == 1.0
    assert fake_rate(np.array([0.9, 0.1]), events=2, threshold=0.5) == 0.5
    assert math.isnan(fake_rate([], threshold=0.5))
    with pytest.raises(ValueError, match="events is required"):
        fake_rate([0.9, 0.1], threshold=0.5)
    with pytest.raises(ValueError, match="fp_only"):
        fake_rate(qcd, threshold=0.5, fp_only=True)


# Binned quantities and plots -------------------------------------------------------------------

def test_residuals_are_signed_and_wrapped() -> None:
    rec = small_records()
    d = residuals(rec, 0)
    # The top: truth (0, 3.1), prediction (0.02, −3.1): Δη = +0.02, Δφ = −3.1 − 3.1 + 2π = +0.0832.
    np.testing.assert_allclose(d["deta"], [0.02], atol=1e-6)
    np.testing.assert_allclose(d["dphi"], [2 * math.pi - 6.2], atol=1e-6)
    np.testing.assert_allclose(d["pt_ratio"], [380.0 / 400.0], rtol=1e-6)
    assert residuals(rec, 1)["deta"].shape == (0,)


def test_binned_mean_std() -> None:
    mean, std, count = binned_mean_std([1, 1, 3, 10], [1.0, 3.0, 5.0, 7.0], [0, 2, 4, 6])
    np.testing.assert_allclose(mean, [2.0, 5.0, np.nan])
    np.testing.assert_allclose(std, [1.0, 0.0, np.nan])
    assert count.tolist() == [2, 1, 0]  # x = 10 is outside the edges and dropped


def test_binned_precision_bins_fp_by_prediction_and_tp_by_truth() -> None:
    # Two η bins [−3, 0) and [0, 3). A top at η −0.1 found by a prediction at η +0.1 (TP, binned by the
    # truth → left bin); a fake at η +1 (FP, binned by itself → right bin); a top at η +2 missed.
    rec = collect([(truth([0, 0], [-0.1, 2.0], [0.0, 0.0]), preds([0, 0], [0.9, 0.8], [0.1, 1.0], [0.0, 1.0]))])
    prec = binned_precision_at_recall(rec, "eta", [-3.0, 0.0, 3.0], recall=0.3)
    assert prec[0] == 1.0  # left: 1 TP, 1 truth
    assert math.isnan(prec[1])  # right: 1 FP, 1 truth, recall 0 < 0.29
    # Too few truth objects per bin for a nearest-point reading → NaN.
    assert np.isnan(binned_precision_at_recall(rec, "eta", [-3.0, 0.0, 3.0], recall=0.3, min_truth=2)).all()
    # pT: truths (500 GeV), the TP (by its truth, 500) and the FP (by itself, 450) all in the first bin:
    # points (P 1, R 1/2) and (P 1/2, R 1/2); at R 0.5 the lower threshold wins → 1/2.
    prec = binned_precision_at_recall(rec, "pt", [100.0, 1000.0, 2000.0], recall=0.5)
    assert prec[0] == 0.5
    assert math.isnan(prec[1])
    with pytest.raises(ValueError, match="variable"):
        binned_precision_at_recall(rec, "mass", [0.0, 1.0])


def synthetic_models(n_events: int = 300) -> dict[str, DetectionRecords]:
    """Two toy detectors (a good and a poor one) on random t/V/H events with 0–3 objects."""
    rng = np.random.default_rng(7)
    truths = []
    for _ in range(n_events):
        g = int(rng.integers(0, 4))
        truths.append(truth(list(rng.integers(0, 3, g)), list(rng.uniform(-2.5, 2.5, g)),
                            list(rng.uniform(-math.pi, math.pi, g)), list(np.exp(rng.uniform(5.3, 7.6, g)))))

    def detector(eff: float, sigma: float, fakes: float) -> list[PredictedJets]:
        out = []
        for t in truths:
            found = rng.random(len(t)) < eff
            k = int(rng.poisson(fakes))
            n = int(found.sum())
            out.append(preds(
                list(t.cls[found]) + list(rng.integers(0, 3, k)),
                list(rng.uniform(0.5, 1.0, n)) + list(rng.uniform(0.0, 0.7, k)),
                list(t.eta[found] + rng.normal(0, sigma, n)) + list(rng.uniform(-2.9, 2.9, k)),
                list(t.phi[found] + rng.normal(0, sigma, n)) + list(rng.uniform(-math.pi, math.pi, k)),
                list(t.pt[found] * rng.normal(1, 0.1, n)) + list(rng.uniform(100, 1500, k))))
        return out

    return {"good": collect(zip(truths, detector(0.9, 0.03, 0.3), strict=True)),
            "poor": collect(zip(truths, detector(0.5, 0.1, 1.0), strict=True))}


def test_plots_render(tmp_path: Path) -> None:
    from jetssd.evaluate import plots

    models = synthetic_models()
    models["empty"] = DetectionRecords()  # a model without events must not break the figures
    for fn, name in ((plots.plot_pr_curves, "pr.png"), (plots.plot_precision_vs, "prec.png"),
                     (plots.plot_residuals, "res.png")):
        out = tmp_path / "sub" / name
        fig = fn(models, out)
        assert out.stat().st_size > 10_000
        assert len(fig.axes) >= 4
    s = summarize(models["good"])
    assert s["ap"]["voc"] > summarize(models["poor"])["ap"]["voc"]
