"""attach, compute_layouts and saved layouts, on numpy, dask and real stores."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import xarray as xr

import topoxr
from topoxr.layouts._registry import get_estimator
from topoxr.layouts import (
    attach,
    compute_layouts,
    draw_seeds,
    load_layout,
    save_layout,
)
from topoxr.grouping import naps
from topoxr.similarity import ProfileError, profile_matrix, profiles
from topoxr.store import StoreError
from topoxr.testing import (
    assert_layout_close,
    make_activations,
    raise_if_dask_computes,
    write_store,
)


@pytest.fixture(params=["numpy", "dask"])
def backend(request):
    return request.param


def _layer(backend, **kwargs):
    chunks = {"sample": 10, "epoch": 1} if backend == "dask" else None
    return make_activations(chunks=chunks, **kwargs)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A real on-disk store with two layers of one model."""
    path = str(tmp_path_factory.mktemp("attach") / "run.zarr")
    write_store(make_activations(n_neurons=12, random_state=1), path, layer="dense1")
    ds2 = make_activations(n_neurons=9, random_state=2)
    from topoxr.store import ActivationWriter

    with ActivationWriter(path, model="model") as w:
        for e in range(3):
            w.write("dense2", ds2.activation.values[:, :, e].T, sample=ds2.sample.values,
                    label=ds2.label.values, prediction=ds2.prediction.values[:, e], epoch=e)
            w.complete_epoch(e)
    return path


def test_attach_returns_a_new_object_with_coordinates(backend):
    ds = _layer(backend)
    laid = attach(ds, "pca", random_state=0)
    assert isinstance(laid, xr.Dataset)
    assert "x" not in ds.coords  # the input is not modified
    assert laid.x.dims == ("neuron", "epoch") and laid.y.dims == ("neuron", "epoch")
    np.testing.assert_array_equal(laid.neuron.values, ds.neuron.values)
    assert float(laid.x.min()) >= 0 and float(laid.x.max()) <= 1
    desc = json.loads(laid.attrs["topoxr_layout"])
    assert desc["method"] == "pca" and desc["metric"] == "cosine"
    assert desc["random_state"] == 0 and desc["seeds"] == draw_seeds(0, 3)[1]
    assert desc["profile"]["source"] == "naps" and desc["profile"]["by"] == ["label"]
    assert laid.attrs["topoxr_layer"] == "synthetic"
    da = attach(ds.activation, "pca", random_state=0)
    assert isinstance(da, xr.DataArray) and da.x.dims == ("neuron", "epoch")


def test_numpy_and_dask_give_the_same_layout_and_profiles_compute_once():
    eager = attach(_layer("numpy"), "random", random_state=5)
    with raise_if_dask_computes(max_computes=1):
        lazy = attach(_layer("dask"), "random", random_state=5)
    assert_layout_close(lazy, eager, atol=1e-12)


def test_each_epoch_gets_its_own_seed_drawn_up_front():
    ds = make_activations()
    laid = attach(ds, "random", random_state=7, align=False)
    seeds = draw_seeds(7, 3)[1]
    prof = profiles(ds)
    for e, seed in enumerate(seeds):
        X, _ = profile_matrix(prof.isel(epoch=e).values, "euclidean")
        expected = get_estimator("random", random_state=seed).fit_transform(X)
        np.testing.assert_allclose(laid.x.isel(epoch=e).values, expected[:, 0])
    again = attach(ds, "random", random_state=7, align=False)
    assert_layout_close(again, laid, atol=0)
    other = attach(ds, "random", random_state=8, align=False)
    assert not np.allclose(other.x.values, laid.x.values)


def test_unseeded_layouts_record_their_entropy():
    ds = make_activations()
    laid = attach(ds, "random", align=False)
    root = json.loads(laid.attrs["topoxr_layout"])["random_state"]
    assert_layout_close(attach(ds, "random", random_state=root, align=False), laid, atol=0)


def test_shared_layouts():
    ds = make_activations(n_neurons=16)
    one = attach(ds, "pca", random_state=0, share=1)
    assert one.x.dims == ("neuron",)
    alone = attach(naps(ds).sel(epoch=[1]), "pca", random_state=0, share=1)
    np.testing.assert_allclose(one.x.values, alone.x.values)
    both = attach(ds, "pca", random_state=0, share="all")
    assert both.x.dims == ("neuron",)
    assert json.loads(both.attrs["topoxr_layout"])["share"] == "all"
    with pytest.raises(ProfileError, match="share"):
        attach(ds, "pca", share=9)


def test_profile_options_and_params_are_recorded():
    ds = make_activations(n_neurons=16, n_samples=60)
    laid = attach(ds, "tsne", random_state=0, share="all",
                  profile={"source": "activations", "n_samples": 20, "balanced": True,
                           "random_state": 1}, perplexity=4.0)
    desc = json.loads(laid.attrs["topoxr_layout"])
    assert desc["params"] == {"perplexity": 4.0}
    assert desc["profile"] == {"source": "activations", "n_samples": 20, "balanced": True,
                               "correct_only": False, "random_state": 1}


def test_dead_neurons_are_reported(caplog):
    ds = make_activations(n_neurons=14, n_dead=3)
    with caplog.at_level(logging.WARNING, logger="topoxr.similarity"):
        laid = attach(ds, "pca", random_state=0)
    assert json.loads(laid.attrs["topoxr_layout"])["dead_neurons"] == [11, 12, 13]
    assert "3 dead" in caplog.text
    assert np.isfinite(laid.x.values).all()


def test_bad_input():
    ds = make_activations()
    with pytest.raises(ValueError, match="unknown layout method 'nope'.*pca"):
        attach(ds, "nope")
    with pytest.raises(ProfileError, match="metric"):
        attach(ds, "pca", metric="manhattan")
    with pytest.raises(ValueError, match="at least 5 neurons"):
        attach(make_activations(n_neurons=4), "pca")
    bad = ds.copy(data={"activation": np.where(np.arange(12)[:, None, None] == 3, np.inf,
                                               ds.activation.values)})
    with pytest.raises(ProfileError, match="NaN or inf"):
        attach(bad, "pca")
    with pytest.raises(TypeError, match="profile"):
        attach(ds, "pca", profile="naps")


def test_a_failed_save_leaves_a_layout_that_load_refuses(slow_failing_fs):
    """A storage failure while saving a layout: ``StoreWriteError``, and the half-written
    layout (``y`` never stored, which zarr would read back as its fill value) is refused
    by ``load_layout`` instead of being returned; saving again repairs it and the
    activations are untouched."""
    fs, protocol = slow_failing_fs("layouts/pca-0/y/c.0.0", "no such key")
    url = f"{protocol}://run.zarr"
    write_store(make_activations(n_neurons=12, random_state=1), url, layer="dense1")
    layer = topoxr.open_store(url)["model/dense1"].to_dataset().load()
    laid = attach(layer, "pca", random_state=0)
    fs.armed = True
    with pytest.raises(topoxr.StoreWriteError, match="No space left on device"):
        save_layout(url, "model", "dense1", laid, "pca-0")
    assert fs.log == ["failed"]
    fs.armed = False
    with pytest.raises(StoreError, match="not saved completely"):
        load_layout(url, "model", "dense1", "pca-0", onto=layer)
    after = topoxr.open_store(url)["model/dense1"].to_dataset().load()
    xr.testing.assert_identical(after.activation, layer.activation)
    save_layout(url, "model", "dense1", laid, "pca-0")  # the lock was released
    assert_layout_close(load_layout(url, "model", "dense1", "pca-0", onto=layer), laid,
                        atol=0)


@pytest.mark.parametrize("fails_in", ["the staging copy", "the final copy"])
def test_a_failed_overwrite_loses_neither_layout(slow_failing_fs, caplog, fails_in):
    """Replacing a saved layout fails half-way. While the new layout is written whole
    under its staging name, the old one stays what load_layout returns; once the old
    one is deleted, load_layout returns the complete staging copy of the new one (with
    a warning) and never a half-written layout. Saving again tidies up."""
    final = "layouts/pca-0/y/c.0"  # the new, shared layout's y is 1-D: one chunk c.0
    fail = final if fails_in == "the final copy" else "layouts/pca-0~saving/y/c.0"
    fs, protocol = slow_failing_fs(fail, "no such key")
    url = f"{protocol}://run.zarr"
    write_store(make_activations(n_neurons=12, random_state=1), url, layer="dense1")
    layer = topoxr.open_store(url)["model/dense1"].to_dataset().load()
    old = attach(layer, "pca", random_state=0)  # per epoch: x on (neuron, epoch)
    new = attach(layer, "pca", random_state=0, share="all")  # x on neuron
    save_layout(url, "model", "dense1", old, "pca-0")
    fs.armed = True
    with pytest.raises(topoxr.StoreWriteError, match="No space left on device"):
        save_layout(url, "model", "dense1", new, "pca-0")
    fs.armed = False
    with caplog.at_level(logging.WARNING, logger="topoxr.layouts._attach"):
        back = load_layout(url, "model", "dense1", "pca-0", onto=layer)
    want = new if fails_in == "the final copy" else old
    assert back.x.dims == want.x.dims
    assert_layout_close(back, want, atol=0)
    assert ("last save failed" in caplog.text) == (fails_in == "the final copy")
    save_layout(url, "model", "dense1", new, "pca-0")
    assert_layout_close(load_layout(url, "model", "dense1", "pca-0", onto=layer), new, atol=0)
    kept = sorted(topoxr.open_store(url)["model/dense1/layouts"].children)
    assert kept == ["pca-0"]  # no staging copy left


def test_compute_layouts_matches_attach_on_every_scheduler(store):
    tree = topoxr.open_store(store)
    results = {sched: compute_layouts(tree, methods=["random", "pca"], seeds=[0, 1],
                                      scheduler=sched, progress=False)
               for sched in ("sync", "threads", "processes")}
    ref = results["sync"]
    assert sorted(n.path for n in ref.leaves) == ["/model/dense1", "/model/dense2"]
    node = ref["model/dense1"].to_dataset()
    assert node.x.dims == ("layout", "seed", "epoch", "neuron")
    assert node["layout"].values.tolist() == ["random", "pca"]
    for other in ("threads",):
        for path in ("model/dense1", "model/dense2"):
            xr.testing.assert_identical(results[other][path].to_dataset(),
                                        ref[path].to_dataset())
    layer = tree["model/dense2"].to_dataset()
    for seed in (0, 1):
        laid = attach(layer, "random", random_state=seed)
        np.testing.assert_allclose(
            ref["model/dense2"].x.sel(layout="random", seed=seed).transpose("neuron", "epoch"),
            laid.x.transpose("neuron", "epoch"))


def test_compute_layouts_selection_and_errors(store):
    tree = topoxr.open_store(store)
    out = compute_layouts(tree, layers=["dense2"], epochs=[2], methods=["pca"], progress=False)
    assert [n.path for n in out.leaves] == ["/model/dense2"]
    assert out["model/dense2"].epoch.values.tolist() == [2]
    with pytest.raises(ValueError, match="no layer matches"):
        compute_layouts(tree, layers=["conv9"], progress=False)
    with pytest.raises(ValueError, match="unknown layout method"):
        compute_layouts(tree, methods=["nope"], progress=False)


def test_save_and_load_layouts_in_the_store(store):
    layer = topoxr.open_store(store)["model/dense1"].to_dataset()
    laid = attach(layer, "pca", random_state=0)
    path = save_layout(store, "model", "dense1", laid, "pca-0")
    assert path == "model/dense1/layouts/pca-0"
    tree = topoxr.open_store(store)
    saved = tree["model/dense1/layouts/pca-0"].to_dataset()
    np.testing.assert_allclose(saved.x.transpose("neuron", "epoch").values,
                               laid.x.transpose("neuron", "epoch").values)
    assert json.loads(saved.attrs["topoxr_layout"])["method"] == "pca"
    # plain xarray, without topoxr, sees it too (consolidated metadata refreshed)
    plain = xr.open_datatree(store, engine="zarr")
    assert "pca-0" in plain["model/dense1/layouts"].children
    back = load_layout(store, "model", "dense1", "pca-0", onto=layer)
    assert_layout_close(back, laid, atol=0)
    assert back.attrs["topoxr_layout"] == laid.attrs["topoxr_layout"]
    shared = attach(layer, "pca", random_state=0, share="all")
    save_layout(store, "model", "dense1", shared, "pca-0")  # overwrite
    assert load_layout(store, "model", "dense1", "pca-0").x.dims == ("neuron",)
    with pytest.raises(StoreError, match="exists"):
        save_layout(store, "model", "dense1", shared, "pca-0", overwrite=False)
    with pytest.raises(StoreError, match=r"saved: \['pca-0'\]"):
        load_layout(store, "model", "dense1", "umap")
    with pytest.raises(StoreError, match="neurons"):
        save_layout(store, "model", "dense2", laid, "wrong")
    with pytest.raises(StoreError, match="no layer"):
        save_layout(store, "model", "conv", laid, "x")
    with pytest.raises(StoreError, match="no layout"):
        save_layout(store, "model", "dense1", layer, "x")


def test_a_per_epoch_layout_loads_onto_one_selected_epoch(tmp_path):
    """``onto=nap.sel(epoch=2)`` (epoch a scalar coordinate) raised xarray's "dimension
    'epoch' already exists as a scalar variable"; it now takes that epoch's layout."""
    path = str(tmp_path / "run.zarr")
    write_store(make_activations(n_neurons=12, random_state=1), path, layer="dense1")
    nap = topoxr.naps(topoxr.open_store(path)["model/dense1"].to_dataset())
    laid = attach(nap, "pca", random_state=0)  # x, y on (neuron, epoch)
    save_layout(path, "model", "dense1", laid, "per-epoch")
    one = load_layout(path, "model", "dense1", "per-epoch", onto=nap.sel(epoch=2))
    assert one.x.dims == ("neuron",)
    np.testing.assert_array_equal(one.x.values, laid.x.sel(epoch=2).values)
    np.testing.assert_array_equal(one.y.values, laid.y.sel(epoch=2).values)
    listed = load_layout(path, "model", "dense1", "per-epoch", onto=nap.sel(epoch=[2, 0]))
    np.testing.assert_array_equal(listed.x.transpose("neuron", "epoch").values,
                                  laid.x.sel(epoch=[2, 0]).transpose("neuron", "epoch").values)
    with pytest.raises(StoreError, match=r"holds epochs \[0, 1, 2\], not \[7\]"):
        load_layout(path, "model", "dense1", "per-epoch",
                    onto=nap.sel(epoch=[2]).assign_coords(epoch=[7]))
    with pytest.raises(StoreError, match="no epoch coordinate"):
        load_layout(path, "model", "dense1", "per-epoch", onto=nap.isel(epoch=0, drop=True))


def test_a_layout_in_another_order_is_saved_in_the_layers_order(tmp_path):
    """A layout whose neurons (or per-epoch epochs) come in another order is saved in
    the layer's order, matched by label: saved as given, its group did not align with
    the layer's and ``open_store`` refused the whole store. Layouts of other neurons,
    repeated neurons, or some epochs only are refused, and nothing is saved."""
    path = str(tmp_path / "run.zarr")
    write_store(make_activations(n_neurons=12, random_state=1), path, layer="dense1")
    layer = topoxr.open_store(path)["model/dense1"].to_dataset()
    laid = attach(layer, "pca", random_state=0)  # x, y on (neuron, epoch)
    order = np.random.default_rng(3).permutation(12)
    shuffled = laid.isel(neuron=order, epoch=[2, 0, 1])
    save_layout(path, "model", "dense1", shuffled, "pca-0")
    tree = topoxr.open_store(path)  # refused before
    saved = tree["model/dense1/layouts/pca-0"].to_dataset()
    assert saved.neuron.values.tolist() == layer.neuron.values.tolist()
    assert saved.epoch.values.tolist() == layer.epoch.values.tolist()
    back = load_layout(path, "model", "dense1", "pca-0", onto=layer)
    assert_layout_close(back, laid, atol=0)
    shared = attach(layer, "pca", random_state=0, share="all").isel(neuron=order)
    save_layout(path, "model", "dense1", shared, "pca-1")
    back = load_layout(path, "model", "dense1", "pca-1", onto=layer)
    np.testing.assert_array_equal(back.x.sel(neuron=order).values, shared.x.values)
    refused = {
        "other neurons": (laid.assign_coords(neuron=laid.neuron.values + 100),
                          r"neurons \[100, .*\] that layer 'dense1' does not have"),
        "repeated neurons": (laid.assign_coords(neuron=np.r_[0, np.arange(11)]),
                             "repeats neuron labels"),
        "some epochs": (laid.isel(epoch=[0, 2]),
                        r"exactly the epochs of layer 'dense1' \[0, 1, 2\].*missing \[1\]"),
    }
    for name, (bad, match) in refused.items():
        with pytest.raises(StoreError, match=match):
            save_layout(path, "model", "dense1", bad, f"bad-{name.replace(' ', '-')}")
    tree = topoxr.open_store(path)
    assert sorted(tree["model/dense1/layouts"].children) == ["pca-0", "pca-1"]


def test_a_damaged_or_missing_layout_chunk_is_refused_and_verify_names_it(tmp_path, caplog):
    """A saved layout's arrays end in a crc32c and every chunk is stored: a changed byte
    or a lost chunk is an error naming array and file (in load_layout, open_store and
    verify), never positions read from damaged bytes or zarr's fill value; plain zarr
    still reads an intact layout."""
    import zarr

    url = str(tmp_path / "run.zarr")
    write_store(make_activations(n_neurons=12, random_state=1), url, layer="dense1")
    layer = topoxr.open_store(url)["model/dense1"].to_dataset().load()
    laid = attach(layer, "pca", random_state=0, share="all")
    save_layout(url, "model", "dense1", laid, "pca-0")
    report = topoxr.verify(url, record=False)
    assert report.ok and report.chunks_read > 0
    plain = zarr.open_group(url, mode="r")["model/dense1/layouts/pca-0"]
    np.testing.assert_array_equal(plain["x"][:], laid["x"].values)  # plain zarr reads it
    x_chunk = tmp_path / "run.zarr/model/dense1/layouts/pca-0/x/c.0"
    good = x_chunk.read_bytes()
    damaged = bytearray(good)
    damaged[3] ^= 0x01
    x_chunk.write_bytes(bytes(damaged))
    with pytest.raises(topoxr.StoreCorruptionError,
                       match=r"array 'x', chunk c\.0 .*fails its crc32c checksum"):
        load_layout(url, "model", "dense1", "pca-0")
    with pytest.raises(topoxr.StoreCorruptionError, match=r"array 'x'.*crc32c"):
        topoxr.open_store(url)
    problems = topoxr.verify(url, record=False).problems
    assert [p.node for p in problems] == ["model/dense1/layouts/pca-0"]
    assert "pca-0/x/c.0" in problems[0].what and "crc32c" in problems[0].what
    x_chunk.write_bytes(good)
    (tmp_path / "run.zarr/model/dense1/layouts/pca-0/y/c.0").unlink()
    with pytest.raises(topoxr.StoreCorruptionError,
                       match=r"array 'y', chunk c\.0 .*missing from the store"):
        load_layout(url, "model", "dense1", "pca-0")
    problems = topoxr.verify(url, record=False).problems
    assert len(problems) == 1 and "y/c.0" in problems[0].what
    assert "missing" in problems[0].what
    save_layout(url, "model", "dense1", laid, "pca-0", overwrite=True)  # saving repairs
    assert_layout_close(load_layout(url, "model", "dense1", "pca-0", onto=layer), laid,
                        atol=0)
    assert topoxr.verify(url, record=False).ok


def test_a_layout_saved_without_checksums_by_an_earlier_version_still_loads(tmp_path):
    """Layouts saved before checksums (zarr's default codecs) load and open as before;
    verify calls the layout unverifiable, in one line."""
    import zarr

    from topoxr._chunkio import consolidate

    url = str(tmp_path / "run.zarr")
    write_store(make_activations(n_neurons=12, random_state=1), url, layer="dense1")
    layer = topoxr.open_store(url)["model/dense1"].to_dataset().load()
    laid = attach(layer, "pca", random_state=0, share="all")
    node = zarr.open_group(url, mode="r+")["model/dense1"].require_group("layouts") \
        .create_group("old", attributes={"name": "old", "topoxr_layout": "{}"})
    for key in ("x", "y", "neuron"):  # as the previous version wrote them
        values = laid[key].values
        node.create_array(key, shape=values.shape, dtype=values.dtype,
                          dimension_names=("neuron",))[...] = values
    consolidate(zarr.storage.LocalStore(url))
    assert_layout_close(load_layout(url, "model", "dense1", "old", onto=layer), laid, atol=0)
    np.testing.assert_array_equal(topoxr.open_store(url)["model/dense1/layouts/old"]["x"],
                                  laid["x"].values)
    problems = topoxr.verify(url, record=False).problems
    assert [(p.node, p.kind) for p in problems] == [("model/dense1/layouts/old",
                                                     "unverifiable")]
    assert "['neuron', 'x', 'y']" in problems[0].what


# -- given profiles, estimator instances: matched by label, never changed -----------------------
def test_given_profiles_are_matched_to_the_neurons_by_label():
    ds = make_activations(n_neurons=16, n_samples=80, random_state=0)
    ref = attach(ds, "pca", random_state=0)
    prof = profiles(ds)
    perm = np.random.default_rng(1).permutation(16)
    laid = attach(ds, "pca", random_state=0, profile=prof.isel(neuron=perm))
    np.testing.assert_array_equal(laid.x.values, ref.x.values)  # each neuron its own place
    np.testing.assert_array_equal(laid.y.values, ref.y.values)
    with pytest.raises(ProfileError, match=r"lack neurons \[0, 1, 2"):
        attach(ds, "pca", profile=prof.assign_coords(neuron=prof.neuron.values + 100))
    with pytest.raises(ProfileError, match="repeated neuron labels"):
        attach(xr.concat([ds, ds], "neuron"), "pca")


def test_per_epoch_profiles_are_matched_to_the_epochs_by_label():
    ds = make_activations(n_neurons=16, n_samples=80, random_state=0)  # epochs 0, 1, 2
    laid = attach(ds, "pca", random_state=0, align=False, profile={"epochs": [2, 1, 0]})
    for e in range(3):
        own = attach(ds.sel(epoch=[e]), "pca", random_state=0)
        np.testing.assert_allclose(laid.x.sel(epoch=e).values, own.x.values)
    with pytest.raises(ProfileError, match=r"hold epochs \[0, 1\], the object \[0, 1, 2\]"):
        attach(ds, "pca", profile={"epochs": [0, 1]})
    # one layout from a subset of the epochs is fine where it is shared
    assert attach(ds, "pca", profile={"epochs": [0, 1]}, share="all").x.dims == ("neuron",)


def test_profiles_of_several_models_at_once_are_refused():
    a = profiles(make_activations(n_neurons=16, n_samples=80, random_state=0))
    b = profiles(make_activations(n_neurons=16, n_samples=80, random_state=5))
    both = xr.concat([a, b], dim="model").assign_coords(model=["A", "B"])
    for prof in (both.isel(epoch=0, drop=True), both):
        with pytest.raises(ProfileError, match=r"dims \['model'\] besides"):
            attach(prof, "pca")


def test_compute_layouts_takes_one_layers_profiles_only_for_one_layer(store):
    tree = topoxr.open_store(store)
    prof = profiles(tree["model/dense1"].to_dataset())
    with pytest.raises(ProfileError, match="one layer's profiles"):
        compute_layouts(tree, methods=["pca"], profile=prof, progress=False)
    one = compute_layouts(tree, layers=["dense1"], methods=["pca"], profile=prof,
                          progress=False)
    ref = attach(tree["model/dense1"].to_dataset(), "pca", random_state=0)
    np.testing.assert_allclose(one["model/dense1"].x.sel(layout="pca", seed=0).values,
                               ref.x.transpose("epoch", "neuron").values)


def test_quality_matches_profiles_and_maps_to_the_layout_by_neuron_label():
    ds = make_activations(n_neurons=16, n_samples=80, random_state=0)
    laid = attach(ds, "pca", random_state=0, share=2)
    perm = np.random.default_rng(1).permutation(16)
    ref = topoxr.quality(laid)
    for kwargs in ({"profile": profiles(ds).isel(neuron=perm)},
                   {"maps": naps(ds).isel(neuron=perm)}):
        got = topoxr.quality(laid, **kwargs)
        for name in ("trustworthiness", "spearman", "smoothness", "blob_count"):
            np.testing.assert_allclose(got[name].values, ref[name].values, err_msg=name)
    with pytest.raises(ProfileError, match="lack neurons"):
        topoxr.quality(laid, profile=profiles(ds).assign_coords(neuron=np.arange(16) + 50))


def test_an_estimator_instance_is_copied_and_keeps_its_own_settings():
    from topoxr.layouts import PCALayout, RandomLayout

    X = np.random.default_rng(0).normal(size=(20, 4)) + 3
    est = PCALayout(metric="euclidean")
    got = topoxr.layout(X, est)
    assert est.get_params()["metric"] == "euclidean" and not hasattr(est, "n_features_in_")
    np.testing.assert_allclose(got, PCALayout(metric="euclidean").fit_transform(X))
    assert not np.allclose(got, PCALayout(metric="cosine").fit_transform(X))
    seeded = RandomLayout(random_state=11)
    np.testing.assert_array_equal(topoxr.layout(X, seeded), topoxr.layout(X, seeded))
    np.testing.assert_array_equal(topoxr.layout(X, seeded),
                                  RandomLayout(random_state=11).fit_transform(X))
    with pytest.raises(ProfileError, match="set it in one place"):
        topoxr.layout(X, est, metric="cosine")
    with pytest.raises(ValueError, match="set the seed in one place"):
        topoxr.layout(X, seeded, random_state=3)
    # an instance left at its class's defaults takes the call's metric and seed
    np.testing.assert_allclose(topoxr.layout(X, PCALayout(), metric="euclidean"), got)
    ds = make_activations(n_neurons=16, n_samples=80, random_state=0)
    laid = attach(ds, seeded)
    desc = json.loads(laid.attrs["topoxr_layout"])
    assert desc["random_state"] == 11 and desc["seeds"] == [11, 11, 11]
    np.testing.assert_array_equal(attach(ds, seeded).x.values, laid.x.values)
    assert seeded.get_params()["random_state"] == 11
    tree_est = RandomLayout(random_state=4)
    with pytest.raises(ValueError, match="random_state=None"):
        compute_layouts(xr.DataTree.from_dict({"model/l": ds}), methods=[tree_est],
                        progress=False)


def test_a_neuron_with_a_constant_output_is_dead_for_the_estimators_too():
    """Normalising a constant output leaves float32 rounding noise, not exact zeros: the
    layout report calls it dead (at distance 1 from every neuron) and the estimators
    must place it so, not by the direction of the noise."""
    from topoxr.layouts import distance_matrix
    from topoxr.layouts._base import features_for_metric
    from topoxr.similarity import degenerate_rows

    P = profiles(make_activations(n_neurons=16, n_samples=83, random_state=0)).isel(
        epoch=0).values.astype(float)
    P[0] = [0.0, 0.0, 0.0, 7.45e-09]  # what float32 normalisation left of a constant output
    assert degenerate_rows(P, "cosine")[0][0]  # reported dead
    for metric in ("cosine", "correlation"):
        F = features_for_metric(P, metric)
        # the degenerate direction (one extra column), not the noise's direction
        assert not F[0, :-1].any() and F[0, -1] == 1.0 and not F[1:, -1].any()
        D = distance_matrix(P, metric)
        np.testing.assert_allclose(D[0, 1:], 1.0, atol=1e-12)


def test_quality_says_which_profiles_it_compared_with_and_warns_of_others(caplog):
    ds = make_activations(n_neurons=16, n_samples=80, random_state=0)
    on_naps = attach(ds, "pca", random_state=0, share=2)
    with caplog.at_level(logging.WARNING, logger="topoxr.metrics"):
        q = topoxr.quality(on_naps)
    assert "fitted on profiles" not in caplog.text
    assert json.loads(q.attrs["profile"]) == json.loads(profiles(ds).attrs["topoxr_profile"])
    args = {"source": "activations", "n_samples": 40, "random_state": 0}
    on_acts = attach(ds, "pca", random_state=0, share=2, profile=args)
    with caplog.at_level(logging.WARNING, logger="topoxr.metrics"):
        q = topoxr.quality(on_acts)  # the default: NAPs by label, not what it was fitted on
    assert "fitted on profiles" in caplog.text and '"source": "activations"' in caplog.text
    assert json.loads(q.attrs["profile"])["source"] == "naps"
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="topoxr.metrics"):
        q = topoxr.quality(on_acts, profile=profiles(ds, **args))
    assert "fitted on profiles" not in caplog.text
    assert json.loads(q.attrs["profile"])["source"] == "activations"


def test_saving_a_layout_clears_the_verification_record(tmp_path):
    """A layout saved after ``verify`` adds files that verify never read: the record
    ("verified: no problems") is dropped, as a writer drops it; a refused save keeps it."""
    url = str(tmp_path / "run.zarr")
    write_store(make_activations(n_neurons=12, random_state=1), url, layer="dense1")
    layer = topoxr.open_store(url)["model/dense1"].to_dataset().load()
    laid = attach(layer, "pca", random_state=0, share="all")
    assert topoxr.verify(url).ok
    recorded = topoxr.store_summary(url)["verified"]
    assert recorded["problems"] == 0
    with pytest.raises(StoreError, match="neurons"):  # refused: nothing written
        save_layout(url, "model", "dense1", laid.isel(neuron=slice(1, None)), "pca-0")
    assert topoxr.store_summary(url)["verified"] == recorded
    save_layout(url, "model", "dense1", laid, "pca-0")
    assert topoxr.store_summary(url)["verified"] is None
    x_chunk = tmp_path / "run.zarr/model/dense1/layouts/pca-0/x/c.0"
    damaged = bytearray(x_chunk.read_bytes())
    damaged[len(damaged) // 2] ^= 0x01
    x_chunk.write_bytes(bytes(damaged))
    assert topoxr.store_summary(url)["verified"] is None  # `topoxr info` claims nothing
    report = topoxr.verify(url)
    assert topoxr.store_summary(url)["verified"]["problems"] == len(report.problems) == 1


def test_layout_names_that_map_to_the_same_node_are_refused(tmp_path):
    """"x y" and "x_y" share the node name x_y: saving the second would replace the
    first, and load_layout("x y") would return the other layout. Saving a different name
    onto a taken node is refused (overwrite replaces the same name only), and
    load_layout checks the name saved in the node."""
    url = str(tmp_path / "run.zarr")
    write_store(make_activations(n_neurons=12, random_state=1), url, layer="dense1")
    layer = topoxr.open_store(url)["model/dense1"].to_dataset().load()
    first = attach(layer, "pca", random_state=0, share="all")
    second = attach(layer, "random", random_state=0, share="all")
    save_layout(url, "model", "dense1", first, "x y")
    files = {p: p.read_bytes() for p in (tmp_path / "run.zarr").rglob("*") if p.is_file()}
    for overwrite in (True, False):
        with pytest.raises(StoreError, match=r"'x_y'.*node 'x_y'.*layout 'x y'"):
            save_layout(url, "model", "dense1", second, "x_y", overwrite=overwrite)
    assert {p: p.read_bytes() for p in (tmp_path / "run.zarr").rglob("*")
            if p.is_file()} == files  # nothing written
    assert_layout_close(load_layout(url, "model", "dense1", "x y", onto=layer), first,
                        atol=0)
    with pytest.raises(StoreError, match=r"no layout 'x_y'.*'x y'"):
        load_layout(url, "model", "dense1", "x_y")
    save_layout(url, "model", "dense1", second, "x y")  # the same name: replaced
    assert_layout_close(load_layout(url, "model", "dense1", "x y", onto=layer), second,
                        atol=0)


def test_activation_profiles_draw_their_samples_with_the_layout_seed():
    """attach(random_state=s) with activation profiles draws the sample subset with s:
    the same call gives the same layout, recorded with that seed, equal to the layout
    of the profiles drawn with random_state=s by hand; without a seed, the entropy drawn
    is recorded and reproduces the layout."""
    ds = make_activations(n_neurons=20, n_samples=200)
    args = {"source": "activations", "n_samples": 30}
    a = attach(ds, "pca", random_state=0, profile=args)
    b = attach(ds, "pca", random_state=0, profile=args)
    assert_layout_close(a, b, atol=0)
    desc = json.loads(a.attrs["topoxr_layout"])
    assert desc["profile"]["random_state"] == 0
    by_hand = attach(ds, "pca", random_state=0, profile=profiles(ds, **args, random_state=0))
    assert_layout_close(a, by_hand, atol=0)
    other = attach(ds, "pca", random_state=1, profile=args)
    assert json.loads(other.attrs["topoxr_layout"])["profile"]["random_state"] == 1
    assert not np.allclose(other.x.values, a.x.values)
    own = attach(ds, "pca", random_state=0, profile={**args, "random_state": 5})
    assert json.loads(own.attrs["topoxr_layout"])["profile"]["random_state"] == 5
    fresh = attach(ds, "random", profile=args)
    root = json.loads(fresh.attrs["topoxr_layout"])["random_state"]
    assert json.loads(fresh.attrs["topoxr_layout"])["profile"]["random_state"] == root
    assert_layout_close(attach(ds, "random", random_state=root, profile=args), fresh, atol=0)


def test_compute_layouts_draws_activation_samples_with_each_seed_as_attach(store):
    tree = topoxr.open_store(store)
    args = {"source": "activations", "n_samples": 15}
    out = compute_layouts(tree, layers=["dense1"], methods=["pca"], seeds=[0, 3],
                          profile=args, progress=False)["model/dense1"]
    layer = tree["model/dense1"].to_dataset()
    desc = json.loads(out.attrs["topoxr_layout"])
    for seed in (0, 3):
        laid = attach(layer, "pca", random_state=seed, profile=args)
        np.testing.assert_allclose(out.x.sel(layout="pca", seed=seed).values,
                                   laid.x.transpose("epoch", "neuron").values)
        assert desc["profile"][str(seed)] == json.loads(laid.attrs["topoxr_layout"])["profile"]
    # NAP profiles do not depend on the seed: one description, as before
    naps_desc = json.loads(compute_layouts(tree, layers=["dense1"], methods=["pca"],
                                           seeds=[0, 3], progress=False)
                           ["model/dense1"].attrs["topoxr_layout"])["profile"]
    assert naps_desc["source"] == "naps"


def test_compute_layouts_lays_out_the_selected_epochs_of_given_profiles_as_attach(store):
    """epochs= selects the epochs of given profiles too, and profiles that hold several
    epochs but not the layer's (selected) ones are refused, as attach refuses them."""
    tree = topoxr.open_store(store)
    layer = tree["model/dense1"].to_dataset()
    prof = profiles(layer)
    out = compute_layouts(tree, layers=["dense1"], epochs=[1], profile=prof,
                          methods=["pca"], progress=False)["model/dense1"]
    assert out.epoch.values.tolist() == [1]
    want = attach(layer.sel(epoch=[1]), "pca", random_state=0, profile=prof.sel(epoch=[1]))
    np.testing.assert_allclose(out.x.sel(layout="pca", seed=0, epoch=1).values,
                               want.x.values)
    two = compute_layouts(tree, layers=["dense1"], epochs=[2, 0], profile=prof,
                          methods=["pca"], progress=False)["model/dense1"]
    ref = attach(layer.sel(epoch=[2, 0]), "pca", random_state=0,
                 profile=prof.sel(epoch=[2, 0]))
    np.testing.assert_allclose(two.x.sel(layout="pca", seed=0).values,
                               ref.x.transpose("epoch", "neuron").values)
    partial = prof.sel(epoch=[0, 1])
    with pytest.raises(ProfileError, match="per-epoch profiles hold epochs"):
        attach(layer, "pca", profile=partial)
    with pytest.raises(ProfileError, match="per-epoch profiles hold epochs"):
        compute_layouts(tree, layers=["dense1"], profile=partial, methods=["pca"],
                        progress=False)
    with pytest.raises(ProfileError, match=r"selects epochs \[2\]"):
        compute_layouts(tree, layers=["dense1"], epochs=[1, 2], profile=partial,
                        methods=["pca"], progress=False)


def test_a_store_recorded_further_after_a_per_epoch_layout_was_saved_still_opens(tmp_path):
    """A layout per epoch saved at epochs [0, 1], then epoch 2 recorded (a training run
    resumed): open_store refused the whole store ("not aligned with its parents")."""
    path = str(tmp_path / "run.zarr")
    rng = np.random.default_rng(0)
    with topoxr.ActivationWriter(path, model="m") as writer:
        for epoch in (0, 1):
            writer.write("a", rng.normal(size=(6, 3)), sample=np.arange(6), epoch=epoch)
    layer = topoxr.open_store(path)["m/a"].to_dataset()
    xy = rng.random((2, 3, 2))
    save_layout(path, "m", "a", layer.assign_coords(
        x=(("neuron", "epoch"), xy[0]), y=(("neuron", "epoch"), xy[1])), "per-epoch")
    with topoxr.ActivationWriter(path, model="m") as writer:
        writer.write("a", rng.normal(size=(6, 3)), sample=np.arange(6), epoch=2)
    saved = topoxr.open_store(path)["m/a/layouts/per-epoch"].to_dataset()
    assert saved.epoch.values.tolist() == [0, 1, 2]
    np.testing.assert_array_equal(saved.x.sel(epoch=[0, 1]).transpose("neuron", "epoch"),
                                  xy[0])
    assert np.isnan(saved.x.sel(epoch=2)).all()
    assert load_layout(path, "m", "a", "per-epoch").epoch.values.tolist() == [0, 1]


def test_saved_layouts_in_the_tree_show_no_writer_state(tmp_path):
    """The tree showed the saving mark (topoxr_saving: False) among a layout's attrs."""
    url = write_store(make_activations(n_neurons=12, random_state=1), str(tmp_path / "s.zarr"))
    laid = attach(topoxr.open_store(url)["model/hidden"].to_dataset(), "pca", random_state=0)
    save_layout(url, "model", "hidden", laid, "pca")
    node = topoxr.open_store(url)["model/hidden/layouts/pca"]
    assert sorted(node.attrs) == ["name", "topoxr_layout"]
