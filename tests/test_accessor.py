"""The .topo accessor: present on every xarray type, pure delegation, no state."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

import topoxr
from topoxr.accessor import TopoAccessor
from topoxr.testing import assert_layout_close, make_activations, write_store


@pytest.fixture(params=["numpy", "dask"])
def layer(request):
    chunks = {"sample": 10, "epoch": 1} if request.param == "dask" else None
    return make_activations(n_neurons=16, chunks=chunks)


def test_accessor_on_every_type_shares_one_base(tmp_path):
    ds = make_activations()
    tree = xr.DataTree.from_dict({"/m/l": ds})
    for obj in (ds, ds.activation, tree):
        assert isinstance(obj.topo, TopoAccessor)
    assert not hasattr(ds.topo, "__dict__")  # __slots__: the accessor cannot keep state


def test_methods_equal_the_public_functions(layer):
    xr.testing.assert_identical(layer.topo.naps(by="label").compute(),
                                topoxr.naps(layer, by="label").compute())
    xr.testing.assert_identical(layer.activation.topo.profiles().compute(),
                                topoxr.profiles(layer.activation).compute())
    prof = topoxr.profiles(layer)
    xr.testing.assert_identical(prof.topo.distances("correlation"),
                                topoxr.distances(prof, "correlation"))
    laid = layer.topo.layout("pca", random_state=0)
    assert_layout_close(laid, topoxr.layouts.attach(layer, "pca", random_state=0), atol=0)
    xr.testing.assert_identical(laid.topo.quality(k=3), topoxr.quality(laid, k=3))
    ref = layer.topo.layout("random", random_state=1, share="all")
    moved = ref.assign_coords(x=1 - ref.x)
    xr.testing.assert_identical(moved.topo.align(ref), topoxr.align(moved, ref))


def test_default_method_and_epoch_alignment():
    from topoxr.alignment import align_epochs
    from topoxr.layouts._registry import DEFAULT_METHOD

    ds = make_activations(n_neurons=16)
    laid = ds.topo.layout(random_state=0, align=False)
    assert f'"method": "{DEFAULT_METHOD}"' in laid.attrs["topoxr_layout"]
    xr.testing.assert_identical(laid.topo.align(), align_epochs(laid))


def test_datatree_maps_over_layer_nodes(tmp_path):
    path = str(tmp_path / "run.zarr")
    write_store(make_activations(n_neurons=12), path, layer="dense1")
    tree = topoxr.open_store(path)
    out = tree.topo.naps()
    assert [n.path for n in out.leaves] == ["/model/dense1"]
    np.testing.assert_allclose(out["model/dense1"]["nap"].values,
                               topoxr.naps(tree["model/dense1"].to_dataset()).values)
    laid = tree.topo.layout("pca", random_state=0)
    assert laid["model/dense1"].x.dims == ("neuron", "epoch")
    q = laid.topo.quality(k=3)
    assert "trustworthiness" in q["model/dense1"].data_vars


def test_datatree_nodes_keep_the_coordinates_they_inherit():
    # an epoch coordinate on the group above the layer node was dropped from the results
    ds = make_activations(n_neurons=8, n_epochs=2).assign_coords(epoch=[5, 6])
    tree = xr.DataTree.from_dict({"/model": xr.Dataset(coords={"epoch": [5, 6]}),
                                  "/model/dense": ds.drop_vars("epoch")})
    out = tree.topo.naps()
    np.testing.assert_array_equal(out["model/dense"]["epoch"].values, [5, 6])
    np.testing.assert_allclose(out["model/dense"]["nap"].values, topoxr.naps(ds).values)


def test_tree_without_layers_is_refused():
    with pytest.raises(ValueError, match="no layer node"):
        xr.DataTree.from_dict({"/a": xr.Dataset()}).topo.naps()


def test_write_store_keeps_sample_metadata_and_refuses_other_neuron_labels(tmp_path):
    # custom neuron labels came back as 0..n-1, and sample metadata was dropped
    ds = make_activations(n_neurons=4, n_samples=12)
    ds = ds.assign_coords(split=("sample", np.where(np.arange(12) < 6, "a", "b")))
    path = write_store(ds, str(tmp_path / "s.zarr"))
    back = topoxr.open_store(path)["model/hidden"]
    np.testing.assert_array_equal(back["split"].values, ds["split"].values)
    with pytest.raises(ValueError, match="come back renumbered"):
        write_store(ds.assign_coords(neuron=np.arange(10, 14)), str(tmp_path / "t.zarr"))


def test_plot_delegates_to_viz_topomap():
    pytest.importorskip("holoviews")
    from topoxr.viz import topomap

    nap = topoxr.naps(make_activations(n_neurons=12))
    laid = nap.topo.layout("pca", random_state=0, share=2)
    via_accessor = laid.topo.plot(by=["label", "epoch"], interpolate=False)
    direct = topomap(laid, by=["label", "epoch"], interpolate=False)
    assert type(via_accessor) is type(direct)
    assert list(via_accessor.keys()) == list(direct.keys())


def _cosine_nap_distances(ds: xr.Dataset) -> np.ndarray:
    """Cosine distances of the NAP-by-label profiles, per epoch, computed with scipy."""
    from scipy.spatial.distance import cdist

    nap = topoxr.naps(ds).transpose("neuron", "label", "epoch").values
    return np.stack([cdist(nap[..., e], nap[..., e], "cosine") for e in range(nap.shape[-1])],
                    axis=-1)


def test_distances_of_a_dataset_and_of_a_tree_are_those_of_each_layer(tmp_path):
    # .topo.distances() raised TypeError on a Dataset or a DataTree (similarity.distances
    # took only DataArrays), though the accessor promises to map over layer nodes
    ds = make_activations(n_neurons=8, n_samples=20, n_epochs=2).drop_vars("preferred")
    expected = ds.activation.topo.distances()
    xr.testing.assert_identical(ds.topo.distances(), expected)
    np.testing.assert_allclose(expected.values, _cosine_nap_distances(ds), atol=1e-6)
    xr.testing.assert_identical(ds.topo.distances("correlation"),
                                ds.activation.topo.distances("correlation"))

    path = write_store(ds, str(tmp_path / "run.zarr"), layer="dense1")
    tree = topoxr.open_store(path)
    out = tree.topo.distances()
    assert [n.path for n in out.leaves] == ["/model/dense1"]
    layer = tree["model/dense1"].to_dataset(inherit=True)
    xr.testing.assert_allclose(out["model/dense1"]["distance"],
                               layer.activation.topo.distances(), atol=1e-12)
    np.testing.assert_allclose(out["model/dense1"]["distance"].values,
                               _cosine_nap_distances(ds), atol=1e-6)

    # two layers: each node gets the distances of its own activations
    other = make_activations(n_neurons=6, n_samples=20, n_epochs=2, random_state=5)
    two = xr.DataTree.from_dict({"/m/a": ds, "/m/b": other})
    out2 = two.topo.distances()
    for name, layer_ds in (("m/a", ds), ("m/b", other)):
        xr.testing.assert_identical(out2[name]["distance"].variable,
                                    layer_ds.activation.topo.distances().variable)


def test_distances_of_a_dataset_without_activations_is_refused_by_name():
    from topoxr.similarity import ProfileError

    ds = make_activations(n_neurons=8, n_samples=20, n_epochs=2)
    prof = topoxr.profiles(ds).to_dataset()
    with pytest.raises(ProfileError, match=r"'activation' variable.*'profile'"):
        prof.topo.distances()


def test_tree_plot_is_refused_with_the_way_to_plot_one_layer(tmp_path):
    # tree.topo.plot() raised topomap's "laid-out NAPs must be an xarray.DataArray ...,
    # got DataTree", while the class docstring said every method maps over layer nodes
    from topoxr.accessor import TopoTreeAccessor

    path = write_store(make_activations(n_neurons=12), str(tmp_path / "run.zarr"))
    laid = topoxr.open_store(path).topo.layout("pca", random_state=0)
    with pytest.raises(TypeError, match=r"one layer.*\['model/hidden'\]\['nap'\]"):
        laid.topo.plot()
    assert "but ``plot``" in TopoTreeAccessor.__doc__
    # the way the message gives draws that layer's maps
    pytest.importorskip("holoviews")
    maps = laid.topo.naps()["model/hidden"]["nap"].topo.plot(by=["label", "epoch"],
                                                             interpolate=False)
    assert len(maps.keys()) == 4 * 3


def _two_layer_tree():
    a = make_activations(n_neurons=12, n_samples=40, random_state=0)
    b = make_activations(n_neurons=12, n_samples=40, random_state=1)
    tree = xr.DataTree.from_dict({"/": xr.Dataset(attrs={"topoxr_format_version": 2}),
                                  "/m": xr.Dataset(attrs={"topoxr_model": "m"}),
                                  "/m/a": a, "/m/b": b})
    return tree, a, b


def test_one_layers_object_is_not_given_to_every_layer_of_a_tree():
    """tree.topo.layout(profile=profiles(a)) laid out layer b from a's profiles (b got
    exactly a's layout) and tree.topo.quality(profile=...) scored b against a's."""
    tree, a, b = _two_layer_tree()
    with pytest.raises(TypeError, match=r"profile is one DataArray for a tree of 2 layer "
                                        r"nodes.*tree\['m/a'\]\.topo\.layout"):
        tree.topo.layout("pca", random_state=0, share="all", profile=topoxr.profiles(a))
    laid = tree.topo.layout("pca", random_state=0, share="all")
    with pytest.raises(TypeError, match="profile is one DataArray"):
        laid.topo.quality(k=3, profile=topoxr.profiles(a))
    # a tree of one layer takes it; a tree argument gives each layer its own node
    one = xr.DataTree.from_dict({"/m/a": a})
    assert_layout_close(one.topo.layout("pca", random_state=0, share="all",
                                        profile=topoxr.profiles(a))["m/a"].to_dataset(),
                        topoxr.layouts.attach(a, "pca", random_state=0, share="all"), atol=0)
    ref = tree.topo.layout("random", random_state=3, share="all")
    aligned = laid.topo.align(ref)  # failed: "the object has no layout"
    for name in ("m/a", "m/b"):
        expected = topoxr.align(laid[name].to_dataset(), ref[name].to_dataset())
        xr.testing.assert_identical(aligned[name].to_dataset(), expected)


def test_a_tree_argument_without_the_layers_node_is_refused():
    tree, a, _ = _two_layer_tree()
    laid = tree.topo.layout("pca", random_state=0, share="all")
    partial = xr.DataTree.from_dict({"/m/a": laid["m/a"].to_dataset()})
    with pytest.raises(ValueError, match=r"argument 1 is a DataTree without a node 'm/b'"):
        laid.topo.align(partial)


def test_an_error_in_one_layer_of_a_tree_names_the_node():
    tree, a, _ = _two_layer_tree()
    small = make_activations(n_neurons=3, n_samples=40)
    bad = xr.DataTree.from_dict({"/m/a": a, "/m/small": small})
    with pytest.raises(ValueError) as info:
        bad.topo.layout("pca", random_state=0)
    assert "in the layer node 'm/small' of the tree" in info.value.__notes__


def test_a_subtree_gives_paths_relative_to_itself_and_keeps_the_groups_attributes():
    """Results were keyed by absolute paths (tree['m'].topo.naps() had a child 'm', not
    'a' and 'b') and the root and model groups lost their attributes."""
    tree, a, b = _two_layer_tree()
    out = tree.topo.naps()
    assert out.attrs == {"topoxr_format_version": 2}
    assert out["m"].attrs == {"topoxr_model": "m"}
    sub = tree["m"].topo.naps()
    assert sorted(sub.children) == ["a", "b"]
    assert sub.attrs == {"topoxr_model": "m"}
    xr.testing.assert_identical(sub["b"].to_dataset(), topoxr.naps(b).to_dataset())
    leaf = tree["m/a"].topo.naps()
    xr.testing.assert_identical(leaf.to_dataset(), topoxr.naps(a).to_dataset())


def test_align_with_match_but_no_reference_says_a_reference_is_needed():
    ds = make_activations(n_neurons=16)
    laid = ds.topo.layout("pca", random_state=0)
    with pytest.raises(TypeError, match=r"match= .*pass the reference"):
        laid.topo.align(match="activity")
