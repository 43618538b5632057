"""Columnar containers for one collision event: PF candidates, sparse pixels, truth objects, baseline jets.

Every container holds 1-D numpy arrays of equal length (one entry per candidate / pixel / object).
They are what the rasterizer, the file formats, the generator, the physics baseline and (later) the
service exchange. Constructors validate their input and raise :class:`InvalidInputError`, which names
the offending field so that a CLI or an HTTP gateway can report it as is.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from jetssd import geometry

# Candidate kinds, which are also the image channels.
KIND_TRACK = 0
KIND_PHOTON = 1  # photons and electrons: ECAL
KIND_NEUTRAL_HADRON = 2  # HCAL
KIND_NAMES = ("track", "photon", "neutral_hadron")

# Truth classes as stored in files (reference §1.4): t = 0, V = 1, H = 2. The detector adds 1 (0 = background).
CLASS_NAMES = ("t", "V", "H")
CLASS_IDS = {name: i for i, name in enumerate(CLASS_NAMES)}


class InvalidInputError(ValueError):
    """Input that cannot be turned into an event. ``field`` names the offending field (e.g. ``"pt"``)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def _column(name: str, values: ArrayLike, dtype: type[np.generic]) -> NDArray[Any]:
    """Convert one column to a 1-D array of ``dtype``, naming ``name`` in any error."""
    try:
        arr = np.asarray(values)
    except (ValueError, TypeError) as exc:  # ragged nested lists and the like
        raise InvalidInputError(name, f"not a flat numeric array ({exc})") from None
    if arr.ndim != 1:
        raise InvalidInputError(name, f"must be one-dimensional, got shape {arr.shape}")
    if arr.size and not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        raise InvalidInputError(name, f"must be numeric, got dtype {arr.dtype}")
    float_for_int = np.issubdtype(dtype, np.integer) and arr.size and np.issubdtype(arr.dtype, np.floating)
    if float_for_int and (not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr))):
        raise InvalidInputError(name, "must hold integers")
    return arr.astype(dtype, copy=False)


def _same_length(columns: Mapping[str, NDArray[Any]]) -> int:
    lengths = {name: len(col) for name, col in columns.items()}
    if len(set(lengths.values())) > 1:
        first = next(iter(lengths))
        bad = next(name for name, n in lengths.items() if n != lengths[first])
        raise InvalidInputError(
            bad, f"length {lengths[bad]} differs from {first} ({lengths[first]}); columns must be equal length"
        )
    return next(iter(lengths.values()), 0)


def _require_finite(name: str, arr: NDArray[Any]) -> None:
    bad = ~np.isfinite(arr)
    if np.any(bad):
        raise InvalidInputError(name, f"{int(bad.sum())} non-finite value(s) (NaN or inf), first at index "
                                f"{int(np.argmax(bad))}")


@dataclass(frozen=True, eq=False)
class PFCandidates:
    """Particle-flow candidates of one event, columnar.

    Attributes (all shape [n]):
        pt: transverse momentum (tracks) or transverse energy (calorimeter), GeV, float32, ≥ 0.
        eta: pseudorapidity, float32, finite (candidates outside the image acceptance are allowed and
            simply have no pixel).
        phi: azimuth, rad, float32, finite (any real value; wrapped when rasterized).
        kind: int8, 0 track, 1 photon/electron, 2 neutral hadron.
    """

    pt: NDArray[np.float32]
    eta: NDArray[np.float32]
    phi: NDArray[np.float32]
    kind: NDArray[np.int8]

    @classmethod
    def from_arrays(cls, pt: ArrayLike, eta: ArrayLike, phi: ArrayLike, kind: ArrayLike) -> PFCandidates:
        """Validate and convert columns. Raises :class:`InvalidInputError` naming the bad field."""
        cols = {
            "pt": _column("pt", pt, np.float32),
            "eta": _column("eta", eta, np.float32),
            "phi": _column("phi", phi, np.float32),
        }
        raw_kind = _column("kind", kind, np.int64)
        _same_length({**cols, "kind": raw_kind})
        for name, col in cols.items():
            _require_finite(name, col)
        if np.any(cols["pt"] < 0):
            raise InvalidInputError("pt", f"negative value at index {int(np.argmax(cols['pt'] < 0))}; pT must be ≥ 0")
        bad_kind = (raw_kind < 0) | (raw_kind > 2)
        if np.any(bad_kind):
            i = int(np.argmax(bad_kind))
            raise InvalidInputError("kind", f"unknown kind {int(raw_kind[i])} at index {i}; "
                                    "allowed 0 (track), 1 (photon/electron), 2 (neutral hadron)")
        return cls(cols["pt"], cols["eta"], cols["phi"], raw_kind.astype(np.int8))

    @classmethod
    def empty(cls) -> PFCandidates:
        z = np.zeros(0, np.float32)
        return cls(z, z, z, np.zeros(0, np.int8))

    def __len__(self) -> int:
        return len(self.pt)

    def select(self, mask: NDArray[np.bool_]) -> PFCandidates:
        """The candidates where ``mask`` is true."""
        return PFCandidates(self.pt[mask], self.eta[mask], self.phi[mask], self.kind[mask])


@dataclass(frozen=True, eq=False)
class SparsePixels:
    """Non-empty pixels of one event image in COO form, sorted by (channel, ieta, iphi), no duplicates.

    Attributes (all shape [n]):
        channel: uint8, 0…2 (see :data:`jetssd.geometry.N_CHANNELS`).
        ieta: int16, 0…339.
        iphi: int16, 0…359.
        value: float32, summed pT / ET in GeV.
    """

    channel: NDArray[np.uint8]
    ieta: NDArray[np.int16]
    iphi: NDArray[np.int16]
    value: NDArray[np.float32]

    @classmethod
    def from_arrays(cls, channel: ArrayLike, ieta: ArrayLike, iphi: ArrayLike, value: ArrayLike) -> SparsePixels:
        """Validate user-supplied pixels; duplicates are summed and the result is put in canonical order."""
        ch = _column("channel", channel, np.int64)
        ie = _column("ieta", ieta, np.int64)
        ip = _column("iphi", iphi, np.int64)
        val = _column("value", value, np.float32)
        _same_length({"channel": ch, "ieta": ie, "iphi": ip, "value": val})
        for name, col, hi in (("channel", ch, geometry.N_CHANNELS), ("ieta", ie, geometry.N_ETA),
                              ("iphi", ip, geometry.N_PHI)):
            bad = (col < 0) | (col >= hi)
            if np.any(bad):
                i = int(np.argmax(bad))
                raise InvalidInputError(name, f"index {int(col[i])} at position {i} outside 0…{hi - 1}")
        _require_finite("value", val)
        if np.any(val < 0):
            raise InvalidInputError("value", f"negative value at index {int(np.argmax(val < 0))}; must be ≥ 0")
        flat = (ch * geometry.N_ETA + ie) * geometry.N_PHI + ip
        return cls.from_flat_index(flat, val.astype(np.float64))

    @classmethod
    def from_flat_index(cls, flat: NDArray[np.int64], value: NDArray[np.floating[Any]]) -> SparsePixels:
        """Sum ``value`` per flat pixel index ((channel·340 + ieta)·360 + iphi) into canonical sparse form."""
        uniq, inverse = np.unique(flat, return_inverse=True)
        sums = np.bincount(inverse, weights=value, minlength=len(uniq))
        ch, rest = np.divmod(uniq, geometry.N_ETA * geometry.N_PHI)
        ie, ip = np.divmod(rest, geometry.N_PHI)
        return cls(ch.astype(np.uint8), ie.astype(np.int16), ip.astype(np.int16), sums.astype(np.float32))

    @classmethod
    def empty(cls) -> SparsePixels:
        return cls(np.zeros(0, np.uint8), np.zeros(0, np.int16), np.zeros(0, np.int16), np.zeros(0, np.float32))

    def __len__(self) -> int:
        return len(self.value)

    @property
    def flat_index(self) -> NDArray[np.int64]:
        """Index into a flattened [3, 340, 360] image."""
        return (self.channel.astype(np.int64) * geometry.N_ETA + self.ieta) * geometry.N_PHI + self.iphi


@dataclass(frozen=True, eq=False)
class TruthObjects:
    """Generator-level boosted objects (t, W/Z, H) of one event, columnar, all shape [n].

    Attributes:
        cls: int8 class id, 0 t, 1 V (W or Z), 2 H.
        eta, phi: direction, phi in rad, float32.
        pt: GeV, float32.
        mass: GeV, float32; NaN where unknown (files in the reference layout store no mass).
    """

    cls: NDArray[np.int8]
    eta: NDArray[np.float32]
    phi: NDArray[np.float32]
    pt: NDArray[np.float32]
    mass: NDArray[np.float32]

    @classmethod
    def from_arrays(cls, cls_: ArrayLike, eta: ArrayLike, phi: ArrayLike, pt: ArrayLike,
                    mass: ArrayLike | None = None) -> TruthObjects:
        c = _column("cls", cls_, np.int64)
        e = _column("eta", eta, np.float32)
        p = _column("phi", phi, np.float32)
        t = _column("pt", pt, np.float32)
        m = np.full(len(t), np.nan, np.float32) if mass is None else _column("mass", mass, np.float32)
        _same_length({"cls": c, "eta": e, "phi": p, "pt": t, "mass": m})
        if np.any((c < 0) | (c >= len(CLASS_NAMES))):
            raise InvalidInputError("cls", "class ids must be 0 (t), 1 (V) or 2 (H)")
        return cls(c.astype(np.int8), e, p, t, m)

    @classmethod
    def empty(cls) -> TruthObjects:
        z = np.zeros(0, np.float32)
        return cls(np.zeros(0, np.int8), z, z, z, z)

    def __len__(self) -> int:
        return len(self.pt)

    def select(self, mask: NDArray[np.bool_]) -> TruthObjects:
        return TruthObjects(self.cls[mask], self.eta[mask], self.phi[mask], self.pt[mask], self.mass[mask])


@dataclass(frozen=True, eq=False)
class BaselineJets:
    """Jets tagged by the rule-based physics baseline (reference §1.5), columnar, all shape [n].

    One jet may appear once per class whose soft-drop mass window it falls in.

    Attributes:
        cls: int8 class id (0 t, 1 V, 2 H) of the mass window that selected the jet.
        eta, phi: jet axis, float32 (phi in rad).
        pt: jet pT, GeV, float32.
        tau_ratio: τ32 for t, τ21 for V and H, float32; the baseline's score is 1 − tau_ratio.
        msd: soft-drop mass, GeV, float32; NaN where unknown (reference-layout files do not store it).
    """

    cls: NDArray[np.int8]
    eta: NDArray[np.float32]
    phi: NDArray[np.float32]
    pt: NDArray[np.float32]
    tau_ratio: NDArray[np.float32]
    msd: NDArray[np.float32]

    @classmethod
    def from_arrays(cls, cls_: ArrayLike, eta: ArrayLike, phi: ArrayLike, pt: ArrayLike, tau_ratio: ArrayLike,
                    msd: ArrayLike | None = None) -> BaselineJets:
        c = _column("cls", cls_, np.int64)
        e = _column("eta", eta, np.float32)
        p = _column("phi", phi, np.float32)
        t = _column("pt", pt, np.float32)
        r = _column("tau_ratio", tau_ratio, np.float32)
        m = np.full(len(t), np.nan, np.float32) if msd is None else _column("msd", msd, np.float32)
        _same_length({"cls": c, "eta": e, "phi": p, "pt": t, "tau_ratio": r, "msd": m})
        if np.any((c < 0) | (c >= len(CLASS_NAMES))):
            raise InvalidInputError("cls", "class ids must be 0 (t), 1 (V) or 2 (H)")
        return cls(c.astype(np.int8), e, p, t, r, m)

    @classmethod
    def empty(cls) -> BaselineJets:
        z = np.zeros(0, np.float32)
        return cls(np.zeros(0, np.int8), z, z, z, z, z)

    def __len__(self) -> int:
        return len(self.pt)

    def select(self, mask: NDArray[np.bool_]) -> BaselineJets:
        return BaselineJets(self.cls[mask], self.eta[mask], self.phi[mask], self.pt[mask], self.tau_ratio[mask],
                            self.msd[mask])

    @property
    def score(self) -> NDArray[np.float32]:
        """Baseline confidence, 1 − τ ratio (reference §1.5)."""
        return (1.0 - self.tau_ratio).astype(np.float32)


@dataclass(eq=False)
class Event:
    """One event as read from or written to a file.

    ``pixels`` is always present. ``pf`` is present for events of our own format (and events made by
    the generator); files in the reference layout carry only pixels. ``truth`` uses the default truth
    convention (status-22 parity); ``truth_lastcopy`` the physics "last copy" convention when known.
    """

    pixels: SparsePixels
    truth: TruthObjects = field(default_factory=TruthObjects.empty)
    baseline: BaselineJets = field(default_factory=BaselineJets.empty)
    pf: PFCandidates | None = None
    truth_lastcopy: TruthObjects | None = None
    process: str = ""
    """Physics process that made the event ("WW", "ZZ", "HH", "tt", "QCD"), "" when unknown."""
    n_pileup: int = -1
    """Number of overlaid pileup interactions, −1 when unknown."""
