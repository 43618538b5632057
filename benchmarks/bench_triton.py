"""Triton scheduling benchmark: instances × ONNX Runtime threads of ``pfjet_ssd_<variant>`` on this machine.

For each setting (default: 1 instance × 1 thread, 1 × 2, 2 × 1, 2 × 2) it writes a temporary repository with
only that variant (``write_triton_repository`` with the setting), starts the real ``tritonserver`` through
:class:`jetssd_service.triton_server.TritonServer` and measures, through the HTTP client with binary tensors:

* start → ready (s) and stop (s);
* one event per request, sequential: p50 / p99 latency (ms) of the ensemble ``pfjet_<variant>``;
* ``--concurrency`` clients (default 8), one event per request: throughput (events/s), p50 / p99 latency and the
  mean batch the SSD model ran (``nv_inference_count / nv_inference_exec_count``).

Baseline in the same run: in-process ``OnnxDetector.detect`` of one event with 1 and 2 threads (p50 ms).
The events are synthetic (``jetssd.export.synthetic_images``: soft pixels plus hot clusters; the cost of the
graph does not depend on the content). Machines are shared: compare only numbers of one run, and rerun with
``--rounds 2`` to see the noise. Writes JSON to stdout; ``--out FILE`` also saves it.
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import tritonclient.http as httpclient
from _report import emit
from jetssd_service.triton_server import TritonServer

from jetssd.export import synthetic_images
from jetssd.inference import OnnxDetector
from jetssd.triton.repository import ServingConfig, write_triton_repository

REPOSITORY = Path(__file__).resolve().parents[1] / "model_repository"


def percentiles(ms: list[float]) -> dict[str, float]:
    a = np.asarray(ms)
    return {"p50_ms": round(float(np.percentile(a, 50)), 2), "p99_ms": round(float(np.percentile(a, 99)), 2)}


def infer(client: httpclient.InferenceServerClient, model: str, x: np.ndarray) -> float:
    inp = httpclient.InferInput("image", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    t0 = time.perf_counter()
    client.infer(model, [inp], outputs=[httpclient.InferRequestedOutput("jets"),
                                        httpclient.InferRequestedOutput("num_jets")])
    return (time.perf_counter() - t0) * 1e3


def counter(text: str, name: str, model: str) -> float:
    match = re.search(rf'^{name}{{model="{model}",version="\d+"}} (\S+)$', text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def in_process(variant: str, images: np.ndarray, threads: int, n: int) -> dict[str, float]:
    det = OnnxDetector(REPOSITORY / f"pfjet_ssd_{variant}", threads=threads)
    for i in range(3):
        det.detect(images[i:i + 1])
    ms = []
    for i in range(n):
        t0 = time.perf_counter()
        det.detect(images[i % len(images):i % len(images) + 1])
        ms.append((time.perf_counter() - t0) * 1e3)
    return percentiles(ms)


def measure(variant: str, serving: ServingConfig, images: np.ndarray, n_seq: int, concurrency: int,
            per_client: int) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="bench-triton-"))
    try:
        repo = work / "repo"
        shutil.copytree(REPOSITORY / f"pfjet_ssd_{variant}", repo / f"pfjet_ssd_{variant}",
                        ignore=shutil.ignore_patterns("__pycache__", "config.pbtxt", "model.py"))
        write_triton_repository(repo, [variant], serving)
        server = TritonServer(repo, http_port=0, grpc_port=0, metrics_port=0, work_dir=work / "server",
                              watchdog_interval=None)
        t0 = time.perf_counter()
        server.start()
        start_s = time.perf_counter() - t0
        ensemble, ssd = f"pfjet_{variant}", f"pfjet_ssd_{variant}"
        try:
            client = httpclient.InferenceServerClient(server.http_url)
            for i in range(5):
                infer(client, ensemble, images[i:i + 1])
            seq = [infer(client, ensemble, images[i % len(images):i % len(images) + 1]) for i in range(n_seq)]
            client.close()

            before = httpx.get(server.metrics_url).text

            def worker(k: int) -> list[float]:
                c = httpclient.InferenceServerClient(server.http_url)
                try:
                    return [infer(c, ensemble, images[(k + j) % len(images):(k + j) % len(images) + 1])
                            for j in range(per_client)]
                finally:
                    c.close()

            t1 = time.perf_counter()
            with ThreadPoolExecutor(concurrency) as pool:
                conc = [ms for part in pool.map(worker, range(concurrency)) for ms in part]
            wall = time.perf_counter() - t1
            after = httpx.get(server.metrics_url).text
            count = counter(after, "nv_inference_count", ssd) - counter(before, "nv_inference_count", ssd)
            execs = counter(after, "nv_inference_exec_count", ssd) - counter(before, "nv_inference_exec_count", ssd)
        finally:
            t2 = time.perf_counter()
            server.close()
            stop_s = time.perf_counter() - t2
        return {
            "instances": serving.ssd_instances, "intra_op_threads": serving.ssd_intra_op_threads,
            "start_s": round(start_s, 2), "stop_s": round(stop_s, 2),
            "batch1_sequential": percentiles(seq),
            f"concurrency{concurrency}": {**percentiles(conc), "events_per_s": round(len(conc) / wall, 1),
                                           "mean_batch": round(count / execs, 2) if execs else None},
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variant", default="fpn")
    parser.add_argument("--settings", default="1x1,1x2,2x1,2x2", help="instances x threads, comma-separated")
    parser.add_argument("--sequential", type=int, default=40, help="sequential batch-1 requests per setting")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--per-client", type=int, default=8, help="requests per concurrent client")
    parser.add_argument("--rounds", type=int, default=1, help="repeat all settings (interleaved)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    images = synthetic_images(16)
    settings = [tuple(int(v) for v in s.split("x")) for s in args.settings.split(",")]
    result: dict[str, Any] = {"variant": args.variant, "baseline_in_process_batch1": {}, "runs": []}
    for threads in (1, 2):
        result["baseline_in_process_batch1"][f"threads{threads}"] = in_process(args.variant, images, threads,
                                                                               args.sequential)
    for _ in range(args.rounds):
        for instances, threads in settings:
            serving = ServingConfig(ssd_instances=instances, ssd_intra_op_threads=threads)
            result["runs"].append(measure(args.variant, serving, images, args.sequential, args.concurrency,
                                          args.per_client))
    result["start_s_median"] = statistics.median(r["start_s"] for r in result["runs"])
    emit(result, args.out)


if __name__ == "__main__":
    main()
