"""Anchors (priors), φ-aware SSD matching and target encoding (reference §4.1–4.2, DESIGN §4.1).

The one implementation used by training (targets are built with numpy in DataLoader workers),
validation, the Triton python backend, the gateway and the evaluation. Numpy only.

Coordinates are continuous pixel coordinates of the [3, 340, 360] image:

* x runs along η, 0…340; pixel row i spans [i, i+1) and has its centre at i + 0.5.
* y runs along φ, 0…360, and is periodic with period 360; pixel column j has its centre at j + 0.5.

Every anchor and every box is a square of fixed side ``box_size_px`` (46 px) centred on a point, so a
box is just its centre. Differences from the reference, each fixing an item of its §10:

* anchor centres tile the image exactly, (i + 0.5)·340/n_eta and (j + 0.5)·360/n_phi, instead of
  (i + 0.5)·step with steps 8 and 17 that overshoot the image (§10.8);
* IoU, matching and the encoded φ offset take the φ distance the short way round (§10.7);
* ground truth sits at the continuous pixel coordinate of its (η, φ), not at the lower edge of its
  bin (§10.3);
* the pT target is ln(pT / pt_scale_gev) with a dataset-level scale, not pT divided by the event's
  hottest pixel (§10.5).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from jetssd import geometry
from jetssd.event import TruthObjects

X_EXTENT = float(geometry.N_ETA)
"""Width of the image along x (η), pixels."""
Y_PERIOD = float(geometry.N_PHI)
"""Period of y (φ), pixels: y and y + 360 are the same place."""
N_CLASSES = 3
"""Object classes t, V, H; the detector's label 0 is background, so labels run 0…3."""

@dataclass(frozen=True)
class FeatureMap:
    """One source feature map of the network: ``n_eta`` × ``n_phi`` cells, one anchor per cell."""

    n_eta: int
    n_phi: int

    def __post_init__(self) -> None:
        if self.n_eta < 1 or self.n_phi < 1:
            raise ValueError(f"feature map must have at least one cell per axis, got {self.n_eta}×{self.n_phi}")

    @property
    def n_anchors(self) -> int:
        return self.n_eta * self.n_phi


INFERENCE_MAPS: tuple[FeatureMap, ...] = (FeatureMap(44, 46),)
"""Source maps used at inference (reference §3.2): 2024 anchors."""
TRAINING_MAPS: tuple[FeatureMap, ...] = (FeatureMap(44, 46), FeatureMap(23, 24))
"""Source maps used in training (reference §3.2): 2024 + 552 = 2576 anchors."""


LAYOUTS = ("receptive", "stretched")


@dataclass(frozen=True)
class AnchorConfig:
    """Box geometry and target encoding, shared by training and inference (stored in model metadata).

    Attributes:
        box_size_px: side of every anchor and box, pixels (46, reference §1.6). At most 180, so a box
            overlaps another at most once around the φ circle.
        variance: scale of the location target, which is in units of variance·box_size_px (4.6 px).
        match_iou: anchors whose best IoU with any ground truth is below this become background.
        pt_scale_gev: the pT target is ln(pT / pt_scale_gev).
        layout: where the anchor of each cell sits (:func:`anchor_centres`): "receptive" (default) at the
            centre of the cell's receptive field, which a translation-equivariant network can regress to;
            "stretched" (the first shipped models) evenly spread over the image. A config or metadata
            without this key predates it and means "stretched".
    """

    box_size_px: float = 46.0
    variance: float = 0.1
    match_iou: float = 0.5
    pt_scale_gev: float = 1000.0
    layout: str = "receptive"

    def __post_init__(self) -> None:
        if not (0.0 < self.box_size_px <= Y_PERIOD / 2):
            raise ValueError(f"box_size_px must be in (0, {Y_PERIOD / 2:g}], got {self.box_size_px}")
        if not (self.variance > 0.0 and math.isfinite(self.variance)):
            raise ValueError(f"variance must be a positive finite number, got {self.variance}")
        if not (0.0 < self.match_iou <= 1.0):
            raise ValueError(f"match_iou must be in (0, 1], got {self.match_iou}")
        if not (self.pt_scale_gev > 0.0 and math.isfinite(self.pt_scale_gev)):
            raise ValueError(f"pt_scale_gev must be a positive finite number, got {self.pt_scale_gev}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")

    @property
    def loc_unit_px(self) -> float:
        """Pixels per unit of the location target (variance · box size)."""
        return self.variance * self.box_size_px

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AnchorConfig:
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"AnchorConfig: unknown key(s) {unknown}")
        return cls(**{"layout": "stretched", **d})  # written before the layout existed: the stretched one


@dataclass(frozen=True)
class AnchorTargets:
    """Training targets of one event, one row per anchor.

    Attributes:
        labels: int64 [P], 0 background, 1 t, 2 V, 3 H.
        loc: float32 [P, 2], encoded (Δx, Δy) offsets of the matched ground truth (see :func:`encode_centres`);
            0 for background anchors.
        pt: float32 [P], ln(pT / pt_scale_gev) of the matched ground truth; 0 for background anchors.
    """

    labels: NDArray[np.int64]
    loc: NDArray[np.float32]
    pt: NDArray[np.float32]

    @property
    def positive(self) -> NDArray[np.bool_]:
        """bool [P]: anchors matched to a ground-truth object."""
        return self.labels > 0


# ------------------------------------------------------------------------------------------------ anchors


def pooling_depth(n_cells: int, n_pixels: int) -> int:
    """How many AvgPool(k=2, s=2, p=1) stages turn ``n_pixels`` into ``n_cells`` (n → ⌊n/2⌋ + 1 each)."""
    depth, n = 0, n_pixels
    while n > n_cells:
        n, depth = n // 2 + 1, depth + 1
    if n != n_cells:
        raise ValueError(f"a {n_cells}-cell axis is not a pooled {n_pixels}-pixel axis")
    return depth


def receptive_centres(n_cells: int, n_pixels: int) -> NDArray[np.float64]:
    """Centres, in pixel coordinates, of the receptive fields of a pooled axis's cells, float64 [n_cells].

    Pooling stage k averages cells 2o − 1 and 2o of stage k − 1 (the first is the zero padding for o = 0),
    and 'same' 3×3 convolutions do not move centres, so cell o after k stages is centred at
    2^k·o − (2^(k−1) − 1): 8o − 3 after three stages (the 44 × 46 map), 16o − 7 after four (23 × 24).
    """
    k = pooling_depth(n_cells, n_pixels)
    offset = 2.0 ** (k - 1) - 1.0 if k > 0 else -0.5  # k = 0: pixel o is centred at o + 0.5
    return (2.0**k) * np.arange(n_cells, dtype=np.float64) - offset


def crop_maps(crop: int, n_sources: int = 2) -> tuple[FeatureMap, ...]:
    """Source maps of the network on a ``crop`` × ``crop`` input: the sizes after 3 (and 4) pools.

    Each reference pool (k=2, s=2, p=1) maps n → ⌊n/2⌋ + 1, so a 128 crop gives 17 × 17 and 9 × 9
    (289 + 81 = 370 anchors with ``n_sources=2``, the training graph; 289 with 1, the inference graph).
    """
    if crop < 1:
        raise ValueError(f"crop must be a positive number of pixels, got {crop}")
    if n_sources not in (1, 2):
        raise ValueError(f"n_sources must be 1 or 2, got {n_sources}")
    maps, n = [], crop
    for depth in range(1, 5):
        n = n // 2 + 1
        if depth >= 3:
            maps.append(FeatureMap(n, n))
    return tuple(maps[:n_sources])


def anchor_centres(maps: Sequence[FeatureMap], layout: str = "stretched",
                   extent: tuple[int, int] = (int(X_EXTENT), int(Y_PERIOD)),
                   periodic_phi: bool = True) -> NDArray[np.float64]:
    """Anchor centres in pixel coordinates, float64 [P, 2] as (x, y), y in [0, 360).

    ``layout`` (see :class:`AnchorConfig`): "receptive" puts the anchor of a cell at the centre of its
    receptive field (:func:`receptive_centres`), so the offset to regress is the same everywhere in the
    image; "stretched" (the layout of the first shipped models) at ((i + 0.5)·340/n_eta, (j + 0.5)·360/n_phi),
    evenly spread but drifting by up to ±7 px from the receptive fields. Order: map after map; within a map
    i (η) outer, j (φ) inner, the NHWC flattening of the network's head outputs.

    ``extent`` is the (η, φ) size in pixels of the image the maps were pooled from: (340, 360) for full
    events, (C, C) for a training crop (see :func:`crop_maps`). With ``periodic_phi=False`` (a crop, whose
    φ edges are not neighbours) y is not wrapped: the first receptive centre, −3 or −7, stays negative.
    Only the "receptive" layout supports a non-default extent (a stretched anchor drifts with the image
    size, so a crop's anchors would not be the full image's).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    n_x, n_y = int(extent[0]), int(extent[1])
    if layout != "receptive" and ((n_x, n_y) != (int(X_EXTENT), int(Y_PERIOD)) or not periodic_phi):
        raise ValueError(f"layout {layout!r} has anchors for the full {int(X_EXTENT)}×{int(Y_PERIOD)} periodic "
                         "image only; crops need the 'receptive' layout")
    parts = []
    for fm in maps:
        if layout == "receptive":
            x = receptive_centres(fm.n_eta, n_x)
            y = receptive_centres(fm.n_phi, n_y)
            if periodic_phi:
                y = np.mod(y, Y_PERIOD)
        else:
            x = (np.arange(fm.n_eta, dtype=np.float64) + 0.5) * (X_EXTENT / fm.n_eta)
            y = (np.arange(fm.n_phi, dtype=np.float64) + 0.5) * (Y_PERIOD / fm.n_phi)
        xx, yy = np.meshgrid(x, y, indexing="ij")
        parts.append(np.stack([xx.ravel(), yy.ravel()], axis=-1))
    if not parts:
        return np.zeros((0, 2), np.float64)
    return np.concatenate(parts, axis=0)


def wrap_y(y: ArrayLike) -> NDArray[np.floating[Any]]:
    """Wrap φ pixel coordinates into [0, 360). Keeps float32 as float32, anything else becomes float64.

    May return ``y`` itself (not a copy) when it is already wrapped.
    """
    arr = _as_float(y)
    # Already wrapped (the usual case): skip the float modulo, the slowest step of an IoU on pairs.
    if arr.size and np.minimum.reduce(arr, axis=None) >= 0 and np.maximum.reduce(arr, axis=None) < Y_PERIOD:
        return arr
    w = np.mod(arr, arr.dtype.type(Y_PERIOD))
    # mod of a tiny negative value rounds up to exactly 360; that point is 0.
    return np.where(w >= Y_PERIOD, arr.dtype.type(0), w)


def wrap_dy(dy: ArrayLike) -> NDArray[np.floating[Any]]:
    """Wrap φ pixel differences into [−180, 180): the signed short way round."""
    arr = _as_float(dy)
    half = arr.dtype.type(Y_PERIOD / 2)
    w = np.mod(arr + half, arr.dtype.type(Y_PERIOD))
    return np.where(w >= Y_PERIOD, arr.dtype.type(0), w) - half


def _as_float(a: ArrayLike) -> NDArray[np.floating[Any]]:
    """float32 stays float32 (the inference path), everything else becomes float64."""
    arr = np.asarray(a)
    return arr.astype(np.float32 if arr.dtype == np.float32 else np.float64, copy=False)


def wrapped_iou(a: ArrayLike, b: ArrayLike, box_size_px: float, *, elementwise: bool = False,
                periodic_phi: bool = True) -> NDArray[np.floating[Any]]:
    """IoU of equal axis-aligned squares of side ``box_size_px`` centred on ``a`` and ``b``, φ wrapped.

    Args:
        a: [..., A, 2] centres (x, y), pixels.
        b: [..., B, 2] centres (x, y), pixels; leading dimensions broadcast with ``a``'s.
        box_size_px: square side s, pixels, at most 180 so that two boxes overlap at most once.
        elementwise: instead of all pairs, the IoU of a[..., k, :] with b[..., k, :]: a and b are
            [..., 2] and broadcast together, the result is [...].
        periodic_phi: False for a crop, whose y axis is not periodic: plain distances, no wrap.

    Returns:
        [..., A, B] IoU in [0, 1] (or [...] when ``elementwise``), float32 when both inputs are float32,
        else float64. The y distance is taken the short way round the period of 360, so boxes at y = 2
        and y = 358 are 4 px apart.
    """
    ox, oy, s = _overlaps(a, b, box_size_px, elementwise, periodic_phi)
    np.maximum(ox, 0, out=ox)
    np.maximum(oy, 0, out=oy)
    inter = np.multiply(ox, oy, out=ox)
    # Equal squares: union = 2s² − intersection, never zero.
    union = np.subtract(2 * s * s, inter, out=oy)
    return np.divide(inter, union, out=inter)


def wrapped_iou_above(a: ArrayLike, b: ArrayLike, box_size_px: float, threshold: float, *,
                      elementwise: bool = False) -> NDArray[np.bool_]:
    """``wrapped_iou(a, b, box_size_px, elementwise=elementwise) > threshold``, for ``threshold`` in [0, 1].

    The test the NMS needs, computed without the division: for equal squares of side s,
    inter / (2s² − inter) > t  ⇔  inter > 2s²·t / (1 + t). Arguments and shapes as :func:`wrapped_iou`;
    returns bool.
    """
    if not (0.0 <= threshold <= 1.0):
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    ox, oy, s = _overlaps(a, b, box_size_px, elementwise)
    # Clipping one factor is enough: a product with a clipped 0 is 0, and an unclipped negative oy with
    # a positive ox gives a negative product; neither passes a threshold ≥ 0.
    np.maximum(ox, 0, out=ox)
    inter = np.multiply(ox, oy, out=ox)
    return np.greater(inter, s.dtype.type(2 * float(s) ** 2 * threshold / (1 + threshold)))


def _overlaps(a: ArrayLike, b: ArrayLike, box_size_px: float, elementwise: bool, periodic_phi: bool = True
              ) -> tuple[NDArray[np.floating[Any]], NDArray[np.floating[Any]], np.floating[Any]]:
    """Signed overlaps along x and y (negative when apart) of squares of side s centred on a and b.

    Returns (ox, oy), [..., A, B] for a [..., A, 2] and b [..., B, 2] (or broadcast [...] when
    ``elementwise``), and s as a numpy scalar; float32 when both inputs are float32, else float64.
    ``periodic_phi=False`` takes y distances as they are (crop coordinates), not the short way round.
    """
    a_arr = np.asarray(a)
    b_arr = np.asarray(b)
    min_ndim = 1 if elementwise else 2
    if a_arr.shape[-1:] != (2,) or b_arr.shape[-1:] != (2,) or min(a_arr.ndim, b_arr.ndim) < min_ndim:
        want = "[..., 2]" if elementwise else "[..., A, 2] and [..., B, 2]"
        raise ValueError(f"wrapped IoU needs {want} centres, got {a_arr.shape} and {b_arr.shape}")
    dtype = np.float32 if (a_arr.dtype == np.float32 and b_arr.dtype == np.float32) else np.float64
    s = dtype(box_size_px)
    ax: NDArray[np.floating[Any]] = a_arr[..., 0].astype(dtype, copy=False)
    bx: NDArray[np.floating[Any]] = b_arr[..., 0].astype(dtype, copy=False)
    # Wrapping the inputs (A + B values) makes |Δy| < 360, so the short way is min(|Δy|, 360 − |Δy|)
    # without a modulo on the A × B matrix.
    ay = a_arr[..., 1].astype(dtype, copy=False)
    by = b_arr[..., 1].astype(dtype, copy=False)
    if periodic_phi:
        ay, by = wrap_y(ay), wrap_y(by)
    if not elementwise:
        ax, ay = ax[..., :, None], ay[..., :, None]
        bx, by = bx[..., None, :], by[..., None, :]

    ox = np.subtract(ax, bx)
    np.abs(ox, out=ox)
    np.subtract(s, ox, out=ox)
    dy = np.subtract(ay, by)
    np.abs(dy, out=dy)
    if periodic_phi:
        oy = np.subtract(dtype(Y_PERIOD), dy)
        np.minimum(dy, oy, out=oy)
    else:
        oy = dy
    np.subtract(s, oy, out=oy)
    return ox, oy, s


# ------------------------------------------------------------------------------------- truth and encoding


def truth_pixels(truth: TruthObjects) -> tuple[NDArray[np.float64], NDArray[np.int64], NDArray[np.float64]]:
    """Ground-truth objects in pixel coordinates, ready for :func:`match`.

    Objects outside the η acceptance [−2.958, 2.958), with a non-finite φ or pT, or with pT ≤ 0 (its
    log target would be −inf) are left out.

    Returns:
        xy: float64 [G, 2], continuous pixel coordinates (x along η, y along φ in [0, 360)).
        labels: int64 [G], class id + 1 (1 t, 2 V, 3 H).
        pt: float64 [G], GeV.
    """
    eta = truth.eta.astype(np.float64)
    phi = truth.phi.astype(np.float64)
    pt = truth.pt.astype(np.float64)
    with np.errstate(invalid="ignore"):
        keep = geometry.in_acceptance(eta) & np.isfinite(phi) & np.isfinite(pt) & (pt > 0)
    x = geometry.eta_to_pixel(eta[keep])
    y = wrap_y(geometry.phi_to_pixel(phi[keep]))  # phi_to_pixel may round a φ just below π up to 360
    xy = np.stack([x, y], axis=-1).reshape(-1, 2)
    labels = truth.cls[keep].astype(np.int64) + 1
    return xy, labels, pt[keep]


def encode_centres(gt_xy: ArrayLike, anchors: ArrayLike, config: AnchorConfig, periodic_phi: bool = True
                   ) -> NDArray[np.float64]:
    """Location targets of centres ``gt_xy`` [..., 2] relative to ``anchors`` [..., 2] (broadcasting).

    Returns float64 [..., 2]: (Δx, Δy) / (variance · box_size) with Δ = gt − anchor and Δy wrapped into
    [−180, 180), so a ground truth across the φ seam from its anchor gets a small offset
    (``periodic_phi=False``, crop coordinates: Δy as it is).
    """
    g = np.asarray(gt_xy, dtype=np.float64)
    a = np.asarray(anchors, dtype=np.float64)
    dx = g[..., 0] - a[..., 0]
    dy = g[..., 1] - a[..., 1]
    if periodic_phi:
        dy = wrap_dy(dy)
    return np.stack([dx, dy], axis=-1) / config.loc_unit_px


def decode_centres(loc: ArrayLike, anchors: ArrayLike, config: AnchorConfig) -> NDArray[np.floating[Any]]:
    """Box centres from location offsets: the inverse of :func:`encode_centres`.

    Args:
        loc: [..., P, 2] encoded offsets (the network's loc head).
        anchors: [P, 2] anchor centres, pixels (leading dimensions broadcast).

    Returns:
        [..., P, 2] pixel coordinates (x, y) with y wrapped into [0, 360); float32 when ``loc`` is float32
        (the inference path), else float64. x is not clipped: a box may sit partly outside the image in η.
    """
    off = _as_float(loc)
    unit = off.dtype.type(config.loc_unit_px)
    xy: NDArray[np.floating[Any]] = np.add(np.multiply(off, unit), np.asarray(anchors, dtype=off.dtype))
    xy[..., 1] = wrap_y(xy[..., 1])
    return xy


def encode_pt(pt_gev: ArrayLike, config: AnchorConfig) -> NDArray[np.float64]:
    """pT regression target ln(pT / pt_scale_gev), float64, same shape as ``pt_gev``."""
    return np.log(np.asarray(pt_gev, dtype=np.float64) / config.pt_scale_gev)


def decode_pt(reg: ArrayLike, config: AnchorConfig | None = None) -> NDArray[np.floating[Any]]:
    """pT in GeV from the regression output [..., P]: pt_scale_gev · exp(reg).

    ``config`` defaults to :class:`AnchorConfig` (pt_scale_gev = 1000); pass the model's config when it
    uses another scale. float32 stays float32, anything else becomes float64.
    """
    scale = (config or AnchorConfig()).pt_scale_gev
    r = _as_float(reg)
    return np.exp(r) * r.dtype.type(scale)


def pixels_to_eta_phi(xy: ArrayLike) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Continuous pixel coordinates [..., 2] → (η, φ in rad wrapped into [−π, π)), each float64 [...].

    η = −2.958 + x·0.0174 and φ = −π + y·π/180, so the pixel centre (i + 0.5, j + 0.5) maps to the bin
    centre of :func:`jetssd.geometry.index_to_eta` / :func:`~jetssd.geometry.index_to_phi`.
    """
    p = np.asarray(xy, dtype=np.float64)
    eta = geometry.ETA_EDGES[0] + p[..., 0] * geometry.ETA_STEP
    phi = geometry.wrap_phi(geometry.PHI_EDGES[0] + p[..., 1] * geometry.PHI_STEP)
    return eta, phi


# ----------------------------------------------------------------------------------------------- matching


def match(gt_xy: ArrayLike, gt_labels: ArrayLike, gt_pt: ArrayLike, anchors: ArrayLike,
          config: AnchorConfig, periodic_phi: bool = True) -> AnchorTargets:
    """SSD matching of ground-truth objects to anchors with the φ-wrapped IoU, and target encoding.

    1. Each anchor takes the ground truth it overlaps most (ties: the lower GT index).
    2. Each ground truth forces its single best anchor (ties: the lower anchor index), even below
       ``match_iou``. When two ground truths force the same anchor, the later one in the list wins (as in
       the reference's loop) and the earlier one keeps only the anchors it won in step 1, possibly none.
    3. Anchors whose best IoU is below ``match_iou`` and that were not forced become background (0).

    Args:
        gt_xy: [G, 2] ground-truth centres, pixels (see :func:`truth_pixels`).
        gt_labels: [G] labels 1…3 (class id + 1).
        gt_pt: [G] pT, GeV, > 0.
        anchors: [P, 2] anchor centres, pixels (see :func:`anchor_centres`).
        config: box size, variance, match threshold and pT scale.
        periodic_phi: False when matching in crop coordinates (:func:`anchor_centres` with
            ``periodic_phi=False``): the y axis of a crop is an interval, its edges are not neighbours.

    Returns:
        :class:`AnchorTargets` with loc = :func:`encode_centres` and pt = :func:`encode_pt` of each positive
        anchor's ground truth. G = 0 gives all background.
    """
    g_xy, g_lab, g_pt, a_xy = _check_match_inputs(gt_xy, gt_labels, gt_pt, anchors)
    n_anchors = len(a_xy)
    labels = np.zeros(n_anchors, np.int64)
    loc = np.zeros((n_anchors, 2), np.float32)
    pt = np.zeros(n_anchors, np.float32)
    if len(g_xy) == 0 or n_anchors == 0:
        return AnchorTargets(labels, loc, pt)

    iou = wrapped_iou(g_xy, a_xy, config.box_size_px, periodic_phi=periodic_phi)  # [G, P]
    best_gt = np.argmax(iou, axis=0)  # [P]
    best_iou = iou[best_gt, np.arange(n_anchors)]
    best_anchor = np.argmax(iou, axis=1)  # [G], argmax takes the first (lowest-index) maximum
    # Forced matches. A repeated index in a fancy assignment has no guaranteed winner in numpy, so the
    # "later GT wins" rule is made explicit with a maximum over the GT indices.
    forced_gt = np.full(n_anchors, -1, np.int64)
    np.maximum.at(forced_gt, best_anchor, np.arange(len(g_xy)))
    forced = forced_gt >= 0
    best_gt[forced] = forced_gt[forced]

    pos = forced | (best_iou >= config.match_iou)
    gt_of_pos = best_gt[pos]
    labels[pos] = g_lab[gt_of_pos]
    loc[pos] = encode_centres(g_xy[gt_of_pos], a_xy[pos], config, periodic_phi)
    pt[pos] = encode_pt(g_pt[gt_of_pos], config)
    return AnchorTargets(labels, loc, pt)


def match_truth(truth: TruthObjects, anchors: ArrayLike, config: AnchorConfig) -> AnchorTargets:
    """Targets of one event's truth objects: :func:`match` of :func:`truth_pixels`."""
    xy, labels, pt = truth_pixels(truth)
    return match(xy, labels, pt, anchors, config)


def _check_match_inputs(gt_xy: ArrayLike, gt_labels: ArrayLike, gt_pt: ArrayLike, anchors: ArrayLike
                        ) -> tuple[NDArray[np.float64], NDArray[np.int64], NDArray[np.float64], NDArray[np.float64]]:
    """Convert and validate the inputs of :func:`match`; raise ValueError naming the bad argument."""
    g_xy = np.asarray(gt_xy, dtype=np.float64)
    if g_xy.size == 0:
        g_xy = g_xy.reshape(0, 2)
    g_lab = np.asarray(gt_labels).astype(np.int64).reshape(-1)
    g_pt = np.asarray(gt_pt, dtype=np.float64).reshape(-1)
    a_xy = np.asarray(anchors, dtype=np.float64)
    if g_xy.ndim != 2 or g_xy.shape[1] != 2:
        raise ValueError(f"gt_xy must have shape [G, 2], got {g_xy.shape}")
    if a_xy.ndim != 2 or a_xy.shape[1] != 2:
        raise ValueError(f"anchors must have shape [P, 2], got {a_xy.shape}")
    if not (len(g_lab) == len(g_pt) == len(g_xy)):
        raise ValueError(f"gt_xy, gt_labels and gt_pt must have the same length, got {len(g_xy)}, {len(g_lab)}, "
                         f"{len(g_pt)}")
    if not np.all(np.isfinite(g_xy)):
        raise ValueError("gt_xy: non-finite coordinate")
    if np.any((g_lab < 1) | (g_lab > N_CLASSES)):
        raise ValueError(f"gt_labels must be 1…{N_CLASSES} (class id + 1; 0 is background)")
    if not np.all(np.isfinite(g_pt) & (g_pt > 0)):
        raise ValueError("gt_pt must be finite and > 0 GeV (its target is a logarithm)")
    return g_xy, g_lab, g_pt, a_xy
