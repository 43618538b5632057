"""Training data: events packed in memory as sparse pixels, augmented and matched to anchors in workers.

Events stay sparse all the way to the device: a batch carries the flat pixel indices and values of its
events (≈ 2.5k pixels ≈ 20 kB per event at pileup 50 instead of a 1.47 MB dense image), and
:func:`densify` scatters them into a dense ``[B, 3, 340, 360]`` tensor on the GPU (or CPU). Augmentation
(η flip, φ flip, φ roll) acts on the sparse indices and on the truth coordinates together, and the
anchor targets are computed per event with the shared numpy matcher of :mod:`jetssd.anchors`.

With ``DataConfig.crop = C`` the training events are cut to a random C × C window after augmentation
(:func:`crop_event`); the batch then carries ``[B, 3, C, C]`` images and crop-anchor targets, and its
``image_shape`` tells :func:`densify` the size.
"""

from __future__ import annotations

import glob
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from numpy.typing import NDArray
from torch.utils.data import Dataset

from jetssd import geometry
from jetssd.anchors import AnchorConfig, match, truth_pixels, wrap_y
from jetssd.io import open_events
from jetssd.train.config import DataConfig

IMAGE_SIZE = geometry.N_CHANNELS * geometry.N_ETA * geometry.N_PHI
"""Elements of one full [3, 340, 360] image (a crop batch uses ``Batch.image_shape`` instead)."""
_PLANE = geometry.N_ETA * geometry.N_PHI


def expand_paths(patterns: Sequence[str]) -> list[Path]:
    """Glob patterns → sorted existing files; a pattern that matches nothing is an error naming it."""
    paths: list[Path] = []
    for pattern in patterns:
        found = sorted(glob.glob(pattern))
        if not found:
            raise FileNotFoundError(f"no event file matches {pattern!r}")
        paths.extend(Path(p) for p in found)
    return paths


@dataclass(frozen=True, eq=False)
class PackedEvents:
    """Events of several files in a few flat arrays (CSR layout), cheap to share with worker processes.

    Attributes:
        pixel_offsets: int64 [N + 1]; event e owns pixels pixel_offsets[e]:pixel_offsets[e + 1].
        pixel_flat: int32 [M], flat image index (channel·340 + ieta)·360 + iphi.
        pixel_value: float32 [M], GeV.
        truth_offsets: int64 [N + 1]; same for truth objects.
        truth_xy: float64 [T, 2], continuous pixel coordinates (η axis, φ axis) of the truth objects.
        truth_label: int64 [T], 1 t, 2 V, 3 H.
        truth_pt: float64 [T], GeV.
    """

    pixel_offsets: NDArray[np.int64]
    pixel_flat: NDArray[np.int32]
    pixel_value: NDArray[np.float32]
    truth_offsets: NDArray[np.int64]
    truth_xy: NDArray[np.float64]
    truth_label: NDArray[np.int64]
    truth_pt: NDArray[np.float64]

    def __len__(self) -> int:
        return len(self.pixel_offsets) - 1

    @classmethod
    def load(cls, paths: Sequence[Path], max_events: int = 0, workers: int = 1) -> PackedEvents:
        """Read every event (or the first ``max_events``) of ``paths``; ``workers`` processes read files in
        parallel (HDF5 decoding is CPU-bound and holds the GIL)."""
        if not paths:
            raise ValueError("no event files given")
        if workers > 1 and len(paths) > 1 and not max_events:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            with ProcessPoolExecutor(min(workers, len(paths)), mp_context=mp.get_context("spawn")) as pool:
                parts = list(pool.map(_load_file, paths, [0] * len(paths)))
        else:
            parts, remaining = [], max_events or np.iinfo(np.int64).max
            for path in paths:
                part = _load_file(path, remaining)
                parts.append(part)
                remaining -= len(part)
                if remaining <= 0:
                    break
        return cls.concatenate(parts)

    @classmethod
    def concatenate(cls, parts: Sequence[PackedEvents]) -> PackedEvents:
        if not parts or sum(len(p) for p in parts) == 0:
            raise ValueError("no events")
        return cls(
            pixel_offsets=_join_offsets([p.pixel_offsets for p in parts]),
            pixel_flat=np.concatenate([p.pixel_flat for p in parts]),
            pixel_value=np.concatenate([p.pixel_value for p in parts]),
            truth_offsets=_join_offsets([p.truth_offsets for p in parts]),
            truth_xy=np.concatenate([p.truth_xy for p in parts]),
            truth_label=np.concatenate([p.truth_label for p in parts]),
            truth_pt=np.concatenate([p.truth_pt for p in parts]),
        )

    def event(self, i: int) -> tuple[NDArray[np.int32], NDArray[np.float32], NDArray[np.float64],
                                      NDArray[np.int64], NDArray[np.float64]]:
        """(flat [m], value [m], truth_xy [g, 2], truth_label [g], truth_pt [g]) of event i."""
        a, b = self.pixel_offsets[i], self.pixel_offsets[i + 1]
        c, d = self.truth_offsets[i], self.truth_offsets[i + 1]
        return (self.pixel_flat[a:b], self.pixel_value[a:b], self.truth_xy[c:d], self.truth_label[c:d],
                self.truth_pt[c:d])


def _offsets(counts: list[int]) -> NDArray[np.int64]:
    out = np.zeros(len(counts) + 1, np.int64)
    np.cumsum(counts, out=out[1:])
    return out


def _join_offsets(offsets: Sequence[NDArray[np.int64]]) -> NDArray[np.int64]:
    """Concatenate CSR offset arrays, shifting each by the total length before it."""
    shifted, base = [np.zeros(1, np.int64)], 0
    for off in offsets:
        shifted.append(off[1:] + base)
        base += int(off[-1])
    return np.concatenate(shifted)


def _load_file(path: Path, max_events: int = 0, chunk_size: int = 2000) -> PackedEvents:
    """One file's events (the first ``max_events`` when > 0) as PackedEvents; module-level for workers."""
    flats, values, n_pix, xys, labels, pts, n_truth = [], [], [], [], [], [], []
    with open_events(path) as f:
        stop = min(len(f), max_events) if max_events > 0 else len(f)
        for chunk in f.iter_chunks(chunk_size, stop=stop):
            for event in chunk:
                flats.append(event.pixels.flat_index.astype(np.int32))
                values.append(event.pixels.value)
                n_pix.append(len(event.pixels))
                xy, label, pt = truth_pixels(event.truth)
                xys.append(xy.reshape(-1, 2))
                labels.append(label)
                pts.append(pt)
                n_truth.append(len(label))
    empty_f, empty_i = np.zeros(0, np.float64), np.zeros(0, np.int64)
    return PackedEvents(
        pixel_offsets=_offsets(n_pix),
        pixel_flat=np.concatenate(flats) if flats else np.zeros(0, np.int32),
        pixel_value=np.concatenate(values) if values else np.zeros(0, np.float32),
        truth_offsets=_offsets(n_truth),
        truth_xy=np.concatenate(xys) if xys else empty_f.reshape(0, 2),
        truth_label=np.concatenate(labels).astype(np.int64) if labels else empty_i,
        truth_pt=np.concatenate(pts).astype(np.float64) if pts else empty_f,
    )


def augment_event(flat: NDArray[np.int32], xy: NDArray[np.float64], rng: np.random.Generator,
                  config: DataConfig) -> tuple[NDArray[np.int32], NDArray[np.float64]]:
    """Random η flip, φ flip and φ roll of one event's pixels and truth coordinates together.

    Pixel i mirrors to 339 − i (continuous coordinate x → 340 − x), fixing the reference's 340 − i
    one-pixel shift (pfjet-ssd-reference §10.3); φ rolls by a whole number of pixels, modulo 360.
    """
    channel, rest = np.divmod(flat.astype(np.int64), _PLANE)
    ieta, iphi = np.divmod(rest, geometry.N_PHI)
    xy = xy.copy()
    if rng.random() < config.flip_eta:
        ieta = geometry.N_ETA - 1 - ieta
        xy[:, 0] = geometry.N_ETA - xy[:, 0]
    if rng.random() < config.flip_phi:
        iphi = geometry.N_PHI - 1 - iphi
        xy[:, 1] = np.mod(geometry.N_PHI - xy[:, 1], geometry.N_PHI)
    if config.roll_phi:
        shift = int(rng.integers(geometry.N_PHI))
        iphi = np.mod(iphi + shift, geometry.N_PHI)
        xy[:, 1] = np.mod(xy[:, 1] + shift, geometry.N_PHI)
    return ((channel * geometry.N_ETA + ieta) * geometry.N_PHI + iphi).astype(np.int32), xy


def crop_origin(xy: NDArray[np.float64], crop: int, rng: np.random.Generator, on_object: float) -> tuple[int, int]:
    """Random origin (x0, y0) of a ``crop`` × ``crop`` window: x0 in [0, 340 − crop], y0 in [0, 360).

    With probability ``on_object`` (and at least one truth object in ``xy`` [g, 2]) the window is centred
    within ±crop/4 of a random object, which it then contains; otherwise it is uniform. y0 + crop may pass
    360: the window then straddles the φ seam.
    """
    x_max = geometry.N_ETA - crop
    if len(xy) and rng.random() < on_object:
        k = int(rng.integers(len(xy)))
        jitter = rng.uniform(-crop / 4, crop / 4, 2)
        x0 = int(np.clip(np.floor(xy[k, 0] - crop / 2 + jitter[0]), 0, x_max))
        y0 = int(np.floor(xy[k, 1] - crop / 2 + jitter[1])) % geometry.N_PHI
        return x0, y0
    return int(rng.integers(x_max + 1)), int(rng.integers(geometry.N_PHI))


def crop_event(flat: NDArray[np.int32], value: NDArray[np.float32], xy: NDArray[np.float64],
               label: NDArray[np.int64], pt: NDArray[np.float64], crop: int, origin: tuple[int, int]
               ) -> tuple[NDArray[np.int32], NDArray[np.float32], NDArray[np.float64], NDArray[np.int64],
                          NDArray[np.float64]]:
    """Cut one event to the window [x0, x0 + crop) × [y0, y0 + crop) (y modulo 360), in crop coordinates.

    Args:
        flat, value: [m] pixels of the full image (flat index (channel·340 + ieta)·360 + iphi).
        xy, label, pt: [g, 2], [g], [g] truth objects in full-image pixel coordinates.
        crop: window side C, pixels.
        origin: (x0, y0) of the window, from :func:`crop_origin`.

    Returns:
        (flat [m'] indexing a [3, C, C] image, value [m'], xy [g', 2], label [g'], pt [g']): the pixels
        inside the window and the objects whose centre is inside it, shifted by −origin (y modulo 360, so
        a window across the φ seam is contiguous in crop coordinates). The truth keeps its sub-pixel
        position: a truth at the centre of a pixel stays at the centre of that pixel.
    """
    x0, y0 = origin
    channel, rest = np.divmod(flat.astype(np.int64), _PLANE)
    ieta, iphi = np.divmod(rest, geometry.N_PHI)
    ieta = ieta - x0
    iphi = np.mod(iphi - y0, geometry.N_PHI)
    keep = (ieta >= 0) & (ieta < crop) & (iphi < crop)
    new_flat = ((channel[keep] * crop + ieta[keep]) * crop + iphi[keep]).astype(np.int32)
    cx = xy[:, 0] - x0
    cy = wrap_y(xy[:, 1] - y0).astype(np.float64)
    inside = (cx >= 0) & (cx < crop) & (cy < crop)
    new_xy = np.stack([cx[inside], cy[inside]], axis=-1).reshape(-1, 2)
    return new_flat, value[keep], new_xy, label[inside], pt[inside]


@dataclass
class Sample:
    """One event ready for the loss. Pixel arrays [m]; targets [P] / [P, 2]; truth for evaluation [g].

    ``flat`` indexes an image of ``image_shape`` ([3, 340, 360], or [3, C, C] for a crop, whose truth is
    then in crop coordinates).
    """

    flat: NDArray[np.int32]
    value: NDArray[np.float32]
    labels: NDArray[np.int64]
    loc: NDArray[np.float32]
    pt: NDArray[np.float32]
    truth_xy: NDArray[np.float64]
    truth_label: NDArray[np.int64]
    truth_pt: NDArray[np.float64]
    image_shape: tuple[int, int, int] = geometry.IMAGE_SHAPE


class DetectionDataset(Dataset[Sample]):
    """Packed events → :class:`Sample` with anchor targets; augmentation when ``augment`` is given.

    Augmentation randomness is a function of (seed, epoch, index) only, so a run is reproducible
    whatever the number of workers; call :meth:`set_epoch` before each epoch.

    With ``augment.crop = C > 0`` every sample is a random C × C crop (:func:`crop_origin`,
    :func:`crop_event`) after the flips and roll, and ``anchors`` must be the crop's anchors
    (``anchor_centres(crop_maps(C), "receptive", extent=(C, C), periodic_phi=False)``): they are matched
    without φ wrap, since a crop's φ edges are not neighbours.
    """

    def __init__(self, events: PackedEvents, anchors: NDArray[np.float64], anchor_config: AnchorConfig,
                 augment: DataConfig | None = None, seed: int = 0) -> None:
        self.events = events
        self.anchors = anchors
        self.anchor_config = anchor_config
        self.augment = augment
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.events)

    def __getitem__(self, i: int) -> Sample:
        flat, value, xy, label, pt = self.events.event(i)
        shape = geometry.IMAGE_SHAPE
        crop = self.augment.crop if self.augment is not None else 0
        if self.augment is not None:
            rng = np.random.default_rng([self.seed, self.epoch, i])
            flat, xy = augment_event(flat, xy, rng, self.augment)
            if crop:
                origin = crop_origin(xy, crop, rng, self.augment.crop_on_object)
                flat, value, xy, label, pt = crop_event(flat, value, xy, label, pt, crop, origin)
                shape = (geometry.N_CHANNELS, crop, crop)
        targets = match(xy, label, pt, self.anchors, self.anchor_config, periodic_phi=not crop)
        return Sample(flat, value, targets.labels, targets.loc, targets.pt, xy, label, pt, shape)


@dataclass
class Batch:
    """A collated batch. ``flat`` indexes the flattened [B, *image_shape] image (event offset included)."""

    flat: torch.Tensor  # int64 [M]
    value: torch.Tensor  # float32 [M]
    labels: torch.Tensor  # int64 [B, P]
    loc: torch.Tensor  # float32 [B, P, 2]
    pt: torch.Tensor  # float32 [B, P]
    truth: list[tuple[NDArray[np.float64], NDArray[np.int64], NDArray[np.float64]]]  # per event (xy, label, pt)
    image_shape: tuple[int, int, int] = geometry.IMAGE_SHAPE  # [3, 340, 360], or [3, C, C] for crops

    @property
    def size(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device: torch.device) -> Batch:
        return Batch(self.flat.to(device, non_blocking=True), self.value.to(device, non_blocking=True),
                     self.labels.to(device, non_blocking=True), self.loc.to(device, non_blocking=True),
                     self.pt.to(device, non_blocking=True), self.truth, self.image_shape)


def collate(samples: Sequence[Sample]) -> Batch:
    """Stack samples of one image shape into a :class:`Batch` (pixel indices offset per event)."""
    shapes = {s.image_shape for s in samples}
    if len(shapes) != 1:
        raise ValueError(f"cannot collate samples of different image shapes {sorted(shapes)}")
    shape = shapes.pop()
    size = int(np.prod(shape))
    flat = np.concatenate([s.flat.astype(np.int64) + k * size for k, s in enumerate(samples)])
    return Batch(
        flat=torch.from_numpy(flat),
        value=torch.from_numpy(np.concatenate([s.value for s in samples])),
        labels=torch.from_numpy(np.stack([s.labels for s in samples])),
        loc=torch.from_numpy(np.stack([s.loc for s in samples])),
        pt=torch.from_numpy(np.stack([s.pt for s in samples])),
        truth=[(s.truth_xy, s.truth_label, s.truth_pt) for s in samples],
        image_shape=shape,
    )


def densify(batch: Batch, channels_last: bool = False) -> torch.Tensor:
    """Scatter a batch's pixels into a dense float32 [B, *batch.image_shape] image (GeV) on its device."""
    size = int(np.prod(batch.image_shape))
    image = torch.zeros(batch.size * size, dtype=torch.float32, device=batch.value.device)
    image[batch.flat] = batch.value
    image = image.view(batch.size, *batch.image_shape)
    return image.contiguous(memory_format=torch.channels_last) if channels_last else image
