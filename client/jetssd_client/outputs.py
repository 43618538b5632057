"""The ``reprocess`` output files written from a completed journal: ``.parquet`` and ``.h5``.

Both hold every event, those without jets included, in input order (file order on the command line, then
event index). Both are written to a temporary file beside the target and renamed onto it when complete.

Parquet (one table, one row per event; the jets are a nested list column)::

    id: string  ("<file stem>:<index>")   source: string (file stem)   index: int64   n_jets: int32
    jets: list<struct<label: string, score: double, eta: double, phi: double, pt: double>>

HDF5 (two tables, joined by row numbers)::

    /events/{id, source} vlen str, /events/{index, jet_start} int64, /events/n_jets int32
    /jets/event int64 (row in /events), /jets/label vlen str, /jets/{score, eta, phi, pt} float64

``jets[jet_start : jet_start + n_jets]`` are the jets of an event. Root attributes of the HDF5 file and the
Parquet schema metadata (key ``jetssd``) hold the run's provenance (model, version, inputs) as JSON.
:func:`read_tables` reads either back as an (events, jets) pair of column dicts.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from jetssd.atomic import atomic_path

JET_FIELDS = ("label", "score", "eta", "phi", "pt")
ROWS_PER_FLUSH = 8192
"""Events buffered before a Parquet row group / an HDF5 append."""


class _Columns:
    """Buffered event and jet columns for one flush."""

    def __init__(self) -> None:
        self.ids: list[str] = []
        self.sources: list[str] = []
        self.indices: list[int] = []
        self.n_jets: list[int] = []
        self.jets: list[list[dict[str, Any]]] = []

    def add(self, rid: str, jets: list[dict[str, Any]]) -> None:
        source, _, index = rid.rpartition(":")
        self.ids.append(rid)
        self.sources.append(source)
        self.indices.append(int(index) if index.isdigit() else -1)
        self.n_jets.append(len(jets))
        self.jets.append(jets)

    def __len__(self) -> int:
        return len(self.ids)


def _chunks(records: Iterable[Mapping[str, Any]]) -> Iterable[_Columns]:
    cols = _Columns()
    for record in records:
        cols.add(str(record["id"]), list(record["jets"]))
        if len(cols) >= ROWS_PER_FLUSH:
            yield cols
            cols = _Columns()
    yield cols  # the last, possibly empty: an output of zero events still gets its tables


def write_parquet(path: str | os.PathLike[str], records: Iterable[Mapping[str, Any]],
                  metadata: Mapping[str, Any]) -> int:
    """Write the events table (nested jets) atomically; returns the number of events."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    jet_type = pa.struct([("label", pa.string()), ("score", pa.float64()), ("eta", pa.float64()),
                          ("phi", pa.float64()), ("pt", pa.float64())])
    schema = pa.schema([("id", pa.string()), ("source", pa.string()), ("index", pa.int64()),
                        ("n_jets", pa.int32()), ("jets", pa.list_(jet_type))],
                       metadata={"jetssd": json.dumps(dict(metadata), sort_keys=True)})
    n = 0
    with atomic_path(path) as tmp, pq.ParquetWriter(str(tmp), schema, compression="zstd") as writer:
        for cols in _chunks(records):
            table = pa.table({"id": cols.ids, "source": cols.sources, "index": cols.indices,
                              "n_jets": cols.n_jets, "jets": cols.jets}, schema=schema)
            writer.write_table(table)
            n += len(cols)
    return n


def write_h5(path: str | os.PathLike[str], records: Iterable[Mapping[str, Any]], metadata: Mapping[str, Any]) -> int:
    """Write the /events and /jets tables atomically; returns the number of events."""
    import h5py

    text = h5py.string_dtype("utf-8")
    n_events = n_jets = 0
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        for key, value in metadata.items():
            f.attrs[key] = value if isinstance(value, str | int | float) else json.dumps(value, sort_keys=True)
        ev, jt = f.create_group("events"), f.create_group("jets")
        ev_ds = {name: ev.create_dataset(name, (0,), dtype=dt, maxshape=(None,), chunks=(ROWS_PER_FLUSH,))
                 for name, dt in (("id", text), ("source", text), ("index", np.int64), ("n_jets", np.int32),
                                  ("jet_start", np.int64))}
        jt_ds = {name: jt.create_dataset(name, (0,), dtype=dt, maxshape=(None,), chunks=(ROWS_PER_FLUSH,))
                 for name, dt in (("event", np.int64), ("label", text), ("score", np.float64),
                                  ("eta", np.float64), ("phi", np.float64), ("pt", np.float64))}
        ev.attrs["description"] = "one row per event; jets[jet_start:jet_start + n_jets] are its jets"
        jt.attrs["description"] = "one row per jet; event = row in /events"
        for cols in _chunks(records):
            m = len(cols)
            counts = np.asarray(cols.n_jets, np.int64)
            starts = n_jets + np.concatenate([[0], np.cumsum(counts)[:-1]]) if m else np.zeros(0, np.int64)
            flat = [j for jets in cols.jets for j in jets]
            k = len(flat)
            columns: dict[str, Any] = {"id": cols.ids, "source": cols.sources, "index": cols.indices,
                                       "n_jets": cols.n_jets, "jet_start": starts}
            for name, values in columns.items():
                ds = ev_ds[name]
                ds.resize((n_events + m,))
                if m:
                    ds[n_events:] = np.asarray(values, dtype=object if ds.dtype == object else ds.dtype)
            jet_cols: dict[str, Any] = {"event": np.repeat(np.arange(n_events, n_events + m), counts)}
            for name in JET_FIELDS:
                jet_cols[name] = [j[name] for j in flat]
            for name, values in jet_cols.items():
                ds = jt_ds[name]
                ds.resize((n_jets + k,))
                if k:
                    ds[n_jets:] = np.asarray(values, dtype=object if ds.dtype == object else ds.dtype)
            n_events += m
            n_jets += k
    return n_events


def read_tables(path: str | os.PathLike[str]) -> tuple[dict[str, list[Any]], dict[str, list[Any]]]:
    """An .h5 or .parquet output as (events, jets) column dicts of Python lists (for checks and small files).

    events: id, source, index, n_jets; jets: event (row in events), label, score, eta, phi, pt.
    """
    p = Path(path)
    if p.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(p)
        events = {name: table.column(name).to_pylist() for name in ("id", "source", "index", "n_jets")}
        jets: dict[str, list[Any]] = {name: [] for name in ("event", *JET_FIELDS)}
        for row, event_jets in enumerate(table.column("jets").to_pylist()):
            for jet in event_jets:
                jets["event"].append(row)
                for name in JET_FIELDS:
                    jets[name].append(jet[name])
        return events, jets
    import h5py

    with h5py.File(p, "r") as f:
        events = {name: f["events"][name].asstr()[:].tolist() if name in ("id", "source")
                  else f["events"][name][:].tolist() for name in ("id", "source", "index", "n_jets")}
        jets = {name: f["jets"][name].asstr()[:].tolist() if name == "label" else f["jets"][name][:].tolist()
                for name in ("event", *JET_FIELDS)}
    return events, jets
