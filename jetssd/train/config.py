"""Training configuration: a TOML file plus ``--set section.key=value`` overrides (stdlib only, no torch).

Example ``train.toml``::

    [data]
    train = ["data/train/*.h5"]
    validation = ["data/val/*.h5"]

    [optim]
    epochs = 30
    lr = 2e-3

    [model]
    activation = "relu"

Every field has a default; ``jetssd train --help`` lists the overrides.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jetssd.anchors import AnchorConfig
from jetssd.model.config import NetConfig

CROP_MIN = 64
"""Smallest training crop side, pixels."""
CROP_MAX = 340
"""Largest training crop side, pixels: the η extent of the image."""


@dataclass(frozen=True)
class DataConfig:
    """Where the events come from and how they are augmented.

    Attributes:
        train, validation: file paths or glob patterns (reference layout or ours).
        max_train_events, max_val_events: cut the datasets (0 = all).
        flip_eta, flip_phi: probability of mirroring the event in η / in φ.
        roll_phi: rotate every training event by a uniform random number of φ pixels (φ is periodic,
            so this is an exact symmetry of the physics and multiplies the effective statistics).
        workers: DataLoader worker processes (targets are matched in numpy inside the workers).
        crop: 0 trains on full 340 × 360 images; C (64…340) trains on random C × C crops (≈ pixel-count
            times cheaper on a CPU), validation staying on full images. Needs ``anchors.layout =
            "receptive"``: only then is an anchor at the same place relative to its receptive field in a
            crop as in the full image.
        crop_on_object: probability that a crop is centred near a random truth object rather than placed
            uniformly (signal is sparse: a uniform 128 crop of a 340 × 360 event mostly sees background).
    """

    train: tuple[str, ...] = ()
    validation: tuple[str, ...] = ()
    max_train_events: int = 0
    max_val_events: int = 0
    flip_eta: float = 0.5
    flip_phi: float = 0.5
    roll_phi: bool = True
    workers: int = 2
    crop: int = 0
    crop_on_object: float = 0.75

    def __post_init__(self) -> None:
        # 64: below it the second source map is ~5 cells, mostly border; 340: the η extent of the image.
        if self.crop != 0 and not (CROP_MIN <= self.crop <= CROP_MAX):
            raise ValueError(f"data.crop must be 0 (full images) or in [{CROP_MIN}, {CROP_MAX}] pixels, "
                             f"got {self.crop}")
        if not (0.0 <= self.crop_on_object <= 1.0):
            raise ValueError(f"data.crop_on_object must be a probability in [0, 1], got {self.crop_on_object}")


@dataclass(frozen=True)
class OptimConfig:
    """Optimiser and schedule.

    The default is AdamW with a linear warm-up and cosine decay rather than the reference's SGD
    (lr 1e-3, ×0.5 steps over 100 epochs): our budgets are minutes on a GPU or hours on 2 CPU cores, and
    AdamW + cosine reaches a good loss in a few epochs without per-run tuning of the step milestones.
    ``optimizer = "sgd"`` with ``lr = 1e-3`` restores the reference's optimiser (momentum 0.9).
    """

    optimizer: str = "adamw"
    lr: float = 2e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9
    epochs: int = 20
    warmup_steps: int = 200
    batch_size: int = 32
    grad_clip: float = 10.0
    patience: int = 10
    """Early stopping: epochs without a better validation loss before stopping."""
    min_delta: float = 1e-4


@dataclass(frozen=True)
class LossConfig:
    neg_pos_ratio: float = 3.0
    min_negatives: int = 16
    """Hard negatives per image even without positives (QCD events must still teach the background)."""
    label_smoothing: float = 0.1
    loc_weight: float = 1.0
    pt_weight: float = 1.0


@dataclass(frozen=True)
class CompressConfig:
    """Compression during training.

    Attributes:
        twn: ternary-weight quantization-aware training (:mod:`jetssd.quantize.twn`): per-filter Δ = 0.7·E|W|
            and α, straight-through estimator, latent full-precision weights; usually with ``run.init`` = the
            FPN checkpoint.
        twn_layers: "depthwise" (the reference and the DSP contract) or "depthwise+pointwise".
        flop_reg: strength of the ops-weighted BN-γ L1 regulariser of network slimming (reference 1e-11), added
            to the training loss only; then ``jetssd prune``.
        int8_qat: INT8 quantization-aware training (:mod:`jetssd.quantize.qat`): BN folded into the conv weights,
            per-channel symmetric int8 fake quantization of the folded weights, uint8 fake quantization of the
            activations where ONNX Runtime quantizes them, straight-through gradients, latent fp32 weights; usually
            a fine-tune with ``run.init`` = the FPN checkpoint, then ``jetssd quantize --qat CHECKPOINT``. Not
            together with ``twn``.
        int8_float_layers: module paths kept in float by the INT8 QAT and its export (default the detection
            heads; e.g. add "backbone.0" to keep the first conv float too).
        int8_freeze_bn_step: optimizer step from which the folded BNs use and keep their running statistics
            (0: from the start, right for a fine-tune; a few epochs' worth for QAT from scratch).
        int8_freeze_observer_step: optimizer step after which the activation ranges (moving min/max) stop moving.
    """

    twn: bool = False
    twn_layers: str = "depthwise"
    flop_reg: float = 0.0
    int8_qat: bool = False
    int8_float_layers: tuple[str, ...] = ("head1", "head2")
    int8_freeze_bn_step: int = 0
    int8_freeze_observer_step: int = 1000

    def __post_init__(self) -> None:
        if self.twn and self.int8_qat:
            raise ValueError("compress.twn and compress.int8_qat do not combine: ternary weights are not int8 ones")
        if self.int8_freeze_bn_step < 0 or self.int8_freeze_observer_step < 0:
            raise ValueError("compress.int8_freeze_bn_step and compress.int8_freeze_observer_step must be ≥ 0")


@dataclass(frozen=True)
class RunConfig:
    out: str = "runs/fpn"
    seed: int = 1
    deterministic: bool = False
    """Fixed-seed mode: deterministic algorithms (slower on GPU) on top of seeding everything."""
    device: str = "auto"
    amp: bool = True
    """bf16 autocast on CUDA (ignored on CPU unless ``amp_cpu``)."""
    amp_cpu: bool = False
    channels_last: bool = True
    compile: bool = False
    time_limit_minutes: float = 0.0
    """Stop (after the epoch in progress, with its validation and checkpoint) past this wall time; 0 = none."""
    init: str = ""
    """Start from the weights of this checkpoint (fine-tuning: TWN from the FPN, a pruned network); its
    network configuration replaces [model]. The optimizer and schedule start fresh."""
    init_anchors: str = "checkpoint"
    """With ``init``: take [anchors] from the checkpoint ("checkpoint", the default) or from this config
    ("config": fine-tune onto another anchor layout; the heads keep their shapes, one anchor per cell)."""
    init_phi_padding: str = "checkpoint"
    """With ``init``: take ``model.circular_phi`` from the checkpoint ("checkpoint", the default) or from this
    config ("config"). Padding has no parameters, so the same weights load either way; this is how the
    circular-vs-zero φ padding comparison fine-tunes one starting point both ways."""

    def __post_init__(self) -> None:
        for key in ("init_anchors", "init_phi_padding"):
            value = getattr(self, key)
            if value not in ("checkpoint", "config"):
                raise ValueError(f"run.{key} must be 'checkpoint' or 'config', got {value!r}")


@dataclass(frozen=True)
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: NetConfig = field(default_factory=NetConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    compress: CompressConfig = field(default_factory=CompressConfig)
    anchors: AnchorConfig = field(default_factory=AnchorConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        # A stretched anchor's place depends on the image size, so crop targets would not be full-image ones.
        if self.data.crop and self.anchors.layout != "receptive":
            raise ValueError(f"data.crop = {self.data.crop} needs anchors.layout = 'receptive', "
                             f"got {self.anchors.layout!r}")

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _section_dict(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        sections = {f.name: f for f in dataclasses.fields(cls)}
        unknown = set(d) - set(sections)
        if unknown:
            raise ValueError(f"unknown config section(s): {', '.join(sorted(unknown))}")
        kwargs = {}
        for name, value in d.items():
            section_cls = type(getattr(cls(), name))
            if name == "anchors" and isinstance(value, dict):
                # AnchorConfig.from_dict reads a missing layout as the legacy "stretched" one (old model
                # metadata); in a training config a missing key means today's default.
                value = {"layout": AnchorConfig().layout, **value}
            kwargs[name] = _section_from_dict(section_cls, value, name)
        return cls(**kwargs)

    def with_overrides(self, overrides: list[str]) -> TrainConfig:
        """Apply ``section.key=value`` strings; values are parsed as TOML (``lr=1e-3``, ``train=["a.h5"]``)."""
        d = self.to_dict()
        for item in overrides:
            key, sep, raw = item.partition("=")
            section, dot, name = key.strip().partition(".")
            if not sep or not dot:
                raise ValueError(f"override {item!r}: expected section.key=value")
            if section not in d or name not in d[section]:
                raise ValueError(f"override {item!r}: unknown key {key!r}")
            try:
                d[section][name] = tomllib.loads(f"v = {raw.strip()}")["v"]
            except tomllib.TOMLDecodeError:
                d[section][name] = raw.strip()  # a bare string such as relu or runs/x
        return TrainConfig.from_dict(d)

    @classmethod
    def load(cls, path: Path | None, overrides: list[str] | None = None) -> TrainConfig:
        config = cls() if path is None else cls.from_dict(tomllib.loads(path.read_text()))
        return config.with_overrides(overrides or [])

    def dumps(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def _section_dict(section: Any) -> dict[str, Any]:
    if hasattr(section, "to_dict"):
        return dict(section.to_dict())
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(section).items()}


def _section_from_dict(section_cls: type, value: dict[str, Any], name: str) -> Any:
    if not isinstance(value, dict):
        raise ValueError(f"config section [{name}] must be a table")
    if hasattr(section_cls, "from_dict"):
        return section_cls.from_dict(value)
    known = {f.name: f for f in dataclasses.fields(section_cls)}
    unknown = set(value) - set(known)
    if unknown:
        raise ValueError(f"[{name}]: unknown key(s) {', '.join(sorted(unknown))}")
    defaults = section_cls()
    kwargs = {}
    for k, v in value.items():
        default = getattr(defaults, k)
        if isinstance(default, tuple):
            v = tuple(v) if isinstance(v, list | tuple) else (v,)
        elif isinstance(default, bool):
            if not isinstance(v, bool):
                raise ValueError(f"[{name}] {k}: expected true/false, got {v!r}")
        elif isinstance(default, int | float) and not isinstance(v, int | float):
            raise ValueError(f"[{name}] {k}: expected a number, got {v!r}")
        elif isinstance(default, float):
            v = float(v)
        kwargs[k] = v
    return section_cls(**kwargs)
