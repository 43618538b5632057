"""``jetssd-client monitor``: the gateway's (and Triton's) Prometheus metrics as a live terminal view or JSON.

From the gateway (docs/serving.md §9): requests by status and their rate, ``/v1/detect`` latency percentiles
per backend and model from the ``jetssd_gateway_request_duration_seconds`` histogram, the per-stage means,
events and jets, errors by code, fallbacks, in-flight requests, backend availability. From Triton: per model
requests, failures, realised batch size, and queue vs compute time per request. Rates and the "window"
percentiles are computed between two consecutive scrapes; "total" ones since the processes started.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import httpx

from jetssd_client.prom import Histogram, Scrape, delta

QUANTILES = (0.5, 0.9, 0.99)
DETECT = "/v1/detect"


def scrape(http: httpx.Client, url: str) -> Scrape:
    """GET ``url`` (a Prometheus endpoint) and parse it. Raises httpx errors, or ValueError for a non-200."""
    t = time.time()
    r = http.get(url)
    if r.status_code != 200:
        raise ValueError(f"{url} answered HTTP {r.status_code}")
    return Scrape.parse(r.text, t)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1e3, 3)


def _latency(h: Histogram) -> dict[str, Any]:
    out: dict[str, Any] = {"count": int(h.count)}
    for q in QUANTILES:
        out[f"p{round(q * 100)}_ms"] = _ms(h.quantile(q))
    out["mean_ms"] = _ms(h.mean)
    return out


def _rate(value: float, window: float | None) -> float | None:
    return None if not window else round(value / window, 3)


def gateway_stats(now: Scrape, before: Scrape | None = None) -> dict[str, Any]:
    """The gateway's figures: totals since start, and rates/percentiles over the window since ``before``."""
    window = (now.time - before.time) if before is not None else None

    def is_detect(labels: dict[str, str]) -> bool:
        return labels.get("endpoint") == DETECT

    requests = now.total("jetssd_gateway_requests_total", ("status",), is_detect)
    requests_d = delta(requests, before.total("jetssd_gateway_requests_total", ("status",), is_detect)
                       if before else None)
    all_requests = now.total("jetssd_gateway_requests_total", ("endpoint",))
    lat_now = now.histogram("jetssd_gateway_request_duration_seconds", ("backend", "model"), is_detect)
    lat_before = (before.histogram("jetssd_gateway_request_duration_seconds", ("backend", "model"), is_detect)
                  if before else {})
    stages = now.histogram("jetssd_gateway_stage_duration_seconds", ("backend", "model", "stage"))
    events = now.total("jetssd_gateway_events_total", ("backend", "model"))
    events_d = delta(events, before.total("jetssd_gateway_events_total", ("backend", "model")) if before else None)
    errors = now.total("jetssd_gateway_errors_total", ("code",))
    errors_d = delta(errors, before.total("jetssd_gateway_errors_total", ("code",)) if before else None)

    per_backend: dict[str, Any] = {}
    for key in sorted(set(lat_now) | set(events)):
        backend, model = key
        if not backend:  # requests refused before the backend was known: counted under errors
            continue
        h = lat_now.get(key)
        entry: dict[str, Any] = {"backend": backend, "model": model, "events_total": int(events.get(key, 0))}
        if window:
            entry["events_per_s"] = _rate(events_d.get(key, 0.0), window)
        if h is not None:
            entry["latency_total"] = _latency(h)
            if window:
                win = h.minus(lat_before.get(key))
                entry["requests_per_s"] = _rate(win.count, window)
                entry["latency_window"] = _latency(win)
        entry["stage_mean_ms"] = {stage: _ms(sh.mean) for (b, m, stage), sh in sorted(stages.items())
                                  if (b, m) == key}
        per_backend[f"{backend}/{model}"] = entry

    total_detect = sum(requests.values())
    failed = sum(v for (status,), v in requests.items() if not status.startswith("2"))
    out: dict[str, Any] = {
        "requests": {
            "detect_total": int(total_detect),
            "detect_by_status": {status: int(v) for (status,), v in sorted(requests.items())},
            "detect_failed_total": int(failed),
            "by_endpoint": {endpoint: int(v) for (endpoint,), v in sorted(all_requests.items())},
        },
        "in_flight": int(sum(now.total("jetssd_gateway_in_flight_requests").values())),
        "errors_total": {code: int(v) for (code,), v in sorted(errors.items())},
        "jets_total": {label: int(v) for (label,), v in sorted(
            now.total("jetssd_gateway_jets_total", ("label",)).items())},
        "fallbacks_total": int(sum(now.total("jetssd_gateway_fallbacks_total").values())),
        "backend_up": {f"{b}/{m}": bool(v) for (b, m), v in sorted(
            now.total("jetssd_gateway_backend_up", ("backend", "model")).items())},
        "backends": per_backend,
    }
    if window:
        out["requests"]["detect_per_s"] = _rate(sum(requests_d.values()), window)
        out["requests"]["detect_failed_per_s"] = _rate(
            sum(v for (status,), v in requests_d.items() if not status.startswith("2")), window)
        out["errors_window"] = {code: int(v) for (code,), v in sorted(errors_d.items()) if v}
    return out


TRITON_TIMES = {"queue": "nv_inference_queue_duration_us",
                "compute_input": "nv_inference_compute_input_duration_us",
                "compute_infer": "nv_inference_compute_infer_duration_us",
                "compute_output": "nv_inference_compute_output_duration_us",
                "request": "nv_inference_request_duration_us"}


def triton_stats(now: Scrape, before: Scrape | None = None) -> dict[str, Any]:
    """Per Triton model: requests, failures, inferences, executions, realised batch, ms per request by stage.

    Over the window since ``before`` when given (the current load), else since Triton started.
    """
    window = (now.time - before.time) if before is not None else None

    def counter(name: str) -> dict[tuple[str, ...], float]:
        n = now.total(name, ("model",))
        return delta(n, before.total(name, ("model",))) if before is not None else n

    success = counter("nv_inference_request_success")
    failure = counter("nv_inference_request_failure")
    count = counter("nv_inference_count")
    execs = counter("nv_inference_exec_count")
    times = {stage: counter(metric) for stage, metric in TRITON_TIMES.items()}
    pending = now.total("nv_inference_pending_request_count", ("model",))
    models: dict[str, Any] = {}
    for key in sorted(set(success) | set(failure) | set(pending)):
        ok = success.get(key, 0.0)
        entry: dict[str, Any] = {
            "requests": int(ok), "failures": int(failure.get(key, 0.0)), "inferences": int(count.get(key, 0.0)),
            "executions": int(execs.get(key, 0.0)),
            "avg_batch": round(count[key] / execs[key], 2) if execs.get(key) else None,
            "pending": int(pending.get(key, 0.0)),
            "ms_per_request": {stage: (round(t.get(key, 0.0) / ok / 1e3, 3) if ok else None)
                               for stage, t in times.items()},
        }
        if window:
            entry["requests_per_s"] = _rate(ok, window)
        models[key[0]] = entry
    out: dict[str, Any] = {"scope": "window" if window else "since start", "models": models}
    cpu = now.total("nv_cpu_utilization")
    if cpu:
        out["cpu_utilization"] = round(sum(cpu.values()), 3)
    return out


def snapshot(gateway: Scrape | None, triton: Scrape | None, gateway_before: Scrape | None = None,
             triton_before: Scrape | None = None, *, gateway_url: str, triton_url: str | None,
             gateway_error: str | None = None, triton_error: str | None = None) -> dict[str, Any]:
    """The JSON document of ``monitor --once --json`` (and what the live view renders)."""
    window = (gateway.time - gateway_before.time) if gateway and gateway_before else None
    out: dict[str, Any] = {"time": datetime.now(UTC).isoformat(timespec="seconds"),
                           "window_s": None if window is None else round(window, 3),
                           "gateway": {"url": gateway_url, "up": gateway is not None}}
    if gateway is not None:
        out["gateway"].update(gateway_stats(gateway, gateway_before))
    elif gateway_error:
        out["gateway"]["error"] = gateway_error
    if triton_url is not None:
        out["triton"] = {"url": triton_url, "up": triton is not None}
        if triton is not None:
            out["triton"].update(triton_stats(triton, triton_before))
        elif triton_error:
            out["triton"]["error"] = triton_error
    return out


def render(snap: dict[str, Any]) -> Any:
    """A rich renderable of one snapshot."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    def fmt(v: Any) -> str:
        if v is None:
            return "–"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    parts: list[Any] = []
    g = snap["gateway"]
    window = snap.get("window_s")
    head = f"gateway {g['url']}  " + ("[green]up[/]" if g["up"] else f"[red]DOWN[/] {g.get('error', '')}")
    head += f"   {snap['time']}" + (f"   window {window:.1f} s" if window else "")
    parts.append(Text.from_markup(head))
    if g["up"]:
        r = g["requests"]
        parts.append(Text(
            f"/v1/detect: {r['detect_total']} requests ({fmt(r.get('detect_per_s'))}/s), "
            f"{r['detect_failed_total']} failed ({fmt(r.get('detect_failed_per_s'))}/s), in flight {g['in_flight']}, "
            f"fallbacks {g['fallbacks_total']}"))
        t = Table(title="/v1/detect latency, ms (window | since start)", title_justify="left")
        t.add_column("backend/model", no_wrap=True)
        for col in ("req/s", "ev/s", "p50", "p90", "p99", "all p50", "all p99", "events", "up"):
            t.add_column(col, justify="right")
        stages = Table(title="mean ms per request by stage (since start)", title_justify="left")
        stages.add_column("backend/model", no_wrap=True)
        for col in ("parse", "rasterize", "infer", "postprocess"):
            stages.add_column(col, justify="right")
        for name, b in g["backends"].items():
            w, tot = b.get("latency_window", {}), b.get("latency_total", {})
            st = b.get("stage_mean_ms", {})
            up = g["backend_up"].get(name)
            t.add_row(name, fmt(b.get("requests_per_s")), fmt(b.get("events_per_s")), fmt(w.get("p50_ms")),
                      fmt(w.get("p90_ms")), fmt(w.get("p99_ms")), fmt(tot.get("p50_ms")), fmt(tot.get("p99_ms")),
                      fmt(b["events_total"]), "–" if up is None else ("[green]yes[/]" if up else "[red]no[/]"))
            stages.add_row(name, *(fmt(st.get(k)) for k in ("parse", "rasterize", "infer", "postprocess")))
        parts += [t, stages]
        errors = ", ".join(f"{k} {v}" for k, v in g["errors_total"].items()) or "none"
        jets = ", ".join(f"{k} {v}" for k, v in g["jets_total"].items()) or "none"
        parts.append(Text(f"errors since start: {errors}\njets since start: {jets}"))
    tr = snap.get("triton")
    if tr is not None:
        parts.append(Text.from_markup(f"triton {tr['url']}  " + ("[green]up[/]" if tr["up"] else
                                                                  f"[red]DOWN[/] {tr.get('error', '')}")))
        if tr["up"]:
            t = Table(title=f"Triton per model ({tr['scope']}; ms per request)", title_justify="left")
            t.add_column("model", no_wrap=True)
            for col in ("req/s", "requests", "fail", "batch", "pending", "queue", "in", "infer", "out", "total"):
                t.add_column(col, justify="right")
            for name, m in tr["models"].items():
                ms = m["ms_per_request"]
                t.add_row(name, fmt(m.get("requests_per_s")), fmt(m["requests"]), fmt(m["failures"]),
                          fmt(m["avg_batch"]), fmt(m["pending"]), fmt(ms["queue"]), fmt(ms["compute_input"]),
                          fmt(ms["compute_infer"]), fmt(ms["compute_output"]), fmt(ms["request"]))
            parts.append(t)
    return Group(*parts)


class Monitor:
    """Scrapes the gateway (and Triton) and keeps the previous scrape for rates."""

    def __init__(self, gateway_url: str, triton_url: str | None = None, timeout: float = 5.0,
                 transport: httpx.BaseTransport | None = None, clock: Callable[[], float] = time.time) -> None:
        self.gateway_metrics = gateway_url.rstrip("/") + "/metrics"
        self.gateway_url = gateway_url.rstrip("/")
        self.triton_url = triton_url
        self._http = httpx.Client(timeout=timeout, transport=transport)
        self._prev: tuple[Scrape | None, Scrape | None] = (None, None)

    def _scrape(self, url: str) -> tuple[Scrape | None, str | None]:
        try:
            return scrape(self._http, url), None
        except (httpx.HTTPError, ValueError) as exc:
            return None, f"{type(exc).__name__}: {exc}"

    def poll(self) -> dict[str, Any]:
        """Scrape now; rates are over the interval since the previous poll."""
        g, g_err = self._scrape(self.gateway_metrics)
        t, t_err = self._scrape(self.triton_url) if self.triton_url else (None, None)
        snap = snapshot(g, t, self._prev[0], self._prev[1], gateway_url=self.gateway_url, triton_url=self.triton_url,
                        gateway_error=g_err, triton_error=t_err)
        self._prev = (g, t)
        return snap

    def close(self) -> None:
        self._http.close()
