"""Triton python-backend model ``pfjet_ssd_<variant>``: ONNX Runtime on the exported graph, batch in, raw heads out.

Triton loads ``pfjet_ssd_<variant>/<version>/model.py``, a two-line shim that re-exports
:class:`TritonPythonModel` from here, so the served code is this tested module of the installed package.
The session is :class:`jetssd.inference.OnnxDetector` on the version directory: the same graph, the same
session options and the same input checks as the in-process detector (one implementation).

Tensors (names from the model's ``metadata.json``; batch axis implicit, ``max_batch_size`` in config.pbtxt):
``image`` FP32 [3, 340, 360] in; ``loc`` FP32 [P, 2], ``cls_logits`` FP32 [P, 4], ``reg`` FP32 [P, 1] out.
``execute`` concatenates the images of all the requests the dynamic batcher queued and runs ORT once.

Config parameters: ``intra_op_threads`` (ORT intra-op threads per instance, default 1).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jetssd.triton.batching import PerRequest, execute_requests, int_parameter, model_parameters, run_batched


class TritonPythonModel:
    """The ``pfjet_ssd_<variant>`` model (see the module docstring)."""

    def initialize(self, args: dict[str, str]) -> None:
        import triton_python_backend_utils as pb_utils  # only inside the Triton stub

        from jetssd.inference import OnnxDetector

        self._pb = pb_utils
        config = json.loads(args["model_config"])
        threads = int_parameter(model_parameters(config), "intra_op_threads", 1)
        self._detector = OnnxDetector(Path(args["model_repository"]) / args["model_version"], threads=threads)
        meta = self._detector.metadata
        self.input_names = [str(meta["input"]["name"])]
        self.output_names = [str(o["name"]) for o in meta["outputs"]]
        check_config_tensors(config, self.input_names, self.output_names)

    def compute(self, inputs: PerRequest) -> PerRequest:
        """Raw head outputs of every request: one ORT run on the concatenated images."""
        return run_batched(lambda images: self._detector.run(images), [r[0] for r in inputs])

    def execute(self, requests: list[Any]) -> list[Any]:
        return execute_requests(self._pb, requests, self.input_names, self.output_names, self.compute)

    def finalize(self) -> None:
        self._detector = None  # type: ignore[assignment]  # drop the ORT session before the stub exits


def check_config_tensors(config: dict[str, Any], inputs: list[str], outputs: list[str]) -> None:
    """The tensor names of config.pbtxt must be the model's (a stale config fails the load, clearly)."""
    got_in = [str(t["name"]) for t in config.get("input", [])]
    got_out = [str(t["name"]) for t in config.get("output", [])]
    if sorted(got_in) != sorted(inputs) or sorted(got_out) != sorted(outputs):
        raise ValueError(f"model {config.get('name')!r}: config.pbtxt has inputs {got_in} and outputs {got_out}, "
                         f"the model's metadata.json says {inputs} and {outputs}; "
                         f"regenerate the configs with `jetssd triton-repo`")
