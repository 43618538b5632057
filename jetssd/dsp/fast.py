"""Fast executor of a DSP program: the same bits as :mod:`jetssd.dsp.reference`, batched, numpy BLAS + numba.

Integer codes travel between layers as **float32 arrays [N, C, H, W] holding integers** (|code| ≤ 255), so that
the dense and pointwise convolutions are plain float32 BLAS matrix products. That is exact: every product and
every partial sum is an integer below the layer's accumulator bound, which the compiler records (``acc_bound``)
and which is < 2^24 on the float32 path (float64 BLAS, exact below 2^53, otherwise), so no rounding happens
whatever the summation order. Everything that needs integer arithmetic (bias, the int64 product with the
requantisation multiplier, the rounding shift, saturation) runs in one fused numba pass per layer, and the
ternary depthwise convolution is a numba loop that does its nine taps, the bias and the requantisation in one go.

Measured on the project machine (1 thread, batch 4, shipped TWN): ≈ 10× faster than the all-numpy int64
version this replaced (``benchmarks/bench_dsp.py`` gives the ratio to float ONNX Runtime).
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np
from numpy.typing import NDArray

from jetssd.dsp.arith import isqrt_array
from jetssd.dsp.program import Program, interpret

Codes = NDArray[np.float32]
"""Integer codes stored as float32 [N, C, H, W] (exact: |code| ≤ 2^24)."""
F32_EXACT = 2**24
MODE_RAW, MODE_LINEAR, MODE_PRELU = 0, 1, 2
SPARSE_FRACTION = 0.05
"""A dense conv whose input has fewer non-zero codes than this fraction scatters them (:func:`_scatter_conv`)
instead of an im2col GEMM: the first conv on a μ = 50 event image (≈ 1 % occupied) costs ≈ 1/30 of the GEMM."""
SPARSITY_SAMPLE_STRIDE = 61
"""The fraction is estimated on every 61st code (odd, so it does not alias with a row length): counting all of
them cost ~6 ms per event and pointwise layer, for a choice between two paths that give the same bits."""


def _mostly_empty(x: NDArray[Any]) -> bool:
    """Whether fewer than :data:`SPARSE_FRACTION` of the codes are non-zero, estimated on a regular sample."""
    sample = np.ascontiguousarray(x).reshape(-1)[::SPARSITY_SAMPLE_STRIDE]
    return bool(np.count_nonzero(sample) < SPARSE_FRACTION * sample.size)


@numba.njit(cache=True, nogil=True, inline="always")
def _requant1(acc: Any, multiplier: Any, shift: Any, lo: Any, hi: Any) -> Any:  # pragma: no cover - numba
    """The contract's requantisation of one int64 accumulator: sign(p)·((|p| + 2^(s−1)) >> s), p = acc·M, written
    as (p + 2^(s−1) − [p < 0]) >> s with an arithmetic shift (the same value), then saturated to [lo, hi]."""
    p = acc * multiplier
    y = (p + (np.int64(1) << (shift - 1)) - (1 if p < 0 else 0)) >> shift if shift > 0 else p
    return min(max(y, lo), hi)


@numba.njit(cache=True, nogil=True)
def _requantize_flat(acc: Any, multiplier: Any, shift: Any, lo: int, hi: int, out: Any) -> None:  # pragma: no cover
    for i in range(acc.size):
        out[i] = _requant1(acc[i], multiplier[i], shift[i], lo, hi)


def requantize_fast(acc: NDArray[Any], multiplier: NDArray[Any] | int, shift: NDArray[Any] | int,
                    lo: int, hi: int) -> NDArray[np.int32]:
    """Element-wise requantisation (broadcasting ``multiplier``/``shift`` against ``acc``), saturated to [lo, hi] ⊆
    int32; int32 result. The numba kernels of the layers call the same scalar function."""
    a, m, s = np.broadcast_arrays(np.asarray(acc, np.int64), np.asarray(multiplier, np.int64),
                                  np.asarray(shift, np.int64))
    out = np.empty(a.shape, np.int64)
    _requantize_flat(np.array(a).reshape(-1), np.array(m).reshape(-1), np.array(s).reshape(-1), lo, hi,
                     out.reshape(-1))
    return out.astype(np.int32)


@numba.njit(cache=True, nogil=True, inline="always")
def _act1(acc: Any, mult: Any, shift: Any, neg_mult: Any, neg_shift: Any, mode: int, lo: int,
          hi: int) -> Any:  # pragma: no cover - numba
    """One output of a conv: the accumulator (bias included) as is (raw), or requantised by the channel's (M, s)
    (by (M⁻, s⁻) for a negative accumulator under PReLU)."""
    if mode == MODE_RAW:
        return acc
    if mode == MODE_PRELU and acc < 0:
        return _requant1(acc, neg_mult, neg_shift, lo, hi)
    return _requant1(acc, mult, shift, lo, hi)


@numba.njit(cache=True, nogil=True)
def _activate(acc: Any, bias: Any, mult: Any, shift: Any, neg_mult: Any, neg_shift: Any, mode: int, lo: int, hi: int,
              out: Any) -> None:  # pragma: no cover - numba
    """acc [N, C, P] (exact integers, float or int) + bias[c] → out [N, C, P] (float32 codes, or int64 raw)."""
    n, c, p = out.shape
    for i in range(n):
        for ch in range(c):
            b, m, s, nm, ns = bias[ch], mult[ch], shift[ch], neg_mult[ch], neg_shift[ch]
            for j in range(p):
                out[i, ch, j] = _act1(np.int64(acc[i, ch, j]) + b, m, s, nm, ns, mode, lo, hi)


@numba.njit(cache=True, nogil=True)
def _depthwise3x3(x: Any, taps: Any, bias: Any, mult: Any, shift: Any, neg_mult: Any, neg_shift: Any, mode: int,
                  lo: int, hi: int, circular_phi: bool, out: Any) -> None:  # pragma: no cover - numba
    """Depthwise 3×3 (padding 1: zero rows in η, φ columns wrapped or zero) of x [N, C, H, W] (codes as float32),
    taps [C, 3, 3] float32 (ternary), fused with the bias and the requantisation; out [N, C, H, W] float32.

    Each plane is copied once into a padded scratch plane (cache-resident, no padded copy of the whole tensor);
    a row of tap sums is accumulated in float32, which is exact (|partial sums| ≤ 9·255·max|tap| ≪ 2^24) and
    vectorises, then requantised in int64."""
    n, c, h, w = x.shape
    padded = np.zeros((h + 2, w + 2), np.float32)
    row = np.empty(w, np.float32)
    for i in range(n):
        for ch in range(c):
            padded[1:h + 1, 1:w + 1] = x[i, ch]
            if circular_phi:
                padded[1:h + 1, 0] = x[i, ch, :, w - 1]
                padded[1:h + 1, w + 1] = x[i, ch, :, 0]
            t00, t01, t02 = taps[ch, 0, 0], taps[ch, 0, 1], taps[ch, 0, 2]
            t10, t11, t12 = taps[ch, 1, 0], taps[ch, 1, 1], taps[ch, 1, 2]
            t20, t21, t22 = taps[ch, 2, 0], taps[ch, 2, 1], taps[ch, 2, 2]
            b = np.int64(bias[ch])
            m, s, nm, ns = mult[ch], shift[ch], neg_mult[ch], neg_shift[ch]
            for r in range(h):
                top, mid, bot = padded[r], padded[r + 1], padded[r + 2]
                for col in range(w):
                    row[col] = (t00 * top[col] + t01 * top[col + 1] + t02 * top[col + 2]
                                + t10 * mid[col] + t11 * mid[col + 1] + t12 * mid[col + 2]
                                + t20 * bot[col] + t21 * bot[col + 1] + t22 * bot[col + 2])
                for col in range(w):
                    out[i, ch, r, col] = _act1(np.int64(row[col]) + b, m, s, nm, ns, mode, lo, hi)


@numba.njit(cache=True, nogil=True)
def _scatter_conv(first: Any, channel: Any, row: Any, col: Any, code: Any, weight: Any, circular_phi: bool,
                  bias: Any, mult: Any, shift: Any, neg_mult: Any, neg_shift: Any, mode: int, lo: int, hi: int,
                  out: Any) -> None:  # pragma: no cover - numba
    """Dense k×k convolution (padding k // 2) of a mostly-empty input given as its non-zero codes (``channel``,
    ``row``, ``col``, ``code``; those of image i at ``first[i]`` … ``first[i + 1]``), fused with the bias and the
    activation; out [N, O, H, W].

    One output plane at a time: acc[y, x] += W[o, c, ky, kx] · q for every non-zero X[c, y + ky − p, x + kx − p] = q
    (int32, exact whatever the order: |acc| ≤ the compiler's bound), then acc + bias is activated into the plane.
    The plane stays in cache; the whole tensor is written once."""
    n, o_count, h, w = out.shape
    k = weight.shape[2]
    p = k // 2
    acc = np.empty((h, w), np.int32)
    for i in range(n):
        for o in range(o_count):
            acc[:] = 0
            for idx in range(first[i], first[i + 1]):
                ch, yi, xi, q = channel[idx], row[idx], col[idx], code[idx]
                for ky in range(k):
                    y = yi - ky + p
                    if y < 0 or y >= h:
                        continue
                    for kx in range(k):
                        xo = xi - kx + p
                        if xo < 0 or xo >= w:
                            if not circular_phi:
                                continue
                            xo %= w
                        acc[y, xo] += weight[o, ch, ky, kx] * q
            b, m, s, nm, ns = bias[o], mult[o], shift[o], neg_mult[o], neg_shift[o]
            for y in range(h):
                for x in range(w):
                    out[i, o, y, x] = _act1(np.int64(acc[y, x]) + b, m, s, nm, ns, mode, lo, hi)


@numba.njit(cache=True, nogil=True)
def _avgpool(x: Any, out: Any) -> None:  # pragma: no cover - numba
    """k2 s2 p1 with the padded zeros counted: out[i, j] = round_half_away(Σ X[2i − 1 + a, 2j − 1 + b] / 4)."""
    n, c, h, w = x.shape
    _, _, ho, wo = out.shape
    for i in range(n):
        for ch in range(c):
            for r in range(ho):
                for col in range(wo):
                    total = np.int64(0)
                    for a in range(2):
                        row = 2 * r - 1 + a
                        if 0 <= row < h:
                            for b in range(2):
                                cc = 2 * col - 1 + b
                                if 0 <= cc < w:
                                    total += np.int64(x[i, ch, row, cc])
                    out[i, ch, r, col] = _requant1(total, 1, 2, -(2**31), 2**31 - 1)


class Workspace:
    """Output buffers reused from one batch to the next, one per (op, role): a fresh 40 MB array costs ~10k page
    faults, which was a third of a pointwise layer's time. Not thread-safe: one workspace per thread. Arrays handed
    back by :func:`run` never live here (the heads' output is always a new array)."""

    def __init__(self) -> None:
        self._arrays: dict[str, NDArray[Any]] = {}

    def get(self, key: str, shape: tuple[int, ...], dtype: type[np.generic]) -> NDArray[Any]:
        """An uninitialised array of ``shape``/``dtype`` for ``key``, the previous one when it matches."""
        array = self._arrays.get(key)
        if array is None or array.shape != shape or array.dtype != dtype:
            array = np.empty(shape, dtype)
            self._arrays[key] = array
        return array


def _buffer(workspace: Workspace | None, key: str, shape: tuple[int, ...], dtype: type[np.generic]
            ) -> NDArray[Any]:
    return np.empty(shape, dtype) if workspace is None else workspace.get(key, shape, dtype)


def quantize_input(op: dict[str, Any], images: NDArray[np.float32]) -> Codes:
    """Input codes q = #{k : T_k ≤ x} by binary search in the thresholds; only the occupied pixels are searched
    (the others all share the code of 0, usually 0)."""
    x = np.asarray(images, np.float32)
    if not np.isfinite(x).all():
        raise ValueError("input image has non-finite values (the contract takes finite GeV ≥ 0)")
    thresholds = op["thresholds"]
    codes = np.full(x.shape, np.searchsorted(thresholds, np.float32(0.0), side="right"), np.float32)
    occupied = np.flatnonzero(x)
    codes.reshape(-1)[occupied] = np.searchsorted(thresholds, x.reshape(-1)[occupied], side="right")
    return codes


def _pad(x: NDArray[Any], pad: int, circular_phi: bool) -> NDArray[Any]:
    """Zero rows in η; φ columns wrapped (circular) or zero."""
    if pad == 0:
        return x
    if circular_phi:
        x = np.concatenate([x[..., -pad:], x, x[..., :pad]], axis=-1)
        return np.pad(x, ((0, 0), (0, 0), (pad, pad), (0, 0)))
    return np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))


def _mode_arrays(op: dict[str, Any], c_out: int) -> tuple[int, tuple[NDArray[np.int64], ...], int, int]:
    """(mode, (multiplier, shift, neg_multiplier, neg_shift) int64 [C], lo, hi) of a conv's activation."""
    kind = op["activation"]
    if kind == "raw":
        zeros = np.zeros(c_out, np.int64)
        return MODE_RAW, (zeros, zeros, zeros, zeros), -(2**31), 2**31 - 1
    mult = op["multiplier"].astype(np.int64)
    shift = op["shift"].astype(np.int64)
    if kind == "prelu":
        return (MODE_PRELU, (mult, shift, op["neg_multiplier"].astype(np.int64), op["neg_shift"].astype(np.int64)),
                -128, 127)
    lo, hi = (0, 255) if kind == "relu" else (-128, 127)
    return MODE_LINEAR, (mult, shift, mult, shift), lo, hi


def conv(op: dict[str, Any], x: Codes, workspace: Workspace | None = None) -> NDArray[Any]:
    """Convolution, bias and activation: float32 codes [N, C_out, H, W], or the raw accumulators (int64, always a
    new array) for the heads. Depthwise: the fused numba kernel; dense on a mostly-empty input: the fused scatter
    kernel; other dense: im2col (k > 1) + BLAS GEMM, then the fused requantisation."""
    weight = op["weight"]
    c_out, c_per_group, k, _ = weight.shape
    n, c_in, h, w = x.shape
    mode, (mult, shift, neg_mult, neg_shift), lo, hi = _mode_arrays(op, c_out)
    bias = op["bias"].astype(np.int64)
    raw = mode == MODE_RAW
    out = (np.empty((n, c_out, h, w), np.int64) if raw else
           _buffer(workspace, op["name"] + ".out", (n, c_out, h, w), np.float32))
    if op["groups"] == c_in and c_per_group == 1 and c_out == c_in:
        if k != 3:
            raise ValueError(f"{op['name']}: only 3×3 depthwise convolutions are in the contract")
        _depthwise3x3(np.ascontiguousarray(x, np.float32), weight[:, 0].astype(np.float32), bias, mult, shift,
                      neg_mult, neg_shift, mode, lo, hi, bool(op["circular_phi"]), out)
        return out
    if op["groups"] != 1:
        raise ValueError(f"{op['name']}: grouped convolutions other than depthwise are not in the contract")
    if _mostly_empty(x):
        image, channel, row, col = np.nonzero(x)  # C order: sorted by image
        first = np.searchsorted(image, np.arange(n + 1))
        _scatter_conv(first, channel, row, col, x[image, channel, row, col].astype(np.int32),
                      weight.astype(np.int32), bool(op["circular_phi"]), bias, mult, shift, neg_mult, neg_shift, mode,
                      lo, hi, out)
        return out
    dtype = np.float32 if op["acc_bound"] < F32_EXACT else np.float64
    if k == 1:
        cols = np.asarray(x, dtype).reshape(n, c_in, h * w)
    else:
        xp = _pad(np.asarray(x, dtype), k // 2, op["circular_phi"])
        taps = [xp[:, :, ky:ky + h, kx:kx + w] for ky in range(k) for kx in range(k)]
        cols = np.stack(taps, axis=2).reshape(n, c_in * k * k, h * w)  # rows in the weight's (c, ky, kx) order
    acc = np.matmul(weight.reshape(c_out, -1).astype(dtype), cols,  # [N, C_out, H·W], exact integers
                    out=_buffer(workspace, op["name"] + ".acc", (n, c_out, h * w), dtype))
    _activate(acc, bias, mult, shift, neg_mult, neg_shift, mode, lo, hi, out.reshape(n, c_out, h * w))
    return out


def avgpool(x: NDArray[Any], workspace: Workspace | None = None, key: str = "avgpool") -> Codes:
    """Pad one zero row/column on each side, sum 2×2 blocks from (0, 0), divide by 4 rounding half away from 0."""
    n, c, h, w = x.shape
    out = _buffer(workspace, key, (n, c, h // 2 + 1, w // 2 + 1), np.float32)
    _avgpool(np.ascontiguousarray(x, np.float32), out)
    return out


def l2norm(op: dict[str, Any], x: NDArray[Any]) -> Codes:
    """Per pixel: r = isqrt(Σ_c q² · 2^g), inv = ⌊(2^30 + ⌊r/2⌋) / r⌋, y_c = requant(q_c · inv) (int64 numpy)."""
    q = np.asarray(x).astype(np.int64)
    sq = (q * q).sum(axis=1, keepdims=True)
    r = isqrt_array(sq << op["sqrt_shift"])
    inv = np.where(r > 0, ((1 << 30) + (r >> 1)) // np.maximum(r, 1), 0)
    return requantize_fast(q * inv, op["multiplier"][None, :, None, None], op["shift"][None, :, None, None],
                           -128, 127).astype(np.float32)


def eca(op: dict[str, Any], x: NDArray[Any]) -> Codes:
    """Channel sums, the int8 1-D kernel, z = requant(acc), gate = LUT[z + 128] (Q15), y = requant(q, gate, 15)."""
    q = np.asarray(x).astype(np.int64)
    _n, c, h, w = q.shape
    if [h, w] != list(op["map_shape"]):
        raise ValueError(f"ECA was compiled for a {op['map_shape']} map, got {[h, w]}")
    sums = q.sum(axis=(2, 3))  # [N, C]
    e = op["weight"].astype(np.int64)
    half = len(e) // 2
    padded = np.pad(sums, ((0, 0), (half, half)))
    acc = sum(e[k] * padded[:, k:k + c] for k in range(len(e)))
    z = requantize_fast(acc, op["z_multiplier"], op["z_shift"], -128, 127)
    gate = op["lut"].astype(np.int64)[z + 128]  # [N, C]
    return requantize_fast(q, gate[:, :, None, None], op["lut_frac_bits"], -128, 127).astype(np.float32)


def run(program: Program, images: NDArray[np.float32], workspace: Workspace | None = None) -> NDArray[np.int64]:
    """A batch [N, 3, H, W] (GeV, float32) → the heads' raw accumulators [N, 7, h, w] (int64 holding int32).

    ``workspace`` keeps the intermediate buffers for the next call (pass the same one for every batch of a
    thread); without it every buffer is new."""
    out = interpret(program, images, quantize_input, {
        "conv": lambda op, x: conv(op, x, workspace),
        "avgpool": lambda x: avgpool(x, workspace, f"avgpool{x.shape}"),  # each pool sees another shape
        "l2norm": l2norm, "eca": eca})
    return np.asarray(out, np.int64)


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


def run_float(program: Program, images: NDArray[np.float32], workspace: Workspace | None = None
              ) -> tuple[NDArray[np.float32], NDArray[np.float32], NDArray[np.float32]]:
    """:func:`run` then :func:`dequantize_heads`: the ONNX graph's (loc, cls_logits, reg)."""
    return dequantize_heads(program, run(program, images, workspace))
