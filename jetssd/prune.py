"""Network slimming for PFJet-SSD (reference §5), without ``torch_pruning``, never overwriting its input.

One pruning iteration of the reference's schedule (§5.3) is:

1. train with :func:`flop_regularizer` added to the training loss (an ops-weighted L1 penalty on BN γ that
   pushes the γ of cheap-to-lose channels towards 0);
2. :func:`select_channels`: per conv block, keep the channels whose |γ| clears max(mean − std, top-``cap``);
3. :func:`prune_model` / :func:`prune_checkpoint`: build the narrower network and copy the surviving weights.

Blocks are numbered b = 0 … 10 in the order of :attr:`NetConfig.widths <jetssd.model.config.NetConfig.widths>`,
i.e. reference indices :data:`CONV_BLOCK_INDICES` = idx 0, 2, 3, 4, 6, 7, 8, 10, 11, 13, 14. A block's output
channels are those of its *last* BN: the only BN of ``ConvBN`` (idx 0), the pointwise BN ``pw_bn`` of ``ConvDW``.

What pruning means here, exactly: in eval mode, ``prune_model(model, keep)`` computes the same function as
``model`` with the dropped channels' outputs forced to 0, up to float rounding. Dropping a channel removes its
conv/BN/PReLU rows, the next block's depthwise conv/BN/PReLU channel, the next pointwise conv's input column,
the L2Norm weight and the head input column. A zero input is not a zero output of the next depthwise BN, whose
bias and running mean make it the constant act(β − γ·μ/σ); that constant reaches the next pointwise conv, and we
fold it into that BN's running mean (the reference's ``torch_pruning`` drops it, changing the function even for
a channel with γ = β = 0). One exception: ECA's Conv1d (k = 3) mixes each source channel with its two
neighbours, so dropping a channel in the middle of a source changes its neighbours' gates; dropping leading or
trailing source channels is exact (the Conv1d zero-pads its ends). The reference has the same limitation.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor, nn

from jetssd.model.complexity import INPUT_SHAPE, conv_macs, count_parameters
from jetssd.model.config import N_BLOCKS, N_INFERENCE_BLOCKS, NetConfig
from jetssd.model.layers import ConvBN, ConvDW, PhiPad
from jetssd.model.network import POOL_INDICES, SOURCE1_INDEX, SOURCE2_INDEX, PFJetSSD

REFERENCE_STRENGTH = 1e-11
"""Strength of the reference's FLOP regulariser (``reg_strength``, §5.1)."""

CONV_BLOCK_INDICES: tuple[int, ...] = tuple(i for i in range(SOURCE2_INDEX + 1) if i not in POOL_INDICES)
"""Backbone (reference ``mobilenet``) index of conv block b = 0 … 10: (0, 2, 3, 4, 6, 7, 8, 10, 11, 13, 14)."""


def _reference_caps(c6: int, c_mid: int, c_last: int) -> list[int | None]:
    """One row of §5.3 on our 11 blocks: idx 0, 2, 3, 4 | 6 | 7, 8, 10, 11 | 13, 14."""
    return [32, 64, 128, 128, c6, c_mid, c_mid, c_mid, c_mid, c_last, c_last]


REFERENCE_CAPS: list[list[int | None]] = [
    _reference_caps(256, 512, 1024),  # = the unpruned widths: only the mean − std rule acts
    _reference_caps(230, 435, 845),
    _reference_caps(205, 358, 666),
    _reference_caps(179, 281, 487),
    _reference_caps(153, 204, 308),
    _reference_caps(128, 128, 128),  # the reference's active row; gives net-config-last.yml's 128s
]
"""The reference's six prune iterations (§5.3, ``jet-ssd-prune.py``'s ``max_channels`` minus the pools), each a
list of 11 per-block caps (``None`` = no cap). Each step goes about 1/5 of the way to 128."""

Keep = list[NDArray[np.int64]]
"""Per conv block b = 0 … 10: sorted indices of the output channels that survive."""


# --------------------------------------------------------------------------------------------------
# Model anatomy


def unwrap(model: nn.Module) -> PFJetSSD:
    """The :class:`PFJetSSD` inside DistributedDataParallel (``.module``) and/or ``torch.compile`` (``._orig_mod``)."""
    inner: nn.Module = model
    for _ in range(4):  # compile(DDP(model)) is the deepest nesting the trainer builds
        if isinstance(inner, PFJetSSD):
            return inner
        nxt = getattr(inner, "_orig_mod", None)
        if nxt is None:
            nxt = getattr(inner, "module", None)
        if not isinstance(nxt, nn.Module):
            break
        inner = nxt
    raise TypeError(f"expected a PFJetSSD (possibly wrapped in DDP / torch.compile), got {type(model).__name__}")


def conv_blocks(model: PFJetSSD) -> list[ConvBN | ConvDW | None]:
    """Conv block b = 0 … 10 of ``model``'s backbone; ``None`` for idx 13, 14 of an inference-only graph."""
    blocks: list[ConvBN | ConvDW | None] = []
    for idx in CONV_BLOCK_INDICES:
        block = model.backbone[idx] if idx < len(model.backbone) else None
        if block is not None and not isinstance(block, ConvBN | ConvDW):
            raise TypeError(f"backbone[{idx}]: expected a conv block, got {type(block).__name__}")
        blocks.append(block)
    return blocks


def output_bn(block: ConvBN | ConvDW) -> nn.BatchNorm2d:
    """The BN whose γ scales the block's output channels: ``bn`` (first block) or ``pw_bn`` (separable)."""
    bn = block.bn if isinstance(block, ConvBN) else block.pw_bn
    assert isinstance(bn, nn.BatchNorm2d)
    return bn


def _block_name(b: int) -> str:
    return f"backbone.{CONV_BLOCK_INDICES[b]}"


# --------------------------------------------------------------------------------------------------
# Regulariser (§5.1)


def block_flops(c_in: int, c_out: int, height: int, width: int, separable: bool) -> int:
    """The reference's cost F of one block with 'same' 3×3 geometry on an input of c_in × height × width.

    separable: C_in·H·W·(C_out + 9) + C_in·H·W (depthwise 9 + pointwise C_out MACs per input element, plus
    the activations); first block: C_in·H·W·(9·C_out) + C_in·H·W.
    """
    d = c_in * height * width
    return d * (c_out + 9) + d if separable else d * 9 * c_out + d


def regularizer_terms(model: nn.Module) -> list[tuple[nn.BatchNorm2d, int]]:
    """(output BN, F) of every inference block (idx 0 … 11) of ``model`` on a 3×340×360 image.

    F follows the reference: C_in and C_out are the current BN widths, H×W the block's input size, shrunk by
    each pool as n → ⌊n/2⌋ + 1 (340×360 → 171×181 → 86×91 → 44×46).
    """
    net = unwrap(model)
    c_in, height, width = INPUT_SHAPE[1:]
    terms: list[tuple[nn.BatchNorm2d, int]] = []
    for idx in range(SOURCE1_INDEX + 1):
        layer = net.backbone[idx]
        if idx in POOL_INDICES:
            height, width = height // 2 + 1, width // 2 + 1
            continue
        assert isinstance(layer, ConvBN | ConvDW)
        bn = output_bn(layer)
        terms.append((bn, block_flops(c_in, bn.num_features, height, width, isinstance(layer, ConvDW))))
        c_in = bn.num_features
    return terms


def flop_regularizer(model: nn.Module, strength: float = REFERENCE_STRENGTH) -> Tensor:
    """R = strength · Σ_blocks F_block · Σ_c |γ_c| over the inference blocks idx 0 … 11 (reference §5.1).

    Args:
        model: a :class:`PFJetSSD` (DDP / ``torch.compile`` wrappers are looked through).
        strength: the reference uses 1e-11; F is ~1e8–1e9 per block, so R is O(1)–O(10) on an unpruned network.

    Returns:
        A scalar float32 tensor on the model's device. F is a Python constant, so the gradient flows into the
        output BNs' γ only. Add R to the training loss only, not to the validation loss used for early
        stopping (the reference does; §10.17).
    """
    # Python ints/floats in double precision until the one multiplication per block: F·strength is O(1e-2).
    parts = [bn.weight.abs().sum() * (strength * flops) for bn, flops in regularizer_terms(model)]
    return torch.stack(parts).sum()


# --------------------------------------------------------------------------------------------------
# Channel selection (§5.2)


def select_block(gamma_abs: NDArray[np.floating[Any]] | Sequence[float], cap: int | None) -> NDArray[np.int64]:
    """Surviving channels of one block from g = |γ| [C]: sorted indices [C'] with 1 ≤ C' ≤ min(C, cap).

    thr = max(mean(g) − std(g), sorted_ascending(g)[C − min(C, cap)]) and channels with g ≥ thr survive, as
    in ``jet-ssd-prune.py`` (std with Bessel's correction, like ``torch.std``). Two guards the reference lacks:
    thr is clipped to max(g), so at least one channel survives even when rounding puts mean(g) above C equal
    values; and ties at thr never let more than ``cap`` channels through (the larger g wins, then the lower
    index), so a cap is a hard limit even for an untrained network whose γ are all 1.
    """
    g = np.asarray(gamma_abs, dtype=np.float64)
    if g.ndim != 1 or g.size == 0:
        raise ValueError(f"expected a non-empty 1-D |γ|, got shape {g.shape}")
    if not np.isfinite(g).all():
        raise ValueError("|γ| has NaN or inf: cannot select channels")
    if cap is not None and cap < 1:
        raise ValueError(f"cap: expected ≥ 1 or None, got {cap}")
    n = g.size
    thr = g.mean() - (g.std(ddof=1) if n > 1 else 0.0)
    if cap is not None:
        thr = max(thr, float(np.sort(g)[n - min(n, cap)]))
    keep = np.flatnonzero(g >= min(thr, g.max()))
    if cap is not None and keep.size > cap:
        order = np.argsort(-g[keep], kind="stable")  # descending |γ|, lower index first among ties
        keep = np.sort(keep[order[:cap]])
    return keep.astype(np.int64)


def select_channels(model: nn.Module, caps: Sequence[int | None]) -> Keep:
    """Surviving channels of the 11 conv blocks (idx 0, 2, 3, 4, 6, 7, 8, 10, 11, 13, 14) by :func:`select_block`.

    Args:
        model: a :class:`PFJetSSD`; g = |γ| of each block's output BN (training-only blocks 13, 14 included).
        caps: 11 per-block caps, ``None`` = no cap (only the mean − std rule), e.g. a row of
            :data:`REFERENCE_CAPS`.

    Returns:
        11 sorted int64 index arrays. Blocks an inference-only graph lacks (idx 13, 14) keep all their
        ``config.widths`` channels: there is no γ to judge them by.
    """
    net = unwrap(model)
    if len(caps) != N_BLOCKS:
        raise ValueError(f"caps: expected {N_BLOCKS} entries (one per conv block), got {len(caps)}")
    keep: Keep = []
    for b, (block, cap) in enumerate(zip(conv_blocks(net), caps, strict=True)):
        if block is None:
            keep.append(np.arange(net.config.widths[b], dtype=np.int64))
            continue
        gamma = output_bn(block).weight.detach().abs().to("cpu", torch.float64).numpy()
        keep.append(select_block(gamma, cap))
    return keep


# --------------------------------------------------------------------------------------------------
# Pruning the network


Plan = dict[str, tuple[Tensor | None, Tensor | None]]
"""Module name → (indices kept along dim 0 = output channels, along dim 1 = input channels); None = all."""


def _check_keep(net: PFJetSSD, keep: Sequence[NDArray[np.integer[Any]]]) -> Keep:
    """Validate ``keep`` against ``net``'s widths: 11 non-empty, strictly increasing, in-range index arrays."""
    if len(keep) != N_BLOCKS:
        raise ValueError(f"keep: expected {N_BLOCKS} index arrays, got {len(keep)}")
    checked: Keep = []
    for b, (k, width) in enumerate(zip(keep, net.config.widths, strict=True)):
        arr = np.asarray(k)
        if arr.ndim != 1 or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"keep[{b}]: expected a non-empty 1-D integer array, got {arr!r}")
        if arr[0] < 0 or arr[-1] >= width or (arr.size > 1 and not (np.diff(arr) > 0).all()):
            raise ValueError(f"keep[{b}]: expected strictly increasing indices in [0, {width})")
        checked.append(arr.astype(np.int64))
    return checked


def _slice_plan(net: PFJetSSD, keep: Keep, device: torch.device) -> Plan:
    """Which rows/columns of each layer survive: a block's outputs, the next block's inputs, sources, heads."""
    idx = [torch.as_tensor(k, device=device) for k in keep]
    plan: Plan = {}
    for b, block in enumerate(conv_blocks(net)):
        name = _block_name(b)
        if isinstance(block, ConvBN):
            for child in ("conv", "bn", "act"):  # input = the 3 image channels: all kept
                plan[f"{name}.{child}"] = (idx[b], None)
        elif isinstance(block, ConvDW):
            for child in ("dw", "dw_bn", "dw_act"):  # depthwise channels = the previous block's outputs
                plan[f"{name}.{child}"] = (idx[b - 1], None)
            plan[f"{name}.pw"] = (idx[b], idx[b - 1])
            for child in ("pw_bn", "pw_act"):
                plan[f"{name}.{child}"] = (idx[b], None)
    sources = [("source1", "head1", N_INFERENCE_BLOCKS - 1), ("source2", "head2", N_BLOCKS - 1)]  # b = 8, 10
    for source, head, b in sources:
        if getattr(net, head) is None:
            continue
        plan[f"{source}.l2norm"] = (idx[b], None)  # ECA's Conv1d (source.eca) is width-independent: copied
        for conv in ("loc", "cls", "reg"):
            plan[f"{head}.{conv}"] = (None, idx[b])  # output rows and bias stay, input columns shrink
    return plan


def _slice(tensor: Tensor, rows: Tensor | None, cols: Tensor | None) -> Tensor:
    """A new tensor with the kept rows (dim 0) and columns (dim 1); 0-D tensors and unsliced dims copied."""
    out = tensor.detach()
    sliced = False
    if rows is not None and out.ndim >= 1:
        out, sliced = out.index_select(0, rows), True
    if cols is not None and out.ndim >= 2:
        out, sliced = out.index_select(1, cols), True
    return out if sliced else out.clone()  # never share storage with the source model


@torch.no_grad()
def _zero_input_shift(block: ConvDW, dropped: NDArray[np.int64]) -> Tensor:
    """Pointwise-conv output [C_out] contributed by the dropped depthwise channels when their input is 0.

    A zero input map stays 0 through the depthwise conv (no bias, zero or circular padding), then the eval-mode
    BN makes it the constant z = β − γ·μ/√(σ² + ε) and the activation act(z); the 1×1 conv adds
    Σ_j W[o, j]·act(z_j) to output o at every pixel. float64 for the fold: it is subtracted from running means.
    """
    bn, act, pw = block.dw_bn, block.dw_act, block.pw
    assert isinstance(bn, nn.BatchNorm2d)
    assert isinstance(act, nn.Module)
    assert isinstance(pw, nn.Conv2d)
    assert bn.running_mean is not None
    assert bn.running_var is not None
    z = bn.bias - bn.weight * bn.running_mean / torch.sqrt(bn.running_var + bn.eps)  # [C_in]
    a = act(z.reshape(1, -1, 1, 1).clone()).reshape(-1)  # clone: some activations work in place
    d = torch.as_tensor(dropped, device=a.device)
    w = pw.weight[:, :, 0, 0].index_select(1, d).double()  # [C_out, |dropped|]
    return w @ a.index_select(0, d).double()


def _fold_dropped_inputs(net: PFJetSSD, keep: Keep, state: dict[str, Tensor]) -> None:
    """Fold each pruned channel's constant downstream contribution into the next ``pw_bn`` running mean.

    BN computes (y − μ)·γ/σ + β, so removing the constant s_o from y_o is undone by μ_o ← μ_o − s_o (in train
    mode the batch mean absorbs it by itself). Exact for channels whose output is 0; see the module docstring.
    """
    blocks = conv_blocks(net)
    for b in range(1, N_BLOCKS):
        block = blocks[b]
        if not isinstance(block, ConvDW):
            continue
        dropped = np.setdiff1d(np.arange(net.config.widths[b - 1]), keep[b - 1])
        if dropped.size == 0:
            continue
        shift = _zero_input_shift(block, dropped)
        shift = shift.index_select(0, torch.as_tensor(keep[b], device=shift.device))
        key = f"{_block_name(b)}.pw_bn.running_mean"
        state[key] = (state[key].double() - shift).to(state[key].dtype)


def _build_meta(config: NetConfig, training_head: bool) -> PFJetSSD:
    """A weightless (``meta`` device) network: no init cost and no draw from the global RNG."""
    with torch.device("meta"):
        return PFJetSSD(config, training_head=training_head)


def load_exact(model: PFJetSSD, state: dict[str, Tensor]) -> PFJetSSD:
    """Load ``state`` into a (meta) ``model`` by assignment after checking keys and shapes exactly."""
    expected = model.state_dict()
    if set(expected) != set(state):
        raise ValueError(f"state dict keys differ: missing {sorted(set(expected) - set(state))}, "
                         f"unexpected {sorted(set(state) - set(expected))}")
    for key, ref in expected.items():
        if tuple(ref.shape) != tuple(state[key].shape):
            raise ValueError(f"{key}: expected shape {tuple(ref.shape)}, got {tuple(state[key].shape)}")
    model.load_state_dict(state, strict=True, assign=True)
    return model


def prune_model(model: nn.Module, keep: Sequence[NDArray[np.integer[Any]]]) -> PFJetSSD:
    """A new, narrower :class:`PFJetSSD` holding the surviving weights of ``model`` (which is left untouched).

    Args:
        model: the network to prune (training or inference graph; DDP / compile wrappers looked through).
        keep: per conv block b = 0 … 10, the sorted output channels to keep (e.g. from :func:`select_channels`).
            For blocks an inference-only graph lacks, only the length matters (the new width).

    Returns:
        ``PFJetSSD(NetConfig(widths=[len(k) for k in keep], other fields equal), training_head=<same>)`` on the
        model's device, in the model's train/eval mode, with its ``inference_only`` and φ-wrap settings. With
        every channel kept it equals ``model`` bit for bit; otherwise it computes, in eval mode, ``model`` with
        the dropped channels zeroed (module docstring: exact but for ECA's neighbour mixing).
    """
    net = unwrap(model)
    checked = _check_keep(net, keep)
    device = next(net.parameters()).device
    plan = _slice_plan(net, checked, device)
    state: dict[str, Tensor] = {}
    for key, tensor in net.state_dict().items():
        rows, cols = plan.get(key.rsplit(".", 1)[0], (None, None))
        state[key] = _slice(tensor, rows, cols)
    _fold_dropped_inputs(net, checked, state)
    config = dataclasses.replace(net.config, widths=tuple(len(k) for k in checked))
    pruned = load_exact(_build_meta(config, net.head2 is not None), state)
    pruned.inference_only = net.inference_only
    wraps = [m.wrap for m in net.modules() if isinstance(m, PhiPad)]
    for m, wrap in zip((m for m in pruned.modules() if isinstance(m, PhiPad)), wraps, strict=True):
        m.wrap = wrap
    return pruned.train(net.training)


# --------------------------------------------------------------------------------------------------
# Checkpoints


def model_size(config: NetConfig) -> dict[str, dict[str, int]]:
    """Parameters and conv MACs per 340×360 event of the inference and training graphs of ``config``."""
    return {
        "params": {graph: count_parameters(_build_meta(config, graph == "training"))
                   for graph in ("inference", "training")},
        "conv_macs": {graph: conv_macs(config, training_head=graph == "training")
                      for graph in ("inference", "training")},
    }


def _refuse_overwrite(src: Path, dst: Path) -> None:
    """Raise FileExistsError when ``dst`` is ``src`` or exists at all (a dangling symlink counts)."""
    if dst.resolve() == src.resolve() or (dst.exists() and src.exists() and os.path.samefile(src, dst)):
        raise FileExistsError(f"{dst}: is the input checkpoint; pruning never overwrites its input")
    if os.path.lexists(dst):
        raise FileExistsError(f"{dst}: exists; pruning writes a new checkpoint and never overwrites one")


def _write_new(dst: Path, obj: dict[str, Any]) -> None:
    """``torch.save`` to a temp file beside ``dst``, then publish it only if ``dst`` still does not exist.

    ``os.link`` publishes atomically and fails if ``dst`` appeared meanwhile (no clobbering); on file systems
    without hard links we fall back to check-then-``os.replace`` (atomic, with a tiny check/rename race).
    """
    fd, name = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".partial")
    os.close(fd)
    tmp = Path(name)
    try:
        torch.save(obj, tmp)
        try:
            os.link(tmp, dst)
        except FileExistsError as err:
            raise FileExistsError(f"{dst}: appeared while pruning; not overwritten") from err
        except OSError:
            if os.path.lexists(dst):
                raise FileExistsError(f"{dst}: appeared while pruning; not overwritten") from None
            os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def load_model(state: dict[str, Any]) -> PFJetSSD:
    """The network of a loaded trainer checkpoint (CPU): config from ``state["config"]``, weights strict."""
    config = NetConfig.from_dict(json.loads(state["config"])["model"])
    weights: dict[str, Tensor] = state["model"]
    training_head = any(k.startswith("head2.") for k in weights)
    model = load_exact(_build_meta(config, training_head),
                       {k: v.clone() for k, v in weights.items()})  # own the tensors: assign keeps them
    return model.eval()


def prune_checkpoint(src: Path | str, dst: Path | str,
                     caps: Sequence[int | None]) -> tuple[tuple[int, ...], dict[str, Any]]:
    """Prune a trainer checkpoint into a new file (one iteration of §5.3); ``src`` is never modified.

    Args:
        src: a checkpoint of :func:`jetssd.train.trainer.save_checkpoint` (loaded with ``weights_only=True``).
        dst: the new checkpoint; FileExistsError if it is ``src`` or already exists. Written atomically.
        caps: 11 per-block caps for :func:`select_channels` (``None`` = mean − std rule only).

    Returns:
        (new widths, prune record). The new checkpoint keeps ``src``'s format and entries with ``"model"``
        pruned and ``"config"``'s ``model.widths`` updated; ``"optimizer"`` and ``"scheduler"`` are dropped
        (their moment buffers have the old shapes; fine-tuning starts a fresh optimizer via ``run.init``, so
        the checkpoint cannot be ``--resume``d). ``"prune"`` (JSON) lists this and any earlier prune records:
        source, caps, widths, kept channel indices, params and conv MACs before/after (inference and training
        graphs, :mod:`jetssd.model.complexity`).
    """
    from jetssd.train.trainer import load_checkpoint  # the trainer pulls in the data pipeline: import late

    src, dst = Path(src), Path(dst)
    _refuse_overwrite(src, dst)
    state = load_checkpoint(src)
    model = load_model(state)
    keep = select_channels(model, caps)
    pruned = prune_model(model, keep)
    before, after = model_size(model.config), model_size(pruned.config)
    record: dict[str, Any] = {
        "source": str(src),
        "caps": list(caps),
        "widths_before": list(model.config.widths),
        "widths_after": list(pruned.config.widths),
        "kept": [k.tolist() for k in keep],
        "params_before": before["params"],
        "params_after": after["params"],
        "conv_macs_before": before["conv_macs"],
        "conv_macs_after": after["conv_macs"],
    }
    config = json.loads(state["config"])
    config["model"]["widths"] = list(pruned.config.widths)
    out = {k: v for k, v in state.items() if k not in ("optimizer", "scheduler")}
    out["model"] = pruned.state_dict()
    out["config"] = json.dumps(config)
    out["prune"] = json.dumps([*json.loads(state.get("prune", "[]")), record])
    _write_new(dst, out)
    return pruned.config.widths, record
