"""Training pieces: configuration, loss, sparse data pipeline and augmentation, and a tiny overfit run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from jetssd import geometry  # noqa: E402
from jetssd.anchors import TRAINING_MAPS, AnchorConfig, anchor_centres, truth_pixels  # noqa: E402
from jetssd.event import Event, PFCandidates, TruthObjects  # noqa: E402
from jetssd.io import write_events  # noqa: E402
from jetssd.rasterize import densify as densify_numpy  # noqa: E402
from jetssd.rasterize import rasterize_sparse  # noqa: E402
from jetssd.train.config import DataConfig, LossConfig, TrainConfig  # noqa: E402
from jetssd.train.data import (  # noqa: E402
    DetectionDataset,
    PackedEvents,
    augment_event,
    collate,
    crop_event,
    densify,
)
from jetssd.train.loss import hard_negative_mask, multibox_loss  # noqa: E402

# --------------------------------------------------------------------------------------------------
# Synthetic events: a few hard clusters at the truth positions on a soft carpet.


def synthetic_event(rng: np.random.Generator, n_jets: int = 2) -> Event:
    eta = rng.uniform(-2.0, 2.0, n_jets)
    phi = rng.uniform(-np.pi, np.pi, n_jets)
    cls = rng.integers(0, 3, n_jets)
    pt = rng.uniform(400, 1500, n_jets)
    parts = [(rng.exponential(1.0, 600), rng.uniform(-3, 3, 600), rng.uniform(-np.pi, np.pi, 600),
              rng.integers(0, 3, 600))]
    for e, p, c, t in zip(eta, phi, cls, pt, strict=True):
        n = 20 + 10 * int(c)  # the class shows in the multiplicity, so it is learnable
        parts.append((np.full(n, t / n), e + rng.normal(0, 0.05, n), p + rng.normal(0, 0.05, n),
                      rng.integers(0, 3, n)))
    pf = PFCandidates.from_arrays(*(np.concatenate(col) for col in zip(*parts, strict=True)))
    truth = TruthObjects.from_arrays(cls, eta, phi, pt)
    return Event(pixels=rasterize_sparse(pf), truth=truth, pf=pf)


@pytest.fixture(scope="module")
def event_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(3)
    path = tmp_path_factory.mktemp("events") / "synthetic.h5"
    write_events(path, [synthetic_event(rng) for _ in range(8)], format="reference")
    return path


# --------------------------------------------------------------------------------------------------
# Configuration


def test_config_file_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "train.toml"
    path.write_text('[data]\ntrain = ["a/*.h5"]\nflip_eta = 0.0\n[optim]\nepochs = 3\n[model]\nactivation = "relu"\n')
    cfg = TrainConfig.load(path, ["optim.lr=5e-4", 'data.validation=["v.h5"]', "run.out=runs/x", "run.amp=false"])
    assert cfg.data.train == ("a/*.h5",)
    assert cfg.data.validation == ("v.h5",)
    assert cfg.data.flip_eta == 0.0
    assert cfg.optim.epochs == 3
    assert cfg.optim.lr == 5e-4
    assert cfg.model.activation == "relu"
    assert cfg.run.out == "runs/x"
    assert cfg.run.amp is False
    assert TrainConfig.from_dict(json.loads(cfg.dumps())) == cfg


@pytest.mark.parametrize(("override", "message"), [
    ("optim.nope=1", "unknown key"), ("optim.lr", "section.key=value"), ("run.amp=3", "true/false"),
    ("optim.epochs=many", "number"), ("bogus.x=1", "unknown key"),
    ('run.init_anchors="both"', "run.init_anchors must be"), ('run.init_phi_padding="zeros"', "run.init_phi_padding"),
])
def test_bad_overrides_are_named(override: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TrainConfig().with_overrides([override])


# --------------------------------------------------------------------------------------------------
# Loss


def test_loss_without_positives_is_finite_and_mines_minimum_negatives() -> None:
    torch.manual_seed(0)
    b, p = 2, 50
    logits = torch.randn(b, p, 4, requires_grad=True)
    loc = torch.randn(b, p, 2, requires_grad=True)
    reg = torch.randn(b, p, 1, requires_grad=True)
    labels = torch.zeros(b, p, dtype=torch.long)
    parts = multibox_loss(loc, logits, reg, labels, torch.zeros(b, p, 2), torch.zeros(b, p), LossConfig())
    assert torch.isfinite(parts.total)
    assert parts.n_pos == 0
    assert float(parts.loc) == 0.0
    assert float(parts.pt) == 0.0
    parts.total.backward()
    assert logits.grad is not None
    assert torch.all(torch.isfinite(logits.grad))
    # 16 hard negatives per image get a gradient, the rest none.
    assert int((logits.grad.abs().sum(-1) > 0).sum()) == 2 * 16


def test_hard_negative_mining_takes_the_worst_three_per_positive() -> None:
    ce = torch.tensor([[5.0, 0.1, 4.0, 3.0, 0.2, 2.0, 1.0, 9.0]])
    positive = torch.tensor([[False, False, False, False, False, False, False, True]])
    mask = hard_negative_mask(ce, positive, ratio=3.0, min_negatives=0)
    assert mask.tolist() == [[True, False, True, True, False, False, False, False]]


def test_loss_terms_match_hand_computation() -> None:
    logits = torch.zeros(1, 3, 4)
    labels = torch.tensor([[2, 0, 0]])
    loc_pred = torch.tensor([[[0.5, -0.5], [9.0, 9.0], [9.0, 9.0]]])
    loc_t = torch.zeros(1, 3, 2)
    reg = torch.tensor([[[3.0], [0.0], [0.0]]])
    pt_t = torch.tensor([[1.0, 0.0, 0.0]])
    cfg = LossConfig(label_smoothing=0.0, min_negatives=1)
    parts = multibox_loss(loc_pred, logits, reg, labels, loc_t, pt_t, cfg)
    # one positive: Huber(0.5) + Huber(0.5) = 0.125 + 0.125; pT Huber(2) = 1.5; CE of uniform logits = ln 4
    # for the positive and its 3 × 1 hard negatives, capped at the 2 background anchors there are.
    assert float(parts.loc) == pytest.approx(0.25)
    assert float(parts.pt) == pytest.approx(1.5)
    assert float(parts.cls) == pytest.approx(3 * np.log(4.0), rel=1e-6)


# --------------------------------------------------------------------------------------------------
# Data pipeline


def test_packed_events_and_dense_batches_equal_the_rasterizer(event_file: Path) -> None:
    packed = PackedEvents.load([event_file])
    assert len(packed) == 8
    anchors = anchor_centres(TRAINING_MAPS)
    dataset = DetectionDataset(packed, anchors, AnchorConfig())
    batch = collate([dataset[i] for i in range(3)])
    image = densify(batch).numpy()
    from jetssd.io import ReferenceFile

    with ReferenceFile(event_file) as f:
        for k in range(3):
            np.testing.assert_array_equal(image[k], densify_numpy(f.read_pixels(k)))
            assert int((batch.labels[k] > 0).sum()) >= len(f[k].truth)
    assert batch.labels.shape == (3, len(anchors))


@pytest.mark.parametrize("seed", range(6))
def test_augmentation_moves_pixels_and_truth_together(seed: int) -> None:
    rng = np.random.default_rng(seed)
    ieta, iphi = int(rng.integers(340)), int(rng.integers(360))
    flat = np.array([(1 * geometry.N_ETA + ieta) * geometry.N_PHI + iphi], np.int32)
    xy = np.array([[ieta + 0.5, iphi + 0.5]])
    config = DataConfig(flip_eta=0.5, flip_phi=0.5, roll_phi=True)
    new_flat, new_xy = augment_event(flat, xy, np.random.default_rng(seed + 100), config)
    channel, rest = divmod(int(new_flat[0]), geometry.N_ETA * geometry.N_PHI)
    new_ieta, new_iphi = divmod(rest, geometry.N_PHI)
    assert channel == 1
    # The truth is still at the centre of its pixel: no half-pixel or one-pixel shift.
    np.testing.assert_allclose(new_xy[0], [new_ieta + 0.5, new_iphi + 0.5], atol=1e-9)


def test_truth_pixels_of_the_file_convention() -> None:
    truth = TruthObjects.from_arrays([0, 2], [0.0, 5.0], [0.0, 1.0], [500.0, 600.0])
    xy, label, pt = truth_pixels(truth)
    assert label.tolist() == [1]  # t → 1; the object outside the acceptance is dropped
    assert pt.tolist() == [500.0]
    np.testing.assert_allclose(xy[0], [170.0, 180.0])


# --------------------------------------------------------------------------------------------------
# A tiny run


@pytest.mark.slow
def test_tiny_overfit_run_lowers_the_loss_and_writes_artifacts(event_file: Path, tmp_path: Path) -> None:
    from jetssd.train.trainer import load_checkpoint, train

    cfg = TrainConfig().with_overrides([
        f'data.train=["{event_file}"]', f'data.validation=["{event_file}"]', "data.workers=0",
        "data.max_train_events=4", "data.max_val_events=2", "data.flip_eta=0.0", "data.flip_phi=0.0",
        "data.roll_phi=false", "optim.epochs=6", "optim.batch_size=4", "optim.warmup_steps=1", "optim.lr=3e-3",
        "model.dropblock=0.0", f'run.out="{tmp_path / "run"}"', "run.seed=7",
    ])
    losses: list[float] = []
    result = train(cfg, progress=lambda phase, step, total, values: losses.append(values["loss"])
                   if phase != "validation" else None)
    assert len(losses) == 6
    assert np.mean(losses[-2:]) < 0.7 * np.mean(losses[:2]), losses
    run = tmp_path / "run"
    for name in ("best.pt", "last.pt", "metrics.jsonl", "loss.png", "config.json"):
        assert (run / name).stat().st_size > 0, name
    state = load_checkpoint(run / "last.pt")
    assert state["epoch"] == 5
    assert len(json.loads(state["history"])) == 6
    assert result.best_epoch >= 0

    # Resume: one more epoch continues from the checkpoint instead of starting over.
    longer = cfg.with_overrides(["optim.epochs=7"])
    resumed = train(longer, resume=True)
    assert [h.epoch for h in resumed.history] == list(range(7))


def test_epoch_loss_is_a_per_positive_mean_not_dominated_by_background_only_batches(event_file: Path) -> None:
    """A validation pass over signal events followed by events without truth (QCD, in file order) must
    report about the signal's loss, not the sum over mined negatives of the background-only batches."""
    from jetssd.model import NetConfig, PFJetSSD
    from jetssd.train.trainer import run_epoch

    packed = PackedEvents.load([event_file])
    empty = PackedEvents(packed.pixel_offsets[:5], packed.pixel_flat, packed.pixel_value,
                         np.zeros(5, np.int64), packed.truth_xy[:0], packed.truth_label[:0], packed.truth_pt[:0])
    anchors = anchor_centres(TRAINING_MAPS)
    signal = DetectionDataset(packed, anchors, AnchorConfig())
    both = torch.utils.data.ConcatDataset([signal, DetectionDataset(empty, anchors, AnchorConfig())])
    cfg = TrainConfig()
    model = PFJetSSD(NetConfig(widths=(8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8)), training_head=True)
    with torch.no_grad():  # uniform class probabilities: every mined negative costs ln 4
        model.head1.cls.bias.zero_()
        model.head2.cls.bias.zero_()
    loader_signal = torch.utils.data.DataLoader(signal, batch_size=4, collate_fn=collate)
    loader_both = torch.utils.data.DataLoader(both, batch_size=4, collate_fn=collate)
    torch.manual_seed(0)
    only_signal = run_epoch(model, loader_signal, torch.device("cpu"), cfg)
    with_background = run_epoch(model, loader_both, torch.device("cpu"), cfg)
    # The background batch adds its negatives' loss, weighted by 1 against the signal's ~dozens of positives.
    assert with_background["loss"] < 1.5 * only_signal["loss"]


@pytest.mark.slow
def test_init_from_a_checkpoint_starts_from_its_weights_and_network(event_file: Path, tmp_path: Path) -> None:
    from jetssd.model import NetConfig, PFJetSSD
    from jetssd.train.trainer import load_checkpoint, save_checkpoint, train

    narrow = NetConfig(widths=(8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8), activation="relu", dropblock=0.0)
    source_cfg = TrainConfig().with_overrides([f'data.train=["{event_file}"]'])
    source_cfg = TrainConfig(data=source_cfg.data, model=narrow)
    model = PFJetSSD(narrow, training_head=True)
    torch.nn.init.constant_(model.head1.reg.bias, 0.123)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    save_checkpoint(tmp_path / "src.pt", model, opt, sched, 0, source_cfg, [], 1.0, 0)

    cfg = TrainConfig().with_overrides([
        f'data.train=["{event_file}"]', f'data.validation=["{event_file}"]', "data.workers=0",
        "data.max_train_events=4", "data.max_val_events=2", "optim.epochs=1", "optim.batch_size=4",
        "optim.lr=1e-9", f'run.init="{tmp_path / "src.pt"}"', f'run.out="{tmp_path / "run"}"',
    ])
    train(cfg)
    state = load_checkpoint(tmp_path / "run" / "last.pt")
    assert json.loads(state["config"])["model"]["widths"] == list(narrow.widths)  # the network of the init
    assert float(state["model"]["head1.reg.bias"][0]) == pytest.approx(0.123, abs=1e-6)


@pytest.mark.slow
def test_data_parallel_under_torchrun_on_cpu(event_file: Path, tmp_path: Path) -> None:
    """The torchrun path (DistributedDataParallel, gloo on CPU here, NCCL on GPUs) trains and checkpoints."""
    import shutil
    import subprocess
    import sys

    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    assert torchrun is not None
    out = tmp_path / "ddp"
    cmd = [torchrun, "--nproc-per-node", "2", "-m", "jetssd.cli", "train",
           "--set", f'data.train=["{event_file}"]', "--set", f'data.validation=["{event_file}"]',
           "--set", "data.workers=0", "--set", "optim.epochs=1", "--set", "optim.batch_size=2",
           "--set", "model.widths=[8,8,8,8,8,8,8,8,8,8,8]", "--set", f'run.out="{out}"']
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    history = json.loads((out / "metrics.jsonl").read_text())
    assert np.isfinite(history["val"]["loss"])
    assert done.stderr.count("best validation loss") == 1  # rank 0 reports, rank 1 does not


@pytest.mark.slow
def test_twn_fine_tuning_then_export_gives_ternary_depthwise_filters(event_file: Path, tmp_path: Path) -> None:
    from jetssd.export import export_model
    from jetssd.quantize.twn import bake_state_dict
    from jetssd.train.trainer import load_checkpoint, train

    cfg = TrainConfig().with_overrides([
        f'data.train=["{event_file}"]', f'data.validation=["{event_file}"]', "data.workers=0",
        "data.max_train_events=4", "data.max_val_events=2", "optim.epochs=1", "optim.batch_size=4",
        "model.widths=[8,8,8,8,8,8,8,8,8,8,8]", "compress.twn=true", "compress.flop_reg=1e-11",
        f'run.out="{tmp_path / "twn"}"',
    ])
    losses: list[dict[str, float]] = []
    train(cfg, progress=lambda phase, step, total, values: losses.append(values) if phase != "validation" else None)
    assert losses[0]["flop_reg"] > 0  # the slimming penalty is part of the training objective
    state = load_checkpoint(tmp_path / "twn" / "last.pt")
    latent = [k for k in state["model"] if k.endswith("parametrizations.weight.original")]
    assert len(latent) == 10  # the depthwise convs of the 10 separable blocks
    baked = bake_state_dict(state["model"])
    for key in (k.replace(".parametrizations.weight.original", ".weight") for k in latent):
        w = baked[key].reshape(baked[key].shape[0], -1)
        for row in w:
            assert len(torch.unique(row.abs())) <= 2  # {0, α}: ternary up to the filter's scale
    path = export_model(tmp_path / "twn" / "last.pt", "twn", tmp_path / "repo")
    assert (path / "model.onnx").stat().st_size > 0


@pytest.mark.slow
def test_fine_tuning_a_shipped_legacy_checkpoint_keeps_its_anchor_layout(event_file: Path, tmp_path: Path) -> None:
    """The shipped FPN predates the anchors section: fine-tuning it must keep its "stretched" anchors."""
    from jetssd.train.trainer import load_checkpoint, train

    shipped = Path(__file__).resolve().parents[2] / "models" / "fpn-relu-h200" / "best.pt"
    assert "anchors" not in json.loads(load_checkpoint(shipped)["config"])
    cfg = TrainConfig().with_overrides([
        f'data.train=["{event_file}"]', f'data.validation=["{event_file}"]', "data.workers=0",
        "data.max_train_events=4", "data.max_val_events=2", "optim.epochs=1", "optim.batch_size=4",
        f'run.init="{shipped}"', f'run.out="{tmp_path / "ft"}"',
    ])
    assert cfg.anchors.layout == "receptive"  # today's default for new training …
    train(cfg)
    written = json.loads((tmp_path / "ft" / "config.json").read_text())
    assert written["anchors"]["layout"] == "stretched"  # … but a fine-tune keeps the checkpoint's
    assert json.loads(load_checkpoint(tmp_path / "ft" / "last.pt")["config"])["anchors"]["layout"] == "stretched"

    # run.init_anchors="config" moves the same weights onto this config's layout (here today's default).
    relayout = cfg.with_overrides(['run.init_anchors="config"', f'run.out="{tmp_path / "relayout"}"'])
    train(relayout)
    assert json.loads((tmp_path / "relayout" / "config.json").read_text())["anchors"]["layout"] == "receptive"
    with pytest.raises(ValueError, match="init_anchors"):
        train(cfg.with_overrides(['run.init_anchors="both"', f'run.out="{tmp_path / "bad"}"']))

    # run.init_phi_padding="config" takes model.circular_phi from this config (the φ-padding A/B): the same
    # weights load into a zero-padded network, which is what gets trained and saved.
    assert json.loads(load_checkpoint(shipped)["config"])["model"]["circular_phi"] is True
    zero = cfg.with_overrides(['run.init_phi_padding="config"', "model.circular_phi=false",
                               f'run.out="{tmp_path / "zero"}"'])
    train(zero)
    saved = load_checkpoint(tmp_path / "zero" / "last.pt")
    assert json.loads(saved["config"])["model"]["circular_phi"] is False
    assert set(saved["model"]) == set(load_checkpoint(shipped)["model"])
    with pytest.raises(ValueError, match="init_phi_padding"):
        train(cfg.with_overrides(['run.init_phi_padding="zeros"', f'run.out="{tmp_path / "bad2"}"']))


# --------------------------------------------------------------------------------------------------
# Training on random crops


@pytest.mark.parametrize(("origin", "truth_at"), [((0, 0), (5, 7)), ((100, 300), (150, 340)), ((100, 300), (150, 20)),
                                                  ((212, 250), (339, 359))])
def test_crop_moves_pixels_and_truth_together(origin: tuple[int, int], truth_at: tuple[int, int]) -> None:
    # (100, 300): a 128 window straddling the φ seam (columns 300…359 then 0…67).
    crop = 128
    ieta, iphi = truth_at
    inside_flat = (2 * geometry.N_ETA + ieta) * geometry.N_PHI + iphi
    outside_flat = (0 * geometry.N_ETA + (origin[0] + crop) % geometry.N_ETA) * geometry.N_PHI + iphi
    flat = np.array([inside_flat, outside_flat], np.int32)
    value = np.array([3.0, 4.0], np.float32)
    xy = np.array([[ieta + 0.5, iphi + 0.5], [(origin[0] + crop + 10) % 340 + 0.5, 1.5]])
    new_flat, new_value, new_xy, label, pt = crop_event(flat, value, xy, np.array([1, 2]), np.array([500.0, 600.0]),
                                                        crop, origin)
    assert new_value.tolist() == [3.0]
    assert label.tolist() == [1]
    assert pt.tolist() == [500.0]
    channel, rest = divmod(int(new_flat[0]), crop * crop)
    c_eta, c_phi = divmod(rest, crop)
    assert channel == 2
    assert (c_eta, c_phi) == (ieta - origin[0], (iphi - origin[1]) % geometry.N_PHI)
    # The truth is still at the centre of its pixel, in crop coordinates.
    np.testing.assert_allclose(new_xy[0], [c_eta + 0.5, c_phi + 0.5], atol=1e-9)


def test_crop_dataset_samples_are_crops_matched_to_crop_anchors(event_file: Path) -> None:
    from jetssd.train.trainer import crop_anchors

    events = PackedEvents.load([event_file])
    anchors = crop_anchors(128)
    config = DataConfig(crop=128, crop_on_object=1.0)
    dataset = DetectionDataset(events, anchors, AnchorConfig(), augment=config, seed=1)
    samples = [dataset[i] for i in range(len(dataset))]
    batch = collate(samples)
    assert batch.image_shape == (3, 128, 128)
    assert batch.labels.shape == (len(samples), 370)
    image = densify(batch)
    assert image.shape == (len(samples), 3, 128, 128)
    for s in samples:
        assert len(s.truth_xy) >= 1  # centred on an object
        assert np.all((s.truth_xy >= 0) & (s.truth_xy < 128))
        assert int((s.labels > 0).sum()) >= len(s.truth_xy)
    # Reproducible per (seed, epoch, index), different across epochs.
    np.testing.assert_array_equal(dataset[0].flat, samples[0].flat)
    dataset.set_epoch(1)
    assert not np.array_equal(dataset[0].truth_xy, samples[0].truth_xy)


def test_crop_anchor_count_equals_the_network_outputs_on_a_crop() -> None:
    from jetssd.model import PFJetSSD
    from jetssd.train.trainer import crop_anchors

    model = PFJetSSD(training_head=True).eval()
    with torch.no_grad():
        loc, _, _ = model(torch.zeros(1, 3, 128, 128))
    assert loc.shape[1] == len(crop_anchors(128)) == 17 * 17 + 9 * 9


def test_crop_config_is_validated() -> None:
    with pytest.raises(ValueError, match=r"data\.crop"):
        DataConfig(crop=32)
    with pytest.raises(ValueError, match=r"data\.crop"):
        DataConfig(crop=341)
    with pytest.raises(ValueError, match=r"anchors\.layout"):
        TrainConfig().with_overrides(["data.crop=128", 'anchors.layout="stretched"'])
    assert TrainConfig().with_overrides(["data.crop=128"]).data.crop == 128


@pytest.mark.slow
def test_tiny_crop_run_validates_on_full_images_and_writes_checkpoints(event_file: Path, tmp_path: Path) -> None:
    from jetssd.train.trainer import load_checkpoint, train

    cfg = TrainConfig().with_overrides([
        f'data.train=["{event_file}"]', f'data.validation=["{event_file}"]', "data.workers=0",
        "data.max_train_events=4", "data.max_val_events=2", "data.crop=128", "optim.epochs=2",
        "optim.batch_size=2", "optim.warmup_steps=1", "model.widths=[8,8,8,8,8,8,8,8,8,8,8]",
        f'run.out="{tmp_path / "run"}"', "run.seed=5",
    ])
    result = train(cfg)
    assert [h.epoch for h in result.history] == [0, 1]
    for h in result.history:
        assert math.isfinite(h.train["loss"])
        assert math.isfinite(h.val["loss"])
        assert "ap_voc" in h.val  # validation decoded full-image detections with the inference anchors
    run = tmp_path / "run"
    for name in ("best.pt", "last.pt", "metrics.jsonl"):
        assert (run / name).stat().st_size > 0, name
    assert load_checkpoint(run / "last.pt")["epoch"] == 1


@pytest.mark.slow
def test_a_deadline_ends_the_epoch_and_the_event_rate_counts_only_the_steps_run(event_file: Path,
                                                                                tmp_path: Path) -> None:
    from jetssd.train.trainer import train

    cfg = TrainConfig().with_overrides([
        f'data.train=["{event_file}"]', f'data.validation=["{event_file}"]', "data.workers=0",
        "data.max_val_events=2", "data.crop=128", "optim.epochs=3", "optim.batch_size=2",
        "model.widths=[8,8,8,8,8,8,8,8,8,8,8]", "run.time_limit_minutes=1e-6", f'run.out="{tmp_path / "run"}"',
    ])
    result = train(cfg)
    # 8 events = 4 steps of 2 per epoch; the deadline has passed after the first step, which ends the run.
    assert len(result.history) == 1
    record = result.history[0]
    assert record.events_per_s * record.seconds == pytest.approx(2.0)


def test_phi_wrap_is_switched_through_compile_and_ddp_wrappers() -> None:
    from jetssd.model import NetConfig, PFJetSSD
    from jetssd.model.layers import PhiPad
    from jetssd.train.trainer import _set_phi_wrap

    model = PFJetSSD(NetConfig(widths=(8,) * 11), training_head=True)
    pads = [m for m in model.modules() if isinstance(m, PhiPad)]
    assert pads

    class FakeDDP(torch.nn.Module):  # DistributedDataParallel keeps the model as .module
        def __init__(self, module: torch.nn.Module) -> None:
            super().__init__()
            self.module = module

    for wrapped in (model, torch.compile(model), FakeDDP(model), torch.compile(FakeDDP(model))):
        _set_phi_wrap(wrapped, False)
        assert not any(p.wrap for p in pads)
        _set_phi_wrap(wrapped, True)
        assert all(p.wrap for p in pads)
