"""A store zipped whole is read as the folder it came from, and never written into.

Real stores are written to disk, zipped by the standard library (``shutil.make_archive``
and ``zipfile``) and read back through every reader: ``open_store``, ``naps``,
``load_layout``, ``verify``, ``store_summary`` and plain xarray over zarr's own
``ZipStore``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr

import topoxr
from topoxr import ActivationWriter, StoreError, open_store, store_summary, verify
from topoxr.layouts import attach, load_layout, save_layout
from topoxr.store import StoreCorruptionError


def _store(folder: Path) -> Path:
    path = folder / "run.zarr"
    rng = np.random.default_rng(0)
    with ActivationWriter(str(path), model="mlp") as writer:
        for epoch in (0, 1):
            for start in (0, 24):
                ids = np.arange(start, start + 24)
                writer.write("hidden", rng.random((24, 12), dtype=np.float32), epoch=epoch,
                             sample=ids, label=ids % 3)
                writer.write("out", rng.random((24, 3), dtype=np.float32), epoch=epoch,
                             sample=ids, label=ids % 3)
            writer.complete_epoch(epoch)
    laid = attach(topoxr.naps(open_store(str(path))["mlp/hidden"]), method="pca")
    save_layout(str(path), "mlp", "hidden", laid, "pca")
    return path


def _zip(folder: Path, name: str = "run") -> Path:
    return Path(shutil.make_archive(str(folder.parent / name), "zip", folder))


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def zipped(tmp_path_factory):
    folder = _store(tmp_path_factory.mktemp("zip"))
    return folder, _zip(folder)


@pytest.mark.parametrize("form", ["path", "zip::file://", "zip://::file://"])
def test_a_zipped_store_reads_as_the_folder_it_came_from(zipped, form):
    """fsspec's zip file system listed every layer of a model as a child named after
    the model: ``open_store`` called the store damaged ("m/m/zarr.json is missing")."""
    folder, archive = zipped
    url = str(archive) if form == "path" else f"{form}{archive}"
    tree, expected = open_store(url), open_store(str(folder))
    for layer in ("mlp/hidden", "mlp/out"):
        xr.testing.assert_identical(tree[layer].to_dataset().load(),
                                    expected[layer].to_dataset().load())
    xr.testing.assert_identical(topoxr.naps(tree["mlp/hidden"]),
                                topoxr.naps(expected["mlp/hidden"]))
    np.testing.assert_array_equal(load_layout(url, "mlp", "hidden", "pca").x,
                                  load_layout(str(folder), "mlp", "hidden", "pca").x)
    summary, expected_summary = store_summary(url), store_summary(str(folder))
    assert summary["models"] == expected_summary["models"]
    assert summary["problems"] == [] and summary["store"] == str(archive)


def test_verify_reads_a_zipped_store_and_leaves_the_archive_as_it_was(zipped):
    _, archive = zipped
    before = _digest(archive)
    report = verify(str(archive))
    assert report.ok, report.problems
    assert report.layers == 2 and report.chunks_read > 0
    assert _digest(archive) == before
    assert not os.path.exists(f"{archive}.topoxr-lock")


def test_plain_xarray_reads_the_zipped_store_through_zarrs_zip_store(zipped):
    folder, archive = zipped
    plain = xr.open_datatree(zarr.storage.ZipStore(str(archive), mode="r"), engine="zarr")
    np.testing.assert_array_equal(plain["mlp/hidden"].activation.values,
                                  open_store(str(folder))["mlp/hidden"].activation.values)


@pytest.mark.parametrize("mode", ["a", "w"])
def test_writers_refuse_a_zipped_store_and_change_nothing(zipped, mode):
    _, archive = zipped
    before = _digest(archive)
    with pytest.raises(StoreError, match="zip archive: topoxr reads it but cannot record"):
        ActivationWriter(str(archive), model="mlp", mode=mode)
    laid = attach(topoxr.naps(open_store(str(archive))["mlp/hidden"]), method="pca")
    with pytest.raises(StoreError, match="zip archive: topoxr reads it but cannot save"):
        save_layout(str(archive), "mlp", "hidden", laid, "other")
    assert _digest(archive) == before


@pytest.mark.parametrize("url", ["zip::memory://run.zip", "zip://mlp::file:///tmp/run.zip"])
def test_a_zip_url_topoxr_cannot_read_as_a_store_is_refused_by_name(url):
    with pytest.raises(StoreError, match="local path of its .zip file"):
        open_store(url)


def test_a_damaged_byte_in_a_zipped_chunk_is_named(zipped, tmp_path):
    folder, _ = zipped
    archive = tmp_path / "stored.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as out:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                out.write(path, path.relative_to(folder).as_posix())
    member = zipfile.ZipFile(archive).getinfo("mlp/hidden/activation/c.0.0.0")
    data = bytearray(archive.read_bytes())
    data[member.header_offset + 30 + len(member.filename) + len(member.extra) + 10] ^= 0xFF
    archive.write_bytes(bytes(data))
    with pytest.raises(StoreCorruptionError, match=r"'activation', chunk c\.0\.0\.0"):
        open_store(str(archive))["mlp/hidden"].activation.values
    problems = verify(str(archive)).problems
    assert [p.node for p in problems] == ["mlp/hidden"]


def test_save_layout_names_its_arguments_when_given_no_laid_object(zipped):
    folder, _ = zipped
    with pytest.raises(TypeError, match=r"laid must be .*got str"):
        save_layout(str(folder), "mlp", "hidden", "pca", "name")


def test_the_command_line_reads_a_zipped_store_and_refuses_to_lay_out_into_it(zipped, capsys):
    from topoxr.cli import main

    _, archive = zipped
    before = _digest(archive)
    assert main(["info", str(archive)]) == 0
    assert "layer hidden" in capsys.readouterr().out
    assert main(["verify", str(archive), "--no-progress"]) == 0
    assert main(["layout", str(archive), "--method", "pca", "--no-progress"]) == 1
    assert "zip archive: topoxr reads it but cannot save a layout" in capsys.readouterr().err
    assert _digest(archive) == before
