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

import logging
import queue
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from types import ModuleType
from typing import Any

import numpy as np

from topoxr._codecs import DEFAULT_COMPRESSOR
from topoxr.conventions import ATTR_LAYER, ATTR_MODEL
from topoxr.reduction import (
    ATTR_MASKED,
    ATTR_NEURON_AXIS,
    ATTR_OUTPUT_SHAPE,
    ATTR_REDUCED_AXES,
    DEFAULT_MASK,
    MASKED_REDUCTIONS,
    REDUCE_CHOICES,
    LayerSpec,
    RecordingError,
    describe_reduction,
    reduce_layer,
    reduction_attrs,
    resolve_layer_specs,
    second_sequence,
    token_info,
)
from topoxr.store import ActivationWriter
from topoxr.store.reader import read_model_layers
from topoxr.store._schema import _TARGET_CHUNK_BYTES, epoch_scalar_values, valid_column_name

__all__ = [
    "ADAPTER_GROUP",
    "BackgroundWriter",
    "Batch",
    "ForwardFn",
    "LayerPlan",
    "LayerSpec",
    "RecordResult",
    "RecordingError",
    "StoredLayer",
    "available_adapters",
    "check_against_store",
    "check_recorded_epoch",
    "completed_epochs",
    "get_adapter",
    "iter_array_batches",
    "n_inputs",
    "number_batches",
    "positional_mask_length",
    "positional_mask_message",
    "prepare_arrays",
    "resolve_layer_specs",
    "resolve_layers",
    "run_recording",
    "stored_layers",
    "stored_unless_recorded",
    "take_inputs",
]

logger = logging.getLogger(__name__)

#: Entry-point group under which recording adapters register their import package.
ADAPTER_GROUP = "topoxr.adapters"

#: Target bytes (float32 values) of one write of a layer after its first: the store's
#: own chunk target, so that writes end about where the store's chunks end.
WRITE_BYTES = _TARGET_CHUNK_BYTES
#: Chunks of that size per later write.
CHUNKS_PER_WRITE = 1

#: ``forward(x) -> ({layer: array (batch, ...)}, model output (batch, ...) or None)``.
ForwardFn = Callable[[Any], tuple[dict[str, np.ndarray], "np.ndarray | None"]]


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
        If ``requested`` is empty or a name or pattern matches nothing; the message gives
        the three closest names and the number of layers.

    Examples
    --------
    >>> resolve_layers(["fc*"], ["fc1", "relu1", "fc2", "out"])
    ['fc1', 'fc2']
    """
    if isinstance(requested, str):
        requested = [requested]
    return list(resolve_layer_specs(list(requested), available, what=what))


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


def n_inputs(x: Any) -> int:
    """Number of inputs in ``x``: an array, or a mapping/tuple of arrays batched alike.

    Parameters
    ----------
    x : array_like, mapping or tuple
        An array with the samples on its first axis, or a mapping (e.g. a tokenizer's
        output) or tuple of such arrays, nested as the model takes them.

    Returns
    -------
    int
        The length of the first axis, the same for every entry.

    Raises
    ------
    RecordingError
        If ``x`` has no first axis, or the entries of a mapping or tuple differ in length.
    """
    if isinstance(x, Mapping) or (isinstance(x, tuple | list) and not hasattr(x, "shape")):
        entries = dict(x) if isinstance(x, Mapping) else dict(enumerate(x))
        if not entries:
            raise RecordingError("the inputs are an empty mapping or tuple")
        sizes = {k: n_inputs(v) for k, v in entries.items()}
        if len(set(sizes.values())) > 1:
            raise RecordingError(f"the entries of the inputs differ in length: {sizes}; they "
                                 "must be batched along their first axis")
        return next(iter(sizes.values()))
    shape = getattr(x, "shape", None)
    if shape is None or len(shape) < 1:
        raise RecordingError(
            f"inputs must be an array with the samples on the first axis (or a mapping or "
            f"tuple of such arrays), got {type(x).__name__}"
        )
    return int(shape[0])


def take_inputs(x: Any, sl: slice) -> Any:
    """Slice inputs (an array, or a mapping/tuple of arrays) along their first axis.

    Parameters
    ----------
    x : array_like, mapping or tuple
        Inputs as :func:`n_inputs` takes them.
    sl : slice
        The samples to take.

    Returns
    -------
    array_like, mapping or tuple
        ``x`` with every array sliced, of the same kind (a mapping stays a mapping with
        the same keys, a tuple or list the same type).
    """
    if isinstance(x, Mapping):
        return {k: take_inputs(v, sl) for k, v in x.items()}
    if isinstance(x, tuple | list) and not hasattr(x, "shape"):
        return type(x)(take_inputs(v, sl) for v in x)
    return x[sl]


def positional_mask_length(inputs: Any,
                           to_numpy: Callable[[Any], np.ndarray | None] | None = None
                           ) -> int | None:
    """``T`` where ``inputs`` are positional inputs whose second looks like the attention
    mask of the first, ``(batch, T)`` integer token ids; else None.

    An attention mask is known only by its key in a mapping (``attention_mask``, which
    masks the token reductions, see :func:`~topoxr.reduction.token_info`): a tuple passes
    it to the model, but the recording cannot know it from, say, token type ids, so the
    token reductions would take the padding in. It looks like one where it has the ids'
    shape and holds only 0 and 1 (booleans, integers or floats). The adapters refuse a
    token reduction of a layer whose ``(N, T, H)`` output has the ids' ``T`` over such
    inputs (:func:`positional_mask_message`).

    Parameters
    ----------
    inputs : tuple or list
        One batch of a model's positional inputs (a mapping is named inputs: None).
    to_numpy : callable, optional
        The adapter's conversion of a framework tensor to numpy (None where it holds no
        plain array); without it, only numpy arrays are taken for ids and mask.

    Returns
    -------
    int or None
        The ids' length ``T``; None for a mapping, fewer than two inputs, or inputs that
        do not look so.
    """
    if isinstance(inputs, Mapping) or not isinstance(inputs, tuple | list) or len(inputs) < 2:
        return None
    ids, mask = (inputs[0], inputs[1]) if to_numpy is None else (to_numpy(inputs[0]),
                                                                 to_numpy(inputs[1]))
    if (not isinstance(ids, np.ndarray) or not isinstance(mask, np.ndarray) or ids.ndim != 2
            or ids.dtype.kind not in "iu" or mask.shape != ids.shape
            or mask.dtype.kind not in "biuf"):
        return None
    return int(ids.shape[1]) if bool(np.isin(mask, (0, 1)).all()) else None


def positional_mask_message(
    layer: str, reduce: str, length: int, *,
    mapping: str = ("passed as keyword arguments; its attention_mask masks the token "
                    "reductions"),
    not_a_mask: str = "pass the inputs as a mapping of the forward's parameter names, or ",
) -> str:
    """Why a token reduction of ``layer`` over positional inputs whose second looks like
    an attention mask is refused (see :func:`positional_mask_length`), and the ways out.

    A warning would let values reduced over padding into the store, where they look
    right (``topoxr_masked`` false is easily missed), and the store's layer cannot be
    recorded again with other values under its name: the adapters refuse it before
    anything is written.

    Parameters
    ----------
    layer : str
        The recorded layer's name.
    reduce : str
        Its reduce mode (one of :data:`~topoxr.reduction.MASKED_REDUCTIONS`).
    length : int
        The token ids' length ``T``.
    mapping : str, optional
        How the framework passes a mapping of inputs to the model (the default: torch's
        keyword arguments), put in parentheses after ``{'input_ids': ids,
        'attention_mask': mask}``.
    not_a_mask : str, optional
        What to do besides ``{'mask': False}`` where the second input is no attention
        mask, ending in ``"or "`` (empty: only that).

    Returns
    -------
    str
    """
    return (
        f"layer {layer!r}: reduce={reduce!r} over its {length} tokens, and the second "
        f"positional input looks like an attention mask of the first (the token ids: the "
        f"same shape, only 0 and 1), but a positional input cannot be known as one, so the "
        "padding would be reduced with the real tokens. Pass the inputs as a mapping, "
        f"{{'input_ids': ids, 'attention_mask': mask}} ({mapping}), or record this layer "
        "with reduce='none'; if the second input is no attention mask, "
        f"{not_a_mask}set {{{layer!r}: {{'mask': False}}}} to reduce over every token")


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
    data : array_like, mapping or tuple
        ``x`` or ``(x, y)``; ``x`` has the samples on its first axis: an array, a tensor,
        a mapping of them (tokenizer output: ``input_ids``, ``attention_mask``, ...) or,
        inside ``(x, y)`` or ``(x,)``, a tuple of them (positional model inputs). ``x`` is
        returned as given, so the framework converts it; a mapping's ``labels`` entry (a
        tokenizer batch with its labels) is taken as the labels, not as an input.
    labels : array_like, optional
        Labels when ``data`` has none, class indices (integers, ``(n,)`` or ``(n, 1)``)
        or names (strings). Giving both is an error.
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
        For lengths that differ, duplicate or non-integer ids, labels given twice, labels
        that are neither integers nor strings, or metadata names the store cannot take.
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
    if isinstance(x, Mapping) and "labels" in x:
        # a tokenizer's batch with its labels (Hugging Face's convention): labels, not an
        # input (the DataLoader path takes them out the same way)
        if y is not None or labels is not None:
            raise RecordingError("labels are given twice: in the inputs' 'labels' entry and "
                                 "as data=(x, y) or labels=")
        y = x["labels"]
        x = {k: v for k, v in x.items() if k != "labels"}
    if y is not None and labels is not None:
        raise RecordingError("labels are given twice: in data=(x, y) and as labels=")
    y = labels if y is None else y
    n = n_inputs(x)
    if n == 0:
        raise RecordingError("the data has no samples")
    y_arr = None if y is None else _labels_column(_to_numpy(y), n)
    if sample_ids is None:
        ids = np.arange(n, dtype=np.int64)
    else:
        ids = _check_ids(_column("sample_ids", sample_ids, n))
    meta = {str(k): _column(f"metadata {k!r}", _to_numpy(v), n)
            for k, v in (metadata or {}).items()}
    bad = [key for key in meta if not valid_column_name(key)]
    if bad:
        raise RecordingError(f"metadata {bad} cannot name columns: a column name is a Python "
                             "identifier and none of the store's own names (label, sample, "
                             "row, x, ...)")
    return x, y_arr, ids, meta


def _labels_column(values: Any, n: int) -> np.ndarray:
    """Labels as one value per sample: class indices (integers) or names (strings).

    ``(n, 1)`` labels (keras.datasets' CIFAR) are taken as ``(n,)``. Floats and booleans
    are refused here, before the model runs, as the store refuses them.
    """
    arr = np.asarray(values)
    if arr.ndim == 2 and arr.shape[1] == 1 and arr.shape[0] == n:
        arr = arr[:, 0]
    arr = _column("labels", arr, n)
    if arr.dtype.kind == "O" and all(isinstance(v, str) for v in arr.tolist()):
        arr = arr.astype(str)
    if arr.dtype.kind not in "iuU":
        raise RecordingError(
            f"labels must be integers or strings (class indices or names), got {arr.dtype}; "
            "cast class indices with .astype(int), and give other per-sample values (a "
            "regression target, a flag) as metadata=")
    return arr


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
    """Cut arrays prepared by :func:`prepare_arrays` into :class:`Batch` objects.

    Parameters
    ----------
    x : array_like, mapping or tuple
        The inputs, as :func:`n_inputs` takes them.
    ids : numpy.ndarray
        The stable id of every sample, ``(n,)``.
    labels : numpy.ndarray or None
        The label of every sample, ``(n,)``.
    metadata : mapping of str to numpy.ndarray
        Further per-sample columns, each ``(n,)``.
    batch_size : int
        Samples per batch (the last may hold fewer).

    Yields
    ------
    Batch
        Consecutive slices of every argument, in order.
    """
    batch_size = _check_batch_size(batch_size)
    for start in range(0, len(ids), batch_size):
        sl = slice(start, start + batch_size)
        yield Batch(
            x=take_inputs(x, sl), ids=ids[sl], labels=None if labels is None else labels[sl],
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

    Yields
    ------
    Batch
        Each batch with its inputs, ids, labels and metadata.

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
        n = n_inputs(x)
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
    #: The layer's attributes (its reduction: ``topoxr_reduce``, ``topoxr_neuron_axis``...).
    attrs: dict[str, Any] = field(default_factory=dict)
    #: The dtype of the stored values (``float32``, or ``float16`` stored to save bytes).
    dtype: str = "float32"


def stored_layers(store: str | ActivationWriter, model: str) -> dict[str, StoredLayer]:
    """Read the layers of ``model`` in a store: sizes, probe ids, epochs, labels.

    Parameters
    ----------
    store : str or ActivationWriter
        A path/URL (a store that does not exist yet holds nothing) or an open writer
        (whose model name wins over ``model``, as in :func:`run_recording`).
    model : str
        The model name.

    Returns
    -------
    dict
        Original layer name -> :class:`StoredLayer`.
    """
    url = store
    if isinstance(store, ActivationWriter):
        url, model = store.url, store.model
    try:
        layers = read_model_layers(url, model)
    except FileNotFoundError:
        return {}
    return {name: StoredLayer(
        n_neurons=info["n_neurons"], reduce=str(info["attrs"].get("topoxr_reduce", "mean")),
        sample_ids=info["sample_ids"], epochs=info["epochs"], complete=info["complete"],
        labels=info["labels"], attrs=info["attrs"], dtype=info["dtype"])
        for name, info in layers.items()}


def completed_epochs(store: Any, model: str, layers: Sequence[str], *,
                     stored: Mapping[str, StoredLayer] | None = None) -> list[int]:
    """Epochs that the store holds complete for every one of ``layers`` of ``model``.

    A recorder restarted from a checkpoint uses it to skip what is already recorded.

    Parameters
    ----------
    store : str or ActivationWriter
        A path/URL or an open writer (whose model name wins over ``model``).
    model : str
        Model name.
    layers : sequence of str
        Layer names.
    stored : mapping of str to StoredLayer, optional
        What :func:`stored_layers` read from the store for this model; read here when
        not given. A recorder that reads it once per epoch passes the same mapping here
        and to :func:`run_recording`, which then need not read the store again.

    Returns
    -------
    list of int
        Sorted epochs (empty when the store or model does not exist).
    """
    if stored is None:
        stored = stored_layers(store, model)
    done: set[int] | None = None
    for layer in layers:
        old = stored.get(layer)
        epochs = set() if old is None else {e for e, c in zip(old.epochs, old.complete,
                                                               strict=True) if c}
        done = epochs if done is None else done & epochs
    return sorted(done or ())


def stored_unless_recorded(store: Any, model: str, layers: Sequence[str],
                           epoch: int) -> dict[str, StoredLayer] | None:
    """What :func:`stored_layers` reads, or None where ``epoch`` is already recorded.

    A recorder calls it once per epoch, before recording: a run restarted from a
    checkpoint skips the epochs the store holds complete for every one of ``layers``
    (after :func:`check_recorded_epoch`), and for the others the one read of the store
    serves the recording's checks too (``stored=`` of :func:`run_recording`).

    Parameters
    ----------
    store : str or ActivationWriter
        A path/URL or an open writer (whose model name wins over ``model``).
    model : str
        Model name.
    layers : sequence of str
        The recorder's layer names.
    epoch : int
        The epoch about to be recorded.

    Returns
    -------
    dict or None
        Original layer name -> :class:`StoredLayer` (empty for a new store or model),
        or None where the epoch is complete for every one of ``layers``.
    """
    if isinstance(store, ActivationWriter):
        model = store.model  # as stored_layers reads it
    stored = stored_layers(store, model)
    if epoch in completed_epochs(store, model, layers, stored=stored):
        return None
    return stored


def check_recorded_epoch(record: Callable[[Iterable[Batch], str, Mapping[str, StoredLayer]], Any],
                         batches: Iterable[Batch], store: Any, *, model: str,
                         layers: Sequence[str], epoch: int, hint: str = "") -> None:
    """Check that the model being recorded is the one that recorded ``epoch``, before a
    recorder skips it.

    An epoch the store holds complete is skipped by a run restarted from a checkpoint,
    where the model is the one that recorded it. Another run into the same store and
    model name (a new seed, a second ``fit`` numbering its epochs from 0 again) is not:
    skipping would keep the other run's values under this run's name without a word.
    The first batch is recorded into a scratch store in memory, checked against what
    ``store`` holds (as any recording is: probe set, labels, reductions), and its values
    compared with the stored ones (within :data:`topoxr.store.RESUME_TOLERANCE`).
    Nothing is written to ``store``.

    Parameters
    ----------
    record : callable
        ``record(batches, scratch_url, stored)``: the recorder's recording of ``batches``
        as ``epoch`` into the store at ``scratch_url`` (:func:`run_recording` without
        scalars), checked against ``stored`` (what ``store`` holds).
    batches : iterable of Batch
        The probe set's batches; only the first is used.
    store : str or ActivationWriter
        The store holding the epoch (an open writer's model name wins over ``model``).
    model : str
        Model name.
    layers : sequence of str
        The recorder's layer names.
    epoch : int
        The epoch the store holds complete.
    hint : str, optional
        What the adapter adds to the error (e.g. how its epochs are numbered).

    Raises
    ------
    RecordingError
        If the model gives other values for the first batch than the store holds, or
        the recording does not fit the store.
    """
    import uuid

    import fsspec

    from topoxr.store import open_store
    from topoxr.store._plan import _same_values

    first = next(iter(batches), None)
    if first is None:
        return
    url = store.url if isinstance(store, ActivationWriter) else store
    if isinstance(store, ActivationWriter):
        model = store.model
    scratch = f"memory://topoxr-check-{uuid.uuid4().hex}.zarr"
    try:
        stored = stored_layers(store, model)
        record([first], scratch, stored)
        fresh = _layer_nodes(open_store(scratch), None)  # the scratch store's one model
        held = _layer_nodes(open_store(url), model)
        for layer in layers:
            new = fresh[layer].activation.isel(epoch=0)
            missing = np.setdiff1d(new.sample.values, held[layer].sample.values)
            if len(missing):  # the tokens of a masked per-token layer are known only now
                raise RecordingError(
                    f"epoch {epoch} of model {model!r} is already recorded, but layer "
                    f"{layer!r} now gives samples the store does not hold "
                    f"({missing[:10].tolist()}): the probe set (or its attention mask) "
                    "differs from the one recorded")
            old = held[layer].activation.sel(epoch=epoch, sample=new.sample.values)
            old_values = np.asarray(old.transpose("sample", "neuron").values)
            new_values = np.asarray(new.transpose("sample", "neuron").values, np.float32)
            dtype = np.dtype(stored[layer].dtype)  # read back as float32 either way
            if dtype.itemsize < 4:  # compared as stored, as the writer compares them
                new_values = new_values.astype(dtype).astype(np.float32)
            same, largest, scale = _same_values(old_values, new_values, dtype)
            if not same.all():
                bad = new.sample.values[~same.all(axis=1)]
                raise RecordingError(
                    f"epoch {epoch} of model {model!r} is already recorded, and the model "
                    f"now gives other values for the same probe samples (layer {layer!r}, "
                    f"samples {bad[:10].tolist()}: largest difference {largest:.3g}, where "
                    f"the stored values reach {scale:.3g}). It is not the model that "
                    "recorded them (another training run, or weights changed since): "
                    f"record it under another model_name or into another store{hint}")
    finally:
        fs = fsspec.filesystem("memory")
        if fs.exists(scratch):
            fs.rm(scratch, recursive=True)
    logger.info("epoch %d of model %r is already recorded (its first batch checked); "
                "skipped", epoch, model)


def _layer_nodes(tree: Any, model: str | None) -> dict[str, Any]:
    """The layer nodes of ``model`` (None: of any model) in an opened store, by original
    layer name."""
    return {layer.attrs[ATTR_LAYER]: layer.to_dataset()
            for node in tree.children.values()
            if model is None or node.attrs.get(ATTR_MODEL) == model
            for layer in node.children.values() if ATTR_LAYER in layer.attrs}


def check_against_store(
    stored: Mapping[str, StoredLayer],
    *,
    model: str,
    neurons: Mapping[str, int],
    reduce: str,
    epoch: int,
    ids: np.ndarray | None,
    labels: np.ndarray | None,
    reductions: Mapping[str, Mapping[str, Any]] | None = None,
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
    reductions : mapping, optional
        Per layer, the reduction attributes of this recording
        (:func:`topoxr.reduction.reduction_attrs` plus ``topoxr_reduce``).

    Raises
    ------
    RecordingError
        If a layer's reduction (mode, neuron axis, reduced axes, mask) or size differs,
        or the probe set differs from the
        samples of earlier epochs (a resumed epoch may only add the samples it lacks),
        or labels of known samples differ.
    """
    for layer, n in neurons.items():
        old = stored.get(layer)
        if old is None:
            continue
        where = f"layer {layer!r} of model {model!r}"
        new = dict((reductions or {}).get(layer, {"topoxr_reduce": reduce}))
        new.setdefault("topoxr_reduce", reduce)
        old_attrs = {"topoxr_reduce": old.reduce, **old.attrs}
        keys = ["topoxr_reduce"] + ([ATTR_NEURON_AXIS, ATTR_REDUCED_AXES, ATTR_MASKED]
                                    if ATTR_NEURON_AXIS in old_attrs and ATTR_NEURON_AXIS in new
                                    else [])
        if any(_plain(old_attrs.get(k)) != _plain(new.get(k)) for k in keys):
            raise RecordingError(
                f"{where} was recorded with {describe_reduction(old_attrs)}; this recording "
                f"asks for {describe_reduction(new)}. Record it with the stored reduction, or "
                "under another model name to keep both"
            )
        if old.n_neurons != n:
            raise RecordingError(
                f"{where} has {old.n_neurons} neurons in the store but {n} now; a different "
                "architecture needs another model name (or mode='w' on the writer)"
            )
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


def _plain(value: Any) -> Any:
    """Attribute values compare alike whether read back (lists) or fresh (tuples, numpy)."""
    if isinstance(value, list | tuple | np.ndarray):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


# --------------------------------------------------------------------------------------
# Per-layer plans
# --------------------------------------------------------------------------------------
@dataclass
class LayerPlan:
    """How one layer is recorded: its reduce mode and neuron axis, decided once.

    Attributes
    ----------
    reduce : str
        One of :data:`topoxr.reduction.REDUCE_CHOICES`.
    neuron_axis : int
        Axis of the neurons in the layer's output.
    rule : str
        How the axis was chosen, stored as ``topoxr_axis_rule``.
    attrs : dict
        The layer attributes stored at creation and compared on resume.
    mask_key : str or None
        The key of the inputs' attention mask the layer's tokens follow (None: none).
    """

    reduce: str
    neuron_axis: int
    rule: str
    attrs: dict[str, Any] = field(default_factory=dict)
    mask_key: str | None = None

    @property
    def label(self) -> str:
        """The ``reduce`` label handed to the writer."""
        return self.reduce


def _plan_layers(
    layers: Sequence[str],
    outputs: Mapping[str, np.ndarray],
    *,
    reduce: str,
    specs: Mapping[str, LayerSpec],
    channel_axis: int | Mapping[str, int],
    axis_rules: Mapping[str, str],
    inputs: Any,
) -> tuple[dict[str, LayerPlan], dict[str, int]]:
    """Decide each layer's plan from its first batch (``inputs``: the batch's inputs, for
    the attention masks); check the plan can apply."""
    plans, neurons = {}, {}
    for layer in layers:
        if layer not in outputs:
            raise RecordingError(f"layer {layer!r} produced no output to record")
        out = np.asarray(outputs[layer])
        spec = specs.get(layer, LayerSpec())
        mode = spec.reduce or reduce
        if spec.channel_axis is not None:
            axis, rule = int(spec.channel_axis), "channel_axis set by the user"
        else:
            axis = channel_axis if isinstance(channel_axis, int) else channel_axis.get(layer, -1)
            rule = axis_rules.get(layer, "adapter default")
        if out.ndim == 2:
            if mode in ("first", "last") and spec.reduce is not None:
                raise RecordingError(
                    f"layer {layer!r}: reduce={mode!r} needs a (batch, tokens, hidden) output, "
                    f"got shape {out.shape}"
                )
            if mode in ("first", "last"):
                mode = "none"  # a (batch, neurons) output has nothing to reduce
            axis, rule = 1, "(batch, neurons) output"
        sequence = out.ndim == 3 and axis % 3 == 2
        mask_key = _mask_key(layer, spec, inputs, sequence and mode in MASKED_REDUCTIONS)
        mask, token_ids = token_info(inputs, mask_key)
        try:
            reduced = reduce_layer(out, layer=layer, neuron_axis=axis, reduce=mode,
                                   mask=mask, token_ids=token_ids)
        except ValueError as err:
            raise RecordingError(str(err)) from None
        n = reduced.values.shape[1] if reduced.values.ndim == 2 else int(
            np.prod(reduced.values.shape[1:]))
        masked = mask is not None and sequence and mode in MASKED_REDUCTIONS
        attrs = reduction_attrs(out.shape, neuron_axis=axis, reduce=mode, masked=masked,
                                rule=rule)
        attrs["topoxr_reduce"] = mode
        plans[layer] = LayerPlan(mode, axis % out.ndim, rule, attrs, mask_key)
        neurons[layer] = n
    return plans, neurons


def _mask_key(layer: str, spec: LayerSpec, inputs: Any, masks: bool) -> str | None:
    """The key of the attention mask ``layer``'s tokens follow (None: none).

    Where the inputs hold a second token sequence (an encoder-decoder model's
    ``decoder_input_ids``...), the tokens of a layer could follow either mask, and the
    wrong one gives values that look right: the layer must say (``mask=``).
    """
    if spec.mask is False:
        return None
    if isinstance(spec.mask, str):
        if not isinstance(inputs, Mapping) or spec.mask not in inputs:
            have = sorted(map(str, inputs)) if isinstance(inputs, Mapping) else []
            raise RecordingError(f"layer {layer!r}: mask {spec.mask!r} is not among the "
                                 f"inputs ({have or 'not a mapping'})")
        return spec.mask
    second = second_sequence(inputs)
    if masks and second:
        raise RecordingError(
            f"layer {layer!r}: the inputs hold two token sequences (an encoder's, with "
            f"attention_mask, and a decoder's: {second}), and which one this layer's "
            "tokens belong to is not known. Say it per layer: {'mask': 'attention_mask'} "
            "for encoder layers, {'mask': 'decoder_attention_mask'} for decoder layers, "
            "or {'mask': False} for none")
    return DEFAULT_MASK


def _pooled_by_capture(plan: LayerPlan, output: Any) -> tuple[int, str] | None:
    """``(neuron axis, "mean" or "max")`` where a capture that pools (a ``pool`` dict,
    see :func:`run_recording`) pools the layer's maps itself, else None."""
    if (plan.reduce in ("mean", "max") and not _is_sequence(plan) and np.ndim(output) > 2
            and not plan.attrs.get(ATTR_MASKED)):
        return plan.neuron_axis, plan.reduce
    return None


def _handed_axis(plan: LayerPlan, raw: np.ndarray) -> int:
    """Neuron axis of a layer's array as the forward function handed it over.

    The plan's, of the layer's output. A capture that pools the layer itself (see
    :func:`_pooled_by_capture`) hands it over with the output's rank (Keras: every
    pooled axis kept with length 1, the neurons where the output has them) or as
    ``(batch, neurons, 1)`` (torch): of a lower rank than the output, its neurons on
    axis 1 whichever axis held them in the output (``channel_axis=2`` of an
    ``(N, C, H, W)`` map, or a channels-last one).
    """
    rank = len(plan.attrs.get(ATTR_OUTPUT_SHAPE, ())) + 1
    if (raw.ndim < rank and plan.reduce in ("mean", "max") and not _is_sequence(plan)
            and not plan.attrs.get(ATTR_MASKED)):
        return 1
    return plan.neuron_axis


def _is_sequence(plan: LayerPlan) -> bool:
    """A ``(batch, tokens, hidden)`` output: its neurons are hidden units, not channels."""
    return len(plan.attrs.get("topoxr_output_shape", ())) == 2 and plan.neuron_axis == 2


def _token_sample_ids(ids: np.ndarray, source: np.ndarray, position: np.ndarray,
                      n_tokens: int) -> np.ndarray:
    """Stable id of token ``t`` of the input with id ``s``: ``s * T + t``."""
    return ids[source] * np.int64(n_tokens) + position


def _check_node_names(layers: Sequence[str], stored: Mapping[str, StoredLayer],
                      model: str) -> None:
    """Refuse layers whose store nodes would collide, before anything is written.

    A layer's node is its name made safe for every store (``"dense:1"``, a module's
    second call, becomes ``dense_1``, which Keras names its second Dense layer): the
    writer refuses the second of two such layers only when it first writes it, after
    the first is stored.
    """
    from topoxr.store import safe_node_name

    owner: dict[str, str] = {}
    for layer in [*stored, *layers]:
        node = safe_node_name(layer)
        other = owner.setdefault(node, layer)
        if other != layer:
            raise RecordingError(
                f"layers {other!r} and {layer!r} of model {model!r} would both be stored as "
                f"node {node!r} (names are made safe for every store: ':' becomes '_'); "
                "record one of them under another model name, or leave it out")


def _token_inputs(x: Any, mask_keys: set[str | None]) -> tuple[Any, Any]:
    """The attention mask and token ids of a batch (:func:`token_info`), or, where the
    layers follow several masks, ``{mask key: mask}`` and ``{mask key: token ids}``."""
    if len(mask_keys) <= 1:
        return token_info(x, next(iter(mask_keys), DEFAULT_MASK))
    pairs = {key: token_info(x, key) for key in mask_keys}
    return {k: v[0] for k, v in pairs.items()}, {k: v[1] for k, v in pairs.items()}


def _check_padded_length(plans: Mapping[str, LayerPlan], outputs: Mapping[str, Any],
                         padded: dict[str, int], ids: np.ndarray, model: str) -> None:
    """Refuse a batch whose per-token layer is padded to another length than the first's.

    Token ``t`` of input ``s`` is sample ``s * T + t`` (:func:`_token_sample_ids`), ``T``
    the padded length: with another ``T`` per batch the ids collide. ``padded`` holds
    each per-token layer's ``T`` of the first batch (entered at the first call).
    """
    for layer, plan in plans.items():
        if plan.reduce != "tokens":
            continue
        n_tokens = int(np.shape(outputs[layer])[1])
        first = padded.setdefault(layer, n_tokens)
        if n_tokens != first:
            raise RecordingError(
                f"layer {layer!r} of model {model!r}: reduce='tokens' numbers token t of "
                "input s as sample s * T + t, T the padded length of the layer's output, "
                f"which is {first} in the first batch but {n_tokens} in the batch of samples "
                f"{int(ids[0])}..{int(ids[-1])}: the token ids would collide. Pad every "
                "batch to one length (e.g. the tokenizer's padding='max_length' with one "
                "max_length, not each batch's longest sequence). The batches before this "
                "one may be stored already, their epoch incomplete: record again under "
                "another model name (or into a new store)")


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
    slow store slows the producer down instead of piling up. Each layer is reduced on the
    thread by its :class:`LayerPlan` (:func:`topoxr.reduction.reduce_layer`). Batches are
    coalesced into writes that end on chunk boundaries (whole batches adding up to about
    ``write_bytes``), ``chunks_per_write`` chunks at a time, and the rest at
    :meth:`close`; the first write creates the layer in the store, with the plan's
    attributes and chunks sized from the batch size (``batch_rows``), not from the rows
    that write joins. (Per-token layers have their first batch written at once, see
    :meth:`_due`.) A probe set smaller than a chunk is thus handed over whole, once, at
    the end: no partial buffer is copied into another. The first error of the thread is
    raised in the caller at the next :meth:`submit` or at :meth:`close`.

    Parameters
    ----------
    writer : ActivationWriter
        An open writer; only the background thread uses it while this object is open.
    epoch : int
        Epoch label of every batch.
    plans : mapping of str to LayerPlan
        How each layer is reduced.
    queue_size : int, default 4
        Batches that may wait in the queue.
    write_bytes : int, default 4 MiB (the store's chunk target)
        Target size of one chunk per layer.
    chunks_per_write : int, default 1
        Chunks per later write.
    """

    def __init__(
        self,
        writer: ActivationWriter,
        *,
        epoch: int,
        plans: Mapping[str, LayerPlan],
        queue_size: int = 4,
        write_bytes: int = WRITE_BYTES,
        chunks_per_write: int = CHUNKS_PER_WRITE,
    ) -> None:
        self._writer = writer
        self._epoch = epoch
        self._plans = dict(plans)
        self._write_bytes = write_bytes
        self._chunks_per_write = max(1, int(chunks_per_write))
        self._rows_written: dict[str, int] = {}
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=queue_size)
        self._pending: dict[str, _Pending] = {}
        self._targets: dict[str, int] = {}
        self._first_batch_rows: int | None = None
        self._error: BaseException | None = None
        self._closed = False
        #: Samples written (per layer, summed) and number of write calls, for inspection.
        self.written = 0
        self.writes = 0
        self._thread = threading.Thread(target=self._run, name="topoxr-writer", daemon=True)
        self._thread.start()

    def set_targets(self, neurons: Mapping[str, int], batch_size: int, *,
                    first_batch: int | None = None) -> None:
        """Rows per write for each layer: whole batches adding up to ``write_bytes``.

        ``first_batch``: the rows of the first batch (default ``batch_size``), the batch
        size the store sizes a new layer's chunks from (``batch_rows``), as it did when
        that batch was written alone.

        Parameters
        ----------
        neurons : mapping of str to int
            Neurons of each layer (values per row once reduced). Each layer's target
            (its chunk, in rows) is the largest multiple of ``batch_size`` whose rows, at
            the bytes a value takes in the store (:meth:`ActivationWriter.value_bytes`:
            2 for ``float16``), fit in ``write_bytes``, and at least one batch. A layer
            left out keeps its earlier target, or without one has every batch written at
            once.
        batch_size : int
            Rows per batch.
        first_batch : int, optional
            Rows of the first batch, passed to the store as ``batch_rows`` when a layer
            (other than a per-token one) is created; default ``batch_size``.
        """
        self._first_batch_rows = batch_size if first_batch is None else first_batch
        for layer, n in neurons.items():
            row_bytes = self._writer.value_bytes(layer) * n
            self._targets[layer] = batch_size * max(1, self._write_bytes // (batch_size * row_bytes))

    def _due(self, layer: str, pending_rows: int) -> bool:
        """Whether the pending rows of ``layer`` reach its next write boundary.

        Writes end on chunk boundaries (the chunk of ``set_targets``), ``chunks_per_write``
        chunks at a time; the store sizes a layer's chunks from the batch size it is
        told (``batch_rows``), so that its chunks are those of ``set_targets`` however
        many batches its first write joins. A layer of per-token rows (as many rows per
        batch as kept tokens) has its first batch written at once instead: the store
        sizes its chunks from that batch.
        """
        if layer not in self._rows_written and _is_sequence(self._plans[layer]):
            return True
        chunk = self._targets.get(layer, 0)
        if chunk <= 0:
            return True
        done = self._rows_written.get(layer, 0)
        boundary = chunk if done < chunk else (done // chunk + self._chunks_per_write) * chunk
        return done + pending_rows >= boundary

    def submit(
        self,
        outputs: Mapping[str, np.ndarray],
        ids: np.ndarray,
        labels: np.ndarray | None,
        predictions: np.ndarray | None,
        metadata: Mapping[str, np.ndarray],
        mask: np.ndarray | None = None,
        token_ids: np.ndarray | None = None,
    ) -> None:
        """Queue one batch of every layer; blocks while the queue is full.

        The batch is reduced and written later, on the background thread.

        Parameters
        ----------
        outputs : mapping of str to numpy.ndarray
            Each layer's output for the batch, ``(batch, ...)``, before reduction (or as
            the capture pooled it); every layer must have a plan.
        ids : numpy.ndarray
            Sample ids of the batch's rows, ``(batch,)``.
        labels : numpy.ndarray or None
            Label of each sample, or None.
        predictions : numpy.ndarray or None
            Prediction of each sample, or None.
        metadata : mapping of str to numpy.ndarray
            Per-sample columns, each ``(batch,)``.
        mask : numpy.ndarray or mapping, optional
            Attention mask ``(batch, T)`` of the inputs (1 = real token), applied to the
            layers whose plan is masked; or ``{mask key: mask}`` where layers follow
            several (:attr:`LayerPlan.mask_key`).
        token_ids : numpy.ndarray or mapping, optional
            Token ids ``(batch, T)`` of the inputs, for the ``token_id`` coordinate of
            per-token layers (a mapping as ``mask``).

        Raises
        ------
        Exception
            The error that stopped the background thread, if any.
        """
        self._raise_pending()
        item = (dict(outputs), ids, labels, predictions, dict(metadata), mask, token_ids)
        while True:
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                self._raise_pending()

    def close(self, *, flush: bool = True) -> None:
        """Write what is pending (unless ``flush=False``), stop the thread, raise its error.

        Waits for the thread to end. Closing again does nothing.

        Parameters
        ----------
        flush : bool, default True
            Write the batches still queued or pending. False drops them (what was
            written already stays); the thread's error is then raised only where it had
            failed already, or fails on the batch it is writing when ``close`` is called.

        Raises
        ------
        Exception
            The error that stopped the background thread, if any and not raised already.
        """
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
            # consumed: not held while waiting for the next batch (see run_recording)
            item = None
        if self._error is None:
            try:
                for layer in list(self._pending):
                    self._flush(layer)
            except BaseException as err:
                self._error = err

    def _add(self, outputs, ids, labels, predictions, metadata, mask, token_ids) -> None:
        for layer, raw in outputs.items():
            plan = self._plans[layer]
            raw = np.asarray(raw)
            layer_mask = mask.get(plan.mask_key) if isinstance(mask, Mapping) else mask
            layer_ids = (token_ids.get(plan.mask_key) if isinstance(token_ids, Mapping)
                         else token_ids)
            reduced = reduce_layer(raw, layer=layer, neuron_axis=_handed_axis(plan, raw),
                                   reduce=plan.reduce,
                                   mask=layer_mask if plan.attrs.get(ATTR_MASKED) else None,
                                   token_ids=layer_ids)
            values = reduced.values
            if raw.ndim > 2 and plan.reduce in ("mean", "max") and not _is_sequence(plan):
                # (batch, channel, 1): the store's pooling of one position is the identity
                # and still records the neuron's channel coordinate.
                values = values[:, :, np.newaxis]
            rows_ids, rows_labels, rows_preds, rows_meta = ids, labels, predictions, metadata
            if reduced.source is not None:
                src = reduced.source
                rows_ids = _token_sample_ids(ids, src, reduced.token_position, raw.shape[1])
                rows_labels = None if labels is None else labels[src]
                rows_preds = None if predictions is None else predictions[src]
                rows_meta = {k: v[src] for k, v in metadata.items()}
                rows_meta["input"] = ids[src]
                rows_meta["token_position"] = reduced.token_position
                if reduced.token_id is not None:
                    rows_meta["token_id"] = reduced.token_id
            pending = self._pending.setdefault(layer, _Pending())
            pending.parts.append((values, rows_ids, rows_labels, rows_preds, rows_meta))
            pending.rows += len(rows_ids)
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
        plan = self._plans[layer]
        self._rows_written[layer] = self._rows_written.get(layer, 0) + pending.rows
        self.writes += 1
        # batches joined here are new memory that only this thread holds: the writer's
        # buffer may take them as they are (a single batch may be the forward's array)
        write = self._writer.write_handed_over if len(parts) > 1 else self._writer.write
        self.written += write(
            layer, values, sample=cat(1), label=cat(2), prediction=cat(3), epoch=self._epoch,
            channel_axis=1 if values.ndim > 2 else None, reduce=plan.label,
            layer_attrs=plan.attrs,
            batch_rows=None if _is_sequence(plan) else self._first_batch_rows, **meta,
        )


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
    seconds: float = 0.0

    def __repr__(self) -> str:
        return (f"RecordResult(model={self.model!r}, layers={self.layers}, epoch={self.epoch}, "
                f"samples={self.samples}, store={self.store!r})")


def _predictions(output: Any, threshold: float = 0.0) -> np.ndarray | None:
    """Default predictions of a batch, or None where its output gives none.

    The argmax of a ``(batch, classes)`` output; ``output > threshold`` of one column,
    ``(batch, 1)`` or ``(batch,)`` (0 for logits, 0.5 for probabilities).
    """
    if output is None:
        return None
    out = np.asarray(output)
    if out.ndim == 2 and out.shape[1] > 1:
        return out.argmax(axis=1).astype(np.int64)
    if _one_column(out):
        return (out.reshape(-1) > threshold).astype(np.int64)
    return None


def _one_column(out: np.ndarray) -> bool:
    return out.ndim == 1 or (out.ndim == 2 and out.shape[1] == 1)


class _PredictionRule:
    """How each batch's predictions are derived; warns once where none are stored.

    ``predict=`` where given. Otherwise the default (:func:`_predictions`), decided at
    the first batch with labels: none where the adapter says why it cannot tell
    (``unavailable``: several outputs), the labels are not integers (class indices
    never equal them), or the output holds no scores (integers); for one column, none
    where the first batch's labels are other than 0 and 1, else the threshold 0.5 where
    the output is known to be a probability (``probabilities``, asked then: after the
    first forward pass), else 0, with a warning where that column of the first batch
    lies in [0, 1].
    """

    def __init__(self, *, model: str, predict: Callable[[Any], Any] | None,
                 probabilities: bool | Callable[[], bool],
                 unavailable: str | None) -> None:
        self._model = model
        self._predict = predict
        self._probabilities = probabilities
        self._unavailable = unavailable
        self._decided = False
        self._why: str | None = None  # why no predictions are stored (warned once)
        self._warned = False
        self._threshold = 0.0

    def __call__(self, final: Any, labels: np.ndarray, n: int) -> np.ndarray | None:
        """The predictions of a batch of ``n`` inputs with ``labels``, or None."""
        if self._predict is not None:
            preds = np.asarray(self._predict(final))
            if preds.shape != (n,):
                raise RecordingError(
                    f"predict= returned shape {preds.shape} for a batch of {n} inputs; it "
                    f"must return one prediction per input, shape ({n},)")
            return preds
        if not self._decided:
            self._decided = True
            self._decide(final, labels)
        preds = None if self._why is not None else _predictions(final, self._threshold)
        if preds is None and self._why is None:
            self._why = (f"no prediction can be derived from the output of model "
                         f"{self._model!r} (shape {np.shape(final)})")
        if preds is None and not self._warned:
            self._warned = True
            warnings.warn(
                f"labels were given but {self._why}; predictions and 'correct' are not "
                "stored. Pass predict= to derive them", UserWarning, stacklevel=4)
        return preds

    def _decide(self, final: Any, labels: np.ndarray) -> None:
        if self._unavailable is not None:
            self._why = self._unavailable
            return
        if labels.dtype.kind not in "iu":
            self._why = (
                f"they are not integers (dtype {labels.dtype}), while the default "
                f"predictions of model {self._model!r} are class indices (the argmax of "
                "its output, or its one column thresholded), which never equal them")
            return
        out = None if final is None else np.asarray(final)
        if out is not None and out.dtype.kind not in "fc":
            self._why = (
                f"the output of model {self._model!r} holds {out.dtype} values, not scores: "
                "no argmax or threshold of them is a prediction (where they are class "
                "indices already, pass predict=lambda out: out)")
            return
        if out is None or not _one_column(out):
            return
        others = np.setdiff1d(labels, [0, 1])
        if len(others):
            self._why = (
                f"the output of model {self._model!r} is one column, whose default "
                "predictions (the column thresholded) are 0 or 1, while the labels hold "
                f"{others[:5].tolist()}: 'correct' would be wrong for those")
            return
        probabilities = self._probabilities
        if callable(probabilities):
            probabilities = probabilities()
        if probabilities:
            self._threshold = 0.5
        elif out.size and bool(np.all((out >= 0) & (out <= 1))):
            warnings.warn(
                f"the output of model {self._model!r} is one column whose values in the "
                "first batch all lie in [0, 1]: it looks like probabilities, but it is not "
                "known to come from a sigmoid, so it is taken for logits and the "
                "predictions are output > 0 (nearly all 1). Pass predict= to set the rule, "
                "e.g. predict=lambda p: (p.reshape(-1) > 0.5).astype(int)",
                UserWarning, stacklevel=5)


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
    specs: Mapping[str, LayerSpec] | None = None,
    axis_rules: Mapping[str, str] | None = None,
    predict: Callable[[Any], Any] | None = None,
    probabilities: bool | Callable[[], bool] = False,
    no_default_predictions: str | None = None,
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
    stored: Mapping[str, StoredLayer] | None = None,
) -> RecordResult:
    """Record the outputs of ``layers`` over ``batches`` into a store.

    The first batch is computed, each layer's reduction is decided from it (a
    :class:`LayerPlan`) and checked, together with the whole probe set, against the
    store, and only then is anything written: a refused recording leaves the store as it
    was. Later batches are written by a :class:`BackgroundWriter` while the next ones are
    computed. The epoch is marked complete at the end.

    Parameters
    ----------
    forward : callable
        ``forward(x) -> ({layer: ndarray}, model_output or None)``. The arrays it
        returns are the recording's from then on (they are written later, on another
        thread): it must not change them afterwards (it returns copies of buffers it
        reuses). Where it has a ``pool`` dict, the layers whose plan pools conv maps
        are entered in it after the first call, as ``{layer: (neuron axis, "mean" or
        "max")}``, and later calls return them pooled, with every pooled axis of
        length 1. Where its ``plans_in_first_batch`` is true (it then has a ``pool``
        dict), its ``planner`` attribute is set for the first call: it calls
        ``planner(layer, first_sample)`` with each layer's output for the batch's
        first sample as the layer runs, and pools the layer at once (in this call and
        the later ones) where that returns ``(neuron axis, "mean" or "max")``. Where
        its ``plans_from_one_sample`` is true instead, the first call gets only the
        first sample of the first batch (the plans are made from it), and the whole
        first batch is then run again, pooled. Either way no layer's maps of a whole
        batch are ever copied out.
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
    reduce : str, default "mean"
        Default reduce mode (:data:`topoxr.reduction.REDUCE_CHOICES`); ``specs`` may
        set another per layer.
    channel_axis : int or mapping of str to int, default 1
        The adapter's neuron axis, for all layers or per layer; a mapping may be filled
        by the first call of ``forward`` (it is read after it).
    specs : mapping of str to LayerSpec, optional
        Per-layer settings (``reduce``, ``channel_axis``).
    axis_rules : mapping of str to str, optional
        How the adapter chose each layer's axis (stored as ``topoxr_axis_rule``); like
        ``channel_axis``, it may be filled by the first call of ``forward`` (the torch
        capture's ``rules``), so the mapping itself is read, never a copy.
    predict : callable, optional
        ``predict(model_output) -> (batch,) predictions``. By default (integer labels
        only: the predictions are class indices) the argmax of a ``(batch, classes)``
        output, softmax probabilities or logits alike, and for one column, ``(batch, 1)``
        or ``(batch,)``, ``output > 0.5`` where ``probabilities`` says it is a
        probability, else ``output > 0`` (logits).
    probabilities : bool or callable, default False
        Whether the model's output is known to be a probability (it ends in a sigmoid);
        a callable is asked once, after the first forward pass (a capture that learns it
        as the model runs).
    no_default_predictions : str, optional
        Why no default prediction can be derived from this model (e.g. ``"keras model
        'm' has 2 outputs ..."``): without ``predict`` no predictions are stored, and the
        warning gives this reason.
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
        Codec of the activations of layers created by this recording when ``store`` is a
        path (see :class:`topoxr.ActivationWriter`): ``"none"``, ``"lz4"``, ``"zstd"``, ...
    dtype : {"float32", "float16"}, default "float32"
        Storage dtype of the activations of layers created by this recording.
    stored : mapping of str to StoredLayer, optional
        What :func:`stored_layers` read from ``store`` for this model just before (a
        recorder that checked :func:`completed_epochs` with it): the recording is
        checked against it instead of reading the store again. The writer still loads
        the layers under its lock and refuses writes that do not fit them.

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

    Warns
    -----
    UserWarning
        Once, when labels are given but no default prediction can be derived
        (``no_default_predictions``, labels that are not integers, or an output that is
        neither ``(batch, classes)`` nor one column): pass ``predict=``. Once, when one
        column not known to be a probability lies in [0, 1] in the first batch (it is
        thresholded at 0 as logits; ``predict=`` sets the rule).
    """
    from tqdm.auto import tqdm

    if reduce not in REDUCE_CHOICES:
        raise RecordingError(
            f"unknown reduce mode {reduce!r}; choose one of {list(REDUCE_CHOICES)}")
    scalars = epoch_scalar_values(scalars or {}, RecordingError)
    if isinstance(epoch, bool) or not isinstance(epoch, int | np.integer) or epoch < 0:
        raise RecordingError(f"epoch must be an integer >= 0, got {epoch!r}")
    epoch = int(epoch)
    if isinstance(store, ActivationWriter):
        model_name = store.model
    elif not isinstance(model_name, str) or not model_name:
        raise RecordingError("model_name must be a non-empty string")
    batch_size = _check_batch_size(batch_size)
    started = time.perf_counter()

    iterator = iter(batches)
    first = next(iterator, None)
    if first is None:
        raise RecordingError("the data has no samples")
    pooled = getattr(forward, "pool", None)
    if isinstance(pooled, dict):
        pooled.clear()  # the plans are made from whole outputs
    # the plans need the outputs' shapes, not a whole batch of maps: they are made from
    # the first sample's outputs (their maps are small). An adapter that plans in the
    # first batch (``plans_in_first_batch``) hands each layer's first sample to a
    # planner as the layer runs and pools the rest of its output at once; one that
    # plans from one sample (``plans_from_one_sample``) runs the first sample alone
    # first. Either way the first batch is pooled as it is captured, as the others.
    planning: dict[str, Any] = {"specs": specs or {}, "channel_axis": channel_axis,
                                # the adapter's own mapping, not a copy: a capture fills it
                                # as its layers run (an empty one is no default to drop)
                                "axis_rules": {} if axis_rules is None else axis_rules}
    in_batch = (bool(getattr(forward, "plans_in_first_batch", False))
                and isinstance(pooled, dict))
    rerun_first = False  # whether the first batch is still to be run (planned on one sample)
    if in_batch:
        plans, neurons = {}, {}
        planning["inputs"] = take_inputs(first.x, slice(0, 1))

        def planner(layer: str, first_sample: np.ndarray) -> tuple[int, str] | None:
            plan, n = _plan_layers([layer], {layer: first_sample}, reduce=reduce,
                                   **planning)
            plans.update(plan)
            neurons.update(n)
            return _pooled_by_capture(plan[layer], first_sample)

        forward.planner = planner  # type: ignore[attr-defined]
        try:
            outputs, final = forward(first.x)
        finally:
            forward.planner = None  # type: ignore[attr-defined]
        unplanned = [layer for layer in layers if layer not in plans]
        if unplanned:
            raise RecordingError(f"layers {unplanned} were not planned in the first batch")
        plans = {layer: plans[layer] for layer in layers}
        neurons = {layer: neurons[layer] for layer in layers}
    else:
        rerun_first = (bool(getattr(forward, "plans_from_one_sample", False))
                       and len(first) > 1)
        planned_on = take_inputs(first.x, slice(0, 1)) if rerun_first else first.x
        outputs, final = forward(planned_on)
        planning["inputs"] = planned_on
        plans, neurons = _plan_layers(layers, outputs, reduce=reduce, **planning)
        if isinstance(pooled, dict):
            # The capture pools these layers itself, at once (no copy of whole maps); the
            # background writer then gets every pooled axis of length 1 (torch's capture:
            # (batch, channels, 1); Keras's: the output's rank, keepdims), which its own
            # pooling leaves as they are.
            pooled.update({layer: how for layer, plan in plans.items()
                           if (how := _pooled_by_capture(plan, outputs[layer])) is not None})
    if stored is None:
        stored = stored_layers(store, model_name)
    _check_node_names(layers, stored, model_name)
    reductions = {layer: plan.attrs for layer, plan in plans.items()}
    plain = [layer for layer, plan in plans.items() if plan.reduce != "tokens"]
    check_against_store(
        stored, model=model_name, neurons={k: neurons[k] for k in plain}, reduce=reduce,
        epoch=epoch, ids=probe_ids, labels=probe_labels, reductions=reductions,
    )
    for layer in set(plans) - set(plain):
        # Per-token ids are known up front only without a mask (every position is kept).
        t = int(np.shape(outputs[layer])[1])
        ids = None if probe_ids is None or plans[layer].attrs.get(ATTR_MASKED) else (
            probe_ids[:, None] * np.int64(t) + np.arange(t)).reshape(-1)
        lab = None if probe_labels is None or ids is None else np.repeat(probe_labels, t)
        check_against_store(stored, model=model_name, neurons={layer: neurons[layer]},
                            reduce=reduce, epoch=epoch, ids=ids, labels=lab,
                            reductions=reductions)

    owns = not isinstance(store, ActivationWriter)
    writer = ActivationWriter(store, model=model_name, attrs=attrs, compressor=compressor,
                              dtype=dtype, expected_samples=n_samples,
                              expected_epochs=1) if owns else store
    n_done = 0
    padded: dict[str, int] = {}  # per-token layers: the padded length of the first batch
    rule = _PredictionRule(model=model_name, predict=predict, probabilities=probabilities,
                           unavailable=no_default_predictions)
    bar = tqdm(total=n_samples, desc=f"{description} {model_name} epoch {epoch}",
               unit="sample", disable=not progress, leave=False)
    try:
        with BackgroundWriter(writer, epoch=epoch, plans=plans, queue_size=queue_size) as bg:
            bg.set_targets(neurons, batch_size, first_batch=len(first))
            batch: Batch | None = first
            mask_keys = {plan.mask_key for plan in plans.values()}
            mask, token_ids = _token_inputs(first.x, mask_keys)
            while batch is not None:
                if batch is not first or rerun_first:
                    outputs, final = forward(batch.x)
                    mask, token_ids = _token_inputs(batch.x, mask_keys)
                _check_padded_length(plans, outputs, padded, batch.ids, model_name)
                preds = None if batch.labels is None else rule(final, batch.labels,
                                                               len(batch))
                bg.submit({k: outputs[k] for k in layers}, batch.ids, batch.labels, preds,
                          batch.metadata, mask, token_ids)
                # Held no longer than the writer thread needs them. Arrays of one batch
                # still referenced during the next forward pass split the memory the
                # framework frees and takes again at every batch: glibc's heap then grew
                # by about 48 MB per batch of 64 recording a ResNet-18 (0.75 MB per sample,
                # 3.5 GB for 4096 samples), and each batch's new pages cost time.
                outputs = final = preds = mask = token_ids = None
                n_done += len(batch)
                bar.update(len(batch))
                batch = next(iterator, None)
        # the scalars before the epoch is complete: a complete epoch is skipped by a
        # resumed run, which would never store scalars lost in between
        if scalars:
            writer.log_epoch(epoch, **scalars)
        writer.complete_epoch(epoch, list(layers))
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
    seconds = time.perf_counter() - started
    logger.info("recorded %d samples of %s for model %r epoch %d into %s in %.2f s",
                n_done, list(layers), model_name, epoch, writer.url, seconds)
    return RecordResult(store=writer.url, model=model_name, layers=list(layers), epoch=epoch,
                        samples=n_done, written=written, seconds=seconds)
