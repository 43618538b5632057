"""Serving PFJet-SSD with NVIDIA Triton (DESIGN §4.5): the python-backend models and the repository writer.

* :mod:`jetssd.triton.ssd_model` — ``pfjet_ssd_<variant>``: ONNX Runtime on the exported graph (batched).
* :mod:`jetssd.triton.nms_model` — ``pfjet_nms_<variant>``: the shared post-processing, jets packed as tensors.
* :mod:`jetssd.triton.batching` — the pure functions both use (request concat/split, jets pack/unpack).
* :mod:`jetssd.triton.repository` — config.pbtxt of every model and the ensembles ``pfjet_<variant>``.

Triton's ``triton_python_backend_utils`` is imported only inside the models' ``initialize``, so everything here
imports (and is tested) without Triton. Clients decode the ensemble's outputs with :func:`unpack_jets`.
"""

from jetssd.triton.batching import JET_COLUMNS, pack_jets, unpack_jets

__all__ = ["JET_COLUMNS", "pack_jets", "unpack_jets"]
