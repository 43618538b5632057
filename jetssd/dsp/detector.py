"""The DSP emulator as a detector: program (fast executor) + host dequantisation + the shared post-processing.

``DspDetector(program_path, model_dir)`` takes its anchors and thresholds from the TWN model's exported
``metadata.json`` (``model_dir`` = ``model_repository/pfjet_ssd_twn[/<version>]``), so the DSP path decodes
exactly like the ONNX one. It has the ``detect_pixels`` of :class:`jetssd.inference.OnnxDetector` (the
:class:`jetssd.evaluate.report.Detector` protocol).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from jetssd.dsp import fast
from jetssd.dsp.program import Program
from jetssd.event import SparsePixels
from jetssd.inference import (
    anchors_from_metadata,
    postprocess_config_from_metadata,
    read_metadata,
    resolve_version_dir,
)
from jetssd.postprocess import Detections, postprocess
from jetssd.rasterize import densify_batch


class DspDetector:
    """Fixed-point emulation of a compiled program, decoded with a float model's metadata."""

    def __init__(self, program_path: Path, model_dir: Path) -> None:
        self.program = Program.load(program_path)
        self.metadata: dict[str, Any] = read_metadata(resolve_version_dir(Path(model_dir)))
        self.anchors, self.anchor_config = anchors_from_metadata(self.metadata)
        self.postprocess_config = postprocess_config_from_metadata(self.metadata)
        head = self.program.ops[-1]
        n_cells = int(np.prod(self.program.metadata.get("source_shape", [44, 46])))
        if n_cells != len(self.anchors) or head.get("activation") != "raw":
            raise ValueError(f"{program_path}: {n_cells} output cells, the model has {len(self.anchors)} anchors")
        self._local = threading.local()  # one fast.Workspace per thread (the gateway runs batches in threads)

    def run(self, images: NDArray[np.float32]) -> tuple[NDArray[np.float32], NDArray[np.float32],
                                                         NDArray[np.float32]]:
        """(loc, cls_logits, reg) float32 of a batch [N, 3, 340, 360] GeV, like ``OnnxDetector.run``."""
        workspace = getattr(self._local, "workspace", None)
        if workspace is None:
            workspace = self._local.workspace = fast.Workspace()
        return fast.run_float(self.program, images, workspace)

    def detect(self, images: NDArray[np.float32]) -> list[Detections]:
        loc, cls_logits, reg = self.run(images)
        return postprocess(cls_logits, loc, reg, self.anchors, self.anchor_config, self.postprocess_config)

    def detect_pixels(self, pixels: Sequence[SparsePixels], batch_size: int = 4) -> list[Detections]:
        out: list[Detections] = []
        for first in range(0, len(pixels), batch_size):
            out.extend(self.detect(densify_batch(pixels[first:first + batch_size])))
        return out
