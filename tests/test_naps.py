"""NAPs: group means by any label, on numpy, dask and real stores."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
import xarray as xr
import zarr

import topoxr
from topoxr.grouping import GroupingError, naps
from topoxr.similarity import ProfileError
from topoxr.store import ActivationWriter, StoreCorruptionError
from topoxr.testing import make_activations, raise_if_dask_computes, write_store


@pytest.fixture(params=["numpy", "dask"])
def backend(request):
    return request.param


def _layer(backend, **kwargs):
    chunks = {"sample": 7, "epoch": 1} if backend == "dask" else None
    return make_activations(chunks=chunks, **kwargs)


def _manual(ds, keys):
    """Reference: plain numpy loops over epochs and groups."""
    act = np.asarray(ds.activation.values, dtype=np.float64)
    out = {}
    for e in range(ds.sizes["epoch"]):
        cols = []
        for k in keys:
            c = ds[k].values
            cols.append(c[:, e] if c.ndim == 2 else c)
        for combo in sorted(set(zip(*cols, strict=True))):
            sel = np.all([col == v for col, v in zip(cols, combo, strict=True)], axis=0)
            out[(combo, e)] = (act[:, sel, e].mean(axis=1), int(sel.sum()))
    return out


def test_label_naps_match_numpy_group_means(backend):
    ds = _layer(backend)
    raw = naps(ds, by="label", normalize=False)
    assert raw.dims == ("neuron", "label", "epoch")
    assert raw.name == "nap"
    ref = _manual(ds, ["label"])
    for ((label,), e), (mean, count) in ref.items():
        np.testing.assert_allclose(raw.sel(label=label).isel(epoch=e).values, mean, rtol=1e-5)
        assert int(raw["count"].sel(label=label).isel(epoch=e)) == count


def test_normalisation_subtracts_mean_over_groups(backend):
    ds = _layer(backend)
    raw = naps(ds, normalize=False)
    norm = naps(ds)
    np.testing.assert_allclose(norm.values, (raw - raw.mean("label")).values, atol=1e-6)
    np.testing.assert_allclose(norm.mean("label").values, 0.0, atol=1e-6)
    assert json.loads(norm.attrs["topoxr_nap"])["normalize"] is True
    assert json.loads(raw.attrs["topoxr_nap"])["normalize"] is False


def test_dask_input_stays_lazy_until_computed():
    ds = _layer("dask")
    with raise_if_dask_computes():
        lazy = naps(ds, by=["label", "correct"])
    assert lazy.chunks is not None
    eager = naps(_layer("numpy"), by=["label", "correct"])
    xr.testing.assert_allclose(lazy.compute(), eager, atol=1e-6)


def test_binary_contrast_has_multiindex_of_occurring_groups(backend):
    ds = _layer(backend, n_samples=24, n_labels=3)
    nap = naps(ds, by=["label", "correct"], normalize=False)
    assert nap.dims == ("neuron", "group", "epoch")
    index = nap.indexes["group"]
    assert isinstance(index, pd.MultiIndex)
    assert list(index.names) == ["label", "correct"]
    ref = _manual(ds, ["label", "correct"])
    occurring = {combo for combo, _ in ref}
    assert set(index) == occurring  # every combination that occurs, and only those
    counts = nap["count"]
    for g, combo in enumerate(index):
        for e in range(ds.sizes["epoch"]):
            if (combo, e) in ref:
                mean, count = ref[(combo, e)]
                assert int(counts[g, e]) == count
                np.testing.assert_allclose(nap.values[:, g, e], mean, rtol=1e-5)
            else:  # the group is empty at this epoch only: NaN and count 0
                assert int(counts[g, e]) == 0
                assert np.isnan(nap.values[:, g, e]).all()


def test_prediction_varies_per_epoch(backend):
    ds = _layer(backend)
    nap = naps(ds, by="prediction", normalize=False)
    ref = _manual(ds, ["prediction"])
    for ((pred,), e), (mean, count) in ref.items():
        np.testing.assert_allclose(nap.sel(prediction=pred).isel(epoch=e).values, mean,
                                   rtol=1e-5)
        assert int(nap["count"].sel(prediction=pred).isel(epoch=e)) == count


def test_metadata_column_and_kept_coords():
    ds = make_activations(n_samples=20)
    group = np.where(np.arange(20) % 3 == 0, "a", "b")
    ds = ds.assign_coords(site=("sample", group), x=("neuron", np.linspace(0, 1, 12)),
                          y=("neuron", np.linspace(1, 0, 12)))
    nap = naps(ds, by="site", normalize=False)
    assert list(nap["site"].values) == ["a", "b"]
    assert "x" in nap.coords and "y" in nap.coords and "preferred" in nap.coords
    assert nap.attrs["topoxr_layer"] == "synthetic"
    np.testing.assert_allclose(nap.sel(site="a").isel(epoch=0).values,
                               ds.activation.values[:, group == "a", 0].mean(axis=1), rtol=1e-5)


def test_correct_only_and_epoch_selection():
    ds = make_activations()
    nap = naps(ds, correct_only=True, epochs=[1, 2], normalize=False)
    assert nap["epoch"].values.tolist() == [1, 2]
    ok = ds.correct.values[:, 2]
    lab = ds.label.values
    sel = ok & (lab == 0)
    np.testing.assert_allclose(nap.sel(label=0, epoch=2).values,
                               ds.activation.values[:, sel, 2].mean(axis=1), rtol=1e-5)
    assert int(nap["count"].sel(label=0, epoch=2)) == sel.sum()


def test_only_committed_samples_of_a_real_store_count(tmp_path):
    """An epoch still being written: its missing samples are NaN and not counted."""
    ds = make_activations(n_samples=32)
    path = str(tmp_path / "run.zarr")
    write_store(ds, path)
    values = ds.activation.values
    # epoch 3 written for the first 16 samples only, and not completed
    with ActivationWriter(path, model="model") as w:
        ids = ds.sample.values[:16]
        w.write("hidden", values[:, :16, 2].T + 1.0, sample=ids, label=ds.label.values[:16],
                prediction=ds.prediction.values[:16, 2], epoch=3)
    layer = topoxr.open_store(path)["model/hidden"].to_dataset()
    assert not layer.committed.values[:, -1].all()
    nap = naps(layer, normalize=False).compute()
    lab = ds.label.values[:16]
    for label in range(4):
        sel = lab == label
        np.testing.assert_allclose(nap.sel(label=label, epoch=3).values,
                                   values[:, :16, 2][:, sel].mean(axis=1) + 1.0, rtol=1e-5)
        assert int(nap["count"].sel(label=label, epoch=3)) == sel.sum()
        assert int(nap["count"].sel(label=label, epoch=0)) == 8


def test_group_empty_in_every_epoch_is_absent():
    ds = make_activations(n_samples=20)
    ds = ds.assign_coords(committed=(("sample", "epoch"),
                                     np.repeat((ds.label.values != 3)[:, None], 3, axis=1)))
    nap = naps(ds)
    assert nap["label"].values.tolist() == [0, 1, 2]


def test_nan_activations_are_skipped():
    ds = make_activations(n_samples=20)
    vals = ds.activation.values.copy()
    vals[0, 0, 0] = np.nan
    ds = ds.copy(data={"activation": vals})
    nap = naps(ds, normalize=False)
    sel = (ds.label.values == ds.label.values[0])
    expected = np.nanmean(vals[0, sel, 0])
    np.testing.assert_allclose(float(nap.sel(label=ds.label.values[0]).isel(neuron=0, epoch=0)),
                               expected, rtol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"by": "colour"}, r"no such coordinate.*\['correct', 'label', 'prediction'\]"),
        ({"by": []}, "at least one"),
        ({"by": ["label", "label"]}, "twice"),
        ({"by": "neuron"}, "no such coordinate|must be on"),
        ({"epochs": [7]}, "epochs"),
        ({"epochs": []}, r"epochs=\[\] selects no epoch"),
        ({"by": None}, "by must be a coordinate name or a list of names, got None"),
        ({"by": 3}, "by must be a coordinate name or a list of names, got 3"),
        ({"normalize": "no"}, "normalize must be True or False, got 'no'"),
        ({"normalize": None}, "normalize must be True or False, got None"),
        ({"correct_only": 1}, "correct_only must be True or False, got 1"),
    ],
)
def test_bad_grouping_is_named(kwargs, match):
    with pytest.raises(GroupingError, match=match):
        naps(make_activations(), **kwargs)


def test_single_group_and_no_committed_samples():
    ds = make_activations(n_labels=1)
    with pytest.raises(GroupingError, match="single group"):
        naps(ds)
    ds = make_activations()
    ds = ds.assign_coords(committed=(("sample", "epoch"), np.zeros((40, 3), bool)))
    with pytest.raises(GroupingError, match="no committed samples"):
        naps(ds)
    with pytest.raises(TypeError, match="DataArray or Dataset"):
        naps(np.zeros((3, 4, 1)))
    with pytest.raises(GroupingError, match="no 'activation'"):
        naps(xr.Dataset({"other": ("neuron", np.zeros(3))}))


def test_dataarray_input_equals_dataset_input():
    ds = make_activations()
    xr.testing.assert_allclose(naps(ds.activation).drop_attrs(), naps(ds).drop_attrs())


def test_inf_stays_in_its_group(backend):
    ds = _layer(backend, n_samples=20)
    vals = np.asarray(ds.activation.values).copy()
    vals[2, 0, 1] = np.inf
    vals[3, 1, 1] = np.nan
    ds = ds.copy(data={"activation": vals})
    nap = naps(ds, normalize=False).compute()
    lab0, lab1 = ds.label.values[0], ds.label.values[1]
    assert np.isposinf(nap.sel(label=lab0).isel(neuron=2, epoch=1))
    others = nap.isel(neuron=2, epoch=1).drop_sel(label=lab0)
    assert np.isfinite(others.values).all()
    np.testing.assert_allclose(float(nap.sel(label=lab1).isel(neuron=3, epoch=1)),
                               np.nanmean(vals[3, ds.label.values == lab1, 1]), rtol=1e-5)


def test_partial_results_do_not_grow_with_the_number_of_epochs():
    """Epochs are an axis of the per-chunk sums, never multiplied into the group code."""
    from dask.callbacks import Callback

    class LargestResult(Callback):
        def __init__(self):
            super().__init__()
            self.nbytes = 0

        def _posttask(self, key, result, dsk, state, worker_id):
            if isinstance(key, tuple):  # a chunk; the final gathering of the result is not
                self.nbytes = max(self.nbytes, getattr(result, "nbytes", 0))

    largest = {}
    for n_epochs in (2, 24):
        ds = make_activations(n_neurons=8, n_samples=40, n_epochs=n_epochs, n_labels=5,
                              chunks={"sample": 10, "epoch": 1})
        with LargestResult() as cb:
            nap = naps(ds, normalize=False).compute(scheduler="sync")
        largest[n_epochs] = cb.nbytes
        eager = naps(ds.compute(), normalize=False)
        xr.testing.assert_allclose(nap, eager, rtol=1e-5)
    # the final result grows with the epochs; the largest intermediate must not
    assert largest[24] == largest[2]


def test_store_reader_tells_nan_values_from_missing_chunks(tmp_path):
    """A committed sample that is all NaN is data; a deleted chunk is corruption."""
    ds = make_activations(n_neurons=6, n_samples=32)
    vals = ds.activation.values.copy()
    vals[:, 0, :] = np.nan  # the first committed cell of the first chunk of every epoch
    vals[:, 8, 1] = np.nan  # the first cell of another chunk
    ds = ds.copy(data={"activation": vals})
    path = tmp_path / "run.zarr"
    with ActivationWriter(str(path), model="model", chunk_samples=8) as w:
        for e in range(ds.sizes["epoch"]):
            for start in range(0, 32, 8):
                w.write("hidden", vals[:, start:start + 8, e].T, epoch=e,
                        sample=ds.sample.values[start:start + 8],
                        label=ds.label.values[start:start + 8], allow_nonfinite=True)
    layer = topoxr.open_store(str(path))["model/hidden"].to_dataset()
    # one dask block spans the four zarr chunks: a missing one is still found by itself
    assert layer.activation.data.numblocks[1] == 1
    assert zarr.open_array(str(path / "model" / "hidden" / "activation")).chunks[1] == 8
    nap = naps(layer, normalize=False).compute()
    np.testing.assert_allclose(nap.values, naps(ds, normalize=False).values, rtol=1e-5)
    label0 = ds.label.values[0]
    assert np.isfinite(nap.sel(label=label0).values).all()  # NaN skipped, not propagated

    chunk = path / "model" / "hidden" / "activation" / "c.0.1.1"  # samples 8-15
    assert chunk.is_file()
    chunk.unlink()
    layer = topoxr.open_store(str(path))["model/hidden"].to_dataset()
    with pytest.raises(StoreCorruptionError, match=r"missing.*epochs \[1\]"):
        naps(layer).compute()
    # epochs whose chunks are all there stay readable
    assert naps(layer, epochs=[0, 2]).notnull().all()


def _float_store(path, *, dtype="float32", chunk_samples=None, n_epochs=1, scale=10.0,
                 offset=3.0):
    """A store of 600 samples, 6 labels and predictions, written in batches of 50."""
    rng = np.random.default_rng(1)
    values = (rng.normal(size=(n_epochs, 600, 5)) * scale + offset).astype(np.float32)
    labels = rng.integers(0, 6, 600)
    preds = np.where(rng.random((n_epochs, 600)) < 0.7, labels, (labels + 1) % 6)
    with ActivationWriter(str(path), model="m", dtype=dtype, chunk_samples=chunk_samples) as w:
        for e in range(n_epochs):
            for s in range(0, 600, 50):
                w.write("h", values[e, s:s + 50], sample=np.arange(s, s + 50),
                        label=labels[s:s + 50], prediction=preds[e, s:s + 50], epoch=e)
    return values, labels


def test_float16_activations_give_the_float64_means(tmp_path):
    """float16 activations (a float16 store read by plain xarray) are summed in float64:
    no overflow, no rounding of the sums, whatever the chunks; the NAPs are float32."""
    path = tmp_path / "f16.zarr"
    values, labels = _float_store(path, dtype="float16", scale=1.0, offset=300.0)
    stored = values[0].astype(np.float16).astype(np.float64)  # what the store holds
    ref = np.stack([stored[labels == k].mean(axis=0) for k in range(6)], axis=1)
    plain = xr.open_datatree(str(path), engine="zarr")["m/h"].to_dataset()
    assert plain.activation.dtype == np.float16
    got = {}
    for name, ds in (("eager", plain.load()), ("chunks 100", plain.chunk(sample=100)),
                     ("chunks 300", plain.chunk(sample=300)),
                     ("open_store", topoxr.open_store(str(path))["m/h"].to_dataset())):
        nap = naps(ds, normalize=False).compute()
        assert nap.dtype == np.float32, name
        np.testing.assert_allclose(nap.values[:, :, 0], ref, rtol=2.0**-23, err_msg=name)
        got[name] = nap.values
    for name, values_ in got.items():
        np.testing.assert_array_equal(values_, got["eager"], err_msg=name)


@pytest.mark.parametrize("by", ["label", ["label", "prediction"]])
def test_float32_naps_are_bit_identical_lazy_eager_and_in_any_chunks(tmp_path, by):
    """The group sums are float64 whatever the input: a store read lazily, the same
    data loaded, and any other chunking give the same float32 NAPs, bit for bit (float32
    sums differed in the last digits, which chaotic layouts turn into other maps)."""
    path = tmp_path / "f32.zarr"
    _float_store(path, chunk_samples=64, n_epochs=3)

    def layer():
        return topoxr.open_store(str(path))["m/h"].to_dataset()

    lazy = layer()
    assert lazy.activation.chunks is not None
    for normalize in (False, True):
        ref = naps(lazy, by=by, normalize=normalize).compute()
        assert ref.dtype == np.float32
        for name, ds in (("compute", layer().compute()), ("load", layer().load()),
                         ("chunks 7", layer().chunk(sample=7)),
                         ("chunks 300", layer().chunk(sample=300)),
                         ("chunks 13", layer().chunk(sample=13, epoch=1))):
            other = naps(ds, by=by, normalize=normalize).compute()
            np.testing.assert_array_equal(other.values, ref.values, err_msg=name)
            np.testing.assert_array_equal(other["count"].values, ref["count"].values)


def _recorded(path, ids, epochs, seed):
    rng = np.random.default_rng(seed)
    with ActivationWriter(str(path), model="m") as w:
        for e in epochs:
            w.write("h", rng.normal(size=(len(ids), 3)), sample=ids, label=ids % 2,
                    prediction=(ids + e) % 2, epoch=e)
    return topoxr.open_store(str(path))["m/h"].to_dataset()


def test_missing_committed_or_correct_values_count_as_false(tmp_path):
    """xr.concat of layers with different epochs (outer join) leaves NaN in 'committed'
    and 'correct': those cells are not committed, not correct (NaN was True)."""
    a = _recorded(tmp_path / "a.zarr", np.arange(6), [0, 1], seed=0)
    b = _recorded(tmp_path / "b.zarr", np.arange(6, 10), [0], seed=1)  # no epoch 1
    both = xr.concat([a, b], "sample", join="outer", coords="different", compat="equals")
    assert np.isnan(both.committed.values[6:, 1].astype(float)).all()
    nap = naps(both, normalize=False).compute()
    assert nap["count"].values.tolist() == [[5, 3], [5, 3]]
    for label in (0, 1):
        np.testing.assert_allclose(
            nap.sel(label=label, epoch=1).values,
            a.activation.values[:, a.label.values == label, 1].mean(axis=1), rtol=1e-6)
    right = naps(both, correct_only=True, normalize=False).compute()
    ok = both.correct.values[:, 1].astype(float)
    assert np.isnan(ok[6:]).all()
    expected = [int(((both.label.values == k) & (ok == 1)).sum()) for k in (0, 1)]
    assert right["count"].sel(epoch=1).values.tolist() == expected
    # 'correct' missing for a committed cell: not counted as correct
    correct = a.correct.values.astype(float)
    first = int(np.flatnonzero(correct[:, 0] == 1)[0])
    correct[first, 0] = np.nan
    partial = a.assign_coords(correct=(("sample", "epoch"), correct))
    before = naps(a, correct_only=True, normalize=False)["count"].sel(epoch=0)
    after = naps(partial, correct_only=True, normalize=False)["count"].sel(epoch=0)
    label = int(a.label.values[first])
    assert int(after.sel(label=label)) == int(before.sel(label=label)) - 1


def test_profiles_of_activations_skip_cells_missing_from_committed(tmp_path):
    """The activation profiles choose committed samples only: NaN in 'committed' (an
    outer xr.concat) is not committed, so no sample without values is chosen."""
    from topoxr.similarity import profiles

    a = _recorded(tmp_path / "a.zarr", np.arange(6), [0, 1], seed=0)
    b = _recorded(tmp_path / "b.zarr", np.arange(6, 10), [0], seed=1)  # no epoch 1
    both = xr.concat([a, b], "sample", join="outer", coords="different", compat="equals")
    prof = profiles(both, source="activations", n_samples=10).compute()
    assert prof.sizes["feature"] == 6  # the 6 samples committed at both epochs
    assert np.isfinite(prof.values).all()


def test_names_of_the_result_cannot_be_grouping_keys(tmp_path):
    """'count' is the result's count coordinate and 'group' its stacked dimension: keys
    of those names are refused with the reason (they gave wrong labels or xarray errors)."""
    path = tmp_path / "g.zarr"
    with ActivationWriter(str(path), model="m") as w:
        w.write("h", np.arange(12, dtype=np.float32).reshape(6, 2), sample=np.arange(6),
                label=[0, 1] * 3, group=["a", "a", "a", "b", "b", "b"])
    layer = topoxr.open_store(str(path))["m/h"].to_dataset()
    with pytest.raises(GroupingError, match=r"cannot group by 'group': naps\(\) names its "
                                            r"stacked dimension of several keys 'group'"):
        naps(layer, by=["label", "group"])
    by_group = naps(layer, by="group", normalize=False)  # alone it is no clash
    assert by_group["group"].values.tolist() == ["a", "b"]
    np.testing.assert_allclose(by_group.sel(group="a").values[:, 0], [2.0, 3.0])
    renamed = naps(layer.rename(group="site"), by=["label", "site"])
    assert list(renamed.indexes["group"].names) == ["label", "site"]
    counted = layer.assign_coords(count=("sample", [3, 3, 3, 7, 7, 7]))  # an older store
    with pytest.raises(GroupingError, match=r"cannot group by 'count': naps\(\) names its "
                                            r"per-group sample counts 'count'"):
        naps(counted, by="count")


def test_stored_inf_stays_in_its_group_and_the_others_normalise_finite(tmp_path):
    """An inf stored with allow_nonfinite=True: the normalised NAPs subtract the mean of
    the finite group means, so the inf group stays +inf (or -inf) and the other groups
    are finite (an inf in the mean over groups made them all -inf or NaN)."""
    rng = np.random.default_rng(3)
    vals = rng.normal(size=(12, 3)).astype(np.float32)  # (sample, neuron)
    lab = np.array([0, 1, 2] * 4)
    vals[0, 1] = np.inf  # label 0, neuron 1
    vals[4, 2] = -np.inf  # label 1, neuron 2
    vals[5, 0] = np.nan  # label 2, neuron 0: skipped
    path = str(tmp_path / "inf.zarr")
    with ActivationWriter(path, model="m") as w:
        w.write("h", vals, sample=np.arange(12), label=lab, allow_nonfinite=True)
    layer = topoxr.open_store(path)["m/h"].to_dataset()
    v = vals.astype(np.float64)
    raw = np.stack([np.nanmean(v[lab == k], axis=0) for k in range(3)], axis=1)  # (neuron, label)
    centre = np.array([row[np.isfinite(row)].mean() for row in raw])
    expected = raw - centre[:, None]
    for name, ds in (("lazy", layer), ("loaded", layer.load())):
        nap = naps(ds).compute()
        got = nap.isel(epoch=0).values
        assert got[1, 0] == np.inf and got[2, 1] == -np.inf, name
        assert np.isfinite(np.delete(got[1], 0)).all() and np.isfinite(np.delete(got[2], 1)).all()
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(naps(ds, normalize=False).compute().isel(epoch=0).values,
                                   raw, rtol=1e-6, err_msg=name)


def test_refusal_of_nonfinite_values_says_what_naps_and_layouts_do(tmp_path):
    """The writer's refusal said naps and layouts "skip them as missing values": naps
    keep an inf in its group's mean, and distances and layouts refuse such profiles."""
    vals = np.ones((6, 5), dtype=np.float32)
    vals[0, 1] = np.inf
    lab = np.array([0, 1] * 3)
    with ActivationWriter(str(tmp_path / "r.zarr"), model="m") as w:
        with pytest.raises(topoxr.StoreError, match="naps skip NaN values as missing but keep "
                                                    "an inf in its group's mean") as err:
            w.write("h", vals, sample=np.arange(6), label=lab)
        assert "skip them as missing" not in str(err.value)
        w.write("h", vals, sample=np.arange(6), label=lab, allow_nonfinite=True)
    layer = topoxr.open_store(str(tmp_path / "r.zarr"))["m/h"].to_dataset()
    assert np.isposinf(naps(layer, normalize=False).compute().values[1, 0, 0])
    with pytest.raises(ProfileError, match=r"NaN or inf for neuron position\(s\) \[1\]"):
        topoxr.distances(layer)


@pytest.mark.parametrize("coord", ["correct", "committed"])
def test_flags_that_are_not_true_or_false_are_refused(coord):
    """'correct' or 'committed' of strings ("False" read as True), or of numbers other than
    0 and 1, are refused by name; bool, 0/1 and 0/1 with NaN or None are read as flags."""
    ds = make_activations(n_samples=20, n_neurons=3, n_epochs=2, n_labels=2)
    flags = ds.correct.values
    kw = {"correct_only": True} if coord == "correct" else {}
    for bad in (np.where(flags, "True", "False"), flags.astype(int) * 2,
                np.where(flags, "True", None).astype(object)):
        with pytest.raises(GroupingError, match=rf"coordinate '{coord}' must hold True/False"):
            naps(ds.assign_coords({coord: (("sample", "epoch"), bad)}), **kw)
    act, lab = ds.activation.values, ds.label.values
    expected = np.stack([np.stack([act[:, (lab == k) & flags[:, e], e].mean(axis=1)
                                   for e in range(2)], axis=1) for k in (0, 1)], axis=1)
    with_none = np.where(flags, True, None).astype(object)  # None: missing, so False
    for good in (flags, flags.astype(int), flags.astype(float), with_none):
        nap = naps(ds.assign_coords({coord: (("sample", "epoch"), good)}), normalize=False, **kw)
        np.testing.assert_allclose(nap.values, expected, rtol=1e-5)


@pytest.mark.parametrize("values", [
    np.array([1 + 5j, 2 + 5j, 3 - 5j, 4 - 5j]),
    np.array([1, 2, 3, 4], dtype="m8[s]"),
    np.array(["1", "2", "3", "4"]),
])
def test_activations_that_are_not_real_numbers_are_refused(values):
    ds = xr.Dataset({"activation": (("neuron", "sample", "epoch"), values.reshape(1, 4, 1))},
                    coords={"label": ("sample", [0, 1, 0, 1]), "epoch": [0]})
    with pytest.raises(GroupingError,
                       match=r"real numbers .* got dtype " + re.escape(str(values.dtype))):
        naps(ds, normalize=False)
    ints = ds.copy(data={"activation": np.arange(4).reshape(1, 4, 1)})  # integers are fine
    np.testing.assert_array_equal(naps(ints, normalize=False).values.ravel(), [1.0, 2.0])


_BAD_ARGUMENTS = {
    "epochs=True": r"epochs must be an epoch label or a list of labels, got True \(a bool",
    "epochs=slice": r"got slice\(0, 2, None\) .*naps\(ds.sel\(epoch=slice\(0, 2\)\)\)",
    "epochs=[1, 1]": r"epochs names epoch\(s\) \[1\] more than once: \[1, 1\]",
    "extra dim": r"only dims \('neuron', 'sample', 'epoch'\), got \('layer', 'neuron', "
                 r"'sample', 'epoch'\); select one position of \['layer'\]",
    "mixed key": r"coordinate 'kind': its values mix types \['int', 'str'\]",
}


@pytest.mark.parametrize("case", list(_BAD_ARGUMENTS))
def test_bad_arguments_are_refused_by_name(case):
    """Arguments that reached numpy, pandas or xarray errors (or ran silently: epochs
    [1, 1] duplicated the epoch) are refused with what is wrong."""
    ds = make_activations(n_samples=20, n_neurons=4, n_epochs=3, n_labels=2)
    calls = {
        "epochs=True": lambda: naps(ds, epochs=True),
        "epochs=slice": lambda: naps(ds, epochs=slice(0, 2)),
        "epochs=[1, 1]": lambda: naps(ds, epochs=[1, 1]),
        "extra dim": lambda: naps(xr.concat([ds.activation] * 2, "layer")),
        "mixed key": lambda: naps(ds.assign_coords(
            kind=("sample", np.array([1, "a"] * 10, dtype=object))), by="kind"),
    }
    with pytest.raises(GroupingError, match=_BAD_ARGUMENTS[case]):
        calls[case]()
    # the same selection given right: the mean of the chosen epochs' samples
    nap = naps(ds, epochs=[1, 2], normalize=False)
    lab, act = ds.label.values, ds.activation.values
    np.testing.assert_allclose(nap.sel(label=1).values, act[:, lab == 1][:, :, 1:].mean(axis=1),
                               rtol=1e-5)


def test_datatree_root_points_to_a_layer_node(tmp_path):
    """A store's root node (no activations) is refused with the path of a layer node to
    select; that node gives the layer's NAPs."""
    ds = make_activations(n_samples=20, n_neurons=4, n_epochs=2, n_labels=2)
    path = str(tmp_path / "run.zarr")
    write_store(ds, path)
    tree = topoxr.open_store(path)
    with pytest.raises(GroupingError, match=r"select a layer node, e\.g\. "
                                            r"naps\(tree\['model/hidden'\]\)"):
        naps(tree)
    nap = naps(tree["model/hidden"], normalize=False).compute()
    lab, act = ds.label.values, ds.activation.values
    np.testing.assert_allclose(nap.sel(label=0).values, act[:, lab == 0].mean(axis=1),
                               rtol=1e-5)


def test_flags_on_sample_only_hold_for_every_epoch(tmp_path):
    """A 'correct' or 'committed' coordinate on 'sample' only broadcasts over the epochs
    (correct_only and committed filtering failed: "Dimensions {'epoch'} do not exist")."""
    ds = make_activations(n_samples=20, n_neurons=3, n_epochs=2, n_labels=2)
    path = str(tmp_path / "run.zarr")
    write_store(ds, path)
    layer = topoxr.open_store(path)["model/hidden"].to_dataset().drop_vars("committed")
    act, lab = ds.activation.values, ds.label.values
    flag = ds.correct.values[:, 0]

    def expected(keep):
        return np.stack([act[:, keep & (lab == k)].mean(axis=1) for k in (0, 1)], axis=1)

    right = naps(layer.assign_coords(correct=("sample", flag)), correct_only=True,
                 normalize=False).compute()
    np.testing.assert_allclose(right.values, expected(flag), rtol=1e-5)
    assert right["count"].values.tolist() == [[int((flag & (lab == k)).sum())] * 2
                                              for k in (0, 1)]
    first = np.arange(20) < 12
    done = naps(layer.assign_coords(committed=("sample", first)), normalize=False).compute()
    np.testing.assert_allclose(done.values, expected(first), rtol=1e-5)
