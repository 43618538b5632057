"""The DSP emulator as a detector: program (fast executor) + host dequantisation + the shared post-processing.

A compiled program belongs to one exported float model version: it is compiled from that version's checkpoint
and decodes with that version's anchors and thresholds. So it lives in the version directory,
``model_repository/pfjet_ssd_twn/<version>/dsp/program.npz`` (:func:`program_path`; Triton ignores the extra
directory), and :class:`DspDetector` refuses a program whose checkpoint hash differs from the model's.
It has the ``run``/``detect``/``detect_pixels`` of :class:`jetssd.inference.OnnxDetector` (the
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
from jetssd.dsp.latency import estimate
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

PROGRAM_DIR = "dsp"
PROGRAM_FILE = "program.npz"


def program_path(model_dir: Path) -> Path:
    """Where the DSP program of a model version lives: ``<version dir>/dsp/program.npz`` (``model_dir`` = the
    model directory, newest version, or a version directory)."""
    return resolve_version_dir(Path(model_dir)) / PROGRAM_DIR / PROGRAM_FILE


class DspDetector:
    """Fixed-point emulation of a compiled program, decoded with its float model's metadata.

    Args:
        model_dir: the float TWN model (``model_repository/pfjet_ssd_twn`` or one of its version directories).
        program_file: the program; default :func:`program_path` of ``model_dir``.

    Raises:
        FileNotFoundError: no model or no program.
        ValueError: a program of another checkpoint, or whose output map does not match the model's anchors.
    """

    def __init__(self, model_dir: Path, program_file: Path | None = None) -> None:
        self.version_dir = resolve_version_dir(Path(model_dir))
        self.program_file = Path(program_file) if program_file is not None else program_path(self.version_dir)
        if not self.program_file.is_file():
            raise FileNotFoundError(f"no DSP program at {self.program_file} (compile one with `jetssd dsp compile`)")
        self.program = Program.load(self.program_file)
        self.metadata: dict[str, Any] = read_metadata(self.version_dir)
        self.version = int(self.metadata.get("version", 0))
        model_sha = self.metadata.get("checkpoint", {}).get("sha256")
        program_sha = self.program.metadata.get("checkpoint", {}).get("sha256")
        if model_sha and program_sha and model_sha != program_sha:
            raise ValueError(f"{self.program_file} was compiled from checkpoint {program_sha[:12]}…, the model in "
                             f"{self.version_dir} from {model_sha[:12]}…: recompile it")
        self.anchors, self.anchor_config = anchors_from_metadata(self.metadata)
        self.postprocess_config = postprocess_config_from_metadata(self.metadata)
        head = self.program.ops[-1]
        n_cells = int(np.prod(self.program.metadata.get("source_shape", [44, 46])))
        if n_cells != len(self.anchors) or head.get("activation") != "raw":
            raise ValueError(f"{self.program_file}: {n_cells} output cells, the model has {len(self.anchors)} "
                             "anchors")
        self.latency = estimate(self.program)
        """The SP1000 latency model of one event (:func:`jetssd.dsp.latency.estimate`)."""
        self._local = threading.local()  # one fast.Workspace per thread (the gateway runs batches in threads)

    def __repr__(self) -> str:
        return f"DspDetector({self.program_file}, version={self.version})"

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
