"""Our own HDF5 format ("jetssd", version 1): the reference layout plus what the reference throws away.

A jetssd file holds the eleven reference datasets written exactly as :mod:`jetssd.io.reference` writes
them (so the reference's loader and :class:`~jetssd.io.reference.ReferenceFile` read it), plus:

============================================  ========================  =====================================
dataset                                       dtype                     per event
============================================  ========================  =====================================
``PF_PT``, ``PF_Eta``, ``PF_Phi``             vlen float32              PF candidates: pT/ET (GeV), η, φ (rad)
``PF_Kind``                                   vlen int8                 0 track, 1 photon/electron, 2 neutral
                                                                        hadron
``Truth_Class``                               vlen int8                 truth objects (status-22 convention),
``Truth_Eta/_Phi/_PT/_Mass``                  vlen float32              continuous, *all* objects (also those
                                                                        outside the η acceptance)
``TruthLastCopy_Class/_Eta/_Phi/_PT/_Mass``   as Truth_*                truth in the "last copy" convention
``TruthLastCopy_Known``                       int8                      1 if the last-copy truth is known
                                                                        (else ``truth_lastcopy`` is None)
``Baseline_Eta/_Phi/_MSD``                    vlen float32              continuous η, φ and soft-drop mass of
                                                                        the baseline jets, one per ``baseline``
                                                                        row, same order
``Process``                                   int8                      index into ``process_names``; −1 unknown
``NPileup``                                   int16                     overlaid pileup interactions; −1 unknown
============================================  ========================  =====================================

Root attributes: ``format = "jetssd"``, ``format_version = 1``, ``generator_settings`` (JSON string),
``process_names`` (``["WW", "ZZ", "HH", "tt", "QCD"]``) and whatever extra attributes the caller passed.

The pixel datasets are always ``rasterize_sparse(pf)``: the writer rasterizes the candidates itself and
ignores ``event.pixels``, so one rasterizer makes every pixel in every file. Baseline jets outside the
η acceptance have no ``baseline`` row (as in the reference) and are therefore not stored at all.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from itertools import pairwise
from typing import Any

import h5py
import numpy as np
from numpy.typing import DTypeLike, NDArray

from jetssd import geometry
from jetssd.event import CLASS_NAMES, BaselineJets, Event, PFCandidates, SparsePixels, TruthObjects
from jetssd.io._common import (
    EventFile,
    EventWriter,
    check_values,
    flatten_group,
    format_error,
    to_index,
)
from jetssd.io.reference import (
    BASELINE,
    BASELINE_WIDTH,
    LABEL_WIDTH,
    LABELS,
    PIXEL_NAMES,
    REFERENCE_LAYOUT,
    Rows,
    decode_pixels,
    encode_reference,
)
from jetssd.rasterize import rasterize_sparse

FORMAT_NAME = "jetssd"
FORMAT_VERSION = 1
PROCESS_NAMES: tuple[str, ...] = ("WW", "ZZ", "HH", "tt", "QCD")
"""Values of ``Process`` index this list (stored in the root attribute ``process_names``)."""

PF = ("PF_PT", "PF_Eta", "PF_Phi", "PF_Kind")
TRUTH = ("Truth_Class", "Truth_Eta", "Truth_Phi", "Truth_PT", "Truth_Mass")
LASTCOPY = ("TruthLastCopy_Class", "TruthLastCopy_Eta", "TruthLastCopy_Phi", "TruthLastCopy_PT",
            "TruthLastCopy_Mass")
LASTCOPY_KNOWN = "TruthLastCopy_Known"
BASELINE_EXTRA = ("Baseline_Eta", "Baseline_Phi", "Baseline_MSD")
PROCESS = "Process"
NPILEUP = "NPileup"

_F32, _I8 = np.float32, np.int8
_TRUTH_DTYPES: tuple[DTypeLike, ...] = (_I8, _F32, _F32, _F32, _F32)

NATIVE_LAYOUT: dict[str, tuple[DTypeLike, bool]] = {
    **REFERENCE_LAYOUT,
    **dict(zip(PF, ((_F32, True), (_F32, True), (_F32, True), (_I8, True)), strict=True)),
    **{name: (dtype, True) for name, dtype in zip(TRUTH, _TRUTH_DTYPES, strict=True)},
    **{name: (dtype, True) for name, dtype in zip(LASTCOPY, _TRUTH_DTYPES, strict=True)},
    LASTCOPY_KNOWN: (_I8, False),
    **{name: (_F32, True) for name in BASELINE_EXTRA},
    PROCESS: (_I8, False),
    NPILEUP: (np.int16, False),
}
"""Dataset name → (element dtype, variable-length) of format version 1."""

_VLEN = tuple(name for name, (_, vlen) in NATIVE_LAYOUT.items() if vlen)
_FIXED = tuple(name for name, (_, vlen) in NATIVE_LAYOUT.items() if not vlen)
_ALL = tuple(NATIVE_LAYOUT)


# ---------------------------------------------------------------------------------------------------------
# Decoding


def _decode_truth_columns(path: str, raw: Mapping[str, NDArray[np.object_]], names: Sequence[str],
                          first: int) -> list[TruthObjects]:
    (cls, eta, phi, pt, mass), offsets = flatten_group(path, raw, names, first, _TRUTH_DTYPES)
    cls8 = to_index(path, names[0], cls, len(CLASS_NAMES), offsets, first, what="class id").astype(np.int8)
    eta, phi, pt, mass = (np.asarray(a, np.float32) for a in (eta, phi, pt, mass))
    return [TruthObjects(cls8[a:b], eta[a:b], phi[a:b], pt[a:b], mass[a:b])
            for a, b in pairwise(offsets)]


def _decode_pf(path: str, raw: Mapping[str, NDArray[np.object_]], first: int) -> list[PFCandidates]:
    (pt, eta, phi, kind), offsets = flatten_group(path, raw, PF, first, (_F32, _F32, _F32, _I8))
    check_values(path, PF[0], pt, offsets, first, non_negative=True)
    check_values(path, PF[1], eta, offsets, first)
    check_values(path, PF[2], phi, offsets, first)
    kind8 = to_index(path, PF[3], kind, geometry.N_CHANNELS, offsets, first, what="kind").astype(np.int8)
    pt, eta, phi = (np.asarray(a, np.float32) for a in (pt, eta, phi))
    return [PFCandidates(pt[a:b], eta[a:b], phi[a:b], kind8[a:b])
            for a, b in pairwise(offsets)]


def _decode_baseline(path: str, raw: Mapping[str, NDArray[np.object_]], first: int) -> list[BaselineJets]:
    rows = Rows(path, raw, BASELINE, BASELINE_WIDTH, first)
    (eta, phi, msd), offsets = flatten_group(path, raw, BASELINE_EXTRA, first, (_F32, _F32, _F32))
    if not np.array_equal(offsets, rows.offsets):
        e = int(np.argmax(np.diff(offsets) != np.diff(rows.offsets)))
        raise format_error(path, f"event {first + e} has {offsets[e + 1] - offsets[e]} values but "
                           f"{rows.offsets[e + 1] - rows.offsets[e]} '{BASELINE}' rows; they must match",
                           BASELINE_EXTRA[0])
    eta, phi, msd = (np.asarray(a, np.float32) for a in (eta, phi, msd))
    pt = np.ascontiguousarray(rows.columns[:, 3])
    tau = np.ascontiguousarray(rows.columns[:, 4])
    return [BaselineJets(rows.cls[s], eta[s], phi[s], pt[s], tau[s], msd[s]) for s in rows.event_slices()]


# ---------------------------------------------------------------------------------------------------------
# Reader


class NativeFile(EventFile):
    """Reader of the jetssd format: events with PF candidates, pixels, continuous truth in both
    conventions, baseline jets with continuous η/φ and soft-drop mass, process and pileup count."""

    format = "jetssd"

    def _validate(self, f: h5py.File) -> int:
        fmt = self._attrs.get("format")
        if fmt != FORMAT_NAME:
            raise format_error(self._path, f"not a {FORMAT_NAME}-format file (root attribute format={fmt!r}); "
                               "open it with ReferenceFile or open_events")
        version = self._attrs.get("format_version")
        if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
            raise format_error(self._path, f"format_version {version!r} is not supported by this reader "
                               f"(supports 1…{FORMAT_VERSION}); upgrade jetssd")
        try:
            settings = json.loads(self._attrs.get("generator_settings", "{}"))
        except (TypeError, ValueError) as exc:
            raise format_error(self._path, f"root attribute generator_settings is not JSON ({exc})") from exc
        if not isinstance(settings, dict):
            raise format_error(self._path, "root attribute generator_settings must be a JSON object")
        self._settings: dict[str, Any] = settings
        names = self._attrs.get("process_names", list(PROCESS_NAMES))
        if isinstance(names, str):  # a one-element string array comes back as a plain string
            names = [names]
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise format_error(self._path, f"root attribute process_names must be a list of strings, got {names!r}")
        self._process_names: tuple[str, ...] = tuple(names)
        return self._check_datasets(f, _VLEN, _FIXED)

    @property
    def generator_settings(self) -> dict[str, Any]:
        """The settings dict the generator passed to :class:`NativeWriter` (decoded from JSON; a copy)."""
        return json.loads(json.dumps(self._settings))

    @property
    def process_names(self) -> tuple[str, ...]:
        return self._process_names

    def _read_events(self, start: int, stop: int) -> list[Event]:
        path = self._path
        raw = self._read_slices(_ALL, start, stop)
        pixels = decode_pixels(path, raw, start)
        pf = _decode_pf(path, raw, start)
        truth = _decode_truth_columns(path, raw, TRUTH, start)
        lastcopy = _decode_truth_columns(path, raw, LASTCOPY, start)
        baseline = _decode_baseline(path, raw, start)
        Rows(path, raw, LABELS, LABEL_WIDTH, start)  # validate `labels` too: a file ReferenceFile rejects fails here
        known = np.asarray(raw[LASTCOPY_KNOWN]) != 0
        process = np.asarray(raw[PROCESS]).astype(np.int64)
        bad = (process < -1) | (process >= len(self._process_names))
        if np.any(bad):
            e = int(np.argmax(bad))
            raise format_error(path, f"process index {process[e]} in event {start + e} is outside "
                               f"-1…{len(self._process_names) - 1}", PROCESS)
        n_pileup = np.asarray(raw[NPILEUP]).astype(np.int64)
        return [
            Event(pixels=pixels[e], truth=truth[e], baseline=baseline[e], pf=pf[e],
                  truth_lastcopy=lastcopy[e] if known[e] else None,
                  process=self._process_names[process[e]] if process[e] >= 0 else "",
                  n_pileup=int(n_pileup[e]))
            for e in range(stop - start)
        ]

    def _read_pixels(self, start: int, stop: int) -> list[SparsePixels]:
        return decode_pixels(self._path, self._read_slices(PIXEL_NAMES, start, stop), start)


# ---------------------------------------------------------------------------------------------------------
# Writer


class NativeWriter(EventWriter):
    """Writer of the jetssd format. Every event must carry PF candidates; its pixels are
    ``rasterize_sparse(event.pf)`` (``event.pixels`` is ignored).

    Args:
        path: final file name; data go to ``<path>.partial`` until :meth:`close`.
        generator_settings: JSON-serialisable dict describing how the events were made (stored as JSON).
        attrs: extra root attributes (str, numbers or arrays); the format's own names are reserved.
        overwrite: replace an existing ``path`` (otherwise FileExistsError).
        labels: truth convention of the reference ``labels`` dataset, "status22" or "lastcopy" (both
            conventions are stored in full in the ``Truth_*`` and ``TruthLastCopy_*`` datasets anyway).
    """

    reserved_attrs = frozenset({"format", "format_version", "generator_settings", "process_names", "labels_truth"})

    def __init__(self, path: str | os.PathLike[str], generator_settings: Mapping[str, Any],
                 attrs: Mapping[str, Any] | None = None, *, overwrite: bool = False,
                 labels: str = "status22") -> None:
        # Serialise first: a non-JSON value must fail before any file is created.
        self._settings_json = json.dumps(dict(generator_settings), sort_keys=True)
        super().__init__(path, attrs, overwrite=overwrite, labels=labels)

    def _layout(self) -> dict[str, tuple[DTypeLike, bool]]:
        return NATIVE_LAYOUT

    def _root_attrs(self) -> dict[str, Any]:
        return {"format": FORMAT_NAME, "format_version": FORMAT_VERSION,
                "generator_settings": self._settings_json, "process_names": list(PROCESS_NAMES)}

    def _encode(self, event: Event, index: int) -> dict[str, Any]:
        try:
            return _encode_native(event, self.labels)
        except ValueError as exc:
            raise ValueError(f"event {index}: {exc}") from exc


def _encode_native(event: Event, labels: str) -> dict[str, Any]:
    if event.pf is None:
        raise ValueError("no PF candidates; the jetssd format stores them (write pixel-only events in the "
                         "reference format)")
    pf = event.pf
    _check_pf(pf)
    reference, kept = encode_reference(event, rasterize_sparse(pf), labels)
    out: dict[str, Any] = dict(reference)
    out.update(zip(PF, (pf.pt.astype(_F32), pf.eta.astype(_F32), pf.phi.astype(_F32), pf.kind.astype(_I8)),
                   strict=True))
    out.update(_truth_columns(TRUTH, event.truth))
    lastcopy = TruthObjects.empty() if event.truth_lastcopy is None else event.truth_lastcopy
    out.update(_truth_columns(LASTCOPY, lastcopy))
    out[LASTCOPY_KNOWN] = int(event.truth_lastcopy is not None)
    b = event.baseline
    out.update(zip(BASELINE_EXTRA, (b.eta[kept].astype(_F32), b.phi[kept].astype(_F32), b.msd[kept].astype(_F32)),
                   strict=True))
    if event.process and event.process not in PROCESS_NAMES:
        raise ValueError(f"unknown process {event.process!r}; known: {', '.join(PROCESS_NAMES)} (or '' if unknown)")
    out[PROCESS] = PROCESS_NAMES.index(event.process) if event.process else -1
    if not -1 <= event.n_pileup <= np.iinfo(np.int16).max:
        raise ValueError(f"n_pileup {event.n_pileup} outside -1…{np.iinfo(np.int16).max}")
    out[NPILEUP] = event.n_pileup
    return out


def _check_pf(pf: PFCandidates) -> None:
    """What the reader checks, checked before writing (``PFCandidates.from_arrays`` guarantees it; the raw
    dataclass constructor does not)."""
    for name, col in (("pt", pf.pt), ("eta", pf.eta), ("phi", pf.phi)):
        if len(col) and not np.all(np.isfinite(col)):
            raise ValueError(f"PF candidate {name} has NaN/inf values")
    if len(pf.pt) and (pf.pt.min() < 0 or pf.kind.min() < 0 or pf.kind.max() >= geometry.N_CHANNELS):
        raise ValueError("PF candidates need pt ≥ 0 and kind 0, 1 or 2")


def _truth_columns(names: Sequence[str], truth: TruthObjects) -> dict[str, NDArray[Any]]:
    if np.any((truth.cls < 0) | (truth.cls >= len(CLASS_NAMES))):
        raise ValueError("truth class ids must be 0 (t), 1 (V) or 2 (H)")
    arrays = (truth.cls.astype(_I8), truth.eta.astype(_F32), truth.phi.astype(_F32), truth.pt.astype(_F32),
              truth.mass.astype(_F32))
    return dict(zip(names, arrays, strict=True))

