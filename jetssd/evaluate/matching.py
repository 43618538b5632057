"""One matcher for every model and the physics baseline: predictions ↔ truth objects by ΔR in η-φ.

The reference (pfjet-ssd-reference §6.2) matches in normalised image units, where η is divided by 340 px
and φ by 360 px, so its 0.1 radius is anisotropic (≈ 0.59 in η, ≈ 0.63 rad in φ); it also lets one
detection match several truth objects (§10.15). Here the distance is the true ΔR = √(Δη² + Δφ²) with Δφ
wrapped (:func:`jetssd.geometry.delta_r`), and the assignment is one-to-one:

* predictions are visited in descending score (ties keep input order);
* each takes the closest still-unmatched truth object **of its own class** with ΔR ≤ ``max_dr``;
* a prediction that finds none is a false positive (so is a wrong-class hit), a truth object that no
  prediction takes is a false negative.

This is the greedy rule of VOC and COCO with IoU replaced by ΔR, so all three AP flavours of
:mod:`jetssd.evaluate.metrics` share one set of TP/FP/FN decisions.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray

from jetssd import geometry
from jetssd.event import BaselineJets, TruthObjects

DEFAULT_MAX_DR = 0.4
"""Default matching radius in ΔR (η and rad): half the jet radius R = 0.8 of the reference's AK8 jets and
of its 46-pixel boxes. The reference's 0.1 in normalised units is ≈ 0.6 in ΔR, wider than half a jet,
where a neighbouring object can already be closer; 0.4 keeps a match inside the jet it names. Every
function takes ``max_dr`` so the reference's radius (≈ 0.6) can be reproduced."""


class JetsLike(Protocol):
    """Columnar predictions of one event: any object with these 1-D attributes of equal length [n].

    ``jetssd.postprocess.Detections`` has exactly these; :func:`baseline_as_predictions` adapts the
    physics baseline.
    """

    @property
    def label(self) -> NDArray[Any]:
        """int class id, 0 t, 1 V, 2 H."""

    @property
    def score(self) -> NDArray[Any]:
        """float confidence; higher is more confident."""

    @property
    def eta(self) -> NDArray[Any]:
        """float pseudorapidity."""

    @property
    def phi(self) -> NDArray[Any]:
        """float azimuth, rad (any real value; wrapped when compared)."""

    @property
    def pt(self) -> NDArray[Any]:
        """float transverse momentum, GeV."""


@dataclass(frozen=True, eq=False)
class PredictedJets:
    """The simplest :class:`JetsLike`: five columns of shape [n]."""

    label: NDArray[np.int64]
    score: NDArray[np.float64]
    eta: NDArray[np.float64]
    phi: NDArray[np.float64]
    pt: NDArray[np.float64]

    def __len__(self) -> int:
        return len(self.score)


def baseline_as_predictions(b: BaselineJets) -> PredictedJets:
    """The physics baseline as predictions: label = mass-window class, score = 1 − τ ratio (reference §1.5)."""
    return PredictedJets(
        label=b.cls.astype(np.int64),
        score=b.score.astype(np.float64),
        eta=b.eta.astype(np.float64),
        phi=b.phi.astype(np.float64),
        pt=b.pt.astype(np.float64),
    )


def _pred_columns(pred: JetsLike) -> tuple[NDArray[np.int64], NDArray[np.float64], NDArray[np.float64],
                                           NDArray[np.float64], NDArray[np.float64]]:
    """The five prediction columns as 1-D arrays of one length; ValueError otherwise."""
    label = np.asarray(pred.label).astype(np.int64, copy=False)
    cols = [np.asarray(c, dtype=np.float64) for c in (pred.score, pred.eta, pred.phi, pred.pt)]
    if any(c.ndim != 1 for c in (label, *cols)) or len({len(label), *(len(c) for c in cols)}) != 1:
        shapes = [np.shape(c) for c in (label, *cols)]
        raise ValueError(f"predictions need 1-D label, score, eta, phi, pt of one length, got shapes {shapes}")
    score, eta, phi, pt = cols
    return label, score, eta, phi, pt


@dataclass(frozen=True, eq=False)
class EventMatch:
    """The matching of one event.

    Attributes:
        tp: bool [n], prediction i is a true positive.
        matched_truth: int64 [n], index of the truth object prediction i took, −1 for a false positive.
        matched_pred: int64 [g], index of the prediction that took truth object j, −1 for a miss.
        dr: float64 [n], ΔR between prediction i and its truth object, NaN for a false positive.
    """

    tp: NDArray[np.bool_]
    matched_truth: NDArray[np.int64]
    matched_pred: NDArray[np.int64]
    dr: NDArray[np.float64]

    @property
    def n_tp(self) -> int:
        return int(self.tp.sum())

    @property
    def n_fp(self) -> int:
        return int(len(self.tp) - self.tp.sum())

    @property
    def n_fn(self) -> int:
        return int((self.matched_pred < 0).sum())


def match_event(truth: TruthObjects, pred: JetsLike, max_dr: float = DEFAULT_MAX_DR) -> EventMatch:
    """Match one event's predictions to its truth objects (greedy by score, same class, ΔR ≤ max_dr).

    Args:
        truth: the event's truth objects, [g].
        pred: the event's predictions, [n] (any :class:`JetsLike`).
        max_dr: matching radius in ΔR (η, rad); see :data:`DEFAULT_MAX_DR`. The boundary counts as a match.

    A NaN position or score never matches (its ΔR comparisons are false).
    """
    label, score, eta, phi, _ = _pred_columns(pred)
    n, g = len(label), len(truth)
    tp = np.zeros(n, dtype=np.bool_)
    matched_truth = np.full(n, -1, dtype=np.int64)
    matched_pred = np.full(g, -1, dtype=np.int64)
    dr_out = np.full(n, np.nan, dtype=np.float64)
    if n == 0 or g == 0:
        return EventMatch(tp, matched_truth, matched_pred, dr_out)

    dr = geometry.delta_r(eta[:, None], phi[:, None], truth.eta[None, :], truth.phi[None, :])  # [n, g]
    with np.errstate(invalid="ignore"):
        allowed = (label[:, None] == truth.cls[None, :].astype(np.int64)) & (dr <= max_dr)
    cost = np.where(allowed, dr, np.inf)
    # A stable sort on −score keeps equal scores in input order, so the result is reproducible; NaN
    # scores sort last. n is at most a few hundred (top-k), so a Python loop over rows is cheap.
    for i in np.argsort(-score, kind="stable"):
        j = int(np.argmin(cost[i]))
        if not np.isfinite(cost[i, j]):
            continue
        tp[i] = True
        matched_truth[i] = j
        matched_pred[j] = i
        dr_out[i] = dr[i, j]
        cost[:, j] = np.inf  # each truth object is taken at most once
    return EventMatch(tp, matched_truth, matched_pred, dr_out)


_PRED_KEYS = ("cls", "score", "tp", "eta", "phi", "pt", "truth_eta", "truth_phi", "truth_pt", "event")
_TRUTH_KEYS = ("cls", "eta", "phi", "pt", "found", "pred_score", "pred_eta", "pred_phi", "pred_pt", "event")


@dataclass(eq=False)
class DetectionRecords:
    """Flat per-prediction and per-truth records accumulated over events (one model or the baseline).

    Fill with :meth:`add` (or :func:`collect`); read the columns through the properties below, which
    concatenate the per-event chunks once and cache the result until the next :meth:`add`.

    Per prediction [N_pred]: ``pred_cls`` (int64), ``pred_score``, ``pred_tp`` (bool), ``pred_eta``,
    ``pred_phi`` (rad), ``pred_pt`` (GeV), ``pred_truth_eta/phi/pt`` (of the matched truth, NaN for a
    false positive), ``pred_event`` (int64, event number in the order added).

    Per truth object [N_truth]: ``truth_cls``, ``truth_eta``, ``truth_phi``, ``truth_pt``, ``truth_found``
    (bool), ``truth_pred_score/eta/phi/pt`` (of the matching prediction, NaN for a miss), ``truth_event``.

    Attributes:
        events: number of events added (including events without truth or predictions, e.g. QCD).
        max_dr: the matching radius used, when known (set by :func:`collect`), for the summary.
    """

    events: int = 0
    max_dr: float | None = None
    _pred: dict[str, list[NDArray[Any]]] = field(
        default_factory=lambda: {k: [] for k in _PRED_KEYS}, repr=False)
    _truth: dict[str, list[NDArray[Any]]] = field(
        default_factory=lambda: {k: [] for k in _TRUTH_KEYS}, repr=False)
    _cache: dict[str, NDArray[Any]] = field(default_factory=dict, repr=False)

    def add(self, truth: TruthObjects, pred: JetsLike, match: EventMatch) -> None:
        """Append one event's predictions, truth objects and their :class:`EventMatch`."""
        label, score, eta, phi, pt = _pred_columns(pred)
        if len(match.tp) != len(label) or len(match.matched_pred) != len(truth):
            raise ValueError(f"match is for {len(match.tp)} predictions / {len(match.matched_pred)} truth "
                             f"objects, got {len(label)} / {len(truth)}")
        t_eta = truth.eta.astype(np.float64)
        t_phi = truth.phi.astype(np.float64)
        t_pt = truth.pt.astype(np.float64)
        mt, mp = match.matched_truth, match.matched_pred

        def take(values: NDArray[np.float64], index: NDArray[np.int64]) -> NDArray[np.float64]:
            """values[index] where index ≥ 0, NaN where −1."""
            out = np.full(len(index), np.nan)
            ok = index >= 0
            out[ok] = values[index[ok]]
            return out

        ev = self.events
        p = self._pred
        for key, col in (("cls", label), ("score", score), ("tp", match.tp.astype(np.bool_)), ("eta", eta),
                         ("phi", phi), ("pt", pt), ("truth_eta", take(t_eta, mt)), ("truth_phi", take(t_phi, mt)),
                         ("truth_pt", take(t_pt, mt)), ("event", np.full(len(label), ev, np.int64))):
            p[key].append(col)
        t = self._truth
        for key, col in (("cls", truth.cls.astype(np.int64)), ("eta", t_eta), ("phi", t_phi), ("pt", t_pt),
                         ("found", mp >= 0), ("pred_score", take(score, mp)), ("pred_eta", take(eta, mp)),
                         ("pred_phi", take(phi, mp)), ("pred_pt", take(pt, mp)),
                         ("event", np.full(len(truth), ev, np.int64))):
            t[key].append(col)
        self.events += 1
        self._cache.clear()

    def extend(self, other: DetectionRecords) -> None:
        """Append all events of ``other`` (e.g. from another worker); event numbers are shifted."""
        for mine, theirs in ((self._pred, other._pred), (self._truth, other._truth)):
            for key, chunks in theirs.items():
                mine[key].extend(c + self.events if key == "event" else c for c in chunks)
        self.events += other.events
        self._cache.clear()

    def _col(self, group: str, key: str, dtype: type[np.generic]) -> NDArray[Any]:
        name = f"{group}_{key}"
        if name not in self._cache:
            chunks = (self._pred if group == "pred" else self._truth)[key]
            self._cache[name] = np.concatenate(chunks).astype(dtype, copy=False) if chunks else np.zeros(0, dtype)
        return self._cache[name]

    @property
    def n_pred(self) -> int:
        return len(self.pred_score)

    @property
    def n_truth(self) -> int:
        return len(self.truth_pt)

    # Per prediction ------------------------------------------------------------------------------
    @property
    def pred_cls(self) -> NDArray[np.int64]:
        return self._col("pred", "cls", np.int64)

    @property
    def pred_score(self) -> NDArray[np.float64]:
        return self._col("pred", "score", np.float64)

    @property
    def pred_tp(self) -> NDArray[np.bool_]:
        return self._col("pred", "tp", np.bool_)

    @property
    def pred_eta(self) -> NDArray[np.float64]:
        return self._col("pred", "eta", np.float64)

    @property
    def pred_phi(self) -> NDArray[np.float64]:
        return self._col("pred", "phi", np.float64)

    @property
    def pred_pt(self) -> NDArray[np.float64]:
        return self._col("pred", "pt", np.float64)

    @property
    def pred_truth_eta(self) -> NDArray[np.float64]:
        return self._col("pred", "truth_eta", np.float64)

    @property
    def pred_truth_phi(self) -> NDArray[np.float64]:
        return self._col("pred", "truth_phi", np.float64)

    @property
    def pred_truth_pt(self) -> NDArray[np.float64]:
        return self._col("pred", "truth_pt", np.float64)

    @property
    def pred_event(self) -> NDArray[np.int64]:
        return self._col("pred", "event", np.int64)

    # Per truth object ----------------------------------------------------------------------------
    @property
    def truth_cls(self) -> NDArray[np.int64]:
        return self._col("truth", "cls", np.int64)

    @property
    def truth_eta(self) -> NDArray[np.float64]:
        return self._col("truth", "eta", np.float64)

    @property
    def truth_phi(self) -> NDArray[np.float64]:
        return self._col("truth", "phi", np.float64)

    @property
    def truth_pt(self) -> NDArray[np.float64]:
        return self._col("truth", "pt", np.float64)

    @property
    def truth_found(self) -> NDArray[np.bool_]:
        return self._col("truth", "found", np.bool_)

    @property
    def truth_pred_score(self) -> NDArray[np.float64]:
        return self._col("truth", "pred_score", np.float64)

    @property
    def truth_pred_eta(self) -> NDArray[np.float64]:
        return self._col("truth", "pred_eta", np.float64)

    @property
    def truth_pred_phi(self) -> NDArray[np.float64]:
        return self._col("truth", "pred_phi", np.float64)

    @property
    def truth_pred_pt(self) -> NDArray[np.float64]:
        return self._col("truth", "pred_pt", np.float64)

    @property
    def truth_event(self) -> NDArray[np.int64]:
        return self._col("truth", "event", np.int64)


def collect(events: Iterable[tuple[TruthObjects, JetsLike]], max_dr: float = DEFAULT_MAX_DR) -> DetectionRecords:
    """Match every (truth, predictions) pair with :func:`match_event` and accumulate the records."""
    records = DetectionRecords(max_dr=max_dr)
    for truth, pred in events:
        records.add(truth, pred, match_event(truth, pred, max_dr))
    return records
