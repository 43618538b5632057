"""Min-bias pool: build/load round trip, worker-count independence, atomic build, caching, draws.

Pythia's min-bias init takes ≈ 4–5 s; the module writes the MPI tables once and every build here reads
them (≈ 0.1 s), on a pool of 20 events in blocks of 10.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from jetssd.datagen.particles import Particles
from jetssd.datagen.pileup import InvalidPoolError, MinBiasPool, pool_dirname, sample_n_pileup

N_EVENTS, SEED, BLOCK = 20, 4242, 10
COLUMNS = ("px", "py", "pz", "e", "pid", "charge", "offsets")


@pytest.fixture(scope="module")
def mpi_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("pythia8mc")
    return tmp_path_factory.mktemp("mpi")


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory, mpi_dir: Path) -> MinBiasPool:
    path = tmp_path_factory.mktemp("pools") / "pool"
    return MinBiasPool.build(path, N_EVENTS, SEED, block_size=BLOCK, mpi_cache_dir=mpi_dir)


def same_content(a: MinBiasPool, b: MinBiasPool) -> bool:
    return all(np.array_equal(getattr(a, c), getattr(b, c)) for c in COLUMNS)


# -- without Pythia --------------------------------------------------------------------------------


def test_sample_n_pileup() -> None:
    rng = np.random.default_rng(0)
    draws = [sample_n_pileup(rng, 50.0) for _ in range(2000)]
    assert all(isinstance(n, int) for n in draws)
    assert np.mean(draws) == pytest.approx(50.0, abs=1.0)
    assert np.var(draws) == pytest.approx(50.0, rel=0.15)  # Poisson: variance = mean
    assert sample_n_pileup(rng, 0.0) == 0
    with pytest.raises(ValueError, match="mu"):
        sample_n_pileup(rng, -1.0)


def test_pool_dirname_names_n_and_seed() -> None:
    assert pool_dirname(5000, 7) == "minbias_n5000_seed7"
    assert pool_dirname(5000, 7, block_size=10) != pool_dirname(5000, 7)


def test_load_rejects_a_non_pool(tmp_path: Path) -> None:
    with pytest.raises(InvalidPoolError):
        MinBiasPool.load(tmp_path)


# -- building --------------------------------------------------------------------------------------


@pytest.mark.datagen
def test_build_load_round_trip(pool: MinBiasPool) -> None:
    loaded = MinBiasPool.load(pool.path)
    assert same_content(loaded, pool)
    assert isinstance(loaded.px, np.memmap)  # shared between processes, not copied
    assert len(loaded) == N_EVENTS
    assert loaded.px.dtype == np.float32
    assert loaded.pid.dtype == np.int32
    assert loaded.charge.dtype == np.int8
    assert loaded.offsets[0] == 0
    assert loaded.offsets[-1] == len(loaded.px)
    assert np.all(np.diff(loaded.offsets) > 0)  # every min-bias event has particles
    meta = json.loads((pool.path / "meta.json").read_text())
    assert meta["n_events"] == N_EVENTS
    assert meta["seed"] == SEED
    assert "SoftQCD:inelastic = on" in meta["settings"]
    assert meta["n_particles"] == len(loaded.px)
    assert sorted(p.name for p in pool.path.iterdir()) == sorted([*(f"{c}.npy" for c in COLUMNS), "meta.json"])


@pytest.mark.datagen
def test_pool_events_are_physical(pool: MinBiasPool) -> None:
    ev = pool.event(0)
    p2 = ev.px**2 + ev.py**2 + ev.pz**2
    assert np.all(ev.e**2 >= p2 * (1 - 1e-5) - 1e-4)  # on or above the mass shell (float32 storage)
    # Each event is a whole pp collision: four-momentum conservation, to float32 precision.
    for i in range(len(pool)):
        ev = pool.event(i)
        np.testing.assert_allclose([ev.e.sum(), ev.pz.sum()], [13000.0, 0.0], atol=0.05)
    assert set(np.unique(pool.charge)) <= {-2, -1, 0, 1, 2}


@pytest.mark.datagen
def test_content_does_not_depend_on_workers(pool: MinBiasPool, mpi_dir: Path, tmp_path: Path) -> None:
    two = MinBiasPool.build(tmp_path / "two", N_EVENTS, SEED, workers=2, block_size=BLOCK, mpi_cache_dir=mpi_dir)
    assert same_content(two, pool)
    other = MinBiasPool.build(tmp_path / "other", BLOCK, SEED + 1, block_size=BLOCK, mpi_cache_dir=mpi_dir)
    assert not np.array_equal(other.px[:100], pool.px[:100])


@pytest.mark.datagen
def test_failed_build_leaves_nothing(mpi_dir: Path, tmp_path: Path) -> None:
    done: list[int] = []

    def progress(n: int) -> None:
        done.append(n)
        raise KeyboardInterrupt  # the user hits Ctrl-C after the first block

    with pytest.raises(KeyboardInterrupt):
        MinBiasPool.build(tmp_path / "pool", N_EVENTS, SEED, progress=progress, block_size=BLOCK,
                          mpi_cache_dir=mpi_dir)
    assert done == [BLOCK]
    assert list(tmp_path.iterdir()) == []  # neither the pool nor its temporary directory


@pytest.mark.datagen
def test_build_refuses_to_overwrite(pool: MinBiasPool) -> None:
    with pytest.raises(FileExistsError):
        MinBiasPool.build(pool.path, N_EVENTS, SEED, block_size=BLOCK)


@pytest.mark.datagen
def test_load_or_build_reuses_and_repairs(pool: MinBiasPool, mpi_dir: Path, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    target = cache / pool_dirname(N_EVENTS, SEED, BLOCK)
    shutil.copytree(pool.path, target)
    shutil.copytree(mpi_dir, cache / "mpi")  # so a rebuild skips the 4 s MPI init

    original_build = MinBiasPool.build  # bound to the class
    builds: list[Path] = []

    def counting_build(path: Path, *args: Any, **kwargs: Any) -> MinBiasPool:
        builds.append(path)
        return original_build(path, *args, **kwargs)

    monkeypatch.setattr(MinBiasPool, "build", counting_build)  # called as cls.build(path, ...)
    reused = MinBiasPool.load_or_build(cache, N_EVENTS, SEED, block_size=BLOCK)
    assert builds == []
    assert same_content(reused, pool)

    (target / "offsets.npy").unlink()  # damaged: rebuilt, with the same content
    rebuilt = MinBiasPool.load_or_build(cache, N_EVENTS, SEED, block_size=BLOCK)
    assert builds == [target]
    assert same_content(rebuilt, pool)
    assert sorted(p.name for p in cache.iterdir()) == sorted(["mpi", target.name])  # no stale or partial dirs


# -- drawing ---------------------------------------------------------------------------------------


def _source_event(pool: MinBiasPool, drawn: Particles) -> Particles:
    """The pool event that ``drawn`` (one interaction) came from: same pid sequence and pT."""
    for i in range(len(pool)):
        ev = pool.event(i)
        if len(ev) == len(drawn) and np.array_equal(ev.pid, drawn.pid) and np.allclose(ev.pt, drawn.pt, rtol=1e-9):
            return ev
    raise AssertionError("drawn interaction matches no pool event")


@pytest.mark.datagen
def test_draw_rotates_and_mirrors_whole_events(pool: MinBiasPool) -> None:
    rng = np.random.default_rng(7)
    angles, flips = [], []
    for _ in range(200):
        drawn = pool.draw(rng, 1)
        src = _source_event(pool, drawn)
        assert drawn.is_pileup.all()
        assert drawn.px.dtype == np.float64
        np.testing.assert_array_equal(drawn.e, src.e)
        np.testing.assert_array_equal(drawn.charge, src.charge)
        # One rigid rotation in φ for the whole event.
        dphi = np.angle(np.exp(1j * (drawn.phi - src.phi)))
        moving = src.pt > 1e-3
        assert np.ptp(np.unwrap(dphi[moving])) < 1e-6
        angles.append(dphi[moving][0])
        # pz either kept or negated for the whole event.
        flipped = np.allclose(drawn.pz, -src.pz)
        assert flipped or np.allclose(drawn.pz, src.pz)
        flips.append(flipped)
    assert 0.35 < np.mean(flips) < 0.65
    assert abs(np.mean(np.cos(angles))) < 0.2
    assert abs(np.mean(np.sin(angles))) < 0.2  # uniform in φ


@pytest.mark.datagen
def test_draw_overlays_n_events(pool: MinBiasPool) -> None:
    rng = np.random.default_rng(3)
    drawn = pool.draw(rng, 50)
    sizes = np.diff(pool.offsets)
    assert sizes.min() * 50 <= len(drawn) <= sizes.max() * 50
    assert drawn.is_pileup.all()
    # Every interaction conserves its own energy and |pz| balance, so the overlay sums to 50 beams' energy.
    assert drawn.e.sum() == pytest.approx(50 * 13000.0, abs=1.0)
    assert len(pool.draw(rng, 0)) == 0


@pytest.mark.datagen
def test_draw_is_deterministic(pool: MinBiasPool) -> None:
    a = pool.draw(np.random.default_rng(11), 30)
    b = pool.draw(np.random.default_rng(11), 30)
    c = pool.draw(np.random.default_rng(12), 30)
    for col in ("px", "py", "pz", "e", "pid"):
        np.testing.assert_array_equal(getattr(a, col), getattr(b, col))
    assert len(a) != len(c) or not np.array_equal(a.px, c.px)
