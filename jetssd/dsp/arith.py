"""Integer arithmetic of the DSP contract (``docs/dsp.md`` §3), scalar (Python ints) and for numpy arrays.

Requantisation of an accumulator ``a`` by a multiplier (M, s), M a signed int32 and 0 ≤ s ≤ 62::

    p = a · M                                         exact, int64 (|a| < 2^31, |M| < 2^31 ⇒ |p| < 2^62)
    y = sign(p) · ((|p| + 2^(s−1)) >> s)   (s ≥ 1)    i.e. p / 2^s rounded half away from zero
    y = p                                  (s = 0)
    out = min(max(y, lo), hi)                          saturation

:func:`quantize_multiplier` turns a real multiplier m into (M, s) with m ≈ M · 2^−s, M ∈ [2^30, 2^31).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numpy.typing import NDArray

INT32_MIN = -(2**31)
INT32_MAX = 2**31 - 1
MAX_SHIFT = 62


def quantize_multiplier(real: float) -> tuple[int, int]:
    """(M, s) with real ≈ M · 2^−s: |M| ∈ [2^30, 2^31) and 0 ≤ s ≤ 62, or (0, 0) for real = 0 (or below 2^−32).

    M = round_half_even(frac · 2^31) where real = frac · 2^e, 0.5 ≤ |frac| < 1 (``math.frexp``), s = 31 − e; a
    multiplier too small for s ≤ 62 becomes (0, 0) (it is < 2^−31: no int32 accumulator could reach 1 LSB with it,
    except near overflow). Raises ValueError for |real| ≥ 2^31 or a non-finite value.
    """
    if not math.isfinite(real):
        raise ValueError(f"multiplier must be finite, got {real}")
    if real == 0.0:
        return 0, 0
    frac, exp = math.frexp(real)
    m = round(frac * 2**31)
    if abs(m) == 2**31:
        m //= 2
        exp += 1
    shift = 31 - exp
    if shift > MAX_SHIFT:
        return 0, 0
    if shift < 0:
        raise ValueError(f"multiplier {real} too large (≥ 2^31)")
    return int(m), int(shift)


def requantize_scalar(acc: int, multiplier: int, shift: int, lo: int, hi: int) -> int:
    """The contract's requantisation on Python ints (no overflow possible): the executors' specification."""
    p = acc * multiplier
    if shift == 0:
        y = p
    else:
        magnitude = (abs(p) + (1 << (shift - 1))) >> shift
        y = magnitude if p >= 0 else -magnitude
    return min(max(y, lo), hi)


def requantize(acc: NDArray[np.integer[Any]], multiplier: NDArray[np.integer[Any]] | int,
               shift: NDArray[np.integer[Any]] | int, lo: int, hi: int) -> NDArray[np.int32]:
    """:func:`requantize_scalar` element-wise in int64 (broadcasting ``multiplier``/``shift`` against ``acc``)."""
    p = np.asarray(acc, np.int64) * np.asarray(multiplier, np.int64)
    s = np.asarray(shift, np.int64)
    half = np.where(s > 0, np.left_shift(np.int64(1), np.maximum(s - 1, 0)), 0)
    magnitude = (np.abs(p) + half) >> s
    y = np.where(p >= 0, magnitude, -magnitude)
    return np.clip(y, lo, hi).astype(np.int32)


def rounding_shift(x: NDArray[np.integer[Any]], shift: int) -> NDArray[np.int64]:
    """x / 2^shift rounded half away from zero (shift ≥ 1), int64."""
    x = np.asarray(x, np.int64)
    magnitude = (np.abs(x) + (1 << (shift - 1))) >> shift
    return np.where(x >= 0, magnitude, -magnitude)


def isqrt_array(x: NDArray[np.integer[Any]]) -> NDArray[np.int64]:
    """⌊√x⌋ element-wise for 0 ≤ x < 2^52 (float estimate, then exact integer correction)."""
    x = np.asarray(x, np.int64)
    r = np.floor(np.sqrt(x.astype(np.float64))).astype(np.int64)
    r = np.where(r * r > x, r - 1, r)
    return np.where((r + 1) * (r + 1) <= x, r + 1, r)


def round_div_half_up(num: int, den: int) -> int:
    """⌊(num + ⌊den/2⌋) / den⌋ for num ≥ 0, den > 0: the L2Norm reciprocal's division."""
    return (num + (den >> 1)) // den
