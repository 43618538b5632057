"""Anchors: layout and tiling, φ-wrapped IoU, SSD matching across the φ seam, target encoding round trips."""

import math

import numpy as np
import pytest

from jetssd import geometry as g
from jetssd.anchors import (
    INFERENCE_MAPS,
    TRAINING_MAPS,
    AnchorConfig,
    AnchorTargets,
    FeatureMap,
    anchor_centres,
    crop_maps,
    decode_centres,
    decode_pt,
    encode_centres,
    encode_pt,
    match,
    match_truth,
    pixels_to_eta_phi,
    truth_pixels,
    wrap_dy,
    wrap_y,
    wrapped_iou,
    wrapped_iou_above,
)
from jetssd.event import TruthObjects

CFG = AnchorConfig()
ANCHORS = anchor_centres(INFERENCE_MAPS)


def brute_iou(a: np.ndarray, b: np.ndarray, s: float) -> float:
    """IoU of two squares by explicit corners, trying the three φ images of b (y − 360, y, y + 360)."""
    best = 0.0
    for shift in (-360.0, 0.0, 360.0):
        bx, by = b[0], (b[1] % 360.0) + shift
        ix = max(0.0, min(a[0], bx) + s / 2 - (max(a[0], bx) - s / 2))
        iy = max(0.0, min(a[1] % 360.0, by) + s / 2 - (max(a[1] % 360.0, by) - s / 2))
        inter = ix * iy
        best = max(best, inter / (2 * s * s - inter))
    return best


# --------------------------------------------------------------------------------------------- anchors


def test_anchor_counts() -> None:
    assert anchor_centres(INFERENCE_MAPS).shape == (2024, 2)
    assert anchor_centres(TRAINING_MAPS).shape == (2576, 2)
    assert anchor_centres(()).shape == (0, 2)


def test_anchor_order_is_nhwc_map_after_map() -> None:
    anchors = anchor_centres(TRAINING_MAPS)
    # Map 1: p = i·46 + j.
    for i, j in [(0, 0), (0, 1), (1, 0), (17, 33), (43, 45)]:
        np.testing.assert_allclose(anchors[i * 46 + j], [(i + 0.5) * 340 / 44, (j + 0.5) * 360 / 46])
    # Map 2 follows: p = 2024 + i·24 + j.
    for i, j in [(0, 0), (0, 1), (1, 0), (22, 23)]:
        np.testing.assert_allclose(anchors[2024 + i * 24 + j], [(i + 0.5) * 340 / 23, (j + 0.5) * 360 / 24])
    # The training set starts with exactly the inference anchors.
    np.testing.assert_array_equal(anchors[:2024], ANCHORS)


@pytest.mark.parametrize("fm", [*TRAINING_MAPS, FeatureMap(1, 1), FeatureMap(7, 5)])
def test_anchors_tile_the_image_evenly(fm: FeatureMap) -> None:
    xy = anchor_centres([fm])
    xs, ys = np.unique(xy[:, 0]), np.unique(xy[:, 1])
    assert len(xs) == fm.n_eta
    assert len(ys) == fm.n_phi
    step_x, step_y = 340 / fm.n_eta, 360 / fm.n_phi
    # Half a step from each image edge, uniform spacing: the cells tile [0, 340) × [0, 360) exactly.
    assert xs[0] == pytest.approx(step_x / 2)
    assert xs[-1] == pytest.approx(340 - step_x / 2)
    assert ys[0] == pytest.approx(step_y / 2)
    assert ys[-1] == pytest.approx(360 - step_y / 2)
    np.testing.assert_allclose(np.diff(xs), step_x)
    np.testing.assert_allclose(np.diff(ys), step_y)
    # φ is periodic: the gap across the seam is one step too.
    assert ys[0] + 360 - ys[-1] == pytest.approx(step_y)
    assert np.all((xy >= 0) & (xy < [340, 360]))


def test_feature_map_rejects_empty() -> None:
    with pytest.raises(ValueError, match="at least one cell"):
        FeatureMap(0, 4)


# --------------------------------------------------------------------------------------------- wrapping


def test_wrap_y_and_dy() -> None:
    np.testing.assert_allclose(wrap_y([-1.0, 0.0, 359.5, 360.0, 725.0]), [359.0, 0.0, 359.5, 0.0, 5.0])
    assert wrap_y(-1e-20) == 0.0  # the modulo would round this up to 360
    assert wrap_y(np.array([-1e-10], np.float32)).dtype == np.float32
    np.testing.assert_allclose(wrap_dy([-356.0, 356.0, 180.0, -180.0, 10.0]), [4.0, -4.0, -180.0, -180.0, 10.0])


# ------------------------------------------------------------------------------------------ wrapped IoU


def test_iou_identical_boxes_is_one_and_far_boxes_zero() -> None:
    pts = np.array([[10.0, 20.0], [300.0, 359.9], [170.0, 0.0]])
    np.testing.assert_allclose(np.diag(wrapped_iou(pts, pts, 46.0)), 1.0)
    assert wrapped_iou([[10.0, 10.0]], [[100.0, 10.0]], 46.0)[0, 0] == 0.0
    assert wrapped_iou([[10.0, 10.0]], [[10.0, 190.0]], 46.0)[0, 0] == 0.0


def test_iou_across_the_seam() -> None:
    s = 46.0
    across = wrapped_iou([[50.0, 2.0]], [[50.0, 358.0]], s)[0, 0]  # 4 px apart the short way
    same = wrapped_iou([[50.0, 180.0]], [[50.0, 184.0]], s)[0, 0]
    assert across == pytest.approx(same)
    assert across == pytest.approx((s - 4) / (s + 4))  # equal squares offset along one axis
    # Coordinates outside [0, 360) are wrapped first.
    assert wrapped_iou([[50.0, -2.0]], [[50.0, 362.0]], s)[0, 0] == pytest.approx(same)


def test_iou_matches_brute_force_and_is_symmetric() -> None:
    rng = np.random.default_rng(0)
    a = np.column_stack([rng.uniform(-20, 360, 60), rng.uniform(-400, 800, 60)])
    b = np.column_stack([rng.uniform(-20, 360, 50), rng.uniform(-400, 800, 50)])
    # Cluster some of b around a to get many partial overlaps, some across the seam.
    b[:30] = a[:30] + rng.normal(0, 20, (30, 2))
    iou = wrapped_iou(a, b, 46.0)
    assert iou.shape == (60, 50)
    expected = np.array([[brute_iou(p, q, 46.0) for q in b] for p in a])
    np.testing.assert_allclose(iou, expected, atol=1e-12)
    np.testing.assert_allclose(wrapped_iou(b, a, 46.0), iou.T, atol=1e-15)
    assert np.all((iou >= 0) & (iou <= 1))


def test_iou_equal_squares_closed_form() -> None:
    """Reference §4.2: IoU = (s−|dx|)(s−|dy|)/(2s² − (s−|dx|)(s−|dy|)); 0.5 ⇔ |d| = s/3 on one axis."""
    s = 46.0
    assert wrapped_iou([[0.0, 0.0]], [[s / 3, 0.0]], s)[0, 0] == pytest.approx(0.5)
    dx, dy = 5.0, 7.0
    inter = (s - dx) * (s - dy)
    iou = wrapped_iou([[100.0, 359.0]], [[100.0 + dx, 359.0 + dy]], s)[0, 0]
    assert iou == pytest.approx(inter / (2 * s * s - inter))


def test_iou_batched_elementwise_and_dtypes() -> None:
    rng = np.random.default_rng(1)
    a = rng.uniform(0, 340, (4, 6, 2))
    b = rng.uniform(0, 340, (4, 5, 2))
    batched = wrapped_iou(a, b, 46.0)
    assert batched.shape == (4, 6, 5)
    for k in range(4):
        np.testing.assert_allclose(batched[k], wrapped_iou(a[k], b[k], 46.0))
    pairs = wrapped_iou(a[:, :5], b, 46.0, elementwise=True)
    assert pairs.shape == (4, 5)
    np.testing.assert_allclose(pairs, np.diagonal(batched[:, :5, :], axis1=1, axis2=2))
    assert wrapped_iou(a.astype(np.float32), b.astype(np.float32), 46.0).dtype == np.float32
    assert wrapped_iou(a.astype(np.float32), b, 46.0).dtype == np.float64
    with pytest.raises(ValueError, match="centres"):
        wrapped_iou(np.zeros((3, 3)), np.zeros((3, 2)), 46.0)


@pytest.mark.parametrize("threshold", [0.0, 0.1, 0.25, 0.5, 0.9, 1.0])
def test_iou_above_equals_iou_compared(threshold: float) -> None:
    rng = np.random.default_rng(2)
    a = rng.uniform(0, 360, (80, 2)).astype(np.float32)
    b = (a[:40] + rng.normal(0, 15, (40, 2))).astype(np.float32)
    iou = wrapped_iou(a, b, 46.0)
    # Away from exact ties, where the two formulas may round differently.
    clear = np.abs(iou - threshold) > 1e-5
    above = wrapped_iou_above(a, b, 46.0, threshold)
    np.testing.assert_array_equal(above[clear], (iou > threshold)[clear])
    pairs = wrapped_iou_above(a[:40], b, 46.0, threshold, elementwise=True)
    np.testing.assert_array_equal(pairs, np.diagonal(above))


# ------------------------------------------------------------------------------------------ truth pixels


def test_truth_pixels_converts_filters_and_labels() -> None:
    truth = TruthObjects.from_arrays(
        cls_=[0, 1, 2, 0, 1, 2],
        eta=[float(g.index_to_eta(10)), 0.0, 3.1, np.nan, -2.958, 1.0],
        phi=[float(g.index_to_phi(359)), math.pi - 1e-3, 0.0, 0.0, -math.pi, 0.5],
        pt=[500.0, 300.0, 400.0, 200.0, 250.0, 0.0],
    )
    xy, labels, pt = truth_pixels(truth)
    # Kept: 0 (bin centre), 1 (φ just below π), 4 (η on the closed lower edge). Dropped: η out of
    # acceptance, NaN η, pT = 0.
    np.testing.assert_array_equal(labels, [1, 2, 2])
    np.testing.assert_allclose(pt, [500.0, 300.0, 250.0])
    np.testing.assert_allclose(xy[0], [10.5, 359.5], atol=1e-4)  # float32 η/φ of a pixel centre
    assert xy[1, 1] == pytest.approx(360 - 1e-3 / g.PHI_STEP, abs=1e-4)
    # float32(−π) is a hair below −π, so it lands a hair below 360: the same place as 0.
    assert xy[2, 0] == pytest.approx(0.0, abs=1e-4)
    assert wrap_dy(xy[2, 1]) == pytest.approx(0.0, abs=1e-4)
    assert xy.dtype == np.float64
    assert labels.dtype == np.int64
    assert np.all((xy[:, 1] >= 0) & (xy[:, 1] < 360))


def test_truth_pixels_empty() -> None:
    xy, labels, pt = truth_pixels(TruthObjects.empty())
    assert xy.shape == (0, 2)
    assert labels.shape == (0,)
    assert pt.shape == (0,)


# --------------------------------------------------------------------------------------------- matching


def check_round_trip(targets: AnchorTargets, anchors: np.ndarray, gt_xy: np.ndarray, gt_pt: np.ndarray,
                     gt_of_anchor: np.ndarray) -> None:
    """Decoding the targets of every positive anchor returns its ground truth (float32 targets)."""
    pos = np.flatnonzero(targets.labels)
    decoded = decode_centres(targets.loc[pos], anchors[pos], CFG)
    np.testing.assert_allclose(decoded[:, 0], gt_xy[gt_of_anchor[pos], 0], atol=1e-4)
    # y compared the short way round (359.99999 and 0.00001 are the same place).
    np.testing.assert_allclose(wrap_dy(decoded[:, 1] - gt_xy[gt_of_anchor[pos], 1]), 0.0, atol=1e-4)
    np.testing.assert_allclose(decode_pt(targets.pt[pos], CFG), gt_pt[gt_of_anchor[pos]], rtol=1e-6)


def test_match_gt_at_the_seam_matches_both_sides() -> None:
    x0 = ANCHORS[0, 0]  # on an anchor row, so the φ distance alone decides
    gt = np.array([[x0, 359.5]])
    t = match(gt, [2], [450.0], ANCHORS, CFG)
    pos = np.flatnonzero(t.labels)
    ys = ANCHORS[pos, 1]
    assert np.any(ys < 30), "anchors just above the seam (y ≥ 0) must match"
    assert np.any(ys > 330), "anchors just below the seam (y < 360) must match"
    assert set(t.labels[pos]) == {2}
    # Wrapped encoding: the anchor at y = 3.91 sees the GT 4.41 px below it, not 355.6 px above.
    first = int(np.flatnonzero((ANCHORS[:, 0] == x0) & (ANCHORS[:, 1] < 5))[0])
    assert first in pos
    assert t.loc[first, 1] == pytest.approx((359.5 - 360 - ANCHORS[first, 1]) / CFG.loc_unit_px, rel=1e-6)
    assert np.all(np.abs(t.loc[pos]) < 4)  # every offset is small, none goes the long way round
    check_round_trip(t, ANCHORS, gt, np.array([450.0]), np.zeros(len(ANCHORS), np.int64))


def test_encode_decode_round_trip_is_exact_in_float64() -> None:
    rng = np.random.default_rng(3)
    gt = np.column_stack([rng.uniform(0, 340, 500), rng.uniform(0, 360, 500)])
    gt[:50, 1] = rng.uniform(359.0, 360.0, 50)  # at the seam
    gt[50:100, 1] = rng.uniform(0.0, 1.0, 50)
    anchors = ANCHORS[rng.integers(0, len(ANCHORS), 500)]
    loc = encode_centres(gt, anchors, CFG)
    assert np.all(np.abs(loc[:, 1]) <= 180 / CFG.loc_unit_px)
    back = decode_centres(loc, anchors, CFG)
    np.testing.assert_allclose(back[:, 0], gt[:, 0], rtol=0, atol=1e-9)
    np.testing.assert_allclose(wrap_dy(back[:, 1] - gt[:, 1]), 0.0, atol=1e-9)
    assert np.all((back[:, 1] >= 0) & (back[:, 1] < 360))


def test_decode_wraps_and_keeps_float32() -> None:
    anchors = np.array([[100.0, 356.0], [100.0, 2.0]])
    loc = np.array([[0.0, 10.0 / CFG.loc_unit_px], [0.0, -5.0 / CFG.loc_unit_px]], np.float32)
    out = decode_centres(loc[None], anchors, CFG)  # leading batch dimension
    assert out.shape == (1, 2, 2)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[0, :, 1], [6.0, 357.0], atol=1e-4)


def test_match_forces_best_anchor_below_threshold() -> None:
    anchors = np.array([[0.0, 0.0], [100.0, 100.0], [30.0, 100.0]])
    gt = np.array([[30.0, 0.0]])  # IoU with anchor 0: 16·46/(2·46² − 16·46) ≈ 0.21 < 0.5
    assert wrapped_iou(gt, anchors, 46.0)[0, 0] < 0.5
    t = match(gt, [3], [1000.0], anchors, CFG)
    np.testing.assert_array_equal(t.labels, [3, 0, 0])
    assert t.loc[0] == pytest.approx([30.0 / 4.6, 0.0])
    assert t.pt[0] == pytest.approx(0.0)  # ln(1000 / 1000)


def test_match_forced_tie_takes_lowest_anchor_index() -> None:
    anchors = np.array([[0.0, 0.0], [40.0, 0.0]])
    t = match(np.array([[20.0, 0.0]]), [1], [300.0], anchors, CFG)  # equidistant, IoU 0.39 each
    np.testing.assert_array_equal(t.labels, [1, 0])


def test_match_two_gts_wanting_the_same_anchor_later_wins() -> None:
    anchors = np.array([[0.0, 0.0], [50.0, 0.0]])
    gt = np.array([[10.0, 0.0], [5.0, 0.0]])  # both have anchor 0 as best; anchor 1 is too far for both
    t = match(gt, [1, 2], [300.0, 600.0], anchors, CFG)
    np.testing.assert_array_equal(t.labels, [2, 0])  # the later GT (label 2) takes it, GT 0 is lost
    assert t.loc[0] == pytest.approx([5.0 / 4.6, 0.0])


def test_match_two_gts_each_anchor_takes_its_best() -> None:
    x = ANCHORS[:, 0]
    gt = np.array([[170.0, 100.0], [170.0, 120.0], [40.0, 300.0]])
    pts = np.array([500.0, 250.0, 800.0])
    t = match(gt, [1, 3, 2], pts, ANCHORS, CFG)
    iou = wrapped_iou(gt, ANCHORS, 46.0)
    best = np.argmax(iou, axis=0)
    pos = t.labels > 0
    # Every positive anchor carries the label of the GT it overlaps most (no forced overrides here,
    # since each GT's best anchor is also its own best-overlap anchor).
    np.testing.assert_array_equal(t.labels[pos], np.array([1, 3, 2])[best[pos]])
    assert set(np.unique(t.labels)) == {0, 1, 2, 3}
    assert np.all(iou.max(axis=0)[pos] >= 0.5)
    assert np.all(iou.max(axis=0)[~pos] < 0.5)
    assert np.all(np.abs(x[t.labels == 2] - 40.0) < 46)
    check_round_trip(t, ANCHORS, gt, pts, best)


def test_match_no_gt_is_all_background() -> None:
    t = match(np.zeros((0, 2)), [], [], ANCHORS, CFG)
    assert t.labels.shape == (2024,)
    assert not t.labels.any()
    assert t.loc.shape == (2024, 2)
    assert t.loc.dtype == np.float32
    assert not t.loc.any()
    assert t.pt.shape == (2024,)
    assert t.pt.dtype == np.float32
    assert t.labels.dtype == np.int64
    assert not match_truth(TruthObjects.empty(), ANCHORS, CFG).labels.any()


def test_match_positive_count_like_the_reference() -> None:
    """Reference §4.2: about 8 (8–12) map-1 anchors match a GT; 0–2 on map 2."""
    rng = np.random.default_rng(4)
    anchors = anchor_centres(TRAINING_MAPS)
    for _ in range(20):
        gt = np.array([[rng.uniform(30, 310), rng.uniform(0, 360)]])
        t = match(gt, [1], [500.0], anchors, CFG)
        n1, n2 = np.count_nonzero(t.labels[:2024]), np.count_nonzero(t.labels[2024:])
        assert 6 <= n1 <= 12
        assert n2 <= 4


def test_match_truth_end_to_end() -> None:
    truth = TruthObjects.from_arrays(cls_=[2, 0], eta=[0.3, 5.0], phi=[math.pi - 0.001, 0.0], pt=[700.0, 300.0])
    t = match_truth(truth, ANCHORS, CFG)
    pos = np.flatnonzero(t.labels)
    assert len(pos) > 0
    assert set(t.labels[pos]) == {3}
    xy = decode_centres(t.loc[pos], ANCHORS[pos], CFG)
    eta, phi = pixels_to_eta_phi(xy)
    np.testing.assert_allclose(eta, 0.3, atol=1e-5)
    np.testing.assert_allclose(g.delta_phi(phi, math.pi - 0.001), 0.0, atol=1e-5)


def test_match_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="same length"):
        match(np.zeros((2, 2)), [1], [100.0, 100.0], ANCHORS, CFG)
    with pytest.raises(ValueError, match="gt_labels"):
        match(np.zeros((1, 2)), [0], [100.0], ANCHORS, CFG)
    with pytest.raises(ValueError, match="gt_pt"):
        match(np.zeros((1, 2)), [1], [0.0], ANCHORS, CFG)
    with pytest.raises(ValueError, match="anchors"):
        match(np.zeros((1, 2)), [1], [10.0], ANCHORS[:, :1], CFG)
    with pytest.raises(ValueError, match="non-finite"):
        match(np.array([[np.nan, 1.0]]), [1], [10.0], ANCHORS, CFG)


# --------------------------------------------------------------------------------------------- pT, η/φ


def test_pt_encoding_round_trip_and_scale() -> None:
    pts = np.array([50.0, 300.0, 1000.0, 2500.0])
    np.testing.assert_allclose(encode_pt(pts, CFG), np.log(pts / 1000.0))
    np.testing.assert_allclose(decode_pt(encode_pt(pts, CFG)), pts, rtol=1e-12)
    other = AnchorConfig(pt_scale_gev=500.0)
    np.testing.assert_allclose(decode_pt(encode_pt(pts, other), other), pts, rtol=1e-12)
    assert decode_pt(np.zeros(3, np.float32)).dtype == np.float32


def test_pixels_to_eta_phi_matches_geometry() -> None:
    i = np.arange(340)
    j = np.arange(360)
    eta, _ = pixels_to_eta_phi(np.column_stack([i + 0.5, np.zeros(340)]))
    np.testing.assert_allclose(eta, g.index_to_eta(i), atol=1e-12)
    _, phi = pixels_to_eta_phi(np.column_stack([np.zeros(360), j + 0.5]))
    np.testing.assert_allclose(phi, g.index_to_phi(j), atol=1e-12)
    # Round trip with the geometry's continuous pixel coordinates, φ across the seam.
    rng = np.random.default_rng(5)
    e, p = rng.uniform(-2.9, 2.9, 100), rng.uniform(-math.pi, math.pi, 100)
    e2, p2 = pixels_to_eta_phi(np.column_stack([g.eta_to_pixel(e), g.phi_to_pixel(p)]))
    np.testing.assert_allclose(e2, e, atol=1e-12)
    np.testing.assert_allclose(g.delta_phi(p2, p), 0.0, atol=1e-12)
    _, edge = pixels_to_eta_phi([[0.0, 360.0]])
    assert edge == pytest.approx(-math.pi)


# ---------------------------------------------------------------------------------------------- config


def test_anchor_config_dict_round_trip_and_validation() -> None:
    cfg = AnchorConfig(box_size_px=40.0, variance=0.2, match_iou=0.4, pt_scale_gev=800.0)
    assert AnchorConfig.from_dict(cfg.to_dict()) == cfg
    assert AnchorConfig().to_dict() == {"box_size_px": 46.0, "variance": 0.1, "match_iou": 0.5,
                                        "pt_scale_gev": 1000.0, "layout": "receptive"}
    # Metadata written before the layout existed means the layout of its time.
    assert AnchorConfig.from_dict({"box_size_px": 46.0}).layout == "stretched"
    with pytest.raises(ValueError, match="layout"):
        AnchorConfig(layout="square")
    assert CFG.loc_unit_px == pytest.approx(4.6)
    with pytest.raises(ValueError, match="unknown"):
        AnchorConfig.from_dict({"box_size": 46.0})
    for bad in ({"box_size_px": 0.0}, {"box_size_px": 200.0}, {"variance": 0.0}, {"match_iou": 1.5},
                {"pt_scale_gev": -1.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            AnchorConfig(**bad)


def test_receptive_layout_sits_on_the_pooled_cells_centres() -> None:
    """After three k2-s2-p1 pools cell o is centred at 8o − 3 px, after four at 16o − 7 (φ wrapped)."""
    from jetssd.anchors import pooling_depth, receptive_centres

    assert [pooling_depth(n, 340) for n in (340, 171, 86, 44, 23)] == [0, 1, 2, 3, 4]
    assert [pooling_depth(n, 360) for n in (181, 91, 46, 24)] == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="not a pooled"):
        pooling_depth(45, 360)
    np.testing.assert_array_equal(receptive_centres(44, 340)[:3], [-3.0, 5.0, 13.0])
    np.testing.assert_array_equal(receptive_centres(23, 340)[:2], [-7.0, 9.0])
    np.testing.assert_array_equal(receptive_centres(171, 340)[:2], [0.0, 2.0])
    anchors = anchor_centres(TRAINING_MAPS, "receptive")
    assert anchors.shape == (2576, 2)
    assert np.all((anchors[:, 1] >= 0) & (anchors[:, 1] < 360))
    np.testing.assert_array_equal(anchors[1], [-3.0, 5.0])  # cell (0, 1)
    np.testing.assert_array_equal(anchors[0], [-3.0, 357.0])  # cell (0, 0): −3 wraps round the seam
    np.testing.assert_array_equal(anchors[2024 + 24 + 2], [9.0, 25.0])  # map 2, cell (1, 2)
    # Same order and count as the stretched layout, so heads and anchors line up either way.
    assert anchor_centres(TRAINING_MAPS, "stretched").shape == anchors.shape


def test_a_legacy_model_keeps_its_stretched_anchors_in_the_detector() -> None:
    from pathlib import Path

    from jetssd.inference import OnnxDetector

    shipped = Path(__file__).resolve().parents[2] / "model_repository" / "pfjet_ssd_fpn"
    detector = OnnxDetector(shipped / "1", threads=1)  # FPN v1 predates the layout key
    assert detector.anchor_config.layout == "stretched"
    np.testing.assert_array_equal(detector.anchors, anchor_centres(INFERENCE_MAPS, "stretched"))
    newest = OnnxDetector(shipped, threads=1)  # v2 was trained on the receptive-field layout and records it
    assert newest.version >= 2
    assert newest.anchor_config.layout == "receptive"
    np.testing.assert_array_equal(newest.anchors, anchor_centres(INFERENCE_MAPS, "receptive"))


# --------------------------------------------------------------------------------------------------
# Crop anchors (training on random crops)


def test_crop_maps_are_the_pooled_sizes_of_the_crop() -> None:
    assert crop_maps(128) == (FeatureMap(17, 17), FeatureMap(9, 9))
    assert crop_maps(128, n_sources=1) == (FeatureMap(17, 17),)
    assert sum(m.n_anchors for m in crop_maps(128)) == 370
    assert crop_maps(340)[0] == FeatureMap(44, 44)


def test_default_extent_keeps_the_full_image_anchors() -> None:
    for layout in ("receptive", "stretched"):
        np.testing.assert_array_equal(anchor_centres(TRAINING_MAPS, layout),
                                      anchor_centres(TRAINING_MAPS, layout, extent=(340, 360), periodic_phi=True))


@pytest.mark.parametrize("origin", [(0, 0), (16, 48), (208, 224)])
def test_crop_anchors_are_full_image_anchors_shifted_by_a_grid_aligned_origin(origin: tuple[int, int]) -> None:
    # The receptive layout is translation-equivariant on the 16-px grid of the coarsest map: a crop at a
    # grid-aligned origin has the full image's anchors, shifted, wherever the crop's cells are full cells.
    crop = 128
    maps = crop_maps(crop)
    full_maps = (FeatureMap(44, 46), FeatureMap(23, 24))
    for cm, fm, step in zip(maps, full_maps, (8, 16), strict=True):
        a = anchor_centres((cm,), "receptive", extent=(crop, crop), periodic_phi=False).reshape(cm.n_eta, cm.n_phi, 2)
        f = anchor_centres((fm,), "receptive").reshape(fm.n_eta, fm.n_phi, 2)
        i0, j0 = origin[0] // step, origin[1] // step
        # Interior cells (index ≥ 1): cell 0 of the crop sits on its zero padding, like cell 0 of the image.
        np.testing.assert_allclose(a[1:, 1:] + origin, f[i0 + 1:i0 + cm.n_eta, j0 + 1:j0 + cm.n_phi])
    y = anchor_centres(maps, "receptive", extent=(crop, crop), periodic_phi=False)[:, 1]
    assert y.min() == -7.0  # not wrapped to 353: a crop's φ axis is an interval


def test_crop_extent_needs_the_receptive_layout() -> None:
    with pytest.raises(ValueError, match="receptive"):
        anchor_centres(crop_maps(128), "stretched", extent=(128, 128), periodic_phi=False)


def test_non_periodic_matching_does_not_wrap_across_the_crop_edges() -> None:
    # In a 340-px crop, y = 2 and y = 330 are 32 px apart the short way round a 360 period: a wrapped IoU
    # would overlap them, but a crop's edges are not neighbours.
    config = AnchorConfig()
    anchors = np.array([[100.0, 330.0], [100.0, 10.0]])
    gt = np.array([[100.0, 2.0]])
    assert wrapped_iou(gt, anchors[:1], 46.0)[0, 0] > 0
    assert wrapped_iou(gt, anchors[:1], 46.0, periodic_phi=False)[0, 0] == 0
    t = match(gt, [1], [500.0], anchors, config, periodic_phi=False)
    assert t.labels.tolist() == [0, 1]
    np.testing.assert_allclose(t.loc[1], [0.0, -8.0 / config.loc_unit_px], rtol=1e-6)
    np.testing.assert_allclose(encode_centres([[0.0, 350.0]], [[0.0, 5.0]], config, periodic_phi=False),
                               [[0.0, 345.0 / config.loc_unit_px]])
