"""Identical small files of a local store are hard links, and read as copies would.

Every layer of a model stores the same per-sample columns and, for layers of one width,
the same array metadata; :class:`topoxr.ActivationWriter` makes such files hard links
to the first one written (``link_identical_files``). These tests write real stores on
disk and check the inodes, the values through topoxr and plain xarray, and that a
change to one name never shows through another.
"""

from __future__ import annotations

import errno
import json
import os

import numpy as np
import pytest
import xarray as xr
import zarr

from topoxr import ActivationWriter, open_store, verify

N = 12


def _write(path: str, epoch: int = 0, layers: tuple[str, ...] = ("a", "b", "c"),
           **kwargs) -> None:
    rng = np.random.default_rng(epoch)
    ids = np.arange(N)
    labels = ids % 3
    with ActivationWriter(path, model="m", expected_samples=N, **kwargs) as writer:
        for name in layers:
            width = 6 if name == "c" else 4
            writer.write(name, rng.standard_normal((N, width)).astype(np.float32), sample=ids,
                         label=labels, prediction=(2 * ids + epoch) % 3, epoch=epoch)


def _files(path: str) -> dict[str, os.stat_result]:
    found = {}
    for folder, _, names in os.walk(path):
        for name in names:
            full = os.path.join(folder, name)
            found[os.path.relpath(full, path)] = os.stat(full)
    return found


GENERATION = "topoxr_generation"


def _without_token(ds: xr.Dataset) -> xr.Dataset:
    """``ds`` without its layer's token of its values (each store's layers have their own)."""
    out = ds.copy()
    out.attrs = {k: v for k, v in ds.attrs.items() if k != GENERATION}
    return out


def test_identical_files_are_links_and_the_store_reads_as_with_copies(tmp_path):
    linked, plain = str(tmp_path / "linked.zarr"), str(tmp_path / "plain.zarr")
    _write(linked)
    _write(plain, link_identical_files=False)
    files = _files(linked)
    assert set(files) == set(_files(plain))  # the same files, by name
    assert all(st.st_nlink == 1 for st in _files(plain).values())
    # each layer's copy of a per-sample column is one file with three names ...
    for column in ("sample/c.0", "label/c.0", "prediction/c.0.0", "correct/c.0.0",
                   "committed/c.0.0", "epoch/c.0", "epoch_complete/c.0",
                   "sample/zarr.json"):
        inodes = {files[f"m/{layer}/{column}"].st_ino for layer in "abc"}
        assert len(inodes) == 1, column
        assert files[f"m/a/{column}"].st_nlink >= 3, column
    # ... layers of one width share their neuron coordinate, not their activations
    assert files["m/a/neuron/c.0"].st_ino == files["m/b/neuron/c.0"].st_ino
    assert files["m/a/neuron/c.0"].st_ino != files["m/c/neuron/c.0"].st_ino
    assert len({files[f"m/{layer}/activation/c.0.0.0"].st_ino for layer in "abc"}) == 3
    # every byte equal to the store of plain files, for topoxr and plain xarray; the root
    # holds the time of creation and each layer a token of its values of its own
    groups = {"zarr.json"} | {f"m/{layer}/zarr.json" for layer in "abc"}
    for name in files:
        with open(os.path.join(linked, name), "rb") as f1, \
                open(os.path.join(plain, name), "rb") as f2:
            one, other = f1.read(), f2.read()
            if name not in groups:
                assert one == other, name
            elif name != "zarr.json":
                a, b = json.loads(one), json.loads(other)
                assert a["attributes"].pop(GENERATION) != b["attributes"].pop(GENERATION)
                assert a == b, name
    for layer in "abc":
        xr.testing.assert_identical(open_store(linked)[f"m/{layer}"].to_dataset().load(),
                                    open_store(plain)[f"m/{layer}"].to_dataset().load())
        xr.testing.assert_identical(
            _without_token(xr.open_datatree(linked, engine="zarr")[f"m/{layer}"].to_dataset()),
            _without_token(xr.open_datatree(plain, engine="zarr")[f"m/{layer}"].to_dataset()))
    assert verify(linked).ok


def test_changing_one_layer_leaves_the_other_names_of_its_files_as_they_were(tmp_path):
    path = str(tmp_path / "run.zarr")
    _write(path)
    before = _files(path)
    assert before["m/a/epoch/c.0"].st_ino == before["m/b/epoch/c.0"].st_ino
    b_before = open_store(path)["m/b"].to_dataset().load()
    _write(path, epoch=1, layers=("a",))  # a second epoch of layer a only
    after = _files(path)
    tree = open_store(path)
    np.testing.assert_array_equal(tree["m/a"].epoch, [0, 1])
    np.testing.assert_array_equal(tree["m/b"].epoch, [0])
    xr.testing.assert_identical(tree["m/b"].to_dataset().load(), b_before)
    np.testing.assert_array_equal(
        zarr.open_array(f"{path}/m/b/epoch", mode="r")[:], [0])
    # a's files were replaced (new inodes); b's kept theirs, with their old bytes
    assert after["m/a/epoch/c.0"].st_ino != before["m/a/epoch/c.0"].st_ino
    assert after["m/b/epoch/c.0"].st_ino == before["m/b/epoch/c.0"].st_ino
    assert verify(path).ok


@pytest.mark.parametrize("change", ["replaced", "rewritten_in_place"])
def test_a_file_changed_behind_the_writer_is_not_linked_to(tmp_path, change):
    path = str(tmp_path / "run.zarr")
    ids = np.arange(N)
    with ActivationWriter(path, model="m", buffer_bytes=0) as writer:
        writer.write("a", np.ones((N, 4), np.float32), sample=ids)
        source = os.path.join(path, "m", "a", "sample", "c.0")
        with open(source, "rb") as f:
            original = f.read()
        other = original + b"\0" * 8  # any other bytes (and size)
        if change == "replaced":
            with open(source + ".tmp", "wb") as f:
                f.write(other)
            os.replace(source + ".tmp", source)
        else:
            with open(source, "r+b") as f:
                f.write(other)
        # layer b's sample column has a's original bytes: it must not become a's file
        writer.write("b", np.ones((N, 4), np.float32), sample=ids)
        target = os.path.join(path, "m", "b", "sample", "c.0")
        assert os.stat(target).st_ino != os.stat(source).st_ino
        with open(target, "rb") as f:
            assert f.read() == original
        with open(source + ".tmp", "wb") as f:  # a's file as it was, for the rest
            f.write(original)
        os.replace(source + ".tmp", source)
    np.testing.assert_array_equal(open_store(path)["m/b"].sample, ids)
    assert verify(path).ok


def test_a_file_system_that_refuses_links_gets_plain_files(tmp_path, monkeypatch):
    path, plain = str(tmp_path / "run.zarr"), str(tmp_path / "plain.zarr")
    link = os.link

    def refuse(src, dst, *args, **kwargs):  # as a file system without hard links would
        if os.fspath(src).startswith(os.path.join(path, "m")):
            raise PermissionError(errno.EPERM, "Operation not permitted")
        return link(src, dst, *args, **kwargs)  # the writer's lock file

    monkeypatch.setattr(os, "link", refuse)
    _write(path)
    monkeypatch.undo()
    _write(plain, link_identical_files=False)
    assert all(st.st_nlink == 1 for st in _files(path).values())
    for layer in "abc":
        xr.testing.assert_identical(open_store(path)[f"m/{layer}"].to_dataset().load(),
                                    open_store(plain)[f"m/{layer}"].to_dataset().load())


@pytest.mark.parametrize("kwargs", [{"fsync": True}, {"link_identical_files": False}])
def test_no_links_with_fsync_or_when_turned_off(tmp_path, kwargs):
    path = str(tmp_path / "run.zarr")
    _write(path, **kwargs)
    assert all(st.st_nlink == 1 for st in _files(path).values())
    np.testing.assert_array_equal(open_store(path)["m/c"].sample, np.arange(N))


def test_damage_to_a_shared_file_is_reported_for_every_layer_that_holds_it(tmp_path):
    """One inode serves every layer's copy: a flipped byte in it (as a disk would
    damage it, in place) shows in each of those layers, loudly, not in one only."""
    path = str(tmp_path / "run.zarr")
    _write(path)
    shared = os.path.join(path, "m", "a", "label", "c.0")
    assert os.stat(shared).st_nlink >= 3
    with open(shared, "r+b") as f:
        first = f.read(1)
        f.seek(0)
        f.write(bytes([first[0] ^ 0xFF]))
    report = verify(path)
    damaged = {p.node for p in report.problems if "label" in p.what}
    assert damaged == {"m/a", "m/b", "m/c"}


def test_zarr_python_writes_into_one_layer_leave_the_other_layers_as_they_were(tmp_path):
    """The links rest on zarr-python replacing a file by renaming a new one over its name
    (its local store since zarr 3.1.3; topoxr requires a zarr that does): new values and
    new attributes written with plain zarr into one layer's linked arrays must not show
    in the other layers, whose files keep their inodes and bytes."""
    path = str(tmp_path / "run.zarr")
    _write(path)
    before = _files(path)
    for name in ("label/c.0", "label/zarr.json", "sample/zarr.json"):
        assert before[f"m/a/{name}"].st_ino == before[f"m/b/{name}"].st_ino, name
    others = {layer: open_store(path)[f"m/{layer}"].to_dataset().load() for layer in "bc"}
    with open(os.path.join(path, "m", "b", "label", "c.0"), "rb") as f:
        label_bytes = f.read()
    label = zarr.open_array(f"{path}/m/a/label", mode="r+")  # a plain path: zarr's LocalStore
    label[:] = 7
    label.attrs["note"] = "relabelled"
    zarr.open_array(f"{path}/m/a/sample", mode="r+").attrs["note"] = "checked"
    after = _files(path)
    np.testing.assert_array_equal(zarr.open_array(f"{path}/m/a/label", mode="r")[:], 7)
    for name in ("label/c.0", "label/zarr.json", "sample/zarr.json"):
        assert after[f"m/a/{name}"].st_ino != before[f"m/a/{name}"].st_ino, name
        for layer in "bc":
            assert after[f"m/{layer}/{name}"].st_ino == before[f"m/{layer}/{name}"].st_ino
    with open(os.path.join(path, "m", "b", "label", "c.0"), "rb") as f:
        assert f.read() == label_bytes
    for layer, expected in others.items():
        xr.testing.assert_identical(open_store(path)[f"m/{layer}"].to_dataset().load(), expected)
        plain = xr.open_datatree(path, engine="zarr")[f"m/{layer}"].to_dataset()
        np.testing.assert_array_equal(plain.label, np.arange(N) % 3)
        assert "note" not in plain.label.attrs and "note" not in plain.sample.attrs
    assert verify(path).ok


def test_rewriting_a_file_with_the_bytes_it_links_to_leaves_no_temporary_file(tmp_path):
    """One writer recording several epochs writes each layer's ``epoch_complete`` chunk
    again with bytes it wrote before, to a name that already is (a link to) the file it
    remembers for them. Linking that name again by ``rename`` does nothing at all
    (POSIX: renaming one name of a file onto another name of the same file is a no-op),
    and the temporary name used to stay in the array folder, where no later writer
    looks: one more file per layer and epoch."""
    linked, plain = str(tmp_path / "linked.zarr"), str(tmp_path / "plain.zarr")
    rng = np.random.default_rng(0)
    batches = [(epoch, start, rng.standard_normal((N // 2, 4)).astype(np.float32))
               for epoch in range(4) for start in (0, N // 2)]
    for path, kwargs in ((linked, {}), (plain, {"link_identical_files": False})):
        with ActivationWriter(path, model="m", **kwargs) as writer:
            for epoch, start, values in batches:
                ids = np.arange(start, start + N // 2)
                for layer in "ab":
                    writer.write(layer, values, sample=ids, label=ids % 3, epoch=epoch)
    files = _files(linked)
    assert not [name for name in files if name.endswith(".partial")]
    assert set(files) == set(_files(plain))
    assert files["m/a/epoch_complete/c.0"].st_ino == files["m/b/epoch_complete/c.0"].st_ino
    assert verify(linked).ok
    for layer in "ab":
        xr.testing.assert_identical(open_store(linked)[f"m/{layer}"].to_dataset().load(),
                                    open_store(plain)[f"m/{layer}"].to_dataset().load())
