"""Ordered, whole-chunk writes to zarr: the write order that crash safety rests on."""

from __future__ import annotations

import functools
import logging
from typing import Any

import numpy as np
import zarr
from zarr.abc.store import SupportsSetSync
from zarr.codecs import BytesCodec, Crc32cCodec

from topoxr._chunkio import (
    DirectResize,
    DirectWriter,
    crc32c_bytes,
    last_per_chunk,
    put_pieces,
    region_writer,
    run_jobs,
    store_key,
)

logger = logging.getLogger(__name__)


@functools.lru_cache(maxsize=None)
def _writes_synchronously_type(store_type: type) -> bool:
    return issubclass(store_type, SupportsSetSync)


def _writes_synchronously(store: Any) -> bool:
    """Whether ``store`` has zarr's ``set_sync`` (a cached check: protocols are slow)."""
    return _writes_synchronously_type(type(store))


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
    this version is stored uncompressed (followed by its crc32c), so on a store that
    writes synchronously (local files, zarr's memory store) each chunk is encoded here,
    as zarr's ``bytes`` and ``crc32c`` codecs do (one byte per bool, then the checksum),
    and replaced in one atomic store call: about a third of
    the cost of a trip through zarr's asynchronous codec pipeline, which every other
    store (and masks written compressed by earlier versions) still takes.
    """
    chunk = arr.chunks[0]
    lo, hi, block = _whole_chunks(column, int(pos.min()), int(pos.max()) + 1, chunk, size, False)
    block = block.copy()
    block[pos - lo] = True
    checksum = tuple(type(c) for c in arr.compressors) == (Crc32cCodec,)
    if not (_writes_synchronously(arr.store) and arr.filters == ()
            and (checksum or arr.compressors == ()) and isinstance(arr.serializer, BytesCodec)):
        arr[lo:hi, e] = block
        return
    for first in range(lo, hi, chunk):
        data = np.zeros(chunk, dtype=np.uint8)  # the edge chunk too is stored whole
        piece = block[first - lo:first - lo + chunk]
        data[: len(piece)] = piece
        pieces: list[Any] = [data]
        if checksum:  # as zarr's crc32c codec: the crc32c of the bytes, little-endian, last
            pieces.append(crc32c_bytes(data))
        key = store_key(arr.path, arr.metadata.encode_chunk_key((first // chunk, e)))
        put_pieces(arr.store, key, pieces)


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

    async def chain(ops: list[tuple[Any, tuple[Any, ...]]]) -> None:
        errors = []
        for func, args in ops:
            try:
                await func(*args)
            except Exception as err:
                errors.append(err)
        if errors:
            raise errors[0]

    async def gather(ops: list[tuple[Any, tuple[Any, ...]]]) -> None:
        # operations on one array run one after the other (zarr's setitem reads and
        # writes whole chunks: two regions of one chunk at once would lose one), the
        # arrays concurrently; every operation runs to its end before an error is
        # raised: nothing may still be writing when the caller hears of the failure
        chains: dict[int, list[tuple[Any, tuple[Any, ...]]]] = {}
        for func, args in ops:
            chains.setdefault(id(getattr(func, "__self__", func)), []).append((func, args))
        outcomes = await asyncio.gather(*(chain(c) for c in chains.values()),
                                        return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome

    for step in steps:
        direct = (DirectWriter, DirectResize)
        # several runs of a batch may touch one chunk: only its last job is complete
        jobs = last_per_chunk([job for func, args in step if isinstance(func, direct)
                               for job in func(*args)])
        for cache in {id(f.cache): f.cache for f, _ in step
                      if isinstance(f, DirectWriter) and f.cache is not None}.values():
            cache.end_step()
        ops = [(func, args) for func, args in step if not isinstance(func, direct)]
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
