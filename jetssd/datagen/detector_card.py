"""Numbers of the Delphes CMS Phase-II v02 card (the card family of the reference data), for :mod:`fastsim`.

Every detector number the fast simulation uses lives in :class:`DetectorCard`; :data:`PHASE2` is the default.
Sources: ``cards/CMS_PhaseII/CMS_PhaseII_200PU_v02.tcl`` of Delphes (M. Selvaggi, 2017) as summarised in
``pfjet-ssd-reference.md`` §9 and ``event-generation.md`` §4. Where we deviate from the card (HCAL barrel/endcap
boundary, calorimeter acceptance cut at the image edge) the field's comment says so.

The card also evaluates its own parametrisations (efficiency, resolutions, energy fractions), vectorised over
particles, so that tests can compare the simulation with the very numbers it was configured with.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from jetssd import geometry

SPEED_OF_LIGHT_GEV = 0.299792458
"""pT [GeV] = 0.2998 · B [T] · r [m] for a unit charge on a helix of radius r."""

# Charged-hadron tracking efficiency (card ``ChargedHadronTrackingEfficiency``), one row per |η| range:
# (upper |η| edge, inclusive; slope a of the ramp ε = a·pT for 0.2 < pT ≤ 1 GeV; plateau ε for pT > 1 GeV).
# ε = 0 for pT ≤ 0.2 GeV and beyond the last edge (|η| > 4).
_TRACKING_EFFICIENCY: tuple[tuple[float, float, float], ...] = (
    (1.2, 0.96, 0.97),
    (2.5, 0.85, 0.87),
    (4.0, 0.80, 0.82),
)

# Relative track pT resolution σ(pT)/pT of the card's ``ChargedHadronMomentumSmearing``: the formula
# "automatically generated for tracker layout OT612IT4025" (2017-06-30) that the v02 card embeds.
# The card gives, per |η| bin of 0.2 from 0 to 4, a constant below 1 GeV, straight lines 1→10 GeV and 10→100 GeV,
# and σ/pT ∝ pT above 100 GeV. We store the three knot values σ/pT at pT = 1, 10, 100 GeV per bin; the card's
# slopes are these knots' differences rounded to 1e-6, so the two agree to < 1e-5 absolute (< 0.5 % relative).
# Rows: |η| ∈ [0.2·k, 0.2·(k+1)), k = 0…19.
_TRACK_RESOLUTION_OT612IT4025: tuple[tuple[float, float, float], ...] = (
    # σ/pT at 1 GeV, 10 GeV, 100 GeV
    (0.004579, 0.004983, 0.009244),  # 0.0–0.2
    (0.005050, 0.005343, 0.009172),  # 0.2–0.4
    (0.005106, 0.005317, 0.009077),  # 0.4–0.6
    (0.005780, 0.005779, 0.009177),  # 0.6–0.8
    (0.007287, 0.007011, 0.010429),  # 0.8–1.0
    (0.010451, 0.009989, 0.013867),  # 1.0–1.2
    (0.014772, 0.013616, 0.016800),  # 1.2–1.4
    (0.017315, 0.015439, 0.018161),  # 1.4–1.6
    (0.019420, 0.015669, 0.018039),  # 1.6–1.8
    (0.022014, 0.016012, 0.020098),  # 1.8–2.0
    (0.025743, 0.015681, 0.020289),  # 2.0–2.2
    (0.028858, 0.016753, 0.021524),  # 2.2–2.4
    (0.032048, 0.021138, 0.024477),  # 2.4–2.6
    (0.039504, 0.027026, 0.030392),  # 2.6–2.8
    (0.040848, 0.024824, 0.027445),  # 2.8–3.0
    (0.045324, 0.022851, 0.025053),  # 3.0–3.2
    (0.064189, 0.027691, 0.030710),  # 3.2–3.4
    (0.076825, 0.036234, 0.040629),  # 3.4–3.6
    (0.097964, 0.046145, 0.052345),  # 3.6–3.8
    (0.134159, 0.059612, 0.069617),  # 3.8–4.0
)

# Calorimeter energy resolution σ(E) = √((a·E)² + b²·E + c²) [GeV], one row per |η| range:
# (upper |η| edge, inclusive; a; b; c). Evaluated at the tower centre, as Delphes does.
_ECAL_RESOLUTION: tuple[tuple[float, float, float, float], ...] = (
    (1.5, 0.009, 0.12, 0.45),
    (1.75, 0.006, 0.20, 0.0),
    (2.15, 0.007, 0.21, 0.0),
    (3.0, 0.008, 0.24, 0.0),
)
_HCAL_RESOLUTION: tuple[tuple[float, float, float, float], ...] = ((3.0, 0.05, 1.0, 0.0),)


@dataclass(frozen=True)
class DetectorCard:
    """Detector parameters of the fast simulation. Frozen and hashable; vary it with ``dataclasses.replace``.

    Units: GeV, metres, tesla; η is pseudorapidity; tables are documented next to their module constants.
    """

    # --- magnetic field and propagation -------------------------------------------------------------------
    b_field_t: float = 3.8
    """Solenoid field, T."""
    calo_radius_m: float = 1.29
    """Radius of the calorimeter front face (Delphes ``ParticlePropagator`` Radius), m."""

    # --- tracker -----------------------------------------------------------------------------------------
    tracker_eta_max: float = 4.0
    """Tracker acceptance |η| (the efficiency table's last edge)."""
    track_pt_min: float = 0.2
    """Tracks need a true pT above this, GeV (efficiency 0 at or below)."""
    track_pt_plateau: float = 1.0
    """Efficiency ramps as slope·pT up to this pT, then sits on the plateau, GeV."""
    tracking_efficiency: tuple[tuple[float, float, float], ...] = _TRACKING_EFFICIENCY
    """Rows (|η| upper edge, ramp slope per GeV, plateau); see :data:`_TRACKING_EFFICIENCY`."""
    track_resolution_eta_step: float = 0.2
    """|η| bin width of :attr:`track_resolution`."""
    track_resolution_pt_knots: tuple[float, float, float] = (1.0, 10.0, 100.0)
    """pT [GeV] of the three columns of :attr:`track_resolution`."""
    track_resolution: tuple[tuple[float, float, float], ...] = _TRACK_RESOLUTION_OT612IT4025
    """σ(pT)/pT at the pT knots, one row per |η| bin; see :data:`_TRACK_RESOLUTION_OT612IT4025`."""

    # --- calorimeters ------------------------------------------------------------------------------------
    calo_eta_max: float = geometry.ETA_MAX
    """Calorimeter acceptance |η| < 2.958. Deviation: the card continues into HF (3 < |η| < 5), which has no
    image pixel, so deposits beyond the image edge are simply dropped."""
    ecal_resolution: tuple[tuple[float, float, float, float], ...] = _ECAL_RESOLUTION
    ecal_energy_min: float = 0.5
    """ECAL ``EnergyMin``, GeV."""
    ecal_significance_min: float = 1.0
    """ECAL ``EnergySignificanceMin``."""
    hcal_resolution: tuple[tuple[float, float, float, float], ...] = _HCAL_RESOLUTION
    hcal_energy_min: float = 1.0
    """HCAL ``EnergyMin``, GeV."""
    hcal_significance_min: float = 1.0
    """HCAL ``EnergySignificanceMin``."""
    hcal_barrel_eta_max: float = 1.4964
    """HCAL barrel towers for |η| < 1.4964 = 86 ECAL cells; beyond, the HGCAL-like endcap uses the ECAL grid.
    Deviation: the card's barrel runs to 1.566 (+1.65) and overlaps the endcap from 1.5; we use one hard
    boundary, so the outermost barrel tower row (1.479–1.4964) is one pixel wide."""
    hcal_barrel_tower_pixels: tuple[int, int] = (5, 5)
    """Barrel HCAL tower size in image pixels (η, φ): 0.087 = 5 × 0.0174 and 5° = 5 × 1°."""
    smear_tower_center: bool = True
    """Place e-flow neutrals uniformly inside their tower (card ``SmearTowerCenter``), else at its centre."""
    rescale_tracks: bool = True
    """Delphes ``SimpleCalorimeter``: in a tower without a significant neutral excess, rescale the tracks so that
    their energy is the error-weighted mean of track and calorimeter measurement."""

    # --- which particle deposits where (card ``EnergyFraction``; |PDG id|) ---------------------------------
    ecal_pids: tuple[int, ...] = (11, 22, 111)
    """e, γ, π0: all energy in ECAL."""
    split_pids: tuple[int, ...] = (310, 3122)
    """K0S, Λ: split between ECAL and HCAL (only matters if Pythia leaves them undecayed)."""
    split_ecal_fraction: float = 0.3
    invisible_pids: tuple[int, ...] = (12, 14, 16, 1000022, 1000023, 1000025, 1000035, 1000045)
    """Neutrinos and neutralinos: seen by nothing."""
    calo_blind_pids: tuple[int, ...] = (13,)
    """Muons: tracks only, no calorimeter deposit."""

    def __post_init__(self) -> None:
        for name in ("tracking_efficiency", "ecal_resolution", "hcal_resolution"):
            edges = [row[0] for row in getattr(self, name)]
            if not edges or any(b <= a for a, b in itertools.pairwise(edges)):
                raise ValueError(f"{name}: |η| edges must be non-empty and increasing, got {edges}")
        if any(len(row) != 3 for row in self.track_resolution):
            raise ValueError("track_resolution: rows must hold σ/pT at the three pT knots")
        n_eta_px, n_phi_px = self.hcal_barrel_tower_pixels
        if n_eta_px < 1 or n_phi_px < 1 or geometry.N_PHI % n_phi_px:
            raise ValueError(f"hcal_barrel_tower_pixels {self.hcal_barrel_tower_pixels}: need ≥ 1 and φ | 360")
        if not 0.0 <= self.hcal_barrel_eta_max <= self.calo_eta_max:
            raise ValueError("hcal_barrel_eta_max must lie in [0, calo_eta_max]")

    # --- derived numbers ---------------------------------------------------------------------------------
    @property
    def looper_pt(self) -> float:
        """pT [GeV] below which a unit charge curls up inside the calorimeter radius: 0.3·B·R/2 ≈ 0.735 GeV."""
        return SPEED_OF_LIGHT_GEV * self.b_field_t * self.calo_radius_m / 2.0

    @property
    def hcal_barrel_eta_pixels(self) -> int:
        """Number of image η cells on each side of η = 0 that belong to the HCAL barrel (86 by default)."""
        return round(self.hcal_barrel_eta_max / geometry.ETA_STEP)

    # --- parametrisations, vectorised over particles ------------------------------------------------------
    def track_efficiency(self, pt: NDArray[np.float64], abs_eta: NDArray[np.float64]) -> NDArray[np.float64]:
        """Tracking efficiency in [0, 1] for true pT [GeV] and |η|, all shape [n]."""
        table = np.asarray(self.tracking_efficiency, dtype=np.float64)
        row = np.searchsorted(table[:, 0], abs_eta, side="left")  # edges are inclusive: |η| ≤ edge
        inside = (row < len(table)) & (abs_eta <= self.tracker_eta_max)
        row = np.minimum(row, len(table) - 1)
        eff = np.where(pt > self.track_pt_plateau, table[row, 2], table[row, 1] * pt)
        return np.where(inside & (pt > self.track_pt_min), eff, 0.0)

    def track_relative_resolution(self, pt: NDArray[np.float64],
                                  abs_eta: NDArray[np.float64]) -> NDArray[np.float64]:
        """σ(pT)/pT for true pT [GeV] and |η|, shape [n]: flat below the first knot, linear between knots,
        ∝ pT above the last; |η| beyond the table uses its last row."""
        table = np.asarray(self.track_resolution, dtype=np.float64)
        row = np.clip((abs_eta / self.track_resolution_eta_step).astype(np.int64), 0, len(table) - 1)
        k1, k10, k100 = self.track_resolution_pt_knots
        s1, s10, s100 = table[row, 0], table[row, 1], table[row, 2]
        low = s1 + (pt - k1) * (s10 - s1) / (k10 - k1)
        mid = s10 + (pt - k10) * (s100 - s10) / (k100 - k10)
        return np.where(pt < k1, s1, np.where(pt < k10, low, np.where(pt < k100, mid, s100 * pt / k100)))

    def ecal_sigma(self, energy: NDArray[np.float64], abs_eta: NDArray[np.float64]) -> NDArray[np.float64]:
        """ECAL σ(E) [GeV] for energy [GeV] at tower-centre |η|, shape [n]."""
        return _calo_sigma(self.ecal_resolution, energy, abs_eta)

    def hcal_sigma(self, energy: NDArray[np.float64], abs_eta: NDArray[np.float64]) -> NDArray[np.float64]:
        """HCAL σ(E) [GeV] for energy [GeV] at tower-centre |η|, shape [n]."""
        return _calo_sigma(self.hcal_resolution, energy, abs_eta)

    def is_invisible(self, abs_pid: NDArray[np.integer]) -> NDArray[np.bool_]:
        """True for particles no detector sees (neutrinos, neutralinos), from |PDG id|, shape [n]."""
        return _member(abs_pid, self.invisible_pids)

    def energy_fractions(self, abs_pid: NDArray[np.integer]) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """(ECAL fraction, HCAL fraction) of each particle's energy, from |PDG id|, both shape [n].

        e/γ/π0 → (1, 0); K0S/Λ → (0.3, 0.7); muons and invisibles → (0, 0); every other hadron → (0, 1).
        """
        ecal = _member(abs_pid, self.ecal_pids)
        split = _member(abs_pid, self.split_pids)
        none = _member(abs_pid, self.invisible_pids + self.calo_blind_pids)
        f_ecal = np.where(ecal, 1.0, np.where(split, self.split_ecal_fraction, 0.0))
        f_hcal = np.where(ecal | none, 0.0, np.where(split, 1.0 - self.split_ecal_fraction, 1.0))
        return f_ecal, f_hcal


def _member(values: NDArray[np.integer], choices: tuple[int, ...]) -> NDArray[np.bool_]:
    """``np.isin`` for a handful of choices: one comparison per choice is several times faster here."""
    out = np.zeros(values.shape, dtype=np.bool_)
    for choice in choices:  # loops over the few PDG ids of a card entry, not over particles
        out |= values == choice
    return out


def _calo_sigma(table_rows: tuple[tuple[float, float, float, float], ...], energy: NDArray[np.float64],
                abs_eta: NDArray[np.float64]) -> NDArray[np.float64]:
    """√((a·E)² + b²·E + c²) with (a, b, c) from the first row whose |η| edge is ≥ |η| (last row beyond)."""
    table = np.asarray(table_rows, dtype=np.float64)
    row = np.minimum(np.searchsorted(table[:, 0], abs_eta, side="left"), len(table) - 1)
    a, b, c = table[row, 1], table[row, 2], table[row, 3]
    e = np.maximum(energy, 0.0)
    return np.sqrt((a * e) ** 2 + b * b * e + c * c)


PHASE2 = DetectorCard()
"""The default card: CMS Phase-II v02 numbers (PU tracks kept, as in the reference data)."""
