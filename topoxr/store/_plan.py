"""Checking a batch against the stored layer and planning what to write."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from topoxr.conventions import (
    ACTIVATION,
)
from topoxr.store._errors import StoreError, StoredValuesDifferError
from topoxr.store._schema import _kind
from topoxr.store._state import _LayerState, _runs

logger = logging.getLogger(__name__)


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
    if arr.dtype.kind == "u" and arr.size and int(arr.max()) > _INT64_MAX:
        # stored as int64: they would wrap to negative numbers (2**64-1 to -1, the fill)
        raise StoreError(f"{name} holds {int(arr.max())}, above the largest value the store "
                         f"keeps (int64: {_INT64_MAX})")
    return arr


def _as_epoch(epoch: Any) -> int:
    if isinstance(epoch, bool) or not isinstance(epoch, int | np.integer):
        raise StoreError(f"epoch must be an integer, got {epoch!r}")
    if epoch < 0:
        raise StoreError(f"epoch must be >= 0, got {epoch}")
    if int(epoch) > _INT64_MAX:
        raise StoreError(f"epoch {epoch} does not fit a 64-bit signed integer "
                         f"(at most {_INT64_MAX})")
    return int(epoch)


_INT64_MAX = int(np.iinfo(np.int64).max)
#: How far values written again for committed cells may lie from the stored ones, as a
#: fraction of the largest stored value of the batch's cells: a resumed recording of the
#: same model computes them again, in batches of another size or on another device, and
#: float32 sums in another order differ in their last bits (6e-8 between batches of 1
#: and 64 of the digits MLP). Another model (other weights, another training run)
#: differs by far more. Within it the stored values are kept.
RESUME_TOLERANCE = 1e-4
#: Longest node name (bytes): most file systems refuse longer file names.
_MAX_NAME_BYTES = 255


def _as_ids(what: str, values: Any) -> np.ndarray:
    """Sample ids as int64: integers only, none above 2**63-1 (refused, never wrapped)."""
    ids = np.asarray(list(values) if not isinstance(values, np.ndarray) else values)
    if ids.size == 0:
        return ids.astype(np.int64).reshape(-1)
    if ids.dtype.kind not in "iu":
        raise StoreError(f"{what}: sample ids must be integers, got {ids.dtype}")
    if ids.dtype.kind == "u" and int(ids.max()) > _INT64_MAX:
        raise StoreError(f"{what}: sample id {int(ids.max())} does not fit a 64-bit signed "
                         f"integer (at most {_INT64_MAX})")
    return ids.astype(np.int64)


def _check_node_name(kind: str, name: str, taken: Mapping[str, str]) -> str:
    """The node name of model or layer ``name``; refuse collisions and unusable names.

    ``taken`` maps the node names already used to the names they hold.
    """
    from topoxr.store._location import safe_node_name

    if not isinstance(name, str) or not name:
        raise StoreError(f"{kind} must be a non-empty string")
    node = safe_node_name(name)
    if len(node.encode()) > _MAX_NAME_BYTES:
        raise StoreError(f"{kind} name {name[:40]!r}... is {len(node.encode())} bytes long; "
                         f"at most {_MAX_NAME_BYTES} fit a file name")
    if node == "zarr.json" or node.startswith("."):
        raise StoreError(f"{kind} name {name!r} is reserved by the store format")
    if node in taken and taken[node] != name:
        raise StoreError(f"{kind} {name!r} maps to node {node!r}, already used by "
                         f"{kind} {taken[node]!r}; rename one of them")
    return node


@dataclass
class _Plan:
    new_rows: np.ndarray  # batch rows whose sample id is new to the layer
    write_rows: np.ndarray  # batch rows to write in this epoch


def _split(state: _LayerState, ids: np.ndarray, increasing: bool
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(positions, new rows, known rows)`` of a batch's ids in the layer.

    Two common cases are answered without a lookup: ids that are a run of the stored
    ones (a later epoch), and increasing ids all past the stored ones (the first).
    """
    batch = len(ids)
    start = state.run_start(ids)
    if start >= 0:
        every = np.arange(batch)
        return every + start, every[:0], every
    known = state.sample_ids
    if increasing and (not len(known) or (state.increasing and ids[0] > known[-1])):
        return np.full(batch, -1, dtype=np.int64), np.arange(batch), np.arange(0)
    pos = state.lookup(ids)  # (not a run: positions() would check that again)
    return pos, np.flatnonzero(pos < 0), np.flatnonzero(pos >= 0)


def _plan_batch(writer, layer, state, reduced, ids, labels, preds, meta, epoch, overwrite,
                increasing: bool = False):
    """Check a batch against the stored layer; return what to write, or None to skip.

    ``increasing`` says that ``ids`` increase (the writer checked it).
    """
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
    pos, new, old = _split(state, ids, increasing)
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
    stored_dtype = np.dtype(state.arrays[ACTIVATION].dtype)
    if stored_dtype.itemsize < 4:  # compare as stored (rounded to float16)
        fresh = fresh.astype(stored_dtype).astype(np.float32)
    same, largest, scale = _same_values(stored, fresh, stored_dtype)
    if not same.all():
        bad = ids[done_rows][~same.all(axis=1)]
        raise StoredValuesDifferError(
            f"{where}: samples {bad[:10].tolist()} are committed for epoch {epoch} with "
            f"different values (largest difference {largest:.3g}, where the stored values "
            f"reach {scale:.3g}): these are not the values of the model that recorded "
            "them; pass overwrite=True to replace them"
        )
    rest = np.setdiff1d(np.arange(batch), done_rows)
    if not len(rest):
        logger.debug("%s epoch %s: batch already committed, skipped", where, epoch)
        return None
    return _Plan(new_rows=new, write_rows=rest)


def _same_values(stored: np.ndarray, fresh: np.ndarray, stored_dtype: np.dtype
                 ) -> tuple[np.ndarray, float, float]:
    """Which of ``fresh`` agree with ``stored`` within :data:`RESUME_TOLERANCE` (NaN
    with NaN, an infinity with itself), the largest difference and the scale."""
    finite = np.isfinite(stored)
    scale = float(np.abs(stored[finite]).max()) if finite.any() else 0.0
    tol = RESUME_TOLERANCE * scale
    if stored_dtype.itemsize < 4:  # both rounded to float16: one step of it apart at most
        tol = tol + np.finfo(stored_dtype).eps * np.where(finite, np.abs(stored), 0)
    with np.errstate(invalid="ignore"):
        diff = np.abs(fresh.astype(np.float64) - stored)
        same = (diff <= tol) | (stored == fresh) | (np.isnan(stored) & np.isnan(fresh))
    largest = float(np.max(np.where(same, 0.0, np.nan_to_num(diff, nan=np.inf, posinf=np.inf)),
                           initial=0.0))
    return same, largest, scale


def _read_values(state: _LayerState, pos: np.ndarray, e: int) -> np.ndarray:
    act = state.arrays[ACTIVATION]
    order = np.argsort(pos)
    out = np.empty((len(pos), state.n_neurons), dtype=np.float32)
    sorted_pos = pos[order]
    for p0, p1, i0, i1 in _runs(sorted_pos):
        out[order[i0:i1]] = np.asarray(act[:, p0:p1, e]).T
    return out


class _Pending:
    """Batches of one layer and epoch accepted by ``write`` and not committed yet.

    Activations are copied into one growing float32 buffer (the caller may reuse its
    arrays; the store keeps float32 or less);
    the 1-D columns are kept as parts and joined once, at the commit.
    """

    def __init__(self, epoch: int, n_neurons: int, buffer: np.ndarray | None = None,
                 rows: int = 0) -> None:
        self.epoch = epoch
        # the buffer of the layer's previous commit is reused: fresh memory would be
        # faulted in page by page again (about as slow as copying it); a new one is made
        # for ``rows`` rows at once (growing it batch by batch would copy it again)
        ok = buffer is not None and buffer.shape[1:] == (n_neurons,)
        self._capacity = rows
        self._width = n_neurons
        self.values = buffer if ok else None  # made by the first add (see add)
        self.rows = 0
        self.new_count = 0
        self._ids: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []
        self._preds: list[np.ndarray] = []
        self._meta: list[dict[str, np.ndarray]] = []
        self._new: list[np.ndarray] = []
        self._id_set: set[int] | None = None  # built when needed (see accepts)
        self._max_id = -(1 << 63)
        self._kinds: tuple | None = None

    @property
    def nbytes(self) -> int:
        return self.rows * self._width * 4

    @property
    def last_ids(self) -> np.ndarray:
        return self._ids[-1]

    @staticmethod
    def signature(labels, preds, meta) -> tuple:
        """The kinds of a batch's columns: batches of one commit must agree on them."""
        return (None if labels is None else _kind(labels),
                None if preds is None else _kind(preds),
                tuple(sorted((k, _kind(v)) for k, v in meta.items())) if meta else ())

    def accepts(self, epoch: int, ids: np.ndarray, lowest: int, kinds: tuple,
                overwrite: bool) -> bool:
        """Whether a batch can join these (same epoch and columns, none of their ids).

        ``lowest`` is the batch's smallest id and ``kinds`` its :meth:`signature`.
        """
        if overwrite or epoch != self.epoch or not self.rows:
            return not self.rows
        if kinds != self._kinds:
            return False
        if lowest > self._max_id:  # the common case: ids increase
            return True
        if self._id_set is None:  # built only when ids come back (a rare order)
            self._id_set = set(np.concatenate(self._ids).tolist())
        return self._id_set.isdisjoint(ids.tolist())

    def add(self, values, ids, labels, preds, meta, new_rows, kinds: tuple,
            adopt: bool = False) -> None:
        """Append a batch; ``adopt``: ``values`` is nobody else's (see ``write_handed_over``).

        An adopted first batch becomes the buffer as it is; a later batch then moves
        the rows into a buffer of the full size, the copy adopting saved until then
        (none where the layer is committed before another batch comes).
        """
        n = len(ids)
        if (adopt and not self.rows and values.dtype == np.float32 and values.ndim == 2
                and values.flags.c_contiguous and values.flags.writeable):
            self.values = values
        else:
            if self.values is None:
                self.values = np.empty((max(self._capacity, n), self._width), dtype=np.float32)
            elif self.rows + n > len(self.values):
                grown = np.empty((max(self._capacity, 2 * len(self.values), self.rows + n),
                                  self._width), dtype=np.float32)
                grown[: self.rows] = self.values[: self.rows]
                self.values = grown
            self.values[self.rows:self.rows + n] = values
        self._kinds = kinds
        self._ids.append(ids.copy())
        if self._id_set is not None:
            self._id_set.update(ids.tolist())
        if n:
            self._max_id = max(self._max_id, int(ids.max()))
        for parts, col in ((self._labels, labels), (self._preds, preds)):
            if col is not None:
                parts.append(col.copy())
        self._meta.append({k: v.copy() for k, v in meta.items()})
        self._new.append(new_rows + self.rows if self.rows else new_rows)
        self.rows += n
        self.new_count += len(new_rows)

    def merged(self) -> tuple:
        """``(values, ids, labels, preds, meta, new_rows)`` of all the batches, in order."""
        cat = np.concatenate
        meta = {k: cat([m[k] for m in self._meta]) for k in self._meta[0]}
        return (self.values[: self.rows], cat(self._ids),
                cat(self._labels) if self._labels else None,
                cat(self._preds) if self._preds else None, meta, cat(self._new))
