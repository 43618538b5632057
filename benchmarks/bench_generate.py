"""Event-generator benchmark: events/s per core at pileup μ = 50, time per stage, bytes per event.

Runs the real generator (Pythia 8 + min-bias pool + fast simulation + rasterization + FastJet baseline
+ HDF5 writing) on one worker, so the rate is per core, with the pool built beforehand (it is cached and
shared by every run). The stage breakdown puts the rate next to its own baseline measured in the same
run: Pythia's event generation alone. Target (issue #2): ≥ 70 events/s per core at μ = 50.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from _report import emit

from jetssd.datagen.generate import GenerationSettings, pool_seed, run_generation
from jetssd.datagen.pileup import MinBiasPool


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=500, help="events per channel (one shard each)")
    parser.add_argument("--channels", default="WW,tt")
    parser.add_argument("--pileup", type=float, default=50.0)
    parser.add_argument("--pool-size", type=int, default=2000)
    parser.add_argument("--format", default="reference", choices=["reference", "jetssd"])
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--cache-dir", type=Path, default=Path(".cache/bench"))
    parser.add_argument("--out", type=Path, help="also write the JSON result here")
    args = parser.parse_args()

    settings = GenerationSettings(channels=tuple(args.channels.split(",")), events=args.events, pileup=args.pileup,
                                  seed=12345, format=args.format, shard_size=args.events, pool_size=args.pool_size,
                                  baseline=not args.no_baseline)
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    MinBiasPool.load_or_build(args.cache_dir / "minbias", settings.pool_size, pool_seed(settings), workers=2)
    pool_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        report = run_generation(settings, Path(tmp), workers=1, cache_dir=args.cache_dir)
        n_bytes = sum(p.stat().st_size for p in report.files)
    n = report.generated_events
    stage = {k: 1e3 * v / n for k, v in sorted(report.stage_seconds.items())}
    busy = sum(report.stage_seconds.values())
    result = {
        "events": n, "pileup_mu": settings.pileup, "format": settings.format, "baseline": settings.baseline,
        "events_per_s_per_core": n / report.seconds,
        "events_per_s_per_core_excluding_setup": n / busy if busy else None,
        "ms_per_event_by_stage": stage,
        "pythia_only_events_per_s": 1e3 / stage["pythia"] if stage.get("pythia") else None,
        "fraction_of_time_in_pythia": report.stage_seconds.get("pythia", 0.0) / busy if busy else None,
        "bytes_per_event": n_bytes / n,
        "pool_build_or_load_s": pool_s,
        "target_events_per_s_per_core": 70.0,
    }
    emit(result, args.out)


if __name__ == "__main__":
    main()
