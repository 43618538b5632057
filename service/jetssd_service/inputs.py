"""Request events → one dense float32 batch [N, 3, 340, 360], validated, with per-event timings.

Each input form goes through the core: PF candidates through :meth:`jetssd.event.PFCandidates.from_arrays` and
:func:`jetssd.rasterize.rasterize_sparse`, pixels through :meth:`jetssd.event.SparsePixels.from_arrays`, and all
of them through :func:`jetssd.rasterize.densify`. Every event is validated before any backend sees the batch,
so a bad event rejects the whole request and nothing is half-processed. Errors name the field as
``events[i].<form>.<column>``.
"""

from __future__ import annotations

import base64
import binascii
import time
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from jetssd import geometry
from jetssd.event import InvalidInputError, PFCandidates, SparsePixels
from jetssd.rasterize import densify, rasterize_sparse
from jetssd_service.errors import ApiError
from jetssd_service.schemas import EventIn, ImageIn

_N_VALUES = int(np.prod(geometry.IMAGE_SHAPE))
_DTYPES: dict[str, np.dtype[np.floating]] = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2")}


@dataclass(frozen=True)
class PreparedBatch:
    """Dense images of a request's events, in request order, and what preparing each one cost.

    Attributes:
        ids: the events' ids (their index when the request gave none).
        images: float32 [N, 3, 340, 360], GeV.
        parse_ms: per event, JSON columns → validated arrays.
        rasterize_ms: per event, arrays → dense image (PF candidates → pixels → image; pixels → image).
    """

    ids: list[str]
    images: NDArray[np.float32]
    parse_ms: list[float]
    rasterize_ms: list[float]

    def __len__(self) -> int:
        return len(self.ids)


def _invalid(where: str, exc: InvalidInputError) -> ApiError:
    return ApiError("invalid_input", exc.message, field=f"{where}.{exc.field}")


def _check_count(where: str, n: int, limit: int) -> None:
    if n > limit:
        raise ApiError("too_many_candidates", f"{n} entries, the limit is {limit} per event", field=where)


def _decode_image(where: str, image: ImageIn) -> NDArray[np.float32]:
    """Base64 image → float32 [3, 340, 360], checking shape, byte count, finiteness and sign."""
    if tuple(image.shape) != geometry.IMAGE_SHAPE:
        raise ApiError("invalid_input", f"shape must be {list(geometry.IMAGE_SHAPE)}, got {image.shape}",
                       field=f"{where}.shape")
    dtype = _DTYPES[image.dtype]
    try:
        raw = base64.b64decode(image.data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ApiError("invalid_input", f"not valid base64 ({exc})", field=f"{where}.data") from None
    expected = _N_VALUES * dtype.itemsize
    if len(raw) != expected:
        raise ApiError("invalid_input", f"decodes to {len(raw)} bytes, {image.dtype} {list(image.shape)} needs "
                                        f"{expected}", field=f"{where}.data")
    values = np.frombuffer(raw, dtype=dtype).astype(np.float32).reshape(geometry.IMAGE_SHAPE)
    bad = ~np.isfinite(values) | (values < 0)
    if bad.any():
        c, i, j = np.unravel_index(int(np.argmax(bad)), geometry.IMAGE_SHAPE)
        what = "non-finite" if not np.isfinite(values[c, i, j]) else "negative"
        raise ApiError("invalid_input", f"{int(bad.sum())} negative or non-finite value(s); first {what} at "
                                        f"[channel {c}, ieta {i}, iphi {j}]", field=f"{where}.data")
    return values


def _to_pixels(where: str, event: EventIn, limit: int) -> tuple[SparsePixels | None, NDArray[np.float32] | None,
                                                                 float]:
    """Validate one event: its sparse pixels (or dense image) and the seconds spent rasterizing PF candidates."""
    if event.pf_candidates is not None:
        pf_in = event.pf_candidates
        _check_count(f"{where}.pf_candidates", len(pf_in.pt), limit)
        try:
            pf = PFCandidates.from_arrays(pf_in.pt, pf_in.eta, pf_in.phi, pf_in.kind)
        except InvalidInputError as exc:
            raise _invalid(f"{where}.pf_candidates", exc) from None
        t0 = time.perf_counter()
        pixels = rasterize_sparse(pf)
        return pixels, None, time.perf_counter() - t0
    if event.pixels is not None:
        px = event.pixels
        _check_count(f"{where}.pixels", len(px.value), limit)
        try:
            return SparsePixels.from_arrays(px.channel, px.ieta, px.iphi, px.value), None, 0.0
        except InvalidInputError as exc:
            raise _invalid(f"{where}.pixels", exc) from None
    assert event.image is not None  # EventIn guarantees exactly one form
    return None, _decode_image(f"{where}.image", event.image), 0.0


def prepare_events(events: list[EventIn], max_candidates: int, json_seconds: float = 0.0) -> PreparedBatch:
    """Validate and rasterize ``events`` into one dense batch.

    Args:
        events: the request's events (already structurally valid).
        max_candidates: most PF candidates / pixels per event.
        json_seconds: time spent decoding the request JSON, shared equally among the events' parse times.

    Raises:
        ApiError: ``invalid_input`` or ``too_many_candidates`` naming the first bad field.
    """
    n = len(events)
    share = json_seconds / n if n else 0.0
    ids: list[str] = []
    parse_s: list[float] = []
    raster_s: list[float] = []
    validated: list[tuple[SparsePixels | None, NDArray[np.float32] | None]] = []
    for i, event in enumerate(events):
        t0 = time.perf_counter()
        pixels, dense, rasterize_seconds = _to_pixels(f"events[{i}]", event, max_candidates)
        total = time.perf_counter() - t0
        ids.append(event.id if event.id is not None else str(i))
        parse_s.append(share + total - rasterize_seconds)
        raster_s.append(rasterize_seconds)
        validated.append((pixels, dense))

    images = np.empty((n, *geometry.IMAGE_SHAPE), np.float32)
    for i, (pixels, dense) in enumerate(validated):
        t0 = time.perf_counter()
        if pixels is not None:
            densify(pixels, out=images[i])
        else:
            images[i] = dense
        raster_s[i] += time.perf_counter() - t0
    return PreparedBatch(ids, images, [1e3 * s for s in parse_s], [1e3 * s for s in raster_s])
