"""topoxr: topographic activation maps of deep networks, on xarray, Zarr and Dask.

Importing topoxr registers the ``.topo`` accessor on xarray objects. It loads no deep
learning framework and no plotting library: those are imported where they are used.
"""

from __future__ import annotations

from topoxr import accessor as _accessor  # registers the .topo accessor
from topoxr import conventions
from topoxr._locking import StoreLockedError
from topoxr.align import align
from topoxr.naps import naps
from topoxr.profiles import distances, profiles
from topoxr.quality import quality
from topoxr.store import ActivationWriter, StoreError, open_store, store_summary

try:
    from topoxr._version import __version__
except ImportError:  # not installed: running from a source tree
    __version__ = "999"

__all__ = [
    "ActivationWriter",
    "StoreError",
    "StoreLockedError",
    "__version__",
    "align",
    "conventions",
    "distances",
    "naps",
    "open_store",
    "profiles",
    "quality",
    "store_summary",
]
