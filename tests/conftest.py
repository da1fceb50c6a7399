"""Shared fixtures and capability markers for the topoxr test suite."""

from __future__ import annotations

import errno
import importlib.util
import os
import time

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _importorskip(name: str) -> tuple[bool, pytest.MarkDecorator]:
    has = importlib.util.find_spec(name) is not None
    return has, pytest.mark.skipif(not has, reason=f"requires {name}")


has_torch, requires_torch = _importorskip("torch")
has_keras, requires_keras = _importorskip("keras")
has_holoviews, requires_holoviews = _importorskip("holoviews")
has_umap, requires_umap = _importorskip("umap")
has_distributed, requires_distributed = _importorskip("distributed")
has_panel, requires_panel = _importorskip("panel")


@pytest.fixture
def store_path(tmp_path):
    """A path for a fresh local store (not created yet)."""
    return str(tmp_path / "run.zarr")


@pytest.fixture(params=["local", "memory"])
def any_store(request, tmp_path):
    """A fresh store location: a local path, then an fsspec ``memory://`` URL."""
    if request.param == "local":
        yield str(tmp_path / "run.zarr")
    else:
        import uuid

        import fsspec

        url = f"memory://topoxr-test-{uuid.uuid4().hex}.zarr"
        yield url
        fs = fsspec.filesystem("memory")
        path = url.removeprefix("memory://")
        if fs.exists(path):
            fs.rm(path, recursive=True)


@pytest.fixture(scope="session")
def quick_demo(tmp_path_factory):
    """``topoxr demo --quick`` run once, as a user runs it: ``(out folder, CompletedProcess)``.

    Shared by the demo and the browser tests, so the suite pays for one run.
    """
    import subprocess
    import sys

    for name in ("torch", "keras", "holoviews"):
        pytest.importorskip(name)
    out = tmp_path_factory.mktemp("demo")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = subprocess.run(
        [sys.executable, "-m", "topoxr.cli", "demo", "--quick", "--out", str(out), "--seed", "3",
         "--no-progress"],
        capture_output=True, text=True, timeout=900, env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


def _slow_failing_memory_fs(fail: str, slow: str) -> tuple[type, str]:
    """A real fsspec memory filesystem under a protocol of its own whose write of the
    key ending in ``fail`` raises "No space left on device" while the write of the key
    ending in ``slow`` takes 0.5 s; it logs the writes and counts those in flight."""
    import threading
    import uuid

    import fsspec
    from fsspec.implementations.memory import MemoryFileSystem

    protocol = f"slowfail{uuid.uuid4().hex[:8]}"

    class SlowFailingFS(MemoryFileSystem):
        store: dict = {}  # noqa: RUF012 (fsspec's memory filesystem keeps its files here)
        pseudo_dirs: list = [""]  # noqa: RUF012
        armed = False
        in_flight = 0
        log: list = []  # noqa: RUF012
        lock = threading.Lock()

        def pipe_file(self, path, value, mode="overwrite", **kwargs):
            cls = type(self)
            with cls.lock:
                cls.in_flight += 1
            try:
                if cls.armed and path.endswith(fail):
                    cls.log.append("failed")
                    raise OSError(errno.ENOSPC, "No space left on device", path)
                if cls.armed and path.endswith(slow):
                    time.sleep(0.5)
                    cls.log.append("slow write done")
                return super().pipe_file(path, value, mode=mode, **kwargs)
            finally:
                with cls.lock:
                    cls.in_flight -= 1

    SlowFailingFS.protocol = protocol
    fsspec.register_implementation(protocol, SlowFailingFS, clobber=True)
    return SlowFailingFS, protocol


@pytest.fixture
def slow_failing_fs():
    """``make(fail, slow)``: a real fsspec memory filesystem under a protocol of its own
    (see :func:`_slow_failing_memory_fs`); returns ``(its class, its protocol)``."""
    return _slow_failing_memory_fs
