"""PFJet-SSD network: config, shapes and anchor order, φ padding, normalisation, size, init, DropBlock,
L2Norm/ECA, bf16 training step, ONNX export parity.

Forward passes on the full 340×360 image cost ~0.05–0.3 s here, so most checks that do not depend on the
image size (the network is fully convolutional) run on small crops.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

import torch
from torch import nn

from jetssd.model.complexity import conv_macs, count_parameters, measure, reference_ops
from jetssd.model.config import FULL_WIDTHS, NetConfig
from jetssd.model.layers import ECA, ConvDW, DetectionHead, DropBlock2d, L2Norm, PhiPad, PReLUMax, prelu_as_max
from jetssd.model.network import (
    N_ANCHORS_INFERENCE,
    N_ANCHORS_TRAINING,
    PFJetSSD,
    calibrate_batchnorm,
    export_onnx,
    inference_state_dict,
    source_shape,
)

FULL = (340, 360)


def calibrate(model: PFJetSSD, images: torch.Tensor) -> PFJetSSD:
    """BN statistics from ``images`` (see :func:`jetssd.model.calibrate_batchnorm`), eval mode."""
    calibrate_batchnorm(model, images)
    return model


def events(n: int, hw: tuple[int, int] = FULL, seed: int = 0) -> torch.Tensor:
    """[n, 3, H, W] GeV: ~3 % occupied pixels with exponential deposits, plus a few hard 'jet' pixels."""
    g = torch.Generator().manual_seed(seed)
    x = torch.empty(n, 3, *hw).exponential_(0.5, generator=g) * (torch.rand(n, 3, *hw, generator=g) < 0.03)
    x[:, :, hw[0] // 3, hw[1] // 4] = 300.0
    return x


@pytest.fixture(scope="module")
def trained_like() -> PFJetSSD:
    """Training-graph model with calibrated BN stats (eval mode)."""
    torch.manual_seed(0)
    return calibrate(PFJetSSD(NetConfig(), training_head=True), events(2, seed=1))


# --- config -------------------------------------------------------------------------------------------------

def test_config_defaults_and_json_round_trip() -> None:
    cfg = NetConfig()
    assert cfg.widths == (29, 55, 88, 85, 128, 128, 128, 128, 128, 128, 128)
    assert (cfg.activation, cfg.circular_phi, cfg.dropblock, cfg.n_classes, cfg.normalisation) == (
        "prelu", True, 0.1, 3, "log1p")
    assert cfg.source_widths == (128, 128)
    other = NetConfig(widths=FULL_WIDTHS, activation="leaky_relu", circular_phi=False, n_classes=2)
    for c in (cfg, other):
        assert NetConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c


@pytest.mark.parametrize("kwargs", [
    {"activation": "gelu"}, {"normalisation": "zscore"}, {"widths": (8,) * 10}, {"widths": (8,) * 10 + (0,)},
    {"dropblock": 1.0}, {"n_classes": 0},
])
def test_config_rejects_bad_values(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - each case has its own message
        NetConfig(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown keys"):
        NetConfig.from_dict({"width": [1]})


def test_config_importable_without_torch() -> None:
    code = ("import sys; sys.modules['torch'] = None\n"
            "from jetssd.model import NetConfig\n"
            "print(NetConfig().to_dict()['activation'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "prelu"


# --- shapes, anchor order, inference graph ------------------------------------------------------------------

def test_output_shapes_with_and_without_training_head(trained_like: PFJetSSD) -> None:
    x = events(1)
    with torch.no_grad():
        loc, cls, reg = trained_like(x)
        assert (loc.shape, cls.shape, reg.shape) == ((1, 2576, 2), (1, 2576, 4), (1, 2576, 1))
        trained_like.inference_only = True
        try:
            loc1, cls1, reg1 = trained_like(x)
        finally:
            trained_like.inference_only = False
    assert (loc1.shape, cls1.shape, reg1.shape) == ((1, 2024, 2), (1, 2024, 4), (1, 2024, 1))
    assert N_ANCHORS_TRAINING == 2576
    assert N_ANCHORS_INFERENCE == 2024
    assert source_shape(*FULL, 3) == (44, 46)
    assert source_shape(*FULL, 4) == (23, 24)
    torch.testing.assert_close(loc1, loc[:, :2024])
    torch.testing.assert_close(cls1, cls[:, :2024])
    torch.testing.assert_close(reg1, reg[:, :2024])

    bare = PFJetSSD(NetConfig(n_classes=2), training_head=False).eval()
    assert bare.source2 is None
    assert len(bare.backbone) == 12
    with torch.no_grad():
        shapes = [t.shape for t in bare(x)]
    assert shapes == [(1, 2024, 2), (1, 2024, 3), (1, 2024, 1)]


def test_flattening_is_source_major_eta_outer_phi_inner(trained_like: PFJetSSD) -> None:
    """Anchor p = i·n_φ + j of source 1, then 2024 + i·24 + j of source 2 (the order of jetssd.anchors)."""
    maps: list[torch.Tensor] = []
    handles = [h.cls.register_forward_hook(lambda m, i, o: maps.append(o)) for h in trained_like.heads()]
    try:
        with torch.no_grad():
            _, cls, _ = trained_like(events(1, seed=3))
    finally:
        for h in handles:
            h.remove()
    m1, m2 = maps  # [1, 4, 44, 46], [1, 4, 23, 24]
    assert m1.shape[2:] == (44, 46)
    assert m2.shape[2:] == (23, 24)
    for i, j in [(0, 0), (0, 45), (1, 0), (17, 33), (43, 45)]:
        torch.testing.assert_close(cls[0, i * 46 + j], m1[0, :, i, j])
    for i, j in [(0, 0), (0, 23), (1, 0), (22, 23)]:
        torch.testing.assert_close(cls[0, 2024 + i * 24 + j], m2[0, :, i, j])


def test_inference_model_is_a_strict_copy_of_source_one(trained_like: PFJetSSD) -> None:
    inf = trained_like.inference_model()
    assert not inf.training
    assert inf.source2 is None
    assert set(inf.state_dict()) == set(inference_state_dict(trained_like.state_dict()))
    assert not any(k.startswith(("backbone.12", "backbone.13", "backbone.14", "head2", "source2"))
                   for k in inf.state_dict())
    x = events(1, seed=4)
    with torch.no_grad():
        full = trained_like(x)
        short = inf(x)
    for a, b in zip(short, full, strict=True):
        torch.testing.assert_close(a, b[:, :2024])
    # a copy: changing it leaves the training model alone
    with torch.no_grad():
        inf.head1.reg.weight.add_(1.0)
    assert not torch.equal(inf.head1.reg.weight, trained_like.head1.reg.weight)


def test_channels_last_equals_contiguous(trained_like: PFJetSSD) -> None:
    x = events(2, (72, 96), seed=5)
    with torch.no_grad():
        ref = trained_like(x)
        cl_model = PFJetSSD(NetConfig(), training_head=True)
        cl_model.load_state_dict(trained_like.state_dict())
        cl_model = cl_model.eval().to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        out = cl_model(x.contiguous(memory_format=torch.channels_last))
    for a, b in zip(out, ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "relu6"])
def test_other_activations(activation: str) -> None:
    model = PFJetSSD(NetConfig(activation=activation), training_head=False)
    assert not any(isinstance(m, nn.PReLU) for m in model.modules())
    # PReLU slopes are the only parameters that go away: one per BN channel.
    n_prelu = sum(m.weight.numel() for m in PFJetSSD(NetConfig(), training_head=False).modules()
                  if isinstance(m, nn.PReLU))
    assert count_parameters(model) == 111_235 - n_prelu
    with torch.no_grad():
        shapes = [t.shape for t in model.eval()(events(1, (40, 48)))]
    assert shapes == [(1, 6 * 7, 2), (1, 42, 4), (1, 42, 1)]


# --- φ padding ------------------------------------------------------------------------------------------

def test_phi_pad_equals_manual_concatenation() -> None:
    x = torch.randn(2, 5, 7, 9)
    wrapped = PhiPad(1)(x)
    torch.testing.assert_close(wrapped, torch.cat([x[..., -1:], x, x[..., :1]], dim=-1), rtol=0, atol=0)
    np.testing.assert_array_equal(wrapped.numpy(), np.pad(x.numpy(), [(0, 0), (0, 0), (0, 0), (1, 1)], mode="wrap"))
    zeros = PhiPad(1, wrap=False)(x)
    np.testing.assert_array_equal(zeros.numpy(), np.pad(x.numpy(), [(0, 0), (0, 0), (0, 0), (1, 1)]))
    x_cl = x.contiguous(memory_format=torch.channels_last)
    for wrap in (True, False):  # no silent layout change
        assert PhiPad(1, wrap=wrap)(x_cl).is_contiguous(memory_format=torch.channels_last)


def test_circular_conv_block_is_phi_periodic() -> None:
    """With wrap, a conv block commutes with a φ roll (column 0 neighbours column W−1); with zeros it does not."""
    torch.manual_seed(0)
    x = torch.randn(1, 6, 10, 16, requires_grad=True)
    for circular in (True, False):
        block = ConvDW(6, 8, "prelu", circular_phi=circular).eval()
        with torch.no_grad():
            rolled_then_block = block(torch.roll(x, 5, dims=-1))
            block_then_rolled = torch.roll(block(x), 5, dims=-1)
        assert torch.allclose(rolled_then_block, block_then_rolled, atol=1e-6) == circular
        # a feature at φ column 0 reaches the output at the last column only through the wrap
        x.grad = None
        block(x)[..., -1].sum().backward()
        assert x.grad is not None
        assert bool((x.grad[..., 0] != 0).any()) == circular


def test_set_phi_wrap_off_equals_zero_padded_model(trained_like: PFJetSSD) -> None:
    zero = PFJetSSD(NetConfig(circular_phi=False), training_head=True)
    zero.load_state_dict(trained_like.state_dict())  # same parameters: padding has none
    zero.eval()
    x = events(1, (48, 64), seed=6)
    with torch.no_grad():
        wrapped = trained_like(x)
        trained_like.set_phi_wrap(False)
        try:
            unwrapped = trained_like(x)
        finally:
            trained_like.set_phi_wrap(True)
        ref = zero(x)
    for a, b in zip(unwrapped, ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(wrapped[0], ref[0], atol=1e-3)
    with pytest.raises(ValueError, match="circular_phi=False"):
        zero.set_phi_wrap(True)


# --- normalisation ----------------------------------------------------------------------------------------

def test_log1p_normalisation_is_the_first_op(trained_like: PFJetSSD) -> None:
    raw = PFJetSSD(NetConfig(normalisation="none"), training_head=True)
    raw.load_state_dict(trained_like.state_dict())
    raw.eval()
    x = events(1, (48, 64), seed=7)
    with torch.no_grad():
        for a, b in zip(trained_like(x), raw(torch.log1p(x)), strict=True):
            torch.testing.assert_close(a, b)
        seen: list[torch.Tensor] = []
        hook = trained_like.backbone[0].register_forward_pre_hook(lambda m, i: seen.append(i[0]))
        try:
            trained_like(x)
        finally:
            hook.remove()
    torch.testing.assert_close(seen[0], torch.log1p(x))


# --- size ---------------------------------------------------------------------------------------------------

def test_parameter_counts() -> None:
    # Reference (§3.4, pruned widths): 111,228 (inference) and 156,031 (training). Ours adds the head biases
    # the reference lacks (§10.9): 2 + 4 + 1 = 7 per head. Circular padding adds no parameters.
    assert count_parameters(PFJetSSD(NetConfig(), training_head=False)) == 111_228 + 7
    assert count_parameters(PFJetSSD(NetConfig(), training_head=True)) == 156_031 + 14
    # Unpruned widths: reference 1,044,227 and 2,707,206.
    assert count_parameters(PFJetSSD(NetConfig(widths=FULL_WIDTHS), training_head=False)) == 1_044_227 + 7
    assert count_parameters(PFJetSSD(NetConfig(widths=FULL_WIDTHS), training_head=True)) == 2_707_206 + 14
    frozen = PFJetSSD(NetConfig(), training_head=False)
    frozen.head1.requires_grad_(False)
    assert count_parameters(frozen) == 111_235 - 128 * 9 * 7 - 7


def test_conv_macs_and_reference_ops() -> None:
    cfg = NetConfig()
    # Exact for the pruned inference graph (heads included); the reference quotes 1.027 G MACs, 1.095 G ops.
    assert conv_macs(cfg) == 1_027_349_019
    assert reference_ops(cfg) == 1_095_269_433
    assert round(conv_macs(cfg) / 1e9, 3) == 1.027
    assert round(reference_ops(cfg) / 1e9, 3) == 1.095
    assert round(reference_ops(cfg, training_head=True) / 1e9, 2) == 1.12
    # Unpruned: 5.66 G (inference) and 6.58 G (training).
    assert round(reference_ops(NetConfig(widths=FULL_WIDTHS)) / 1e9, 2) == 5.66
    assert round(reference_ops(NetConfig(widths=FULL_WIDTHS), training_head=True) / 1e9, 2) == 6.58
    # Neither padding nor the activation type changes the count.
    c = measure(NetConfig(circular_phi=False, activation="relu"))
    assert c == measure(cfg)
    assert c.bn_elements == c.activation_elements


# --- initialisation, blocks ---------------------------------------------------------------------------------

def test_head_bias_prior_init() -> None:
    model = PFJetSSD(NetConfig(), training_head=True)
    for head in model.heads():
        assert head.cls.bias is not None
        assert head.reg.bias is not None
        assert head.loc.bias is not None
        p = torch.softmax(head.cls.bias, 0)
        assert p[0].item() == pytest.approx(0.99, abs=1e-6)
        torch.testing.assert_close(p[1:], torch.full((3,), 0.01 / 3))
        assert torch.sigmoid(head.cls.bias[1:]).sum().item() == pytest.approx(0.01, rel=0.02)
        torch.testing.assert_close(head.reg.bias, torch.tensor([math.log(0.8)]))
        assert torch.equal(head.loc.bias, torch.zeros(2))
    # Xavier-uniform convs: bound √(6 / (fan_in + fan_out))
    pw = model.backbone[2].pw
    assert isinstance(pw, nn.Conv2d)
    w = pw.weight  # 29 → 55, 1×1
    assert w.abs().max().item() <= math.sqrt(6 / (29 + 55)) + 1e-6
    assert w.std().item() == pytest.approx(math.sqrt(2 / (29 + 55)), rel=0.15)


def test_dropblock_identity_in_eval_active_in_train() -> None:
    drop = DropBlock2d(0.1, 3)
    x = torch.ones(4, 5, 40, 40)
    assert drop.eval()(x) is x
    torch.manual_seed(0)
    y = drop.train()(x)
    zeros = y == 0
    assert zeros.any()
    assert torch.equal(zeros, zeros[:, :1].expand_as(zeros))  # the mask is shared across channels
    frac = zeros[:, 0].float().mean().item()
    assert 0.03 < frac < 0.2  # ~1 − (1 − 0.1/9)^9 ≈ 0.095
    assert y.mean().item() == pytest.approx(1.0, abs=1e-5)  # kept activations rescaled
    assert torch.equal(DropBlock2d(0.0).train()(x), x)
    model = PFJetSSD(NetConfig(), training_head=False)
    assert isinstance(model.backbone[0].drop, DropBlock2d)
    assert model.backbone[0].drop.drop_prob == 0.1


def test_source_is_l2norm_then_eca_and_l2norm_is_low_precision_safe() -> None:
    model = PFJetSSD(NetConfig(), training_head=True)
    assert model.source2 is not None
    for src in (model.source1, model.source2):
        assert [type(m) for m in src.children()] == [L2Norm, ECA]
    l2 = L2Norm(16)
    x = torch.randn(2, 16, 5, 6)
    torch.testing.assert_close(torch.linalg.vector_norm(l2(x), dim=1), torch.full((2, 5, 6), 20.0), rtol=1e-4,
                               atol=1e-3)
    for dtype in (torch.float16, torch.bfloat16):
        big = (torch.randn(1, 16, 3, 3) * 3e3).to(dtype)  # Σx² overflows fp16
        out = l2(big)
        assert out.dtype == dtype
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out.float(), l2(big.float()), rtol=1e-2, atol=0.1)
    zero = torch.zeros(1, 16, 2, 2, requires_grad=True)
    out = l2(zero)
    out.sum().backward()
    assert torch.equal(out, torch.zeros_like(out))
    assert zero.grad is not None
    assert torch.isfinite(zero.grad).all()


def test_prelu_as_max_is_exact_and_skips_out_of_range_slopes() -> None:
    prelu = nn.PReLU(8, init=0.25)
    with torch.no_grad():
        prelu.weight.copy_(torch.linspace(0, 1, 8))
    x = torch.randn(3, 8, 5, 7)
    torch.testing.assert_close(PReLUMax(prelu)(x), prelu(x), rtol=0, atol=0)
    last = nn.PReLU(8)
    seq = nn.Sequential(nn.PReLU(8), nn.Conv2d(8, 8, 1), last)
    with torch.no_grad():
        last.weight[3] = 1.5  # max(x, 1.5x) would be wrong: keep the PReLU
    assert prelu_as_max(seq) == 1
    assert isinstance(seq[0], PReLUMax)
    assert isinstance(seq[2], nn.PReLU)


# --- training step --------------------------------------------------------------------------------------------

def test_backward_under_bf16_autocast_gives_finite_grads() -> None:
    torch.manual_seed(0)
    model = PFJetSSD(NetConfig(), training_head=True).train()
    model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    x = events(2, (96, 112), seed=8).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loc, cls, reg = model(x)
        assert cls.dtype == torch.bfloat16
        assert cls.shape[1] == 13 * 15 + 7 * 8  # 96×112 → 49×57 → 25×29 → 13×15 (source 1) → 7×8 (source 2)
        background = torch.zeros(cls.shape[0] * cls.shape[1], dtype=torch.long)
        loss = (loc.float().square().mean() + reg.float().abs().mean()
                + torch.nn.functional.cross_entropy(cls.float().flatten(0, 1), background))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    assert model.source1.eca.conv.weight.grad is not None
    assert model.source1.eca.conv.weight.grad.abs().sum() > 0


# --- ONNX ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("prelu_max", [True, False])
def test_onnx_export_matches_pytorch(trained_like: PFJetSSD, tmp_path: Path, prelu_max: bool) -> None:
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    path = export_onnx(trained_like, tmp_path / "model.onnx", prelu_max=prelu_max)
    graph = onnx.load(str(path))
    assert max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) >= 17
    ops = {n.op_type for n in graph.graph.node}
    assert ("PRelu" in ops) != prelu_max
    assert [i.name for i in graph.graph.input] == ["image"]
    assert [o.name for o in graph.graph.output] == ["loc", "cls_logits", "reg"]
    assert graph.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch
    assert trained_like.training_head  # the model itself is left as it was
    assert isinstance(trained_like.backbone[0].act, nn.PReLU)

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for n in (1, 3):
        x = events(n, seed=10 + n)
        got = sess.run(None, {"image": x.numpy()})
        with torch.no_grad():
            trained_like.inference_only = True
            try:
                want = trained_like(x)
            finally:
                trained_like.inference_only = False
        for g, w in zip(got, want, strict=True):
            assert g.shape == tuple(w.shape)
            np.testing.assert_allclose(g, w.numpy(), atol=1e-4, rtol=1e-4)
        assert np.std(got[1]) > 1e-2  # a non-trivial network, not just the head biases


def test_export_rejects_old_opset(trained_like: PFJetSSD, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="opset"):
        export_onnx(trained_like, tmp_path / "m.onnx", opset=13)


def test_detection_head_flatten_is_channels_last_safe() -> None:
    head = DetectionHead(8, 3, circular_phi=True)
    x = torch.randn(2, 8, 5, 6).contiguous(memory_format=torch.channels_last)
    loc, cls, reg = head(x)
    assert (loc.shape, cls.shape, reg.shape) == ((2, 30, 2), (2, 30, 4), (2, 30, 1))


def test_calibrate_batchnorm_sets_batch_statistics_and_keeps_momentum() -> None:
    model = PFJetSSD(NetConfig(widths=(8,) * 11), training_head=False)
    images = events(2, seed=5)
    calibrate_batchnorm(model, images)
    assert not model.training
    first = model.backbone[0]
    assert first.bn.momentum == 0.1  # restored after the one-batch cumulative average
    with torch.no_grad():
        conv_out = first.conv(first.pad(model.normalise(images)))
    # The first BN's running mean/variance are exactly the batch statistics of the first conv's output.
    torch.testing.assert_close(first.bn.running_mean, conv_out.mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(first.bn.running_var, conv_out.var(dim=(0, 2, 3), unbiased=True), rtol=1e-3,
                               atol=1e-6)
