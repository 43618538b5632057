"""Gateway latency, one μ = 50 event per request: model-only in-process vs Triton transports vs the full gateway.

Starts the real Triton (pfjet_twn) and three ``jetssd-service gateway`` processes (transport shm, http, grpc) on
free ports, then times, interleaved in chunks of 10 requests so that every mode sees the same machine noise:

* model only: ``OnnxDetector.detect`` in this process (ORT + the shared post-processing, 1 thread) — the baseline;
* direct triton <transport>: the gateway's TritonBackend called from this process (dense image → jets);
* gateway HTTP → triton <transport> / local: PF candidates as JSON through the gateway over real HTTP.

Then throughput (events/s) with batching, same machine, same run: model only at batch 8 (the baseline), the
gateway with 8 events per request (triton shm, local), and 8 concurrent single-event clients of the gateway
(triton shm: Triton's dynamic batching merges them).

Prints JSON: p50/p90/p99 ms per mode and p50 minus the model-only p50 (DESIGN §6 target: gateway + Triton ≤
model-only + 3 ms at p50), the gateway's own stage timings, and events/s with the ratio to model only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from _report import emit
from jetssd_client.encode import pf_candidates
from jetssd_service.backends.triton import TritonBackend
from jetssd_service.repository import ModelRepository
from jetssd_service.settings import Settings
from jetssd_service.triton_server import TritonServer

from jetssd.datagen.fastsim import simulate
from jetssd.datagen.particles import Particles
from jetssd.datagen.pileup import MinBiasPool
from jetssd.datagen.pythia import EventGenerator
from jetssd.inference import OnnxDetector
from jetssd.rasterize import rasterize_batch

REPOSITORY = Path(__file__).resolve().parents[1] / "model_repository"
TRANSPORTS = ("shm", "http", "grpc")


def make_events(cache: Path, mu: int = 50) -> list[Any]:
    pool = MinBiasPool.build(cache / "pool", 50, seed=3, mpi_cache_dir=cache / "mpi")
    rng = np.random.default_rng(0)
    events = []
    for channel in ("tt", "WW", "HH", "ZZ"):
        for gen in EventGenerator(channel, 11, mpi_cache_dir=cache / "mpi").generate(2):
            events.append(simulate(Particles.concatenate([gen.particles, pool.draw(rng, mu)]), rng).pf)
    return events


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def run(rounds: int, repository: Path) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        pfs = make_events(Path(tmp))
    images = rasterize_batch(pfs)
    bodies = [pf_body(pfs, i, 1) for i in range(len(pfs))]
    local_bodies = [pf_body(pfs, i, 1, "local") for i in range(len(pfs))]
    models = ["pfjet_twn", "pfjet_ssd_twn", "pfjet_nms_twn"]
    with TritonServer(repository=repository, http_port=0, grpc_port=0, metrics_port=0, models=models) as server:
        host, http_port = server.http_url.rsplit(":", 1)
        grpc_port = server.grpc_url.rsplit(":", 1)[1]
        gateways, procs = {}, []
        for transport in TRANSPORTS:
            port = free_port()
            env = {**os.environ, "JETSSD_TRITON_HOST": host, "JETSSD_TRITON_HTTP_PORT": http_port,
                   "JETSSD_TRITON_GRPC_PORT": grpc_port, "JETSSD_TRITON_TRANSPORT": transport,
                   "JETSSD_MODEL_REPOSITORY": str(repository), "JETSSD_LOCAL_PRELOAD": str(transport == "shm")}
            procs.append(subprocess.Popen([sys.executable, "-m", "jetssd_service.cli", "gateway", "--port", str(port),
                                           "--log-level", "warning"], env=env))
            gateways[transport] = f"http://127.0.0.1:{port}"
        direct = {}
        for transport in TRANSPORTS:
            settings = Settings(triton_host=host, triton_http_port=int(http_port), triton_grpc_port=int(grpc_port),
                                triton_transport=transport, model_repository=repository)
            direct[transport] = TritonBackend(settings, ModelRepository(repository))
            await direct[transport].start()
        detector = OnnxDetector(repository / "pfjet_ssd_twn", threads=1)
        try:
            async with httpx.AsyncClient(timeout=60) as client:
                for url in gateways.values():
                    for _ in range(600):
                        try:
                            if (await client.get(url + "/readyz")).status_code == 200:
                                break
                        except httpx.HTTPError:
                            pass
                        await asyncio.sleep(0.1)

                def gateway_call(url: str, payload: list[bytes]) -> Callable[[int], Awaitable[Any]]:
                    return lambda i: client.post(url + "/v1/detect", content=payload[i],
                                                 headers={"content-type": "application/json"})

                modes: dict[str, Callable[[int], Awaitable[Any]]] = {
                    "model only (in-process)": lambda i: asyncio.to_thread(detector.detect, images[i:i + 1]),
                    **{f"direct triton {t}": (lambda i, b=b: b.detect("twn", images[i:i + 1]))
                       for t, b in direct.items()},
                    **{f"gateway -> triton {t}": gateway_call(u, bodies) for t, u in gateways.items()},
                    "gateway -> local": gateway_call(gateways["shm"], local_bodies),
                }
                times: dict[str, list[float]] = {m: [] for m in modes}
                stages: list[dict[str, float]] = []
                for call in modes.values():  # warm-up
                    for i in range(5):
                        await call(i % len(pfs))
                for _ in range(rounds):
                    for mode, call in modes.items():
                        for k in range(10):
                            t0 = time.perf_counter()
                            out = await call(k % len(pfs))
                            times[mode].append(time.perf_counter() - t0)
                            if mode == "gateway -> triton shm":
                                stages.append(out.json()["events"][0]["timing_ms"])
                throughput = await measure_throughput(client, gateways["shm"], detector, images, pfs, rounds)
        finally:
            for backend in direct.values():
                await backend.close()
            for proc in procs:
                proc.terminate()
                proc.wait()
    base = float(np.median(times["model only (in-process)"])) * 1e3
    return {
        "events": {"candidates_mean": int(np.mean([len(p) for p in pfs])),
                   "json_bytes_mean": int(np.mean([len(b) for b in bodies]))},
        "requests_per_mode": 10 * rounds,
        "latency_ms": {m: {"p50": round(float(np.median(t)) * 1e3, 2),
                           "p90": round(float(np.percentile(t, 90)) * 1e3, 2),
                           "p99": round(float(np.percentile(t, 99)) * 1e3, 2),
                           "p50_minus_model_only": round(float(np.median(t)) * 1e3 - base, 2)}
                       for m, t in times.items()},
        "gateway_stage_p50_ms (triton shm)": {k: round(float(np.median([s[k] for s in stages])), 3)
                                              for k in stages[0]},
        "throughput_events_per_s": throughput,
    }


BATCH = 8
"""Events per batch (model only, per gateway request) and concurrent clients in the throughput phase."""


def pf_body(pfs: list[Any], first: int, n: int, backend: str | None = None) -> bytes:
    events = [{"id": str(first + k), "pf_candidates": pf_candidates(p)} for k, p in enumerate(pfs[first:first + n])]
    return json.dumps({"events": events, **({"backend": backend} if backend else {})}).encode()


async def measure_throughput(client: httpx.AsyncClient, url: str, detector: OnnxDetector, images: np.ndarray,
                             pfs: list[Any], rounds: int) -> dict[str, Any]:
    """events/s of each batched mode, measured one after the other over ``rounds`` × 8 batches of 8 events."""
    n_batches = 8 * rounds
    batch_images = np.concatenate([images] * (BATCH // len(images) + 1))[:BATCH]
    many = pfs * (BATCH // len(pfs) + 1)
    headers = {"content-type": "application/json"}
    triton_body, local_body = pf_body(many, 0, BATCH), pf_body(many, 0, BATCH, "local")
    single = [pf_body(many, k, 1) for k in range(BATCH)]

    async def model_only() -> None:
        await asyncio.to_thread(detector.detect, batch_images)

    async def gateway_batch(body: bytes) -> None:
        r = await client.post(url + "/v1/detect", content=body, headers=headers)
        r.raise_for_status()

    async def concurrent_singles() -> None:
        rs = await asyncio.gather(*(client.post(url + "/v1/detect", content=b, headers=headers) for b in single))
        for r in rs:
            r.raise_for_status()

    modes = {"model only, batch 8 (in-process)": model_only,
             "gateway -> triton shm, 8 events per request": lambda: gateway_batch(triton_body),
             "gateway -> local, 8 events per request": lambda: gateway_batch(local_body),
             "gateway -> triton shm, 8 concurrent 1-event requests": concurrent_singles}
    out: dict[str, Any] = {}
    for name, call in modes.items():
        await call()  # warm-up
        t0 = time.perf_counter()
        for _ in range(n_batches):
            await call()
        out[name] = round(n_batches * BATCH / (time.perf_counter() - t0), 2)
    base = out["model only, batch 8 (in-process)"]
    out["ratio_to_model_only"] = {k: round(v / base, 3) for k, v in out.items() if isinstance(v, float)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10, help="Rounds of 10 requests per mode.")
    parser.add_argument("--repository", type=Path, default=REPOSITORY)
    parser.add_argument("--out", type=Path, default=None, help="Also write the JSON here.")
    args = parser.parse_args()
    result = asyncio.run(run(args.rounds, args.repository))
    emit(result, args.out)


if __name__ == "__main__":
    main()
