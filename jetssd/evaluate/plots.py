"""Evaluation plots (PNG) comparing several models: PR curves, precision at fixed recall, residuals.

Every function takes ``{model name: DetectionRecords}`` (insertion order = legend order; the physics
baseline is just another entry), draws with matplotlib's object-oriented API only (``Figure``, no
pyplot, so no global state and thread-safe), returns the Figure and, given ``out_png``, saves it.

* :func:`plot_pr_curves` — pooled and per-class precision-recall curves, AP in the legend.
* :func:`plot_precision_vs` — precision at recall 0.3 in bins of true η, φ and pT (reference §6.4).
* :func:`plot_residuals` — Δη, Δφ (signed, wrapped) and pT_pred/pT_true versus true pT, mean ± std.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter
from numpy.typing import NDArray

from jetssd import geometry
from jetssd.evaluate.matching import DetectionRecords
from jetssd.evaluate.metrics import (
    average_precisions,
    binned_mean_std,
    binned_precision_at_recall,
    class_sample,
    precision_recall,
    residuals,
)
from jetssd.event import CLASS_NAMES

N_BINS = 10
"""Bins per axis in the binned plots, as the reference."""
LINESTYLES = ("-", "--", "-.", ":")
MARKERS = ("o", "s", "^", "v", "D", "P")
_PANELS: tuple[tuple[str, int | None], ...] = (("all classes", None),
                                                *((name, c) for c, name in enumerate(CLASS_NAMES)))


def _style(k: int) -> dict[str, Any]:
    """Colour, line style and marker of the k-th model: colour and dash both change, so the curves stay
    apart in greyscale print too."""
    return {"color": f"C{k % 10}", "linestyle": LINESTYLES[k % len(LINESTYLES)], "marker": MARKERS[k % len(MARKERS)]}


_NICE_PT = (10, 20, 30, 50, 100, 200, 300, 500, 1000, 2000, 3000, 5000, 10000)


def _log_pt_axis(ax: Axes, lo: float, hi: float) -> None:
    """Log x axis with plain GeV tick labels (200, 500, 1000) instead of 2×10², which overlap."""
    ax.set_xscale("log")
    ax.set_xlim(lo, hi)
    ticks: list[float] = [t for t in _NICE_PT if lo <= t <= hi]
    if len(ticks) < 2:
        ticks = [lo, hi]
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())


def _save(fig: Figure, out_png: str | Path | None) -> Figure:
    if out_png is not None:
        Path(out_png).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out_png)
    return fig


def _fmt(x: float) -> str:
    return "n/a" if not math.isfinite(x) else f"{x:.3f}"


def plot_pr_curves(models: Mapping[str, DetectionRecords], out_png: str | Path | None = None) -> Figure:
    """Precision versus recall, pooled over classes and per class (1 × 4 panels), one curve per model.

    The curve is the raw one of :func:`~jetssd.evaluate.metrics.precision_recall` (one point per distinct
    score), drawn as a line; the legend gives VOC / COCO / reference AP of that panel.
    """
    fig = Figure(figsize=(18.0, 6.0), dpi=100, layout="constrained")
    axes = fig.subplots(1, len(_PANELS), sharey=True)
    for ax, (title, cls) in zip(axes, _PANELS, strict=True):
        for k, (name, rec) in enumerate(models.items()):
            scores, tp, n_truth = class_sample(rec, cls)
            p, r, _ = precision_recall(scores, tp, n_truth)
            ap = average_precisions(scores, tp, n_truth)
            style = _style(k)
            style["marker"] = None
            ax.plot(r, p, linewidth=1.4, **style,
                    label=f"{name}: VOC {_fmt(ap['voc'])}, COCO {_fmt(ap['coco'])}, ref {_fmt(ap['reference'])}")
        ax.set_title(f"{title}" if cls is None else f"class {title}")
        ax.set_xlim(0.0, 1.0)
        ax.set_ylim(0.0, 1.02)
        ax.set_xlabel("recall")
        ax.grid(alpha=0.3)
        # Below the panel: a legend inside would hide curves that drop at high recall.
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), fontsize="small", title="AP",
                  title_fontsize="small", frameon=False)
    axes[0].set_ylabel("precision")
    return _save(fig, out_png)


def _pt_edges(models: Mapping[str, DetectionRecords], n_bins: int = N_BINS) -> NDArray[np.float64]:
    """Log-spaced pT edges between the smallest and largest truth pT of all models (shared, so models
    are compared bin by bin); 1–1000 GeV when there is no truth."""
    pts = np.concatenate([r.truth_pt for r in models.values()] or [np.zeros(0)])
    pts = pts[np.isfinite(pts) & (pts > 0)]
    lo, hi = (float(pts.min()), float(pts.max())) if len(pts) else (1.0, 1000.0)
    if hi <= lo:  # a single pT value: widen so the bins are well defined
        lo, hi = lo / 1.5, hi * 1.5
    return np.geomspace(lo, hi, n_bins + 1)


def plot_precision_vs(models: Mapping[str, DetectionRecords], out_png: str | Path | None = None,
                      recall: float = 0.3, n_bins: int = N_BINS, min_truth: int = 10) -> Figure:
    """Precision at recall ``recall`` versus η, φ and pT (columns), pooled and per class (rows).

    Binning as :func:`~jetssd.evaluate.metrics.binned_precision_at_recall` (truth value for TP and truth,
    predicted value for FP). η and φ: ``n_bins`` uniform bins over the image acceptance; pT: ``n_bins`` log
    bins spanning the truth pT. A bin where the recall is not reached, or with fewer than ``min_truth``
    truth objects (too coarse a recall scale for a nearest-point reading), is left empty.
    """
    eta_edges = np.linspace(geometry.ETA_MIN, geometry.ETA_MAX, n_bins + 1)
    phi_edges = np.linspace(-math.pi, math.pi, n_bins + 1)
    pt_edges = _pt_edges(models, n_bins)
    columns = (("eta", eta_edges, r"$\eta$"), ("phi", phi_edges, r"$\phi$ [rad]"),
               ("pt", pt_edges, r"true $p_T$ [GeV]"))
    fig = Figure(figsize=(15.0, 3.2 * len(_PANELS)), dpi=100, layout="constrained")
    axes = fig.subplots(len(_PANELS), len(columns), sharey=True, squeeze=False)
    for row, (title, cls) in enumerate(_PANELS):
        for col, (var, edges, xlabel) in enumerate(columns):
            ax: Axes = axes[row, col]
            centres = np.sqrt(edges[:-1] * edges[1:]) if var == "pt" else 0.5 * (edges[:-1] + edges[1:])
            for k, (name, rec) in enumerate(models.items()):
                prec = binned_precision_at_recall(rec, var, edges, recall, cls, min_truth)
                ax.plot(centres, prec, markersize=5, linewidth=1.2, label=name, **_style(k))
            if var == "pt":
                _log_pt_axis(ax, edges[0], edges[-1])
            else:
                ax.set_xlim(edges[0], edges[-1])
            ax.set_ylim(0.0, 1.05)
            ax.grid(alpha=0.3)
            if row == len(_PANELS) - 1:
                ax.set_xlabel(xlabel)
            if col == 0:
                ax.set_ylabel(f"{title}\nprecision at R = {recall:g}")
    if models:
        axes[0, 0].legend(loc="lower left", fontsize="small")
    fig.suptitle(f"Precision at recall {recall:g} (TP and truth binned by the truth value, FP by the predicted one)")
    return _save(fig, out_png)


def plot_residuals(models: Mapping[str, DetectionRecords], out_png: str | Path | None = None,
                   n_bins: int = N_BINS) -> Figure:
    """Δη, Δφ and pT_pred/pT_true (rows) versus true pT, per class (columns), mean ± std per log bin.

    Δ = predicted − true; Δφ is wrapped (signed). Models are offset slightly along x so their error bars
    do not hide each other.
    """
    edges = _pt_edges(models, n_bins)
    centres = np.sqrt(edges[:-1] * edges[1:])
    rows = (("deta", r"$\Delta\eta$ (pred − true)", 0.0), ("dphi", r"$\Delta\phi$ (pred − true) [rad]", 0.0),
            ("pt_ratio", r"$p_T^{pred} / p_T^{true}$", 1.0))
    fig = Figure(figsize=(15.0, 10.0), dpi=100, layout="constrained")
    axes = fig.subplots(len(rows), len(CLASS_NAMES), sharex=True, sharey="row", squeeze=False)
    # Multiplicative x offsets spreading the models over ±25 % of a (log) bin width around its centre.
    n_models = max(len(models), 1)
    shifts = (edges[1] / edges[0]) ** np.linspace(-0.25, 0.25, n_models) if n_models > 1 else np.ones(1)
    for c, cname in enumerate(CLASS_NAMES):
        res = {name: residuals(rec, c) for name, rec in models.items()}
        for r_i, (key, ylabel, ideal) in enumerate(rows):
            ax: Axes = axes[r_i, c]
            ax.axhline(ideal, color="0.5", linewidth=0.8)
            for k, (name, d) in enumerate(res.items()):
                mean, std, count = binned_mean_std(d["pt_true"], d[key], edges)
                ok = count > 0
                style = _style(k)
                ax.errorbar(centres[ok] * shifts[k], mean[ok], yerr=std[ok], capsize=2,
                            markersize=4, linewidth=1.0, label=name, **style)
            _log_pt_axis(ax, edges[0], edges[-1])
            ax.grid(alpha=0.3)
            if r_i == 0:
                ax.set_title(f"class {cname}")
            if r_i == len(rows) - 1:
                ax.set_xlabel(r"true $p_T$ [GeV]")
            if c == 0:
                ax.set_ylabel(ylabel)
    if models:
        axes[0, 0].legend(loc="best", fontsize="small")
    fig.suptitle("Residuals of matched objects: mean ± std per true-pT bin")
    return _save(fig, out_png)
