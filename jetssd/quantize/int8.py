"""Post-training static INT8 quantization of an exported float model with ONNX Runtime (DESIGN §6, reference §8.1).

:func:`quantize_model` reads a float version directory written by :func:`jetssd.export.export_model` and writes::

    <repository>/pfjet_ssd_int8/<version>/model.onnx      same input/outputs as the float graph
    <repository>/pfjet_ssd_int8/<version>/metadata.json   the float metadata, variant "int8", plus "quantization"

Steps: ``quant_pre_process`` (symbolic shape inference + ORT optimisation, as ORT recommends), then
``quantize_static`` calibrated on real events densified one at a time (the graph has a dynamic batch but the
calibration statistics are per image), with int8 per-channel weights. The numerically sensitive parts stay in
float (:data:`DEFAULT_EXCLUDE`): the log1p input normalisation (its input spans 0–1000 GeV, uint8 steps would
erase the soft pile-up pixels the network learns from), the L2Norm (a reduction of squares and a division) and
the ECA gate (global average → 1-D conv → sigmoid → product). Finally the int8 graph is compared with the float
graph on up to :data:`PARITY_EVENTS` calibration events and the numbers go into the metadata.

Differences from the reference's INT8 (§3.6, §8.1): calibration on distinct real events (not one batch
repeated), ``reduce_range`` off by default (the VNNI/AMX kernels need no 7-bit headroom), sensitive subgraphs
excluded, and the result's parity with the float model recorded instead of assumed.

The version directory is assembled in a hidden temp directory and renamed into place (same as the export).

Quantization-aware training (:mod:`jetssd.quantize.qat`) goes through the same function with :class:`FixedRanges`:
the activation scales and zero points learned in training are forced onto the tensors instead of calibrated.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from jetssd.anchors import AnchorConfig, FeatureMap, anchor_centres
from jetssd.atomic import write_text_atomic
from jetssd.event import SparsePixels
from jetssd.export import _staging_dir, model_name, publish_version, sha256_file
from jetssd.inference import METADATA_FILE, MODEL_FILE, make_session, read_metadata
from jetssd.postprocess import Detections, PostprocessConfig, postprocess
from jetssd.rasterize import densify_batch
from jetssd.strict_json import to_json

Format = Literal["qdq", "qoperator"]
Method = Literal["minmax", "entropy", "percentile"]
ActivationType = Literal["uint8", "int8"]

VARIANT = "int8"
"""Repository variant written by :func:`quantize_model`."""
DEFAULT_EXCLUDE = ("/normalise/", "/l2norm/", "/eca/")
"""Node-name fragments kept in float: the log1p normalisation, the L2Norm and the ECA subgraphs."""
PARITY_EVENTS = 32
"""Calibration events on which the int8 graph is compared with the float graph."""
PARITY_SCORE = 0.5
"""Score cut of the detections compared in the parity check."""
HISTOGRAM_MAX_EVENTS = 32
"""ORT's histogram calibrators (entropy, percentile) hold every activation of every event in memory
(≈ 100 MB per event for this graph), so they see at most this many events, evenly spread."""
MINMAX_FLUSH_EVENTS = 16
"""The min-max calibrator folds its ranges every this many events (``CalibMaxIntermediateOutputs``), which
bounds its memory without changing the result (running min/max)."""


@dataclass(frozen=True)
class FixedRanges:
    """Activation quantization parameters decided before quantizing (by QAT) instead of calibrated.

    ORT's calibrator still runs (``quantize_static`` requires it) but on the first event only, and every range
    it measures is replaced through ``TensorQuantOverrides``; ``ForceQuantizeNoInputCheck`` makes the pools and
    slices quantize their input and share its parameters whatever the order in which ORT visits the nodes.

    Attributes:
        method: recorded as ``quantization.method`` (e.g. ``"qat"``).
        overrides: pre-processed model path → ``TensorQuantOverrides``, ``{tensor: [{"scale": float32 array,
            "zero_point": uint8 array}]}``.
        exclude: node-name fragments kept in float on top of ``quantize_model``'s ``exclude``.
        settings: entries added to the ``quantization`` block of the metadata.
        metadata: top-level metadata entries replacing the float model's (e.g. the checkpoint it came from).
        check: int8 model path → entries added to the ``quantization`` block; raise to refuse the model.
    """

    method: str
    overrides: Callable[[Path], dict[str, list[dict[str, Any]]]]
    exclude: Sequence[str] = ()
    settings: Mapping[str, Any] = field(default_factory=dict)
    metadata: Mapping[str, Any] = field(default_factory=dict)
    check: Callable[[Path], dict[str, Any]] | None = None


def quantize_model(float_dir: Path, repository: Path, calibration: Sequence[SparsePixels], *, version: int = 1,
                   per_channel: bool = True, fmt: Format = "qdq", method: Method = "percentile",
                   activation_type: ActivationType = "uint8", reduce_range: bool = False,
                   exclude: Sequence[str] = DEFAULT_EXCLUDE, calibration_sources: Sequence[str] = (),
                   metrics: dict[str, Any] | None = None, overwrite: bool = False,
                   fixed: FixedRanges | None = None) -> Path:
    """Quantize the float model in ``float_dir`` to int8 as version ``version`` of ``pfjet_ssd_int8``.

    Args:
        float_dir: a version directory of a float model (``model.onnx`` + ``metadata.json``).
        repository: the model repository root (created if missing).
        calibration: events whose activations set the quantization ranges; the first :data:`PARITY_EVENTS` of
            them also serve the int8 ↔ float comparison.
        version: version number of the int8 model, an integer ≥ 1.
        per_channel: one weight scale per output channel (recommended: depthwise filters differ widely).
        fmt: ``"qdq"`` (QuantizeLinear/DequantizeLinear pairs that ORT fuses into integer kernels) or
            ``"qoperator"`` (QLinearConv etc. written explicitly).
        method: activation range calibration, ``"minmax"``, ``"entropy"`` or ``"percentile"`` (99.999 %).
        activation_type: ``"uint8"`` (the u8·s8 kernels of x86 VNNI) or ``"int8"``.
        reduce_range: 7-bit weights (only helps CPUs without VNNI, where u8·s8 products can saturate).
        exclude: node-name fragments; every node whose name contains one stays in float.
        calibration_sources: where the events came from (file names, index ranges), stored in the metadata.
        overwrite: replace an existing version instead of refusing.
        fixed: activation parameters learned by QAT (see :class:`FixedRanges`); ``method`` is then not used.

    Returns:
        The version directory ``<repository>/pfjet_ssd_int8/<version>``.

    Raises:
        ValueError: bad arguments, empty ``calibration``, or a float model that is itself int8.
        FileNotFoundError: no float model/metadata.
        FileExistsError: the version exists and ``overwrite`` is False.
    """
    _check_arguments(version, calibration, fmt, method, activation_type)
    float_dir = Path(float_dir)
    float_meta = read_metadata(float_dir)
    float_model = float_dir / MODEL_FILE
    if not float_model.is_file():
        raise FileNotFoundError(f"float model not found: {float_model}")
    if float_meta["variant"] == VARIANT:
        raise ValueError(f"{float_dir} is already an int8 model")
    final = Path(repository) / model_name(VARIANT) / str(version)
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} exists; pass overwrite=True to replace it")

    final.parent.mkdir(parents=True, exist_ok=True)
    with _staging_dir(final.parent, version) as staging, tempfile.TemporaryDirectory() as work:
        prepared = Path(work) / "prepared.onnx"
        t0 = time.perf_counter()
        preprocess(float_model, prepared)
        patterns = [*exclude, *(fixed.exclude if fixed is not None else ())]
        excluded = excluded_nodes(prepared, patterns)
        used = _calibration_subset(calibration, method) if fixed is None else calibration[:1]
        extra: dict[str, Any] = {}
        if fixed is not None:
            extra = {"TensorQuantOverrides": fixed.overrides(prepared), "ForceQuantizeNoInputCheck": True}
        out = staging / MODEL_FILE
        _quantize(prepared, out, used, str(float_meta["input"]["name"]), fmt=fmt,
                  method=method if fixed is None else "minmax", per_channel=per_channel,
                  activation_type=activation_type, reduce_range=reduce_range, excluded=excluded, extra_options=extra)
        seconds = time.perf_counter() - t0
        parity = compare_outputs(float_model, out, calibration[:PARITY_EVENTS], float_meta)
        settings = {"method": method if fixed is None else fixed.method, "format": fmt, "per_channel": per_channel,
                    "reduce_range": reduce_range, "activation_type": activation_type, "weight_type": "int8",
                    "calibration_events": len(used), "calibration_sources": list(calibration_sources),
                    "calibration_seconds": round(seconds, 2), "exclude_patterns": patterns,
                    "excluded_nodes": excluded, "preprocess": "quant_pre_process (symbolic shapes + ORT opt.)",
                    "parity": parity}
        if fixed is not None:
            settings.update(fixed.settings)
            if fixed.check is not None:
                settings.update(fixed.check(out))
        metadata = int8_metadata(float_meta, float_dir, version, sha256_file(out), settings, metrics)
        if fixed is not None:
            metadata.update(fixed.metadata)
        write_text_atomic(staging / METADATA_FILE, to_json(metadata, "metadata", indent=2) + "\n")
        publish_version(staging, final, overwrite)
    return final


def _check_arguments(version: int, calibration: Sequence[SparsePixels], fmt: str, method: str,
                     activation_type: str) -> None:
    """Cheap argument checks, before anything is loaded or written."""
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"version must be an integer ≥ 1, got {version!r}")
    if len(calibration) == 0:
        raise ValueError("calibration is empty: give at least one event")
    if fmt not in ("qdq", "qoperator"):
        raise ValueError(f"fmt must be 'qdq' or 'qoperator', got {fmt!r}")
    if method not in ("minmax", "entropy", "percentile"):
        raise ValueError(f"method must be 'minmax', 'entropy' or 'percentile', got {method!r}")
    if activation_type not in ("uint8", "int8"):
        raise ValueError(f"activation_type must be 'uint8' or 'int8', got {activation_type!r}")


# ----------------------------------------------------------------------------------------------- quantization


def preprocess(float_model: Path, out: Path) -> None:
    """ORT's recommended pre-processing: symbolic shape inference, ORT graph optimisation, ONNX shape inference."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    quant_pre_process(str(float_model), str(out))


def excluded_nodes(model_path: Path, patterns: Sequence[str]) -> list[str]:
    """Names of the nodes of ``model_path`` whose name contains one of ``patterns`` (the optimiser keeps the
    exporter's scoped names such as ``/source1/l2norm/Div``, so fragments survive pre-processing)."""
    import onnx

    graph = onnx.load(str(model_path)).graph
    return [n.name for n in graph.node if any(p in n.name for p in patterns)]


class _EventReader:
    """``CalibrationDataReader`` over sparse events: one densified image [1, 3, 340, 360] per call, made lazily
    so only one dense event (1.5 MB) is alive at a time."""

    def __init__(self, events: Sequence[SparsePixels], input_name: str) -> None:
        self._events: Iterator[SparsePixels] = iter(events)
        self._input = input_name

    def get_next(self) -> dict[str, NDArray[np.float32]] | None:
        event = next(self._events, None)
        return None if event is None else {self._input: densify_batch([event])}


def _calibration_subset(events: Sequence[SparsePixels], method: str) -> Sequence[SparsePixels]:
    """All events for min-max; at most :data:`HISTOGRAM_MAX_EVENTS`, evenly spread, for histogram methods."""
    if method == "minmax" or len(events) <= HISTOGRAM_MAX_EVENTS:
        return events
    picks = np.linspace(0, len(events) - 1, HISTOGRAM_MAX_EVENTS).round().astype(int)
    return [events[int(i)] for i in picks]


def _quantize(prepared: Path, out: Path, events: Sequence[SparsePixels], input_name: str, *, fmt: str, method: str,
              per_channel: bool, activation_type: str, reduce_range: bool, excluded: Sequence[str],
              extra_options: Mapping[str, Any] | None = None) -> None:
    """``quantize_static`` with our settings (int8 weights, symmetric; activations asymmetric); ``extra_options``
    are added to ORT's (e.g. ``TensorQuantOverrides``)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(_EventReader, CalibrationDataReader):  # ORT checks isinstance(reader, CalibrationDataReader)
        pass

    calib_method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                    "percentile": CalibrationMethod.Percentile}[method]
    extra: dict[str, Any] = {"CalibMaxIntermediateOutputs": MINMAX_FLUSH_EVENTS} if method == "minmax" else {}
    if method == "percentile":
        extra["CalibPercentile"] = 99.999
    extra.update(extra_options or {})
    quantize_static(
        str(prepared), str(out), Reader(events, input_name),
        quant_format=QuantFormat.QDQ if fmt == "qdq" else QuantFormat.QOperator,
        per_channel=per_channel, reduce_range=reduce_range,
        activation_type=QuantType.QUInt8 if activation_type == "uint8" else QuantType.QInt8,
        weight_type=QuantType.QInt8, nodes_to_exclude=list(excluded), calibrate_method=calib_method,
        extra_options=extra,
    )


# ----------------------------------------------------------------------------------------------------- parity


def _softmax(logits: NDArray[np.float32]) -> NDArray[np.float64]:
    """Softmax over the last axis, in float64."""
    z = logits.astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return np.asarray(e / e.sum(axis=-1, keepdims=True))


def _detections(outputs: Sequence[NDArray[np.float32]], meta: dict[str, Any]) -> list[Detections]:
    """Post-processed detections with score ≥ :data:`PARITY_SCORE` (anchors and config from the metadata)."""
    loc, cls_logits, reg = outputs
    anchor_config = AnchorConfig.from_dict(meta["anchors"]["config"])
    anchors = anchor_centres(tuple(FeatureMap(int(m["n_eta"]), int(m["n_phi"])) for m in meta["anchors"]["maps"]),
                             anchor_config.layout)
    config = PostprocessConfig.from_dict({**meta.get("postprocess", {}), "confidence_threshold": PARITY_SCORE})
    dets = postprocess(cls_logits, loc, reg, anchors, anchor_config, config)
    return [_score_at_least(d) for d in dets]


def _score_at_least(d: Detections) -> Detections:
    """``d`` without detections below :data:`PARITY_SCORE` (the post-processing cut is strict, ours is ≥)."""
    keep = d.score >= PARITY_SCORE
    return Detections(d.label[keep], d.score[keep], d.eta[keep], d.phi[keep], d.pt[keep])


def compare_outputs(float_model: Path, int8_model: Path, events: Sequence[SparsePixels], meta: dict[str, Any],
                    threads: int | None = None) -> dict[str, Any]:
    """Raw-output and detection agreement of the int8 graph with the float graph on ``events``.

    Returns:
        ``{"events", "mean_abs_diff": {"cls_prob", "loc", "reg"}, "max_abs_diff": {…},
        "detections_agree_fraction", "detections_float", "detections_int8", "score_threshold"}``; detections
        agree when an event has the same number of detections with the same labels (in score order).
    """
    names = [str(o["name"]) for o in meta["outputs"]]
    input_name = str(meta["input"]["name"])
    sessions = [make_session(float_model, threads), make_session(int8_model, threads)]
    sums = dict.fromkeys(("cls_prob", "loc", "reg"), 0.0)
    peaks = dict.fromkeys(sums, 0.0)
    counts = dict.fromkeys(sums, 0)
    agree, n_float, n_int8 = 0, 0, 0
    for first in range(0, len(events), 8):
        batch = densify_batch(events[first:first + 8])
        ref, got = ([dict(zip(names, s.run(names, {input_name: batch}), strict=True)) for s in sessions])
        pairs = {"cls_prob": (_softmax(ref["cls_logits"]), _softmax(got["cls_logits"])),
                 "loc": (ref["loc"], got["loc"]), "reg": (ref["reg"], got["reg"])}
        for key, (a, b) in pairs.items():
            d = np.abs(np.asarray(a, np.float64) - b)
            sums[key] += float(d.sum())
            peaks[key] = max(peaks[key], float(d.max()))
            counts[key] += d.size
        order = ("loc", "cls_logits", "reg")
        for fd, qd in zip(_detections([ref[k] for k in order], meta), _detections([got[k] for k in order], meta),
                          strict=True):
            n_float += len(fd)
            n_int8 += len(qd)
            agree += int(len(fd) == len(qd) and bool(np.array_equal(fd.label, qd.label)))
    return {"events": len(events), "reference": "float model, same events",
            "mean_abs_diff": {k: sums[k] / max(counts[k], 1) for k in sums}, "max_abs_diff": peaks,
            "detections_agree_fraction": agree / len(events) if len(events) else math.nan,
            "detections_float": n_float, "detections_int8": n_int8, "score_threshold": PARITY_SCORE}


# --------------------------------------------------------------------------------------------------- metadata


def int8_metadata(float_meta: dict[str, Any], float_dir: Path, version: int, model_sha: str,
                  quantization: dict[str, Any], metrics: dict[str, Any] | None = None) -> dict[str, Any]:
    """The float model's metadata re-labelled as the int8 version, with the ``quantization`` block.

    The float export's ORT ↔ PyTorch parity is kept under ``parity.float_export``; the int8 ↔ float numbers are
    ``parity.int8_vs_float`` (and inside ``quantization``). The float model's metrics do not describe this graph:
    ``metrics`` holds what the caller measured on this one (a `jetssd evaluate` report), else it is empty.
    """
    meta = json.loads(json.dumps(float_meta))  # deep copy of plain JSON
    meta.update(name=model_name(VARIANT), variant=VARIANT, version=version, model_file=MODEL_FILE,
                model_sha256=model_sha, metrics=metrics or {}, quantization=quantization,
                parity={"float_export": float_meta.get("parity"), "int8_vs_float": quantization["parity"]},
                float_model={"dir": str(float_dir), "name": float_meta.get("name"),
                             "version": float_meta.get("version"), "sha256": float_meta.get("model_sha256")})
    return meta


def op_counts(model_path: Path, optimized: bool = True, threads: int = 1) -> dict[str, int]:
    """Op types of ``model_path`` as ORT runs it (``optimized``: the session's fully optimised graph, where QDQ
    pairs around a Conv become QLinearConv when ORT has an integer kernel for it), most frequent first."""
    import collections

    import onnx
    import onnxruntime as ort

    path = model_path
    with tempfile.TemporaryDirectory() as work:
        if optimized:
            options = ort.SessionOptions()
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            options.intra_op_num_threads = threads
            options.optimized_model_filepath = str(Path(work) / "optimized.onnx")
            ort.InferenceSession(str(model_path), sess_options=options, providers=["CPUExecutionProvider"])
            path = Path(options.optimized_model_filepath)
        counts = collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node if n.op_type != "Constant")
    return dict(counts.most_common())
