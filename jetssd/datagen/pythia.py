"""Pythia 8 event generation: RS graviton G* → WW / ZZ / HH / tt and QCD multijets at 13 TeV, with truth.

Settings follow ``event-generation.md`` §1 (hadronic W/Z, H → bb, narrow G*, Monash tune with MPI, ISR/FSR
and hadronization on). Truth follows §2: ``truth_status22`` (reference-dataset parity: every t/W/Z/H with
|status| 22, so the W of each top counts as an extra V) and ``truth_lastcopy`` (the last copies of the G*
daughters).

Speed. A Python loop over ``pythia.event`` costs 1.5 ms/event for the final state alone (≈ 450–600 of
≈ 1,000–1,500 record entries) and ≈ 4 ms with all columns and Pythia's truth methods, against ≈ 4 ms for
Pythia's ``next()`` itself. ``Pythia.nextBatch`` instead fills an awkward array in C++; with the conversion
to numpy and the truth it adds only ≈ 0.5–0.8 ms/event. So events are generated in batches and served one
by one. Truth is recomputed from the record's columns (status, id, daughters, momenta); the ``"loop"``
extraction keeps Pythia's own methods as the reference the batch path is tested against (identical
output on 1,500 events of all channels).

Determinism. Pythia initialises with a fixed seed (:data:`_INIT_SEED`) and is reseeded with the caller's
seed right after ``init()``: the MPI tables and cross-section maxima that init integrates by Monte Carlo
are then the same for every seed, which is what lets one cached MPI table file (``mpi_cache_dir``) serve
every generator. With a cache, all generators read the tables from that file — also the one that writes
it — so events do not depend on which process won the race to write it. The file stores the tables as
text, rounded: events made with a cache differ from those made without one in the last digits (and can
then diverge), but each mode is exactly reproducible.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import itertools
import math
import os
import tempfile
import time
import uuid
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from jetssd.datagen.particles import Particles
from jetssd.event import TruthObjects

CHANNELS = ("WW", "ZZ", "HH", "tt", "QCD")
E_CM = 13000.0
"""Centre-of-mass energy, GeV."""
GRAVITON_ID = 5100039
PYTHIA_MAX_SEED = 900_000_000
"""Pythia accepts ``Random:seed`` in 1…900,000,000."""
MAX_FAILURES = 10
"""Consecutive failed ``next()`` calls after which generation gives up."""
MAX_BATCH = 16
"""Largest ``nextBatch`` size. Measured (G* → WW, ms/event incl. extraction): 7.3 at 1, 4.7 at 4, 4.4 at 8,
≈ 4.3 at 16–64, against 3.7 for a bare ``next()``. A larger batch gains nothing and makes :meth:`next`
generate more events ahead of a caller that may stop (use :meth:`EventGenerator.generate` to avoid that)."""

# G* decay channel → the onIfMatch products (event-generation §1).
_GRAVITON_DECAYS = {"WW": "24 -24", "ZZ": "23 23", "HH": "25 25", "tt": "6 -6"}
# |PDG id| → truth class (reference §1.4): t = 0, V (W, Z) = 1, H = 2.
_TRUTH_CLASS = {6: 0, 23: 1, 24: 1, 25: 2}
# Seed of Pythia's init-time Monte Carlo integrations; the caller's seed takes over after init (see top).
_INIT_SEED = 1
# QCD p̂T threshold as a fraction of the G* mass; see qcd_settings().
QCD_PTHAT_FRACTION = 0.25

_QUIET = (
    # Print:quiet also silences the per-event warnings ("weight above unity", "stuck in loop") that would
    # otherwise flood the logs of a 100k-event run; failures still surface through next()'s return value.
    "Print:quiet = on",
    "Next:numberCount = 0",
    "Next:numberShowEvent = 0",
    "Next:numberShowProcess = 0",
    "Next:numberShowInfo = 0",
    "Init:showChangedSettings = off",
    "Init:showChangedParticleData = off",
)


def pythia_version() -> str:
    """Version of the installed pythia8mc wheel, e.g. "8.317.2"."""
    return importlib.metadata.version("pythia8mc")


def pythia_seed(seed: int, stream: str = "") -> int:
    """Map any integer ``seed`` (and a stream name) to a Pythia seed in 1…900,000,000, deterministically.

    Hashing rather than ``seed % N`` means nearby seeds, and the same seed in different streams (channels,
    pool blocks), give unrelated Pythia seeds: identical seeds would give identical phase-space points
    across channels (event-generation §1).
    """
    digest = hashlib.blake2b(f"jetssd:{stream}:{int(seed)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % PYTHIA_MAX_SEED + 1


# ---------------------------------------------------------------------------------------------------
# Settings


def _common_settings() -> list[str]:
    return [*_QUIET, f"Beams:eCM = {E_CM}"]


def signal_settings(channel: str, mass: float = 3500.0, kappa_mg: float = 0.054) -> list[str]:
    """Pythia settings for G* → ``channel`` (one of WW, ZZ, HH, tt), without the seed.

    ``kappa_mg`` = 0.054 is the narrow RS graviton (Γ ≈ 0.5 GeV at 3.5 TeV); ``mass`` in GeV.
    """
    return [
        *_common_settings(),
        "ExtraDimensionsG*:all = on",
        f"ExtraDimensionsG*:kappaMG = {kappa_mg!r}",
        f"{GRAVITON_ID}:m0 = {mass!r}",
        f"{GRAVITON_ID}:onMode = off",
        f"{GRAVITON_ID}:onIfMatch = {_GRAVITON_DECAYS[channel]}",
        # Hadronic W and Z (also the W of t → W b), H → bb: only branching ratios change, not kinematics.
        "24:onMode = off",
        "24:onIfAny = 1 2 3 4 5",
        "23:onMode = off",
        "23:onIfAny = 1 2 3 4 5",
        "25:onMode = off",
        "25:onIfMatch = 5 -5",
    ]


def qcd_settings(pthat_min: float) -> list[str]:
    """Pythia settings for the QCD multijet background (all 2 → 2 QCD processes), p̂T > ``pthat_min`` GeV."""
    return [*_common_settings(), "HardQCD:all = on", f"PhaseSpace:pTHatMin = {pthat_min!r}"]


def default_qcd_pthat_min(mass: float) -> float:
    """p̂T threshold of the QCD sample for a G* of ``mass`` GeV: mass/4 (875 GeV at 3.5 TeV).

    Why mass/4: the background study needs QCD jets in the same boosted regime as the signal objects.
    Measured at 3.5 TeV (300 events each; pT percentiles 5/25/50/75/95 of the two leading anti-kT 0.8 jets):

    - G* → WW: 596 / 1123 / 1463 / 1674 / 1764 GeV (G* → tt similar, slightly softer);
    - QCD p̂T > mass/5 = 700: 597 / 722 / 800 / 938 / 1182 GeV — the bulk sits below the signal's
      lower quartile;
    - QCD p̂T > mass/4 = 875: 756 / 906 / 984 / 1114 / 1391 GeV — spans the signal's lower half and
      reaches its median, while ≈ 85–90% of the signal objects lie above the threshold.

    QCD falls like ≈ p̂T⁻⁵, so no single unweighted threshold matches the signal's Jacobian peak at
    mass/2; a higher one would leave the signal's lower third without background. Compare fake rates in
    bins of jet pT.
    """
    return QCD_PTHAT_FRACTION * mass


def minbias_settings() -> list[str]:
    """Pythia settings for inelastic min-bias (ND + SD + DD + CD) at 13 TeV: the pileup interactions."""
    return [*_common_settings(), "SoftQCD:inelastic = on"]


def channel_settings(channel: str, mass: float = 3500.0, kappa_mg: float = 0.054,
                     qcd_pthat_min: float | None = None) -> list[str]:
    """Settings of one channel of :data:`CHANNELS`; raises ValueError naming an unknown channel."""
    if channel not in CHANNELS:
        raise ValueError(f"unknown channel {channel!r}; choose from {', '.join(CHANNELS)}")
    if not (math.isfinite(mass) and mass > 0):
        raise ValueError(f"mass must be a positive number of GeV, got {mass!r}")
    if channel == "QCD":
        pthat = default_qcd_pthat_min(mass) if qcd_pthat_min is None else qcd_pthat_min
        return qcd_settings(pthat)
    return signal_settings(channel, mass, kappa_mg)


# ---------------------------------------------------------------------------------------------------
# Initialisation with a cached MPI table


def mpi_cache_file(settings: Sequence[str], cache_dir: Path) -> Path:
    """Name of the MPI table file for ``settings`` in ``cache_dir``.

    Pythia does not check that a table matches the run that reads it, so the name hashes every setting
    (and the Pythia version): a different mass or channel gets its own ≈ 1–20 kB file.
    """
    key = hashlib.sha1("\n".join([pythia_version(), *settings]).encode()).hexdigest()[:16]
    return cache_dir / f"mpi-{pythia_version()}-{key}.mpi"


def _new_pythia(settings: Sequence[str], extra: Sequence[str] = ()) -> Any:
    """A configured, not yet initialised ``pythia8mc.Pythia``; raises ValueError on an unknown setting."""
    import pythia8mc

    pythia = pythia8mc.Pythia("", False)  # no banner
    for line in [*settings, "Random:setSeed = on", f"Random:seed = {_INIT_SEED}", *extra]:
        if not pythia.readString(line):
            raise ValueError(f"Pythia rejected the setting {line!r}")
    return pythia


@contextlib.contextmanager
def _blank_free(path: Path) -> Iterator[Path]:
    """``path``, or a symlink to it in a fresh temporary directory if ``path`` contains whitespace.

    Pythia's word settings end at the first blank, so ``initFile = /my dir/x.mpi`` would name "/my". A
    dangling symlink works for writing too: opening it for output creates its target.
    """
    if not any(c.isspace() for c in str(path)):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="jetssd-mpi-") as tmp:
        link = Path(tmp) / "table.mpi"
        link.symlink_to(path.absolute())
        yield link


def ensure_mpi_cache(settings: Sequence[str], cache_dir: Path) -> Path:
    """Create the MPI table file for ``settings`` in ``cache_dir`` unless present; return its path.

    Written by a throw-away Pythia under a unique temporary name and renamed into place, so racing
    processes never see a half-written file; all of them write identical content (fixed init seed).
    """
    final = mpi_cache_file(settings, cache_dir)
    if final.is_file() and final.stat().st_size > 0:
        return final
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f".{final.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
    try:
        with _blank_free(tmp) as name:
            pythia = _new_pythia(settings, ["MultipartonInteractions:reuseInit = 1",
                                            f"MultipartonInteractions:initFile = {name}"])
            ok = pythia.init()
        if not ok or not tmp.is_file():
            raise RuntimeError(f"Pythia could not initialise to write the MPI table {final}")
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    return final


def _init_from_cache(settings: Sequence[str], cache: Path) -> tuple[Any, bool]:
    """A Pythia initialised from the MPI table file ``cache``, and whether init succeeded."""
    with _blank_free(cache) as name:
        pythia = _new_pythia(settings, ["MultipartonInteractions:reuseInit = 2",
                                        f"MultipartonInteractions:initFile = {name}"])
        return pythia, bool(pythia.init())


def init_pythia(settings: Sequence[str], seed: int, mpi_cache_dir: Path | None = None) -> Any:
    """An initialised ``pythia8mc.Pythia`` for ``settings``, seeded with ``seed`` (1…900,000,000).

    With ``mpi_cache_dir`` the MPI tables are read from (or first written to) a file there, which cuts
    init from ≈ 0.25 s to ≈ 0.1 s for hard processes and from ≈ 4 s to ≈ 0.1 s for min-bias.
    """
    if not 1 <= seed <= PYTHIA_MAX_SEED:
        raise ValueError(f"Pythia seed must be in 1…{PYTHIA_MAX_SEED}, got {seed}")
    if mpi_cache_dir is None:
        pythia = _new_pythia(settings)
        ok = pythia.init()
    else:
        cache = ensure_mpi_cache(settings, mpi_cache_dir)
        pythia, ok = _init_from_cache(settings, cache)
        if not ok:  # unreadable file (e.g. truncated by hand; Pythia then fails init): rewrite it once
            cache.unlink(missing_ok=True)
            pythia, ok = _init_from_cache(settings, ensure_mpi_cache(settings, mpi_cache_dir))
    if not ok:
        raise RuntimeError("Pythia initialisation failed (settings: " + "; ".join(settings) + ")")
    pythia.rndm.init(seed)
    return pythia


# ---------------------------------------------------------------------------------------------------
# Event records as columns


@dataclass(frozen=True, eq=False)
class _Record:
    """The full Pythia event record of one event as columns, all shape [n_entries] (index = Pythia index)."""

    id: NDArray[np.int32]
    status: NDArray[np.int32]
    daughter1: NDArray[np.int32]
    daughter2: NDArray[np.int32]
    px: NDArray[np.float64]
    py: NDArray[np.float64]
    pz: NDArray[np.float64]
    e: NDArray[np.float64]
    m: NDArray[np.float64]


def _daughter_list(rec: _Record, i: int) -> list[int]:
    """Pythia's ``Particle::daughterList()`` for entry ``i`` (the five daughter1/daughter2 cases).

    The beams' extra daughters (found in C++ by scanning for their mother) are not needed for truth.
    """
    d1, d2 = int(rec.daughter1[i]), int(rec.daughter2[i])
    if d1 == 0 and d2 == 0:
        return []
    if d2 == d1 or d2 == 0:
        return [d1]
    if d2 > d1:
        return list(range(d1, d2 + 1))
    return [d1, d2]


def _bot_copy_id(rec: _Record, i: int) -> int:
    """Pythia's ``Particle::iBotCopyId()``: follow the unique same-id daughter down to the last copy."""
    pid = rec.id[i]
    while True:
        same = [d for d in _daughter_list(rec, i) if rec.id[d] == pid]
        if len(same) != 1:  # no copy, or an ambiguous branching: stop here, as Pythia does
            return i
        i = same[0]


def _truth_objects(rec: _Record, idx: Sequence[int] | NDArray[np.int64]) -> TruthObjects:
    """Truth objects for record entries ``idx`` (all t, W, Z or H)."""
    idx = np.asarray(idx, dtype=np.int64)
    if len(idx) == 0:
        return TruthObjects.empty()
    px, py, pz = rec.px[idx], rec.py[idx], rec.pz[idx]
    pt = np.hypot(px, py)
    cls = np.array([_TRUTH_CLASS[abs(int(p))] for p in rec.id[idx]], dtype=np.int8)
    return TruthObjects(cls=cls,
                        eta=np.arcsinh(pz / np.maximum(pt, 1e-20)).astype(np.float32),
                        phi=np.arctan2(py, px).astype(np.float32),
                        pt=pt.astype(np.float32),
                        mass=rec.m[idx].astype(np.float32))


def truth_status22(rec: _Record) -> TruthObjects:
    """Reference parity (§2 B): every entry with |status| 22 and |id| in {6, 23, 24, 25}, in record order."""
    hard = np.flatnonzero(np.abs(rec.status) == 22)  # a handful of entries: filter ids in Python
    return _truth_objects(rec, [i for i in hard if abs(int(rec.id[i])) in _TRUTH_CLASS])


def truth_lastcopy(rec: _Record) -> TruthObjects:
    """Physics labels (§2 A): the last copies of the decaying G*'s t/W/Z/H daughters; empty without a G*."""
    gravitons = [int(i) for i in np.flatnonzero(np.abs(rec.id) == GRAVITON_ID) if _bot_copy_id(rec, int(i)) == i]
    if not gravitons:
        return TruthObjects.empty()
    daughters = [_bot_copy_id(rec, d) for d in _daughter_list(rec, gravitons[0])]
    return _truth_objects(rec, [d for d in daughters if abs(int(rec.id[d])) in _TRUTH_CLASS])


# ---------------------------------------------------------------------------------------------------
# The generator


@dataclass(frozen=True, eq=False)
class GeneratedEvent:
    """One generated event.

    Attributes:
        particles: all final-state particles (neutrinos included: the fast simulation drops them),
            is_pileup all false, float64 four-momenta in GeV.
        truth_status22: t/V/H with |status| 22 (reference parity; the W of a top is an extra V).
        truth_lastcopy: last copies of the G* daughters (exactly 2 objects for signal).
        weight: Pythia's event weight (1 for these unweighted samples).
    """

    particles: Particles
    truth_status22: TruthObjects
    truth_lastcopy: TruthObjects
    weight: float


class _ChargeTable:
    """PDG id → charge (units of e), memoised: an event has only a few dozen distinct ids."""

    def __init__(self, particle_data: Any) -> None:
        self._data = particle_data
        self._charge: dict[int, int] = {}

    def __call__(self, pid: NDArray[np.int32]) -> NDArray[np.int8]:
        uniq, inverse = np.unique(pid, return_inverse=True)
        charges = [self._charge.get(int(u)) for u in uniq]
        for k, c in enumerate(charges):
            if c is None:
                charges[k] = self._charge[int(uniq[k])] = round(self._data.charge(int(uniq[k])))
        return np.asarray(charges, dtype=np.int8)[inverse].reshape(pid.shape)


def _final_state(rec: _Record, charge_of: _ChargeTable) -> Particles:
    """Final-state particles (status > 0, i.e. ``isFinal()``) of a record."""
    final = rec.status > 0
    pid = rec.id[final]
    return Particles(px=rec.px[final], py=rec.py[final], pz=rec.pz[final], e=rec.e[final], pid=pid,
                     charge=charge_of(pid), is_pileup=np.zeros(len(pid), np.bool_))


def _record_from_event(event: Any) -> _Record:
    """Columns of ``pythia.event`` via Python calls per entry (the slow reference path)."""
    rows = [(p.id(), p.status(), p.daughter1(), p.daughter2(), p.px(), p.py(), p.pz(), p.e(), p.m())
            for p in event]
    ids, status, d1, d2, px, py, pz, e, m = (list(c) for c in zip(*rows, strict=True))
    i32, f64 = np.int32, np.float64
    return _Record(id=np.asarray(ids, i32), status=np.asarray(status, i32), daughter1=np.asarray(d1, i32),
                   daughter2=np.asarray(d2, i32), px=np.asarray(px, f64), py=np.asarray(py, f64),
                   pz=np.asarray(pz, f64), e=np.asarray(e, f64), m=np.asarray(m, f64))


def _records_from_batch(batch: Any) -> list[_Record]:
    """Columns of each event of a ``nextBatch`` awkward array (failed events, None, already dropped)."""
    import awkward as ak

    prt = batch.prt
    counts = ak.to_numpy(ak.num(prt, axis=1))
    flat = ak.flatten(prt, axis=1)
    cols = {name: ak.to_numpy(flat[name]) for name in ("id", "status", "daughter1", "daughter2", "m")}
    mom = flat["p"]
    cols.update({name: ak.to_numpy(mom[name]) for name in ("px", "py", "pz", "e")})
    edges = np.concatenate([[0], np.cumsum(counts)])
    return [_Record(**{name: col[a:b] for name, col in cols.items()}) for a, b in itertools.pairwise(edges)]


def _awkward_available() -> bool:
    try:
        import awkward  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass(frozen=True, eq=False)
class _Generated:
    """One successfully generated event as the source hands it over.

    ``lastcopy`` holds the record indices of the G* daughters' last copies as found by Pythia's own
    methods (loop extraction only); None means: derive them from the columns.
    """

    record: _Record
    weight: float
    lastcopy: list[int] | None = None


class _Source:
    """An initialised Pythia that hands out events as :class:`_Record` columns and counts failures.

    Args:
        pythia: initialised ``pythia8mc.Pythia``.
        label: names the process in the error raised after MAX_FAILURES failed events in a row.
        batch: extract with ``nextBatch`` + awkward (fast) instead of a Python loop over the record.
    """

    def __init__(self, pythia: Any, label: str, batch: bool) -> None:
        self.pythia = pythia
        self.label = label
        self.batch = batch
        self.failures = 0  # consecutive failed events

    def take(self, k: int) -> list[_Generated]:
        """Ask Pythia for ``k`` events; returns those that did not fail (possibly none)."""
        return self._take_batch(k) if self.batch else self._take_loop(k)

    def _count(self, ok: bool) -> None:
        self.failures = 0 if ok else self.failures + 1
        if self.failures >= MAX_FAILURES:
            raise RuntimeError(f"Pythia failed to generate {MAX_FAILURES} {self.label} events in a row")

    def _take_batch(self, k: int) -> list[_Generated]:
        import awkward as ak

        # errorMode "none" keeps a failed event as None, so failures are counted exactly as in the loop.
        batch = self.pythia.nextBatch(k, "none")
        ok = ~ak.to_numpy(ak.is_none(batch, axis=0))
        for flag in ok:
            self._count(bool(flag))
        good = batch[ok]
        if len(good) == 0:
            return []
        weights = ak.to_numpy(ak.fill_none(ak.firsts(good.info.weights, axis=1), 1.0))
        return [_Generated(rec, float(w)) for rec, w in zip(_records_from_batch(good), weights, strict=True)]

    def _take_loop(self, k: int) -> list[_Generated]:
        out = []
        for _ in range(k):
            ok = bool(self.pythia.next())
            self._count(ok)
            if ok:
                event = self.pythia.event
                out.append(_Generated(_record_from_event(event), float(self.pythia.infoPython().weight()),
                                      _lastcopy_by_pythia(event)))
        return out


def _lastcopy_by_pythia(event: Any) -> list[int]:
    """Indices of the last copies of the G* daughters, by Pythia's own ``iBotCopyId()`` (reference)."""
    for i in range(event.size()):
        p = event[i]
        if p.idAbs() == GRAVITON_ID and p.iBotCopyId() == i:
            return [event[d].iBotCopyId() for d in p.daughterList()]
    return []


class EventGenerator:
    """Pythia 8 events of one channel of :data:`CHANNELS` at 13 TeV, with truth.

    Args:
        channel: "WW", "ZZ", "HH", "tt" (G* → that pair) or "QCD" (multijets, p̂T > ``qcd_pthat_min``).
        seed: any integer; mapped into Pythia's seed range with :func:`pythia_seed` (the channel mixed in).
        mass: G* mass, GeV; for QCD it sets the default p̂T threshold (:func:`default_qcd_pthat_min`).
        kappa_mg: RS coupling κ·M_G (0.054 = narrow).
        mpi_cache_dir: directory for cached MPI tables (faster init; see the module docstring).
        qcd_pthat_min: override the QCD p̂T threshold, GeV.
        extraction: "batch" (awkward ``nextBatch``, fast), "loop" (Python loop over ``pythia.event`` with
            Pythia's own truth methods: the slow reference) or "auto" (batch when awkward is installed).
            Both give identical events.

    Raises ValueError for an unknown channel or setting, RuntimeError if Pythia cannot initialise.
    """

    def __init__(self, channel: str, seed: int, mass: float = 3500.0, kappa_mg: float = 0.054,
                 mpi_cache_dir: Path | None = None, *, qcd_pthat_min: float | None = None,
                 extraction: str = "auto") -> None:
        self.settings = channel_settings(channel, mass, kappa_mg, qcd_pthat_min)
        if extraction not in ("auto", "batch", "loop"):
            raise ValueError(f"extraction must be 'auto', 'batch' or 'loop', got {extraction!r}")
        self.channel = channel
        self.seed = seed
        self.pythia_seed = pythia_seed(seed, channel)
        start = time.perf_counter()
        pythia = init_pythia(self.settings, self.pythia_seed, mpi_cache_dir)
        self.init_seconds = time.perf_counter() - start
        batch = extraction == "batch" or (extraction == "auto" and _awkward_available())
        self._source = _Source(pythia, channel, batch)
        self._charge = _ChargeTable(pythia.particleData)
        self._buffer: deque[GeneratedEvent] = deque()
        self._batch_size = 4  # doubles up to MAX_BATCH: a caller that wants 3 events does not pay for 16

    def next(self) -> GeneratedEvent:
        """The next event. Failed Pythia events are skipped; RuntimeError after MAX_FAILURES in a row."""
        if not self._buffer:
            self._fill(self._batch_size)
            self._batch_size = min(2 * self._batch_size, MAX_BATCH)
        return self._buffer.popleft()

    def generate(self, n: int) -> Iterator[GeneratedEvent]:
        """The next ``n`` events, as :meth:`next` gives them; generates none beyond the ``n``-th."""
        for done in range(n):
            if not self._buffer:
                self._fill(min(MAX_BATCH, n - done))
            yield self._buffer.popleft()

    def _fill(self, k: int) -> None:
        while not self._buffer:
            for gen in self._source.take(k):
                rec = gen.record
                last = truth_lastcopy(rec) if gen.lastcopy is None else _truth_objects(
                    rec, [j for j in gen.lastcopy if abs(int(rec.id[j])) in _TRUTH_CLASS])
                self._buffer.append(GeneratedEvent(particles=_final_state(rec, self._charge),
                                                   truth_status22=truth_status22(rec), truth_lastcopy=last,
                                                   weight=gen.weight))


# ---------------------------------------------------------------------------------------------------
# Min-bias (used by jetssd.datagen.pileup)


def minbias_block(seed: int, n_events: int, mpi_cache_dir: Path | None = None
                  ) -> tuple[Particles, NDArray[np.int64]]:
    """``n_events`` min-bias events from a fresh Pythia seeded with ``seed`` (1…900,000,000).

    Returns (particles, counts): the final-state particles of all events, event after event, shape
    [n_particles] (float64 GeV, is_pileup false); and counts, shape [n_events], particles per event.
    """
    pythia = init_pythia(minbias_settings(), seed, mpi_cache_dir)
    source = _Source(pythia, "min-bias", _awkward_available())
    charge = _ChargeTable(pythia.particleData)
    events: list[Particles] = []
    while len(events) < n_events:
        events.extend(_final_state(g.record, charge) for g in source.take(min(MAX_BATCH, n_events - len(events))))
    return Particles.concatenate(events), np.array([len(p) for p in events], np.int64)
