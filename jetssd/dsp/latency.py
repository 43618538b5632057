"""A first-order cycle model of a DSP program on CEVA SensPro SP1000 cores (issue 6 item 4; ``docs/dsp.md`` §9).

Not a simulator: per layer, compute cycles (MACs or element operations over the core's throughput times a
per-kind utilisation) and memory cycles (bytes moved over a bandwidth) are combined as
``max(compute, memory) + fixed overhead``; every number that goes in is a field of :class:`Assumptions`, so a
better datasheet value changes one line. The paper (Table 3) reports 8.5 ms on one core and 0.9 ms on 10 cores
+ a controller core.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from jetssd.dsp.program import Program


@dataclass(frozen=True)
class Assumptions:
    """Every input of the model. Defaults: see ``docs/dsp.md`` §9 for where each comes from."""

    clock_hz: float = 1.0e9
    """SP1000 clock (assumed 1 GHz: with 1024 MAC/cycle that is the paper's 2 TOPS per core)."""
    macs_per_cycle: int = 1024
    """8-bit × 8-bit MACs per cycle (SP1000: 1024); also used for 2-bit × 8-bit (conservative: no 2×8 bonus)."""
    utilisation: tuple[tuple[str, float], ...] = (("dense", 0.70), ("pointwise", 0.80), ("depthwise", 0.25),
                                                  ("head", 0.60))
    """Fraction of the MAC array a layer kind keeps busy (depthwise: 9 taps per output, little reuse)."""
    vector_ops_per_cycle: int = 64
    """Element operations per cycle for non-MAC work (requant, pool, L2Norm, ECA gate)."""
    local_bytes_per_cycle: float = 64.0
    """Bandwidth of the core's local (tightly coupled) memory."""
    external_bytes_per_cycle: float = 16.0
    """DMA bandwidth to shared L2/DDR for tensors that do not fit locally."""
    local_memory_bytes: int = 512 * 1024
    """Local data memory per core; a layer whose input + output exceed it streams through external memory."""
    layer_overhead_cycles: int = 2_000
    """Per layer: kernel launch, DMA set-up, pipeline fill."""
    cores: int = 10
    """Worker cores of the multi-core configuration (plus one controller core)."""
    barrier_cycles: int = 3_000
    """Per layer on the multi-core configuration: synchronisation through the controller + halo exchange."""
    controller_cycles_per_pixel: float = 0.05
    """Controller work per input pixel (scatter of the input rows, gather of the head outputs)."""

    def utilisation_of(self, kind: str) -> float:
        return dict(self.utilisation)[kind]


def layer_costs(program: Program, image_shape: tuple[int, int] | None = None,
                assumptions: Assumptions = Assumptions()) -> list[dict[str, Any]]:
    """Per op: name, kind, output shape, MACs, element ops, bytes moved, compute / memory / total cycles (1 core)."""
    a = assumptions
    h, w = image_shape or tuple(program.metadata.get("image_shape", (340, 360)))
    c = 3
    rows: list[dict[str, Any]] = []
    for op in program.ops:
        kind = op["kind"]
        macs = 0
        elems = 0
        in_bytes = h * w * c
        weight_bytes = 0
        if kind == "input":
            name, c_out = "input", 3
            elems = h * w * c * 8  # binary search in 255 thresholds
            in_bytes = h * w * c * 4  # float32 in
        elif kind == "conv":
            name, c_out = op["name"], int(op["c_out"])
            per_out = int(op["c_in"]) // int(op["groups"]) * int(op["kernel"]) ** 2
            macs = h * w * c_out * per_out
            elems = h * w * c_out  # requantisation
            weight_bytes = op["weight"].size // (4 if op["weight_format"] == "ternary" else 1) + 12 * c_out
        elif kind == "avgpool":
            name, c_out = op["name"], c
            h, w = h // 2 + 1, w // 2 + 1
            elems = h * w * c * 4
        elif kind == "l2norm":
            name, c_out = op["name"], c
            elems = h * w * c * 3 + h * w * 40  # square-sum, multiply, requant; isqrt + divide per pixel
        elif kind == "eca":
            name, c_out = op["name"], c
            elems = h * w * c * 2
        else:
            raise ValueError(f"unknown op {kind!r}")
        out_elem_bytes = 4 if kind == "conv" and op["activation"] == "raw" else 1
        out_bytes = h * w * c_out * out_elem_bytes
        moved = in_bytes + out_bytes + weight_bytes
        bandwidth = a.local_bytes_per_cycle if in_bytes + out_bytes <= a.local_memory_bytes \
            else a.external_bytes_per_cycle
        mac_kind = ("head" if kind == "conv" and op["activation"] == "raw" else
                    "depthwise" if kind == "conv" and op["groups"] > 1 else
                    "pointwise" if kind == "conv" and op["kernel"] == 1 else "dense")
        compute = macs / (a.macs_per_cycle * a.utilisation_of(mac_kind)) + elems / a.vector_ops_per_cycle
        memory = moved / bandwidth
        rows.append({"name": name, "kind": kind, "shape": [c_out, h, w], "macs": macs, "element_ops": elems,
                     "bytes": moved, "compute_cycles": compute, "memory_cycles": memory,
                     "cycles": max(compute, memory) + a.layer_overhead_cycles})
        c = c_out
    return rows


def estimate(program: Program, assumptions: Assumptions = Assumptions(),
             image_shape: tuple[int, int] | None = None) -> dict[str, Any]:
    """``{"cycles", "cycles_10_cores", "latency_ms": {"1_core", "10_cores"}, "macs", "paper_ms", "assumptions"}``.

    10 cores: each layer's work split evenly over the cores by η rows, plus 2 halo rows per core for 3×3 layers,
    a per-layer barrier, and the controller's scatter/gather (serial with the layers).
    """
    a = assumptions
    rows = layer_costs(program, image_shape, a)
    one = sum(r["cycles"] for r in rows)
    multi = 0.0
    for r in rows:
        height = r["shape"][1]
        halo = 1.0 + 2.0 * a.cores / max(height, 1) if r["kind"] == "conv" else 1.0
        multi += (r["cycles"] - a.layer_overhead_cycles) / a.cores * halo + a.layer_overhead_cycles + a.barrier_cycles
    h, w = image_shape or tuple(program.metadata.get("image_shape", (340, 360)))
    multi += h * w * a.controller_cycles_per_pixel
    return {"cycles": round(one), "cycles_10_cores": round(multi),
            "latency_ms": {"1_core": one / a.clock_hz * 1e3, "10_cores": multi / a.clock_hz * 1e3},
            "macs": int(sum(r["macs"] for r in rows)), "paper_ms": {"1_core": 8.5, "10_cores": 0.9},
            "assumptions": asdict(a)}
