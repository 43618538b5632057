"""Pileup: a cached pool of min-bias events, overlaid by random draws (what Delphes' PileUpMerger does).

Generating pileup on the fly costs ≈ 2.4 ms per interaction, 90% of the time at μ = 50
(event-generation §1). Instead a pool of min-bias events is generated once and stored as flat ``.npy``
columns that every worker memory-maps; each pileup interaction is a random pool event, rotated by a random
φ and mirrored in z with probability 1/2, so a pool of a few thousand events gives practically
independent overlays.

Layout of a pool directory (all columns shape [n_particles], event after event)::

    px.npy py.npy pz.npy e.npy   float32, GeV
    pid.npy                      int32, PDG id
    charge.npy                   int8, units of e
    offsets.npy                  int64, shape [n_events + 1]: event i is [offsets[i], offsets[i + 1])
    meta.json                    n_events, seed, block_size, n_particles, Pythia version and settings

A build writes into a hidden temporary directory next to the target and renames it into place, so a
killed build never leaves a half-written pool under the final name (only a ``.<name>.partial-*``
directory, which may be deleted).
"""

from __future__ import annotations

import contextlib
import json
import math
import multiprocessing as mp
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from jetssd.datagen.particles import Particles

POOL_FORMAT = "jetssd-minbias-pool"
POOL_FORMAT_VERSION = 1
DEFAULT_BLOCK_SIZE = 500
"""Events per block. Each block has its own Pythia and seed, so the content depends on the block size
(recorded in meta.json) but not on the number of workers. 500 events take ≈ 1.1 s, against ≈ 0.1 s for an
init from the cached MPI tables; small enough that a 5,000-event pool keeps 10 workers busy."""

_COLUMNS: dict[str, type[np.generic]] = {
    "px": np.float32, "py": np.float32, "pz": np.float32, "e": np.float32, "pid": np.int32, "charge": np.int8,
}


class InvalidPoolError(ValueError):
    """A directory that does not hold a complete, consistent min-bias pool."""


def sample_n_pileup(rng: np.random.Generator, mu: float) -> int:
    """Number of pileup interactions of one bunch crossing: Poisson(``mu``)."""
    if not (math.isfinite(mu) and mu >= 0):
        raise ValueError(f"mean pileup mu must be a finite number ≥ 0, got {mu!r}")
    return int(rng.poisson(mu))


def pool_dirname(n_events: int, seed: int, block_size: int = DEFAULT_BLOCK_SIZE) -> str:
    """Directory name of the pool (n_events, seed[, block_size]) inside a cache directory."""
    name = f"minbias_n{n_events}_seed{seed}"
    return name if block_size == DEFAULT_BLOCK_SIZE else f"{name}_block{block_size}"


def block_seed(seed: int, block: int) -> int:
    """Pythia seed of block ``block`` of the pool with master seed ``seed``."""
    from jetssd.datagen.pythia import pythia_seed

    return pythia_seed(seed, f"minbias-block-{block}")


def _generate_block(seed: int, n_events: int, mpi_cache_dir: Path) -> dict[str, NDArray[Any]]:
    """One block of the pool, columns already in storage dtypes plus ``counts`` [n_events].

    Module-level so that a "spawn" worker can import it; converts to float32 in the worker to halve the
    bytes pickled back to the parent.
    """
    from jetssd.datagen.pythia import minbias_block

    parts, counts = minbias_block(seed, n_events, mpi_cache_dir)
    cols: dict[str, NDArray[Any]] = {name: getattr(parts, name).astype(dtype) for name, dtype in _COLUMNS.items()}
    cols["counts"] = counts
    return cols


def _run_blocks(sizes: list[int], seed: int, workers: int, mpi_cache_dir: Path,
                progress: Callable[[int], None] | None) -> Iterator[tuple[int, dict[str, NDArray[Any]]]]:
    """Generate blocks of ``sizes`` events; yields (block index, columns) in completion order."""
    if workers <= 1 or len(sizes) == 1:
        for b, n in enumerate(sizes):
            cols = _generate_block(block_seed(seed, b), n, mpi_cache_dir)
            if progress is not None:
                progress(n)
            yield b, cols
        return
    # "spawn": Pythia and numpy's thread pools do not survive fork() reliably.
    ctx = mp.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(workers, len(sizes)), mp_context=ctx) as pool:
        futures = {pool.submit(_generate_block, block_seed(seed, b), n, mpi_cache_dir): b
                   for b, n in enumerate(sizes)}
        try:
            for fut in as_completed(futures):
                b = futures[fut]
                cols = fut.result()
                if progress is not None:
                    progress(sizes[b])
                yield b, cols
        finally:  # on error (or an abandoned generator) do not start the blocks still queued
            pool.shutdown(wait=True, cancel_futures=True)


def _write_pool(directory: Path, blocks: list[dict[str, NDArray[Any]]], meta: dict[str, Any]) -> None:
    """Write the concatenated blocks and meta.json into ``directory``."""
    for name in _COLUMNS:
        np.save(directory / f"{name}.npy", np.concatenate([blk[name] for blk in blocks]))
    counts = np.concatenate([blk["counts"] for blk in blocks])
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    np.save(directory / "offsets.npy", offsets)
    meta = {**meta, "n_particles": int(offsets[-1])}
    (directory / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")


@dataclass(frozen=True, eq=False)
class MinBiasPool:
    """A pool of min-bias events, columns memory-mapped from ``path`` (see the module docstring).

    Attributes:
        path: the pool directory.
        px, py, pz, e: float32 [n_particles], GeV.
        pid: int32 [n_particles]. charge: int8 [n_particles].
        offsets: int64 [n_events + 1].
        meta: the contents of meta.json.
    """

    path: Path
    px: NDArray[np.float32]
    py: NDArray[np.float32]
    pz: NDArray[np.float32]
    e: NDArray[np.float32]
    pid: NDArray[np.int32]
    charge: NDArray[np.int8]
    offsets: NDArray[np.int64]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def n_events(self) -> int:
        return len(self.offsets) - 1

    def __len__(self) -> int:
        return self.n_events

    # -- building and loading -----------------------------------------------------------------------

    @classmethod
    def build(cls, path: Path, n_events: int, seed: int, workers: int = 1,
              progress: Callable[[int], None] | None = None, *, block_size: int = DEFAULT_BLOCK_SIZE,
              mpi_cache_dir: Path | None = None) -> MinBiasPool:
        """Generate ``n_events`` min-bias events (13 TeV, ``SoftQCD:inelastic``) into directory ``path``.

        Args:
            path: pool directory to create; FileExistsError if it exists.
            n_events: events in the pool, ≥ 1.
            seed: master seed (any integer); block b uses :func:`block_seed` (seed, b).
            workers: processes; the content does not depend on it.
            progress: called with the number of events of each finished block (an increment).
            block_size: events per block (part of what determines the content).
            mpi_cache_dir: where to cache Pythia's MPI tables (≈ 4 s of init); default a temporary one.
        """
        from jetssd.datagen.pythia import ensure_mpi_cache, minbias_settings, pythia_version

        if n_events < 1 or block_size < 1 or workers < 1:
            raise ValueError(f"need n_events ≥ 1, block_size ≥ 1, workers ≥ 1; got {n_events}, {block_size}, "
                             f"{workers}")
        path = Path(path)
        if path.exists():
            raise FileExistsError(f"min-bias pool {path} already exists")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            mpi_dir = Path(mpi_cache_dir) if mpi_cache_dir is not None else tmp / "mpi"
            # Written once here, so every block (in any worker) reads identical tables.
            ensure_mpi_cache(minbias_settings(), mpi_dir)
            sizes = [min(block_size, n_events - first) for first in range(0, n_events, block_size)]
            blocks: list[dict[str, NDArray[Any]]] = [{} for _ in sizes]
            for b, cols in _run_blocks(sizes, seed, workers, mpi_dir, progress):
                blocks[b] = cols
            meta = {"format": POOL_FORMAT, "version": POOL_FORMAT_VERSION, "n_events": n_events, "seed": seed,
                    "block_size": block_size, "pythia_version": pythia_version(), "settings": minbias_settings()}
            _write_pool(tmp, blocks, meta)
            shutil.rmtree(tmp / "mpi", ignore_errors=True)
            try:
                os.rename(tmp, path)  # atomic; fails if another process finished the same pool first
            except OSError as exc:
                if path.exists():
                    raise FileExistsError(f"min-bias pool {path} was created concurrently") from exc
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # gone after a successful rename; cleans up a failure
        return cls.load(path)

    @classmethod
    def load(cls, path: Path) -> MinBiasPool:
        """Memory-map the pool in ``path``; raises InvalidPoolError if it is incomplete or inconsistent."""
        path = Path(path)
        try:
            meta = json.loads((path / "meta.json").read_text())
            arrays = {name: np.load(path / f"{name}.npy", mmap_mode="r") for name in [*_COLUMNS, "offsets"]}
        except (OSError, ValueError) as exc:
            raise InvalidPoolError(f"{path}: not a readable min-bias pool ({exc})") from exc
        if meta.get("format") != POOL_FORMAT or meta.get("version") != POOL_FORMAT_VERSION:
            raise InvalidPoolError(f"{path}: unknown pool format {meta.get('format')!r} v{meta.get('version')!r}")
        offsets = arrays.pop("offsets")
        _check_arrays(path, meta, arrays, offsets)
        return cls(path=path, offsets=offsets, meta=meta, **arrays)

    @classmethod
    def load_or_build(cls, cache_dir: Path, n_events: int, seed: int, workers: int = 1,
                      progress: Callable[[int], None] | None = None, *,
                      block_size: int = DEFAULT_BLOCK_SIZE) -> MinBiasPool:
        """The pool (n_events, seed) in ``cache_dir``: loaded if a valid one is there, else built.

        A pool made by another Pythia version or left damaged is replaced. Concurrent callers are safe:
        the loser of a build race loads the winner's pool. MPI tables are cached in ``cache_dir/mpi``.
        """
        from jetssd.datagen.pythia import pythia_version

        cache_dir = Path(cache_dir)
        path = cache_dir / pool_dirname(n_events, seed, block_size)
        wanted = {"n_events": n_events, "seed": seed, "block_size": block_size, "pythia_version": pythia_version()}
        if path.exists():
            try:
                pool = cls.load(path)
                if all(pool.meta.get(k) == v for k, v in wanted.items()):
                    return pool
            except InvalidPoolError:
                pass
            stale = cache_dir / f".{path.name}.stale-{uuid.uuid4().hex[:8]}"
            with contextlib.suppress(FileNotFoundError):  # another process moved it first
                os.rename(path, stale)  # processes that mapped it keep their files; new ones get the rebuild
            shutil.rmtree(stale, ignore_errors=True)
        try:
            return cls.build(path, n_events, seed, workers, progress, block_size=block_size,
                             mpi_cache_dir=cache_dir / "mpi")
        except FileExistsError:
            return cls.load(path)

    # -- use ----------------------------------------------------------------------------------------

    def event(self, i: int) -> Particles:
        """Pool event ``i`` as stored (no rotation), float64, is_pileup true."""
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return self._particles(np.arange(a, b))

    def draw(self, rng: np.random.Generator, n_interactions: int) -> Particles:
        """Overlay of ``n_interactions`` pool events drawn with replacement, all particles is_pileup.

        Each drawn event is rotated by a uniform φ in [0, 2π) and mirrored in z (pz → −pz) with
        probability 1/2. Output float64, events in draw order. Vectorised: one gather for all events.
        """
        if n_interactions < 0:
            raise ValueError(f"n_interactions must be ≥ 0, got {n_interactions}")
        events = rng.integers(0, self.n_events, size=n_interactions)
        phi = rng.uniform(0.0, 2.0 * np.pi, size=n_interactions)
        flip = rng.random(n_interactions) < 0.5
        starts = self.offsets[events]
        counts = self.offsets[events + 1] - starts
        owner = np.repeat(np.arange(n_interactions), counts)  # [n_particles]: which draw a particle is from
        out_starts = np.cumsum(counts) - counts
        index = np.arange(int(counts.sum()), dtype=np.int64) + (starts - out_starts)[owner]
        parts = self._particles(index)
        cos, sin = np.cos(phi)[owner], np.sin(phi)[owner]
        px = cos * parts.px - sin * parts.py
        py = sin * parts.px + cos * parts.py
        pz = np.where(flip[owner], -parts.pz, parts.pz)
        return Particles(px, py, pz, parts.e, parts.pid, parts.charge, parts.is_pileup)

    def _particles(self, index: NDArray[np.int64]) -> Particles:
        f64 = np.float64
        return Particles(px=self.px[index].astype(f64), py=self.py[index].astype(f64),
                         pz=self.pz[index].astype(f64), e=self.e[index].astype(f64),
                         pid=np.asarray(self.pid[index]), charge=np.asarray(self.charge[index]),
                         is_pileup=np.ones(len(index), np.bool_))


def _check_arrays(path: Path, meta: dict[str, Any], arrays: dict[str, NDArray[Any]],
                  offsets: NDArray[Any]) -> None:
    """Raise InvalidPoolError unless columns, offsets and meta agree."""
    n = len(arrays["px"])
    problems = [f"{name}.npy has dtype {arr.dtype}, expected {np.dtype(_COLUMNS[name])}"
                for name, arr in arrays.items() if arr.dtype != _COLUMNS[name]]
    problems += [f"{name}.npy has {len(arr)} entries, px.npy {n}" for name, arr in arrays.items() if len(arr) != n]
    if offsets.dtype != np.int64 or offsets.ndim != 1 or len(offsets) != meta.get("n_events", -1) + 1:
        problems.append(f"offsets.npy has shape {offsets.shape}, expected ({meta.get('n_events')} + 1,)")
    elif offsets[0] != 0 or offsets[-1] != n or np.any(np.diff(offsets) < 0):
        problems.append("offsets.npy does not partition the particles")
    if problems:
        raise InvalidPoolError(f"{path}: " + "; ".join(problems))
