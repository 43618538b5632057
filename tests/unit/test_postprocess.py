"""Post-processing: softmax, decoding, threshold, top-k, φ-aware greedy NMS, batching, output format."""

import math
from dataclasses import dataclass

import numpy as np
import pytest

from jetssd import postprocess as pp
from jetssd.anchors import (
    INFERENCE_MAPS,
    AnchorConfig,
    anchor_centres,
    decode_centres,
    encode_centres,
    pixels_to_eta_phi,
    wrapped_iou,
)
from jetssd.postprocess import Detections, PostprocessConfig, postprocess, softmax

ANCHORS = anchor_centres(INFERENCE_MAPS)
P = len(ANCHORS)
ACFG = AnchorConfig()


@dataclass
class Box:
    """A detection to plant in the head outputs: class 1 t, 2 V, 3 H; position in pixels; pT in GeV."""

    x: float
    y: float
    cls: int
    prob: float
    pt: float = 500.0
    event: int = 0


def heads(boxes: list[Box], n_events: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Head outputs [N, P, 4], [N, P, 2], [N, P, 1] (float32) holding exactly ``boxes``.

    Background anchors get logits (10, 0, 0, 0): p_c ≈ 4.5e-5, below any threshold used here. Each box
    takes the nearest anchor not yet used in its event, with loc and reg encoding its exact position
    and pT, and logits (0, …, ln(p / (1 − p)), …, −30) so that p_c ≈ prob.
    """
    logits = np.zeros((n_events, P, 4), np.float32)
    logits[..., 0] = 10.0
    loc = np.zeros((n_events, P, 2), np.float32)
    reg = np.zeros((n_events, P, 1), np.float32)
    used: set[tuple[int, int]] = set()
    for b in boxes:
        d = np.hypot(ANCHORS[:, 0] - b.x, (ANCHORS[:, 1] - b.y + 180) % 360 - 180)
        p = next(int(i) for i in np.argsort(d, kind="stable") if (b.event, int(i)) not in used)
        used.add((b.event, p))
        logits[b.event, p] = -30.0
        logits[b.event, p, 0] = 0.0
        logits[b.event, p, b.cls] = math.log(b.prob / (1 - b.prob))
        loc[b.event, p] = encode_centres([b.x, b.y], ANCHORS[p], ACFG)
        reg[b.event, p, 0] = math.log(b.pt / ACFG.pt_scale_gev)
    return logits, loc, reg


def run(boxes: list[Box], n_events: int = 1, **cfg: object) -> list[Detections]:
    return postprocess(*heads(boxes, n_events), ANCHORS, ACFG, PostprocessConfig(**cfg))  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- softmax


def test_softmax_matches_float64_and_sums_to_one() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(0, 5, (3, 50, 4))
    p = softmax(x)
    assert p.dtype == np.float32
    assert p.shape == x.shape
    assert p.flags.c_contiguous
    e = np.exp(x - x.max(-1, keepdims=True))
    np.testing.assert_allclose(p, e / e.sum(-1, keepdims=True), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(softmax(x, axis=1), (np.exp(x) / np.exp(x).sum(1, keepdims=True)), rtol=1e-5)


def test_softmax_is_stable_for_huge_logits() -> None:
    p = softmax(np.array([[1e4, 1e4 - 1, -1e4, 0.0], [-1e30, -1e30, -1e30, -1e30]], np.float32))
    assert np.all(np.isfinite(p))
    np.testing.assert_allclose(p[0, :2], [1 / (1 + math.exp(-1)), math.exp(-1) / (1 + math.exp(-1))], rtol=1e-6)
    np.testing.assert_allclose(p[1], 0.25)


# ------------------------------------------------------------------------------------------- detections


def test_two_strong_detections() -> None:
    dets = run([Box(100.3, 50.7, cls=1, prob=0.95, pt=420.0), Box(250.0, 300.2, cls=3, prob=0.8, pt=1250.0)])
    assert len(dets) == 1
    d = dets[0]
    assert len(d) == 2
    np.testing.assert_array_equal(d.label, [0, 2])  # file convention: t = 0, H = 2
    np.testing.assert_allclose(d.score, [0.95, 0.8], rtol=1e-4)
    eta, phi = pixels_to_eta_phi(np.array([[100.3, 50.7], [250.0, 300.2]]))
    np.testing.assert_allclose(d.eta, eta, atol=1e-5)
    np.testing.assert_allclose(d.phi, phi, atol=1e-5)
    np.testing.assert_allclose(d.pt, [420.0, 1250.0], rtol=1e-5)
    for name, dtype in [("label", np.int8), ("score", np.float32), ("eta", np.float32), ("phi", np.float32),
                        ("pt", np.float32)]:
        assert getattr(d, name).dtype == dtype


def test_to_jets() -> None:
    jets = run([Box(100.0, 50.0, cls=2, prob=0.9, pt=300.0)])[0].to_jets()
    assert len(jets) == 1
    assert set(jets[0]) == {"label", "score", "eta", "phi", "pt"}
    assert jets[0]["label"] == "V"
    assert all(type(jets[0][k]) is float for k in ("score", "eta", "phi", "pt"))
    assert Detections.empty().to_jets() == []


def test_duplicates_within_nms_distance_are_suppressed() -> None:
    # 10 px apart along φ: IoU = 36/56 ≈ 0.64 > 0.25. The higher score survives.
    d = run([Box(170.0, 100.0, cls=2, prob=0.7), Box(170.0, 110.0, cls=2, prob=0.9)])[0]
    assert len(d) == 1
    assert d.score[0] == pytest.approx(0.9, rel=1e-4)
    _, phi = pixels_to_eta_phi([[170.0, 110.0]])
    assert d.phi[0] == pytest.approx(phi, abs=1e-5)
    # 40 px apart along η: IoU = 6/86 ≈ 0.07, both kept.
    assert len(run([Box(170.0, 100.0, cls=2, prob=0.7), Box(210.0, 100.0, cls=2, prob=0.9)])[0]) == 2


def test_duplicates_across_the_phi_seam_are_suppressed() -> None:
    boxes = [Box(170.0, 2.0, cls=1, prob=0.9), Box(170.0, 358.0, cls=1, prob=0.8)]
    xy = np.array([[170.0, 2.0], [170.0, 358.0]])
    assert wrapped_iou(xy[:1], xy[1:], 46.0)[0, 0] > 0.25  # 4 px apart the short way
    d = run(boxes)[0]
    assert len(d) == 1
    assert d.score[0] == pytest.approx(0.9, rel=1e-4)
    # And the other way round: the box below the seam wins when it scores higher.
    d = run([Box(170.0, 2.0, cls=1, prob=0.6), Box(170.0, 358.0, cls=1, prob=0.8)])[0]
    assert len(d) == 1
    assert d.phi[0] == pytest.approx(pixels_to_eta_phi([[0.0, 358.0]])[1], abs=1e-5)
    # A box decoded past 360 wraps to the start of the grid.
    d = run([Box(170.0, 359.9, cls=1, prob=0.8)])[0]
    assert -math.pi <= d.phi[0] < math.pi


def test_greedy_is_exact_on_a_chain() -> None:
    """A suppresses B and B overlaps C, but A does not overlap C: greedy keeps A and C (fast-NMS keeps A only)."""
    d = run([Box(100.0, 100.0, cls=3, prob=0.9), Box(100.0, 120.0, cls=3, prob=0.8),
             Box(100.0, 140.0, cls=3, prob=0.7)])[0]
    np.testing.assert_allclose(d.score, [0.9, 0.7], rtol=1e-4)


@pytest.mark.parametrize("increasing", [False, True])
def test_greedy_on_a_long_chain(increasing: bool) -> None:
    """17 boxes 20 px apart (neighbours overlap, next-but-one do not): greedy keeps every other one."""
    probs = np.linspace(0.9, 0.5, 17)
    if increasing:
        probs = probs[::-1]
    d = run([Box(170.0, 10.0 + 20 * k, cls=2, prob=float(p)) for k, p in enumerate(probs)])[0]
    expected = np.sort(probs[::2])[::-1]
    np.testing.assert_allclose(d.score, expected, rtol=1e-4)


def test_class_wise_versus_agnostic() -> None:
    boxes = [Box(100.0, 100.0, cls=1, prob=0.6), Box(102.0, 101.0, cls=3, prob=0.3)]
    class_wise = run(boxes)[0]
    np.testing.assert_array_equal(class_wise.label, [0, 2])
    agnostic = run(boxes, class_agnostic=True)[0]
    np.testing.assert_array_equal(agnostic.label, [0])
    # Agnostic NMS does not suppress across events or far apart.
    far = [*boxes, Box(300.0, 200.0, cls=3, prob=0.5)]
    np.testing.assert_array_equal(run(far, class_agnostic=True)[0].label, [0, 2])


def test_threshold_is_strict_and_respected() -> None:
    boxes = [Box(50.0, 50.0, cls=1, prob=0.45), Box(150.0, 150.0, cls=1, prob=0.55),
             Box(250.0, 250.0, cls=2, prob=0.2)]
    d = run(boxes, confidence_threshold=0.5)[0]
    np.testing.assert_allclose(d.score, [0.55], rtol=1e-4)
    assert len(run(boxes, confidence_threshold=0.1)[0]) == 3
    # A score exactly at the threshold is not kept.
    logits, loc, reg = heads(boxes)
    exact = float(softmax(logits)[0, :, 1].max())  # the 0.55 box, the best of all
    d = postprocess(logits, loc, reg, ANCHORS, ACFG, PostprocessConfig(confidence_threshold=exact))[0]
    assert len(d) == 0


def grid_boxes(n: int, cls: int = 2, event: int = 0) -> list[Box]:
    """n boxes at least 70 px apart (IoU 0), scores 0.9, 0.85, … in a shuffled order."""
    spots = [(30.0 + 70 * i, 30.0 + 90 * j) for j in range(4) for i in range(5)][:n]
    probs = 0.9 - 0.05 * np.arange(n)
    order = np.random.default_rng(n).permutation(n)
    return [Box(x, y, cls=cls, prob=float(probs[k]), event=event) for (x, y), k in zip(spots, order, strict=True)]


def test_top_k_per_class_is_respected() -> None:
    boxes = [*grid_boxes(10, cls=2), Box(200.0, 330.0, cls=1, prob=0.3)]
    d = run(boxes, top_k=3)[0]
    np.testing.assert_allclose(d.score, [0.9, 0.85, 0.8, 0.3], rtol=1e-4)  # 3 of V, and the one t
    assert len(run(boxes, top_k=100)[0]) == 11


def test_max_detections_and_sorting() -> None:
    boxes = [*grid_boxes(10, cls=2), Box(200.0, 330.0, cls=1, prob=0.87), Box(270.0, 330.0, cls=3, prob=0.42)]
    d = run(boxes)[0]
    assert len(d) == 12
    assert np.all(np.diff(d.score) <= 0)
    d4 = run(boxes, max_detections=4)[0]
    np.testing.assert_allclose(d4.score, [0.9, 0.87, 0.85, 0.8], rtol=1e-4)
    np.testing.assert_array_equal(d4.label, [1, 0, 1, 1])


def test_equal_scores_order_by_class_then_anchor() -> None:
    boxes = [Box(300.0, 300.0, cls=3, prob=0.5), Box(30.0, 30.0, cls=2, prob=0.5), Box(100.0, 200.0, cls=2, prob=0.5)]
    logits, loc, reg = heads(boxes)
    d = postprocess(logits, loc, reg, ANCHORS, ACFG)[0]
    np.testing.assert_array_equal(d.label, [1, 1, 2])
    eta, _ = pixels_to_eta_phi(np.array([[30.0, 30.0], [100.0, 200.0]]))
    np.testing.assert_allclose(d.eta[:2], eta, atol=1e-5)  # the V boxes in anchor order


def test_empty_output_when_nothing_passes() -> None:
    dets = run([], n_events=3)
    assert len(dets) == 3
    for d in dets:
        assert len(d) == 0
        assert d.label.dtype == np.int8
        assert d.score.dtype == np.float32
        assert d.to_jets() == []
    assert run([Box(100.0, 100.0, cls=1, prob=0.3)], confidence_threshold=0.5)[0].score.size == 0
    assert postprocess(np.zeros((0, P, 4)), np.zeros((0, P, 2)), np.zeros((0, P, 1)), ANCHORS) == []
    assert len(Detections.empty()) == 0


def test_batch_events_are_independent() -> None:
    boxes = [Box(100.0, 100.0, cls=1, prob=0.9, event=0), Box(100.0, 100.0, cls=1, prob=0.8, event=2),
             Box(100.0, 105.0, cls=1, prob=0.7, event=2)]
    dets = run(boxes, n_events=3)
    assert [len(d) for d in dets] == [1, 0, 1]
    assert dets[2].score[0] == pytest.approx(0.8, rel=1e-4)


def test_reg_with_or_without_trailing_axis() -> None:
    logits, loc, reg = heads([Box(100.0, 100.0, cls=1, prob=0.9, pt=777.0)])
    a = postprocess(logits, loc, reg, ANCHORS, ACFG)[0]
    b = postprocess(logits, loc, reg[..., 0], ANCHORS, ACFG)[0]
    np.testing.assert_array_equal(a.pt, b.pt)
    assert a.pt[0] == pytest.approx(777.0, rel=1e-5)


def test_pt_scale_of_the_anchor_config_is_used() -> None:
    logits, loc, reg = heads([Box(100.0, 100.0, cls=1, prob=0.9, pt=1000.0)])  # reg = ln(1) = 0
    d = postprocess(logits, loc, reg, ANCHORS, AnchorConfig(pt_scale_gev=300.0))[0]
    assert d.pt[0] == pytest.approx(300.0)


def test_non_finite_boxes_are_dropped() -> None:
    logits, loc, reg = heads([Box(100.0, 100.0, cls=1, prob=0.9), Box(200.0, 200.0, cls=2, prob=0.8)])
    p = int(np.argmax(softmax(logits)[0, :, 1]))
    loc[0, p, 0] = np.nan
    d = postprocess(logits, loc, reg, ANCHORS, ACFG)[0]
    np.testing.assert_array_equal(d.label, [1])


def test_input_validation() -> None:
    logits, loc, reg = heads([])
    with pytest.raises(ValueError, match="cls_logits"):
        postprocess(logits[..., :3], loc, reg, ANCHORS)
    with pytest.raises(ValueError, match="loc"):
        postprocess(logits, loc[:, :-1], reg, ANCHORS)
    with pytest.raises(ValueError, match="reg"):
        postprocess(logits, loc, reg[:, :, [0, 0]], ANCHORS)
    with pytest.raises(ValueError, match="anchors"):
        postprocess(logits, loc, reg, ANCHORS[:, :1])
    with pytest.raises(ValueError, match="cls_logits"):
        postprocess(logits, loc, reg, ANCHORS[:-1])


def test_config_dict_round_trip_and_validation() -> None:
    cfg = PostprocessConfig(confidence_threshold=0.2, top_k=50, nms_iou=0.4, max_detections=20, class_agnostic=True)
    assert PostprocessConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown"):
        PostprocessConfig.from_dict({"threshold": 0.1})
    for bad in ({"confidence_threshold": 1.0}, {"top_k": 0}, {"nms_iou": 1.5}, {"max_detections": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            PostprocessConfig(**bad)


# ---------------------------------------------------------------------- cross-check with a plain loop


def reference_postprocess(logits: np.ndarray, loc: np.ndarray, reg: np.ndarray, cfg: PostprocessConfig
                          ) -> list[list[tuple[int, float, int]]]:
    """Obviously-correct loops: per class threshold, sort, top_k, greedy NMS one box at a time.

    Returns per event the kept (class 0…2, score, anchor) in output order.
    """
    probs = softmax(logits)
    xy = decode_centres(loc, ANCHORS.astype(np.float32), ACFG)
    out = []
    for n in range(len(logits)):
        cands = []
        for c in range(1, 4):
            idx = np.flatnonzero(probs[n, :, c] > np.float32(cfg.confidence_threshold))
            ranked = sorted((-float(probs[n, i, c]), i) for i in idx.tolist())[: cfg.top_k]
            cands += [(c - 1, -neg, i) for neg, i in ranked]
        cands.sort(key=lambda t: (-t[1], t[0], t[2]))
        kept: list[tuple[int, float, int]] = []
        for cand in cands:
            rivals = [k for k in kept if cfg.class_agnostic or k[0] == cand[0]]
            if not rivals or wrapped_iou(xy[n, [cand[2]]], xy[n, [k[2] for k in rivals]], 46.0).max() <= cfg.nms_iou:
                kept.append(cand)
        out.append(kept[: cfg.max_detections])
    return out


def random_heads(rng: np.random.Generator, n_events: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Noisy heads with clusters of confident anchors, some at the φ seam, and tied scores."""
    logits = rng.normal(0, 1, (n_events, P, 4)).astype(np.float32)
    logits[..., 0] += 6.5
    for n in range(n_events):
        for _ in range(rng.integers(0, 4)):
            centre = [rng.uniform(0, 340), rng.choice([rng.uniform(0, 360), 359.0, 1.0])]
            d = np.hypot(ANCHORS[:, 0] - centre[0], (ANCHORS[:, 1] - centre[1] + 180) % 360 - 180)
            near = d < 30
            logits[n, near, rng.integers(1, 4)] += 8 - 0.2 * d[near]
    logits[:, :20] = logits[:, :1]  # identical rows: tied scores
    loc = rng.normal(0, 1, (n_events, P, 2)).astype(np.float32)
    reg = rng.normal(-1, 0.5, (n_events, P, 1)).astype(np.float32)
    return logits, loc, reg


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("cfg", [PostprocessConfig(), PostprocessConfig(class_agnostic=True),
                                 PostprocessConfig(top_k=15, max_detections=25, nms_iou=0.1),
                                 PostprocessConfig(confidence_threshold=0.05, nms_iou=0.5, class_agnostic=True)])
def test_matches_plain_greedy_loop(seed: int, cfg: PostprocessConfig) -> None:
    logits, loc, reg = random_heads(np.random.default_rng(seed), 4)
    dets = postprocess(logits, loc, reg, ANCHORS, ACFG, cfg)
    expected = reference_postprocess(logits, loc, reg, cfg)
    xy = decode_centres(loc, ANCHORS.astype(np.float32), ACFG)
    assert sum(len(e) for e in expected) > 20
    for n, (d, e) in enumerate(zip(dets, expected, strict=True)):
        np.testing.assert_array_equal(d.label, [k[0] for k in e])
        np.testing.assert_array_equal(d.score, np.array([k[1] for k in e], np.float32))
        anchors = [k[2] for k in e]
        eta, phi = pixels_to_eta_phi(xy[n, anchors].astype(np.float64))
        np.testing.assert_allclose(d.eta, eta, atol=1e-5)
        np.testing.assert_allclose(d.phi, phi, atol=1e-5)
        np.testing.assert_allclose(d.pt, 1000 * np.exp(reg[n, anchors, 0].astype(np.float64)), rtol=1e-5)


def test_chunks_and_single_events_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    logits, loc, reg = random_heads(np.random.default_rng(7), 5)
    whole = postprocess(logits, loc, reg, ANCHORS, ACFG)
    monkeypatch.setattr(pp, "_EVENTS_PER_CHUNK", 2)
    chunked = postprocess(logits, loc, reg, ANCHORS, ACFG)
    for n in range(5):
        single = postprocess(logits[n:n + 1], loc[n:n + 1], reg[n:n + 1], ANCHORS, ACFG)[0]
        for d in (whole[n], chunked[n]):
            for name in ("label", "score", "eta", "phi", "pt"):
                np.testing.assert_array_equal(getattr(d, name), getattr(single, name))


@pytest.mark.parametrize("agnostic", [False, True])
def test_pair_segments_agree(monkeypatch: pytest.MonkeyPatch, agnostic: bool) -> None:
    """Splitting the candidate pairs into many small segments (the memory bound) changes nothing."""
    logits, loc, reg = random_heads(np.random.default_rng(8), 3)
    cfg = PostprocessConfig(class_agnostic=agnostic)
    whole = postprocess(logits, loc, reg, ANCHORS, ACFG, cfg)
    monkeypatch.setattr(pp, "_MAX_PAIRS", 37)
    split = postprocess(logits, loc, reg, ANCHORS, ACFG, cfg)
    assert sum(len(d) for d in whole) > 10
    for d, e in zip(whole, split, strict=True):
        for name in ("label", "score", "eta", "phi", "pt"):
            np.testing.assert_array_equal(getattr(d, name), getattr(e, name))
