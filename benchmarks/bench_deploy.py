"""Sizing benchmark for docs/deploy.md: what one Triton replica (the shipped config) sustains for HLT-style clients.

Starts the real ``tritonserver`` (:class:`jetssd_service.triton_server.TritonServer`) on a copy of the committed
repository's ``--variant`` models, unchanged (1 SSD instance, 1 ONNX Runtime thread, dynamic batching up to 16), and
sweeps ``--clients`` closed-loop clients: each sends one event per request, waits for the answer, sends the next,
over HTTP with binary tensors (the gateway's transport through the balancer). Per level: events/s, p50 / p99
latency of the ensemble ``pfjet_<variant>``, and the mean batch the SSD model ran
(``nv_inference_count / nv_inference_exec_count``).

Then the sizing arithmetic: the most clients whose p99 stays within ``--budget-ms``, the events/s one replica
delivers there, and the replicas a trigger rate of ``--rate-hz`` × ``--fraction`` needs (ceil(rate / events/s)).
The clients run on the same machine as the server: on a 2-core box the replica's capacity is the box's.
The events are synthetic (``jetssd.export.synthetic_images``; the graph's cost does not depend on them).
Writes JSON to stdout; ``--out FILE`` also saves it.
"""

from __future__ import annotations

import argparse
import math
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import tritonclient.http as httpclient
from _report import emit
from bench_triton import counter, infer, percentiles
from jetssd_service.triton_server import TritonServer

from jetssd.export import synthetic_images

REPOSITORY = Path(__file__).resolve().parents[1] / "model_repository"


def level(server: TritonServer, variant: str, images: np.ndarray, clients: int, seconds: float) -> dict[str, Any]:
    """``clients`` closed-loop clients for ``seconds``: events/s, p50/p99 ms, mean SSD batch."""
    ensemble, ssd = f"pfjet_{variant}", f"pfjet_ssd_{variant}"
    latencies: list[list[float]] = [[] for _ in range(clients)]
    stop = threading.Event()

    def client_loop(k: int) -> None:
        client = httpclient.InferenceServerClient(server.http_url)
        try:
            j = k
            while not stop.is_set():
                latencies[k].append(infer(client, ensemble, images[j % len(images):j % len(images) + 1]))
                j += 1
        finally:
            client.close()

    before = httpx.get(server.metrics_url).text
    threads = [threading.Thread(target=client_loop, args=(k,)) for k in range(clients)]
    t0 = time.perf_counter()
    for thread in threads:
        thread.start()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - t0
    after = httpx.get(server.metrics_url).text
    count = counter(after, "nv_inference_count", ssd) - counter(before, "nv_inference_count", ssd)
    execs = counter(after, "nv_inference_exec_count", ssd) - counter(before, "nv_inference_exec_count", ssd)
    ms = [x for part in latencies for x in part]
    return {"clients": clients, "requests": len(ms), "events_per_s": round(len(ms) / wall, 1), **percentiles(ms),
            "mean_batch": round(count / execs, 2) if execs else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variant", default="twn")
    parser.add_argument("--clients", default="1,2,4,8", help="concurrency levels, comma-separated")
    parser.add_argument("--seconds", type=float, default=15.0, help="duration of each level")
    parser.add_argument("--budget-ms", type=float, default=100.0, help="p99 budget of one HLT request")
    parser.add_argument("--rate-hz", type=float, default=100e3, help="trigger rate (Level-1 accept: 100 kHz)")
    parser.add_argument("--fraction", default="0.01,0.1,1", help="fractions of events sent, comma-separated")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    images = synthetic_images(16)
    work = Path(tempfile.mkdtemp(prefix="bench-deploy-"))
    try:
        repo = work / "model_repository"
        for model in (f"pfjet_ssd_{args.variant}", f"pfjet_nms_{args.variant}", f"pfjet_{args.variant}"):
            shutil.copytree(REPOSITORY / model, repo / model, ignore=shutil.ignore_patterns("__pycache__"))
        with TritonServer(repo, http_port=0, grpc_port=0, metrics_port=0, work_dir=work / "server",
                          watchdog_interval=None) as server:
            client = httpclient.InferenceServerClient(server.http_url)
            for i in range(10):
                infer(client, f"pfjet_{args.variant}", images[i % len(images):i % len(images) + 1])
            client.close()
            levels = [level(server, args.variant, images, int(c), args.seconds) for c in args.clients.split(",")]
    finally:
        shutil.rmtree(work, ignore_errors=True)

    within = [lv for lv in levels if lv["p99_ms"] <= args.budget_ms]
    best = max(within, key=lambda lv: lv["events_per_s"]) if within else None
    sizing: dict[str, Any] = {"budget_p99_ms": args.budget_ms, "rate_hz": args.rate_hz}
    if best is not None:
        sizing.update({"clients_per_replica": best["clients"], "events_per_s_per_replica": best["events_per_s"]})
        sizing["replicas"] = {f: math.ceil(args.rate_hz * float(f) / best["events_per_s"])
                              for f in args.fraction.split(",")}
    emit({"variant": args.variant, "transport": "http binary, 1 event per request", "levels": levels,
          "sizing": sizing}, args.out)


if __name__ == "__main__":
    main()
