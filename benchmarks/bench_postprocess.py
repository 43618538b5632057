"""Post-processing benchmark: raw head outputs of 2024 anchors → detections (softmax, decode, top-k, NMS).

Synthetic but realistic head outputs: 1–4 jets per event, each lighting up a cluster of anchors in
its class (and, more weakly, in a second class), on top of background noise tuned so that a few
hundred (anchor, class) pairs pass the 0.01 threshold (a lightly trained model), or a few dozen
(a confident one).

Reports, per scenario, the median time per event for one event per call (the gateway's online path,
class-wise and class-agnostic NMS) and for batches of 64 (Triton's dynamic batching), and, as a
baseline measured in the same run, a loop translation of the reference's ``Detect`` (per class:
threshold, sort, greedy NMS one kept box at a time, no φ wrap). Target (DESIGN §6): ≤ 0.5 ms per
event at batch 1. Writes JSON to stdout; ``--out FILE`` also saves it.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import numpy as np
from _report import emit, median_ms

from jetssd.anchors import INFERENCE_MAPS, AnchorConfig, anchor_centres, decode_centres, wrap_dy
from jetssd.postprocess import PostprocessConfig, postprocess, softmax


def synthetic_heads(rng: np.random.Generator, n_events: int, anchors: np.ndarray, noise_bg: float = 7.0
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Head outputs [N, P, 4], [N, P, 2], [N, P, 1] (float32) of events with 1–4 jets each."""
    n_anchors = len(anchors)
    logits = rng.normal(0.0, 1.0, (n_events, n_anchors, 4)).astype(np.float32)
    logits[..., 0] += noise_bg
    loc = rng.normal(0.0, 0.5, (n_events, n_anchors, 2)).astype(np.float32)
    reg = rng.normal(-1.0, 0.3, (n_events, n_anchors, 1)).astype(np.float32)
    for n in range(n_events):
        for _ in range(rng.integers(1, 5)):
            jet = np.array([rng.uniform(20, 320), rng.uniform(0, 360)])
            dx = anchors[:, 0] - jet[0]
            dy = wrap_dy(anchors[:, 1] - jet[1])
            dist = np.hypot(dx, dy)
            near = dist < 25.0
            cls, other = rng.choice([1, 2, 3], 2, replace=False)
            # Confident at the centre, fading with distance; a weaker second class on the same anchors.
            logits[n, near, cls] = noise_bg + 6.0 - 0.3 * dist[near] + rng.normal(0, 0.5, near.sum())
            logits[n, near, other] = noise_bg + 1.0 - 0.3 * dist[near] + rng.normal(0, 0.5, near.sum())
    return logits, loc, reg


def reference_detect(logits: np.ndarray, loc: np.ndarray, reg: np.ndarray, anchors: np.ndarray,
                     acfg: AnchorConfig, cfg: PostprocessConfig) -> list[list[tuple[int, float, float, float, float]]]:
    """Loop translation of the reference's Detect + box_utils.nms (no φ wrap), for the baseline timing."""
    probs = softmax(logits)
    out = []
    half = acfg.box_size_px / 2
    area = acfg.box_size_px ** 2
    for n in range(len(logits)):
        xy = decode_centres(loc[n], anchors, acfg)
        dets = []
        for c in range(1, 4):
            sel = np.flatnonzero(probs[n, :, c] > cfg.confidence_threshold)
            order = sel[np.argsort(-probs[n, sel, c], kind="stable")][: cfg.top_k]
            while len(order):
                i = order[0]
                dets.append((c - 1, float(probs[n, i, c]), float(xy[i, 0]), float(xy[i, 1]), float(reg[n, i, 0])))
                rest = order[1:]
                # Corner-form intersection, as box_utils.jaccard does.
                lo, hi = np.maximum(xy[i] - half, xy[rest] - half), np.minimum(xy[i] + half, xy[rest] + half)
                inter = np.prod(np.clip(hi - lo, 0, None), axis=-1)
                order = rest[inter / (2 * area - inter) <= cfg.nms_iou]
        out.append(sorted(dets, key=lambda d: -d[1])[: cfg.max_detections])
    return out


SCENARIOS = {
    # Background logit offset → how many (anchor, class) pairs pass 0.01: a few hundred per event (the
    # DESIGN §6 case: a lightly trained model, most of them scattered noise that survives NMS), or a
    # few dozen (a confident model).
    "few_hundred_candidates": 7.0,
    "few_dozen_candidates": 9.5,
}


def run_scenario(noise_bg: float, n: int, b: int, repeat: int, anchors: np.ndarray) -> dict[str, float]:
    rng = np.random.default_rng(0)
    acfg, cfg = AnchorConfig(), PostprocessConfig()
    agnostic = PostprocessConfig(class_agnostic=True)
    logits, loc, reg = synthetic_heads(rng, n, anchors, noise_bg)

    def single(c: PostprocessConfig) -> Callable[[], object]:
        return lambda: [postprocess(logits[i:i + 1], loc[i:i + 1], reg[i:i + 1], anchors, acfg, c) for i in range(n)]

    def batched() -> object:
        return [postprocess(logits[i:i + b], loc[i:i + b], reg[i:i + b], anchors, acfg, cfg) for i in range(0, n, b)]

    dets = postprocess(logits, loc, reg, anchors, acfg, cfg)
    passing = (softmax(logits)[..., 1:] > cfg.confidence_threshold).sum(axis=(1, 2))
    result = {
        "candidates_above_threshold_median": float(np.median(passing)),
        "detections_per_event_median": float(np.median([len(d) for d in dets])),
        "batch1_ms_per_event": median_ms(single(cfg), repeat) / n,
        "batch1_class_agnostic_ms_per_event": median_ms(single(agnostic), repeat) / n,
        f"batch{b}_ms_per_event": median_ms(batched, repeat) / n,
        "reference_loop_ms_per_event": median_ms(lambda: reference_detect(logits, loc, reg, anchors, acfg, cfg),
                                                 max(1, repeat // 2)) / n,
    }
    result["speedup_vs_reference_loop"] = result["reference_loop_ms_per_event"] / result["batch1_ms_per_event"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=256)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=5, help="timed passes over all events (median reported)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    anchors = anchor_centres(INFERENCE_MAPS)
    result: dict[str, object] = {"anchors": len(anchors), "events": args.events, "target_ms": 0.5}
    scenarios = {name: run_scenario(noise_bg, args.events, args.batch, args.repeat, anchors)
                 for name, noise_bg in SCENARIOS.items()}
    result["scenarios"] = scenarios
    result["meets_target"] = all(r["batch1_ms_per_event"] <= 0.5 for r in scenarios.values())
    emit(result, args.out)


if __name__ == "__main__":
    main()
