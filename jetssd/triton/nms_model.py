"""Triton python-backend model ``pfjet_nms_<variant>``: raw head outputs → jets, with the shared post-processing.

The decoding is :func:`jetssd.postprocess.postprocess` with the anchors, anchor config and thresholds built
from the variant's ``metadata.json`` by the same helpers :class:`jetssd.inference.OnnxDetector` uses
(:func:`~jetssd.inference.anchors_from_metadata`, :func:`~jetssd.inference.postprocess_config_from_metadata`),
so Triton's jets are the in-process detector's jets, bit for bit. A copy of the metadata sits in
``pfjet_nms_<variant>/<version>/`` (same version numbers as ``pfjet_ssd_<variant>``).

Tensors (batch axis implicit): ``loc`` FP32 [P, 2], ``cls_logits`` FP32 [P, 4], ``reg`` FP32 [P, 1] in;
``jets`` FP32 [M, 5] (label, score, eta, phi, pt; by score, zero-padded to the request's largest count M) and
``num_jets`` INT32 [1] out. See :mod:`jetssd.triton.batching` for the packing.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from jetssd.inference import anchors_from_metadata, postprocess_config_from_metadata, read_metadata
from jetssd.postprocess import Detections, postprocess
from jetssd.triton.batching import PerRequest, concat_requests, execute_requests, pack_jets
from jetssd.triton.ssd_model import check_config_tensors

OUTPUT_NAMES = ("jets", "num_jets")
"""Output tensors of the NMS model and of the ensemble."""


class JetDecoder:
    """Post-processing of one model version, built from its metadata (numpy only, no Triton)."""

    def __init__(self, meta: Mapping[str, Any]) -> None:
        self.anchors, self.anchor_config = anchors_from_metadata(meta)
        self.postprocess_config = postprocess_config_from_metadata(meta)
        self.input_names = [str(o["name"]) for o in meta["outputs"]]
        """The raw head outputs in the metadata's order: loc, cls_logits, reg."""

    @classmethod
    def from_version_dir(cls, version_dir: Path) -> JetDecoder:
        return cls(read_metadata(version_dir))

    def __call__(self, loc: NDArray[np.float32], cls_logits: NDArray[np.float32],
                 reg: NDArray[np.float32]) -> list[Detections]:
        return postprocess(cls_logits, loc, reg, self.anchors, self.anchor_config, self.postprocess_config)

    def jets_per_request(self, inputs: PerRequest) -> PerRequest:
        """(loc, cls_logits, reg) of each request → [jets, num_jets] of each request; one decode for all."""
        batches = [concat_requests([r[k] for r in inputs]) for k in range(3)]
        sizes = batches[0][1]
        detections = self(batches[0][0], batches[1][0], batches[2][0])
        out: PerRequest = []
        first = 0
        for n in sizes:
            jets, num_jets = pack_jets(detections[first:first + n])
            out.append([jets, num_jets])
            first += n
        return out


class TritonPythonModel:
    """The ``pfjet_nms_<variant>`` model (see the module docstring)."""

    def initialize(self, args: dict[str, str]) -> None:
        import triton_python_backend_utils as pb_utils  # only inside the Triton stub

        self._pb = pb_utils
        config = json.loads(args["model_config"])
        self._decoder = JetDecoder.from_version_dir(Path(args["model_repository"]) / args["model_version"])
        self.input_names = self._decoder.input_names
        self.output_names = list(OUTPUT_NAMES)
        check_config_tensors(config, self.input_names, self.output_names)

    def execute(self, requests: list[Any]) -> list[Any]:
        return execute_requests(self._pb, requests, self.input_names, self.output_names,
                                self._decoder.jets_per_request)
