"""`jetssd-client reprocess` throughput against the model alone, and `hlt` latency, same machine, same run.

Starts the real service (`jetssd-service serve`: Triton + gateway) on free ports, writes an input file of μ = 50
events (the 8 events of bench_gateway.py, repeated), then, interleaved for ``--rounds`` rounds so that
both see the same machine noise:

* model only: ``OnnxDetector.detect`` in this process, batches of 16, 1 intra-op thread (the Triton model's
  configuration: 1 instance, 1 thread, max batch 16) — the baseline;
* reprocess: the CLI as a user runs it (subprocess), ``--batch 16 --concurrency C`` into a .jsonl; events/s
  from its summary (send to last record, not interpreter start).

Then ``hlt`` closed loop over the same events (p50/p90/p99). Prints JSON: events/s of each mode per round, the
median ratio reprocess / model only (issue target ≥ 0.9), hlt latencies.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from _report import emit
from bench_gateway import free_port, make_events

from jetssd.event import Event, SparsePixels
from jetssd.inference import OnnxDetector
from jetssd.io import write_events
from jetssd.rasterize import rasterize_batch

ROOT = Path(__file__).resolve().parents[1]
REPOSITORY = ROOT / "model_repository"


def start_service(work: Path) -> tuple[subprocess.Popen[bytes], str]:
    repo = work / "model_repository"
    shutil.copytree(REPOSITORY, repo, ignore=shutil.ignore_patterns("__pycache__"))
    port = free_port()
    env = {**os.environ, "JETSSD_MODEL_REPOSITORY": str(repo), "JETSSD_GATEWAY_PORT": str(port),
           "JETSSD_TRITON_HTTP_PORT": str(free_port()), "JETSSD_TRITON_GRPC_PORT": str(free_port()),
           "JETSSD_TRITON_METRICS_PORT": str(free_port()), "JETSSD_LOCAL_PRELOAD": "false"}
    log = (work / "serve.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "jetssd_service.cli", "serve", "--log-level", "warning"], env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"serve exited:\n{(work / 'serve.log').read_text()}")
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit("service not ready in 300 s")
        time.sleep(0.5)


def model_only(detector: OnnxDetector, images: np.ndarray, n_events: int, batch: int = 16) -> float:
    reps = np.concatenate([images] * (batch // len(images) + 1))[:batch]
    detector.detect(reps)  # warm-up
    t0 = time.perf_counter()
    for _ in range(n_events // batch):
        detector.detect(reps)
    return (n_events // batch) * batch / (time.perf_counter() - t0)


def reprocess(url: str, source: Path, out: Path, batch: int, concurrency: int) -> float:
    result = subprocess.run([sys.executable, "-m", "jetssd_client.cli", "reprocess", str(source), "--url", url,
                             "--out", str(out), "--batch", str(batch), "--concurrency", str(concurrency),
                             "--no-progress", "--overwrite"], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(result.stderr)
    manifest = json.loads(out.with_name(out.name + ".run.json").read_text())
    return float(manifest["summary"]["this_run"]["events_per_s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=128, help="Events in the input file (multiple of 16).")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[2])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--hlt-events", type=int, default=60)
    parser.add_argument("--out", type=Path, default=None, help="Also write the JSON here.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        pfs = make_events(work / "cache")
        source = work / "bench_0000.h5"
        write_events(source, [Event(SparsePixels.empty(), pf=pfs[k % len(pfs)]) for k in range(args.events)],
                     format="jetssd")
        images = rasterize_batch(pfs)
        detector = OnnxDetector(REPOSITORY / "pfjet_ssd_twn", threads=1)
        proc, url = start_service(work)
        try:
            reprocess(url, source, work / "warm.jsonl", args.batch, 2)  # warm-up of the whole chain
            rounds: list[dict[str, float]] = []
            for _ in range(args.rounds):
                row = {"model only, batch 16 (in-process, 1 thread)": model_only(detector, images, args.events)}
                for c in args.concurrency:
                    row[f"reprocess --batch {args.batch} --concurrency {c}"] = reprocess(
                        url, source, work / "out.jsonl", args.batch, c)
                rounds.append({k: round(v, 2) for k, v in row.items()})
            hlt_dir = work / "hlt"
            subprocess.run([sys.executable, "-m", "jetssd_client.cli", "hlt", str(source), "--url", url,
                            "--events", str(args.hlt_events), "--warmup", "5", "--out", str(hlt_dir)],
                           check=True, capture_output=True)
            hlt = json.loads((hlt_dir / "hlt_summary.json").read_text())
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    base = "model only, batch 16 (in-process, 1 thread)"
    ratios = {k: round(float(np.median([r[k] / r[base] for r in rounds])), 3) for k in rounds[0] if k != base}
    result = {
        "events": {"per_file": args.events, "candidates_mean": int(np.mean([len(p) for p in pfs]))},
        "events_per_s_by_round": rounds,
        "events_per_s_median": {k: round(float(np.median([r[k] for r in rounds])), 2) for k in rounds[0]},
        "ratio_to_model_only_median": ratios,
        "hlt_closed_loop_ms": hlt["latency_ms"],
        "hlt_server_timing_ms_p50": hlt["server_timing_ms_p50"],
    }
    emit(result, args.out)


if __name__ == "__main__":
    main()
