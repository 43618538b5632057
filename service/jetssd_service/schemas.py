"""Request and response bodies of the HTTP API (pydantic v2), with the examples shown at ``/docs``.

The request models check structure and types only (JSON numbers, equal-length columns are checked later);
physics validity (finite values, pT ≥ 0, known kinds, indices inside the image) is checked by the core
containers :class:`jetssd.event.PFCandidates` / :class:`jetssd.event.SparsePixels`, the one implementation.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, model_validator

from jetssd import geometry

Label = Literal["t", "V", "H"]
BackendName = Literal["triton", "local", "dsp"]

_FLOATS = list[StrictFloat]
_INTS = list[StrictInt]


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PFCandidatesIn(_In):
    """Particle-flow candidates of one event, columnar (equal-length arrays)."""

    pt: _FLOATS = Field(description="pT (tracks) or ET (calorimeter), GeV, ≥ 0.")
    eta: _FLOATS = Field(description="Pseudorapidity; outside [−2.958, 2.958) the candidate has no pixel.")
    phi: _FLOATS = Field(description="Azimuth, rad, any real value (wrapped).")
    kind: _INTS = Field(description="0 track, 1 photon/electron (ECAL), 2 neutral hadron (HCAL).")


class PixelsIn(_In):
    """Non-empty pixels of the 3×340×360 event image in COO form (the reference HDF5 layout)."""

    channel: _INTS = Field(description="0 tracks, 1 ECAL, 2 HCAL.")
    ieta: _INTS = Field(description="η bin, 0…339.")
    iphi: _INTS = Field(description="φ bin, 0…359.")
    value: _FLOATS = Field(description="Summed pT/ET in GeV, ≥ 0; duplicate pixels are summed.")


class ImageIn(_In):
    """A dense event image, base64 of the C-order array (1.47 MB per float32 event: prefer pf_candidates)."""

    dtype: Literal["float32", "float16"] = Field(description="Element type (little-endian).")
    shape: list[StrictInt] = Field(description=f"Must be {list(geometry.IMAGE_SHAPE)}.",
                                   examples=[list(geometry.IMAGE_SHAPE)])
    data: str = Field(description="Standard base64 of the raw little-endian array bytes.")


class EventIn(_In):
    """One event: an ``id`` and exactly one of ``pf_candidates``, ``pixels`` or ``image``."""

    id: str | None = Field(None, max_length=256, description="Echoed in the response; default: the event's index.")
    pf_candidates: PFCandidatesIn | None = None
    pixels: PixelsIn | None = None
    image: ImageIn | None = None

    @model_validator(mode="after")
    def _exactly_one_form(self) -> EventIn:
        given = [name for name in ("pf_candidates", "pixels", "image") if getattr(self, name) is not None]
        if len(given) != 1:
            found = ", ".join(given) if given else "none"
            raise ValueError(f"give exactly one of pf_candidates, pixels or image (found: {found})")
        return self


_PF_EXAMPLE: dict[str, Any] = {"id": "run1-ls7-evt42",
               "pf_candidates": {"pt": [153.2, 88.1, 1.4], "eta": [0.41, 0.43, -1.9], "phi": [1.02, 1.05, -2.7],
                                 "kind": [0, 1, 2]}}


class DetectRequest(_In):
    """Events to run through one backend and model."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"backend": "triton", "model": "twn", "events": [_PF_EXAMPLE]},
        {"events": [{"id": "e0", "pixels": {"channel": [0, 1], "ieta": [170, 171], "iphi": [10, 10],
                                            "value": [120.5, 33.0]}}]},
    ]})

    backend: BackendName | None = Field(None, description="triton, local (in-process ONNX Runtime) or dsp; "
                                                          "default from the gateway settings.")
    model: str | None = Field(None, max_length=64,
                              description="Model variant (see GET /v1/models), e.g. fpn, twn, int8; "
                                          "default from the gateway settings (twn).")
    events: list[EventIn] = Field(min_length=1, description="One or more events (at most the configured limit).")


class Jet(BaseModel):
    """One detected jet."""

    label: Label = Field(description="t (top quark), V (W/Z boson) or H (Higgs boson).")
    score: float = Field(description="Softmax probability of the class.")
    eta: float = Field(description="Pseudorapidity of the jet axis.")
    phi: float = Field(description="Azimuth, rad, in [−π, π).")
    pt: float = Field(description="Regressed transverse momentum, GeV.")


class EventResult(BaseModel):
    """Jets of one event, sorted by score (highest first)."""

    id: str
    jets: list[Jet]
    timing_ms: dict[str, float] = Field(description=(
        "Milliseconds: parse (JSON → arrays), rasterize (→ dense image), infer (backend round trip of the batch "
        "this event ran in; for triton it includes the server-side post-processing), postprocess (decode + "
        "NMS in the gateway, or unpacking Triton's jets), total (whole request so far)."))


class DspLatency(BaseModel):
    """The SensPro SP1000 latency model of one event (backend dsp only; docs/dsp.md §9): modelled, not measured."""

    cycles: int = Field(description="Cycles of one event on one SP1000 core.")
    cycles_10_cores: int = Field(description="Cycles of one event on 10 worker cores + a controller core.")
    latency_ms: dict[str, float] = Field(description='{"1_core": ms, "10_cores": ms} at clock_hz.')
    paper_ms: dict[str, float] = Field(description="The paper's measured latencies (Table 3), for comparison.")
    clock_hz: float = Field(description="Assumed core clock.")
    per: Literal["event"] = Field(description="The numbers are per event, whatever the batch size.")


class DetectResponse(BaseModel):
    """What produced the jets, and the jets of every event in request order."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "backend": "triton", "model": "twn", "model_version": 1, "fallback_from": None,
        "events": [{"id": "run1-ls7-evt42",
                    "jets": [{"label": "t", "score": 0.93, "eta": 0.42, "phi": 1.03, "pt": 612.4}],
                    "timing_ms": {"parse": 0.21, "rasterize": 0.25, "infer": 24.1, "postprocess": 0.02,
                                  "total": 25.0}}],
    }]})

    backend: BackendName = Field(description="The backend that produced the jets.")
    model: str
    model_version: int
    fallback_from: BackendName | None = Field(
        None, description="Set when the requested backend was unavailable and the gateway fell back "
                          "(header X-JetSSD-Fallback too).")
    dsp: DspLatency | None = Field(None, description="Backend dsp: the modelled SP1000 latency of one event.")
    events: list[EventResult]


class ErrorDetail(BaseModel):
    code: str = Field(description="Stable machine-readable code, e.g. invalid_input, backend_unavailable.")
    field: str | None = Field(description="The offending request field, e.g. events[0].pf_candidates.pt.")
    message: str


class ErrorBody(BaseModel):
    """Body of every error response."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"error": {
        "code": "invalid_input", "field": "events[0].pf_candidates.pt",
        "message": "negative value at index 3; pT must be ≥ 0"}}]})

    error: ErrorDetail


class BackendStatus(BaseModel):
    available: bool = Field(description="Can serve this model now.")
    detail: str | None = Field(None, description="Why not, when not available.")


class ModelInfo(BaseModel):
    name: str = Field(description="Variant name to pass as model.")
    version: int = Field(description="Version served (the highest in the repository).")
    versions: list[int]
    description: str | None = None
    metrics: dict[str, object] = Field(default_factory=dict, description="Test-set metrics from the metadata.")
    backends: dict[str, BackendStatus]


class ModelsResponse(BaseModel):
    default_backend: BackendName
    default_model: str
    models: list[ModelInfo]


class HealthResponse(BaseModel):
    status: Literal["ok"] = "ok"


class ReadyResponse(BaseModel):
    ready: bool
    backend: BackendName
    model: str
    detail: str | None = None
