"""Tests of the event display (jetssd.display): PNG output, φ wrap of circles and boxes, labels."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread
from matplotlib.patches import Circle, Rectangle

from jetssd import display
from jetssd.display import DisplayJet, wrapped_centres
from jetssd.event import BaselineJets, Event, PFCandidates, TruthObjects
from jetssd.rasterize import densify, rasterize_sparse


def synthetic_event(seed: int = 0) -> Event:
    """Soft random candidates plus a hard cluster at (η 0.5, φ 3.0) and one at (−1.2, −0.5)."""
    rng = np.random.default_rng(seed)
    n = 800
    pt = list(rng.exponential(1.0, n) + 0.05)
    eta = list(rng.uniform(-3.0, 3.0, n))
    phi = list(rng.uniform(-math.pi, math.pi, n))
    kind = list(rng.integers(0, 3, n))
    for c_eta, c_phi in ((0.5, 3.0), (-1.2, -0.5)):
        k = 30
        pt += list(rng.exponential(30.0, k))
        eta += list(c_eta + rng.normal(0, 0.1, k))
        phi += list(c_phi + rng.normal(0, 0.1, k))  # crosses φ = π: wrapped by the rasterizer
        kind += list(rng.integers(0, 3, k))
    pf = PFCandidates.from_arrays(pt, eta, phi, kind)
    truth = TruthObjects.from_arrays([1, 0], [0.5, -1.2], [3.0, -0.5], [850.0, 1200.0])
    base = BaselineJets.from_arrays([1], [0.52], [3.01], [800.0], [0.3], [82.0])
    return Event(pixels=rasterize_sparse(pf), truth=truth, baseline=base, pf=pf, process="WW", n_pileup=0)


def test_wrapped_centres() -> None:
    # Far from the edge: one copy.
    assert wrapped_centres(0.0, 0.0, 0.8) == [(0.0, 0.0)]
    # φ = 3.0 with R = 0.8 reaches past π: a second copy at 3.0 − 2π.
    centres = wrapped_centres(0.5, 3.0, 0.8)
    assert [c[0] for c in centres] == [0.5, 0.5]
    assert sorted(c[1] for c in centres) == pytest.approx([3.0 - 2 * math.pi, 3.0])
    # φ given outside [−π, π) is wrapped first; a box of half size 0.4 at 2.5 stays below π.
    assert wrapped_centres(1.0, 2.5 + 2 * math.pi, 0.4) == [(1.0, pytest.approx(2.5))]
    assert sorted(c[1] for c in wrapped_centres(1.0, -3.0, 0.4)) == pytest.approx([-3.0, 2 * math.pi - 3.0])


def test_dilate_is_periodic_in_phi_and_padded_in_eta() -> None:
    img = np.zeros((340, 360), np.float32)
    img[0, 0] = 5.0
    out = display.dilate(img, 1)
    assert out[1, 359] == 5.0  # φ wraps
    assert out[1, 1] == 5.0
    assert out[0, 359] == 5.0
    assert out[339, 0] == 0.0  # η does not
    assert np.count_nonzero(out) == 6  # 2 η rows × 3 φ columns
    assert img[1, 1] == 0.0  # input untouched


def test_display_jet_validates_label() -> None:
    with pytest.raises(ValueError, match="label"):
        DisplayJet("W", 0.0, 0.0, 500.0, 0.9)


def _centres(ax: object, kind: type) -> list[tuple[float, float]]:
    out = []
    for patch in ax.patches:  # type: ignore[attr-defined]
        if isinstance(patch, Circle) and kind is Circle:
            out.append(tuple(patch.center))
        elif isinstance(patch, Rectangle) and kind is Rectangle:
            x, y = patch.get_xy()
            out.append((x + patch.get_width() / 2, y + patch.get_height() / 2))
    return out


def test_figure_draws_wrapped_copies_on_both_edges() -> None:
    event = synthetic_event()
    preds = [DisplayJet("V", 0.5, -3.1, 820.0, 0.91)]  # box at the bottom edge: copy at the top
    fig = display.make_figure(event, preds)
    axes = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert len(axes) == 4
    for ax in axes:
        circles = _centres(ax, Circle)
        # Truth V (φ 3.0) and baseline V (φ 3.01): two copies each; truth t (φ −0.5): one.
        top = [c for c in circles if c[1] > 2.5]
        bottom = [c for c in circles if c[1] < -math.pi]
        assert len(top) == 2, circles
        assert len(bottom) == 2, circles
        assert len(circles) == 5
        boxes = _centres(ax, Rectangle)
        boxes = [b for b in boxes if abs(b[0] - 0.5) < 1e-9]  # the axes background is a Rectangle too
        assert sorted(b[1] for b in boxes) == pytest.approx([-3.1, 2 * math.pi - 3.1])
        texts = [t.get_text() for t in ax.texts]
        assert "V 850 GeV" in texts
        assert "t 1200 GeV" in texts
        assert any("0.91" in t for t in texts)
        assert any("0.70" in t for t in texts)
        assert ax.get_xlabel() == "η"
        assert ax.get_ylabel() == "φ [rad]"
        assert ax.get_ylim() == pytest.approx((-math.pi, math.pi))
    assert "WW" in fig.get_suptitle()
    assert "0 pileup" in fig.get_suptitle()


def test_render_event_writes_png(tmp_path: Path) -> None:
    event = synthetic_event()
    out = display.render_event(event, tmp_path / "sub" / "event.png", title="synthetic")
    assert out.exists()
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = imread(out)
    assert img.ndim == 3
    assert img.shape[2] in (3, 4)
    assert 800 < img.shape[0] < 3000
    assert 800 < img.shape[1] < 3000
    assert img[..., :3].std() > 0.05  # not a blank canvas


def test_render_empty_event(tmp_path: Path) -> None:
    from jetssd.event import SparsePixels

    out = display.render_event(Event(pixels=SparsePixels.empty()), tmp_path / "empty.png")
    assert imread(out).shape[0] > 100


def test_panel_images_sum_channels() -> None:
    event = synthetic_event()
    images = display._panel_images(event)
    np.testing.assert_allclose(images[0], densify(event.pixels).sum(axis=0))
