"""The η/φ image grid shared by every path (DESIGN §4.1).

The image has 3 channels × 340 η bins × 360 φ bins. One pixel is one ECAL crystal cell of the CMS
Phase-II card: Δη = 0.0174 and Δφ = 1° = π/180 rad.

* η acceptance is the half-open interval [−2.958, 2.958); values outside (and NaN) have no pixel.
* φ is periodic: every φ is first wrapped into [−π, π), so φ = π and φ = −π fall in bin 0.

Bin indices are ``floor`` of a division, corrected by one comparison with the edge arrays below, so
that the pixel of a value is, to the last bit, the bin ``numpy.histogram2d`` puts it in when given
:data:`ETA_EDGES` and :data:`PHI_EDGES` (except the closed upper η edge, see :func:`eta_to_index`).
Index arrays use ``-1`` for "no pixel".
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike, NDArray

N_CHANNELS = 3
"""Image channels: 0 charged tracks (pT), 1 photons + electrons (ECAL ET), 2 neutral hadrons (HCAL ET)."""
N_ETA = 340
"""Number of η bins (image rows, axis 1 of a [3, 340, 360] image)."""
N_PHI = 360
"""Number of φ bins (image columns, axis 2)."""
IMAGE_SHAPE = (N_CHANNELS, N_ETA, N_PHI)

ETA_STEP = 0.0174
ETA_MIN = -2.958
ETA_MAX = 2.958
PHI_STEP = math.pi / 180.0
PHI_MIN = -math.pi
PHI_MAX = math.pi

# Rounded to the 4 decimals of the card, so each edge is the double nearest to k·0.0174 and the
# acceptance edges are exactly the literals ±2.958 a user would type.
ETA_EDGES: NDArray[np.float64] = np.round(np.arange(-170, 171, dtype=np.float64) * ETA_STEP, 4)
"""341 η bin edges, k·0.0174 for k = −170…170."""
PHI_EDGES: NDArray[np.float64] = np.linspace(-math.pi, math.pi, N_PHI + 1)
"""361 φ bin edges, −π + j·π/180 for j = 0…360."""

ETA_CENTERS: NDArray[np.float64] = 0.5 * (ETA_EDGES[:-1] + ETA_EDGES[1:])
PHI_CENTERS: NDArray[np.float64] = 0.5 * (PHI_EDGES[:-1] + PHI_EDGES[1:])

_TWO_PI = 2.0 * math.pi


def wrap_phi(phi: ArrayLike) -> NDArray[np.float64]:
    """Wrap angles (rad) into [−π, π). NaN stays NaN, ±inf becomes NaN.

    ``(φ + π) mod 2π − π`` alone can return +π for a value a hair below −π (the modulo rounds up to
    2π), so that case is folded back explicitly: the result is always strictly below π.
    """
    p = np.asarray(phi, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        in_range = (p >= -math.pi) & (p < math.pi)
        if np.all(in_range):  # the common case: leave the values bit-exact
            return p
        w = np.mod(p + math.pi, _TWO_PI) - math.pi
        w = np.where(w >= math.pi, w - _TWO_PI, w)
        return np.where(in_range, p, w)


def in_acceptance(eta: ArrayLike) -> NDArray[np.bool_]:
    """True where ETA_MIN ≤ η < ETA_MAX (NaN is outside)."""
    e = np.asarray(eta, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        return (e >= ETA_EDGES[0]) & (e < ETA_EDGES[-1])


def eta_to_index(eta: ArrayLike) -> NDArray[np.int64]:
    """η → bin index 0…339, or −1 outside [ETA_MIN, ETA_MAX) or NaN.

    The upper edge is open (DESIGN §4.1). ``numpy.histogram2d`` closes its last bin, so a value of
    exactly +2.958 is the one place the two differ; the reference (pfjet-ssd-reference §1.2) drops it too.
    """
    e = np.asarray(eta, dtype=np.float64)
    inside = in_acceptance(e)
    return np.where(inside, _bin_index(e, inside, ETA_EDGES, ETA_STEP), -1)


def phi_to_index(phi: ArrayLike) -> NDArray[np.int64]:
    """φ (any real, rad) → bin index 0…359 after wrapping, or −1 for NaN/inf."""
    w = wrap_phi(phi)
    finite = np.isfinite(w)
    return np.where(finite, _bin_index(w, finite, PHI_EDGES, PHI_STEP), -1)


def _bin_index(x: NDArray[np.float64], valid: NDArray[np.bool_], edges: NDArray[np.float64],
               step: float) -> NDArray[np.int64]:
    """Index of the bin [edges[k], edges[k+1]) holding each valid x (garbage where not valid).

    ``floor((x − x0)/step)`` can be one bin off within an ulp of an edge; comparing with the edge array
    itself fixes that, so the result equals ``searchsorted(edges, x, 'right') − 1`` at a third of the cost.
    """
    with np.errstate(invalid="ignore"):
        guess = np.floor((x - edges[0]) * (1.0 / step))
    idx = np.where(valid, guess, 0).astype(np.int64)
    np.clip(idx, 0, len(edges) - 2, out=idx)
    idx -= x < edges[idx]
    idx += x >= edges[idx + 1]
    return idx


def index_to_eta(i: ArrayLike) -> NDArray[np.float64]:
    """η bin index → η of the pixel centre. Accepts fractional indices (continuous pixel coordinates)."""
    return ETA_EDGES[0] + (np.asarray(i, dtype=np.float64) + 0.5) * ETA_STEP


def index_to_phi(j: ArrayLike) -> NDArray[np.float64]:
    """φ bin index → φ of the pixel centre, wrapped into [−π, π). Fractional indices allowed."""
    return wrap_phi(PHI_EDGES[0] + (np.asarray(j, dtype=np.float64) + 0.5) * PHI_STEP)


def eta_to_pixel(eta: ArrayLike) -> NDArray[np.float64]:
    """η → continuous pixel coordinate (bin i spans [i, i+1), its centre is i + 0.5)."""
    return (np.asarray(eta, dtype=np.float64) - ETA_EDGES[0]) / ETA_STEP


def phi_to_pixel(phi: ArrayLike) -> NDArray[np.float64]:
    """φ → continuous pixel coordinate in [0, 360) after wrapping."""
    return (wrap_phi(phi) - PHI_EDGES[0]) / PHI_STEP


def delta_phi(phi1: ArrayLike, phi2: ArrayLike) -> NDArray[np.float64]:
    """Signed φ1 − φ2 wrapped into [−π, π) (rad): the short way round the circle."""
    return wrap_phi(np.asarray(phi1, dtype=np.float64) - np.asarray(phi2, dtype=np.float64))


def delta_r(eta1: ArrayLike, phi1: ArrayLike, eta2: ArrayLike, phi2: ArrayLike) -> NDArray[np.float64]:
    """ΔR = √(Δη² + Δφ²) with Δφ wrapped, broadcasting like numpy. NaN in, NaN out."""
    deta = np.asarray(eta1, dtype=np.float64) - np.asarray(eta2, dtype=np.float64)
    return np.hypot(deta, delta_phi(phi1, phi2))
