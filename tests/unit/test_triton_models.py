"""The Triton side without a server: request batching, jets packing, the python models with a stand-in
``triton_python_backend_utils``, and the generated model-repository configs.

The models run on the committed ``model_repository`` graphs (small, a few ms per event); the server itself is
covered by tests/integration/test_triton.py.
"""

from __future__ import annotations

import json
import shutil
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from google.protobuf import text_format

from jetssd.export import synthetic_images
from jetssd.inference import OnnxDetector
from jetssd.postprocess import Detections
from jetssd.triton import nms_model, ssd_model
from jetssd.triton.batching import (
    concat_requests,
    execute_requests,
    int_parameter,
    model_parameters,
    pack_jets,
    run_batched,
    split_outputs,
    unpack_jets,
)
from jetssd.triton.repository import (
    ServingConfig,
    discover_variants,
    ensemble_config,
    nms_config,
    ssd_config,
    write_triton_repository,
)

REPOSITORY = Path(__file__).resolve().parents[2] / "model_repository"
VARIANTS = sorted(discover_variants(REPOSITORY))


def random_detections(rng: np.random.Generator, n: int) -> Detections:
    return Detections(label=rng.integers(0, 3, n).astype(np.int8),
                      score=np.sort(rng.random(n).astype(np.float32))[::-1].copy(),
                      eta=rng.uniform(-2.9, 2.9, n).astype(np.float32),
                      phi=rng.uniform(-np.pi, np.pi, n).astype(np.float32),
                      pt=rng.uniform(10, 2000, n).astype(np.float32))


def assert_same(got: list[Detections], want: list[Detections]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        for name in ("label", "score", "eta", "phi", "pt"):
            np.testing.assert_array_equal(getattr(g, name), getattr(w, name), err_msg=name)
            assert getattr(g, name).dtype == getattr(w, name).dtype


# --- request batching ------------------------------------------------------------------------------------------


def test_concat_then_split_round_trip() -> None:
    rng = np.random.default_rng(0)
    parts = [rng.random((n, 3, 4)).astype(np.float32) for n in (1, 3, 2)]
    batch, sizes = concat_requests(parts)
    assert batch.shape == (6, 3, 4)
    assert sizes == [1, 3, 2]
    doubled = split_outputs([batch * 2, batch[:, :1]], sizes)
    assert len(doubled) == 3
    for part, (a, b) in zip(parts, doubled, strict=True):
        np.testing.assert_array_equal(a, part * 2)
        np.testing.assert_array_equal(b, part[:, :1])
        assert a.flags.c_contiguous
        assert b.flags.c_contiguous


def test_single_request_is_not_copied() -> None:
    x = np.zeros((2, 3), np.float32)
    batch, sizes = concat_requests([x])
    assert batch is x
    assert sizes == [2]


def test_concat_refuses_mismatched_requests() -> None:
    with pytest.raises(ValueError, match="request 1"):
        concat_requests([np.zeros((1, 3), np.float32), np.zeros((1, 4), np.float32)])
    with pytest.raises(ValueError, match="request 1"):
        concat_requests([np.zeros((1, 3), np.float32), np.zeros((1, 3), np.float64)])
    with pytest.raises(ValueError, match="no inputs"):
        concat_requests([])


def test_split_refuses_wrong_batch() -> None:
    with pytest.raises(ValueError, match="expected 3"):
        split_outputs([np.zeros((2, 1))], [1, 2])


def test_run_batched_calls_once() -> None:
    calls = []

    def run(x: np.ndarray) -> list[np.ndarray]:
        calls.append(x.shape[0])
        return [x + 1, x.sum(axis=1, keepdims=True)]

    out = run_batched(run, [np.ones((2, 2)), np.zeros((1, 2))])
    assert calls == [3]
    np.testing.assert_array_equal(out[1][0], [[1, 1]])
    np.testing.assert_array_equal(out[0][1], [[2], [2]])


# --- jets packing ----------------------------------------------------------------------------------------------


def test_pack_unpack_round_trip() -> None:
    rng = np.random.default_rng(1)
    dets = [random_detections(rng, n) for n in (3, 0, 7, 1)]
    jets, num_jets = pack_jets(dets)
    assert jets.shape == (4, 7, 5)
    assert jets.dtype == np.float32
    assert num_jets.shape == (4, 1)
    assert num_jets.dtype == np.int32
    assert num_jets.ravel().tolist() == [3, 0, 7, 1]
    assert not jets[1].any()  # zero padding
    assert not jets[0, 3:].any()
    np.testing.assert_array_equal(jets[2, :, 0], dets[2].label.astype(np.float32))
    np.testing.assert_array_equal(jets[2, :, 4], dets[2].pt)
    assert_same(unpack_jets(jets, num_jets), dets)
    assert_same(unpack_jets(jets, num_jets.ravel()), dets)  # [n] counts too


def test_pack_without_any_jet() -> None:
    jets, num_jets = pack_jets([Detections.empty(), Detections.empty()])
    assert jets.shape == (2, 0, 5)
    assert num_jets.ravel().tolist() == [0, 0]
    assert [len(d) for d in unpack_jets(jets, num_jets)] == [0, 0]
    jets, num_jets = pack_jets([])
    assert jets.shape == (0, 0, 5)
    assert unpack_jets(jets, num_jets) == []


def test_unpack_refuses_inconsistent_tensors() -> None:
    jets = np.zeros((2, 3, 5), np.float32)
    with pytest.raises(ValueError, match="jets"):
        unpack_jets(np.zeros((2, 3, 4), np.float32), np.zeros((2, 1), np.int32))
    with pytest.raises(ValueError, match="3 counts for 2 events"):
        unpack_jets(jets, np.zeros((3, 1), np.int32))
    with pytest.raises(ValueError, match=r"\[0, 3\]"):
        unpack_jets(jets, np.array([[1], [4]], np.int32))


def test_model_parameters() -> None:
    config = {"parameters": {"intra_op_threads": {"string_value": "2"}, "empty": {"string_value": ""}}}
    params = model_parameters(json.dumps(config))
    assert params == {"intra_op_threads": "2", "empty": ""}
    assert int_parameter(params, "intra_op_threads", 1) == 2
    assert int_parameter(params, "empty", 1) == 1
    assert int_parameter(params, "missing", 3) == 3
    assert model_parameters({}) == {}
    with pytest.raises(ValueError, match="intra_op_threads"):
        int_parameter({"intra_op_threads": "two"}, "intra_op_threads", 1)
    with pytest.raises(ValueError, match="≥ 1"):
        int_parameter({"intra_op_threads": "0"}, "intra_op_threads", 1)


# --- the python models with a stand-in for triton_python_backend_utils -------------------------------------------


class FakeTensor:
    def __init__(self, name: str, array: np.ndarray) -> None:
        self.name, self.array = name, array

    def as_numpy(self) -> np.ndarray:
        return self.array


class FakeResponse:
    def __init__(self, output_tensors: list[FakeTensor], error: Any = None) -> None:
        self.outputs = {t.name: t.array for t in output_tensors}
        self.error = error


class FakeError:
    def __init__(self, message: str) -> None:
        self.message = message


class FakeRequest:
    def __init__(self, **inputs: np.ndarray) -> None:
        self.inputs = inputs


def fake_pb_utils() -> types.ModuleType:
    module = types.ModuleType("triton_python_backend_utils")
    module.Tensor = FakeTensor  # type: ignore[attr-defined]
    module.InferenceResponse = FakeResponse  # type: ignore[attr-defined]
    module.TritonError = FakeError  # type: ignore[attr-defined]
    module.get_input_tensor_by_name = (  # type: ignore[attr-defined]
        lambda request, name: FakeTensor(name, request.inputs[name]) if name in request.inputs else None)
    return module


@pytest.fixture
def pb(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    module = fake_pb_utils()
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", module)
    return module


def model_args(name: str, version_dir: Path, inputs: list[str], outputs: list[str]) -> dict[str, str]:
    config = {"name": name, "input": [{"name": n} for n in inputs], "output": [{"name": n} for n in outputs],
              "parameters": {"intra_op_threads": {"string_value": "1"}}}
    return {"model_config": json.dumps(config), "model_repository": str(version_dir.parent),
            "model_version": version_dir.name, "model_name": name}


def test_execute_turns_a_failure_into_error_responses(pb: types.ModuleType) -> None:
    def boom(inputs: Any) -> Any:
        raise ValueError("bad batch")

    responses = execute_requests(pb, [FakeRequest(x=np.zeros(1)), FakeRequest(x=np.zeros(1))], ["x"], ["y"], boom)
    assert [r.error.message for r in responses] == ["ValueError: bad batch"] * 2
    missing = execute_requests(pb, [FakeRequest()], ["x"], ["y"], lambda inputs: inputs)
    assert "AttributeError" in missing[0].error.message


@pytest.mark.parametrize("variant", VARIANTS)
def test_models_equal_the_in_process_detector(pb: types.ModuleType, variant: str) -> None:
    """SSD model on two requests (1 + 2 events) → NMS model on its outputs → unpacked jets == detect()."""
    ssd_dir = REPOSITORY / f"pfjet_ssd_{variant}" / "1"
    nms_dir = REPOSITORY / f"pfjet_nms_{variant}" / "1"
    raw = ["loc", "cls_logits", "reg"]
    ssd = ssd_model.TritonPythonModel()
    ssd.initialize(model_args(f"pfjet_ssd_{variant}", ssd_dir, ["image"], raw))
    nms = nms_model.TritonPythonModel()
    nms.initialize(model_args(f"pfjet_nms_{variant}", nms_dir, raw, ["jets", "num_jets"]))
    images = synthetic_images(3, seed=5)
    detector = OnnxDetector(ssd_dir, threads=1)

    raw_responses = ssd.execute([FakeRequest(image=images[:1]), FakeRequest(image=images[1:])])
    assert all(r.error is None for r in raw_responses)
    want_raw = detector.run(images)  # one ORT run over the three events, as the model does
    for name, want in zip(raw, want_raw, strict=True):
        got = np.concatenate([r.outputs[name] for r in raw_responses])
        np.testing.assert_array_equal(got, want, err_msg=name)

    jet_responses = nms.execute([FakeRequest(**r.outputs) for r in raw_responses])
    assert [r.outputs["jets"].shape[0] for r in jet_responses] == [1, 2]
    got = [d for r in jet_responses for d in unpack_jets(r.outputs["jets"], r.outputs["num_jets"])]
    want = detector.detect(images)
    assert sum(len(d) for d in want) > 0
    assert_same(got, want)
    ssd.finalize()


def test_nms_model_reports_bad_shapes(pb: types.ModuleType) -> None:
    variant = VARIANTS[0]
    nms = nms_model.TritonPythonModel()
    raw = ["loc", "cls_logits", "reg"]
    nms.initialize(model_args("nms", REPOSITORY / f"pfjet_nms_{variant}" / "1", raw, ["jets", "num_jets"]))
    bad = FakeRequest(loc=np.zeros((1, 10, 2), np.float32), cls_logits=np.zeros((1, 10, 4), np.float32),
                      reg=np.zeros((1, 10, 1), np.float32))
    (response,) = nms.execute([bad])
    assert "ValueError" in response.error.message


def test_stale_config_fails_the_load(pb: types.ModuleType) -> None:
    ssd_dir = REPOSITORY / f"pfjet_ssd_{VARIANTS[0]}" / "1"
    with pytest.raises(ValueError, match="regenerate the configs"):
        ssd_model.TritonPythonModel().initialize(model_args("x", ssd_dir, ["images"], ["boxes"]))


# --- repository configs ----------------------------------------------------------------------------------------


def parse_config(text: str) -> Any:
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(text, model_config_pb2.ModelConfig())


@pytest.fixture
def exported_copy(tmp_path: Path) -> Path:
    """The committed repository's exported files only: model.onnx + metadata.json per version, and the DSP program
    compiled for a version (``dsp/program.npz``, written by `jetssd dsp compile`, not by the config writer)."""
    repo = tmp_path / "repo"
    for variant in VARIANTS:
        for version_dir in sorted((REPOSITORY / f"pfjet_ssd_{variant}").iterdir()):
            if version_dir.is_dir() and version_dir.name.isdigit():
                target = repo / f"pfjet_ssd_{variant}" / version_dir.name
                target.mkdir(parents=True)
                for name in ("model.onnx", "metadata.json"):
                    shutil.copy2(version_dir / name, target / name)
                if (version_dir / "dsp").is_dir():
                    shutil.copytree(version_dir / "dsp", target / "dsp")
    return repo


def committed_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and "__pycache__" not in p.parts}


def test_committed_repository_is_up_to_date(exported_copy: Path) -> None:
    """Regenerating from the exported files gives exactly the committed tree (run `jetssd triton-repo` if not)."""
    write_triton_repository(exported_copy)
    assert committed_files(exported_copy) == committed_files(REPOSITORY)
    for variant in VARIANTS:  # the ensemble's version directory survives git (a placeholder file keeps it)
        assert [p.name for p in (exported_copy / f"pfjet_{variant}" / "1").iterdir()] == [".gitkeep"]


def test_writer_is_idempotent_and_prunes(exported_copy: Path) -> None:
    first = write_triton_repository(exported_copy)
    assert first
    mtimes = {p: p.stat().st_mtime_ns for p in exported_copy.rglob("*")}
    assert write_triton_repository(exported_copy) == []
    assert {p: p.stat().st_mtime_ns for p in exported_copy.rglob("*")} == mtimes
    variant = VARIANTS[0]
    stale = exported_copy / f"pfjet_nms_{variant}" / "7"
    shutil.copytree(exported_copy / f"pfjet_nms_{variant}" / "1", stale)
    orphan_nms, orphan_ens = exported_copy / "pfjet_nms_gone", exported_copy / "pfjet_gone"
    shutil.copytree(exported_copy / f"pfjet_nms_{variant}", orphan_nms)
    shutil.copytree(exported_copy / f"pfjet_{variant}", orphan_ens)
    kept = exported_copy / "pfjet_nms_mine"
    kept.mkdir()
    (kept / "notes.txt").write_text("not generated")
    assert set(write_triton_repository(exported_copy)) >= {stale, orphan_nms, orphan_ens}
    assert not stale.exists()
    assert not orphan_nms.exists()
    assert not orphan_ens.exists()
    assert kept.exists()  # not ours: left alone


def test_writer_errors(exported_copy: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="int9"):
        write_triton_repository(exported_copy, ["int9"])
    with pytest.raises(FileNotFoundError, match="not found"):
        write_triton_repository(tmp_path / "nowhere")
    variant = VARIANTS[0]
    v2 = exported_copy / f"pfjet_ssd_{variant}" / str(next_version(exported_copy / f"pfjet_ssd_{variant}"))
    shutil.copytree(exported_copy / f"pfjet_ssd_{variant}" / "1", v2)
    meta = json.loads((v2 / "metadata.json").read_text())
    meta["outputs"][0]["name"] = "offsets"
    (v2 / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="version 1"):
        write_triton_repository(exported_copy, [variant])


def next_version(model_dir: Path) -> int:
    return 1 + max(int(p.name) for p in model_dir.iterdir() if p.name.isdigit())


def test_new_version_gets_its_nms_twin(exported_copy: Path) -> None:
    variant = VARIANTS[0]
    ssd = exported_copy / f"pfjet_ssd_{variant}"
    versions = sorted(int(p.name) for p in ssd.iterdir() if p.name.isdigit())
    new = str(next_version(ssd))
    shutil.copytree(ssd / "1", ssd / new)
    write_triton_repository(exported_copy, [variant])
    nms = exported_copy / f"pfjet_nms_{variant}"
    assert sorted(int(p.name) for p in nms.iterdir() if p.is_dir()) == [*versions, int(new)]
    assert (nms / new / "metadata.json").read_bytes() == (ssd / new / "metadata.json").read_bytes()
    assert "jetssd.triton.nms_model" in (nms / new / "model.py").read_text()
    assert "jetssd.triton.ssd_model" in (ssd / new / "model.py").read_text()


def test_config_contents() -> None:
    meta = json.loads((REPOSITORY / f"pfjet_ssd_{VARIANTS[0]}" / "1" / "metadata.json").read_text())
    serving = ServingConfig(max_batch_size=8, ssd_instances=2, ssd_intra_op_threads=3)
    ssd = parse_config(ssd_config("fpn", meta, serving))
    assert (ssd.name, ssd.backend, ssd.max_batch_size) == ("pfjet_ssd_fpn", "python", 8)
    assert [(t.name, list(t.dims)) for t in ssd.input] == [("image", [3, 340, 360])]
    assert [(t.name, list(t.dims)) for t in ssd.output] == [("loc", [-1, 2]), ("cls_logits", [-1, 4]),
                                                             ("reg", [-1, 1])]
    assert {t.data_type for t in [*ssd.input, *ssd.output]} == {1 + 10}  # TYPE_FP32
    assert ssd.HasField("dynamic_batching")
    assert [(g.kind, g.count) for g in ssd.instance_group] == [(2, 2)]  # KIND_CPU
    assert ssd.parameters["intra_op_threads"].string_value == "3"

    nms = parse_config(nms_config("fpn", meta, serving))
    assert (nms.name, nms.backend, nms.max_batch_size) == ("pfjet_nms_fpn", "python", 8)
    assert [t.name for t in nms.input] == ["loc", "cls_logits", "reg"]
    assert [(t.name, list(t.dims)) for t in nms.output] == [("jets", [-1, 5]), ("num_jets", [1])]
    assert nms.output[1].data_type == 8  # TYPE_INT32

    ens = parse_config(ensemble_config("fpn", meta, serving))
    assert (ens.name, ens.platform, ens.max_batch_size) == ("pfjet_fpn", "ensemble", 8)
    steps = ens.ensemble_scheduling.step
    assert [s.model_name for s in steps] == ["pfjet_ssd_fpn", "pfjet_nms_fpn"]
    assert dict(steps[0].input_map) == {"image": "image"}
    # every raw head flows from the SSD step into the NMS input of the same name
    assert {v: k for k, v in steps[0].output_map.items()} == {v: k for k, v in steps[1].input_map.items()}
    assert set(steps[0].output_map) == {"loc", "cls_logits", "reg"}
    assert set(steps[1].output_map.values()) == {"jets", "num_jets"}


def test_committed_configs_parse() -> None:
    for config in sorted(REPOSITORY.glob("*/config.pbtxt")):
        parsed = parse_config(config.read_text())
        assert parsed.name == config.parent.name
