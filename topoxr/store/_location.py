"""Where a store lives: paths and fsspec URLs resolved to a zarr store, the root group."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zarr

from topoxr.conventions import (
    ATTR_FORMAT,
    FORMAT_VERSION,
)
from topoxr.store._errors import StoreCorruptionError, StoreError

logger = logging.getLogger(__name__)


@dataclass
class _Location:
    url: str
    store: Any
    local_dir: str | None
    fs: Any
    fs_path: str
    #: why nothing may be written into the store (None: it may be), e.g. a zip archive
    read_only: str | None = None

    def refuse_writing(self, what: str) -> None:
        """Raise :class:`StoreError` where the store cannot be written (``what``: the
        operation, e.g. ``"record into it"``)."""
        if self.read_only is not None:
            raise StoreError(f"{self.url!r} is {self.read_only}: topoxr reads it but cannot "
                             f"{what}; unzip it into a folder first (nothing was changed)")

    def exists(self) -> bool:
        if self.local_dir is not None:
            import os

            return os.path.exists(self.local_dir)
        return bool(self.fs.exists(self.fs_path))

    @property
    def lock_path(self) -> str:
        """Where the lock object of a remote store lives (none for local stores)."""
        return "" if self.fs is None else self.fs_path.rstrip("/") + ".topoxr-lock"

    def is_locked(self) -> bool:
        """Whether a writer holds the store now."""
        from topoxr._locking import is_locked

        return is_locked(self.url, local_dir=self.local_dir, fs=self.fs,
                         lock_path=self.lock_path)

    def is_empty_dir(self) -> bool:
        if self.local_dir is not None:
            import os

            return os.path.isdir(self.local_dir) and not os.listdir(self.local_dir)
        try:
            return not self.fs.ls(self.fs_path)
        except FileNotFoundError:
            return True


def _locate(store: Any, storage_options: Mapping[str, Any] | None = None) -> _Location:
    """Resolve a path, URL or ``os.PathLike`` into a zarr store and a filesystem."""
    import os

    import fsspec

    if not isinstance(store, str | os.PathLike):
        raise StoreError(f"store must be a path or an fsspec URL, got {type(store).__name__}")
    url = os.fspath(store)
    zipped = _zip_archive(url)
    if zipped is not None:
        return _zip_location(zipped)
    if "://" not in url or url.startswith("file://"):
        local = os.path.abspath(url.removeprefix("file://"))
        return _Location(url=local, store=zarr.storage.LocalStore(local), local_dir=local,
                         fs=None, fs_path=local)
    fs, fs_path = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
    zstore = zarr.storage.FsspecStore.from_url(url, storage_options=dict(storage_options or {}))
    return _Location(url=url, store=zstore, local_dir=None, fs=fs, fs_path=fs_path)


def _zip_archive(url: str) -> str | None:
    """The local path of the zip archive ``url`` names, None where it names none.

    A store zipped whole (``shutil.make_archive``, ``zip -r``, the layout zarr's
    ``ZipStore`` writes) is named by the path of its ``.zip`` file or by an fsspec
    ``zip::`` URL over a local file. A zip on a remote file system, or a folder inside
    the archive, is refused: zarr's own zip store reads local files, and fsspec's zip
    file system lists nested folders wrongly under zarr (every layer showed up as a
    child named after the model).
    """
    import os
    import zipfile

    if url.startswith(("zip::", "zip://")):
        inside, _, outer = url.removeprefix("zip::").removeprefix("zip://").partition("::")
        if not outer:
            outer, inside = inside, ""
        if inside.strip("/") or ("://" in outer and not outer.startswith("file://")):
            raise StoreError(
                f"{url!r}: topoxr reads a zipped store from the local path of its .zip file "
                "(the archive's root is the store's root); copy a remote archive here first")
        return os.path.abspath(outer.removeprefix("file://"))
    if "://" in url and not url.startswith("file://"):
        return None
    local = os.path.abspath(url.removeprefix("file://"))
    return local if os.path.isfile(local) and zipfile.is_zipfile(local) else None


def _zip_location(path: str) -> _Location:
    """A read-only location over the zip archive at ``path`` (zarr's ``ZipStore``)."""
    import os

    import fsspec

    if not os.path.isfile(path):
        raise FileNotFoundError(f"no zip archive at {path!r}")
    return _Location(url=path, store=zarr.storage.ZipStore(path, mode="r"), local_dir=None,
                     fs=fsspec.filesystem("file"), fs_path=path,
                     read_only="a zip archive")


def _is_topoxr_root(group: zarr.Group) -> bool:
    return ATTR_FORMAT in group.attrs


def _open_root_readonly(loc: _Location) -> zarr.Group:
    if not loc.exists():
        raise FileNotFoundError(f"no topoxr store at {loc.url!r}")
    try:
        root = zarr.open_group(loc.store, mode="r", use_consolidated=False)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError) as err:
        if loc.is_locked() or loc.is_empty_dir():
            raise StoreError(f"{loc.url!r} is being created by a writer (its root group does "
                             "not exist yet) or is an empty folder; try again in a moment"
                             ) from err
        raise StoreError(f"{loc.url!r} exists but is not a topoxr store (no Zarr group)") from err
    except Exception as err:
        raise StoreCorruptionError(
            f"{loc.url!r}: the root metadata (zarr.json) is damaged "
            f"({type(err).__name__}: {err})") from err
    if not _is_topoxr_root(root):
        raise StoreError(
            f"{loc.url!r} is a Zarr group but not a topoxr store "
            f"(its attributes have no {ATTR_FORMAT!r})"
        )
    _check_format(root, loc.url)
    return root


def _check_format(root: zarr.Group, url: str) -> None:
    """Refuse a store of a format this topoxr does not know (a newer one, or none).

    Its bytes may mean something else (format 2 added a checksum to every chunk), so
    nothing is read from it, and a writer changes nothing in it.
    """
    version = root.attrs.get(ATTR_FORMAT)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise StoreCorruptionError(
            f"{url!r}: the root attribute {ATTR_FORMAT!r} is {version!r}, not a store format "
            f"(an integer, 1 to {FORMAT_VERSION} for this topoxr): the root metadata "
            "(zarr.json) is damaged")
    if version > FORMAT_VERSION:
        raise StoreError(
            f"{url!r} is in topoxr store format {version}, written by a newer topoxr; this "
            f"one reads formats 1 to {FORMAT_VERSION}: upgrade topoxr to read or extend it "
            "(nothing was read or changed)")


def zarr_store_holding(path: str | Path) -> Path | None:
    """The Zarr store that a local path is, or lies inside, if any.

    Parameters
    ----------
    path : str or Path
        A local path; it need not exist.

    Returns
    -------
    Path or None
        The absolute path of the outermost folder, ``path`` itself or one of its parents,
        that holds Zarr metadata (``zarr.json``, ``.zgroup`` or ``.zarray``): the store's
        root, not a group inside it; None if there is none.
    """
    path = Path(path).absolute()
    for folder in reversed((path, *path.parents)):
        if any((folder / name).is_file() for name in ("zarr.json", ".zgroup", ".zarray")):
            return folder
    return None


def safe_node_name(name: str) -> str:
    """Return a Zarr- and DataTree-safe node name for a model or layer name.

    Characters other than letters, digits, ``_``, ``-`` and ``.`` become ``_``; the
    original name is kept in the node's attributes.
    """
    cleaned = re.sub(r"[^A-Za-z0-9_.\-]", "_", str(name)).strip(".") or "_"
    if cleaned.startswith("__"):
        cleaned = "n" + cleaned
    return cleaned
