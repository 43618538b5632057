"""The DSP program file (``docs/dsp.md`` §2): a ``.npz`` holding a JSON header and the layer arrays.

Numpy only. The header (UTF-8 JSON stored as the uint8 array ``header``) has ``format`` (= :data:`FORMAT`),
``ops`` (the layer list, in execution order) and free-form ``metadata``. Each op is a dict with ``kind`` and
its scalar parameters; its arrays are stored as ``"<index>.<name>"``. Ternary weights are stored packed
(:func:`pack_ternary`), everything else as the dtype it has on the DSP. Loaded with ``allow_pickle=False``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from numpy.typing import NDArray

FORMAT = "jetssd-dsp-program/1"
"""Format tag of the header; a reader refuses any other."""

_CODE_OF = {0: 0b00, 1: 0b01, -1: 0b11}
"""2-bit encoding of a ternary weight: 00 = 0, 01 = +1, 11 = −1 (two's complement); 10 is invalid."""


def pack_ternary(codes: NDArray[np.integer[Any]]) -> NDArray[np.uint8]:
    """Ternary codes (any shape, values in {−1, 0, 1}) → uint8 [⌈n/4⌉], 4 codes per byte, C order.

    Code i of the flattened array sits in byte i // 4 at bits 2·(i % 4) … 2·(i % 4) + 1 (first code in the
    low bits); the tail of the last byte is filled with 00 (zero codes).
    """
    flat = np.asarray(codes).reshape(-1).astype(np.int64)
    if flat.size and not np.isin(flat, (-1, 0, 1)).all():
        raise ValueError("ternary codes must lie in {-1, 0, 1}")
    two_bit = (flat & 0b11).astype(np.uint8)  # −1 → 0b11, 0 → 0b00, +1 → 0b01
    padded = np.zeros(-(-flat.size // 4) * 4, np.uint8)
    padded[: flat.size] = two_bit
    quads = padded.reshape(-1, 4)
    return (quads[:, 0] | (quads[:, 1] << 2) | (quads[:, 2] << 4) | (quads[:, 3] << 6)).astype(np.uint8)


def unpack_ternary(packed: NDArray[np.uint8], shape: tuple[int, ...]) -> NDArray[np.int8]:
    """Inverse of :func:`pack_ternary`: int8 codes of ``shape``. Raises ValueError on the invalid code 10."""
    n = int(np.prod(shape)) if shape else 1
    packed = np.asarray(packed, np.uint8)
    if packed.size != -(-n // 4):
        raise ValueError(f"packed ternary array has {packed.size} bytes, shape {shape} needs {-(-n // 4)}")
    two_bit = np.stack([(packed >> (2 * i)) & 0b11 for i in range(4)], axis=1).reshape(-1)[:n]
    if (two_bit == 0b10).any():
        raise ValueError("invalid 2-bit code 0b10 in a ternary weight array")
    codes = np.where(two_bit == 0b11, -1, two_bit.astype(np.int8)).astype(np.int8)
    return codes.reshape(shape)


@dataclass
class Program:
    """A compiled DSP program: ``ops`` (dicts of scalars and numpy arrays, execution order) and ``metadata``.

    Ternary weights live unpacked in memory (``weight`` int8 codes with ``weight_format = "ternary"``); they are
    packed only in the file.
    """

    ops: list[dict[str, Any]]
    metadata: dict[str, Any] = field(default_factory=dict)

    def save(self, path: str | Path) -> Path:
        """Write ``path`` (.npz, uncompressed); returns it."""
        path = Path(path)
        arrays: dict[str, NDArray[Any]] = {}
        header_ops = []
        for i, op in enumerate(self.ops):
            scalars: dict[str, Any] = {}
            names: dict[str, Any] = {}
            for key, value in op.items():
                if isinstance(value, np.ndarray):
                    if key == "weight" and op.get("weight_format") == "ternary":
                        arrays[f"{i}.{key}"] = pack_ternary(value)
                        names[key] = {"shape": list(value.shape), "dtype": "ternary2"}
                    else:
                        arrays[f"{i}.{key}"] = value
                        names[key] = {"shape": list(value.shape), "dtype": str(value.dtype)}
                else:
                    scalars[key] = value
            header_ops.append({**scalars, "arrays": names})
        header = {"format": FORMAT, "ops": header_ops, "metadata": self.metadata}
        arrays["header"] = np.frombuffer(json.dumps(header).encode(), np.uint8)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as f:
            np.savez(f, **arrays)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Program:
        """Read a program written by :meth:`save`; ValueError on another format or inconsistent arrays."""
        with np.load(Path(path), allow_pickle=False) as data:
            header = json.loads(bytes(data["header"]).decode())
            if header.get("format") != FORMAT:
                raise ValueError(f"{path}: not a {FORMAT} program (format {header.get('format')!r})")
            ops = []
            for i, entry in enumerate(header["ops"]):
                op = {k: v for k, v in entry.items() if k != "arrays"}
                for key, desc in entry["arrays"].items():
                    raw = data[f"{i}.{key}"]
                    shape = tuple(desc["shape"])
                    if desc["dtype"] == "ternary2":
                        op[key] = unpack_ternary(raw, shape)
                    else:
                        if raw.shape != shape or str(raw.dtype) != desc["dtype"]:
                            raise ValueError(f"{path}: array {i}.{key} is {raw.dtype}{raw.shape}, "
                                             f"header says {desc['dtype']}{shape}")
                        op[key] = raw
                ops.append(op)
        return cls(ops=ops, metadata=header.get("metadata", {}))


T = TypeVar("T")


def interpret(program: Program, images: Any, quantize_input: Callable[[dict[str, Any], Any], T],
              kernels: Mapping[str, Callable[..., T]]) -> T:
    """Run ``program``'s ops in order: the ``input`` op through ``quantize_input(op, images)``, then each op
    through ``kernels[kind]`` (``conv``/``l2norm``/``eca`` take ``(op, x)``, ``avgpool`` takes ``(x)``).

    The one op dispatcher of both executors (:mod:`jetssd.dsp.reference`, :mod:`jetssd.dsp.fast`): they differ
    only in their kernels. Raises ValueError on an unknown op kind or a program that does not start with input.
    """
    x: T | None = None
    for op in program.ops:
        kind = op["kind"]
        if kind == "input":
            x = quantize_input(op, images)
            continue
        if x is None:
            raise ValueError(f"op {kind!r} before the input op")
        if kind == "avgpool":
            x = kernels[kind](x)
        elif kind in kernels:
            x = kernels[kind](op, x)
        else:
            raise ValueError(f"unknown op {kind!r}")
    if x is None:
        raise ValueError("the program has no input op")
    return x
