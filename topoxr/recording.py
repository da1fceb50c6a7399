"""Framework-free machinery shared by the recording adapters.

The adapters (``topoxr_torch``, ``topoxr_keras``) only know how to run their framework:
resolve the model's layer names and turn one input batch into numpy arrays of the chosen
layers' outputs.  Everything else lives here, once:

* the adapter registry over the entry-point group ``topoxr.adapters``, read lazily (an
  adapter, and so its framework, is imported only when asked for);
* layer selection by exact names or :mod:`fnmatch` patterns;
* normalising arrays ``(x, y)``, labels and metadata into batches with stable sample ids;
* checking the probe set and layer sizes against what the store already holds for the
  model, *before* anything is written;
* a bounded background writer (one thread, one ``queue.Queue(maxsize=k)``) that coalesces
  batches into chunk-sized writes and overlaps writing with the forward passes, and that
  hands its errors back to the caller;
* :func:`run_recording`, the loop that ties these together.
"""

from __future__ import annotations

import fnmatch
import logging
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from types import ModuleType
from typing import Any

import numpy as np

from topoxr._codecs import DEFAULT_COMPRESSOR
from topoxr.activations import REDUCE_MODES, reduce_units
from topoxr.conventions import ATTR_LAYER, ATTR_MODEL, LABEL, SAMPLE
from topoxr.store import ActivationWriter, open_store

__all__ = [
    "ADAPTER_GROUP",
    "BackgroundWriter",
    "Batch",
    "ForwardFn",
    "RecordResult",
    "RecordingError",
    "StoredLayer",
    "available_adapters",
    "check_against_store",
    "get_adapter",
    "iter_array_batches",
    "number_batches",
    "prepare_arrays",
    "resolve_layers",
    "run_recording",
    "stored_layers",
]

logger = logging.getLogger(__name__)

#: Entry-point group under which recording adapters register their import package.
ADAPTER_GROUP = "topoxr.adapters"

#: Size of the first write of a new layer (bytes of float32 values): the store sizes the
#: layer's chunks from it, so it makes chunks of about this size, aligned with batches.
WRITE_BYTES = 1 << 20
#: Later writes cover several such chunks at once (zarr encodes them concurrently), which
#: spreads the store's per-write bookkeeping over more samples.
CHUNKS_PER_WRITE = 4

#: ``forward(x) -> ({layer: array (batch, ...)}, model output (batch, ...) or None)``.
ForwardFn = Callable[[Any], tuple[dict[str, np.ndarray], "np.ndarray | None"]]


class RecordingError(ValueError):
    """Bad input for a recorder (layers, data, labels, probe set); nothing was written."""


# --------------------------------------------------------------------------------------
# Adapter registry
# --------------------------------------------------------------------------------------
def _adapter_entry_points() -> dict[str, EntryPoint]:
    """Collect the entry points of the group without loading any (zarr's pattern)."""
    return {ep.name: ep for ep in entry_points(group=ADAPTER_GROUP)}


def available_adapters() -> list[str]:
    """Return the names of the installed recording adapters, without importing them.

    Returns
    -------
    list of str
        Sorted entry-point names of the group ``topoxr.adapters`` (e.g.
        ``["keras", "torch"]``).

    Examples
    --------
    >>> "torch" in available_adapters()
    True
    """
    return sorted(_adapter_entry_points())


def get_adapter(name: str) -> ModuleType:
    """Import and return the recording adapter registered as ``name``.

    Only this adapter (and, when it is used, its framework) is imported.

    Parameters
    ----------
    name : str
        Entry-point name, e.g. ``"torch"`` or ``"keras"``.

    Returns
    -------
    module
        The adapter package, e.g. :mod:`topoxr_torch`.

    Raises
    ------
    KeyError
        If no adapter of that name is installed; the message lists the installed ones.
    """
    eps = _adapter_entry_points()
    if name not in eps:
        raise KeyError(
            f"no topoxr adapter named {name!r}; installed adapters: {sorted(eps)} "
            f"(entry-point group {ADAPTER_GROUP!r})"
        )
    module = eps[name].load()
    if not isinstance(module, ModuleType):
        raise TypeError(f"adapter entry point {name!r} must name a module, got {module!r}")
    return module


# --------------------------------------------------------------------------------------
# Layer selection
# --------------------------------------------------------------------------------------
def resolve_layers(
    requested: str | Sequence[str], available: Sequence[str], *, what: str = "model"
) -> list[str]:
    """Resolve layer names and :mod:`fnmatch` patterns against the available names.

    Parameters
    ----------
    requested : str or sequence of str
        Exact names or glob patterns (``"fc*"``, ``"features.?"``). Exact matches win
        over patterns, so a name containing ``[`` still works.
    available : sequence of str
        The layer names the framework reports, in model order.
    what : str, default "model"
        How to call the model in error messages.

    Returns
    -------
    list of str
        Matching names in model order, each once.

    Raises
    ------
    RecordingError
        If ``requested`` is empty or a name or pattern matches nothing; the message lists
        the available names.

    Examples
    --------
    >>> resolve_layers(["fc*"], ["fc1", "relu1", "fc2", "out"])
    ['fc1', 'fc2']
    """
    patterns = [requested] if isinstance(requested, str) else list(requested)
    if not patterns:
        raise RecordingError(f"no layers requested; the {what} has layers {list(available)}")
    chosen: set[str] = set()
    unknown = []
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise RecordingError(f"layer names must be strings, got {pattern!r}")
        if pattern in available:
            chosen.add(pattern)
            continue
        hits = fnmatch.filter(available, pattern)
        if not hits:
            unknown.append(pattern)
        chosen.update(hits)
    if unknown:
        raise RecordingError(
            f"no layer of the {what} matches {unknown}; available layers: {list(available)}"
        )
    return [name for name in available if name in chosen]


# --------------------------------------------------------------------------------------
# Data normalisation
# --------------------------------------------------------------------------------------
@dataclass
class Batch:
    """One batch of inputs with the sample ids, labels and metadata that go with it."""

    x: Any
    ids: np.ndarray
    labels: np.ndarray | None = None
    metadata: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)


def _column(name: str, values: Any, n: int | None) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise RecordingError(f"{name} must be one-dimensional, got shape {arr.shape}")
    if n is not None and len(arr) != n:
        raise RecordingError(f"{name} has {len(arr)} entries but the data has {n} samples")
    return arr


def prepare_arrays(
    data: Any,
    *,
    labels: Any = None,
    metadata: Mapping[str, Any] | None = None,
    sample_ids: Any = None,
) -> tuple[Any, np.ndarray | None, np.ndarray, dict[str, np.ndarray]]:
    """Split array data into inputs, labels, sample ids and metadata, checking lengths.

    Parameters
    ----------
    data : array_like or tuple
        ``x`` or ``(x, y)``; ``x`` has the samples on its first axis. ``x`` is returned
        as given (a numpy array, a tensor...), so the framework converts it.
    labels : array_like, optional
        Labels when ``data`` has none. Giving both is an error.
    metadata : mapping of str to array_like, optional
        Per-sample columns (str, int, float or bool).
    sample_ids : array_like of int, optional
        Stable, unique integer id per sample; default ``0..n-1``.

    Returns
    -------
    x, labels, ids, metadata

    Raises
    ------
    RecordingError
        For lengths that differ, duplicate or non-integer ids, or labels given twice.
    """
    if isinstance(data, tuple | list) and not hasattr(data, "shape"):
        if len(data) == 2:
            x, y = data
        elif len(data) == 1:
            x, y = data[0], None
        else:
            raise RecordingError(
                f"data must be x or a pair (x, y), got a {type(data).__name__} of {len(data)}"
            )
    else:
        x, y = data, None
    if y is not None and labels is not None:
        raise RecordingError("labels are given twice: in data=(x, y) and as labels=")
    y = labels if y is None else y
    shape = getattr(x, "shape", None)
    if shape is None or len(shape) < 1:
        raise RecordingError(
            f"inputs must be an array with the samples on the first axis, got {type(x).__name__}"
        )
    n = int(shape[0])
    if n == 0:
        raise RecordingError("the data has no samples")
    y_arr = None if y is None else _column("labels", _to_numpy(y), n)
    if sample_ids is None:
        ids = np.arange(n, dtype=np.int64)
    else:
        ids = _check_ids(_column("sample_ids", sample_ids, n))
    meta = {str(k): _column(f"metadata {k!r}", _to_numpy(v), n)
            for k, v in (metadata or {}).items()}
    return x, y_arr, ids, meta


def _to_numpy(values: Any) -> Any:
    """Tensors (torch, tf) know ``.numpy()``; ``np.asarray`` does the rest."""
    if hasattr(values, "detach"):
        values = values.detach()
    if hasattr(values, "cpu"):
        values = values.cpu()
    if hasattr(values, "numpy") and not isinstance(values, np.ndarray):
        return values.numpy()
    return values


def _check_ids(ids: np.ndarray) -> np.ndarray:
    if ids.dtype.kind not in "iu":
        raise RecordingError(f"sample_ids must be integers, got {ids.dtype}")
    ids = ids.astype(np.int64)
    uniq, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        raise RecordingError(f"duplicate sample ids: {uniq[counts > 1][:10].tolist()}")
    return ids


def iter_array_batches(
    x: Any,
    ids: np.ndarray,
    labels: np.ndarray | None,
    metadata: Mapping[str, np.ndarray],
    batch_size: int,
) -> Iterator[Batch]:
    """Cut arrays prepared by :func:`prepare_arrays` into :class:`Batch` objects."""
    batch_size = _check_batch_size(batch_size)
    for start in range(0, len(ids), batch_size):
        sl = slice(start, start + batch_size)
        yield Batch(
            x=x[sl], ids=ids[sl], labels=None if labels is None else labels[sl],
            metadata={k: v[sl] for k, v in metadata.items()},
        )


def number_batches(
    batches: Iterable[tuple[Any, Any]],
    *,
    labels: Any = None,
    metadata: Mapping[str, Any] | None = None,
    sample_ids: Any = None,
    n_samples: int | None = None,
) -> Iterator[Batch]:
    """Number the batches of a data loader with running sample ids ``0, 1, ...``.

    Parameters
    ----------
    batches : iterable of (x, y or None)
        What the framework's loader yields, already split into inputs and labels.
    labels, metadata, sample_ids : optional
        Whole-probe-set columns, sliced by position (labels only when batches carry none).
    n_samples : int, optional
        Known number of samples, to check the columns' lengths up front.

    Raises
    ------
    RecordingError
        When a batch's size does not fit the columns, or labels come twice.
    """
    labels_arr = None if labels is None else _column("labels", _to_numpy(labels), n_samples)
    meta = {str(k): _column(f"metadata {k!r}", _to_numpy(v), n_samples)
            for k, v in (metadata or {}).items()}
    ids_all = None if sample_ids is None else _check_ids(
        _column("sample_ids", sample_ids, n_samples))
    start = 0
    for x, y in batches:
        shape = getattr(x, "shape", None)
        if shape is None or len(shape) < 1:
            raise RecordingError(f"a batch's inputs must be an array, got {type(x).__name__}")
        n = int(shape[0])
        stop = start + n
        for name, col in (("labels", labels_arr), ("sample_ids", ids_all), *meta.items()):
            if col is not None and len(col) < stop:
                raise RecordingError(
                    f"{name} has {len(col)} entries but the data has more samples"
                )
        if y is not None and labels_arr is not None:
            raise RecordingError("labels are given twice: by the data and as labels=")
        y_b = labels_arr[start:stop] if labels_arr is not None else (
            None if y is None else _column("labels of a batch", _to_numpy(y), n))
        ids = np.arange(start, stop, dtype=np.int64) if ids_all is None else ids_all[start:stop]
        yield Batch(x=x, ids=ids, labels=y_b, metadata={k: v[start:stop] for k, v in meta.items()})
        start = stop
    if start == 0:
        raise RecordingError("the data has no samples")
    for name, col in (("labels", labels_arr), ("sample_ids", ids_all), *meta.items()):
        if col is not None and len(col) != start:
            raise RecordingError(f"{name} has {len(col)} entries but the data has {start} samples")


def _check_batch_size(batch_size: int) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer) \
            or batch_size < 1:
        raise RecordingError(f"batch_size must be a positive integer, got {batch_size!r}")
    return int(batch_size)


# --------------------------------------------------------------------------------------
# What the store already holds
# --------------------------------------------------------------------------------------
@dataclass
class StoredLayer:
    """What a store holds for one layer of a model (read without loading activations)."""

    n_neurons: int
    reduce: str
    sample_ids: np.ndarray
    epochs: list[int]
    complete: list[bool]
    labels: np.ndarray | None


def stored_layers(store: str | ActivationWriter, model: str) -> dict[str, StoredLayer]:
    """Read the layers of ``model`` in a store: sizes, probe ids, epochs, labels.

    Parameters
    ----------
    store : str or ActivationWriter
        A path/URL (a store that does not exist yet holds nothing) or an open writer.
    model : str
        The model name.

    Returns
    -------
    dict
        Original layer name -> :class:`StoredLayer`.
    """
    url = store.url if isinstance(store, ActivationWriter) else store
    try:
        tree = open_store(url)
    except FileNotFoundError:
        return {}
    model_node = next((child for child in tree.children.values()
                       if child.attrs.get(ATTR_MODEL) == model), None)
    if model_node is None:
        return {}
    out = {}
    for node in model_node.children.values():
        ds = node.to_dataset()
        if "activation" not in ds:
            continue
        out[str(ds.attrs.get(ATTR_LAYER, node.name))] = StoredLayer(
            n_neurons=int(ds.sizes["neuron"]),
            reduce=str(ds.attrs.get("topoxr_reduce", "mean")),
            sample_ids=np.asarray(ds[SAMPLE].values, dtype=np.int64),
            epochs=[int(e) for e in ds["epoch"].values],
            complete=[bool(c) for c in ds["epoch_complete"].values],
            labels=np.asarray(ds[LABEL].values) if LABEL in ds.coords else None,
        )
    return out


def check_against_store(
    stored: Mapping[str, StoredLayer],
    *,
    model: str,
    neurons: Mapping[str, int],
    reduce: str,
    epoch: int,
    ids: np.ndarray | None,
    labels: np.ndarray | None,
) -> None:
    """Refuse a recording that does not fit what the store holds for the model.

    Parameters
    ----------
    stored : mapping
        From :func:`stored_layers`.
    model : str
        Model name, for messages.
    neurons : mapping of str to int
        Neurons per layer to record (after ``reduce``).
    reduce : str
        Reduce mode of this recording.
    epoch : int
        The epoch being recorded.
    ids : numpy.ndarray, optional
        The whole probe set's sample ids, when known up front.
    labels : numpy.ndarray, optional
        The whole probe set's labels, aligned with ``ids``.

    Raises
    ------
    RecordingError
        If a layer's size or reduce mode differs, or the probe set differs from the
        samples of earlier epochs (a resumed epoch may only add the samples it lacks),
        or labels of known samples differ.
    """
    for layer, n in neurons.items():
        old = stored.get(layer)
        if old is None:
            continue
        where = f"layer {layer!r} of model {model!r}"
        if old.n_neurons != n:
            raise RecordingError(
                f"{where} has {old.n_neurons} neurons in the store but {n} now; a different "
                "architecture needs another model name (or mode='w' on the writer)"
            )
        if old.reduce != reduce:
            raise RecordingError(f"{where} was recorded with reduce={old.reduce!r}, not {reduce!r}")
        if ids is None or not len(old.sample_ids):
            continue
        frozen = any(old.complete) or any(e != epoch for e in old.epochs)
        new_ids = np.setdiff1d(ids, old.sample_ids)
        lost_ids = np.setdiff1d(old.sample_ids, ids)
        if len(lost_ids) or (frozen and len(new_ids)):
            raise RecordingError(
                f"{where}: the probe set differs from the one in the store "
                f"({len(old.sample_ids)} samples, epochs {old.epochs}); this data has "
                f"{len(ids)} samples, {len(new_ids)} of them new and {len(lost_ids)} stored "
                "ones missing. Every epoch must record the same probe samples."
            )
        if labels is not None and old.labels is not None:
            pos = {int(s): i for i, s in enumerate(old.sample_ids.tolist())}
            idx = np.array([pos.get(int(s), -1) for s in ids])
            known = idx >= 0
            if known.any():
                try:
                    differ = old.labels[idx[known]] != labels[known]
                except (TypeError, ValueError):
                    differ = np.ones(int(known.sum()), bool)
                if np.any(differ):
                    raise RecordingError(
                        f"{where}: labels of samples {ids[known][differ][:10].tolist()} "
                        "differ from the stored ones"
                    )


# --------------------------------------------------------------------------------------
# Background writer
# --------------------------------------------------------------------------------------
@dataclass
class _Pending:
    """Batches of one layer waiting to be written together."""

    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None,
                      dict[str, np.ndarray]]] = field(default_factory=list)
    rows: int = 0


_STOP = object()


class BackgroundWriter:
    """Write batches on one background thread while the caller computes the next ones.

    Batches go through a ``queue.Queue(maxsize=queue_size)``: memory stays bounded and a
    slow store slows the producer down instead of piling up. Conv maps are pooled on the
    thread. The first batch of each layer is written at once (the store creates the layer
    and sizes its chunks from it: whole batches adding up to about ``write_bytes``); later
    batches are coalesced into writes that end on chunk boundaries, ``chunks_per_write``
    chunks at a time. The first error of the thread is raised in the caller at the next
    :meth:`submit` or at :meth:`close`.

    Parameters
    ----------
    writer : ActivationWriter
        An open writer; only the background thread uses it while this object is open.
    epoch : int
        Epoch label of every batch.
    reduce : str
        Reduce mode passed to :meth:`ActivationWriter.write`.
    channel_axis : int or mapping of str to int
        Channel axis of outputs with spatial axes (1 for NCHW, -1 for NHWC), for all
        layers or per layer.
    queue_size : int, default 4
        Batches that may wait in the queue.
    write_bytes : int, default 1 MiB
        Target size of one chunk per layer.
    chunks_per_write : int, default 4
        Chunks per later write.
    """

    def __init__(
        self,
        writer: ActivationWriter,
        *,
        epoch: int,
        reduce: str,
        channel_axis: int | Mapping[str, int],
        queue_size: int = 4,
        write_bytes: int = WRITE_BYTES,
        chunks_per_write: int = CHUNKS_PER_WRITE,
    ) -> None:
        self._writer = writer
        self._epoch = epoch
        self._reduce = reduce
        self._channel_axis = channel_axis
        self._write_bytes = write_bytes
        self._chunks_per_write = max(1, int(chunks_per_write))
        self._rows_written: dict[str, int] = {}
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=queue_size)
        self._pending: dict[str, _Pending] = {}
        self._targets: dict[str, int] = {}
        self._error: BaseException | None = None
        self._closed = False
        #: Samples written (per layer, summed) and number of write calls, for inspection.
        self.written = 0
        self.writes = 0
        self._thread = threading.Thread(target=self._run, name="topoxr-writer", daemon=True)
        self._thread.start()

    def set_targets(self, neurons: Mapping[str, int], batch_size: int) -> None:
        """Rows per write for each layer: whole batches adding up to ``write_bytes``."""
        for layer, n in neurons.items():
            self._targets[layer] = batch_size * max(1, self._write_bytes // (batch_size * 4 * n))

    def _due(self, layer: str, pending_rows: int) -> bool:
        """Whether the pending rows of ``layer`` reach its next write boundary.

        The first batch of a layer is written at once: the store creates the layer (slow,
        better overlapped with compute) and sizes its chunks from that batch, which gives
        the chunk of ``set_targets``. Later writes end on chunk boundaries: the rest of
        the first chunk, then ``chunks_per_write`` chunks at a time.
        """
        if layer not in self._rows_written:
            return True
        chunk = self._targets.get(layer, 0)
        if chunk <= 0:
            return True
        done = self._rows_written[layer]
        boundary = chunk if done < chunk else (done // chunk + self._chunks_per_write) * chunk
        return done + pending_rows >= boundary

    def submit(
        self,
        outputs: Mapping[str, np.ndarray],
        ids: np.ndarray,
        labels: np.ndarray | None,
        predictions: np.ndarray | None,
        metadata: Mapping[str, np.ndarray],
    ) -> None:
        """Queue one batch of every layer; blocks while the queue is full.

        Raises
        ------
        Exception
            The error that stopped the background thread, if any.
        """
        self._raise_pending()
        item = (dict(outputs), ids, labels, predictions, dict(metadata))
        while True:
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                self._raise_pending()

    def close(self, *, flush: bool = True) -> None:
        """Write what is pending (unless ``flush=False``), stop the thread, raise its error."""
        if self._closed:
            return
        self._closed = True
        if not flush and self._error is None:
            self._error = _Cancelled()
        self._put_stop()
        self._thread.join()
        if isinstance(self._error, _Cancelled):
            return
        self._raise_pending()

    def __enter__(self) -> BackgroundWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close(flush=exc_type is None)

    # -- internals -------------------------------------------------------------------
    def _put_stop(self) -> None:
        while True:
            try:
                self._queue.put(_STOP, timeout=0.1)
                return
            except queue.Full:
                if not self._thread.is_alive():
                    return

    def _raise_pending(self) -> None:
        if self._error is not None and not isinstance(self._error, _Cancelled):
            err, self._error = self._error, _Cancelled()
            raise err

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                break
            if self._error is not None:
                continue  # drain so that the producer never blocks
            try:
                self._add(*item)
            except BaseException as err:
                self._error = err
        if self._error is None:
            try:
                for layer in list(self._pending):
                    self._flush(layer)
            except BaseException as err:
                self._error = err

    def _add(self, outputs, ids, labels, predictions, metadata) -> None:
        for layer, values in outputs.items():
            values = np.asarray(values)
            if values.ndim > 2 and self._reduce != "none":
                # Pool here, off the caller's thread, and keep only (batch, channel, 1):
                # the store's pooling of one position is the identity and still records
                # the channel coordinate.
                values = reduce_units(values, channel_axis=_axis_of(self._channel_axis, layer),
                                      reduce=self._reduce).values[:, :, np.newaxis]
            pending = self._pending.setdefault(layer, _Pending())
            pending.parts.append((values, ids, labels, predictions, metadata))
            pending.rows += len(ids)
            if self._due(layer, pending.rows):
                self._flush(layer)

    def _flush(self, layer: str) -> None:
        pending = self._pending.pop(layer, None)
        if pending is None or not pending.parts:
            return
        parts = pending.parts

        def cat(i: int) -> np.ndarray | None:
            if parts[0][i] is None:
                return None
            return parts[0][i] if len(parts) == 1 else np.concatenate([p[i] for p in parts])

        meta = {k: np.concatenate([p[4][k] for p in parts]) for k in parts[0][4]}
        values = cat(0)
        axis = 1 if values.ndim == 3 and self._reduce != "none" else _axis_of(
            self._channel_axis, layer)
        self._rows_written[layer] = self._rows_written.get(layer, 0) + pending.rows
        self.writes += 1
        self.written += self._writer.write(
            layer, values, sample=cat(1), label=cat(2), prediction=cat(3), epoch=self._epoch,
            channel_axis=axis, reduce=self._reduce, **meta,
        )


def _axis_of(channel_axis: int | Mapping[str, int], layer: str) -> int:
    return channel_axis if isinstance(channel_axis, int) else channel_axis.get(layer, 1)


class _Cancelled(Exception):
    """Marks a writer stopped without flushing."""


# --------------------------------------------------------------------------------------
# The recording loop
# --------------------------------------------------------------------------------------
@dataclass
class RecordResult:
    """What one call of an adapter's ``record`` did."""

    store: str
    model: str
    layers: list[str]
    epoch: int
    samples: int
    written: int

    def __repr__(self) -> str:
        return (f"RecordResult(model={self.model!r}, layers={self.layers}, epoch={self.epoch}, "
                f"samples={self.samples}, store={self.store!r})")


def _predictions(output: np.ndarray | None) -> np.ndarray | None:
    if output is None:
        return None
    out = np.asarray(output)
    if out.ndim == 2 and out.shape[1] > 1:
        return out.argmax(axis=1).astype(np.int64)
    if out.ndim == 2 and out.shape[1] == 1 or out.ndim == 1:
        return (out.reshape(-1) > 0).astype(np.int64)
    return None


def run_recording(
    forward: ForwardFn,
    batches: Iterable[Batch],
    store: Any,
    *,
    model_name: str,
    layers: Sequence[str],
    epoch: int = 0,
    reduce: str = "mean",
    channel_axis: int | Mapping[str, int] = 1,
    probe_ids: np.ndarray | None = None,
    probe_labels: np.ndarray | None = None,
    n_samples: int | None = None,
    batch_size: int = 256,
    progress: bool = True,
    attrs: Mapping[str, Any] | None = None,
    scalars: Mapping[str, float] | None = None,
    queue_size: int = 4,
    description: str = "recording",
    compressor: Any = DEFAULT_COMPRESSOR,
    dtype: str = "float32",
) -> RecordResult:
    """Record the outputs of ``layers`` over ``batches`` into a store.

    The first batch is computed, its layer sizes and the whole probe set are checked
    against the store, and only then is anything written: a refused recording leaves the
    store as it was. Later batches are written by a :class:`BackgroundWriter` while the
    next ones are computed. The epoch is marked complete at the end.

    Parameters
    ----------
    forward : callable
        ``forward(x) -> ({layer: ndarray}, model_output or None)``.
    batches : iterable of Batch
        From :func:`iter_array_batches` or :func:`number_batches`.
    store : str or ActivationWriter
        A path/URL (opened in mode ``"a"`` and closed at the end) or an open writer (left
        open; its model name wins over ``model_name``).
    model_name : str
        Model group name in the store.
    layers : sequence of str
        Resolved layer names (keys of ``forward``'s dict).
    epoch : int, default 0
        Epoch label.
    reduce : {"mean", "max", "none"}, default "mean"
        Pooling of conv maps.
    channel_axis : int or mapping of str to int, default 1
        Channel axis of outputs with spatial axes, for all layers or per layer.
    probe_ids, probe_labels : numpy.ndarray, optional
        The whole probe set, when known before iterating (checked against the store).
    n_samples : int, optional
        Number of samples, for the progress bar.
    batch_size : int, default 256
        Used to size coalesced writes.
    progress : bool, default True
        Show a tqdm progress bar.
    attrs : mapping, optional
        Attributes for the model group (e.g. ``{"framework": "torch"}``).
    scalars : mapping of str to float, optional
        Per-epoch scalars (loss, accuracy) stored with :meth:`ActivationWriter.log_epoch`.
    queue_size : int, default 4
        Bound of the background writer's queue.
    description : str
        Progress bar label.
    compressor : str, zarr codec or None, default "none"
        Codec of the activations of layers created by this recording when ``store`` is a path (see
        :class:`topoxr.ActivationWriter`): ``"none"``, ``"lz4"``, ``"zstd"``, ...
    dtype : {"float32", "float16"}, default "float32"
        Storage dtype of the activations of layers created by this recording.

    Returns
    -------
    RecordResult

    Raises
    ------
    RecordingError
        For bad input, detected before anything is written.
    topoxr.StoreError
        If the store refuses a write later on (committed batches stay readable and the
        run can be resumed).
    """
    from tqdm.auto import tqdm

    if reduce not in REDUCE_MODES:
        raise RecordingError(f"unknown reduce mode {reduce!r}; choose one of {list(REDUCE_MODES)}")
    if isinstance(epoch, bool) or not isinstance(epoch, int | np.integer) or epoch < 0:
        raise RecordingError(f"epoch must be an integer >= 0, got {epoch!r}")
    epoch = int(epoch)
    if isinstance(store, ActivationWriter):
        model_name = store.model
    elif not isinstance(model_name, str) or not model_name:
        raise RecordingError("model_name must be a non-empty string")
    batch_size = _check_batch_size(batch_size)

    iterator = iter(batches)
    first = next(iterator, None)
    if first is None:
        raise RecordingError("the data has no samples")
    outputs, final = forward(first.x)
    neurons = {}
    for layer in layers:
        try:
            reduced = reduce_units(outputs[layer], channel_axis=_axis_of(channel_axis, layer),
                                   reduce=reduce)
            neurons[layer] = reduced.values.shape[1]
        except ValueError as err:
            raise RecordingError(f"layer {layer!r}: {err}") from None
    check_against_store(
        stored_layers(store, model_name), model=model_name, neurons=neurons, reduce=reduce,
        epoch=epoch, ids=probe_ids, labels=probe_labels,
    )

    owns = not isinstance(store, ActivationWriter)
    writer = ActivationWriter(store, model=model_name, attrs=attrs, compressor=compressor,
                              dtype=dtype) if owns else store
    n_done = 0
    bar = tqdm(total=n_samples, desc=f"{description} {model_name} epoch {epoch}",
               unit="sample", disable=not progress, leave=False)
    try:
        with BackgroundWriter(writer, epoch=epoch, reduce=reduce, channel_axis=channel_axis,
                              queue_size=queue_size) as bg:
            bg.set_targets(neurons, batch_size)
            batch: Batch | None = first
            while batch is not None:
                if batch is not first:
                    outputs, final = forward(batch.x)
                preds = _predictions(final) if batch.labels is not None else None
                bg.submit({k: outputs[k] for k in layers}, batch.ids, batch.labels, preds,
                          batch.metadata)
                n_done += len(batch)
                bar.update(len(batch))
                batch = next(iterator, None)
        writer.complete_epoch(epoch, layers)
        if scalars:
            writer.log_epoch(epoch, **{k: float(v) for k, v in scalars.items()})
        written = bg.written
    except BaseException as err:
        if owns:
            writer.__exit__(type(err), err, None)
        raise
    else:
        if owns:
            writer.close()
    finally:
        bar.close()
    logger.info("recorded %d samples of %s for model %r epoch %d into %s",
                n_done, layers, model_name, epoch, writer.url)
    return RecordResult(store=writer.url, model=model_name, layers=list(layers), epoch=epoch,
                        samples=n_done, written=written)
