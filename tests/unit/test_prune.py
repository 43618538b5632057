"""Network slimming (reference §5): FLOP regulariser, channel selection, pruning and pruned checkpoints.

The network is fully convolutional, so equality checks run small widths on small crops (fast on CPU).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

import torch
from torch import nn

from jetssd.model.complexity import conv_macs, count_parameters
from jetssd.model.config import FULL_WIDTHS, PRUNED_WIDTHS, NetConfig
from jetssd.model.layers import L2Norm
from jetssd.model.network import PFJetSSD, calibrate_batchnorm
from jetssd.prune import (
    CONV_BLOCK_INDICES,
    REFERENCE_CAPS,
    REFERENCE_STRENGTH,
    conv_blocks,
    flop_regularizer,
    load_model,
    output_bn,
    prune_checkpoint,
    prune_model,
    select_block,
    select_channels,
)

SMALL = (8, 12, 12, 12, 16, 16, 16, 16, 16, 16, 16)
CROP = (40, 48)  # 4 pools: 40×48 → 21×25 → 11×13 → 6×7 → 4×4


def make_model(activation: str = "prelu", training_head: bool = True, seed: int = 0,
               widths: tuple[int, ...] = SMALL) -> PFJetSSD:
    """A small network with every per-channel parameter randomised (γ, β, PReLU slopes, L2Norm scales)."""
    torch.manual_seed(seed)
    model = PFJetSSD(NetConfig(widths=widths, activation=activation, dropblock=0.0), training_head=training_head)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.3)
            elif isinstance(m, nn.PReLU):
                m.weight.uniform_(0.0, 0.5)
        for m in model.modules():
            if isinstance(m, L2Norm):
                m.weight.uniform_(0.5, 2.0)  # O(1) outputs: float32 rounding stays ~1e-6
    return model


def images(n: int = 3, seed: int = 1) -> torch.Tensor:
    """[n, 3, *CROP] GeV: sparse exponential deposits."""
    g = torch.Generator().manual_seed(seed)
    x = torch.empty(n, 3, *CROP).exponential_(0.2, generator=g)
    return x * (torch.rand(n, 3, *CROP, generator=g) < 0.2)


def calibrate(model: PFJetSSD, x: torch.Tensor) -> PFJetSSD:
    """BN statistics from ``x`` (non-trivial μ, σ²: a zero-input depthwise BN would otherwise give exactly β and
    equality tests would be too easy), eval mode."""
    calibrate_batchnorm(model, x)
    return model


def outputs(model: PFJetSSD, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        return model.eval()(x)


def all_channels(model: PFJetSSD) -> list[np.ndarray]:
    return [np.arange(w, dtype=np.int64) for w in model.config.widths]


# --------------------------------------------------------------------------------------------------
# Regulariser


def test_regularizer_matches_hand_computation() -> None:
    model = make_model()
    with torch.no_grad():
        for b, block in enumerate(conv_blocks(model)):
            assert block is not None
            bn = output_bn(block)
            bn.weight.fill_(0.1 * (b + 1) * (-1) ** b)  # signs alternate: the penalty takes |γ|
    # F per inference block, "same" geometry, input H×W following the pools 340×360 → 171×181 → 86×91 → 44×46.
    flops = [
        3 * 340 * 360 * (9 * 8) + 3 * 340 * 360,  # idx 0: 3 → 8
        8 * 171 * 181 * (12 + 9) + 8 * 171 * 181,  # idx 2: 8 → 12
        12 * 171 * 181 * (12 + 9) + 12 * 171 * 181,  # idx 3
        12 * 171 * 181 * (12 + 9) + 12 * 171 * 181,  # idx 4
        12 * 86 * 91 * (16 + 9) + 12 * 86 * 91,  # idx 6: 12 → 16
        16 * 86 * 91 * (16 + 9) + 16 * 86 * 91,  # idx 7
        16 * 86 * 91 * (16 + 9) + 16 * 86 * 91,  # idx 8
        16 * 44 * 46 * (16 + 9) + 16 * 44 * 46,  # idx 10
        16 * 44 * 46 * (16 + 9) + 16 * 44 * 46,  # idx 11
    ]
    expected = 1e-11 * sum(f * SMALL[b] * 0.1 * (b + 1) for b, f in enumerate(flops))  # idx 13, 14 excluded
    r = flop_regularizer(model, 1e-11)
    assert r.shape == ()
    assert r.dtype == torch.float32
    assert float(r.detach()) == pytest.approx(expected, rel=1e-6)
    assert REFERENCE_STRENGTH == 1e-11
    assert float(flop_regularizer(model).detach()) == pytest.approx(expected, rel=1e-6)
    assert float(flop_regularizer(model, 3e-11).detach()) == pytest.approx(3 * expected, rel=1e-6)


def test_regularizer_sees_through_wrappers() -> None:
    class Wrapper(nn.Module):  # stands in for DistributedDataParallel's ``.module``
        def __init__(self, module: nn.Module) -> None:
            super().__init__()
            self.module = module

    model = make_model()
    assert torch.equal(flop_regularizer(Wrapper(model)), flop_regularizer(model))
    with pytest.raises(TypeError):
        flop_regularizer(nn.Linear(2, 2))


def test_regularizer_gradient_reaches_only_output_bn_gamma() -> None:
    model = make_model()
    flop_regularizer(model, 1e-9).backward()
    blocks = conv_blocks(model)
    targets = {id(output_bn(b).weight) for idx, b in zip(CONV_BLOCK_INDICES, blocks, strict=True)
               if b is not None and idx <= 11}
    assert len(targets) == 9
    for name, p in model.named_parameters():
        if id(p) in targets:
            assert p.grad is not None, name
            # d|γ|/dγ = sign(γ): every entry gets the block's constant weight, strength·F.
            assert torch.equal(p.grad.abs(), p.grad.abs()[0].expand_as(p.grad)), name
            assert float(p.grad.abs()[0]) > 0, name
        else:
            assert p.grad is None or not p.grad.any(), name


# --------------------------------------------------------------------------------------------------
# Channel selection


def test_select_block_mean_minus_std_branch() -> None:
    # mean 0.85, std (Bessel) 0.3742 → thr 0.4758: only index 3 (0.1) falls below.
    g = [1.0, 0.9, 1.1, 0.1, 1.05, 0.95]
    np.testing.assert_array_equal(select_block(g, None), [0, 1, 2, 4, 5])
    np.testing.assert_array_equal(select_block(g, 6), [0, 1, 2, 4, 5])  # a cap ≥ C is no cap
    np.testing.assert_array_equal(select_block(g, 100), [0, 1, 2, 4, 5])
    # std with Bessel's correction like torch.std: mean 0.801875, thr 0.5064 (0.5255 with the population std,
    # which would also drop 0.515 at index 4).
    g2 = [1.0, 1.0, 1.0, 1.0, 0.515, 0.2, 0.9, 0.8]
    np.testing.assert_array_equal(select_block(g2, None), [0, 1, 2, 3, 4, 6, 7])
    assert select_block(g, None).dtype == np.int64


def test_select_block_cap_branch() -> None:
    g = [1.0, 0.9, 1.1, 0.1, 1.05, 0.95]
    # sorted ascending 0.1, 0.9, 0.95, 1.0, 1.05, 1.1; cap 3 → thr = sorted[6 − 3] = 1.0 > mean − std.
    np.testing.assert_array_equal(select_block(g, 3), [0, 2, 4])
    np.testing.assert_array_equal(select_block(g, 1), [2])
    np.testing.assert_array_equal(select_block(np.array([0.3, 0.2, 0.5]), 2), [0, 2])


def test_select_block_keeps_at_least_one_and_caps_ties() -> None:
    np.testing.assert_array_equal(select_block([0.1] * 7, None), np.arange(7))  # std 0: all equal survive
    np.testing.assert_array_equal(select_block([0.0, 0.0, 0.0], None), [0, 1, 2])
    np.testing.assert_array_equal(select_block([0.2], None), [0])
    np.testing.assert_array_equal(select_block([0.2], 1), [0])
    # Ties at the cap's threshold: the cap is a hard limit, the lower index wins.
    np.testing.assert_array_equal(select_block([1.0] * 5, 2), [0, 1])
    np.testing.assert_array_equal(select_block([0.5, 1.0, 1.0, 1.0, 2.0], 3), [1, 2, 4])
    with pytest.raises(ValueError, match="NaN"):
        select_block([1.0, float("nan")], None)
    with pytest.raises(ValueError, match="cap"):
        select_block([1.0, 2.0], 0)
    with pytest.raises(ValueError, match="non-empty"):
        select_block([], None)


def test_select_channels_reads_each_blocks_output_bn() -> None:
    model = make_model(training_head=True)
    with torch.no_grad():
        for block in conv_blocks(model):
            assert block is not None
            bn = output_bn(block)
            bn.weight.copy_(torch.linspace(-1.0, 1.0, bn.num_features))  # |γ| is V-shaped
    caps: list[int | None] = [None, 4, None, None, None, None, None, None, None, 3, 16]
    keep = select_channels(model, caps)
    assert len(keep) == 11
    for b, (k, cap) in enumerate(zip(keep, caps, strict=True)):
        g = np.abs(np.linspace(-1.0, 1.0, SMALL[b]))
        np.testing.assert_array_equal(k, select_block(g.astype(np.float32), cap))
        assert len(k) <= (cap or SMALL[b])
    assert len(keep[1]) == 4
    assert len(keep[9]) == 3
    with pytest.raises(ValueError, match="11"):
        select_channels(model, [None] * 9)


def test_select_channels_on_an_inference_graph_keeps_the_training_blocks() -> None:
    model = make_model(training_head=False)
    keep = select_channels(model, [2] * 11)
    assert [len(k) for k in keep[:9]] == [2] * 9
    np.testing.assert_array_equal(keep[9], np.arange(SMALL[9]))
    np.testing.assert_array_equal(keep[10], np.arange(SMALL[10]))


def test_reference_caps_schedule() -> None:
    assert len(REFERENCE_CAPS) == 6
    assert all(len(row) == 11 for row in REFERENCE_CAPS)
    assert REFERENCE_CAPS[0] == list(FULL_WIDTHS)  # iteration 1: only the mean − std rule acts
    assert REFERENCE_CAPS[-1] == [32, 64, 128, 128, *[128] * 7]
    assert [row[4] for row in REFERENCE_CAPS] == [256, 230, 205, 179, 153, 128]  # idx 6
    assert [row[5] for row in REFERENCE_CAPS] == [512, 435, 358, 281, 204, 128]  # idx 7, 8, 10, 11
    assert [row[9] for row in REFERENCE_CAPS] == [1024, 845, 666, 487, 308, 128]  # idx 13, 14
    assert all(p <= c for p, c in zip(PRUNED_WIDTHS, REFERENCE_CAPS[-1], strict=True) if c is not None)
    # On the unpruned network at init (all γ = 1) the final caps are hard limits despite the ties.
    full = PFJetSSD(NetConfig(widths=FULL_WIDTHS), training_head=True)
    widths = [len(k) for k in select_channels(full, REFERENCE_CAPS[-1])]
    assert widths == [32, 64, 128, 128, *[128] * 7]


# --------------------------------------------------------------------------------------------------
# Pruning


def test_keep_all_prune_is_identical() -> None:
    x = images()
    model = calibrate(make_model(), x)
    model.set_phi_wrap(False)
    model.inference_only = True
    pruned = prune_model(model, all_channels(model))
    assert pruned is not model
    assert pruned.config == model.config
    assert pruned.training is model.training
    assert pruned.inference_only
    ref, new = model.state_dict(), pruned.state_dict()
    assert list(ref) == list(new)
    for key in ref:
        assert torch.equal(ref[key], new[key]), key
        if ref[key].numel():
            assert ref[key].data_ptr() != new[key].data_ptr(), f"{key} shares storage with the source"
    for a, b in zip(outputs(model, x), outputs(pruned, x), strict=True):
        assert torch.equal(a, b)
    model.inference_only = False
    pruned.inference_only = False
    model.set_phi_wrap(True)
    pruned.set_phi_wrap(True)
    for a, b in zip(outputs(model, x), outputs(pruned, x), strict=True):
        assert torch.equal(a, b)


def zero_channels(model: PFJetSSD, block: int, channels: list[int]) -> None:
    """γ = β = 0: the channels output act(0) = 0 in eval mode, whatever their input."""
    blk = conv_blocks(model)[block]
    assert blk is not None
    with torch.no_grad():
        output_bn(blk).weight[channels] = 0.0
        output_bn(blk).bias[channels] = 0.0


@pytest.mark.parametrize("activation", ["prelu", "relu", "leaky_relu"])
@pytest.mark.parametrize(("zeroed", "label"), [
    ({0: [1, 5]}, "first block, through a pool"),
    ({1: [0, 3, 7, 11]}, "separable block"),
    ({4: [2, 9], 5: [0, 15], 6: [6]}, "several blocks in a row"),
    ({7: [4]}, "through the last pool of the inference graph"),
    ({8: [14, 15], 10: [0, 1]}, "sources: leading/trailing channels (ECA zero-pads its ends)"),
    ({8: [15], 9: [3, 4]}, "source 1 through pool 12 into the training-only blocks"),
])
def test_pruning_zero_gamma_channels_preserves_outputs(activation: str, zeroed: dict[int, list[int]],
                                                       label: str) -> None:
    x = images()
    model = calibrate(make_model(activation), x)
    for block, channels in zeroed.items():
        zero_channels(model, block, channels)
    ref = outputs(model, x)
    assert all(float(t.std()) > 1e-2 for t in ref), "outputs should not be trivially constant"
    keep = [np.setdiff1d(np.arange(w), zeroed.get(b, [])).astype(np.int64) for b, w in enumerate(SMALL)]
    pruned = prune_model(model, keep)
    assert pruned.config.widths == tuple(len(k) for k in keep)
    for a, b in zip(ref, outputs(pruned, x), strict=True):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5, msg=label)


def test_zero_input_constant_is_folded_into_the_next_pointwise_bn() -> None:
    """The dropped channels' next depthwise BN turns 0 into act(β − γμ/σ) ≠ 0: plain slicing would be wrong."""
    x = images()
    model = calibrate(make_model(), x)
    zero_channels(model, 1, [0, 3])
    keep = all_channels(model)
    keep[1] = np.setdiff1d(keep[1], [0, 3])
    pruned = prune_model(model, keep)
    consumer = f"backbone.{CONV_BLOCK_INDICES[2]}.pw_bn.running_mean"
    assert not torch.allclose(pruned.state_dict()[consumer], model.state_dict()[consumer], atol=1e-3)
    plain = {k: v for k, v in pruned.state_dict().items()}
    plain[consumer] = model.state_dict()[consumer].clone()
    naive = PFJetSSD(pruned.config, training_head=True)
    naive.load_state_dict(plain)
    diff = max(float((a - b).abs().max()) for a, b in zip(outputs(model, x), outputs(naive, x), strict=True))
    assert diff > 1e-3


def test_pruned_config_and_parameter_counts() -> None:
    model = make_model(activation="relu")
    keep = [np.arange(0, w, 2, dtype=np.int64) for w in SMALL]  # every other channel
    pruned = prune_model(model, keep)
    half = tuple(w // 2 for w in SMALL)
    assert pruned.config == dataclasses.replace(model.config, widths=half)
    assert pruned.head2 is not None
    fresh = PFJetSSD(NetConfig(widths=half, activation="relu", dropblock=0.0), training_head=True)
    assert count_parameters(pruned) == count_parameters(fresh)
    fresh.load_state_dict(pruned.state_dict(), strict=True)
    assert conv_macs(pruned.config, training_head=True) < conv_macs(model.config, training_head=True)
    # The surviving weights are the selected rows/columns of the originals.
    pw = model.state_dict()["backbone.3.pw.weight"]  # block 2: [12, 12, 1, 1]
    expected = pw[torch.as_tensor(keep[2])][:, torch.as_tensor(keep[1])]
    assert torch.equal(pruned.state_dict()["backbone.3.pw.weight"], expected)
    assert torch.equal(pruned.state_dict()["head2.cls.weight"],
                       model.state_dict()["head2.cls.weight"][:, torch.as_tensor(keep[10])])
    assert torch.equal(pruned.state_dict()["source1.eca.conv.weight"], model.state_dict()["source1.eca.conv.weight"])
    loc, cls, reg = pruned(images(1))
    assert loc.shape[-1] == 2
    assert cls.shape[-1] == 4
    assert reg.shape[-1] == 1


def test_prune_inference_graph_and_bad_keep() -> None:
    model = make_model(training_head=False)
    keep = select_channels(model, [4] * 11)
    pruned = prune_model(model, keep)
    assert pruned.head2 is None
    assert pruned.config.widths == (4,) * 9 + SMALL[9:]
    pruned(images(1))
    bad = all_channels(model)
    bad[3] = np.array([2, 1])
    with pytest.raises(ValueError, match="increasing"):
        prune_model(model, bad)
    bad[3] = np.array([], dtype=np.int64)
    with pytest.raises(ValueError, match="non-empty"):
        prune_model(model, bad)
    bad[3] = np.array([0, SMALL[3]])
    with pytest.raises(ValueError, match="increasing indices"):
        prune_model(model, bad)
    with pytest.raises(ValueError, match="11"):
        prune_model(model, bad[:10])


# --------------------------------------------------------------------------------------------------
# Checkpoints


def write_checkpoint(path: Path) -> PFJetSSD:
    from jetssd.train.config import TrainConfig
    from jetssd.train.trainer import EpochRecord, save_checkpoint

    model = calibrate(make_model(), images())
    config = TrainConfig(model=model.config)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    history = [EpochRecord(epoch=0, train={"loss": 1.0}, val={"loss": 1.2}, seconds=1.0, lr=0.1, events_per_s=9.0)]
    save_checkpoint(path, model, optimizer, scheduler, 0, config, history, 1.2, 0)
    return model


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_prune_checkpoint_round_trip(tmp_path: Path) -> None:
    from jetssd.train.trainer import load_checkpoint

    src, dst = tmp_path / "best.pt", tmp_path / "pruned.pt"
    model = write_checkpoint(src)
    before = digest(src)
    caps: list[int | None] = [None, None, None, None, 10, 10, 10, 10, 10, 8, 8]
    widths, record = prune_checkpoint(src, dst, caps)
    assert digest(src) == before
    assert widths == tuple(len(k) for k in select_channels(model, caps))
    assert all(w <= (c or s) for w, c, s in zip(widths, caps, SMALL, strict=True))

    state = load_checkpoint(dst)  # weights_only=True
    assert "optimizer" not in state
    assert "scheduler" not in state
    assert state["epoch"] == 0
    assert json.loads(state["history"])[0]["val"]["loss"] == 1.2
    config = json.loads(state["config"])
    assert config["model"]["widths"] == list(widths)
    assert {k: v for k, v in config["model"].items() if k != "widths"} == \
        {k: v for k, v in model.config.to_dict().items() if k != "widths"}
    records = json.loads(state["prune"])
    assert records == [record]
    assert record["widths_before"] == list(SMALL)
    assert record["widths_after"] == list(widths)
    assert record["caps"] == caps
    assert [len(k) for k in record["kept"]] == list(widths)
    for key in ("params", "conv_macs"):
        for graph in ("inference", "training"):
            assert record[f"{key}_after"][graph] < record[f"{key}_before"][graph]
    assert record["params_before"]["training"] == count_parameters(model)

    net = PFJetSSD(NetConfig.from_dict(config["model"]), training_head=True)
    net.load_state_dict(state["model"], strict=True)
    loc, _, _ = net.eval()(images(1))
    assert torch.isfinite(loc).all()
    assert load_model(state).config.widths == widths

    # A second iteration appends its record; the first pruned file stays as it was.
    first = digest(dst)
    widths2, _ = prune_checkpoint(dst, tmp_path / "pruned2.pt", [4] * 11)
    assert widths2 == (4,) * 11
    assert digest(dst) == first
    assert len(json.loads(load_checkpoint(tmp_path / "pruned2.pt")["prune"])) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "pruned.pt", "pruned2.pt"]  # no temp left


def test_prune_checkpoint_never_overwrites(tmp_path: Path) -> None:
    src = tmp_path / "best.pt"
    write_checkpoint(src)
    before = digest(src)
    for dst in (src, tmp_path / "sub" / ".." / "best.pt"):
        (tmp_path / "sub").mkdir(exist_ok=True)
        with pytest.raises(FileExistsError, match="input"):
            prune_checkpoint(src, dst, [None] * 11)
    other = tmp_path / "other.pt"
    other.write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="exists"):
        prune_checkpoint(src, other, [None] * 11)
    assert other.read_bytes() == b"keep me"
    assert digest(src) == before
    with pytest.raises(FileNotFoundError):
        prune_checkpoint(tmp_path / "missing.pt", tmp_path / "out.pt", [None] * 11)
    assert not (tmp_path / "out.pt").exists()
