"""Checking what is read: damaged chunks named precisely, contradictions between arrays.

Every chunk written by this version ends in a crc32c checksum (see
:data:`topoxr.store._schema.CHECKSUM`) that zarr checks on every read, and every chunk
is stored, so that a missing chunk means damage.  This module turns a failed read into
a :class:`StoreCorruptionError` naming the layer, the array, the chunk key and the
samples and epochs the chunk holds, and checks the invariants that the write order
guarantees (see :mod:`topoxr.store`):

* nothing is committed beyond the logical lengths (the ``sample`` / ``epoch``
  coordinates and the shapes of the arrays);
* no sample id is filled in beyond the shortest array;
* an epoch marked complete has every sample committed;
* every chunk of a checked layer inside the logical lengths exists.

The checks read only what a reader reads anyway (the coordinates, the ``committed``
mask) plus one listing of each small array's chunk keys.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr

from topoxr._chunkio import group_members, read_selection
from topoxr._codecs import DTYPES
from topoxr.conventions import (
    ACTIVATION,
    ATTR_LAYER,
    ATTR_MODEL,
    COMMITTED,
    CORRECT,
    EPOCH,
    EPOCH_COMPLETE,
    LABEL,
    NEURON,
    PREDICTION,
    SAMPLE,
)
from topoxr.store._errors import StoreCorruptionError
from topoxr.store._location import safe_node_name
from topoxr.store._schema import (
    _ATTR_METADATA,
    _ATTR_SCALARS,
    _ATTR_UNIT_COORDS,
    _EPOCH_FILL,
    SAMPLE_FILL,
    _check_required,
    _ids_text,
    _where,
    has_checksums,
)

logger = logging.getLogger(__name__)


def chunk_coords(arr: zarr.Array, region: tuple[slice, ...]) -> Iterator[tuple[int, ...]]:
    """The grid coordinates of every chunk of ``arr`` that ``region`` touches."""
    ranges = []
    for sl, size, dim in zip(region, arr.chunks, arr.shape, strict=True):
        start, stop, _ = sl.indices(dim)
        if stop <= start:
            return
        ranges.append(range(start // size, -(-stop // size)))
    yield from itertools.product(*ranges)


def chunk_slices(arr: zarr.Array, coords: tuple[int, ...]) -> tuple[slice, ...]:
    """The region of ``arr`` that chunk ``coords`` holds (cut at the array's shape)."""
    return tuple(slice(c * size, min((c + 1) * size, dim))
                 for c, size, dim in zip(coords, arr.chunks, arr.shape, strict=True))


def chunk_file(arr: zarr.Array, coords: tuple[int, ...]) -> str:
    """Path of a chunk inside the store, e.g. ``mlp/hidden/activation/c.0.3.1`` (``c/0/3/1`` in stores written before flat chunk keys)."""
    return f"{arr.path}/{arr.metadata.encode_chunk_key(coords)}"


def _as_region(arr: zarr.Array, selection: Any) -> tuple[slice, ...]:
    sel = selection if isinstance(selection, tuple) else (selection,)
    if sel == (Ellipsis,) or sel == ():
        sel = ()
    sel = tuple(s if isinstance(s, slice) else slice(int(s), int(s) + 1) for s in sel)
    return sel + (slice(None),) * (arr.ndim - len(sel))


@dataclass
class Context:
    """What a layer's chunks mean: for naming the samples and epochs a chunk holds."""

    where: str
    sample_ids: np.ndarray | None = None
    epochs: np.ndarray | None = None

    def covered(self, arr: zarr.Array, coords: tuple[int, ...]) -> str:
        """Which samples and epochs (or neurons) chunk ``coords`` of ``arr`` holds."""
        dims = tuple(arr.metadata.dimension_names or ())
        parts = []
        for dim, sl in zip(dims, chunk_slices(arr, coords), strict=False):
            if dim == SAMPLE:
                known = self.sample_ids is not None and arr.name.rsplit("/", 1)[-1] != SAMPLE
                ids = self.sample_ids[sl] if known else None
                parts.append(f"samples {_ids_text(ids)}" if ids is not None and len(ids)
                             else f"sample positions {sl.start}..{sl.stop - 1}")
            elif dim == EPOCH:
                known = self.epochs is not None and arr.name.rsplit("/", 1)[-1] != EPOCH
                eps = self.epochs[sl] if known else None
                parts.append(f"epochs {_ids_text(eps)}" if eps is not None and len(eps)
                             else f"epoch positions {sl.start}..{sl.stop - 1}")
            else:
                parts.append(f"{dim}s {sl.start}..{sl.stop - 1}")
        if SAMPLE not in dims:
            parts.append("every sample")
        if EPOCH not in dims:
            parts.append("every epoch")
        return ", ".join(parts)

    def damaged_chunk(self, arr: zarr.Array, coords: tuple[int, ...], what: str,
                      where: bool = True) -> str:
        """One line naming a damaged chunk: place, array, chunk key, problem, coverage."""
        name = arr.name.rsplit("/", 1)[-1]
        return (f"{self.where + ' is damaged: ' if where else ''}array {name!r}, chunk {arr.metadata.encode_chunk_key(coords)} "
                f"(file {chunk_file(arr, coords)}) {what}; it holds {self.covered(arr, coords)}")

    def unreadable(self, arr: zarr.Array, region: tuple[slice, ...],
                   err: BaseException) -> StoreCorruptionError:
        """The error for a read of ``region`` that failed: find and name the chunk(s)."""
        lines = []
        for coords in chunk_coords(arr, region):
            try:
                arr[chunk_slices(arr, coords)]
            except Exception as chunk_err:
                lines.append(self.damaged_chunk(arr, coords, _reason(chunk_err)))
                if len(lines) == 3:
                    break
        if not lines:  # the failure is not one chunk's (metadata, shape)
            name = arr.name.rsplit("/", 1)[-1]
            lines.append(f"{self.where}: array {name!r} is unreadable "
                         f"({type(err).__name__}: {err})")
        return StoreCorruptionError("; ".join(lines))

    def read(self, arr: zarr.Array, selection: Any = Ellipsis) -> np.ndarray:
        """``arr[selection]`` as numpy; a failure names the damaged chunk."""
        try:
            return read_selection(arr, selection)
        except Exception as err:
            raise self.unreadable(arr, _as_region(arr, selection), err) from err


def _reason(err: BaseException) -> str:
    text = str(err)
    if "checksum" in text.lower():
        return "fails its crc32c checksum (its bytes changed)"
    return f"cannot be decoded ({type(err).__name__}: {text})"


def stored_chunks(arr: zarr.Array) -> set[str]:
    """The keys of the chunks of ``arr`` present in the store (one listing).

    The keys zarr's ``list_prefix`` gives below the array, relative to it, without
    its ``zarr.json``. On zarr's local store (or a subclass) the array's folder is
    walked here, without a trip through zarr's event loop (a tenth of the time).
    """
    from zarr.core.sync import sync

    if isinstance(arr.store, zarr.storage.LocalStore):
        top = os.path.join(arr.store.root, arr.path)
        found: set[str] = set()
        for folder, _, files in os.walk(top):
            rel = os.path.relpath(folder, top).replace(os.sep, "/")
            found.update(name if rel == "." else f"{rel}/{name}"
                         for name in files if not name.endswith("zarr.json"))
        return found
    prefix = f"{arr.path}/"

    async def keys() -> set[str]:
        return {k[len(prefix):] async for k in arr.store.list_prefix(prefix)
                if not k.endswith("zarr.json")}

    return sync(keys())


def missing_chunks(arr: zarr.Array, region: tuple[slice, ...],
                   present: set[str] | None = None) -> list[tuple[int, ...]]:
    """Chunks of ``region`` absent from the store."""
    present = stored_chunks(arr) if present is None else present
    return [c for c in chunk_coords(arr, region)
            if arr.metadata.encode_chunk_key(c) not in present]


def read_whole(arr: zarr.Array, ctx: Context) -> np.ndarray:
    """Every value of a small auxiliary array (a saved layout's), checked.

    An array with checksums is written with every chunk stored, so a missing chunk is
    damage (zarr would read the fill value in its place) and is refused, like a chunk
    that fails its checksum or cannot be decoded: each named by :class:`Context`.
    Arrays without checksums (layouts saved by an earlier topoxr) read as zarr reads them.
    """
    if has_checksums(arr):
        lost = missing_chunks(arr, tuple(slice(None) for _ in arr.shape))
        if lost:
            raise StoreCorruptionError("; ".join(
                ctx.damaged_chunk(arr, coords, "is missing from the store (zarr would read "
                                  "the fill value in its place)") for coords in lost[:3]))
    return ctx.read(arr)


@dataclass
class Snapshot:
    """A layer's lengths, coordinates and commit state, read once and checked."""

    n: int
    m: int
    sample_ids: np.ndarray
    epochs: np.ndarray
    committed: np.ndarray  # (n, m) bool
    complete: np.ndarray  # (m,) bool
    checked: bool  # every array has checksums (format version >= 2)
    context: Context


def children(group: zarr.Group,
             errors: list[str] | None = None) -> dict[str, zarr.Group | zarr.Array]:
    """The child nodes of ``group``, each opened on its own; damaged metadata is named.

    Unlike ``group.members()``, a child whose ``zarr.json`` is missing (zarr would skip
    it with a warning) or unreadable raises :class:`StoreCorruptionError` naming the file
    (or, given ``errors``, is left out and its message appended there).
    """
    from zarr.core.sync import sync

    prefix = f"{group.path}/" if group.path else ""
    # zarr's local store writes every file to "<stem>.<uuid>.partial" and renames it:
    # a reader listing a folder while a writer runs can see such a file; it is no node
    listed = sorted(n for n in {k.rstrip("/") for k in _list_dir(group)} - {"zarr.json"}
                    if not n.startswith(".") and not n.endswith(".partial"))
    try:  # the fast way, read at once; per child only when it does not add up
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            members = group_members(group)
        if sorted(members) == listed:
            return {name: members[name] for name in listed}
    except Exception:
        pass
    out: dict[str, zarr.Group | zarr.Array] = {}
    for name in listed:
        path = f"{prefix}{name}"
        try:
            if sync(group.store.exists(path)):
                continue  # a plain file beside the nodes (not written by topoxr): no node
            if not sync(group.store.exists(f"{path}/zarr.json")):
                raise StoreCorruptionError(
                    f"{path}/zarr.json is missing: the metadata of node {path!r} was deleted")
            try:
                out[name] = zarr.open(store=group.store, path=path, mode="r")
            except Exception as err:
                raise StoreCorruptionError(f"{path}/zarr.json is damaged "
                                           f"({type(err).__name__}: {err})") from err
        except StoreCorruptionError as err:
            if errors is None:
                raise
            errors.append(str(err))
    return out


def _list_dir(group: zarr.Group) -> list[str]:
    """The names in ``group``'s folder: zarr's ``list_dir``, read here on a local store."""
    from zarr.core.sync import sync

    if isinstance(group.store, zarr.storage.LocalStore):
        try:
            with os.scandir(os.path.join(group.store.root, group.path)) as entries:
                return [entry.name for entry in entries]
        except (FileNotFoundError, NotADirectoryError):
            return []
    prefix = f"{group.path}/" if group.path else ""

    async def names() -> list[str]:
        return [k async for k in group.store.list_dir(prefix)]

    return sync(names())


def layer_arrays(group: zarr.Group, members: Mapping[str, Any] | None = None
                 ) -> dict[str, zarr.Array]:
    """The arrays of a layer group (see :func:`children`; ``members``: its children,
    already listed)."""
    members = children(group) if members is None else members
    return {k: v for k, v in members.items() if isinstance(v, zarr.Array)}


def child_groups(group: zarr.Group, errors: list[str] | None = None, *,
                 members: Mapping[str, Any] | None = None) -> list[tuple[str, zarr.Group]]:
    """The subgroups of ``group``, sorted by name (see :func:`children`; ``members``:
    its children, already listed)."""
    members = children(group, errors) if members is None else members
    return [(k, v) for k, v in members.items() if isinstance(v, zarr.Group)]


def snapshot(group: zarr.Group, arrays: Mapping[str, zarr.Array], *,
             check_chunks: bool = True) -> Snapshot:
    """Read a layer's lengths, coordinates and mask; refuse contradictions.

    Raises
    ------
    StoreCorruptionError
        Naming the layer, array and chunk of damage, or the contradiction found.
    """
    where = _where(group)
    ctx = Context(where)
    name = group.attrs.get(ATTR_LAYER)
    if not isinstance(name, str) or safe_node_name(name) != group.basename:
        raise StoreCorruptionError(f"{where} is damaged: its attribute {ATTR_LAYER!r} "
                                   f"({name!r}) does not match the node {group.basename!r}")
    _check_required(group, arrays)
    wrong = _wrong_schema(group, arrays)
    if wrong:
        raise StoreCorruptionError(f"{where} is damaged (its metadata was edited or "
                                   f"replaced): {'; '.join(wrong)}")
    lengths: dict[str, int] = {}
    for arr in arrays.values():
        for dim, size in zip(arr.metadata.dimension_names or (), arr.shape, strict=True):
            if dim in (SAMPLE, EPOCH):
                lengths[dim] = min(lengths.get(dim, size), size)
    s_min, e_min = lengths.get(SAMPLE, 0), lengths.get(EPOCH, 0)
    # Read in the reverse of the writer's order (coordinates, then a batch's mask, then
    # 'epoch_complete'): whatever these reads find committed or complete was written
    # after the coordinates it needs, so the coordinates read next include it.
    try:
        complete_all = read_selection(arrays[EPOCH_COMPLETE]).astype(bool)
        mask = read_selection(arrays[COMMITTED])
    except Exception:
        complete_all = mask = None  # damaged: read again below, naming the chunk
    ids_all = ctx.read(arrays[SAMPLE]).astype(np.int64)
    eps_all = ctx.read(arrays[EPOCH]).astype(np.int64)
    n = _first(ids_all[:s_min] == SAMPLE_FILL, s_min)
    m = _first(eps_all[:e_min] == _EPOCH_FILL, e_min)
    ctx.sample_ids, ctx.epochs = ids_all[:n], eps_all[:m]
    problems = []
    beyond = ids_all[s_min:] != SAMPLE_FILL
    if beyond.any():
        problems.append(f"'sample' holds {int(beyond.sum())} ids beyond the {s_min} samples "
                        "every array has (an array's shape was cut)")
    if mask is None:
        complete_all = ctx.read(arrays[EPOCH_COMPLETE]).astype(bool)
        mask = ctx.read(arrays[COMMITTED])
    late_s = mask[n:].any(axis=1) if mask.ndim == 2 else np.zeros(0, bool)
    late_e = mask[:, m:].any(axis=0) if mask.ndim == 2 else np.zeros(0, bool)
    if late_s.any():
        problems.append(f"'committed' marks samples at {int(late_s.sum())} positions from "
                        f"{n + int(np.flatnonzero(late_s)[0])} as written, beyond the {n} "
                        "samples of the 'sample' coordinate and array shapes")
    if late_e.any():
        problems.append(f"'committed' marks {int(late_e.sum())} epoch positions from "
                        f"{m + int(np.flatnonzero(late_e)[0])} as written, beyond the {m} "
                        "epochs of the 'epoch' coordinate and array shapes")
    if complete_all[m:].any():
        problems.append(f"'epoch_complete' marks epoch positions "
                        f"{(m + np.flatnonzero(complete_all[m:])).tolist()[:10]} complete, "
                        f"beyond the {m} epochs of the 'epoch' coordinate")
    committed = mask[:n, :m].astype(bool) if n and m else np.zeros((n, m), bool)
    complete = complete_all[:m]
    holes = complete & ~committed.all(axis=0) if n else np.zeros(m, bool)
    for e in np.flatnonzero(holes):
        lacking = ctx.sample_ids[~committed[:, e]]
        problems.append(f"epoch {int(ctx.epochs[e])} is marked complete but samples "
                        f"{_ids_text(lacking)} are not committed (a 'committed' chunk was "
                        "lost or damaged)")
    checked = all(has_checksums(a) for a in arrays.values())
    if check_chunks and checked:
        problems.extend(_lost_chunks(ctx, _declared(group, arrays), n, m, committed))
    if problems:
        for dim, size in ((SAMPLE, s_min), (EPOCH, e_min)):
            shorter = [k for k, a in arrays.items()
                       if dim in (a.metadata.dimension_names or ())
                       and a.shape[a.metadata.dimension_names.index(dim)] == size]
            longer = [k for k, a in arrays.items()
                      if dim in (a.metadata.dimension_names or ()) and k not in shorter]
            if longer:
                problems.append(f"arrays {shorter} have {size} entries along {dim!r}, "
                                f"{longer} more")
        raise _Contradiction(f"{where} is damaged: " + "; ".join(problems))
    return Snapshot(n, m, ctx.sample_ids, ctx.epochs, committed, complete, checked, ctx)


class _Contradiction(StoreCorruptionError):
    """Arrays of a layer contradict each other (see :func:`consistent_snapshot`)."""


#: How often a contradicting layer is read again before it is called damaged.
_REREADS = 3


def consistent_snapshot(
    group: zarr.Group,
    arrays: Mapping[str, zarr.Array] | None = None,
    *,
    check_chunks: bool = True,
) -> tuple[dict[str, zarr.Array], Snapshot]:
    """Open a layer's arrays and read its :func:`snapshot`, even while a writer runs.

    The arrays' metadata and the coordinates and mask are read one after another; a
    writer that commits in between (it grows the arrays, fills them, writes the
    coordinates and then the mask) can make what was read at different moments
    contradict itself, e.g. a mask that has grown past a shape read just before. Such
    a layer is read again, its metadata fresh, after a short wait (about as long as a
    reading took, doubling each time); only a contradiction that is still there after
    three such readings is reported as damage.

    Parameters
    ----------
    group : zarr.Group
        The layer group.
    arrays : mapping, optional
        Its arrays as already opened (:func:`layer_arrays`), for the first reading.
    check_chunks : bool, default True
        Also look for lost chunks of the small arrays (see :func:`snapshot`).

    Returns
    -------
    arrays : dict
        The arrays of the reading that was consistent (their shapes are its shapes).
    snapshot : Snapshot

    Raises
    ------
    StoreCorruptionError
        As :func:`snapshot`, when the last reading still finds a contradiction.
    """
    current = dict(arrays) if arrays is not None else layer_arrays(group)
    for attempt in range(_REREADS):
        start = time.perf_counter()
        try:
            return current, snapshot(group, current, check_chunks=check_chunks)
        except _Contradiction as err:
            # wait about as long as a reading takes (a writer's commit takes as many
            # trips to the store), doubling each time: milliseconds on a local disk
            delay = max(time.perf_counter() - start, 0.005) * 2 ** attempt
            logger.debug("%s; a writer may be committing: reading it again in %.3f s",
                         err, delay)
            time.sleep(delay)
            current = layer_arrays(group)
    return current, snapshot(group, current, check_chunks=check_chunks)


def _first(flags: np.ndarray, default: int) -> int:
    hit = np.flatnonzero(flags)
    return int(hit[0]) if len(hit) else default


def _declared(group: zarr.Group, arrays: Mapping[str, zarr.Array]) -> dict[str, zarr.Array]:
    """The arrays the layer's attributes declare: the format's own and the listed columns.

    A writer creates an epoch scalar's array, fills it, and only then lists it in the
    layer's attributes: an array not listed yet is still being written, and a reader
    that looked for its chunks would call a write in progress damage.
    """
    attrs = group.attrs
    listed = {*_FIXED, *attrs.get(_ATTR_UNIT_COORDS, []), *attrs.get(_ATTR_METADATA, []),
              *attrs.get(_ATTR_SCALARS, [])}
    return {k: v for k, v in arrays.items() if k in listed}


def _lost_chunks(ctx: Context, arrays: Mapping[str, zarr.Array], n: int, m: int,
                 committed: np.ndarray) -> list[str]:
    """Chunks of the small arrays inside the logical lengths that are not in the store.

    A ``(sample, epoch)`` array (``prediction``, ``correct``) is written where batches are
    committed, so its chunk is lost only where ``committed`` marks a cell of it, as for
    ``activation``: an epoch still being written (or left partial by a crash) over more
    samples than one chunk has chunks nobody wrote yet.
    """
    out = []
    for name, arr in arrays.items():
        if name == ACTIVATION:
            continue  # checked where read (see reader._CheckedActivation) and by verify
        if name == COMMITTED or (name == CORRECT and LABEL not in arrays):
            continue  # mask: checked on complete epochs; correct: only with labels
        lost = missing_chunks(arr, region_of(arr, n, m))
        if tuple(arr.metadata.dimension_names or ()) == (SAMPLE, EPOCH):
            size_s, size_e = arr.chunks
            lost = [c for c in lost if committed[c[0] * size_s:(c[0] + 1) * size_s,
                                                 c[1] * size_e:(c[1] + 1) * size_e].any()]
        out.extend(ctx.damaged_chunk(arr, c, "is missing from the store", where=False)
                   for c in lost[:3])
    return out


def region_of(arr: zarr.Array, n: int, m: int) -> tuple[slice, ...]:
    """The part of ``arr`` inside the logical lengths ``n`` samples, ``m`` epochs."""
    dims = arr.metadata.dimension_names or ()
    return tuple(slice(0, n) if d == SAMPLE else slice(0, m) if d == EPOCH else slice(0, s)
                 for d, s in zip(dims, arr.shape, strict=True))


#: (dimension names, dtype kinds, fill value) every layer of this format has
_FIXED = {
    ACTIVATION: ((NEURON, SAMPLE, EPOCH), "f", "nan"),
    NEURON: ((NEURON,), "i", None),
    SAMPLE: ((SAMPLE,), "i", SAMPLE_FILL),
    EPOCH: ((EPOCH,), "i", _EPOCH_FILL),
    EPOCH_COMPLETE: ((EPOCH,), "b", False),
    COMMITTED: ((SAMPLE, EPOCH), "b", False),
    LABEL: ((SAMPLE,), "iUOT", None),
    PREDICTION: ((SAMPLE, EPOCH), "iUOT", None),
    CORRECT: ((SAMPLE, EPOCH), "b", False),
}


def _wrong_schema(group: zarr.Group, arrays: Mapping[str, zarr.Array]) -> list[str]:
    """What in the arrays' metadata contradicts the store format (dims, dtype, fill)."""
    attrs = group.attrs
    expected = dict(_FIXED)
    expected.update({k: ((NEURON,), "i", None) for k in attrs.get(_ATTR_UNIT_COORDS, [])})
    expected.update({k: ((SAMPLE,), "biufUOT", None) for k in attrs.get(_ATTR_METADATA, [])})
    expected.update({k: ((EPOCH,), "f", None) for k in attrs.get(_ATTR_SCALARS, [])})
    out = []
    for name, arr in arrays.items():
        if name not in expected:
            continue
        dims, kinds, fill = expected[name]
        have = tuple(arr.metadata.dimension_names or ())
        if have != dims:
            out.append(f"array {name!r} has dimensions {have}, not {dims}")
            continue
        dtype = np.dtype(arr.dtype) if not str(arr.dtype).startswith("<U") else arr.dtype
        kind = getattr(dtype, "kind", "O")
        if kind not in kinds or (name == ACTIVATION and str(dtype) not in DTYPES) or (
                kinds == "i" and dtype != np.int64):
            out.append(f"array {name!r} has dtype {arr.dtype}")
            continue
        value = arr.metadata.fill_value
        if fill == "nan":
            if not np.isnan(value):
                out.append(f"array {name!r} has fill value {value}, not NaN")
        elif fill is not None and value != fill:
            out.append(f"array {name!r} has fill value {value!r}, not {fill!r}")
    n_neurons = arrays[ACTIVATION].shape[0]
    for name, arr in arrays.items():
        if expected.get(name, ((),))[0] == (NEURON,) and arr.shape[0] != n_neurons:
            out.append(f"array {name!r} has {arr.shape[0]} entries, 'activation' "
                       f"{n_neurons} neurons")
    return out


def check_model_name(node: str, group: zarr.Group) -> None:
    """Refuse a model group whose name attribute does not give its node name."""
    name = group.attrs.get(ATTR_MODEL)
    if not isinstance(name, str) or safe_node_name(name) != node:
        raise StoreCorruptionError(f"model {node!r} is damaged: its attribute {ATTR_MODEL!r} "
                                   f"({name!r}) does not match the node {node!r}")


def _store_bytes(store: Any, key: str) -> bytes | None:
    """The bytes of ``key`` in ``store``, None where it does not exist."""
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    if isinstance(store, zarr.storage.LocalStore):
        try:
            with open(os.path.join(store.root, key), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None
    value = sync(store.get(key, default_buffer_prototype()))
    return None if value is None else value.to_bytes()


def _exist(store: Any, keys: list[str]) -> list[bool]:
    from zarr.core.sync import sync

    if isinstance(store, zarr.storage.LocalStore):
        return [os.path.isfile(os.path.join(store.root, key)) for key in keys]

    async def exist() -> list[bool]:
        return list(await asyncio.gather(*(store.exists(key) for key in keys)))

    return sync(exist())


def lost_nodes(root: zarr.Group) -> list[str]:
    """Nodes (models, layers, arrays, saved layouts) that the store's own listing holds but
    the store lacks.

    A topoxr writer, and :func:`topoxr.layouts.save_layout`, remove the root's
    consolidated metadata (the listing of every node that plain ``xarray.open_datatree``
    reads) before they delete or change anything, and write it again when they finish;
    recording a verification writes it again only where nothing is lost. A node the
    listing holds was therefore in the store when the listing was written, and no topoxr
    writer removed it since: if it is missing now, it was deleted or lost outside topoxr
    (a folder removed by hand, an incomplete copy). What it held would otherwise vanish
    without a word: readers list the folders, so that a layer without its folder is not
    shown at all, and one without its ``label`` folder is shown without labels.

    Parameters
    ----------
    root : zarr.Group
        The store's root group.

    Returns
    -------
    list of str
        The paths of the missing nodes, sorted, each missing node named once (not with
        the nodes below it). Empty where the store has no listing (while a writer runs,
        after one was killed or failed), and where the listing changed while it was
        checked (a writer started).
    """
    doc = _store_bytes(root.store, "zarr.json")
    if doc is None or b'"consolidated_metadata"' not in doc:
        return []
    try:
        listing = (json.loads(doc).get("consolidated_metadata") or {}).get("metadata") or {}
    except (ValueError, AttributeError):
        return []  # a damaged root document is reported where it is read
    paths = sorted(p for p in listing if p)
    missing = [p for p, ok in zip(paths, _exist(root.store, [f"{p}/zarr.json" for p in paths]),
                                  strict=True) if not ok]
    if missing and _store_bytes(root.store, "zarr.json") != doc:
        return []  # a writer started meanwhile (it drops the listing before it deletes)
    # a missing model or layer is named once, not with every node below it
    return [p for p in missing if not any(p.startswith(f"{q}/") for q in missing)]


def lost_nodes_message(url: str, lost: list[str]) -> str:
    """The error for :func:`lost_nodes`, naming the nodes and the ways out."""
    shown = ", ".join(repr(p) for p in lost[:5]) + (f" and {len(lost) - 5} more"
                                                    if len(lost) > 5 else "")
    return (f"{url!r} is damaged: {shown} {'is' if len(lost) == 1 else 'are'} listed in the "
            "store's consolidated metadata (written when its last writer closed) but missing "
            "from the store: deleted or lost outside topoxr, with all it held. Restore the "
            "store from a copy; if the nodes were deleted on purpose, write the listing "
            f"again with zarr.consolidate_metadata({url!r}) (nothing was changed)")
