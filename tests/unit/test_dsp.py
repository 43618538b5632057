"""DSP fixed-point emulation (jetssd.dsp, contract docs/dsp.md): requantisation rounding and saturation by hand,
the 2-bit packing and program round trips, reference == fast executor bit for bit (a synthetic program built to
saturate, and the shipped TWN compiled and run on real generated events), and the compiled program's float
re-interpretation against the TWN model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from jetssd.dsp import fast, reference
from jetssd.dsp.arith import quantize_multiplier, requantize, requantize_scalar
from jetssd.dsp.program import FORMAT, Program, pack_ternary, unpack_ternary

SHIPPED_TWN = Path(__file__).resolve().parents[2] / "models" / "twn-relu-h200" / "best.pt"

# ----------------------------------------------------------------------------------------- requantisation

# (acc, M, shift, lo, hi, expected) computed by hand: M = 2^30 with shift 31 is × 0.5, shift 30 is × 1.
HALF, ONE = (1 << 30, 31), (1 << 30, 30)
CASES = [
    (5, *HALF, -128, 127, 3),  # 2.5 → 3 (half away from zero)
    (-5, *HALF, -128, 127, -3),  # −2.5 → −3
    (3, *HALF, -128, 127, 2),  # 1.5 → 2
    (-3, *HALF, -128, 127, -2),
    (1, *HALF, -128, 127, 1),  # 0.5 → 1
    (-1, *HALF, -128, 127, -1),
    (2, *HALF, -128, 127, 1),  # exact
    (0, *HALF, -128, 127, 0),
    (5, 3 << 29, 31, -128, 127, 4),  # 5 · 0.75 = 3.75 → 4
    (-7, 3 << 29, 31, -128, 127, -5),  # −5.25 → −5
    (127, *ONE, -128, 127, 127),
    (128, *ONE, -128, 127, 127),  # saturation
    (-129, *ONE, -128, 127, -128),
    (-1000, *ONE, 0, 255, 0),  # ReLU
    (300, *ONE, 0, 255, 255),
    (255, *ONE, 0, 255, 255),
    (511, *HALF, 0, 255, 255),  # 255.5 → 256 → saturates
    (509, *HALF, 0, 255, 255),  # 254.5 → 255
    (7, 3, 0, -(2**31), 2**31 - 1, 21),  # shift 0: plain product
    (2**31 - 1, 2**31 - 1, 62, -128, 127, 1),  # (2^31 − 1)² / 2^62 ≈ 1 − 2^−30: largest product
    (-(2**31), 2**31 - 1, 62, -128, 127, -1),
    (3, 1 << 30, 33, -128, 127, 0),  # 0.375 → 0
    (-4, 1 << 30, 33, -128, 127, -1),  # −0.5 → −1
    (-2, 1 << 30, 33, -128, 127, 0),  # −0.25 → 0
]


@pytest.mark.parametrize(("acc", "mult", "shift", "lo", "hi", "expected"), CASES)
def test_requantize_by_hand(acc: int, mult: int, shift: int, lo: int, hi: int, expected: int) -> None:
    assert requantize_scalar(acc, mult, shift, lo, hi) == expected
    assert int(requantize(np.array([acc]), mult, shift, lo, hi)[0]) == expected
    assert int(fast.requantize_fast(np.array([acc]), mult, shift, lo, hi)[0]) == expected


def test_requantize_vectorised_equals_scalar() -> None:
    rng = np.random.default_rng(0)
    acc = np.concatenate([rng.integers(-(2**31), 2**31, 2000), rng.integers(-600, 600, 2000),
                          [-(2**31), 2**31 - 1, 0, 1, -1]])
    mult = rng.integers(-(2**31) + 1, 2**31, acc.size)
    shift = rng.integers(0, 63, acc.size)
    want = [requantize_scalar(int(a), int(m), int(s), -128, 127) for a, m, s in zip(acc, mult, shift, strict=True)]
    np.testing.assert_array_equal(requantize(acc, mult, shift, -128, 127), want)
    np.testing.assert_array_equal(fast.requantize_fast(acc, mult, shift, -128, 127), want)


def test_quantize_multiplier() -> None:
    assert quantize_multiplier(0.5) == (1 << 30, 31)
    assert quantize_multiplier(1.0) == (1 << 30, 30)
    assert quantize_multiplier(0.75) == (3 << 29, 31)
    assert quantize_multiplier(-0.25) == (-(1 << 30), 32)
    assert quantize_multiplier(1.0 - 2.0**-40) == (1 << 30, 30)  # mantissa rounds up to 2^31: renormalised
    assert quantize_multiplier(0.0) == (0, 0)
    assert quantize_multiplier(2.0**-40) == (0, 0)  # shift would exceed 62
    for real in (1e-3, 0.123456, 3.7, 1234.5):
        m, s = quantize_multiplier(real)
        assert 2**30 <= m < 2**31
        assert 0 <= s <= 62
        assert abs(m * 2.0**-s - real) <= real * 2.0**-31
    with pytest.raises(ValueError, match="too large"):
        quantize_multiplier(2.0**32)


def test_avgpool_padded_zeros_counted() -> None:
    x = np.array([[[[1, 2, 3], [4, 5, 6], [7, 8, 9]], [[-2, 0, 0], [0, 0, 0], [0, 0, -6]]]], np.int64)
    # out[i, j] = round_half_away(Σ X[2i−1 .. 2i, 2j−1 .. 2j] / 4), out of range = 0 but counted.
    want = np.array([[[[0, 1], [3, 7]], [[-1, 0], [0, -2]]]])  # 1/4, 5/4, 11/4, 28/4; −2/4, −6/4
    np.testing.assert_array_equal(fast.avgpool(x), want)
    np.testing.assert_array_equal(reference.avgpool(x[0]), want[0])


# ----------------------------------------------------------------------------------------------- packing


def test_pack_ternary_layout_and_round_trip() -> None:
    assert pack_ternary(np.array([1, -1, 0, 1])).tolist() == [0b01_00_11_01]
    assert pack_ternary(np.array([-1])).tolist() == [0b11]
    rng = np.random.default_rng(1)
    for shape in ((29, 1, 3, 3), (7,), (1, 1, 1, 1), (5, 2, 3)):
        codes = rng.integers(-1, 2, shape).astype(np.int8)
        packed = pack_ternary(codes)
        assert packed.dtype == np.uint8
        assert packed.size == -(-codes.size // 4)
        np.testing.assert_array_equal(unpack_ternary(packed, shape), codes)
    with pytest.raises(ValueError, match="0b10"):
        unpack_ternary(np.array([0b10], np.uint8), (1,))
    with pytest.raises(ValueError, match="must lie in"):
        pack_ternary(np.array([2]))


# ------------------------------------------------------------------------------ a synthetic saturating net


def _synthetic_program(rng: np.random.Generator, activation: str) -> Program:
    """A small random program of every op kind, its multipliers chosen so that a good part of each layer
    saturates (the corner cases the real network rarely reaches)."""
    def requant(c: int, lo: float, hi: float) -> tuple[np.ndarray, np.ndarray]:
        pairs = [quantize_multiplier(float(v)) for v in rng.uniform(lo, hi, c)]
        return np.array([p[0] for p in pairs], np.int32), np.array([p[1] for p in pairs], np.int32)

    def conv(name: str, c_in: int, c_out: int, k: int, groups: int, act: str, ternary: bool) -> dict[str, Any]:
        shape = (c_out, c_in // groups, k, k)
        w = rng.integers(-1, 2, shape) if ternary else rng.integers(-127, 128, shape)
        op: dict[str, Any] = {"kind": "conv", "name": name, "kernel": k, "groups": groups, "circular_phi": True,
                              "c_in": c_in, "c_out": c_out, "weight_format": "ternary" if ternary else "int8",
                              "weight": w.astype(np.int8), "bias": rng.integers(-3000, 3000, c_out).astype(np.int32),
                              "activation": act, "acc_bound": int(np.abs(w).reshape(c_out, -1).sum(1).max()) * 255}
        if act != "raw":
            op["multiplier"], op["shift"] = requant(c_out, 0.002, 0.2)
        if act == "prelu":
            op["neg_multiplier"], op["neg_shift"] = requant(c_out, -0.05, 0.05)
        return op

    h, w = 10, 13
    ops: list[dict[str, Any]] = [
        {"kind": "input", "scale": 0.03, "thresholds": np.expm1((np.arange(1, 256) - 0.5) * 0.03).astype(np.float32)},
        conv("c0", 3, 6, 3, 1, activation, False),
        {"kind": "avgpool", "name": "p1"},
        conv("dw", 6, 6, 3, 6, activation, True),
        conv("pw", 6, 5, 1, 1, activation, False),
    ]
    m, s = requant(5, 2.0**-8, 2.0**-5)
    ops.append({"kind": "l2norm", "name": "l2", "sqrt_shift": 8, "multiplier": m, "shift": s})
    zm, zs = quantize_multiplier(0.01)
    lut = np.floor(2**15 / (1 + np.exp(-(np.arange(256) - 128) / 16)) + 0.5).astype(np.uint16)
    ops.append({"kind": "eca", "name": "eca", "weight": np.array([-90, 127, 40], np.int8), "map_shape": [h // 2 + 1,
                w // 2 + 1], "z_multiplier": zm, "z_shift": zs, "lut": lut, "lut_frac_bits": 15})
    head = conv("head", 5, 7, 3, 1, "raw", False)
    head["dequant"] = np.full(7, 0.01)
    head["outputs"] = [["loc", 2], ["cls_logits", 4], ["reg", 1]]
    ops.append(head)
    return Program(ops=ops, metadata={"image_shape": [h, w]})


@pytest.mark.parametrize("activation", ["relu", "prelu"])
def test_reference_equals_fast_synthetic_saturating(activation: str, tmp_path: Path) -> None:
    rng = np.random.default_rng(7 if activation == "relu" else 8)
    program = Program.load(_synthetic_program(rng, activation).save(tmp_path / "p.npz"))
    images = (rng.exponential(2.0, (3, 3, 10, 13)) * (rng.random((3, 3, 10, 13)) < 0.5)).astype(np.float32)
    images[0, 0, 0, 0] = 1e6  # far beyond the input range
    got = fast.run(program, images)
    for i in range(len(images)):
        np.testing.assert_array_equal(reference.run(program, images[i]), got[i])
    x = fast.quantize_input(program.ops[0], images)
    assert x[0, 0, 0, 0] == 255
    first = fast.conv(program.ops[1], x)
    lo, hi = (0, 255) if activation == "relu" else (-128, 127)
    assert (first == hi).mean() > 0.05  # both saturation ends exercised
    assert (first == lo).mean() > 0.05


@pytest.mark.parametrize("circular_phi", [True, False])
def test_sparse_scatter_and_gemm_paths_agree(circular_phi: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first conv takes the scatter kernel on a mostly-empty image and the im2col GEMM otherwise: same bits,
    at the φ seam (hits in the first and last columns) and at the η edges, and both equal the reference."""
    rng = np.random.default_rng(11)
    program = _synthetic_program(rng, "relu")
    program.ops[1]["circular_phi"] = circular_phi
    images = np.zeros((2, 3, 10, 13), np.float32)
    for y, x in ((0, 0), (9, 12), (4, 0), (5, 12), (3, 6)):
        images[:, :, y, x] = rng.exponential(20.0, (2, 3))
    x = fast.quantize_input(program.ops[0], images)
    assert 0 < np.count_nonzero(x) < fast.SPARSE_FRACTION * x.size * 4
    monkeypatch.setattr(fast, "SPARSE_FRACTION", 1.0)  # everything counts as sparse
    sparse = fast.conv(program.ops[1], x)
    monkeypatch.setattr(fast, "SPARSE_FRACTION", 0.0)  # nothing does
    dense = fast.conv(program.ops[1], x)
    np.testing.assert_array_equal(sparse, dense)
    np.testing.assert_array_equal(reference.conv(program.ops[1], x[0].astype(np.int64)), dense[0])


def test_workspace_reuse_gives_the_same_bits() -> None:
    rng = np.random.default_rng(12)
    program = _synthetic_program(rng, "prelu")
    images = (rng.exponential(2.0, (2, 3, 10, 13)) * (rng.random((2, 3, 10, 13)) < 0.5)).astype(np.float32)
    other = np.ascontiguousarray(images[::-1])
    workspace = fast.Workspace()
    first = fast.run(program, images, workspace)
    second = fast.run(program, other, workspace)  # overwrites every buffer of the first call
    np.testing.assert_array_equal(first, fast.run(program, images))
    np.testing.assert_array_equal(second, fast.run(program, other))


# ------------------------------------------------------------------------------------- the shipped TWN


@pytest.fixture(scope="module")
def twn_program(generated_events: list[Any], tmp_path_factory: pytest.TempPathFactory) -> Program:
    pytest.importorskip("torch")
    if not SHIPPED_TWN.is_file():
        pytest.skip("the shipped TWN checkpoint is not in this checkout")
    from jetssd.dsp.compile import compile_twn

    program = compile_twn(SHIPPED_TWN, generated_events[:4])
    return Program.load(program.save(tmp_path_factory.mktemp("dsp") / "program.npz"))


def test_program_file_round_trip(twn_program: Program, tmp_path: Path) -> None:
    path = twn_program.save(tmp_path / "again.npz")
    again = Program.load(path)
    assert again.metadata == twn_program.metadata
    for a, b in zip(again.ops, twn_program.ops, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            if isinstance(a[key], np.ndarray):
                np.testing.assert_array_equal(a[key], b[key])
                assert a[key].dtype == b[key].dtype
            else:
                assert a[key] == b[key]
    with np.load(path) as data:  # the ternary weights travel packed, 4 codes per byte
        dw = next(i for i, op in enumerate(twn_program.ops) if op.get("weight_format") == "ternary")
        assert data[f"{dw}.weight"].dtype == np.uint8
        assert data[f"{dw}.weight"].size == -(-twn_program.ops[dw]["weight"].size // 4)
        assert FORMAT.encode() in bytes(data["header"])


def test_reference_equals_fast_on_generated_events(twn_program: Program, generated_events: list[Any]) -> None:
    from jetssd.rasterize import densify_batch

    images = densify_batch(generated_events[4:6])
    got = fast.run(twn_program, images)
    assert got.shape == (2, 7, 44, 46)
    np.testing.assert_array_equal(reference.run(twn_program, images[0]), got[0])


def test_float_reinterpretation_matches_twn(twn_program: Program, generated_events: list[Any]) -> None:
    """Dequantised weights = the BN-folded TWN weights within half a quantisation step (ternary: exactly), and the
    emulated outputs stay within the stated end-to-end error of the float TWN (docs/dsp.md §7)."""
    import torch

    from jetssd.dsp.compile import load_twn
    from jetssd.model.layers import ConvBN, ConvDW
    from jetssd.quantize.qat import fold_factor
    from jetssd.rasterize import densify_batch

    net, _, _ = load_twn(SHIPPED_TWN)
    convs = {op["name"]: op for op in twn_program.ops if op["kind"] == "conv"}
    for idx, block in enumerate(net.backbone):
        stages = ([(f"backbone.{idx}", block.conv, block.bn)] if isinstance(block, ConvBN) else
                  [(f"backbone.{idx}.dw", block.dw, block.dw_bn), (f"backbone.{idx}.pw", block.pw, block.pw_bn)]
                  if isinstance(block, ConvDW) else [])
        for name, conv, bn in stages:
            op = convs[name]
            f = fold_factor(bn).detach().double().numpy()
            folded = conv.weight.detach().double().numpy() * f.reshape(-1, 1, 1, 1)
            bias = bn.bias.detach().double().numpy() - bn.running_mean.double().numpy() * f
            # W[o, c] ≈ w_q[o, c] · acc_scale[o] / in_scale[c] (depthwise: c = o), within half a weight step.
            acc_step = op["acc_scale"].reshape(-1, 1, 1, 1)
            in_scale = op["in_scale"].reshape(-1, 1, 1, 1) if op["groups"] > 1 else op["in_scale"].reshape(1, -1, 1, 1)
            deq = op["weight"].astype(np.float64) * acc_step / in_scale
            if op["weight_format"] == "ternary":
                np.testing.assert_allclose(deq, folded, rtol=1e-6, atol=1e-12)
            else:
                assert (np.abs(deq - folded) <= 0.5 * acc_step / in_scale + 1e-12).all(), name
            # The bias is the folded BN bias on the accumulator grid, plus the recorded bias correction (§5).
            folded_bias = op["bias"] - op.get("bias_correction", 0)
            assert (np.abs(folded_bias * op["acc_scale"] - bias) <= 0.5 * op["acc_scale"] + 1e-9).all(), name
    images = densify_batch(generated_events[4:6])
    with torch.no_grad():
        want = [t.numpy() for t in net(torch.from_numpy(images))]
    got = fast.run_float(twn_program, images)
    for name, a, b in zip(("loc", "cls_logits", "reg"), want, got, strict=True):
        assert a.shape == b.shape
        err = float(np.abs(a - b).mean())
        assert err <= 0.5, (name, err)  # the stated bound: docs/dsp.md §7 (post-training int8, no QAT)
    prob = [np.exp(z) / np.exp(z).sum(-1, keepdims=True) for z in (want[1], got[1])]
    assert float(np.abs(prob[0] - prob[1]).mean()) <= 0.03


def test_bias_correction_matches_the_float_mean_of_the_first_layer(twn_program: Program,
                                                                   generated_events: list[Any]) -> None:
    """After the correction, the first conv's mean pre-activation per channel over the calibration events equals the
    float network's to half an accumulator step (its input, the quantised image, is the same for both)."""
    import torch

    from jetssd.dsp.compile import load_twn
    from jetssd.rasterize import densify_batch

    images = densify_batch(generated_events[:4])  # the fixture's calibration events
    net, _, _ = load_twn(SHIPPED_TWN)
    seen: list[torch.Tensor] = []
    net.backbone[0].bn.register_forward_hook(lambda _m, _a, out: seen.append(out.detach().double()))
    with torch.no_grad():
        net(torch.from_numpy(images))
    float_mean = seen[0].mean(dim=(0, 2, 3)).numpy()  # the BN output: the pre-activation
    op = twn_program.ops[1]
    assert op["name"] == "backbone.0"
    assert np.abs(op["bias_correction"]).max() > 0  # the correction did move some biases
    acc = fast.conv({**op, "activation": "raw"}, fast.quantize_input(twn_program.ops[0], images))
    emulated_mean = acc.mean(axis=(0, 2, 3)) * op["acc_scale"]
    assert (np.abs(emulated_mean - float_mean) <= 0.5 * op["acc_scale"] + 1e-9).all()
    shifts = twn_program.metadata["calibration"]["bias_correction"]
    assert set(shifts) == {o["name"] for o in twn_program.ops if o["kind"] == "conv" and o["name"] != "head1"}


def test_latency_model_counts_the_graph_macs(twn_program: Program) -> None:
    import json

    from jetssd.dsp.latency import Assumptions, estimate, layer_costs

    meta = json.loads((Path(__file__).resolve().parents[2] / "model_repository" / "pfjet_ssd_twn" / "1" /
                       "metadata.json").read_text())
    result = estimate(twn_program)
    assert result["macs"] == meta["complexity"]["conv_macs"]  # the same graph as the exported TWN
    assert 0 < result["latency_ms"]["10_cores"] < result["latency_ms"]["1_core"]
    assert result["cycles"] == round(sum(r["cycles"] for r in layer_costs(twn_program)))
    faster = estimate(twn_program, Assumptions(clock_hz=2.0e9))
    assert faster["latency_ms"]["1_core"] == pytest.approx(result["latency_ms"]["1_core"] / 2)
    assert [r["shape"][1:] for r in layer_costs(twn_program)][-1] == [44, 46]


def test_dsp_detector_decodes_with_the_twn_metadata(twn_program: Program, generated_events: list[Any],
                                                    tmp_path: Path) -> None:
    from jetssd.dsp.detector import DspDetector

    model_dir = Path(__file__).resolve().parents[2] / "model_repository" / "pfjet_ssd_twn"
    detector = DspDetector(model_dir, twn_program.save(tmp_path / "program.npz"))
    (jets,) = detector.detect_pixels(generated_events[4:5])
    assert len(jets.label) == len(jets.score) == len(jets.pt)
    assert (np.diff(jets.score) <= 0).all()  # the shared post-processing: sorted by score


def test_non_finite_input_is_refused(tmp_path: Path) -> None:
    program = _synthetic_program(np.random.default_rng(3), "relu")
    image = np.zeros((1, 3, 10, 13), np.float32)
    image[0, 1, 2, 3] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        fast.run(program, image)
    with pytest.raises(ValueError, match="non-finite"):
        reference.run(program, image[0])


# ------------------------------------------------------------------------------------------ agreement


def _jets(*rows: tuple[int, float, float, float, float]) -> Any:
    from jetssd.postprocess import Detections

    label, score, eta, phi, pt = (np.array(c) for c in zip(*rows, strict=True)) if rows else ([],) * 5
    return Detections(label=np.asarray(label, np.int8), score=np.asarray(score, np.float32),
                      eta=np.asarray(eta, np.float32), phi=np.asarray(phi, np.float32), pt=np.asarray(pt, np.float32))


def test_agreement_by_hand() -> None:
    from jetssd.dsp.compare import agreement

    ref = [
        _jets((0, 0.9, 0.5, 3.13, 600.0), (1, 0.8, -1.0, 0.0, 400.0), (2, 0.3, 0.0, 1.0, 300.0)),
        _jets((0, 0.9, 0.5, 1.0, 600.0)),
        _jets((0, 0.9, 0.5, 1.0, 600.0)),
        _jets((0, 0.9, 0.5, 1.0, 600.0)),
        _jets(),
    ]
    other = [
        # same jets, listed in another order, the first across the φ seam (ΔR 0.0132); the score-0.3 jet is ignored
        _jets((1, 0.85, -1.0, 0.01, 404.0), (0, 0.7, 0.5, -3.14, 610.0)),
        _jets((1, 0.9, 0.5, 1.0, 600.0)),  # class changed
        _jets((0, 0.9, 0.5, 1.0, 680.0)),  # pT 13 % off
        _jets((0, 0.9, 0.5, 1.0, 600.0), (2, 0.6, 0.0, -2.0, 300.0)),  # an extra confident jet
        _jets((2, 0.4, 0.0, 0.0, 100.0)),  # only a low-score jet
    ]
    result = agreement(ref, other)
    assert result.events == 5
    assert result.identical == pytest.approx(2 / 5)  # events 0 and 4
    assert result.same_classes == pytest.approx(3 / 5)  # events 0, 2 and 4
    # pairs: event 0 (ΔR 2π − 6.27 = 0.0132, and 0.01), event 2 (0), event 3 (0); pT: 10/600, 4/400, 80/600, 0
    assert result.mean_abs_dr == pytest.approx((2 * np.pi - 6.27 + 0.01) / 4, abs=1e-6)
    assert result.mean_abs_pt_rel == pytest.approx((10 / 600 + 4 / 400 + 80 / 600) / 4, rel=1e-4)
    with pytest.raises(ValueError, match="4 others"):
        agreement(ref, other[:4])


def test_dsp_compare_cli_on_generated_events(generated_event_dir: Path, tmp_path: Path) -> None:
    """`jetssd dsp compare` on the shipped TWN and its committed program: AP of both from one matcher, the
    agreement, the latency model; and a clear error for a model without a program."""
    import json

    from typer.testing import CliRunner

    from jetssd.cli import app

    repository = Path(__file__).resolve().parents[2] / "model_repository"
    files = sorted(generated_event_dir.glob("*.h5"))
    out = tmp_path / "compare.json"
    args = ["dsp", "compare", "--model", str(repository / "pfjet_ssd_twn"), "--out", str(out)]
    result = CliRunner().invoke(app, [*args, *(a for f in files for a in ("--data", str(f)))])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["events"] == 6
    assert set(report["ap"]) == {"float", "dsp"}
    for summary in report["ap"].values():
        assert summary["events"] == 6
        assert 0.0 <= summary["ap"]["voc"] <= 1.0
    assert 0.0 <= report["agreement"]["identical_fraction"] <= report["agreement"]["same_classes_fraction"] <= 1.0
    assert report["latency_model"]["paper_ms"] == {"1_core": 8.5, "10_cores": 0.9}
    assert report["throughput_ratio_dsp_over_float"] > 0
    assert "AP (VOC) float" in result.output
    missing = CliRunner().invoke(app, ["dsp", "compare", "--model", str(repository / "pfjet_ssd_fpn"),
                                       "--data", str(files[0])])
    assert missing.exit_code != 0
    assert "no DSP program" in missing.output
