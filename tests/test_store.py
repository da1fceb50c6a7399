"""The activation store: round trips, format, resume, locking and bad input.

Every test writes real Zarr stores, on disk and on fsspec's ``memory://`` filesystem
(fixture ``any_store``), and reads them back with :func:`topoxr.open_store` or plain
xarray.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import dask.array as dsa
import fsspec
import numpy as np
import pytest
import xarray as xr
import zarr

from topoxr import ActivationWriter, StoreError, StoreLockedError, open_store, store_summary
from topoxr.conventions import DIMS, FORMAT_VERSION

N_NEURONS = 5


def acts(ids, epoch=0, n=N_NEURONS):
    """Deterministic activations: row i is a function of sample id and epoch."""
    ids = np.asarray(ids, dtype=np.float64)[:, None]
    return (np.cos(ids * 0.3 + np.arange(n)) + epoch).astype(np.float32)


def record(url, *, epochs=2, batches=((0, 1, 2, 3), (4, 5, 6, 7), (8, 9)), **writer_kwargs):
    """Write a small two-epoch recording with every kind of coordinate."""
    with ActivationWriter(url, model="mlp", **writer_kwargs) as writer:
        for epoch in range(epochs):
            for ids in batches:
                ids = np.asarray(ids)
                writer.write(
                    "hidden", acts(ids, epoch), sample=ids, label=ids % 3,
                    prediction=(ids + epoch) % 3, epoch=epoch,
                    split=np.where(ids < 5, "train", "test"), weight=ids * 0.5,
                    group=ids // 4, flag=ids % 2 == 0,
                )
            writer.log_epoch(epoch, loss=1.0 / (epoch + 1), accuracy=0.5 + 0.1 * epoch)
    return writer


def snapshot(url):
    """Every file of a store and its bytes: proof that nothing was written."""
    fs, path = fsspec.core.url_to_fs(url)
    return {p: fs.cat_file(p) for p in fs.find(path)}


# --------------------------------------------------------------------------------------
# round trip and format
# --------------------------------------------------------------------------------------
def test_round_trip(any_store):
    record(any_store, description="unit test")
    tree = open_store(any_store)
    assert tree.attrs["topoxr_format_version"] == FORMAT_VERSION
    assert tree.attrs["description"] == "unit test"
    ds = tree["mlp/hidden"].to_dataset()
    assert ds.activation.dims == DIMS
    assert ds.activation.dtype == np.float32
    assert ds.sizes == {"neuron": N_NEURONS, "sample": 10, "epoch": 2}
    ids = np.arange(10)
    np.testing.assert_array_equal(ds.sample, ids)
    np.testing.assert_array_equal(ds.epoch, [0, 1])
    np.testing.assert_array_equal(ds.neuron, np.arange(N_NEURONS))
    for epoch in (0, 1):
        np.testing.assert_array_equal(ds.activation.sel(epoch=epoch).values, acts(ids, epoch).T)
        np.testing.assert_array_equal(ds.prediction.sel(epoch=epoch), (ids + epoch) % 3)
        np.testing.assert_array_equal(ds.correct.sel(epoch=epoch), (ids + epoch) % 3 == ids % 3)
    assert ds.prediction.dims == ds.correct.dims == ds.committed.dims == ("sample", "epoch")
    np.testing.assert_array_equal(ds.label, ids % 3)
    assert ds.label.dtype.kind == "i"
    assert ds.split.dtype.kind == "U" and ds.split.values.tolist()[4:6] == ["train", "test"]
    assert ds.weight.dtype == np.float64
    np.testing.assert_array_equal(ds.weight, ids * 0.5)
    assert ds.group.dtype == np.int64
    assert ds.flag.dtype == bool
    np.testing.assert_array_equal(ds.flag, ids % 2 == 0)
    for name in ("label", "split", "weight", "group", "flag"):
        assert ds[name].dims == ("sample",) and name in ds.coords
    assert ds.committed.values.all() and ds.epoch_complete.values.all()
    np.testing.assert_allclose(ds.loss, [1.0, 0.5])
    np.testing.assert_allclose(ds.accuracy, [0.5, 0.6])
    assert ds.attrs["topoxr_layer"] == "hidden"
    assert tree["mlp"].attrs["topoxr_model"] == "mlp"


def test_open_is_lazy_and_chunks_follow_the_encoding(any_store):
    record(any_store, chunk_samples=4)
    ds = open_store(any_store)["mlp/hidden"].to_dataset()
    assert isinstance(ds.activation.data, dsa.Array)
    # dask blocks hold whole zarr chunks (here all samples of an epoch), one epoch each
    assert ds.activation.chunks == ((N_NEURONS,), (10,), (1, 1))
    root = zarr.open_group(fsspec.get_mapper(any_store) if "://" in any_store else any_store,
                           mode="r")
    arr = root["mlp/hidden/activation"]
    assert arr.chunks == (N_NEURONS, 4, 1)
    assert arr.dtype == np.float32
    # the measured default: uncompressed (docs/benchmarks.md), then the checksum
    assert [type(c).__name__ for c in arr.compressors] == ["Crc32cCodec"]
    assert arr.metadata.dimension_names == DIMS


@pytest.mark.parametrize("batch", [32, 1024])
def test_default_chunk_is_a_multiple_of_the_batch(store_path, batch):
    # about 4 MiB where 16 batches or fewer fill it; 16 batches where more would (how many
    # samples will come is not known, and a chunk is stored whole)
    with ActivationWriter(store_path, model="m") as writer:
        writer.write("h", np.ones((batch, 100)), sample=np.arange(batch))
    chunks = store_summary(store_path)["models"]["m"]["layers"]["h"]["chunks"]
    assert chunks[0] == 100 and chunks[2] == 1
    from topoxr.store._schema import _TARGET_CHUNK_BYTES as target
    assert chunks[1] % batch == 0
    if batch == 32:
        assert chunks[1] == 1024  # 16 batches would be 512 samples
    else:
        assert 0.5 <= chunks[1] * 100 * 4 / target <= 1.0


def test_plain_xarray_opens_it_without_topoxr(store_path):
    record(store_path)
    code = textwrap.dedent(f"""
        import json, sys
        import xarray as xr
        tree = xr.open_datatree({store_path!r}, engine="zarr")
        ds = tree["mlp/hidden"].to_dataset()
        print(json.dumps({{
            "topoxr_loaded": any(m.split(".")[0] == "topoxr" for m in sys.modules),
            "dims": list(ds.activation.dims),
            "coords": sorted(ds.coords),
            "data_vars": sorted(ds.data_vars),
            "activation": ds.activation.values.tolist(),
            "label": ds.label.values.tolist(),
            "split": [str(s) for s in ds.split.values],
        }}))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True)
    got = json.loads(out.stdout)
    assert got["topoxr_loaded"] is False
    ours = open_store(store_path)["mlp/hidden"].to_dataset()
    assert got["dims"] == list(DIMS)
    assert got["data_vars"] == ["activation"]
    assert got["coords"] == sorted(ours.coords)
    np.testing.assert_array_equal(np.array(got["activation"], dtype=np.float32),
                                  ours.activation.values)
    assert got["label"] == ours.label.values.tolist()
    assert got["split"] == ours.split.values.tolist()


def test_string_labels_and_correct(any_store):
    with ActivationWriter(any_store, model="m") as writer:
        writer.write("h", acts([0, 1, 2]), sample=[0, 1, 2], label=["cat", "dog", "cat"],
                     prediction=["cat", "cat", "cat"])
    ds = open_store(any_store)["m/h"].to_dataset()
    assert ds.label.values.tolist() == ["cat", "dog", "cat"]
    assert ds.correct.sel(epoch=0).values.tolist() == [True, False, True]


def test_predictions_without_labels(store_path):
    with ActivationWriter(store_path, model="m") as writer:
        writer.write("h", acts([0, 1]), sample=[0, 1], prediction=[1, 0])
    ds = open_store(store_path)["m/h"].to_dataset()
    assert "label" not in ds.coords
    assert ds.prediction.sel(epoch=0).values.tolist() == [1, 0]


def test_a_layer_without_labels_has_no_correct(store_path):
    """Correctness needs labels: without them no 'correct' (it read as all False), neither
    stored nor shown, also for a store of earlier writers that created it unwritten."""
    with ActivationWriter(store_path, model="m") as writer:
        writer.write("h", acts([0, 1]), sample=[0, 1], prediction=[1, 0], site=["a", "b"])
        with pytest.raises(StoreError, match="predictions are <U1, the stored ones int64"):
            writer.write("h", acts([2, 3]), sample=[2, 3], prediction=["x", "y"],
                         site=["a", "b"])
    group = zarr.open_group(store_path, mode="r")["m/h"]
    assert "prediction" in group and "correct" not in group
    ds = open_store(store_path)["m/h"].to_dataset()
    assert "correct" not in ds.coords and ds.sample.values.tolist() == [0, 1]
    from topoxr.grouping import GroupingError, naps

    with pytest.raises(GroupingError, match="needs a 'correct' coordinate"):
        naps(ds, by="site", correct_only=True)
    # as earlier writers left it: 'correct' created, never written
    from topoxr.store._schema import checked_array_spec

    zarr.open_group(store_path, mode="r+")["m/h"].create_array(
        "correct", **checked_array_spec(shape=(2, 1), chunks=(2, 1), dtype="bool",
                                        fill_value=False, dimension_names=("sample", "epoch")))
    ds = open_store(store_path)["m/h"].to_dataset()
    assert "correct" not in ds.coords
    assert ds.prediction.sel(epoch=0).values.tolist() == [1, 0]
    with ActivationWriter(store_path, model="m") as writer:  # stored string predictions
        writer.write("s", acts([0, 1]), sample=[0, 1], prediction=["x", "y"])
    with (ActivationWriter(store_path, model="m") as writer,
          pytest.raises(StoreError, match="predictions are int64, the stored ones strings")):
        writer.write("s", acts([0, 1]), sample=[0, 1], prediction=[0, 1], epoch=1)
    assert open_store(store_path)["m/s"].prediction.values.tolist() == [["x"], ["y"]]


@pytest.mark.parametrize("first_with", [True, False], ids=["with first", "without first"])
@pytest.mark.parametrize("reopen", [False, True], ids=["same writer", "new writer"])
def test_predictions_in_every_batch_or_in_none(store_path, first_with, reopen):
    """A batch without predictions for a layer that stores them (its samples read as
    predicted -1, not correct), or with predictions for a layer committed without them
    (the earlier epochs read as class -1; the other order left 'correct' chunks missing,
    a store reported damaged), is refused before anything is written."""
    ids, labels = np.arange(4), np.array([0, 1, 2, 0])
    given = {"prediction": labels} if first_with else {}
    writer = ActivationWriter(store_path, model="m")
    writer.write("h", acts(ids), sample=ids, label=labels, **given)
    writer.flush()
    if reopen:
        writer.close()
        writer = ActivationWriter(store_path, model="m")
    before = snapshot(store_path)
    then = {} if first_with else {"prediction": labels}
    match = ("stores predictions; the batch gives none" if first_with
             else "was written without predictions; the batch now gives predictions")
    with pytest.raises(StoreError, match=f"layer 'h' of model 'm' {match}"):
        writer.write("h", acts(ids, 1), sample=ids, label=labels, epoch=1, **then)
    with pytest.raises(StoreError, match=match):  # new samples of the same epoch too
        writer.write("h", acts([9]), sample=[9], label=[1], **{k: v[:1] for k, v in then.items()})
    assert snapshot(store_path) == before
    writer.write("h", acts(ids, 1), sample=ids, label=labels, epoch=1, **given)  # usable
    writer.close()
    ds = open_store(store_path)["m/h"].to_dataset()
    assert ds.sample.values.tolist() == ids.tolist() and ds.epoch.values.tolist() == [0, 1]
    np.testing.assert_array_equal(ds.activation.sel(epoch=1).values.T, acts(ids, 1))
    assert ("prediction" in ds.coords) == first_with
    if first_with:
        np.testing.assert_array_equal(ds.prediction.values, np.stack([labels, labels], 1))
        assert ds.correct.values.all()


def test_predictions_are_refused_for_a_layer_with_buffered_batches_without(store_path):
    """Batches still in the write buffer count as written without predictions."""
    with ActivationWriter(store_path, model="m") as writer:
        writer.write("h", acts([0, 1]), sample=[0, 1], label=[0, 1])  # buffered
        with pytest.raises(StoreError, match="was written without predictions"):
            writer.write("h", acts([2, 3]), sample=[2, 3], label=[0, 1], prediction=[0, 1])
        writer.write("h", acts([2, 3]), sample=[2, 3], label=[0, 1])
    ds = open_store(store_path)["m/h"].to_dataset()
    assert ds.sample.values.tolist() == [0, 1, 2, 3] and "prediction" not in ds.coords


@pytest.mark.parametrize("column, values", [
    ("label", [0.0, 1.0, 0.0]), ("label", [True, False, True]),
    ("prediction", [0.0, 1.0, 0.0]), ("prediction", [True, False, False]),
])
def test_float_or_bool_labels_and_predictions_are_refused(store_path, column, values):
    """They were accepted, and the store was then reported damaged as a whole (every
    model unreadable): refused at write time, the store stays readable."""
    with ActivationWriter(store_path, model="good") as writer:
        writer.write("h", acts([0, 1, 2]), sample=[0, 1, 2], label=[0, 1, 0])
    kinds = "labels" if column == "label" else "predictions"
    with ActivationWriter(store_path, model="bad") as writer:
        before = snapshot(store_path)
        batch = {"label": [0, 1, 0], column: np.array(values)}
        with pytest.raises(StoreError, match=f"layer 'h': {kinds} must be integers or "
                                             f"strings .*, got {np.array(values).dtype}"):
            writer.write("h", acts([0, 1, 2]), sample=[0, 1, 2], **batch)
        assert snapshot(store_path) == before
    tree = open_store(store_path)
    assert tree["good/h"].label.values.tolist() == [0, 1, 0]
    assert "h" not in tree["bad"].children


def test_layer_names_are_made_safe_and_kept(any_store):
    with ActivationWriter(any_store, model="my model") as writer:
        writer.write("features.0/conv 1", acts([0, 1]), sample=[0, 1])
    tree = open_store(any_store)
    (model,) = tree.children
    (layer,) = tree[model].children
    assert "/" not in layer and " " not in layer
    assert tree[model][layer].attrs["topoxr_layer"] == "features.0/conv 1"
    assert tree[model].attrs["topoxr_model"] == "my model"


def test_several_layers_and_models(any_store):
    with ActivationWriter(any_store, model="a") as writer:
        writer.write("l1", acts([0, 1], n=3), sample=[0, 1])
        writer.write("l2", acts([0, 1], n=7), sample=[0, 1])
    with ActivationWriter(any_store, model="b") as writer:
        writer.write("l1", acts([5], n=2), sample=[5])
    tree = open_store(any_store)
    assert tree["a/l1"].sizes["neuron"] == 3 and tree["a/l2"].sizes["neuron"] == 7
    assert tree["b/l1"].sizes["neuron"] == 2
    summary = store_summary(any_store)
    assert sorted(summary["models"]) == ["a", "b"]
    assert sorted(summary["models"]["a"]["layers"]) == ["l1", "l2"]


# --------------------------------------------------------------------------------------
# convolutional layers
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("reduce", ["mean", "max", "none"])
def test_conv_reduce_nchw_and_nhwc_agree(tmp_path, reduce):
    rng = np.random.default_rng(0)
    nchw = rng.normal(size=(6, 3, 4, 5)).astype(np.float32)
    nhwc = np.transpose(nchw, (0, 2, 3, 1))
    ids = np.arange(6)
    stored = {}
    for name, data, axis in (("nchw", nchw, 1), ("nhwc", nhwc, -1)):
        path = str(tmp_path / f"{name}.zarr")
        with ActivationWriter(path, model="cnn") as writer:
            writer.write("conv", data, sample=ids, channel_axis=axis, reduce=reduce)
        stored[name] = open_store(path)["cnn/conv"].to_dataset()
    ds = stored["nchw"]
    xr.testing.assert_identical(ds, stored["nhwc"])
    values = ds.activation.sel(epoch=0).values  # (neuron, sample)
    if reduce == "mean":
        np.testing.assert_allclose(values, nchw.mean(axis=(2, 3), dtype=np.float64).T, rtol=1e-6)
    elif reduce == "max":
        np.testing.assert_array_equal(values, nchw.max(axis=(2, 3)).T)
    else:
        assert ds.sizes["neuron"] == 3 * 4 * 5
        for k in (0, 7, 33, 59):
            c, r, col = (int(ds[n].values[k]) for n in ("channel", "row", "col"))
            np.testing.assert_array_equal(values[k], nchw[:, c, r, col])
    if reduce in ("mean", "max"):
        np.testing.assert_array_equal(ds.channel, np.arange(3))
    assert ds.attrs["topoxr_reduce"] == reduce


@pytest.mark.parametrize("shape, axis", [((4, N_NEURONS), None), ((4, N_NEURONS, 1, 1), 1),
                                         ((4, 1, 1, N_NEURONS), -1)])
def test_a_batch_changed_after_write_is_stored_as_written(store_path, shape, axis):
    # the writer buffers batches and may be handed views (a float32 (batch, neurons)
    # array, or maps of one position, are not copied by reduce_units): what a caller
    # does to its array after write() returns must not reach the store, whether the
    # batch was still buffered or already committed
    rng = np.random.default_rng(3)
    sent = []
    with ActivationWriter(store_path, model="m", buffer_bytes=4 * N_NEURONS * 8) as writer:
        for start in range(0, 16, 4):
            batch = rng.normal(size=shape).astype(np.float32)
            sent.append(batch.reshape(4, N_NEURONS).copy())
            writer.write("layer", batch, sample=np.arange(start, start + 4), channel_axis=axis)
            batch[...] = np.nan  # the caller reuses its buffer
    stored = open_store(store_path)["m/layer"].to_dataset()
    np.testing.assert_array_equal(stored.activation.sel(epoch=0).values.T,
                                  np.concatenate(sent))


def test_conv_needs_channel_axis(store_path):
    with ActivationWriter(store_path, model="m") as writer:
        with pytest.raises(StoreError, match="pass channel_axis"):
            writer.write("conv", np.ones((2, 3, 4, 4)), sample=[0, 1])


def test_reduce_mode_of_a_layer_is_fixed(store_path):
    with ActivationWriter(store_path, model="m") as writer:
        writer.write("conv", np.ones((2, 3, 2, 2)), sample=[0, 1], channel_axis=1,
                     reduce="none")
        with pytest.raises(StoreError, match="(reduce='none'|neurons in the store)"):
            writer.write("conv", np.ones((2, 3, 2, 2)), sample=[2, 3], channel_axis=1)


# --------------------------------------------------------------------------------------
# epochs, completion, missing, summary
# --------------------------------------------------------------------------------------
def test_complete_and_incomplete_epochs(any_store):
    with ActivationWriter(any_store, model="m") as writer:
        writer.write("h", acts(range(4)), sample=range(4))
        writer.write("h", acts(range(4), 1)[:2], sample=[0, 1], epoch=1)
        with pytest.raises(StoreError, match="lacks 2 of 4 samples"):
            writer.complete_epoch(1)
        writer.complete_epoch(0)
    ds = open_store(any_store)["m/h"].to_dataset()
    assert ds.epoch_complete.values.tolist() == [True, False]
    assert ds.committed.sel(epoch=1).values.tolist() == [True, True, False, False]
    assert np.isnan(ds.activation.sel(epoch=1, sample=[2, 3])).all()
    raw = open_store(any_store, mask_uncommitted=False)["m/h"].to_dataset()
    assert raw.committed.sel(epoch=1).values.tolist() == [True, True, False, False]
    info = store_summary(any_store)["models"]["m"]["layers"]["h"]
    assert info["complete_epochs"] == [0] and info["incomplete_epochs"] == [1]
    assert info["committed_fraction"] == pytest.approx(6 / 8)


def test_complete_epoch_errors(store_path):
    with ActivationWriter(store_path, model="m") as writer:
        writer.write("h", acts([0]), sample=[0])
        with pytest.raises(StoreError, match="unknown layer 'nope'"):
            writer.complete_epoch(0, ["nope"])
        with pytest.raises(StoreError, match="has no epoch 3"):
            writer.complete_epoch(3)


def test_missing(any_store):
    with ActivationWriter(any_store, model="m") as writer:
        assert writer.missing("h", 0, [3, 1]).tolist() == [3, 1]
        writer.write("h", acts([1, 2]), sample=[1, 2])
        assert writer.missing("h", 0, [3, 2, 1, 0]).tolist() == [3, 0]
        assert writer.missing("h", 1, [1]).tolist() == [1]
    with ActivationWriter(any_store, model="m") as writer:
        assert writer.missing("h", 0, np.array([0, 1, 2, 3])).tolist() == [0, 3]
        assert writer.layers == ["h"]


def test_probe_set_is_fixed_once_an_epoch_is_complete(store_path):
    with ActivationWriter(store_path, model="m") as writer:
        writer.write("h", acts([0, 1]), sample=[0, 1])
        writer.complete_epoch(0)
        with pytest.raises(StoreError, match=r"sample ids \[7\] are not in the probe set"):
            writer.write("h", acts([0, 7], 1), sample=[0, 7], epoch=1)


def test_epochs_need_not_start_at_zero_or_be_consecutive(store_path):
    with ActivationWriter(store_path, model="m") as writer:
        for epoch in (5, 10, 20):
            writer.write("h", acts([0, 1], epoch), sample=[0, 1], epoch=epoch)
    ds = open_store(store_path)["m/h"].to_dataset()
    assert ds.epoch.values.tolist() == [5, 10, 20]
    np.testing.assert_array_equal(ds.activation.sel(epoch=10).values, acts([0, 1], 10).T)


def test_log_epoch(store_path):
    with ActivationWriter(store_path, model="m") as writer:
        writer.write("h", acts([0]), sample=[0])
        writer.write("h", acts([0], 1), sample=[0], epoch=1)
        writer.log_epoch(1, loss=0.25)
        writer.log_epoch(7, loss=9.0)  # no layer has epoch 7: nothing to attach it to
        with pytest.raises(StoreError, match="'sample' cannot be an epoch scalar name"):
            writer.log_epoch(0, sample=1.0)
        with pytest.raises(StoreError, match="'count' cannot be an epoch scalar name"):
            writer.log_epoch(0, count=1.0)
        with pytest.raises(StoreError, match="must be a real number"):
            writer.log_epoch(0, loss="low")
    ds = open_store(store_path)["m/h"].to_dataset()
    assert np.isnan(ds.loss.values[0]) and ds.loss.values[1] == 0.25


def test_store_summary_is_json(any_store):
    record(any_store, description="d")
    summary = store_summary(any_store)
    text = json.dumps(summary)
    assert json.loads(text) == summary
    layer = summary["models"]["mlp"]["layers"]["hidden"]
    assert layer == {
        "name": "hidden", "neurons": N_NEURONS, "samples": 10, "epochs": [0, 1],
        "complete_epochs": [0, 1], "incomplete_epochs": [], "committed_fraction": 1.0,
        "reduce": "mean", "chunks": layer["chunks"], "checksums": True, "problems": [],
    }
    assert summary["description"] == "d" and summary["format_version"] == FORMAT_VERSION
    assert summary["verified"] is None and summary["problems"] == []


# --------------------------------------------------------------------------------------
# reopening, resume, overwrite, mode="w"
# --------------------------------------------------------------------------------------
def test_reopen_and_append_an_epoch(any_store):
    record(any_store, epochs=1)
    before = open_store(any_store)["mlp/hidden"].to_dataset().compute()
    with ActivationWriter(any_store, model="mlp") as writer:
        ids = np.arange(10)
        writer.write("hidden", acts(ids, 1), sample=ids, label=ids % 3, epoch=1,
                     prediction=(ids + 1) % 3, split=np.where(ids < 5, "train", "test"),
                     weight=ids * 0.5, group=ids // 4, flag=ids % 2 == 0)
    after = open_store(any_store)["mlp/hidden"].to_dataset().compute()
    assert after.sizes["epoch"] == 2
    xr.testing.assert_identical(after.sel(epoch=[0]).drop_vars(["loss", "accuracy"]),
                                before.drop_vars(["loss", "accuracy"]))
    np.testing.assert_array_equal(after.activation.sel(epoch=1), acts(ids, 1).T)


def test_resume_skips_committed_batches(any_store):
    record(any_store)
    before = open_store(any_store)["mlp/hidden"].to_dataset().compute()
    with ActivationWriter(any_store, model="mlp") as writer:
        ids = np.array([4, 5, 6, 7])
        n = writer.write("hidden", acts(ids, 1), sample=ids, label=ids % 3, epoch=1,
                         prediction=(ids + 1) % 3, split=np.where(ids < 5, "train", "test"),
                         weight=ids * 0.5, group=ids // 4, flag=ids % 2 == 0)
        assert n == 0
    after = open_store(any_store)["mlp/hidden"].to_dataset().compute()
    xr.testing.assert_identical(after, before)


def test_resume_writes_only_what_is_missing(store_path):
    with ActivationWriter(store_path, model="m") as writer:
        writer.write("h", acts(range(4)), sample=range(4))
        writer.write("h", acts([0, 1], 1), sample=[0, 1], epoch=1)
    with ActivationWriter(store_path, model="m") as writer:
        assert writer.missing("h", 1, range(4)).tolist() == [2, 3]
        assert writer.write("h", acts(range(4), 1), sample=range(4), epoch=1) == 2
    ds = open_store(store_path)["m/h"].to_dataset()
    np.testing.assert_array_equal(ds.activation.sel(epoch=1), acts(range(4), 1).T)
    assert ds.epoch_complete.values.tolist() == [True, True]


def test_differing_values_are_refused_unless_overwrite(any_store):
    with ActivationWriter(any_store, model="m") as writer:
        writer.write("h", acts([0, 1, 2]), sample=[0, 1, 2])
    changed = acts([0, 1, 2])
    changed[1] += 1
    with ActivationWriter(any_store, model="m") as writer:
        before = snapshot(any_store)
        with pytest.raises(StoreError, match=r"samples \[1\] are committed for epoch 0 with "
                                             r"different values \(largest difference 1,.*"
                                             "pass overwrite=True"):
            writer.write("h", changed, sample=[0, 1, 2])
        assert snapshot(any_store) == before
        assert writer.write("h", changed, sample=[0, 1, 2], overwrite=True) == 3
    ds = open_store(any_store)["m/h"].to_dataset()
    np.testing.assert_array_equal(ds.activation.sel(epoch=0), changed.T)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_values_written_again_within_rounding_are_the_same_model(store_path, dtype):
    # a resumed recording computes committed samples again, in batches of another size or
    # on another device: float32 sums in another order differ in their last bits. Within
    # RESUME_TOLERANCE of the largest stored value they are the same model (the stored
    # values are kept); further off they are another model, refused naming the difference
    from topoxr.store import RESUME_TOLERANCE, StoredValuesDifferError

    with ActivationWriter(store_path, model="m", dtype=dtype) as writer:
        writer.write("h", acts([0, 1, 2]), sample=[0, 1, 2])
    before = snapshot(store_path)
    scale = float(np.abs(acts([0, 1, 2])).max())
    near = acts([0, 1, 2]) + np.float32(0.5 * RESUME_TOLERANCE * scale)
    with ActivationWriter(store_path, model="m") as writer:
        assert writer.write("h", near, sample=[0, 1, 2]) == 0
    assert snapshot(store_path) == before
    far = acts([0, 1, 2])
    far[2, 0] += np.float32(20 * RESUME_TOLERANCE * scale)
    with ActivationWriter(store_path, model="m") as writer:
        with pytest.raises(StoredValuesDifferError,
                           match=r"samples \[2\] are committed for epoch 0 with different "
                                 r"values \(largest difference 0\.00\d+"):
            writer.write("h", far, sample=[0, 1, 2])
    assert snapshot(store_path) == before


def test_a_model_of_another_framework_is_refused_not_relabelled(store_path):
    # a torch recording into a Keras model of the same name rewrote its framework to
    # "torch" and added its epochs to the Keras network's layers
    with ActivationWriter(store_path, model="net", attrs={"framework": "keras"}) as writer:
        writer.write("dense", acts(range(4)), sample=range(4))
    with pytest.raises(StoreError, match=r"model 'net' in .* was recorded with "
                                         r"framework='keras'; this writer records "
                                         r"framework='torch'"):
        ActivationWriter(store_path, model="net", attrs={"framework": "torch"})
    group = zarr.open_group(store_path, path="net", mode="r")
    assert group.attrs["framework"] == "keras"
    with ActivationWriter(store_path, model="net", attrs={"framework": "keras",
                                                         "note": "resumed"}) as writer:
        writer.write("dense", acts(range(4), 1), sample=range(4), epoch=1)
    assert zarr.open_group(store_path, path="net", mode="r").attrs["note"] == "resumed"


def test_an_infinity_agrees_only_with_itself_in_float16_layers_too():
    # the float16 allowance (one step of float16 at the stored value) was inf at an inf
    from topoxr.store._plan import _same_values

    stored = np.array([[np.inf, -np.inf, 1.0]], np.float32)
    for dtype in (np.dtype("float32"), np.dtype("float16")):
        same, largest, _ = _same_values(stored, np.array([[1.0, np.inf, 1.0]], np.float32),
                                        dtype)
        assert same.tolist() == [[False, False, True]] and largest == np.inf
        same, _, _ = _same_values(stored, stored.copy(), dtype)
        assert same.all()


def test_mode_w_replaces_only_this_model(any_store):
    with ActivationWriter(any_store, model="a") as writer:
        writer.write("h", acts([0, 1]), sample=[0, 1])
    with ActivationWriter(any_store, model="b") as writer:
        writer.write("h", acts([0, 1]), sample=[0, 1])
    with ActivationWriter(any_store, model="a", mode="w") as writer:
        writer.write("h", acts([9], n=2), sample=[9])
    tree = open_store(any_store)
    assert tree["a/h"].sizes == {"neuron": 2, "sample": 1, "epoch": 1}
    assert tree["b/h"].sizes == {"neuron": N_NEURONS, "sample": 2, "epoch": 1}


def test_model_attrs_are_kept(store_path):
    with ActivationWriter(store_path, model="m", attrs={"framework": "torch"}) as writer:
        writer.write("h", acts([0]), sample=[0])
    assert open_store(store_path)["m"].attrs["framework"] == "torch"


# --------------------------------------------------------------------------------------
# one writer at a time
# --------------------------------------------------------------------------------------
def test_second_writer_in_the_same_process_is_refused(any_store):
    with ActivationWriter(any_store, model="m") as writer:
        writer.write("h", acts([0]), sample=[0])
        with pytest.raises(StoreLockedError, match="already open for writing in this process"):
            ActivationWriter(any_store, model="other")
    with ActivationWriter(any_store, model="other") as writer:  # free again
        writer.write("h", acts([0]), sample=[0])


def test_second_writer_in_another_process_is_refused(store_path):
    code = textwrap.dedent(f"""
        from topoxr import ActivationWriter, StoreLockedError
        try:
            ActivationWriter({store_path!r}, model="m")
        except StoreLockedError as err:
            print("LOCKED", err)
        else:
            print("OPENED")
    """)
    with ActivationWriter(store_path, model="m") as writer:
        writer.write("h", acts([0]), sample=[0])
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             timeout=120)
        assert out.stdout.startswith("LOCKED"), out.stdout + out.stderr
        assert "being written by another process" in out.stdout
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.stdout.startswith("OPENED"), out.stdout + out.stderr


def test_a_closed_writer_refuses_writes(store_path):
    writer = ActivationWriter(store_path, model="m")
    writer.close()
    writer.close()  # idempotent
    with pytest.raises(StoreError, match="closed"):
        writer.write("h", acts([0]), sample=[0])


# --------------------------------------------------------------------------------------
# bad input: a clear error and an unchanged store
# --------------------------------------------------------------------------------------
BAD_WRITES = {
    "wrong neuron count": (dict(activations=np.ones((2, N_NEURONS + 1))),
                           rf"has {N_NEURONS} neurons in the store, the batch has {N_NEURONS + 1}"),
    "sample length": (dict(sample=[10, 11, 12]), r"sample has shape \(3,\) but the batch has 2"),
    "label length": (dict(label=[0]), r"label has shape \(1,\) but the batch has 2"),
    "prediction length": (dict(prediction=[0, 1, 2]), r"prediction has shape \(3,\)"),
    "metadata length": (dict(split=["a"]), r"metadata 'split' has shape \(1,\)"),
    "duplicate ids in batch": (dict(sample=[10, 10]), r"duplicate sample ids in the batch: \[10\]"),
    "duplicate ids in epoch": (dict(sample=[0, 10], label=[0, 1], split=["a", "d"]),
                               r"samples \[0\] were already written in "
                               "epoch 0 by this writer"),
    "nan": (dict(activations=np.array([[np.nan] * N_NEURONS, [0.0] * N_NEURONS])),
            rf"{N_NEURONS} activation value\(s\) are NaN or inf"),
    "inf": (dict(activations=np.full((2, N_NEURONS), np.inf)), r"10 activation value\(s\) are NaN"),
    "strings": (dict(activations=np.full((2, N_NEURONS), "x")), "must be real numbers"),
    "objects": (dict(activations=np.array([[object()] * N_NEURONS] * 2)), "must be real numbers"),
    "complex": (dict(activations=np.ones((2, N_NEURONS), complex)), "must be real numbers"),
    "1-d activations": (dict(activations=np.ones(2)), r"must have shape \(batch, neurons"),
    "unknown reduce": (dict(reduce="median"), "unknown reduce mode 'median'"),
    "bad channel axis": (dict(activations=np.ones((2, 3, 4)), channel_axis=0),
                         "channel_axis=0 is not a non-batch axis"),
    "float sample ids": (dict(sample=[10.0, 11.0]), "sample ids must be integers"),
    "reserved sample id": (dict(sample=[10, np.iinfo(np.int64).min]), "is reserved"),
    "label type": (dict(label=["a", "b"]), "labels are <U1, the stored ones int64"),
    "no labels": (dict(label=None), "stores labels; the batch gives none"),
    "no predictions": ({"prediction": None}, "stores predictions; the batch gives none"),
    "float labels": ({"label": [0.0, 1.0]},
                     "labels must be integers or strings .* got float64"),
    "bool labels": ({"label": [True, False]}, "labels must be integers or strings .* got bool"),
    "float predictions": ({"prediction": [0.0, 1.0]},
                          "predictions must be integers or strings .* got float64"),
    "bool predictions": ({"prediction": [True, False]},
                         "predictions must be integers or strings .* got bool"),
    "str predictions, int labels": ({"prediction": ["a", "b"]},
                                    "labels are int64 and predictions <U1; 'correct' compares"),
    "int predictions, str labels": ({"layer": "new", "label": ["a", "b"], "split": None},
                                    "labels are <U1 and predictions int64; 'correct' compares"),
    "changed label": (dict(sample=[0, 10], label=[2, 0], activations=acts([0, 10]),
                           overwrite=True), r"labels of samples \[0\] differ"),
    "metadata columns": (dict(split=None, other=[1, 2]), "stores metadata columns"),
    "metadata type": (dict(split=[1, 2]), "metadata 'split' is int64"),
    "metadata values": (dict(split=[{"a": 1}, {"b": 2}]), "must hold str, int, float or bool"),
    "reserved column": (dict(x=[1, 2]), "'x' cannot be a metadata column name"),
    "column named count": ({"count": [1, 2]}, "'count' cannot be a metadata column name"),
    # the recorders' names for write's label= and sample=: they became metadata columns
    "labels= as for a recorder": ({"labels": [1, 2]}, "takes label=, not labels="),
    "sample_ids= as for a recorder": ({"sample_ids": [1, 2]}, "takes sample=, not sample_ids="),
    "negative epoch": (dict(epoch=-1), "epoch must be >= 0"),
    "float epoch": (dict(epoch=1.5), "epoch must be an integer"),
    "bool epoch": (dict(epoch=True), "epoch must be an integer"),
    "empty layer name": (dict(layer=""), "layer must be a non-empty string"),
    "no neurons": (dict(activations=np.ones((2, 0))), "the activations have no neurons"),
}


def test_an_empty_batch_writes_nothing(any_store):
    with ActivationWriter(any_store, model="m") as writer:
        writer.write("h", acts([0]), sample=[0])
        before = snapshot(any_store)
        assert writer.write("h", np.ones((0, N_NEURONS)), sample=[]) == 0
        assert writer.write("new", np.ones((0, 3)), sample=[]) == 0
        assert snapshot(any_store) == before
        assert writer.layers == ["h"]


@pytest.mark.parametrize("case", sorted(BAD_WRITES))
def test_bad_input_is_refused_and_writes_nothing(any_store, case):
    kwargs, match = BAD_WRITES[case]
    with ActivationWriter(any_store, model="m") as writer:
        writer.write("h", acts([0, 1]), sample=[0, 1], label=[0, 1], prediction=[0, 0],
                     split=["a", "b"])
        writer.flush()  # the good batch is committed: the refused one must add nothing
        before = snapshot(any_store)
        call = dict(layer="h", activations=acts([10, 11]), sample=[10, 11], label=[1, 1],
                    prediction=[1, 0], split=["c", "d"])
        call.update(kwargs)
        if call.get("split", "") is None:
            del call["split"]
        layer, values = call.pop("layer"), call.pop("activations")
        with pytest.raises(StoreError, match=match):
            writer.write(layer, values, **call)
        assert snapshot(any_store) == before
        # the writer is still usable
        assert writer.write("h", acts([20, 21]), sample=[20, 21], label=[0, 0],
                            prediction=[0, 0], split=["e", "f"]) == 2
    ds = open_store(any_store)["m/h"].to_dataset()
    assert ds.sample.values.tolist() == [0, 1, 20, 21]


@pytest.mark.parametrize("dtype, bad, match", [
    ("float32", np.nan, r"3 activation value\(s\) are NaN or inf"),
    ("float32", -np.inf, r"3 activation value\(s\) are NaN or inf"),
    ("float16", 7e4, "exceed 65504, the largest float16"),
])
@pytest.mark.parametrize("handed_over", [False, True])
def test_a_refused_batch_leaves_the_buffered_batches_as_they_were(
        store_path, dtype, bad, match, handed_over):
    """A batch refused by the value checks while others wait in the write buffer adds
    nothing to it: the batches buffered before it and after it are stored exactly."""
    good = [acts(np.arange(i, i + 4)) for i in (0, 4, 12)]
    with ActivationWriter(store_path, model="m", dtype=dtype) as writer:
        writer.write("h", good[0], sample=np.arange(0, 4), label=np.zeros(4, int))
        writer.write("h", good[1], sample=np.arange(4, 8), label=np.zeros(4, int))
        refused = acts(np.arange(8, 12))
        refused[1:, 2] = bad  # three bad values in the batch's last rows
        write = writer.write_handed_over if handed_over else writer.write
        with pytest.raises(StoreError, match=match):
            write("h", refused, sample=np.arange(8, 12), label=np.zeros(4, int))
        writer.write("h", good[2], sample=np.arange(12, 16), label=np.zeros(4, int))
    ds = open_store(store_path)["m/h"].to_dataset()
    assert ds.sample.values.tolist() == [*range(8), *range(12, 16)]
    expected = np.concatenate(good).astype(dtype).astype(np.float32)
    np.testing.assert_array_equal(ds.activation.sel(epoch=0).values.T, expected)


def test_nonfinite_values_are_stored_when_allowed(any_store):
    values = acts([0, 1, 2])
    values[0, 1], values[2, 0] = np.nan, -np.inf
    with ActivationWriter(any_store, model="m") as writer:
        writer.write("h", values, sample=[0, 1, 2], allow_nonfinite=True)
    ds = open_store(any_store)["m/h"].to_dataset()
    assert ds.committed.values.all()
    np.testing.assert_array_equal(ds.activation.sel(epoch=0).values, values.T)


@pytest.mark.parametrize("kwargs, match", [
    (dict(mode="r"), "mode must be 'a'"),
    (dict(model=""), "model must be a non-empty string"),
    (dict(chunk_samples=0), "chunk_samples must be a positive integer"),
])
def test_bad_writer_arguments(store_path, kwargs, match):
    call = dict(model="m") | kwargs
    with pytest.raises(StoreError, match=match):
        ActivationWriter(store_path, **call)
    assert not os.path.exists(store_path)


def test_store_must_be_a_path(tmp_path):
    with pytest.raises(StoreError, match="store must be a path or an fsspec URL, got int"):
        ActivationWriter(3, model="m")


@pytest.fixture(params=["plain directory", "plain file", "foreign zarr group"])
def not_a_store(request, tmp_path):
    path = tmp_path / "thing"
    if request.param == "plain directory":
        path.mkdir()
        (path / "notes.txt").write_text("hello")
    elif request.param == "plain file":
        path.write_text("hello")
    else:
        zarr.open_group(str(path), mode="w", attributes={"owner": "someone else"})
    return str(path)


def test_a_path_that_is_not_a_store_is_refused(not_a_store):
    before = snapshot(not_a_store)
    with pytest.raises(StoreError, match="not a topoxr store"):
        ActivationWriter(not_a_store, model="m")
    with pytest.raises(StoreError, match="not a topoxr store"):
        open_store(not_a_store)
    with pytest.raises(StoreError, match="not a topoxr store"):
        store_summary(not_a_store)
    assert snapshot(not_a_store) == before


def test_model_name_taken_by_another_node(store_path):
    with ActivationWriter(store_path, model="a b") as writer:
        writer.write("h", acts([0]), sample=[0])
    with pytest.raises(StoreError, match="is not the model 'a_b'"):
        ActivationWriter(store_path, model="a_b")


def test_empty_directory_becomes_a_store(tmp_path):
    path = tmp_path / "empty.zarr"
    path.mkdir()
    with ActivationWriter(str(path), model="m") as writer:
        writer.write("h", acts([0]), sample=[0])
    assert open_store(str(path))["m/h"].sizes["sample"] == 1


def test_missing_store(tmp_path):
    with pytest.raises(FileNotFoundError, match="no topoxr store"):
        open_store(str(tmp_path / "nothing.zarr"))


def test_opened_store_pickles_for_distributed_workers(store_path):
    import pickle

    record(store_path)
    ds = open_store(store_path)["mlp/hidden"].to_dataset()
    again = pickle.loads(pickle.dumps(ds))
    xr.testing.assert_identical(again.compute(), ds.compute())
    # the mask travels once with the graph, not once per task
    assert len(pickle.dumps(ds.activation.data.dask)) < 20_000


# --------------------------------------------------------------------------------------
# the commit mask
# --------------------------------------------------------------------------------------
def _raw_group(url, node):
    """The zarr group of a node, opened with zarr alone."""
    return zarr.open_group(zarr.storage.FsspecStore.from_url(url) if "://" in url
                           else url, path=node, mode="r")


def test_commit_mask_spans_chunks_in_any_order(any_store, monkeypatch):
    """Batches land in several mask chunks, out of order, the last chunk a partial one.

    Local stores write the (uncompressed) mask chunks directly, ``memory://`` goes
    through zarr's codec pipeline: zarr must read the same mask back from both.
    """
    import topoxr.store.writer

    monkeypatch.setattr(topoxr.store.writer, "_MASK_TARGET", 1)  # mask chunk = one batch
    batches = [np.arange(8, 12), np.arange(0, 4), np.arange(12, 14), np.arange(4, 8)]
    with ActivationWriter(any_store, model="m") as writer:
        for ids in batches:
            writer.write("h", acts(ids), sample=ids)
        # epoch 1 stays incomplete: parts of chunks, the partial last chunk included
        for ids in ([10, 9], [0], [13], [5, 6, 7]):
            writer.write("h", acts(ids, 1), sample=ids, epoch=1)
    done = [10, 9, 0, 13, 5, 6, 7]
    group = _raw_group(any_store, "m/h")
    assert group["committed"].chunks == (4, 1)
    assert group["committed"].compressors == (zarr.codecs.Crc32cCodec(),)  # bytes + crc32c
    stored_ids = group["sample"][:]
    expected = np.stack([np.ones(14, bool), np.isin(stored_ids, done)], axis=1)
    np.testing.assert_array_equal(group["committed"][:], expected)
    ds = open_store(any_store)["m/h"].to_dataset().sortby("sample")
    np.testing.assert_array_equal(ds.activation.sel(epoch=0), acts(np.arange(14)).T)
    np.testing.assert_array_equal(ds.activation.sel(epoch=1, sample=sorted(done)),
                                  acts(sorted(done), 1).T)
    assert ds.activation.sel(epoch=1).isnull().sum() == N_NEURONS * (14 - len(done))


def test_a_store_with_a_compressed_mask_is_still_committed_to(store_path):
    """A mask stored compressed (earlier development versions) takes zarr's write path."""
    with ActivationWriter(store_path, model="m") as writer:
        writer.write("h", acts(range(4)), sample=range(4))
    group = zarr.open_group(store_path, path="m/h", mode="r+")
    old = group["committed"]
    mask = old[:]
    group.create_array("committed", shape=old.shape, chunks=old.chunks, dtype=bool,
                       fill_value=False, compressors=zarr.codecs.ZstdCodec(),
                       dimension_names=old.metadata.dimension_names, overwrite=True)[:] = mask
    with ActivationWriter(store_path, model="m") as writer:
        writer.write("h", acts([2, 3], 1), sample=[2, 3], epoch=1)
        writer.write("h", acts([0, 1], 1), sample=[0, 1], epoch=1)
    assert zarr.open_group(store_path, path="m/h", mode="r")["committed"].compressors != ()
    ds = open_store(store_path)["m/h"].to_dataset()
    assert ds.committed.values.all()
    np.testing.assert_array_equal(ds.activation.sel(epoch=1), acts(range(4), 1).T)
    assert ds.epoch_complete.values.tolist() == [True, True]


@pytest.mark.parametrize("finish", [False, True], ids=["writing", "closed"])
def test_a_partial_epoch_over_many_prediction_chunks_is_no_damage(store_path, finish):
    """Predictions are written where batches are committed: an epoch still being written
    (or left partial by a crash) over more samples than one chunk of 'prediction' and
    'correct' has chunks nobody wrote yet. That is no damage (the store was refused
    whole, every model and layer, and a recorder could not resume); a chunk that holds
    committed predictions and is gone still is."""
    from topoxr import StoreCorruptionError, verify

    ids = np.arange(26)
    writer = ActivationWriter(store_path, model="m", buffer_bytes=0, expected_samples=4,
                              expected_epochs=3)
    writer.write("h", acts(ids[:3], 1), sample=ids[:3], label=ids[:3] % 2,
                 prediction=ids[:3] % 3 % 2, epoch=1)
    writer.write("h", acts(ids), sample=ids, label=ids % 2, prediction=ids % 3 % 2, epoch=0)
    writer.flush()
    if finish:
        writer.close()
    try:
        chunks = sorted(p.name for p in (Path(store_path) / "m" / "h" / "prediction").iterdir())
        assert len(chunks) < 2 * 7 + 1  # 26 samples in chunks of 4, 2 epochs: some unwritten
        ds = open_store(store_path)["m/h"].to_dataset()
        assert int(ds.committed.sum()) == 29
        np.testing.assert_array_equal(ds.prediction.sel(epoch=0), ids % 3 % 2)
        np.testing.assert_array_equal(ds.prediction.sel(epoch=1)[:3], ids[:3] % 3 % 2)
        np.testing.assert_array_equal(ds.correct.sel(epoch=0), ids % 3 % 2 == ids % 2)
        if finish:
            assert verify(store_path).ok
            (Path(store_path) / "m" / "h" / "prediction" / "c.0.1").unlink()  # committed
            with pytest.raises(StoreCorruptionError, match=r"'prediction', chunk c\.0\.1"):
                open_store(store_path)
    finally:
        writer.close()


@pytest.mark.parametrize("column", ["label", "metadata"])
def test_unsigned_values_beyond_int64_are_refused_not_wrapped(store_path, column):
    # labels and metadata are stored as int64: 2**64-1 read back as -1 (the label fill)
    big = np.array([2**63 + 5, 1, 2**64 - 1, 7], dtype=np.uint64)
    kwargs = {"label": big} if column == "label" else {"tag": big}
    with ActivationWriter(store_path, model="m") as writer:
        with pytest.raises(StoreError, match=r"holds 18446744073709551615, above the largest "
                                             r"value the store keeps \(int64"):
            writer.write("h", acts(range(4)), sample=range(4), **kwargs)
        ok = {"label": big % 1000} if column == "label" else {"tag": big % 1000}
        writer.write("h", acts(range(4)), sample=range(4), **ok)
    ds = open_store(store_path)["m/h"].to_dataset()
    np.testing.assert_array_equal(ds["label" if column == "label" else "tag"], big % 1000)


def test_a_small_layer_of_unknown_length_is_not_stored_in_4_mib_chunks(store_path):
    """Without expected_samples the chunks were sized to 4 MiB from the first batch, and a
    chunk is stored whole however few samples come: 5 samples of 2 neurons took 4 MiB an
    epoch (1030 epochs: 4.1 GB). A chunk now holds 16 batches at most, or 1024 samples
    where that is more."""
    with ActivationWriter(store_path, model="m") as writer:
        for epoch in range(20):
            writer.write("h", acts(range(5), epoch, n=2), sample=range(5), epoch=epoch)
    folder = Path(store_path) / "m" / "h" / "activation"
    on_disk = sum(f.stat().st_size for f in folder.iterdir())
    assert zarr.open_array(str(folder), mode="r").chunks == (2, 1025, 1)
    assert on_disk < 20 * 1025 * 2 * 4 + 4096
    ds = open_store(store_path)["m/h"].to_dataset()
    np.testing.assert_array_equal(ds.activation.values,
                                  np.stack([acts(range(5), e, n=2).T for e in range(20)], -1))


def test_arrays_grow_to_the_committed_data(store_path):
    """The sample axis grows exactly to the data; the epoch axis makes room for
    ``_EPOCH_ROOM`` epochs when a second one arrives, then doubles (each new epoch would
    otherwise rewrite six arrays' metadata). Readers see the logical lengths throughout,
    no chunk is stored for the room, and close() trims the epoch axis."""
    from topoxr.store.writer import _EPOCH_ROOM

    def shapes():
        group = zarr.open_group(store_path, path="m/h", mode="r")
        return {name: (arr.metadata.dimension_names, arr.shape) for name, arr in group.arrays()}

    def lengths(dim):
        return {len_ for dims, shape in shapes().values()
                for d, len_ in zip(dims, shape, strict=True) if d == dim}

    def chunk_files(name):
        return sorted(p.name for p in (Path(store_path) / "m" / "h" / name).iterdir()
                      if p.name != "zarr.json")

    writer = ActivationWriter(store_path, model="m")
    for start in range(0, 10, 2):
        ids = np.arange(start, start + 2)
        writer.write("h", acts(ids), sample=ids, label=ids % 3, prediction=ids % 2,
                     split=np.where(ids < 5, "a", "b"))
    writer.flush()
    assert lengths("epoch") == {1}  # one epoch: no room made
    for epoch in (1, 2):
        writer.write("h", acts(range(10), epoch), sample=range(10), label=np.arange(10) % 3,
                     prediction=np.arange(10) % 2, split=np.where(np.arange(10) < 5, "a", "b"),
                     epoch=epoch)
    writer.log_epoch(2, loss=0.5)
    # while writing: every array holds exactly the 10 samples, and room for the epochs
    assert lengths("sample") == {10} and lengths("epoch") == {_EPOCH_ROOM}
    assert len(chunk_files("committed")) == 3  # one mask chunk per written epoch
    ds = open_store(store_path)["m/h"].to_dataset()
    assert dict(ds.sizes) == {"neuron": N_NEURONS, "sample": 10, "epoch": 3}
    assert ds.sample.values.tolist() == list(range(10))
    for epoch in range(3, _EPOCH_ROOM + 1):  # one past the room: it doubles
        writer.write("h", acts(range(10), epoch), sample=range(10), label=np.arange(10) % 3,
                     prediction=np.arange(10) % 2, split=np.where(np.arange(10) < 5, "a", "b"),
                     epoch=epoch)
    writer.flush()
    assert lengths("epoch") == {2 * _EPOCH_ROOM}
    assert len(open_store(store_path)["m/h"].epoch) == _EPOCH_ROOM + 1
    writer.close()
    assert lengths("sample") == {10} and lengths("epoch") == {_EPOCH_ROOM + 1}
    assert len(chunk_files("committed")) == _EPOCH_ROOM + 1
    plain = xr.open_datatree(store_path, engine="zarr")["m/h"].to_dataset()
    assert dict(plain.sizes) == {"neuron": N_NEURONS, "sample": 10, "epoch": _EPOCH_ROOM + 1}
    np.testing.assert_array_equal(plain.activation.sel(epoch=2), acts(range(10), 2).T)
    np.testing.assert_array_equal(plain.activation.sel(epoch=_EPOCH_ROOM),
                                  acts(range(10), _EPOCH_ROOM).T)
    assert plain.loss.values[2] == 0.5 and np.isnan(plain.loss.values[3])
    assert plain.epoch_complete.values.all()


# --------------------------------------------------------------------------------------
# inputs checked before anything is written (issue 12)
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize(("kwargs", "message"), [
    ({"sample": np.array([2**63], dtype=np.uint64)}, "does not fit a 64-bit signed integer"),
    ({"sample": [0], "epoch": 2**63}, "epoch 9223372036854775808 does not fit"),
    ({"sample": [0], "epoch": np.uint64(2**64 - 1)}, "does not fit a 64-bit signed integer"),
])
def test_ids_and_epochs_beyond_int64_are_refused_not_wrapped(store_path, kwargs, message):
    with ActivationWriter(store_path, model="m") as writer:
        writer.write("h", acts([5]), sample=[5])
        before = _snapshot_files(store_path)
        with pytest.raises(StoreError, match=message):
            writer.write("h", acts([0]), **kwargs)
        assert _snapshot_files(store_path) == before
        assert writer.write("h", acts([6]), sample=[6]) == 1  # still usable
    assert sorted(open_store(store_path)["m/h"].sample.values.tolist()) == [5, 6]


@pytest.mark.parametrize(("name", "message"), [
    ("a_b", "maps to node 'a_b', already used by layer 'a b'"),
    ("x" * 300, "300 bytes long; at most 255"),
    ("zarr.json", "reserved by the store format"),
])
def test_bad_layer_names_are_refused_and_the_writer_stays_usable(store_path, name, message):
    with ActivationWriter(store_path, model="m") as writer:
        writer.write("a b", acts([0]), sample=[0])
        before = _snapshot_files(store_path)
        with pytest.raises(StoreError, match=message):
            writer.write(name, acts([0]), sample=[0])
        assert _snapshot_files(store_path) == before
        assert writer.write("c", acts([0]), sample=[0]) == 1
    assert sorted(open_store(store_path)["m"].children) == ["a_b", "c"]


def test_bad_model_names_are_refused(store_path):
    with pytest.raises(StoreError, match="300 bytes long"):
        ActivationWriter(store_path, model="m" * 300)
    with pytest.raises(StoreError, match="reserved"):
        ActivationWriter(store_path, model="zarr.json")


def test_missing_with_non_integer_ids_is_a_clear_error(store_path):
    with ActivationWriter(store_path, model="m") as writer:
        writer.write("h", acts([0, 1]), sample=[0, 1])
        with pytest.raises(StoreError, match="sample ids must be integers, got float64"):
            writer.missing("h", 0, [1.5])
        assert writer.missing("h", 0, [0, 1, 2]).tolist() == [2]


def _snapshot_files(path):
    from pathlib import Path

    root = Path(path)
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_fsync_writer_writes_the_same_store(tmp_path, monkeypatch):
    import os

    import topoxr.store._durable as durable

    synced = []
    real = os.fsync
    monkeypatch.setattr(durable.os, "fsync", lambda fd: (synced.append(fd), real(fd)))
    for name, fsync in (("plain.zarr", False), ("durable.zarr", True)):
        with ActivationWriter(str(tmp_path / name), model="m", fsync=fsync) as writer:
            writer.write("h", acts(range(4)), sample=range(4), label=[0, 1, 0, 1])
            writer.write("h", acts(range(4), 1), sample=range(4), label=[0, 1, 0, 1], epoch=1)
        if not fsync:
            assert not synced
    assert len(synced) > 10  # every chunk and metadata document, and their folders
    a = open_store(str(tmp_path / "plain.zarr"))["m/h"].to_dataset()
    b = open_store(str(tmp_path / "durable.zarr"))["m/h"].to_dataset()
    xr.testing.assert_identical(a.drop_attrs(), b.drop_attrs())
    with pytest.raises(StoreError, match="fsync=True is for local paths"):
        ActivationWriter("memory://durable.zarr", model="m", fsync=True)


def _as_format_1(path):
    """Rewrite a store as format version 1 wrote it: the same chunks without checksums."""
    import json
    from pathlib import Path

    root = Path(path)
    meta = json.loads((root / "zarr.json").read_text())
    meta["attributes"]["topoxr_format_version"] = 1
    meta.pop("consolidated_metadata", None)
    (root / "zarr.json").write_text(json.dumps(meta))
    for doc in root.rglob("zarr.json"):
        meta = json.loads(doc.read_text())
        if meta.get("node_type") != "array":
            continue
        meta["codecs"] = [c for c in meta["codecs"] if c["name"] != "crc32c"]
        doc.write_text(json.dumps(meta))
        for chunk in doc.parent.glob("c.*"):
            if chunk.is_file():
                chunk.write_bytes(chunk.read_bytes()[:-4])


def test_a_format_1_store_without_checksums_stays_readable(store_path, caplog):
    import logging

    import topoxr

    with ActivationWriter(store_path, model="m") as writer:
        writer.write("h", acts(range(4)), sample=range(4), label=[0, 1, 0, 1])
    expected = open_store(store_path)["m/h"].to_dataset().load()
    _as_format_1(store_path)
    with caplog.at_level(logging.INFO, logger="topoxr.store"):
        got = open_store(store_path)["m/h"].to_dataset().load()
    xr.testing.assert_identical(expected, got)
    assert "without chunk checksums" in caplog.text
    summary = store_summary(store_path)
    assert summary["format_version"] == 1
    assert summary["models"]["m"]["layers"]["h"]["checksums"] is False
    report = topoxr.verify(store_path)
    assert not report.ok and [p.kind for p in report.problems] == ["unverifiable"]
    # a writer resumes it in its own format (no checksums added to old arrays)
    with ActivationWriter(store_path, model="m") as writer:
        writer.write("h", acts(range(4), 1), sample=range(4), label=[0, 1, 0, 1], epoch=1)
    ds = open_store(store_path)["m/h"].to_dataset()
    np.testing.assert_array_equal(ds.activation.sel(epoch=1).values, acts(range(4), 1).T)
    assert ds.epoch_complete.values.tolist() == [True, True]


def test_plain_xarray_recipe_on_a_closed_store(store_path):
    """The documented recipe, ``activation.where(committed)``, on a store with a half epoch."""
    with ActivationWriter(store_path, model="m") as writer:
        writer.write("h", acts(range(6)), sample=range(6))
        writer.write("h", acts([1, 4], 1), sample=[1, 4], epoch=1)  # epoch 1: 2 of 6
    ds = xr.open_datatree(store_path, engine="zarr")["m/h"].to_dataset()
    done = ds.activation.where(ds.committed)
    ours = open_store(store_path)["m/h"].to_dataset()
    xr.testing.assert_identical(done.reset_coords(drop=True),
                                ours.activation.reset_coords(drop=True))
    assert int(ds.committed.sum()) == 8


def test_a_store_being_created_is_reported_as_such(tmp_path):
    from topoxr._locking import WriterLock

    path = tmp_path / "new.zarr"
    path.mkdir()
    (path / "placeholder").write_text("")  # not empty: only the lock says a writer is there
    lock = WriterLock(str(path), local_dir=str(path))
    lock.acquire()
    try:
        with pytest.raises(StoreError, match="being created by a writer"):
            open_store(str(path))
    finally:
        lock.release()
    with pytest.raises(StoreError, match="not a topoxr store"):
        open_store(str(path))


# -- a lazy view and a writer that replaces what it reads -----------------------------------
def _written(path, values, ids, *, mode="a", epoch=0, overwrite=False):
    with ActivationWriter(path, model="m", mode=mode) as w:
        w.write("h", values, sample=ids, label=ids % 2, epoch=epoch, overwrite=overwrite)


@pytest.mark.parametrize("url", ["local", "memory"])
def test_a_view_refuses_to_read_a_layer_replaced_or_overwritten_since(tmp_path, url):
    """open_store reads coordinates at once and activations when computed: a layer
    replaced (mode='w') or overwritten (overwrite=True) in between would give the new
    values under the old coordinates; the view says so instead."""
    from topoxr import naps
    from topoxr.store import StoreChangedError

    path = str(tmp_path / "s.zarr") if url == "local" else f"memory://changed-{tmp_path.name}"
    x = np.arange(12, dtype=np.float32).reshape(6, 2)
    ids = np.arange(6)
    _written(path, x, ids)
    old = open_store(path)["m/h"].to_dataset()
    _written(path, x[::-1] * 10, ids[::-1], mode="w")  # the same ids, other values
    with pytest.raises(StoreChangedError, match=r"layer 'h' of model 'm' was replaced"):
        old.activation.load()
    with pytest.raises(StoreChangedError):
        naps(old, normalize=False).compute()
    new = open_store(path)["m/h"].to_dataset()  # opened again: the new values, in place
    np.testing.assert_array_equal(  # sample k was written as row 5 - k of x[::-1]
        new.activation.isel(epoch=0).sel(sample=ids).transpose("sample", "neuron"), x * 10)
    # values overwritten in place (overwrite=True) are caught the same way
    view = open_store(path)["m/h"].to_dataset()
    _written(path, x + 100, ids, overwrite=True)
    with pytest.raises(StoreChangedError, match="overwritten"):
        view.activation.load()
    np.testing.assert_array_equal(
        open_store(path)["m/h"].to_dataset().activation.isel(epoch=0).sel(sample=ids)
        .transpose("sample", "neuron"), x + 100)


def test_a_view_reads_on_while_a_writer_only_appends(tmp_path):
    path = str(tmp_path / "s.zarr")
    x = np.arange(12, dtype=np.float32).reshape(6, 2)
    _written(path, x, np.arange(6))
    view = open_store(path)["m/h"].to_dataset()
    _written(path, x + 1, np.arange(6), epoch=1)  # a new epoch: the view keeps its own
    np.testing.assert_array_equal(view.activation.isel(epoch=0).transpose("sample", "neuron"),
                                  x)
    assert view.sizes == {"neuron": 2, "sample": 6, "epoch": 1}


def test_a_layer_of_an_earlier_version_without_a_token_is_checked_once_overwritten(tmp_path):
    from topoxr.store import StoreChangedError

    path = str(tmp_path / "s.zarr")
    x = np.arange(12, dtype=np.float32).reshape(6, 2)
    _written(path, x, np.arange(6))
    group = zarr.open_group(path, path="m/h", mode="r+", use_consolidated=False)
    del group.attrs["topoxr_generation"]  # as earlier versions wrote layers
    view = open_store(path)["m/h"].to_dataset()
    np.testing.assert_array_equal(view.activation.isel(epoch=0).transpose("sample", "neuron"),
                                  x)
    _written(path, x * 2, np.arange(6), overwrite=True)
    with pytest.raises(StoreChangedError):
        view.activation.load()


def test_write_store_adds_a_layer_with_mode_a_and_replaces_the_model_by_default(tmp_path):
    """write_store always replaced the model: a second layer written into it took the
    first one's place without a word."""
    from topoxr.testing import make_activations, write_store

    path = str(tmp_path / "two.zarr")
    a = make_activations(n_neurons=6, n_samples=20, n_epochs=2, random_state=0)
    b = make_activations(n_neurons=4, n_samples=20, n_epochs=2, random_state=1)
    write_store(a, path, layer="a")
    write_store(b, path, layer="b", mode="a")
    tree = open_store(path)
    assert sorted(tree["model"].children) == ["a", "b"]
    np.testing.assert_allclose(tree["model/a"].activation.values,
                               a.activation.transpose("neuron", "sample", "epoch").values,
                               rtol=1e-6)
    write_store(b, path, layer="b")  # the default replaces the model, as documented
    assert sorted(open_store(path)["model"].children) == ["b"]
    with pytest.raises(ValueError, match="mode must be 'w'"):
        write_store(b, path, layer="b", mode="r+")


@pytest.mark.parametrize("batch_size", [0, -3, 2.5])
def test_write_store_refuses_a_batch_size_below_one_and_changes_nothing(tmp_path, batch_size):
    """batch_size=-3 wrote nothing and emptied the model; 0 deleted it, then failed in
    range()."""
    from topoxr.testing import make_activations, write_store

    path = str(tmp_path / "s.zarr")
    write_store(make_activations(n_neurons=4, n_samples=10, n_epochs=1), path, layer="keep")
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        write_store(make_activations(n_neurons=4, n_samples=10, n_epochs=1), path,
                    layer="other", batch_size=batch_size)
    assert sorted(open_store(path)["model"].children) == ["keep"]
