"""The real Triton server on the committed model repository: the ensembles give the in-process detector's jets,
dynamic batching batches, a dead python stub is brought back by the watchdog, stop leaves nothing behind.

One server for the whole session (tests/integration/conftest.py); the tests that break or stop it run last.
Exact equality holds when the ONNX Runtime batch is the same (ORT's kernels give last-bit differences between
batch sizes), so the exact checks send sequential requests and compare with ``detect`` on the same batch.
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

pytest.importorskip("tritonclient.http")
pytest.importorskip("tritonclient.grpc")

import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from jetssd_service.triton_server import TritonServer, TritonStartError, shm_regions

from jetssd.event import SparsePixels
from jetssd.inference import OnnxDetector
from jetssd.postprocess import Detections
from jetssd.rasterize import densify_batch
from jetssd.triton import unpack_jets
from jetssd.triton.repository import discover_variants

pytestmark = pytest.mark.triton

REPOSITORY = Path(__file__).resolve().parents[2] / "model_repository"
VARIANTS = sorted(discover_variants(REPOSITORY))


@pytest.fixture(scope="module")
def images(generated_events: list[SparsePixels]) -> np.ndarray:
    return densify_batch(generated_events)


@pytest.fixture(scope="module")
def detectors(triton_server: TritonServer) -> dict[str, OnnxDetector]:
    return {v: OnnxDetector(triton_server.repository / f"pfjet_ssd_{v}", threads=1) for v in VARIANTS}


@pytest.fixture
def client(triton_server: TritonServer) -> Iterator[httpclient.InferenceServerClient]:
    c = httpclient.InferenceServerClient(triton_server.http_url)
    yield c
    c.close()  # open keep-alive connections would hold the server's shutdown for its exit timeout


def infer_jets(client: Any, model: str, x: np.ndarray, module: Any = httpclient) -> list[Detections]:
    inp = module.InferInput("image", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    outputs = [module.InferRequestedOutput("jets"), module.InferRequestedOutput("num_jets")]
    result = client.infer(model, [inp], outputs=outputs)
    return unpack_jets(result.as_numpy("jets"), result.as_numpy("num_jets"))


def assert_same(got: list[Detections], want: list[Detections]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        for name in ("label", "score", "eta", "phi", "pt"):
            np.testing.assert_array_equal(getattr(g, name), getattr(w, name), err_msg=name)


def metric(text: str, name: str, model: str) -> float:
    match = re.search(rf'^{name}{{model="{model}",version="\d+"}} (\S+)$', text, re.MULTILINE)
    assert match, f"{name} of {model} not in the metrics"
    return float(match.group(1))


# --- serving ---------------------------------------------------------------------------------------------------


def test_all_models_ready(triton_server: TritonServer, client: httpclient.InferenceServerClient) -> None:
    assert client.is_server_ready()
    index = {m["name"]: m for m in client.get_model_repository_index()}
    for variant in VARIANTS:
        for model in (f"pfjet_ssd_{variant}", f"pfjet_nms_{variant}", f"pfjet_{variant}"):
            assert index[model]["state"] == "READY", index[model]
    config = client.get_model_config(f"pfjet_{VARIANTS[0]}")
    assert config["max_batch_size"] == 16
    assert [o["name"] for o in config["output"]] == ["jets", "num_jets"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_ensemble_jets_equal_the_detector(client: httpclient.InferenceServerClient, images: np.ndarray,
                                          detectors: dict[str, OnnxDetector], variant: str) -> None:
    detector = detectors[variant]
    n_jets = 0
    for i in range(len(images)):  # one event per request
        want = detector.detect(images[i:i + 1])
        assert_same(infer_jets(client, f"pfjet_{variant}", images[i:i + 1]), want)
        n_jets += len(want[0])
    assert n_jets > 0
    # several events per request: the same as detect() on the same batch
    assert_same(infer_jets(client, f"pfjet_{variant}", images[:4]), detector.detect(images[:4]))
    assert_same(infer_jets(client, f"pfjet_{variant}", images[4:]), detector.detect(images[4:]))


def test_grpc_and_raw_model(triton_server: TritonServer, client: httpclient.InferenceServerClient,
                            images: np.ndarray, detectors: dict[str, OnnxDetector]) -> None:
    variant = VARIANTS[0]
    detector = detectors[variant]
    grpc = grpcclient.InferenceServerClient(triton_server.grpc_url)
    try:
        assert_same(infer_jets(grpc, f"pfjet_{variant}", images[:2], grpcclient), detector.detect(images[:2]))
    finally:
        grpc.close()
    inp = httpclient.InferInput("image", [2, 3, 340, 360], "FP32")
    inp.set_data_from_numpy(images[:2])
    result = client.infer(f"pfjet_ssd_{variant}", [inp])
    for name, want in zip(("loc", "cls_logits", "reg"), detector.run(images[:2]), strict=True):
        np.testing.assert_array_equal(result.as_numpy(name), want, err_msg=name)


def test_bad_request_is_answered_and_the_model_stays_up(client: httpclient.InferenceServerClient) -> None:
    variant = VARIANTS[0]
    inputs = []
    for name, width in (("loc", 2), ("cls_logits", 4), ("reg", 1)):  # 10 anchors: not this model's 2024
        inp = httpclient.InferInput(name, [1, 10, width], "FP32")
        inp.set_data_from_numpy(np.zeros((1, 10, width), np.float32))
        inputs.append(inp)
    with pytest.raises(Exception, match="ValueError"):
        client.infer(f"pfjet_nms_{variant}", inputs)
    with pytest.raises(Exception, match=r"max_batch_size|batch"):  # 17 > max_batch_size
        infer_jets(client, f"pfjet_{variant}", np.zeros((17, 3, 340, 360), np.float32))
    assert client.is_model_ready(f"pfjet_{variant}")
    assert len(infer_jets(client, f"pfjet_{variant}", np.zeros((1, 3, 340, 360), np.float32))) == 1


def test_dynamic_batching_batches_concurrent_requests(triton_server: TritonServer, images: np.ndarray,
                                                      detectors: dict[str, OnnxDetector]) -> None:
    variant = VARIANTS[0]
    model = f"pfjet_ssd_{variant}"
    before = httpx.get(triton_server.metrics_url).text
    n_threads, per_thread = 8, 6

    def worker(k: int) -> list[tuple[int, Detections]]:
        c = httpclient.InferenceServerClient(triton_server.http_url)
        try:
            out = []
            for j in range(per_thread):
                i = (k + j) % len(images)
                out.append((i, infer_jets(c, f"pfjet_{variant}", images[i:i + 1])[0]))
            return out
        finally:
            c.close()

    with ThreadPoolExecutor(n_threads) as pool:
        results = [r for rs in pool.map(worker, range(n_threads)) for r in rs]
    after = httpx.get(triton_server.metrics_url).text
    inferences = metric(after, "nv_inference_count", model) - metric(before, "nv_inference_count", model)
    executions = metric(after, "nv_inference_exec_count", model) - metric(before, "nv_inference_exec_count", model)
    assert inferences == n_threads * per_thread
    assert inferences / executions > 1.0, f"{inferences} inferences in {executions} executions: no batching"
    # Batched with other events, ORT may differ in the last bits: the jets agree up to float rounding.
    want = detectors[variant].detect(images)
    for i, got in results:
        assert len(got) > 0
        np.testing.assert_allclose(got.score[:1], want[i].score[:1], rtol=1e-4)
        np.testing.assert_allclose(got.pt[:1], want[i].pt[:1], rtol=1e-4)


# --- failures, recovery, stop (these run last: they break or stop the shared server) ----------------------------


def test_start_errors_are_clear(triton_server: TritonServer, tmp_path: Path) -> None:
    taken = TritonServer(triton_server.repository, http_port=triton_server.http_port, grpc_port=0, metrics_port=0,
                         work_dir=tmp_path / "w1")
    with pytest.raises(TritonStartError, match=f"already in use: HTTP {triton_server.http_port}"):
        taken.start()
    assert taken.pid is None
    broken = tmp_path / "broken"
    (broken / "bad" / "1").mkdir(parents=True)
    (broken / "bad" / "config.pbtxt").write_text('name: "bad"\nbackend: "python"\nmax_batch_size: 1\n'
                                                 'input [ { name: "x" data_type: TYPE_FP32 dims: [ 1 ] } ]\n'
                                                 'output [ { name: "y" data_type: TYPE_FP32 dims: [ 1 ] } ]\n')
    (broken / "bad" / "1" / "model.py").write_text("raise RuntimeError('deliberately broken model')\n")
    server = TritonServer(broken, http_port=0, grpc_port=0, metrics_port=0, work_dir=tmp_path / "w2",
                          watchdog_interval=None)
    with pytest.raises(TritonStartError, match="deliberately broken model"):
        server.start()
    assert not server.running
    assert not shm_regions(server.shm_prefix)


def test_watchdog_reloads_a_model_whose_stub_died(triton_server: TritonServer,
                                                  client: httpclient.InferenceServerClient, images: np.ndarray,
                                                  detectors: dict[str, OnnxDetector]) -> None:
    variant = VARIANTS[-1]
    model = f"pfjet_ssd_{variant}"
    stubs = [s for s in triton_server.stubs() if s.model == model]
    assert len(stubs) == 1
    done = len(triton_server.recoveries)
    os.kill(stubs[0].pid, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while len(triton_server.recoveries) == done and time.monotonic() < deadline:
        time.sleep(0.1)
    assert triton_server.recoveries[done:], "the watchdog did not react"
    event = triton_server.recoveries[done]
    assert (event.model, event.ok) == (model, True), event
    new = [s for s in triton_server.stubs() if s.model == model]
    assert len(new) == 1
    assert new[0].pid != stubs[0].pid
    assert_same(infer_jets(client, f"pfjet_{variant}", images[:1]), detectors[variant].detect(images[:1]))
    assert triton_server.recoveries[done + 1:] == []  # one reload, no loop


def test_stop_leaves_nothing_behind_and_start_again(triton_server: TritonServer, images: np.ndarray,
                                                    detectors: dict[str, OnnxDetector]) -> None:
    pid = triton_server.pid
    assert pid is not None
    stubs = [s.pid for s in triton_server.stubs()]
    assert stubs
    assert shm_regions(triton_server.shm_prefix)
    triton_server.stop()
    assert not triton_server.running
    # zombies (dead, waiting for init to reap them) are not running processes
    deadline = time.monotonic() + 10
    while any(_running(p) for p in [pid, *stubs]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in [pid, *stubs] if _running(p)]
    assert not shm_regions(triton_server.shm_prefix)
    assert not triton_server.is_ready()

    triton_server.start()  # the same ports again, for whoever uses the session server next
    assert triton_server.is_ready()
    c = httpclient.InferenceServerClient(triton_server.http_url)
    try:
        variant = VARIANTS[0]
        assert_same(infer_jets(c, f"pfjet_{variant}", images[:1]), detectors[variant].detect(images[:1]))
    finally:
        c.close()


def _running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2:].split()[0] != "Z"
