"""Post-training static INT8 quantization (jetssd.quantize.int8) of a small random-weight exported model.

The float model is narrow (same graph as the shipped one, a fraction of the cost), with BN statistics from a
synthetic batch so its outputs vary across anchors; calibration uses a handful of synthetic events.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import onnx
import torch

from jetssd.event import SparsePixels
from jetssd.export import export_model, synthetic_images
from jetssd.inference import OnnxDetector
from jetssd.model.network import PFJetSSD, calibrate_batchnorm
from jetssd.quantize.int8 import DEFAULT_EXCLUDE, compare_outputs, op_counts, quantize_model
from jetssd.rasterize import sparsify
from jetssd.train.config import TrainConfig
from jetssd.train.trainer import EpochRecord, save_checkpoint

SMALL_WIDTHS = "[8, 8, 16, 16, 16, 16, 16, 16, 16, 16, 16]"


def pixels_of(images: np.ndarray) -> list[SparsePixels]:
    """Dense GeV images [N, 3, 340, 360] → sparse pixels per event."""
    return [sparsify(image) for image in images]


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A float model exported by export_model from a checkpoint written by the trainer's own writer."""
    config = TrainConfig().with_overrides([f"model.widths={SMALL_WIDTHS}", "run.seed=1"])
    torch.manual_seed(0)
    model = PFJetSSD(config.model, training_head=True)
    calibrate_batchnorm(model, torch.from_numpy(synthetic_images(2, seed=100)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    history = [EpochRecord(0, {"loss": 1.0}, {"loss": 1.0}, 1.0, 1e-3, 1.0)]
    checkpoint = tmp_path_factory.mktemp("run") / "best.pt"
    save_checkpoint(checkpoint, model, optimizer, scheduler, 0, config, history, best_val=1.0, best_epoch=0)
    return export_model(checkpoint, "fpn", tmp_path_factory.mktemp("float"))


@pytest.fixture(scope="module")
def events() -> list[SparsePixels]:
    return pixels_of(synthetic_images(6, seed=11))


@pytest.fixture(scope="module")
def int8_dir(float_dir: Path, events: list[SparsePixels], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return quantize_model(float_dir, tmp_path_factory.mktemp("repo"), events,
                          calibration_sources=["synthetic seed 11"])


def test_writes_model_and_metadata(int8_dir: Path, float_dir: Path) -> None:
    assert int8_dir.name == "1"
    assert int8_dir.parent.name == "pfjet_ssd_int8"
    assert sorted(p.name for p in int8_dir.iterdir()) == ["metadata.json", "model.onnx", "model.py"]
    assert sorted(p.name for p in int8_dir.parent.iterdir()) == ["1", "config.pbtxt"]  # no staging leftovers
    assert (int8_dir.parents[1] / "pfjet_int8" / "config.pbtxt").is_file()  # servable by Triton as it lands
    onnx.checker.check_model(str(int8_dir / "model.onnx"))
    meta = json.loads((int8_dir / "metadata.json").read_text())
    float_meta = json.loads((float_dir / "metadata.json").read_text())
    assert (meta["name"], meta["variant"], meta["version"]) == ("pfjet_ssd_int8", "int8", 1)
    assert meta["outputs"] == float_meta["outputs"]
    assert meta["anchors"] == float_meta["anchors"]
    assert meta["float_model"]["sha256"] == float_meta["model_sha256"]
    q = meta["quantization"]
    assert (q["method"], q["format"], q["per_channel"], q["reduce_range"]) == ("percentile", "qdq", True, False)
    assert (q["activation_type"], q["weight_type"]) == ("uint8", "int8")
    assert q["calibration_events"] == 6
    assert q["calibration_sources"] == ["synthetic seed 11"]
    assert q["exclude_patterns"] == list(DEFAULT_EXCLUDE)
    assert any("/l2norm/" in n for n in q["excluded_nodes"])
    assert any("/eca/" in n for n in q["excluded_nodes"])
    assert any("/normalise/" in n for n in q["excluded_nodes"])
    parity = q["parity"]
    assert parity["events"] == 6
    assert set(parity["mean_abs_diff"]) == {"cls_prob", "loc", "reg"}
    assert 0.0 <= parity["detections_agree_fraction"] <= 1.0
    assert meta["parity"]["int8_vs_float"] == parity


def test_runs_in_detector_close_to_float(int8_dir: Path, float_dir: Path) -> None:
    images = synthetic_images(3, seed=11)
    q, f = OnnxDetector(int8_dir, threads=1), OnnxDetector(float_dir, threads=1)
    assert q.variant == "int8"
    for got, want in zip(q.run(images), f.run(images), strict=True):
        assert got.shape == want.shape
        assert got.dtype == np.float32
        assert np.isfinite(got).all()
        # Loose: 8-bit activations of a random network (whose per-pixel L2Norm amplifies the rounding of weak
        # pixels); the point is "the same function, roughly", not bit parity.
        scale = max(1.0, float(np.abs(want).max()))
        assert float(np.abs(got - want).mean()) < 0.5 * scale
        assert np.corrcoef(got.ravel(), want.ravel())[0, 1] > 0.2  # measured 0.27-0.42 here
    assert len(q.detect_pixels(pixels_of(images))) == 3


def test_uses_integer_convolutions(int8_dir: Path) -> None:
    ops = op_counts(int8_dir / "model.onnx")
    assert ops.get("QLinearConv", 0) + ops.get("ConvInteger", 0) > 0


def test_excluded_subgraphs_stay_float(int8_dir: Path) -> None:
    """No L2Norm/ECA/normalisation node reads a DequantizeLinear output or feeds a QuantizeLinear directly."""
    graph = onnx.load(str(int8_dir / "model.onnx")).graph
    producer = {o: n for n in graph.node for o in n.output}
    sensitive = [n for n in graph.node if any(p in n.name for p in DEFAULT_EXCLUDE)]
    assert sensitive
    for node in sensitive:
        assert not node.op_type.startswith("QLinear")
        # Weights of excluded nodes are float initialisers, not dequantized int8 tensors.
        for name in node.input:
            src = producer.get(name)
            assert src is None or src.op_type != "DequantizeLinear" or not any(
                init.name == src.input[0] for init in graph.initializer), node.name
    l2 = {o for n in graph.node if "/l2norm/" in n.name for o in n.input}
    assert not any(n.op_type == "QuantizeLinear" and n.output[0] in l2 for n in graph.node)


def test_compare_outputs_identical_models(float_dir: Path, events: list[SparsePixels]) -> None:
    meta = json.loads((float_dir / "metadata.json").read_text())
    same = compare_outputs(float_dir / "model.onnx", float_dir / "model.onnx", events[:2], meta)
    assert same["mean_abs_diff"] == {"cls_prob": 0.0, "loc": 0.0, "reg": 0.0}
    assert same["detections_agree_fraction"] == 1.0


def test_refuses_overwrite_unless_asked(int8_dir: Path, float_dir: Path, events: list[SparsePixels]) -> None:
    repo = int8_dir.parent.parent
    before = (int8_dir / "metadata.json").read_text()
    with pytest.raises(FileExistsError, match="overwrite"):
        quantize_model(float_dir, repo, events[:2])
    assert (int8_dir / "metadata.json").read_text() == before
    out = quantize_model(float_dir, repo, events[:2], overwrite=True, fmt="qoperator")
    assert out == int8_dir
    meta = json.loads((out / "metadata.json").read_text())
    assert (meta["quantization"]["format"], meta["quantization"]["calibration_events"]) == ("qoperator", 2)
    assert sorted(p.name for p in out.parent.iterdir()) == ["1", "config.pbtxt"]
    OnnxDetector(out, threads=1).run(synthetic_images(1, seed=2))


@pytest.mark.parametrize(("kwargs", "match"), [({"version": 0}, "version"), ({"fmt": "qop"}, "fmt"),
                                               ({"method": "kl"}, "method"), ({"activation_type": "u8"}, "activation")])
def test_rejects_bad_arguments(float_dir: Path, events: list[SparsePixels], tmp_path: Path,
                               kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        quantize_model(float_dir, tmp_path, events[:1], **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="empty"):
        quantize_model(float_dir, tmp_path, [])
    assert list(tmp_path.iterdir()) == []


def test_refuses_int8_input(int8_dir: Path, events: list[SparsePixels], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="already"):
        quantize_model(int8_dir, tmp_path, events[:1])
