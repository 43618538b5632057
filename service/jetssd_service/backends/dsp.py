"""The ``dsp`` backend: the bit-exact fixed-point emulation of the TWN model on a CEVA SensPro DSP (docs/dsp.md).

In the gateway's process, like the local backend (whose batching, threading and timing it inherits), but running
:class:`jetssd.dsp.detector.DspDetector`: the compiled program of the model version
(``pfjet_ssd_<variant>/<version>/dsp/program.npz``) in the integer emulator, then the shared decode + NMS with that
version's anchors. Only variants with a compiled program can run here (today: twn); any other gets 422
``unsupported_model``. Every response carries the SP1000 latency model of one event::

    "dsp": {"cycles": …, "cycles_10_cores": …, "latency_ms": {"1_core": …, "10_cores": …},
            "paper_ms": {"1_core": 8.5, "10_cores": 0.9}, "clock_hz": 1e9, "per": "event"}
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jetssd.dsp.detector import DspDetector, program_path
from jetssd_service.backends.base import BackendStatus, ImageDetector
from jetssd_service.backends.local import LocalBackend
from jetssd_service.errors import ApiError
from jetssd_service.repository import ModelEntry, ModelRepository


class DspBackend(LocalBackend):
    """The SensPro emulator in-process.

    Args:
        repository: the variants; a variant is served when its newest version has a DSP program.
        max_concurrency: emulations at once (each uses one core).
        batch_size: events per emulator run.
        preload: load the programs in :meth:`start`.
    """

    name = "dsp"

    def __init__(self, repository: ModelRepository, *, max_concurrency: int = 1, batch_size: int = 4,
                 preload: bool = True) -> None:
        super().__init__(repository, threads=1, max_concurrency=max_concurrency, batch_size=batch_size,
                         preload=preload)

    def _has_program(self, entry: ModelEntry) -> bool:
        return program_path(entry.version_dir).is_file()

    def _load(self, entry: ModelEntry) -> ImageDetector:
        if not self._has_program(entry):
            raise ApiError("unsupported_model", f"model {entry.variant!r} (version {entry.version}) has no compiled "
                           f"DSP program ({program_path(entry.version_dir)}); the dsp backend serves "
                           f"{self.served_variants() or 'no model'}", field="model")
        detector = DspDetector(entry.version_dir)
        # One empty event through the emulator: numba compiles (or loads from its cache) the kernels now, at
        # load time, instead of inside the first request's latency (seconds on a fresh install).
        height, width = detector.program.metadata.get("image_shape", (340, 360))
        detector.run(np.zeros((1, 3, height, width), np.float32))
        return detector

    def served_variants(self) -> list[str]:
        """Variants whose newest version has a DSP program."""
        return [e.variant for e in self._repository.entries() if self._has_program(e)]

    async def start(self) -> None:
        await super().start_variants(self.served_variants())

    async def status(self, variant: str) -> BackendStatus:
        if variant in self._repository and not self._has_program(self._repository[variant]):
            return BackendStatus(False, f"model {variant!r} has no compiled DSP program")
        return await super().status(variant)

    def _extra(self, detector: ImageDetector) -> dict[str, Any] | None:
        assert isinstance(detector, DspDetector)
        latency = detector.latency
        return {"dsp": {"cycles": latency["cycles"], "cycles_10_cores": latency["cycles_10_cores"],
                        "latency_ms": latency["latency_ms"], "paper_ms": latency["paper_ms"],
                        "clock_hz": latency["assumptions"]["clock_hz"], "per": "event"}}
