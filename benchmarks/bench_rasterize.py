"""Rasterizer benchmark: 2,500 PF candidates → sparse pixels and dense image.

Reports the median time per event and the ratio to the reference's rasterization (three
``numpy.histogram2d`` calls) measured in the same run. Target (DESIGN §6): ≤ 0.5 ms per event.
Writes JSON to stdout; ``--out FILE`` also saves it.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
from _report import emit, median_ms

from jetssd import geometry as g
from jetssd.event import PFCandidates
from jetssd.rasterize import rasterize, rasterize_batch, rasterize_sparse


def histogram2d_reference(pf: PFCandidates) -> np.ndarray:
    image = np.zeros(g.IMAGE_SHAPE, np.float32)
    phi = g.wrap_phi(pf.phi)
    for ch in range(3):
        sel = pf.kind == ch
        image[ch] = np.histogram2d(pf.eta[sel], phi[sel], bins=[g.ETA_EDGES, g.PHI_EDGES], weights=pf.pt[sel])[0]
    return image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--candidates", type=int, default=2500)
    parser.add_argument("--repeat", type=int, default=2000)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    n = args.candidates
    pf = PFCandidates.from_arrays(rng.exponential(2.0, n), rng.uniform(-3.0, 3.0, n),
                                  rng.uniform(-math.pi, math.pi, n), rng.integers(0, 3, n))
    batch = [pf] * 32
    result = {
        "candidates": n,
        "sparse_ms": median_ms(lambda: rasterize_sparse(pf), args.repeat),
        "dense_ms": median_ms(lambda: rasterize(pf), args.repeat),
        "dense_batch32_ms_per_event": median_ms(lambda: rasterize_batch(batch), max(10, args.repeat // 50)) / 32,
        "histogram2d_reference_ms": median_ms(lambda: histogram2d_reference(pf), max(10, args.repeat // 10)),
        "target_ms": 0.5,
    }
    result["speedup_vs_histogram2d"] = result["histogram2d_reference_ms"] / result["dense_ms"]
    result["meets_target"] = result["dense_ms"] <= result["target_ms"]
    emit(result, args.out)


if __name__ == "__main__":
    main()
