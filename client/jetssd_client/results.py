"""Typed results of ``POST /v1/detect`` (docs/serving.md §3): plain frozen dataclasses, no pydantic."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from jetssd_client.errors import ProtocolError

LABELS = ("t", "V", "H")
"""Jet classes: top quark, W/Z boson, Higgs boson."""


@dataclass(frozen=True, slots=True)
class Jet:
    """One detected jet: class label, softmax score, axis (η, φ in [−π, π)) and regressed pT in GeV."""

    label: str
    score: float
    eta: float
    phi: float
    pt: float

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Jet:
        return cls(str(data["label"]), float(data["score"]), float(data["eta"]), float(data["phi"]),
                   float(data["pt"]))

    def to_json(self) -> dict[str, Any]:
        """The gateway's JSON form ``{"label", "score", "eta", "phi", "pt"}``."""
        return {"label": self.label, "score": self.score, "eta": self.eta, "phi": self.phi, "pt": self.pt}


@dataclass(frozen=True, slots=True)
class EventResult:
    """Jets of one event (highest score first) and the gateway's per-stage timings in ms."""

    id: str
    jets: tuple[Jet, ...]
    timing_ms: Mapping[str, float] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> EventResult:
        return cls(str(data["id"]), tuple(Jet.from_json(j) for j in data["jets"]),
                   {str(k): float(v) for k, v in (data.get("timing_ms") or {}).items()})

    def to_json(self) -> dict[str, Any]:
        """``{"id", "jets"}``: the record of one event in ``reprocess`` outputs."""
        return {"id": self.id, "jets": [j.to_json() for j in self.jets]}


@dataclass(frozen=True, slots=True)
class DetectResponse:
    """What produced the jets, and the jets of every event in request order.

    ``elapsed_s`` (client-side wall time of the successful attempt) and ``attempts`` (1 + retries) are the
    client's; the other fields are the gateway's.
    """

    backend: str
    model: str
    model_version: int
    fallback_from: str | None
    events: tuple[EventResult, ...]
    elapsed_s: float = 0.0
    attempts: int = 1

    @property
    def fallback(self) -> bool:
        """True when the requested backend was unavailable and another (``backend``) answered."""
        return self.fallback_from is not None

    @classmethod
    def from_json(cls, data: Any, *, elapsed_s: float = 0.0, attempts: int = 1) -> DetectResponse:
        try:
            return cls(str(data["backend"]), str(data["model"]), int(data["model_version"]),
                       None if data.get("fallback_from") is None else str(data["fallback_from"]),
                       tuple(EventResult.from_json(e) for e in data["events"]), elapsed_s, attempts)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ProtocolError(f"unexpected /v1/detect response body ({type(exc).__name__}: {exc}); "
                                "is the URL a jetssd gateway?") from exc
