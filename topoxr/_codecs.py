"""Codec and storage dtype of the ``activation`` arrays, chosen by name.

The default, ``"none"`` (no compression), comes from the measurements of
``benchmarks/bench_datapath.py`` (``docs/benchmarks.md``, "Data path"): full-precision
float32 activations hardly compress with fast codecs, and no compression writes and
reads fastest. ``"lz4"`` (blosc lz4 with bit shuffle) stores quantised or sparse
activations in 2-3 times fewer bytes at about half the speed; ``"zstd"`` stores the
fewest bytes and reads 3-5 times slower. Every codec here is readable by plain
zarr-python / xarray (numcodecs), and by the ``zarrs`` pipeline.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["COMPRESSORS", "DEFAULT_COMPRESSOR", "DTYPES", "compressors_for", "storage_dtype"]

#: Names accepted by ``compressor=``.
COMPRESSORS = ("lz4", "zstd", "zstd-1", "blosc-zstd", "none")
DEFAULT_COMPRESSOR = "none"
#: Storage dtypes accepted by ``dtype=`` and the largest finite value each can hold.
DTYPES = {"float32": float(np.finfo(np.float32).max), "float16": float(np.finfo(np.float16).max)}


def compressors_for(compressor: Any) -> Any:
    """The ``compressors=`` argument of :func:`zarr.create_array` for ``compressor``.

    Parameters
    ----------
    compressor : str, zarr bytes-to-bytes codec or None
        One of :data:`COMPRESSORS`, ``None`` (same as ``"none"``), or a codec instance
        such as ``zarr.codecs.BloscCodec(...)``.

    Returns
    -------
    list of codecs or None

    Raises
    ------
    ValueError
        For an unknown name or an object that is not a zarr bytes-to-bytes codec.
    """
    from zarr.abc.codec import BytesBytesCodec
    from zarr.codecs import BloscCodec, ZstdCodec

    if compressor is None or compressor == "none":
        return None
    if isinstance(compressor, BytesBytesCodec):
        return [compressor]
    named = {
        "lz4": lambda: BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle"),
        "zstd": lambda: ZstdCodec(level=3),
        "zstd-1": lambda: ZstdCodec(level=1),
        "blosc-zstd": lambda: BloscCodec(cname="zstd", clevel=1, shuffle="bitshuffle"),
    }
    if isinstance(compressor, str) and compressor in named:
        return [named[compressor]()]
    raise ValueError(f"compressor must be one of {list(COMPRESSORS)}, None or a zarr "
                     f"bytes-to-bytes codec, got {compressor!r}")


def storage_dtype(dtype: Any) -> str:
    """Check a ``dtype=`` argument; return its name.

    Raises
    ------
    ValueError
        For anything but ``"float32"`` or ``"float16"``; ``"bfloat16"`` is refused with
        the reason (zarr v3 has no such data type that zarr-python reads).
    """
    try:
        name = dtype if isinstance(dtype, str) else str(np.dtype(dtype))
    except TypeError:
        name = repr(dtype)
    if name in DTYPES:
        return name
    if "bfloat16" in name:
        raise ValueError("dtype='bfloat16' is not supported: zarr-python 3 has no bfloat16 "
                         "data type, so plain xarray could not read the store; use "
                         "dtype='float16' (10 mantissa bits) or 'float32'")
    raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
