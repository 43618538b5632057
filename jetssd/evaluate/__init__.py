"""Evaluation: one ΔR matcher, AP in three flavours, per-class metrics and plots (numpy + matplotlib).

Typical use::

    from jetssd.evaluate import collect, summarize, baseline_as_predictions
    records = collect((ev.truth, detections_of(ev)) for ev in events)          # any JetsLike predictions
    baseline = collect((ev.truth, baseline_as_predictions(ev.baseline)) for ev in events)
    summarize(records)  # {"events", "ap": {"reference", "voc", "coco"}, "per_class": {...}}

* :mod:`.matching` — :func:`match_event` (greedy by score, same class, φ-wrapped ΔR ≤ 0.4, one-to-one) and
  :class:`DetectionRecords` (flat per-prediction / per-truth arrays over events).
* :mod:`.metrics` — precision-recall, :func:`ap_voc`, :func:`ap_coco`, :func:`ap_reference` (the paper's
  number, quirks included), precision at recall, :func:`summarize`, :func:`fake_rate`.
* :mod:`.plots` — PR curves, precision at R = 0.3 versus η/φ/pT, residuals (imported on demand: it pulls
  in matplotlib).
"""

from jetssd.evaluate.matching import (
    DEFAULT_MAX_DR,
    DetectionRecords,
    EventMatch,
    JetsLike,
    PredictedJets,
    baseline_as_predictions,
    collect,
    match_event,
)
from jetssd.evaluate.metrics import (
    ap_coco,
    ap_reference,
    ap_voc,
    average_precisions,
    fake_rate,
    precision_at_recall,
    precision_recall,
    precision_recall_reference,
    summarize,
)

__all__ = [
    "DEFAULT_MAX_DR",
    "DetectionRecords",
    "EventMatch",
    "JetsLike",
    "PredictedJets",
    "ap_coco",
    "ap_reference",
    "ap_voc",
    "average_precisions",
    "baseline_as_predictions",
    "collect",
    "fake_rate",
    "match_event",
    "precision_at_recall",
    "precision_recall",
    "precision_recall_reference",
    "summarize",
]
