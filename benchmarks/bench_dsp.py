"""DSP emulator throughput against float ONNX Runtime on the same events (issue 6: target ≥ 0.5×).

Times, interleaved on the same batches of real generated events (Pythia 8 + μ = 50 pile-up, the project's
generator, as ``bench_gateway``), batch sizes 1 and 4, everything on **one thread** (ONNX Runtime
``intra_op_num_threads=1``, numpy's BLAS pinned to 1 thread before numpy loads, numba kernels single-threaded):

* ``ort_twn``: ``OnnxDetector.run`` of the shipped float TWN graph (``model_repository/pfjet_ssd_twn``);
* ``dsp_fast``: ``jetssd.dsp.fast.run_float`` of the compiled program with a reused workspace (what the gateway's
  ``dsp`` backend runs), same outputs (loc, cls_logits, reg) as the ONNX graph.

Reports ms per event and the throughput ratio ort/dsp (> 1: the emulator is faster). Also checks, on the first
event, that the fast executor gives the reference executor's bits (``--no-check`` skips the ~1 min reference run).
Writes JSON to stdout; ``--out FILE`` also saves it. Numbers of one run only are comparable.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy: its BLAS reads this once
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from _report import emit
from bench_gateway import make_events

from jetssd.dsp import fast, reference
from jetssd.dsp.detector import program_path
from jetssd.dsp.program import Program
from jetssd.inference import OnnxDetector
from jetssd.rasterize import rasterize_batch

REPO = Path(__file__).resolve().parents[1]


def run(program_file: Path, model_dir: Path, rounds: int, check: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        images = rasterize_batch(make_events(Path(tmp)))  # 8 events
    program = Program.load(program_file)
    ort_twn = OnnxDetector(model_dir, threads=1)
    workspace = fast.Workspace()
    result: dict[str, Any] = {"program": str(program_file), "model": str(model_dir), "events": len(images),
                              "threads": 1, "rounds": rounds, "batches": {}}
    if check:
        t0 = time.perf_counter()
        same = np.array_equal(reference.run(program, images[0]), fast.run(program, images[:1])[0])
        result["reference_equals_fast"] = bool(same)
        result["reference_ms_per_event"] = 1e3 * (time.perf_counter() - t0)
    for batch in (1, 4):
        chunks = [images[i:i + batch] for i in range(0, len(images), batch)]
        fns = {"ort_twn": lambda c: ort_twn.run(c), "dsp_fast": lambda c: fast.run_float(program, c, workspace)}
        for fn in fns.values():  # warm-up: numba cache load, ORT kernel selection, workspace allocation
            fn(chunks[0])
        times: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(rounds):
            for chunk in chunks:
                for key, fn in fns.items():
                    t0 = time.perf_counter()
                    fn(chunk)
                    times[key].append((time.perf_counter() - t0) / len(chunk))
        ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
        result["batches"][str(batch)] = {"ms_per_event": ms,
                                         "throughput_ratio_dsp_over_ort": ms["ort_twn"] / ms["dsp_fast"]}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=REPO / "model_repository" / "pfjet_ssd_twn",
                        help="float TWN model directory (its newest version holds the DSP program)")
    parser.add_argument("--program", type=Path, default=None, help="DSP program (default: the model's)")
    parser.add_argument("--rounds", type=int, default=5, help="timed passes over the 8 events per batch size")
    parser.add_argument("--no-check", action="store_true", help="skip the reference = fast check")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args()
    program_file = args.program or program_path(args.model)
    emit(run(program_file, args.model, args.rounds, not args.no_check), args.out)


if __name__ == "__main__":
    main()
