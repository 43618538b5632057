"""Checkpoint → ONNX + metadata export (jetssd.export) and the ONNX Runtime detector (jetssd.inference).

A random-weight model with narrow widths (same graph, a fraction of the cost) and BN statistics calibrated on
a synthetic batch, so its outputs vary across anchors and every equality below is a real comparison.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import onnx
import torch

from jetssd import export as export_mod
from jetssd.anchors import INFERENCE_MAPS, AnchorConfig, anchor_centres
from jetssd.event import SparsePixels
from jetssd.export import ParityError, export_model, parity_report, sha256_file, synthetic_images
from jetssd.inference import OnnxDetector
from jetssd.model.network import PFJetSSD, calibrate_batchnorm
from jetssd.postprocess import Detections, PostprocessConfig, postprocess
from jetssd.rasterize import densify_batch, sparsify
from jetssd.train.config import TrainConfig
from jetssd.train.trainer import EpochRecord, save_checkpoint

SMALL_WIDTHS = "[8, 8, 16, 16, 16, 16, 16, 16, 16, 16, 16]"
METADATA_KEYS = {
    "name", "variant", "version", "input", "outputs", "geometry", "classes", "anchors", "postprocess", "network",
    "complexity", "training", "metrics", "checkpoint", "created_at", "software", "onnx", "parity",
}


def calibrated_model(config: TrainConfig, seed: int = 0) -> PFJetSSD:
    """Training graph with BN running stats = the stats of one synthetic batch (train-mode forward), eval mode."""
    torch.manual_seed(seed)
    model = PFJetSSD(config.model, training_head=True)
    calibrate_batchnorm(model, torch.from_numpy(synthetic_images(2, seed=100 + seed)))
    return model


def write_checkpoint(path: Path, model: PFJetSSD, config: TrainConfig) -> Path:
    """A checkpoint with the trainer's own writer: 3 epochs, best at epoch 1."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    history = [EpochRecord(e, {"loss": 3.0 - e}, {"loss": v, "ap_voc": 0.1 * e, "ap_reference": 0.05 * e},
                           10.0, 1e-3, 100.0) for e, v in enumerate((2.5, 2.0, 2.2))]
    save_checkpoint(path, model, optimizer, scheduler, 2, config, history, best_val=2.0, best_epoch=1)
    return path


def pixels_of(images: np.ndarray) -> list[SparsePixels]:
    """Dense GeV images [N, 3, 340, 360] → sparse pixels per event."""
    return [sparsify(image) for image in images]


def assert_same_detections(got: list[Detections], want: list[Detections], exact: bool = True) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert len(g) == len(w)
        np.testing.assert_array_equal(g.label, w.label)
        for name in ("score", "eta", "phi", "pt"):
            if exact:
                np.testing.assert_array_equal(getattr(g, name), getattr(w, name), err_msg=name)
            else:
                np.testing.assert_allclose(getattr(g, name), getattr(w, name), rtol=1e-4, atol=1e-5, err_msg=name)


@pytest.fixture(scope="module")
def config() -> TrainConfig:
    return TrainConfig().with_overrides([
        f"model.widths={SMALL_WIDTHS}", 'data.train=["data/train/*.h5"]', 'data.validation=["data/val/*.h5"]',
        "run.seed=42",
    ])


@pytest.fixture(scope="module")
def model(config: TrainConfig) -> PFJetSSD:
    return calibrated_model(config)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, model: PFJetSSD, config: TrainConfig) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("run") / "best.pt", model, config)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, checkpoint: Path) -> Path:
    repo = tmp_path_factory.mktemp("repo")
    return export_model(checkpoint, "fpn", repo, metrics={"ap_voc": np.float32(0.75), "n_events": 100})


@pytest.fixture(scope="module")
def detector(exported: Path) -> OnnxDetector:
    return OnnxDetector(exported, threads=2)


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return synthetic_images(3, seed=7)


def torch_outputs(model: PFJetSSD, images: np.ndarray) -> list[np.ndarray]:
    with torch.no_grad():
        return [t.numpy() for t in model.inference_model()(torch.from_numpy(images))]


# --- export ---------------------------------------------------------------------------------------------------


def test_export_writes_checked_model_and_metadata(exported: Path, checkpoint: Path, config: TrainConfig) -> None:
    assert exported.name == "1"
    assert exported.parent.name == "pfjet_ssd_fpn"
    # The graph, its metadata and the Triton python-backend shim (jetssd triton-repo's, written by the export).
    assert sorted(p.name for p in exported.iterdir()) == ["metadata.json", "model.onnx", "model.py"]
    assert exported.stat().st_mode & 0o755 == 0o755  # readable by a server running as another user
    # Nothing else in the model directory (no leftover staging directory) but its Triton config, and the
    # repository has the variant's post-processing model and ensemble: servable as exported.
    assert sorted(p.name for p in exported.parent.iterdir()) == ["1", "config.pbtxt"]
    repo = exported.parent.parent
    assert (repo / "pfjet_nms_fpn" / "1" / "metadata.json").read_text() == (exported / "metadata.json").read_text()
    assert (repo / "pfjet_fpn" / "config.pbtxt").is_file()
    onnx.checker.check_model(str(exported / "model.onnx"), full_check=True)
    graph = onnx.load(str(exported / "model.onnx"))
    assert [i.name for i in graph.graph.input] == ["image"]
    assert [o.name for o in graph.graph.output] == ["loc", "cls_logits", "reg"]

    meta = json.loads((exported / "metadata.json").read_text())
    assert set(meta) >= METADATA_KEYS
    assert (meta["name"], meta["variant"], meta["version"]) == ("pfjet_ssd_fpn", "fpn", 1)
    assert meta["input"] == {"name": "image", "shape": [-1, 3, 340, 360], "dtype": "float32", "unit": "GeV",
                             "normalisation": "log1p (inside the graph)", "channels": meta["input"]["channels"]}
    assert [(o["name"], o["shape"]) for o in meta["outputs"]] == [
        ("loc", [-1, 2024, 2]), ("cls_logits", [-1, 2024, 4]), ("reg", [-1, 2024, 1])]
    assert meta["geometry"]["image_shape"] == [3, 340, 360]
    assert meta["geometry"]["eta_step"] == 0.0174
    assert meta["classes"] == ["background", "t", "V", "H"]
    assert meta["anchors"]["maps"] == [{"n_eta": 44, "n_phi": 46}]
    assert meta["anchors"]["config"] == AnchorConfig().to_dict()
    assert meta["postprocess"] == PostprocessConfig().to_dict()
    assert meta["network"] == config.model.to_dict()
    assert meta["complexity"]["parameters"] > 0
    assert meta["complexity"]["conv_macs"] > 0

    training = meta["training"]
    assert training["train"] == ["data/train/*.h5"]
    assert training["validation"] == ["data/val/*.h5"]
    assert training["seed"] == 42
    assert training["epochs_trained"] == 3
    assert training["best_epoch"] == 1
    assert training["best_val_loss"] == 2.0
    assert training["final_val_ap"] == {"voc": pytest.approx(0.2), "reference": pytest.approx(0.1)}
    assert meta["metrics"] == {"ap_voc": pytest.approx(0.75), "n_events": 100}
    assert meta["checkpoint"]["sha256"] == sha256_file(checkpoint)
    assert meta["model_sha256"] == sha256_file(exported / "model.onnx")
    assert meta["onnx"]["opset"] == 17
    assert set(meta["software"]) >= {"jetssd", "torch", "onnx", "onnxruntime"}
    assert meta["created_at"].endswith("+00:00")

    parity = meta["parity"]
    assert parity["source"] == "synthetic"
    assert parity["events"] == 4
    assert set(parity["max_abs_diff"]) == {"loc", "cls_logits", "reg"}
    assert all(0.0 <= v <= 1e-3 for v in parity["relative_diff"].values())


def test_export_parity_on_given_events(checkpoint: Path, tmp_path: Path) -> None:
    events = pixels_of(synthetic_images(2, seed=3))
    out = export_model(checkpoint, "twn", tmp_path, version=5, check_events=events)
    meta = json.loads((out / "metadata.json").read_text())
    assert out == tmp_path / "pfjet_ssd_twn" / "5"
    assert (meta["parity"]["source"], meta["parity"]["events"]) == ("check_events", 2)
    assert meta["metrics"] == {}


def test_export_refuses_to_overwrite_unless_asked(exported: Path, checkpoint: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(exported.parent, repo / "pfjet_ssd_fpn")
    target = repo / "pfjet_ssd_fpn" / "1"
    before = (target / "metadata.json").read_text()
    with pytest.raises(FileExistsError, match="overwrite"):
        export_model(checkpoint, "fpn", repo)
    assert (target / "metadata.json").read_text() == before

    out = export_model(checkpoint, "fpn", repo, overwrite=True, metrics={"run": "second"})
    assert out == target
    assert json.loads((target / "metadata.json").read_text())["metrics"] == {"run": "second"}
    # the old version and the staging dir are gone
    assert sorted(p.name for p in target.parent.iterdir()) == ["1", "config.pbtxt"]


@pytest.mark.parametrize("variant", ["fp32", "FPN", "", "int8"])
def test_export_rejects_bad_variant(checkpoint: Path, tmp_path: Path, variant: str) -> None:
    with pytest.raises(ValueError, match="variant"):
        export_model(checkpoint, variant, tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("version", [0, -1, True])
def test_export_rejects_bad_version(checkpoint: Path, tmp_path: Path, version: Any) -> None:
    with pytest.raises(ValueError, match="version"):
        export_model(checkpoint, "fpn", tmp_path, version=version)


def test_export_rejects_unserialisable_metrics_before_writing(checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="metrics"):
        export_model(checkpoint, "fpn", tmp_path, metrics={"bad": object()})
    assert list(tmp_path.iterdir()) == []


def test_export_metrics_are_strict_json(checkpoint: Path, tmp_path: Path) -> None:
    metrics = {"ap": {"t": np.float64(np.nan), "V": 0.5}, "curve": np.arange(3, dtype=np.float32), "n": np.int64(7),
               "classes": ("t", "V"), "fake_rate": float("inf")}
    out = export_model(checkpoint, "twn", tmp_path, metrics=metrics)
    text = (out / "metadata.json").read_text()
    assert "NaN" not in text
    assert "Infinity" not in text
    assert json.loads(text)["metrics"] == {"ap": {"t": None, "V": 0.5}, "curve": [0.0, 1.0, 2.0], "n": 7,
                                           "classes": ["t", "V"], "fake_rate": None}


def test_export_missing_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.pt"):
        export_model(tmp_path / "nope.pt", "fpn", tmp_path / "repo")


def test_export_loads_strictly(model: PFJetSSD, tmp_path: Path) -> None:
    """A checkpoint whose weights do not fit its network config fails instead of exporting a half-loaded net."""
    wrong = TrainConfig().with_overrides(["model.widths=[8, 8, 16, 16, 16, 16, 16, 16, 16, 16, 32]"])
    path = write_checkpoint(tmp_path / "bad.pt", model, wrong)
    with pytest.raises(RuntimeError, match="size mismatch"):
        export_model(path, "fpn", tmp_path / "repo")
    assert not (tmp_path / "repo" / "pfjet_ssd_fpn" / "1").exists()


def test_export_fails_on_parity_and_leaves_nothing(checkpoint: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A graph that differs from the PyTorch model (here: a shifted class bias) is caught and not published."""
    real_export = export_mod.export_onnx

    def export_perturbed(net: PFJetSSD, path: Path, **kwargs: Any) -> Path:
        other = net.inference_model()
        with torch.no_grad():
            other.head1.cls.bias.add_(0.5)  # type: ignore[union-attr]
        return real_export(other, path, **kwargs)

    monkeypatch.setattr(export_mod, "export_onnx", export_perturbed)
    with pytest.raises(ParityError, match="cls_logits"):
        export_model(checkpoint, "fpn", tmp_path)
    assert list((tmp_path / "pfjet_ssd_fpn").iterdir()) == []


def test_parity_report_tolerance_and_nan() -> None:
    ok = parity_report({"loc": 5e-4, "reg": 0.02}, {"loc": 0.1, "reg": 30.0})
    assert ok["scale"] == {"loc": 1.0, "reg": 30.0}
    assert ok["relative_diff"]["reg"] == pytest.approx(0.02 / 30.0)
    with pytest.raises(ParityError, match="loc"):
        parity_report({"loc": 2e-3}, {"loc": 0.5})
    with pytest.raises(ParityError, match="reg"):
        parity_report({"reg": float("nan")}, {"reg": 1.0})


def test_synthetic_images_are_deterministic_gev_images() -> None:
    a, b = synthetic_images(2, seed=1), synthetic_images(2, seed=1)
    assert a.shape == (2, 3, 340, 360)
    assert a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert (a >= 0).all()
    assert a.max() > 10.0  # hot clusters
    # The first cluster of each event straddles the φ seam.
    assert a[:, :, :, 0].max() > 10.0
    assert a[:, :, :, -1].max() > 10.0


# --- detector ---------------------------------------------------------------------------------------------------


def test_detector_raw_outputs_equal_pytorch(detector: OnnxDetector, model: PFJetSSD, images: np.ndarray) -> None:
    got = detector.run(images)
    want = torch_outputs(model, images)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == np.float32
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, atol=1e-4, rtol=0)
    assert np.std(got[1]) > 1e-2  # a non-trivial network, not just the head biases


def test_detect_equals_postprocess_of_pytorch(detector: OnnxDetector, model: PFJetSSD, images: np.ndarray) -> None:
    dets = detector.detect(images)
    assert sum(len(d) for d in dets) > 0
    loc, cls_logits, reg = torch_outputs(model, images)
    # The checkpoint was written by today's trainer: its anchors section (receptive layout) reached the metadata.
    assert detector.anchor_config == AnchorConfig()
    anchors = anchor_centres(INFERENCE_MAPS, AnchorConfig().layout)
    want = postprocess(cls_logits, loc, reg, anchors, AnchorConfig(), PostprocessConfig())
    assert_same_detections(dets, want, exact=False)
    # And exactly the shared post-processing of the detector's own raw outputs.
    loc, cls_logits, reg = detector.run(images)
    assert_same_detections(dets, postprocess(cls_logits, loc, reg, anchors, AnchorConfig(), PostprocessConfig()))


def test_detect_pixels_equals_detect_on_densified(detector: OnnxDetector, images: np.ndarray) -> None:
    pixels = pixels_of(images)
    np.testing.assert_array_equal(densify_batch(pixels), images)
    assert_same_detections(detector.detect_pixels(pixels), detector.detect(images))
    # In chunks: exactly detect() per chunk (ORT's float sums may depend on the batch size at the 1e-7 level,
    # so the comparison is made with the same batches).
    chunked = detector.detect(images[:2]) + detector.detect(images[2:])
    assert_same_detections(detector.detect_pixels(pixels, batch_size=2), chunked)
    assert_same_detections(chunked, detector.detect(images), exact=False)
    assert detector.detect_pixels([]) == []
    with pytest.raises(ValueError, match="batch_size"):
        detector.detect_pixels(pixels, batch_size=0)


def test_detector_properties_and_postprocess_override(exported: Path, detector: OnnxDetector,
                                                      images: np.ndarray) -> None:
    assert (detector.variant, detector.version) == ("fpn", 1)
    assert detector.model_dir == exported
    assert detector.metadata["name"] == "pfjet_ssd_fpn"
    detector.metadata["name"] = "changed"  # a copy: the detector's own metadata is untouched
    assert detector.metadata["name"] == "pfjet_ssd_fpn"
    assert detector.anchors.shape == (2024, 2)
    assert detector.postprocess_config == PostprocessConfig()

    strict = OnnxDetector(exported, threads=1, postprocess_config=PostprocessConfig(confidence_threshold=0.5,
                                                                                     max_detections=1))
    dets = strict.detect(images)
    assert all(len(d) <= 1 and (d.score > 0.5).all() for d in dets)


def test_detector_takes_the_highest_numeric_version(exported: Path, tmp_path: Path) -> None:
    model_dir = tmp_path / "pfjet_ssd_fpn"
    for version in (1, 2, 10):
        shutil.copytree(exported, model_dir / str(version))
        meta_path = model_dir / str(version) / "metadata.json"
        meta = json.loads(meta_path.read_text())
        meta["version"] = version
        meta_path.write_text(json.dumps(meta))
    (model_dir / "latest").mkdir()  # non-numeric entries (an export's staging dir, …) are not versions
    (model_dir / ".11.partial-x").mkdir()
    det = OnnxDetector(model_dir)
    assert det.version == 10  # numerically highest, not "2" as a string sort would give
    assert det.model_dir == model_dir / "10"
    assert OnnxDetector(model_dir / "2").version == 2


def test_detector_rejects_wrong_input(detector: OnnxDetector, images: np.ndarray) -> None:
    with pytest.raises(ValueError, match=r"\[N, 3, 340, 360\]"):
        detector.run(images[:, :, :100])
    with pytest.raises(ValueError, match=r"\[N, 3, 340, 360\]"):
        detector.detect(images[0])
    with pytest.raises(ValueError, match="float64"):
        detector.run(images.astype(np.float64))
    with pytest.raises(ValueError, match="numpy array"):
        detector.run(images.tolist())
    loc, cls_logits, reg = detector.run(images[:0])
    assert (loc.shape, cls_logits.shape, reg.shape) == ((0, 2024, 2), (0, 2024, 4), (0, 2024, 1))


def test_detector_missing_files_name_the_path(exported: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        OnnxDetector(tmp_path / "nowhere")
    empty = tmp_path / "pfjet_ssd_fpn"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="pfjet_ssd_fpn"):
        OnnxDetector(empty)
    no_model = empty / "3"
    no_model.mkdir()
    shutil.copy(exported / "metadata.json", no_model / "metadata.json")
    with pytest.raises(FileNotFoundError, match=r"3/model\.onnx"):
        OnnxDetector(empty)
    no_meta = tmp_path / "other" / "1"
    no_meta.mkdir(parents=True)
    shutil.copy(exported / "model.onnx", no_meta / "model.onnx")
    with pytest.raises(FileNotFoundError, match=r"1/metadata\.json"):
        OnnxDetector(no_meta.parent)
