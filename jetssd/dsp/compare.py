"""How closely the DSP emulation follows the float model, event by event (issue 6 item 6).

AP says whether the emulated model is as *good*; this says whether it gives the *same answer*. Per event, the
confident jets (score ≥ ``min_score``) of the two detectors are compared:

* **identical**: the same number of confident jets, and each reference jet (by descending score) pairs with
  the nearest still-unpaired other jet *of its class* within ΔR ≤ ``max_dr`` (φ wrapped) with
  |ΔpT| / pT ≤ ``max_pt_rel``. The defaults (0.05 ≈ 2.5 pixels, 5 %) are far below the analysis resolution (the
  matcher's ΔR 0.4) and the pT resolution, and far above float noise;
* **same classes**: the same multiset of confident classes (positions and pT free).

Numpy only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from jetssd.geometry import delta_r
from jetssd.postprocess import Detections

MIN_SCORE = 0.5
MAX_DR = 0.05
MAX_PT_REL = 0.05
PAIR_DR = 0.4
"""Widest ΔR at which two jets of the same class count as the same jet for the mean |Δ| (the evaluation matcher's
radius)."""


@dataclass(frozen=True)
class Agreement:
    """Fractions of events (0–1) whose confident jets agree; mean ΔR and |ΔpT|/pT over the pairs of same-class
    jets (nearest, ΔR ≤ 0.4) of all events."""

    events: int
    identical: float
    same_classes: float
    mean_abs_dr: float
    mean_abs_pt_rel: float
    settings: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return {"events": self.events, "identical_fraction": self.identical,
                "same_classes_fraction": self.same_classes, "mean_abs_dr": self.mean_abs_dr,
                "mean_abs_pt_rel": self.mean_abs_pt_rel, "settings": self.settings}


def _confident(d: Detections, min_score: float) -> Detections:
    keep = np.flatnonzero(d.score >= min_score)
    keep = keep[np.argsort(-d.score[keep], kind="stable")]
    return Detections(label=d.label[keep], score=d.score[keep], eta=d.eta[keep], phi=d.phi[keep], pt=d.pt[keep])


def agreement(reference: Sequence[Detections], other: Sequence[Detections], *, min_score: float = MIN_SCORE,
              max_dr: float = MAX_DR, max_pt_rel: float = MAX_PT_REL) -> Agreement:
    """Compare two detectors' jets on the same events (same order). Raises ValueError on different lengths."""
    if len(reference) != len(other):
        raise ValueError(f"{len(reference)} reference events but {len(other)} others")
    identical = same_classes = 0
    drs: list[float] = []
    pt_rels: list[float] = []
    for ref_event, other_event in zip(reference, other, strict=True):
        a, b = _confident(ref_event, min_score), _confident(other_event, min_score)
        same_classes += sorted(a.label.tolist()) == sorted(b.label.tolist())
        free = np.ones(len(b.label), bool)
        close = 0
        for i in range(len(a.label)):
            dr = np.where(free & (b.label == a.label[i]), delta_r(a.eta[i], a.phi[i], b.eta, b.phi), np.inf)
            j = int(np.argmin(dr)) if len(dr) else -1
            if j < 0 or dr[j] > PAIR_DR:
                continue
            free[j] = False
            pt_rel = abs(float(b.pt[j]) - float(a.pt[i])) / max(float(a.pt[i]), 1e-6)
            drs.append(float(dr[j]))
            pt_rels.append(pt_rel)
            close += dr[j] <= max_dr and pt_rel <= max_pt_rel
        identical += len(a.label) == len(b.label) == close
    n = max(len(reference), 1)
    return Agreement(events=len(reference), identical=identical / n, same_classes=same_classes / n,
                     mean_abs_dr=float(np.mean(drs)) if drs else 0.0,
                     mean_abs_pt_rel=float(np.mean(pt_rels)) if pt_rels else 0.0,
                     settings={"min_score": min_score, "max_dr": max_dr, "max_pt_rel": max_pt_rel})
