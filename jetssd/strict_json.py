"""Strict JSON for reports and metadata: numpy values as Python ones, NaN/inf as null.

JSON has no NaN or infinity, and an AP can be undefined (no truth objects of a class), so every file the
project writes for people and programs to read goes through :func:`jsonable` and ``allow_nan=False``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from jetssd.atomic import write_text_atomic


def jsonable(obj: Any) -> Any:
    """``obj`` with numpy scalars/arrays as Python numbers/lists, tuples as lists, paths as strings and
    non-finite floats as None. Other types raise TypeError."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return jsonable(obj.item())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    if obj is None or isinstance(obj, str | int):  # bool is an int
        return obj
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def to_json(obj: Any, what: str, indent: int | None = None) -> str:
    """Strict JSON text of ``obj``; anything unconvertible is a ValueError naming ``what``."""
    try:
        return json.dumps(jsonable(obj), indent=indent, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what}: cannot be written as JSON ({e})") from e


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as strict, indented JSON to ``path`` atomically (:mod:`jetssd.atomic`)."""
    write_text_atomic(path, to_json(obj, str(path), indent=2) + "\n")
