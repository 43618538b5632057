"""TWN checkpoint → DSP program (``docs/dsp.md`` §5). Needs torch (reads the checkpoint, calibrates).

Ops, in execution order, for the inference graph (backbone idx 0–11, source 1, head 1):
``input`` → ``conv`` (idx 0, int8) → ``avgpool`` → [``conv`` dw (ternary) → ``conv`` pw (int8)] × 3 →
``avgpool`` → … → ``l2norm`` → ``eca`` → ``conv`` (the three heads as one 7-channel conv, int32 out).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor, nn

from jetssd.dsp import DEFAULT_PERCENTILE
from jetssd.dsp.arith import INT32_MAX, quantize_multiplier
from jetssd.dsp.program import Program
from jetssd.event import SparsePixels
from jetssd.model.layers import ConvBN, ConvDW
from jetssd.model.network import POOL_INDICES, SOURCE1_INDEX, PFJetSSD
from jetssd.quantize.qat import fold_factor

ECA_Z_STEP = 1.0 / 16.0
"""Resolution of the sigmoid LUT's argument: z index = round(z · 16), 256 entries cover z ∈ [−8, 7.9375]."""
LUT_FRAC_BITS = 15
"""The gate is Q15: LUT[i] = round(sigmoid((i − 128) · ECA_Z_STEP) · 2^15)."""
L2_SQRT_SHIFT_MAX = 8
"""Largest (even) pre-shift g of Σq² before the integer square root (precision; bounded by int32)."""
CALIBRATION_BATCH = 4
CALIBRATION_SAMPLE = 200_000
"""Values of each tensor kept per calibration batch (a regular stride through it, plus its maximum)."""


def _round_away(x: NDArray[np.float64]) -> NDArray[np.int64]:
    return (np.sign(x) * np.floor(np.abs(x) + 0.5)).astype(np.int64)


def _child(module: nn.Module, name: str) -> nn.Module:
    return cast(nn.Module, getattr(module, name))


def _stages(idx: int, block: nn.Module) -> list[tuple[str, nn.Conv2d, nn.BatchNorm2d, nn.Module, bool]]:
    """(name, conv, bn, activation, is_depthwise) of a backbone block, in order."""
    parts = [("", "conv", "bn", "act", False)] if isinstance(block, ConvBN) else [
        (".dw", "dw", "dw_bn", "dw_act", True), (".pw", "pw", "pw_bn", "pw_act", False)]
    return [(f"backbone.{idx}{suffix}", cast(nn.Conv2d, _child(block, c)), cast(nn.BatchNorm2d, _child(block, b)),
             _child(block, a), dw) for suffix, c, b, a, dw in parts]


def _requant_arrays(real: NDArray[np.float64]) -> tuple[NDArray[np.int32], NDArray[np.int32]]:
    pairs = [quantize_multiplier(float(m)) for m in real]
    return (np.array([p[0] for p in pairs], np.int32), np.array([p[1] for p in pairs], np.int32))


def load_twn(checkpoint: Path) -> tuple[PFJetSSD, dict[str, Any], dict[str, Any]]:
    """(inference net with ternary weights baked, fp32 eval; raw model state dict; training config)."""
    from jetssd.export import _inference_net
    from jetssd.train.trainer import load_checkpoint

    state = load_checkpoint(Path(checkpoint))
    config = json.loads(state["config"]) if isinstance(state["config"], str) else dict(state["config"])
    net = _inference_net(state, config)
    return net, state["model"], config


def _ternary_of(state: dict[str, Any], conv_name: str) -> tuple[NDArray[np.int8], NDArray[np.float64]]:
    """Codes and α of a depthwise conv from the checkpoint (latent weight when TWN was attached)."""
    from jetssd.quantize.twn import LATENT_SUFFIX, ternarize

    weight = state.get(conv_name + LATENT_SUFFIX, state.get(conv_name + ".weight"))
    if weight is None:
        raise ValueError(f"checkpoint has no weight for {conv_name}")
    codes, alpha = ternarize(weight)
    return codes.numpy().astype(np.int8), alpha.double().numpy()


class _Calibrator:
    """Activation ranges of the tensors the program quantizes, over the calibration images: per channel for the
    backbone stages (their scales are per channel, docs/dsp.md §3.1), per tensor for the input and L2Norm."""

    def __init__(self, net: PFJetSSD, percentile: float) -> None:
        self.net = net
        self.percentile = percentile
        self.samples: dict[str, list[NDArray[np.float32]]] = {}
        self.handles: list[Any] = []
        self.pre_sums: dict[str, NDArray[np.float64]] = {}
        self.pre_counts: dict[str, int] = {}
        for idx in range(SOURCE1_INDEX + 1):
            block = net.backbone[idx]
            if isinstance(block, ConvBN | ConvDW):
                for name, _conv, bn, act, _dw in _stages(idx, block):
                    self._watch(name, act)
                    self._watch_mean(name, bn)
        self._watch("l2norm", _child(net.source1, "l2norm"))
        self._watch("input", net.normalise)

    def _watch_mean(self, key: str, module: nn.Module) -> None:
        """Per-channel sum and count of a stage's pre-activation (its BN output), for the bias correction."""
        def hook(_m: nn.Module, _args: Any, out: torch.Tensor) -> None:
            sums = out.detach().double().sum(dim=(0, 2, 3)).numpy()
            self.pre_sums[key] = self.pre_sums.get(key, 0.0) + sums
            self.pre_counts[key] = self.pre_counts.get(key, 0) + out.shape[0] * out.shape[2] * out.shape[3]
        self.handles.append(module.register_forward_hook(hook))

    def pre_activation_means(self) -> dict[str, NDArray[np.float64]]:
        """{stage: mean pre-activation per channel [C]} over the calibration images (after :meth:`run`)."""
        return {key: self.pre_sums[key] / self.pre_counts[key] for key in self.pre_sums}

    def _watch(self, key: str, module: nn.Module) -> None:
        def hook(_m: nn.Module, _args: Any, out: torch.Tensor) -> None:
            # [C, values]: a regular stride through each channel, plus its maximum.
            flat = out.detach().abs().transpose(0, 1).reshape(out.shape[1], -1).numpy()
            step = max(1, flat.shape[1] * flat.shape[0] // CALIBRATION_SAMPLE)
            self.samples.setdefault(key, []).append(np.concatenate([flat[:, ::step], flat.max(1, keepdims=True)], 1))
        self.handles.append(module.register_forward_hook(hook))

    def run(self, images: NDArray[np.float32]) -> dict[str, NDArray[np.float64]]:
        """{tensor: range}, a [C] array per backbone stage, a [1] array for "input" and "l2norm"."""
        with torch.no_grad():
            for first in range(0, len(images), CALIBRATION_BATCH):
                self.net(torch.from_numpy(images[first:first + CALIBRATION_BATCH]))
        for h in self.handles:
            h.remove()
        out = {}
        for key, parts in self.samples.items():
            values = np.concatenate(parts, axis=1)
            if key in ("input", "l2norm"):
                values = values.reshape(1, -1)
            # The input keeps its maximum: a percentile of a mostly-empty image would clip the jet cores' pT.
            q = 100.0 if key == "input" else self.percentile
            # Percentile of the non-zero values: zero is exact at any scale, and a channel that fires only in
            # jet cores would otherwise get the range of its empty pixels and clip exactly the jets.
            out[key] = np.array([np.percentile(row[row > 0], q) if (row > 0).any() else 0.0 for row in values])
        return out


def _scale(maximum: NDArray[np.float64] | float, activation: str) -> NDArray[np.float64]:
    """Scale(s) of an activation range: range / 255 (u8, after ReLU) or / 127 (s8)."""
    qmax = 255 if activation == "relu" else 127
    return np.maximum(np.asarray(maximum, np.float64), 1e-6) / qmax


def _acc_bound(name: str, w_q: NDArray[np.int8], bias_q: NDArray[np.integer[Any]], in_max: int) -> int:
    """Overflow bound of a conv's accumulator, max over channels of Σ|w_q| · max|x_q| + |bias|; ValueError when it
    could leave int32."""
    per_channel = np.abs(w_q.astype(np.int64)).reshape(len(w_q), -1).sum(axis=1) * in_max
    worst = int((per_channel + np.abs(bias_q.astype(np.int64))).max())
    if worst > INT32_MAX:
        raise ValueError(f"{name}: accumulator may overflow int32 (bound {worst})")
    return worst


def _conv_op(name: str, weight_real: NDArray[np.float64], bias_real: NDArray[np.float64],
             s_in: NDArray[np.float64], activation: str, s_out: NDArray[np.float64] | None, *,
             ternary: tuple[NDArray[np.int8], NDArray[np.float64]] | None, groups: int, circular_phi: bool,
             in_max: int, prelu: NDArray[np.float64] | None = None) -> dict[str, Any]:
    """A conv op. ``s_in`` [C_in] and ``s_out`` [C_out] are per-channel activation scales (None: raw int32 output,
    dequantised on the host).

    The accumulator of output o counts in units ``acc_scale[o]``: for a dense conv the input scales are folded
    into the weights before their per-output-channel int8 quantization (W'[o, c] = W[o, c] · s_in[c],
    ``acc_scale[o]`` = max|W'[o]| / 127), which keeps the MAC a plain integer product; for the ternary depthwise
    conv ``acc_scale[o]`` = α_o · s_in[o]. Bias int32 at ``acc_scale``, requantisation multiplier
    ``acc_scale / s_out`` per output channel."""
    c_out = weight_real.shape[0]
    s_in = np.broadcast_to(np.asarray(s_in, np.float64), (weight_real.shape[1] * groups,))
    if ternary is not None:
        codes, scale = ternary
        w_q = codes.astype(np.int8)
        acc_scale = scale * s_in
        fmt = "ternary"
    else:
        folded = weight_real * s_in.reshape(1, -1, 1, 1)
        absmax = np.abs(folded).reshape(c_out, -1).max(axis=1)
        acc_scale = np.where(absmax > 0, absmax / 127.0, 1.0)
        w_q = np.clip(_round_away(folded / acc_scale.reshape(-1, 1, 1, 1)), -127, 127).astype(np.int8)
        fmt = "int8"
    bias_q = _round_away(bias_real / acc_scale)
    worst = _acc_bound(name, w_q, bias_q, in_max)
    k = weight_real.shape[-1]
    op: dict[str, Any] = {
        "kind": "conv", "name": name, "kernel": int(k), "groups": int(groups), "circular_phi": bool(circular_phi),
        "c_in": int(weight_real.shape[1] * groups), "c_out": int(c_out), "weight_format": fmt,
        "weight": w_q, "bias": bias_q.astype(np.int32), "acc_scale": acc_scale.astype(np.float64),
        "in_scale": s_in.astype(np.float64).copy(), "activation": activation, "acc_bound": worst, "in_max": in_max,
    }
    if s_out is None:
        op["activation"] = "raw"
        op["dequant"] = acc_scale.astype(np.float64)
        return op
    s_out = np.broadcast_to(np.asarray(s_out, np.float64), (c_out,))
    op["out_scale"] = s_out.copy()
    op["multiplier"], op["shift"] = _requant_arrays(acc_scale / s_out)
    if activation == "prelu":
        assert prelu is not None
        op["neg_multiplier"], op["neg_shift"] = _requant_arrays(acc_scale * prelu / s_out)
    return op


def compile_twn(checkpoint: Path, calibration_events: Sequence[SparsePixels],
                image_shape: tuple[int, int] = (340, 360), percentile: float = DEFAULT_PERCENTILE,
                bias_correction: bool = True) -> Program:
    """The DSP program of a TWN checkpoint (``compress.twn_layers = "depthwise"``), activation scales calibrated
    as max |x| over ``calibration_events`` (rasterized with the shared rasterizer)."""
    from jetssd.rasterize import densify_batch

    if not calibration_events:
        raise ValueError("calibration_events is empty")
    checkpoint = Path(checkpoint)
    net, state, _config = load_twn(checkpoint)
    cfg = net.config
    if cfg.normalisation != "log1p":
        raise ValueError("the DSP contract needs normalisation = log1p")
    if cfg.activation not in ("relu", "prelu", "leaky_relu"):
        raise ValueError(f"activation {cfg.activation!r} has no fixed-point form in the contract")
    act = "relu" if cfg.activation == "relu" else "prelu"
    images = densify_batch(list(calibration_events))
    calibrator = _Calibrator(net, percentile)
    maxima = calibrator.run(images)

    def slopes(module: nn.Module, channels: int) -> NDArray[np.float64] | None:
        if act != "prelu":
            return None
        if isinstance(module, nn.PReLU):
            w = module.weight.detach().double().numpy()
            return np.broadcast_to(w, (channels,)).copy()
        return np.full(channels, float(getattr(module, "negative_slope", 0.25)))

    s_in = float(_scale(maxima["input"], "relu")[0])
    thresholds = np.expm1((np.arange(1, 256, dtype=np.float64) - 0.5) * s_in).astype(np.float32)
    ops: list[dict[str, Any]] = [{"kind": "input", "scale": s_in, "thresholds": thresholds}]
    s = np.full(3, s_in)
    last_stage = _stages(SOURCE1_INDEX, net.backbone[SOURCE1_INDEX])[-1][0]
    x_max = 255
    for idx in range(SOURCE1_INDEX + 1):
        block = net.backbone[idx]
        if idx in POOL_INDICES:
            ops.append({"kind": "avgpool", "name": f"backbone.{idx}", "kernel": 2, "stride": 2, "padding": 1})
            continue
        assert isinstance(block, ConvBN | ConvDW)
        for name, conv, bn, act_module, is_dw in _stages(idx, block):
            key = name
            f = fold_factor(bn).detach().double().numpy()
            assert bn.running_mean is not None
            bias = (bn.bias.detach().double().numpy() - bn.running_mean.double().numpy() * f)
            # Per-channel output scales, except into L2Norm, whose Σ q_c² needs one scale for all channels.
            s_out = _scale(maxima[key].max() if name == last_stage else maxima[key], act)
            ternary = None
            if is_dw:
                codes, alpha = _ternary_of(state, name)
                eff = alpha * f
                sign = np.where(eff < 0, -1, 1).astype(np.int8)
                scale = np.where(eff != 0, np.abs(eff), 1.0)
                codes = (codes * sign.reshape(-1, 1, 1, 1) * (eff != 0).reshape(-1, 1, 1, 1)).astype(np.int8)
                ternary = (codes, scale)
                weight = codes.astype(np.float64) * scale.reshape(-1, 1, 1, 1)
            else:
                weight = conv.weight.detach().double().numpy() * f.reshape(-1, 1, 1, 1)
            ops.append(_conv_op(name, weight, bias, s, act, s_out, ternary=ternary, groups=conv.groups,
                                circular_phi=cfg.circular_phi, in_max=x_max,
                                prelu=slopes(act_module, conv.out_channels)))
            s = s_out
            x_max = 255 if act == "relu" else 128
    # L2Norm: y_c = w_c · q_c / ‖q‖ (the input scale cancels); output int8 with the calibrated scale.
    channels = cfg.source_widths[0]
    in_qmax = 255 if act == "relu" else 128
    g = L2_SQRT_SHIFT_MAX
    while g > 0 and channels * in_qmax**2 * 2**g > INT32_MAX:
        g -= 2
    s_y = float(_scale(maxima["l2norm"], "none")[0])
    w_l2 = cast(Tensor, _child(net.source1, "l2norm").weight).detach().double().numpy()
    unit = 2.0 ** (30 - g // 2)  # t_c = q_c · inv ≈ unit · q_c / ‖q‖
    mult, shift = _requant_arrays(w_l2 / (s_y * unit))
    ops.append({"kind": "l2norm", "name": "source1.l2norm", "sqrt_shift": int(g), "multiplier": mult,
                "shift": shift, "weight": w_l2, "out_scale": float(s_y)})
    # ECA: int8 1-D kernel, z index multiplier for the source map size, Q15 sigmoid LUT.
    h, w = image_shape
    for _ in range(3):
        h, w = h // 2 + 1, w // 2 + 1
    e_real = cast(Tensor, _child(_child(net.source1, "eca"), "conv").weight).detach().double().numpy().reshape(-1)
    s_e = max(float(np.abs(e_real).max()), 1e-12) / 127.0
    e_q = np.clip(_round_away(e_real / s_e), -127, 127).astype(np.int8)
    z_mult, z_shift = quantize_multiplier(s_e * s_y / (h * w) / ECA_Z_STEP)
    lut_z = (np.arange(256) - 128) * ECA_Z_STEP
    lut = np.floor(2**LUT_FRAC_BITS / (1.0 + np.exp(-lut_z)) + 0.5).astype(np.uint16)
    ops.append({"kind": "eca", "name": "source1.eca", "weight": e_q, "weight_scale": float(s_e),
                "map_shape": [int(h), int(w)], "z_multiplier": int(z_mult), "z_shift": int(z_shift),
                "z_step": ECA_Z_STEP, "lut": lut, "lut_frac_bits": LUT_FRAC_BITS})
    # Heads: loc (2) + cls (4) + reg (1) as one conv with bias, raw int32 output.
    head = net.head1
    parts: list[tuple[str, nn.Conv2d]] = [("loc", head.loc), ("cls_logits", head.cls), ("reg", head.reg)]
    weight = np.concatenate([c.weight.detach().double().numpy() for _, c in parts])
    bias = np.concatenate([c.bias.detach().double().numpy() for _, c in parts if c.bias is not None])
    op = _conv_op("head1", weight, bias, np.array([s_y]), "none", None, ternary=None, groups=1,
                  circular_phi=cfg.circular_phi, in_max=128)
    op["outputs"] = [[n, int(c.out_channels)] for n, c in parts]
    ops.append(op)
    from jetssd.export import sha256_file

    meta: dict[str, Any] = {
        "checkpoint": {"file": checkpoint.name, "sha256": sha256_file(checkpoint)}, "network": cfg.to_dict(),
        "image_shape": list(image_shape),
        "calibration": {"events": len(calibration_events),
                        "method": f"percentile {percentile} of the non-zero |x| per channel (float TWN)"
                                  + (", then bias correction" if bias_correction else ""),
                        "ranges": {key: value.tolist() for key, value in maxima.items()}},
        "source_shape": [int(h), int(w)]}
    program = Program(ops=ops, metadata=meta)
    if bias_correction:
        meta["calibration"]["bias_correction"] = correct_biases(program, images, calibrator.pre_activation_means())
    return program


def correct_biases(program: Program, images: NDArray[np.float32], float_means: dict[str, NDArray[np.float64]]
                   ) -> dict[str, float]:
    """Empirical bias correction (Nagel et al. 2019, "Data-free quantization", §4.2), layer by layer in place.

    Quantization, mostly the clipping of the rare large activations, shifts the mean of the next layers'
    pre-activations. For each backbone conv in order, the emulator's mean accumulator per channel (in real units,
    acc · acc_scale, over ``images`` run through the already corrected program) is compared with the float
    network's mean pre-activation, and the int32 bias is moved by the difference, rounded to the accumulator grid.
    Returns {layer: mean |shift| in accumulator LSBs}. Holds one layer's codes of all ``images`` at a time
    (float32, ~14 MB per event at the first layer: 200 events ≈ 3 GB).
    """
    from jetssd.dsp import fast

    batches = [fast.quantize_input(program.ops[0], images[i:i + CALIBRATION_BATCH])
               for i in range(0, len(images), CALIBRATION_BATCH)]
    shifts: dict[str, float] = {}
    for op in program.ops[1:]:
        kind = op["kind"]
        if kind == "conv" and op["name"] in float_means:
            raw = {**op, "activation": "raw"}
            total = np.zeros(op["c_out"])
            count = 0
            for x in batches:
                acc = fast.conv(raw, x)
                total += acc.sum(axis=(0, 2, 3)) * op["acc_scale"]
                count += acc.shape[0] * acc.shape[2] * acc.shape[3]
            delta = np.rint((total / count - float_means[op["name"]]) / op["acc_scale"]).astype(np.int64)
            bias = op["bias"].astype(np.int64) - delta
            op["acc_bound"] = _acc_bound(op["name"], op["weight"], bias, op["in_max"])
            op["bias"] = bias.astype(np.int32)
            op["bias_correction"] = (-delta).astype(np.int32)  # kept for checks: bias − this = the folded bias
            shifts[op["name"]] = float(np.abs(delta).mean())
        if kind == "l2norm":  # the corrected part ends at the backbone
            break
        step = {"conv": lambda x, op=op: fast.conv(op, x), "avgpool": fast.avgpool}[kind]
        batches = [step(x) for x in batches]
    return shifts
