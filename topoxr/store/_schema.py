"""The layout of a layer in the store: array names, chunks, fill values, attributes.

Also the rules that read it back: the logical lengths the arrays agree on, the arrays a
layer must have, and how values are turned into numpy.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, TransposeCodec, ZstdCodec

from topoxr._chunkio import read_selection, reads_here
from topoxr.conventions import (
    ACTIVATION,
    ATTR_LAYER,
    COMMITTED,
    CORRECT,
    EPOCH,
    EPOCH_COMPLETE,
    LABEL,
    NEURON,
    PREDICTION,
    SAMPLE,
)
from topoxr.store._chunks import _run_in_order
from topoxr.store._errors import StoreCorruptionError, StoreError

logger = logging.getLogger(__name__)


#: Largest number of samples per chunk of the ``committed`` mask.  The mask chunk is a
#: multiple of the first batch size near ``_MASK_TARGET``, so batches of one size never
#: straddle two mask chunks and each becomes visible in a single atomic chunk write.
MASK_CHUNK = 1 << 20
#: Target samples per chunk of the mask, ``prediction`` and ``correct`` (1 << 14 before
#: commits were buffered: each batch rewrote its chunks; a commit now covers many
#: batches, and fewer, larger chunks mean fewer files per commit).
_MASK_TARGET = 1 << 15
_COORD_CHUNK = 1 << 16
#: Chunk of the arrays along ``epoch`` (written once per epoch, so kept small)
_EPOCH_CHUNK = 1 << 10
#: Fill value of the ``sample`` coordinate: a slot that was grown but not yet filled.
#: It is not a valid sample id, so readers and resume can tell such slots apart.
SAMPLE_FILL = int(np.iinfo(np.int64).min)
_EPOCH_FILL = -1
#: Every chunk is stored, even one that holds only the fill value, so that a chunk
#: missing from the store always means damage (readers and ``verify`` check that).
_ACTIVATION_CONFIG = {"write_empty_chunks": True}
_ARRAY_CONFIG = _ACTIVATION_CONFIG
#: The checksum codec closing every array's codec chain: the last 4 bytes of each stored
#: chunk are the crc32c of the rest, checked by zarr on every read.
CHECKSUM = Crc32cCodec()
#: Compressors of a checked array: zarr's default zstd (level 0, no zstd checksum), then
#: the crc32c of the compressed bytes.
_COMPRESSORS = (ZstdCodec(level=0, checksum=False), CHECKSUM)
#: How ``activation`` chunks ``(neuron, sample, epoch)`` are laid out in their files:
#: zarr's ``transpose`` codec, order ``(2, 1, 0)``, stores them sample-major, as the
#: ``(sample, neuron)`` batches arrive (no transpose when writing; readers lay blocks
#: out the same way, see ``topoxr._chunkio.read_region``). Any zarr reader applies it.
SAMPLE_MAJOR = TransposeCodec(order=(2, 1, 0))
#: Chunk keys of new arrays: zarr's default encoding with ``.`` as separator
#: (``c.0.3.1``): every chunk file of an array sits in the array's folder, so a new
#: chunk row or epoch creates no folders (on the machines measured, creating a folder
#: cost as much as writing a chunk of a small layer). Any zarr reader follows it.
CHUNK_KEYS = {"name": "default", "separator": "."}
_TARGET_CHUNK_BYTES = 4 << 20
_MAX_CHUNK_BYTES = 16 << 20
_ATTR_READY = "topoxr_ready"
_ATTR_REDUCE = "topoxr_reduce"
_ATTR_UNIT_COORDS = "topoxr_unit_coords"
_ATTR_METADATA = "topoxr_metadata"
_ATTR_SCALARS = "topoxr_epoch_scalars"
#: A token of the layer's values: new when a writer creates the layer, and replaced
#: before a writer overwrites committed values (``overwrite=True``), so that a view
#: opened before can tell (see ``reader._CheckedActivation``). Layers written by
#: earlier versions have none until one is overwritten.
_ATTR_GENERATION = "topoxr_generation"
#: Names a caller of ``ActivationWriter.write`` may give for its own arguments (the
#: recorders take ``labels=`` and ``sample_ids=``): the argument each stands for.
_WRITE_ARGUMENTS = {"labels": "label", "predictions": "prediction", "sample_ids": "sample",
                    "samples": "sample", "epochs": "epoch"}
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
    # names of the NAPs' own coordinates (topoxr.grouping.naps): a column of that name
    # could not be grouped by
    "count",
    # the recorders' names of what ActivationWriter.write takes as label=, prediction=,
    # sample=, epoch=: passed to write, they became metadata columns without a word
    *_WRITE_ARGUMENTS,
}


def epoch_scalar_values(scalars: Mapping[str, Any], error: type[Exception]) -> dict[str, float]:
    """``scalars`` as floats, checked as :meth:`ActivationWriter.log_epoch` stores them.

    Raises
    ------
    error
        If a name is reserved or not an identifier, or a value is not a real number.
    """
    values: dict[str, float] = {}
    for key, value in scalars.items():
        if not valid_column_name(key):
            raise error(f"{key!r} cannot be an epoch scalar name{column_name_hint(key)}")
        # a number, or anything holding one number that float() takes (a 0-d or
        # one-element array or tensor: a training loop's loss); not a bool or a string
        try:
            number = None if isinstance(value, bool | np.bool_ | str | bytes) else float(value)
        except (TypeError, ValueError):
            number = None
        if number is None:
            raise error(f"epoch scalar {key!r} must be a real number, got {value!r}")
        values[key] = number
    return values


def column_name_hint(key: str) -> str:
    """Why ``key`` is refused as a column name, where it is a known slip: the recorders
    take ``labels=``/``sample_ids=``, ``ActivationWriter.write`` takes ``label=``/``sample=``."""
    if key in _WRITE_ARGUMENTS:
        return (f": ActivationWriter.write takes {_WRITE_ARGUMENTS[key]}=, not {key}= (the "
                "recorders' name; it stores every other keyword as a metadata column)")
    return ""


def valid_column_name(key: str) -> bool:
    """Whether ``key`` can name a metadata column or an epoch scalar of a layer: a Python
    identifier that is none of the format's own names."""
    return key not in _RESERVED and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key) is not None


def _kind(arr: np.ndarray) -> str:
    return "U" if arr.dtype.kind == "U" else ("b" if arr.dtype.kind == "b" else
                                               "f" if arr.dtype.kind == "f" else "i")


def _zarr_dtype(arr: np.ndarray) -> Any:
    return {"U": str, "b": "bool", "f": "float64", "i": "int64"}[_kind(arr)]


def _fill(kind: str) -> Any:
    return {"U": "", "b": False, "f": np.nan, "i": -1}[kind]


def _prediction_specs(preds: np.ndarray, n: int, m: int, chunk: int,
                      correct: bool = True) -> dict[str, dict[str, Any]]:
    """How to create the ``prediction`` and ``correct`` arrays (for :func:`_create_arrays`).

    They are written with every batch, like the ``committed`` mask, and share its chunks
    along ``sample`` (``chunk``): a batch rewrites one such chunk, not 65536 rows.
    ``correct=False`` (a layer without labels: correctness is unknown) leaves out
    ``correct``.
    """
    specs = {
        PREDICTION: dict(shape=(n, m), chunks=(chunk, 1), dtype=_zarr_dtype(preds),
                         fill_value=_fill(_kind(preds)), dimension_names=(SAMPLE, EPOCH)),
        CORRECT: dict(shape=(n, m), chunks=(chunk, 1), dtype="bool",
                      fill_value=False, dimension_names=(SAMPLE, EPOCH)),
    }
    if not correct:
        del specs[CORRECT]
    return specs


def _creatable_later(store: Any, specs: Mapping[str, Mapping[str, Any]]) -> bool:
    """Whether :func:`_create_arrays` can defer creating ``specs`` (``jobs_out``).

    Only arrays that topoxr writes itself: zarr's ``create_array`` (string arrays) can
    raise while its own writes of parent metadata still run, so layers with such
    arrays keep being created at once, as before (not under a commit).
    """
    from topoxr._chunkio import defers_creation, direct_creates

    return defers_creation(store) and all(direct_creates(store, _checked(spec))
                                          for spec in specs.values())


def _create_arrays(group: zarr.Group, specs: Mapping[str, Mapping[str, Any]],
                   existing: Mapping[str, zarr.Array] | None = None,
                   jobs_out: list | None = None) -> dict[str, zarr.Array]:
    """Create arrays of a layer; return them (opened with the store's array config).

    With ``jobs_out`` (only where :func:`_creatable_later`), nothing is written: the
    jobs that write the arrays are appended to it.

    ``specs`` maps names to :meth:`zarr.Group.create_array` arguments (``data`` given
    is written too). The arrays are then listed in ``activation``'s ``coordinates``
    attribute, with ``existing`` (the writer's opened arrays of the layer; listed from
    the store when not given). On stores that write synchronously (local files, memory) numeric arrays
    are created by :func:`topoxr._chunkio.create_arrays` (zarr's metadata, written in
    parallel: a tenth of the cost of zarr's ``create_array`` each); other stores and
    string arrays go through zarr's ``create_array``, concurrently.
    """
    from zarr.api.asynchronous import create_array

    from topoxr._chunkio import create_arrays, direct_creates

    checked = {name: _checked(kwargs) for name, kwargs in specs.items()}
    fast = {name: spec for name, spec in checked.items() if direct_creates(group.store, spec)}
    names = sorted(({n for n, _ in group.arrays()} if existing is None else set(existing))
                   | set(specs))
    coords = {"coordinates": " ".join(n for n in names if n != ACTIVATION)}
    if ACTIVATION in fast:  # the attribute is written with the array
        fast[ACTIVATION] = {**fast[ACTIVATION],
                            "attributes": {**fast[ACTIVATION].get("attributes", {}), **coords}}
    if jobs_out is not None and len(fast) != len(checked):
        raise ValueError("only arrays that topoxr writes itself can be created later")
    created = create_arrays(group, fast, jobs_out)
    if jobs_out is not None:
        return created
    slow = [(functools.partial(create_array, group.store, name=f"{group.path}/{name}", **spec), ())
            for name, spec in checked.items() if name not in fast]
    _run_in_order([slow])
    if ACTIVATION not in fast:
        # through the writer's own array object where it has one: a later resize writes
        # that object's metadata, which must carry the new attribute
        held = None if existing is None else existing.get(ACTIVATION)
        (held if held is not None else group[ACTIVATION]).update_attributes(coords)
    for name in checked:
        if name not in created:
            created[name] = group[name].with_config(_ARRAY_CONFIG)
    return created


def _checked(spec: Mapping[str, Any]) -> dict[str, Any]:
    """``spec`` with the checksum codec last, every chunk stored (see ``CHECKSUM``) and
    flat chunk keys (see ``CHUNK_KEYS``).

    ``compressors=None`` in ``spec`` means no compression: the chunk is then only
    followed by its checksum.
    """
    out = dict(spec)
    out.setdefault("chunk_key_encoding", CHUNK_KEYS)
    compressors = out.get("compressors", _COMPRESSORS)
    out["compressors"] = (CHECKSUM,) if compressors is None else compressors
    out["config"] = {**out.get("config", {}), **_ARRAY_CONFIG}
    return out


def checked_array_spec(**spec: Any) -> dict[str, Any]:
    """Keyword arguments of ``zarr.Group.create_array`` for an array checked as the
    layers' arrays are (see :func:`_checked`): zarr's default zstd then a crc32c, every
    chunk stored, flat chunk keys."""
    return _checked(spec)


def has_checksums(arr: zarr.Array) -> bool:
    """Whether every chunk of ``arr`` ends in a checksum (arrays of format version >= 2)."""
    return any(isinstance(codec, Crc32cCodec) for codec in arr.compressors)


def read_together(reads: Sequence[tuple[zarr.Array, Any]]) -> list[np.ndarray]:
    """``arr[selection]`` for every ``(arr, selection)``, with at most one trip to zarr.

    What :func:`topoxr._chunkio.read_selection` decodes itself (numbers on a local
    store) is read that way; the rest runs concurrently in one trip to zarr's event loop
    (each separate ``arr[...]`` would wait for the loop once, about 0.5 ms on a local
    store).
    """
    import asyncio

    from zarr.core.sync import sync

    out: list[Any] = [None] * len(reads)
    through_zarr = []
    for i, (arr, selection) in enumerate(reads):
        if reads_here(arr, selection):
            out[i] = read_selection(arr, selection)
        else:
            through_zarr.append(i)

    async def read_all() -> list[Any]:
        return await asyncio.gather(*(reads[i][0].async_array.getitem(reads[i][1])
                                      for i in through_zarr))

    if through_zarr:
        for i, values in zip(through_zarr, sync(read_all()), strict=True):
            out[i] = np.asarray(values)
    return out


def _logical_lengths(arrays: Mapping[str, zarr.Array]
                     ) -> tuple[int, int, np.ndarray, np.ndarray]:
    """Number of samples and epochs that a layer's arrays agree on, and those coordinates.

    A writer grows every array before it fills the ``sample``/``epoch`` coordinate, and
    a reader may catch it in between (or a crash may leave it there): the logical length
    is the shortest array along the dimension, cut before the first unfilled coordinate.
    Returns ``(n, m, sample[:n], epoch[:m])``.
    """
    lengths: dict[str, int] = {}
    for arr in arrays.values():
        for dim, size in zip(arr.metadata.dimension_names or (), arr.shape, strict=True):
            if dim in (SAMPLE, EPOCH):
                lengths[dim] = min(lengths.get(dim, size), size)
    dims = (SAMPLE, EPOCH)
    read = read_together([(arrays[dim], slice(0, lengths.get(dim, 0))) for dim in dims])
    out = []
    for values, fill in zip(read, (SAMPLE_FILL, _EPOCH_FILL), strict=True):
        unfilled = np.flatnonzero(values == fill)
        out.append(values[: int(unfilled[0])] if len(unfilled) else values)
    return len(out[0]), len(out[1]), out[0], out[1]


def _ids_text(ids: np.ndarray, limit: int = 10) -> str:
    shown = ", ".join(str(int(i)) for i in ids[:limit])
    more = f", ... ({len(ids)} in all)" if len(ids) > limit else ""
    return f"[{shown}{more}]"


def _plain_strings(values: np.ndarray) -> np.ndarray:
    """Turn zarr's variable-length strings (object or StringDType) into numpy ``<U``."""
    if values.dtype.kind in "OT" or str(values.dtype).startswith("StringDType"):
        return np.array(values.tolist(), dtype=str)
    return values


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
