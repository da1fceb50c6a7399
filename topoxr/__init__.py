"""topoxr: topographic activation maps of deep networks, on xarray, Zarr and Dask.

Importing topoxr registers the ``.topo`` accessor on xarray objects. It loads no deep
learning framework and no plotting library: those are imported where they are used.
"""

from __future__ import annotations

from topoxr import accessor as _accessor  # registers the .topo accessor
from topoxr import conventions
from topoxr._locking import StoreLockedError
from topoxr.alignment import align
from topoxr.grouping import naps
from topoxr.layouts._api import layout
from topoxr.metrics import quality
from topoxr.recording import RecordingError, available_adapters, get_adapter
from topoxr.similarity import distances, profiles
from topoxr.store import (
    ActivationWriter,
    StoreChangedError,
    StoreCorruptionError,
    StoredValuesDifferError,
    StoreError,
    StoreWriteError,
    open_store,
    store_summary,
    verify,
)

try:
    from topoxr._version import __version__
except ImportError:  # not installed: running from a source tree
    __version__ = "999"

__all__ = [
    "ActivationWriter",
    "RecordingError",
    "StoreChangedError",
    "StoreCorruptionError",
    "StoreError",
    "StoreLockedError",
    "StoreWriteError",
    "StoredValuesDifferError",
    "__version__",
    "align",
    "available_adapters",
    "conventions",
    "distances",
    "get_adapter",
    "layout",
    "naps",
    "open_store",
    "profiles",
    "quality",
    "store_summary",
    "verify",
]
