"""A Delphes-CMS-Phase-II-like fast detector simulation in vectorised numpy: particles → e-flow candidates.

It copies the e-flow logic of Delphes' ``ParticlePropagator``, ``Efficiency``, ``MomentumSmearing`` and
``SimpleCalorimeter`` modules with the numbers of :mod:`jetssd.datagen.detector_card` (event-generation.md §4):

1. Neutrinos are dropped. Charged particles bend in the 3.8 T field: below pT ≈ 0.735 GeV they curl up before
   the calorimeter (they keep their track); above, they hit it at φ₀ − q·asin(0.735/pT).
2. Tracks: efficiency table, log-normal pT smearing, kept at the vertex direction (as Delphes' EFlowTrack).
3. ECAL (e, γ) and HCAL (other hadrons) towers sum the true energy of their particles, are smeared with
   LogNormal(E, σ(E)) and zeroed below threshold. The neutral excess E − Σ E_track over the tracks pointing at a
   tower becomes an EFlowPhoton / EFlowNeutralHadron when it is above EnergyMin and significant; it is placed
   uniformly inside its tower. ECAL towers are image pixels; HCAL towers are 5×5 pixels in the barrel.
   Untracked charged hadrons therefore show up as neutral hadrons, as in Delphes.

No Python loop runs over particles or towers: towers are found with ``np.unique`` and summed with ``bincount``.
The same particles and the same generator state always give the same output.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from jetssd import geometry
from jetssd.datagen.detector_card import PHASE2, DetectorCard
from jetssd.datagen.particles import Particles
from jetssd.event import KIND_NEUTRAL_HADRON, KIND_PHOTON, KIND_TRACK, PFCandidates

# Neutrals are placed this far (η units / rad) inside their tower's edges. Candidates are stored as float32,
# whose rounding (≤ 1.2e-7 at |η| ≈ 3 and φ ≈ π) could otherwise move a value drawn next to an edge into the
# neighbouring pixel, or φ to +π, which wraps to the other side of the image. 1e-6 is 6e-5 of a pixel.
_EDGE_MARGIN = 1e-6

SigmaFn = Callable[[NDArray[np.float64], NDArray[np.float64]], NDArray[np.float64]]


@dataclass(frozen=True, eq=False)
class FastSimResult:
    """Output of :func:`simulate`.

    Attributes:
        pf: e-flow candidates, tracks first (in particle order), then ECAL photons, then HCAL neutral hadrons
            (each in tower order).
        is_pileup: shape [len(pf)], True for tracks of pileup particles. Calorimeter neutrals are False: a tower
            mixes signal and pileup energy.
    """

    pf: PFCandidates
    is_pileup: NDArray[np.bool_]

    def __len__(self) -> int:
        return len(self.pf)


@dataclass(frozen=True, eq=False)
class _TowerGrid:
    """Calorimeter towers as groups of image pixels. Towers are arranged in η rows; a row spans whole pixels in η
    and splits φ into groups of ``phi_group`` pixels. Tower id = row·360 + φ group index.

    Attributes:
        row_of_ieta: shape [340], the row of each image η bin.
        eta_lo, eta_hi: shape [n_rows], η edges of each row.
        phi_group: shape [n_rows], φ pixels per tower in each row (a divisor of 360).
    """

    row_of_ieta: NDArray[np.int64]
    eta_lo: NDArray[np.float64]
    eta_hi: NDArray[np.float64]
    phi_group: NDArray[np.int64]

    def tower_id(self, ieta: NDArray[np.int64], iphi: NDArray[np.int64]) -> NDArray[np.int64]:
        """Tower of image pixels (ieta, iphi), all shape [n] and valid (≥ 0)."""
        row = self.row_of_ieta[ieta]
        return row * geometry.N_PHI + iphi // self.phi_group[row]

    def edges(self, tower: NDArray[np.int64]) -> tuple[NDArray[np.float64], ...]:
        """(η low, η high, φ low, φ high) of towers, each shape [n]; φ edges lie in [−π, π]."""
        row, j = np.divmod(tower, geometry.N_PHI)
        group = self.phi_group[row]
        return (self.eta_lo[row], self.eta_hi[row], geometry.PHI_EDGES[j * group],
                geometry.PHI_EDGES[(j + 1) * group])


@functools.lru_cache(maxsize=8)
def _tower_grid(barrel_eta_pixels: int, barrel_tower_pixels: tuple[int, int]) -> _TowerGrid:
    """Tower grid with coarse (η × φ pixels) towers over ``barrel_eta_pixels`` cells each side of η = 0 and one
    pixel per tower beyond. Coarse rows are counted outwards from η = 0 so that they are symmetric; the
    outermost may be narrower. ``barrel_eta_pixels = 0`` gives the ECAL grid (one tower per pixel)."""
    n_eta_px, n_phi_px = barrel_tower_pixels
    half = geometry.N_ETA // 2
    ieta = np.arange(geometry.N_ETA)
    upper = ieta >= half
    offset = np.where(upper, ieta - half, half - 1 - ieta)  # cells from η = 0 outwards
    barrel = offset < barrel_eta_pixels
    # A label that is equal for the cells of one row and differs between neighbouring rows.
    label = np.where(barrel, 10_000 + 1_000 * upper + offset // n_eta_px, ieta)
    new_row = np.ones(geometry.N_ETA, dtype=bool)
    new_row[1:] = label[1:] != label[:-1]
    starts = np.flatnonzero(new_row)
    ends = np.append(starts[1:], geometry.N_ETA)
    return _TowerGrid(
        row_of_ieta=np.cumsum(new_row) - 1,
        eta_lo=geometry.ETA_EDGES[starts],
        eta_hi=geometry.ETA_EDGES[ends],
        phi_group=np.where(barrel[starts], n_phi_px, 1).astype(np.int64),
    )


def _ecal_grid() -> _TowerGrid:
    return _tower_grid(0, (1, 1))


def _hcal_grid(card: DetectorCard) -> _TowerGrid:
    return _tower_grid(card.hcal_barrel_eta_pixels, card.hcal_barrel_tower_pixels)


def _lognormal(mean: NDArray[np.float64], sigma: NDArray[np.float64],
               normal: NDArray[np.float64]) -> NDArray[np.float64]:
    """Delphes' LogNormal(mean, σ): log-normal with that mean and standard deviation; 0 where mean ≤ 0.

    ``normal`` holds standard-normal draws, shape [n]; it is passed in so callers control the draw order.
    """
    pos = mean > 0
    safe_mean = np.where(pos, mean, 1.0)
    b2 = np.log1p((sigma / safe_mean) ** 2)
    return np.where(pos, np.exp(np.log(safe_mean) - 0.5 * b2 + np.sqrt(b2) * normal), 0.0)


@dataclass(frozen=True, eq=False)
class _Tracks:
    """Reconstructed tracks, shape [n_tracks] each.

    Attributes:
        index: index of the particle that made the track.
        pt: smeared pT, GeV.
        energy: energy with the smeared momentum and the particle's mass, GeV (what calorimeters subtract).
        rel_res: σ(pT)/pT used for the smearing.
    """

    index: NDArray[np.int64]
    pt: NDArray[np.float64]
    energy: NDArray[np.float64]
    rel_res: NDArray[np.float64]


def _reconstruct_tracks(charged: NDArray[np.bool_], pt: NDArray[np.float64], eta: NDArray[np.float64],
                        mass2: NDArray[np.float64], card: DetectorCard, rng: np.random.Generator) -> _Tracks:
    """Apply the tracking efficiency to charged particles and smear the pT of the survivors.

    Inputs are per particle, shape [n]; pt in GeV, mass2 = m² in GeV².
    """
    candidates = np.flatnonzero(charged)
    abs_eta = np.abs(eta[candidates])
    efficiency = card.track_efficiency(pt[candidates], abs_eta)
    kept = rng.random(len(candidates)) < efficiency  # one draw per charged particle, even hopeless ones
    index = candidates[kept]
    true_pt = pt[index]
    rel_res = card.track_relative_resolution(true_pt, abs_eta[kept])
    smeared = _lognormal(true_pt, rel_res * true_pt, rng.standard_normal(len(index)))
    p = smeared * np.cosh(eta[index])
    return _Tracks(index, smeared, np.sqrt(p * p + mass2[index]), rel_res)


def _impact_pixels(pt: NDArray[np.float64], eta: NDArray[np.float64], phi: NDArray[np.float64],
                   charge: NDArray[np.float64], deposits: NDArray[np.bool_],
                   card: DetectorCard) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Image pixel (ieta, iphi) where each particle reaches the calorimeter, −1 where it does not.

    Straight lines in η; a charge q bends by asin(q·0.735/pT) in φ on its way to R = 1.29 m (the chord of the
    helix turns by half the bending angle). Loopers (|q|·0.735 > pT) never get there. Only particles flagged in
    ``deposits`` are propagated (the others get −1). All shapes [n].
    """
    ieta = np.full(len(pt), -1, dtype=np.int64)
    iphi = np.full(len(pt), -1, dtype=np.int64)
    # Cheap cuts first, so that the trigonometry runs only on particles inside the calorimeter.
    s = np.zeros(len(pt))
    np.divide(charge * card.looper_pt, pt, out=s, where=(charge != 0) & (pt > 0))
    sel = np.flatnonzero(deposits & (np.abs(eta) < card.calo_eta_max) & (np.abs(s) <= 1.0) & (pt > 0))
    phi_calo = phi[sel] - np.arcsin(s[sel])
    ieta_sel, iphi_sel = geometry.eta_to_index(eta[sel]), geometry.phi_to_index(phi_calo)
    ok = (ieta_sel >= 0) & (iphi_sel >= 0)
    ieta[sel[ok]], iphi[sel[ok]] = ieta_sel[ok], iphi_sel[ok]
    return ieta, iphi


@dataclass(frozen=True, eq=False)
class _CaloOutput:
    """One calorimeter's e-flow output.

    Attributes:
        eta, phi, pt: neutral candidates (ET = E/cosh η in GeV), shape [n_neutral], in tower order.
        track_scale: shape [n_tracks_in], factor to apply to each input track's pT (1 where untouched).
    """

    eta: NDArray[np.float64]
    phi: NDArray[np.float64]
    pt: NDArray[np.float64]
    track_scale: NDArray[np.float64]


def _calorimeter(grid: _TowerGrid, hit_tower: NDArray[np.int64], hit_energy: NDArray[np.float64],
                 track_tower: NDArray[np.int64], track_energy: NDArray[np.float64],
                 track_sigma: NDArray[np.float64], sigma_fn: SigmaFn, energy_min: float, significance_min: float,
                 card: DetectorCard, rng: np.random.Generator) -> _CaloOutput:
    """Delphes ``SimpleCalorimeter`` e-flow on one calorimeter.

    Args:
        grid: the tower grid.
        hit_tower, hit_energy: particle deposits, shape [n_hits]: tower id and energy (fraction applied), GeV.
        track_tower, track_energy, track_sigma: tracks that point at this calorimeter, shape [n_tracks]: tower id
            (−1 when the track reaches no tower), energy (fraction applied) and its σ, GeV.
        sigma_fn: σ(E) [GeV] at tower-centre |η|.
        energy_min, significance_min: the tower's ``EnergyMin`` and ``EnergySignificanceMin``.
    """
    track_scale = np.ones(len(track_tower))
    has_tower = track_tower >= 0
    ids = np.concatenate([hit_tower, track_tower[has_tower]])
    if len(ids) == 0:
        empty = np.zeros(0)
        return _CaloOutput(empty, empty, empty, track_scale)
    towers, inverse = np.unique(ids, return_inverse=True)
    n_hits, n_towers = len(hit_tower), len(towers)
    true_e = _per_tower(inverse[:n_hits], hit_energy, n_towers)
    trk_e = _per_tower(inverse[n_hits:], track_energy[has_tower], n_towers)
    trk_var = _per_tower(inverse[n_hits:], track_sigma[has_tower] ** 2, n_towers)

    eta_lo, eta_hi, phi_lo, phi_hi = grid.edges(towers)
    abs_eta_center = np.abs(0.5 * (eta_lo + eta_hi))
    energy = _lognormal(true_e, sigma_fn(true_e, abs_eta_center), rng.standard_normal(n_towers))
    # Like Delphes, judge the smeared tower with the resolution at its measured energy.
    sigma = sigma_fn(energy, abs_eta_center)
    energy = np.where((energy < energy_min) | (energy < significance_min * sigma), 0.0, energy)

    excess = np.maximum(energy - trk_e, 0.0)
    total_sigma = np.sqrt(trk_var + sigma * sigma)
    significance = np.divide(excess, total_sigma, out=np.zeros(n_towers), where=total_sigma > 0)
    neutral = (excess > energy_min) & (significance > significance_min)

    if card.rescale_tracks:
        track_scale[has_tower] = _track_rescale(energy, sigma, trk_e, trk_var, neutral)[inverse[n_hits:]]

    eta, phi = _place_in_towers(eta_lo[neutral], eta_hi[neutral], phi_lo[neutral], phi_hi[neutral], card, rng)
    return _CaloOutput(eta, phi, excess[neutral] / np.cosh(eta), track_scale)


def _per_tower(tower_index: NDArray[np.int64], values: NDArray[np.float64], n_towers: int) -> NDArray[np.float64]:
    """Sum ``values`` (shape [n]) per tower index (0…n_towers−1), shape [n_towers]."""
    return np.bincount(tower_index, weights=values, minlength=n_towers).astype(np.float64, copy=False)


def _track_rescale(energy: NDArray[np.float64], sigma: NDArray[np.float64], trk_e: NDArray[np.float64],
                   trk_var: NDArray[np.float64], neutral: NDArray[np.bool_]) -> NDArray[np.float64]:
    """Per tower, shape [n_towers]: the factor Delphes applies to the tower's tracks when it found no significant
    neutral excess: best estimate (error-weighted mean of Σ E_track and E_calo) / Σ E_track; 1 elsewhere."""
    w_trk = np.divide(1.0, trk_var, out=np.zeros_like(trk_var), where=trk_var > 0)
    var_calo = sigma * sigma
    w_calo = np.divide(1.0, var_calo, out=np.zeros_like(var_calo), where=var_calo > 0)
    w_sum = w_trk + w_calo
    applies = ~neutral & (trk_e > 0) & (w_sum > 0)
    best = np.divide(w_trk * trk_e + w_calo * energy, w_sum, out=np.zeros_like(w_sum), where=applies)
    return np.divide(best, trk_e, out=np.ones_like(trk_e), where=applies)


def _place_in_towers(eta_lo: NDArray[np.float64], eta_hi: NDArray[np.float64], phi_lo: NDArray[np.float64],
                     phi_hi: NDArray[np.float64], card: DetectorCard,
                     rng: np.random.Generator) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """(η, φ) uniform inside each tower (``SmearTowerCenter``), or its centre; all shape [n], φ in [−π, π)."""
    if not card.smear_tower_center:
        return 0.5 * (eta_lo + eta_hi), 0.5 * (phi_lo + phi_hi)
    u = rng.random((2, len(eta_lo)))
    lo_e, hi_e = eta_lo + _EDGE_MARGIN, eta_hi - _EDGE_MARGIN
    lo_p, hi_p = phi_lo + _EDGE_MARGIN, phi_hi - _EDGE_MARGIN
    return lo_e + u[0] * (hi_e - lo_e), lo_p + u[1] * (hi_p - lo_p)


def _empty_result() -> FastSimResult:
    return FastSimResult(PFCandidates.empty(), np.zeros(0, dtype=np.bool_))


def simulate(particles: Particles, rng: np.random.Generator, card: DetectorCard = PHASE2,
             chs: bool = False) -> FastSimResult:
    """Run the fast detector simulation on the stable particles of one event (signal and pileup together).

    Args:
        particles: generator-level final-state particles, shape [n]; ``is_pileup`` marks overlaid min-bias.
        rng: source of all randomness (efficiency, smearing, tower placement), drawn in a fixed order.
        card: detector numbers.
        chs: drop tracks of pileup particles from the output (Delphes' TrackPileUpSubtractor, which is essentially
            perfect at Phase-II vertex resolution). They still count in the calorimeter subtraction, as they do
            in Delphes, where the subtraction runs after the calorimeters. Off by default, as in the reference.

    Returns:
        e-flow candidates (kind 0 track at the vertex direction with smeared pT; kind 1 ECAL photon and kind 2
        HCAL neutral hadron with ET at a random point of their tower) and the per-candidate pileup flag.
    """
    if len(particles) == 0:
        return _empty_result()
    abs_pid = np.abs(particles.pid)
    visible = ~card.is_invisible(abs_pid)
    pt2 = particles.px**2 + particles.py**2
    pt = np.sqrt(pt2)
    eta = np.arcsinh(particles.pz / np.maximum(pt, 1e-12))  # as Particles.eta: finite along the beam
    phi = np.arctan2(particles.py, particles.px)
    mass2 = np.maximum(particles.e**2 - (pt2 + particles.pz**2), 0.0)
    charge = particles.charge.astype(np.float64)

    tracks = _reconstruct_tracks(visible & (charge != 0), pt, eta, mass2, card, rng)
    f_ecal, f_hcal = card.energy_fractions(abs_pid)
    ieta, iphi = _impact_pixels(pt, eta, phi, charge, (f_ecal > 0) | (f_hcal > 0), card)

    calo = []
    for grid, fraction, sigma_fn, e_min, sig_min in (
        (_ecal_grid(), f_ecal, card.ecal_sigma, card.ecal_energy_min, card.ecal_significance_min),
        (_hcal_grid(card), f_hcal, card.hcal_sigma, card.hcal_energy_min, card.hcal_significance_min),
    ):  # two calorimeters, not a loop over particles
        calo.append(_run_calorimeter(grid, fraction, sigma_fn, e_min, sig_min, particles.e, ieta, iphi, tracks,
                                     card, rng))
    ecal, hcal = calo

    # A track is rescaled by the calorimeter that measures its particle (ECAL for e, HCAL for hadrons); the
    # other one leaves it at 1, so the product is the one factor Delphes applies.
    track_pt = tracks.pt * ecal.track_scale * hcal.track_scale
    track_pu = particles.is_pileup[tracks.index]
    keep = ~track_pu if chs else np.ones(len(track_pt), dtype=bool)
    tidx = tracks.index[keep]

    n_trk, n_ecal, n_hcal = len(tidx), len(ecal.pt), len(hcal.pt)
    kind = np.repeat(np.array([KIND_TRACK, KIND_PHOTON, KIND_NEUTRAL_HADRON], dtype=np.int8),
                     [n_trk, n_ecal, n_hcal])
    pf = PFCandidates(
        pt=np.concatenate([track_pt[keep], ecal.pt, hcal.pt]).astype(np.float32),
        eta=np.concatenate([eta[tidx], ecal.eta, hcal.eta]).astype(np.float32),
        phi=np.concatenate([phi[tidx], ecal.phi, hcal.phi]).astype(np.float32),
        kind=kind,
    )
    is_pileup = np.concatenate([track_pu[keep], np.zeros(n_ecal + n_hcal, dtype=np.bool_)])
    return FastSimResult(pf, is_pileup)


def _run_calorimeter(grid: _TowerGrid, fraction: NDArray[np.float64], sigma_fn: SigmaFn, energy_min: float,
                     significance_min: float, energy: NDArray[np.float64], ieta: NDArray[np.int64],
                     iphi: NDArray[np.int64], tracks: _Tracks, card: DetectorCard,
                     rng: np.random.Generator) -> _CaloOutput:
    """Collect one calorimeter's deposits and tracks (per-particle inputs shape [n]) and run its e-flow.

    A track takes part where its particle's energy fraction in this calorimeter is non-zero, with energy
    fraction·E_track and σ = (σ(pT)/pT)·that energy, in the tower its particle hits.
    """
    hits = np.flatnonzero((fraction > 0) & (ieta >= 0))
    hit_tower = grid.tower_id(ieta[hits], iphi[hits])
    t = tracks.index
    t_frac = fraction[t]
    t_tower = np.full(len(t), -1, dtype=np.int64)
    t_in = (t_frac > 0) & (ieta[t] >= 0)
    t_tower[t_in] = grid.tower_id(ieta[t][t_in], iphi[t][t_in])
    t_energy = tracks.energy * t_frac
    return _calorimeter(grid, hit_tower, energy[hits] * fraction[hits], t_tower, t_energy,
                        tracks.rel_res * t_energy, sigma_fn, energy_min, significance_min, card, rng)


def _synthetic_event(n: int, rng: np.random.Generator, pileup_fraction: float = 0.0) -> Particles:
    """A crude stand-in for a generated event, for the benchmark below: n particles with a falling pT spectrum,
    flat in |η| < 5, a realistic mix of π±/γ/K_L/n/e/μ/ν."""
    pid_choices = np.array([211, -211, 22, 130, 2112, 11, -11, 13, 12], dtype=np.int32)
    weights = np.array([0.3, 0.3, 0.25, 0.05, 0.04, 0.02, 0.02, 0.01, 0.01])
    pid = rng.choice(pid_choices, size=n, p=weights)
    charge = np.select([np.isin(pid, [211, -11]), np.isin(pid, [-211, 11, 13])], [1, -1], 0).astype(np.int8)
    pt = 0.1 + rng.exponential(1.5, n)
    eta = rng.uniform(-5, 5, n)
    phi = rng.uniform(-np.pi, np.pi, n)
    px, py, pz = pt * np.cos(phi), pt * np.sin(phi), pt * np.sinh(eta)
    mass = np.where(np.abs(pid) == 211, 0.1396, 0.0)
    e = np.sqrt(px**2 + py**2 + pz**2 + mass**2)
    return Particles(px, py, pz, e, pid, charge, rng.random(n) < pileup_fraction)


if __name__ == "__main__":  # tiny benchmark: python -m jetssd.datagen.fastsim
    import time

    bench_rng = np.random.default_rng(1)
    for label, n_particles, pu in (("no PU (~600 particles)", 600, 0.0), ("PU 50 (~10k particles)", 10_000, 0.95)):
        events = [_synthetic_event(n_particles, bench_rng, pu) for _ in range(200)]
        simulate(events[0], bench_rng)  # warm the tower-grid cache
        start = time.perf_counter()
        n_out = sum(len(simulate(ev, bench_rng)) for ev in events)
        elapsed = (time.perf_counter() - start) / len(events)
        print(f"{label}: {1e3 * elapsed:.2f} ms/event, {n_out / len(events):.0f} candidates/event")
