"""The ``jetssd-client`` command line: ``hlt``, ``reprocess`` and ``monitor`` (docs/client.md).

Exit codes: 0 success; 1 the service failed (after retries) or a request was refused, the output staying
resumable; 2 bad arguments or unreadable inputs, before any request; 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from jetssd_client.client import DEFAULT_URL
from jetssd_client.retry import RetryPolicy

app = typer.Typer(
    name="jetssd-client",
    help="PFJet-SSD client: trigger-style calls (hlt), offline reprocessing (reprocess), live metrics (monitor).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

err = Console(stderr=True, highlight=False)
out = Console(highlight=False)

UrlOption = Annotated[str, typer.Option("--url", envvar="JETSSD_URL", help="The gateway (env JETSSD_URL).")]
BackendOption = Annotated[str | None, typer.Option(help="triton, local or dsp (default: the gateway's).")]
ModelOption = Annotated[str | None, typer.Option(help="Model variant, e.g. twn, fpn (default: the gateway's).")]


def fail(message: str, code: int) -> typer.Exit:
    err.print(f"[bold red]error:[/] {message}", markup=True, soft_wrap=True)
    return typer.Exit(code)


def _retry(retries: int) -> RetryPolicy:
    if retries < 0:
        raise fail("--retries must be ≥ 0", 2)
    return RetryPolicy(max_attempts=retries + 1)


def _preflight(url: str, retry: RetryPolicy, timeout: float) -> None:
    """Fail fast and clearly when nothing answers at ``url``."""
    from jetssd_client.client import Client
    from jetssd_client.errors import ApiError, JetSSDClientError

    try:
        with Client(url, timeout=min(timeout, 10.0), retry=retry) as client:
            client.request("GET", "/healthz")
    except ApiError as exc:
        raise fail(f"{url}/healthz answered {exc}; is the URL a jetssd gateway?", 1) from None
    except JetSSDClientError as exc:
        raise fail(str(exc), 1) from None


# ------------------------------------------------------------------------------------------------- hlt


@app.command()
def hlt(
    input: Annotated[Path, typer.Argument(help="Event file (reference layout or jetssd format).")],
    url: UrlOption = DEFAULT_URL,
    rate: Annotated[float | None, typer.Option(help="Fixed request rate in Hz (open loop); default: closed "
                                                    "loop, the next request when the answer arrived.")] = None,
    events: Annotated[int | None, typer.Option(help="Requests to send (cycles through the file); default: "
                                                    "every event once.")] = None,
    warmup: Annotated[int, typer.Option(help="First requests sent but not counted.")] = 5,
    backend: BackendOption = None,
    model: ModelOption = None,
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for hlt_summary.json, hlt_latency.png, "
                                                         "hlt_latencies.csv.")] = Path("hlt"),
    timeout: Annotated[float, typer.Option(help="Seconds per request.")] = 10.0,
    retries: Annotated[int, typer.Option(help="Retries per request (a trigger cannot wait: default 0).")] = 0,
    max_in_flight: Annotated[int, typer.Option(help="With --rate: most requests outstanding at once.")] = 64,
) -> None:
    """Send one event per request, in file order, like a trigger node; print latency percentiles and errors.

    Writes a latency histogram (PNG), a JSON summary and every request's latency (CSV) into --out. Exit code 1
    when any counted request failed.
    """
    from jetssd.io import DatasetFormatError
    from jetssd_client import hlt as h
    from jetssd_client.client import AsyncClient, Client

    if rate is not None and rate <= 0:
        raise fail("--rate must be > 0", 2)
    if events is not None and events < 1:
        raise fail("--events must be ≥ 1", 2)
    if warmup < 0:
        raise fail("--warmup must be ≥ 0", 2)
    policy = _retry(retries)
    try:
        requests = h.load_requests(input, None if events is None else events + warmup, backend, model)
    except (DatasetFormatError, ValueError) as exc:
        raise fail(f"cannot read input {input}: {exc}", 2) from None
    _preflight(url, RetryPolicy(max_attempts=3), timeout)
    mode = f"{rate:g} Hz fixed rate" if rate else "closed loop"
    err.print(f"hlt: {len(requests)} requests ({warmup} warm-up) to {url}, {mode}")
    t0 = time.perf_counter()
    try:
        if rate:
            async def go() -> list[h.Sample]:
                async with AsyncClient(url, backend=backend, model=model, timeout=timeout, retry=policy) as c:
                    return await h.run_fixed_rate(c, requests, rate, max_in_flight)

            samples = asyncio.run(go())
        else:
            with Client(url, backend=backend, model=model, timeout=timeout, retry=policy) as client:
                samples = h.run_closed_loop(client, requests)
    except KeyboardInterrupt:
        raise fail("interrupted", 130) from None
    elapsed = time.perf_counter() - t0
    summary = h.summarise(samples, min(warmup, len(requests) - 1), input=str(input), url=url, rate=rate,
                          elapsed_s=elapsed)
    paths = h.write_outputs(out_dir, summary, samples, min(warmup, len(requests) - 1))
    lat = summary["latency_ms"]
    out.print(f"requests {summary['requests']}  ok {summary['ok']}  errors {summary['error_count']}"
              + (f" {summary['errors']}" if summary["errors"] else ""))
    if lat["p50"] is not None:
        out.print(f"latency ms  p50 {lat['p50']:.2f}  p90 {lat['p90']:.2f}  p99 {lat['p99']:.2f}  "
                  f"max {lat['max']:.2f}  (mean {lat['mean']:.2f})")
    if summary["achieved_rate_hz"]:
        out.print(f"rate {summary['achieved_rate_hz']:.1f} Hz; served by {summary['backends']} "
                  f"{', '.join(summary['models'])}")
    out.print(f"wrote {paths['summary']}, {paths['histogram']}, {paths['latencies']}")
    if summary["error_count"]:
        raise typer.Exit(1)


# ------------------------------------------------------------------------------------------------- reprocess


@app.command()
def reprocess(
    inputs: Annotated[list[Path], typer.Argument(help="Event files (reference layout or jetssd format).")],
    out_file: Annotated[Path, typer.Option("--out", help="Output: .jsonl, .parquet or .h5.")],
    url: UrlOption = DEFAULT_URL,
    batch: Annotated[int, typer.Option(help="Events per request (the gateway allows up to 64).")] = 16,
    concurrency: Annotated[int, typer.Option(help="Requests in flight (per Dask task with --dask). 2 keeps one "
                                                  "request queued at the service while another runs.")] = 2,
    backend: BackendOption = None,
    model: ModelOption = None,
    timeout: Annotated[float, typer.Option(help="Seconds per request.")] = 120.0,
    retries: Annotated[int, typer.Option(help="Retries of a request on connection errors and 503 (exponential "
                                              "backoff with jitter, Retry-After honoured).")] = 6,
    overwrite: Annotated[bool, typer.Option(help="Start again, discarding an existing output.")] = False,
    fsync: Annotated[bool, typer.Option(help="fsync the journal after each batch (crash-safe on power "
                                             "loss too).")] = True,
    progress: Annotated[bool, typer.Option(help="Show the progress bar.")] = True,
    dask: Annotated[str | None, typer.Option(help="Dask scheduler address (tcp://host:8786), or local[:N] for "
                                                  "an in-process cluster of N workers.")] = None,
    dask_chunk: Annotated[int, typer.Option(help="With --dask: events per task.")] = 256,
) -> None:
    """Stream every event of INPUTS through the service and write the jets of each, exactly once.

    Resumable: killed at any moment and run again with the same arguments, it continues where it stopped; the
    output holds every event once (ids "<file stem>:<index>"), in input order. A run manifest OUT.run.json
    records the inputs, the model and the final summary.
    """
    from jetssd_client import reprocess as rp
    from jetssd_client.errors import JetSSDClientError
    from jetssd_client.journal import JournalError

    for name, value in (("--batch", batch), ("--concurrency", concurrency), ("--dask-chunk", dask_chunk)):
        if value < 1:
            raise fail(f"{name} must be ≥ 1", 2)
    try:
        inputs_info = rp.inspect_inputs(inputs)
        opts = rp.Options(inputs=inputs_info, out=out_file.absolute(), url=url, backend=backend, model=model,
                          batch=batch, concurrency=concurrency, timeout=timeout, retry=_retry(retries),
                          overwrite=overwrite, fsync=fsync, dask=dask, dask_chunk=dask_chunk)
        run = rp.Run(opts, log=lambda m: err.print(m, soft_wrap=True))
        pending = run.prepare()
    except (rp.InputError, rp.ResumeError) as exc:
        raise fail(str(exc), 2) from None
    total = len(run.expected)
    if not pending:
        out.print(f"{out_file} is complete ({total} events); nothing to do (--overwrite starts again)")
        _print_summary(run.manifest.get("summary") or {})
        return
    done = total - run.remaining
    rec = run.recovery
    if done or rec.repaired:
        notes = []
        if rec.torn_bytes:
            notes.append(f"truncated a torn last line of {rec.torn_bytes} bytes")
        if rec.duplicates:
            notes.append(f"dropped {rec.duplicates} duplicate records")
        err.print(f"resuming: {done} of {total} events already in {run.journal_path}"
                  + (f" ({'; '.join(notes)})" if notes else ""))
    err.print(f"reprocess: {total} events in {len(inputs_info)} file(s) → {out_file}; {run.remaining} to send to "
              f"{url}, {batch} per request, {concurrency} in flight" + (f", dask {dask}" if dask else ""))
    t0 = time.perf_counter()
    try:
        if run.remaining:
            _preflight(url, opts.retry, timeout)
            with Progress(TextColumn("[progress.description]{task.description}"), BarColumn(),
                          MofNCompleteColumn(), _RateColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                          console=err, disable=not progress, transient=False) as bar:
                task = bar.add_task("events", total=run.remaining)
                run.process(progress=lambda n: bar.advance(task, n))
        summary = run.finish(time.perf_counter() - t0)
    except KeyboardInterrupt:
        run.close()
        raise fail(f"interrupted; {total - run.remaining} of {total} events are in {run.journal_path}: run the "
                   "same command again to resume", 130) from None
    except (JetSSDClientError, rp.ReprocessError, JournalError, OSError) as exc:
        run.close()
        elapsed = time.perf_counter() - t0
        attempts = getattr(exc, "attempts", None)
        tried = f"; the failed request was sent {attempts} time(s)" if attempts else ""
        raise fail(f"{exc}\n{total - run.remaining} of {total} events are in {run.journal_path} "
                   f"({run.stats.events} this run in {elapsed:.1f} s{tried}); fix the cause and run the same "
                   "command again to resume", 1) from None
    except rp.InputError as exc:
        run.close()
        raise fail(str(exc), 2) from None
    _print_summary(summary)


class _RateColumn(ProgressColumn):
    """Events per second (rich's own speed column formats bytes)."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("– ev/s" if speed is None else f"{speed:,.1f} ev/s", style="progress.data.speed")


def _print_summary(summary: dict[str, Any]) -> None:
    if not summary:
        return
    this = summary.get("this_run", {})
    jets = summary.get("jets", {})
    confident: dict[str, int] = next((v for k, v in summary.items() if k.startswith("jets_score_ge_")), {})
    served = summary.get("served_by") or {}
    out.print(f"events {summary['events']} ({summary['events_without_jets']} without jets) → {summary['output']}")
    out.print("jets   " + "  ".join(f"{k} {v}" for k, v in jets.items())
              + "   (score ≥ 0.5: " + "  ".join(f"{k} {v}" for k, v in confident.items()) + ")")
    if this:
        rate = this.get("events_per_s")
        out.print(f"this run: {this['events']} events in {this['elapsed_s']:.1f} s"
                  + (f" = {rate:.1f} events/s" if rate else "")
                  + f", {this['requests']} requests, {this['retries']} retries, {this['failures']} failures, "
                    f"{this['fallbacks']} fallbacks; model {served.get('model')} v{served.get('model_version')}")


# ------------------------------------------------------------------------------------------------- monitor


@app.command()
def monitor(
    url: UrlOption = DEFAULT_URL,
    triton_metrics: Annotated[str | None, typer.Option(help="Triton's metrics URL, e.g. "
                                                            "http://127.0.0.1:8002/metrics.")] = None,
    interval: Annotated[float, typer.Option(help="Seconds between refreshes.")] = 2.0,
    once: Annotated[bool, typer.Option(help="One snapshot, then exit (1 if the gateway does not answer).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="With --once: the snapshot as JSON on stdout.")] = False,
    window: Annotated[float, typer.Option(help="With --once: scrape twice this many seconds apart, for rates "
                                               "and percentiles over that window (0: totals only).")] = 0.0,
    count: Annotated[int | None, typer.Option(hidden=True, help="Stop after this many refreshes.")] = None,
) -> None:
    """Live view of the gateway's and Triton's metrics: rates, latency percentiles, queue vs compute, errors.

    Request rate and p50/p90/p99 latency of /v1/detect per backend and model (from the gateway's histograms),
    Triton's queue vs compute time and realised batch size per model, errors by code. Ctrl-C quits.
    """
    from jetssd_client.monitor import Monitor, render

    if interval <= 0 or window < 0:
        raise fail("--interval must be > 0 and --window ≥ 0", 2)
    mon = Monitor(url, triton_metrics)
    try:
        if once:
            snap = mon.poll()
            if window > 0 and snap["gateway"]["up"]:
                time.sleep(window)
                snap = mon.poll()
            if as_json:
                typer.echo(json.dumps(snap, indent=2))
            else:
                out.print(render(snap))
            if not snap["gateway"]["up"]:
                raise fail(f"cannot read the gateway's metrics at {url}/metrics: {snap['gateway'].get('error')}", 1)
            return
        from rich.live import Live

        refreshes = 0
        with Live(render(mon.poll()), console=out, auto_refresh=False, screen=False) as live:
            while count is None or refreshes < count:
                time.sleep(interval)
                live.update(render(mon.poll()), refresh=True)
                refreshes += 1
    except KeyboardInterrupt:
        pass
    finally:
        mon.close()


def main() -> None:
    """Console-script entry point (``jetssd-client``)."""
    app()


if __name__ == "__main__":
    main()
