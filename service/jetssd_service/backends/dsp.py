"""The ``dsp`` backend: the fixed-point CEVA SensPro emulator (DESIGN §4.7), not built yet.

Until the DSP issue lands every request gets 501 ``not_implemented`` naming the ``backend`` field, and
``/v1/models`` lists the backend as unavailable, so clients can already code against the name.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from jetssd_service.backends.base import BackendStatus, BatchResult
from jetssd_service.errors import ApiError

NOT_IMPLEMENTED = ("the dsp backend (fixed-point SensPro emulator) is not available yet; "
                   "use backend 'triton' or 'local'")


class DspBackend:
    """Placeholder for the DSP emulator: answers 501."""

    name = "dsp"

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def status(self, variant: str) -> BackendStatus:
        return BackendStatus(False, NOT_IMPLEMENTED)

    async def detect(self, variant: str, images: NDArray[np.float32]) -> BatchResult:
        raise ApiError("not_implemented", NOT_IMPLEMENTED, field="backend")
