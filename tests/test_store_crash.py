"""Crash safety and fault injection of the store, with real processes and real stores.

The recording is ``tests/_store_script.py``: two layers, three epochs, values that are
a known function of (sample, neuron, epoch).  Writers are killed with SIGKILL, storage
writes are made to fail, chunks are damaged, and every time the store must open, show
exactly the committed batches, and a resumed run must end equal to an uninterrupted one.
"""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr

import topoxr
from topoxr import open_store, store_summary
from topoxr.conventions import FORMAT_VERSION
from topoxr.store import StoreCorruptionError, StoreError, StoreWriteError

sys.path.insert(0, str(Path(__file__).parent))
import _store_script as script  # noqa: E402

SCRIPT = str(Path(__file__).parent / "_store_script.py")
PLAN = script.Plan()
SEED = int(os.environ.get("TOPOXR_CRASH_SEED", "20260"))


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The store an uninterrupted run produces."""
    path = str(tmp_path_factory.mktemp("reference") / "ref.zarr")
    script.record(path)
    return path


@pytest.fixture(scope="module")
def reference_presized(tmp_path_factory):
    """The store an uninterrupted run produces with layers presized for the probe set
    (``expected_samples`` also evens out the chunks, so it is compared with this one)."""
    path = str(tmp_path_factory.mktemp("reference") / "ref-presized.zarr")
    script.record(path, expected_samples=PLAN.n_samples)
    return path


@pytest.fixture(scope="module")
def reference_numeric(tmp_path_factory):
    """The store an uninterrupted run produces without the string column ``split``."""
    path = str(tmp_path_factory.mktemp("reference") / "ref-numeric.zarr")
    script.record(path, strings=False)
    return path


def _start(store, *args):
    return subprocess.Popen(
        [sys.executable, SCRIPT, "write", str(store), *map(str, args)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _zarr_arrays(path):
    """{array path: zarr.Array} of a whole hierarchy."""
    root = zarr.open_group(path, mode="r", use_consolidated=False)
    out = {}

    def walk(group, prefix):
        for name, member in group.members():
            if isinstance(member, zarr.Group):
                walk(member, f"{prefix}{name}/")
            else:
                out[f"{prefix}{name}"] = member
    walk(root, "")
    return root, out


def assert_same_store(path, reference):
    """Equal as raw Zarr (every array, its shape, chunks, values, attributes) and opened,
    and no temporary file of a killed writer left anywhere (the resuming writer deletes
    them)."""
    left = [os.path.relpath(os.path.join(folder, name), path)
            for folder, _, names in os.walk(path) for name in names
            if name.endswith(".partial")]
    assert not left, left
    root, arrays = _zarr_arrays(path)
    ref_root, ref_arrays = _zarr_arrays(reference)
    assert sorted(arrays) == sorted(ref_arrays)
    for key, arr in arrays.items():
        ref = ref_arrays[key]
        assert arr.shape == ref.shape, key
        assert arr.chunks == ref.chunks, key
        assert arr.dtype == ref.dtype, key
        assert dict(arr.attrs) == dict(ref.attrs), key
        np.testing.assert_array_equal(np.asarray(arr[...]), np.asarray(ref[...]), err_msg=key)
    skip = {"created"}
    assert {k: v for k, v in root.attrs.items() if k not in skip} == {
        k: v for k, v in ref_root.attrs.items() if k not in skip}
    got, want = open_store(path), open_store(reference)
    for layer in script.LAYERS:
        a = got[script.MODEL][layer].to_dataset().compute()
        b = want[script.MODEL][layer].to_dataset().compute()
        xr.testing.assert_identical(a, b)


def _reported(lines):
    """(layer, epoch, batch) of the writes a process reported finished, and its epochs."""
    writes, epochs = set(), set()
    for line in lines:
        parts = line.split()
        if parts and parts[0] == "W":
            writes.add((parts[2], int(parts[3]), int(parts[4])))
        elif parts and parts[0] == "E":
            epochs.add(int(parts[1]))
    return writes, epochs


def assert_consistent(store, writes, epochs_done):
    """What a store left by a killed writer must look like."""
    seen = script.check_snapshot(store)  # values, no torn batch, labels, predictions
    tree = open_store(store)
    summary = store_summary(store)
    for layer, epoch, b in writes:
        ds = tree[script.MODEL][layer].to_dataset()
        ids = PLAN.batches[b]
        mask = ds.committed.sel(sample=ids, epoch=epoch).values
        assert mask.all(), f"reported batch {layer} epoch {epoch} batch {b} is not committed"
    layers = summary["models"][script.MODEL]["layers"] if summary["models"] else {}
    for layer, info in layers.items():
        ds = tree[script.MODEL][layer].to_dataset()
        full = ds.committed.all("sample").values
        for epoch, is_full in zip(ds.epoch.values.tolist(), full, strict=True):
            if epoch in info["complete_epochs"]:
                assert is_full, f"{layer}: epoch {epoch} marked complete with holes"
        assert epochs_done <= set(info["complete_epochs"]), (layer, epochs_done, info)
    return seen


# --------------------------------------------------------------------------------------
# SIGKILL
# --------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize(("buffer_bytes", "presize"), [(0, False), (1 << 20, False),
                                                       (1 << 20, True)],
                         ids=["commit-per-write", "buffered", "buffered-presized"])
def test_sigkill_at_20_random_points_then_resume_equals_uninterrupted(
        tmp_path, reference, reference_presized, buffer_bytes, presize):
    """Killed anywhere; a ``W`` line is printed once its write is committed (see script).
    ``presize``: layers are created at the probe set's length (``expected_samples``), so
    a kill leaves arrays longer than the data, which readers and the resume must cut."""
    rng = np.random.default_rng(SEED)
    extra = ("--expected-samples", PLAN.n_samples) if presize else ()
    store = tmp_path / "run.zarr"
    targets = np.sort(rng.choice(np.arange(1, PLAN.total_writes), size=20, replace=True))
    kills = 0
    for target in targets:
        proc = _start(store, "--buffer-bytes", buffer_bytes, *extra)
        lines = []
        for line in proc.stdout:
            lines.append(line.strip())
            if line.startswith("W ") and int(line.split()[1]) >= target:
                time.sleep(rng.uniform(0, 0.012))  # land anywhere in the next write(s)
                proc.send_signal(signal.SIGKILL)
                break
        proc.wait(timeout=60)
        lines += [x.strip() for x in proc.stdout.read().splitlines()]
        proc.stdout.close()
        proc.stderr.close()
        if proc.returncode == -signal.SIGKILL:
            kills += 1
        else:  # it finished before the signal: a valid run, nothing to resume
            assert proc.returncode == 0
        writes, epochs = _reported(lines)
        assert_consistent(str(store), writes, epochs)
    assert kills >= 18, f"only {kills} of 20 runs were actually killed mid-recording"
    final = _start(store, "--buffer-bytes", buffer_bytes, *extra)
    out, err = final.communicate(timeout=120)
    assert final.returncode == 0, err
    assert out.strip().endswith("DONE")
    assert_same_store(str(store), reference_presized if presize else reference)


@pytest.mark.parametrize("buffer_bytes", [0, 1 << 20], ids=["commit-per-write", "buffered"])
@pytest.mark.parametrize("step", [1, 2, 3])
def test_killed_while_writing_new_layers_then_resume_equals_uninterrupted(
        tmp_path, reference_numeric, step, buffer_bytes):
    """New layers (of numeric columns) are written at their first commit, all
    together, in three steps (groups, arrays, "ready" marks). Killed after each step:
    readers show no layer that was not complete, and the resumed run ends with the
    uninterrupted store."""
    store = tmp_path / "run.zarr"
    proc = subprocess.run([sys.executable, SCRIPT, "write", str(store), "--buffer-bytes",
                           str(buffer_bytes), "--die-in-creation", str(step), "--no-strings"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    on_disk = sorted(name for name in os.listdir(store / "net") if (store / "net" / name).is_dir())
    assert on_disk == (["conv", "dense"] if buffer_bytes else ["dense"])
    summary = store_summary(str(store))
    shown = summary["models"]["net"]["layers"]
    assert summary["problems"] == []
    if step < 3:  # created in part: not a layer yet, for every reader
        assert shown == {}
    else:  # complete, and empty: nothing was committed
        assert sorted(shown) == on_disk
        assert all(info["samples"] == 0 and info["problems"] == [] for info in shown.values())
    assert topoxr.verify(str(store)).ok
    final = subprocess.run([sys.executable, SCRIPT, "write", str(store), "--buffer-bytes",
                            str(buffer_bytes), "--no-strings"], capture_output=True, text=True,
                           timeout=120)
    assert final.returncode == 0, final.stderr
    assert final.stdout.strip().endswith("DONE")
    assert_same_store(str(store), reference_numeric)


def test_layers_with_string_columns_are_written_at_once(tmp_path):
    """A layer with a string column is created by zarr as its first batch arrives (its
    files exist before any commit); layers of numeric columns wait for their commit."""
    store = str(tmp_path / "s.zarr")
    ids = np.arange(4)
    with topoxr.ActivationWriter(store, model="m", buffer_bytes=1 << 20) as writer:
        writer.write("text", np.ones((4, 3)), sample=ids, split=["a", "b", "a", "b"])
        writer.write("numbers", np.ones((4, 3)), sample=ids, weight=ids * 0.5)
        assert (tmp_path / "s.zarr" / "m" / "text" / "split" / "zarr.json").exists()
        assert not (tmp_path / "s.zarr" / "m" / "numbers").exists()
    tree = topoxr.open_store(store)
    assert tree["m/text"].to_dataset().split.values.tolist() == ["a", "b", "a", "b"]
    assert tree["m/numbers"].to_dataset().weight.values.tolist() == [0.0, 0.5, 1.0, 1.5]


@pytest.mark.parametrize("die_after", [PLAN.total_writes // PLAN.epochs, 7])
def test_killed_after_a_whole_epoch_without_explicit_completion(tmp_path, reference, die_after):
    """A run that completes epochs only at close(): the resumed run must complete them."""
    store = str(tmp_path / "run.zarr")
    proc = subprocess.run([sys.executable, SCRIPT, "write", store, "--complete", "close",
                           "--die-after", str(die_after)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == -signal.SIGKILL
    info = store_summary(store)["models"]["net"]["layers"]["dense"]
    assert info["complete_epochs"] == []
    assert 0 in info["incomplete_epochs"]
    assert script.check_snapshot(store) > 0
    proc = subprocess.run([sys.executable, SCRIPT, "write", store, "--complete", "close"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert_same_store(store, reference)


def test_plain_xarray_after_kill_and_resume(tmp_path, reference):
    """Consolidated metadata never shows a stale shape to plain xarray."""
    store = str(tmp_path / "run.zarr")
    script.record(store)  # complete, consolidated
    # a second model is recorded and killed: the first model must read as before
    code = textwrap.dedent(f"""
        import os, signal, numpy as np
        from topoxr import ActivationWriter
        w = ActivationWriter({store!r}, model="other")
        w.write("h", np.ones((4, 3)), sample=np.arange(4))
        w.flush()
        w.write("h", np.ones((4, 3)), sample=np.arange(4, 8))  # buffered: lost
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL
    # the killed writer had dropped the consolidated metadata (it would have been stale):
    # xarray says so and reads the current metadata
    with pytest.warns(RuntimeWarning, match="consolidated metadata"):
        plain = xr.open_datatree(store, engine="zarr")
    ref = xr.open_datatree(reference, engine="zarr")
    xr.testing.assert_equal(plain["net/dense"].to_dataset(), ref["net/dense"].to_dataset())
    other = plain["other/h"].to_dataset()
    assert other.activation.shape == (3, 4, 1)
    assert other.committed.values.all()


# --------------------------------------------------------------------------------------
# a reader beside a writer
# --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_concurrent_reader_never_sees_a_torn_batch(tmp_path, reference):
    store = tmp_path / "run.zarr"
    done = tmp_path / "done"
    reader = subprocess.Popen([sys.executable, SCRIPT, "read", str(store), "--until", str(done)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # a writer killed half way, then a resuming writer, all while the reader reads
    first = _start(store, "--delay", "0.01")
    for line in first.stdout:
        if line.startswith("W ") and int(line.split()[1]) >= PLAN.total_writes // 2:
            first.send_signal(signal.SIGKILL)
            break
    first.wait(timeout=60)
    first.stdout.close()
    first.stderr.close()
    second = _start(store, "--delay", "0.005")
    _, err = second.communicate(timeout=120)
    assert second.returncode == 0, err
    done.touch()
    rout, rerr = reader.communicate(timeout=120)
    assert reader.returncode == 0, rout + rerr
    status, snapshots, values = rout.split()
    assert status == "OK" and int(snapshots) >= 3 and int(values) > 0, rout
    assert_same_store(str(store), reference)


# --------------------------------------------------------------------------------------
# failing storage
# --------------------------------------------------------------------------------------
class _FailingSets:
    """Make ``zarr.storage.LocalStore`` writes fail with ENOSPC after ``budget`` writes.

    Both ways zarr's local store writes are counted: ``set`` (zarr's codec pipeline)
    and ``set_sync`` (the writer's direct commit-mask writes).
    """

    def __init__(self, budget):
        self.budget = budget
        self.calls = 0
        self.original = zarr.storage.LocalStore.set
        self.original_sync = zarr.storage.LocalStore.set_sync

    def _spend(self, key):
        self.calls += 1
        if self.calls > self.budget:
            raise OSError(errno.ENOSPC, "No space left on device (injected)", key)

    def install(self, monkeypatch):
        original, original_sync = self.original, self.original_sync

        async def set(store, key, value):
            self._spend(key)
            return await original(store, key, value)

        def set_sync(store, key, value):
            self._spend(key)
            return original_sync(store, key, value)

        monkeypatch.setattr(zarr.storage.LocalStore, "set", set)
        monkeypatch.setattr(zarr.storage.LocalStore, "set_sync", set_sync)


def test_count_of_store_writes_is_known(tmp_path, monkeypatch):
    counter = _FailingSets(budget=10**9)
    counter.install(monkeypatch)
    script.record(str(tmp_path / "x.zarr"))
    assert counter.calls > 50  # the failure points below are spread over these


@pytest.mark.parametrize("fraction", [0.0, 0.03, 0.2, 0.45, 0.7, 0.97])
def test_failing_writes_lose_no_committed_data(tmp_path, monkeypatch, reference, fraction):
    total = _count_sets(tmp_path / "count.zarr", monkeypatch)
    store = str(tmp_path / "run.zarr")
    failing = _FailingSets(budget=int(fraction * total))
    failing.install(monkeypatch)
    out = io.StringIO()
    with pytest.raises(StoreWriteError, match="No space left on device") as info:
        script.record(store, out=out)
    message = str(info.value)
    assert "intact" in message and "resume" in message.lower()
    monkeypatch.undo()
    writes, epochs = _reported(out.getvalue().splitlines())
    if os.path.exists(os.path.join(store, "zarr.json")):
        assert_consistent(store, writes, epochs)
    else:
        assert not writes
    script.record(store)  # resume on a healthy disk
    assert_same_store(store, reference)


_SETS: dict[str, int] = {}


def _count_sets(path, monkeypatch):
    if "n" not in _SETS:
        counter = _FailingSets(budget=10**9)
        with monkeypatch.context() as m:
            counter.install(m)
            script.record(str(path))
        _SETS["n"] = counter.calls
    return _SETS["n"]


def test_writer_refuses_further_writes_after_a_failure(tmp_path, monkeypatch):
    store = str(tmp_path / "run.zarr")
    writer = topoxr.ActivationWriter(store, model="m", buffer_bytes=0)  # write() commits
    writer.write("h", np.ones((4, 3)), sample=np.arange(4))
    failing = _FailingSets(budget=0)
    failing.install(monkeypatch)
    with pytest.raises(StoreWriteError, match=r"layer 'h' epoch 1 samples \[4, 5, 6, 7\]"):
        writer.write("h", np.ones((4, 3)), sample=np.arange(4, 8), epoch=1)
    monkeypatch.undo()
    with pytest.raises(StoreWriteError, match="failed earlier"):
        writer.write("h", np.ones((4, 3)), sample=np.arange(4, 8), epoch=1)
    writer.close()  # releases the lock, writes nothing more
    with topoxr.ActivationWriter(store, model="m") as again:
        assert again.missing("h", 0, range(4)).size == 0
        assert again.missing("h", 1, range(8)).tolist() == list(range(8))


def test_a_failed_commit_leaves_the_batch_missing(tmp_path, monkeypatch):
    """The values are written, the commit (mask) write fails: the batch is not committed."""
    store = str(tmp_path / "run.zarr")
    writer = topoxr.ActivationWriter(store, model="m", buffer_bytes=0)
    writer.write("h", np.ones((4, 3)), sample=np.arange(4))
    writer.write("h", np.full((2, 3), 2.0), sample=[0, 1], epoch=1)

    def no_space(store, key, value):
        raise OSError(errno.ENOSPC, "No space left on device (injected)", key)

    monkeypatch.setattr(zarr.storage.LocalStore, "set_sync", no_space)
    with pytest.raises(StoreWriteError, match="No space left"):
        writer.write("h", np.full((2, 3), 2.0), sample=[2, 3], epoch=1)
    monkeypatch.undo()
    assert writer.missing("h", 1, range(4)).tolist() == [2, 3]
    writer.close()
    ds = topoxr.open_store(store)["m/h"].to_dataset()
    assert ds.committed.sel(epoch=1).values.tolist() == [True, True, False, False]
    assert ds.activation.sel(epoch=1, sample=[2, 3]).isnull().all()


def test_a_failed_flush_names_the_buffered_batches_and_loses_nothing_committed(
        tmp_path, monkeypatch):
    """Buffered batches fail at the commit that ``flush`` runs: named, not committed."""
    store = str(tmp_path / "run.zarr")
    writer = topoxr.ActivationWriter(store, model="m")
    writer.write("h", np.ones((4, 3)), sample=np.arange(4))
    writer.flush()
    writer.write("h", np.full((2, 3), 2.0), sample=[0, 1], epoch=1)
    writer.write("h", np.full((2, 3), 3.0), sample=[2, 3], epoch=1)  # joins the buffer
    failing = _FailingSets(budget=0)
    failing.install(monkeypatch)
    with pytest.raises(StoreWriteError,
                       match=r"committing 4 buffered samples of layer 'h' epoch 1 \(\[0, 1, 2, 3\]\)"):
        writer.flush()
    monkeypatch.undo()
    with pytest.raises(StoreWriteError, match="failed earlier"):
        writer.write("h", np.ones((4, 3)), sample=np.arange(4), epoch=2)
    writer.close()
    with topoxr.ActivationWriter(store, model="m") as again:
        assert again.missing("h", 0, range(4)).size == 0
        assert again.missing("h", 1, range(4)).tolist() == [0, 1, 2, 3]


def test_a_flush_of_several_layers_fails_at_every_write_without_tearing_a_batch(
        tmp_path, monkeypatch):
    """``flush`` commits every buffered layer in one set of steps; whichever write fails,
    each layer's buffered batch is either committed whole, with its values, or missing."""
    values = {"h": np.arange(12.0).reshape(4, 3) + 10, "g": np.arange(20.0).reshape(4, 5)}
    budget = 0
    while True:
        store = str(tmp_path / f"run{budget}.zarr")
        writer = topoxr.ActivationWriter(store, model="m")
        for layer, vals in values.items():
            writer.write(layer, np.zeros_like(vals), sample=np.arange(4))
        writer.flush()
        for layer, vals in values.items():  # epoch 1: a new epoch for both layers
            writer.write(layer, vals[:2], sample=[0, 1], epoch=1)
            writer.write(layer, vals[2:], sample=[2, 3], epoch=1)
        failing = _FailingSets(budget=budget)
        failing.install(monkeypatch)
        try:
            writer.flush()
        except StoreWriteError as err:
            failed = True
            for layer in values:  # the message names every buffered batch
                assert f"4 buffered samples of layer {layer!r} epoch 1 ([0, 1, 2, 3])" in str(err)
        else:
            failed = False
        monkeypatch.undo()
        writer.close()
        tree = topoxr.open_store(store)
        with topoxr.ActivationWriter(store, model="m") as again:
            for layer, vals in values.items():
                missing = again.missing(layer, 1, range(4)).tolist()
                assert missing in ([], [0, 1, 2, 3]), (budget, layer, missing)
                if not missing:
                    act = tree[f"m/{layer}"].to_dataset().activation.sel(epoch=1)
                    np.testing.assert_array_equal(act.values, vals.T)
        if not failed:
            assert failing.calls > 0  # the last budget let every write through
            break
        budget += 1
    assert budget > 4  # the flush wrote several files before it could succeed


_TMPFS_DRIVER = textwrap.dedent("""
    import json, shutil, subprocess, sys
    sys.path.insert(0, sys.argv[1])
    import _store_script as script
    from topoxr.store import StoreWriteError
    mnt, copy_small, copy_final = sys.argv[2:5]
    store = mnt + "/run.zarr"
    report = {}
    try:
        script.record(store)
        report["error"] = None
    except StoreWriteError as err:
        report["error"] = str(err)
    shutil.copytree(store, copy_small)
    subprocess.run(["mount", "-o", "remount,size=4m", mnt], check=True)
    script.record(store)  # resume once there is room again
    shutil.copytree(store, copy_final)
    print(json.dumps(report))
""")


@pytest.mark.slow
def test_disk_full_on_a_real_small_tmpfs(tmp_path, reference):
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        pytest.skip("needs unshare and mount")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    probe = subprocess.run(
        ["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {mnt}"],
        capture_output=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {probe.stderr.decode().strip()}")
    driver = tmp_path / "driver.py"
    driver.write_text(_TMPFS_DRIVER)
    small, final = tmp_path / "small.zarr", tmp_path / "final.zarr"
    cmd = (f"mount -t tmpfs -o size=160k tmpfs {mnt} && "
           f"{sys.executable} {driver} {Path(__file__).parent} {mnt} {small} {final}")
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", cmd], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["error"] is not None, "the recording fitted in the small tmpfs"
    assert "No space left on device" in report["error"]
    assert script.check_snapshot(str(small)) > 0  # what was committed is readable and right
    assert_same_store(str(final), reference)


@pytest.mark.parametrize(("column", "fail", "slow", "n", "chunk_samples"), [
    # one zarr setitem writes the label chunks of a large commit concurrently
    ("label", "label/c.0", "label/c.1", 140_000, None),
    # ... and the activation chunks, on stores that zarr writes
    ("activation", "activation/c.0.0.0", "activation/c.0.1.0", 4096, 1024),
])
def test_nothing_of_a_failed_write_still_writes_when_the_error_is_raised(
        slow_failing_fs, column, fail, slow, n, chunk_samples):
    """zarr raises the first failed write of a call while its other writes go on; the
    writer waits for them before it reports the failure, so that a late write cannot
    land in the store after the caller heard of the error (and resumed)."""
    fs, protocol = slow_failing_fs(fail, slow)
    url = f"{protocol}://run.zarr"
    rng = np.random.default_rng(0)
    values = rng.random((n + 10, 2), dtype=np.float32)
    labels = np.arange(n + 10) % 3
    first, rest = slice(0, 10), slice(10, n + 10)

    def write(writer, rows):
        writer.write("h", values[rows], sample=np.arange(n + 10)[rows], label=labels[rows])
        writer.flush()

    with pytest.raises(StoreWriteError, match="No space left on device"):
        with topoxr.ActivationWriter(url, model="m", mode="w",
                                     chunk_samples=chunk_samples) as writer:
            write(writer, first)
            fs.armed = True
            try:
                write(writer, rest)
            finally:
                fs.log.append(f"raised with {fs.in_flight} write(s) in flight")
    assert fs.log == ["failed", "slow write done", "raised with 0 write(s) in flight"]
    fs.armed = False
    ds = open_store(url)["m/h"].to_dataset()  # the first batch is committed and intact
    np.testing.assert_array_equal(ds.activation.isel(epoch=0).values.T, values[first])
    with topoxr.ActivationWriter(url, model="m") as writer:  # resume
        write(writer, rest)
    ds = open_store(url)["m/h"].to_dataset()
    np.testing.assert_array_equal(ds.activation.isel(epoch=0).values.T, values)
    np.testing.assert_array_equal(ds.label.values, labels)
    assert ds.committed.values.all()


# --------------------------------------------------------------------------------------
# damaged stores
# --------------------------------------------------------------------------------------
def _chunk_file(store, layer, epoch_index=1, sample_chunk=1):
    return Path(store) / script.MODEL / layer / "activation" / f"c.0.{sample_chunk}.{epoch_index}"


@pytest.fixture
def damaged(tmp_path, reference):
    path = tmp_path / "copy.zarr"
    shutil.copytree(reference, path)
    return path


def _affected_ids(sample_chunk):
    c = PLAN.chunk_samples
    return PLAN.sample_ids[sample_chunk * c:(sample_chunk + 1) * c]


def test_deleted_chunk_is_reported_not_filled_with_nan(damaged):
    _chunk_file(damaged, "dense").unlink()
    ds = open_store(damaged)["net/dense"].to_dataset()
    with pytest.raises(StoreCorruptionError, match="missing") as info:
        ds.activation.values  # noqa: B018
    message = str(info.value)
    assert "layer 'dense'" in message and "model 'net'" in message
    assert "epochs [1]" in message
    assert str(_affected_ids(1)[:10].tolist())[1:-1] in message
    # the rest of the store stays readable
    ok = ds.activation.sel(epoch=[0, 2]).values
    assert np.isfinite(ok).all()


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupted_chunk_gives_a_clear_error(damaged, damage):
    chunk = _chunk_file(damaged, "conv", epoch_index=2, sample_chunk=0)
    data = chunk.read_bytes()
    chunk.write_bytes(b"\x00garbage" * 20 if damage == "garbage" else data[: len(data) // 2])
    ds = open_store(damaged)["net/conv"].to_dataset()
    with pytest.raises(StoreCorruptionError, match="fails its crc32c checksum") as info:
        ds.activation.mean().compute()
    message = str(info.value)
    assert "layer 'conv'" in message and "epochs [2]" in message
    assert "array 'activation', chunk c.0.0.2 (file net/conv/activation/c.0.0.2)" in message
    assert str(_affected_ids(0)[:10].tolist())[1:-1] in message


def test_corrupted_coordinate_is_reported_on_open(damaged):
    (Path(damaged) / "net" / "dense" / "committed" / "c.0.0").write_bytes(b"junk")
    with pytest.raises(StoreCorruptionError,
                       match=r"layer 'dense'.*'committed', chunk c\.0\.0 .*fails its crc32c"):
        open_store(damaged)


def test_stored_nan_is_not_mistaken_for_a_missing_chunk(tmp_path):
    store = str(tmp_path / "nan.zarr")
    with topoxr.ActivationWriter(store, model="m", chunk_samples=4) as writer:
        writer.write("h", np.full((4, 2), np.nan), sample=np.arange(4), allow_nonfinite=True)
        writer.write("h", np.ones((4, 2)), sample=np.arange(4, 8))
    values = open_store(store)["m/h"].activation.values
    assert np.isnan(values[:, :4]).all() and (values[:, 4:] == 1).all()


@pytest.mark.parametrize("listing", ["dropped", "kept"])
def test_a_layer_with_a_missing_array_is_reported(damaged, listing):
    """What a writer killed while deleting a model (mode="w") can leave: it drops the
    store's listing of its nodes (the consolidated metadata) before deleting anything.
    With the listing kept, the folder was removed outside topoxr, and is named so."""
    if listing == "dropped":
        zarr.open_group(str(damaged), mode="r+", use_consolidated=False).update_attributes({})
    shutil.rmtree(Path(damaged) / "net" / "dense" / "activation")
    if listing == "kept":
        lost = r"'net/dense/activation' is listed in the store's consolidated metadata"
        with pytest.raises(StoreCorruptionError, match=lost):
            open_store(damaged)
        with pytest.raises(StoreCorruptionError, match=lost):
            topoxr.ActivationWriter(str(damaged), model="net")
        with pytest.raises(StoreCorruptionError, match=lost):  # another model's writer
            topoxr.ActivationWriter(str(damaged), model="other", mode="w")
        # mode="w" replaces the model that lost the node: allowed, as after a crash
        with topoxr.ActivationWriter(str(damaged), model="net", mode="w") as writer:
            writer.write("dense", np.ones((2, 3)), sample=[0, 1])
        assert open_store(damaged)["net/dense"].sizes["neuron"] == 3
        return
    # what a reader sees while a writer replaces the model: a hint that it may be that
    with topoxr.ActivationWriter(str(damaged), model="other"):
        with pytest.raises(StoreCorruptionError, match="a writer holds the store now"):
            open_store(damaged)
    damaged_layer = r"layer 'dense' of model 'net' is damaged: array\(s\) \['activation'\]"
    with pytest.raises(StoreCorruptionError, match=damaged_layer):
        open_store(damaged)
    with pytest.raises(StoreCorruptionError, match="open the writer with mode='w'"):
        topoxr.ActivationWriter(str(damaged), model="net")
    with topoxr.ActivationWriter(str(damaged), model="net", mode="w") as writer:
        writer.write("dense", np.ones((2, 3)), sample=[0, 1])
    assert open_store(damaged)["net/dense"].sizes["neuron"] == 3


@pytest.mark.parametrize("coordinate", ["sample", "epoch"])
def test_a_grown_but_unfilled_coordinate_is_not_data(tmp_path, reference, coordinate):
    """The state a kill between growing a coordinate and filling it leaves behind."""
    store = str(tmp_path / "run.zarr")
    half = script.Plan(epochs=2)
    script.record(store, half)
    for layer in script.LAYERS:
        group = zarr.open_group(store, mode="r+", use_consolidated=False)[f"net/{layer}"]
        for name, arr in group.arrays():  # grow everything, as the writer does first
            dims = arr.metadata.dimension_names
            if coordinate in dims:
                arr.resize(tuple(s + 3 if d == coordinate else s
                                 for d, s in zip(dims, arr.shape, strict=True)))
    tree = open_store(store)
    ds = tree["net/dense"].to_dataset()
    assert ds.sizes["sample"] == PLAN.n_samples and ds.sizes["epoch"] == 2
    assert script.check_snapshot(store) > 0
    script.record(store)  # resume repairs and completes the three epochs
    assert_same_store(store, reference)


def test_temporary_files_of_a_killed_writer_are_removed_by_the_next_writer(tmp_path):
    """A process killed between writing a file and renaming it leaves
    ``<name>.<random>.partial`` beside the nodes, which zarr and plain xarray warn about
    at every listing of the group, or beside an array's chunks, where it keeps its bytes;
    the next writer (holding the lock) deletes those in the root, model, layer and array
    folders, and nothing committed changes."""
    import warnings

    store = tmp_path / "run.zarr"
    values = np.arange(24, dtype=np.float32).reshape(8, 3)
    with topoxr.ActivationWriter(store, model="m") as writer:
        writer.write("h", values, sample=np.arange(8), label=np.arange(8) % 2)
    left = [store / "zarr.3f2a9c0d.partial", store / "m" / "zarr.77e1.partial",
            store / "m" / "h" / "zarr.b4c2.partial"]
    for path in left:
        path.write_bytes(b'{"zarr_format": 3, "node_')  # cut short by the kill
    chunks = [store / "m" / "h" / "activation" / "c.0.0.0.4242-7.partial",
              store / "m" / "h" / "label" / "c.0.4242-8.partial"]
    for path in chunks:
        path.write_bytes(bytes(1000))
    left += chunks
    kept = {p: p.read_bytes() for p in store.rglob("*") if p.is_file() and p not in left}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        zarr.open_group(store, mode="r", use_consolidated=False)["m"].members()
    assert any("not recognized as a component" in str(w.message) for w in caught)
    topoxr.ActivationWriter(store, model="m").close()
    assert not any(path.exists() for path in left)
    assert {p: p.read_bytes() for p in kept} == kept  # the chunks and metadata kept
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        zarr.open_group(store, mode="r", use_consolidated=False)["m"].members()
        tree = xr.open_datatree(store, engine="zarr")
    assert not [w for w in caught if "not recognized" in str(w.message)]
    np.testing.assert_array_equal(tree["m/h"]["activation"].values[..., 0].T, values)


# --------------------------------------------------------------------------------------
# inspection and maintenance: verify, store_summary, a writer opening a damaged layer
# --------------------------------------------------------------------------------------
def _edit_attributes(doc: Path, change) -> None:
    meta = json.loads(doc.read_text())
    change(meta["attributes"])
    doc.write_text(json.dumps(meta))


def _files_below(path: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in path.rglob("*") if p.is_file()}


@pytest.mark.parametrize(("version", "error", "match"), [
    (FORMAT_VERSION + 997, StoreError, "store format 999, written by a newer topoxr"),
    ("2", StoreCorruptionError, r"'topoxr_format_version' is '2', not a store format"),
])
def test_a_store_of_an_unknown_format_is_refused_before_anything_is_read(damaged, version,
                                                                         error, match):
    """The root's ``topoxr_format_version`` was written and never read: a store of a
    newer format (whose bytes may mean something else) was read, verified and appended
    to as if it were this one. Every entry point refuses it, and changes nothing."""
    _edit_attributes(Path(damaged) / "zarr.json",
                     lambda a: a.update(topoxr_format_version=version))
    before = _files_below(Path(damaged))
    for entry in (open_store, store_summary, lambda p: topoxr.verify(p, record=True),
                  lambda p: topoxr.ActivationWriter(p, model="net")):
        with pytest.raises(error, match=match):
            entry(str(damaged))
    assert _files_below(Path(damaged)) == before


@pytest.mark.parametrize("edit", ["dropped", "false"])
def test_a_layer_that_lost_its_ready_mark_but_holds_data_is_damage_not_deleted(damaged, edit):
    """A writer marks a layer ready (``topoxr_ready``) before its first commit, so a
    layer without the mark that holds committed data lost the attribute: verify and
    store_summary report it, open_store refuses it (it left the layer out without a
    word, and naps with it), and a writer refuses to open the model instead of deleting the
    layer as one half-created by a crashed writer (it did, and nothing said so)."""
    layer = Path(damaged) / script.MODEL / "dense"
    _edit_attributes(layer / "zarr.json", (lambda a: a.pop("topoxr_ready")) if edit == "dropped"
                     else (lambda a: a.update(topoxr_ready=False)))
    committed = int(zarr.open_array(layer / "committed", mode="r")[:].sum())
    assert committed > 0
    place = "layer 'dense' of model 'net'"
    problems = topoxr.verify(str(damaged), record=False).problems
    assert [p.node for p in problems] == ["net/dense"]
    assert place in problems[0].what and "topoxr_ready" in problems[0].what
    assert f"{committed} committed" in problems[0].what
    summary = store_summary(damaged)
    assert len(summary["problems"]) == 1 and place in summary["problems"][0]
    assert summary["models"]["net"]["layers"]["dense"]["problems"]
    with pytest.raises(StoreCorruptionError, match=f"{place}.*topoxr_ready"):
        open_store(damaged)
    before = _files_below(Path(damaged))
    with pytest.raises(StoreCorruptionError, match=f"{place}.*topoxr_ready"):
        topoxr.ActivationWriter(str(damaged), model="net")
    after = _files_below(Path(damaged))
    assert {p: b for p, b in after.items() if p.is_relative_to(layer)} == \
        {p: b for p, b in before.items() if p.is_relative_to(layer)}  # nothing deleted


def test_a_layer_half_created_by_a_killed_writer_is_still_removed_silently(tmp_path):
    """The real thing: a writer killed after creating a layer's arrays, before its first
    commit (a layer with string labels is created when its first batch is written).
    Without the ready mark (the state a kill a moment earlier leaves) and with nothing
    committed, verify and store_summary do not count it and the next writer removes it,
    as before."""
    store = tmp_path / "run.zarr"
    code = textwrap.dedent(f"""
        import os, numpy as np, topoxr
        w = topoxr.ActivationWriter({str(store)!r}, model="m")
        w.write("h", np.ones((4, 3), "f4"), sample=np.arange(4))
        w.flush()
        w.write("late", np.ones((4, 2), "f4"), sample=np.arange(4), label=np.array(list("abab")))
        os.kill(os.getpid(), 9)
    """)
    subprocess.run([sys.executable, "-c", code], check=False, timeout=120)
    late = store / "m" / "late"
    assert (late / "committed" / "zarr.json").exists()
    assert not list((late / "committed").glob("c*")) and not list((late / "sample").glob("c*"))
    _edit_attributes(late / "zarr.json", lambda a: a.pop("topoxr_ready"))
    assert topoxr.verify(str(store), record=False).ok
    summary = store_summary(store)
    assert summary["problems"] == [] and list(summary["models"]["m"]["layers"]) == ["h"]
    with topoxr.ActivationWriter(str(store), model="m") as writer:
        assert writer.layers == ["h"]
    assert not late.exists()
    assert open_store(store)["m/h"].activation.shape == (3, 4, 1)


def _open_fifo_once_read(path: Path, timeout: float = 120.0) -> int:
    """Open the FIFO ``path`` for writing as soon as a reader has opened it."""
    import fcntl

    deadline = time.monotonic() + timeout
    while True:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as err:
            if err.errno != errno.ENXIO or time.monotonic() > deadline:
                raise
            time.sleep(0.01)
            continue
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        return fd


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs a FIFO")
def test_verify_records_no_verdict_over_a_store_a_writer_changed_during_the_run(tmp_path,
                                                                              caplog):
    """verify reads without the lock (writers may run) and records its outcome under it.
    A real second writer appends an epoch and closes while verify reads (verify is held
    on one activation chunk, made a FIFO that gets the chunk's bytes once the writer has
    closed); verify never read the new epoch, so it records nothing. A byte then changed
    in the new epoch's chunk is found by the next verify. It recorded "problems 0"."""
    import threading

    store = tmp_path / "run.zarr"
    rng = np.random.default_rng(0)

    def append(epoch):
        with topoxr.ActivationWriter(str(store), model="m", chunk_samples=4) as writer:
            writer.write("h", rng.normal(size=(8, 3)).astype(np.float32),
                         sample=np.arange(8), label=np.arange(8) % 2, epoch=epoch)
            writer.complete_epoch(epoch)

    append(0)
    assert topoxr.verify(str(store)).ok
    assert store_summary(store)["verified"]["problems"] == 0  # nothing changed: recorded
    chunks = store / "m" / "h" / "activation"
    before = {p.name for p in chunks.iterdir()}
    held = chunks / "c.0.0.0"
    data = held.read_bytes()
    held.unlink()
    os.mkfifo(held)
    outcome = {}
    reader = threading.Thread(target=lambda: outcome.update(report=topoxr.verify(str(store))))
    caplog.set_level(logging.WARNING, logger="topoxr.store")
    reader.start()
    fd = _open_fifo_once_read(held)  # verify is reading the chunk
    try:
        append(1)  # the second writer: not refused, verify holds no lock while reading
    finally:
        os.write(fd, data)
        os.close(fd)
        reader.join(120)
    assert not reader.is_alive() and outcome["report"].ok  # what it read is intact
    assert "changed while verify read it" in caplog.text
    held.unlink()
    held.write_bytes(data)
    assert store_summary(store)["verified"] is None  # ... but it did not read epoch 1
    new = sorted(chunks / name for name in {p.name for p in chunks.iterdir()} - before)
    assert new and store_summary(store)["models"]["m"]["layers"]["h"]["epochs"] == [0, 1]
    flipped = bytearray(new[0].read_bytes())
    flipped[len(flipped) // 2] ^= 0x01
    new[0].write_bytes(bytes(flipped))
    report = topoxr.verify(str(store))
    assert [new[0].name in p.what for p in report.problems] == [True]
    assert store_summary(store)["verified"]["problems"] == 1


def test_store_summary_reports_a_model_whose_name_attribute_is_not_its_node(damaged):
    """open_store and verify call such a model damaged (check_model_name); `topoxr info`
    said all was well."""
    _edit_attributes(Path(damaged) / script.MODEL / "zarr.json",
                     lambda a: a.update(topoxr_model="other"))
    with pytest.raises(StoreCorruptionError) as refused:
        open_store(damaged)
    verified = [p.what for p in topoxr.verify(str(damaged), record=False).problems]
    assert verified == [str(refused.value)]
    assert store_summary(damaged)["problems"] == verified


def _flip_middle(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(("rel", "damage"), [
    ("committed/c.0.1", "flip"), ("sample/c.0", "flip"), ("epoch_complete/c.0", "flip"),
    ("epoch/c.0", "flip"), ("activation/zarr.json", "truncate"), ("label/zarr.json", "truncate"),
    ("activation/c.0.1.1", "flip"),
])
def test_verify_reports_each_damaged_file_once(damaged, rel, damage):
    """One damaged file, one problem (and one recorded): a flipped chunk of the
    coordinates or the mask, or a cut array ``zarr.json``, was reported twice."""
    path = Path(damaged) / script.MODEL / "dense" / rel
    if damage == "flip":
        _flip_middle(path)
    else:
        path.write_bytes(path.read_bytes()[:10])
    report = topoxr.verify(str(damaged))
    named = f"{script.MODEL}/dense/{rel}"
    assert [named in p.what for p in report.problems] == [True], \
        [p.line() for p in report.problems]
    assert store_summary(damaged)["verified"]["problems"] == 1
