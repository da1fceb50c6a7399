"""The activation store: a streaming, crash-safe, resumable Zarr v3 writer and its reader.

Layout (see :mod:`topoxr.conventions` and ``docs/store-format.md``)::

    <store>/<model>/<layer>/activation  (neuron, sample, epoch) float32

Notes
-----
How crash safety works:

* Every chunk and metadata document is replaced atomically (zarr's local store writes a
  temporary file and renames it; object stores replace whole objects), so a killed
  writer never leaves a torn chunk and committed values that share a chunk with the
  batch being written are never lost.
* Arrays grow ahead of the data, to the next power of two along ``sample`` and
  ``epoch`` (so a long epoch or many epochs grow them only a logarithmic number of
  times); :meth:`ActivationWriter.close` trims them to the data, and so does the next
  writer after a crash.
* A batch is written in a fixed order: first every array is grown if needed (new
  coordinate slots hold a fill value that no sample id or epoch can take), then every array that
  is not a coordinate is filled (values, labels, metadata, predictions; concurrently),
  then the ``sample``/``epoch`` coordinates that define the logical lengths, and last
  the ``committed`` mask.  The mask chunk is a multiple of the first batch size, so a
  batch becomes visible in a single atomic chunk write.  The mask is stored
  uncompressed, so on local and in-memory stores that write is one direct, atomic
  store call rather than a trip through zarr's codec pipeline.
* Readers (:func:`open_store`) take the length all arrays agree on (cut before an
  unfilled coordinate slot) and the mask as a snapshot and hide everything not
  committed.  A reader running beside a writer therefore never sees a torn batch.  A
  committed chunk that is missing or does not decode raises
  :class:`StoreCorruptionError` naming layer, epochs and samples.
* A writer opened on an existing model resumes: it repairs lengths left inconsistent
  by a crash (and unfilled coordinate slots), skips batches that are already committed
  (after checking that their values are identical) and writes the rest.
  :meth:`ActivationWriter.missing` tells a caller which samples still need computing.
* One writer per store: a ``flock`` on the store directory (released by the kernel when
  the process dies) or a lock object beside remote stores.
"""

from __future__ import annotations

import datetime as _dt
import functools
import logging
import re
import uuid
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import xarray as xr
import zarr
from zarr.abc.store import SupportsSetSync
from zarr.codecs import BytesCodec
from zarr.core.buffer import default_buffer_prototype

from topoxr._chunkio import (
    ChunkCache,
    DirectWriter,
    read_array,
    read_blocks,
    region_writer,
    run_jobs,
)
from topoxr._codecs import DEFAULT_COMPRESSOR, DTYPES, compressors_for, storage_dtype
from topoxr._locking import StoreLockedError, WriterLock
from topoxr.activations import reduce_units
from topoxr.conventions import (
    ACTIVATION,
    ATTR_FORMAT,
    ATTR_LAYER,
    ATTR_MODEL,
    COMMITTED,
    CORRECT,
    EPOCH,
    EPOCH_COMPLETE,
    FORMAT_VERSION,
    LABEL,
    NEURON,
    PREDICTION,
    SAMPLE,
)

__all__ = [
    "ActivationWriter",
    "StoreCorruptionError",
    "StoreError",
    "StoreLockedError",
    "StoreWriteError",
    "open_store",
    "store_summary",
]

logger = logging.getLogger(__name__)

#: Largest number of samples per chunk of the ``committed`` mask.  The mask chunk is a
#: multiple of the first batch size near ``_MASK_TARGET``, so batches of one size never
#: straddle two mask chunks and each becomes visible in a single atomic chunk write.
MASK_CHUNK = 1 << 20
_MASK_TARGET = 1 << 14
_COORD_CHUNK = 1 << 16
#: Chunk of the arrays along ``epoch`` (written once per epoch, so kept small)
_EPOCH_CHUNK = 1 << 10
#: Fill value of the ``sample`` coordinate: a slot that was grown but not yet filled.
#: It is not a valid sample id, so readers and resume can tell such slots apart.
SAMPLE_FILL = int(np.iinfo(np.int64).min)
_EPOCH_FILL = -1
_ACTIVATION_CONFIG = {"write_empty_chunks": True}
_TARGET_CHUNK_BYTES = 1 << 20
_MAX_CHUNK_BYTES = 16 << 20
_ATTR_READY = "topoxr_ready"
_ATTR_REDUCE = "topoxr_reduce"
_ATTR_UNIT_COORDS = "topoxr_unit_coords"
_ATTR_METADATA = "topoxr_metadata"
_ATTR_SCALARS = "topoxr_epoch_scalars"
_RESERVED = {
    ACTIVATION,
    SAMPLE,
    LABEL,
    PREDICTION,
    CORRECT,
    COMMITTED,
    EPOCH,
    EPOCH_COMPLETE,
    NEURON,
    "channel",
    "row",
    "col",
    "position",
    "depth",
    "x",
    "y",
}


class StoreError(ValueError):
    """A store problem: bad input (nothing was written) or a store that cannot be used."""


class StoreWriteError(StoreError):
    """Writing to the store failed (disk full, network, permissions...).

    Everything committed before the failure is intact; the writer that failed refuses
    further writes, and a new :class:`ActivationWriter` resumes the recording.
    """


class StoreCorruptionError(StoreError):
    """A committed chunk of the store is unreadable or missing."""


# --------------------------------------------------------------------------------------
# Locations
# --------------------------------------------------------------------------------------
@dataclass
class _Location:
    url: str
    store: Any
    local_dir: str | None
    fs: Any
    fs_path: str

    def exists(self) -> bool:
        if self.local_dir is not None:
            import os

            return os.path.exists(self.local_dir)
        return bool(self.fs.exists(self.fs_path))

    def is_empty_dir(self) -> bool:
        if self.local_dir is not None:
            import os

            return os.path.isdir(self.local_dir) and not os.listdir(self.local_dir)
        try:
            return not self.fs.ls(self.fs_path)
        except FileNotFoundError:
            return True


def _locate(store: Any, storage_options: Mapping[str, Any] | None = None) -> _Location:
    """Resolve a path, URL or ``os.PathLike`` into a zarr store and a filesystem."""
    import os

    import fsspec

    if not isinstance(store, str | os.PathLike):
        raise StoreError(f"store must be a path or an fsspec URL, got {type(store).__name__}")
    url = os.fspath(store)
    if "://" not in url or url.startswith("file://"):
        local = os.path.abspath(url.removeprefix("file://"))
        return _Location(url=local, store=zarr.storage.LocalStore(local), local_dir=local,
                         fs=None, fs_path=local)
    fs, fs_path = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
    zstore = zarr.storage.FsspecStore.from_url(url, storage_options=dict(storage_options or {}))
    return _Location(url=url, store=zstore, local_dir=None, fs=fs, fs_path=fs_path)


def _is_topoxr_root(group: zarr.Group) -> bool:
    return ATTR_FORMAT in group.attrs


def _open_root_readonly(loc: _Location) -> zarr.Group:
    if not loc.exists():
        raise FileNotFoundError(f"no topoxr store at {loc.url!r}")
    try:
        root = zarr.open_group(loc.store, mode="r", use_consolidated=False)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, ValueError) as err:
        raise StoreError(f"{loc.url!r} exists but is not a topoxr store (no Zarr group)") from err
    if not _is_topoxr_root(root):
        raise StoreError(
            f"{loc.url!r} is a Zarr group but not a topoxr store "
            f"(its attributes have no {ATTR_FORMAT!r})"
        )
    return root


def safe_node_name(name: str) -> str:
    """Return a Zarr- and DataTree-safe node name for a model or layer name.

    Characters other than letters, digits, ``_``, ``-`` and ``.`` become ``_``; the
    original name is kept in the node's attributes.
    """
    cleaned = re.sub(r"[^A-Za-z0-9_.\-]", "_", str(name)).strip(".") or "_"
    if cleaned.startswith("__"):
        cleaned = "n" + cleaned
    return cleaned


# --------------------------------------------------------------------------------------
# Per-layer state kept by a writer
# --------------------------------------------------------------------------------------
@dataclass
class _LayerState:
    name: str
    group: zarr.Group
    n_neurons: int
    reduce: str
    unit_coords: dict[str, np.ndarray]
    sample_ids: np.ndarray
    epochs: list[int]
    mask: np.ndarray  # (sample, epoch) bool, mirrors the committed array
    complete: np.ndarray  # (epoch,) bool
    labels: np.ndarray | None
    metadata: dict[str, np.ndarray]
    written: dict[int, np.ndarray] = field(default_factory=dict)  # epoch idx -> bool per sample
    _index: dict[int, int] = field(default_factory=dict)
    #: chunks last written per array, to complete partial chunks without reading them
    caches: dict[str, ChunkCache] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._index = {int(s): i for i, s in enumerate(self.sample_ids.tolist())}

    @property
    def frozen(self) -> bool:
        """The probe set is fixed once any epoch is complete."""
        return bool(self.complete.any())

    def positions(self, sample_ids: np.ndarray) -> np.ndarray:
        """Positions of ``sample_ids`` on the sample axis, -1 where unknown."""
        sample_ids = np.asarray(sample_ids, dtype=np.int64)
        known = self.sample_ids
        n = len(known)
        if n and len(sample_ids):
            # the common case, ids written in order: a contiguous run of the probe set
            start = int(sample_ids[0]) - int(known[0])
            if 0 <= start and start + len(sample_ids) <= n and known[start] == sample_ids[0]:
                run = known[start : start + len(sample_ids)]
                if np.array_equal(run, sample_ids):
                    return np.arange(start, start + len(sample_ids), dtype=np.int64)
        get = self._index.get
        return np.fromiter((get(int(s), -1) for s in sample_ids), dtype=np.int64,
                           count=len(sample_ids))

    def note_written(self, e: int, pos: np.ndarray) -> None:
        """Remember that this writer wrote (or found committed) ``pos`` in epoch ``e``."""
        written = self.written.get(e, np.zeros(0, dtype=bool))
        if len(written) < len(self.sample_ids):
            written = np.concatenate([written, np.zeros(len(self.sample_ids) - len(written), bool)])
        written[pos] = True
        self.written[e] = written

    def add_samples(self, ids: np.ndarray, all_ids: np.ndarray) -> None:
        """Append ``ids``; ``all_ids`` is the stored ids followed by them."""
        start = len(self.sample_ids)
        self.sample_ids = all_ids
        for i, s in enumerate(ids.tolist()):
            self._index[int(s)] = start + i

    def epoch_index(self, epoch: int) -> int:
        try:
            return self.epochs.index(epoch)
        except ValueError:
            return -1

    _arrays: dict[str, zarr.Array] | None = None

    @property
    def arrays(self) -> dict[str, zarr.Array]:
        """The layer's arrays, opened once (this writer is the only one changing them)."""
        if self._arrays is None:
            arrays = dict(self.group.arrays())
            # every activation chunk is stored, even an all-NaN one, so that a missing
            # chunk always means damage (see _CheckedActivation)
            arrays[ACTIVATION] = arrays[ACTIVATION].with_config(_ACTIVATION_CONFIG)
            self._arrays = arrays
        return self._arrays

    def refresh(self) -> None:
        """Forget the opened arrays after creating new ones."""
        self._arrays = None

    def writer(self, key: str) -> Any:
        """The async ``(region, block)`` writer of array ``key`` (whole chunks, see _chunkio)."""
        return region_writer(self.arrays[key], self.caches.setdefault(key, ChunkCache()))


def _as_1d(name: str, values: Any, n: int) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1 or len(arr) != n:
        raise StoreError(f"{name} has shape {arr.shape} but the batch has {n} samples")
    if arr.dtype.kind == "O":
        if not all(isinstance(v, str) for v in arr.tolist()):
            raise StoreError(f"{name} must hold str, int, float or bool values")
        arr = arr.astype(str)
    if arr.dtype.kind == "S":
        arr = arr.astype(str)
    if arr.dtype.kind not in "biufU":
        raise StoreError(f"{name} must hold str, int, float or bool values, got {arr.dtype}")
    return arr


def _kind(arr: np.ndarray) -> str:
    return "U" if arr.dtype.kind == "U" else ("b" if arr.dtype.kind == "b" else
                                               "f" if arr.dtype.kind == "f" else "i")


def _zarr_dtype(arr: np.ndarray) -> Any:
    return {"U": str, "b": "bool", "f": "float64", "i": "int64"}[_kind(arr)]


def _fill(kind: str) -> Any:
    return {"U": "", "b": False, "f": np.nan, "i": -1}[kind]


def _runs(positions: np.ndarray) -> list[tuple[int, int, int, int]]:
    """Split sorted-or-not positions into contiguous runs (pos_start, pos_stop, i0, i1)."""
    if len(positions) == 0:
        return []
    breaks = np.flatnonzero(np.diff(positions) != 1) + 1
    starts = np.concatenate([[0], breaks])
    stops = np.concatenate([breaks, [len(positions)]])
    return [
        (int(positions[a]), int(positions[b - 1]) + 1, int(a), int(b))
        for a, b in zip(starts, stops, strict=True)
    ]


# --------------------------------------------------------------------------------------
# The writer
# --------------------------------------------------------------------------------------
class ActivationWriter:
    """Stream layer activations of one model into a topoxr Zarr store.

    A context manager: on a clean exit it marks every fully written epoch as complete
    and consolidates the metadata, on an error it only releases the store so that the
    run can be resumed.

    Parameters
    ----------
    store : str or os.PathLike
        A local path or any fsspec URL (``memory://run.zarr``, ``s3://bucket/run.zarr``).
    model : str
        Name of the model; one group per model in the store.
    mode : {"a", "w"}, default "a"
        ``"a"`` creates the store or model, or resumes it if it exists; ``"w"`` deletes an
        existing group of this model first (other models are kept).
    description : str, optional
        Free text stored in the root attributes when the store is created.
    chunk_samples : int, optional
        Samples per chunk of ``activation``. By default a multiple of the first batch
        size holding about 1 MiB, so batches of the same size never straddle chunks.
    storage_options : mapping, optional
        Passed to fsspec for URLs.
    attrs : mapping, optional
        Extra attributes for the model group (e.g. ``{"framework": "torch"}``).
    break_lock : bool, default False
        Take over the lock object of a remote store whose writer is known to be gone.
    compressor : str, zarr codec or None, default "lz4"
        Codec of the ``activation`` arrays of layers this writer creates: ``"lz4"``
        (blosc lz4 with bit shuffle: the fastest to write and read), ``"zstd"`` (about a
        third fewer bytes for ReLU outputs, 2-4 times slower), ``"zstd-1"``,
        ``"blosc-zstd"``, ``"none"``/``None``, or any zarr bytes-to-bytes codec.
        Layers already in the store keep theirs.
    dtype : {"float32", "float16"}, default "float32"
        Storage dtype of new layers' activations. ``"float16"`` halves the bytes; each
        value is rounded to 11 significant bits (relative error at most 2**-11 = 4.9e-4
        from 6.1e-5 to 65504, absolute error at most 2**-25 below; larger magnitudes are
        refused). Readers get float32 either way.

    Examples
    --------
    >>> import numpy as np
    >>> with ActivationWriter("memory://doc.zarr", model="mlp", mode="w") as writer:
    ...     _ = writer.write("hidden", np.ones((4, 3)), sample=np.arange(4), label=[0, 1, 0, 1])
    >>> open_store("memory://doc.zarr")["mlp/hidden"].activation.shape
    (3, 4, 1)
    """

    def __init__(
        self,
        store: Any,
        *,
        model: str,
        mode: str = "a",
        description: str | None = None,
        chunk_samples: int | None = None,
        storage_options: Mapping[str, Any] | None = None,
        attrs: Mapping[str, Any] | None = None,
        break_lock: bool = False,
        compressor: Any = DEFAULT_COMPRESSOR,
        dtype: str = "float32",
    ) -> None:
        try:
            self._compressors = compressors_for(compressor)
            self._dtype = storage_dtype(dtype)
        except ValueError as err:
            raise StoreError(str(err)) from None
        if mode not in ("a", "w"):
            raise StoreError(f"mode must be 'a' (create or resume) or 'w' (replace), got {mode!r}")
        if not isinstance(model, str) or not model:
            raise StoreError("model must be a non-empty string")
        if chunk_samples is not None and int(chunk_samples) < 1:
            raise StoreError(f"chunk_samples must be a positive integer, got {chunk_samples}")
        self.model = model
        self._chunk_samples = None if chunk_samples is None else int(chunk_samples)
        self._loc = _locate(store, storage_options)
        self._layers: dict[str, _LayerState] = {}
        self._closed = False
        self._failed: str | None = None

        existed = self._loc.exists() and not self._loc.is_empty_dir()
        if existed:
            _open_root_readonly(self._loc)  # refuses non-topoxr paths before touching them
        elif self._loc.local_dir is not None:
            import os

            os.makedirs(self._loc.local_dir, exist_ok=True)
        lock_path = "" if self._loc.fs is None else self._loc.fs_path.rstrip("/") + ".topoxr-lock"
        self._lock = WriterLock(self._loc.url, local_dir=self._loc.local_dir, fs=self._loc.fs,
                                lock_path=lock_path)
        self._lock.acquire(break_lock=break_lock)
        try:
            self._root = self._open_root(existed, description)
            self._model_group = self._open_model(mode, attrs)
            self._load_layers()
        except StoreError:
            self._lock.release()
            raise
        except Exception as err:
            self._lock.release()
            raise StoreWriteError(
                f"opening {self._loc.url!r} for writing failed ({type(err).__name__}: {err}); "
                "everything committed before is intact: fix the cause and open a new "
                "ActivationWriter to resume"
            ) from err
        except BaseException:
            self._lock.release()
            raise

    # -- opening ---------------------------------------------------------------------
    def _open_root(self, existed: bool, description: str | None) -> zarr.Group:
        if not existed:
            attrs = {
                ATTR_FORMAT: FORMAT_VERSION,
                "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
                "description": description or "",
            }
            # not mode="w": that clears the store by deleting and re-creating its directory,
            # which would leave the flock on a directory nobody uses any more
            return zarr.create_group(self._loc.store, attributes=attrs, overwrite=False)
        root = zarr.open_group(self._loc.store, mode="r+", use_consolidated=False)
        # Consolidated metadata would be stale as soon as we write: drop it now, it is
        # written again by close().
        root.update_attributes({})
        return root

    def _open_model(self, mode: str, attrs: Mapping[str, Any] | None) -> zarr.Group:
        name = safe_node_name(self.model)
        members = dict(self._root.members())
        if name in members and mode == "w":
            del self._root[name]
            members.pop(name)
        if name in members:
            group = members[name]
            if not isinstance(group, zarr.Group) or group.attrs.get(ATTR_MODEL) != self.model:
                raise StoreError(
                    f"node {name!r} in {self._loc.url!r} is not the model {self.model!r}"
                )
            if attrs:
                group.update_attributes(dict(attrs))
            logger.info("resuming model %r in %s", self.model, self._loc.url)
            return group
        return self._root.create_group(name, attributes={ATTR_MODEL: self.model, **(attrs or {})})

    def _load_layers(self) -> None:
        for name, group in list(self._model_group.groups()):
            layer = group.attrs.get(ATTR_LAYER, name)
            if not group.attrs.get(_ATTR_READY, False):
                logger.warning("removing layer %r left half-created by a crashed writer", layer)
                del self._model_group[name]
                continue
            self._layers[layer] = self._load_layer(layer, group)

    def _load_layer(self, layer: str, group: zarr.Group) -> _LayerState:
        arrays = dict(group.arrays())
        _check_required(group, arrays, fix="open the writer with mode='w' to record the "
                                           "model again")
        n, m = _logical_lengths(arrays)
        sample_ids = np.asarray(arrays[SAMPLE][:n], dtype=np.int64)
        epochs = [int(e) for e in arrays[EPOCH][:m]]
        # Repair lengths left longer than the logical length by a crash mid-batch. The
        # coordinates' tails are reset to their fill first: shrinking keeps the boundary
        # chunk, and a later growth must not bring back ids of an unfinished batch.
        for key, fill, length in ((SAMPLE, SAMPLE_FILL, n), (EPOCH, _EPOCH_FILL, m)):
            if arrays[key].shape[0] > length:
                arrays[key][length:] = fill
        for arr in arrays.values():
            dims = arr.metadata.dimension_names or ()
            target = tuple(n if d == SAMPLE else m if d == EPOCH else s
                           for d, s in zip(dims, arr.shape, strict=True))
            if target != arr.shape:
                logger.info("repairing %s of layer %r left by an interrupted writer: %s -> %s",
                            arr.basename, layer, arr.shape, target)
                arr.resize(target)
        mask = np.asarray(arrays[COMMITTED][:n, :m], dtype=bool)
        complete = np.asarray(arrays[EPOCH_COMPLETE][:m], dtype=bool)
        labels = _read_1d(arrays[LABEL], n) if LABEL in arrays else None
        meta_names = group.attrs.get(_ATTR_METADATA, [])
        metadata = {k: _read_1d(arrays[k], n) for k in meta_names}
        unit_names = group.attrs.get(_ATTR_UNIT_COORDS, [])
        return _LayerState(
            name=layer, group=group, n_neurons=int(arrays[ACTIVATION].shape[0]),
            reduce=str(group.attrs.get(_ATTR_REDUCE, "mean")),
            unit_coords={k: np.asarray(arrays[k][:]) for k in unit_names},
            sample_ids=sample_ids, epochs=epochs, mask=mask, complete=complete,
            labels=labels, metadata=metadata,
        )

    # -- public API --------------------------------------------------------------------
    @property
    def url(self) -> str:
        """Where the store lives."""
        return self._loc.url

    @property
    def layers(self) -> list[str]:
        """Names of the layers of this model in the store."""
        return list(self._layers)

    def missing(self, layer: str, epoch: int, sample: Iterable[int]) -> np.ndarray:
        """Return the ids among ``sample`` not yet committed for ``layer`` at ``epoch``.

        Parameters
        ----------
        layer : str
            Layer name as given to :meth:`write`.
        epoch : int
            Epoch label.
        sample : iterable of int
            Candidate sample ids.

        Returns
        -------
        numpy.ndarray
            The ids (in the given order) that still have to be written.
        """
        ids = np.asarray(list(sample) if not isinstance(sample, np.ndarray) else sample,
                         dtype=np.int64)
        state = self._layers.get(layer)
        if state is None:
            return ids
        e = state.epoch_index(int(epoch))
        if e < 0:
            return ids
        pos = state.positions(ids)
        done = np.zeros(len(ids), dtype=bool)
        known = pos >= 0
        done[known] = state.mask[pos[known], e]
        return ids[~done]

    def write(
        self,
        layer: str,
        activations: Any,
        *,
        sample: Any,
        label: Any = None,
        prediction: Any = None,
        epoch: int = 0,
        channel_axis: int | None = None,
        reduce: str = "mean",
        overwrite: bool = False,
        allow_nonfinite: bool = False,
        **metadata: Any,
    ) -> int:
        """Commit one batch of one layer.

        Every check runs before anything is written: a rejected batch leaves the store
        exactly as it was.

        Parameters
        ----------
        layer : str
            Layer name (any string; stored under a safe node name, original in attrs).
        activations : array_like
            ``(batch, neurons)``, or ``(batch, ...)`` with ``channel_axis`` for conv maps.
        sample : array_like of int
            Stable id of every input in the batch, unique within the batch.
        label : array_like, optional
            Class label per sample (int or str).
        prediction : array_like, optional
            Model prediction per sample for this epoch; with ``label`` it gives ``correct``.
        epoch : int, default 0
            Epoch label (0 = before training, or inference only).
        channel_axis : int, optional
            Channel axis of conv outputs (1 for NCHW, -1 for NHWC).
        reduce : {"mean", "max", "none"}, default "mean"
            Spatial pooling of conv outputs; ``"none"`` keeps every unit.
        overwrite : bool, default False
            Replace values already committed for these samples and epoch. Without it,
            committed samples with identical values are skipped (resume) and different
            values are an error.
        allow_nonfinite : bool, default False
            Store NaN and inf instead of rejecting them.
        **metadata : array_like
            Extra per-sample columns (str, int, float or bool), stored as coordinates.

        Returns
        -------
        int
            Number of samples written (0 when the whole batch was already committed).

        Raises
        ------
        StoreError
            Naming the problem: shapes, lengths, duplicates, non-finite or non-numeric
            values, a neuron count or probe set that differs from the stored layer, or
            committed values that differ.
        StoreWriteError
            If the storage fails (disk full, network...): the batch is not committed,
            everything committed before is intact, and this writer refuses further
            writes; open a new one to resume.
        """
        self._check_open()
        if not isinstance(layer, str) or not layer:
            raise StoreError("layer must be a non-empty string")
        try:
            reduced = reduce_units(activations, channel_axis=channel_axis, reduce=reduce)
        except ValueError as err:
            raise StoreError(f"layer {layer!r}: {err}") from None
        values = reduced.values
        batch = values.shape[0]
        ids = np.asarray(sample)
        if ids.ndim != 1 or len(ids) != batch:
            raise StoreError(
                f"layer {layer!r}: sample has shape {ids.shape} but the batch has {batch} rows"
            )
        if values.shape[1] == 0:
            raise StoreError(f"layer {layer!r}: the activations have no neurons "
                             f"(shape {np.shape(activations)})")
        if batch == 0:
            logger.debug("layer %r: empty batch, nothing to write", layer)
            return 0
        if ids.dtype.kind not in "iu":
            raise StoreError(f"layer {layer!r}: sample ids must be integers, got {ids.dtype}")
        ids = ids.astype(np.int64)
        uniq, counts = np.unique(ids, return_counts=True)
        if (counts > 1).any():
            raise StoreError(
                f"layer {layer!r}: duplicate sample ids in the batch: {uniq[counts > 1][:10].tolist()}"
            )
        if not allow_nonfinite and not np.isfinite(values).all():
            bad = int((~np.isfinite(values)).sum())
            raise StoreError(
                f"layer {layer!r}: {bad} activation value(s) are NaN or inf; "
                "pass allow_nonfinite=True to store them"
            )
        self._check_range(layer, values)
        labels = None if label is None else _as_1d(f"layer {layer!r}: label", label, batch)
        preds = None if prediction is None else _as_1d(
            f"layer {layer!r}: prediction", prediction, batch)
        meta = {}
        for key, col in metadata.items():
            if key in _RESERVED or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
                raise StoreError(f"layer {layer!r}: {key!r} cannot be a metadata column name")
            meta[key] = _as_1d(f"layer {layer!r}: metadata {key!r}", col, batch)
        epoch = _as_epoch(epoch)

        if (ids == SAMPLE_FILL).any():
            raise StoreError(f"layer {layer!r}: sample id {SAMPLE_FILL} is reserved")

        state = self._layers.get(layer)
        plan = _plan_batch(self, layer, state, reduced, ids, labels, preds, meta, epoch, overwrite)
        if plan is None:  # every sample already committed with these values: resume skip
            state.note_written(state.epoch_index(epoch), state.positions(ids))
            return 0
        try:
            if state is None:
                state = self._create_layer(layer, reduced, labels, preds, meta, batch)
            written = self._commit(state, plan, values, ids, labels, preds, meta, epoch)
        except Exception as err:
            self._fail(err, f"writing layer {layer!r} epoch {epoch} samples "
                            f"{_ids_text(ids)}")
        state.note_written(state.epoch_index(epoch), state.positions(ids))
        return written

    def complete_epoch(self, epoch: int, layers: Iterable[str] | None = None) -> None:
        """Mark ``epoch`` complete for ``layers`` (default: all layers of this writer).

        Parameters
        ----------
        epoch : int
            The epoch whose probe samples have all been written.
        layers : iterable of str, optional
            Layers to mark; default: every layer written by this writer.

        Raises
        ------
        StoreError
            If a layer is unknown, lacks the epoch or some of its probe samples.
        """
        self._check_open()
        epoch = _as_epoch(epoch)
        names = list(self._layers) if layers is None else list(layers)
        for name in names:
            state = self._layers.get(name)
            if state is None:
                raise StoreError(f"unknown layer {name!r}; known layers: {list(self._layers)}")
            e = state.epoch_index(epoch)
            if e < 0:
                raise StoreError(f"layer {name!r} has no epoch {epoch}")
            n_missing = int((~state.mask[:, e]).sum())
            if n_missing:
                raise StoreError(
                    f"layer {name!r} epoch {epoch} lacks {n_missing} of "
                    f"{len(state.sample_ids)} samples"
                )
        self._mark_complete({name: [epoch] for name in names})

    def _mark_complete(self, epochs: Mapping[str, Iterable[int]]) -> None:
        """Store ``epoch_complete`` for checked epochs: one write per layer, from memory."""
        writes, updated = [], {}
        for name, layer_epochs in epochs.items():
            state = self._layers[name]
            complete = state.complete.copy()
            complete[[state.epoch_index(epoch) for epoch in layer_epochs]] = True
            changed = np.flatnonzero(complete != state.complete)
            if len(changed):
                arr = state.arrays[EPOCH_COMPLETE]
                writes.append(_append(arr, complete, int(changed[0]), arr.shape[0]))
                updated[name] = complete
        try:
            _run_in_order([writes])
        except Exception as err:
            self._fail(err, f"marking epochs {dict(epochs)} complete")
        for name, complete in updated.items():
            self._layers[name].complete = complete

    def log_epoch(self, epoch: int, **scalars: float) -> None:
        """Store per-epoch scalars (loss, accuracy, ...) as coordinates on ``epoch``.

        Written to every layer of this model that already has ``epoch``.

        Parameters
        ----------
        epoch : int
            The epoch the values belong to.
        **scalars : float
            Name and value of each scalar, e.g. ``loss=0.3, accuracy=0.9``. Names must be
            identifiers and must not clash with the store's own coordinates.

        Raises
        ------
        StoreError
            If a name is reserved or not an identifier, or a value is not a real number.
        """
        self._check_open()
        epoch = _as_epoch(epoch)
        values: dict[str, float] = {}
        for key, value in scalars.items():
            if key in _RESERVED or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
                raise StoreError(f"{key!r} cannot be an epoch scalar name")
            if isinstance(value, bool) or not isinstance(value, int | float | np.number):
                raise StoreError(f"epoch scalar {key!r} must be a real number, got {value!r}")
            values[key] = float(value)
        for state in self._layers.values():
            e = state.epoch_index(epoch)
            if e < 0:
                continue
            try:
                names = list(state.group.attrs.get(_ATTR_SCALARS, []))
                existing = {name for name, _ in state.group.arrays()}
                for key, value in values.items():
                    if key in existing and key not in names and key in _layer_columns(state):
                        raise StoreError(f"{key!r} is already a column of layer {state.name!r}")
                    if key not in existing:  # (a crashed writer may have created it)
                        state.group.create_array(
                            key, shape=(state.arrays[EPOCH].shape[0],), chunks=(_EPOCH_CHUNK,),
                            dtype="float64", fill_value=np.nan, dimension_names=(EPOCH,),
                        )
                        _refresh_coordinates(state.group)
                        state.refresh()
                    if key not in names:
                        names.append(key)
                    state.arrays[key][e] = value
                state.group.update_attributes({_ATTR_SCALARS: names})
            except StoreError:
                raise
            except Exception as err:
                self._fail(err, f"logging scalars {sorted(values)} of epoch {epoch}")

    def close(self) -> None:
        """Complete every fully written epoch of this session, consolidate, unlock."""
        if self._closed:
            return
        try:
            if self._failed is None:
                try:
                    self._complete_written_epochs()
                    self._trim()
                    self._consolidate()
                except StoreError:
                    raise
                except Exception as err:
                    self._fail(err, "completing epochs and consolidating metadata")
        finally:
            self._release()

    def __enter__(self) -> ActivationWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self._release()

    def __del__(self) -> None:  # a writer dropped without close() still unlocks
        try:
            if not self._closed:
                self._release()
        except Exception:  # noqa: S110 - best effort during interpreter shutdown
            pass

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<ActivationWriter {self._loc.url!r} model={self.model!r} {state}>"

    # -- internals ---------------------------------------------------------------------
    def _check_range(self, layer: str, values: np.ndarray) -> None:
        """Refuse values that the layer's storage dtype would turn into infinities."""
        state = self._layers.get(layer)
        dtype = self._dtype if state is None else str(state.arrays[ACTIVATION].dtype)
        limit = DTYPES.get(dtype)
        if limit is None or limit >= DTYPES["float32"]:
            return
        with np.errstate(invalid="ignore"):
            big = np.abs(values) > limit
        big &= np.isfinite(values)
        if big.any():
            raise StoreError(
                f"layer {layer!r}: {int(big.sum())} value(s) exceed {limit:g}, the largest "
                f"{dtype} value (largest here {float(np.abs(values[big]).max()):g}); store the "
                "layer as float32"
            )

    def _check_open(self) -> None:
        if self._failed is not None:
            raise StoreWriteError(
                f"this ActivationWriter failed earlier ({self._failed}); everything committed "
                "before is intact: open a new ActivationWriter to resume"
            )
        if self._closed:
            raise StoreError("this ActivationWriter is closed")

    def _fail(self, err: BaseException, what: str) -> None:
        """Turn a storage failure into :class:`StoreWriteError`; the writer is unusable."""
        self._failed = f"{type(err).__name__}: {err}"
        raise StoreWriteError(
            f"{what} to {self._loc.url!r} failed ({self._failed}); the batch is not "
            "committed, everything committed before is intact. Open a new ActivationWriter "
            "on the store to resume."
        ) from err

    def _release(self) -> None:
        self._closed = True
        self._lock.release()

    def _complete_written_epochs(self) -> None:
        epochs = {state.epochs[e] for state in self._layers.values() for e in state.written}
        done: dict[str, list[int]] = {}
        for epoch in sorted(epochs):
            having = [name for name, state in self._layers.items()
                      if state.epoch_index(epoch) >= 0]
            if all(self._layers[name].mask[:, self._layers[name].epoch_index(epoch)].all()
                   for name in having):
                for name in having:
                    done.setdefault(name, []).append(epoch)
        self._mark_complete(done)

    def _trim(self) -> None:
        """Cut every array to the data it holds (arrays grow ahead, see ``_commit``)."""
        trims = []
        for state in self._layers.values():
            n, m = len(state.sample_ids), len(state.epochs)
            for arr in state.arrays.values():
                dims = arr.metadata.dimension_names or ()
                shape = tuple(n if d == SAMPLE else m if d == EPOCH else s
                              for d, s in zip(dims, arr.shape, strict=True))
                if shape != arr.shape:  # nothing was written past the data: keep chunks
                    trims.append((arr.async_array.resize, (shape, False)))
        _run_in_order([trims])

    def _consolidate(self) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            zarr.consolidate_metadata(self._loc.store)

    def _sample_chunk(self, n_neurons: int, batch: int) -> tuple[int, int]:
        itemsize = np.dtype(self._dtype).itemsize
        row_bytes = itemsize * n_neurons
        if self._chunk_samples is not None:
            chunk = self._chunk_samples
        else:
            chunk = batch * max(1, _TARGET_CHUNK_BYTES // max(1, batch * row_bytes))
        neuron_chunk = n_neurons
        if chunk * row_bytes > _MAX_CHUNK_BYTES:
            neuron_chunk = max(1, _MAX_CHUNK_BYTES // (itemsize * chunk))
        return chunk, neuron_chunk

    def _create_layer(self, layer, reduced, labels, preds, meta, batch) -> _LayerState:
        name = safe_node_name(layer)
        taken = {safe_node_name(n) for n in self._layers}
        if name in taken:
            raise StoreError(f"layer {layer!r} maps to node {name!r}, already used by another layer")
        n_neurons = reduced.values.shape[1]
        chunk, neuron_chunk = self._sample_chunk(n_neurons, batch)
        group = self._model_group.create_group(name, attributes={
            ATTR_LAYER: layer, _ATTR_REDUCE: reduced.reduce,
            _ATTR_UNIT_COORDS: list(reduced.unit_coords), _ATTR_METADATA: list(meta),
        })
        mask_chunk = min(MASK_CHUNK, batch * max(1, _MASK_TARGET // max(1, batch)))
        specs: dict[str, dict[str, Any]] = {
            ACTIVATION: dict(shape=(n_neurons, 0, 0), chunks=(neuron_chunk, chunk, 1),
                             dtype=self._dtype, fill_value=np.nan, config=_ACTIVATION_CONFIG,
                             compressors=self._compressors,
                             dimension_names=(NEURON, SAMPLE, EPOCH)),
            NEURON: dict(data=np.arange(n_neurons, dtype=np.int64), chunks=(n_neurons,),
                         dimension_names=(NEURON,)),
            **{key: dict(data=np.asarray(vals, dtype=np.int64), chunks=(n_neurons,),
                         dimension_names=(NEURON,))
               for key, vals in reduced.unit_coords.items()},
            SAMPLE: dict(shape=(0,), chunks=(_COORD_CHUNK,), dtype="int64",
                         fill_value=SAMPLE_FILL, dimension_names=(SAMPLE,)),
            EPOCH: dict(shape=(0,), chunks=(_EPOCH_CHUNK,), dtype="int64",
                        fill_value=_EPOCH_FILL, dimension_names=(EPOCH,)),
            EPOCH_COMPLETE: dict(shape=(0,), chunks=(_EPOCH_CHUNK,), dtype="bool",
                                 fill_value=False, dimension_names=(EPOCH,)),
            # uncompressed: it is the commit point, written once per batch
            # (_write_mask_chunks)
            COMMITTED: dict(shape=(0, 0), chunks=(mask_chunk, 1), dtype="bool",
                            fill_value=False, compressors=None, dimension_names=(SAMPLE, EPOCH)),
            **{key: dict(shape=(0,), chunks=(_COORD_CHUNK,), dtype=_zarr_dtype(col),
                         fill_value=_fill(_kind(col)), dimension_names=(SAMPLE,))
               for key, col in (({LABEL: labels} if labels is not None else {}) | meta).items()},
        }
        if preds is not None:
            specs.update(_prediction_specs(preds, 0, 0, mask_chunk))
        _create_arrays(group, specs)
        group.update_attributes({_ATTR_READY: True})  # last: the layer is complete
        state = _LayerState(
            name=layer, group=group, n_neurons=n_neurons, reduce=reduced.reduce,
            unit_coords=dict(reduced.unit_coords), sample_ids=np.zeros(0, dtype=np.int64),
            epochs=[], mask=np.zeros((0, 0), dtype=bool), complete=np.zeros(0, dtype=bool),
            labels=None if labels is None else labels[:0], metadata={k: v[:0] for k, v in meta.items()},
        )
        self._layers[layer] = state
        return state

    @staticmethod
    def _create_prediction_arrays(group: zarr.Group, preds: np.ndarray, n: int, m: int,
                                  chunk: int) -> None:
        _create_arrays(group, _prediction_specs(preds, n, m, chunk))

    def _commit(self, state, plan, values, ids, labels, preds, meta, epoch) -> int:
        group = state.group
        arrays = state.arrays
        if preds is not None and PREDICTION not in arrays:
            self._create_prediction_arrays(group, preds, arrays[SAMPLE].shape[0],
                                           arrays[EPOCH].shape[0], arrays[COMMITTED].chunks[0])
            state.refresh()
            arrays = state.arrays
        e = state.epoch_index(epoch)
        new = plan.new_rows
        n0, m0 = len(state.sample_ids), len(state.epochs)
        n, m = n0 + len(new), m0 + (e < 0)
        if e < 0:
            e = m - 1
        # Room for n samples and m epochs: arrays grow in powers of two (so a long epoch
        # 0 or many epochs grow them a logarithmic number of times); close() trims them.
        size_n = arrays[SAMPLE].shape[0]
        size_n = size_n if size_n >= n else _capacity(n)
        size_m = arrays[EPOCH].shape[0]
        size_m = size_m if size_m >= m else _capacity(m)
        # Plan every write first (in memory), then run the four steps in one trip to
        # zarr's event loop; each step starts only after the previous one has finished.
        # 1. grow every array (the coordinates too: their new slots hold the fill value,
        # which readers take as the end of the logical length until step 3 fills them) ...
        grow = []
        for key, arr in arrays.items():
            dims = arr.metadata.dimension_names or ()
            shape = tuple(size_n if d == SAMPLE else size_m if d == EPOCH else s
                          for d, s in zip(dims, arr.shape, strict=True))
            if shape != arr.shape:
                grow.append((arr.async_array.resize, (shape,)))
        # 2. ... fill them: labels and metadata of new samples, values, predictions ...
        # (1-D columns are appended from their in-memory copies, whole chunks from the
        # chunk the first new row falls in, so zarr need not read and decode it first)
        fill = []
        all_labels = state.labels
        all_metadata = state.metadata
        if len(new):
            if labels is not None:
                all_labels = np.concatenate([state.labels, labels[new]])
                fill.append(_append(arrays[LABEL], all_labels, n0, size_n))
            all_metadata = {key: np.concatenate([state.metadata[key], col[new]])
                            for key, col in meta.items()}
            fill.extend(_append(arrays[key], col, n0, size_n)
                        for key, col in all_metadata.items())
        rows = plan.write_rows
        # positions on the sample axis once the new samples are appended after the old
        pos = state.positions(ids[rows])
        if len(new):
            appended = np.full(len(ids), -1, dtype=np.int64)
            appended[new] = np.arange(n0, n)
            pos = np.where(pos < 0, appended[rows], pos)
        order = np.argsort(pos, kind="stable")
        rows, pos = rows[order], pos[order]
        runs = _runs(pos)
        contiguous = len(runs) == 1 and np.array_equal(
            rows, np.arange(rows[0], rows[0] + len(rows)))
        for p0, p1, i0, i1 in runs:
            block = values[rows[0]:rows[0] + len(rows)] if contiguous else values[rows[i0:i1]]
            fill.append((state.writer(ACTIVATION), ((slice(None), slice(p0, p1), e), block.T)))
            if preds is not None:
                fill.append((state.writer(PREDICTION),
                             ((slice(p0, p1), e), preds[rows[i0:i1]])))
                if all_labels is not None:
                    fill.append((state.writer(CORRECT),
                                 ((slice(p0, p1), e), preds[rows[i0:i1]] == all_labels[pos[i0:i1]])))
        # 3. ... then the coordinates that define the logical lengths ...
        coords = []
        all_ids = state.sample_ids
        if m > m0:
            coords.append(_append(arrays[EPOCH], np.array([*state.epochs, epoch]), m0, size_m))
        if n > n0:
            all_ids = np.concatenate([state.sample_ids, ids[new]])
            coords.append(_append(arrays[SAMPLE], all_ids, n0, size_n))
        # 4. ... and last the commit: the mask of this epoch.  Whole (in-bounds) chunks are
        # written from the in-memory mask, so zarr need not read them first; a batch
        # inside one mask chunk becomes visible in one atomic write.
        mask = state.mask
        if m > m0:
            mask = np.concatenate([mask, np.zeros((n0, 1), bool)], 1)
        if n > n0:
            mask = np.concatenate([mask, np.zeros((n - n0, m), bool)])
        _run_in_order([grow, fill, coords])
        _write_mask_chunks(arrays[COMMITTED], mask[:, e], pos, e, size_n)
        # the store now holds the batch: mirror it in memory
        mask[pos, e] = True
        if m > m0:
            state.epochs.append(epoch)
            state.complete = np.append(state.complete, False)
        if len(new):
            state.add_samples(ids[new], all_ids)
            state.labels = all_labels
            state.metadata = all_metadata
        state.mask = mask
        return len(rows)


@functools.lru_cache(maxsize=None)
def _writes_synchronously_type(store_type: type) -> bool:
    return issubclass(store_type, SupportsSetSync)


def _writes_synchronously(store: Any) -> bool:
    """Whether ``store`` has zarr's ``set_sync`` (a cached check: protocols are slow)."""
    return _writes_synchronously_type(type(store))


def _capacity(length: int) -> int:
    """Room for ``length`` rows: the next power of two."""
    return 1 << (length - 1).bit_length() if length > 0 else 0


def _whole_chunks(values: np.ndarray, start: int, stop: int, chunk: int, size: int,
                  fill: Any) -> tuple[int, int, np.ndarray]:
    """Rows ``start:stop`` of ``values`` widened to whole chunks of an array of ``size``.

    Returns ``(lo, hi, block)``: the first row of ``start``'s chunk, the end of
    ``stop - 1``'s chunk (or ``size``), and ``values[lo:hi]`` padded with ``fill`` past
    the end of ``values``.  Written whole, no chunk needs reading back first.
    """
    lo = start // chunk * chunk
    hi = min(-(-stop // chunk) * chunk, size)
    block = values[lo:hi]
    if len(block) < hi - lo:
        block = np.concatenate([block, np.full(hi - lo - len(block), fill, dtype=values.dtype)])
    return lo, hi, block


def _append(arr: zarr.Array, values: np.ndarray, start: int,
            size: int) -> tuple[Any, tuple[Any, ...]]:
    """The write (for :func:`_run_in_order`) of a 1-D array's new rows ``start:``.

    ``values`` holds every row and ``size`` is the array's length when written; every
    chunk the write touches is written whole, from memory.
    """
    lo, hi, block = _whole_chunks(values, start, len(values), arr.chunks[0], size,
                                  arr.metadata.fill_value)
    return region_writer(arr, None), ((slice(lo, hi),), block)


def _write_mask_chunks(arr: zarr.Array, column: np.ndarray, pos: np.ndarray, e: int,
                       size: int) -> None:
    """Mark rows ``pos`` committed in the mask's column ``e``.

    This is the commit point of a batch.  ``column`` is the column as stored (left
    unchanged: the caller marks ``pos`` once the write succeeded) and ``size`` the
    array's length; the chunks holding ``pos`` are written whole.  A mask created by
    this version is stored uncompressed, so on a store that writes synchronously (local
    files, zarr's memory store) each chunk is encoded here, as zarr's ``bytes`` codec
    does (one byte per bool), and replaced in one atomic store call: about a third of
    the cost of a trip through zarr's asynchronous codec pipeline, which every other
    store (and masks written compressed by earlier versions) still takes.
    """
    chunk = arr.chunks[0]
    lo, hi, block = _whole_chunks(column, int(pos.min()), int(pos.max()) + 1, chunk, size, False)
    block = block.copy()
    block[pos - lo] = True
    if not (_writes_synchronously(arr.store) and arr.filters == ()
            and arr.compressors == () and isinstance(arr.serializer, BytesCodec)):
        arr[lo:hi, e] = block
        return
    prototype = default_buffer_prototype()
    for first in range(lo, hi, chunk):
        data = np.zeros(chunk, dtype=np.uint8)  # the edge chunk too is stored whole
        piece = block[first - lo:first - lo + chunk]
        data[: len(piece)] = piece
        key = f"{arr.path}/{arr.metadata.encode_chunk_key((first // chunk, e))}"
        arr.store.set_sync(key, prototype.buffer.from_bytes(data.tobytes()))


def _run_in_order(steps: list[list[tuple[Any, tuple[Any, ...]]]]) -> None:
    """Run a batch's writes step by step, each step's writes concurrently.

    A step starts only when every write of the previous step has finished, which is the
    write order crash safety rests on.  Writes of whole chunks encoded by topoxr
    (:class:`topoxr._chunkio.DirectWriter`) run on its thread pool; zarr's async
    operations (resizes; writes to stores without ``set_sync``) in one trip to zarr's
    event loop beside them.
    """
    import asyncio

    from zarr.core.sync import sync

    async def gather(ops: list[tuple[Any, tuple[Any, ...]]]) -> None:
        # every operation runs to its end before an error is raised: nothing may
        # still be writing when the caller hears of the failure
        outcomes = await asyncio.gather(*(func(*args) for func, args in ops),
                                        return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome

    for step in steps:
        jobs = [job for func, args in step if isinstance(func, DirectWriter)
                for job in func(*args)]
        ops = [(func, args) for func, args in step if not isinstance(func, DirectWriter)]
        errors: list[BaseException] = []
        if ops:
            try:
                sync(gather(ops))
            except Exception as err:
                errors.append(err)
        try:
            run_jobs(jobs)
        except Exception as err:
            errors.append(err)
        if errors:
            raise errors[0]


def _prediction_specs(preds: np.ndarray, n: int, m: int,
                      chunk: int) -> dict[str, dict[str, Any]]:
    """How to create the ``prediction`` and ``correct`` arrays (for :func:`_create_arrays`).

    They are written with every batch, like the ``committed`` mask, and share its chunks
    along ``sample`` (``chunk``): a batch rewrites one such chunk, not 65536 rows.
    """
    return {
        PREDICTION: dict(shape=(n, m), chunks=(chunk, 1), dtype=_zarr_dtype(preds),
                         fill_value=_fill(_kind(preds)), dimension_names=(SAMPLE, EPOCH)),
        CORRECT: dict(shape=(n, m), chunks=(chunk, 1), dtype="bool",
                      fill_value=False, dimension_names=(SAMPLE, EPOCH)),
    }


def _create_arrays(group: zarr.Group, specs: Mapping[str, Mapping[str, Any]]) -> None:
    """Create arrays of a layer concurrently (one trip to zarr's event loop).

    ``specs`` maps names to :meth:`zarr.Group.create_array` arguments. The arrays then
    are listed in ``activation``'s ``coordinates`` attribute.
    """
    from zarr.api.asynchronous import create_array

    _run_in_order([[(functools.partial(create_array, group.store, name=f"{group.path}/{name}",
                                       **kwargs), ())
                    for name, kwargs in specs.items()]])
    _refresh_coordinates(group)


def _refresh_coordinates(group: zarr.Group) -> None:
    """List every other array of a layer in ``activation``'s ``coordinates`` attribute.

    That is how plain ``xarray.open_datatree(..., engine="zarr")`` knows that labels,
    masks and unit positions are coordinates, not data variables.
    """
    names = sorted(name for name, _ in group.arrays() if name != ACTIVATION)
    group[ACTIVATION].update_attributes({"coordinates": " ".join(names)})


def _layer_columns(state: _LayerState) -> set[str]:
    """Metadata and unit-coordinate columns of a layer (names an epoch scalar cannot take)."""
    return set(state.metadata) | set(state.unit_coords)


def _logical_lengths(arrays: Mapping[str, zarr.Array]) -> tuple[int, int]:
    """Number of samples and epochs that a layer's arrays agree on.

    A writer grows every array before it fills the ``sample``/``epoch`` coordinate, and
    a reader may catch it in between (or a crash may leave it there): the logical length
    is the shortest array along the dimension, cut before the first unfilled coordinate.
    """
    lengths: dict[str, int] = {}
    for arr in arrays.values():
        for dim, size in zip(arr.metadata.dimension_names or (), arr.shape, strict=True):
            if dim in (SAMPLE, EPOCH):
                lengths[dim] = min(lengths.get(dim, size), size)
    out = []
    for dim, fill in ((SAMPLE, SAMPLE_FILL), (EPOCH, _EPOCH_FILL)):
        length = lengths.get(dim, 0)
        if length:
            unfilled = np.flatnonzero(np.asarray(arrays[dim][:length]) == fill)
            if len(unfilled):
                length = int(unfilled[0])
        out.append(length)
    return out[0], out[1]


def _ids_text(ids: np.ndarray, limit: int = 10) -> str:
    shown = ", ".join(str(int(i)) for i in ids[:limit])
    more = f", ... ({len(ids)} in all)" if len(ids) > limit else ""
    return f"[{shown}{more}]"


def _as_epoch(epoch: Any) -> int:
    if isinstance(epoch, bool) or not isinstance(epoch, int | np.integer):
        raise StoreError(f"epoch must be an integer, got {epoch!r}")
    if epoch < 0:
        raise StoreError(f"epoch must be >= 0, got {epoch}")
    return int(epoch)


def _read_1d(arr: zarr.Array, n: int) -> np.ndarray:
    values = np.asarray(arr[:n])
    return _plain_strings(values)


def _plain_strings(values: np.ndarray) -> np.ndarray:
    """Turn zarr's variable-length strings (object or StringDType) into numpy ``<U``."""
    if values.dtype.kind in "OT" or str(values.dtype).startswith("StringDType"):
        return np.array(values.tolist(), dtype=str)
    return values


@dataclass
class _Plan:
    new_rows: np.ndarray  # batch rows whose sample id is new to the layer
    write_rows: np.ndarray  # batch rows to write in this epoch


def _plan_batch(writer, layer, state, reduced, ids, labels, preds, meta, epoch, overwrite):
    """Check a batch against the stored layer; return what to write, or None to skip."""
    batch = len(ids)
    if state is None:
        return _Plan(new_rows=np.arange(batch), write_rows=np.arange(batch))
    where = f"layer {layer!r} of model {writer.model!r}"
    if reduced.values.shape[1] != state.n_neurons:
        raise StoreError(
            f"{where} has {state.n_neurons} neurons in the store, the batch has "
            f"{reduced.values.shape[1]}"
        )
    if reduced.reduce != state.reduce and (reduced.unit_coords or state.unit_coords):
        raise StoreError(f"{where} was stored with reduce={state.reduce!r}, not {reduced.reduce!r}")
    for key, vals in reduced.unit_coords.items():
        if key not in state.unit_coords or not np.array_equal(state.unit_coords[key], vals):
            raise StoreError(f"{where}: the batch's unit layout ({key}) differs from the stored one")
    if sorted(meta) != sorted(state.metadata):
        raise StoreError(
            f"{where} stores metadata columns {sorted(state.metadata)}, the batch has {sorted(meta)}"
        )
    pos = state.positions(ids)
    new = np.flatnonzero(pos < 0)
    old = np.flatnonzero(pos >= 0)
    if len(new) and state.frozen:
        raise StoreError(
            f"{where}: sample ids {ids[new][:10].tolist()} are not in the probe set of its "
            f"complete epochs ({len(state.sample_ids)} samples); every epoch must record the "
            "same probe samples"
        )
    if len(new) and state.labels is not None and labels is None:
        raise StoreError(f"{where} stores labels; the batch gives none for its new samples")
    if labels is not None and state.labels is None:
        raise StoreError(f"{where} was written without labels; the batch now gives labels")
    if labels is not None and _kind(labels) != _kind(state.labels):
        raise StoreError(f"{where}: labels are {labels.dtype}, the stored ones {state.labels.dtype}")
    if labels is not None and len(old):
        differ = state.labels[pos[old]] != labels[old]
        if differ.any():
            raise StoreError(
                f"{where}: labels of samples {ids[old][differ][:10].tolist()} differ from the stored ones"
            )
    for key, col in meta.items():
        if _kind(col) != _kind(state.metadata[key]):
            raise StoreError(f"{where}: metadata {key!r} is {col.dtype}, stored {state.metadata[key].dtype}")
        if len(old):
            stored = state.metadata[key][pos[old]]
            same = (stored == col[old]) | ((stored != stored) & (col[old] != col[old]))
            if not same.all():
                raise StoreError(
                    f"{where}: metadata {key!r} of samples {ids[old][~same][:10].tolist()} "
                    "differs from the stored one"
                )
    e = state.epoch_index(epoch)
    if e < 0 or not len(old):
        return _Plan(new_rows=new, write_rows=np.arange(batch))
    this_session = state.written.get(e)
    committed = state.mask[pos[old], e]
    if this_session is not None and len(old):
        padded = np.zeros(len(state.sample_ids), bool)
        padded[: len(this_session)] = this_session
        again = padded[pos[old]]
        if again.any() and not overwrite:
            raise StoreError(
                f"{where}: samples {ids[old][again][:10].tolist()} were already written in "
                f"epoch {epoch} by this writer (duplicate sample ids within an epoch)"
            )
    if overwrite or not committed.any():
        return _Plan(new_rows=new, write_rows=np.arange(batch))
    # Resume: committed samples must carry identical values; they are skipped.
    done_rows = old[committed]
    stored = _read_values(state, pos[done_rows], e)
    fresh = reduced.values[done_rows]
    stored_dtype = state.arrays[ACTIVATION].dtype
    if np.dtype(stored_dtype).itemsize < 4:  # compare as stored (rounded to float16)
        fresh = fresh.astype(stored_dtype).astype(np.float32)
    same = (stored == fresh) | (np.isnan(stored) & np.isnan(fresh))
    if not same.all():
        bad = ids[done_rows][~same.all(axis=1)]
        raise StoreError(
            f"{where}: samples {bad[:10].tolist()} are committed for epoch {epoch} with "
            "different values; pass overwrite=True to replace them"
        )
    rest = np.setdiff1d(np.arange(batch), done_rows)
    if not len(rest):
        logger.debug("%s epoch %s: batch already committed, skipped", where, epoch)
        return None
    return _Plan(new_rows=new, write_rows=rest)


def _read_values(state: _LayerState, pos: np.ndarray, e: int) -> np.ndarray:
    act = state.arrays[ACTIVATION]
    order = np.argsort(pos)
    out = np.empty((len(pos), state.n_neurons), dtype=np.float32)
    sorted_pos = pos[order]
    for p0, p1, i0, i1 in _runs(sorted_pos):
        out[order[i0:i1]] = np.asarray(act[:, p0:p1, e]).T
    return out


# --------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------
def open_store(
    store: Any,
    *,
    storage_options: Mapping[str, Any] | None = None,
    mask_uncommitted: bool = True,
) -> xr.DataTree:
    """Open a topoxr store as a lazy, dask-backed :class:`xarray.DataTree`.

    Parameters
    ----------
    store : str or os.PathLike
        Local path or fsspec URL of the store.
    storage_options : mapping, optional
        Passed to fsspec for URLs.
    mask_uncommitted : bool, default True
        Replace values that are not committed (a batch a crashed writer did not finish,
        epochs still being written) by NaN, lazily.

    Returns
    -------
    xarray.DataTree
        Nodes ``/<model>/<layer>`` with ``activation`` of dims
        ``("neuron", "sample", "epoch")`` and the coordinates of the store format.
        The view is a consistent snapshot even while a writer is running.

    Raises
    ------
    FileNotFoundError
        If nothing exists at ``store``.
    StoreError
        If it exists but is not a topoxr store.

    Examples
    --------
    >>> tree = open_store("memory://doc.zarr")
    >>> sorted(tree.children)
    ['mlp']
    """
    loc = _locate(store, storage_options)
    root = _open_root_readonly(loc)
    nodes: dict[str, xr.Dataset] = {"/": xr.Dataset(attrs=dict(root.attrs))}
    for model_name, model_group in sorted(root.groups()):
        nodes[f"/{model_name}"] = xr.Dataset(attrs=dict(model_group.attrs))
        for layer_name, group in sorted(model_group.groups()):
            if not group.attrs.get(_ATTR_READY, False):
                continue
            nodes[f"/{model_name}/{layer_name}"] = _layer_dataset(group, mask_uncommitted)
            for child_path, child in _subgroups(group):
                nodes[f"/{model_name}/{layer_name}/{child_path}"] = _plain_dataset(child)
    return xr.DataTree.from_dict(nodes)


def _subgroups(group: zarr.Group, prefix: str = "") -> list[tuple[str, zarr.Group]]:
    out = []
    for name, child in sorted(group.groups()):
        path = f"{prefix}{name}"
        out.append((path, child))
        out.extend(_subgroups(child, path + "/"))
    return out


def _plain_dataset(group: zarr.Group) -> xr.Dataset:
    """Read a small auxiliary group (e.g. saved layouts) eagerly."""
    variables = {}
    for name, arr in group.arrays():
        dims = tuple(arr.metadata.dimension_names or [f"dim_{i}" for i in range(arr.ndim)])
        values = _plain_strings(np.asarray(arr[...]))
        variables[name] = xr.Variable(dims, values, attrs=dict(arr.attrs))
    coord_names = [n for n, v in variables.items() if v.dims == (n,)]
    return xr.Dataset(
        {k: v for k, v in variables.items() if k not in coord_names},
        coords={k: variables[k] for k in coord_names},
        attrs=dict(group.attrs),
    )


def _layer_dataset(group: zarr.Group, mask_uncommitted: bool) -> xr.Dataset:
    import dask.array as dsa

    where = _where(group)
    arrays = dict(group.arrays())
    _check_required(group, arrays)

    def read(key: str, *sel: slice) -> np.ndarray:
        try:
            return np.asarray(arrays[key][sel or ...])
        except Exception as err:
            raise StoreCorruptionError(f"{where}: array {key!r} is unreadable ({err})") from err

    n, m = _guarded(where, lambda: _logical_lengths(arrays))
    sample_ids = read(SAMPLE, slice(0, n)).astype(np.int64)
    epochs = read(EPOCH, slice(0, m)).astype(np.int64)
    committed = np.zeros((n, m), dtype=bool)
    if n and m:
        committed = read(COMMITTED, slice(0, n), slice(0, m)).astype(bool)
    act = read_array(arrays[ACTIVATION])  # decoded by zarrs where installed
    checked = _CheckedActivation(act, committed, sample_ids, epochs, where)
    # Dask blocks of many whole zarr chunks (about 32 MiB), along sample then epoch:
    # each task decodes its chunks in one call, in parallel (zarrs' threads or zarr's),
    # and few tasks keep dask's own overhead small.
    blocks = read_blocks(act.chunks, (act.shape[0], n, m), checked.dtype.itemsize,
                         (NEURON, SAMPLE, EPOCH), grow=(SAMPLE,))
    # Not inlined: the wrapper holds the mask, which must not be copied into every task.
    # A fresh name per snapshot: values may change (overwrite=True) at the same shape.
    lazy = dsa.from_array(checked, chunks=blocks, lock=False, inline_array=False,
                          fancy=False, name=f"topoxr-activation-{uuid.uuid4().hex}")
    lazy = lazy[:, :n, :m]
    if mask_uncommitted and not committed.all():
        lazy = dsa.where(committed[np.newaxis], lazy, np.float32(np.nan))
    coords: dict[str, Any] = {
        NEURON: (NEURON, read(NEURON)),
        SAMPLE: (SAMPLE, sample_ids),
        EPOCH: (EPOCH, epochs),
        COMMITTED: ((SAMPLE, EPOCH), committed),
        EPOCH_COMPLETE: (EPOCH, read(EPOCH_COMPLETE, slice(0, m)).astype(bool)),
    }
    for key in group.attrs.get(_ATTR_UNIT_COORDS, []):
        coords[key] = (NEURON, read(key))
    if LABEL in arrays:
        coords[LABEL] = (SAMPLE, _plain_strings(read(LABEL, slice(0, n))))
    for key in group.attrs.get(_ATTR_METADATA, []):
        coords[key] = (SAMPLE, _plain_strings(read(key, slice(0, n))))
    if PREDICTION in arrays:
        coords[PREDICTION] = ((SAMPLE, EPOCH), read(PREDICTION, slice(0, n), slice(0, m)))
        coords[CORRECT] = ((SAMPLE, EPOCH), read(CORRECT, slice(0, n), slice(0, m)).astype(bool))
    for key in group.attrs.get(_ATTR_SCALARS, []):
        if key in arrays:
            coords[key] = (EPOCH, read(key, slice(0, m)))
    attrs = {k: v for k, v in group.attrs.items() if k != _ATTR_READY}
    da = xr.DataArray(lazy, dims=(NEURON, SAMPLE, EPOCH), name=ACTIVATION)
    return xr.Dataset({ACTIVATION: da}, coords=coords, attrs=attrs)


_REQUIRED = (ACTIVATION, NEURON, SAMPLE, EPOCH, EPOCH_COMPLETE, COMMITTED)


def _check_required(group: zarr.Group, arrays: Mapping[str, Any], fix: str = "") -> None:
    missing = [name for name in _REQUIRED if name not in arrays]
    if missing:
        raise StoreCorruptionError(
            f"{_where(group)} is damaged: array(s) {missing} are missing"
            + (f"; {fix}" if fix else "")
        )


def _where(group: zarr.Group) -> str:
    model, _, layer = group.path.rpartition("/")
    return f"layer {group.attrs.get(ATTR_LAYER, layer)!r} of model {model!r}"


def _guarded(where: str, func: Any) -> Any:
    try:
        return func()
    except StoreError:
        raise
    except Exception as err:
        raise StoreCorruptionError(f"{where}: the store is unreadable ({err})") from err


class _CheckedActivation:
    """``activation`` as dask sees it: unreadable or missing chunks become clear errors.

    Zarr returns the fill value (NaN) for a chunk that does not exist, which would pass
    for data; a chunk holding committed values must exist, so its absence is reported,
    naming the layer, epochs and samples affected.  Codec errors of a damaged chunk are
    translated the same way.
    """

    def __init__(self, array: zarr.Array, committed: np.ndarray, sample_ids: np.ndarray,
                 epochs: np.ndarray, where: str) -> None:
        self.array = array
        self.committed = committed
        self.sample_ids = sample_ids
        self.epochs = epochs
        self.where = where
        self.shape = array.shape
        # reduced-precision storage (float16) is read as float32
        self.dtype = np.promote_types(array.dtype, np.float32)
        self.ndim = array.ndim

    def _affected(self, key: tuple[slice, ...]) -> tuple[list[int], np.ndarray]:
        s, e = key[1], key[2]
        sub = self.committed[s, e]
        epochs = self.epochs[e][sub.any(axis=0)].tolist() if sub.size else []
        samples = self.sample_ids[s][sub.any(axis=1)] if sub.size else self.sample_ids[:0]
        return epochs, samples

    def __getitem__(self, key: Any) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        key = tuple(key) + (slice(None),) * (3 - len(key))
        if any(isinstance(k, int | np.integer) for k in key):
            # dask fuses integer selections into the read: read as slices, then drop axes
            as_slices = tuple(slice(int(k), int(k) + 1) if isinstance(k, int | np.integer)
                              else k for k in key)
            drop = tuple(0 if isinstance(k, int | np.integer) else slice(None) for k in key)
            return self[as_slices][drop]
        if not all(isinstance(k, slice) for k in key):
            raise TypeError(f"unsupported selection {key!r}")  # dask is told fancy=False
        try:
            block = np.asarray(self.array[key]).astype(self.dtype, copy=False)
        except Exception as err:
            epochs, samples = self._affected(key)
            raise StoreCorruptionError(
                f"{self.where}: a chunk of 'activation' is unreadable ({type(err).__name__}: "
                f"{err}); epochs {epochs}, samples {_ids_text(samples)} are affected"
            ) from err
        missing = self._missing_chunk(key, block)
        if missing is not None:
            epochs, samples = self._affected(missing)
            raise StoreCorruptionError(
                f"{self.where}: a chunk of 'activation' holding committed values is "
                f"missing from the store; epochs {epochs}, samples {_ids_text(samples)} "
                "are affected"
            )
        return block

    def _missing_chunk(self, key: tuple[slice, ...], block: np.ndarray) -> tuple[slice, ...] | None:
        """The region of a zarr chunk inside ``key`` that holds committed values but is absent.

        A chunk missing from the store reads as its fill value (NaN) everywhere. Each zarr
        chunk of the selection that holds committed cells is first tested on one committed
        cell (a vector of neurons): a value that is not NaN proves the chunk exists, which
        settles almost every chunk without another pass over the data. Only when that
        cell is all NaN are all committed values of the chunk tested, and only when they
        are all NaN is the store asked whether the chunk exists.
        """
        starts = [sl.indices(dim)[0] for sl, dim in zip(key, self.shape, strict=True)]
        sub = self.committed[key[1], key[2]]
        n_s, n_e = sub.shape
        if not block.size or not sub.any():
            return None
        n_n = block.shape[0]
        size_n, size_s, size_e = self.array.chunks
        for n_lo, n_hi in _chunk_pieces(starts[0], starts[0] + n_n, size_n):
            rows = slice(n_lo - starts[0], n_hi - starts[0])
            for s_lo, s_hi in _chunk_pieces(starts[1], starts[1] + n_s, size_s):
                ss = slice(s_lo - starts[1], s_hi - starts[1])
                for e_lo, e_hi in _chunk_pieces(starts[2], starts[2] + n_e, size_e):
                    es = slice(e_lo - starts[2], e_hi - starts[2])
                    cells = sub[ss, es]
                    if not cells.any():
                        continue
                    i, j = divmod(int(np.flatnonzero(cells)[0]), cells.shape[1])
                    if not np.isnan(block[rows, ss.start + i, es.start + j]).all():
                        continue
                    if not np.isnan(block[rows, ss, es][:, cells]).all():
                        continue
                    region = (slice(n_lo, n_hi), slice(s_lo, s_hi), slice(e_lo, e_hi))
                    if not self._chunks_exist(region):
                        return region
        return None

    def _chunks_exist(self, key: tuple[slice, ...]) -> bool:
        from zarr.core.sync import sync

        chunks = self.array.chunks
        ranges = []
        for sl, size, dim in zip(key, chunks, self.shape, strict=True):
            start, stop, _ = sl.indices(dim)
            ranges.append(range(start // size, max(start // size + 1, -(-stop // size))))
        store_path = self.array.store_path
        for i in ranges[0]:
            for j in ranges[1]:
                for k in ranges[2]:
                    chunk_key = self.array.metadata.encode_chunk_key((i, j, k))
                    if not sync((store_path / chunk_key).exists()):
                        return False
        return True


def _chunk_pieces(start: int, stop: int, size: int) -> list[tuple[int, int]]:
    """Split ``[start, stop)`` at the multiples of ``size`` (the chunk boundaries)."""
    edges = [start, *range((start // size + 1) * size, stop, size), stop]
    return [(lo, hi) for lo, hi in zip(edges[:-1], edges[1:], strict=True) if hi > lo]


def store_summary(store: Any, *, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Summarise a store without reading activations.

    Parameters
    ----------
    store : str or path-like
        Path or fsspec URL of the store.
    storage_options : mapping, optional
        Options of the fsspec filesystem (remote stores).

    Returns
    -------
    dict
        ``{"store", "format_version", "created", "description", "models": {model:
        {"name", "attrs", "layers": {layer: {"name", "neurons", "samples", "epochs",
        "complete_epochs", "incomplete_epochs", "committed_fraction", "chunks"}}}}}``,
        JSON-serialisable.
    """
    loc = _locate(store, storage_options)
    root = _open_root_readonly(loc)
    out: dict[str, Any] = {
        "store": loc.url,
        "format_version": root.attrs.get(ATTR_FORMAT),
        "created": root.attrs.get("created"),
        "description": root.attrs.get("description", ""),
        "models": {},
    }
    for model_name, model_group in sorted(root.groups()):
        layers: dict[str, Any] = {}
        for layer_name, group in sorted(model_group.groups()):
            if not group.attrs.get(_ATTR_READY, False):
                continue
            arrays = dict(group.arrays())
            n, m = _guarded(_where(group), lambda arrays=arrays: _logical_lengths(arrays))
            epochs = [int(e) for e in arrays[EPOCH][:m]]
            complete = np.asarray(arrays[EPOCH_COMPLETE][:m], dtype=bool)
            committed = np.asarray(arrays[COMMITTED][:n, :m], dtype=bool) if n and m else \
                np.zeros((n, m), bool)
            layers[layer_name] = {
                "name": group.attrs.get(ATTR_LAYER, layer_name),
                "neurons": int(arrays[ACTIVATION].shape[0]),
                "samples": int(n),
                "epochs": epochs,
                "complete_epochs": [e for e, c in zip(epochs, complete, strict=True) if c],
                "incomplete_epochs": [e for e, c in zip(epochs, complete, strict=True) if not c],
                "committed_fraction": float(committed.mean()) if committed.size else 0.0,
                "reduce": group.attrs.get(_ATTR_REDUCE, "mean"),
                "chunks": list(arrays[ACTIVATION].chunks),
            }
        out["models"][model_name] = {
            "name": model_group.attrs.get(ATTR_MODEL, model_name),
            "attrs": {k: v for k, v in model_group.attrs.items() if k != ATTR_MODEL},
            "layers": layers,
        }
    return out

