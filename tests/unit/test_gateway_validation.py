"""Bad input to POST /v1/detect: every class gets its status, a stable error code and the field to blame.

Each case breaks one thing of a valid request built from a generated event (Pythia + the fast simulation),
and nothing of a rejected request is processed (no events counted).
"""

from __future__ import annotations

import base64
import copy
import json
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("pythia8mc")
pytest.importorskip("fastapi")

from fastapi.testclient import TestClient
from jetssd_service.app import create_app
from jetssd_service.settings import Settings

from jetssd.event import PFCandidates
from jetssd.rasterize import densify, rasterize_sparse

REPOSITORY = Path(__file__).resolve().parents[2] / "model_repository"
MAX_EVENTS = 4
MAX_BODY = 4 * 1024 * 1024  # room for one dense float32 image (1.96 MB in base64), not three

Request = dict[str, Any]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def pf(tmp_path_factory: pytest.TempPathFactory) -> PFCandidates:
    """One generated G* → tt event, detector-simulated (no pileup: small and quick)."""
    from jetssd.datagen.fastsim import simulate
    from jetssd.datagen.pythia import EventGenerator

    gen = next(EventGenerator("tt", 99, mpi_cache_dir=tmp_path_factory.mktemp("mpi")).generate(1))
    return simulate(gen.particles, np.random.default_rng(99)).pf


@pytest.fixture(scope="module")
def max_candidates(pf: PFCandidates) -> int:
    return len(pf) + 10


@pytest.fixture(scope="module")
def client(max_candidates: int) -> Iterator[TestClient]:
    settings = Settings(model_repository=REPOSITORY, default_backend="local", triton_http_port=closed_port(),
                        local_threads=1, local_preload=False, max_events_per_request=MAX_EVENTS,
                        max_candidates_per_event=max_candidates, max_body_bytes=MAX_BODY)
    with TestClient(create_app(settings)) as c:
        yield c


@pytest.fixture(scope="module")
def good(pf: PFCandidates) -> Request:
    px = rasterize_sparse(pf)
    image = densify(px)
    return {"events": [
        {"id": "pf", "pf_candidates": {"pt": pf.pt.tolist(), "eta": pf.eta.tolist(), "phi": pf.phi.tolist(),
                                       "kind": pf.kind.tolist()}},
        {"id": "px", "pixels": {"channel": px.channel.tolist(), "ieta": px.ieta.tolist(), "iphi": px.iphi.tolist(),
                                "value": px.value.tolist()}},
        {"id": "img", "image": {"dtype": "float32", "shape": list(image.shape),
                                "data": base64.b64encode(image.tobytes()).decode()}},
    ]}


def post(client: TestClient, body: Request | bytes) -> Any:
    # json.dumps writes NaN/Infinity tokens, as Python clients do: the gateway must refuse them by field.
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return client.post("/v1/detect", content=content, headers={"content-type": "application/json"})


def test_the_unbroken_request_is_fine(client: TestClient, good: Request) -> None:
    r = post(client, good)
    assert r.status_code == 200, r.text
    assert [e["id"] for e in r.json()["events"]] == ["pf", "px", "img"]


def _set(path: str, value: Any) -> Callable[[Request], None]:
    """Mutation setting ``events.0.pf_candidates.pt.3``-style paths (a trailing '+' appends)."""
    def mutate(body: Request) -> None:
        *parents, last = path.split(".")
        node: Any = body
        for key in parents:
            node = node[int(key)] if key.isdigit() else node[key]
        if last == "+":
            node.append(value)
        elif last.isdigit():
            node[int(last)] = value
        else:
            node[last] = value
    return mutate


def _delete(path: str) -> Callable[[Request], None]:
    def mutate(body: Request) -> None:
        *parents, last = path.split(".")
        node: Any = body
        for key in parents:
            node = node[int(key)] if key.isdigit() else node[key]
        del node[last]
    return mutate


def _image(values: Callable[[np.ndarray], np.ndarray], dtype: str = "float32") -> Callable[[Request], None]:
    """Replace event 2's image by ``values(image)`` encoded as ``dtype``."""
    def mutate(body: Request) -> None:
        img = body["events"][2]["image"]
        array = np.frombuffer(base64.b64decode(img["data"]), "<f4").reshape(img["shape"])
        img["data"] = base64.b64encode(values(array.copy()).astype(dtype).tobytes()).decode()
    return mutate


def _nan_at(array: np.ndarray) -> np.ndarray:
    array[1, 100, 200] = np.nan
    return array


def _negative_at(array: np.ndarray) -> np.ndarray:
    array[0, 5, 6] = -1.0
    return array


CASES: dict[str, tuple[Callable[[Request], None], int, str, str | None]] = {
    # PF candidates: the core's checks, prefixed with the event
    "pt NaN": (_set("events.0.pf_candidates.pt.3", float("nan")), 422, "invalid_input", "events[0].pf_candidates.pt"),
    "eta inf": (_set("events.0.pf_candidates.eta.0", float("inf")), 422, "invalid_input",
                "events[0].pf_candidates.eta"),
    "phi -inf": (_set("events.0.pf_candidates.phi.1", float("-inf")), 422, "invalid_input",
                 "events[0].pf_candidates.phi"),
    "negative pt": (_set("events.0.pf_candidates.pt.2", -1.5), 422, "invalid_input", "events[0].pf_candidates.pt"),
    "unknown kind": (_set("events.0.pf_candidates.kind.4", 3), 422, "invalid_input", "events[0].pf_candidates.kind"),
    "ragged columns": (_set("events.0.pf_candidates.eta.+", 0.5), 422, "invalid_input",
                       "events[0].pf_candidates.eta"),
    "pt not a number": (_set("events.0.pf_candidates.pt.3", "12.5"), 422, "invalid_input",
                        "events[0].pf_candidates.pt[3]"),
    "kind not an integer": (_set("events.0.pf_candidates.kind.1", 1.5), 422, "invalid_input",
                            "events[0].pf_candidates.kind[1]"),
    "missing column": (_delete("events.0.pf_candidates.kind"), 422, "invalid_input", "events[0].pf_candidates.kind"),
    "unknown key": (_set("events.0.pf_candidates.mass", [1.0]), 422, "invalid_input", "events[0].pf_candidates.mass"),
    # pixels
    "ieta outside": (_set("events.1.pixels.ieta.0", 340), 422, "invalid_input", "events[1].pixels.ieta"),
    "iphi negative": (_set("events.1.pixels.iphi.0", -1), 422, "invalid_input", "events[1].pixels.iphi"),
    "unknown channel": (_set("events.1.pixels.channel.0", 3), 422, "invalid_input", "events[1].pixels.channel"),
    "negative pixel value": (_set("events.1.pixels.value.0", -0.1), 422, "invalid_input", "events[1].pixels.value"),
    "NaN pixel value": (_set("events.1.pixels.value.0", float("nan")), 422, "invalid_input",
                        "events[1].pixels.value"),
    "ragged pixels": (_set("events.1.pixels.value.+", 1.0), 422, "invalid_input", "events[1].pixels.value"),
    # dense images
    "image shape": (_set("events.2.image.shape", [3, 360, 340]), 422, "invalid_input", "events[2].image.shape"),
    "image dtype": (_set("events.2.image.dtype", "float64"), 422, "invalid_input", "events[2].image.dtype"),
    "image not base64": (_set("events.2.image.data", "this is not base64!"), 422, "invalid_input",
                         "events[2].image.data"),
    "image byte count": (_image(lambda a: a[:, :-1]), 422, "invalid_input", "events[2].image.data"),
    "float16 bytes as float32": (_image(lambda a: a, "float16"), 422, "invalid_input", "events[2].image.data"),
    "image NaN": (_image(_nan_at), 422, "invalid_input", "events[2].image.data"),
    "image negative": (_image(_negative_at), 422, "invalid_input", "events[2].image.data"),
    # event and request structure
    "two forms in one event": (_set("events.1.pf_candidates", {"pt": [], "eta": [], "phi": [], "kind": []}), 422,
                               "invalid_input", "events[1]"),
    "no form": (_delete("events.2.image"), 422, "invalid_input", "events[2]"),
    "id too long": (_set("events.0.id", "x" * 300), 422, "invalid_input", "events[0].id"),
    "no events": (_set("events", []), 422, "invalid_input", "events"),
    "unknown model": (_set("model", "yolo"), 422, "unknown_model", "model"),
    "unknown backend": (_set("backend", "fpga"), 422, "unknown_backend", "backend"),
    # limits
    "too many events": (lambda b: b["events"].extend(copy.deepcopy(b["events"][:2])), 413, "too_many_events",
                        "events"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(client: TestClient, good: Request, case: str) -> None:
    mutate, status, code, field = CASES[case]
    body = copy.deepcopy(good)
    mutate(body)
    r = post(client, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == code
    assert error["field"] == field
    assert error["message"]


def test_too_many_candidates_is_413_naming_the_event(client: TestClient, good: Request, max_candidates: int) -> None:
    body = copy.deepcopy(good)
    cols = body["events"][0]["pf_candidates"]
    for name in cols:  # the event twice over: more candidates than the limit
        cols[name] = cols[name] + cols[name]
    assert len(cols["pt"]) > max_candidates
    r = post(client, body)
    assert r.status_code == 413
    assert r.json()["error"] == {"code": "too_many_candidates", "field": "events[0].pf_candidates",
                                 "message": f"{len(cols['pt'])} entries, the limit is {max_candidates} per event"}


def test_oversized_body_is_413(client: TestClient, good: Request) -> None:
    body = copy.deepcopy(good)
    body["events"] = [body["events"][2]] * 3  # three dense images: ~5.9 MB > 4 MiB
    r = post(client, body)
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "body_too_large"

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit holds while streaming
        data = json.dumps(body).encode()
        for a in range(0, len(data), 1 << 20):
            yield data[a:a + (1 << 20)]

    r = client.post("/v1/detect", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "body_too_large"


@pytest.mark.parametrize("raw", [b"", b"{not json", b"[1, 2]", b'"events"'])
def test_not_a_json_object(client: TestClient, raw: bytes) -> None:
    r = post(client, raw)
    assert r.status_code in (400, 422)
    assert r.json()["error"]["code"] == ("invalid_json" if r.status_code == 400 else "invalid_input")


def test_a_rejected_request_processes_nothing(client: TestClient, good: Request) -> None:
    def events_counted() -> float:
        lines = [ln for ln in client.get("/metrics").text.splitlines() if ln.startswith("jetssd_gateway_events_total")]
        return sum(float(ln.rsplit(" ", 1)[1]) for ln in lines)

    before = events_counted()
    body = copy.deepcopy(good)
    _set("events.2.image.shape", [1, 2, 3])(body)  # the last event is bad: the first two must not run either
    assert post(client, body).status_code == 422
    assert events_counted() == before


def test_unknown_path_and_method_are_json_errors(client: TestClient) -> None:
    r = client.get("/v1/nothing")
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "not_found"
    r = client.get("/v1/detect")
    assert r.status_code == 405
    assert r.json()["error"]["code"] == "method_not_allowed"
