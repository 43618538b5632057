"""The `jetssd` command line: generate events, inspect files, draw event displays.

Heavy or optional imports (Pythia, FastJet, matplotlib) happen inside the commands, so ``jetssd --help``
is instant and works without the optional extras.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from rich.console import Console
from rich.markup import escape

from jetssd.dsp import DEFAULT_PERCENTILE  # a constant only: the compiler itself (torch) loads in the command

app = typer.Typer(
    name="jetssd",
    help="PFJet-SSD: jet detection on LHC events. Generate events, inspect datasets, draw event displays.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)


def _calibration_pixels(files: list[Path], events: int) -> list[Any]:
    """The first ``events // len(files)`` (at least 1) events' pixels of each calibration file, in order."""
    from jetssd.io import open_events

    per_file = max(1, events // max(1, len(files)))
    pixels: list[Any] = []
    for path in files:
        with open_events(path) as f:
            pixels.extend(f.read_pixels(i) for i in range(min(per_file, len(f))))
    return pixels


def _fail(message: str, code: int = 2) -> typer.Exit:
    # Escaped: messages carry paths and "pip install 'jetssd[train]'", which rich would read as style tags.
    console.print(f"[bold red]error:[/] {escape(message)}")
    return typer.Exit(code)


@app.command()
def generate(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory (one HDF5 file per shard).")],
    channels: Annotated[str, typer.Option(help="Comma-separated channels: WW, ZZ, HH, tt (RS graviton → pair, "
                                               "hadronic W/Z, H→bb) and QCD multijet.")] = "WW,ZZ,HH,tt",
    events: Annotated[int, typer.Option(help="Events per channel.")] = 1000,
    pileup: Annotated[float, typer.Option(help="Mean pileup μ (Poisson), drawn from a cached min-bias pool.")] = 50.0,
    mass: Annotated[float, typer.Option(help="RS graviton mass in GeV (QCD: sets the p̂T threshold).")] = 3500.0,
    seed: Annotated[int, typer.Option(help="Master seed: same seed and settings give identical events.")] = 1,
    workers: Annotated[int, typer.Option(help="Worker processes (0 = all cores).")] = 0,
    format: Annotated[str, typer.Option("--format", help="reference (Zenodo layout) or jetssd (adds PF "
                                                          "candidates, continuous truth).")] = "jetssd",
    truth: Annotated[str, typer.Option(help="Truth convention of the labels: status22 (paper parity, W from "
                                            "top included) or lastcopy (physics).")] = "status22",
    shard_size: Annotated[int, typer.Option(help="Events per output file; also the unit of work of one core.")] = 500,
    pool_size: Annotated[int, typer.Option(help="Min-bias events in the pileup pool.")] = 5000,
    chs: Annotated[bool, typer.Option("--chs", help="Drop pileup tracks from the images.")] = False,
    baseline: Annotated[bool, typer.Option("--baseline/--no-baseline",
                                           help="Fill the FastJet physics baseline.")] = True,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Discard files of an earlier run with other "
                                                                "settings in --out.")] = False,
    cache_dir: Annotated[Path | None, typer.Option(help="Cache for the min-bias pool and Pythia tables "
                                                        "(default OUT/.cache).")] = None,
) -> None:
    """Generate RS-graviton and QCD events with Pythia 8, pileup and a Delphes-like fast simulation.

    Output is sharded (OUT/<channel>_<shard>.h5) and resumable: rerun the same command after an
    interruption and only the missing shards are made. Needs the datagen extra: pip install 'jetssd\\[datagen]'.
    """
    try:
        from jetssd.datagen.generate import GenerationSettings, ManifestMismatchError, run_generation
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise _fail(f"{exc}. Install the generator extra: pip install 'jetssd[datagen]'") from None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    settings = GenerationSettings(
        channels=tuple(c.strip() for c in channels.split(",") if c.strip()), events=events, pileup=pileup,
        mass=mass, seed=seed, format=format, truth=truth, shard_size=shard_size,  # type: ignore[arg-type]
        pool_size=pool_size, chs=chs, baseline=baseline,
    )
    try:
        settings.validate()
    except ValueError as exc:
        raise _fail(str(exc)) from None

    columns = (TextColumn("[bold]generating"), BarColumn(), MofNCompleteColumn(), TextColumn("events"),
               TextColumn("{task.fields[rate]}"), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task("generate", total=None, rate="")

        def on_progress(done: int, total: int) -> None:
            elapsed = bar.tasks[0].elapsed or 0.0
            rate = f"{done / elapsed:,.0f} ev/s" if elapsed > 0 and done else ""
            bar.update(task, completed=done, total=total, rate=rate)

        try:
            report = run_generation(settings, out, workers=workers or None, overwrite=overwrite,
                                    cache_dir=cache_dir, on_progress=on_progress)
        except (ManifestMismatchError, ValueError) as exc:
            raise _fail(str(exc)) from None
    rate = report.generated_events / report.seconds if report.seconds > 0 else 0.0
    console.print(
        f"wrote {len(report.files)} file(s) to {out}: {report.generated_events} events generated"
        + (f", {report.skipped_events} already present" if report.skipped_events else "")
        + f" in {report.seconds:.1f} s ({rate:.1f} events/s on {report.workers} worker(s), "
        f"{rate / report.workers:.1f} per worker)",
        soft_wrap=True,
    )
    console.print("Events made with Pythia 8.3 (arXiv:2203.11601)"
                  + (" and FastJet (EPJC72(2012)1896, arXiv:1111.6097)" if baseline else "")
                  + ": please cite them.", style="dim", soft_wrap=True)


@dataclass
class FileSummary:
    """What `jetssd info` reports about one event file."""

    file: str
    format: str
    events: int
    bytes: int
    bytes_per_event: float
    mean_pixels: float
    mean_pf_candidates: float | None  # None for files without PF candidates (reference layout)
    truth: dict[str, int]  # truth objects per class in ``labels``


def summarize_file(path: Path) -> FileSummary:
    """Stream one file and count pixels, candidates and truth objects. Raises DatasetFormatError."""
    import numpy as np

    from jetssd.event import CLASS_NAMES
    from jetssd.io import open_events

    with open_events(path) as f:
        n_pix, n_pf = [], []
        n_truth = np.zeros(len(CLASS_NAMES), np.int64)
        for chunk in f.iter_chunks(1000):
            for ev in chunk:
                n_pix.append(len(ev.pixels))
                if ev.pf is not None:
                    n_pf.append(len(ev.pf))
                n_truth += np.bincount(ev.truth.cls, minlength=len(CLASS_NAMES))
        size = path.stat().st_size
        return FileSummary(
            file=str(path), format=f.format, events=len(f), bytes=size, bytes_per_event=size / max(1, len(f)),
            mean_pixels=float(np.mean(n_pix)) if n_pix else 0.0,
            mean_pf_candidates=float(np.mean(n_pf)) if n_pf else None,
            truth={name: int(n) for name, n in zip(CLASS_NAMES, n_truth, strict=True)},
        )


@app.command()
def info(
    files: Annotated[list[Path], typer.Argument(help="HDF5 files in the reference layout or ours.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Summarise event files: format, events, bytes, pixels and candidates per event, truth objects per class."""
    from jetssd.io import DatasetFormatError

    try:
        rows = [summarize_file(path) for path in files]
    except DatasetFormatError as exc:
        raise _fail(str(exc)) from None
    if as_json:
        typer.echo(json.dumps([asdict(r) for r in rows], indent=2))
        return
    from rich.table import Table

    table = Table("file", "format", "events", "bytes/event", "pixels/event", "PF cands/event", "t", "V", "H")
    for r in rows:
        table.add_row(Path(r.file).name, r.format, str(r.events), f"{r.bytes_per_event:,.0f}", f"{r.mean_pixels:,.0f}",
                      "—" if r.mean_pf_candidates is None else f"{r.mean_pf_candidates:,.0f}",
                      *(str(n) for n in r.truth.values()))
    Console().print(table)


@app.command()
def display(
    file: Annotated[Path, typer.Argument(help="HDF5 file in the reference layout or ours.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="PNG to write.")],
    event: Annotated[int, typer.Option("--event", "-n", help="Event index in the file.")] = 0,
) -> None:
    """Draw one event: the three channels and their sum, truth jets (φ-wrapped circles), baseline jets."""
    from jetssd.display import render_event
    from jetssd.io import DatasetFormatError, open_events

    try:
        with open_events(file) as f:
            if not -len(f) <= event < len(f):
                raise _fail(f"--event: {event} is out of range; {file} holds {len(f)} events")
            ev = f[event]
            if not ev.process:  # reference-layout files we generated name their channel in the settings
                ev.process = _channel_from_settings(f.attrs.get("generator_settings"))
    except DatasetFormatError as exc:
        raise _fail(str(exc)) from None
    path = render_event(ev, out, title=f"{file.name} #{event}")
    console.print(f"wrote {path}")


@app.command()
def train(
    config: Annotated[Path | None, typer.Option("--config", "-c", help=(
        # Backslashes: rich would read "[data]" as a style tag and print nothing.
        "TOML file with \\[data], \\[model], \\[optim], \\[loss], \\[compress], \\[anchors], \\[run] sections "
        "(any subset; see --print-config)."))] = None,
    overrides: Annotated[list[str] | None, typer.Option("--set", help="Override one key, e.g. --set optim.lr=1e-3 "
                                                                      "--set 'data.train=[\"d/*.h5\"]'.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from RUN.OUT/last.pt if it exists.")] = False,
    print_config: Annotated[bool, typer.Option("--print-config", help="Print the resolved configuration and "
                                                                      "exit.")] = False,
) -> None:
    """Train PFJet-SSD on generated (or reference) event files. Needs the train extra (torch).

    Writes checkpoints (last.pt, best.pt), metrics.jsonl and loss.png to run.out. Under
    torchrun --nproc-per-node N it trains data-parallel.
    """
    from jetssd.train.config import TrainConfig

    try:
        cfg = TrainConfig.load(config, overrides or [])
    except (ValueError, OSError) as exc:
        raise _fail(str(exc)) from None
    if print_config:
        typer.echo(cfg.dumps())
        return
    if not cfg.data.train or not cfg.data.validation:
        raise _fail("data.train and data.validation must name event files (--set 'data.train=[\"x/*.h5\"]')")
    try:
        from jetssd.train.trainer import train as run_training
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise _fail(f"{exc}. Install the training extra: pip install 'jetssd[train]'") from None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.fields[values]}"), console=console) as bar:
        tasks: dict[str, Any] = {}

        def on_progress(phase: str, step: int, total: int, values: dict[str, float]) -> None:
            shown = " ".join(f"{k} {v:.4g}" for k, v in values.items())
            if phase == "validation":
                console.print(f"epoch {step}/{total} validation: {shown}", soft_wrap=True)
                return
            if phase not in tasks:
                tasks[phase] = bar.add_task(phase, total=total, values="")
            bar.update(tasks[phase], completed=step, values=shown)

        try:
            result = run_training(cfg, resume=resume, progress=on_progress)
        except (ValueError, FileNotFoundError) as exc:
            raise _fail(str(exc)) from None
    if os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 validates and reports
        return
    console.print(f"best validation loss {result.best_val_loss:.4f} at epoch {result.best_epoch + 1}"
                  + (" (stopped early)" if result.stopped_early else "") + f"; checkpoints in {result.out}",
                  soft_wrap=True)


@app.command()
def export(
    checkpoint: Annotated[Path, typer.Argument(help="Training checkpoint (best.pt).")],
    variant: Annotated[str, typer.Option(help="Model variant: fpn or twn (int8: jetssd quantize).")] = "fpn",
    repository: Annotated[Path, typer.Option(help="Model repository root.")] = Path("model_repository"),
    version: Annotated[int, typer.Option(help="Model version (a numbered folder).")] = 1,
    metrics: Annotated[Path | None, typer.Option(help="report.json of `jetssd evaluate` to record as the "
                                                      "model's test-set metrics.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing version.")] = False,
) -> None:
    """Export a checkpoint to ONNX (input `image` [N,3,340,360] GeV) with metadata.json, checked against PyTorch.

    Writes REPOSITORY/pfjet_ssd_<variant>/<version>/{model.onnx, metadata.json} and brings the variant's Triton
    configs up to date (pfjet_ssd_<variant>, pfjet_nms_<variant>, ensemble pfjet_<variant>): servable at once.
    Variants fpn and twn; int8 comes from `jetssd quantize`.
    """
    try:
        from jetssd.export import export_model
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise _fail(f"{exc}. Install the training extra: pip install 'jetssd[train]'") from None
    try:
        recorded = json.loads(metrics.read_text()) if metrics is not None else None
        path = export_model(checkpoint, variant, repository, version=version, metrics=recorded, overwrite=overwrite)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as exc:
        raise _fail(str(exc)) from None
    console.print(f"exported {path}")


@app.command()
def evaluate(
    model: Annotated[list[str], typer.Option("--model", "-m", help="Exported model folder (pfjet_ssd_<variant> or "
                                                                  "pfjet_ssd_<variant>/<version>), optionally "
                                                                  "NAME=DIR; repeatable.")],
    data: Annotated[list[Path], typer.Option("--data", "-d", help="Event files (reference layout or ours); "
                                                                  "repeatable.")],
    report: Annotated[Path, typer.Option("--report", "-r", help="Folder for report.json and the plots.")],
    max_events: Annotated[int, typer.Option(help="Stop after this many events (0 = all).")] = 0,
    truth: Annotated[str, typer.Option(help="labels (the file's labels) or lastcopy (our format only).")] = "labels",
    threads: Annotated[int, typer.Option(help="ONNX Runtime threads (0 = all cores).")] = 0,
    batch_size: Annotated[int, typer.Option(help="Events per inference batch.")] = 16,
) -> None:
    """Evaluate models and the physics baseline on events: AP (reference 11-point, VOC, COCO), P@R, plots, QCD fakes."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from jetssd.evaluate.report import evaluate as run_evaluation
    from jetssd.inference import OnnxDetector
    from jetssd.io import DatasetFormatError

    if truth not in ("labels", "lastcopy"):
        raise _fail(f"--truth: {truth!r} is neither labels nor lastcopy")
    truth_convention: Literal["labels", "lastcopy"] = "labels" if truth == "labels" else "lastcopy"
    detectors = {}
    try:
        for item in model:
            name, sep, folder = item.partition("=")
            path = Path(folder if sep else name)
            detector = OnnxDetector(path, threads=threads or None)
            detectors[name if sep else f"{detector.variant} v{detector.version}"] = detector
    except (FileNotFoundError, ValueError) as exc:
        raise _fail(str(exc)) from None
    with Progress(TextColumn("[bold]evaluating"), BarColumn(), MofNCompleteColumn(), TextColumn("events"),
                  TimeRemainingColumn(), console=console) as bar:
        task = bar.add_task("evaluate", total=None)
        try:
            result = run_evaluation(detectors, data, report, max_events=max_events, batch_size=batch_size,
                                    truth=truth_convention,
                                    progress=lambda done, total: bar.update(task, completed=done, total=total))
        except (ValueError, FileNotFoundError, DatasetFormatError) as exc:
            raise _fail(str(exc)) from None
    for name, summary in {**result["models"], "baseline": result.get("baseline")}.items():
        if summary:
            ap = summary["ap"]
            seam = summary["seam"]
            console.print(f"{name}: AP voc {_fmt(ap['voc'])}, coco {_fmt(ap['coco'])}, reference "
                          f"{_fmt(ap['reference'])}; near the φ edge ({seam['n_truth']} truths within "
                          f"{seam['window_rad']} rad of ±π) voc {_fmt(seam['ap_voc'])}", soft_wrap=True)
    console.print(f"report: {report / 'report.json'}")


@app.command()
def prune(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint trained with compress.flop_reg > 0.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="New checkpoint (never the input; must not exist).")],
    iteration: Annotated[int, typer.Option(help="Row 1–6 of the reference's caps schedule (6 = caps of 128).")] = 6,
    caps: Annotated[str | None, typer.Option(help="Explicit caps for the 11 conv blocks, comma-separated "
                                                  "('-' = no cap); overrides --iteration.")] = None,
) -> None:
    """Remove channels whose BN γ is small (network slimming, reference §5.2) and write a new checkpoint.

    Fine-tune the result with `jetssd train --set run.init=OUT` (a fresh optimizer), then prune again.
    """
    from jetssd.prune import REFERENCE_CAPS, prune_checkpoint

    if caps is not None:
        try:
            cap_list: list[int | None] = [None if c.strip() == "-" else int(c) for c in caps.split(",")]
        except ValueError:
            raise _fail(f"--caps: {caps!r} is not a comma-separated list of integers or '-'") from None
    elif 1 <= iteration <= len(REFERENCE_CAPS):
        cap_list = list(REFERENCE_CAPS[iteration - 1])
    else:
        raise _fail(f"--iteration: must be 1…{len(REFERENCE_CAPS)}")
    try:
        widths, record = prune_checkpoint(checkpoint, out, cap_list)
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        raise _fail(str(exc)) from None
    console.print(f"wrote {out}: widths {list(widths)}; inference parameters "
                  f"{record['params_before']['inference']:,} → {record['params_after']['inference']:,}", soft_wrap=True)


@app.command()
def quantize(
    calibration: Annotated[list[Path], typer.Option("--calibration", "-c", help="Event files for calibration "
                                                                               "(repeatable).")],
    model: Annotated[Path | None, typer.Option("--model", "-m", help="Exported float model version folder "
                                                                     "(model_repository/pfjet_ssd_fpn/1): "
                                                                     "post-training quantization.")] = None,
    qat: Annotated[Path | None, typer.Option("--qat", help="Checkpoint of an INT8 quantization-aware training "
                                                           "(jetssd train --set compress.int8_qat=true): exported "
                                                           "with the activation ranges it learned; the events only "
                                                           "check the result.")] = None,
    repository: Annotated[Path, typer.Option(help="Model repository to write pfjet_ssd_int8/<version> into.")]
    = Path("model_repository"),
    events: Annotated[int, typer.Option(help="Calibration events, taken evenly from the files (with --qat at "
                                             "most 32, for the parity checks).")] = 200,
    method: Annotated[str | None, typer.Option(help="percentile (default: clips the rare hot jet pixels that make "
                                                    "min-max ranges too coarse), minmax or entropy; not with "
                                                    "--qat.")] = None,
    version: Annotated[int, typer.Option(help="Version of the int8 model.")] = 1,
    metrics: Annotated[Path | None, typer.Option(help="report.json of `jetssd evaluate` on this int8 model, to "
                                                      "record as its test-set metrics.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing version.")] = False,
) -> None:
    """INT8 quantization with ONNX Runtime: post-training (--model) or from a QAT checkpoint (--qat).

    Per-channel int8 weights and integer Conv kernels; log1p, L2Norm and ECA stay float. Writes
    REPOSITORY/pfjet_ssd_int8/<version> and its Triton configs (pfjet_ssd_int8, pfjet_nms_int8, ensemble
    pfjet_int8). --model calibrates the activation ranges of an exported float model on
    the events. --qat takes a checkpoint trained with `jetssd train --set compress.int8_qat=true` (usually
    fine-tuned from the FPN with --set run.init=...): its BN-folded weights and learned activation ranges become
    the int8 graph, which is checked against the QAT network (metadata quantization.method = "qat").
    (TWN is trained: `jetssd train --set compress.twn=true`.)
    """
    from jetssd.io import DatasetFormatError
    from jetssd.quantize.int8 import PARITY_EVENTS, quantize_model

    if (model is None) == (qat is None):
        raise _fail("give exactly one of --model (post-training quantization) and --qat (a QAT checkpoint)")
    if qat is not None and method is not None:
        raise _fail("--method: a QAT checkpoint brings its own activation ranges; no calibration method applies")
    method = method or "percentile"
    if method not in ("minmax", "entropy", "percentile"):
        raise _fail(f"--method: {method!r} is not minmax, entropy or percentile")
    wanted = events if qat is None else min(events, PARITY_EVENTS)
    try:
        pixels = _calibration_pixels(calibration, wanted)
        recorded = json.loads(metrics.read_text()) if metrics is not None else None
        sources = [str(p) for p in calibration]
        if qat is not None:
            from jetssd.quantize.qat import export_int8_qat

            out = export_int8_qat(qat, repository, pixels, version=version, calibration_sources=sources,
                                  metrics=recorded, overwrite=overwrite)
        else:
            assert model is not None
            out = quantize_model(model, repository, pixels, version=version, method=method,  # type: ignore[arg-type]
                                 calibration_sources=sources, metrics=recorded, overwrite=overwrite)
    except (ValueError, FileNotFoundError, FileExistsError, DatasetFormatError) as exc:
        raise _fail(str(exc)) from None
    quantization = json.loads((out / "metadata.json").read_text())["quantization"]
    console.print(f"wrote {out} ({len(pixels)} events); int8 vs float: {json.dumps(quantization['parity'])}",
                  soft_wrap=True)
    if "qat_parity" in quantization:
        console.print(f"int8 vs the QAT network: {json.dumps(quantization['qat_parity'])}", soft_wrap=True)


@app.command("triton-repo")
def triton_repo(
    repository: Annotated[Path, typer.Option(help="Model repository root.")] = Path("model_repository"),
    variant: Annotated[list[str] | None, typer.Option("--variant", help="Only this variant (repeatable; "
                                                                      "default: every exported one).")] = None,
) -> None:
    """Write the Triton configs (config.pbtxt, model.py shims, NMS metadata, ensembles, README) of the exported models.

    For each REPOSITORY/pfjet_ssd_<variant>/<version>: pfjet_ssd_<variant>, pfjet_nms_<variant> and the ensemble
    pfjet_<variant>. Idempotent: rewrites only what changed.
    """
    from jetssd.triton.repository import write_triton_repository

    try:
        changed = write_triton_repository(repository, variant or None)
    except (ValueError, FileNotFoundError) as exc:
        raise _fail(str(exc)) from None
    for path in changed:
        console.print(f"updated {path}")
    console.print(f"{repository}: {len(changed)} path(s) updated" if changed else f"{repository}: up to date")


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _channel_from_settings(settings_json: object) -> str:
    """The shard channel recorded by `jetssd generate` in a file's ``generator_settings``, or ""."""
    try:
        settings = json.loads(str(settings_json))
        return str(settings["shard"]["channel"])
    except (ValueError, KeyError, TypeError):
        return ""


# ------------------------------------------------------------------------------------------------ dsp (docs/dsp.md)

dsp_app = typer.Typer(help="Fixed-point SensPro DSP emulation of the TWN model (contract: docs/dsp.md).",
                      no_args_is_help=True)
app.add_typer(dsp_app, name="dsp")


@dsp_app.command("compile")
def dsp_compile(
    checkpoint: Annotated[Path, typer.Argument(help="TWN training checkpoint (best.pt, compress.twn = true).")],
    calibration: Annotated[list[Path], typer.Option("--calibration", help="Event files for the activation ranges "
                                                                          "(repeatable; not the test set).")],
    model: Annotated[Path, typer.Option(
        "--model", help="The exported float TWN model the program belongs to (newest version); the program goes "
                        "to <version>/dsp/.")] = Path("model_repository/pfjet_ssd_twn"),
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Program file to write instead "
                                                                 "(default: <model version>/dsp/program.npz).")] = None,
    events: Annotated[int, typer.Option(help="Calibration events, taken evenly from the files.")] = 200,
    percentile: Annotated[float, typer.Option(help="Activation range per channel = this percentile of |x| "
                                                   "(100 = max).")] = DEFAULT_PERCENTILE,
) -> None:
    """Compile a TWN checkpoint into a DSP program: BN folded, 2-bit ternary depthwise weights, int8 weights
    elsewhere, int8 activations with per-channel calibrated scales, integer multipliers and shifts."""
    from jetssd.dsp.compile import compile_twn
    from jetssd.dsp.detector import program_path
    from jetssd.io import DatasetFormatError

    try:
        out = out or program_path(model)
    except FileNotFoundError as exc:
        raise _fail(f"--model: {exc}") from None

    try:
        pixels = _calibration_pixels(calibration, events)
        program = compile_twn(checkpoint, pixels, percentile=percentile)
        program.metadata["calibration"]["sources"] = [str(p) for p in calibration]
        # Provenance: the generator settings (seed, pile-up) of the calibration files, where they were generated.
        program.metadata["calibration"]["generation"] = {
            str(p): json.loads((p.parent / "generation.json").read_text()).get("settings")
            for p in calibration if (p.parent / "generation.json").is_file()}
        program.save(out)
    except (ValueError, FileNotFoundError, DatasetFormatError) as exc:
        raise _fail(str(exc)) from None
    n_ops = len(program.ops)
    console.print(f"wrote {out}: {n_ops} ops, calibrated on {len(pixels)} events", soft_wrap=True)


@dsp_app.command("compare")
def dsp_compare(
    data: Annotated[list[Path], typer.Option("--data", "-d", help="Event files with truth (not the calibration "
                                                                  "events); repeatable.")],
    model: Annotated[Path, typer.Option("--model", help="The float TWN model; its newest version's "
                                                        "dsp/program.npz is the program.")] = Path(
        "model_repository/pfjet_ssd_twn"),
    max_events: Annotated[int, typer.Option(help="Events per file (0 = all).")] = 0,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Also write the JSON here.")] = None,
) -> None:
    """Float TWN (ONNX Runtime, 1 thread) vs its DSP emulation on the same events: AP of both (one matcher),
    the fraction of events with identical confident jets, and the time each took."""
    import time

    from jetssd.dsp.compare import agreement
    from jetssd.dsp.detector import DspDetector
    from jetssd.evaluate.matching import collect
    from jetssd.evaluate.metrics import summarize
    from jetssd.inference import OnnxDetector
    from jetssd.io import DatasetFormatError, open_events

    try:
        dsp = DspDetector(model)
        float_model = OnnxDetector(model, threads=1)
        events = []
        for path in data:
            with open_events(path) as f:
                for chunk in f.iter_chunks(stop=max_events or None):
                    events.extend(chunk)
    except (ValueError, FileNotFoundError, DatasetFormatError) as exc:
        raise _fail(str(exc)) from None
    pixels = [e.pixels for e in events]
    seconds: dict[str, float] = {}
    detections = {}
    for name, detector in (("float", float_model), ("dsp", dsp)):
        t0 = time.perf_counter()
        with console.status(f"{name}: {len(pixels)} events"):
            detections[name] = detector.detect_pixels(pixels, batch_size=4)
        seconds[name] = time.perf_counter() - t0
    result: dict[str, Any] = {
        "model": str(dsp.version_dir), "program": str(dsp.program_file), "events": len(events),
        "data": [str(p) for p in data],
        "ap": {name: summarize(collect((e.truth, d) for e, d in zip(events, dets, strict=True)))
               for name, dets in detections.items()},
        "agreement": agreement(detections["float"], detections["dsp"]).to_dict(),
        "seconds": seconds, "throughput_ratio_dsp_over_float": seconds["float"] / seconds["dsp"],
        "latency_model": {k: dsp.latency[k] for k in ("cycles", "cycles_10_cores", "latency_ms", "paper_ms")},
    }
    text = json.dumps(result, indent=2)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    ap = {name: r["ap"]["voc"] for name, r in result["ap"].items()}
    console.print(f"{len(events)} events: AP (VOC) float {ap['float']:.4f}, dsp {ap['dsp']:.4f} "
                  f"(Δ {ap['dsp'] - ap['float']:+.4f}); identical confident jets in "
                  f"{100 * result['agreement']['identical_fraction']:.1f} % of events; dsp/float throughput "
                  f"{result['throughput_ratio_dsp_over_float']:.2f}×", soft_wrap=True)
    if out is None:
        print(text)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
