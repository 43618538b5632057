"""The training loop: AMP + channels-last on GPU, validation with AP, checkpoints, resume, early stopping.

``jetssd train`` calls :func:`train`. Under ``torchrun --nproc-per-node N`` it runs data-parallel
(DistributedDataParallel); rank 0 validates, writes checkpoints, metrics and plots.

Output directory (``run.out``):
    last.pt, best.pt        checkpoints (state dicts + config + history; load with ``weights_only=True``)
    metrics.jsonl           one JSON line per epoch
    loss.png                training and validation loss curves
    config.json             the resolved configuration
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler

from jetssd.anchors import INFERENCE_MAPS, TRAINING_MAPS, AnchorConfig, anchor_centres, crop_maps, pixels_to_eta_phi
from jetssd.atomic import atomic_path
from jetssd.event import TruthObjects
from jetssd.model import NetConfig, PFJetSSD
from jetssd.postprocess import PostprocessConfig, postprocess
from jetssd.train.config import TrainConfig
from jetssd.train.data import Batch, DetectionDataset, PackedEvents, collate, densify, expand_paths
from jetssd.train.loss import multibox_loss

CHECKPOINT_FORMAT = 1


@dataclass
class EpochRecord:
    epoch: int
    train: dict[str, float]
    val: dict[str, float]
    seconds: float
    lr: float
    events_per_s: float

    def to_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "train": self.train, "val": self.val, "seconds": self.seconds,
                "lr": self.lr, "events_per_s": self.events_per_s}


@dataclass
class TrainResult:
    out: Path
    best_epoch: int
    best_val_loss: float
    history: list[EpochRecord] = field(default_factory=list)
    stopped_early: bool = False


# --------------------------------------------------------------------------------------------------
# Set-up helpers


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int, deterministic: bool) -> None:
    # numpy randomness is drawn from explicit Generators seeded from (seed, epoch, index), never the global state.
    random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    else:
        torch.backends.cudnn.benchmark = True


def _distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank); initialises the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0"))


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """Weight decay on conv weights only: not on BN/PReLU/L2Norm parameters or biases."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": config.optim.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if config.optim.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.optim.lr)
    if config.optim.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.optim.lr, momentum=config.optim.momentum)
    raise ValueError(f"optim.optimizer: unknown optimizer {config.optim.optimizer!r} (adamw or sgd)")


def warmup_cosine(total_steps: int, warmup_steps: int,
                  time_window: tuple[float, float] | None = None) -> Callable[[int], float]:
    """LR multiplier: linear warm-up, then cosine decay to 1 % of the peak.

    With ``time_window = (start, deadline)`` (``time.perf_counter`` values) the decay follows whichever
    is further along, the steps or the wall time, so a run with a time budget still ends annealed.
    """
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if time_window is not None:
            start, deadline = time_window
            progress = max(progress, (time.perf_counter() - start) / max(1e-9, deadline - start))
        return 0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


def _use_channels_last(device: torch.device, config: TrainConfig) -> bool:
    """channels-last pays with bf16 (CUDA, or CPU with ``amp_cpu``: cpu-training.md); fp32 CPU stays NCHW."""
    return config.run.channels_last and (device.type == "cuda" or config.run.amp_cpu)


def _autocast(device: torch.device, config: TrainConfig) -> contextlib.AbstractContextManager[Any]:
    enabled = config.run.amp and (device.type == "cuda" or config.run.amp_cpu)
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


# --------------------------------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, epoch: int, config: TrainConfig,
                    history: list[EpochRecord], best_val: float, best_epoch: int) -> None:
    """Write atomically (temp file + rename), so a killed run never leaves a truncated checkpoint."""
    state = {
        "format": CHECKPOINT_FORMAT,
        "model": _unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "epoch": epoch,
        "config": json.dumps(config.to_dict()),
        "history": json.dumps([h.to_dict() for h in history]),
        "best_val": best_val,
        "best_epoch": best_epoch,
        "torch_rng": torch.get_rng_state(),
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` (no arbitrary pickles)."""
    state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a jetssd checkpoint of format {CHECKPOINT_FORMAT}")
    return state


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    inner = getattr(model, "module", model)  # DDP (compile's wrapper forwards the attribute to a compiled DDP)
    return getattr(inner, "_orig_mod", inner)  # torch.compile


def _set_phi_wrap(model: torch.nn.Module, enabled: bool) -> None:
    """Circular φ padding on (full images) or off (crops) in the PFJetSSD inside DDP/compile wrappers.

    The wrappers share the inner module's submodules, so switching the unwrapped model switches what they
    run. A model built with ``circular_phi=False`` pads with zeros already: nothing to switch.
    """
    inner = _unwrap(model)
    if isinstance(inner, PFJetSSD) and inner.config.circular_phi:
        inner.set_phi_wrap(enabled)


def crop_anchors(crop: int) -> np.ndarray:
    """Anchor centres [P, 2] of a ``crop`` × ``crop`` training crop (two sources, receptive layout, no φ wrap)."""
    return anchor_centres(crop_maps(crop), "receptive", extent=(crop, crop), periodic_phi=False)


def _check_crop_outputs(model: torch.nn.Module, crop: int, n_anchors: int, device: torch.device) -> None:
    """Raise unless the training graph gives one output per crop anchor on a ``crop`` × ``crop`` input."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        n_out = int(model(torch.zeros(1, 3, crop, crop, device=device))[0].shape[1])
    model.train(was_training)
    if n_out != n_anchors:
        raise ValueError(f"data.crop = {crop}: the network gives {n_out} outputs on a {crop}×{crop} crop but the "
                         f"crop has {n_anchors} anchors ({crop_maps(crop)}); the crop anchors assume the "
                         "reference's pooling (n → n // 2 + 1) and two sources")


# --------------------------------------------------------------------------------------------------
# Epochs


@dataclass
class TrainingHooks:
    """Compression hooks of a training step.

    Attributes:
        regularizer: returns a scalar added to the training objective (the pruning FLOP regulariser).
        after_step: called after each optimizer step (the TWN quantizer's clamp of the latent weights, the INT8
            QAT step count that freezes BN statistics and activation ranges).
    """

    regularizer: Callable[[], torch.Tensor] | None = None
    after_step: Callable[[], None] | None = None


def compression_hooks(model: torch.nn.Module, config: TrainConfig) -> TrainingHooks:
    """Attach what ``[compress]`` asks for to ``model`` (before DDP/compile wrapping) and return its hooks."""
    hooks = TrainingHooks()
    if config.compress.twn:
        from jetssd.quantize.twn import attach_twn

        quantizer = attach_twn(model, layers=config.compress.twn_layers)  # type: ignore[arg-type]
        hooks.after_step = quantizer.after_step
    if config.compress.int8_qat:
        from jetssd.quantize.qat import attach_int8_qat

        int8 = attach_int8_qat(model, float_layers=config.compress.int8_float_layers,
                               freeze_bn_step=config.compress.int8_freeze_bn_step,
                               freeze_observer_step=config.compress.int8_freeze_observer_step)
        hooks.after_step = int8.after_step
    if config.compress.flop_reg > 0:
        from jetssd.prune import flop_regularizer

        strength = config.compress.flop_reg
        hooks.regularizer = lambda: flop_regularizer(model, strength)
    return hooks


def _batches(loader: DataLoader[Any], device: torch.device) -> Iterator[Batch]:
    for batch in loader:
        yield batch.to(device)


def run_epoch(model: torch.nn.Module, loader: DataLoader[Any], device: torch.device, config: TrainConfig,
              optimizer: torch.optim.Optimizer | None = None,
              scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
              on_step: Callable[[int, dict[str, float]], None] | None = None,
              detections: list[Any] | None = None, deadline: float | None = None,
              hooks: TrainingHooks | None = None) -> dict[str, float]:
    """One pass over ``loader``: trains when ``optimizer`` is given, else evaluates the loss.

    With ``detections`` (a list) in evaluation, the post-processed detections of the inference source
    are appended per event, with the event's truth, for AP computation.
    Training stops early at ``deadline`` (a ``time.perf_counter`` value). Returns the loss terms averaged
    per positive anchor over the whole pass (see :class:`jetssd.train.loss.LossParts`).
    """
    training = optimizer is not None
    model.train(training)
    sums: dict[str, float] = {}
    total_norm = 0
    anchor_config = config.anchors
    anchors = anchor_centres(INFERENCE_MAPS, anchor_config.layout)
    with torch.set_grad_enabled(training):
        for step, batch in enumerate(_batches(loader, device)):
            image = densify(batch, channels_last=_use_channels_last(device, config))
            with _autocast(device, config):
                loc, cls_logits, reg = model(image)
            if loc.shape[1] != batch.labels.shape[1]:
                raise ValueError(f"the network gives {loc.shape[1]} anchors' outputs on {tuple(image.shape[2:])} "
                                 f"images, the targets have {batch.labels.shape[1]} anchors")
            parts = multibox_loss(loc, cls_logits, reg, batch.labels, batch.loc, batch.pt, config.loss)
            values = parts.as_floats()
            if training:
                assert optimizer is not None
                objective = parts.total
                if hooks is not None and hooks.regularizer is not None:
                    penalty = hooks.regularizer()  # training loss only, never the validation loss (§10.17)
                    objective = objective + penalty
                    values["flop_reg"] = float(penalty.detach())
                optimizer.zero_grad(set_to_none=True)
                objective.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip)
                optimizer.step()
                if hooks is not None and hooks.after_step is not None:
                    hooks.after_step()
                if scheduler is not None:
                    scheduler.step()
            for k, v in values.items():
                sums[k] = sums.get(k, 0.0) + v * parts.norm
            total_norm += parts.norm
            if detections is not None:
                p = len(anchors)
                dets = postprocess(cls_logits[:, :p].float().cpu().numpy(), loc[:, :p].float().cpu().numpy(),
                                   reg[:, :p].float().cpu().numpy(), anchors, anchor_config, PostprocessConfig())
                detections.extend(zip(dets, batch.truth, strict=True))
            if on_step is not None:
                on_step(step, values)
            if training and deadline is not None and time.perf_counter() > deadline:
                break
    return {k: v / max(1, total_norm) for k, v in sums.items()}


def truth_objects(xy: np.ndarray, label: np.ndarray, pt: np.ndarray) -> TruthObjects:
    """Matched-pixel truth (labels 1…3) back to physics truth objects (class ids 0…2)."""
    eta, phi = pixels_to_eta_phi(xy)
    return TruthObjects.from_arrays(label - 1, eta, phi, pt)


def average_precision(detections: list[Any]) -> dict[str, Any]:
    """AP summary (pooled and per class) of validation detections, via :mod:`jetssd.evaluate`."""
    from jetssd.evaluate import DetectionRecords, match_event, summarize

    records = DetectionRecords()
    for dets, (xy, label, pt) in detections:
        truth = truth_objects(xy, label, pt)
        records.add(truth, dets, match_event(truth, dets))
    return summarize(records)


def _validate(model: torch.nn.Module, loader: DataLoader[Any], device: torch.device, config: TrainConfig,
              epoch: int, train_losses: dict[str, float], seconds: float, lr: float,
              n_train_events: int) -> EpochRecord:
    """Validation loss and AP of the inference source after one epoch."""
    dets: list[Any] = []
    val = run_epoch(model, loader, device, config, detections=dets)
    summary = average_precision(dets)
    val["ap_voc"] = summary["ap"]["voc"] or 0.0
    val["ap_reference"] = summary["ap"]["reference"] or 0.0
    return EpochRecord(epoch, train_losses, val, seconds, lr, n_train_events / seconds)


# --------------------------------------------------------------------------------------------------
# The run


def train(config: TrainConfig, resume: bool = False,
          progress: Callable[[str, int, int, dict[str, float]], None] | None = None) -> TrainResult:
    """Train PFJet-SSD as configured. ``progress(phase, step, total, values)`` is called per step."""
    rank, world, local_rank = _distributed()
    device = resolve_device(config.run.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    seed_everything(config.run.seed + rank, config.run.deterministic)
    init_state = None
    if config.run.init:
        init_state = load_checkpoint(Path(config.run.init))
        init_config = json.loads(init_state["config"])
        # The network and its anchors come from the checkpoint (a section-less checkpoint predates the anchor
        # layout: AnchorConfig.from_dict({}) is its "stretched" layout).
        init_model = NetConfig.from_dict(init_config["model"])
        if config.run.init_phi_padding == "config":
            init_model = dataclasses.replace(init_model, circular_phi=config.model.circular_phi)
        anchor_section = config.anchors
        if config.run.init_anchors == "checkpoint":
            anchor_section = AnchorConfig.from_dict(init_config.get("anchors", {}))
        config = dataclasses.replace(config, model=init_model, anchors=anchor_section)
    out = Path(config.run.out)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(config.dumps() + "\n")

    anchor_config = config.anchors
    anchors = anchor_centres(TRAINING_MAPS, anchor_config.layout)
    # Crops: training targets on the crop's own anchors; validation stays on full images and full anchors.
    crop = config.data.crop
    train_anchors = crop_anchors(crop) if crop else anchors
    loaders = max(1, config.data.workers)
    train_events = PackedEvents.load(expand_paths(config.data.train), config.data.max_train_events, loaders)
    val_events = PackedEvents.load(expand_paths(config.data.validation), config.data.max_val_events, loaders)
    train_set = DetectionDataset(train_events, train_anchors, anchor_config, augment=config.data,
                                 seed=config.run.seed)
    val_set = DetectionDataset(val_events, anchors, anchor_config)
    sampler: DistributedSampler[Any] | None = None
    if world > 1:
        sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, seed=config.run.seed)
    generator = torch.Generator().manual_seed(config.run.seed)
    loader_args: dict[str, Any] = {"batch_size": config.optim.batch_size, "collate_fn": collate,
                                   "num_workers": config.data.workers, "pin_memory": device.type == "cuda",
                                   "persistent_workers": config.data.workers > 0}
    train_loader = DataLoader(train_set, shuffle=sampler is None, sampler=sampler, generator=generator,
                              drop_last=True, **loader_args)
    val_loader = DataLoader(val_set, shuffle=False, **loader_args)
    if len(train_loader) == 0:
        raise ValueError(f"{len(train_set)} training events is less than one batch of {config.optim.batch_size}")

    model: torch.nn.Module = PFJetSSD(config.model, training_head=True)
    if init_state is not None:
        model.load_state_dict(init_state["model"])  # a plain (FPN or pruned) checkpoint: before any quantizer
    hooks = compression_hooks(model, config)  # before a resume's load: TWN/QAT checkpoints hold their own keys
    model = model.to(device)
    if crop:
        _check_crop_outputs(model, crop, len(train_anchors), device)
    if _use_channels_last(device, config):
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    optimizer = make_optimizer(model, config)
    total_steps = config.optim.epochs * len(train_loader)
    run_start = time.perf_counter()
    deadline = run_start + 60 * config.run.time_limit_minutes if config.run.time_limit_minutes else None
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(
        total_steps, config.optim.warmup_steps, (run_start, deadline) if deadline is not None else None))

    start_epoch, history, best_val, best_epoch = 0, [], math.inf, -1
    if resume and (out / "last.pt").exists():
        state = load_checkpoint(out / "last.pt")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch = int(state["epoch"]) + 1
        history = [EpochRecord(**h) for h in json.loads(state["history"])]
        best_val, best_epoch = float(state["best_val"]), int(state["best_epoch"])
        torch.set_rng_state(state["torch_rng"])

    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if device.type == "cuda"
                                                          else None)
    if config.run.compile:
        model = torch.compile(model)  # type: ignore[assignment]

    stopped_early = False
    for epoch in range(start_epoch, config.optim.epochs):
        train_set.set_epoch(epoch)
        if sampler is not None:
            sampler.set_epoch(epoch)
        t0 = time.perf_counter()

        steps_done = [0]  # a deadline can end the epoch early: the event rate counts the steps actually run

        def on_train_step(step: int, values: dict[str, float], _epoch: int = epoch,
                          _done: list[int] = steps_done) -> None:
            _done[0] = step + 1
            if progress is not None and rank == 0:
                progress(f"epoch {_epoch + 1}/{config.optim.epochs}", step + 1, len(train_loader), values)

        if crop:
            _set_phi_wrap(model, False)  # a crop's φ edges are not neighbours: zero padding, as at η edges
        train_losses = run_epoch(model, train_loader, device, config, optimizer, scheduler, on_step=on_train_step,
                                 deadline=deadline, hooks=hooks)
        seconds = time.perf_counter() - t0
        stop = False
        if crop:
            _set_phi_wrap(model, True)  # validation and checkpoints: the full, periodic image
        if rank == 0:
            # The unwrapped module: a DDP forward would start a buffer broadcast the other ranks never join.
            record = _validate(_unwrap(model), val_loader, device, config, epoch, train_losses, seconds,
                               float(scheduler.get_last_lr()[0]), steps_done[0] * config.optim.batch_size * world)
            history.append(record)
            improved = record.val["loss"] < best_val - config.optim.min_delta
            if improved:
                best_val, best_epoch = record.val["loss"], epoch
            save_checkpoint(out / "last.pt", model, optimizer, scheduler, epoch, config, history, best_val,
                            best_epoch)
            if improved:
                save_checkpoint(out / "best.pt", model, optimizer, scheduler, epoch, config, history, best_val,
                                best_epoch)
            with (out / "metrics.jsonl").open("a") as f:
                f.write(json.dumps(record.to_dict()) + "\n")
            plot_history(history, out / "loss.png")
            if progress is not None:
                progress("validation", epoch + 1, config.optim.epochs, record.val)
            out_of_time = deadline is not None and time.perf_counter() > deadline
            stop = epoch - best_epoch >= config.optim.patience or out_of_time
        if world > 1:  # every rank must leave the loop together
            flag = torch.tensor([int(stop)], device=device)
            dist.broadcast(flag, src=0)
            stop = bool(flag.item())
        if stop:
            stopped_early = epoch + 1 < config.optim.epochs
            break
    if world > 1:
        dist.destroy_process_group()
    return TrainResult(out, best_epoch, best_val, history, stopped_early)


def plot_history(history: list[EpochRecord], path: Path) -> None:
    """Training (solid) and validation (dashed) loss terms per epoch, log scale, plus validation AP."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), layout="constrained")
    ax, ax_ap = fig.subplots(1, 2)
    epochs = [h.epoch + 1 for h in history]
    for key, colour in (("loss", "black"), ("cls", "tab:blue"), ("loc", "tab:orange"), ("pt", "tab:green")):
        ax.plot(epochs, [h.train[key] for h in history], color=colour, label=f"train {key}")
        ax.plot(epochs, [h.val[key] for h in history], color=colour, linestyle="--", label=f"val {key}")
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss per positive anchor")
    ax.legend(fontsize=7, ncol=2)
    ax_ap.plot(epochs, [h.val.get("ap_voc", 0.0) for h in history], marker="o", label="VOC AP")
    ax_ap.plot(epochs, [h.val.get("ap_reference", 0.0) for h in history], marker="s", label="reference 11-pt AP")
    ax_ap.set_xlabel("epoch")
    ax_ap.set_ylabel("validation AP (pooled)")
    ax_ap.set_ylim(0, 1)
    ax_ap.legend()
    fig.savefig(path, dpi=110)
