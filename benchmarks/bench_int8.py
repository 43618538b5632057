"""Float vs int8 ONNX Runtime latency in one run, and the op types ORT actually executes for each graph.

Usage::

    python benchmarks/bench_int8.py --float model_repository/pfjet_ssd_fpn/1 --int8 /tmp/int8repo/pfjet_ssd_int8/1 \
        [--events /tmp/testset/QCD_0000.h5] [--threads 2] [--out result.json]

Batch 1: median of 30 runs (after a warm-up); batch 8: events per second from the median of 10 runs. The op
counts come from the session's own optimised graph (``optimized_model_filepath``), so "QLinearConv" means ORT
runs an integer convolution kernel and "DequantizeLinear → Conv" would mean it fell back to float.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import emit, median_ms

from jetssd.export import synthetic_images
from jetssd.inference import MODEL_FILE, make_session
from jetssd.quantize.int8 import op_counts
from jetssd.rasterize import densify_batch

INTEGER_OPS = ("QLinearConv", "ConvInteger", "QLinearMatMul", "MatMulInteger", "QLinearConcat",
               "QLinearAveragePool", "QLinearGlobalAveragePool", "QLinearAdd", "QLinearMul")


def _images(events: Path | None, n: int) -> np.ndarray:
    """``n`` dense GeV images: real events when a file is given, else synthetic ones."""
    if events is None:
        return synthetic_images(n, seed=5)
    from jetssd.io import open_events

    with open_events(events) as f:
        return densify_batch([f.read_pixels(i) for i in range(n)])


def measure(model_dir: Path, images: np.ndarray, threads: int) -> dict[str, Any]:
    """Batch-1 median latency, batch-8 throughput and executed op types of one model version."""
    path = model_dir / MODEL_FILE
    session = make_session(path, threads)
    name = session.get_inputs()[0].name
    one, eight = images[:1], images[:8]
    batch1 = median_ms(lambda: session.run(None, {name: one}), 30)
    batch8 = median_ms(lambda: session.run(None, {name: eight}), 10)
    ops = op_counts(path, threads=threads)
    return {"model": str(model_dir), "batch1_median_ms": round(batch1, 2),
            "batch8_events_per_s": round(8 / (batch8 / 1e3), 1), "ops": ops,
            "integer_ops": sum(v for k, v in ops.items() if k in INTEGER_OPS),
            "float_convs": ops.get("Conv", 0) + ops.get("FusedConv", 0)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--float", dest="float_dir", type=Path, required=True, help="float version directory")
    parser.add_argument("--int8", dest="int8_dir", type=Path, required=True, help="int8 version directory")
    parser.add_argument("--events", type=Path, default=None, help="event file for the inputs (else synthetic)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    images = _images(args.events, 8)
    float_result = measure(args.float_dir, images, args.threads)
    int8_result = measure(args.int8_dir, images, args.threads)
    emit({"benchmark": "int8_vs_float_ort_cpu", "threads": args.threads, "cpu": platform.processor() or
          platform.machine(), "cpu_count": os.cpu_count(), "inputs": str(args.events or "synthetic"),
          "float": float_result, "int8": int8_result,
          "speedup_batch1": round(float_result["batch1_median_ms"] / int8_result["batch1_median_ms"], 3),
          "speedup_batch8": round(int8_result["batch8_events_per_s"] / float_result["batch8_events_per_s"], 3)},
         args.out)


if __name__ == "__main__":
    main()
