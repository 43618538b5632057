"""Events → the JSON of ``POST /v1/detect``: PF candidates when an event has them, pixels otherwise.

Events come from :mod:`jetssd.io` (both file layouts; the one reader implementation of the project), or are
given directly as :class:`jetssd.event.PFCandidates`, :class:`jetssd.event.SparsePixels`, a dense
``[3, 340, 360]`` array, or an already encoded event dict.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from itertools import islice
from typing import Any, TypeAlias, TypeVar

import numpy as np

from jetssd.event import Event, PFCandidates, SparsePixels
from jetssd.geometry import IMAGE_SHAPE

EventLike: TypeAlias = Event | PFCandidates | SparsePixels | np.ndarray | Mapping[str, Any]
"""Anything :func:`encode_event` accepts."""

T = TypeVar("T")


def pf_candidates(pf: PFCandidates) -> dict[str, list[Any]]:
    """The ``pf_candidates`` object: columns pt, eta, phi (floats), kind (integers)."""
    return {"pt": pf.pt.tolist(), "eta": pf.eta.tolist(), "phi": pf.phi.tolist(), "kind": pf.kind.tolist()}


def pixels(px: SparsePixels) -> dict[str, list[Any]]:
    """The ``pixels`` object (reference layout): channel, ieta, iphi (integers), value (floats)."""
    return {"channel": px.channel.tolist(), "ieta": px.ieta.tolist(), "iphi": px.iphi.tolist(),
            "value": px.value.tolist()}


def image(array: np.ndarray, dtype: str = "float32") -> dict[str, Any]:
    """The dense ``image`` object (base64 of the little-endian C-order array); 1.47 MB per float32 event."""
    if dtype not in ("float32", "float16"):
        raise ValueError(f"dtype must be float32 or float16, got {dtype!r}")
    a = np.ascontiguousarray(np.asarray(array), dtype="<f4" if dtype == "float32" else "<f2")
    if a.shape != tuple(IMAGE_SHAPE):
        raise ValueError(f"an image must have shape {tuple(IMAGE_SHAPE)}, got {a.shape}")
    return {"dtype": dtype, "shape": list(a.shape), "data": base64.b64encode(a.tobytes()).decode("ascii")}


def encode_event(event: EventLike, id: str | None = None, *, form: str = "auto") -> dict[str, Any]:
    """One element of the request's ``events`` list.

    Args:
        event: a :class:`jetssd.event.Event` (from :func:`jetssd.io.open_events`), PF candidates, sparse pixels,
            a dense float array of shape [3, 340, 360], or an already encoded dict (returned with ``id`` set).
        id: echoed by the gateway in the response (None: the gateway uses the event's index in the request).
        form: for an :class:`Event`: ``"auto"`` (PF candidates when the event has them, as files in the jetssd
            format do, else pixels, as in the reference layout), ``"pf_candidates"`` or ``"pixels"``.
    """
    out: dict[str, Any]
    if isinstance(event, Event):
        if form == "auto":
            form = "pf_candidates" if event.pf is not None else "pixels"
        if form == "pf_candidates":
            if event.pf is None:
                raise ValueError("this event has no PF candidates (reference-layout files carry only pixels)")
            out = {"pf_candidates": pf_candidates(event.pf)}
        elif form == "pixels":
            out = {"pixels": pixels(event.pixels)}
        else:
            raise ValueError(f"form must be auto, pf_candidates or pixels, got {form!r}")
    elif isinstance(event, PFCandidates):
        out = {"pf_candidates": pf_candidates(event)}
    elif isinstance(event, SparsePixels):
        out = {"pixels": pixels(event)}
    elif isinstance(event, np.ndarray):
        out = {"image": image(event)}
    elif isinstance(event, Mapping):
        out = {k: v for k, v in event.items() if k != "id"}
        if id is None and event.get("id") is not None:
            id = str(event["id"])
    else:
        raise TypeError(f"cannot encode {type(event).__name__} as an event; expected jetssd.event.Event, "
                        "PFCandidates, SparsePixels, a [3, 340, 360] array or an event dict")
    return {"id": id, **out} if id is not None else out


def request_body(events: Sequence[Mapping[str, Any]], backend: str | None = None, model: str | None = None) -> bytes:
    """The JSON body of ``POST /v1/detect`` for already encoded events (bytes, ready to send)."""
    payload: dict[str, Any] = {"events": list(events)}
    if backend is not None:
        payload["backend"] = backend
    if model is not None:
        payload["model"] = model
    return json.dumps(payload, separators=(",", ":"), allow_nan=False).encode("utf-8")


def batched(items: Iterable[T], n: int) -> Iterator[list[T]]:
    """Consecutive lists of at most ``n`` items (the last may be shorter)."""
    if n < 1:
        raise ValueError(f"batch size must be ≥ 1, got {n}")
    it = iter(items)
    while batch := list(islice(it, n)):
        yield batch
