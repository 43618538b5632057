"""Vectorised executor of a DSP program: the same bits as :mod:`jetssd.dsp.reference`, batched, numpy only.

Integer tensors are [N, C, H, W]. Convolutions run as matrix products in float32 (or float64) BLAS, which is
exact here: every product and partial sum is an integer below the layer's accumulator bound, which the
compiler guarantees < 2^31, and the float32 path is taken only when that bound is < 2^24 (float64: 2^53), so
no rounding ever happens, whatever the summation order. Requantisation uses the floor-shift identity
sign(p)·((|p| + h) >> s) = (p + h − [p < 0]) >> s, a different formula from the reference's.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

from jetssd.dsp.arith import isqrt_array
from jetssd.dsp.program import Program, interpret

Tensor = NDArray[np.integer[Any]]
"""Integer codes: int32 between layers, int64 inside requantisation."""
F32_EXACT = 2**24


def requantize_fast(acc: NDArray[Any], multiplier: NDArray[Any] | int, shift: NDArray[Any] | int,
                    lo: int, hi: int) -> Tensor:
    """Round-half-away requantisation as (p + 2^(s−1) − [p < 0]) >> s with s ≥ 1 (and p for s = 0), saturated to
    [lo, hi] ⊆ int32; int32 result."""
    p = np.asarray(acc, np.int64) * np.asarray(multiplier, np.int64)
    s = np.asarray(shift, np.int64)
    half = np.where(s > 0, np.left_shift(np.int64(1), np.maximum(s - 1, 0)), 0)
    y = np.where(s > 0, (p + half - (p < 0)) >> s, p)
    return np.clip(y, lo, hi).astype(np.int32)  # lo, hi are within int32


def quantize_input(op: dict[str, Any], images: NDArray[np.float32]) -> Tensor:
    """Input codes by binary search in the thresholds (``side="right"`` counts T_k ≤ x)."""
    x = np.asarray(images, np.float32)
    if not np.isfinite(x).all():
        raise ValueError("input image has non-finite values (the contract takes finite GeV ≥ 0)")
    return np.searchsorted(op["thresholds"], x, side="right").astype(np.int64)


def _pad(x: Tensor, pad: int, circular_phi: bool) -> Tensor:
    if pad == 0:
        return x
    if circular_phi:
        x = np.concatenate([x[..., -pad:], x, x[..., :pad]], axis=-1)
        return np.pad(x, ((0, 0), (0, 0), (pad, pad), (0, 0)))
    return np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))


def conv(op: dict[str, Any], x: Tensor) -> Tensor:
    """Convolution (dense via im2col + GEMM, depthwise as 9 broadcast multiply-adds) then :func:`activation`."""
    weight = op["weight"]
    c_out, c_per_group, k, _ = weight.shape
    n, c_in, h, w = x.shape
    xp = _pad(x, k // 2, op["circular_phi"])
    if op["groups"] == c_in and c_per_group == 1 and c_out == c_in:
        # int32 is enough: |acc| ≤ the compiler's bound < 2^31 (ternary: ≤ 9·255).
        acc = np.zeros((n, c_out, h, w), np.int32)
        xp32 = xp.astype(np.int32)
        for ky in range(k):
            for kx in range(k):
                taps = weight[:, 0, ky, kx].astype(np.int32)
                acc += taps[None, :, None, None] * xp32[:, :, ky:ky + h, kx:kx + w]
    elif op["groups"] == 1:
        dtype = np.float32 if op["acc_bound"] < F32_EXACT else np.float64
        if k == 1:
            cols = xp.astype(dtype).transpose(1, 0, 2, 3).reshape(c_in, -1)
        else:
            cols = np.stack([xp[:, :, ky:ky + h, kx:kx + w] for ky in range(k) for kx in range(k)], axis=2)
            cols = cols.astype(dtype).transpose(1, 2, 0, 3, 4).reshape(c_in * k * k, -1)
        prod = weight.reshape(c_out, -1).astype(dtype) @ cols
        acc = np.rint(prod).astype(np.int64).reshape(c_out, n, h, w).transpose(1, 0, 2, 3)
    else:
        raise ValueError(f"{op['name']}: grouped convolutions other than depthwise are not in the contract")
    acc = acc + op["bias"].astype(np.int64)[None, :, None, None]
    return activation(op, acc)


def activation(op: dict[str, Any], acc: Tensor) -> Tensor:
    kind = op["activation"]
    if kind == "raw":
        return acc
    m = op["multiplier"][None, :, None, None]
    s = op["shift"][None, :, None, None]
    if kind == "relu":
        return requantize_fast(acc, m, s, 0, 255)
    pos = requantize_fast(acc, m, s, -128, 127)
    if kind == "prelu":
        neg = requantize_fast(acc, op["neg_multiplier"][None, :, None, None], op["neg_shift"][None, :, None, None],
                              -128, 127)
        return np.where(acc >= 0, pos, neg)
    return pos


def avgpool(x: Tensor) -> Tensor:
    """Pad one zero row/column on each side, sum 2×2 blocks from (0, 0), divide by 4 rounding half away from 0."""
    n, c, h, w = x.shape
    ho, wo = h // 2 + 1, w // 2 + 1
    xp = np.zeros((n, c, 2 * ho, 2 * wo), np.int64)
    xp[:, :, 1:h + 1, 1:w + 1] = x
    total = xp.reshape(n, c, ho, 2, wo, 2).sum(axis=(3, 5))
    return requantize_fast(total, 1, 2, -(2**31), 2**31 - 1)


def l2norm(op: dict[str, Any], x: Tensor) -> Tensor:
    sq = (x * x).sum(axis=1, keepdims=True)
    r = isqrt_array(sq << op["sqrt_shift"])
    inv = np.where(r > 0, ((1 << 30) + (r >> 1)) // np.maximum(r, 1), 0)
    return requantize_fast(x * inv, op["multiplier"][None, :, None, None], op["shift"][None, :, None, None],
                           -128, 127)


def eca(op: dict[str, Any], x: Tensor) -> Tensor:
    _n, c, h, w = x.shape
    if [h, w] != list(op["map_shape"]):
        raise ValueError(f"ECA was compiled for a {op['map_shape']} map, got {[h, w]}")
    sums = x.sum(axis=(2, 3))  # [N, C]
    e = op["weight"].astype(np.int64)
    half = len(e) // 2
    padded = np.pad(sums, ((0, 0), (half, half)))
    acc = sum(e[k] * padded[:, k:k + c] for k in range(len(e)))
    z = requantize_fast(acc, op["z_multiplier"], op["z_shift"], -128, 127)
    gate = op["lut"].astype(np.int64)[z + 128]  # [N, C]
    return requantize_fast(x, gate[:, :, None, None], op["lut_frac_bits"], -128, 127)


def run(program: Program, images: NDArray[np.float32]) -> Tensor:
    """A batch [N, 3, H, W] (GeV, float32) → the heads' raw accumulators [N, 7, h, w] (int64 holding int32)."""
    return interpret(program, images, quantize_input,
                     {"conv": conv, "avgpool": avgpool, "l2norm": l2norm, "eca": eca})


def dequantize_heads(program: Program, raw: NDArray[np.integer[Any]]
                     ) -> tuple[NDArray[np.float32], NDArray[np.float32], NDArray[np.float32]]:
    """Host side: raw [N, 7, h, w] → (loc [N, P, 2], cls_logits [N, P, 4], reg [N, P, 1]) float32, P = h·w with
    η outer, φ inner (the anchor order): value = acc · (s_in · s_w,o) in float64, then cast."""
    head = program.ops[-1]
    n, c, h, w = raw.shape
    values = raw.astype(np.float64) * head["dequant"][None, :, None, None]
    flat = values.transpose(0, 2, 3, 1).reshape(n, h * w, c).astype(np.float32)
    out = []
    first = 0
    for _name, width in head["outputs"]:
        out.append(np.ascontiguousarray(flat[:, :, first:first + width]))
        first += width
    return out[0], out[1], out[2]


def run_float(program: Program, images: NDArray[np.float32]
              ) -> tuple[NDArray[np.float32], NDArray[np.float32], NDArray[np.float32]]:
    """:func:`run` then :func:`dequantize_heads`: the ONNX graph's (loc, cls_logits, reg)."""
    return dequantize_heads(program, run(program, images))
