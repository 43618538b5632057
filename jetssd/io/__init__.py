"""HDF5 event files: the reference (Zenodo) layout and our own "jetssd" format, read and written.

Reading::

    with open_events("train0.h5") as f:          # ReferenceFile or NativeFile, detected from the file
        event = f[17]                             # random access (negative indices too)
        pixels = f.read_pixels(17)                # pixels only: the training fast path
        for chunk in f.iter_chunks(1000):         # streaming, one read per dataset per chunk
            ...

Writing (crash-safe: ``<path>.partial`` is renamed onto ``path`` only by a successful close)::

    with NativeWriter("gen.h5", generator_settings={"seed": 1}) as w:
        w.append(events)

Every problem with a file (missing, not HDF5, truncated, wrong layout) raises :class:`DatasetFormatError`
naming the file and, where one is at fault, the dataset.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from itertools import islice
from typing import Any, Literal

from jetssd.event import Event
from jetssd.io._common import DatasetFormatError, EventFile, EventWriter, decode_attr, h5_errors, open_h5
from jetssd.io.native import FORMAT_NAME, FORMAT_VERSION, PROCESS_NAMES, NativeFile, NativeWriter
from jetssd.io.reference import REFERENCE_DATASETS, ReferenceFile, ReferenceWriter

__all__ = [
    "FORMAT_VERSION",
    "PROCESS_NAMES",
    "REFERENCE_DATASETS",
    "DatasetFormatError",
    "EventFile",
    "EventWriter",
    "NativeFile",
    "NativeWriter",
    "ReferenceFile",
    "ReferenceWriter",
    "open_events",
    "write_events",
]


def open_events(path: str | os.PathLike[str]) -> ReferenceFile | NativeFile:
    """Open an event file in whichever format it is.

    Files whose root attribute ``format`` is ``"jetssd"`` open as :class:`NativeFile`; anything else must
    have the eleven reference datasets and opens as :class:`ReferenceFile`.
    """
    p = os.fspath(path)
    f = open_h5(p)
    try:
        with h5_errors(p):
            fmt = decode_attr(f.attrs.get("format"))
    finally:
        f.close()
    return NativeFile(p) if fmt == FORMAT_NAME else ReferenceFile(p)


def write_events(path: str | os.PathLike[str], events: Iterable[Event],
                 format: Literal["reference", "jetssd"] = "reference",
                 generator_settings: Mapping[str, Any] | None = None, attrs: Mapping[str, Any] | None = None,
                 *, overwrite: bool = False, batch_size: int = 1000) -> int:
    """Write ``events`` to ``path`` in one go; returns the number of events written.

    ``events`` may be any iterable (a generator is consumed in batches of ``batch_size``, so memory stays
    bounded). ``generator_settings`` is stored as the JSON root attribute ``generator_settings`` in both
    formats (the jetssd format always has it, ``{}`` when None; the reference format only when given).
    """
    writer: EventWriter
    if format == "jetssd":
        writer = NativeWriter(path, generator_settings or {}, attrs, overwrite=overwrite)
    elif format == "reference":
        extra = dict(attrs or {})
        if generator_settings is not None:
            extra["generator_settings"] = json.dumps(dict(generator_settings), sort_keys=True)
        writer = ReferenceWriter(path, extra, overwrite=overwrite)
    else:
        raise ValueError(f"unknown format {format!r}; expected 'reference' or 'jetssd'")
    with writer:
        it = iter(events)
        while batch := list(islice(it, batch_size)):
            writer.append(batch)
    return len(writer)
