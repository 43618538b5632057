"""Event display: one PNG per event with the image channels, truth objects, baseline jets and predictions.

Four panels share one logarithmic colour scale (GeV per pixel): the sum of the three channels, then
tracks (pT), photons/ECAL (ET) and neutral hadrons/HCAL (ET). η runs along x and φ along y, as in the
image tensor and the SSD box coordinates (x along η, y along φ; reference §1.6), so a box drawn here is
the box the detector sees. Every circle and box is drawn periodically in φ: an object near φ = ±π
appears at both the top and the bottom edge.

Markers:

* truth objects: solid circles of R = 0.8, coloured by class, labelled with the class and pT;
* baseline jets (``event.baseline``): dashed circles of R = 0.8, labelled with the class and score;
* predictions (:class:`DisplayJet`): squares of the SSD object size (0.8 × 0.8) with a cross at the
  centre, labelled with the class and score.

Only matplotlib's object-oriented API is used (``matplotlib.figure.Figure``, no pyplot), so rendering is
thread-safe and never touches global backend state.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.colors import Colormap, ListedColormap, LogNorm
from matplotlib.figure import Figure
from matplotlib.image import AxesImage
from matplotlib.lines import Line2D
from matplotlib.patches import Circle, Patch, Rectangle
from numpy.typing import NDArray

from jetssd import geometry
from jetssd.event import CLASS_NAMES, Event
from jetssd.rasterize import densify

JET_RADIUS = 0.8
"""Radius of the truth and baseline circles (the anti-kT R of the reference's AK8 jets)."""
BOX_HALF_SIZE = 0.4
"""Half side of a prediction square: the reference's 46-pixel object size ≈ 0.8 in η and φ."""
VMIN_GEV = 0.1
"""Lower end of the log colour scale; emptier pixels are left white."""

CLASS_COLOURS = {"t": "#e41a1c", "V": "#ff7f00", "H": "#e7298a"}
"""Annotation colour per class: warm hues that stand out on the green-to-purple colour map."""

# Light green for soft pileup hits to dark purple for the hard cores. The palest (yellow) quarter of
# viridis is cut off: it vanishes on the white background of empty pixels.
_CMAP_NAME = "viridis_r"
_CMAP_RANGE = (0.25, 1.0)
DISPLAY_DILATION = 1
"""Each pixel is shown as the maximum over its (2k+1)² neighbourhood (k = 1: 3×3), for display only:
a single 1-pixel hit is otherwise about one screen pixel and disappears. Counts and sums are raw."""
LABEL_STEP = 0.24
"""Vertical spacing (rad) between stacked labels that would otherwise overlap."""

_PANEL_NAMES = ("sum of the three channels", "tracks (pT)", "photons / ECAL (ET)", "neutral hadrons / HCAL (ET)")


@dataclass(frozen=True)
class DisplayJet:
    """A detector prediction to draw: class label ("t", "V" or "H"), η, φ (rad), pT (GeV), score (0…1)."""

    label: str
    eta: float
    phi: float
    pt: float
    score: float

    def __post_init__(self) -> None:
        if self.label not in CLASS_NAMES:
            raise ValueError(f"label must be one of {CLASS_NAMES}, got {self.label!r}")


def wrapped_centres(eta: float, phi: float, reach: float) -> list[tuple[float, float]]:
    """Centres (η, φ) at which to draw a shape reaching ``reach`` (rad) from its centre, so that φ wraps.

    The shape is drawn at φ wrapped into [−π, π) and again at φ ± 2π wherever that copy still overlaps
    the φ range [−π, π]; the axes clip the parts outside. An object at φ = 3.0 with R = 0.8 thus gives
    two centres, (η, 3.0) and (η, 3.0 − 2π).
    """
    base = float(geometry.wrap_phi(phi))
    return [(eta, base + shift) for shift in (0.0, -2 * math.pi, 2 * math.pi)
            if abs(base + shift) < math.pi + reach]


def _cmap() -> Colormap:
    base = colormaps[_CMAP_NAME]
    lo, hi = _CMAP_RANGE
    colours = base(np.linspace(lo, hi, 256))
    return ListedColormap(colours, name=f"{_CMAP_NAME}_cut").with_extremes(bad="white", under="white")


def dilate(img: NDArray[np.float32], k: int = DISPLAY_DILATION) -> NDArray[np.float32]:
    """Max filter over a (2k+1)×(2k+1) window of an [η, φ] image: zero-padded in η, periodic in φ."""
    out = img.copy()
    padded = np.pad(img, ((k, k), (0, 0)))
    n_eta = img.shape[0]
    for d_eta in range(-k, k + 1):
        rows = padded[k + d_eta: k + d_eta + n_eta]
        for d_phi in range(-k, k + 1):
            np.maximum(out, np.roll(rows, d_phi, axis=1), out=out)
    return out


def _panel_images(event: Event) -> list[NDArray[np.float32]]:
    """[sum, track, photon, neutral hadron] images, each [340 η, 360 φ] in GeV."""
    image = densify(event.pixels)
    return [image.sum(axis=0), image[0], image[1], image[2]]


def _draw_image(ax: Axes, img: NDArray[np.float32], norm: LogNorm) -> AxesImage:
    """imshow with η along x and φ along y, dilated for visibility (:func:`dilate`); pixels below the
    scale's minimum are masked (white)."""
    masked = np.ma.masked_less(dilate(img).T, norm.vmin)  # [360 φ, 340 η]
    return ax.imshow(
        masked, origin="lower", extent=(geometry.ETA_MIN, geometry.ETA_MAX, geometry.PHI_MIN, geometry.PHI_MAX),
        cmap=_cmap(), norm=norm, interpolation="nearest", aspect="equal",
    )


class _LabelPlacer:
    """Puts labels next to shapes on one axes, stacking neighbours so that they do not overlap.

    A label goes above its shape (or below: ``below=True``, or when above would leave the axes); a
    label that would overlap one already placed moves further out by :data:`LABEL_STEP`.
    """

    def __init__(self, ax: Axes) -> None:
        self.ax = ax
        self.placed: list[tuple[float, float]] = []

    def place(self, eta: float, phi: float, reach: float, colour: str, text: str, below: bool = False) -> None:
        centre = float(geometry.wrap_phi(phi))
        room_above = centre + reach + LABEL_STEP < geometry.PHI_MAX
        room_below = centre - reach - LABEL_STEP > geometry.PHI_MIN
        direction = -1.0 if (below and room_below) or not room_above else 1.0
        y = centre + direction * (reach + 0.04)
        while clashes := [py for px, py in self.placed if abs(y - py) < LABEL_STEP and abs(eta - px) < 1.0]:
            # Next free line beyond the label in the way.
            y = (max(clashes) if direction > 0 else min(clashes)) + direction * LABEL_STEP
        self.placed.append((eta, y))
        self.ax.text(eta, y, text, color=colour, fontsize=7.5, ha="center",
                     va="bottom" if direction > 0 else "top", clip_on=True,
                     bbox={"boxstyle": "round,pad=0.12", "facecolor": "white", "alpha": 0.75,
                           "edgecolor": "none"})


def _draw_circle(ax: Axes, eta: float, phi: float, colour: str, dashed: bool) -> None:
    """A circle of R = 0.8 at every φ-wrapped copy of (η, φ)."""
    for c_eta, c_phi in wrapped_centres(eta, phi, JET_RADIUS):
        ax.add_patch(Circle((c_eta, c_phi), JET_RADIUS, fill=False, edgecolor=colour,
                            linewidth=1.2 if dashed else 1.6, linestyle="--" if dashed else "-"))


def _draw_box(ax: Axes, jet: DisplayJet) -> None:
    """A prediction square with a cross at its centre, at every φ-wrapped copy."""
    colour = CLASS_COLOURS[jet.label]
    for c_eta, c_phi in wrapped_centres(jet.eta, jet.phi, BOX_HALF_SIZE):
        ax.add_patch(Rectangle((c_eta - BOX_HALF_SIZE, c_phi - BOX_HALF_SIZE), 2 * BOX_HALF_SIZE,
                               2 * BOX_HALF_SIZE, fill=False, edgecolor=colour, linewidth=1.2))
        ax.plot([c_eta], [c_phi], marker="x", color=colour, markersize=6, linestyle="none")


def _draw_objects(ax: Axes, event: Event, predictions: Sequence[DisplayJet]) -> None:
    """Truth circles (labels above), baseline dashed circles and prediction boxes (labels below)."""
    labels = _LabelPlacer(ax)
    truth = event.truth
    for i in range(len(truth)):
        name = CLASS_NAMES[int(truth.cls[i])]
        eta, phi = float(truth.eta[i]), float(truth.phi[i])
        _draw_circle(ax, eta, phi, CLASS_COLOURS[name], dashed=False)
        labels.place(eta, phi, JET_RADIUS, CLASS_COLOURS[name], f"{name} {truth.pt[i]:.0f} GeV")
    base = event.baseline
    for i in range(len(base)):
        name = CLASS_NAMES[int(base.cls[i])]
        eta, phi = float(base.eta[i]), float(base.phi[i])
        _draw_circle(ax, eta, phi, CLASS_COLOURS[name], dashed=True)
        labels.place(eta, phi, JET_RADIUS, CLASS_COLOURS[name], f"baseline {name} {base.score[i]:.2f}",
                     below=True)
    for jet in predictions:
        _draw_box(ax, jet)
        labels.place(jet.eta, jet.phi, JET_RADIUS, CLASS_COLOURS[jet.label], f"pred. {jet.label} {jet.score:.2f}",
                     below=True)


def _legend_handles(event: Event, predictions: Sequence[DisplayJet]) -> list[Patch | Line2D]:
    handles: list[Patch | Line2D] = [Patch(facecolor=c, label=name) for name, c in CLASS_COLOURS.items()]
    handles.append(Line2D([], [], color="black", linestyle="-", label="truth (R = 0.8, pT)"))
    if len(event.baseline):
        handles.append(Line2D([], [], color="black", linestyle="--", label="baseline jet (score 1 − τ)"))
    if predictions:
        handles.append(Line2D([], [], color="black", marker="s", markerfacecolor="none", linestyle="none",
                              label="prediction (score)"))
    return handles


def event_summary(event: Event) -> str:
    """One line: process, pileup, candidates and pixels, each only when known."""
    parts = [event.process or "unknown process"]
    if event.n_pileup >= 0:
        parts.append(f"{event.n_pileup} pileup")
    if event.pf is not None:
        parts.append(f"{len(event.pf):,} PF candidates")
    parts.append(f"{len(event.pixels):,} pixels")
    parts.append(f"{len(event.truth)} truth object{'s' if len(event.truth) != 1 else ''}")
    return ", ".join(parts)


def make_figure(event: Event, predictions: Sequence[DisplayJet] | None = None, title: str | None = None) -> Figure:
    """Build the four-panel display of ``event`` (see the module docstring) without saving it."""
    predictions = list(predictions or [])
    images = _panel_images(event)
    vmax = max(float(images[0].max()), 10 * VMIN_GEV)
    norm = LogNorm(vmin=VMIN_GEV, vmax=vmax, clip=False)

    fig = Figure(figsize=(13.0, 12.5), dpi=110, layout="constrained")
    axes = fig.subplots(2, 2, sharex=True, sharey=True)
    for ax, name, img in zip(axes.flat, _PANEL_NAMES, images, strict=True):
        mappable = _draw_image(ax, img, norm)  # all four share ``norm``: any one feeds the colour bar
        n_px = int(np.count_nonzero(img))
        ax.set_title(f"{name}: {n_px:,} px, Σ {float(img.sum()):,.0f} GeV", fontsize=10)
        _draw_objects(ax, event, predictions)
        ax.set_xlim(geometry.ETA_MIN, geometry.ETA_MAX)
        ax.set_ylim(geometry.PHI_MIN, geometry.PHI_MAX)
        ax.set_xlabel("η")
        ax.set_ylabel("φ [rad]")
        ax.tick_params(labelbottom=True, labelleft=True)
    cbar = fig.colorbar(mappable, ax=axes, shrink=0.6, pad=0.01, extend="min")
    size = 2 * DISPLAY_DILATION + 1
    cbar.set_label(f"pixel pT / ET [GeV], log scale (shown {size}×{size} max-filtered)")
    fig.legend(handles=_legend_handles(event, predictions), loc="outside lower center",
               ncol=6, fontsize=9, frameon=False)
    heading = event_summary(event) if title is None else f"{title}\n{event_summary(event)}"
    fig.suptitle(heading, fontsize=12)
    return fig


def render_event(event: Event, out: Path, predictions: Sequence[DisplayJet] | None = None,
                 title: str | None = None) -> Path:
    """Render ``event`` to a PNG at ``out`` (parent folders created) and return the path.

    Args:
        event: pixels, truth and baseline jets are drawn; ``pf``/``process``/``n_pileup`` feed the title.
        out: destination file; the format follows its suffix (PNG recommended).
        predictions: detector outputs to overlay as squares with their score.
        title: first line of the heading; the event summary is always the second line.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    make_figure(event, predictions, title).savefig(out)
    return out


__all__ = ["BOX_HALF_SIZE", "CLASS_COLOURS", "DISPLAY_DILATION", "JET_RADIUS", "DisplayJet", "dilate",
           "event_summary", "make_figure", "render_event", "wrapped_centres"]
