"""ONNX Runtime detector: one exported PFJet-SSD model version → raw head outputs and jets (DESIGN §4.4–4.5).

The one ONNX Runtime path of the project: the evaluation runs it, and the service's local backend will. It
reads a version directory written by :func:`jetssd.export.export_model`::

    <repository>/pfjet_ssd_<variant>/<version>/model.onnx
    <repository>/pfjet_ssd_<variant>/<version>/metadata.json

Everything the detector needs besides the graph (anchor maps, box geometry and pT scale, post-processing
thresholds) comes from ``metadata.json``, so a model is always decoded with the settings it was trained with.
Numpy + onnxruntime only (no torch).

Example::

    det = OnnxDetector(Path("model_repository/pfjet_ssd_fpn"))   # highest version
    jets = det.detect_pixels(events)                               # list[Detections], one per event
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from jetssd import geometry
from jetssd.anchors import AnchorConfig, FeatureMap, anchor_centres
from jetssd.event import SparsePixels
from jetssd.postprocess import Detections, PostprocessConfig, postprocess
from jetssd.rasterize import densify_batch

MODEL_FILE = "model.onnx"
"""Name of the ONNX graph inside a version directory."""
METADATA_FILE = "metadata.json"
"""Name of the metadata file inside a version directory."""
INPUT_SHAPE = (-1, *geometry.IMAGE_SHAPE)
"""Shape of the ``image`` input, −1 = dynamic batch."""
_EXPECTED_INPUT = f"float32 [N, {geometry.N_CHANNELS}, {geometry.N_ETA}, {geometry.N_PHI}] (GeV)"

RawOutputs = tuple[NDArray[np.float32], NDArray[np.float32], NDArray[np.float32]]
"""(loc [N, P, 2], cls_logits [N, P, n_classes + 1], reg [N, P, 1]), float32."""


def make_session(model_path: Path, threads: int | None = None) -> Any:
    """ONNX Runtime CPU session with full graph optimisation; ``threads`` intra-op threads (None: all cores).

    Shared with :mod:`jetssd.export`, so the export's parity check measures the session the detector runs.
    Returns an ``onnxruntime.InferenceSession``.
    """
    import onnxruntime as ort  # local: importing jetssd.inference must not need onnxruntime until it is used

    if threads is not None and threads < 1:
        raise ValueError(f"threads must be ≥ 1, got {threads}")
    if not model_path.is_file():
        raise FileNotFoundError(f"ONNX model not found: {model_path}")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or os.cpu_count() or 1
    # The graph is a single chain of convs: intra-op parallelism is what scales, inter-op threads would idle.
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(model_path), sess_options=options, providers=["CPUExecutionProvider"])


def resolve_version_dir(model_dir: Path) -> Path:
    """The version directory of ``model_dir``: itself when it holds ``metadata.json``, else its highest numeric
    subdirectory (Triton's version layout; non-numeric entries such as an export's temp directory are skipped).

    Raises:
        FileNotFoundError: ``model_dir`` does not exist, or is neither a version directory nor has any.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model directory not found: {model_dir}")
    if (model_dir / METADATA_FILE).is_file():
        return model_dir
    versions = [p for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()]
    if not versions:
        raise FileNotFoundError(f"{model_dir}: no {METADATA_FILE} and no numeric version directory "
                                f"(expected <repository>/pfjet_ssd_<variant>[/<version>])")
    return max(versions, key=lambda p: int(p.name))


def read_metadata(version_dir: Path) -> dict[str, Any]:
    """Parse ``<version_dir>/metadata.json``; FileNotFoundError / ValueError name the file."""
    path = version_dir / METADATA_FILE
    if not path.is_file():
        raise FileNotFoundError(f"model metadata not found: {path}")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    missing = [k for k in ("variant", "version", "input", "outputs", "anchors") if k not in meta]
    if missing:
        raise ValueError(f"{path}: missing key(s) {missing}")
    return dict(meta)


def anchors_from_metadata(meta: Mapping[str, Any]) -> tuple[NDArray[np.float64], AnchorConfig]:
    """Anchor centres (float64 [P, 2] pixels, the order of the head outputs) and the anchor config (box size,
    variance, pT scale) of a model, from its parsed ``metadata.json``.

    The one place that turns metadata into decoding inputs: :class:`OnnxDetector` and the Triton ``pfjet_nms``
    model both call it, so the two decode a model identically.
    """
    anchors_meta = meta["anchors"]
    maps = tuple(FeatureMap(int(m["n_eta"]), int(m["n_phi"])) for m in anchors_meta["maps"])
    config = AnchorConfig.from_dict(anchors_meta["config"])
    return anchor_centres(maps, config.layout), config


def postprocess_config_from_metadata(meta: Mapping[str, Any]) -> PostprocessConfig:
    """The post-processing thresholds stored in a model's parsed ``metadata.json`` (defaults when absent)."""
    return PostprocessConfig.from_dict(meta.get("postprocess", {}))


class OnnxDetector:
    """An exported PFJet-SSD model run with ONNX Runtime on the CPU, plus the shared post-processing.

    Args:
        model_dir: ``<repository>/pfjet_ssd_<variant>/<version>``, or ``<repository>/pfjet_ssd_<variant>`` to
            take its highest numeric version.
        threads: intra-op threads of the session (None: ``os.cpu_count()``).
        postprocess_config: thresholds for :meth:`detect` (None: the defaults stored in the metadata).

    Raises:
        FileNotFoundError: naming the missing directory, ``model.onnx`` or ``metadata.json``.
        ValueError: metadata inconsistent with the graph (anchor count, output names).
    """

    def __init__(self, model_dir: Path, *, threads: int | None = None,
                 postprocess_config: PostprocessConfig | None = None) -> None:
        self._dir = resolve_version_dir(Path(model_dir))
        self._meta = read_metadata(self._dir)
        self._session = make_session(self._dir / MODEL_FILE, threads)
        self._input_name = str(self._meta["input"]["name"])
        self._output_names = [str(o["name"]) for o in self._meta["outputs"]]
        self._anchors, self._anchor_config = anchors_from_metadata(self._meta)
        self._postprocess_config = postprocess_config or postprocess_config_from_metadata(self._meta)
        self._check_graph()

    def _check_graph(self) -> None:
        """The graph's input/output names and anchor count must agree with the metadata."""
        where = self._dir / METADATA_FILE
        inputs = [i.name for i in self._session.get_inputs()]
        outputs = [o.name for o in self._session.get_outputs()]
        if inputs != [self._input_name]:
            raise ValueError(f"{where}: input {self._input_name!r}, but the graph has {inputs}")
        if sorted(outputs) != sorted(self._output_names):
            raise ValueError(f"{where}: outputs {self._output_names}, but the graph has {outputs}")
        n_anchors = self._session.get_outputs()[0].shape[1]
        if isinstance(n_anchors, int) and n_anchors != len(self._anchors):
            raise ValueError(f"{where}: anchor maps give {len(self._anchors)} anchors, the graph has {n_anchors}")

    # ------------------------------------------------------------------------------------------ properties

    @property
    def metadata(self) -> dict[str, Any]:
        """A copy of the model's ``metadata.json``."""
        return copy.deepcopy(self._meta)

    @property
    def variant(self) -> str:
        """``fpn``, ``twn`` or ``int8``."""
        return str(self._meta["variant"])

    @property
    def version(self) -> int:
        """The model version (the numeric directory name)."""
        return int(self._meta["version"])

    @property
    def model_dir(self) -> Path:
        """The resolved version directory."""
        return self._dir

    @property
    def anchors(self) -> NDArray[np.float64]:
        """Anchor centres, float64 [P, 2] pixels (x along η, y along φ), the order of the head outputs."""
        return self._anchors

    @property
    def anchor_config(self) -> AnchorConfig:
        """Box size, location variance and pT scale the model was trained with."""
        return self._anchor_config

    @property
    def postprocess_config(self) -> PostprocessConfig:
        """Thresholds used by :meth:`detect`."""
        return self._postprocess_config

    # ------------------------------------------------------------------------------------------- inference

    def run(self, images: NDArray[np.float32]) -> RawOutputs:
        """Raw head outputs of a batch.

        Args:
            images: float32 [N, 3, 340, 360], raw pT/ET in GeV (the normalisation is inside the graph).

        Returns:
            ``loc`` [N, P, 2], ``cls_logits`` [N, P, n_classes + 1], ``reg`` [N, P, 1], float32, P = number of
            anchors (2024 for the inference graph).

        Raises:
            ValueError: ``images`` is not a float32 array of shape [N, 3, 340, 360].
        """
        x = self._check_images(images)
        if x.shape[0] == 0:  # ORT is not guaranteed to accept an empty batch; the answer is known anyway
            p = len(self._anchors)
            widths = [int(o["shape"][-1]) for o in self._meta["outputs"]]
            empty = [np.zeros((0, p, w), np.float32) for w in widths]
            return empty[0], empty[1], empty[2]
        loc, cls_logits, reg = self._session.run(self._output_names, {self._input_name: x})
        return loc, cls_logits, reg

    def detect(self, images: NDArray[np.float32]) -> list[Detections]:
        """Jets of a batch: :meth:`run` then :func:`jetssd.postprocess.postprocess` with the model's anchors,
        anchor config and :attr:`postprocess_config`. ``images`` as in :meth:`run`; one Detections per event."""
        loc, cls_logits, reg = self.run(images)
        return postprocess(cls_logits, loc, reg, self._anchors, self._anchor_config, self._postprocess_config)

    def detect_pixels(self, pixels: Sequence[SparsePixels], batch_size: int = 16) -> list[Detections]:
        """Jets of sparse events, densified ``batch_size`` at a time (bounds memory: 1.5 MB per dense event)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
        out: list[Detections] = []
        for first in range(0, len(pixels), batch_size):
            out.extend(self.detect(densify_batch(pixels[first:first + batch_size])))
        return out

    def _check_images(self, images: NDArray[np.float32]) -> NDArray[np.float32]:
        """Validate the input contract; a C-contiguous view/copy for ORT."""
        if not isinstance(images, np.ndarray):
            raise ValueError(f"images: expected a numpy array {_EXPECTED_INPUT}, got {type(images).__name__}")
        if images.ndim != 4 or images.shape[1:] != geometry.IMAGE_SHAPE:
            raise ValueError(f"images: expected shape {_EXPECTED_INPUT}, got {list(images.shape)}")
        if images.dtype != np.float32:
            raise ValueError(f"images: expected dtype {_EXPECTED_INPUT}, got {images.dtype}")
        return np.ascontiguousarray(images)

    def __repr__(self) -> str:
        return f"OnnxDetector({self._dir}, variant={self.variant!r}, version={self.version})"
