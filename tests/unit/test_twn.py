"""TWN quantization-aware training (jetssd.quantize.twn): the quantizer by hand, the straight-through gradient,
latent vs effective weights, bake / state-dict round trips, ONNX export, statistics, bf16 + channels_last and a
short training run.

Most tests use a narrow network (8 channels everywhere) on small crops: the network is fully convolutional.
"""

from __future__ import annotations

import copy
import io
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

import torch
from torch import nn

from jetssd.model.config import NetConfig
from jetssd.model.layers import ConvDW
from jetssd.model.network import PFJetSSD, calibrate_batchnorm, export_onnx
from jetssd.quantize import twn
from jetssd.quantize.twn import (
    LATENT_SUFFIX,
    TWNQuantizer,
    attach_twn,
    bake_state_dict,
    dequantize,
    pattern_histogram,
    sparsity,
    ternarize,
    ternary_weight,
    total_sparsity,
)
from jetssd.train.config import LossConfig
from jetssd.train.loss import multibox_loss

NARROW = NetConfig(widths=(8,) * 11)
CROP = (40, 48)  # → source 1: 6×7, source 2: 4×4 → P = 58


def events(n: int, hw: tuple[int, int] = CROP, seed: int = 0) -> torch.Tensor:
    """[n, 3, H, W] GeV: ~5 % occupied pixels with exponential deposits plus one hard pixel."""
    g = torch.Generator().manual_seed(seed)
    x = torch.empty(n, 3, *hw).exponential_(0.5, generator=g) * (torch.rand(n, 3, *hw, generator=g) < 0.05)
    x[:, :, hw[0] // 3, hw[1] // 4] = 300.0
    return x


def calibrate(model: nn.Module, images: torch.Tensor) -> nn.Module:
    """BN statistics from ``images`` (keeps a random net's activations O(1)), eval mode."""
    return calibrate_batchnorm(model, images)


def narrow_model(seed: int = 0) -> PFJetSSD:
    torch.manual_seed(seed)
    return PFJetSSD(NARROW, training_head=True)


def conv(module: nn.Module, name: str) -> nn.Conv2d:
    """The conv at dotted path ``name`` (e.g. ``"backbone.2.dw"``), typed."""
    found = module.get_submodule(name)
    assert isinstance(found, nn.Conv2d)
    return found


def assert_ternary(weight: torch.Tensor) -> None:
    """Each filter of ``weight`` takes values in {-α_c, 0, +α_c} (≤ 3 distinct values)."""
    for filt in weight.detach().float().flatten(1):
        values = torch.unique(filt)
        assert len(values) <= 3, values
        nonzero = values[values != 0]
        if len(nonzero) == 2:
            assert nonzero[0] == -nonzero[1]


# --- ternarize / dequantize ---------------------------------------------------------------------------------

def test_ternarize_by_hand() -> None:
    w = torch.tensor([
        [0.1, -0.2, 0.3, -0.4, 0.5, 0.0, 0.05, -0.6, 0.25],  # mean|w| = 2.4/9, Δ = 0.18667
        [0.0] * 9,                                            # all zero: α = 0, codes 0, no NaN (§10.12)
        [-1.0] * 9,                                           # Δ = 0.7: all kept, α = 1
        [0.0, 0.0, 0.0, 0.0, 3.0, 0.0, 0.0, 0.0, 0.0],        # Δ = 0.7·3/9: only the centre survives
    ]).reshape(4, 1, 3, 3)
    codes, alpha = ternarize(w)
    assert codes.dtype == torch.int8
    assert codes.shape == w.shape
    assert alpha.dtype == torch.float32
    assert alpha.shape == (4,)
    assert codes[0].flatten().tolist() == [0, -1, 1, -1, 1, 0, 0, -1, 1]
    assert alpha[0].item() == pytest.approx((0.2 + 0.3 + 0.4 + 0.5 + 0.6 + 0.25) / 6)
    assert codes[1].abs().sum() == 0
    assert alpha[1] == 0
    assert codes[2].flatten().tolist() == [-1] * 9
    assert alpha[2] == 1.0
    assert codes[3].flatten().tolist() == [0, 0, 0, 0, 1, 0, 0, 0, 0]
    assert alpha[3] == 3.0
    assert torch.isfinite(alpha).all()
    torch.testing.assert_close(dequantize(codes, alpha), alpha.reshape(4, 1, 1, 1) * codes.float())


def test_ternarize_scales_are_per_output_filter() -> None:
    w = torch.tensor([[1.75, 0.0, 0.0, 0.0]]).reshape(1, 4, 1, 1)  # mean 0.4375, Δ = 0.30625: only 1.75 kept
    codes, alpha = ternarize(w)
    assert codes.flatten().tolist() == [1, 0, 0, 0]
    assert alpha.tolist() == [1.75]
    # pointwise-like [C_out, C_in, 1, 1]: filter 1 has Δ = 0.7·0.015 = 0.0105 > 0.01, so only -0.02 survives
    w = torch.tensor([[1.0, -1.0], [0.01, -0.02]]).reshape(2, 2, 1, 1)
    codes, alpha = ternarize(w)
    assert codes.flatten().tolist() == [1, -1, 0, -1]
    torch.testing.assert_close(alpha, torch.tensor([1.0, 0.02]))


def test_ternarize_bf16_and_channels_last() -> None:
    torch.manual_seed(1)
    w = torch.randn(6, 1, 3, 3)
    codes, alpha = ternarize(w)
    codes_cl, alpha_cl = ternarize(w.contiguous(memory_format=torch.channels_last))
    assert torch.equal(codes, codes_cl)
    assert torch.equal(alpha, alpha_cl)
    codes_bf, alpha_bf = ternarize(w.bfloat16())
    assert alpha_bf.dtype == torch.float32
    assert (codes_bf != codes).float().mean() < 0.1  # bf16 rounding may move an entry across Δ, rarely
    t = ternary_weight(w.contiguous(memory_format=torch.channels_last).bfloat16())
    assert t.dtype == torch.bfloat16
    assert t.is_contiguous(memory_format=torch.channels_last)


def test_dequantize_rejects_bad_alpha() -> None:
    with pytest.raises(ValueError, match="alpha"):
        dequantize(torch.zeros(4, 1, 3, 3, dtype=torch.int8), torch.ones(3))


def test_ternarize_is_idempotent_on_ternary_weights() -> None:
    torch.manual_seed(2)
    codes, alpha = ternarize(torch.randn(16, 1, 3, 3))
    codes2, alpha2 = ternarize(dequantize(codes, alpha))
    assert torch.equal(codes, codes2)
    torch.testing.assert_close(alpha, alpha2)


# --- straight-through estimator ------------------------------------------------------------------------------

def test_ste_gradient_equals_gradient_wrt_the_ternary_weight() -> None:
    torch.manual_seed(3)
    block = ConvDW(4, 6, "prelu", circular_phi=True).train()
    reference = copy.deepcopy(block)
    ref_dw = conv(reference, "dw")
    x = torch.randn(2, 4, 7, 9)
    target = torch.randn(2, 6, 7, 9)

    q = TWNQuantizer(block).attach()
    latent = q.latent_parameters()["dw"]
    assert torch.equal(latent, ref_dw.weight)  # attach does not touch the latent values
    (block(x) - target).square().mean().backward()

    # Manual: a plain copy whose depthwise weight *is* the ternary tensor, as a leaf.
    with torch.no_grad():
        ref_dw.weight.copy_(ternary_weight(latent))
    (reference(x) - target).square().mean().backward()

    assert latent.grad is not None
    assert ref_dw.weight.grad is not None
    torch.testing.assert_close(latent.grad, ref_dw.weight.grad, rtol=1e-6, atol=1e-7)
    assert latent.grad.abs().sum() > 0
    for (name, p), p_ref in zip(block.named_parameters(), reference.parameters(), strict=True):
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-6, atol=1e-7, msg=name)


def test_latent_weights_train_while_forward_uses_ternary_values() -> None:
    model = narrow_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)  # built before attach: same Parameter objects
    q = attach_twn(model)
    before = {k: v.detach().clone() for k, v in q.latent_parameters().items()}
    loc, cls, reg = model(events(2))
    (loc.square().mean() + cls.logsumexp(-1).mean() + reg.square().mean()).backward()
    optimizer.step()
    q.after_step()
    for name, conv in q.convs.items():
        latent = q.latent_parameters()[name]
        assert not torch.equal(latent, before[name]), name  # the latent weight moved ...
        assert len(torch.unique(latent.detach()[0])) > 3  # ... and is still full precision
        assert_ternary(conv.weight)  # ... while the forward sees ternary values
        codes, alpha = ternarize(latent)
        assert torch.equal(conv.weight, dequantize(codes, alpha))  # recomputed from the current latent


def test_after_step_clamps_latent_weights() -> None:
    model = narrow_model()
    q = attach_twn(model, clamp_latent=0.05)
    with torch.no_grad():
        for w in q.latent_parameters().values():
            w.mul_(100.0)
    q.after_step()
    for w in q.latent_parameters().values():
        assert w.abs().max() <= 0.05
    q_off = attach_twn(narrow_model(), clamp_latent=None)
    saved = {k: v.detach().clone() * 100 for k, v in q_off.latent_parameters().items()}
    with torch.no_grad():
        for k, w in q_off.latent_parameters().items():
            w.copy_(saved[k])
    q_off.after_step()
    for k, w in q_off.latent_parameters().items():
        assert torch.equal(w, saved[k])
    with pytest.raises(ValueError, match="clamp_latent"):
        TWNQuantizer(model, clamp_latent=0.0)


def test_all_zero_filter_gives_finite_forward_and_gradients() -> None:
    model = narrow_model()
    q = attach_twn(model)
    with torch.no_grad():
        q.latent_parameters()["backbone.3.dw"][2].zero_()
    outputs = model(events(2))
    sum(o.sum() for o in outputs).backward()
    assert all(torch.isfinite(o).all() for o in outputs)
    assert q.convs["backbone.3.dw"].weight[2].abs().sum() == 0
    for w in q.latent_parameters().values():
        assert w.grad is not None
        assert torch.isfinite(w.grad).all()


# --- layer selection and lifecycle --------------------------------------------------------------------------

def test_layer_selection() -> None:
    model = narrow_model()
    dw = twn.select_layers(model)
    assert list(dw) == [f"backbone.{k}.dw" for k in (2, 3, 4, 6, 7, 8, 10, 11, 13, 14)]
    assert all(c.groups == c.in_channels == c.out_channels and c.kernel_size == (3, 3) for c in dw.values())
    both = twn.select_layers(model, "depthwise+pointwise")
    assert len(both) == 20
    assert both["backbone.2.pw"].kernel_size == (1, 1)
    inference = twn.select_layers(PFJetSSD(NARROW, training_head=False))
    assert len(inference) == 8
    with pytest.raises(ValueError, match="layers"):
        twn.select_layers(model, "all")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ConvDW"):
        twn.select_layers(nn.Conv2d(3, 3, 3))

    q = attach_twn(model, "depthwise+pointwise")
    model(events(1))
    assert_ternary(conv(model, "backbone.2.pw").weight)
    assert_ternary(conv(model, "backbone.2.dw").weight)
    assert not torch.nn.utils.parametrize.is_parametrized(conv(model, "backbone.0.conv"))
    assert not torch.nn.utils.parametrize.is_parametrized(model.head1.cls)
    assert len(q.state()) == 20


def test_attach_twice_and_detached_calls_are_errors() -> None:
    model = narrow_model()
    q = attach_twn(model)
    with pytest.raises(RuntimeError, match="already"):
        q.attach()
    with pytest.raises(RuntimeError, match="already parametrized"):
        attach_twn(model)
    q.detach()
    for call in (q.after_step, q.bake, q.detach):
        with pytest.raises(RuntimeError, match="not attached"):
            call()


def test_context_manager_restores_the_latent_weights() -> None:
    model = narrow_model()
    dw = conv(model, "backbone.2.dw")
    original = dw.weight
    saved = original.detach().clone()
    with TWNQuantizer(model) as q:
        assert q.attached
        assert not torch.equal(dw.weight, saved)
    assert not q.attached
    assert dw.weight is original  # the same Parameter: an optimizer keeps working
    assert torch.equal(original, saved)
    assert not any(LATENT_SUFFIX in k for k in model.state_dict())


# --- bake, state dicts, export ------------------------------------------------------------------------------

def test_bake_gives_a_plain_model_with_the_quantized_outputs() -> None:
    model = narrow_model()
    q = attach_twn(model)
    calibrate(model, events(4, seed=1))
    x = events(3, seed=2)
    with torch.no_grad():
        want = model(x)
    state_before = q.state()
    with pytest.raises(RuntimeError):  # the plain inference graph has no parametrized keys: bake first
        model.inference_model()

    q.bake()
    assert not q.attached
    assert not any(LATENT_SUFFIX in k for k in model.state_dict())
    with torch.no_grad():
        got = model(x)
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)
    assert float(want[1].std()) > 1e-2  # a non-trivial network, not just the head biases
    for name, layer in q.state().items():
        assert torch.equal(layer.codes, state_before[name].codes)
        assert torch.equal(layer.weight, q.convs[name].weight)
    # ternary_state on the baked model recovers the same codes (α up to rounding)
    for name, layer in twn.ternary_state(model).items():
        assert torch.equal(layer.codes, state_before[name].codes)
        torch.testing.assert_close(layer.alpha, state_before[name].alpha)

    net = model.inference_model()
    model.inference_only = True
    with torch.no_grad():
        for g, w in zip(net(x), model(x), strict=True):
            assert torch.equal(g, w)


def test_state_dict_round_trip_and_bake_state_dict() -> None:
    model = narrow_model(seed=4)
    attach_twn(model)
    calibrate(model, events(4, seed=3))
    state = model.state_dict()
    assert "backbone.2.dw.parametrizations.weight.original" in state
    assert "backbone.2.dw.weight" not in state
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)

    resumed = PFJetSSD(NARROW, training_head=True)
    attach_twn(resumed)
    resumed.load_state_dict(loaded, strict=True)
    resumed.eval()
    x = events(2, seed=5)
    with torch.no_grad():
        want = model(x)
        for g, w in zip(resumed(x), want, strict=True):
            assert torch.equal(g, w)
    for key in state:
        assert torch.equal(resumed.state_dict()[key], state[key]), key  # latent weights, not ternary ones

    plain = PFJetSSD(NARROW, training_head=True)
    plain.load_state_dict(bake_state_dict(loaded), strict=True)
    plain.eval()
    with torch.no_grad():
        for g, w in zip(plain(x), want, strict=True):
            assert torch.equal(g, w)
    plain_state = plain.state_dict()
    assert bake_state_dict(plain_state).keys() == plain_state.keys()
    assert all(bake_state_dict(plain_state)[k] is v for k, v in plain_state.items())


def test_onnx_export_of_the_baked_model_runs_in_onnxruntime(tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from onnx import numpy_helper

    model = narrow_model(seed=6)
    q = attach_twn(model)
    calibrate(model, events(2, (340, 360), seed=6))
    q.bake()
    path = export_onnx(model, tmp_path / "twn.onnx")

    graph = onnx.load(str(path)).graph
    weights = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    depthwise = [n for n in graph.node if n.op_type == "Conv"
                 and any(a.name == "group" and a.i > 1 for a in n.attribute)]
    assert len(depthwise) == 8  # idx 2–4, 6–8, 10–11 of the inference graph
    for node in depthwise:  # BN folded in: still ternary up to a per-channel scale (the DSP contract)
        for filt in weights[node.input[1]].reshape(8, -1):
            assert len(np.unique(np.abs(filt[filt != 0]))) <= 1

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = events(2, (340, 360), seed=7)
    got = sess.run(None, {"image": x.numpy()})
    model.inference_only = True
    with torch.no_grad():
        want = model(x)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w.numpy(), atol=1e-4, rtol=1e-4)
    assert np.std(got[1]) > 1e-2


# --- statistics ---------------------------------------------------------------------------------------------

def test_sparsity_and_patterns_on_a_default_width_random_init() -> None:
    torch.manual_seed(8)
    model = PFJetSSD(NetConfig(), training_head=True)
    per_layer = sparsity(model)
    assert len(per_layer) == 10
    # Uniform (Xavier) weights: P(|w| < 0.7·E|w|) = 0.35 in expectation; trained filters reach ≈ 0.47.
    assert all(0.2 < s < 0.5 for s in per_layer.values()), per_layer
    assert 0.3 < total_sparsity(model) < 0.4
    q = attach_twn(model)
    assert q.sparsity() == per_layer  # same numbers from the latent weights of the attached model

    patterns = pattern_histogram(model)
    assert len(patterns) == 36
    counts = [c for _, c in patterns]
    assert counts == sorted(counts, reverse=True)
    n_filters = sum(c.out_channels for c in q.convs.values())
    assert sum(counts) <= n_filters
    for pattern, _ in patterns:
        assert len(pattern) == 3
        assert all(len(row) == 3 and set(row) <= {-1, 0, 1} for row in pattern)
    everything = pattern_histogram(model, top=3**9)
    assert sum(c for _, c in everything) == n_filters


# --- bf16, channels_last, training --------------------------------------------------------------------------

def test_bf16_autocast_and_channels_last() -> None:
    model = narrow_model(seed=9)
    q = attach_twn(model)
    calibrate(model, events(4, seed=9))
    x = events(2, seed=10)
    with torch.no_grad():
        want = model(x)
    model_cl = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    x_cl = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        for g, w in zip(model_cl(x_cl), want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)

    model_cl.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loc, cls, reg = model_cl(x_cl)
        assert cls.dtype == torch.bfloat16
        loss = loc.float().square().mean() + cls.float().logsumexp(-1).mean() + reg.float().square().mean()
    loss.backward()
    for name, w in q.latent_parameters().items():
        assert w.dtype == torch.float32, name
        assert w.grad is not None, name
        assert torch.isfinite(w.grad).all(), name
        assert w.grad.abs().sum() > 0, name
        assert_ternary(q.convs[name].weight)


def test_short_training_run_decreases_the_loss() -> None:
    model = narrow_model(seed=11).train()
    q = attach_twn(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(12)
    x = events(4, seed=12)
    n_anchors = 6 * 7 + 4 * 4
    labels = torch.zeros(4, n_anchors, dtype=torch.long)
    labels[:, :3] = torch.randint(1, 4, (4, 3), generator=g)
    loc_target = torch.randn(4, n_anchors, 2, generator=g) * 0.5
    pt_target = torch.randn(4, n_anchors, generator=g) * 0.5
    config = LossConfig()

    losses = []
    for _ in range(10):
        loc, cls, reg = model(x)
        parts = multibox_loss(loc, cls, reg, labels, loc_target, pt_target, config)
        optimizer.zero_grad(set_to_none=True)
        parts.total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        optimizer.step()
        q.after_step()
        losses.append(float(parts.total.detach()))
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.7 * losses[0], losses
    for conv in q.convs.values():
        assert_ternary(conv.weight)
