"""One writer per store: locks that die with their process."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from typing import Any

__all__ = ["StoreLockedError", "WriterLock"]

_IN_PROCESS: set[str] = set()
_IN_PROCESS_GUARD = threading.Lock()


class StoreLockedError(RuntimeError):
    """Another writer holds the store."""


class WriterLock:
    """An exclusive writer lock on a store.

    Local stores are locked with ``flock`` on the store directory itself, so the lock
    disappears with the process that holds it (a crashed or killed writer never leaves a
    stale lock) and no extra file appears inside the Zarr hierarchy. Other fsspec stores
    get a lock object beside the store naming host and process; a lock left by a dead
    process on the same host is taken over, one held elsewhere must be broken with
    ``break_lock=True``. Within one process, a registry refuses a second writer for any
    kind of store.
    """

    def __init__(self, key: str, *, local_dir: str | None, fs: Any = None, lock_path: str = ""):
        self.key = key
        self._local_dir = local_dir
        self._fs = fs
        self._lock_path = lock_path
        self._fd: int | None = None
        self._held = False

    def acquire(self, *, break_lock: bool = False) -> None:
        """Take the lock or raise :class:`StoreLockedError`."""
        with _IN_PROCESS_GUARD:
            if self.key in _IN_PROCESS:
                raise StoreLockedError(
                    f"store {self.key!r} is already open for writing in this process; "
                    "close the other ActivationWriter first"
                )
            _IN_PROCESS.add(self.key)
        try:
            if self._local_dir is not None:
                self._acquire_local()
            elif self._fs is not None and self._lock_path:
                self._acquire_remote(break_lock=break_lock)
        except BaseException:
            with _IN_PROCESS_GUARD:
                _IN_PROCESS.discard(self.key)
            raise
        self._held = True

    def _acquire_local(self) -> None:
        import fcntl

        fd = os.open(self._local_dir, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            os.close(fd)
            raise StoreLockedError(
                f"store {self.key!r} is being written by another process; "
                "a store accepts one writer at a time"
            ) from err
        self._fd = fd

    def _acquire_remote(self, *, break_lock: bool) -> None:
        fs, path = self._fs, self._lock_path
        if fs.exists(path) and not break_lock:
            try:
                holder = json.loads(fs.cat_file(path))
            except (OSError, ValueError):
                holder = {}
            same_host = holder.get("host") == socket.gethostname()
            if not (same_host and not _pid_alive(int(holder.get("pid", -1)))):
                raise StoreLockedError(
                    f"store {self.key!r} is being written by {holder or 'another writer'}; "
                    "if that writer is gone, pass break_lock=True"
                )
        payload = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}
        fs.pipe_file(path, json.dumps(payload).encode())

    def release(self) -> None:
        """Release the lock (idempotent)."""
        if not self._held:
            return
        if self._fd is not None:
            import fcntl

            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
        elif self._fs is not None and self._lock_path:
            try:
                self._fs.rm_file(self._lock_path)
            except FileNotFoundError:
                pass
        with _IN_PROCESS_GUARD:
            _IN_PROCESS.discard(self.key)
        self._held = False


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_locked(key: str, *, local_dir: str | None, fs: Any = None, lock_path: str = "") -> bool:
    """Whether a writer holds the store now (in this process or another); takes nothing."""
    with _IN_PROCESS_GUARD:
        if key in _IN_PROCESS:
            return True
    if local_dir is not None:
        import fcntl

        try:
            fd = os.open(local_dir, os.O_RDONLY)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # closing drops a lock just taken
        return False
    return bool(fs is not None and lock_path and fs.exists(lock_path))
