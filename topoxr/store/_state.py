"""What a writer keeps in memory about each layer it writes."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from typing import Any

import numpy as np
import zarr

from topoxr._chunkio import ChunkCache, region_writer
from topoxr.conventions import (
    ACTIVATION,
    EPOCH,
    SAMPLE,
)
from topoxr.store._schema import _ARRAY_CONFIG

logger = logging.getLogger(__name__)


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
    #: id -> position, built only when the ids are not increasing (see positions)
    _index: dict[int, int] | None = None
    _increasing: bool = True
    #: chunks last written per array, to complete partial chunks without reading them
    caches: dict[str, ChunkCache] = field(default_factory=dict)
    #: a layer created in memory only: the jobs writing its files, in three steps
    #: (group, arrays, the "ready" mark), run before its first commit
    creation: tuple[list, list, list] | None = None
    #: epochs the layer held when this writer opened it (0 for a layer it created)
    epochs_at_open: int = 0

    def __post_init__(self) -> None:
        self._increasing = bool(np.all(np.diff(self.sample_ids) > 0))

    @property
    def frozen(self) -> bool:
        """The probe set is fixed once any epoch is complete."""
        return bool(self.complete.any())

    @property
    def increasing(self) -> bool:
        """Whether the stored sample ids increase."""
        return self._increasing

    def run_start(self, sample_ids: np.ndarray) -> int:
        """Where ``sample_ids`` lie as one contiguous run of the stored ids, else -1."""
        known = self.sample_ids
        n, b = len(known), len(sample_ids)
        if not n or not b:
            return -1
        # ids written in order (the common case): the run starts at the first id's
        # offset from the first stored id
        start = int(sample_ids[0]) - int(known[0])
        if (0 <= start and start + b <= n and known[start] == sample_ids[0]
                and np.array_equal(known[start:start + b], sample_ids)):
            return start
        return -1

    def positions(self, sample_ids: np.ndarray) -> np.ndarray:
        """Positions of ``sample_ids`` on the sample axis, -1 where unknown."""
        sample_ids = np.asarray(sample_ids, dtype=np.int64)
        start = self.run_start(sample_ids)
        if start >= 0:
            return np.arange(start, start + len(sample_ids), dtype=np.int64)
        return self.lookup(sample_ids)

    def lookup(self, sample_ids: np.ndarray) -> np.ndarray:
        """:meth:`positions` of int64 ids that are not one run of the stored ids."""
        known = self.sample_ids
        n = len(known)
        if not n:
            return np.full(len(sample_ids), -1, dtype=np.int64)
        if self._increasing:  # ids stored in increasing order: a vectorised lookup
            found = np.minimum(np.searchsorted(known, sample_ids), n - 1)
            return np.where(known[found] == sample_ids, found, -1).astype(np.int64)
        if self._index is None:
            self._index = {int(s): i for i, s in enumerate(known.tolist())}
        get = self._index.get
        return np.fromiter((get(int(s), -1) for s in sample_ids.tolist()), dtype=np.int64,
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
        if self._increasing and len(ids):
            after = start == 0 or int(ids[0]) > int(self.sample_ids[-1])
            self._increasing = after and bool(np.all(np.diff(ids) > 0))
        self.sample_ids = all_ids
        if self._index is not None:
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
            # every chunk is stored, even one holding only the fill value, so that a
            # missing chunk always means damage (see _CheckedActivation and verify)
            self._arrays = {name: arr.with_config(_ARRAY_CONFIG)
                            for name, arr in self.group.arrays()}
        return self._arrays

    @property
    def storage_dtype(self) -> str:
        """The stored dtype of ``activation`` (``"float32"``, ``"float16"``), cached."""
        if self._storage_dtype is None:
            self._storage_dtype = str(np.dtype(self.arrays[ACTIVATION].dtype))
        return self._storage_dtype

    _storage_dtype: str | None = None

    def adopt(self, arrays: dict[str, zarr.Array]) -> None:
        """Take arrays just created (see ``_create_arrays``) without listing the store.

        Either the layer's first arrays (a new layer) or arrays added to those opened.
        """
        self._arrays = {**(self._arrays or {}), **arrays}

    def writer(self, key: str) -> Any:
        """The ``(region, block)`` writer of array ``key`` (whole chunks, see _chunkio).

        For arrays on ``(..., sample, epoch)``, a partial chunk not in the cache is read
        back only where the committed mask says it holds committed values: every other
        cell is hidden from readers, so the fill value may replace it.
        """
        arr = self.arrays[key]
        dims = tuple(arr.metadata.dimension_names or ())
        holds_data = None
        if dims[-2:] == (SAMPLE, EPOCH):
            def holds_data(bounds: list[tuple[int, int]]) -> bool:
                (s0, s1), (e0, e1) = bounds[-2:]
                return bool(self.mask[s0:s1, e0:e1].any())
        return region_writer(arr, self.caches.setdefault(key, ChunkCache()), holds_data)


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


def _layer_columns(state: _LayerState) -> set[str]:
    """Metadata and unit-coordinate columns of a layer (names an epoch scalar cannot take)."""
    return set(state.metadata) | set(state.unit_coords)
