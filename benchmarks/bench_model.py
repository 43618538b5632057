"""PFJet-SSD inference-graph latency: activation and φ-padding choices, torch eager and ONNX Runtime.

For each activation (prelu, relu, leaky_relu, relu6) × φ padding (circular, zero = the reference), batch 1:

* torch eager fp32, NCHW and channels_last, ``torch.set_num_threads(threads)``;
* ONNX Runtime (CPUExecutionProvider, ``intra_op_num_threads=threads``, ORT_ENABLE_ALL) on the graph
  :func:`jetssd.model.network.export_onnx` writes, plus the op types left after ORT's graph optimisation
  (shows whether the activation was fused into the conv and what the circular padding costs in nodes).

Weights are random but BN running statistics are calibrated on one batch of synthetic events first: an
uncalibrated random network shrinks its activations towards denormal floats, which would time the CPU's
denormal path rather than the network. Timings are medians after warm-up; compare only numbers of one run.
Writes JSON to stdout; ``--out FILE`` also saves it.
"""

from __future__ import annotations

import argparse
import collections
import copy
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from _report import emit

from jetssd.model.complexity import count_parameters, measure
from jetssd.model.config import ACTIVATIONS, NetConfig
from jetssd.model.network import PFJetSSD, calibrate_batchnorm, export_onnx


def interleaved_medians(fns: dict[str, Callable[[], object]], repeat: int, rounds: int) -> dict[str, float]:
    """Median ms per call of each function, timed in ``rounds`` interleaved rounds of ``repeat`` calls.

    Interleaving spreads slow drifts of this shared VM (other tenants, frequency changes) over all variants
    instead of charging them to whichever variant happened to run at that moment.
    """
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()  # warm-up (allocations, oneDNN/ORT kernel selection)
        fn()
    for _ in range(rounds):
        for key, fn in fns.items():
            for _ in range(repeat):
                t0 = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def synthetic_events(n: int, seed: int = 0) -> torch.Tensor:
    """[n, 3, 340, 360] GeV: ~2 % occupied pixels with exponential deposits (a pile-up-like sparse image)."""
    g = torch.Generator().manual_seed(seed)
    occupied = torch.rand(n, 3, 340, 360, generator=g) < 0.02
    return torch.empty(n, 3, 340, 360).exponential_(0.5, generator=g) * occupied


def calibrated_model(config: NetConfig, events: torch.Tensor) -> PFJetSSD:
    """Random-weight inference graph whose BN running stats are the batch stats of ``events`` (see module doc)."""
    torch.manual_seed(0)
    model = PFJetSSD(config, training_head=False)
    calibrate_batchnorm(model, events)
    return model


def optimized_op_counts(path: Path, threads: int) -> dict[str, int]:
    """Op types of the graph after ORT_ENABLE_ALL optimisation."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    optimized = path.with_suffix(".opt.onnx")
    so.optimized_model_filepath = str(optimized)
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    ops = collections.Counter(n.op_type for n in onnx.load(str(optimized)).graph.node)
    return dict(sorted(ops.items(), key=lambda kv: -kv[1]))


def ort_session(path: Path, threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def build_variant(config: NetConfig, calib: torch.Tensor, image: torch.Tensor, workdir: Path, threads: int,
                  batch: int) -> tuple[dict[str, Any], dict[str, Callable[[], object]]]:
    """One configuration: its description row and the callables to time (torch eager and ORT sessions)."""
    model = calibrated_model(config, calib)
    padding = "circular" if config.circular_phi else "zero"
    name = f"{config.activation}/{padding}"
    row: dict[str, Any] = {"activation": config.activation, "phi_padding": padding}
    model_cl = copy.deepcopy(model).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    image_cl = image.contiguous(memory_format=torch.channels_last)
    fns: dict[str, Callable[[], object]] = {
        f"{name}/torch_nchw_ms": lambda: model(image),
        f"{name}/torch_channels_last_ms": lambda: model_cl(image_cl),
    }
    feed = {"image": image.numpy()}
    feed_b = {"image": np.repeat(image.numpy(), batch, axis=0)}
    exports = {"ort": True, "ort_prelu_node": False} if config.activation == "prelu" else {"ort": True}
    for key, prelu_max in exports.items():
        path = export_onnx(model, workdir / f"{config.activation}_{padding}_{key}.onnx", prelu_max=prelu_max)
        sess = ort_session(path, threads)
        fns[f"{name}/{key}_ms"] = lambda sess=sess: sess.run(None, feed)
        fns[f"{name}/{key}_batch{batch}_ms"] = lambda sess=sess: sess.run(None, feed_b)
        row[f"{key}_optimized_ops"] = optimized_op_counts(path, threads)
    return row, fns


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3, help="timed calls per variant and round")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds over all variants")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8, help="batch of the ORT throughput figure")
    parser.add_argument("--activations", nargs="+", default=list(ACTIVATIONS), choices=ACTIVATIONS)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    calib = synthetic_events(4, seed=1)
    image = synthetic_events(1, seed=2)
    rows: list[dict[str, Any]] = []
    fns: dict[str, Callable[[], object]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for activation in args.activations:
            for circular in (True, False):
                cfg = NetConfig(activation=activation, circular_phi=circular)
                row, row_fns = build_variant(cfg, calib, image, Path(tmp), args.threads, args.batch)
                rows.append(row)
                fns.update(row_fns)
        with torch.inference_mode():
            medians = interleaved_medians(fns, args.repeat, args.rounds)
    for row in rows:
        prefix = f"{row['activation']}/{row['phi_padding']}/"
        for key, ms in medians.items():
            if key.startswith(prefix):
                metric = key[len(prefix):]
                if metric.endswith(f"_batch{args.batch}_ms"):
                    row[metric.replace("_ms", "_events_per_s")] = args.batch / ms * 1e3
                else:
                    row[metric] = ms
    base = rows[0]  # prelu/circular when prelu is benchmarked: the default config
    for row in rows:
        for key in ("torch_nchw_ms", "torch_channels_last_ms", "ort_ms"):
            row[key.replace("_ms", "_ratio")] = row[key] / base[key]
    default = measure(NetConfig())
    result = {
        "threads": args.threads,
        "batch": 1,
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
        "parameters_inference": count_parameters(PFJetSSD(NetConfig(), training_head=False)),
        "conv_macs": default.conv_macs,
        "reference_ops": default.reference_ops,
        "ratio_baseline": f"{base['activation']}/{base['phi_padding']}",
        "repeat_x_rounds": [args.repeat, args.rounds],
        "variants": rows,
    }
    emit(result, args.out)


if __name__ == "__main__":
    main()
