"""A local store that ``fsync``s every file it writes (``ActivationWriter(fsync=True)``)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import zarr
from zarr.core.buffer import Buffer


def _fsync(path: Path) -> None:
    """Flush ``path`` and the directory entry naming it to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename that replaced the file
    finally:
        os.close(fd)


class DurableLocalStore(zarr.storage.LocalStore):
    """zarr's local store, each write (chunk or metadata) on the disk before it returns.

    zarr writes a temporary file and renames it over the old one (atomic against a
    process crash); this also ``fsync``s the file and its directory, so that once a write
    returns it survives a power loss too.  The writer's order of writes (values, then
    coordinates, then the ``committed`` mask) then holds on the disk as well.
    """

    def set_sync(self, key: str, value: Buffer) -> None:
        super().set_sync(key, value)
        _fsync(self.root / key)

    async def _set(self, key: str, value: Buffer, exclusive: bool = False) -> None:
        await super()._set(key, value, exclusive=exclusive)
        await asyncio.to_thread(_fsync, self.root / key)
