"""The reference ("Jet Single Shot Detection", Zenodo 10.5281/zenodo.4883651) HDF5 layout.

Eleven datasets, each of shape (N_events,) and h5py variable-length dtype (pfjet-ssd-reference §1.2):

=============================================  ===========  ==============================================
dataset                                        vlen dtype   per event
=============================================  ===========  ==============================================
``labels``                                     float32      rows [class_id, eta_idx, phi_idx, pT/GeV], 4 per
                                                            truth object, flattened
``baseline``                                   float32      rows [class_id, eta_idx, phi_idx, jet_pT/GeV,
                                                            tau_ratio], 5 per baseline jet, flattened
``EFlowTrack_Eta`` / ``_Phi`` / ``_PT``        int16 ×2,    non-empty pixels of channel 0 (tracks): η index,
                                               float32      φ index, summed pT (GeV)
``EFlowPhoton_Eta`` / ``_Phi`` / ``_ET``       same         channel 1 (photons, ECAL), summed ET (GeV)
``EFlowNeutralHadron_Eta`` / ``_Phi`` / ``_ET``  same       channel 2 (neutral hadrons, HCAL), summed ET
=============================================  ===========  ==============================================

Pixels are stored in row-major (η-major, then φ) order. Class ids: t = 0, V = 1, H = 2. The "mixed" split
files of §1.3 store all eleven datasets as vlen float32; the reader accepts both and casts indices back.

Writing follows the reference: truth objects and baseline jets outside the η acceptance have no index
and are left out of ``labels`` / ``baseline``. Reading gives truth/baseline positions at pixel centres
(the files hold only indices), with mass / soft-drop mass unknown (NaN), and no PF candidates. A
truth/baseline index of −1, which the reference's ``argmax(edges ≥ v) − 1`` gives for a value exactly on
the lower grid edge (φ = −π), is read as bin 0; any other index off the grid is a DatasetFormatError.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from itertools import pairwise
from typing import Any

import h5py
import numpy as np
from numpy.typing import DTypeLike, NDArray

from jetssd import geometry
from jetssd.event import CLASS_NAMES, BaselineJets, Event, SparsePixels, TruthObjects
from jetssd.io._common import (
    EventFile,
    EventWriter,
    canonical_pixels,
    check_values,
    flatten,
    flatten_group,
    format_error,
    offsets_of,
    to_index,
)
from jetssd.rasterize import rasterize_sparse

LABELS = "labels"
BASELINE = "baseline"
LABEL_WIDTH = 4
"""Floats per ``labels`` row: class_id, eta_idx, phi_idx, pT."""
BASELINE_WIDTH = 5
"""Floats per ``baseline`` row: class_id, eta_idx, phi_idx, jet_pT, tau_ratio."""

PIXEL_DATASETS: tuple[tuple[str, str, str], ...] = (
    ("EFlowTrack_Eta", "EFlowTrack_Phi", "EFlowTrack_PT"),
    ("EFlowPhoton_Eta", "EFlowPhoton_Phi", "EFlowPhoton_ET"),
    ("EFlowNeutralHadron_Eta", "EFlowNeutralHadron_Phi", "EFlowNeutralHadron_ET"),
)
"""(η index, φ index, value) dataset names of image channels 0, 1, 2."""
PIXEL_NAMES: tuple[str, ...] = tuple(name for group in PIXEL_DATASETS for name in group)

REFERENCE_DATASETS: tuple[str, ...] = (LABELS, BASELINE, *PIXEL_NAMES)
"""The eleven datasets every file of the reference layout has."""

REFERENCE_LAYOUT: dict[str, tuple[DTypeLike, bool]] = {
    LABELS: (np.float32, True),
    BASELINE: (np.float32, True),
    **{name: (np.int16, True) for eta, phi, _ in PIXEL_DATASETS for name in (eta, phi)},
    **{value: (np.float32, True) for _, _, value in PIXEL_DATASETS},
}
"""Dataset name → (element dtype, variable-length) as written by the reference's hdf5-generator.py."""


# ---------------------------------------------------------------------------------------------------------
# Encoding (one event → the eleven per-event arrays)


def encode_pixels(pixels: SparsePixels) -> dict[str, NDArray[Any]]:
    """Canonical pixels → the nine per-channel arrays (η index int16, φ index int16, value float32)."""
    pixels = canonical_pixels(pixels)
    # Canonical order is (channel, ieta, iphi), so each channel is a contiguous, row-major block.
    bounds = np.searchsorted(pixels.channel, np.arange(geometry.N_CHANNELS + 1))
    out: dict[str, NDArray[Any]] = {}
    for c, (eta_name, phi_name, value_name) in enumerate(PIXEL_DATASETS):
        block = slice(int(bounds[c]), int(bounds[c + 1]))
        out[eta_name] = np.ascontiguousarray(pixels.ieta[block], np.int16)
        out[phi_name] = np.ascontiguousarray(pixels.iphi[block], np.int16)
        out[value_name] = np.ascontiguousarray(pixels.value[block], np.float32)
    return out


def _grid_indices(cls: NDArray[np.int8], eta: NDArray[np.float32],
                  phi: NDArray[np.float32]) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.bool_]]:
    """(η index, φ index, inside) of objects; ``inside`` is false outside the acceptance or for NaN."""
    if np.any((cls < 0) | (cls > 2)):
        raise ValueError("class ids must be 0 (t), 1 (V) or 2 (H)")
    ieta = geometry.eta_to_index(eta)
    iphi = geometry.phi_to_index(phi)
    return ieta, iphi, (ieta >= 0) & (iphi >= 0)


def encode_labels(truth: TruthObjects) -> NDArray[np.float32]:
    """Truth objects → flattened ``labels`` rows [class_id, eta_idx, phi_idx, pT] (float32 [4·n_inside])."""
    ieta, iphi, inside = _grid_indices(truth.cls, truth.eta, truth.phi)
    rows = np.stack([truth.cls, ieta, iphi, truth.pt], axis=1)[inside]
    return rows.astype(np.float32).ravel()


def encode_baseline(baseline: BaselineJets) -> tuple[NDArray[np.float32], NDArray[np.bool_]]:
    """Baseline jets → (flattened ``baseline`` rows [class_id, eta_idx, phi_idx, jet_pT, tau_ratio], kept mask).

    The mask (bool [n]) selects the jets that got a row, so that per-jet extras stay in the same order.
    """
    ieta, iphi, inside = _grid_indices(baseline.cls, baseline.eta, baseline.phi)
    rows = np.stack([baseline.cls, ieta, iphi, baseline.pt, baseline.tau_ratio], axis=1)[inside]
    return rows.astype(np.float32).ravel(), inside


def label_truth(event: Event, labels: str) -> TruthObjects:
    """The truth objects written to ``labels``: "status22" → ``event.truth``, "lastcopy" → ``event.truth_lastcopy``."""
    if labels == "status22":
        return event.truth
    if labels == "lastcopy":
        if event.truth_lastcopy is None:
            raise ValueError("labels='lastcopy' but the event has no last-copy truth")
        return event.truth_lastcopy
    raise ValueError(f"labels must be 'status22' or 'lastcopy', got {labels!r}")


def encode_reference(event: Event, pixels: SparsePixels,
                     labels: str = "status22") -> tuple[dict[str, NDArray[Any]], NDArray[np.bool_]]:
    """One event → its eleven reference arrays, plus the kept-baseline-jet mask (see :func:`encode_baseline`).

    ``labels`` picks the truth convention written to the ``labels`` dataset (see :func:`label_truth`).
    """
    baseline_rows, kept = encode_baseline(event.baseline)
    out = {LABELS: encode_labels(label_truth(event, labels)), BASELINE: baseline_rows, **encode_pixels(pixels)}
    return out, kept


# ---------------------------------------------------------------------------------------------------------
# Decoding (a slice of n events → containers), vectorised over the slice


def decode_pixels(path: str, raw: Mapping[str, NDArray[np.object_]], first: int) -> list[SparsePixels]:
    """The nine pixel datasets of a slice (object arrays [n]) → n canonical SparsePixels.

    All events are processed together: the three channels are scattered into one event-major array
    with index arithmetic (no per-event concatenation, no sort). Events whose pixels are not strictly
    row-major (a file from another writer) are sorted and their duplicates summed.
    """
    n = len(raw[PIXEL_DATASETS[0][0]])
    counts = np.zeros((n, geometry.N_CHANNELS), np.int64)
    per_channel: list[tuple[NDArray[np.int32], NDArray[Any]]] = []
    for c, names in enumerate(PIXEL_DATASETS):
        (eta, phi, value), offsets = flatten_group(path, raw, names, first, (np.int16, np.int16, np.float32))
        ieta = to_index(path, names[0], eta, geometry.N_ETA, offsets, first)
        iphi = to_index(path, names[1], phi, geometry.N_PHI, offsets, first)
        check_values(path, names[2], value, offsets, first, non_negative=True)
        counts[:, c] = np.diff(offsets)
        # Flat index (channel·340 + ieta)·360 + iphi < 367,200: int32 is enough.
        ieta += c * geometry.N_ETA
        ieta *= geometry.N_PHI
        ieta += iphi
        per_channel.append((ieta, value))

    # Destination of (event e, channel c) in the event-major array: event start + earlier channels' pixels.
    ev_offsets = offsets_of(counts.sum(axis=1))
    dest_start = ev_offsets[:-1, None] + np.cumsum(counts, axis=1) - counts
    flat = np.empty(ev_offsets[-1], np.int32)
    value = np.empty(ev_offsets[-1], np.float32)
    for c, (flat_c, value_c) in enumerate(per_channel):
        lengths = counts[:, c]
        src_start = np.cumsum(lengths) - lengths
        dest = np.repeat(dest_start[:, c] - src_start, lengths) + np.arange(len(flat_c))
        flat[dest] = flat_c
        value[dest] = value_c

    canonical = np.ones(n, bool)
    if len(flat) > 1:
        step_down = np.flatnonzero(np.diff(flat) <= 0)  # flat[p + 1] ≤ flat[p]
        if step_down.size:
            event = np.searchsorted(ev_offsets, step_down + 1, side="right") - 1
            canonical[event[step_down >= ev_offsets[event]]] = False  # ignore steps across event boundaries

    channel, rest = np.divmod(flat, np.int32(geometry.N_ETA * geometry.N_PHI))
    ieta_all, iphi_all = np.divmod(rest, np.int32(geometry.N_PHI))
    channel8 = channel.astype(np.uint8)
    ieta16 = ieta_all.astype(np.int16)
    iphi16 = iphi_all.astype(np.int16)
    out: list[SparsePixels] = []
    for e in range(n):
        a, b = int(ev_offsets[e]), int(ev_offsets[e + 1])
        if canonical[e]:
            out.append(SparsePixels(channel8[a:b], ieta16[a:b], iphi16[a:b], value[a:b]))
        else:
            out.append(SparsePixels.from_flat_index(flat[a:b].astype(np.int64), value[a:b].astype(np.float64)))
    return out


class Rows:
    """Decoded ``labels`` or ``baseline`` rows of a slice of events.

    Attributes:
        cls: int8 [m] class ids; ieta, iphi: int64 [m] validated grid indices; columns: float32 [m, width]
            (the raw rows, for pT and τ ratio); offsets: int64 [n + 1], rows of event e are offsets[e]:offsets[e+1].
    """

    def __init__(self, path: str, raw: Mapping[str, NDArray[np.object_]], name: str, width: int,
                 first: int) -> None:
        values, lengths = flatten(raw[name], np.float32)
        bad = lengths % width != 0
        if np.any(bad):
            e = int(np.argmax(bad))
            raise format_error(path, f"event {first + e} has {lengths[e]} values, not a multiple of the row "
                               f"length {width}", name)
        self.offsets = offsets_of(lengths // width)
        rows = values.reshape(-1, width)
        cls = to_index(path, name, rows[:, 0], len(CLASS_NAMES), self.offsets, first, what="class id")
        self.cls = cls.astype(np.int8)
        self.ieta = to_index(path, name, rows[:, 1], geometry.N_ETA, self.offsets, first, minus_one_is_zero=True)
        self.iphi = to_index(path, name, rows[:, 2], geometry.N_PHI, self.offsets, first, minus_one_is_zero=True)
        self.columns = rows.astype(np.float32, copy=False)

    def eta_centres(self) -> NDArray[np.float32]:
        return geometry.index_to_eta(self.ieta).astype(np.float32)

    def phi_centres(self) -> NDArray[np.float32]:
        return geometry.index_to_phi(self.iphi).astype(np.float32)

    def event_slices(self) -> list[slice]:
        return [slice(int(a), int(b)) for a, b in pairwise(self.offsets)]


def decode_truth(path: str, raw: Mapping[str, NDArray[np.object_]], first: int) -> list[TruthObjects]:
    """``labels`` of a slice → TruthObjects at pixel centres, mass NaN."""
    rows = Rows(path, raw, LABELS, LABEL_WIDTH, first)
    eta, phi = rows.eta_centres(), rows.phi_centres()
    pt = np.ascontiguousarray(rows.columns[:, 3])
    mass = np.full(len(pt), np.nan, np.float32)
    return [TruthObjects(rows.cls[s], eta[s], phi[s], pt[s], mass[s]) for s in rows.event_slices()]


def decode_baseline(path: str, raw: Mapping[str, NDArray[np.object_]], first: int) -> list[BaselineJets]:
    """``baseline`` of a slice → BaselineJets at pixel centres, msd NaN."""
    rows = Rows(path, raw, BASELINE, BASELINE_WIDTH, first)
    eta, phi = rows.eta_centres(), rows.phi_centres()
    pt = np.ascontiguousarray(rows.columns[:, 3])
    tau = np.ascontiguousarray(rows.columns[:, 4])
    msd = np.full(len(pt), np.nan, np.float32)
    return [BaselineJets(rows.cls[s], eta[s], phi[s], pt[s], tau[s], msd[s]) for s in rows.event_slices()]


# ---------------------------------------------------------------------------------------------------------
# Reader and writer


class ReferenceFile(EventFile):
    """Reader of the reference layout (also reads the mixed float32 files and our own "jetssd" files).

    Events have pixels, truth (pixel-centre η/φ, mass NaN) and baseline jets (pixel-centre η/φ, msd NaN);
    ``pf`` is None.
    """

    format = "reference"

    def _validate(self, f: h5py.File) -> int:
        return self._check_datasets(f, REFERENCE_DATASETS)

    def _read_events(self, start: int, stop: int) -> list[Event]:
        raw = self._read_slices(REFERENCE_DATASETS, start, stop)
        pixels = decode_pixels(self._path, raw, start)
        truth = decode_truth(self._path, raw, start)
        baseline = decode_baseline(self._path, raw, start)
        return [Event(p, t, b) for p, t, b in zip(pixels, truth, baseline, strict=True)]

    def _read_pixels(self, start: int, stop: int) -> list[SparsePixels]:
        return decode_pixels(self._path, self._read_slices(PIXEL_NAMES, start, stop), start)


class ReferenceWriter(EventWriter):
    """Writer of the reference layout (readable by the reference's own loader).

    Events with PF candidates are rasterized with :func:`jetssd.rasterize.rasterize_sparse` (their
    ``pixels`` are ignored), so a file never holds pixels inconsistent with the candidates; events
    without candidates are written from ``event.pixels``.

    Args:
        path: final file name; data go to ``<path>.partial`` until :meth:`close`.
        attrs: extra root attributes (str, numbers or arrays), e.g. ``generator_settings`` as a JSON string;
            ``format`` is reserved (it marks files of our own format).
        overwrite: replace an existing ``path`` (otherwise FileExistsError).
        labels: truth convention of the ``labels`` dataset, "status22" (reference parity) or "lastcopy".
    """

    def __init__(self, path: str | os.PathLike[str], attrs: Mapping[str, Any] | None = None, *,
                 overwrite: bool = False, labels: str = "status22") -> None:
        super().__init__(path, attrs, overwrite=overwrite, labels=labels)

    def _layout(self) -> dict[str, tuple[DTypeLike, bool]]:
        return REFERENCE_LAYOUT

    def _encode(self, event: Event, index: int) -> dict[str, Any]:
        pixels = event.pixels if event.pf is None else rasterize_sparse(event.pf)
        try:
            return encode_reference(event, pixels, self.labels)[0]
        except ValueError as exc:
            raise ValueError(f"event {index}: {exc}") from exc
