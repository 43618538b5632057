"""Fast detector simulation: acceptance, tracking, calorimeter e-flow, pileup flags, determinism.

Synthetic particles only (no Pythia). Statistical checks use fixed seeds and ≥ 4σ tolerances.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from numpy.typing import NDArray

from jetssd import geometry
from jetssd.datagen.detector_card import PHASE2, DetectorCard
from jetssd.datagen.fastsim import FastSimResult, simulate
from jetssd.datagen.particles import Particles
from jetssd.event import KIND_NEUTRAL_HADRON, KIND_PHOTON, KIND_TRACK

MASS = {22: 0.0, 11: 0.000511, 13: 0.10566, 211: 0.13957, 130: 0.49761, 12: 0.0}
CHARGE = {22: 0, 11: -1, -11: 1, 13: -1, -13: 1, 211: 1, -211: -1, 130: 0, 12: 0}

# A φ well inside a pixel (pixel 237 spans 57°…58°) and a barrel η inside pixel 187 (0.2958…0.3132).
PHI0 = math.radians(57.5)


def make_particles(pid: int | NDArray[np.int64], pt: float | NDArray[np.float64], eta: float | NDArray[np.float64],
                   phi: float | NDArray[np.float64] = PHI0, pileup: bool | NDArray[np.bool_] = False,
                   n: int | None = None) -> Particles:
    """Particles from (pid, pT [GeV], η, φ), broadcast to a common length (``n`` for all-scalar input)."""
    pid_a, pt_a, eta_a, phi_a, pu_a = np.broadcast_arrays(
        np.asarray(pid), np.asarray(pt, float), np.asarray(eta, float), np.asarray(phi, float),
        np.asarray(pileup, bool))
    if n is not None and pid_a.ndim == 0:
        pid_a, pt_a, eta_a, phi_a, pu_a = (np.full(n, a) for a in (pid_a, pt_a, eta_a, phi_a, pu_a))
    pid_a, pt_a, eta_a, phi_a, pu_a = (np.atleast_1d(a) for a in (pid_a, pt_a, eta_a, phi_a, pu_a))
    mass = np.array([MASS[abs(int(p))] for p in pid_a])
    charge = np.array([CHARGE.get(int(p), -CHARGE.get(-int(p), 0)) for p in pid_a], np.int8)
    px, py, pz = pt_a * np.cos(phi_a), pt_a * np.sin(phi_a), pt_a * np.sinh(eta_a)
    e = np.sqrt(px**2 + py**2 + pz**2 + mass**2)
    return Particles(px, py, pz, e, pid_a.astype(np.int32), charge, pu_a.astype(bool))


def run(particles: Particles, seed: int = 0, card: DetectorCard = PHASE2, chs: bool = False) -> FastSimResult:
    return simulate(particles, np.random.default_rng(seed), card, chs=chs)


def energy(res: FastSimResult, mask: NDArray[np.bool_]) -> NDArray[np.float64]:
    return res.pf.pt[mask].astype(np.float64) * np.cosh(res.pf.eta[mask].astype(np.float64))


NO_TRACKING = dataclasses.replace(PHASE2, tracking_efficiency=((4.0, 0.0, 0.0),))


# --- card -------------------------------------------------------------------------------------------------------

def test_card_numbers() -> None:
    assert PHASE2.looper_pt == pytest.approx(0.735, abs=1e-3)
    assert PHASE2.hcal_barrel_eta_pixels == 86
    res = PHASE2.track_relative_resolution(np.array([0.5, 100.0, 0.5, 100.0, 200.0]),
                                           np.array([0.1, 0.1, 2.9, 2.9, 0.1]))
    np.testing.assert_allclose(res, [0.00458, 0.00924, 0.0408, 0.0274, 2 * 0.00924], rtol=0.01)
    eff = PHASE2.track_efficiency(np.array([0.1, 0.5, 5.0, 5.0, 5.0, 5.0, 5.0]),
                                  np.array([0.0, 0.0, 1.2, 1.21, 2.7, 4.0, 4.01]))
    np.testing.assert_allclose(eff, [0.0, 0.48, 0.97, 0.87, 0.82, 0.82, 0.0])
    e = np.array([100.0])
    assert PHASE2.hcal_sigma(e, np.array([0.5]))[0] == pytest.approx(math.sqrt(25 + 100))
    assert PHASE2.ecal_sigma(e, np.array([0.5]))[0] == pytest.approx(math.sqrt(0.81 + 1.44 + 0.2025))


def test_card_rejects_bad_tables() -> None:
    with pytest.raises(ValueError, match="increasing"):
        DetectorCard(tracking_efficiency=((2.5, 0.9, 0.9), (1.2, 0.9, 0.9)))
    with pytest.raises(ValueError, match="hcal_barrel_tower_pixels"):
        DetectorCard(hcal_barrel_tower_pixels=(5, 7))


# --- basics -----------------------------------------------------------------------------------------------------

def test_empty_input_gives_empty_output() -> None:
    res = run(Particles.empty())
    assert len(res) == 0
    assert len(res.is_pileup) == 0
    assert res.pf.pt.dtype == np.float32
    assert res.pf.kind.dtype == np.int8


def test_deterministic_for_same_seed() -> None:
    rng = np.random.default_rng(5)
    n = 3000
    parts = make_particles(rng.choice([211, -211, 22, 130, 11, 13], n), rng.exponential(3.0, n),
                           rng.uniform(-4, 4, n), rng.uniform(-np.pi, np.pi, n), rng.random(n) < 0.5)
    a, b, c = run(parts, seed=7), run(parts, seed=7), run(parts, seed=8)
    for name in ("pt", "eta", "phi", "kind"):
        np.testing.assert_array_equal(getattr(a.pf, name), getattr(b.pf, name))
    np.testing.assert_array_equal(a.is_pileup, b.is_pileup)
    assert len(a) != len(c) or not np.array_equal(a.pf.pt, c.pf.pt)


def test_output_types_and_ranges() -> None:
    rng = np.random.default_rng(6)
    n = 5000
    parts = make_particles(rng.choice([211, -211, 22, 130, 11], n), rng.exponential(3.0, n),
                           rng.uniform(-5, 5, n), rng.uniform(-np.pi, np.pi, n))
    res = run(parts)
    assert len(res.is_pileup) == len(res)
    assert np.all(res.pf.pt >= 0)
    assert np.all(np.isfinite(res.pf.pt))
    calo = res.pf.kind != KIND_TRACK
    # Calorimeter candidates always have a pixel; tracks go out to the tracker edge.
    assert np.all(geometry.eta_to_index(res.pf.eta[calo]) >= 0)
    assert np.all(np.abs(res.pf.eta[~calo]) <= 4.0)
    assert np.all((res.pf.phi[calo] >= -np.pi) & (res.pf.phi[calo] < np.pi))
    # Kinds come in blocks: tracks, then photons, then neutral hadrons.
    assert np.all(np.diff(res.pf.kind) >= 0)


def test_neutrinos_are_ignored() -> None:
    photon = make_particles(22, 100.0, 0.3)
    nus = make_particles(np.array([12, 12, 12]), np.array([50.0, 5.0, 500.0]), np.array([0.3, -1.0, 2.0]))
    assert len(run(nus)) == 0
    alone, with_nus = run(photon, seed=3), run(Particles.concatenate([photon, nus]), seed=3)
    np.testing.assert_array_equal(alone.pf.pt, with_nus.pf.pt)
    np.testing.assert_array_equal(alone.pf.eta, with_nus.pf.eta)


# --- ECAL -------------------------------------------------------------------------------------------------------

def test_photon_lands_in_its_pixel_with_ecal_resolution() -> None:
    res = run(make_particles(22, 100.0 / math.cosh(0.3), 0.3))
    assert len(res) == 1
    assert res.pf.kind[0] == KIND_PHOTON
    assert not res.is_pileup[0]
    assert geometry.eta_to_index(res.pf.eta)[0] == geometry.eta_to_index(0.3)
    assert geometry.phi_to_index(res.pf.phi)[0] == geometry.phi_to_index(PHI0)
    sigma = PHASE2.ecal_sigma(np.array([100.0]), np.array([0.3]))[0]  # ≈ 1.57 GeV
    assert abs(energy(res, np.ones(1, bool))[0] - 100.0) < 5 * sigma


def test_photon_energy_scale_and_resolution() -> None:
    # 300 photons, one per φ pixel, at η = 0.3: every one is alone in its ECAL tower.
    phi = geometry.index_to_phi(np.arange(0, 360, 1.2).astype(int))
    res = run(make_particles(22, 50.0 / math.cosh(0.3), 0.3, phi))
    assert np.all(res.pf.kind == KIND_PHOTON)
    assert len(res) == len(phi)
    e = energy(res, np.ones(len(res), bool))
    sigma = PHASE2.ecal_sigma(np.array([50.0]), np.array([0.3]))[0]
    assert abs(e.mean() - 50.0) < 4 * sigma / math.sqrt(len(e))
    assert e.std() == pytest.approx(sigma, rel=0.2)


def test_electron_is_a_track_and_its_ecal_energy_is_subtracted() -> None:
    n_photon = 0
    for seed in range(200):
        res = run(make_particles(11, 50.0, 0.3), seed=seed)
        tracks = res.pf.kind == KIND_TRACK
        assert np.sum(res.pf.kind == KIND_NEUTRAL_HADRON) == 0  # electrons never reach the HCAL
        if tracks.sum() == 1:
            n_photon += int(np.sum(res.pf.kind == KIND_PHOTON))
            assert res.pf.pt[tracks][0] == pytest.approx(50.0, rel=0.05)
    # Tracked electrons leave a photon only on an upward ECAL fluctuation of > 1σ: well below half the time.
    assert n_photon < 0.35 * 200


# --- tracking ---------------------------------------------------------------------------------------------------

def test_soft_pion_is_a_track_without_calorimeter_deposit() -> None:
    # 0.5 GeV < 0.735 GeV: loopers never reach the calorimeter, whatever the η.
    rng = np.random.default_rng(1)
    n = 2000
    res = run(make_particles(rng.choice([211, -211], n), 0.5, rng.uniform(-2.5, 2.5, n), rng.uniform(-3, 3, n)))
    assert np.all(res.pf.kind == KIND_TRACK)
    assert 0.3 * n < len(res) < 0.6 * n  # efficiency 0.96·0.5 or 0.85·0.5
    np.testing.assert_allclose(res.pf.pt, 0.5, rtol=0.2)


@pytest.mark.parametrize(("eta_lo", "eta_hi", "expected"), [(0.1, 1.1, 0.97), (2.6, 3.9, 0.82), (1.3, 2.4, 0.87)])
def test_tracking_efficiency_matches_table(eta_lo: float, eta_hi: float, expected: float) -> None:
    n = 20_000
    rng = np.random.default_rng(2)
    eta = rng.uniform(eta_lo, eta_hi, n) * rng.choice([-1, 1], n)
    res = run(make_particles(rng.choice([211, -211], n), 5.0, eta, rng.uniform(-3, 3, n)), seed=11)
    n_tracks = int(np.sum(res.pf.kind == KIND_TRACK))
    binomial = math.sqrt(expected * (1 - expected) / n)
    assert abs(n_tracks / n - expected) < 4 * binomial


def test_no_tracks_beyond_tracker() -> None:
    res = run(make_particles(211, 10.0, 4.2, n=500))
    assert len(res) == 0  # no track, and |η| > 2.958 has no calorimeter either


@pytest.mark.parametrize("eta", [0.1, 2.7])
def test_track_pt_smearing_width_matches_table(eta: float) -> None:
    # Muons: tracks only, so no calorimeter rescaling touches their pT.
    n = 20_000
    rng = np.random.default_rng(3)
    res = run(make_particles(rng.choice([13, -13], n), 50.0, eta, rng.uniform(-3, 3, n)), seed=4)
    pt = res.pf.pt[res.pf.kind == KIND_TRACK].astype(np.float64)
    expected = PHASE2.track_relative_resolution(np.array([50.0]), np.array([eta]))[0]
    assert expected == pytest.approx(0.00688 if eta < 1 else 0.0286, rel=0.02)  # the OT612IT4025 table
    rel = pt / 50.0 - 1.0
    assert abs(rel.mean()) < 4 * expected / math.sqrt(len(rel))  # log-normal keeps the mean
    assert rel.std() == pytest.approx(expected, rel=0.04)  # ≈ 10σ of the std's sampling error


def test_tracks_keep_the_vertex_direction() -> None:
    res = run(make_particles(211, 2.0, 0.3, n=1))
    tracks = res.pf.kind == KIND_TRACK
    assert tracks.sum() == 1
    assert res.pf.eta[tracks][0] == pytest.approx(0.3, abs=1e-6)
    assert res.pf.phi[tracks][0] == pytest.approx(PHI0, abs=1e-6)


# --- HCAL and e-flow --------------------------------------------------------------------------------------------

def test_barrel_neutral_hadron_lands_inside_its_5x5_tower() -> None:
    eta0, phi0 = 0.5, 1.0
    ie, ip = geometry.eta_to_index(eta0), geometry.phi_to_index(phi0)  # 198, 237
    # Barrel towers are 5 pixels wide counted from η = 0 (pixel 170) and 5° from φ = −π (pixel 0).
    tower_ie = range(170 + 5 * ((ie - 170) // 5), 170 + 5 * ((ie - 170) // 5) + 5)
    tower_ip = range(5 * (ip // 5), 5 * (ip // 5) + 5)
    sigma = PHASE2.hcal_sigma(np.array([50.0]), np.array([0.5]))[0]
    seen = set()
    for seed in range(400):
        res = run(make_particles(130, 50.0 / math.cosh(eta0), eta0, phi0), seed=seed)
        assert len(res) == 1
        assert res.pf.kind[0] == KIND_NEUTRAL_HADRON
        pix = (int(geometry.eta_to_index(res.pf.eta)[0]), int(geometry.phi_to_index(res.pf.phi)[0]))
        assert pix[0] in tower_ie
        assert pix[1] in tower_ip
        assert abs(energy(res, np.ones(1, bool))[0] - 50.0) < 5 * sigma
        seen.add(pix)
    assert len(seen) == 25  # uniform over the whole tower (P(a pixel never hit) ≈ 1e-6)


def test_endcap_neutral_hadron_stays_in_its_pixel() -> None:
    for seed in range(50):
        res = run(make_particles(130, 20.0, 2.0, PHI0), seed=seed)
        assert len(res) == 1
        assert res.pf.kind[0] == KIND_NEUTRAL_HADRON
        assert geometry.eta_to_index(res.pf.eta)[0] == geometry.eta_to_index(2.0)
        assert geometry.phi_to_index(res.pf.phi)[0] == geometry.phi_to_index(PHI0)


def test_outermost_barrel_row_is_one_pixel_wide() -> None:
    # Pixel 255 spans 1.479…1.4964: the last, truncated barrel row, still 5° in φ.
    eta0 = 1.488
    for seed in range(30):
        res = run(make_particles(130, 30.0, eta0, PHI0), seed=seed)
        assert geometry.eta_to_index(res.pf.eta)[0] == geometry.eta_to_index(eta0) == 255
        assert geometry.phi_to_index(res.pf.phi)[0] // 5 == geometry.phi_to_index(PHI0) // 5


def test_tracked_charged_pion_leaves_no_neutral_but_untracked_one_does() -> None:
    n_events, n_tracked, n_fake = 400, 0, 0
    fake_energy = 0.0
    sigma = PHASE2.hcal_sigma(np.array([50.0]), np.array([0.3]))[0]  # ≈ 7.5 GeV
    for seed in range(n_events):
        res = run(make_particles(211, 50.0 / math.cosh(0.3), 0.3), seed=seed)
        tracked = int(np.sum(res.pf.kind == KIND_TRACK))
        neutral = res.pf.kind == KIND_NEUTRAL_HADRON
        assert np.sum(res.pf.kind == KIND_PHOTON) == 0
        if tracked:
            n_tracked += 1
            n_fake += int(neutral.sum())
            fake_energy += float(energy(res, neutral).sum())
        else:  # lost by the tracker: the whole pion is a neutral hadron
            assert neutral.sum() == 1
            assert abs(energy(res, neutral)[0] - 50.0) < 5 * sigma
    assert n_tracked / n_events == pytest.approx(0.97, abs=4 * math.sqrt(0.97 * 0.03 / n_events))
    # A tracked pion fakes a neutral only on a > 1σ upward HCAL fluctuation (≈ 16 %), and with little energy.
    assert n_fake / n_tracked < 0.3
    assert fake_energy / n_tracked < 0.1 * 50.0


def test_charged_hadron_bends_in_phi_before_the_calorimeter() -> None:
    # Untracked (efficiency 0) 10 GeV pions at φ = 2.5° (centre of the HCAL tower 0°…5°) bend by
    # asin(0.735/10) ≈ 4.2°: π+ to −1.7° (tower −5°…0°), π− to 6.7° (tower 5°…10°).
    phi0 = math.radians(2.5)
    for pid, tower in ((211, (-5.0, 0.0)), (-211, (5.0, 10.0))):
        hits = 0
        for seed in range(30):
            res = run(make_particles(pid, 10.0, 0.0435, phi0), seed=seed, card=NO_TRACKING)
            assert np.all(res.pf.kind == KIND_NEUTRAL_HADRON)
            for phi in np.degrees(res.pf.phi.astype(np.float64)):
                assert tower[0] < phi < tower[1]
            hits += len(res)
        assert hits > 20  # ~2.8σ excess: almost always significant


def test_neutral_below_threshold_is_dropped() -> None:
    # A 0.3 GeV photon is below the ECAL EnergyMin of 0.5 GeV even after smearing, almost always.
    res = run(make_particles(22, 0.3, 0.0, n=200))
    assert len(res) < 10


# --- pileup -----------------------------------------------------------------------------------------------------

def test_pileup_tracks_flagged_and_dropped_by_chs() -> None:
    rng = np.random.default_rng(9)
    n = 4000
    pileup = np.arange(n) % 2 == 1
    parts = make_particles(rng.choice([211, -211, 22, 130], n), rng.exponential(3.0, n) + 0.3,
                           rng.uniform(-2.5, 2.5, n), rng.uniform(-np.pi, np.pi, n), pileup)
    plain, chs = run(parts, seed=1), run(parts, seed=1, chs=True)
    tracks = plain.pf.kind == KIND_TRACK
    assert plain.is_pileup[tracks].any()
    assert not plain.is_pileup[tracks].all()
    assert not plain.is_pileup[~tracks].any()  # calorimeter neutrals are never flagged
    assert not chs.is_pileup.any()
    # CHS removes exactly the pileup tracks; the calorimeters (which saw all tracks) are unchanged.
    chs_tracks = chs.pf.kind == KIND_TRACK
    np.testing.assert_array_equal(chs.pf.pt[chs_tracks], plain.pf.pt[tracks & ~plain.is_pileup])
    np.testing.assert_array_equal(chs.pf.pt[~chs_tracks], plain.pf.pt[~tracks])
    np.testing.assert_array_equal(chs.pf.eta[~chs_tracks], plain.pf.eta[~tracks])
