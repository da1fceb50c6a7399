"""The reader: :func:`open_store` gives a consistent, lazy snapshot of a store."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping
from typing import Any

import numpy as np
import xarray as xr
import zarr

from topoxr.conventions import (
    ACTIVATION,
    ATTR_LAYER,
    ATTR_MODEL,
    ATTR_SAVING,
    COMMITTED,
    CORRECT,
    EPOCH,
    EPOCH_COMPLETE,
    LABEL,
    NEURON,
    PREDICTION,
    SAMPLE,
)
from topoxr._chunkio import read_array, read_blocks, read_group_attributes, read_region
from topoxr.store._errors import StoreChangedError, StoreCorruptionError
from topoxr.store._integrity import (
    Context,
    check_model_name,
    child_groups,
    children,
    chunk_coords,
    consistent_snapshot,
    layer_arrays,
    lost_nodes,
    lost_nodes_message,
    read_whole,
)
from topoxr.store._location import _locate, _open_root_readonly
from topoxr.store._schema import (
    _ATTR_METADATA,
    _ATTR_GENERATION,
    _ATTR_READY,
    _ATTR_SCALARS,
    _ATTR_UNIT_COORDS,
    _guarded,
    _plain_strings,
    _where,
)

logger = logging.getLogger(__name__)


def open_store(
    store: Any,
    *,
    storage_options: Mapping[str, Any] | None = None,
    mask_uncommitted: bool = True,
    saved_groups: bool = True,
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
    saved_groups : bool, default True
        Read the groups saved beside a layer's recording (saved layouts, e.g.
        ``/<model>/<layer>/layouts/<name>``) as its child nodes, every chunk checked:
        a damaged one is an error. False leaves them out, unread (a layout is saved
        again, replacing a damaged one, without them).

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
    if lost := lost_nodes(root):
        raise StoreCorruptionError(lost_nodes_message(loc.url, lost))
    nodes: dict[str, xr.Dataset] = {"/": xr.Dataset(attrs=dict(root.attrs))}
    try:
        for model_name, model_group in child_groups(root):
            check_model_name(model_name, model_group)
            nodes[f"/{model_name}"] = xr.Dataset(attrs=dict(model_group.attrs))
            for layer_name, group in _ready_layers(model_group):
                # listed once: its arrays start the snapshot, its groups are saved layouts
                members = _guarded(_where(group), lambda group=group: children(group))
                layer = nodes[f"/{model_name}/{layer_name}"] = _layer_dataset(
                    group, mask_uncommitted, layer_arrays(group, members))
                if not saved_groups:
                    continue
                for child_path, child in _subgroups(group, members=members):
                    try:
                        saved = _plain_dataset(child)
                    except StoreCorruptionError as err:
                        raise StoreCorruptionError(
                            f"{err}. It is a group saved beside the recording (a saved "
                            "layout), not recorded data: save it again (save_layout(..., "
                            "overwrite=True), `topoxr layout --name NAME`) or delete its "
                            f"folder {child.path!r}; open_store(..., saved_groups=False) "
                            "reads the store without it") from err
                    nodes[f"/{model_name}/{layer_name}/{child_path}"] = _on_layer_epochs(
                        saved, layer)
    except StoreCorruptionError as err:
        if loc.is_locked():  # a writer replacing a model deletes its nodes one by one
            raise StoreCorruptionError(
                f"{err} (a writer holds the store now: if it is replacing this model, "
                "mode='w', this is its work in progress, not damage; open the store again "
                "once it has finished)") from err
        raise
    return xr.DataTree.from_dict(nodes)


def read_model_layers(store: Any, model: str, *,
                      storage_options: Mapping[str, Any] | None = None
                      ) -> dict[str, dict[str, Any]]:
    """What a store holds for each layer of one model, without its activations.

    Every layer is checked as :func:`open_store` checks it (the same consistent snapshot
    of its coordinates, commit state and chunks); the activations' dask graph, the
    other coordinates, saved layouts and the other models are not read. Recorders use
    it to compare a run with what is stored before they write (about half the time of
    opening the whole store for a model of 15 layers, more for stores of many models).

    Parameters
    ----------
    store : str or os.PathLike
        Path or fsspec URL of the store.
    model : str
        The model's name.
    storage_options : mapping, optional
        Passed to fsspec for URLs.

    Returns
    -------
    dict
        ``{layer name: {"n_neurons", "dtype", "attrs", "sample_ids", "epochs",
        "complete", "labels"}}`` (``dtype``: of the stored values; ``labels`` None where
        the layer has none); empty when the model is not in the store.

    Raises
    ------
    FileNotFoundError
        If nothing exists at ``store``.
    StoreError
        If it is not a topoxr store, or (:class:`StoreCorruptionError`) a layer of the
        model is damaged.
    """
    loc = _locate(store, storage_options)
    root = _open_root_readonly(loc)
    for model_name, model_group in child_groups(root):
        if model_group.attrs.get(ATTR_MODEL) != model:
            continue
        check_model_name(model_name, model_group)
        out: dict[str, dict[str, Any]] = {}
        for layer_name, group in _ready_layers(model_group):
            arrays, snap = _guarded(_where(group),
                                    lambda group=group: consistent_snapshot(group))
            labels = None
            if LABEL in arrays:
                labels = _plain_strings(snap.context.read(arrays[LABEL], slice(0, snap.n)))
            out[str(group.attrs.get(ATTR_LAYER, layer_name))] = {
                "n_neurons": int(arrays[ACTIVATION].shape[0]),
                "dtype": str(arrays[ACTIVATION].dtype),
                "attrs": _layer_attrs(group),
                "sample_ids": np.asarray(snap.sample_ids, dtype=np.int64),
                "epochs": [int(e) for e in snap.epochs],
                "complete": [bool(c) for c in snap.complete],
                "labels": labels,
            }
        return out
    return {}


def _ready_layers(model_group: zarr.Group) -> list[tuple[str, zarr.Group]]:
    """The layers of a model that a writer finished creating (others are invisible).

    A layer without the ready mark that holds committed data lost the mark (a writer
    sets it before the first commit): it is damage, raised as
    :class:`StoreCorruptionError`, not a layer to leave out without a word.
    """
    from topoxr.store.verify import unready_layer_damage

    ready = []
    for name, group in child_groups(model_group):
        if group.attrs.get(_ATTR_READY, False):
            ready.append((name, group))
        elif (damage := unready_layer_damage(group)) is not None:
            raise StoreCorruptionError(damage)
    return ready


def _layer_attrs(group: zarr.Group) -> dict[str, Any]:
    """A layer's attributes as readers show them (without the writer's ready mark and
    the token of its values, which only the reads compare)."""
    return {k: v for k, v in group.attrs.items() if k not in (_ATTR_READY, _ATTR_GENERATION)}


def _subgroups(group: zarr.Group, prefix: str = "", *,
               members: Mapping[str, zarr.Group | zarr.Array] | None = None
               ) -> list[tuple[str, zarr.Group]]:
    """The saved subgroups under ``group`` (``members``: its children, already listed)."""
    out = []
    for name, child in child_groups(group, members=members):
        path = f"{prefix}{name}"
        if child.attrs.get(ATTR_SAVING):
            logger.warning("%s was not saved completely (its saving failed or was "
                           "interrupted): not shown; save it again", child.path)
            continue
        out.append((path, child))
        out.extend(_subgroups(child, path + "/"))
    return out


def _on_layer_epochs(saved: xr.Dataset, layer: xr.Dataset) -> xr.Dataset:
    """A saved group's dataset (a layout per epoch) on its layer's epochs, NaN at the
    epochs recorded after it was saved.

    A tree node must align with its parent: a per-epoch layout saved before the layer
    was recorded further (a training run resumed) had fewer epochs than the layer, and
    ``open_store`` refused the whole store. Epochs the layer lacks are left as they are
    (the tree then refuses, naming the group: that is no state a writer leaves).
    """
    if EPOCH not in saved.dims or EPOCH not in saved.coords or EPOCH not in layer.coords:
        return saved
    have, want = saved[EPOCH].values, layer[EPOCH].values
    if np.array_equal(have, want) or not set(have.tolist()) <= set(want.tolist()):
        return saved
    logger.info("%s holds epochs %s of its layer's %s: NaN at the others",
                saved.attrs.get("name", "a saved group"), have.tolist(), want.tolist())
    return saved.reindex({EPOCH: want})


def _plain_dataset(group: zarr.Group) -> xr.Dataset:
    """Read a small auxiliary group (e.g. saved layouts) eagerly, every chunk checked."""
    variables = {}
    ctx = Context(f"group {group.path!r}")
    for name, arr in group.arrays():
        dims = tuple(arr.metadata.dimension_names or [f"dim_{i}" for i in range(arr.ndim)])
        values = _plain_strings(read_whole(arr, ctx))
        variables[name] = xr.Variable(dims, values, attrs=dict(arr.attrs))
    coord_names = [n for n, v in variables.items() if v.dims == (n,)]
    return xr.Dataset(
        {k: v for k, v in variables.items() if k not in coord_names},
        coords={k: variables[k] for k in coord_names},
        # without the saving mark, a writer's state (as a layer's ready mark)
        attrs={k: v for k, v in group.attrs.items() if k != ATTR_SAVING},
    )


def _layer_dataset(group: zarr.Group, mask_uncommitted: bool,
                   arrays: Mapping[str, zarr.Array] | None = None) -> xr.Dataset:
    import dask.array as dsa

    arrays, snap = _guarded(_where(group), lambda: consistent_snapshot(group, arrays))
    ctx = snap.context
    if not snap.checked:
        logger.info("%s was written by an earlier topoxr without chunk checksums: damage to "
                    "its chunks may go unnoticed (`topoxr verify` reports it unverifiable)",
                    ctx.where)

    def read(key: str, *sel: slice) -> np.ndarray:
        return ctx.read(arrays[key], sel or ...)

    n, m = snap.n, snap.m
    sample_ids, epochs, committed = snap.sample_ids, snap.epochs, snap.committed
    # read by topoxr (bytes + crc32c on local stores) or decoded by zarrs where installed
    act = read_array(arrays[ACTIVATION])
    checked = _CheckedActivation(act, committed, ctx, _Generation(group))
    # Dask blocks of many whole zarr chunks (about 32 MiB) along sample, one epoch each
    # (a block across epochs scatters every chunk with a stride: measured 3x slower):
    # each task decodes its chunks in one parallel call (zarrs' threads or zarr's), and
    # few tasks keep dask's own overhead small.
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
        EPOCH_COMPLETE: (EPOCH, snap.complete),
    }
    for key in group.attrs.get(_ATTR_UNIT_COORDS, []):
        coords[key] = (NEURON, read(key))
    if LABEL in arrays:
        coords[LABEL] = (SAMPLE, _plain_strings(read(LABEL, slice(0, n))))
    for key in group.attrs.get(_ATTR_METADATA, []):
        coords[key] = (SAMPLE, _plain_strings(read(key, slice(0, n))))
    if PREDICTION in arrays:
        coords[PREDICTION] = ((SAMPLE, EPOCH), read(PREDICTION, slice(0, n), slice(0, m)))
    if PREDICTION in arrays and LABEL in arrays and CORRECT in arrays:
        # only with labels: a layer without them has no correctness to show (earlier
        # writers created 'correct' anyway and never wrote it)
        coords[CORRECT] = ((SAMPLE, EPOCH), read(CORRECT, slice(0, n), slice(0, m)).astype(bool))
    for key in group.attrs.get(_ATTR_SCALARS, []):
        if key in arrays:
            coords[key] = (EPOCH, read(key, slice(0, m)))
    attrs = _layer_attrs(group)
    da = xr.DataArray(lazy, dims=(NEURON, SAMPLE, EPOCH), name=ACTIVATION)
    return xr.Dataset({ACTIVATION: da}, coords=coords, attrs=attrs)


class _Generation:
    """The token of a layer's values when a view was opened (``_ATTR_GENERATION``), to
    tell at every read whether a writer has replaced or overwritten the layer since."""

    def __init__(self, group: zarr.Group) -> None:
        self.store = group.store
        self.path = group.path
        self.where = _where(group)
        self.token = group.attrs.get(_ATTR_GENERATION)

    def check(self) -> None:
        """Raise :class:`StoreChangedError` where the layer's token is not the view's."""
        try:
            now = read_group_attributes(self.store, self.path).get(_ATTR_GENERATION)
        except FileNotFoundError:
            now = _GONE
        if now != self.token:
            what = ("was deleted" if now is _GONE else
                    "was replaced (mode='w') or its values overwritten (overwrite=True)")
            raise StoreChangedError(
                f"{self.where} {what} after this view was opened: its activations would "
                "be read with the coordinates of before; open the store again")


_GONE = object()


class _CheckedActivation:
    """``activation`` as dask sees it: unreadable or missing chunks become clear errors.

    Zarr returns the fill value (NaN) for a chunk that does not exist, which would pass
    for data; a chunk holding committed values must exist, so its absence is reported,
    naming the layer, epochs and samples affected.  Codec errors of a damaged chunk are
    translated the same way.
    """

    def __init__(self, array: zarr.Array, committed: np.ndarray, context: Context,
                 generation: _Generation | None = None) -> None:
        self.array = array
        self.generation = generation
        self.committed = committed
        self.context = context
        self.sample_ids = context.sample_ids
        self.epochs = context.epochs
        self.where = context.where
        self.shape = array.shape
        # reduced-precision storage (float16) is read as float32
        self.dtype = np.promote_types(array.dtype, np.float32)
        self.ndim = array.ndim

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
            block = read_region(self.array, key).astype(self.dtype, copy=False)
        except Exception as err:
            if self.generation is not None:
                self.generation.check()  # a layer replaced meanwhile is no damage
            raise self.context.unreadable(self.array, key, err) from err
        if self.generation is not None:
            # after the read: a writer replaces the token before it changes values
            self.generation.check()
        missing = self._missing_chunk(key, block)
        if missing is not None:
            coords = next(chunk_coords(self.array, missing))
            raise StoreCorruptionError(self.context.damaged_chunk(
                self.array, coords, "holds committed values but is missing from the store"))
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
