"""Machinery shared by the HDF5 readers and writers of :mod:`jetssd.io`.

* :class:`DatasetFormatError` and the helpers that turn h5py's exceptions into it;
* ragged ("variable-length") column helpers: per-event arrays ↔ one flat array + offsets;
* :class:`EventFile`, the lazily opened, fork- and pickle-safe reader base class;
* :class:`EventWriter`, the crash-safe writer base class (``<path>.partial`` + atomic ``os.replace``).

Nothing here knows a dataset name; the layouts live in :mod:`jetssd.io.reference` and
:mod:`jetssd.io.native`.
"""

from __future__ import annotations

import contextlib
import operator
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, ClassVar, Self, SupportsIndex

import h5py
import numpy as np
from numpy.typing import DTypeLike, NDArray

from jetssd.event import Event, SparsePixels
from jetssd.geometry import N_CHANNELS, N_ETA, N_PHI

DATASET_CHUNK = 1024
"""Events per HDF5 chunk. A vlen chunk holds only 16-byte heap references, so this costs ~16 kB."""


class DatasetFormatError(Exception):
    """A file that is not a readable event file: missing, not HDF5, truncated, or not in the expected layout.

    The message always names the file (and the dataset when one is at fault). ``path`` and ``dataset``
    hold the same information for programs. The constructor takes the full message as its only
    positional argument so that the exception survives pickling (DataLoader workers re-raise it).
    """

    def __init__(self, message: str, *, path: str | None = None, dataset: str | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.dataset = dataset


def format_error(path: str, problem: str, dataset: str | None = None) -> DatasetFormatError:
    """Build a :class:`DatasetFormatError` whose message reads ``<path>: dataset '<name>': <problem>``."""
    where = f"{path}: dataset '{dataset}'" if dataset else path
    return DatasetFormatError(f"{where}: {problem}", path=path, dataset=dataset)


@contextlib.contextmanager
def h5_errors(path: str, dataset: str | None = None) -> Iterator[None]:
    """Re-raise what h5py throws on a damaged file (OSError, KeyError, RuntimeError) as DatasetFormatError."""
    try:
        yield
    except DatasetFormatError:
        raise
    except (OSError, KeyError, RuntimeError) as exc:
        raise format_error(path, f"cannot be read ({exc}); the file may be truncated or corrupt", dataset) from exc


def open_h5(path: str) -> h5py.File:
    """Open ``path`` read-only, raising :class:`DatasetFormatError` with a clear reason on any failure."""
    if not os.path.exists(path):
        raise format_error(path, "no such file")
    if os.path.isdir(path):
        raise format_error(path, "is a directory, not an HDF5 file")
    try:
        is_hdf5 = h5py.is_hdf5(path)
    except OSError as exc:
        raise format_error(path, f"cannot be read ({exc})") from exc
    if not is_hdf5:
        raise format_error(path, "not an HDF5 file (no HDF5 signature)")
    try:
        # No file locking: writers publish complete files with an atomic rename, so a reader never races a
        # writer, and locking fails on some cluster file systems (EOS/FUSE, some NFS).
        return h5py.File(path, "r", locking=False)
    except OSError as exc:
        if "locking" in str(exc):
            # The file is already open in this process with locking on (e.g. by plain h5py): HDF5 then
            # insists on the same flag, which is harmless for a read-only open.
            try:
                return h5py.File(path, "r")
            except OSError:
                pass
        raise format_error(path, f"cannot be opened as HDF5 ({exc}); the file may be truncated or corrupt") from exc


def decode_attr(value: Any) -> Any:
    """HDF5 attribute → plain Python: bytes → str, numpy scalars → Python scalars, arrays → lists."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, np.ndarray):
        return [decode_attr(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    return value


# ---------------------------------------------------------------------------------------------------------
# Ragged columns


def flatten(values: NDArray[np.object_], dtype: DTypeLike | None = None) -> tuple[NDArray[Any], NDArray[np.int64]]:
    """Object array of n 1-D arrays (an h5py vlen slice) → (concatenation, lengths int64 [n]).

    ``dtype`` is the dtype of the empty result when there is nothing to concatenate; otherwise the
    concatenation keeps the stored dtype (callers validate before converting).
    """
    n = len(values)
    lengths = np.fromiter((len(v) for v in values), np.int64, n)
    if n == 0:
        return np.zeros(0, dtype if dtype is not None else np.float32), lengths
    return np.concatenate(values.tolist()), lengths


def offsets_of(lengths: NDArray[np.int64]) -> NDArray[np.int64]:
    """Lengths [n] → offsets [n + 1] (offsets[k]:offsets[k+1] is event k)."""
    out = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=out[1:])
    return out


def event_at(offsets: NDArray[np.int64], position: int) -> int:
    """Index of the event holding flat element ``position``."""
    return int(np.searchsorted(offsets, position, side="right") - 1)


def flatten_group(path: str, raw: Mapping[str, NDArray[np.object_]], names: Sequence[str], first: int,
                  dtypes: Sequence[DTypeLike] | None = None) -> tuple[list[NDArray[Any]], NDArray[np.int64]]:
    """Flatten several vlen columns that must have equal lengths in every event (e.g. η, φ, pT of pixels).

    Returns the flat arrays (in ``names`` order) and the common offsets [n + 1]. ``first`` is the index of
    the first event of the slice, used in error messages.
    """
    flats: list[NDArray[Any]] = []
    ref_lengths: NDArray[np.int64] | None = None
    for k, name in enumerate(names):
        flat, lengths = flatten(raw[name], None if dtypes is None else dtypes[k])
        if ref_lengths is None:
            ref_lengths = lengths
        elif not np.array_equal(lengths, ref_lengths):
            e = int(np.argmax(lengths != ref_lengths))
            raise format_error(path, f"event {first + e} has {lengths[e]} values but '{names[0]}' has "
                               f"{ref_lengths[e]}; these datasets must have equal lengths per event", name)
        flats.append(flat)
    assert ref_lengths is not None
    return flats, offsets_of(ref_lengths)


def to_index(path: str, name: str, values: NDArray[Any], upper: int, offsets: NDArray[np.int64], first: int,
             *, what: str = "index", minus_one_is_zero: bool = False) -> NDArray[np.int32]:
    """Validate stored indices (integer dtype, or integral floats in the "mixed" files) in 0…upper−1.

    Returns int32 (every index of the grid, even a flat one, fits; half the memory traffic of int64).
    ``minus_one_is_zero``: the reference computes truth/baseline indices as ``argmax(edges ≥ v) − 1``,
    which gives −1 for a value exactly on the lower grid edge (η = −2.958, φ = −π) although the value
    belongs to bin 0 (reference §2). Such rows are read as bin 0 instead of rejecting the whole file.
    """
    stored = values
    if np.issubdtype(values.dtype, np.floating):
        with np.errstate(invalid="ignore"):
            bad = ~np.isfinite(values) | (values != np.floor(values))
        if np.any(bad):
            p = int(np.argmax(bad))
            raise format_error(path, f"non-integer {what} {_number(values[p])} in event {first + event_at(offsets, p)}",
                               name)
        # Range-check while still floating: a huge float would wrap when cast.
        values = np.clip(values, -2, upper)
    elif not np.issubdtype(values.dtype, np.integer):
        raise format_error(path, f"{what} values must be numeric, got dtype {values.dtype}", name)
    else:
        values = np.clip(values, -2, upper) if values.dtype.itemsize > 4 else values
    idx = values.astype(np.int32)
    if minus_one_is_zero:
        idx[idx == -1] = 0
    # Two reductions instead of a boolean temporary: the common (valid) case is the fast one.
    if len(idx) and (idx.min() < 0 or idx.max() >= upper):
        p = int(np.argmax((idx < 0) | (idx >= upper)))
        raise format_error(path, f"{what} {_number(stored[p])} in event {first + event_at(offsets, p)} is outside "
                           f"0…{upper - 1}", name)
    return idx


def check_values(path: str, name: str, values: NDArray[Any], offsets: NDArray[np.int64], first: int,
                 *, non_negative: bool = False) -> None:
    """Reject NaN/inf (and negative values when ``non_negative``) with the event index in the message."""
    if len(values) == 0:
        return
    lo, hi = values.min(), values.max()  # NaN propagates into both; cheaper than a mask when all is well
    if np.isfinite(lo) and np.isfinite(hi) and not (non_negative and lo < 0):
        return
    with np.errstate(invalid="ignore"):
        bad = ~np.isfinite(values)
        if non_negative:
            bad |= values < 0
    p = int(np.argmax(bad))
    what = "non-finite or negative" if non_negative else "non-finite"
    raise format_error(path, f"{what} value {float(values[p])!r} in event {first + event_at(offsets, p)}", name)


def _number(value: Any) -> str:
    """A stored number for a message: integral floats without ".0" (indices stored as float32)."""
    v = value.item() if isinstance(value, np.generic) else value
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return repr(v)


def write_vlen(ds: h5py.Dataset, start: int, arrays: Sequence[NDArray[Any]], dtype: DTypeLike) -> None:
    """Write per-event 1-D arrays into vlen ``ds[start:start + len(arrays)]`` (the dataset is already resized).

    Goes through the low-level API on purpose: h5py's ``ds[a:b] = object_array`` turns an object array
    whose elements all have the same length (e.g. every event with 0 truth objects) into a 2-D array and
    then fails to broadcast it.
    """
    count = len(arrays)
    buffer = np.empty(count, dtype=ds.dtype)  # object dtype carrying h5py's vlen metadata
    for k, a in enumerate(arrays):
        buffer[k] = np.ascontiguousarray(a, dtype=dtype)
    file_space = ds.id.get_space()
    file_space.select_hyperslab((start,), (count,))
    ds.id.write(h5py.h5s.create_simple((count,)), file_space, buffer)


def canonical_pixels(pixels: SparsePixels) -> SparsePixels:
    """Validate pixels for writing and return them in canonical (channel, ieta, iphi) order without duplicates.

    Containers built with ``SparsePixels.from_arrays`` or the rasterizer are canonical already (returned
    as is); one built with the raw dataclass constructor may not be, and the reference layout requires
    row-major order. Raises ValueError for pixels off the grid or values that are NaN/inf/negative,
    which the readers would reject.
    """
    bad = (pixels.channel >= N_CHANNELS) | (pixels.ieta < 0) | (pixels.ieta >= N_ETA) | (pixels.iphi < 0) \
        | (pixels.iphi >= N_PHI)
    if np.any(bad):  # checked before any flat-index arithmetic, which would alias such pixels onto others
        k = int(np.argmax(bad))
        raise ValueError(f"pixel {k} (channel {pixels.channel[k]}, ieta {pixels.ieta[k]}, iphi {pixels.iphi[k]}) "
                         f"lies outside the {N_CHANNELS}×{N_ETA}×{N_PHI} grid")
    value = pixels.value
    if len(value) and not (np.isfinite(value.min()) and np.isfinite(value.max()) and value.min() >= 0):
        k = int(np.argmax(~np.isfinite(value) | (value < 0)))
        raise ValueError(f"pixel {k} has value {float(value[k])!r}; pixel values must be finite and ≥ 0")
    flat = pixels.flat_index
    if len(flat) < 2 or np.all(np.diff(flat) > 0):
        return pixels
    return SparsePixels.from_flat_index(flat, value.astype(np.float64))


# ---------------------------------------------------------------------------------------------------------
# Reader base class


class EventFile(ABC):
    """Random-access, chunk-streaming reader of one event file. Subclasses define the layout.

    The h5py handle is opened lazily and re-opened when the process id changes, and it is dropped when
    the reader is pickled: a reader made in the main process can be handed to DataLoader workers (forked
    or spawned), each of which then opens its own handle. HDF5 handles must not be shared across fork.
    """

    format: ClassVar[str]
    """"reference" or "jetssd"."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._path = os.fspath(path)
        self._file: h5py.File | None = None
        self._datasets: dict[str, h5py.Dataset] = {}
        self._pid = -1
        f = self._h5()
        try:
            with h5_errors(self._path):
                self._attrs: dict[str, Any] = {str(k): decode_attr(v) for k, v in f.attrs.items()}
                self._len = self._validate(f)
        except BaseException:
            self.close()  # do not leak the handle of a file we refuse
            raise

    # -- layout hooks ---------------------------------------------------------------------------------

    @abstractmethod
    def _validate(self, f: h5py.File) -> int:
        """Check the datasets exist with the expected kinds and equal lengths; return the event count."""

    @abstractmethod
    def _read_events(self, start: int, stop: int) -> list[Event]:
        """Events [start, stop), reading each dataset slice once."""

    @abstractmethod
    def _read_pixels(self, start: int, stop: int) -> list[SparsePixels]:
        """Pixels of events [start, stop), reading only the pixel datasets."""

    # -- public API -----------------------------------------------------------------------------------

    @property
    def path(self) -> str:
        return self._path

    @property
    def attrs(self) -> dict[str, Any]:
        """Root attributes of the file, decoded to plain Python values (a copy)."""
        return dict(self._attrs)

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: SupportsIndex) -> Event:
        """Event ``i`` (negative indices count from the end). Raises IndexError out of range."""
        k = self._normalise_index(i)
        return self._read_events(k, k + 1)[0]

    def read_pixels(self, i: SupportsIndex) -> SparsePixels:
        """Only the pixels of event ``i``: the fast path of training loaders (reads 9 datasets, no labels)."""
        k = self._normalise_index(i)
        return self._read_pixels(k, k + 1)[0]

    def iter_chunks(self, chunk_size: int = 1000, start: int = 0, stop: int | None = None) -> Iterator[list[Event]]:
        """Stream events [start, stop) in lists of at most ``chunk_size``; each dataset is read once per chunk.

        ``start``/``stop`` follow slice semantics (negative values count from the end, out-of-range clamps).
        """
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be ≥ 1, got {chunk_size}")
        first, last, _ = slice(start, stop).indices(self._len)
        for a in range(first, last, chunk_size):
            yield self._read_events(a, min(a + chunk_size, last))

    def close(self) -> None:
        """Close the HDF5 handle of this process. A later access re-opens it."""
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file = None
        self._datasets = {}
        self._pid = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_file"] = None  # never pickle a live HDF5 handle; the receiving process opens its own
        state["_datasets"] = {}
        state["_pid"] = -1
        return state

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._path!r}, events={self._len})"

    # -- helpers for subclasses -----------------------------------------------------------------------

    def _h5(self) -> h5py.File:
        pid = os.getpid()
        if self._file is None or self._pid != pid:
            # After a fork the inherited handle belongs to the parent's HDF5 state: drop it, open anew.
            self._file = open_h5(self._path)
            self._datasets = {}
            self._pid = pid
        return self._file

    def _normalise_index(self, i: SupportsIndex) -> int:
        k = operator.index(i)
        if k < 0:
            k += self._len
        if not 0 <= k < self._len:
            raise IndexError(f"event index {i} out of range for {self._path} with {self._len} events")
        return k

    def _read_slices(self, names: Sequence[str], start: int, stop: int) -> dict[str, NDArray[Any]]:
        """Read ``dataset[start:stop]`` of each name once, converting h5py errors."""
        f = self._h5()
        out: dict[str, NDArray[Any]] = {}
        for name in names:
            with h5_errors(self._path, name):
                ds = self._datasets.get(name)
                if ds is None:  # the name lookup costs as much as a one-event read: do it once per handle
                    ds = self._datasets[name] = f[name]
                out[name] = ds[start:stop]
        return out

    def _check_datasets(self, f: h5py.File, vlen: Sequence[str], fixed: Sequence[str] = ()) -> int:
        """All ``vlen`` names must be 1-D variable-length numeric datasets, ``fixed`` 1-D numeric ones,
        all of one length; returns that length."""
        lengths: dict[str, int] = {}
        for name in (*vlen, *fixed):
            obj = f.get(name)
            if obj is None:
                raise format_error(self._path, "missing", name)
            if not isinstance(obj, h5py.Dataset):
                raise format_error(self._path, "is a group, expected a dataset", name)
            if obj.ndim != 1:
                raise format_error(self._path, f"must be one-dimensional (one entry per event), got shape "
                                   f"{obj.shape}", name)
            base = h5py.check_vlen_dtype(obj.dtype)
            if name in vlen:
                if base is None:
                    raise format_error(self._path, f"must be variable-length, got dtype {obj.dtype}", name)
            else:
                base = obj.dtype
            if not (np.issubdtype(base, np.integer) or np.issubdtype(base, np.floating)):
                raise format_error(self._path, f"must hold numbers, got dtype {base}", name)
            lengths[name] = obj.shape[0]
        if len(set(lengths.values())) > 1:
            first = next(iter(lengths))
            bad = next(n for n, v in lengths.items() if v != lengths[first])
            raise format_error(self._path, f"has {lengths[bad]} events but '{first}' has {lengths[first]}; all "
                               "datasets must have one entry per event", bad)
        return next(iter(lengths.values()), 0)


# ---------------------------------------------------------------------------------------------------------
# Writer base class


class EventWriter(ABC):
    """Crash-safe writer: everything goes to ``<path>.partial``, renamed onto ``path`` by a successful close.

    Used as a context manager, an exception inside the ``with`` deletes the partial file, so no reader
    ever sees a half-written file under the final name. ``append`` may be called many times: the
    datasets are chunked and resizable. Subclasses define the layout (:meth:`_layout`) and the per-event
    encoding (:meth:`_encode`).
    """

    reserved_attrs: ClassVar[frozenset[str]] = frozenset({"format", "labels_truth"})
    """Root attributes callers may not pass: ``format`` decides how :func:`jetssd.io.open_events` reads a file."""

    def __init__(self, path: str | os.PathLike[str], attrs: Mapping[str, Any] | None = None, *,
                 overwrite: bool = False, labels: str = "status22") -> None:
        if labels not in ("status22", "lastcopy"):
            raise ValueError(f"labels must be 'status22' or 'lastcopy', got {labels!r}")
        self.labels = labels
        """Truth convention written to the reference ``labels`` dataset (also stored as root attr ``labels_truth``)."""
        self._path = os.fspath(path)
        self._partial = self._path + ".partial"
        self._overwrite = overwrite
        self._n = 0
        self._closed = False
        self._failed = False
        extra = dict(attrs or {})
        reserved = self.reserved_attrs & extra.keys()
        if reserved:
            raise ValueError(f"attrs may not set {sorted(reserved)}: the writer owns these root attributes")
        root_attrs = {**extra, **self._root_attrs(), "labels_truth": labels}
        if not overwrite and os.path.exists(self._path):
            raise FileExistsError(f"{self._path} exists; pass overwrite=True to replace it")
        # "w" truncates a stale .partial left by a killed process.
        self._file: h5py.File | None = h5py.File(self._partial, "w")
        try:
            for name, (dtype, vlen) in self._layout().items():
                self._file.create_dataset(name, shape=(0,), maxshape=(None,), chunks=(DATASET_CHUNK,),
                                          dtype=h5py.vlen_dtype(dtype) if vlen else dtype)
            for key, value in root_attrs.items():
                self._file.attrs[key] = value
        except BaseException:
            self.abort()
            raise

    @abstractmethod
    def _layout(self) -> dict[str, tuple[DTypeLike, bool]]:
        """Dataset name → (element dtype, is variable-length), in creation order."""

    def _root_attrs(self) -> dict[str, Any]:
        """Root attributes the format itself sets."""
        return {}

    @abstractmethod
    def _encode(self, event: Event, index: int) -> dict[str, Any]:
        """One event → a value per dataset of :meth:`_layout` (1-D arrays for vlen, scalars otherwise).

        Raise ValueError for an event that cannot be written; ``index`` is its position in the file.
        """

    @property
    def path(self) -> str:
        return self._path

    def __len__(self) -> int:
        """Events appended so far."""
        return self._n

    def append(self, events: Sequence[Event]) -> None:
        """Append events. They are all encoded (and validated) before anything is written, so a
        ValueError for a bad event leaves the file as it was."""
        if self._file is None or self._closed:
            raise ValueError(f"writer for {self._path} is closed")
        if self._failed:
            raise ValueError(f"an earlier write to {self._path} failed; the file is unusable")
        layout = self._layout()
        columns: dict[str, list[Any]] = {name: [] for name in layout}
        for k, event in enumerate(events):
            encoded = self._encode(event, self._n + k)
            for name in layout:
                columns[name].append(encoded[name])
        count = len(next(iter(columns.values()), []))
        if count == 0:
            return
        n0, n1 = self._n, self._n + count
        try:
            for name, (dtype, vlen) in layout.items():
                ds = self._file[name]
                ds.resize((n1,))
                if vlen:
                    write_vlen(ds, n0, columns[name], dtype)
                else:
                    ds[n0:n1] = np.asarray(columns[name], dtype=dtype)
        except BaseException:
            self._failed = True  # datasets may now differ in length: never publish this file
            raise
        self._n = n1

    def close(self) -> None:
        """Flush, then atomically move the partial file onto ``path``. Idempotent."""
        if self._closed:
            return
        if self._failed:
            self.abort()
            raise ValueError(f"an earlier write to {self._path} failed; nothing was written")
        assert self._file is not None
        try:
            self._file.close()
            self._file = None
            _fsync_path(self._partial)
            if not self._overwrite and os.path.exists(self._path):
                raise FileExistsError(f"{self._path} appeared while writing; pass overwrite=True to replace it")
            os.replace(self._partial, self._path)
        except BaseException:
            self.abort()
            raise
        self._closed = True
        # Make the rename itself durable (POSIX only; directories cannot be opened on Windows).
        with contextlib.suppress(OSError):
            _fsync_path(os.path.dirname(os.path.abspath(self._path)))

    def abort(self) -> None:
        """Discard everything: close the handle and delete the partial file. Idempotent."""
        if self._file is not None:
            with contextlib.suppress(Exception):
                self._file.close()
            self._file = None
        with contextlib.suppress(FileNotFoundError):
            os.remove(self._partial)
        self._closed = True

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _fsync_path(path: str) -> None:
    """fsync a file or directory so the data (or the rename) survives a power cut."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
