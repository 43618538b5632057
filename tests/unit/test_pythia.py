"""Pythia event generation: settings validation, seeds, determinism, truth conventions, extraction paths.

Tests that run Pythia skip without the datagen extra. Pythia init is ≈ 0.3 s per generator, ≈ 0.15 s
from the MPI table cache shared by this module, and an event ≈ 4–8 ms.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from jetssd.datagen.pythia import (
    CHANNELS,
    MAX_FAILURES,
    PYTHIA_MAX_SEED,
    EventGenerator,
    GeneratedEvent,
    _Source,
    channel_settings,
    default_qcd_pthat_min,
    ensure_mpi_cache,
    mpi_cache_file,
    pythia_seed,
)
from jetssd.event import CLASS_IDS, TruthObjects

T, V, H = CLASS_IDS["t"], CLASS_IDS["V"], CLASS_IDS["H"]
N_EVENTS = 6
SEED = 12345
NEUTRINOS = (12, 14, 16)


@pytest.fixture(scope="module")
def mpi_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("pythia8mc")
    return tmp_path_factory.mktemp("mpi")


@pytest.fixture(scope="module")
def events(mpi_dir: Path) -> dict[str, list[GeneratedEvent]]:
    """N_EVENTS events of every channel, generated once for the module."""
    return {ch: list(EventGenerator(ch, SEED, mpi_cache_dir=mpi_dir).generate(N_EVENTS)) for ch in CHANNELS}


def same_particles(a: GeneratedEvent, b: GeneratedEvent) -> bool:
    cols = ("px", "py", "pz", "e", "pid", "charge", "is_pileup")
    return all(np.array_equal(getattr(a.particles, c), getattr(b.particles, c)) for c in cols)


def same_truth(a: TruthObjects, b: TruthObjects) -> bool:
    cols = ("cls", "eta", "phi", "pt", "mass")
    return all(np.array_equal(getattr(a, c), getattr(b, c), equal_nan=True) for c in cols)


def four_momentum(t: TruthObjects) -> np.ndarray:
    """[n, 4] (E, px, py, pz) of truth objects from pt, η, φ, m."""
    pt, eta, phi, m = (x.astype(np.float64) for x in (t.pt, t.eta, t.phi, t.mass))
    px, py, pz = pt * np.cos(phi), pt * np.sin(phi), pt * np.sinh(eta)
    return np.stack([np.sqrt(px**2 + py**2 + pz**2 + m**2), px, py, pz], axis=1)


def pair_mass(t: TruthObjects) -> float:
    p = four_momentum(t).sum(axis=0)
    return float(np.sqrt(max(p[0] ** 2 - p[1] ** 2 - p[2] ** 2 - p[3] ** 2, 0.0)))


# -- without Pythia --------------------------------------------------------------------------------


def test_unknown_channel_is_named() -> None:
    with pytest.raises(ValueError, match="Wprime"):
        EventGenerator("Wprime", seed=1)


def test_bad_mass_raises() -> None:
    with pytest.raises(ValueError, match="mass"):
        channel_settings("WW", mass=-1.0)


def test_pythia_seed_range_and_determinism() -> None:
    seeds = [pythia_seed(s, ch) for s in (0, 1, 2, -5, 2**62, PYTHIA_MAX_SEED) for ch in CHANNELS]
    assert all(1 <= s <= PYTHIA_MAX_SEED for s in seeds)
    assert len(set(seeds)) == len(seeds)  # neighbouring seeds and channels get unrelated Pythia seeds
    assert pythia_seed(7, "WW") == pythia_seed(7, "WW")


def test_qcd_threshold_scales_with_mass() -> None:
    assert default_qcd_pthat_min(3500.0) == pytest.approx(875.0)
    assert "PhaseSpace:pTHatMin = 875.0" in channel_settings("QCD", 3500.0)
    assert "PhaseSpace:pTHatMin = 500.0" in channel_settings("QCD", 3500.0, qcd_pthat_min=500.0)


class _FailingPythia:
    """Stands in for a Pythia whose every next() fails."""

    calls = 0

    def next(self) -> bool:
        self.calls += 1
        return False


def test_failures_are_bounded() -> None:
    fake = _FailingPythia()
    with pytest.raises(RuntimeError, match=f"{MAX_FAILURES}"):
        _Source(fake, "WW", batch=False).take(100)
    assert fake.calls == MAX_FAILURES


# -- with Pythia -----------------------------------------------------------------------------------

@pytest.mark.datagen
def test_same_seed_same_events_different_seed_different(mpi_dir: Path,
                                                        events: dict[str, list[GeneratedEvent]]) -> None:
    """Also: the ``events`` fixture wrote the WW MPI table, this generator only reads it; same events."""
    again = list(EventGenerator("WW", SEED, mpi_cache_dir=mpi_dir).generate(2))
    assert all(same_particles(a, b) for a, b in zip(again, events["WW"], strict=False))
    assert all(same_truth(a.truth_status22, b.truth_status22) for a, b in zip(again, events["WW"], strict=False))
    other = EventGenerator("WW", SEED + 1, mpi_cache_dir=mpi_dir).next()
    assert not same_particles(other, events["WW"][0])


@pytest.mark.datagen
def test_next_and_generate_give_the_same_stream(mpi_dir: Path, events: dict[str, list[GeneratedEvent]]) -> None:
    gen = EventGenerator("HH", SEED, mpi_cache_dir=mpi_dir)
    stream = [gen.next() for _ in range(N_EVENTS)]
    assert all(same_particles(a, b) for a, b in zip(stream, events["HH"], strict=True))


@pytest.mark.datagen
def test_channels_with_the_same_seed_differ(events: dict[str, list[GeneratedEvent]]) -> None:
    assert not np.isclose(events["WW"][0].truth_status22.eta[0], events["ZZ"][0].truth_status22.eta[0])


@pytest.mark.datagen
@pytest.mark.parametrize("channel", CHANNELS)
def test_final_state_is_complete(events: dict[str, list[GeneratedEvent]], channel: str) -> None:
    """All final-state particles, neutrinos included: they add up to the beams' four-momentum."""
    for ev in events[channel]:
        p = ev.particles
        assert p.px.dtype == np.float64
        assert p.pid.dtype == np.int32
        assert p.charge.dtype == np.int8
        assert not p.is_pileup.any()
        total = np.array([p.e.sum(), p.px.sum(), p.py.sum(), p.pz.sum()])
        np.testing.assert_allclose(total, [13000.0, 0, 0, 0], atol=1e-6 * 13000)
        assert ev.weight == 1.0
        # Charges from Pythia's particle data, spot-checked on common hadrons.
        for pid, q in ((211, 1), (-211, -1), (22, 0), (2212, 1), (-321, -1), (130, 0)):
            assert np.all(p.charge[p.pid == pid] == q)
    all_pids = np.concatenate([np.abs(ev.particles.pid) for ev in events[channel]])
    if channel in ("tt", "HH"):  # semileptonic b decays: neutrinos must be kept for the fast-sim to drop
        assert np.isin(all_pids, NEUTRINOS).any()


@pytest.mark.datagen
def test_ww_truth(events: dict[str, list[GeneratedEvent]]) -> None:
    for ev in events["WW"]:
        s22, last = ev.truth_status22, ev.truth_lastcopy
        assert list(s22.cls) == [V, V]
        assert list(last.cls) == [V, V]
        assert np.all(s22.pt > 100.0)  # boosted: G* at 3.5 TeV gives pT of hundreds of GeV and more
        assert np.all((s22.mass > 50) & (s22.mass < 110))
        # The status-22 W pair is the G* decay: its mass is the (narrow) G* mass.
        assert pair_mass(s22) == pytest.approx(3500.0, rel=0.01)
    assert np.median(np.concatenate([ev.truth_status22.pt for ev in events["WW"]])) > 500.0


@pytest.mark.datagen
def test_tt_truth_has_the_w_from_each_top(events: dict[str, list[GeneratedEvent]]) -> None:
    for ev in events["tt"]:
        s22 = ev.truth_status22
        assert sorted(s22.cls) == [T, T, V, V]  # reference parity: the W of each top is an extra V
        assert np.all(np.abs(s22.mass[s22.cls == T] - 172.5) < 15)
        assert list(ev.truth_lastcopy.cls) == [T, T]


@pytest.mark.datagen
@pytest.mark.parametrize(("channel", "cls"), [("ZZ", V), ("HH", H), ("WW", V), ("tt", T)])
def test_lastcopy_has_the_two_graviton_daughters(events: dict[str, list[GeneratedEvent]], channel: str,
                                                  cls: int) -> None:
    for ev in events[channel]:
        last = ev.truth_lastcopy
        assert len(last) == 2
        assert np.all(last.cls == cls)
        assert np.all(last.pt > 0)
        assert np.all(np.isfinite(last.eta))
        assert np.all(np.abs(last.phi) <= np.pi)


@pytest.mark.datagen
def test_qcd_has_no_truth(events: dict[str, list[GeneratedEvent]]) -> None:
    for ev in events["QCD"]:
        assert len(ev.truth_status22) == 0
        assert len(ev.truth_lastcopy) == 0
        assert len(ev.particles) > 50
    # p̂T > 875 GeV: the hardest particles are far above min-bias scales.
    assert max(float(ev.particles.pt.max()) for ev in events["QCD"]) > 100.0


@pytest.mark.datagen
def test_batch_extraction_matches_pythias_own_methods(mpi_dir: Path) -> None:
    """The fast path (awkward columns, iBotCopyId re-implemented) equals the loop over Pythia's objects."""
    pytest.importorskip("awkward")
    fast = EventGenerator("tt", 99, mpi_cache_dir=mpi_dir, extraction="batch")
    slow = EventGenerator("tt", 99, mpi_cache_dir=mpi_dir, extraction="loop")
    for a, b in zip(fast.generate(5), slow.generate(5), strict=True):
        assert same_particles(a, b)
        assert same_truth(a.truth_status22, b.truth_status22)
        assert same_truth(a.truth_lastcopy, b.truth_lastcopy)
        assert a.weight == b.weight


@pytest.mark.datagen
def test_mpi_cache_is_deterministic_and_atomic(tmp_path: Path) -> None:
    pytest.importorskip("pythia8mc")
    settings = channel_settings("WW")
    a = ensure_mpi_cache(settings, tmp_path / "a")
    b = ensure_mpi_cache(settings, tmp_path / "b")
    assert a.read_bytes() == b.read_bytes()
    assert a.stat().st_size > 0
    assert ensure_mpi_cache(settings, tmp_path / "a") == a  # reused, not rewritten
    assert [p.name for p in (tmp_path / "a").iterdir()] == [a.name]  # no temporary files left
    assert mpi_cache_file(channel_settings("WW", mass=2000.0), tmp_path / "a") != a  # keyed by settings


@pytest.mark.datagen
def test_damaged_cache_in_a_dir_with_blanks_is_rewritten(tmp_path: Path) -> None:
    """Pythia file names end at a blank (handled by a symlink); a truncated table is rewritten."""
    pytest.importorskip("pythia8mc")
    cache_dir = tmp_path / "my cache"
    table = ensure_mpi_cache(channel_settings("HH"), cache_dir)
    good = table.read_bytes()
    table.write_bytes(good[: len(good) // 2])
    EventGenerator("HH", 1, mpi_cache_dir=cache_dir).next()
    assert table.read_bytes() == good


@pytest.mark.datagen
def test_events_differ_from_each_other(events: dict[str, list[GeneratedEvent]]) -> None:
    qcd = events["QCD"]
    assert not any(same_particles(a, b) for a, b in itertools.pairwise(qcd))
