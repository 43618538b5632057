"""``jetssd-client hlt``: call the service the way a trigger node would, one event per request, in order.

Closed loop (default): the next request leaves when the previous answer arrived; the latency is the round trip.
Fixed rate (``rate``): request ``i`` leaves at ``t0 + i / rate`` whether or not earlier ones have answered (open
loop, up to ``max_in_flight`` outstanding); its latency counts from that scheduled time, so a client or service
that falls behind shows up in the latency instead of silently lowering the rate (no coordinated omission).

The request bodies are encoded before the clock starts: the numbers are the service's (network, gateway,
backend), not the JSON encoder's. The first ``warmup`` requests are sent but not counted.
"""

from __future__ import annotations

import asyncio
import csv
import json
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from jetssd.io import open_events
from jetssd_client.client import AsyncClient, Client
from jetssd_client.encode import encode_event, request_body
from jetssd_client.errors import ApiError, JetSSDClientError, ServiceTimeoutError, ServiceUnreachableError
from jetssd_client.results import DetectResponse


@dataclass(frozen=True)
class Request:
    index: int
    id: str
    body: bytes


def load_requests(path: str | Path, n: int | None, backend: str | None, model: str | None) -> list[Request]:
    """One request per event of ``path``, in file order; ``n`` > the file's events cycles through it again."""
    with open_events(path) as f:
        total = len(f)
        if total == 0:
            raise ValueError(f"{path} holds no events")
        count = total if n is None else n
        stem = Path(path).stem
        out: list[Request] = []
        cache: dict[int, bytes] = {}
        for k in range(count):
            i = k % total
            if i not in cache:
                event_id = f"{stem}:{i}"
                cache[i] = request_body([encode_event(f[i], event_id)], backend, model)
            out.append(Request(k, f"{stem}:{i}", cache[i]))
    return out


@dataclass
class Sample:
    """One request: when it was (to be) sent, its latency, and what came back."""

    index: int
    id: str
    scheduled_s: float
    latency_s: float
    error: str | None = None
    response: DetectResponse | None = None


def _error_code(exc: BaseException) -> str:
    if isinstance(exc, ApiError):
        return exc.code
    if isinstance(exc, ServiceTimeoutError):
        return "timeout"
    if isinstance(exc, ServiceUnreachableError):
        return "unreachable"
    return type(exc).__name__


def run_closed_loop(client: Client, requests: Sequence[Request]) -> list[Sample]:
    samples = []
    t0 = time.perf_counter()
    for req in requests:
        start = time.perf_counter()
        try:
            response: DetectResponse | None = client.detect_body(req.body, 1)
            error = None
        except JetSSDClientError as exc:
            response, error = None, _error_code(exc)
        samples.append(Sample(req.index, req.id, start - t0, time.perf_counter() - start, error, response))
    return samples


async def run_fixed_rate(client: AsyncClient, requests: Sequence[Request], rate: float,
                         max_in_flight: int = 64) -> list[Sample]:
    samples: list[Sample | None] = [None] * len(requests)
    slots = asyncio.Semaphore(max_in_flight)
    loop = asyncio.get_running_loop()
    t0 = loop.time()

    async def one(k: int, req: Request, scheduled: float) -> None:
        try:
            try:
                response: DetectResponse | None = await client.detect_body(req.body, 1)
                error = None
            except JetSSDClientError as exc:
                response, error = None, _error_code(exc)
            samples[k] = Sample(req.index, req.id, scheduled - t0, loop.time() - scheduled, error, response)
        finally:
            slots.release()

    tasks = []
    for k, req in enumerate(requests):
        scheduled = t0 + k / rate
        delay = scheduled - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        await slots.acquire()
        tasks.append(asyncio.create_task(one(k, req, scheduled)))
    await asyncio.gather(*tasks)
    return [s for s in samples if s is not None]


def percentiles_ms(latencies_s: Sequence[float]) -> dict[str, float | None]:
    if not latencies_s:
        return {"p50": None, "p90": None, "p99": None, "max": None, "mean": None, "min": None}
    a = np.asarray(latencies_s) * 1e3
    return {"p50": round(float(np.percentile(a, 50)), 3), "p90": round(float(np.percentile(a, 90)), 3),
            "p99": round(float(np.percentile(a, 99)), 3), "max": round(float(a.max()), 3),
            "mean": round(float(a.mean()), 3), "min": round(float(a.min()), 3)}


def summarise(samples: Sequence[Sample], warmup: int, *, input: str, url: str, rate: float | None,
              elapsed_s: float) -> dict[str, Any]:
    counted = [s for s in samples if s.index >= warmup]
    ok = [s for s in counted if s.error is None]
    errors = Counter(s.error for s in counted if s.error is not None)
    responses = [s.response for s in ok if s.response is not None]
    server: dict[str, list[float]] = {}
    for r in responses:
        for key, value in r.events[0].timing_ms.items():
            server.setdefault(key, []).append(value)
    span = (counted[-1].scheduled_s - counted[0].scheduled_s) if len(counted) > 1 else 0.0
    return {
        "input": input,
        "url": url,
        "mode": "fixed rate (open loop)" if rate else "closed loop",
        "rate_hz": rate,
        "requests": len(counted),
        "warmup_requests": len(samples) - len(counted),
        "ok": len(ok),
        "errors": dict(errors),
        "error_count": sum(errors.values()),
        "latency_ms": percentiles_ms([s.latency_s for s in ok]),
        "achieved_rate_hz": round((len(counted) - 1) / span, 3) if span > 0 else None,
        "elapsed_s": round(elapsed_s, 3),
        "server_timing_ms_p50": {k: round(float(np.median(v)), 3) for k, v in server.items()},
        "backends": dict(Counter(r.backend for r in responses)),
        "models": sorted({f"{r.model} v{r.model_version}" for r in responses}),
        "fallbacks": sum(r.fallback for r in responses),
        "jets_per_event_mean": round(float(np.mean([len(r.events[0].jets) for r in responses])), 3)
        if responses else None,
    }


def write_outputs(out: Path, summary: dict[str, Any], samples: Sequence[Sample], warmup: int) -> dict[str, Path]:
    """``hlt_summary.json``, ``hlt_latency.png`` (histogram with p50/p90/p99) and ``hlt_latencies.csv``."""
    from matplotlib.figure import Figure

    from jetssd.atomic import write_text_atomic

    out.mkdir(parents=True, exist_ok=True)
    paths = {"summary": out / "hlt_summary.json", "histogram": out / "hlt_latency.png",
             "latencies": out / "hlt_latencies.csv"}
    write_text_atomic(paths["summary"], json.dumps(summary, indent=2) + "\n")
    with open(paths["latencies"], "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["request", "event_id", "warmup", "scheduled_s", "latency_ms", "error"])
        for s in samples:
            w.writerow([s.index, s.id, int(s.index < warmup), f"{s.scheduled_s:.6f}", f"{s.latency_s * 1e3:.3f}",
                        s.error or ""])
    lat = np.asarray([s.latency_s for s in samples if s.index >= warmup and s.error is None]) * 1e3
    fig = Figure(figsize=(7, 4.2), layout="constrained")
    ax = fig.add_subplot()
    if len(lat):
        lo, hi = max(lat.min() * 0.9, 1e-2), lat.max() * 1.1
        bins = (np.geomspace(lo, hi, 50) if hi / lo > 20 else np.linspace(lo, hi, 50)).tolist()
        ax.hist(lat, bins=bins, color="#4477aa")
        if hi / lo > 20:
            ax.set_xscale("log")
        for q, style in (("p50", "-"), ("p90", "--"), ("p99", ":")):
            v = summary["latency_ms"][q]
            ax.axvline(v, color="#cc3311", linestyle=style, label=f"{q} {v:.1f} ms")
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no successful request", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("latency per request (ms)")
    ax.set_ylabel("requests")
    title = f"{summary['mode']}, {summary['requests']} requests, {summary['error_count']} errors"
    if summary["rate_hz"]:
        title += f", {summary['rate_hz']:g} Hz"
    ax.set_title(title, fontsize=10)
    fig.savefig(paths["histogram"], dpi=110)
    return paths
