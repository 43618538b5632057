"""`jetssd generate`: sharded, deterministic, resumable event generation on all cores.

One shard = a fixed block of events of one channel, written to ``<out>/<channel>_<shard>.h5``. Every
random number of a shard (Pythia's seed, the pileup draws, the detector smearing) derives from
(seed, channel, shard index) alone, so the content of a file does not depend on how many workers ran
or in which order, and an interrupted run resumes by generating only the shards whose file is missing.
Files appear under their final name only when complete (the writers rename ``.partial`` files).
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import queue
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from jetssd.atomic import write_text_atomic
from jetssd.event import BaselineJets, Event

FORMATS = ("reference", "jetssd")
TRUTH_CONVENTIONS = ("status22", "lastcopy")
MANIFEST = "generation.json"
# Baseline clustering runs on batches of events: FastJet's jagged multi-event call is ~3× cheaper per event.
BASELINE_BATCH = 50


@dataclass(frozen=True)
class GenerationSettings:
    """Everything that determines the content of the generated files.

    Attributes:
        channels: physics channels, from :data:`jetssd.datagen.pythia.CHANNELS`.
        events: events per channel.
        pileup: mean number μ of overlaid min-bias interactions (Poisson); 0 for none.
        mass: RS-graviton mass, GeV (also sets the QCD p̂T threshold).
        seed: master seed; shards derive theirs from it.
        format: "reference" (the Zenodo layout) or "jetssd" (ours: adds PF candidates and continuous truth).
        truth: convention written to the reference ``labels`` dataset: "status22" (paper parity) or "lastcopy".
        shard_size: events per output file.
        pool_size: min-bias events in the pileup pool.
        kappa_mg: RS coupling (0.054 = narrow graviton).
        chs: drop pileup tracks in the detector output (default keeps them, as the reference images did).
        baseline: fill the ``baseline`` dataset with the FastJet soft-drop/N-subjettiness tagger.
    """

    channels: tuple[str, ...]
    events: int
    pileup: float = 50.0
    mass: float = 3500.0
    seed: int = 1
    format: Literal["reference", "jetssd"] = "jetssd"
    truth: Literal["status22", "lastcopy"] = "status22"
    shard_size: int = 500
    pool_size: int = 5000
    kappa_mg: float = 0.054
    chs: bool = False
    baseline: bool = True

    def validate(self) -> None:
        """Raise ValueError naming the bad option."""
        from jetssd.datagen.pythia import CHANNELS

        unknown = [c for c in self.channels if c not in CHANNELS]
        if not self.channels or unknown:
            raise ValueError(f"--channels: unknown channel(s) {unknown or '(none)'}; choose from {', '.join(CHANNELS)}")
        if len(set(self.channels)) != len(self.channels):
            raise ValueError("--channels: a channel is listed twice")
        if self.events < 1:
            raise ValueError("--events: must be ≥ 1")
        if not (0 <= self.pileup <= 1000) or not math.isfinite(self.pileup):
            raise ValueError("--pileup: μ must be between 0 and 1000")
        if not (100.0 <= self.mass <= 12000.0):
            raise ValueError("--mass: graviton mass must be within 100–12000 GeV")
        if not (0 <= self.seed < 2**63):
            raise ValueError("--seed: must be a non-negative integer")
        if self.format not in FORMATS:
            raise ValueError(f"--format: must be one of {FORMATS}")
        if self.truth not in TRUTH_CONVENTIONS:
            raise ValueError(f"--truth: must be one of {TRUTH_CONVENTIONS}")
        if self.shard_size < 1:
            raise ValueError("--shard-size: must be ≥ 1")
        if self.pileup > 0 and self.pool_size < 1:
            raise ValueError("--pool-size: must be ≥ 1 when pileup is on")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["channels"] = list(self.channels)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GenerationSettings:
        d = dict(d)
        d["channels"] = tuple(d["channels"])
        return cls(**d)


@dataclass(frozen=True)
class Shard:
    """One output file: events [first, first + n) of ``channel``."""

    channel: str
    index: int
    first: int
    n: int

    def filename(self) -> str:
        return f"{self.channel}_{self.index:04d}.h5"


def plan_shards(settings: GenerationSettings) -> list[Shard]:
    """All shards of a run, channel-major. Depends on the settings only (never on the worker count)."""
    shards = []
    for channel in settings.channels:
        for k in range(math.ceil(settings.events / settings.shard_size)):
            first = k * settings.shard_size
            shards.append(Shard(channel, k, first, min(settings.shard_size, settings.events - first)))
    return shards


def shard_seeds(settings: GenerationSettings, shard: Shard) -> tuple[int, np.random.SeedSequence]:
    """(seed for :class:`~jetssd.datagen.pythia.EventGenerator`, which maps it into Pythia's range; numpy
    seed sequence for the pileup draws and the detector) of one shard."""
    from jetssd.datagen.pythia import CHANNELS

    ss = np.random.SeedSequence([settings.seed, CHANNELS.index(shard.channel), shard.index])
    pythia_ss, numpy_ss = ss.spawn(2)
    return int(pythia_ss.generate_state(1, np.uint64)[0]), numpy_ss


def pool_seed(settings: GenerationSettings) -> int:
    """Seed of the min-bias pool: a function of the master seed, so one pool serves every channel."""
    return int(np.random.SeedSequence([settings.seed, 0x5EED_B1A5]).generate_state(1, np.uint32)[0])


# --------------------------------------------------------------------------------------------------
# One shard, in a worker process.


@dataclass
class _ShardJob:
    settings: GenerationSettings
    shard: Shard
    out_dir: Path
    pool_dir: Path | None
    mpi_cache_dir: Path | None
    progress: Any = field(default=None, repr=False)  # a multiprocessing queue of event counts, or None


@dataclass
class ShardResult:
    path: Path
    stage_seconds: dict[str, float]
    """Wall time per stage: pythia, pileup, fastsim, rasterize, baseline, write (setup is not included)."""


class _StageClock:
    """Accumulates wall time per named stage."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._t = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] = self.seconds.get(stage, 0.0) + now - self._t
        self._t = now


def generate_shard(job: _ShardJob) -> ShardResult:
    """Generate one shard and write it atomically."""
    from jetssd.datagen.fastsim import simulate
    from jetssd.datagen.particles import Particles
    from jetssd.datagen.pileup import MinBiasPool, sample_n_pileup
    from jetssd.datagen.pythia import EventGenerator
    from jetssd.rasterize import rasterize_sparse

    settings, shard = job.settings, job.shard
    generator_seed, numpy_ss = shard_seeds(settings, shard)
    rng = np.random.default_rng(numpy_ss)
    generator = EventGenerator(shard.channel, seed=generator_seed, mass=settings.mass, kappa_mg=settings.kappa_mg,
                               mpi_cache_dir=job.mpi_cache_dir)
    pool = MinBiasPool.load(job.pool_dir) if job.pool_dir is not None else None

    events: list[Event] = []
    pileup_flags: list[np.ndarray] = []
    clock = _StageClock()
    # generate(n) asks Pythia for exactly n events (next() would batch past the end of the shard).
    for gen in generator.generate(shard.n):
        clock.lap("pythia")
        n_pu = sample_n_pileup(rng, settings.pileup) if pool is not None else 0
        particles = gen.particles
        if pool is not None and n_pu:
            particles = Particles.concatenate([particles, pool.draw(rng, n_pu)])
        clock.lap("pileup")
        sim = simulate(particles, rng, chs=settings.chs)
        clock.lap("fastsim")
        events.append(Event(pixels=rasterize_sparse(sim.pf), truth=gen.truth_status22,
                            truth_lastcopy=gen.truth_lastcopy, pf=sim.pf, process=shard.channel, n_pileup=n_pu))
        pileup_flags.append(sim.is_pileup)
        clock.lap("rasterize")
        if job.progress is not None:
            job.progress.put(1)
        clock.lap("progress")

    if settings.baseline:
        _fill_baseline(events, pileup_flags)
        clock.lap("baseline")
    path = _write_shard(job, events)
    clock.lap("write")
    return ShardResult(path, clock.seconds)


def _fill_baseline(events: list[Event], pileup_flags: Sequence[np.ndarray]) -> None:
    import fastjet._swig

    from jetssd.baseline import tag_events

    # FastJet prints its banner once per worker, in the middle of the progress bar; `jetssd generate`
    # prints the citation request (FastJet, Pythia) once at the end instead.
    fastjet._swig.ClusterSequence.set_fastjet_banner_stream(None)

    for a in range(0, len(events), BASELINE_BATCH):
        chunk = events[a:a + BASELINE_BATCH]
        pfs = [e.pf for e in chunk if e.pf is not None]
        tagged: list[BaselineJets] = tag_events(pfs, is_pileup=pileup_flags[a:a + BASELINE_BATCH])
        for event, jets in zip(chunk, tagged, strict=True):
            event.baseline = jets


def _write_shard(job: _ShardJob, events: list[Event]) -> Path:
    from jetssd.io import NativeWriter, ReferenceWriter

    path = job.out_dir / job.shard.filename()
    meta = {**job.settings.to_dict(), "shard": asdict(job.shard)}
    if job.settings.format == "jetssd":
        with NativeWriter(path, generator_settings=meta, overwrite=True, labels=job.settings.truth) as writer:
            writer.append(events)
    else:
        with ReferenceWriter(path, attrs={"generator_settings": json.dumps(meta)}, overwrite=True,
                             labels=job.settings.truth) as writer:
            writer.append(events)
    return path


# --------------------------------------------------------------------------------------------------
# The run: manifest, resume, pool, workers, progress.


class ManifestMismatchError(RuntimeError):
    """The output directory holds a run made with other settings."""


def _check_manifest(out_dir: Path, settings: GenerationSettings) -> None:
    path = out_dir / MANIFEST
    if path.exists():
        previous = json.loads(path.read_text())
        if previous.get("settings") != settings.to_dict():
            changed = sorted(k for k, v in settings.to_dict().items() if previous.get("settings", {}).get(k) != v)
            raise ManifestMismatchError(
                f"{out_dir} holds events generated with other settings (differing: {', '.join(changed)}); "
                "use a new --out directory (or --overwrite to discard them)"
            )
        return
    write_text_atomic(path, json.dumps({"settings": settings.to_dict()}, indent=2) + "\n")


def _shard_is_complete(path: Path, shard: Shard) -> bool:
    from jetssd.io import DatasetFormatError, open_events

    if not path.exists():
        return False
    try:
        with open_events(path) as f:
            return len(f) == shard.n
    except DatasetFormatError:
        return False


@dataclass
class GenerationReport:
    files: list[Path]
    generated_events: int
    skipped_events: int
    seconds: float
    workers: int
    stage_seconds: dict[str, float] = field(default_factory=dict)
    """Worker wall time per stage, summed over shards (see :class:`ShardResult`)."""


def run_generation(settings: GenerationSettings, out_dir: Path, workers: int | None = None,
                   overwrite: bool = False, cache_dir: Path | None = None,
                   on_progress: Callable[[int, int], None] | None = None) -> GenerationReport:
    """Generate every missing shard of ``settings`` into ``out_dir``.

    Args:
        workers: processes (default: all cores).
        overwrite: delete files of a previous run with other settings instead of refusing.
        cache_dir: where the min-bias pool and Pythia's MPI tables are cached (default ``<out>/.cache``).
        on_progress: called in this process as ``on_progress(done_events, total_events)``.
    """
    from jetssd.datagen.pileup import MinBiasPool

    settings.validate()
    workers = max(1, workers or os.cpu_count() or 1)
    out_dir.mkdir(parents=True, exist_ok=True)
    if overwrite:
        for stale in [*out_dir.glob("*.h5"), *out_dir.glob("*.partial"), out_dir / MANIFEST]:
            stale.unlink(missing_ok=True)
    _check_manifest(out_dir, settings)
    for partial in out_dir.glob("*.partial"):
        partial.unlink()  # left by a killed run; its shard is regenerated below

    cache_dir = cache_dir or out_dir / ".cache"
    cache_dir.mkdir(parents=True, exist_ok=True)
    shards = plan_shards(settings)
    todo = [s for s in shards if not _shard_is_complete(out_dir / s.filename(), s)]
    skipped = sum(s.n for s in shards) - sum(s.n for s in todo)
    total = sum(s.n for s in todo)
    start = time.perf_counter()

    pool_dir = None
    if settings.pileup > 0 and todo:
        pool = MinBiasPool.load_or_build(cache_dir / "minbias", settings.pool_size, pool_seed(settings),
                                         workers=workers)
        pool_dir = pool.path

    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        progress = manager.Queue()
        jobs = [_ShardJob(settings, s, out_dir, pool_dir, cache_dir / "mpi", progress) for s in todo]
        (cache_dir / "mpi").mkdir(exist_ok=True)
        done = 0
        stages: dict[str, float] = {}
        workers = min(workers, max(1, len(jobs)))  # one shard is one task: no more workers than shards
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as executor:
            pending: set[Future[ShardResult]] = {executor.submit(generate_shard, job) for job in jobs}
            while pending:
                finished, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
                for fut in finished:
                    for stage, sec in fut.result().stage_seconds.items():  # .result() re-raises a worker's error
                        stages[stage] = stages.get(stage, 0.0) + sec
                done += _drain(progress)
                if on_progress is not None:
                    on_progress(done, total)
        done += _drain(progress)
        if on_progress is not None:
            on_progress(done, total)

    return GenerationReport(files=[out_dir / s.filename() for s in shards], generated_events=total,
                            skipped_events=skipped, seconds=time.perf_counter() - start, workers=workers,
                            stage_seconds=stages)


def _drain(q: Any) -> int:
    n = 0
    while True:
        try:
            n += q.get_nowait()
        except queue.Empty:
            return n
