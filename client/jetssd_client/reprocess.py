"""``jetssd-client reprocess``: every event of some files through the service, resumable, exactly once.

Pipeline (one process): a reader thread reads the inputs with :mod:`jetssd.io` in order and encodes batches of
``batch`` events (PF candidates when present, pixels otherwise); ``concurrency`` requests are in flight on one
:class:`~jetssd_client.AsyncClient` (keep-alive connections, retries); answers are written **in input order**
to an append-only journal (:mod:`jetssd_client.journal`), one fsync'd line per event.

With ``dask`` the same pipeline runs inside Dask tasks (one per chunk of a file), each worker a client of the
service; tasks return their records and the driver alone writes the journal, in input order.

Resume: the journal (the ``.jsonl`` output itself, or ``OUT.journal.jsonl`` for ``.parquet``/``.h5``) holds only
complete records; a restart with the same inputs reads back the completed ids, truncates a torn last line and
sends only the rest. ``OUT.run.json`` (the run manifest) ties an output to its inputs and model, so a restart
with other inputs is refused instead of mixing two runs. ``.parquet``/``.h5`` are written from the complete
journal at the end, atomically.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from itertools import pairwise
from pathlib import Path
from typing import Any

import httpx

from jetssd.atomic import write_text_atomic
from jetssd.io import DatasetFormatError, EventFile, open_events
from jetssd_client.client import AsyncClient, RetryNotice
from jetssd_client.encode import encode_event, request_body
from jetssd_client.errors import ApiError
from jetssd_client.journal import Journal, JournalError, Recovery, read_records
from jetssd_client.results import LABELS, DetectResponse
from jetssd_client.retry import RetryPolicy

FORMATS = {".jsonl": "jsonl", ".parquet": "parquet", ".h5": "h5", ".hdf5": "h5"}
MANIFEST_VERSION = 1
CONFIDENT = 0.5
"""Score threshold of the "confident jets" counts in the summary (the outputs keep every jet)."""


class InputError(Exception):
    """An input file that cannot be read, or arguments that cannot work (exit code 2, before any request)."""


class ResumeError(Exception):
    """The output belongs to another run, or cannot be resumed safely (exit code 2, before any request)."""


class ReprocessError(Exception):
    """Processing stopped (the service failed after retries, an input broke mid-way); the output is resumable."""


# ------------------------------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class InputFile:
    """One input: absolute path, id prefix (the file stem), events, layout, size in bytes."""

    path: str
    stem: str
    events: int
    format: str
    size: int

    def event_id(self, index: int) -> str:
        return f"{self.stem}:{index}"


def inspect_inputs(paths: Sequence[str | os.PathLike[str]]) -> list[InputFile]:
    """Open every input (layout check + first event read) before any request. Raises :class:`InputError`."""
    if not paths:
        raise InputError("no input files")
    out: list[InputFile] = []
    stems: dict[str, str] = {}
    for raw in paths:
        path = os.path.abspath(os.fspath(raw))
        try:
            with open_events(path) as f:
                n = len(f)
                if n:
                    f[0]  # a readable layout whose data cannot be decoded fails here, not mid-run
                fmt = f.format
        except DatasetFormatError as exc:
            raise InputError(f"cannot read input {raw}: {exc}") from exc
        stem = Path(path).stem
        if stem in stems:
            raise InputError(f"inputs {stems[stem]} and {path} have the same file stem {stem!r}; event ids "
                             f"(<stem>:<index>) would collide: rename one of them")
        stems[stem] = path
        out.append(InputFile(path, stem, n, fmt, os.path.getsize(path)))
    return out


def runs(indices: Sequence[int]) -> Iterator[tuple[int, int]]:
    """Sorted indices → maximal [start, stop) runs of consecutive values."""
    start = prev = None
    for i in indices:
        if start is None:
            start = prev = i
        elif i == prev + 1:  # type: ignore[operator]
            prev = i
        else:
            yield start, prev + 1  # type: ignore[operator]
            start = prev = i
    if start is not None:
        yield start, prev + 1  # type: ignore[operator]


@dataclass(frozen=True)
class Span:
    """Events [start, stop) of one input: the unit of reading (and of a Dask task)."""

    input: InputFile
    start: int
    stop: int


def todo_spans(inputs: Sequence[InputFile], done: set[str], max_events: int | None = None) -> list[Span]:
    """The events not in ``done``, in input order, as spans of at most ``max_events`` events."""
    spans: list[Span] = []
    for inp in inputs:
        missing = [i for i in range(inp.events) if inp.event_id(i) not in done]
        for a, b in runs(missing):
            step = max_events or (b - a)
            spans.extend(Span(inp, s, min(b, s + step)) for s in range(a, b, step))
    return spans


@dataclass(frozen=True)
class Batch:
    seq: int
    ids: list[str]
    body: bytes


def iter_batches(spans: Iterable[Span], batch: int, backend: str | None, model: str | None,
                 read_chunk: int = 256) -> Iterator[Batch]:
    """Encoded requests of ``batch`` events, in input order (batches may span files)."""
    seq = 0
    ids: list[str] = []
    events: list[dict[str, Any]] = []
    reader: EventFile | None = None
    try:
        for span in spans:
            if reader is None or reader.path != span.input.path:
                if reader is not None:
                    reader.close()
                reader = open_events(span.input.path)
            f = reader
            try:
                for a in range(span.start, span.stop, read_chunk):
                    chunk = next(f.iter_chunks(read_chunk, a, min(span.stop, a + read_chunk)))
                    for k, event in enumerate(chunk):
                        rid = span.input.event_id(a + k)
                        ids.append(rid)
                        events.append(encode_event(event, rid))
                        if len(ids) == batch:
                            yield Batch(seq, ids, request_body(events, backend, model))
                            seq, ids, events = seq + 1, [], []
            except DatasetFormatError as exc:
                raise ReprocessError(f"input {span.input.path} became unreadable: {exc}") from exc
        if ids:
            yield Batch(seq, ids, request_body(events, backend, model))
    finally:
        if reader is not None:
            reader.close()


# ------------------------------------------------------------------------------------------------- pipeline


@dataclass
class Stats:
    """Counters of one run (this invocation)."""

    events: int = 0
    requests: int = 0
    retries: int = 0
    fallbacks: int = 0
    backends: Counter[str] = field(default_factory=Counter)

    def add_response(self, response: DetectResponse) -> None:
        self.events += len(response.events)
        self.requests += 1
        self.retries += response.attempts - 1
        self.fallbacks += int(response.fallback)
        self.backends[response.backend] += 1


async def run_pipeline(batches: Iterator[Batch], client: AsyncClient, concurrency: int,
                       on_result: Callable[[Batch, DetectResponse], None]) -> None:
    """Send ``batches`` with ``concurrency`` requests in flight; ``on_result`` sees them in ``seq`` order.

    Reading and encoding run in a thread (overlapping the requests). The first failure cancels the rest and
    is raised; ``on_result`` has then seen exactly the batches before the first unfinished one.
    """
    queue: asyncio.Queue[Batch | None] = asyncio.Queue(maxsize=max(2, concurrency))
    done: dict[int, tuple[Batch, DetectResponse]] = {}
    next_seq = 0  # iter_batches numbers from 0

    async def produce() -> None:
        while (item := await asyncio.to_thread(next, batches, None)) is not None:
            await queue.put(item)
        for _ in range(concurrency):
            await queue.put(None)

    async def work() -> None:
        nonlocal next_seq
        while (item := await queue.get()) is not None:
            try:
                response = await client.detect_body(item.body, len(item.ids))
            except ApiError as exc:
                k = _event_index(exc.field)
                if k is not None and k < len(item.ids):  # name the event, not its position in the request
                    raise ReprocessError(f"the gateway refused event {item.ids[k]}: {exc}") from None
                raise
            done[item.seq] = (item, response)
            while next_seq in done:
                on_result(*done.pop(next_seq))
                next_seq += 1

    failure: BaseException | None = None
    try:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(produce())
            for _ in range(concurrency):
                tg.create_task(work())
    except BaseExceptionGroup as group:
        failure = _first(group)
    if failure is not None:  # raised outside the handler: no exception group in its context (Dask pickles it)
        raise failure
    if done:
        raise ReprocessError(f"internal error: batches {sorted(done)} answered but not written; please report this")


def _event_index(field: str | None) -> int | None:
    match = re.match(r"events\[(\d+)\]", field or "")
    return int(match.group(1)) if match else None


def _first(group: BaseExceptionGroup[Any]) -> BaseException:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


# ------------------------------------------------------------------------------------------------- dask


@dataclass(frozen=True)
class WorkerSettings:
    """What a Dask task needs to be a client of the service (picklable)."""

    url: str
    backend: str | None
    model: str | None
    batch: int
    concurrency: int
    timeout: float
    retry: RetryPolicy


@dataclass
class TaskResult:
    seq: int
    batches: list[tuple[list[str], DetectResponse]]


def process_span(seq: int, span: Span, settings: WorkerSettings) -> TaskResult:
    """A Dask task: the events of ``span`` through the service; returns every batch's ids and response."""
    out: list[tuple[list[str], DetectResponse]] = []

    async def go() -> None:
        async with AsyncClient(settings.url, timeout=settings.timeout, retry=settings.retry) as c:
            await run_pipeline(iter_batches([span], settings.batch, settings.backend, settings.model), c,
                               settings.concurrency, lambda b, r: out.append((b.ids, r)))

    try:
        asyncio.run(go())
    except Exception as exc:
        exc.__context__ = exc.__cause__ = None  # travels to the driver pickled: keep it self-contained
        raise
    return TaskResult(seq, out)


def run_dask(address: str, spans: Sequence[Span], settings: WorkerSettings,
             on_result: Callable[[list[str], DetectResponse], None], *, log: Callable[[str], None]) -> None:
    """Spread ``spans`` over a Dask cluster (``address``, or ``local[:N]`` for an in-process LocalCluster);
    ``on_result`` sees every batch in input order, on this (the driver's) process."""
    try:
        from distributed import Client as DaskClient
        from distributed import LocalCluster, as_completed
    except ImportError as exc:
        raise InputError("--dask needs the dask extra: pip install 'jetssd-client[dask]'") from exc

    with contextlib.ExitStack() as stack:
        if address == "local" or address.startswith("local:"):
            n = int(address.partition(":")[2] or 2)
            cluster = stack.enter_context(LocalCluster(n_workers=n, threads_per_worker=1, processes=False,
                                                       dashboard_address=":0"))
            address = cluster.scheduler_address
        try:
            dask = stack.enter_context(DaskClient(address, timeout=30))
        except (OSError, TimeoutError) as exc:
            raise ReprocessError(f"cannot connect to the Dask scheduler at {address}: {exc}") from exc
        threads = sum(dask.nthreads().values()) or 1
        log(f"dask: {len(dask.nthreads())} workers, {threads} threads at {address}; {len(spans)} tasks")
        window = 2 * threads
        todo = iter(enumerate(spans))
        futures = []
        for seq, span in todo:
            futures.append(dask.submit(process_span, seq, span, settings, pure=False, retries=0))
            if len(futures) >= window:
                break
        pending = as_completed(futures)
        finished: dict[int, TaskResult] = {}
        next_seq = 0
        try:
            for future in pending:
                result: TaskResult = future.result()  # re-raises the task's exception
                finished[result.seq] = result
                while next_seq in finished:
                    for ids, response in finished.pop(next_seq).batches:
                        on_result(ids, response)
                    next_seq += 1
                item = next(todo, None)
                if item is not None:
                    pending.add(dask.submit(process_span, item[0], item[1], settings, pure=False, retries=0))
        except BaseException:
            dask.cancel(futures + list(pending.futures))
            raise


# ------------------------------------------------------------------------------------------------- the run


@dataclass(frozen=True)
class Options:
    inputs: list[InputFile]
    out: Path
    url: str
    backend: str | None = None
    model: str | None = None
    batch: int = 16
    concurrency: int = 2
    timeout: float = 120.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    overwrite: bool = False
    fsync: bool = True
    dask: str | None = None
    dask_chunk: int = 256
    transport: httpx.AsyncBaseTransport | None = None
    """An httpx transport for the requests (tests: :class:`jetssd_client.testing.FakeGateway`); not with dask."""


def output_format(out: Path) -> str:
    try:
        return FORMATS[out.suffix.lower()]
    except KeyError:
        raise InputError(f"--out {out}: unknown output format {out.suffix!r}; use .jsonl, .parquet or .h5") from None


def journal_path(out: Path) -> Path:
    return out if output_format(out) == "jsonl" else out.with_name(out.name + ".journal.jsonl")


def manifest_path(out: Path) -> Path:
    return out.with_name(out.name + ".run.json")


def _identity(opts: Options) -> dict[str, Any]:
    return {"inputs": [asdict(i) for i in opts.inputs], "backend": opts.backend, "model": opts.model,
            "format": output_format(opts.out)}


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class Run:
    """One ``reprocess`` invocation: resume checks, the journal, the pipeline, the final outputs."""

    def __init__(self, opts: Options, log: Callable[[str], None] = print,
                 on_retry: Callable[[RetryNotice], None] | None = None) -> None:
        self.opts = opts
        self.log = log
        self.on_retry = on_retry
        self.format = output_format(opts.out)
        self.journal_path = journal_path(opts.out)
        self.manifest_path = manifest_path(opts.out)
        self.expected = [inp.event_id(i) for inp in opts.inputs for i in range(inp.events)]
        self.manifest: dict[str, Any] = {}
        self.stats = Stats()
        self.recovery = Recovery()
        self.journal: Journal | None = None

    # -- resume --------------------------------------------------------------------------------------

    def prepare(self) -> bool:
        """Check or create the manifest, recover the journal. Returns False when the output is complete."""
        out = self.opts.out
        if not out.parent.is_dir():
            raise InputError(f"--out {out}: folder {out.parent} does not exist")
        if self.opts.overwrite:
            for p in (out, self.journal_path, self.manifest_path):
                p.unlink(missing_ok=True)
        identity = _identity(self.opts)
        if self.manifest_path.exists():
            try:
                manifest = json.loads(self.manifest_path.read_text())
            except ValueError as exc:
                raise ResumeError(f"{self.manifest_path} is not valid JSON ({exc}); remove it and the output, "
                                  "or pass --overwrite") from exc
            diffs = [k for k, v in identity.items() if manifest.get("identity", {}).get(k) != v]
            if diffs:
                raise ResumeError(f"{out} belongs to another run (different {', '.join(diffs)}; see "
                                  f"{self.manifest_path}); rerun with the same inputs and --backend/--model to "
                                  "resume, or pass --overwrite to start again, or choose another --out")
            self.manifest = manifest
            if manifest.get("status") == "complete" and out.exists() and not (
                    self.format != "jsonl" and self.journal_path.exists()):
                return False
        else:
            if out.exists() or self.journal_path.exists():
                existing = out if out.exists() else self.journal_path
                raise ResumeError(f"{existing} exists but has no run manifest {self.manifest_path.name}: it was not "
                                  "written by jetssd-client reprocess (or its manifest was removed); pass "
                                  "--overwrite to replace it, or choose another --out")
            self.manifest = {"tool": "jetssd-client reprocess", "manifest_version": MANIFEST_VERSION,
                             "identity": identity, "output": str(out), "served_by": None, "status": "running",
                             "started": _now()}
            self._save_manifest()
        try:
            self.journal, self.recovery = Journal.open(self.journal_path, fsync=self.opts.fsync)
        except JournalError as exc:
            raise ResumeError(str(exc)) from exc
        unknown = self.journal.ids - set(self.expected)
        if unknown:
            raise ResumeError(f"{self.journal_path} holds {len(unknown)} events that are not in the inputs "
                              f"(e.g. {sorted(unknown)[0]!r}); pass --overwrite or choose another --out")
        if self.manifest.get("status") == "complete":  # an interrupted finalisation: redo it
            self.manifest["status"] = "running"
        return True

    def _save_manifest(self) -> None:
        self.manifest["updated"] = _now()
        write_text_atomic(self.manifest_path, json.dumps(self.manifest, indent=2, sort_keys=True) + "\n")

    # -- processing ----------------------------------------------------------------------------------

    def _check_served_by(self, response: DetectResponse) -> None:
        served = {"model": response.model, "model_version": response.model_version}
        recorded = self.manifest.get("served_by")
        if recorded is None:
            self.manifest["served_by"] = served
            self._save_manifest()  # before the first record: every record's model is in the manifest
        elif recorded != served:
            raise ReprocessError(
                f"the service now answers with model {served['model']} v{served['model_version']}, but {self.opts.out} "
                f"holds results of {recorded['model']} v{recorded['model_version']}; one output must not mix model "
                "versions: pass --overwrite to start again, or reprocess into another --out")

    def record(self, ids: Sequence[str], response: DetectResponse) -> None:
        """Append one batch's records (in order) to the journal."""
        assert self.journal is not None
        self._check_served_by(response)
        for rid, event in zip(ids, response.events, strict=True):
            if event.id != rid:
                raise ReprocessError(f"the gateway answered event id {event.id!r} for {rid!r}")
        self.journal.append({"id": e.id, "jets": [j.to_json() for j in e.jets]} for e in response.events)
        self.stats.add_response(response)

    def process(self, progress: Callable[[int], None] | None = None) -> None:
        """Send every event not yet in the journal. Raises the first failure (the journal stays resumable)."""
        assert self.journal is not None
        opts = self.opts
        spans = todo_spans(opts.inputs, self.journal.ids, opts.dask_chunk if opts.dask else None)

        def on_result(ids: Sequence[str], response: DetectResponse) -> None:
            self.record(ids, response)
            if progress is not None:
                progress(len(ids))

        if opts.dask:
            settings = WorkerSettings(opts.url, opts.backend, opts.model, opts.batch, opts.concurrency, opts.timeout,
                                      opts.retry)
            run_dask(opts.dask, spans, settings, on_result, log=self.log)
            return

        async def go() -> None:
            async with AsyncClient(opts.url, timeout=opts.timeout, retry=opts.retry, on_retry=self.on_retry,
                                   transport=opts.transport) as client:
                await run_pipeline(iter_batches(spans, opts.batch, opts.backend, opts.model), client,
                                   opts.concurrency, lambda b, r: on_result(b.ids, r))

        asyncio.run(go())

    @property
    def remaining(self) -> int:
        assert self.journal is not None
        return len(self.expected) - len(self.journal)

    # -- the end -------------------------------------------------------------------------------------

    def finish(self, elapsed_s: float) -> dict[str, Any]:
        """Verify the journal holds every event once, write .parquet/.h5, mark the run complete; the summary."""
        assert self.journal is not None
        self.journal.close()
        if self.remaining:
            raise ReprocessError(f"{self.remaining} events are missing from {self.journal_path} although every "
                                 "request succeeded; please report this")
        summary = self.summarise(elapsed_s)
        if self.format != "jsonl":
            self._write_final()
        self.manifest["status"] = "complete"
        self.manifest["finished"] = _now()
        self.manifest["summary"] = summary
        self._save_manifest()
        if self.format != "jsonl":
            self.journal_path.unlink(missing_ok=True)
        return summary

    def _records_in_order(self) -> list[dict[str, Any]] | Iterator[dict[str, Any]]:
        position = {rid: k for k, rid in enumerate(self.expected)}
        ids = [r["id"] for r in read_records(self.journal_path)]
        if all(position[a] < position[b] for a, b in pairwise(ids)):
            return read_records(self.journal_path)
        return sorted(read_records(self.journal_path), key=lambda r: position[r["id"]])

    def _write_final(self) -> None:
        from jetssd_client.outputs import write_h5, write_parquet

        meta = {"tool": "jetssd-client reprocess", "served_by": self.manifest.get("served_by"),
                "inputs": self.manifest["identity"]["inputs"], "requested_backend": self.opts.backend,
                "requested_model": self.opts.model}
        writer = write_parquet if self.format == "parquet" else write_h5
        try:
            writer(self.opts.out, self._records_in_order(), meta)
        except ImportError as exc:
            raise InputError(f"writing {self.opts.out} needs pyarrow: pip install 'jetssd-client[parquet]'") from exc

    def summarise(self, elapsed_s: float) -> dict[str, Any]:
        jets: Counter[str] = Counter()
        confident: Counter[str] = Counter()
        events = without = 0
        for record in read_records(self.journal_path):
            events += 1
            if not record["jets"]:
                without += 1
            for jet in record["jets"]:
                jets[jet["label"]] += 1
                if jet["score"] >= CONFIDENT:
                    confident[jet["label"]] += 1
        s = self.stats
        return {
            "events": events,
            "events_without_jets": without,
            "jets": {label: jets.get(label, 0) for label in LABELS},
            f"jets_score_ge_{CONFIDENT}": {label: confident.get(label, 0) for label in LABELS},
            "this_run": {"events": s.events, "requests": s.requests, "retries": s.retries, "failures": 0,
                         "fallbacks": s.fallbacks, "backends": dict(s.backends), "elapsed_s": round(elapsed_s, 3),
                         "events_per_s": round(s.events / elapsed_s, 2) if elapsed_s > 0 else None},
            "resumed_with": len(self.expected) - s.events,
            "served_by": self.manifest.get("served_by"),
            "output": str(self.opts.out),
        }

    def close(self) -> None:
        if self.journal is not None:
            self.journal.close()

