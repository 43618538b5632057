"""Training checkpoint → ONNX graph + metadata in the model repository (DESIGN §4.4, reference §8.1).

:func:`export_model` writes one model version::

    <repository>/pfjet_ssd_<variant>/<version>/model.onnx      input ``image`` [N, 3, 340, 360] float32 GeV;
                                                               outputs ``loc``, ``cls_logits``, ``reg`` (raw)
    <repository>/pfjet_ssd_<variant>/<version>/metadata.json   everything needed to use and trace the model

The version directory is assembled in a hidden temp directory next to it and renamed into place only after the
ONNX checker and the ONNX Runtime ↔ PyTorch parity check have passed, so a reader (Triton, the service,
:class:`jetssd.inference.OnnxDetector`) never sees a half-written or unchecked version. Triton's
``config.pbtxt`` files are not written here.

Differences from the reference's exporter (§8.1): opset 17 instead of 11, all three outputs named, the input is
the raw GeV image (the normalisation is the graph's first op), parity is checked on several events (not one)
with the session settings the detector uses, and the check cannot be skipped.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

import jetssd
from jetssd import geometry
from jetssd.anchors import INFERENCE_MAPS, AnchorConfig
from jetssd.atomic import write_text_atomic
from jetssd.event import CLASS_NAMES, SparsePixels
from jetssd.inference import INPUT_SHAPE, METADATA_FILE, MODEL_FILE, make_session
from jetssd.model.complexity import conv_macs, count_parameters
from jetssd.model.config import NetConfig
from jetssd.model.network import ONNX_INPUT, ONNX_OUTPUTS, PFJetSSD, export_onnx
from jetssd.postprocess import PostprocessConfig
from jetssd.rasterize import densify_batch
from jetssd.strict_json import to_json
from jetssd.train.trainer import load_checkpoint

VARIANTS = ("fpn", "twn", "int8")
"""Model variants of the repository: full precision, ternary weights, int8."""
OPSET = 17
"""ONNX opset of the exported graphs."""
METADATA_FORMAT = 1
"""Version of the layout of ``metadata.json``."""
PARITY_TOLERANCE = 1e-3
"""Largest accepted |ORT − PyTorch| per output, in units of that output's scale max(1, max |PyTorch|)."""
PARITY_BATCH = 8
"""Events per forward pass of the parity check (bounds memory for long check lists)."""
CHANNELS = ("charged tracks pT", "photons + electrons ECAL ET", "neutral hadrons HCAL ET")
"""What each image channel holds (GeV), see :data:`jetssd.geometry.N_CHANNELS`."""


class ParityError(RuntimeError):
    """ONNX Runtime's outputs differ from PyTorch's by more than :data:`PARITY_TOLERANCE`."""


def model_name(variant: str) -> str:
    """Repository model name of a variant: ``pfjet_ssd_<variant>``."""
    return f"pfjet_ssd_{variant}"


def export_model(checkpoint: Path, variant: str, repository: Path, *, version: int = 1,
                 check_events: Sequence[SparsePixels] | None = None, metrics: dict[str, Any] | None = None,
                 overwrite: bool = False) -> Path:
    """Export a training checkpoint as version ``version`` of model ``pfjet_ssd_<variant>`` in ``repository``.

    Args:
        checkpoint: a ``best.pt`` / ``last.pt`` of :mod:`jetssd.train.trainer` (loaded with ``weights_only=True``).
        variant: one of :data:`VARIANTS`; names the model directory (the checkpoint's weights are exported as
            they are: quantising is the job of the TWN/int8 training and export steps that produce them).
        repository: the model repository root (created if missing).
        version: Triton model version, an integer ≥ 1.
        check_events: events for the ONNX Runtime ↔ PyTorch parity check (densified to GeV images); None uses
            4 synthetic events with a few hot clusters (:func:`synthetic_images`).
        metrics: test-set numbers stored under ``"metrics"`` (JSON-able; numpy values are converted, NaN/inf
            become null).
        overwrite: replace an existing version instead of refusing.

    Returns:
        The version directory ``<repository>/pfjet_ssd_<variant>/<version>``.

    Raises:
        ValueError: unknown variant, bad version, empty ``check_events``, metrics that are not JSON-able.
        FileExistsError: the version exists and ``overwrite`` is False.
        FileNotFoundError: no checkpoint.
        RuntimeError: the checkpoint's weights do not fit its network config (strict load).
        ParityError: ONNX Runtime and PyTorch disagree.
    """
    _check_arguments(variant, version, check_events)
    final = Path(repository) / model_name(variant) / str(version)
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} exists; pass overwrite=True to replace it")
    metrics_json = to_json(metrics or {}, "metrics")  # fail before the slow part, not after it
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint not found: {checkpoint}")

    checkpoint_sha = sha256_file(checkpoint)
    state = load_checkpoint(checkpoint)
    train_config = json.loads(state["config"])
    net = _inference_net(state, train_config)
    images = synthetic_images() if check_events is None else None
    n_events = len(images) if images is not None else len(check_events or ())

    final.parent.mkdir(parents=True, exist_ok=True)
    with _staging_dir(final.parent, version) as staging:
        onnx_path = export_onnx(net, staging / MODEL_FILE, opset=OPSET, prelu_max=True)
        _check_onnx(onnx_path)
        batches = _image_batches(check_events, images)
        parity = check_parity(net, onnx_path, batches)
        parity.update(events=n_events, source="synthetic" if images is not None else "check_events")
        metadata = build_metadata(net, variant, version, state, train_config, checkpoint, checkpoint_sha,
                                  sha256_file(onnx_path), parity)
        metadata["metrics"] = json.loads(metrics_json)
        write_text_atomic(staging / METADATA_FILE, to_json(metadata, "metadata", indent=2) + "\n")
        publish_version(staging, final, overwrite)
    return final


# ------------------------------------------------------------------------------------------------- checkpoint


def _check_arguments(variant: str, version: int, check_events: Sequence[SparsePixels] | None) -> None:
    """Cheap argument checks, before anything is loaded or written."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if variant == "int8":  # a float graph published as pfjet_ssd_int8 would be served as int8 and mislabel it
        raise ValueError("variant 'int8' is made by `jetssd quantize` (post-training from an exported float model, "
                         "or --qat from an INT8 quantization-aware checkpoint), not by exporting a float checkpoint")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"version must be an integer ≥ 1 (a Triton version directory), got {version!r}")
    if check_events is not None and len(check_events) == 0:
        raise ValueError("check_events is empty: give at least one event, or None for synthetic events")


def _inference_net(state: dict[str, Any], train_config: dict[str, Any]) -> PFJetSSD:
    """The checkpoint's training graph, loaded strictly, reduced to the eval-mode inference graph (fp32, CPU).

    A TWN checkpoint stores latent weights under ``…parametrizations.weight.original``: they are baked to
    their ternary values α·{−1, 0, +1} first (plain checkpoints pass through unchanged).
    """
    from jetssd.quantize.twn import bake_state_dict

    model = PFJetSSD(NetConfig.from_dict(train_config["model"]), training_head=True)
    model.load_state_dict(bake_state_dict(state["model"]), strict=True)
    return model.inference_model().float().cpu().eval()


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------------- parity


def synthetic_images(n: int = 4, seed: int = 0) -> NDArray[np.float32]:
    """Deterministic GeV images float32 [n, 3, 340, 360]: ~2 % soft pixels plus 3 hot clusters per event.

    Each cluster is a 5×5 Gaussian blob of 50–800 GeV in one channel; the first one straddles the φ seam so the
    check covers the circular padding. Enough structure that the outputs vary across anchors (a blank image
    would only compare the head biases).
    """
    rng = np.random.default_rng(seed)
    shape = (n, *geometry.IMAGE_SHAPE)
    images = (rng.exponential(1.0, shape) * (rng.random(shape) < 0.02)).astype(np.float32)
    d = np.arange(-2, 3)
    blob = np.exp(-(d[:, None] ** 2 + d[None, :] ** 2) / 2.0)
    blob /= blob.sum()
    for event in images:
        for k in range(3):
            channel = int(rng.integers(geometry.N_CHANNELS))
            ieta = int(rng.integers(10, geometry.N_ETA - 10))
            iphi = 0 if k == 0 else int(rng.integers(geometry.N_PHI))
            rows = (ieta + d)[:, None]
            cols = ((iphi + d) % geometry.N_PHI)[None, :]
            event[channel, rows, cols] += (rng.uniform(50.0, 800.0) * blob).astype(np.float32)
    return images


def _image_batches(check_events: Sequence[SparsePixels] | None, images: NDArray[np.float32] | None
                   ) -> Iterator[NDArray[np.float32]]:
    """Dense GeV batches [≤ PARITY_BATCH, 3, 340, 360] of the check events (densified lazily) or the images."""
    if check_events is not None:
        for first in range(0, len(check_events), PARITY_BATCH):
            yield densify_batch(check_events[first:first + PARITY_BATCH])
    elif images is not None:
        for first in range(0, len(images), PARITY_BATCH):
            yield images[first:first + PARITY_BATCH]


def check_parity(net: PFJetSSD, onnx_path: Path, batches: Iterator[NDArray[np.float32]] | Sequence[NDArray[np.float32]]
                 ) -> dict[str, Any]:
    """Run PyTorch (``net``) and ONNX Runtime (the detector's session settings) on every batch and compare.

    Returns:
        ``{"max_abs_diff": {output: float}, "scale": {output: max(1, max |PyTorch|)},
        "relative_diff": {output: diff / scale}, "tolerance": PARITY_TOLERANCE}``.

    Raises:
        ParityError: some output's relative difference exceeds :data:`PARITY_TOLERANCE`.
    """
    session = make_session(onnx_path)
    diff = dict.fromkeys(ONNX_OUTPUTS, 0.0)
    peak = dict.fromkeys(ONNX_OUTPUTS, 0.0)
    for batch in batches:
        with torch.no_grad():
            want = [t.numpy() for t in net(torch.from_numpy(np.ascontiguousarray(batch)))]
        got = session.run(list(ONNX_OUTPUTS), {ONNX_INPUT: np.ascontiguousarray(batch)})
        for name, g, w in zip(ONNX_OUTPUTS, got, want, strict=True):
            if g.shape != w.shape:
                raise ParityError(f"{onnx_path}: output {name} has shape {g.shape}, PyTorch gives {w.shape}")
            # NaN anywhere makes the difference NaN, which must fail rather than compare False and pass.
            d = float(np.max(np.abs(g.astype(np.float64) - w))) if g.size else 0.0
            diff[name] = d if math.isnan(d) else max(diff[name], d)
            peak[name] = max(peak[name], float(np.max(np.abs(w))) if w.size else 0.0)
    return parity_report(diff, peak, onnx_path)


def parity_report(max_abs_diff: dict[str, float], max_abs_reference: dict[str, float], where: Path | str = "model"
                  ) -> dict[str, Any]:
    """Judge the per-output differences: the scale of an output is max(1, max |reference|).

    The outputs are O(1) quantities (logits, offsets in units of 4.6 px, ln pT), so below 1 the tolerance is an
    absolute 1e-3 (the reference's ``decimal=3``), and above it grows with the values (large logits).
    """
    scale = {k: max(1.0, v) for k, v in max_abs_reference.items()}
    relative = {k: max_abs_diff[k] / scale[k] for k in max_abs_diff}
    bad = {k: v for k, v in relative.items() if not v <= PARITY_TOLERANCE}  # `not <=`: NaN is bad too
    if bad:
        raise ParityError(f"{where}: ONNX Runtime differs from PyTorch by more than {PARITY_TOLERANCE:g} of the "
                          f"output scale: {bad}")
    return {"max_abs_diff": dict(max_abs_diff), "scale": scale, "relative_diff": relative,
            "tolerance": PARITY_TOLERANCE}


def _check_onnx(path: Path) -> None:
    """``onnx.checker.check_model`` on the file (full check, shapes included)."""
    import onnx

    onnx.checker.check_model(str(path), full_check=True)


# --------------------------------------------------------------------------------------------------- metadata


def build_metadata(net: PFJetSSD, variant: str, version: int, state: dict[str, Any], train_config: dict[str, Any],
                   checkpoint: Path, checkpoint_sha: str, model_sha: str, parity: dict[str, Any]) -> dict[str, Any]:
    """The ``metadata.json`` content (without ``metrics``), see the module docstring of :mod:`jetssd.inference`
    for how it is consumed. ``net`` is the exported inference graph."""
    config = net.config
    n_anchors = sum(m.n_anchors for m in INFERENCE_MAPS)
    return {
        "metadata_format": METADATA_FORMAT,
        "name": model_name(variant),
        "variant": variant,
        "version": version,
        "model_file": MODEL_FILE,
        "model_sha256": model_sha,
        "input": {"name": ONNX_INPUT, "shape": list(INPUT_SHAPE), "dtype": "float32", "unit": "GeV",
                  "normalisation": f"{config.normalisation} (inside the graph)", "channels": list(CHANNELS)},
        "outputs": _outputs(n_anchors, config.n_classes),
        "geometry": _geometry(),
        "classes": ["background", *CLASS_NAMES],
        "anchors": {"maps": [{"n_eta": m.n_eta, "n_phi": m.n_phi} for m in INFERENCE_MAPS],
                    "count": n_anchors, "order": "map after map; η outer, φ inner",
                    "config": _anchor_config(train_config).to_dict()},
        "postprocess": PostprocessConfig().to_dict(),
        "network": config.to_dict(),
        "complexity": {"graph": "inference (backbone idx 0-11 + head 1)", "parameters": count_parameters(net),
                       "conv_macs": conv_macs(config, training_head=False)},
        "training": _training_summary(state, train_config),
        "checkpoint": {"file": checkpoint.name, "sha256": checkpoint_sha, "epoch": int(state["epoch"])},
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "software": _versions(),
        "onnx": {"opset": OPSET, "prelu_as_max": True, "dynamic_axes": ["batch"]},
        "parity": parity,
    }


def _outputs(n_anchors: int, n_classes: int) -> list[dict[str, Any]]:
    """Names, shapes and meaning of the raw outputs, in graph order."""
    return [
        {"name": "loc", "shape": [-1, n_anchors, 2], "dtype": "float32",
         "meaning": "box centre offsets (Δx, Δy) / (variance · box_size_px), Δy wrapped"},
        {"name": "cls_logits", "shape": [-1, n_anchors, n_classes + 1], "dtype": "float32",
         "meaning": "class logits (background, t, V, H); softmax in post-processing"},
        {"name": "reg", "shape": [-1, n_anchors, 1], "dtype": "float32",
         "meaning": "ln(pT / pt_scale_gev)"},
    ]


def _geometry() -> dict[str, Any]:
    """The constants of :mod:`jetssd.geometry`."""
    return {"n_channels": geometry.N_CHANNELS, "n_eta": geometry.N_ETA, "n_phi": geometry.N_PHI,
            "image_shape": list(geometry.IMAGE_SHAPE),
            "eta_step": geometry.ETA_STEP, "eta_min": geometry.ETA_MIN, "eta_max": geometry.ETA_MAX,
            "phi_step": geometry.PHI_STEP, "phi_min": geometry.PHI_MIN, "phi_max": geometry.PHI_MAX,
            "phi_periodic": True, "eta_interval": "[eta_min, eta_max)"}


def _anchor_config(train_config: dict[str, Any]) -> AnchorConfig:
    """The anchor config training used: its ``anchors`` section; a checkpoint without one predates the section
    and was trained with the defaults of its time, i.e. the "stretched" layout."""
    section = train_config.get("anchors")
    return AnchorConfig.from_dict(section if isinstance(section, dict) else {})


def _training_summary(state: dict[str, Any], train_config: dict[str, Any]) -> dict[str, Any]:
    """Data, seed, progress and final validation numbers of the run that wrote the checkpoint."""
    history = json.loads(state.get("history") or "[]")
    last_val = history[-1].get("val", {}) if history else {}
    data = train_config.get("data", {})
    best_epoch = int(state["best_epoch"])
    return {
        "train": list(data.get("train", [])),
        "validation": list(data.get("validation", [])),
        "seed": train_config.get("run", {}).get("seed"),
        "epochs_trained": int(state["epoch"]) + 1,  # epochs are counted from 0
        "best_epoch": best_epoch if best_epoch >= 0 else None,
        "best_val_loss": _finite_or_none(state.get("best_val")),
        "final_val_loss": _finite_or_none(last_val.get("loss")),
        "final_val_ap": {"voc": _finite_or_none(last_val.get("ap_voc")),
                         "reference": _finite_or_none(last_val.get("ap_reference"))},
        "config": train_config,
    }


def _finite_or_none(x: Any) -> float | None:
    """A float, or None for missing/non-finite values (JSON has no inf: best_val is inf before any epoch)."""
    if x is None:
        return None
    v = float(x)
    return v if math.isfinite(v) else None


def _versions() -> dict[str, str]:
    """Versions of the software that wrote and checked the graph."""
    import onnx
    import onnxruntime

    return {"jetssd": jetssd.__version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "numpy": np.__version__, "python": platform.python_version()}


# ------------------------------------------------------------------------------------------- atomic writing


@contextlib.contextmanager
def _staging_dir(parent: Path, version: int) -> Iterator[Path]:
    """A fresh hidden directory in ``parent`` (same file system, so the final rename is atomic), removed on exit
    unless it was renamed into place. Its name is not numeric, so Triton and the detector never take it for a
    version."""
    staging = Path(tempfile.mkdtemp(prefix=f".{version}.partial-", dir=parent))
    # mkdtemp makes it private (0700); the published version must be readable by a server running as another user.
    staging.chmod(0o755)
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def publish_version(staging: Path, final: Path, overwrite: bool) -> None:
    """Publish a complete version directory (:func:`_publish`), then bring the repository's Triton configs for
    this variant up to date (``pfjet_ssd_<v>``, ``pfjet_nms_<v>``, the ensemble ``pfjet_<v>``: DESIGN §4.4), so
    an exported model is servable as it lands."""
    from jetssd.triton.repository import SSD_PREFIX, write_triton_repository

    _publish(staging, final, overwrite)
    write_triton_repository(final.parent.parent, [final.parent.name.removeprefix(SSD_PREFIX)])


def _publish(staging: Path, final: Path, overwrite: bool) -> None:
    """Rename the complete ``staging`` directory to ``final``.

    A directory cannot be renamed over a non-empty one, so an existing version is first moved aside, then the
    new one renamed in, then the old one deleted; if the second rename fails the old version is put back.
    """
    if not final.exists():
        # os.rename refuses a non-empty target on POSIX, so a version that appeared meanwhile is never clobbered.
        try:
            os.rename(staging, final)
        except OSError as e:
            if final.exists():
                raise FileExistsError(f"{final} appeared during the export; pass overwrite=True to replace it") from e
            raise
        return
    if not overwrite:
        raise FileExistsError(f"{final} exists; pass overwrite=True to replace it")
    old = Path(tempfile.mkdtemp(prefix=f".{final.name}.replaced-", dir=final.parent))
    os.rename(final, old / "v")
    try:
        os.rename(staging, final)
    except OSError:
        os.rename(old / "v", final)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)
