"""The gateway's HTTP API on the ``local`` backend with the committed model repository (fpn, twn).

Events come from the project's generator (Pythia signal + a small min-bias pileup overlay + the fast detector
simulation); the reference answer is :class:`jetssd.inference.OnnxDetector` on the rasterized events.
"""

from __future__ import annotations

import base64
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("pythia8mc")
pytest.importorskip("fastapi")

from fastapi.testclient import TestClient
from jetssd_client.encode import pf_candidates
from jetssd_service.app import create_app
from jetssd_service.settings import Settings

from jetssd.event import CLASS_NAMES, PFCandidates
from jetssd.inference import OnnxDetector
from jetssd.postprocess import Detections
from jetssd.rasterize import densify, rasterize_batch, rasterize_sparse

REPOSITORY = Path(__file__).resolve().parents[2] / "model_repository"
VARIANTS = tuple(sorted(p.name.removeprefix("pfjet_ssd_") for p in REPOSITORY.glob("pfjet_ssd_*")))
JET_FIELDS = ("score", "eta", "phi", "pt")
LOCAL_BATCH = 2
"""Events per ONNX Runtime run of the test gateway: requests of 3+ events run in several batches."""


# --------------------------------------------------------------------------------------------- events


def generate_events(cache: Path, channels: tuple[str, ...] = ("tt", "WW", "HH"), per_channel: int = 1,
                    mu: int = 15, seed: int = 2024) -> list[PFCandidates]:
    """Signal events with ``mu`` pileup interactions from a small min-bias pool, through the fast simulation."""
    from jetssd.datagen.fastsim import simulate
    from jetssd.datagen.particles import Particles
    from jetssd.datagen.pileup import MinBiasPool
    from jetssd.datagen.pythia import EventGenerator

    pool_dir = cache / "pool"
    pool = MinBiasPool.load(pool_dir) if pool_dir.is_dir() else MinBiasPool.build(
        pool_dir, 12, seed=seed, mpi_cache_dir=cache / "mpi")
    rng = np.random.default_rng(seed)
    events = []
    for channel in channels:
        for gen in EventGenerator(channel, seed, mpi_cache_dir=cache / "mpi").generate(per_channel):
            particles = Particles.concatenate([gen.particles, pool.draw(rng, mu)])
            events.append(simulate(particles, rng).pf)
    return events


def closed_port() -> int:
    """A local TCP port nobody listens on (Triton 'unreachable')."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pf_event(pf: PFCandidates, event_id: str) -> dict[str, Any]:
    return {"id": event_id, "pf_candidates": pf_candidates(pf)}


def pixel_event(pf: PFCandidates, event_id: str) -> dict[str, Any]:
    px = rasterize_sparse(pf)
    return {"id": event_id, "pixels": {"channel": px.channel.tolist(), "ieta": px.ieta.tolist(),
                                       "iphi": px.iphi.tolist(), "value": px.value.tolist()}}


def image_event(pf: PFCandidates, event_id: str, dtype: str = "float32") -> dict[str, Any]:
    image = densify(rasterize_sparse(pf)).astype("<f4" if dtype == "float32" else "<f2")
    return {"id": event_id, "image": {"dtype": dtype, "shape": list(image.shape),
                                      "data": base64.b64encode(image.tobytes()).decode()}}


def as_detections(jets: list[dict[str, Any]]) -> Detections:
    """JSON jets → Detections (float32, as the backends produce them)."""
    return Detections(label=np.array([CLASS_NAMES.index(j["label"]) for j in jets], np.int8),
                      **{k: np.array([j[k] for j in jets], np.float32) for k in JET_FIELDS})


def assert_same_jets(got: Detections, want: Detections) -> None:
    np.testing.assert_array_equal(got.label, want.label)
    for name in JET_FIELDS:
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)


# -------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def events(tmp_path_factory: pytest.TempPathFactory) -> list[PFCandidates]:
    return generate_events(tmp_path_factory.mktemp("gen"))


@pytest.fixture(scope="module")
def detectors() -> dict[str, OnnxDetector]:
    return {v: OnnxDetector(REPOSITORY / f"pfjet_ssd_{v}", threads=1) for v in VARIANTS}


@pytest.fixture(scope="module")
def settings() -> Settings:
    return Settings(model_repository=REPOSITORY, default_backend="local", triton_http_port=closed_port(),
                    local_threads=1, local_batch_size=LOCAL_BATCH, triton_retry_after_s=3)


@pytest.fixture(scope="module")
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as c:
        yield c


def detect(client: TestClient, events: list[dict[str, Any]], **params: Any) -> dict[str, Any]:
    r = client.post("/v1/detect", json={**params, "events": events})
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


# ---------------------------------------------------------------------------------------------- detect


@pytest.mark.parametrize("variant", VARIANTS)
def test_jets_equal_the_onnx_detector_on_the_rasterized_events(
        client: TestClient, events: list[PFCandidates], detectors: dict[str, OnnxDetector], variant: str) -> None:
    body = detect(client, [pf_event(pf, f"ev{i}") for i, pf in enumerate(events)], model=variant, backend="local")
    # The same ONNX Runtime batches as the backend (local_batch_size events): the batch size moves the last bit.
    images, step = rasterize_batch(events), LOCAL_BATCH
    want = [d for a in range(0, len(images), step) for d in detectors[variant].detect(images[a:a + step])]
    assert body["backend"] == "local"
    assert body["model"] == variant
    assert body["model_version"] == detectors[variant].version
    assert body["fallback_from"] is None
    assert [e["id"] for e in body["events"]] == [f"ev{i}" for i in range(len(events))]
    assert sum(len(w) for w in want) > 0, "the generated events should give jets"
    for event, w in zip(body["events"], want, strict=True):
        assert_same_jets(as_detections(event["jets"]), w)


def test_every_input_form_gives_the_same_jets(client: TestClient, events: list[PFCandidates]) -> None:
    pf = events[0]
    # One request per form: the same ONNX Runtime batch (of one) for each, so the jets agree to the bit.
    forms = [pf_event(pf, "pf"), pixel_event(pf, "pixels"), image_event(pf, "f32")]
    jets = [as_detections(detect(client, [form])["events"][0]["jets"]) for form in forms]
    reference = jets[0]
    assert len(reference) > 0
    for other in jets[1:]:
        assert_same_jets(other, reference)

    # float16 rounds the GeV values (relative 5e-4): the confident jets stay, their numbers move a little.
    half = as_detections(detect(client, [image_event(pf, "f16", "float16")])["events"][0]["jets"])
    confident = reference.score > 0.2
    assert confident.any()
    n = int(confident.sum())
    np.testing.assert_array_equal(half.label[:n], reference.label[:n])
    np.testing.assert_allclose(half.score[:n], reference.score[:n], atol=0.02)
    np.testing.assert_allclose(half.eta[:n], reference.eta[:n], atol=0.01)
    np.testing.assert_allclose(half.phi[:n], reference.phi[:n], atol=0.01)
    np.testing.assert_allclose(half.pt[:n], reference.pt[:n], rtol=0.02)


def test_response_shape_defaults_and_timings(client: TestClient, events: list[PFCandidates]) -> None:
    event = pf_event(events[1], "x")
    del event["id"]
    body = detect(client, [event, pf_event(events[2], "named")])
    assert body["model"] == "twn"  # the default model: pruned TWN
    assert [e["id"] for e in body["events"]] == ["0", "named"]
    for e in body["events"]:
        scores = [j["score"] for j in e["jets"]]
        assert scores == sorted(scores, reverse=True)
        assert all(j["label"] in CLASS_NAMES and -np.pi <= j["phi"] < np.pi and j["pt"] > 0 for j in e["jets"])
        timing = e["timing_ms"]
        assert set(timing) == {"parse", "rasterize", "infer", "postprocess", "total"}
        assert all(v >= 0 for v in timing.values())
        assert timing["total"] >= timing["infer"]


def test_an_event_without_candidates_has_no_jets_or_a_few(client: TestClient) -> None:
    body = detect(client, [{"id": "empty", "pf_candidates": {"pt": [], "eta": [], "phi": [], "kind": []}}])
    assert body["events"][0]["id"] == "empty"
    assert all(j["score"] < 0.5 for j in body["events"][0]["jets"])


def test_dsp_backend_runs_the_emulator_with_its_latency_model(client: TestClient,
                                                              events: list[PFCandidates]) -> None:
    from jetssd.dsp.detector import DspDetector

    body = detect(client, [pf_event(pf, f"ev{i}") for i, pf in enumerate(events)], backend="dsp")
    assert body["backend"] == "dsp"
    assert body["model"] == "twn"
    detector = DspDetector(REPOSITORY / "pfjet_ssd_twn")
    assert body["model_version"] == detector.version
    dsp = body["dsp"]
    assert dsp["per"] == "event"
    assert dsp["cycles"] > dsp["cycles_10_cores"] > 0
    assert dsp["latency_ms"]["1_core"] > dsp["latency_ms"]["10_cores"] > 0
    assert dsp["latency_ms"]["1_core"] == pytest.approx(dsp["cycles"] / dsp["clock_hz"] * 1e3)
    assert dsp["paper_ms"] == {"1_core": 8.5, "10_cores": 0.9}
    # Integer emulation: the batch size cannot move a bit, so one reference batch of all events is exact.
    want = detector.detect(rasterize_batch(events))
    assert sum(len(w) for w in want) > 0
    for event, w in zip(body["events"], want, strict=True):
        assert_same_jets(as_detections(event["jets"]), w)
    local = detect(client, [pf_event(events[0], "a")], backend="local")
    assert local.get("dsp") is None  # the latency model belongs to dsp answers only


def test_dsp_backend_refuses_a_model_without_a_program(client: TestClient, events: list[PFCandidates]) -> None:
    r = client.post("/v1/detect", json={"backend": "dsp", "model": "fpn", "events": [pf_event(events[0], "a")]})
    assert r.status_code == 422
    error = r.json()["error"]
    assert (error["code"], error["field"]) == ("unsupported_model", "model")
    assert "twn" in error["message"]  # says which models the dsp backend serves


@pytest.mark.parametrize(("params", "code", "field"), [
    ({"model": "resnet50"}, "unknown_model", "model"),
    ({"backend": "gpu"}, "unknown_backend", "backend"),
])
def test_unknown_model_or_backend_is_422_naming_it(client: TestClient, events: list[PFCandidates],
                                                   params: dict[str, str], code: str, field: str) -> None:
    r = client.post("/v1/detect", json={**params, "events": [pf_event(events[0], "a")]})
    assert r.status_code == 422
    assert r.json()["error"]["code"] == code
    assert r.json()["error"]["field"] == field
    if code == "unknown_model":
        assert "fpn" in r.json()["error"]["message"]
        assert "twn" in r.json()["error"]["message"]


# ---------------------------------------------------------------------------- triton unreachable, unit


def test_unreachable_triton_is_503_with_retry_after_then_fails_fast(client: TestClient,
                                                                    events: list[PFCandidates]) -> None:
    for _ in range(2):  # the second request is refused without another connection attempt
        r = client.post("/v1/detect", json={"backend": "triton", "events": [pf_event(events[0], "a")]})
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "backend_unavailable"
        assert 1 <= int(r.headers["Retry-After"]) <= 3


def test_fallback_to_local_when_triton_is_unreachable(settings: Settings, events: list[PFCandidates]) -> None:
    fallback = settings.model_copy(update={"fallback_to_local": True, "default_backend": "triton"})
    with TestClient(create_app(fallback)) as c:
        r = c.post("/v1/detect", json={"events": [pf_event(events[0], "a")]})
        assert r.status_code == 200, r.text
        assert r.headers["X-JetSSD-Fallback"] == "triton"
        assert r.json()["backend"] == "local"
        assert r.json()["fallback_from"] == "triton"
        local = detect(c, [pf_event(events[0], "a")], backend="local")
        assert r.json()["events"][0]["jets"] == local["events"][0]["jets"]
        assert 'jetssd_gateway_fallbacks_total{requested="triton",used="local"} 1.0' in c.get("/metrics").text
        # readiness is about the default backend itself, fallback or not
        assert c.get("/readyz").status_code == 503


# ------------------------------------------------------------------------------------ models & health


def test_models_lists_variants_versions_and_backends(client: TestClient, detectors: dict[str, OnnxDetector]) -> None:
    r = client.get("/v1/models")
    assert r.status_code == 200
    body = r.json()
    assert body["default_backend"] == "local"
    assert body["default_model"] == "twn"
    models = {m["name"]: m for m in body["models"]}
    assert set(models) == set(VARIANTS)
    for name, m in models.items():
        assert m["version"] == detectors[name].version
        assert m["versions"] == sorted(int(p.name) for p in (REPOSITORY / f"pfjet_ssd_{name}").iterdir()
                                       if p.name.isdigit())
        assert m["backends"]["local"] == {"available": True, "detail": None}
        assert m["backends"]["triton"]["available"] is False
        assert m["backends"]["dsp"]["available"] is (name == "twn")  # the one model with a DSP program
        assert set(m["metrics"]["ap"]) == {"reference", "voc", "coco"}


def test_health_and_readiness(client: TestClient, settings: Settings) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    r = client.get("/readyz")
    assert r.status_code == 200
    assert r.json() == {"ready": True, "backend": "local", "model": "twn", "detail": None}

    # default backend triton and no Triton: not ready, and says when to ask again
    with TestClient(create_app(settings.model_copy(update={"default_backend": "triton"}))) as c:
        r = c.get("/readyz")
        assert r.status_code == 503
        assert r.json()["ready"] is False
        assert r.json()["backend"] == "triton"
        assert r.json()["detail"]
        assert r.headers["Retry-After"] == "3"
        assert c.get("/healthz").status_code == 200


def test_openapi_documents_the_api(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    assert {"/v1/detect", "/v1/models", "/healthz", "/readyz", "/metrics"} <= set(spec["paths"])
    schemas = spec["components"]["schemas"]
    assert {"DetectRequest", "DetectResponse", "EventIn", "PFCandidatesIn", "PixelsIn", "ImageIn", "ErrorBody"} <= set(
        schemas)
    assert schemas["DetectRequest"]["examples"]
    detect_op = spec["paths"]["/v1/detect"]["post"]
    assert detect_op["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/DetectRequest")
    assert {"413", "422", "501", "503"} <= set(detect_op["responses"])
    assert client.get("/docs").status_code == 200


# --------------------------------------------------------------------------------------------- metrics


def sample(text: str, name: str, **labels: str) -> float:
    """Value of one Prometheus sample (0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return 0.0


def test_metrics_count_requests_events_jets_stages_and_errors(settings: Settings,
                                                             events: list[PFCandidates]) -> None:
    with TestClient(create_app(settings)) as c:
        bodies = [detect(c, [pf_event(pf, str(i)) for i, pf in enumerate(events)], model="fpn"),
                  detect(c, [pf_event(events[0], "a")], model="fpn")]
        bad = c.post("/v1/detect", json={"events": [{"id": "x", "pixels": {"channel": [7], "ieta": [0], "iphi": [0],
                                                                            "value": [1.0]}}]})
        assert bad.status_code == 422
        text = c.get("/metrics").text

    n_events = len(events) + 1
    jets = [j for b in bodies for e in b["events"] for j in e["jets"]]
    assert sample(text, "jetssd_gateway_requests_total", endpoint="/v1/detect", status="200") == 2
    assert sample(text, "jetssd_gateway_requests_total", endpoint="/v1/detect", status="422") == 1
    assert sample(text, "jetssd_gateway_request_duration_seconds_count", endpoint="/v1/detect", backend="local",
                  model="fpn") == 2
    assert sample(text, "jetssd_gateway_events_total", backend="local", model="fpn") == n_events
    for label in CLASS_NAMES:
        assert sample(text, "jetssd_gateway_jets_total", backend="local", model="fpn", label=label) == sum(
            j["label"] == label for j in jets)
    for stage in ("parse", "rasterize", "infer", "postprocess"):
        assert sample(text, "jetssd_gateway_stage_duration_seconds_count", stage=stage, backend="local",
                      model="fpn") == 2
    assert sample(text, "jetssd_gateway_stage_duration_seconds_sum", stage="infer", backend="local", model="fpn") > 0
    assert sample(text, "jetssd_gateway_errors_total", code="invalid_input") == 1
    assert sample(text, "jetssd_gateway_in_flight_requests") == 1  # the /metrics request itself
    assert sample(text, "jetssd_gateway_backend_up", backend="local", model="fpn") == 1


def test_a_broken_model_is_reported_and_the_others_still_serve(tmp_path: Path, settings: Settings,
                                                               events: list[PFCandidates]) -> None:
    import shutil

    repo = tmp_path / "repo"
    shutil.copytree(REPOSITORY, repo, ignore=shutil.ignore_patterns("__pycache__"))
    served = max(int(p.name) for p in (repo / "pfjet_ssd_fpn").iterdir() if p.name.isdigit())  # the newest
    (repo / "pfjet_ssd_fpn" / str(served) / "model.onnx").write_bytes(b"not an onnx graph")
    broken = settings.model_copy(update={"model_repository": repo, "default_model": "fpn"})
    with TestClient(create_app(broken)) as c:
        models = {m["name"]: m for m in c.get("/v1/models").json()["models"]}
        assert models["fpn"]["backends"]["local"]["available"] is False
        assert "fpn" in models["fpn"]["backends"]["local"]["detail"]
        assert models["twn"]["backends"]["local"]["available"] is True
        assert c.get("/readyz").status_code == 503
        r = c.post("/v1/detect", json={"model": "fpn", "events": [pf_event(events[0], "a")]})
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "model_unavailable"
        assert detect(c, [pf_event(events[0], "a")], model="twn")["model"] == "twn"
