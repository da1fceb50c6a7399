"""Whole-chunk writes and fast reads of the store's arrays (the data path's internals).

Writing: a :class:`DirectWriter` replaces a region of a zarr array by encoding every chunk
it touches *whole*, here, with the array's own codec chain (so the bytes are exactly
what zarr would write, checksums included), on a small thread pool in parallel (:func:`run_jobs`), and
storing each with one atomic ``set_sync`` call.  A chunk that the region covers only in
part is completed from a small per-array cache of the chunks last written (the tail of
a batch that ends inside a chunk), so the writer never reads and decodes a chunk it
has just written; only a chunk absent from the cache (the first write after opening a
store) is read once.  Arrays whose store has no ``set_sync`` (fsspec URLs) or whose
codecs cannot encode synchronously go through zarr's own ``setitem``.

Zarr's local store is written here directly (:func:`put_pieces`: a temporary file
renamed over the old one, as zarr does, without its per-file overhead), chunk bytes are
encoded without zarr's copies (:func:`encode_pieces`), and array and group metadata,
built by zarr, is written the same way (:func:`create_arrays`, :class:`DirectResize`,
:func:`create_group`); a store whose ``set_sync`` is not zarr's goes through it.

Reading: :func:`read_region` reads the chunk files of ``bytes`` + ``crc32c`` arrays of a
local store itself, in parallel, checking each checksum (about 2.5 times faster per
block than the ``zarrs`` pipeline, measured); other arrays are decoded by the ``zarrs``
codec pipeline (:func:`read_array`; Rust, parallel) when that package is installed and
supports the array, and by zarr-python's pipeline otherwise; :func:`read_blocks` picks
dask blocks of many whole chunks, so that each task reads its chunks in one parallel call.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import errno
import functools
import json
import logging
import math
import os
import sys
import itertools
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from crc32c import crc32c as _crc32c
import numpy as np
import zarr
from zarr.abc.store import SupportsSetSync
from zarr.core.buffer import default_buffer_prototype

logger = logging.getLogger(__name__)

#: Bytes of partially written chunks kept per array (at least one chunk is kept).
CACHE_BYTES = 32 << 20
#: Target bytes of one dask block when reading: many chunks, decoded in one call.
READ_BLOCK_BYTES = 32 << 20


@functools.lru_cache(maxsize=None)
def _syncs(store_type: type) -> bool:
    return issubclass(store_type, SupportsSetSync)


def direct_writes(arr: zarr.Array) -> bool:
    """Whether a :class:`DirectWriter` can encode and store ``arr``'s chunks itself."""
    return (_syncs(type(arr.store)) and np.dtype(arr.dtype).kind in "biuf"
            and all(hasattr(c, "_encode_sync") for c in arr.metadata.codecs))


class ChunkCache:
    """Decoded copies of the chunks of one array last written, bounded in bytes.

    Within one step of writes (see ``topoxr.store._chunks._run_in_order``) several runs
    of positions may touch one chunk, each completing it from the copy the run before
    left here; only the step's last job of the chunk is stored (see
    :func:`last_per_chunk`). So no chunk touched in the current step is evicted, and
    one written to its end (``put(..., done=True)``) is dropped only when the step ends
    (:meth:`end_step`): evicting it earlier would make the next run of the step rebuild
    the chunk from the fill value and lose the earlier runs' values. Their memory is
    held by the step's jobs anyway.
    """

    def __init__(self, max_bytes: int = CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        self._chunks: OrderedDict[tuple[int, ...], np.ndarray] = OrderedDict()
        self._touched: set[tuple[int, ...]] = set()  # put in the current step
        self._done: set[tuple[int, ...]] = set()  # to drop when the step ends

    def get(self, coords: tuple[int, ...]) -> np.ndarray | None:
        return self._chunks.get(coords)

    def put(self, coords: tuple[int, ...], chunk: np.ndarray, *, done: bool = False) -> None:
        """Keep ``chunk``; ``done``: written to its end, dropped when the step ends."""
        self._chunks[coords] = chunk
        self._chunks.move_to_end(coords)
        self._touched.add(coords)
        if done:
            self._done.add(coords)
        else:
            self._done.discard(coords)
        self._evict()

    def drop(self, coords: tuple[int, ...]) -> None:
        self._chunks.pop(coords, None)
        self._touched.discard(coords)
        self._done.discard(coords)

    def end_step(self) -> None:
        """The step's jobs are made: drop the chunks done, let the others be evicted."""
        for coords in self._done:
            self._chunks.pop(coords, None)
        self._done.clear()
        self._touched.clear()
        self._evict()

    def _evict(self) -> None:
        total = sum(c.nbytes for c in self._chunks.values())
        for coords in list(self._chunks):  # the oldest first
            if total <= self.max_bytes or len(self._chunks) <= 1:
                break
            if coords not in self._touched:
                total -= self._chunks.pop(coords).nbytes

    def clear(self) -> None:
        self._chunks.clear()
        self._touched.clear()
        self._done.clear()


def _codec_chain(arr: zarr.Array, coords: tuple[int, ...]) -> tuple[Any, list[tuple[Any, Any]]]:
    """zarr's buffer prototype and each codec of ``arr`` with the chunk spec it takes
    (the spec of chunk ``coords``, resolved through the codecs before it)."""
    from zarr.core.array_spec import ArraySpec

    prototype = default_buffer_prototype()
    # every chunk of a regular grid is encoded at the grid's chunk shape (edge chunks
    # too), as zarr's ``get_chunk_spec`` (zarr < 3.2) and ``_get_chunk_spec`` build it
    meta = arr.metadata
    spec = ArraySpec(shape=tuple(meta.chunks), dtype=meta.dtype, fill_value=meta.fill_value,
                     config=arr.async_array.config, prototype=prototype)
    chain = []
    for codec in arr.metadata.codecs:
        chain.append((codec, spec))
        spec = codec.resolve_metadata(spec)
    return prototype, chain


def _encode(arr: zarr.Array, coords: tuple[int, ...], chunk: np.ndarray) -> Any:
    """Encode one whole chunk with the array's codec chain, as zarr's pipeline does."""
    prototype, chain = _codec_chain(arr, coords)
    data: Any = prototype.nd_buffer.from_numpy_array(chunk)
    for codec, spec in chain:
        data = codec._encode_sync(data, spec)
    return data


def _plain_chain(codecs: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """The bytes-to-bytes codecs between ``bytes`` and a final ``crc32c``, or None.

    Chains of that form (every activation and coordinate array of this version: an
    optional ``transpose`` (see :func:`chunk_order`), the ``bytes`` serializer in the
    machine's byte order, optional compressors, then the checksum) are encoded by
    :func:`encode_pieces` without zarr's copies.
    """
    from zarr.codecs import BytesCodec, Crc32cCodec, TransposeCodec

    if codecs and isinstance(codecs[0], TransposeCodec):
        codecs = codecs[1:]
    if len(codecs) < 2 or not isinstance(codecs[0], BytesCodec):
        return None
    if not isinstance(codecs[-1], Crc32cCodec):
        return None
    endian = getattr(codecs[0].endian, "value", codecs[0].endian)
    if endian not in (None, sys.byteorder):
        return None
    return tuple(codecs[1:-1])


def chunk_order(arr: zarr.Array) -> tuple[int, ...] | None:
    """The axis order in which ``arr``'s chunks are stored, where not C order of its dims.

    This version stores ``activation`` chunks ``(neuron, sample, epoch)`` with zarr's
    ``transpose`` codec of order ``(2, 1, 0)``: sample-major, the order in which batches
    ``(sample, neuron)`` arrive, so that writing a chunk needs no transpose. Returns
    that order, or None for arrays without a leading ``transpose`` codec.
    """
    from zarr.codecs import TransposeCodec

    codecs = arr.metadata.codecs if arr.metadata.zarr_format == 3 else ()
    if codecs and isinstance(codecs[0], TransposeCodec):
        return tuple(int(i) for i in codecs[0].order)
    return None


def encode_pieces(arr: zarr.Array, coords: tuple[int, ...], chunk: np.ndarray) -> list[Any]:
    """The stored bytes of one whole chunk of ``arr``, as buffer-like pieces in order.

    For a [``transpose``] + ``bytes`` + compressors + ``crc32c`` chain the pieces are
    the (compressed) bytes and their crc32c, little-endian, exactly as zarr's codecs
    write them but without the copy zarr's ``crc32c`` codec makes to append the
    checksum; a chunk that is a view of data already in the stored order (a transposed
    view of sample-major batches, see :func:`chunk_order`) is not copied at all. Any
    other chain is encoded by zarr's codecs, in one piece.
    """
    codecs = tuple(arr.metadata.codecs)
    middle = _plain_chain(codecs)
    dtype = chunk.data.dtype if isinstance(chunk, Padded) else chunk.dtype
    native = dtype.byteorder in ("=", "|", "<" if sys.byteorder == "little" else ">")
    order = chunk_order(arr)
    if isinstance(chunk, Padded):
        prefix = chunk.stored_prefix(order) if middle == () and native else None
        if prefix is None:
            chunk = chunk.whole()
        else:  # the data's bytes, then a shared run of fill bytes: nothing materialised
            data = np.ascontiguousarray(prefix).reshape(-1).view(np.uint8)
            tail = _fill_run(dtype, chunk.fill, math.prod(chunk.shape) - prefix.size)
            tail_bytes = tail.view(np.uint8)
            crc = crc32c_value(tail_bytes, crc32c_value(data))
            return [data, tail_bytes, crc.to_bytes(4, "little")]
    if middle is None or not native:
        return [_encode(arr, coords, np.ascontiguousarray(chunk)).as_buffer_like()]
    stored = chunk if order is None else chunk.transpose(order)
    data: Any = np.ascontiguousarray(stored).reshape(-1).view(np.uint8)
    if not middle:
        return [data, crc32c_bytes(data)]
    key = _ENCODED.key(middle, dtype, stored.shape, data)
    pieces = _ENCODED.get(key, data)
    if pieces is None:
        prototype, chain = _codec_chain(arr, coords)
        buf: Any = prototype.buffer.from_array_like(data)
        first = len(codecs) - len(middle) - 1  # after transpose and bytes, before crc32c
        for codec, spec in chain[first:first + len(middle)]:
            buf = codec._encode_sync(buf, spec)
        encoded = buf.as_numpy_array()
        pieces = [encoded, crc32c_bytes(encoded)]
        _ENCODED.put(key, data, pieces)
    return pieces


class EncodedMemo:
    """The encoded bytes of the last small chunks compressed, to reuse for equal chunks.

    Every layer of a model stores its own copy of the per-sample columns (``sample``,
    ``label``, ``prediction``, ``correct``...): a recording that commits several layers
    at once encodes the same compressed chunk once per layer. Equal data through equal
    codecs gives equal bytes, so the first encoding serves the others. A hit is an exact
    match (dtype, shape, codecs and every byte, compared after a crc32c of the data
    narrowed it down); only chunks of at most ``max_chunk_bytes`` are kept, at most
    ``max_entries`` of them (copies of their data included: at most 32 MiB with the
    defaults), it is cleared when a writer closes, and it is thread-safe.
    """

    def __init__(self, max_entries: int = 16, max_chunk_bytes: int = 1 << 20) -> None:
        self.max_entries = max_entries
        self.max_chunk_bytes = max_chunk_bytes
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple, tuple[np.ndarray, list[Any]]] = OrderedDict()

    def key(self, codecs: tuple[Any, ...], dtype: np.dtype, shape: tuple[int, ...],
            data: np.ndarray) -> tuple | None:
        """The memo key of ``data`` (raw bytes) through ``codecs``; None if too large.

        The codecs enter the key as their metadata (``to_dict()``, as JSON), which
        defines what they write: codec objects need not be hashable (zarr's
        ``BloscCodec`` holds a set). None, too, for codecs without such metadata.
        """
        if data.nbytes > self.max_chunk_bytes:
            return None
        try:
            described = json.dumps([codec.to_dict() for codec in codecs], sort_keys=True)
        except (AttributeError, TypeError, ValueError):
            return None
        return (described, np.dtype(dtype).str, tuple(shape), crc32c_value(data))

    def get(self, key: tuple | None, data: np.ndarray) -> list[Any] | None:
        """The stored pieces of a chunk equal to ``data`` under ``key``, else None."""
        if key is None:
            return None
        with self._lock:
            hit = self._entries.get(key)
            if hit is not None:
                self._entries.move_to_end(key)
        if hit is None or not np.array_equal(hit[0], data):
            return None
        return hit[1]

    def put(self, key: tuple | None, data: np.ndarray, pieces: list[Any]) -> None:
        """Keep ``pieces``, the stored bytes of ``data``, for equal chunks to come."""
        if key is None:
            return
        with self._lock:
            self._entries[key] = (data.copy(), pieces)
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        """Forget every entry (a writer that closes frees the memory they hold)."""
        with self._lock:
            self._entries.clear()


_ENCODED = EncodedMemo()


def clear_encoded_memo() -> None:
    """Free the encoded chunks kept for reuse (see :class:`EncodedMemo`)."""
    _ENCODED.clear()


def crc32c_value(data: Any, crc: int = 0) -> int:
    """The crc32c of ``data`` (a C-contiguous buffer), continuing from ``crc``.

    The ``crc32c`` package computes it (hardware instructions where the CPU has them;
    it releases the GIL for buffers of 32 KiB or more): the values of zarr's ``crc32c``
    codec, which uses ``google_crc32c``, 4 times as fast here (22 against 5.7 GB/s on
    a 4 MiB buffer) and in parallel in the store's job threads, where
    ``google_crc32c`` holds the GIL (tests/test_datapath.py checks the two agree).
    """
    return _crc32c(data, crc)


def crc32c_bytes(data: Any) -> bytes:
    """The crc32c of ``data`` (any contiguous buffer) as zarr's ``crc32c`` codec stores it."""
    return crc32c_value(data).to_bytes(4, "little")


def store_key(path: str, name: str) -> str:
    """The store key of ``name`` inside the node at ``path`` (``""`` is the root)."""
    return f"{path}/{name}" if path else name


def put_pieces(store: Any, key: str, pieces: Sequence[Any]) -> None:
    """Store ``pieces`` (in order) as the value of ``key``, replacing it atomically.

    zarr's own local store is written here as zarr writes it, a temporary
    ``<name>.<pid>-<n>.partial`` file renamed over the old one, but from the pieces with
    no joined copy and no directory check before every file. Any other store, and a
    local store whose ``set_sync`` is not zarr's (a subclass such as
    :class:`topoxr.store._durable.DurableLocalStore`, which also ``fsync``s, or a
    wrapper), gets the joined bytes through its ``set_sync``.
    """
    if _zarr_local(store):
        if store.read_only:
            raise ValueError(f"store {store} is read-only")
        # plain strings, not pathlib: a store writes hundreds of small files at a commit
        path = os.path.join(store.root, key)
        links = _LINKS.get(os.fspath(store.root))
        content = claim = written = None
        if links is not None and sum(memoryview(p).nbytes for p in pieces) <= LINK_MAX_BYTES:
            content = b"".join(memoryview(p).cast("B") for p in pieces)
            linked, claim = links.link_or_claim(content, path)
            if linked:
                return
        # unique per process and call (uuid4 would cost a slow urandom call per chunk); a
        # stale name from a killed process is only ever truncated and replaced
        tmp = _temporary_name(path)
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        try:
            fd = _in_new_folder(lambda: os.open(tmp, flags, 0o666), path)
            try:
                for piece in pieces:
                    view = memoryview(piece).cast("B")
                    while view.nbytes:
                        view = view[os.write(fd, view):]
                stat = os.fstat(fd) if claim is not None else None
            finally:
                os.close(fd)
            os.replace(tmp, path)
            written = stat
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        finally:
            if claim is not None:
                links.written(claim, content, path, written)
        return
    prototype = default_buffer_prototype()
    joined = b"".join(memoryview(p).cast("B") for p in pieces)
    store.set_sync(key, prototype.buffer.from_bytes(joined))


_TMP_IDS = itertools.count()


def _temporary_name(path: str) -> str:
    return f"{path}.{os.getpid()}-{next(_TMP_IDS)}.partial"


def _in_new_folder(create: Callable[[], Any], path: str) -> Any:
    """``create()``, a call that makes a file beside ``path``; where ``path``'s folder
    does not exist yet (a new array or chunk row), the folder is made and the call
    repeated."""
    try:
        return create()
    except FileNotFoundError:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return create()


#: Files of at most this many bytes may become hard links to an identical file of the
#: same store (see :class:`IdenticalFiles`).
LINK_MAX_BYTES = 64 << 10


class IdenticalFiles:
    """The small files one writer wrote to a local store, by content, to link the next
    identical file to (one inode for many names; see :func:`start_linking`).

    Every layer of a model stores the same per-sample columns (``sample``, ``label``,
    ``prediction``, ``correct``, the ``committed`` mask...) and, layers of one width, the
    same array metadata: 268 of a 15-layer ResNet-18's 313 files repeat another's
    bytes. A file system allocates an inode for every file it creates; ext4 without a
    journal (this benchmark machine's) also scans past every inode freed in the last
    minutes at each allocation, so that deleting a store and recording a new one costs
    time in proportion to both file counts. A hard link takes no inode and no data.

    A file is linked only to one this writer wrote itself, and only while that file
    still is what was written (the same inode, size and modification time: a file
    replaced since, by any writer, is not linked to). Linking keeps the store's
    guarantees because nothing changes a stored file in place: topoxr and zarr-python
    write a temporary file and rename it over the old name, which gives that name a
    new inode and leaves the other names as they were.

    Thread-safe: of several threads writing the same bytes at once (the layers of one
    commit, in parallel), the first writes the file and the others wait for it, then
    link to it. The keys (the files' bytes) take at most ``max_bytes``; the least
    recently used are forgotten first.
    """

    def __init__(self, max_bytes: int = 8 << 20) -> None:
        self.max_bytes = max_bytes
        self.disabled = False
        self._lock = threading.Lock()
        self._files: OrderedDict[bytes, tuple[str, int, int, int]] = OrderedDict()
        self._writing: dict[bytes, threading.Event] = {}
        self._bytes = 0

    def link_or_claim(self, content: bytes, path: str) -> tuple[bool, Any]:
        """Make ``path`` a hard link to a remembered file holding ``content``, atomically
        (replacing ``path`` if it exists): ``(True, None)``. Otherwise ``(False,
        claim)``: the caller writes the file and then passes ``claim`` to
        :meth:`written` (also when the write failed); ``claim`` is None where nothing
        is to be remembered (links refused here, or the remembered file changed)."""
        for _ in range(2):  # a second look after waiting for another thread's write
            if self.disabled:
                return False, None
            with self._lock:
                hit = self._files.get(content)
                if hit is None:
                    busy = self._writing.get(content)
                    if busy is None:
                        claim = self._writing[content] = threading.Event()
                        return False, claim
            if hit is None:
                busy.wait()
                continue
            return self._link(content, path, *hit), None
        return False, None

    def written(self, claim: Any, content: bytes, path: str,
                stat: os.stat_result | None) -> None:
        """End a claim of :meth:`link_or_claim`: ``path`` now holds ``content``
        (``stat``: of the file as written), or ``stat`` is None (the write failed)."""
        if claim is None:
            return
        with self._lock:
            if stat is not None and content not in self._files:
                self._files[content] = (path, stat.st_ino, stat.st_size, stat.st_mtime_ns)
                self._bytes += len(content)
                while self._bytes > self.max_bytes and len(self._files) > 1:
                    old, _ = self._files.popitem(last=False)
                    self._bytes -= len(old)
            self._writing.pop(content, None)
        claim.set()

    def _forget(self, content: bytes) -> None:
        with self._lock:
            if self._files.pop(content, None) is not None:
                self._bytes -= len(content)

    def _link(self, content: bytes, path: str, source: str, ino: int, size: int,
              mtime: int) -> bool:
        try:
            now = os.stat(source)
        except OSError:
            now = None
        if now is None or (now.st_ino, now.st_size, now.st_mtime_ns) != (ino, size, mtime):
            self._forget(content)
            return False
        if source == path:  # the bytes are written again to where they are
            return True
        try:
            _in_new_folder(lambda: os.link(source, path), path)
        except FileExistsError:
            tmp = _temporary_name(path)
            try:
                os.link(source, tmp)
                os.replace(tmp, path)
            except OSError as err:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                return self._refused(content, err)
            # where ``path`` already was a name of ``source`` (bytes written again, by
            # this writer, to where they are), the rename did nothing (POSIX: a rename
            # between two names of one file is a no-op) and left ``tmp``: ``path``
            # holds ``content`` either way (a failure to remove ``tmp`` loses nothing)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        except OSError as err:
            return self._refused(content, err)
        with self._lock:
            if content in self._files:
                self._files.move_to_end(content)
        return True

    def _refused(self, content: bytes, err: OSError) -> bool:
        if err.errno == errno.EMLINK:  # that file has as many names as it can have
            self._forget(content)
        else:  # links not supported here (or not allowed): write every file
            logger.debug("hard links refused (%s); writing every file", err)
            self.disabled = True
        return False


_LINKS: dict[str, IdenticalFiles] = {}


def start_linking(store: Any) -> None:
    """From now on, small files that :func:`put_pieces` writes to ``store`` (zarr's local
    store) become hard links to an identical file written before, where they can (see
    :class:`IdenticalFiles`), until :func:`stop_linking`. For the holder of the store's
    writer lock: one writer at a time."""
    _LINKS[os.fspath(store.root)] = IdenticalFiles()


def stop_linking(store: Any) -> None:
    """Write every file of ``store`` again, and forget the files written so far."""
    _LINKS.pop(os.fspath(store.root), None)


_ZARR_LOCAL_SET_SYNC = zarr.storage.LocalStore.set_sync


def _zarr_local(store: Any) -> bool:
    """Whether ``store`` is zarr's local store with zarr's own ``set_sync`` (see put_pieces)."""
    return getattr(type(store), "set_sync", None) is _ZARR_LOCAL_SET_SYNC


def _store_chunk(arr: zarr.Array, coords: tuple[int, ...], chunk: np.ndarray) -> None:
    key = store_key(arr.path, arr.metadata.encode_chunk_key(coords))
    put_pieces(arr.store, key, encode_pieces(arr, coords, chunk))


def _normalize(region: Sequence[Any], shape: tuple[int, ...]) -> tuple[list[tuple[int, int]], tuple]:
    """``(start, stop)`` per dim and the axes of ``region`` given as integers (dropped)."""
    bounds, dropped = [], []
    for axis, (sel, size) in enumerate(zip(region, shape, strict=True)):
        if isinstance(sel, slice):
            start, stop, step = sel.indices(size)
            if step != 1:
                raise ValueError("only contiguous regions can be written as whole chunks")
            bounds.append((start, stop))
        else:
            bounds.append((int(sel), int(sel) + 1))
            dropped.append(axis)
    return bounds, tuple(dropped)


def _chunks_in(bounds: Sequence[tuple[int, int]], chunks: Sequence[int],
               shape: Sequence[int]) -> Any:
    """Every chunk a region touches: ``(coords, inside, cover, in_region, in_chunk)``.

    ``bounds`` is the region's ``(start, stop)`` per dim; ``inside`` the part of the
    chunk inside the array, ``cover`` the part the region covers (both ``(start,
    stop)`` per dim), ``in_region`` and ``in_chunk`` the slices of ``cover`` relative
    to the region and to the chunk.
    """
    grids = [range(lo // c, -(-hi // c)) for (lo, hi), c in zip(bounds, chunks, strict=True)]
    for index in np.ndindex(*(len(g) for g in grids)):
        coords = tuple(int(g[i]) for g, i in zip(grids, index, strict=True))
        origin = [k * c for k, c in zip(coords, chunks, strict=True)]
        inside = [(o, min(o + c, n)) for o, c, n in zip(origin, chunks, shape, strict=True)]
        cover = [(max(lo, a), min(hi, b)) for (lo, hi), (a, b) in zip(bounds, inside, strict=True)]
        in_region = tuple(slice(a - lo, b - lo)
                          for (a, b), (lo, _) in zip(cover, bounds, strict=True))
        in_chunk = tuple(slice(a - o, b - o) for (a, b), o in zip(cover, origin, strict=True))
        yield coords, inside, cover, in_region, in_chunk


class Padded:
    """An edge chunk: ``data`` at ``where`` in a chunk of ``shape`` holding ``fill`` elsewhere.

    Built by the job that stores it (in parallel, off the caller's thread); where the
    data is the start of the chunk's stored bytes and nothing compresses them (an
    activation chunk cut along ``sample``, stored sample-major), the fill is never
    materialised: :func:`encode_pieces` stores the data's bytes, then a shared run of
    fill bytes.
    """

    __slots__ = ("data", "where", "shape", "fill")

    def __init__(self, data: np.ndarray, where: tuple[slice, ...], shape: tuple[int, ...],
                 fill: Any) -> None:
        self.data, self.where, self.shape, self.fill = data, where, shape, fill

    def whole(self) -> np.ndarray:
        """The chunk as one array."""
        chunk = np.full(self.shape, self.fill, dtype=self.data.dtype)
        chunk[self.where] = self.data
        return chunk

    def stored_prefix(self, order: tuple[int, ...] | None) -> np.ndarray | None:
        """The data in stored order (axes permuted by ``order``), if its bytes are a
        prefix of the chunk's stored bytes (else None)."""
        order = order or tuple(range(len(self.shape)))
        where = [self.where[i] for i in order]
        shape = [self.shape[i] for i in order]
        if any(w.start != 0 for w in where):
            return None
        partial = [i for i, (w, n) in enumerate(zip(where, shape, strict=True)) if w.stop != n]
        # in C order: every axis after the last cut one whole, every axis before it one
        # element long
        if partial and any(w.stop != 1 for w in where[: partial[-1]]):
            return None
        return self.data.transpose(order)


_FILL_RUNS: dict[tuple[str, bytes], np.ndarray] = {}


def _fill_run(dtype: np.dtype, fill: Any, count: int) -> np.ndarray:
    """``count`` elements of ``fill`` (read-only, shared: one run per dtype and value)."""
    key = (dtype.str, np.asarray(fill, dtype=dtype).tobytes())
    run = _FILL_RUNS.get(key)
    if run is None or len(run) < count:
        run = np.full(count, fill, dtype=dtype)
        run.flags.writeable = False
        _FILL_RUNS[key] = run
    return run[:count]


class ChunkJob:
    """Encode and store one whole chunk (a job for :func:`run_jobs`).

    ``key`` names the chunk: of several jobs for one chunk in a step, only the last
    holds every region written to it (each completes the chunk from the one before,
    through the cache), so :func:`last_per_chunk` keeps only that one.
    """

    __slots__ = ("arr", "coords", "chunk")

    def __init__(self, arr: zarr.Array, coords: tuple[int, ...], chunk: np.ndarray) -> None:
        self.arr, self.coords, self.chunk = arr, coords, chunk

    @property
    def key(self) -> tuple[int, tuple[int, ...]]:
        return id(self.arr.async_array), self.coords

    @property
    def nbytes(self) -> int:
        """Bytes of the whole chunk (before encoding)."""
        chunk = self.chunk
        if isinstance(chunk, Padded):
            return math.prod(chunk.shape) * chunk.data.itemsize
        return chunk.nbytes

    @property
    def light(self) -> bool:
        """Whether :func:`run_jobs` runs this job on the caller's thread (see there)."""
        return _is_light(self.nbytes, self.arr.store)

    def __call__(self) -> None:
        _store_chunk(self.arr, self.coords, self.chunk)


def last_per_chunk(jobs: Sequence[Callable[[], None]]) -> list[Callable[[], None]]:
    """``jobs`` with only the last :class:`ChunkJob` of every chunk (order kept)."""
    last: dict[Any, int] = {}
    for i, job in enumerate(jobs):
        if isinstance(job, ChunkJob):
            last[job.key] = i
    return [job for i, job in enumerate(jobs)
            if not isinstance(job, ChunkJob) or last[job.key] == i]


class DirectWriter:
    """Writes regions of one array as whole chunks encoded here (see the module notes).

    Calling it with ``(region, block)`` prepares the chunks (completing partial ones
    from ``cache`` or, once, from the store) and returns one job per chunk; the jobs
    encode and store their chunk and are run by :func:`run_jobs`.

    Parameters
    ----------
    arr : zarr.Array
        The array (its store must support ``set_sync``: see :func:`direct_writes`).
    cache : ChunkCache, optional
        Chunks last written to ``arr``, used and updated to complete partial chunks.
    holds_data : callable, optional
        ``holds_data(bounds)`` tells whether the store may hold data that counts in the
        part ``bounds`` (``(start, stop)`` per dim) of a chunk; where it returns False
        (nothing committed there) a partial chunk missing from the cache is completed
        with the fill value instead of being read back.
    """

    def __init__(self, arr: zarr.Array, cache: ChunkCache | None,
                 holds_data: Callable[[list[tuple[int, int]]], bool] | None = None) -> None:
        self.arr = arr
        self.cache = cache
        self.holds_data = holds_data

    def __call__(self, region: Sequence[Any], block: np.ndarray) -> list[Callable[[], None]]:
        """Jobs writing ``block`` (the values of ``region``: slices or ints) as whole chunks."""
        arr, cache = self.arr, self.cache
        shape, chunks = arr.shape, arr.chunks
        bounds, dropped = _normalize(region, shape)
        block = np.asarray(block, dtype=arr.dtype)
        if dropped:
            block = np.expand_dims(block, dropped)
        fill = arr.metadata.fill_value
        jobs = []
        for coords, inside, cover, src, dst in _chunks_in(bounds, chunks, shape):
            whole = cover == inside
            if whole and all(b - a == c for (a, b), c in zip(inside, chunks, strict=True)):
                chunk = block[src]  # a view: made contiguous by the job, in parallel
            elif whole:  # an edge chunk: stored whole, padded with the fill value by the job
                chunk = Padded(block[src], dst, tuple(chunks), fill)
            else:
                cached = None if cache is None else cache.get(coords)
                if cached is not None:
                    chunk = cached.copy()
                else:  # not written by this writer yet: what the store holds, if it counts
                    chunk = np.full(chunks, fill, dtype=arr.dtype)
                    if self.holds_data is None or self.holds_data(inside):
                        sel = tuple(slice(a, b) for a, b in inside)
                        chunk[tuple(slice(0, b - a) for a, b in inside)] = np.asarray(arr[sel])
                chunk[dst] = block[src]
            if cache is not None:
                # a chunk written up to its end is done: later writes go to the next ones
                # (a whole chunk at once: no other run of the step touches it)
                if whole:
                    cache.drop(coords)
                else:
                    cache.put(coords, chunk, done=all(
                        b == ib for (_, b), (_, ib) in zip(cover, inside, strict=True)))
            jobs.append(ChunkJob(arr, coords, chunk))
        return jobs


# -- metadata ---------------------------------------------------------------------------
def direct_creates(store: Any, spec: Mapping[str, Any]) -> bool:
    """Whether :func:`create_arrays` can create an array of ``spec`` on ``store``."""
    if not _syncs(type(store)):
        return False
    dtype = spec.get("dtype", None)
    if dtype is None:
        dtype = np.asarray(spec["data"]).dtype
    try:
        return np.dtype(dtype).kind in "biuf"
    except TypeError:
        return False


@functools.lru_cache(maxsize=64)
def _zarr_dtype(dtype: str) -> Any:
    """zarr's data type of a numpy dtype string (cached: zarr matches it against a registry)."""
    from zarr.core.dtype import parse_dtype

    return parse_dtype(np.dtype(dtype), zarr_format=3)


def _metadata_bytes(metadata: Any) -> bytes:
    """The ``zarr.json`` of a Zarr v3 node's metadata: zarr's document, without indentation.

    zarr writes ``json.dumps(metadata.to_dict(), allow_nan=True, indent=2)``; the
    indentation alone makes Python use its pure-Python encoder instead of the C one
    (measured 3.6 times slower for one array's document, 6.4 times for a consolidated
    one of 68 kB). Readers parse the same document.
    """
    if metadata.zarr_format != 3:
        return metadata.to_buffer_dict(default_buffer_prototype())["zarr.json"].to_bytes()
    return json.dumps(metadata.to_dict(), allow_nan=True).encode()


#: Array metadata built by :func:`create_arrays`, with its ``zarr.json``, by spec: the
#: layers of a recording repeat the same arrays (the per-sample columns of every layer,
#: the neuron columns of layers of one width), and zarr's building and serialising of
#: one array's metadata took about 0.1 ms (a 15-layer ResNet-18: 150 arrays). The
#: metadata is a frozen dataclass; each array gets a shallow copy with its own
#: ``attributes`` dict, which zarr's ``update_attributes`` changes in place.
_METADATA: dict[tuple, tuple[Any, bytes]] = {}
_METADATA_ENTRIES = 256


def _with_own_attributes(metadata: Any, attributes: dict[str, Any]) -> Any:
    """A shallow copy of shared (frozen) array metadata holding ``attributes``, a dict
    of its own: zarr's ``update_attributes`` changes an array's attributes in place."""
    metadata = copy.copy(metadata)
    object.__setattr__(metadata, "attributes", attributes)
    return metadata


def _metadata_key(shape: tuple[int, ...], dtype: np.dtype,
                  spec: Mapping[str, Any]) -> tuple | None:
    """What decides an array's metadata in a :func:`create_arrays` spec (not its data,
    name or ``config``), or None where some part cannot be compared by value."""
    fill = spec.get("fill_value")
    try:
        key = (shape, dtype.str, tuple(spec.get("chunks", shape)),
               # NaN != NaN: fills are compared by their bytes, with their type
               None if fill is None else (type(fill).__name__,
                                          np.asarray(fill, dtype=dtype).tobytes()),
               tuple(spec.get("filters", ())), tuple(spec.get("compressors", ()) or ()),
               None if spec.get("dimension_names") is None
               else tuple(spec["dimension_names"]),
               json.dumps(spec.get("chunk_key_encoding"), sort_keys=True),
               json.dumps(spec.get("attributes", {}), allow_nan=True))
        hash(key)
    except (TypeError, ValueError, OverflowError):
        return None
    return key


def array_metadata(*, shape: tuple[int, ...], dtype: Any, chunk_shape: tuple[int, ...],
                   codecs: Sequence[Any], dimension_names: Sequence[str] | None = None,
                   chunk_key_encoding: Mapping[str, Any] | None = None,
                   attributes: Mapping[str, Any] | None = None,
                   fill_value: Any = None) -> Any:
    """The ``ArrayV3Metadata`` that ``zarr.create_array`` builds for these arguments.

    Built from the fields of the Zarr v3 specification (a ``regular`` chunk grid given
    as its JSON), with zarr's defaults: the ``default`` chunk key encoding with ``/``
    and the data type's default fill value. zarr's own helper for this,
    ``AsyncArray._create_metadata_v3``, is private and changed its arguments in zarr
    3.2 (``chunk_shape`` became ``chunk_grid``); the class's constructor takes the
    same arguments from zarr 3.1 to 3.4.
    """
    from zarr.core.metadata.v3 import ArrayV3Metadata

    return ArrayV3Metadata(
        shape=tuple(shape), data_type=dtype,
        chunk_grid={"name": "regular", "configuration": {"chunk_shape": list(chunk_shape)}},
        chunk_key_encoding=(dict(chunk_key_encoding) if chunk_key_encoding is not None
                            else {"name": "default", "separator": "/"}),
        fill_value=dtype.default_scalar() if fill_value is None else fill_value,
        codecs=tuple(codecs),
        dimension_names=tuple(dimension_names) if dimension_names else None,
        attributes=dict(attributes or {}))


def create_arrays(group: zarr.Group, specs: Mapping[str, Mapping[str, Any]],
                  jobs_out: list[Callable[[], None]] | None = None) -> dict[str, zarr.Array]:
    """Create numeric arrays in ``group`` (new names only) from ``create_array`` arguments.

    zarr builds each array's metadata (so its ``zarr.json`` is exactly what
    ``create_array`` would write); the files are written in parallel and the arrays
    opened from memory, with their ``config``. ``data``, where given, is then written
    as whole chunks. Supported keys: ``shape``/``data``, ``chunks``, ``dtype``,
    ``fill_value``, ``filters`` (array-to-array codecs), ``compressors``,
    ``chunk_key_encoding``, ``dimension_names``, ``attributes``, ``config``.

    With ``jobs_out``, nothing is written: the jobs that write the metadata and the
    data (in any order, see :func:`run_jobs`) are appended to it instead.
    """
    from zarr.codecs import BytesCodec
    from zarr.core.array import AsyncArray
    from zarr.storage import StorePath

    arrays: dict[str, zarr.Array] = {}
    jobs: list[Callable[[], None]] = []
    data_of: dict[str, np.ndarray] = {}
    for name, spec in specs.items():
        data = spec.get("data")
        if data is not None:
            data = np.asarray(data)
            data_of[name] = data
        shape = tuple(spec["shape"]) if "shape" in spec else data.shape
        dtype = np.dtype(spec["dtype"] if "dtype" in spec else data.dtype)
        kwargs = {} if spec.get("fill_value") is None else {"fill_value": spec["fill_value"]}
        key = _metadata_key(shape, dtype, spec)
        known = _METADATA.get(key) if key is not None else None
        if known is None:
            serializer = BytesCodec(endian=None) if dtype.itemsize == 1 else BytesCodec()
            metadata = array_metadata(
                shape=shape, dtype=_zarr_dtype(dtype.str),
                chunk_shape=tuple(spec.get("chunks", shape)),
                codecs=[*spec.get("filters", ()), serializer, *spec.get("compressors", ())],
                dimension_names=spec.get("dimension_names"),
                chunk_key_encoding=spec.get("chunk_key_encoding"),
                attributes=dict(spec.get("attributes", {})), **kwargs)
            known = metadata, _metadata_bytes(metadata)
            if key is not None:
                if len(_METADATA) >= _METADATA_ENTRIES:
                    _METADATA.clear()
                _METADATA[key] = known
        metadata, document = known
        metadata = _with_own_attributes(metadata, dict(metadata.attributes))
        path = store_key(group.path, name)
        jobs.append(light_job(functools.partial(
            put_pieces, group.store, store_key(path, "zarr.json"), [document]),
            len(document), group.store))
        arrays[name] = zarr.Array(AsyncArray(metadata=metadata,
                                             store_path=StorePath(group.store, path),
                                             config=spec.get("config")))
    writes = [job for name, data in data_of.items() if data.size
              for job in DirectWriter(arrays[name], None)(
                  tuple(slice(None) for _ in data.shape), data)]
    if jobs_out is not None:
        jobs_out.extend(jobs + writes)
        return arrays
    run_jobs(jobs)
    run_jobs(writes)
    return arrays


def create_group(parent: zarr.Group, name: str, attributes: Mapping[str, Any],
                 jobs_out: list[Callable[[], None]] | None = None) -> zarr.Group:
    """``parent.create_group(name, attributes=...)``, written directly on a local store.

    zarr's local store gets the group's ``zarr.json`` (built by zarr) in one atomic
    write, without a trip through zarr's event loop; a name already taken is refused
    as zarr refuses it. Other stores go through zarr. With ``jobs_out`` (a local store
    only), the write is appended to it as a job instead of being made.
    """
    from zarr.core.group import AsyncGroup, GroupMetadata
    from zarr.errors import ContainsGroupError
    from zarr.storage import StorePath

    store = parent.store
    if not _zarr_local(store):
        return parent.create_group(name, attributes=dict(attributes))
    path = store_key(parent.path, name)
    if (store.root / path / "zarr.json").exists():
        raise ContainsGroupError(f"a node already exists at {path!r}")
    metadata = GroupMetadata(attributes=dict(attributes))
    document = _metadata_bytes(metadata)
    write = light_job(functools.partial(put_pieces, store, store_key(path, "zarr.json"),
                                        [document]), len(document), store)
    if jobs_out is None:
        write()
    else:
        jobs_out.append(write)
    return zarr.Group(AsyncGroup(metadata, StorePath(store, path)))


def update_group_attributes(group: zarr.Group, attributes: Mapping[str, Any],
                            jobs_out: list[Callable[[], None]] | None = None) -> None:
    """``group.update_attributes(attributes)``, written directly on a local store.

    With ``jobs_out`` (a local store only), the write is appended to it as a job
    instead of being made (the group object has the new attributes at once).
    """
    if not _zarr_local(group.store):
        group.update_attributes(dict(attributes))
        return
    async_group = group._async_group
    metadata = dataclasses.replace(async_group.metadata,
                                   attributes={**async_group.metadata.attributes, **attributes})
    document = _metadata_bytes(metadata)
    write = light_job(functools.partial(put_pieces, group.store,
                                        store_key(group.path, "zarr.json"), [document]),
                      len(document), group.store)
    if jobs_out is None:
        write()
    else:
        jobs_out.append(write)
    object.__setattr__(async_group, "metadata", metadata)


def defers_creation(store: Any) -> bool:
    """Whether nodes on ``store`` can be created by deferred jobs (see ``jobs_out``)."""
    return _zarr_local(store)


def consolidate(store: Any) -> None:
    """``zarr.consolidate_metadata(store)``, read and written directly on a local store.

    zarr's own function opens every node of the hierarchy through its event loop and
    parses its metadata (tens of milliseconds for a few layers); on zarr's local store
    the ``zarr.json`` files are read here (not descending into arrays' chunk folders)
    and nested into the root's document as zarr nests them (an array's document as it
    is, a group's with an empty inline ``consolidated_metadata``), written in one
    atomic replacement: the document zarr writes
    (``tests/test_datapath.py::test_direct_consolidation_writes_what_zarr_writes``).
    Other stores, and hierarchies with anything but Zarr v3 arrays and groups, go
    through zarr.
    """

    def through_zarr() -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # consolidation is not in the v3 spec: known
            zarr.consolidate_metadata(store)

    if not _zarr_local(store):
        through_zarr()
        return
    root = os.fspath(store.root)
    groups: dict[str, Any] = {}
    arrays: dict[str, Any] = {}
    root_doc: dict[str, Any] | None = None
    parsed: dict[bytes, Any] = {}  # equal documents (every layer's "sample"...) parsed once
    # Depth first, sorted like os.walk here: a node's zarr.json is read, and only a
    # group's folder is listed (an array's folder holds its chunk files, possibly
    # thousands: listing it would cost more than the rest together). Plain strings,
    # not pathlib: a store has hundreds of nodes.
    folders = [(root, ".")]
    while folders:
        folder, key = folders.pop()
        try:
            with open(os.path.join(folder, "zarr.json"), "rb") as f:
                raw = f.read()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            continue  # not a node (zarr lists nothing below it either)
        doc = parsed.get(raw)
        if doc is None:
            doc = json.loads(raw)
            if isinstance(doc, dict) and doc.get("node_type") == "array":
                parsed[raw] = doc  # nested as it is: one object may serve many arrays
        kind = doc.get("node_type") if isinstance(doc, dict) else None
        if kind not in ("array", "group") or doc.get("zarr_format") != 3:
            through_zarr()
            return
        doc.pop("consolidated_metadata", None)
        if key == ".":
            root_doc = doc
        elif kind == "array":
            arrays[key] = doc
            continue
        else:
            groups[key] = {**doc, "consolidated_metadata": dict(_EMPTY_INLINE, metadata={})}
        with os.scandir(folder) as entries:
            children = sorted(e.name for e in entries if e.is_dir())
        folders.extend((os.path.join(folder, name), name if key == "." else f"{key}/{name}")
                       for name in reversed(children))
    if root_doc is None or root_doc["node_type"] != "group":
        through_zarr()
        return
    # in zarr's own order, by depth, then by path: zarr (3.1) rebuilds the tree from this
    # order, and with a layout group listed right after its layer (os.walk's order), a
    # second layer's layouts made it list that layer twice and lose the first's:
    # plain xarray.open_datatree failed on any store with layouts on two layers
    nodes = {**groups, **arrays}
    root_doc["consolidated_metadata"] = dict(_EMPTY_INLINE, metadata={
        key: nodes[key] for key in sorted(nodes, key=lambda k: (k.count("/"), k))})
    put_pieces(store, "zarr.json", [json.dumps(root_doc, allow_nan=True).encode()])


_EMPTY_INLINE = {"kind": "inline", "must_understand": False}


#: Array metadata read by :func:`local_members`, by the bytes of its ``zarr.json``: the
#: layers of a store repeat the same arrays (a 15-layer ResNet-18 store: 148 array
#: documents, 18 distinct), and zarr's building of one array's metadata from its
#: document took about 0.09 ms, two thirds of reading a layer's members. Each array
#: gets a shallow copy with the ``attributes`` of its own parsed document (zarr's
#: ``update_attributes`` changes them in place); everything else in the frozen
#: metadata is immutable.
_READ_METADATA: dict[bytes, Any] = {}


def _read_metadata(raw: bytes, doc: dict[str, Any], build: Callable[[dict], Any]) -> Any:
    """``build(doc)`` (zarr's ``_build_metadata_v3``), from :data:`_READ_METADATA` for an
    array document read before."""
    if doc.get("node_type") != "array":
        return build(doc)
    known = _READ_METADATA.get(raw)
    if known is None:
        known = build(json.loads(raw))  # built from its own copy: ``doc`` stays unshared
        if len(_READ_METADATA) >= _METADATA_ENTRIES:
            _READ_METADATA.clear()
        _READ_METADATA[raw] = known
    return _with_own_attributes(known, doc.get("attributes", {}))


def local_members(group: zarr.Group) -> dict[str, zarr.Array | zarr.Group] | None:
    """``dict(group.members())``, read here on zarr's local store; None elsewhere.

    Each child folder's ``zarr.json`` is read and turned into a node by zarr's own
    builders (``_build_metadata_v3``, ``_build_node``), without a trip through zarr's
    event loop: a third of the time for a layer of ten arrays. Folders whose name starts
    with a dot are no nodes (as everywhere in topoxr). None, so that the caller asks
    zarr, for another store or anything unexpected: a child folder without a readable
    Zarr v3 ``zarr.json`` (zarr skips it with a warning, topoxr's checks name it), or a
    folder changing under a running writer.
    """
    try:  # zarr's private builders: where a zarr version lacks them, zarr answers
        from zarr.core.group import _build_metadata_v3, _build_node
    except ImportError:
        return None
    store = group.store
    if not isinstance(store, zarr.storage.LocalStore):
        return None
    base = os.path.join(store.root, group.path)
    out: dict[str, zarr.Array | zarr.Group] = {}
    try:
        with os.scandir(base) as entries:
            names = sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))
        for name in names:
            with open(os.path.join(base, name, "zarr.json"), "rb") as f:
                raw = f.read()
            doc = json.loads(raw)
            if not isinstance(doc, dict) or doc.get("zarr_format") != 3:
                return None
            node = _build_node(store=store, path=store_key(group.path, name),
                               metadata=_read_metadata(raw, doc, _build_metadata_v3))
            out[name] = zarr.Group(node) if isinstance(node, zarr.AsyncGroup) else zarr.Array(node)
    except Exception:  # missing or damaged metadata, a race with a writer: zarr answers
        return None
    return out


def read_group_attributes(store: Any, path: str) -> dict[str, Any]:
    """The attributes of the group at ``path`` as the store holds them now (not a
    cached ``zarr.Group``'s); ``FileNotFoundError`` where there is no such group.

    A local store's ``zarr.json`` is read directly (about 20 us); other stores through
    zarr.
    """
    if _zarr_local(store):
        with open(os.path.join(store.root, store_key(path, "zarr.json")), "rb") as f:
            return dict(json.loads(f.read()).get("attributes", {}))
    # zarr's GroupNotFoundError is a FileNotFoundError
    return zarr.open_group(store, path=path, mode="r", use_consolidated=False).attrs.asdict()


def group_members(group: zarr.Group) -> dict[str, zarr.Array | zarr.Group]:
    """``dict(group.members())``: by :func:`local_members` where it can, else by zarr."""
    members = local_members(group)
    return dict(group.members()) if members is None else members


class DirectResize:
    """Resizes an array by writing its new ``zarr.json`` here (see :func:`region_writer`).

    Calling it with ``(shape,)`` returns one job; the job replaces the metadata file
    atomically and then updates the array object, as zarr's ``resize`` does, but
    without a trip through zarr's event loop. Chunks outside the new shape are kept
    (the writer's arrays only grow, or are trimmed to data that was never committed).
    """

    def __init__(self, arr: zarr.Array) -> None:
        self.arr = arr

    def __call__(self, shape: tuple[int, ...], delete_outside_chunks: bool = False
                 ) -> list[Callable[[], None]]:
        def job() -> None:
            async_array = self.arr.async_array
            metadata = async_array.metadata.update_shape(tuple(shape))
            put_pieces(self.arr.store, store_key(self.arr.path, "zarr.json"),
                       [_metadata_bytes(metadata)])
            set_array_metadata(async_array, metadata)

        return [light_job(job, 0, self.arr.store)]


def set_array_metadata(async_array: Any, metadata: Any) -> None:
    """Give ``async_array`` (a frozen dataclass) new metadata, as zarr's own resize does.

    zarr 3.2 and later also keep the chunk grid the metadata implies
    (``_chunk_grid``), which its indexing reads: it is rebuilt with the metadata.
    """
    object.__setattr__(async_array, "metadata", metadata)
    if hasattr(async_array, "_chunk_grid"):
        from zarr.core.chunk_grids import ChunkGrid

        object.__setattr__(async_array, "_chunk_grid", ChunkGrid.from_metadata(metadata))


def resizer(arr: zarr.Array) -> Any:
    """A :class:`DirectResize` where the store writes synchronously, else zarr's ``resize``."""
    if _syncs(type(arr.store)) and arr.metadata.zarr_format == 3:
        return DirectResize(arr)
    return arr.async_array.resize


_POOL: list[ThreadPoolExecutor] = []


#: Jobs of fewer bytes than this (small chunks, metadata files) on a store whose writes
#: return at once run on the caller's thread, one after the other (see run_jobs).
LIGHT_JOB_BYTES = 1 << 20


def _quick_writes(store: Any) -> bool:
    """Whether a write to ``store`` returns at once: zarr's local store (the page cache,
    no ``fsync``, see :func:`_zarr_local`) or its memory store."""
    return _zarr_local(store) or type(store) is zarr.storage.MemoryStore


def _is_light(nbytes: int, store: Any) -> bool:
    """Whether a job writing ``nbytes`` bytes to ``store`` is light (see run_jobs)."""
    return nbytes < LIGHT_JOB_BYTES and _quick_writes(store)


def light_job(job: Callable[[], None], nbytes: int, store: Any) -> Callable[[], None]:
    """``job`` (a function or :func:`functools.partial`) writing ``nbytes`` bytes to
    ``store``, marked for :func:`run_jobs` as light where it is (its ``light``
    attribute); returned for chaining."""
    job.light = _is_light(nbytes, store)  # type: ignore[attr-defined]
    return job


def run_jobs(jobs: Sequence[Callable[[], None]]) -> None:
    """Run chunk jobs, the heavy ones in parallel (codecs release the GIL); raise the
    first error.

    The caller and the pool's threads each take the next job from one shared queue
    until none is left: one task per thread, not one per job (a future per chunk cost
    more than writing a small chunk). Light jobs (a true ``light`` attribute: fewer
    than :data:`LIGHT_JOB_BYTES` bytes to a store whose writes return at once, see
    :func:`light_job` and :class:`ChunkJob`) run on the caller's thread only, while the
    pool takes the others: they are mostly Python (a few system calls and a small
    checksum each), at which threads would only take turns, holding the GIL in turn
    (a ResNet-18 recording's writes replayed, 15 layers and about 340 small files:
    44 against 62 ms on tmpfs with the pool's two threads taking every job; on a disk
    slowed by deletions no difference). Writes that wait for the disk (``fsync``) are
    never light. Every job has finished, successfully or not, when this returns or
    raises: nothing may still be writing when the caller hears of a failure.
    """
    if not jobs:
        return
    errors: list[BaseException] = []

    def drain(source: Any) -> None:
        for job in source:
            try:
                job()
            except BaseException as err:  # the others still run to their end
                errors.append(err)

    marks = [bool(getattr(job, "light", False)) for job in jobs]  # each asked once
    light = [job for job, mark in zip(jobs, marks, strict=True) if mark]
    heavy = [job for job, mark in zip(jobs, marks, strict=True) if not mark] if light else jobs
    futures = []
    pending = iter(heavy)  # next() on a list iterator is atomic: each job runs once
    # helpers for the heavy jobs: all of them while the caller runs the light ones
    helpers = len(heavy) - (0 if light else 1)
    if helpers > 0:
        if not _POOL:
            _POOL.append(ThreadPoolExecutor(max_workers=max(2, min(8, os.cpu_count() or 2)),
                                            thread_name_prefix="topoxr-encode"))
        futures = [_POOL[0].submit(drain, pending)
                   for _ in range(min(helpers, _POOL[0]._max_workers))]
    drain(light)
    drain(pending)
    for future in futures:
        future.result()
    if errors:
        raise errors[0]


def settle_zarr_io(timeout: float = 30.0) -> None:
    """Wait for the tasks running on zarr's event loop to end (after a storage failure).

    One zarr call gathers several writes (the chunks of a ``setitem``, an array's
    metadata and its parents') and raises the first failure without waiting for the
    others, which go on writing. Called before a failure is reported, so that nothing
    of a failed writer still writes when its caller hears of it (and, say, opens a new
    writer that a late write would then overwrite). The tasks running at the call are
    waited for, those of other threads' zarr calls too; after ``timeout`` seconds a
    warning is logged and the failure is reported anyway.
    """
    import asyncio

    from zarr.core.sync import sync

    async def settle() -> int:
        me = asyncio.current_task()
        running = [t for t in asyncio.all_tasks() if t is not me and not t.done()]
        if not running:
            return 0
        _, left = await asyncio.wait(running, timeout=timeout)
        return len(left)

    try:
        left = sync(settle())
    except Exception as err:  # the failure being reported matters more
        logger.warning("could not wait for zarr's tasks after a storage failure: %s", err)
        return
    if left:
        logger.warning("%d zarr tasks still running %.0f s after a storage failure", left,
                       timeout)


def region_writer(arr: zarr.Array, cache: ChunkCache | None,
                  holds_data: Callable[[list[tuple[int, int]]], bool] | None = None) -> Any:
    """A :class:`DirectWriter` where possible, else zarr's async ``setitem``."""
    if direct_writes(arr):
        return DirectWriter(arr, cache, holds_data)
    return arr.async_array.setitem


# -- reading ----------------------------------------------------------------------------------
def zarrs_available() -> bool:
    """Whether the ``zarrs`` codec pipeline is installed (and not turned off).

    The environment variable ``TOPOXR_ZARRS=0`` turns it off: every read then goes
    through zarr-python's own pipeline.
    """
    if os.environ.get("TOPOXR_ZARRS", "1") == "0":
        return False
    try:
        import zarrs  # noqa: F401
    except ImportError:
        return False
    return True


def read_array(arr: zarr.Array) -> zarr.Array:
    """``arr`` reading through the ``zarrs`` codec pipeline where it can, else as it is.

    Only reads use it: ``zarrs`` writes chunk files in place, while the writer's crash
    safety rests on zarr-python's atomic replacement of every chunk.
    """
    if not zarrs_available() or not _syncs(type(arr.store)):
        return arr
    from zarrs import ZarrsCodecPipeline

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an unsupported array falls back, with a warning
        try:
            pipeline = ZarrsCodecPipeline.from_array_metadata_and_store(
                array_metadata=arr.metadata, store=arr.store)
        except Exception as err:  # unsupported store or metadata: zarr's own pipeline
            logger.debug("zarrs cannot read %s (%s); using zarr-python", arr.path, err)
            return arr
    if pipeline.impl is None:
        return arr
    fast = copy.copy(arr.async_array)
    object.__setattr__(fast, "codec_pipeline", pipeline)  # a frozen dataclass
    return zarr.Array(fast)


def direct_reads(arr: zarr.Array) -> bool:
    """Whether :func:`read_region` can read ``arr``'s chunk files itself.

    For zarr's local store and arrays stored as ``bytes`` (this machine's byte order),
    optionally after a ``transpose``, followed by ``crc32c``: the activation arrays of
    this version's default.
    """
    return (arr.metadata.zarr_format == 3 and _zarr_local(arr.store)
            and _plain_chain(tuple(arr.metadata.codecs)) == ()
            and np.dtype(arr.dtype).kind in "biuf")


def read_region(arr: zarr.Array, region: Sequence[slice]) -> np.ndarray:
    """``arr[region]`` (slices of step 1), reading and checking chunk files directly.

    Each chunk file is read whole, its crc32c compared with the stored one, and its
    part of ``region`` copied into the result, the chunks in parallel. A missing chunk
    reads as the fill value, as zarr reads it. The result is laid out in memory in the
    order the chunks are stored (:func:`chunk_order`: sample-major for activations), so
    that each chunk lands in one contiguous run, and is returned as a view in the
    array's dimension order. Arrays that
    :func:`direct_reads` does not accept are read by zarr. A chunk that fails its
    checksum or has the wrong size raises :class:`ValueError` naming it (the reader
    then asks zarr which chunks are damaged, see ``Context.unreadable``).
    """
    if not direct_reads(arr):
        return np.asarray(arr[tuple(region)])
    bounds, _ = _normalize(tuple(region), arr.shape)
    chunks = arr.chunks
    dtype = np.dtype(arr.dtype)
    order = chunk_order(arr) or tuple(range(arr.ndim))
    stored_chunk = tuple(chunks[i] for i in order)
    shape = tuple(hi - lo for lo, hi in bounds)
    stored = np.empty(tuple(shape[i] for i in order), dtype=dtype)
    root = arr.store.root
    nbytes = math.prod(chunks) * dtype.itemsize
    fill = arr.metadata.fill_value

    def job(coords: tuple[int, ...], dst: tuple[slice, ...], src: tuple[slice, ...]) -> None:
        key = store_key(arr.path, arr.metadata.encode_chunk_key(coords))
        target = stored[tuple(dst[i] for i in order)]
        try:
            # read whole, then copied: reading straight into the result (readinto) was
            # measured slower here (13.5 against 9.4 ms per 32 MiB block)
            with open(root / key, "rb", buffering=0) as f:
                raw = f.read()
        except FileNotFoundError:
            target[...] = fill
            return
        data = np.frombuffer(raw, dtype=np.uint8)
        if len(raw) != nbytes + 4 or crc32c_bytes(data[:-4]) != raw[-4:]:
            raise ValueError(f"chunk {key!r} fails its crc32c checksum or has the wrong size")
        target[...] = data[:-4].view(dtype).reshape(stored_chunk)[tuple(src[i] for i in order)]

    run_jobs([functools.partial(job, coords, in_region, in_chunk)
              for coords, _, _, in_region, in_chunk in _chunks_in(bounds, chunks, arr.shape)])
    return stored.transpose(tuple(int(i) for i in np.argsort(order)))


def _decodes_here(arr: zarr.Array) -> bool:
    """Whether :func:`read_selection` decodes ``arr`` itself: numbers or booleans in a
    Zarr v3 array on zarr's local store, every codec one of zarr's own that decode
    synchronously (no sharding, no strings; a zarr without ``_decode_sync`` reads them
    itself)."""
    from zarr.codecs import (
        BloscCodec,
        BytesCodec,
        Crc32cCodec,
        GzipCodec,
        TransposeCodec,
        ZstdCodec,
    )

    own = (BloscCodec, BytesCodec, Crc32cCodec, GzipCodec, TransposeCodec, ZstdCodec)
    return (arr.metadata.zarr_format == 3 and _zarr_local(arr.store) and arr.ndim > 0
            and np.dtype(arr.dtype).kind in "biuf"
            and all(type(codec) in own and hasattr(codec, "_decode_sync")
                    for codec in arr.metadata.codecs))


def _as_slices(selection: Any, ndim: int) -> tuple[slice, ...] | None:
    """``selection`` as one slice of step 1 per dim, or None if it is no such region."""
    if selection is Ellipsis:
        return tuple(slice(None) for _ in range(ndim))
    parts = selection if isinstance(selection, tuple) else (selection,)
    if len(parts) > ndim or not all(isinstance(p, slice) and p.step in (None, 1)
                                    for p in parts):
        return None
    return tuple(parts) + tuple(slice(None) for _ in range(ndim - len(parts)))


def _decode_chunk(arr: zarr.Array, coords: tuple[int, ...], raw: bytes) -> np.ndarray:
    """One stored chunk decoded by the array's codecs, last to first, as zarr's pipeline
    decodes it (each codec gets the chunk spec it encoded with)."""
    prototype, chain = _codec_chain(arr, coords)
    data: Any = prototype.buffer.from_bytes(raw)
    for codec, spec in reversed(chain):
        data = codec._decode_sync(data, spec)
    return data.as_numpy_array()


def reads_here(arr: zarr.Array, selection: Any = Ellipsis) -> bool:
    """Whether :func:`read_selection` reads ``arr[selection]`` without zarr's event loop."""
    return _as_slices(selection, arr.ndim) is not None and _decodes_here(arr)


def read_selection(arr: zarr.Array, selection: Any = Ellipsis) -> np.ndarray:
    """``np.asarray(arr[selection])``, decoded here where zarr's event loop is not needed.

    For the arrays :func:`_decodes_here` accepts and a selection of slices of step 1 (or
    ``...``), each chunk file the selection touches is read and decoded with the
    array's own codecs (a checksum that does not match raises, as in zarr), and a
    missing chunk reads as the fill value, as zarr reads it. One read through zarr
    waits for its event loop (about 0.5 ms on a local store): most of reading a layer's
    small coordinates. Other arrays and selections are read by zarr.
    """
    region = _as_slices(selection, arr.ndim)
    if region is None or not _decodes_here(arr):
        return np.asarray(arr[selection])
    bounds, _ = _normalize(region, arr.shape)
    bounds = [(lo, max(lo, hi)) for lo, hi in bounds]  # a reversed slice selects nothing
    out = np.empty(tuple(hi - lo for lo, hi in bounds), dtype=np.dtype(arr.dtype))
    if out.size == 0:
        return out
    root = arr.store.root
    for coords, _, _, in_region, in_chunk in _chunks_in(bounds, arr.chunks, arr.shape):
        key = store_key(arr.path, arr.metadata.encode_chunk_key(coords))
        try:
            with open(root / key, "rb", buffering=0) as f:
                raw = f.read()
        except FileNotFoundError:
            out[in_region] = arr.metadata.fill_value
            continue
        out[in_region] = _decode_chunk(arr, coords, raw)[in_chunk]
    return out


def read_blocks(chunks: tuple[int, ...], shape: tuple[int, ...], itemsize: int,
                dims: tuple[str, ...], grow: Sequence[str],
                target: int = READ_BLOCK_BYTES) -> tuple[int, ...]:
    """Dask block shape: whole zarr ``chunks``, multiplied along ``grow`` dims to ``target``.

    The dims of ``grow`` are widened in order (each up to the whole array) until a block
    holds about ``target`` bytes.
    """
    block = list(chunks)
    for dim in grow:
        axis = dims.index(dim)
        size = math.prod(block) * itemsize
        if size >= target:
            break
        times = max(1, target // size)
        block[axis] = min(block[axis] * times, max(shape[axis], chunks[axis]))
    return tuple(block)
