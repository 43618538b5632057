"""The pure core of the Triton python-backend models: request batches in and out, jets packed as tensors.

Triton's dynamic batcher hands a python model a list of requests; each request carries its own batch of
events. The models concatenate the inputs of all requests into one array, run once (that is what makes dynamic
batching real batching) and split the outputs back, request by request. The jets of an event are a ragged list;
on the wire they are one float32 tensor ``jets`` [n_events, max_jets, 5] (per row: label, score, eta, phi, pt;
rows sorted by score and zero-padded to the largest jet count of the request) plus ``num_jets`` int32
[n_events, 1]. :func:`pack_jets` and :func:`unpack_jets` convert both ways, losslessly (a label 0/1/2 and the
float32 columns are exact in float32), so a client that unpacks gets the same :class:`Detections` the
in-process :class:`jetssd.inference.OnnxDetector` gives.

Numpy only: no Triton, no onnxruntime, so the gateway and the unit tests import it freely.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from jetssd.postprocess import Detections

JET_COLUMNS = ("label", "score", "eta", "phi", "pt")
"""Columns of a row of the ``jets`` tensor, in order."""
N_JET_COLUMNS = len(JET_COLUMNS)


def concat_requests(inputs: Sequence[NDArray[Any]]) -> tuple[NDArray[Any], list[int]]:
    """Stack the batches of several requests along axis 0.

    Returns the C-contiguous batch (no copy for a single contiguous input) and the batch size of each request,
    the argument :func:`split_outputs` needs.

    Raises:
        ValueError: no inputs, or inputs that disagree in dtype or in the shape past axis 0.
    """
    if not inputs:
        raise ValueError("no inputs to concatenate")
    first = inputs[0]
    for i, x in enumerate(inputs[1:], start=1):
        if x.shape[1:] != first.shape[1:] or x.dtype != first.dtype:
            raise ValueError(f"request {i}: {x.dtype} {list(x.shape)} does not stack with request 0's "
                             f"{first.dtype} {list(first.shape)}")
    sizes = [int(x.shape[0]) for x in inputs]
    if len(inputs) == 1:
        return np.ascontiguousarray(first), sizes
    return np.concatenate(inputs, axis=0), sizes


def split_outputs(outputs: Sequence[NDArray[Any]], sizes: Sequence[int]) -> list[list[NDArray[Any]]]:
    """The inverse of :func:`concat_requests` for each output: ``result[r][k]`` is output ``k`` of request ``r``
    (contiguous views of the batch outputs).

    Raises:
        ValueError: an output whose axis 0 is not ``sum(sizes)``.
    """
    total = sum(sizes)
    for k, out in enumerate(outputs):
        if out.shape[0] != total:
            raise ValueError(f"output {k}: batch of {out.shape[0]}, expected {total} (sum of the request batches)")
    bounds = np.cumsum([0, *sizes])
    return [[np.ascontiguousarray(out[bounds[r]:bounds[r + 1]]) for out in outputs] for r in range(len(sizes))]


def run_batched(run: Callable[[NDArray[Any]], Sequence[NDArray[Any]]],
                inputs: Sequence[NDArray[Any]]) -> list[list[NDArray[Any]]]:
    """Concatenate the requests' inputs, call ``run`` once on the batch, split its outputs per request."""
    batch, sizes = concat_requests(inputs)
    return split_outputs(list(run(batch)), sizes)


def pack_jets(detections: Sequence[Detections]) -> tuple[NDArray[np.float32], NDArray[np.int32]]:
    """Jets of some events → (``jets`` float32 [n, m, 5], ``num_jets`` int32 [n, 1]), m = the largest count.

    Row ``j`` of event ``i`` is (label, score, eta, phi, pt) of its ``j``-th jet (the Detections order, i.e.
    by score); rows ``num_jets[i]`` … ``m − 1`` are zeros. With no jet at all, m = 0.
    """
    counts = np.array([len(d) for d in detections], dtype=np.int32)
    width = int(counts.max()) if len(counts) else 0
    jets = np.zeros((len(detections), width, N_JET_COLUMNS), np.float32)
    for i, d in enumerate(detections):
        n = len(d)
        if n:
            row = jets[i, :n]
            row[:, 0] = d.label
            row[:, 1] = d.score
            row[:, 2] = d.eta
            row[:, 3] = d.phi
            row[:, 4] = d.pt
    return jets, counts.reshape(-1, 1)


def unpack_jets(jets: NDArray[np.float32], num_jets: NDArray[np.integer[Any]]) -> list[Detections]:
    """(``jets`` [n, m, 5], ``num_jets`` [n, 1] or [n]) → one :class:`Detections` per event (arrays copied).

    Raises:
        ValueError: shapes that do not fit together, or a count outside [0, m].
    """
    jets = np.asarray(jets)
    counts = np.asarray(num_jets).reshape(-1)
    if jets.ndim != 3 or jets.shape[2] != N_JET_COLUMNS:
        raise ValueError(f"jets: expected shape [n, m, {N_JET_COLUMNS}], got {list(jets.shape)}")
    if len(counts) != jets.shape[0]:
        raise ValueError(f"num_jets: {len(counts)} counts for {jets.shape[0]} events")
    if len(counts) and (counts.min() < 0 or counts.max() > jets.shape[1]):
        raise ValueError(f"num_jets: counts must be in [0, {jets.shape[1]}], got {counts.tolist()}")
    out = []
    for i, n in enumerate(counts.tolist()):
        rows = jets[i, :n].astype(np.float32)
        out.append(Detections(label=rows[:, 0].astype(np.int8), score=rows[:, 1].copy(), eta=rows[:, 2].copy(),
                              phi=rows[:, 3].copy(), pt=rows[:, 4].copy()))
    return out


def model_parameters(model_config: Mapping[str, Any] | str) -> dict[str, str]:
    """The ``parameters`` of a Triton model config (the JSON Triton passes to ``initialize``) as {key: value}."""
    config = json.loads(model_config) if isinstance(model_config, str) else model_config
    params = config.get("parameters") or {}
    return {str(k): str(v.get("string_value", "")) for k, v in params.items()}


def int_parameter(params: Mapping[str, str], key: str, default: int, minimum: int = 1) -> int:
    """An integer parameter ≥ ``minimum`` (``default`` when absent or empty). ValueError names the key."""
    raw = params.get(key, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"model parameter {key!r}: expected an integer, got {raw!r}") from None
    if value < minimum:
        raise ValueError(f"model parameter {key!r}: must be ≥ {minimum}, got {value}")
    return value


PerRequest = list[list[NDArray[Any]]]
"""One list of arrays per request (its inputs, or its outputs), in the order of the tensor names."""


def execute_requests(pb_utils: Any, requests: Sequence[Any], input_names: Sequence[str],
                     output_names: Sequence[str], compute: Callable[[PerRequest], PerRequest]) -> list[Any]:
    """The body of a python model's ``execute``: read the named inputs of every request, ``compute`` all of them
    in one go, and wrap the results into one ``InferenceResponse`` per request (same order).

    ``pb_utils`` is the ``triton_python_backend_utils`` module (passed in so that tests can hand in a fake).
    When ``compute`` raises, every request of the batch gets an error response naming the exception (the model
    stays up; Triton returns HTTP 500 / gRPC INTERNAL with that text).
    """
    try:
        inputs = [[pb_utils.get_input_tensor_by_name(r, name).as_numpy() for name in input_names] for r in requests]
        outputs = compute(inputs)
    except Exception as exc:  # every failure of the batch becomes a per-request error, never a dead stub
        error = pb_utils.TritonError(f"{type(exc).__name__}: {exc}")
        return [pb_utils.InferenceResponse(output_tensors=[], error=error) for _ in requests]
    return [pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(name, np.ascontiguousarray(array))
                                                      for name, array in zip(output_names, arrays, strict=True)])
            for arrays in outputs]
