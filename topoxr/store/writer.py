"""The writer: :class:`ActivationWriter` streams batches into a store."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import logging
import os
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import zarr

from topoxr._chunkio import (
    clear_encoded_memo,
    consolidate,
    create_group,
    group_members,
    resizer,
    run_jobs,
    settle_zarr_io,
    start_linking,
    stop_linking,
    update_group_attributes,
)
from topoxr._codecs import DEFAULT_COMPRESSOR, DTYPES, compressors_for, storage_dtype
from topoxr._locking import WriterLock
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
from topoxr.store._chunks import _append, _run_in_order, _write_mask_chunks
from topoxr.store._errors import StoreCorruptionError, StoreError, StoreWriteError
from topoxr.store._integrity import lost_nodes, lost_nodes_message
from topoxr.store._location import _locate, _open_root_readonly, safe_node_name
from topoxr.store._plan import (
    _as_1d,
    _as_epoch,
    _as_ids,
    _check_node_name,
    _Pending,
    _Plan,
    _plan_batch,
)
from topoxr.store._schema import (
    CHECKSUM,
    _ACTIVATION_CONFIG,
    _ARRAY_CONFIG,
    _ATTR_METADATA,
    _ATTR_GENERATION,
    _ATTR_READY,
    _ATTR_REDUCE,
    _ATTR_SCALARS,
    _ATTR_UNIT_COORDS,
    _COORD_CHUNK,
    _EPOCH_CHUNK,
    _EPOCH_FILL,
    _MASK_TARGET,
    _MAX_CHUNK_BYTES,
    column_name_hint,
    epoch_scalar_values,
    valid_column_name,
    _TARGET_CHUNK_BYTES,
    MASK_CHUNK,
    SAMPLE_FILL,
    SAMPLE_MAJOR,
    _check_required,
    _create_arrays,
    _creatable_later,
    _fill,
    _ids_text,
    _kind,
    _logical_lengths,
    _plain_strings,
    _prediction_specs,
    _zarr_dtype,
    read_together,
)
from topoxr.store._state import _layer_columns, _LayerState, _runs
from topoxr.store.verify import ATTR_VERIFIED

logger = logging.getLogger(__name__)

#: Default ``buffer_bytes``: activations of one layer buffered before a commit.
BUFFER_BYTES = 16 << 20
#: Epochs a layer's arrays make room for when a second epoch arrives (then doubling):
#: growing costs a metadata file per array, and no chunk is stored for empty epochs.
_EPOCH_ROOM = 16


#: Batches per ``activation`` chunk at most, where the writer is not told how many samples
#: will come (``expected_samples``) and sizes the chunks from the first batch.
_UNKNOWN_SAMPLES_BATCHES = 16
#: ... but no fewer samples than this (within the 4 MiB target).
_UNKNOWN_SAMPLES_ROWS = 1024


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
        size holding about 4 MiB, so batches of the same size never straddle chunks
        (with ``expected_samples``, as few such chunks as those samples need, made even
        in size; without it, 16 batches at most, or 1024 samples where that is more:
        a chunk is stored whole, however few samples come).
    storage_options : mapping, optional
        Passed to fsspec for URLs.
    attrs : mapping, optional
        Extra attributes for the model group (e.g. ``{"framework": "torch"}``); they
        replace the stored ones, but a model recorded with another ``framework`` is
        refused.
    break_lock : bool, default False
        Take over the lock object of a remote store whose writer is known to be gone.
    fsync : bool, default False
        Local stores only: ``fsync`` every file written (and its directory), so that
        committed batches survive a power loss or kernel crash, not only a killed
        process. Costs throughput (see ``docs/benchmarks.md``).
    compressor : str, zarr codec or None, default "none"
        Codec of the ``activation`` arrays of layers this writer creates. The default,
        no compression, reads and writes fastest (``docs/benchmarks.md``, "Data path":
        full-precision float32 activations hardly compress with fast codecs);
        ``"lz4"`` (blosc lz4 with bit shuffle) is nearly as fast and stores quantised
        or sparse activations in 2-3 times fewer bytes; ``"zstd"`` stores the fewest
        bytes and reads 3-5 times slower. Also ``"zstd-1"``, ``"blosc-zstd"``, or any
        zarr bytes-to-bytes codec. Layers already in the store keep theirs.
    dtype : {"float32", "float16"}, default "float32"
        Storage dtype of new layers' activations. ``"float16"`` halves the bytes; each
        value is rounded to 11 significant bits (relative error at most 2**-11 = 4.9e-4
        from 6.1e-5 to 65504, absolute error at most 2**-25 below; larger magnitudes are
        refused). Readers get float32 either way. ``"bfloat16"`` is refused: zarr v3
        has no such data type that zarr-python reads.
    buffer_bytes : int, default 16 MiB
        Activations of one layer that :meth:`write` may hold in memory before committing
        them (all layers together hold at most about ``8 * buffer_bytes``, buffers kept
        for reuse included). Consecutive batches of a
        layer and epoch are committed together, in whole chunks: one commit per
        ``buffer_bytes`` instead of one per batch, each chunk written once (see "Commits"
        below). ``0`` commits every batch when :meth:`write` returns.
    expected_samples : int, optional
        How many samples the layers this writer creates will hold (the probe set's
        size, where known): their arrays are created that long and one epoch deep, so
        that the first commit grows none of them (about ten metadata files per layer
        fewer). A wrong guess costs nothing but that: arrays grow past it as usual and
        ``close()`` trims them to the data (readers never see the unwritten part).
    expected_epochs : int, optional
        How many epochs this writer will add to each layer (``1`` for a recording of one
        epoch): the epoch axis then grows once, by exactly that many, instead of to a
        power of two (at least 16) that ``close()`` trims back, which rewrites the
        metadata of six arrays per layer twice. More epochs than expected grow in powers
        of two as usual.
    link_identical_files : bool, default True
        Local stores only (not with ``fsync``): a small file (64 KiB at most) whose bytes
        equal those of a file this writer wrote before becomes a hard link to it: one
        inode for every layer's copy of the same coordinates and metadata (268 of the
        313 files of a 15-layer ResNet-18), which creating and deleting stores pays
        for per inode (see "Hard links" below). ``False`` writes every file.

    Notes
    -----
    **Hard links.** topoxr and zarr-python's local store (zarr 3.1.3 and later; topoxr
    requires 3.1.6) never change a stored file in place: they write a temporary file and
    rename it over the old name, which gives that name a new file and leaves its other
    names as they were, so a linked file reads as if it were a copy. A tool that writes
    into existing files in place (``zarrs``' own store, fsspec's local files, which
    zarr-python uses for a ``file://`` URL) would change every name of a linked file:
    change a store only through topoxr or through zarr-python with a plain path, or
    write it with ``link_identical_files=False``.
    Copies (``cp -r``, ``shutil.copytree``, ``rsync`` without ``-H``) hold plain files.

    **Commits.** What a reader (or a resumed run) sees is always consistent: a batch is
    either committed in full, in every array, or invisible. :meth:`write` checks a
    batch at once (a rejected batch changes nothing) and buffers it; the buffered
    batches of a layer are committed when they reach ``buffer_bytes``, when the layer's
    epoch or the kind of batch changes, and at :meth:`flush`, :meth:`complete_epoch`,
    :meth:`log_epoch` and :meth:`close` (also when the ``with`` block ends with an
    exception). A process killed in between loses at most the buffered batches; resume
    writes them again.

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
        fsync: bool = False,
        compressor: Any = DEFAULT_COMPRESSOR,
        dtype: str = "float32",
        buffer_bytes: int = BUFFER_BYTES,
        expected_samples: int | None = None,
        expected_epochs: int | None = None,
        link_identical_files: bool = True,
    ) -> None:
        for name, value in (("expected_samples", expected_samples),
                            ("expected_epochs", expected_epochs)):
            if value is not None and (isinstance(value, bool)
                                      or not isinstance(value, int | np.integer) or value < 0):
                raise StoreError(f"{name} must be a non-negative integer or None, got {value!r}")
        self._expected_samples = 0 if expected_samples is None else int(expected_samples)
        self._expected_epochs = 0 if expected_epochs is None else int(expected_epochs)
        if isinstance(buffer_bytes, bool) or not isinstance(buffer_bytes, int | np.integer) \
                or buffer_bytes < 0:
            raise StoreError(f"buffer_bytes must be a non-negative integer, got {buffer_bytes!r}")
        self._buffer_bytes = int(buffer_bytes)
        self._pending: dict[str, _Pending] = {}
        self._spare: dict[str, np.ndarray] = {}  # a committed buffer, reused per layer
        # an array handed over by its only holder (see write_handed_over): a new buffer
        # may take it as it is instead of copying it
        self._handed_over: Any = None
        try:
            self._compressors = compressors_for(compressor)
            self._dtype = storage_dtype(dtype)
        except ValueError as err:
            raise StoreError(str(err)) from None
        if mode not in ("a", "w"):
            raise StoreError(f"mode must be 'a' (create or resume) or 'w' (replace), got {mode!r}")
        _check_node_name("model", model, {})
        if chunk_samples is not None and int(chunk_samples) < 1:
            raise StoreError(f"chunk_samples must be a positive integer, got {chunk_samples}")
        self.model = model
        self._chunk_samples = None if chunk_samples is None else int(chunk_samples)
        self._loc = _locate(store, storage_options)
        self._loc.refuse_writing("record into it")
        if fsync:
            if self._loc.local_dir is None:
                raise StoreError("fsync=True is for local paths: an object store keeps each "
                                 "write once it returns, and memory:// cannot")
            from topoxr.store._durable import DurableLocalStore

            self._loc = dataclasses.replace(
                self._loc, store=DurableLocalStore(self._loc.local_dir))
        self._layers: dict[str, _LayerState] = {}
        self._closed = False
        self._failed: str | None = None
        self._linking = False

        existed = self._loc.exists() and not self._loc.is_empty_dir()
        if existed:
            _open_root_readonly(self._loc)  # refuses non-topoxr paths before touching them
        elif self._loc.local_dir is not None:
            import os

            os.makedirs(self._loc.local_dir, exist_ok=True)
        self._lock = WriterLock(self._loc.url, local_dir=self._loc.local_dir, fs=self._loc.fs,
                                lock_path=self._loc.lock_path)
        self._lock.acquire(break_lock=break_lock)
        try:
            if existed and self._loc.local_dir is not None:
                _remove_temporary_files(self._loc.local_dir)
            if link_identical_files and self._loc.local_dir is not None and not fsync:
                start_linking(self._loc.store)
                self._linking = True
            self._root = self._open_root(existed, description, mode)
            self._model_group = self._open_model(mode, attrs)
            self._load_layers()
        except StoreError:
            self._unlock()
            raise
        except Exception as err:
            settle_zarr_io()  # nothing of the failed opening may still be writing
            self._unlock()
            raise StoreWriteError(
                f"opening {self._loc.url!r} for writing failed ({type(err).__name__}: {err}); "
                "everything committed before is intact: fix the cause and open a new "
                "ActivationWriter to resume"
            ) from err
        except BaseException:
            self._unlock()
            raise

    # -- opening ---------------------------------------------------------------------
    def _open_root(self, existed: bool, description: str | None, mode: str) -> zarr.Group:
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
        own = safe_node_name(self.model)
        lost = [p for p in lost_nodes(root)  # mode="w" deletes its own model's nodes anyway
                if mode != "w" or (p != own and not p.startswith(f"{own}/"))]
        if lost:
            # dropping the listing below would erase the only record of what was lost
            raise StoreCorruptionError(lost_nodes_message(self._loc.url, lost))
        # Consolidated metadata would be stale as soon as we write: drop it now, it is
        # written again by close().
        root.update_attributes({})
        if ATTR_VERIFIED in root.attrs:  # the store changes: the verification is outdated
            del root.attrs[ATTR_VERIFIED]
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
            stored = group.attrs.get("framework")
            if attrs and "framework" in attrs and stored is not None and (
                    attrs["framework"] != stored):
                # another framework's model: its layers may share names and sizes with
                # this one's, and epochs of two networks would sit in one layer
                raise StoreError(
                    f"model {self.model!r} in {self._loc.url!r} was recorded with "
                    f"framework={stored!r}; this writer records framework="
                    f"{attrs['framework']!r}: record it under another model name")
            if attrs:
                group.update_attributes(dict(attrs))
            logger.info("resuming model %r in %s", self.model, self._loc.url)
            return group
        return self._root.create_group(name, attributes={ATTR_MODEL: self.model, **(attrs or {})})

    def _load_layers(self) -> None:
        """Load the model's layers; remove those half-created by a crashed writer.

        Raises
        ------
        StoreCorruptionError
            If a layer lacks its ready mark but holds committed data (it lost the
            attribute): it is not deleted (see :func:`topoxr.store.verify.unready_layer_damage`).
        """
        from topoxr.store.verify import unready_layer_damage

        for name, group in list(self._model_group.groups()):
            layer = group.attrs.get(ATTR_LAYER, name)
            if not group.attrs.get(_ATTR_READY, False):
                damage = unready_layer_damage(group)
                if damage is not None:
                    raise StoreCorruptionError(damage)
                logger.warning("removing layer %r left half-created by a crashed writer", layer)
                del self._model_group[name]
                continue
            self._layers[layer] = self._load_layer(layer, group)

    def _load_layer(self, layer: str, group: zarr.Group) -> _LayerState:
        arrays = {k: v for k, v in group_members(group).items() if isinstance(v, zarr.Array)}
        _check_required(group, arrays, fix="open the writer with mode='w' to record the "
                                           "model again")
        n, m, sample_ids, epoch_values = _logical_lengths(arrays)
        sample_ids = np.asarray(sample_ids, dtype=np.int64)
        epochs = [int(e) for e in epoch_values]
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
        meta_names = list(group.attrs.get(_ATTR_METADATA, []))
        unit_names = list(group.attrs.get(_ATTR_UNIT_COORDS, []))
        columns = ([LABEL] if LABEL in arrays else []) + meta_names
        # every other array the layer's state needs, in one trip to zarr's event loop
        read = read_together(
            [(arrays[COMMITTED], (slice(0, n), slice(0, m))),
             (arrays[EPOCH_COMPLETE], slice(0, m))]
            + [(arrays[key], slice(0, n)) for key in columns]
            + [(arrays[key], slice(None)) for key in unit_names])
        mask, complete = read[0].astype(bool), read[1].astype(bool)
        values = dict(zip(columns, (_plain_strings(v) for v in read[2:2 + len(columns)]),
                          strict=True))
        state = _LayerState(
            name=layer, group=group, n_neurons=int(arrays[ACTIVATION].shape[0]),
            reduce=str(group.attrs.get(_ATTR_REDUCE, "mean")),
            unit_coords=dict(zip(unit_names, read[2 + len(columns):], strict=True)),
            sample_ids=sample_ids, epochs=epochs, mask=mask, complete=complete,
            labels=values.get(LABEL), metadata={k: values[k] for k in meta_names},
            epochs_at_open=m,
        )
        # the arrays just listed (and repaired), so that the first write lists none again
        state.adopt({name: arr.with_config(_ARRAY_CONFIG) for name, arr in arrays.items()})
        return state

    # -- public API --------------------------------------------------------------------
    @property
    def url(self) -> str:
        """Where the store lives."""
        return self._loc.url

    @property
    def layers(self) -> list[str]:
        """Names of the layers of this model in the store."""
        return list(self._layers)

    def value_bytes(self, layer: str) -> int:
        """Bytes of one stored activation value of ``layer``.

        Parameters
        ----------
        layer : str
            A layer name, stored or not.

        Returns
        -------
        int
            The item size of the layer's stored dtype (2 for ``float16`` and
            ``bfloat16``, 4 for ``float32``); for a layer not stored yet, that of the
            ``dtype`` this writer creates layers with.
        """
        state = self._layers.get(layer)
        return np.dtype(self._dtype if state is None else state.storage_dtype).itemsize

    def missing(self, layer: str, epoch: int, sample: Iterable[int]) -> np.ndarray:
        """Return the ids among ``sample`` not yet committed for ``layer`` at ``epoch``.

        The layer's buffered batches are committed first, so the answer is what the
        store holds.

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
        ids = _as_ids(f"layer {layer!r}", sample)
        if layer in self._pending:
            self._check_open()
            self._flush_layer(layer)
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
        layer_attrs: Mapping[str, Any] | None = None,
        batch_rows: int | None = None,
        **metadata: Any,
    ) -> int:
        """Check one batch of one layer and commit it (buffered, see "Commits").

        Every check runs before anything is written: a rejected batch leaves the store
        exactly as it was (it may commit batches buffered before it that it conflicts
        with, e.g. the same samples in another epoch).

        Parameters
        ----------
        layer : str
            Layer name (any string; stored under a safe node name, original in attrs).
        activations : array_like
            ``(batch, neurons)``, or ``(batch, ...)`` with ``channel_axis`` for conv maps.
        sample : array_like of int
            Stable id of every input in the batch, unique within the batch.
        label : array_like, optional
            Class label per sample: integers or strings (not floats or bools).
        prediction : array_like, optional
            Model prediction per sample for this epoch, of the labels' kind (integers or
            strings); with ``label`` it gives ``correct``. A layer stores predictions for
            every batch or for none: a layer that stores them needs them in every batch,
            and one with committed samples without them takes none.
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
        layer_attrs : mapping, optional
            Attributes stored on the layer when this write creates it (e.g. which axes
            of the output were reduced, see :func:`topoxr.reduction.reduction_attrs`);
            ignored for a layer that exists (the recorders compare them before writing).
        batch_rows : int, optional
            Rows of one of the caller's batches, where this call joins several (default:
            the rows of this call). A layer created by this call sizes its chunks in
            whole multiples of it (see ``chunk_samples``), as if its batches had come
            one by one.
        **metadata : array_like
            Extra per-sample columns (str, int, float or bool), stored as coordinates.

        Returns
        -------
        int
            Number of samples written or buffered for the next commit (0 when the whole
            batch was already committed).

        Raises
        ------
        StoreError
            Naming the problem: shapes, lengths, duplicates, non-finite or non-numeric
            values, labels or predictions that are not integers or strings or not of one
            kind, predictions missing for a layer that stores them (or given for one
            written without them), a neuron count or probe set that differs from the
            stored layer, or committed values that differ.
        StoreWriteError
            If the storage fails (disk full, network...): the batch is not committed,
            everything committed before is intact, and this writer refuses further
            writes; open a new one to resume.
        """
        self._check_open()
        if not isinstance(layer, str) or layer not in self._layers:  # before any write
            _check_node_name("layer", layer,
                             {safe_node_name(name): name for name in self._layers})
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
        if batch_rows is not None and (isinstance(batch_rows, bool) or not isinstance(
                batch_rows, int | np.integer) or batch_rows < 1):
            raise StoreError(f"layer {layer!r}: batch_rows must be a positive integer, got "
                             f"{batch_rows!r}")
        if batch == 0:
            logger.debug("layer %r: empty batch, nothing to write", layer)
            return 0
        ids = _as_ids(f"layer {layer!r}", ids)
        # increasing ids (the common case) are unique, and only the first can be the
        # smallest int64, the reserved fill; other batches are sorted first
        increasing = len(ids) < 2 or bool((ids[1:] > ids[:-1]).all())
        lowest = int(ids[0])
        if not increasing:
            uniq, counts = np.unique(ids, return_counts=True)
            if (counts > 1).any():
                raise StoreError(f"layer {layer!r}: duplicate sample ids in the batch: "
                                 f"{uniq[counts > 1][:10].tolist()}")
            lowest = int(uniq[0])
        if not allow_nonfinite and not np.isfinite(values).all():
            finite = np.isfinite(values)
            rows = np.flatnonzero(~finite.reshape(len(values), -1).all(axis=1))
            raise StoreError(
                f"layer {layer!r}: {int((~finite).sum())} activation value(s) are NaN or inf "
                f"at epoch {epoch!r}, samples {_ids_text(ids[rows])} (a model that diverged "
                "or overflowed?); nothing of the batch is written. The recorders refuse "
                "them: record the epochs before the model diverged. ActivationWriter.write"
                "(..., allow_nonfinite=True) stores them: naps skip NaN values as missing "
                "but keep an inf in its group's mean (that group's NAP is then inf for the "
                "neuron), and distances and layouts refuse profiles holding NaN or inf, "
                "naming the neurons"
            )
        self._check_range(layer, values)
        labels = None if label is None else _as_1d(f"layer {layer!r}: label", label, batch)
        preds = None if prediction is None else _as_1d(
            f"layer {layer!r}: prediction", prediction, batch)
        for what, col in (("labels", labels), ("predictions", preds)):
            if col is not None and col.dtype.kind not in "iuU":
                raise StoreError(
                    f"layer {layer!r}: {what} must be integers or strings (class indices or "
                    f"names), got {col.dtype}; cast class indices with .astype(int)")
        meta = {}
        for key, col in metadata.items():
            if not valid_column_name(key):
                raise StoreError(f"layer {layer!r}: {key!r} cannot be a metadata column name"
                                 f"{column_name_hint(key)}")
            meta[key] = _as_1d(f"layer {layer!r}: metadata {key!r}", col, batch)
        epoch = _as_epoch(epoch)

        if lowest == SAMPLE_FILL:
            raise StoreError(f"layer {layer!r}: sample id {SAMPLE_FILL} is reserved")

        state = self._layers.get(layer)
        pending = self._pending.get(layer)
        self._check_predictions(layer, state, pending, labels, preds)
        kinds = _Pending.signature(labels, preds, meta)
        if pending is not None and not pending.accepts(epoch, ids, lowest, kinds,
                                                       overwrite):
            self._flush_layer(layer)
        plan = _plan_batch(self, layer, state, reduced, ids, labels, preds, meta, epoch,
                           overwrite, increasing=increasing)
        if plan is None:  # every sample already committed with these values: resume skip
            state.note_written(state.epoch_index(epoch), state.positions(ids))
            return 0
        try:
            if state is None:
                state = self._create_layer(layer, reduced, labels, preds, meta,
                                           batch if batch_rows is None else int(batch_rows),
                                           layer_attrs)
            if overwrite or len(plan.write_rows) != batch or not self._buffer_bytes:
                # replacing or resuming (rare): committed at once, alone
                self._flush_layer(layer)
                if overwrite and state.creation is None and state.epoch_index(epoch) >= 0:
                    # committed values may change: views opened before must tell (a new
                    # token, written before the values)
                    update_group_attributes(state.group, {_ATTR_GENERATION: uuid.uuid4().hex})
                written = self._commit(state, plan, values, ids, labels, preds, meta, epoch)
                state.note_written(state.epoch_index(epoch), state.positions(ids))
                return written
            pending = self._pending.get(layer)
            if pending is None:
                batch_bytes = 4 * values.shape[1] * batch  # the buffer is float32
                pending = self._pending[layer] = _Pending(
                    epoch, values.shape[1], self._spare.pop(layer, None),
                    rows=max(1, -(-self._buffer_bytes // batch_bytes)) * batch)
            pending.add(values, ids, labels, preds, meta, plan.new_rows, kinds,
                        adopt=activations is self._handed_over)
        except StoreError:
            raise
        except Exception as err:
            self._fail(err, f"writing layer {layer!r} epoch {epoch} samples "
                            f"{_ids_text(ids)}")
        if pending.nbytes >= self._buffer_bytes and self._at_chunk_end(state, pending):
            self._flush_layer(layer)
        elif sum(p.nbytes for p in self._pending.values()) >= 4 * self._buffer_bytes:
            self.flush()
        return batch

    def write_handed_over(self, layer: str, activations: np.ndarray, **kwargs: Any) -> int:
        """:meth:`write` of an array nobody else holds or changes any more.

        The layer's buffer may then take ``activations`` as it is rather than copy it
        (where it holds no other batch and the array is C-contiguous float32 ``(batch,
        neurons)``, or a view of that shape): :class:`topoxr.recording.BackgroundWriter`
        hands over the batches it joined. Everything else is as :meth:`write`.

        Parameters
        ----------
        layer : str
            Layer name, as for :meth:`write`.
        activations : numpy.ndarray
            The batch; the caller must neither change nor reuse it afterwards (the store
            may hold it until the layer's next commit, and reuse its memory then).
        **kwargs
            Every other argument of :meth:`write` (``sample=`` is required).

        Returns
        -------
        int
            As :meth:`write`: samples written or buffered.
        """
        self._handed_over = activations
        try:
            return self.write(layer, activations, **kwargs)
        finally:
            self._handed_over = None

    def flush(self) -> None:
        """Commit every buffered batch (see "Commits" in the class notes).

        Raises
        ------
        StoreWriteError
            If the storage fails: the buffered batches are not committed, everything
            committed before is intact, and this writer refuses further writes.
        """
        self._check_open()
        self._flush_layers(list(self._pending))

    def _at_chunk_end(self, state: _LayerState, pending: _Pending) -> bool:
        """Whether the buffered rows end on a chunk boundary (or at the probe set's end)."""
        if pending.nbytes >= 2 * self._buffer_bytes:
            return True
        chunk = state.arrays[ACTIVATION].chunks[1]
        pos = int(state.positions(pending.last_ids[-1:])[0])
        if pos < 0:  # the last rows are new samples, appended after the stored ones
            return (len(state.sample_ids) + pending.new_count) % chunk == 0
        return (pos + 1) % chunk == 0 or pos + 1 == len(state.sample_ids)

    def _flush_layer(self, layer: str) -> None:
        """Commit the buffered batches of ``layer`` as one batch."""
        self._flush_layers([layer])

    def _flush_layers(self, layers: Sequence[str]) -> None:
        """Commit the buffered batches of each of ``layers`` as one batch, all together."""
        self._create_pending(self._layers[layer] for layer in layers if layer in self._pending)
        flushed, commits = [], []
        for layer in layers:
            pending = self._pending.pop(layer, None)
            if pending is None or not pending.rows:
                continue
            state = self._layers[layer]
            values, ids, labels, preds, meta, new_rows = pending.merged()
            plan = _Plan(new_rows=new_rows, write_rows=np.arange(len(ids)))
            flushed.append((layer, state, pending, ids))
            try:
                commits.append(self._prepare_commit(state, plan, values, ids, labels, preds,
                                                    meta, pending.epoch))
            except Exception as err:
                self._fail(err, f"committing {len(ids)} buffered samples of layer "
                                f"{layer!r} epoch {pending.epoch} ({_ids_text(ids)})")
        if not commits:
            return
        try:
            _run_commits(commits)
        except Exception as err:
            self._fail(err, "committing " + "; ".join(
                f"{len(ids)} buffered samples of layer {layer!r} epoch {pending.epoch} "
                f"({_ids_text(ids)})" for layer, _, pending, ids in flushed))
        for layer, state, pending, ids in flushed:
            state.note_written(state.epoch_index(pending.epoch), state.positions(ids))
            spare = sum(b.nbytes for b in self._spare.values())
            if spare + pending.values.nbytes <= 4 * self._buffer_bytes:  # memory stays bounded
                self._spare[layer] = pending.values

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
        self.flush()
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
        values = epoch_scalar_values(scalars, StoreError)
        self.flush()
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
                        state.adopt(_create_arrays(state.group, {key: dict(
                            shape=(state.arrays[EPOCH].shape[0],), chunks=(_EPOCH_CHUNK,),
                            dtype="float64", fill_value=np.nan, dimension_names=(EPOCH,))},
                            existing=state.arrays))
                        if state.arrays[key].size:  # every chunk stored (missing = damage)
                            state.arrays[key][...] = np.nan
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
                    self.flush()
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
            return
        try:  # the batches accepted before the error are committed (resume skips them)
            if self._failed is None and not self._closed:
                self.flush()
                # the store's listing again, so that a node lost before the next writer
                # opens is still detected (see topoxr.store._integrity.lost_nodes)
                self._consolidate()
        except Exception as err:  # the caller's exception is the one that propagates
            logger.warning("committing the buffered batches after an error failed: %s", err)
        finally:
            self._release()

    def __del__(self) -> None:  # a writer dropped without close() still unlocks
        try:
            if not self._closed:
                self._release()
        except Exception:
            pass

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<ActivationWriter {self._loc.url!r} model={self.model!r} {state}>"

    # -- internals ---------------------------------------------------------------------
    def _check_predictions(self, layer: str, state: _LayerState | None,
                           pending: _Pending | None, labels: np.ndarray | None,
                           preds: np.ndarray | None) -> None:
        """Refuse predictions the layer cannot store as given (before anything is written).

        A layer stores predictions for all its batches or for none: samples committed
        (or buffered) without them would read as predicted class -1 (or ``""``) and not
        correct. ``correct`` compares predictions with labels, so both must be of one
        kind (integers or strings), that of the predictions already stored too.
        """
        where = f"layer {layer!r} of model {self.model!r}"
        stored = None if state is None else state.arrays.get(PREDICTION)
        if state is not None and preds is None and stored is not None:
            raise StoreError(f"{where} stores predictions; the batch gives none")
        if preds is None:
            return
        if stored is None and state is not None and (
                state.mask.any() or (pending is not None and pending.rows)):
            raise StoreError(f"{where} was written without predictions; the batch now gives "
                             "predictions")
        # the stored labels where there are (the batch's must be of their kind, which
        # _plan_batch checks), else the batch's
        known = state.labels if state is not None and state.labels is not None else labels
        if known is not None and _kind(known) != _kind(preds):
            raise StoreError(f"{where}: labels are {known.dtype} and predictions "
                             f"{preds.dtype}; 'correct' compares them, so both must be "
                             "integers or both strings")
        if stored is not None and _array_kind(stored) != _kind(preds):
            kind = "strings" if _array_kind(stored) == "U" else stored.dtype
            raise StoreError(f"{where}: predictions are {preds.dtype}, the stored ones {kind}")

    def _check_range(self, layer: str, values: np.ndarray) -> None:
        """Refuse values that the layer's storage dtype would turn into infinities."""
        state = self._layers.get(layer)
        dtype = self._dtype if state is None else state.storage_dtype
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
        """Turn a storage failure into :class:`StoreWriteError`; the writer is unusable.

        zarr may still be writing other parts of the failed call: they are waited for
        first (see :func:`topoxr._chunkio.settle_zarr_io`).
        """
        self._failed = f"{type(err).__name__}: {err}"
        settle_zarr_io()
        raise StoreWriteError(
            f"{what} to {self._loc.url!r} failed ({self._failed}); the batch is not "
            "committed, everything committed before is intact. Open a new ActivationWriter "
            "on the store to resume."
        ) from err

    def _release(self) -> None:
        self._closed = True
        self._pending.clear()
        self._spare.clear()
        clear_encoded_memo()
        self._unlock()

    def _unlock(self) -> None:
        if self._linking:
            self._linking = False
            stop_linking(self._loc.store)
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
                    trims.append((resizer(arr), (shape, False)))
        _run_in_order([trims])

    def _consolidate(self) -> None:
        consolidate(self._loc.store)

    def _even(self, chunk: int, batch: int) -> int:
        """``chunk`` (samples), or for ``expected_samples``: as few chunks of at most that
        size as they need, made even in whole batches, so the last is not mostly fill."""
        if not self._expected_samples:
            return chunk
        parts = -(-self._expected_samples // chunk)
        return min(chunk, batch * -(-self._expected_samples // (parts * batch)))

    def _sample_chunk(self, n_neurons: int, batch: int) -> tuple[int, int]:
        itemsize = np.dtype(self._dtype).itemsize
        row_bytes = itemsize * n_neurons
        if self._chunk_samples is not None:
            chunk = self._chunk_samples
        else:
            batches = max(1, _TARGET_CHUNK_BYTES // max(1, batch * row_bytes))
            if not self._expected_samples:
                # how many samples will come is not known: a chunk is stored whole however
                # few of its samples come (uncompressed, 4 MiB an epoch for 5 samples of
                # a 2-neuron layer), so it holds a few batches at most, but not fewer
                # samples than _UNKNOWN_SAMPLES_ROWS (batches of 1 made a file per 16)
                batches = min(batches, max(_UNKNOWN_SAMPLES_BATCHES,
                                           -(-_UNKNOWN_SAMPLES_ROWS // batch)))
            chunk = self._even(batch * batches, batch)
        neuron_chunk = n_neurons
        if chunk * row_bytes > _MAX_CHUNK_BYTES:
            neuron_chunk = max(1, _MAX_CHUNK_BYTES // (itemsize * chunk))
        return chunk, neuron_chunk

    def _create_layer(self, layer, reduced, labels, preds, meta, batch,
                      layer_attrs=None) -> _LayerState:
        name = safe_node_name(layer)
        taken = {safe_node_name(n) for n in self._layers}
        if name in taken:
            raise StoreError(f"layer {layer!r} maps to node {name!r}, already used by another layer")
        n_neurons = reduced.values.shape[1]
        chunk, neuron_chunk = self._sample_chunk(n_neurons, batch)
        mask_chunk = self._even(min(MASK_CHUNK, batch * max(1, _MASK_TARGET // max(1, batch))),
                                batch)
        coord_chunk = self._even(_COORD_CHUNK, batch)
        # created as long as the expected samples and one epoch deep (the first commit
        # then grows nothing); the unfilled 'sample'/'epoch' coordinates keep the
        # logical lengths at 0 until a commit fills them, and close() trims the rest
        n0, m0 = self._expected_samples, 1
        specs: dict[str, dict[str, Any]] = {
            ACTIVATION: dict(shape=(n_neurons, n0, m0), chunks=(neuron_chunk, chunk, 1),
                             dtype=self._dtype, fill_value=np.nan, config=_ACTIVATION_CONFIG,
                             # stored sample-major: batches are written as they come
                             filters=(SAMPLE_MAJOR,),
                             # the chosen codec, then the checksum (_schema._checked)
                             compressors=None if self._compressors is None
                             else (*self._compressors, CHECKSUM),
                             dimension_names=(NEURON, SAMPLE, EPOCH)),
            NEURON: dict(data=np.arange(n_neurons, dtype=np.int64), chunks=(n_neurons,),
                         dimension_names=(NEURON,)),
            **{key: dict(data=np.asarray(vals, dtype=np.int64), chunks=(n_neurons,),
                         dimension_names=(NEURON,))
               for key, vals in reduced.unit_coords.items()},
            SAMPLE: dict(shape=(n0,), chunks=(coord_chunk,), dtype="int64",
                         fill_value=SAMPLE_FILL, dimension_names=(SAMPLE,)),
            EPOCH: dict(shape=(m0,), chunks=(_EPOCH_CHUNK,), dtype="int64",
                        fill_value=_EPOCH_FILL, dimension_names=(EPOCH,)),
            EPOCH_COMPLETE: dict(shape=(m0,), chunks=(_EPOCH_CHUNK,), dtype="bool",
                                 fill_value=False, dimension_names=(EPOCH,)),
            # uncompressed: it is the commit point, written once per batch
            # (_write_mask_chunks)
            COMMITTED: dict(shape=(n0, m0), chunks=(mask_chunk, 1), dtype="bool",
                            fill_value=False, compressors=None, dimension_names=(SAMPLE, EPOCH)),
            **{key: dict(shape=(n0,), chunks=(coord_chunk,), dtype=_zarr_dtype(col),
                         fill_value=_fill(_kind(col)), dimension_names=(SAMPLE,))
               for key, col in (({LABEL: labels} if labels is not None else {}) | meta).items()},
        }
        if preds is not None:  # 'correct' only with labels to compare them with
            specs.update(_prediction_specs(preds, n0, m0, mask_chunk,
                                           correct=labels is not None))
        # On a local store, for layers of numeric columns only, the files are written by
        # the layer's first commit, with those of every other layer created since (see
        # _create_pending): in three steps, the group, its arrays, then the mark that
        # the layer is complete, as here. (String columns are created by zarr, at once.)
        phases: tuple[list, list, list] | None = (
            ([], [], []) if _creatable_later(self._model_group.store, specs) else None)
        group = create_group(self._model_group, name, {
            **dict(layer_attrs or {}), ATTR_LAYER: layer, _ATTR_REDUCE: reduced.reduce,
            _ATTR_UNIT_COORDS: list(reduced.unit_coords), _ATTR_METADATA: list(meta),
            _ATTR_GENERATION: uuid.uuid4().hex,
        }, jobs_out=None if phases is None else phases[0])
        arrays = _create_arrays(group, specs, existing={},
                                jobs_out=None if phases is None else phases[1])
        # last: the layer is complete
        update_group_attributes(group, {_ATTR_READY: True},
                                jobs_out=None if phases is None else phases[2])
        state = _LayerState(
            name=layer, group=group, n_neurons=n_neurons, reduce=reduced.reduce,
            unit_coords=dict(reduced.unit_coords), sample_ids=np.zeros(0, dtype=np.int64),
            epochs=[], mask=np.zeros((0, 0), dtype=bool), complete=np.zeros(0, dtype=bool),
            labels=None if labels is None else labels[:0], metadata={k: v[:0] for k, v in meta.items()},
        )
        state.adopt(arrays)
        state.creation = phases
        self._layers[layer] = state
        return state

    def _create_pending(self, states: Iterable[_LayerState]) -> None:
        """Write the files of layers created in memory only (see ``_create_layer``).

        The layers' groups, then their arrays, then their "ready" marks: each step for
        all the layers at once, in parallel.
        """
        waiting = [state for state in states if state.creation is not None]
        if not waiting:
            return
        try:
            for step in range(3):
                run_jobs([job for state in waiting for job in state.creation[step]])
        except Exception as err:
            self._fail(err, f"creating layers {[state.name for state in waiting]}")
        for state in waiting:
            state.creation = None

    @staticmethod
    def _create_prediction_arrays(state: _LayerState, preds: np.ndarray, n: int, m: int,
                                  chunk: int) -> None:
        state.adopt(_create_arrays(
            state.group, _prediction_specs(preds, n, m, chunk, correct=state.labels is not None),
            existing=state.arrays))

    def _commit(self, state, plan, values, ids, labels, preds, meta, epoch) -> int:
        """Commit one batch (or the merged buffered batches) of one layer."""
        self._create_pending([state])
        return _run_commits([self._prepare_commit(state, plan, values, ids, labels, preds,
                                                  meta, epoch)])[0]

    def _prepare_commit(self, state, plan, values, ids, labels, preds, meta,
                        epoch) -> _PreparedCommit:
        """Plan a commit's writes in memory (see :func:`_run_commits`, which runs them)."""
        arrays = state.arrays
        if preds is not None and PREDICTION not in arrays:
            self._create_prediction_arrays(state, preds, arrays[SAMPLE].shape[0],
                                           arrays[EPOCH].shape[0], arrays[COMMITTED].chunks[0])
            arrays = state.arrays
            for key in (PREDICTION, CORRECT):
                # predictions given only from this batch on: the earlier samples' chunks
                # are stored too (with the fill), so that a missing chunk means damage
                if key in arrays and arrays[key].size:
                    arrays[key][...] = arrays[key].metadata.fill_value
        e = state.epoch_index(epoch)
        new = plan.new_rows
        n0, m0 = len(state.sample_ids), len(state.epochs)
        n, m = n0 + len(new), m0 + (e < 0)
        if e < 0:
            e = m - 1
        # Room for n samples and m epochs. The sample axis grows exactly: a commit holds
        # many batches (see buffer_bytes), so it grows a few times per run. The epoch
        # axis grows in powers of two, to at least _EPOCH_ROOM epochs: every epoch would
        # otherwise rewrite the metadata of six arrays (and doubling from one epoch,
        # four times by the 16th). close() trims what is left over.
        size_n = max(arrays[SAMPLE].shape[0], n)
        size_m = arrays[EPOCH].shape[0]
        if size_m < m:
            budget = state.epochs_at_open + self._expected_epochs
            size_m = (budget if self._expected_epochs and m <= budget
                      else max(_EPOCH_ROOM, 1 << (m - 1).bit_length()))
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
                grow.append((resizer(arr), (shape,)))
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
            # stored now (False) so that every chunk inside the logical length exists
            fill.append(_append(arrays[EPOCH_COMPLETE], np.append(state.complete, False), m0,
                                size_m))
            if m0 % _EPOCH_CHUNK == 0:  # a new chunk of the logged scalars: store it too
                fill.extend((arrays[key].async_array.setitem, (slice(m0, m0 + 1), np.nan))
                            for key in state.group.attrs.get(_ATTR_SCALARS, ()) if key in arrays)
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

        def mirror() -> None:  # the store now holds the batch: mirror it in memory
            mask[pos, e] = True
            if m > m0:
                state.epochs.append(epoch)
                state.complete = np.append(state.complete, False)
            if len(new):
                state.add_samples(ids[new], all_ids)
                state.labels = all_labels
                state.metadata = all_metadata
            state.mask = mask

        return _PreparedCommit(steps=(grow, fill, coords),
                               mask=(arrays[COMMITTED], mask[:, e], pos, e, size_n),
                               mirror=mirror, rows=len(rows))


def _array_kind(arr: zarr.Array) -> str:
    """:func:`_kind` of a stored array's dtype (zarr's strings are object or StringDType)."""
    kind = getattr(arr.dtype, "kind", "O")
    return "U" if kind in "UOT" else _kind(np.empty(0, dtype=arr.dtype))


def _remove_temporary_files(root: str) -> None:
    """Delete what a killed writer left half-written in the store's folders.

    Every file is written as ``<name>.<random>.partial`` and renamed over its final
    name (by zarr and by :func:`topoxr._chunkio.put_pieces`): a process killed in between
    leaves the temporary file. In the root, model and layer folders, zarr and plain
    xarray then warn about it whenever they list the group (``... is not recognized as
    a component of a Zarr hierarchy``); in an array folder nothing reads it, but it
    keeps its bytes (up to a chunk, 16 MiB) for good. A writer holds the store's lock,
    so no other writer can be writing one: those in the root, model, layer and array
    folders are deleted (about 1 ms for a 15-layer store whose folders the system has
    cached).
    """
    removed = 0
    folders = [root]
    for depth in range(4):  # the root, its models, their layers, the layers' arrays
        children = []
        for folder in folders:
            try:
                entries = list(os.scandir(folder))
            except OSError:
                continue
            for entry in entries:
                if entry.name.endswith(".partial") and entry.is_file(follow_symlinks=False):
                    os.unlink(entry.path)
                    removed += 1
                elif depth < 3 and entry.is_dir(follow_symlinks=False):
                    children.append(entry.path)
        folders = children
    if removed:
        logger.info("removed %d temporary file(s) left by a killed writer in %s", removed,
                    root)


@dataclasses.dataclass
class _PreparedCommit:
    """The writes of one layer's commit, planned in memory (``_prepare_commit``)."""

    steps: tuple[list, list, list]  # grow, fill, coordinates (see _commit's comments)
    mask: tuple  # the arguments of _write_mask_chunks: the commit point
    mirror: Callable[[], None]  # updates the layer's in-memory state once committed
    rows: int


def _run_commits(commits: Sequence[_PreparedCommit]) -> list[int]:
    """Run the commits of several layers together; return the rows each committed.

    Each of the three steps runs for every layer at once (one wait per step, not one
    per layer and step); a layer's mask, its commit point, is written only after all
    its other writes, as in a single commit. On an error no layer is mirrored in
    memory but those whose mask was written (their batch is complete and committed).
    """
    _run_in_order([[op for c in commits for op in c.steps[k]] for k in range(3)])
    for c in commits:
        _write_mask_chunks(*c.mask)
        c.mirror()
    return [c.rows for c in commits]

