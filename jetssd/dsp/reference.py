"""Reference executor of a DSP program: the contract (``docs/dsp.md``) written out, clarity over speed.

One event at a time, every tensor an int64 array [C, H, W] holding the integer codes; the convolution is a loop
over (output channel, input channel, kernel tap) of whole shifted planes, the padding explicit index
arithmetic (η: zero outside the map, φ: index mod W). Slow but obviously correct; :mod:`jetssd.dsp.fast`
must give the same bits.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numpy.typing import NDArray

from jetssd.dsp.arith import requantize, rounding_shift
from jetssd.dsp.program import Program, interpret

Planes = NDArray[np.int64]


def quantize_input(op: dict[str, Any], image: NDArray[np.float32]) -> Planes:
    """q = #{k ∈ 1…255 : x ≥ T_k} per pixel, T the program's float32 thresholds expm1((k − ½)·s) (§4.1)."""
    x = np.asarray(image, np.float32)
    if not np.isfinite(x).all():
        raise ValueError("input image has non-finite values (the contract takes finite GeV ≥ 0)")
    q = np.zeros(x.shape, np.int64)
    for t in op["thresholds"]:  # 255 comparisons of float32 values: no libm in the contract
        q += x >= t
    return q


def tap(x: Planes, dy: int, dx: int, circular_phi: bool) -> Planes:
    """The plane X[c, i + dy, j + dx] for every (i, j): zero outside η; φ wrapped (or zero) outside [0, W)."""
    _, h, w = x.shape
    rows = np.arange(h) + dy
    cols = np.arange(w) + dx
    row_ok = (rows >= 0) & (rows < h)
    if circular_phi:
        cols = cols % w
        col_ok = np.ones(w, bool)
    else:
        col_ok = (cols >= 0) & (cols < w)
    out = x[:, np.clip(rows, 0, h - 1)][:, :, np.clip(cols, 0, w - 1)]
    return out * (row_ok[:, None] & col_ok[None, :])


def conv(op: dict[str, Any], x: Planes) -> Planes:
    """acc[o] = bias[o] + Σ_c Σ_taps W[o, c, ky, kx] · X[c, i + ky − p, j + kx − p] (int64, checked against int32),
    then the activation's requantisation (or the raw int32 accumulator for the heads)."""
    weight = op["weight"].astype(np.int64)
    c_out, c_per_group, k, _ = weight.shape
    groups = op["groups"]
    out_per_group = c_out // groups
    pad = k // 2
    shifted = {(ky, kx): tap(x, ky - pad, kx - pad, op["circular_phi"]) for ky in range(k) for kx in range(k)}
    acc = np.zeros((c_out, x.shape[1], x.shape[2]), np.int64)
    for o in range(c_out):
        acc[o] += int(op["bias"][o])
        first_in = (o // out_per_group) * c_per_group
        for c in range(c_per_group):
            for (ky, kx), plane in shifted.items():
                w = int(weight[o, c, ky, kx])
                if w != 0:
                    acc[o] += w * plane[first_in + c]
    assert np.abs(acc).max(initial=0) < 2**31, f"{op['name']}: int32 accumulator overflow"
    return activation(op, acc)


def activation(op: dict[str, Any], acc: Planes) -> Planes:
    """Requantisation per output channel with the activation folded in (§3.3)."""
    kind = op["activation"]
    if kind == "raw":
        return acc
    out = np.empty_like(acc)
    for o in range(acc.shape[0]):
        if kind == "relu":
            out[o] = requantize(acc[o], int(op["multiplier"][o]), int(op["shift"][o]), 0, 255)
        elif kind == "prelu":
            pos = requantize(acc[o], int(op["multiplier"][o]), int(op["shift"][o]), -128, 127)
            neg = requantize(acc[o], int(op["neg_multiplier"][o]), int(op["neg_shift"][o]), -128, 127)
            out[o] = np.where(acc[o] >= 0, pos, neg)
        else:
            out[o] = requantize(acc[o], int(op["multiplier"][o]), int(op["shift"][o]), -128, 127)
    return out


def avgpool(x: Planes) -> Planes:
    """k2 s2 p1, padded zeros counted: out[i, j] = round_half_away((Σ_{a,b ∈ {0,1}} X[2i − 1 + a, 2j − 1 + b]) / 4)."""
    c, h, w = x.shape
    ho, wo = h // 2 + 1, w // 2 + 1
    total = np.zeros((c, ho, wo), np.int64)
    for i in range(ho):
        for a in (0, 1):
            row = 2 * i - 1 + a
            if not 0 <= row < h:
                continue
            for b in (0, 1):
                cols = 2 * np.arange(wo) - 1 + b
                ok = (cols >= 0) & (cols < w)
                total[:, i, ok] += x[:, row, cols[ok]]
    return rounding_shift(total, 2)


def l2norm(op: dict[str, Any], x: Planes) -> Planes:
    """Per pixel: S = Σ_c q_c², r = isqrt(S · 2^g), inv = ⌊(2^30 + ⌊r/2⌋) / r⌋ (0 if r = 0),
    y_c = requant(q_c · inv)."""
    _c, h, w = x.shape
    out = np.zeros_like(x)
    g = op["sqrt_shift"]
    for i in range(h):
        for j in range(w):
            q = [int(v) for v in x[:, i, j]]
            r = math.isqrt(sum(v * v for v in q) << g)
            inv = ((1 << 30) + (r >> 1)) // r if r > 0 else 0
            t = np.array([v * inv for v in q], np.int64)
            out[:, i, j] = requantize(t, op["multiplier"], op["shift"], -128, 127)
    return out


def eca(op: dict[str, Any], x: Planes) -> Planes:
    """sum_c = Σ_ij y; acc_c = Σ_k e_k · sum_{c+k−1} (zero outside); z = requant(acc) ∈ [−128, 127];
    gate = LUT[z + 128] (Q15); out = requant(y, gate, 15)."""
    c = x.shape[0]
    if list(x.shape[1:]) != list(op["map_shape"]):
        raise ValueError(f"ECA was compiled for a {op['map_shape']} map, got {list(x.shape[1:])}")
    sums = [int(x[ch].sum()) for ch in range(c)]
    e = [int(v) for v in op["weight"]]
    half = len(e) // 2
    out = np.empty_like(x)
    for ch in range(c):
        acc = sum(e[k] * sums[ch + k - half] for k in range(len(e)) if 0 <= ch + k - half < c)
        z = int(requantize(np.array(acc), op["z_multiplier"], op["z_shift"], -128, 127))
        gate = int(op["lut"][z + 128])
        out[ch] = requantize(x[ch], gate, op["lut_frac_bits"], -128, 127)
    return out


def run(program: Program, image: NDArray[np.float32]) -> Planes:
    """One event [3, H, W] (GeV, float32) → the heads' raw int32 accumulators [7, h, w] (int64 array)."""
    return interpret(program, image, quantize_input,
                     {"conv": conv, "avgpool": avgpool, "l2norm": l2norm, "eca": eca})
