"""Generator-level particles, columnar: what Pythia hands to the fast detector simulation."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray


@dataclass(frozen=True, eq=False)
class Particles:
    """Final-state particles of one interaction (or of a signal event with its pileup), all shape [n].

    Attributes:
        px, py, pz, e: four-momentum, GeV, float64.
        pid: PDG id, int32.
        charge: electric charge in units of e, int8.
        is_pileup: bool, true for particles of overlaid min-bias interactions.
    """

    px: NDArray[np.float64]
    py: NDArray[np.float64]
    pz: NDArray[np.float64]
    e: NDArray[np.float64]
    pid: NDArray[np.int32]
    charge: NDArray[np.int8]
    is_pileup: NDArray[np.bool_]

    def __len__(self) -> int:
        return len(self.px)

    @property
    def pt(self) -> NDArray[np.float64]:
        return np.hypot(self.px, self.py)

    @property
    def phi(self) -> NDArray[np.float64]:
        return np.arctan2(self.py, self.px)

    @property
    def eta(self) -> NDArray[np.float64]:
        """Pseudorapidity; ±inf-free (a particle along the beam gets a large finite |η|)."""
        pt = np.maximum(self.pt, 1e-12)
        return np.arcsinh(self.pz / pt)

    @classmethod
    def empty(cls) -> Particles:
        f = np.zeros(0, np.float64)
        return cls(f, f, f, f, np.zeros(0, np.int32), np.zeros(0, np.int8), np.zeros(0, np.bool_))

    @classmethod
    def concatenate(cls, parts: Sequence[Particles]) -> Particles:
        if not parts:
            return cls.empty()
        return cls(*(np.concatenate([getattr(p, name) for p in parts]) for name in
                     ("px", "py", "pz", "e", "pid", "charge", "is_pileup")))

    def select(self, mask: NDArray[np.bool_]) -> Particles:
        return Particles(self.px[mask], self.py[mask], self.pz[mask], self.e[mask], self.pid[mask],
                         self.charge[mask], self.is_pileup[mask])
