"""The data path: whole-chunk writes, codecs, float16 storage and the zarrs reader."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import xarray as xr
import zarr

import topoxr
from topoxr import ActivationWriter, StoreError, open_store
from topoxr._codecs import COMPRESSORS

N = 6


def _values(ids: np.ndarray, epoch: int) -> np.ndarray:
    return (np.sin(ids[:, None] * 0.3 + np.arange(N)[None, :]) * (1 + epoch)).astype(np.float32)


def _write(path, batches, epochs=(0, 1), **kwargs) -> None:
    with ActivationWriter(str(path), model="m", **kwargs) as w:
        for epoch in epochs:
            for ids in batches:
                w.write("h", _values(ids, epoch), sample=ids, label=ids % 3,
                        prediction=(ids + epoch) % 3, epoch=epoch)


def _check(path, n, epochs=(0, 1), rtol=0.0) -> xr.Dataset:
    ds = open_store(str(path))["m/h"].to_dataset()
    ids = np.arange(n)
    assert ds.sample.values.tolist() == ids.tolist()
    for e, epoch in enumerate(epochs):
        np.testing.assert_allclose(ds.activation.values[:, :, e].T, _values(ids, epoch),
                                   rtol=rtol, atol=rtol)
        assert ds.prediction.values[:, e].tolist() == ((ids + epoch) % 3).tolist()
        assert ds.correct.values[:, e].tolist() == ((ids + epoch) % 3 == ids % 3).tolist()
    assert ds.committed.values.all()
    return ds


@pytest.mark.parametrize("sizes", [[5, 3, 7, 1, 9], [16, 16, 3], [1] * 11])
def test_batches_straddling_chunks_are_stored_exactly(tmp_path, sizes):
    """Batches ending inside chunks: completed from the cache, never lost or shifted."""
    bounds = np.cumsum([0, *sizes])
    batches = [np.arange(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    _write(tmp_path / "s.zarr", batches, chunk_samples=4)
    ds = _check(tmp_path / "s.zarr", bounds[-1])
    # every stored chunk decodes with plain zarr to what the reader returns
    act = zarr.open_array(str(tmp_path / "s.zarr" / "m" / "h" / "activation"), mode="r")
    assert act.chunks[1] == 4
    np.testing.assert_array_equal(act[:, : bounds[-1], :], ds.activation.values)


def test_a_resumed_writer_completes_a_partial_chunk_from_the_store(tmp_path):
    """A new writer has no cached chunk: the committed part is read back, not dropped."""
    path = tmp_path / "r.zarr"
    _write(path, [np.arange(0, 6)], epochs=(0,), chunk_samples=8)
    _write(path, [np.arange(0, 3)], epochs=(1,))  # epoch 1 left half done
    _write(path, [np.arange(3, 6)], epochs=(1,))  # a new writer finishes the chunk
    _check(path, 6, epochs=(0, 1))


@pytest.mark.parametrize("compressor", ["none", "lz4", "zstd", "zstd-1", "blosc-zstd", None])
def test_every_compressor_round_trips_and_plain_xarray_reads_it(tmp_path, compressor):
    path = tmp_path / "c.zarr"
    _write(path, [np.arange(0, 8), np.arange(8, 12)], compressor=compressor)
    ds = _check(path, 12)
    plain = xr.open_datatree(str(path), engine="zarr")["m/h"].to_dataset()
    np.testing.assert_array_equal(plain.activation.values[:, :12, :2], ds.activation.values)
    codecs = zarr.open_array(str(path / "m" / "h" / "activation"), mode="r").compressors
    names = {"none": [], None: [], "lz4": ["BloscCodec"], "blosc-zstd": ["BloscCodec"]}
    expected = [*names.get(compressor, ["ZstdCodec"]), "Crc32cCodec"]  # checksum last
    assert [type(c).__name__ for c in codecs] == expected


@pytest.mark.parametrize("compressor", [*COMPRESSORS, None])
def test_every_compressor_stores_small_chunks_exactly(tmp_path, compressor):
    """Whole chunks of 8 samples (and a partial one), in two layers of equal values
    (the second reuses the first's encoded chunks): blosc's codec object is not hashable
    and made every commit of such chunks fail."""
    path = tmp_path / "small.zarr"
    batches = [np.arange(0, 16), np.arange(16, 20)]
    with ActivationWriter(str(path), model="m", compressor=compressor, chunk_samples=8) as w:
        for epoch in (0, 1):
            for ids in batches:
                for layer in ("h", "twin"):
                    w.write(layer, _values(ids, epoch), sample=ids, label=ids % 3,
                            prediction=(ids + epoch) % 3, epoch=epoch)
    tree = open_store(str(path))
    for layer in ("h", "twin"):
        ds = tree[f"m/{layer}"].to_dataset()
        for epoch in (0, 1):
            np.testing.assert_array_equal(ds.activation.sel(epoch=epoch).values.T,
                                          _values(np.arange(20), epoch))
        np.testing.assert_array_equal(ds.prediction.sel(epoch=1).values, (np.arange(20) + 1) % 3)
        arr = zarr.open_array(str(path / "m" / layer / "activation"), mode="r")
        assert arr.chunks[1] == 8
        np.testing.assert_array_equal(arr[:, :, 0], _values(np.arange(20), 0).T)


def test_bad_storage_options_are_refused_before_anything_is_written(tmp_path):
    path = tmp_path / "bad.zarr"
    with pytest.raises(StoreError, match="compressor must be one of"):
        ActivationWriter(str(path), model="m", compressor="gzip9")
    with pytest.raises(StoreError, match="bfloat16' is not supported.*'float16'"):
        ActivationWriter(str(path), model="m", dtype="bfloat16")
    with pytest.raises(StoreError, match="dtype must be one of"):
        ActivationWriter(str(path), model="m", dtype="int8")
    assert not path.exists()


def test_float16_storage_halves_the_bytes_within_the_stated_error(tmp_path):
    path = tmp_path / "f16.zarr"
    batches = [np.arange(0, 8), np.arange(8, 16)]
    _write(path, batches, dtype="float16", compressor="none")
    ds = _check(path, 16, rtol=2.0**-11)  # 11 significant bits: relative error <= 2**-11
    assert ds.activation.dtype == np.float32  # readers get float32
    arr = zarr.open_array(str(path / "m" / "h" / "activation"), mode="r")
    assert arr.dtype == np.float16
    ref = _values(np.arange(16), 1)
    np.testing.assert_array_equal(ds.activation.values[:, :, 1].T,
                                  ref.astype(np.float16).astype(np.float32))
    _write(path, batches, dtype="float16")  # resume: the rounded values count as identical
    with ActivationWriter(str(path), model="m") as w:
        with pytest.raises(StoreError, match="exceed 65504, the largest float16"):
            w.write("h", np.full((2, N), 7e4), sample=[0, 1], epoch=2)
    assert open_store(str(path))["m/h"].sizes["epoch"] == 2  # nothing was written


def test_a_zstd_layer_keeps_its_codec_when_a_writer_of_today_resumes(tmp_path):
    """Earlier versions wrote zstd activations: a resuming writer keeps the layer's codec."""
    path = tmp_path / "old.zarr"
    _write(path, [np.arange(0, 12)], epochs=(0,), compressor="zstd")
    _write(path, [np.arange(0, 5), np.arange(5, 12)], epochs=(1,))  # today's writer resumes
    codecs = zarr.open_array(str(path / "m" / "h" / "activation"), mode="r").compressors
    assert [type(c).__name__ for c in codecs] == ["ZstdCodec", "Crc32cCodec"]  # kept
    _check(path, 12)


@pytest.mark.parametrize("zarrs", ["1", "0"])
def test_reading_with_and_without_zarrs_gives_the_same_values(tmp_path, zarrs):
    """``TOPOXR_ZARRS=0`` (or zarrs not installed) reads through zarr-python's pipeline."""
    path = tmp_path / "z.zarr"
    _write(path, [np.arange(0, 10)], compressor="lz4")
    code = textwrap.dedent(f"""
        import numpy as np, topoxr
        from topoxr._chunkio import read_array, zarrs_available
        tree = topoxr.open_store({str(path)!r})
        import zarr
        arr = zarr.open_array({str(path / "m" / "h" / "activation")!r}, mode="r")
        pipeline = type(read_array(arr).async_array.codec_pipeline).__name__
        act = tree["m/h"].activation.values
        np.save(sys.argv[1], act)
        print(zarrs_available(), pipeline)
    """).replace("import numpy", "import sys\nimport numpy", 1)
    env = {**os.environ, "TOPOXR_ZARRS": zarrs}
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "v.npy")],
                         capture_output=True, text=True, check=True, env=env)
    available, pipeline = out.stdout.split()
    if zarrs == "0":
        assert (available, pipeline) == ("False", "BatchedCodecPipeline")
    elif importlib.util.find_spec("zarrs") is not None:
        assert (available, pipeline) == ("True", "ZarrsCodecPipeline")
    np.testing.assert_array_equal(np.load(tmp_path / "v.npy")[:, :, 0].T,
                                  _values(np.arange(10), 0))


def test_naps_of_a_store_read_in_multi_chunk_blocks_matches_numpy(tmp_path):
    path = tmp_path / "n.zarr"
    _write(path, [np.arange(s, s + 5) for s in range(0, 40, 5)], chunk_samples=5)
    layer = open_store(str(path))["m/h"].to_dataset()
    assert layer.activation.data.numblocks[1] == 1  # eight zarr chunks in one dask block
    nap = topoxr.naps(layer, by="label", normalize=False)
    values, labels = layer.activation.values, layer.label.values
    for g in range(3):
        np.testing.assert_allclose(nap.sel(label=g).values,
                                   values[:, labels == g, :].mean(axis=1), rtol=1e-5, atol=1e-6)


def test_direct_chunk_reads_equal_zarr_and_refuse_a_changed_byte(tmp_path):
    """open_store reads default (bytes + crc32c) chunks itself: same values as zarr,
    the fill value for an absent chunk, and a flipped byte is an error, never a value."""
    import zarr

    from topoxr._chunkio import direct_reads, read_region

    path = str(tmp_path / "r.zarr")
    rng = np.random.default_rng(4)
    values = rng.standard_normal((40, 6)).astype(np.float32)
    with ActivationWriter(path, model="m", chunk_samples=8) as writer:
        for start in range(0, 40, 8):
            writer.write("h", values[start:start + 8], sample=np.arange(start, start + 8))
    arr = zarr.open_array(path + "/m/h/activation", mode="r")
    assert direct_reads(arr)
    for region in [(slice(0, 6), slice(0, 40), slice(0, 1)), (slice(1, 4), slice(5, 27), slice(0, 1))]:
        np.testing.assert_array_equal(read_region(arr, region), arr[region])
    chunk = tmp_path / "r.zarr" / "m" / "h" / "activation" / "c.0.2.0"
    data = bytearray(chunk.read_bytes())
    data[5] ^= 0x10
    chunk.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="crc32c"):
        read_region(arr, (slice(0, 6), slice(0, 40), slice(0, 1)))
    chunk.unlink()
    got = read_region(arr, (slice(0, 6), slice(16, 24), slice(0, 1)))
    assert np.isnan(got).all()  # as zarr reads an absent chunk; open_store names it


def test_small_arrays_decoded_directly_equal_zarr_and_a_changed_byte_is_named(tmp_path):
    """Arrays decoded here without zarr's event loop (zstd, transpose, crc32c; several
    chunks, short last ones) equal what zarr reads, whatever the selection; an absent
    chunk reads as zarr's fill value; a flipped byte is an error that open_store and
    the recorders' check name, never a value."""
    from zarr.codecs import Crc32cCodec, ZstdCodec

    from topoxr._chunkio import read_selection, reads_here
    from topoxr.store._schema import read_together
    from topoxr.store.reader import read_model_layers

    path = tmp_path / "r.zarr"
    rng = np.random.default_rng(7)
    with ActivationWriter(str(path), model="m", chunk_samples=16, compressor="zstd",
                          dtype="float16") as writer:
        for epoch in range(3):
            for start in range(0, 70, 10):
                ids = np.arange(start, start + 10)
                writer.write("h", rng.standard_normal((10, 4)), sample=ids, label=ids % 3,
                             prediction=(ids + epoch) % 3, epoch=epoch,
                             site=np.array([f"s{i % 2}" for i in ids]))
    arrays = dict(zarr.open_group(str(path / "m" / "h"), mode="r").arrays())
    assert arrays["activation"].nchunks > 5  # (4, 16, 1) chunks of a (4, 70, 3) array
    # a 1-D array of several chunks, the last short, one of them absent
    other = zarr.create_array(str(tmp_path / "other.zarr"), shape=(70,), chunks=(16,),
                              dtype="int32", fill_value=-7,
                              compressors=[ZstdCodec(), Crc32cCodec()])
    other[:] = np.arange(70, dtype=np.int32) * 3
    (tmp_path / "other.zarr" / "c" / "2").unlink()
    assert not reads_here(arrays["site"])  # strings: read by zarr
    for name, arr in {**arrays, "other": other}.items():
        selections = [..., slice(0, 5), slice(3, None), slice(60, 70), slice(5, 5),
                      slice(9, 2), slice(-12, -3)]
        if arr.ndim > 1:
            selections += [(slice(0, 17), slice(1, 3)), (slice(2, 3), slice(15, 33))]
        for selection in selections:
            got, want = read_selection(arr, selection), np.asarray(arr[selection])
            assert got.dtype == want.dtype and got.shape == want.shape, (name, selection)
            np.testing.assert_array_equal(got, want, err_msg=f"{name} {selection}")
        assert reads_here(arr) == (name != "site")
    assert (read_selection(other)[32:48] == -7).all()
    # the writer's loading: what zarr must read in one trip, the rest here, in order
    together = read_together([(arrays["site"], slice(0, 70)), (arrays["sample"], ...),
                              (arrays["committed"], (slice(0, 70), slice(0, 3)))])
    np.testing.assert_array_equal(together[0], np.asarray(arrays["site"][0:70]))
    np.testing.assert_array_equal(together[1], arrays["sample"][...])
    assert together[2].shape == (70, 3) and together[2].all()

    chunk = path / "m" / "h" / "label" / "c.0"
    data = bytearray(chunk.read_bytes())
    data[3] ^= 0x01
    chunk.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum"):
        read_selection(arrays["label"])
    for read in (lambda: open_store(str(path)), lambda: read_model_layers(str(path), "m")):
        with pytest.raises(topoxr.StoreCorruptionError,
                           match=r"array 'label', chunk c\.0 .*checksum"):
            read()


def test_local_listings_equal_what_zarr_lists(tmp_path):
    """The chunk and node listings that the checks walk on a local store themselves are
    the keys and names zarr's own ``list_prefix`` / ``list_dir`` give, and the nodes
    read directly are zarr's ``members()``: flat and nested chunk keys, a killed
    writer's temporary file, a lost chunk and a stray folder."""
    from zarr.core.sync import sync

    from topoxr._chunkio import local_members
    from topoxr.store._integrity import children, stored_chunks

    path = tmp_path / "r.zarr"
    with ActivationWriter(str(path), model="m", chunk_samples=8) as writer:
        for start in range(0, 24, 8):
            writer.write("h", np.ones((8, 3), np.float32), sample=np.arange(start, start + 8),
                         label=np.arange(start, start + 8) % 2)
    root = zarr.open_group(str(path), mode="a")
    nested = root.create_array("nested", shape=(4, 6), chunks=(2, 2), dtype="int32",
                               chunk_key_encoding={"name": "default", "separator": "/"})
    nested[...] = np.arange(24).reshape(4, 6)
    (path / "m" / "h" / "sample" / "c.0.123-4.partial").write_bytes(b"torn")
    (path / "m" / "h" / "activation" / "c.0.1.0").unlink()

    def zarr_chunk_keys(arr: zarr.Array) -> set[str]:
        prefix = f"{arr.path}/"

        async def keys() -> set[str]:
            return {k[len(prefix):] async for k in arr.store.list_prefix(prefix)
                    if not k.endswith("zarr.json")}
        return sync(keys())

    # nodes opened from the root, as the reader opens them
    store_root = zarr.open_group(str(path), mode="r", use_consolidated=False)
    layer = store_root["m/h"]
    arrays = [*(a for _, a in layer.arrays()), store_root["nested"]]
    assert any("/" in key for key in stored_chunks(arrays[-1]))  # nested keys: c/0/1
    for arr in arrays:
        assert stored_chunks(arr) == zarr_chunk_keys(arr), arr.path
    assert "c.0.1.0" not in stored_chunks(layer["activation"])
    assert "c.0.123-4.partial" in stored_chunks(layer["sample"])  # as zarr lists it

    async def zarr_names(group: zarr.Group) -> set[str]:
        prefix = f"{group.path}/" if group.path else ""
        return {k async for k in group.store.list_dir(prefix)}

    groups = (store_root, store_root["m"], layer)
    for group in groups:  # the nodes read directly are the nodes zarr opens
        ours, theirs = local_members(group), dict(group.members())
        assert sorted(ours) == sorted(theirs), group.path
        for name, node in theirs.items():
            assert type(ours[name]) is type(node) and ours[name].path == node.path
            assert ours[name].metadata.to_dict() == node.metadata.to_dict(), node.path
    assert local_members(zarr.open_group(zarr.storage.MemoryStore(), mode="w")) is None
    (path / "m" / "h" / "stray").mkdir()
    assert local_members(layer) is None  # a folder without zarr.json: zarr answers
    for group in groups:
        errors: list[str] = []
        assert set(children(group, errors)) == (sync(zarr_names(group))
                                                - {"zarr.json", "stray"}), group.path
        # a folder without zarr.json among the nodes is named, not skipped
        assert errors == (["m/h/stray/zarr.json is missing: the metadata of node 'm/h/stray' "
                           "was deleted"] if group is layer else [])


def test_arrays_read_from_identical_documents_keep_their_own_attributes(tmp_path):
    """Layers repeat the same array documents; the nodes read from them share the
    metadata zarr builds, but an attribute update on one array (zarr changes the dict
    in place) reaches neither its twin in another layer nor a later reading."""
    from topoxr._chunkio import local_members

    path = tmp_path / "twins.zarr"
    with ActivationWriter(str(path), model="m") as writer:
        for layer in ("a", "b"):
            writer.write(layer, np.ones((6, 3), np.float32), sample=np.arange(6),
                         label=np.arange(6) % 2)
    docs = {layer: (path / "m" / layer / "sample" / "zarr.json").read_bytes()
            for layer in ("a", "b")}
    assert docs["a"] == docs["b"]  # the case the shared metadata is for
    root = zarr.open_group(str(path), mode="r+", use_consolidated=False)
    first = {layer: local_members(root[f"m/{layer}"]) for layer in ("a", "b")}
    before = dict(first["b"]["sample"].attrs)
    first["a"]["sample"].update_attributes({"note": "only a"})
    assert first["a"]["sample"].attrs["note"] == "only a"
    assert dict(first["b"]["sample"].attrs) == before
    again = {layer: local_members(root[f"m/{layer}"]) for layer in ("a", "b")}
    assert again["a"]["sample"].attrs["note"] == "only a"  # read from its new document
    assert dict(again["b"]["sample"].attrs) == before
    for layer in ("a", "b"):  # and each node is what zarr itself opens
        for name, node in again[layer].items():
            assert node.metadata.to_dict() == root[f"m/{layer}/{name}"].metadata.to_dict()


def test_activation_chunks_are_stored_sample_major_as_the_batches_came(tmp_path):
    """An activation chunk file holds the batch rows ``(sample, neuron)`` as given, then
    their crc32c: zarr's ``transpose`` codec (order 2, 1, 0) states it, so zarr, plain
    xarray and topoxr all read the ``(neuron, sample, epoch)`` values back."""
    import google_crc32c

    path = tmp_path / "r.zarr"
    _write(path, [np.arange(0, 8), np.arange(8, 16)], chunk_samples=8)
    arr = zarr.open_array(str(path / "m/h/activation"), mode="r")
    assert [c.to_dict()["name"] for c in arr.metadata.codecs] == ["transpose", "bytes",
                                                                 "crc32c"]
    raw = (path / "m/h/activation/c.0.1.1").read_bytes()  # samples 8-15, epoch 1
    rows = np.frombuffer(raw[:-4], dtype="<f4").reshape(8, N)
    np.testing.assert_array_equal(rows, _values(np.arange(8, 16), 1))
    assert raw[-4:] == google_crc32c.value(raw[:-4]).to_bytes(4, "little")
    expected = np.stack([_values(np.arange(16), e).T for e in (0, 1)], axis=2)
    np.testing.assert_array_equal(arr[...], expected)
    np.testing.assert_array_equal(
        xr.open_datatree(str(path), engine="zarr")["m/h"].activation.values, expected)
    got = open_store(str(path))["m/h"].activation
    np.testing.assert_array_equal(got.values, expected)
    np.testing.assert_array_equal(got.isel(sample=slice(3, 13), neuron=slice(1, 4)).values,
                                  expected[1:4, 3:13])


@pytest.mark.parametrize("size", [0, 1, 7, 4096, (32 << 10) - 1, 32 << 10, (1 << 20) + 3])
def test_chunk_checksums_are_those_of_zarrs_crc32c_codec(size):
    """topoxr's checksums (the ``crc32c`` package: hardware crc32c, the GIL released from
    32 KiB on) are the values of ``google_crc32c``, which zarr's ``crc32c`` codec uses,
    for any length, unaligned starts and a checksum continued over a second buffer."""
    import google_crc32c

    from topoxr._chunkio import crc32c_bytes, crc32c_value

    raw = np.random.default_rng(size).integers(0, 256, size + 3, dtype=np.uint8)
    data = raw[3:]  # an unaligned start
    assert crc32c_value(data) == google_crc32c.value(data.tobytes())
    assert crc32c_bytes(data) == google_crc32c.value(data.tobytes()).to_bytes(4, "little")
    assert crc32c_bytes(data.tobytes()) == crc32c_bytes(data)  # bytes as arrays
    half = size // 2
    assert crc32c_value(data[half:], crc32c_value(data[:half])) == google_crc32c.value(
        data.tobytes())


def _as_previous_layout(path) -> None:
    """Rewrite a store as the previous version wrote it: chunk keys with ``/``
    (``c/0/1/1``, nested folders) in every array, and activation chunks in C order of
    ``(neuron, sample, epoch)`` with no ``transpose`` codec (crc32c redone)."""
    import json
    from pathlib import Path

    import google_crc32c

    for doc in Path(path).rglob("zarr.json"):
        meta = json.loads(doc.read_text())
        if meta.get("node_type") != "array":
            continue
        meta["chunk_key_encoding"] = {"name": "default", "configuration": {"separator": "/"}}
        chunk = meta["chunk_grid"]["configuration"]["chunk_shape"]
        transposed = any(c["name"] == "transpose" for c in meta["codecs"])
        meta["codecs"] = [c for c in meta["codecs"] if c["name"] != "transpose"]
        doc.write_text(json.dumps(meta))
        for file in doc.parent.glob("c.*"):
            raw = file.read_bytes()
            if transposed:
                stored = np.frombuffer(raw[:-4], dtype="<f4").reshape(chunk[::-1])
                data = np.ascontiguousarray(stored.transpose(2, 1, 0)).tobytes()
                raw = data + google_crc32c.value(data).to_bytes(4, "little")
            nested = doc.parent.joinpath(*file.name.split("."))
            nested.parent.mkdir(parents=True, exist_ok=True)
            nested.write_bytes(raw)
            file.unlink()


def test_a_store_of_the_previous_layout_reads_and_resumes_in_it(tmp_path):
    """Stores written before sample-major chunks and flat chunk keys read the same, pass
    verify, and a writer of today appends to their layers in their own layout."""
    path = tmp_path / "old.zarr"
    # as the previous version wrote it: plain files (it made no hard links, and
    # _as_previous_layout rewrites files in place, which a link would share)
    _write(path, [np.arange(0, 8), np.arange(8, 13)], chunk_samples=8,
           link_identical_files=False)
    expected = open_store(str(path))["m/h"].to_dataset().load()
    _as_previous_layout(path)
    assert (path / "m/h/activation/c/0/1/1").is_file() and not list(path.rglob("c.*"))
    arr = zarr.open_array(str(path / "m/h/activation"), mode="r")
    assert "transpose" not in [c.to_dict()["name"] for c in arr.metadata.codecs]
    xr.testing.assert_identical(open_store(str(path))["m/h"].to_dataset().load(), expected)
    assert topoxr.verify(str(path)).ok
    _write(path, [np.arange(0, 8), np.arange(8, 13)], epochs=(2,), chunk_samples=8)
    assert "transpose" not in [c.to_dict()["name"] for c in
                               zarr.open_array(str(path / "m/h/activation")).metadata.codecs]
    _check(path, 13, epochs=(0, 1, 2))
    assert (path / "m/h/activation/c/0/1/2").is_file() and not list(path.rglob("c.*"))
    assert topoxr.verify(str(path)).ok
    np.testing.assert_array_equal(
        xr.open_datatree(str(path), engine="zarr")["m/h"].activation.values,
        open_store(str(path))["m/h"].activation.values)


def test_direct_consolidation_writes_what_zarr_writes(tmp_path):
    """The writer's consolidation (read and written directly on a local store) gives the
    root document zarr.consolidate_metadata gives, for models, layers, layouts and
    logged scalars; plain xarray opens the store with it."""
    import json
    import shutil
    import warnings

    from topoxr._chunkio import consolidate

    path = tmp_path / "a.zarr"
    _write(path, [np.arange(0, 8), np.arange(8, 13)], chunk_samples=8)
    with ActivationWriter(str(path), model="other") as w:
        w.write("x.y", np.ones((3, 2), np.float32), sample=[5, 6, 7])
        w.log_epoch(0, loss=0.5)
    from topoxr.layouts import save_layout

    laid = topoxr.layout(topoxr.naps(open_store(str(path))["m/h"].to_dataset(), by="label"),
                         method="random", random_state=0)
    save_layout(str(path), "m", "h", laid, "r")
    # layouts on a second layer too: listed in os.walk's order (each layer's layouts
    # right after it), zarr rebuilt the tree wrongly and plain xarray failed to open it
    other = open_store(str(path))["other/x.y"].to_dataset()
    save_layout(str(path), "other", "x.y", other.assign_coords(
        x=("neuron", [0.0, 1.0]), y=("neuron", [1.0, 0.0])), "line")
    twin = tmp_path / "b.zarr"
    shutil.copytree(path, twin)
    consolidate(zarr.storage.LocalStore(str(path)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        zarr.consolidate_metadata(zarr.storage.LocalStore(str(twin)))
    ours = json.loads((path / "zarr.json").read_text())
    theirs = json.loads((twin / "zarr.json").read_text())
    assert ours == theirs
    # in zarr's own order too (zarr rebuilds the tree from it)
    assert list(ours["consolidated_metadata"]["metadata"]) == list(
        theirs["consolidated_metadata"]["metadata"])
    assert len(ours["consolidated_metadata"]["metadata"]) > 20
    tree = xr.open_datatree(str(path), engine="zarr")
    assert tree["other/x.y"].activation.shape == (2, 3, 1)
    assert "line" in tree["other/x.y/layouts"].children
    assert "r" in tree["m/h/layouts"].children


@pytest.mark.parametrize("expected", [0, 5, 13, 40])
def test_expected_samples_sizes_new_layers_up_front_and_close_trims(tmp_path, expected):
    """Layers created for ``expected_samples`` hold that many slots (and one epoch) from
    the start; readers see only what is committed, more samples than expected grow the
    arrays as usual, and close() leaves every array exactly as long as the data."""
    path = tmp_path / "e.zarr"
    ids = np.arange(13)
    with ActivationWriter(str(path), model="m", expected_samples=expected,
                          buffer_bytes=0) as w:
        w.write("h", _values(ids[:8], 0), sample=ids[:8], label=ids[:8] % 3,
                prediction=ids[:8] % 3)
        sizes = {name: arr.shape for name, arr in
                 zarr.open_group(str(path / "m/h"), mode="r").arrays()}
        assert sizes["activation"] == (N, max(expected, 8), 1)
        assert sizes["sample"] == (max(expected, 8),) and sizes["epoch"] == (1,)
        ds = open_store(str(path))["m/h"].to_dataset()
        assert ds.sample.values.tolist() == list(range(8))
        w.write("h", _values(ids[8:], 0), sample=ids[8:], label=ids[8:] % 3,
                prediction=ids[8:] % 3)
        w.write("h", _values(ids, 1), sample=ids, label=ids % 3, prediction=(ids + 1) % 3,
                epoch=1)
    _check(path, 13)
    for name, arr in zarr.open_group(str(path / "m/h"), mode="r").arrays():
        dims = arr.metadata.dimension_names
        want = tuple(13 if d == "sample" else 2 if d == "epoch" else s
                     for d, s in zip(dims, arr.shape, strict=True))
        assert arr.shape == want, name
    assert topoxr.verify(str(path)).ok
    with pytest.raises(StoreError, match="expected_samples"):
        ActivationWriter(str(tmp_path / "x.zarr"), model="m", expected_samples=-1)


def test_expected_epochs_grow_the_epoch_axis_once_and_leave_nothing_to_trim(tmp_path):
    """A writer told how many epochs it adds grows the epoch axis of a stored layer once,
    by exactly that many (not to 16, trimmed back at close); one more epoch than told
    grows it as before. The store reads the same either way."""
    path = tmp_path / "e.zarr"
    ids = np.arange(10)

    def epoch_lengths() -> set[int]:
        layer = zarr.open_group(str(path / "m/h"), mode="r", use_consolidated=False)
        return {arr.shape[arr.metadata.dimension_names.index("epoch")]
                for _, arr in layer.arrays() if "epoch" in arr.metadata.dimension_names}

    def write(w: ActivationWriter, epoch: int) -> None:
        w.write("h", _values(ids, epoch), sample=ids, label=ids % 3,
                prediction=(ids + epoch) % 3, epoch=epoch)
        w.flush()

    with ActivationWriter(str(path), model="m", expected_samples=10, expected_epochs=1) as w:
        write(w, 0)
        assert epoch_lengths() == {1}
    with ActivationWriter(str(path), model="m", expected_epochs=2) as w:
        write(w, 1)
        assert epoch_lengths() == {3}  # the one stored and the two announced
        write(w, 2)
        assert epoch_lengths() == {3}
        write(w, 3)  # one more than announced: room as usual
        assert epoch_lengths() == {16}
    assert epoch_lengths() == {4}
    _check(path, 10, epochs=(0, 1, 2, 3))
    tree = xr.open_datatree(str(path), engine="zarr")
    assert tree["m/h"].activation.shape == (N, 10, 4)
    assert topoxr.verify(str(path)).ok
    with pytest.raises(StoreError, match="expected_epochs"):
        ActivationWriter(str(tmp_path / "x.zarr"), model="m", expected_epochs=-1)


@pytest.mark.parametrize(("neurons", "expected", "want_chunk", "want_chunks"), [
    (512, None, 2048, 4),      # 4 MiB chunks of 8 batches (no guess: the last is padded)
    (512, 8192, 2048, 4),      # the guess divides evenly: the same chunks
    (64, 20_000, 10_240, 2),   # 16384 would leave a second chunk mostly fill: 2 even ones
    (10, 20_000, 20_224, 1),   # one chunk (not 104,704 samples, 5x the data)
    (64, 300, 512, 1),         # fewer samples than one batch of 256 past the first
])
def test_default_chunks_hold_4_mib_and_are_even_for_the_expected_samples(
        tmp_path, neurons, expected, want_chunk, want_chunks):
    """The default activation chunk is a multiple of the first batch near 4 MiB; where
    the writer knows how many samples to expect, the chunks that size needs are made
    even (whole batches), so the last is not mostly fill. Values read back exactly."""
    path = tmp_path / "c.zarr"
    n = expected or 8000
    rng = np.random.default_rng(neurons)
    values = rng.standard_normal((n, neurons), dtype=np.float32)
    with ActivationWriter(str(path), model="m", expected_samples=expected) as w:
        for start in range(0, n, 256):
            w.write("h", values[start:start + 256], sample=np.arange(start, min(n, start + 256)))
    arr = zarr.open_array(str(path / "m/h/activation"), mode="r")
    assert arr.chunks == (neurons, want_chunk, 1)
    assert want_chunk % 256 == 0 and -(-n // want_chunk) == want_chunks
    assert len([f for f in os.listdir(path / "m/h/activation") if f.startswith("c.")]) \
        == want_chunks
    np.testing.assert_array_equal(arr[:, :, 0], values.T)
    np.testing.assert_array_equal(open_store(str(path))["m/h"].activation.values[:, :, 0],
                                  values.T)


def test_equal_columns_of_several_layers_are_encoded_once_and_stored_exactly(tmp_path):
    """The per-sample columns every layer stores (sample, label, prediction...) are
    compressed once for equal chunks and reused; each array still holds its own values
    exactly, as plain zarr reads them, and a chunk differing in one value is encoded
    anew."""
    from topoxr._chunkio import _ENCODED, EncodedMemo, encode_pieces

    path = str(tmp_path / "m.zarr")
    rng = np.random.default_rng(8)
    labels = rng.integers(0, 10, 600)
    preds = {name: labels.copy() for name in ("a", "b", "c")}
    preds["c"][123] = (preds["c"][123] + 1) % 10  # one prediction differs in layer c
    with ActivationWriter(path, model="m") as writer:
        for name, width in (("a", 3), ("b", 5), ("c", 2)):
            writer.write(name, rng.standard_normal((600, width)), sample=np.arange(600),
                         label=labels, prediction=preds[name])
    root = zarr.open_group(path, mode="r")
    for name in ("a", "b", "c"):
        np.testing.assert_array_equal(root[f"m/{name}/label"][:], labels)
        np.testing.assert_array_equal(root[f"m/{name}/prediction"][:, 0], preds[name])
        np.testing.assert_array_equal(root[f"m/{name}/correct"][:, 0], preds[name] == labels)
        assert root[f"m/{name}/label"].compressors  # a compressed column: memo applies
    # the same bytes serve equal chunks; one changed value gives a fresh encoding
    arr = root["m/a/label"]
    chunk = np.asarray(arr[:])
    chunk = np.concatenate([chunk, np.full(arr.chunks[0] - len(chunk), -1)])
    first = encode_pieces(arr, (0,), chunk)
    assert encode_pieces(root["m/b/label"], (0,), chunk.copy())[0] is first[0]
    changed = chunk.copy()
    changed[7] += 1
    other = encode_pieces(arr, (0,), changed)
    assert other[0] is not first[0] and bytes(other[0]) != bytes(first[0])
    # a memo keeps no chunk above its size limit
    small = EncodedMemo(max_chunk_bytes=16)
    assert small.key((), np.dtype("int64"), (3,), np.zeros(24, np.uint8)) is None
    assert len(_ENCODED._entries) <= _ENCODED.max_entries
    writer = ActivationWriter(path, model="m")
    writer.close()  # a closing writer frees the memo
    assert not _ENCODED._entries


def test_array_metadata_built_once_per_spec_is_zarrs_own_and_each_array_its_own(tmp_path):
    """Arrays of one spec share the metadata zarr built once (the layers of a recording
    repeat the same arrays), yet every ``zarr.json`` is the document zarr writes for
    that spec, a spec differing in any one field gets its own, and attributes changed
    on one array (zarr changes them in place) stay on that array."""
    import json

    from zarr.codecs import Crc32cCodec, TransposeCodec, ZstdCodec

    from topoxr._chunkio import _METADATA, create_arrays

    base = dict(shape=(5, 40, 1), chunks=(5, 16, 1), dtype="float32", fill_value=np.nan,
                filters=(TransposeCodec(order=(2, 1, 0)),),
                compressors=(ZstdCodec(level=1), Crc32cCodec()),
                chunk_key_encoding={"name": "default", "separator": "."},
                dimension_names=("neuron", "sample", "epoch"), attributes={"units": "a.u."})
    changes = {"fill": {"fill_value": 0.0}, "default_fill": {"fill_value": None},
               "int": {"dtype": "int64", "fill_value": -1}, "dtype": {"dtype": "float64"},
               "shape": {"shape": (6, 40, 1), "chunks": (6, 16, 1)},
               "chunks": {"chunks": (5, 8, 1)}, "filters": {"filters": ()},
               "codec": {"compressors": (ZstdCodec(level=3), Crc32cCodec())},
               "names": {"dimension_names": ("neuron", "sample", "time")},
               "attrs": {"attributes": {"units": "V"}},
               "keys": {"chunk_key_encoding": {"name": "default", "separator": "/"}}}
    specs = {"first": base, "again": dict(base),
             **{name: {**base, **change} for name, change in changes.items()}}
    _METADATA.clear()
    group = zarr.open_group(str(tmp_path / "ours.zarr"), mode="w")
    arrays = create_arrays(group, specs)
    assert len(_METADATA) == len(specs) - 1  # "again" was served from the memo
    theirs = zarr.open_group(str(tmp_path / "zarrs.zarr"), mode="w")
    documents = {}
    for name, spec in specs.items():
        theirs.create_array(name, **spec)
        ours = json.loads((tmp_path / "ours.zarr" / name / "zarr.json").read_text())
        zarr_doc = json.loads((tmp_path / "zarrs.zarr" / name / "zarr.json").read_text())
        assert ours == zarr_doc, name
        documents[name] = ours
    assert documents["first"] == documents["again"]
    for name in changes:
        assert documents[name] != documents["first"], name
    # attributes changed on one array (in place, by zarr) stay on that array
    arrays["first"].update_attributes({"note": "only here"})
    assert "note" not in arrays["again"].attrs
    later = create_arrays(group, {"later": dict(base)})["later"]
    assert "note" not in later.attrs
    assert "note" not in json.loads(
        (tmp_path / "ours.zarr" / "later" / "zarr.json").read_text())["attributes"]
    assert zarr.open_array(str(tmp_path / "ours.zarr" / "first")).attrs["note"] == "only here"
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "ours.zarr" / "again"))[:],
                                  np.full((5, 40, 1), np.nan, np.float32))


def test_batches_handed_over_are_buffered_without_a_copy_and_stored_exactly(tmp_path):
    # write_handed_over (the background writer's joined batches): the layer's buffer
    # takes the array itself when it holds no other batch; a later batch moves the rows
    # into a buffer of full size; the buffer of a commit is reused by the next one. The
    # store must hold every value as sent, through all of these.
    rng = np.random.default_rng(11)
    n = 6
    sent: list[np.ndarray] = []
    path = str(tmp_path / "s.zarr")

    def batch(rows: int) -> np.ndarray:
        values = rng.normal(size=(rows, n)).astype(np.float32)
        sent.append(values.copy())
        return values

    done = 0
    with ActivationWriter(path, model="m", buffer_bytes=64 * n * 4) as writer:
        for k in range(3):  # three commits, each started by a handed-over batch
            first = batch(32)
            ids = np.arange(done, done + 32)
            writer.write_handed_over("layer", first, sample=ids)
            buffered = writer._pending["layer"].values
            assert np.shares_memory(buffered, first)  # taken, not copied
            done += 32
            second = batch(16)
            writer.write("layer", second, sample=np.arange(done, done + 16))
            assert not np.shares_memory(writer._pending["layer"].values, second)
            second[...] = np.nan  # the caller's own array: changing it changes nothing
            done += 16
            writer.flush()
        # an array the buffer cannot take as it is (float64) is copied
        wide = batch(8).astype(np.float64)
        writer.write_handed_over("layer", wide, sample=np.arange(done, done + 8))
        assert not np.shares_memory(writer._pending["layer"].values, wide)
        done += 8
        # pooled maps of one position (batch, channels, 1) handed over: a view is taken
        maps = rng.normal(size=(8, n, 1)).astype(np.float32)
        expected_maps = maps[:, :, 0].copy()
        writer.write_handed_over("conv", maps, sample=np.arange(8), channel_axis=1)
        assert np.shares_memory(writer._pending["conv"].values, maps)
    stored = open_store(path)["m"]
    np.testing.assert_array_equal(stored["layer"].activation.sel(epoch=0).values.T,
                                  np.concatenate(sent))
    np.testing.assert_array_equal(stored["layer"].sample, np.arange(done))
    np.testing.assert_array_equal(stored["conv"].activation.sel(epoch=0).values.T,
                                  expected_maps)


def test_light_jobs_run_on_the_callers_thread_and_every_job_ends_before_an_error(tmp_path):
    """Light jobs (under ``LIGHT_JOB_BYTES`` to a store whose writes return at once:
    small files, mostly Python) run on the caller's thread, the others on the pool as
    well; every job runs once, and the first error is raised only when every job has
    ended. Writes that ``fsync`` are never light."""
    import threading
    import time

    from topoxr._chunkio import LIGHT_JOB_BYTES, ChunkJob, Padded, light_job, run_jobs
    from topoxr.store._durable import DurableLocalStore

    quick = zarr.storage.LocalStore(str(tmp_path / "quick"))
    durable = DurableLocalStore(str(tmp_path / "durable"))
    caller = threading.get_ident()
    ran: list[tuple[tuple[str, int], int]] = []
    lock = threading.Lock()

    def job(kind: str, i: int, sleep: float = 0.0, fail: bool = False):
        def run() -> None:
            time.sleep(sleep)
            with lock:
                ran.append(((kind, i), threading.get_ident()))
            if fail:
                raise OSError(f"no space left writing {kind} {i}")
        return run

    light = [light_job(job("light", i), 100, quick) for i in range(20)]
    unmarked = [job("unmarked", i, sleep=0.01) for i in range(4)]  # e.g. decoding jobs
    large = [light_job(job("large", i, sleep=0.01), LIGHT_JOB_BYTES, quick) for i in range(3)]
    synced = [light_job(job("synced", i, sleep=0.01), 100, durable) for i in range(3)]
    assert all(j.light for j in light) and not any(j.light for j in large + synced)
    run_jobs(large + light + unmarked + synced)
    assert sorted(tag for tag, _ in ran) == sorted(
        [("light", i) for i in range(20)] + [("unmarked", i) for i in range(4)]
        + [("large", i) for i in range(3)] + [("synced", i) for i in range(3)])
    assert {ident for (kind, _), ident in ran if kind == "light"} == {caller}
    assert {ident for (kind, _), ident in ran if kind != "light"} - {caller}  # the pool's

    ran.clear()
    slow = job("unmarked", 0, sleep=0.2)
    with pytest.raises(OSError, match="light 3"):
        run_jobs([slow] + [light_job(job("light", i, fail=i == 3), 10, quick)
                           for i in range(5)])
    assert ("unmarked", 0) in [tag for tag, _ in ran]  # ended before the error was raised

    # a chunk job counts its whole chunk's bytes, an edge chunk's padding included, and
    # is light on zarr's own local store only, not on one that fsyncs
    data = np.zeros((10, 3), dtype=np.float32)
    quick_array, durable_array = (
        zarr.create_array(store, name="a", shape=(64, 3), chunks=(64, 3), dtype="float32")
        for store in (quick, durable))
    for arr, expected in ((quick_array, True), (durable_array, False)):
        assert ChunkJob(arr, (0, 0), data[:, :2]).nbytes == 10 * 2 * 4
        edge = ChunkJob(arr, (0, 0), Padded(data, (slice(0, 10), slice(0, 3)), (64, 3), 0))
        assert edge.nbytes == 64 * 3 * 4 and edge.light is expected
    big = np.zeros((LIGHT_JOB_BYTES // 4, 1), dtype=np.float32)
    assert not ChunkJob(quick_array, (0, 0), big).light


def test_runs_of_one_commit_into_one_chunk_all_land_for_layers_split_by_neuron(tmp_path):
    """A commit whose samples leave a gap inside one sample chunk writes it in two runs,
    the second completing the chunk the first left in the writer's chunk cache. A layer
    whose chunks are split along ``neuron`` into three 16 MiB pieces overflowed the 32 MiB
    cache within the commit: the first run's pieces were evicted, rebuilt from NaN by
    the second run, and stored so, under a ``committed`` mask that said they were there."""
    n_neurons = 3 * 2**20  # 4 samples a chunk: three neuron pieces of 16 MiB each
    rng = np.random.default_rng(0)
    first = rng.random((4, n_neurons), dtype=np.float32)
    path = str(tmp_path / "wide.zarr")
    with topoxr.ActivationWriter(path, model="m", chunk_samples=4) as writer:
        writer.write("wide", first, sample=np.arange(4), epoch=0)
        writer.write("wide", first[[3, 0, 2]] + 1, sample=[3, 0, 2], epoch=1)
    assert zarr.open_array(f"{path}/m/wide/activation", mode="r").chunks[0] < n_neurons
    act = topoxr.open_store(path)["m/wide"].activation
    for sample in (0, 2, 3):
        np.testing.assert_array_equal(act.sel(sample=sample, epoch=1).values,
                                      first[sample] + 1)
    assert np.isnan(act.sel(sample=1, epoch=1).values).all()
