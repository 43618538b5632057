"""INT8 quantization-aware training (jetssd.quantize.qat): the fake quantizers by hand and against ONNX Runtime's
parameter computation, Conv-BN folding, the straight-through gradients, the observers and freezes, state-dict
round trips (resume), the trainer wiring, and the export to an int8 ONNX graph with integer kernels that
reproduces the PyTorch QAT network.

Most tests use a narrow network (8 channels) on small crops (fully convolutional); the exports need the full
340 × 360 image (anchor contract) and use synthetic events.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

import torch
import torch.nn.functional as F
from torch import nn

from jetssd.export import synthetic_images
from jetssd.model.config import NetConfig
from jetssd.model.network import PFJetSSD, calibrate_batchnorm
from jetssd.quantize.qat import (
    STATE_MODULE,
    ActivationObserver,
    INT8QATQuantizer,
    activation_qparams,
    attach_int8_qat,
    effective_weight,
    fake_quant_activation,
    fake_quant_weight,
    fold_factor,
    onnx_scope,
    quantize_weight,
    weight_scale,
)
from jetssd.train.config import TrainConfig

NARROW = NetConfig(widths=(8,) * 11)
CROP = (40, 48)
QAT_TOLERANCE = 1e-3
"""Stated agreement of the int8 ORT graph with the PyTorch QAT network: mean |Δ| of the class probabilities, box
offsets and ln pT (measured ≲ 1e-4: only float rounding differs)."""


def images(n: int, hw: tuple[int, int] = CROP, seed: int = 0) -> torch.Tensor:
    """[n, 3, H, W] GeV crops of the export's synthetic events (soft carpet + hot clusters)."""
    full = torch.from_numpy(synthetic_images(n, seed=seed))
    return full[:, :, 150:150 + hw[0], :hw[1]].contiguous() + full[:, :, :hw[0], 150:150 + hw[1]]


def narrow_model(activation: str = "prelu", seed: int = 0, calibrate: bool = True) -> PFJetSSD:
    """A narrow network with BN statistics from a batch (O(1) activations), eval mode."""
    torch.manual_seed(seed)
    model = PFJetSSD(NetConfig(widths=NARROW.widths, activation=activation), training_head=True)
    if calibrate:
        calibrate_batchnorm(model, images(4, seed=seed + 100))
    return model.eval()


def observe(model: nn.Module, x: torch.Tensor, passes: int = 2) -> None:
    """Training-mode forwards (no optimizer step) so that every observer has a range."""
    model.train()
    with torch.no_grad():
        for _ in range(passes):
            model(x)
    model.eval()


# --- fake quantizers ----------------------------------------------------------------------------------------


def test_weight_quantization_by_hand() -> None:
    w = torch.tensor([[1.27, -0.5, 0.004], [0.0, 0.0, 0.0], [-2.54, 1.0, 0.01]]).reshape(3, 3, 1, 1)
    codes, scale = quantize_weight(w)
    torch.testing.assert_close(scale, torch.tensor([0.01, 1.0, 0.02]))  # all-zero channel: scale 1 (ORT)
    assert codes.dtype == torch.int8
    assert codes.flatten(1).tolist() == [[127, -50, 0], [0, 0, 0], [-127, 50, 0]]  # 0.4 and 0.5 round to 0
    q = fake_quant_weight(w)
    assert torch.equal(q, codes.float() * scale.reshape(-1, 1, 1, 1))
    assert torch.equal(weight_scale(w), scale)


def test_weight_ste_passes_the_gradient_unchanged() -> None:
    w = torch.randn(6, 4, 3, 3, requires_grad=True)
    g = torch.randn(6, 4, 3, 3)
    (fake_quant_weight(w) * g).sum().backward()
    assert w.grad is not None
    assert torch.equal(w.grad, g)


@pytest.mark.parametrize(("rmin", "rmax"), [(-1.3, 7.1), (0.0, 4.6), (0.2, 3.0), (-5.0, -1.0), (-0.37, 0.0),
                                            (0.0, 0.0), (-1e-3, 1e5)])
def test_activation_parameters_are_onnxruntimes(rmin: float, rmax: float) -> None:
    import onnx
    from onnxruntime.quantization.quant_utils import compute_scale_zp, get_qmin_qmax_for_qType

    qmin, qmax = get_qmin_qmax_for_qType(onnx.TensorProto.UINT8)
    want_zp, want_scale = compute_scale_zp(np.array(rmin, np.float32), np.array(rmax, np.float32), qmin, qmax)
    scale, zp = activation_qparams(torch.tensor(rmin), torch.tensor(rmax))
    assert float(scale) == float(want_scale)
    assert int(zp) == int(want_zp)


def test_activation_fake_quant_grid_rounding_and_clipped_ste() -> None:
    scale, zp = activation_qparams(torch.tensor(-1.0), torch.tensor(3.0))  # scale 4/255, zp 64
    s = float(scale)
    x = torch.tensor([-2.0, -1.0, 0.0, 0.5 * s, 1.5 * s, 2.5 * s, 1.0, 3.0, 4.0], requires_grad=True)
    y = fake_quant_activation(x, scale, zp)
    q = torch.round(y.detach() / scale)
    torch.testing.assert_close(y.detach(), q * scale)  # on the grid
    assert q.tolist()[:6] == [-64, -64, 0, 0, 2, 2]  # clipped below; ties to even (ORT's x / scale)
    assert float(y[-1].detach()) == pytest.approx((255 - 64) * s)  # clipped above
    y.sum().backward()
    assert x.grad is not None
    assert x.grad.tolist() == [0, 1, 1, 1, 1, 1, 1, 1, 0]  # straight through inside the range, 0 outside
    # an average-pool output rounds avg/s + zp (QLinearAveragePool): a tie goes to the even *code*, which differs
    # from rounding avg/s when the zero point is odd
    odd_scale, odd_zp = activation_qparams(torch.tensor(-1.0), torch.tensor(3.05))
    assert int(odd_zp) % 2 == 1
    tie = 0.5 * odd_scale.reshape(1)
    assert float(fake_quant_activation(tie, odd_scale, odd_zp)) == 0.0
    assert float(fake_quant_activation(tie, odd_scale, odd_zp, pooled=True)) == pytest.approx(float(odd_scale))


# --- Conv-BN folding ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["backbone.0", "backbone.2.dw", "backbone.2.pw"])
def test_folded_fake_quant_conv_bn_is_float_conv_bn_within_the_quantization_step(path: str) -> None:
    model = narrow_model()
    conv_name, bn_name = {"backbone.0": ("backbone.0.conv", "backbone.0.bn"),
                          "backbone.2.dw": ("backbone.2.dw", "backbone.2.dw_bn"),
                          "backbone.2.pw": ("backbone.2.pw", "backbone.2.pw_bn")}[path]
    conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
    assert isinstance(conv, nn.Conv2d)
    assert isinstance(bn, nn.BatchNorm2d)
    x = torch.randn(2, conv.in_channels, 12, 14).abs()
    pad = (1, 1, 1, 1) if conv.kernel_size == (3, 3) else (0, 0, 0, 0)
    xp = F.pad(x, pad)
    with torch.no_grad():
        want = bn(F.conv2d(xp, conv.weight, None, 1, 0, 1, conv.groups))
        got = bn(F.conv2d(xp, effective_weight(conv, bn), None, 1, 0, 1, conv.groups))
        # |Δy_c| ≤ ½ s_c Σ|x| over the receptive field, s_c the step of the *folded* weight W·f
        f = fold_factor(bn)
        step = weight_scale(conv.weight * f.reshape(-1, 1, 1, 1))
        ones = torch.ones_like(conv.weight)
        bound = 0.5 * step.reshape(1, -1, 1, 1) * F.conv2d(xp.abs(), ones, None, 1, 0, 1, conv.groups)
    assert bool(((got - want).abs() <= bound * (1 + 1e-4) + 1e-5).all())
    assert float((got - want).abs().max()) > 0  # the weights were quantized
    # the weight the deployed conv uses, W_eff · f, lies on the per-channel int8 grid
    folded = effective_weight(conv, bn) * f.reshape(-1, 1, 1, 1)
    codes = folded / step.reshape(-1, 1, 1, 1)
    torch.testing.assert_close(codes, codes.round(), atol=1e-3, rtol=0)


def test_bake_leaves_plain_weights_whose_bn_folding_is_on_the_int8_grid() -> None:
    model = narrow_model(seed=3)
    q = attach_int8_qat(model)
    x = images(3, seed=4)
    observe(model, x)
    q.fake_quant_activations(False)
    with torch.no_grad():
        weights_only = model(x)
    q.fake_quant_activations(True)
    baked_state = q.baked_state_dict()
    assert not any(k.startswith(STATE_MODULE) for k in baked_state)
    assert "int8_qat.step" in model.state_dict()  # baked_state_dict leaves the model attached

    q.bake()
    assert not q.attached
    assert not hasattr(model, STATE_MODULE)
    assert type(model.backbone[2].dw) is nn.Conv2d
    assert type(model.backbone[2].dw_bn) is nn.BatchNorm2d
    assert q.activation_qparams().keys() == set(q.tensors)  # the baked ranges stay available
    for key, value in model.state_dict().items():
        assert torch.equal(value, baked_state[key]), key
    with torch.no_grad():
        for got, want in zip(model(x), weights_only, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # the QAT network minus activation FQ
    for path in q.convs:
        if path.startswith("head"):
            continue
        conv = model.get_submodule(path)
        bn = model.get_submodule(path.replace("conv", "bn") if path.endswith("conv") else path + "_bn")
        assert isinstance(conv, nn.Conv2d)
        assert isinstance(bn, nn.BatchNorm2d)
        with torch.no_grad():
            folded = conv.weight * fold_factor(bn).reshape(-1, 1, 1, 1)  # what the ONNX exporter folds
            codes = folded / weight_scale(folded).reshape(-1, 1, 1, 1)
        torch.testing.assert_close(codes, codes.round(), atol=1e-3, rtol=0)
        assert float(codes.abs().max()) == pytest.approx(127, abs=1e-3)


# --- training behaviour -------------------------------------------------------------------------------------


def test_gradients_reach_latent_weights_bn_and_prelu_through_the_fake_quantizers() -> None:
    model = narrow_model()
    attach_int8_qat(model)
    model.train()
    loc, cls, reg = model(images(2, seed=5))
    (loc.square().mean() + cls.square().mean() + reg.square().mean()).backward()
    for name in ("backbone.0.conv.weight", "backbone.2.dw.weight", "backbone.11.pw.weight", "backbone.2.dw_bn.weight",
                 "backbone.2.dw_bn.bias", "backbone.2.dw_act.weight", "head1.cls.weight"):
        grad = model.get_parameter(name).grad
        assert grad is not None, name
        assert bool(torch.isfinite(grad).all()), name
        assert float(grad.abs().sum()) > 0, name


def test_observer_moving_average_and_freezing() -> None:
    obs = ActivationObserver(averaging=0.25).train()
    x = torch.tensor([-1.0, 3.0])
    assert torch.equal(obs(x, observe=False), x)  # nothing observed yet: pass-through
    obs(x, observe=True)
    assert (float(obs.min_val), float(obs.max_val)) == (-1.0, 3.0)  # the first batch sets the range
    obs(torch.tensor([-3.0, 7.0]), observe=True)
    assert (float(obs.min_val), float(obs.max_val)) == (-1.5, 4.0)  # then min/max ← +0.25·(batch − old)
    obs.eval()
    obs(torch.tensor([-100.0, 100.0]), observe=True)  # eval: no update
    obs.train()
    obs.observing = False
    obs(torch.tensor([-100.0, 100.0]), observe=True)  # frozen: no update
    assert (float(obs.min_val), float(obs.max_val)) == (-1.5, 4.0)
    assert obs.quant().zero_point == int(activation_qparams(torch.tensor(-1.5), torch.tensor(4.0))[1])


def test_step_counter_freezes_observers_and_batchnorm() -> None:
    model = narrow_model(seed=2)
    q = attach_int8_qat(model, freeze_bn_step=2, freeze_observer_step=3)
    bn = model.backbone[2].dw_bn
    obs = q.observer("normalise")
    x = images(2, seed=6)
    model.train()
    assert bn.training
    assert not q.bn_frozen
    for step in range(4):
        mean_before, max_before = bn.running_mean.clone(), float(obs.max_val)
        with torch.no_grad():
            model(x * (1 + step))
        q.after_step()
        assert torch.equal(bn.running_mean, mean_before) == (step >= 2), step  # BN statistics frozen from step 2
        assert (float(obs.max_val) == max_before) == (step >= 3), step  # ranges frozen from step 3
        model.train()  # frozen BNs stay in eval mode whatever the network's mode
        assert bn.training == (step + 1 < 2)
    assert int(model.state_dict()["int8_qat.step"]) == 4
    assert q.bn_frozen
    assert q.observers_frozen


def test_default_is_frozen_bn_from_the_start() -> None:
    model = narrow_model()
    q = attach_int8_qat(model)
    model.train()
    assert q.bn_frozen
    assert not model.backbone[0].bn.training
    assert model.backbone[0].drop.training  # the rest trains normally


def test_state_dict_round_trip_resumes_ranges_step_and_freezes() -> None:
    model = narrow_model(seed=4)
    plain_keys = set(model.state_dict())
    q = attach_int8_qat(model, freeze_bn_step=1, freeze_observer_step=2)
    x = images(2, seed=7)
    observe(model, x)
    for _ in range(2):
        q.after_step()
    state = model.state_dict()
    assert set(state) - plain_keys == {"int8_qat.step"} | {f"int8_qat.observers.{t.replace('.', '_')}.{b}"
                                                           for t in q.tensors for b in ("min_val", "max_val")}
    assert "backbone.2.dw.weight" in state  # latent weights under their usual keys
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)

    resumed = PFJetSSD(NARROW, training_head=True)
    r = attach_int8_qat(resumed, freeze_bn_step=1, freeze_observer_step=2)
    assert not r.bn_frozen  # step 0 before the load …
    resumed.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
    assert r.step == 2  # … and the freezes follow the loaded step
    assert r.bn_frozen
    assert r.observers_frozen
    resumed.train()
    assert not resumed.backbone[2].dw_bn.training
    resumed.eval()
    with torch.no_grad():
        for got, want in zip(resumed(x), model(x), strict=True):
            assert torch.equal(got, want)
    with pytest.raises(RuntimeError, match="int8_qat"):  # a plain network refuses the QAT keys
        PFJetSSD(NARROW, training_head=True).load_state_dict(state)


def test_attach_detach_and_misuse() -> None:
    model = narrow_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = images(2, seed=8)
    with torch.no_grad():
        want = model(x)
    with INT8QATQuantizer(model) as q:
        assert q.attached
        with pytest.raises(RuntimeError, match="already attached"):
            q.attach()
        with pytest.raises(RuntimeError, match="already has"):
            attach_int8_qat(model)
    assert not q.attached
    assert model.state_dict().keys() == before.keys()
    assert type(model.backbone[0].conv) is nn.Conv2d
    with torch.no_grad():
        for got, w in zip(model(x), want, strict=True):
            assert torch.equal(got, w)  # detach gives the latent float network back
    with pytest.raises(RuntimeError, match="not attached"):
        q.after_step()

    from jetssd.quantize.twn import attach_twn

    attach_twn(model)
    with pytest.raises(RuntimeError, match="TWN"):
        attach_int8_qat(model)
    with pytest.raises(ValueError, match="no module"):
        INT8QATQuantizer(narrow_model(), float_layers=("head3",))
    with pytest.raises(TypeError, match="PFJetSSD"):
        INT8QATQuantizer(nn.Sequential(nn.Conv2d(3, 3, 1)))


def test_quantization_points_follow_the_activation() -> None:
    relu = INT8QATQuantizer(narrow_model("relu"))
    prelu = INT8QATQuantizer(narrow_model("prelu"))
    # ReLU: one uint8 tensor per conv (ORT drops the Relu); PReLU: before and after the activation
    assert relu.tensors[:4] == ["normalise", "backbone.0.act", "backbone.2.dw_act", "backbone.2.pw_act"]
    assert prelu.tensors[:5] == ["normalise", "backbone.0.conv", "backbone.0.act", "backbone.2.dw",
                                 "backbone.2.dw_act"]
    assert len(relu.convs) == len(prelu.convs) == 21  # 1 + 10 × 2 backbone convs; the heads are float
    assert relu.float_patterns() == ["/head1/", "/head2/"]
    assert "/backbone.2/dw_act/" in prelu.float_patterns()  # Mul/Max stay float between DQ and Q
    heads = INT8QATQuantizer(narrow_model("relu"), float_layers=("backbone.0",))
    assert "backbone.0.conv" not in heads.convs
    assert heads.tensors[:2] == ["backbone.0.act", "backbone.2.dw_act"]  # the pool's input, observed at the pool
    assert {"head1.loc", "head1.cls", "head1.reg", "source1.eca"} <= set(heads.tensors)
    assert onnx_scope("backbone.10.pw_act") == "/backbone.10/pw_act/"
    assert onnx_scope("head1.cls") == "/head1/cls/"


@pytest.mark.parametrize("activation", ["relu", "prelu"])
def test_bf16_autocast_and_channels_last(activation: str) -> None:
    model = narrow_model(activation).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    q = attach_int8_qat(model)
    x = images(2, seed=9).to(memory_format=torch.channels_last)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loc, cls, reg = model(x)
    (loc.float().square().mean() + cls.float().square().mean() + reg.float().square().mean()).backward()
    assert bool(torch.isfinite(model.backbone[2].dw.weight.grad).all())
    assert all(q.observer(t).initialized for t in q.tensors)


# --- configuration and trainer wiring -----------------------------------------------------------------------


def test_config_keys_and_refusals() -> None:
    cfg = TrainConfig().with_overrides(["compress.int8_qat=true", 'compress.int8_float_layers=["head1", "head2", '
                                        '"backbone.0"]', "compress.int8_freeze_observer_step=50"])
    assert cfg.compress.int8_qat
    assert cfg.compress.int8_float_layers == ("head1", "head2", "backbone.0")
    assert TrainConfig.from_dict(json.loads(cfg.dumps())) == cfg
    with pytest.raises(ValueError, match="twn"):
        TrainConfig().with_overrides(["compress.int8_qat=true", "compress.twn=true"])
    with pytest.raises(ValueError, match="≥ 0"):
        TrainConfig().with_overrides(["compress.int8_freeze_bn_step=-1"])


def test_compression_hooks_attach_the_quantizer_and_count_steps() -> None:
    from jetssd.train.trainer import compression_hooks

    model = PFJetSSD(NARROW, training_head=True)
    hooks = compression_hooks(model, TrainConfig().with_overrides(["compress.int8_qat=true",
                                                                   "compress.int8_freeze_observer_step=1"]))
    assert hasattr(model, STATE_MODULE)
    assert hooks.after_step is not None
    hooks.after_step()
    assert int(model.state_dict()["int8_qat.step"]) == 1
    assert not any(o.observing for o in model.get_submodule("int8_qat.observers").children()
                   if isinstance(o, ActivationObserver))


# --- export to ONNX Runtime ---------------------------------------------------------------------------------


def qat_checkpoint(path: Path, activation: str, overrides: tuple[str, ...] = ()) -> Path:
    """A QAT checkpoint (trainer format) of a small network whose observers saw two synthetic full events."""
    from jetssd.train.trainer import EpochRecord, save_checkpoint

    config = TrainConfig().with_overrides(["model.widths=[8, 8, 16, 16, 16, 16, 16, 16, 16, 16, 16]",
                                           f"model.activation={activation}", "compress.int8_qat=true", *overrides])
    torch.manual_seed(0)
    model = PFJetSSD(config.model, training_head=True)
    calibrate_batchnorm(model, torch.from_numpy(synthetic_images(2, seed=100)))
    compress = config.compress
    attach_int8_qat(model, float_layers=compress.int8_float_layers)
    observe(model, torch.from_numpy(synthetic_images(2, seed=101)), passes=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    history = [EpochRecord(0, {"loss": 1.0}, {"loss": 1.0}, 1.0, 1e-3, 1.0)]
    save_checkpoint(path, model, optimizer, scheduler, 0, config, history, best_val=1.0, best_epoch=0)
    return path


@pytest.mark.parametrize(("activation", "overrides"), [
    ("relu", ()),
    pytest.param("prelu", (), marks=pytest.mark.slow),
    pytest.param("relu", ("compress.int8_float_layers=[]",), marks=pytest.mark.slow),  # int8 heads too
])
def test_export_gives_integer_kernels_that_reproduce_the_qat_network(tmp_path: Path, activation: str,
                                                                    overrides: tuple[str, ...]) -> None:
    import onnx
    from onnx import numpy_helper

    from jetssd.inference import OnnxDetector
    from jetssd.quantize.int8 import op_counts
    from jetssd.quantize.qat import export_int8_qat, load_qat_checkpoint
    from jetssd.rasterize import sparsify

    checkpoint = qat_checkpoint(tmp_path / "best.pt", activation, overrides)
    events = [sparsify(image) for image in synthetic_images(3, seed=11)]
    out = export_int8_qat(checkpoint, tmp_path / "repo", events, calibration_sources=["synthetic seed 11"])
    assert out == tmp_path / "repo" / "pfjet_ssd_int8" / "1"
    assert sorted(p.name for p in out.iterdir()) == ["metadata.json", "model.onnx", "model.py"]

    ops = op_counts(out / "model.onnx")
    assert ops.get("QLinearConv", 0) >= 17  # every backbone conv runs as an integer kernel
    assert ops.get("QLinearAveragePool", 0) == 3
    meta = json.loads((out / "metadata.json").read_text())
    q = meta["quantization"]
    assert (meta["variant"], q["method"], q["activation_type"], q["weight_type"]) == ("int8", "qat", "uint8", "int8")
    assert meta["checkpoint"]["file"] == "best.pt"
    assert q["qat"]["float_layers"] == list(TrainConfig().with_overrides(list(overrides)).compress.int8_float_layers)
    assert "/l2norm/" in q["exclude_patterns"]
    assert all(v < QAT_TOLERANCE for v in q["qat_parity"]["mean_abs_diff"].values()), q["qat_parity"]

    # independently: ORT's outputs against the PyTorch QAT network
    _, model, quantizer = load_qat_checkpoint(checkpoint)
    model.inference_only = True
    x = synthetic_images(2, seed=12)
    with torch.no_grad():
        want = [t.numpy() for t in model(torch.from_numpy(x))]
    got = OnnxDetector(out, threads=1).run(x)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        assert float(np.abs(g - w).mean()) < QAT_TOLERANCE
    assert float(np.std(want[1])) > 1e-2  # not just the head biases

    # the int8 weights ORT stores are the QAT codes of the folded weights
    graph = onnx.load(str(out / "model.onnx")).graph
    ints = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    dw = next(n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in ints
              and ints[n.input[0]].ndim == 4 and ints[n.input[0]].shape[1] == 1)  # a depthwise weight
    assert ints[dw.input[0]].dtype == np.int8
    assert np.abs(ints[dw.input[0]]).max() == 127
    folded_codes = {tuple(quantize_weight(effective_weight(conv, bn) * fold_factor(bn).reshape(-1, 1, 1, 1))[0]
                          .flatten().tolist()) for conv, bn in quantizer.convs.values() if bn is not None}
    assert tuple(ints[dw.input[0]].flatten().tolist()) in folded_codes


def test_export_refuses_a_plain_checkpoint_and_an_existing_version(tmp_path: Path) -> None:
    from jetssd.quantize.qat import export_int8_qat
    from jetssd.rasterize import sparsify
    from jetssd.train.trainer import save_checkpoint

    events = [sparsify(image) for image in synthetic_images(1, seed=11)]
    model = PFJetSSD(NARROW, training_head=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    save_checkpoint(tmp_path / "fpn.pt", model, optimizer, scheduler, 0, TrainConfig(), [], 1.0, 0)
    with pytest.raises(ValueError, match="int8_qat"):
        export_int8_qat(tmp_path / "fpn.pt", tmp_path / "repo", events)
    (tmp_path / "repo" / "pfjet_ssd_int8" / "1").mkdir(parents=True)
    with pytest.raises(FileExistsError):
        export_int8_qat(tmp_path / "fpn.pt", tmp_path / "repo", events)
    with pytest.raises(ValueError, match="empty"):
        export_int8_qat(tmp_path / "fpn.pt", tmp_path / "other", [])


# --- a tiny QAT fine-tune, resumed, exported through the CLI -----------------------------------------------


@pytest.fixture(scope="module")
def event_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Eight events (reference layout) with two jets each on a soft carpet."""
    from jetssd.event import Event, PFCandidates, TruthObjects
    from jetssd.io import write_events
    from jetssd.rasterize import rasterize_sparse

    rng = np.random.default_rng(3)
    events = []
    for _ in range(8):
        eta, phi = rng.uniform(-2.0, 2.0, 2), rng.uniform(-np.pi, np.pi, 2)
        cls, pt = rng.integers(0, 3, 2), rng.uniform(400, 1500, 2)
        parts = [(rng.exponential(1.0, 600), rng.uniform(-3, 3, 600), rng.uniform(-np.pi, np.pi, 600),
                  rng.integers(0, 3, 600))]
        for e, p, t in zip(eta, phi, pt, strict=True):
            parts.append((np.full(25, t / 25), e + rng.normal(0, 0.05, 25), p + rng.normal(0, 0.05, 25),
                          rng.integers(0, 3, 25)))
        pf = PFCandidates.from_arrays(*(np.concatenate(col) for col in zip(*parts, strict=True)))
        events.append(Event(pixels=rasterize_sparse(pf), truth=TruthObjects.from_arrays(cls, eta, phi, pt), pf=pf))
    path = tmp_path_factory.mktemp("events") / "synthetic.h5"
    write_events(path, events, format="reference")
    return path


@pytest.mark.slow
def test_tiny_qat_fine_tune_resume_and_cli_export(event_file: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from jetssd.cli import app
    from jetssd.quantize.int8 import op_counts
    from jetssd.train.trainer import load_checkpoint, save_checkpoint, train

    # the FPN to fine-tune: a plain checkpoint of the narrow network
    fpn = PFJetSSD(NARROW, training_head=True)
    calibrate_batchnorm(fpn, torch.from_numpy(synthetic_images(2, seed=100)))
    optimizer = torch.optim.SGD(fpn.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    save_checkpoint(tmp_path / "fpn.pt", fpn, optimizer, scheduler, 0, TrainConfig(model=NARROW), [], 1.0, 0)

    cfg = TrainConfig().with_overrides([
        f'data.train=["{event_file}"]', f'data.validation=["{event_file}"]', "data.workers=0",
        "data.max_train_events=4", "data.max_val_events=2", "data.crop=128", "optim.epochs=1",
        "optim.batch_size=2", "optim.lr=1e-3", "optim.warmup_steps=1", "compress.int8_qat=true",
        "compress.int8_freeze_observer_step=3", f'run.init="{tmp_path / "fpn.pt"}"',
        f'run.out="{tmp_path / "qat"}"',
    ])
    first = train(cfg)
    assert np.isfinite(first.history[0].val["loss"])
    state = load_checkpoint(tmp_path / "qat" / "last.pt")
    assert int(state["model"]["int8_qat.step"]) == 2  # 4 events / batch 2
    ranges = {k: v.clone() for k, v in state["model"].items() if k.startswith("int8_qat.observers")}
    assert all(bool(torch.isfinite(v)) for v in ranges.values())

    resumed = train(cfg.with_overrides(["optim.epochs=3"]), resume=True)
    assert [h.epoch for h in resumed.history] == [0, 1, 2]
    state = load_checkpoint(tmp_path / "qat" / "last.pt")
    assert int(state["model"]["int8_qat.step"]) == 6
    later = {k: v for k, v in state["model"].items() if k.startswith("int8_qat.observers")}
    assert any(not torch.equal(later[k], ranges[k]) for k in ranges)  # the third step still observed

    runner = CliRunner()
    result = runner.invoke(app, ["quantize", "--qat", str(tmp_path / "qat" / "last.pt"), "--calibration",
                                 str(event_file), "--events", "4", "--repository", str(tmp_path / "repo")])
    assert result.exit_code == 0, result.output
    out = tmp_path / "repo" / "pfjet_ssd_int8" / "1"
    assert op_counts(out / "model.onnx").get("QLinearConv", 0) >= 17
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["quantization"]["method"] == "qat"
    assert meta["quantization"]["qat"]["steps"] == 6
    assert all(v < QAT_TOLERANCE for v in meta["quantization"]["qat_parity"]["mean_abs_diff"].values())

    both = runner.invoke(app, ["quantize", "--qat", str(tmp_path / "qat" / "last.pt"), "--model", str(out),
                               "--calibration", str(event_file)])
    assert both.exit_code != 0
    assert "exactly one" in both.output
