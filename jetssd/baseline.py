"""Rule-based physics tagger: the reference's ``JetPUPPIAK8`` baseline, with FastJet (reference §1.5, §9).

Per event:

1. Massless four-vectors from the e-flow candidates. With pileup flags given, charged-hadron subtraction
   (CHS) drops the tracks (kind 0) flagged as pileup. We have no PUPPI (event-generation §3/§4), so CHS is
   the closest we get to the reference's PUPPI input.
2. Anti-kT R = 0.8 jets with pT > 200 GeV and |η| < 2.958 (the image acceptance).
3. Soft-drop mass m_SD (β = 0, z_cut = 0.1, R0 = 0.8, C/A declustering; :func:`softdrop_mass`, equal
   to fjcontrib's ``SoftDrop`` to the last bit but O(n) instead of the O(n²) of its awkward binding)
   and N-subjettiness τ1, τ2, τ3 from fjcontrib (β = 1 normalized measure, R0 = 0.8, **OnePass-kT
   axes**, i.e. Delphes' ``AxisMode 4``, the reference card's setting).
4. One row per (jet, class) whose open m_SD window holds the jet: t (105, 210), V (65, 105), H (105, 140)
   GeV. The row's ``tau_ratio`` is τ32 for t and τ21 for V/H; the baseline's score is 1 − tau_ratio.

FastJet (GPL) is an optional extra: it, awkward and vector are imported inside the functions that need
them, so ``import jetssd.baseline`` works without them. The whole batch is clustered in two calls of the
jagged multi-event awkward ``ClusterSequence`` (one event per list entry, then one jet per list entry).
Cost at ≈ 2,500 candidates per event: ≈ 7 ms/event (anti-kT ≈ 2.7, soft drop ≈ 1.8, τ1..3 ≈ 1.8),
≈ 5 ms/event with CHS.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from jetssd import geometry
from jetssd.event import CLASS_IDS, KIND_TRACK, BaselineJets, PFCandidates

_INSTALL_HINT = "the physics baseline needs FastJet: pip install 'jetssd[datagen]'"

# Radius of the C/A reclustering that feeds soft drop and the τ computation: large enough that every
# constituent of an R = 0.8 jet ends up in one exclusive jet (fjcontrib reclusters with the maximal R too).
_RECLUSTER_R = 999.0

NSUB_AXES = ("KT_Axes", "CA_Axes", "WTA_KT_Axes", "WTA_CA_Axes", "OnePass_KT_Axes", "OnePass_CA_Axes",
             "OnePass_WTA_KT_Axes", "OnePass_WTA_CA_Axes")
"""fjcontrib N-subjettiness axes accepted by :class:`BaselineConfig` (those that need no extra parameter)."""

TAU_FLOOR = 1e-6
"""Exact τ = 0 (one-particle jets) is replaced by this, as the reference loader did (reference §1.5)."""


@dataclass(frozen=True)
class BaselineConfig:
    """Parameters of the baseline tagger. Defaults are the reference's Delphes card (reference §9).

    Attributes:
        jet_r: anti-kT radius.
        jet_pt_min: jets need pT strictly above this, GeV.
        jet_abs_eta_max: jets need |η| strictly below this (the image acceptance, 2.958).
        sd_beta, sd_zcut, sd_r0: soft drop β, z_cut and R0.
        sd_backend: ``"declustering"`` (default): :func:`softdrop_mass`, a C/A declustering on FastJet's
            SWIG interface, O(n) per jet. ``"fjcontrib"``: fjcontrib's ``SoftDrop`` through the awkward
            binding; same numbers, but the binding is O(n²) in the groomed constituents (≈ 3 ms for a
            100-particle jet, 40 ms for 400), so it serves as a cross-check only.
        nsub_beta, nsub_r0: N-subjettiness normalized-measure β and R0.
        nsub_axes: fjcontrib axes name, as understood by fastjet's awkward ``njettiness``.
            ``"OnePass_KT_Axes"`` is Delphes' ``AxisMode 4``, the reference card's choice.
        window_t, window_v, window_h: open m_SD intervals (GeV) that tag a jet as t, V or H.
    """

    jet_r: float = 0.8
    jet_pt_min: float = 200.0
    jet_abs_eta_max: float = geometry.ETA_MAX
    sd_beta: float = 0.0
    sd_zcut: float = 0.1
    sd_r0: float = 0.8
    nsub_beta: float = 1.0
    nsub_r0: float = 0.8
    nsub_axes: str = "OnePass_KT_Axes"
    sd_backend: Literal["declustering", "fjcontrib"] = "declustering"
    window_t: tuple[float, float] = (105.0, 210.0)
    window_v: tuple[float, float] = (65.0, 105.0)
    window_h: tuple[float, float] = (105.0, 140.0)

    def __post_init__(self) -> None:
        # fastjet's binding silently falls back to KT_Axes on an unknown name: refuse it here instead.
        if self.nsub_axes not in NSUB_AXES:
            raise ValueError(f"nsub_axes must be one of {NSUB_AXES}, got {self.nsub_axes!r}")
        if self.sd_backend not in ("declustering", "fjcontrib"):
            raise ValueError(f"sd_backend must be 'declustering' or 'fjcontrib', got {self.sd_backend!r}")
        for name, (lo, hi) in zip(("window_t", "window_v", "window_h"), self.windows, strict=True):
            if not lo < hi:
                raise ValueError(f"{name} must be an interval (lo, hi) with lo < hi, got {(lo, hi)}")

    @property
    def windows(self) -> tuple[tuple[float, float], ...]:
        """The m_SD windows indexed by class id (0 t, 1 V, 2 H)."""
        return (self.window_t, self.window_v, self.window_h)


DEFAULT_CONFIG = BaselineConfig()


@dataclass(frozen=True, eq=False)
class FatJets:
    """The R = 0.8 jets of one event that pass the pT and η cuts, sorted by pT descending; all shape [n].

    Attributes:
        pt: GeV. eta: pseudorapidity. phi: rad, in [−π, π). mass: ungroomed mass, GeV.
        msd: soft-drop mass, GeV (NaN from FastJet already turned into 0).
        tau: [n, 3] float64, τ1, τ2, τ3 (exact zeros already turned into :data:`TAU_FLOOR`).
    """

    pt: NDArray[np.float64]
    eta: NDArray[np.float64]
    phi: NDArray[np.float64]
    mass: NDArray[np.float64]
    msd: NDArray[np.float64]
    tau: NDArray[np.float64]

    def __len__(self) -> int:
        return len(self.pt)

    @property
    def tau21(self) -> NDArray[np.float64]:
        return self.tau[:, 1] / self.tau[:, 0]

    @property
    def tau32(self) -> NDArray[np.float64]:
        return self.tau[:, 2] / self.tau[:, 1]

    @classmethod
    def empty(cls) -> FatJets:
        z = np.zeros(0, np.float64)
        return cls(z, z, z, z, z, np.zeros((0, 3), np.float64))


def _require_fastjet() -> tuple[ModuleType, ModuleType]:
    """Import fastjet and awkward, or raise an ImportError that says how to install them."""
    try:
        import awkward as ak
        import fastjet
        import vector  # noqa: F401  (fastjet's awkward interface needs it for Momentum4D records)
    except ImportError as exc:
        raise ImportError(f"{_INSTALL_HINT} ({exc})") from exc
    return fastjet, ak


def _four_vectors(pt: NDArray[Any], eta: NDArray[Any], phi: NDArray[Any]) -> NDArray[np.float64]:
    """Massless four-vectors [n, 4] = (px, py, pz, E) in GeV, float64 (FastJet works in double)."""
    pt = pt.astype(np.float64)
    eta = eta.astype(np.float64)
    phi = phi.astype(np.float64)
    return np.stack([pt * np.cos(phi), pt * np.sin(phi), pt * np.sinh(eta), pt * np.cosh(eta)], axis=1)


def _jagged_momenta(ak: ModuleType, p4: NDArray[np.float64], counts: NDArray[np.int64]) -> Any:
    """[sum(counts), 4] four-vectors → awkward jagged array of Momentum4D records, one list per entry."""
    records = ak.zip({"px": p4[:, 0], "py": p4[:, 1], "pz": p4[:, 2], "E": p4[:, 3]}, with_name="Momentum4D")
    return ak.unflatten(records, counts)


def _clustering_input(
    events: Sequence[PFCandidates], is_pileup: Sequence[NDArray[np.bool_]] | None
) -> tuple[NDArray[np.float64], NDArray[np.int64]]:
    """CHS-filtered massless four-vectors of all events, concatenated [N, 4], and the per-event counts [E]."""
    if is_pileup is not None and len(is_pileup) != len(events):
        raise ValueError(f"is_pileup has {len(is_pileup)} entries for {len(events)} events")
    parts: list[NDArray[np.float64]] = []
    for i, pf in enumerate(events):
        # Zero-pT candidates carry no momentum, and FastJet's rapidity of (0, 0, 0, 0) is ill-defined.
        keep = pf.pt > 0
        if is_pileup is not None:
            pu = np.asarray(is_pileup[i], dtype=np.bool_)
            if pu.shape != (len(pf),):
                raise ValueError(f"event {i}: is_pileup has shape {pu.shape}, expected ({len(pf)},)")
            keep &= ~(pu & (pf.kind == KIND_TRACK))  # CHS touches only charged candidates
        parts.append(_four_vectors(pf.pt[keep], pf.eta[keep], pf.phi[keep]))
    counts = np.array([len(p) for p in parts], np.int64)
    p4 = np.concatenate(parts) if parts else np.zeros((0, 4), np.float64)
    return p4, counts


def _kinematics(p4: NDArray[np.float64]) -> tuple[NDArray[np.float64], ...]:
    """(pt, eta, phi, mass) of four-vectors [n, 4]; phi wrapped into [−π, π), negative m² clipped to 0."""
    px, py, pz, e = p4.T
    pt = np.hypot(px, py)
    with np.errstate(divide="ignore", invalid="ignore"):
        eta = np.arcsinh(pz / pt)
    phi = geometry.wrap_phi(np.arctan2(py, px))
    mass = np.sqrt(np.maximum(e * e - px * px - py * py - pz * pz, 0.0))
    return pt, eta, phi, mass


def _jet_def(fastjet: ModuleType, algorithm: str, r: float) -> Any:
    return fastjet.JetDefinition(getattr(fastjet, algorithm), r)


def cluster_jets(
    events: Sequence[PFCandidates],
    is_pileup: Sequence[NDArray[np.bool_]] | None = None,
    config: BaselineConfig = DEFAULT_CONFIG,
) -> list[FatJets]:
    """Anti-kT jets with soft-drop mass and τ1..3 for every event of a batch.

    Args:
        events: PF candidates per event.
        is_pileup: per event, bool [n_candidates]; tracks flagged true are removed (CHS). None: no CHS.
        config: jet definition, grooming and N-subjettiness parameters.

    Returns:
        One :class:`FatJets` per event, jets with pT > ``jet_pt_min`` and |η| < ``jet_abs_eta_max``,
        sorted by pT descending.

    Raises:
        ImportError: FastJet (the ``datagen`` extra) is not installed.
    """
    if len(events) == 0:
        return []
    fastjet, ak = _require_fastjet()
    p4, counts = _clustering_input(events, is_pileup)
    if len(p4) == 0:
        return [FatJets.empty() for _ in events]

    # Pass 1: anti-kT on every event at once. Constituent indices are local to their event; jet
    # four-vectors are the (E-scheme) sums of their constituents.
    cs = fastjet.ClusterSequence(_jagged_momenta(ak, p4, counts),
                                 _jet_def(fastjet, "antikt_algorithm", config.jet_r))
    # A pT floor a hair below the cut, so that the config's strict ">" decides rather than FastJet's ">=".
    index = cs.constituent_index(min_pt=config.jet_pt_min * (1.0 - 1e-9))
    jets_per_event = np.asarray(ak.num(index, axis=1), np.int64)
    if jets_per_event.sum() == 0:
        return [FatJets.empty() for _ in events]
    n_const = np.asarray(ak.flatten(ak.num(index, axis=2)), np.int64)
    event_offset = np.concatenate([[0], np.cumsum(counts)[:-1]])
    const_event = np.repeat(np.repeat(np.arange(len(events)), jets_per_event), n_const)
    global_index = np.asarray(ak.flatten(index, axis=None), np.int64) + event_offset[const_event]

    jet_p4 = np.add.reduceat(p4[global_index], np.concatenate([[0], np.cumsum(n_const)[:-1]]), axis=0)
    pt, eta, phi, mass = _kinematics(jet_p4)
    with np.errstate(invalid="ignore"):
        keep = (pt > config.jet_pt_min) & (np.abs(eta) < config.jet_abs_eta_max)

    msd = np.zeros(len(pt))
    tau = np.zeros((len(pt), 3))
    if np.any(keep):
        msd[keep], tau[keep] = _substructure(fastjet, ak, p4, global_index, n_const, keep, config)

    # Jets come grouped by event: split at the event boundaries, then sort each event by pT.
    bounds = np.concatenate([[0], np.cumsum(jets_per_event)])
    out = []
    for a, b in itertools.pairwise(bounds):
        sel = a + np.flatnonzero(keep[a:b])
        sel = sel[np.argsort(-pt[sel], kind="stable")]
        out.append(FatJets(pt[sel], eta[sel], phi[sel], mass[sel], msd[sel], tau[sel]))
    return out


def _substructure(
    fastjet: ModuleType,
    ak: ModuleType,
    p4: NDArray[np.float64],
    global_index: NDArray[np.int64],
    n_const: NDArray[np.int64],
    keep: NDArray[np.bool_],
    config: BaselineConfig,
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Soft-drop mass [k] and τ1..3 [k, 3] of the ``keep`` jets (pass 2: one C/A "event" per jet)."""
    const_jet = np.repeat(np.arange(len(n_const)), n_const)
    const_keep = keep[const_jet]
    jet_p4 = p4[global_index[const_keep]]
    jet_sizes = n_const[keep]
    cs = fastjet.ClusterSequence(_jagged_momenta(ak, jet_p4, jet_sizes),
                                 _jet_def(fastjet, "cambridge_algorithm", _RECLUSTER_R))
    tau = np.asarray(
        cs.njettiness(
            measure_definition="NormalizedMeasure",
            axes_definition=config.nsub_axes,
            njets=[1, 2, 3],
            beta=config.nsub_beta,
            R0=config.nsub_r0,
        ),
        np.float64,
    ).reshape(-1, 3)
    tau = np.nan_to_num(tau, nan=0.0)
    tau[tau == 0.0] = TAU_FLOOR  # a jet with fewer than N+1 particles has τ_N = 0 exactly

    if config.sd_backend == "fjcontrib":
        groomed = cs.exclusive_jets_softdrop_grooming(
            njets=1, beta=config.sd_beta, symmetry_cut=config.sd_zcut, R0=config.sd_r0
        )
        msd = np.asarray(groomed.msoftdrop, np.float64)
    else:
        bounds = np.concatenate([[0], np.cumsum(jet_sizes)])
        msd = np.array([_softdrop_mass(fastjet, jet_p4[a:b], config.sd_beta, config.sd_zcut, config.sd_r0)
                        for a, b in itertools.pairwise(bounds)], np.float64)
    return np.nan_to_num(msd, nan=0.0), tau  # NaN→0 as the reference


def softdrop_mass(p4: NDArray[np.float64], beta: float = 0.0, zcut: float = 0.1, r0: float = 0.8) -> float:
    """Soft-drop mass (GeV) of one jet given its constituents' four-vectors [n, 4] = (px, py, pz, E).

    Reclusters with C/A and declusters on the SWIG interface: starting from the whole jet, while the
    last merging fails min(pT1, pT2)/(pT1 + pT2) > z_cut·(ΔR12/R0)^β, drop the softer branch and follow
    the harder one (fjcontrib's ``SoftDrop`` with ``scalar_z``, ``larger_pt``, no mass-drop cut; ΔR in
    rapidity–φ as fjcontrib). It gives fjcontrib's m_SD to rounding but costs O(n) instead of the O(n²)
    that the awkward binding spends copying the groomed constituents (10 ms for a 200-particle jet).

    Raises:
        ImportError: FastJet is not installed.
    """
    fastjet, _ = _require_fastjet()
    return _softdrop_mass(fastjet, np.asarray(p4, np.float64).reshape(-1, 4), beta, zcut, r0)


def _softdrop_mass(fastjet: ModuleType, p4: NDArray[np.float64], beta: float, zcut: float, r0: float) -> float:
    if len(p4) == 0:
        return 0.0
    particles = [fastjet.PseudoJet(px, py, pz, e) for px, py, pz, e in p4.tolist()]
    cs = fastjet.ClusterSequence(particles, _jet_def(fastjet, "cambridge_algorithm", _RECLUSTER_R))
    jet = cs.exclusive_jets(1)[0]
    while True:
        # has_parents() fills its arguments in place: fresh objects each step, or ``jet`` gets aliased.
        p1, p2 = fastjet.PseudoJet(), fastjet.PseudoJet()
        if not jet.has_parents(p1, p2):
            return float(jet.m())  # a single particle: massless
        pt1, pt2 = p1.pt(), p2.pt()
        if pt1 < pt2:
            p1, p2, pt1, pt2 = p2, p1, pt2, pt1
        if pt2 / (pt1 + pt2) > zcut * (p1.delta_R(p2) / r0) ** beta:
            return float(jet.m())
        jet = p1


def tag_jets(jets: FatJets, config: BaselineConfig = DEFAULT_CONFIG) -> BaselineJets:
    """Apply the m_SD windows: one row per (jet, class) whose open window contains the jet's m_SD.

    Rows are ordered by jet pT descending, then class id. ``tau_ratio`` is τ32 for t and τ21 for V and H.
    Pure numpy: needs no FastJet.
    """
    if len(jets) == 0:
        return BaselineJets.empty()
    order = np.argsort(-jets.pt, kind="stable")
    ratios = {CLASS_IDS["t"]: jets.tau32, CLASS_IDS["V"]: jets.tau21, CLASS_IDS["H"]: jets.tau21}
    rows: list[tuple[int, int]] = []  # (jet index, class id)
    for j in order:
        for c, (lo, hi) in enumerate(config.windows):
            if lo < jets.msd[j] < hi:
                rows.append((int(j), c))
    if not rows:
        return BaselineJets.empty()
    jet_idx = np.array([r[0] for r in rows], np.int64)
    cls = np.array([r[1] for r in rows], np.int64)
    tau_ratio = np.array([ratios[c][j] for j, c in rows], np.float64)
    phi = geometry.wrap_phi(jets.phi[jet_idx])
    return BaselineJets.from_arrays(cls, jets.eta[jet_idx], phi, jets.pt[jet_idx], tau_ratio,
                                    jets.msd[jet_idx])


def tag_events(
    events: Sequence[PFCandidates],
    is_pileup: Sequence[NDArray[np.bool_]] | None = None,
    config: BaselineConfig = DEFAULT_CONFIG,
) -> list[BaselineJets]:
    """Run the baseline tagger on a batch of events (one FastJet call for the whole batch).

    Args:
        events: PF candidates per event (pt GeV, eta, phi rad, kind).
        is_pileup: per event, bool [n_candidates]: pileup flags for CHS (flagged tracks are dropped);
            None disables the subtraction.
        config: tagger parameters.

    Returns:
        One :class:`~jetssd.event.BaselineJets` per event (``BaselineJets.empty()`` when nothing is tagged).

    Raises:
        ImportError: FastJet (the ``datagen`` extra) is not installed.
    """
    return [tag_jets(jets, config) for jets in cluster_jets(events, is_pileup, config)]


def tag_event(
    pf: PFCandidates,
    is_pileup: NDArray[np.bool_] | None = None,
    config: BaselineConfig = DEFAULT_CONFIG,
) -> BaselineJets:
    """:func:`tag_events` for a single event. Batch events with :func:`tag_events` where speed matters."""
    return tag_events([pf], None if is_pileup is None else [is_pileup], config)[0]


__all__ = [
    "DEFAULT_CONFIG",
    "NSUB_AXES",
    "TAU_FLOOR",
    "BaselineConfig",
    "FatJets",
    "cluster_jets",
    "softdrop_mass",
    "tag_event",
    "tag_events",
    "tag_jets",
]
