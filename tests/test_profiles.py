"""Profiles and distances, with dead and constant neurons handled explicitly."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import xarray as xr
from scipy.spatial.distance import cdist

from topoxr.grouping import naps
from topoxr.similarity import (
    ProfileError,
    degenerate_rows,
    distances,
    pairwise_distances,
    profile_matrix,
    profiles,
)
from topoxr.testing import make_activations, raise_if_dask_computes


@pytest.fixture(params=["numpy", "dask"])
def backend(request):
    return request.param


def _layer(backend, **kwargs):
    chunks = {"sample": 9, "epoch": 1} if backend == "dask" else None
    return make_activations(chunks=chunks, **kwargs)


def test_nap_profiles_are_the_nap_columns(backend):
    ds = _layer(backend)
    prof = profiles(ds)
    nap = naps(ds)
    assert prof.dims == ("neuron", "feature", "epoch")
    np.testing.assert_allclose(prof.values, nap.values, atol=1e-6)
    assert prof["feature_group"].values.tolist() == ["0", "1", "2", "3"]
    assert json.loads(prof.attrs["topoxr_profile"])["source"] == "naps"
    # NAPs passed in are used as they are
    np.testing.assert_allclose(profiles(nap).values, nap.values)


def test_nap_profiles_are_lazy_for_dask():
    with raise_if_dask_computes():
        prof = profiles(_layer("dask"), by=["label", "correct"])
    assert prof.chunks is not None
    assert prof.sizes["feature"] == 8


def test_activation_profiles_are_seeded_balanced_subsets(backend):
    ds = _layer(backend, n_samples=40, n_labels=4)
    a = profiles(ds, source="activations", n_samples=20, balanced=True, random_state=3)
    b = profiles(ds, source="activations", n_samples=20, balanced=True, random_state=3)
    c = profiles(ds, source="activations", n_samples=20, balanced=True, random_state=4)
    xr.testing.assert_identical(a.compute(), b.compute())
    assert not np.array_equal(a["feature_sample"].values, c["feature_sample"].values)
    assert a.dims == ("neuron", "feature", "epoch") and a.sizes["feature"] == 20
    for e in range(3):
        chosen = a["feature_sample"].values[:, e]
        labels = ds.label.sel(sample=chosen).values
        assert np.bincount(labels).tolist() == [5, 5, 5, 5]
        np.testing.assert_allclose(a.isel(epoch=e).values,
                                   ds.activation.sel(sample=chosen).isel(epoch=e).values)


def test_unseeded_activation_profiles_record_the_seed_they_drew():
    """Without random_state the subset is drawn with fresh entropy, which the
    description records (it recorded None): that seed draws the same subset again."""
    ds = make_activations(n_samples=60)
    a = profiles(ds, source="activations", n_samples=10)
    seed = json.loads(a.attrs["topoxr_profile"])["random_state"]
    assert isinstance(seed, int)
    again = profiles(ds, source="activations", n_samples=10, random_state=seed)
    xr.testing.assert_identical(a, again)
    b = profiles(ds, source="activations", n_samples=10)
    assert json.loads(b.attrs["topoxr_profile"])["random_state"] != seed


def test_correct_only_profiles_use_correct_samples_per_epoch(caplog):
    ds = make_activations(n_samples=40)
    with caplog.at_level(logging.WARNING, logger="topoxr.similarity"):
        p = profiles(ds, source="activations", n_samples=40, correct_only=True, random_state=0)
    assert "instead of n_samples=40" in caplog.text  # fewer correct samples than asked
    for e in range(3):
        chosen = p["feature_sample"].values[:, e]
        assert ds.correct.sel(sample=chosen).isel(epoch=e).values.all()


def test_profile_errors():
    ds = make_activations()
    with pytest.raises(ProfileError, match="source"):
        profiles(ds, source="weights")
    with pytest.raises(ProfileError, match="correct"):
        profiles(ds.drop_vars(["correct", "prediction"]), source="activations",
                 correct_only=True)
    with pytest.raises(ProfileError, match="n_samples"):
        profiles(ds, source="activations", n_samples=0)


def test_cosine_distances_match_scipy_for_live_neurons():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(15, 6))
    for metric in ("cosine", "correlation", "euclidean"):
        D, info = pairwise_distances(X, metric)
        np.testing.assert_allclose(D, cdist(X, X, metric=metric), atol=1e-12)
        assert not info["dead"].any() and not info["constant"].any()


def test_dead_neurons_are_at_distance_one_and_reported(caplog):
    ds = make_activations(n_neurons=10, n_dead=2)
    with caplog.at_level(logging.WARNING, logger="topoxr.similarity"):
        d = distances(profiles(ds))
    assert d.dims == ("neuron", "neuron_other", "epoch")
    assert d.attrs["dead_neurons"] == [8, 9]
    assert "2 dead" in caplog.text and "[8, 9]" in caplog.text
    vals = d.isel(epoch=0).values
    assert np.all(vals[8, :8] == 1.0) and np.all(vals[:8, 9] == 1.0)
    assert vals[8, 9] == 0.0 and vals[8, 8] == 0.0
    assert np.isfinite(d.values).all()
    np.testing.assert_allclose(vals, vals.T)


def test_constant_neurons_under_correlation():
    X = np.array([[1.0, 2.0, 3.0], [2.0, 2.0, 2.0], [3.0, 1.0, 0.0], [0.0, 0.0, 0.0],
                  [1.0, 0.0, 1.0]])
    dead, constant = degenerate_rows(X, "correlation")
    assert dead.tolist() == [False, False, False, True, False]
    assert constant.tolist() == [False, True, False, False, False]
    D, _ = pairwise_distances(X, "correlation")
    assert D[1, 0] == 1.0 and D[1, 3] == 0.0
    # the Euclidean geometry handed to layouts and quality metrics agrees for every pair,
    # degenerate rows included (zero rows were at 1 from unit rows: cosine distance 0.5)
    Y, _ = profile_matrix(X, "correlation")
    np.testing.assert_allclose(cdist(Y, Y) ** 2 / 2, D, atol=1e-12)
    for metric in ("cosine", "correlation"):
        Y, _ = profile_matrix(X, metric)
        np.testing.assert_allclose(cdist(Y, Y) ** 2 / 2, pairwise_distances(X, metric)[0],
                                   atol=1e-12)


def test_bad_profiles_are_refused():
    with pytest.raises(ProfileError, match="unknown metric"):
        pairwise_distances(np.ones((3, 2)), "manhattan")
    X = np.ones((4, 3))
    X[2, 1] = np.inf
    with pytest.raises(ProfileError, match=r"NaN or inf for neuron position\(s\) \[2\]"):
        pairwise_distances(X)
    with pytest.raises(ProfileError, match="2-D"):
        pairwise_distances(np.ones(3))
    # a feature that is NaN for every neuron (a group empty at that epoch) is dropped
    X = np.array([[1.0, np.nan], [0.0, np.nan], [1.0, np.nan]])
    D, _ = pairwise_distances(X, "euclidean")
    np.testing.assert_allclose(D, cdist(X[:, :1], X[:, :1]))


def test_distances_without_epoch_and_from_raw_activations():
    ds = make_activations(n_neurons=7)
    prof = profiles(ds).isel(epoch=0, drop=True)
    d = distances(prof, "euclidean")
    assert d.dims == ("neuron", "neuron_other")
    np.testing.assert_allclose(d.values, cdist(prof.values, prof.values), atol=1e-6)
    with pytest.raises(TypeError):
        distances(np.ones((3, 3)))


def test_epochs_select_the_epochs_of_nap_input():
    ds = make_activations(n_neurons=12, n_samples=80, n_labels=4)
    nap = naps(ds, by="label")
    for epochs, kept in (([2], [2]), (1, [1]), ([2, 0], [2, 0])):
        prof = profiles(nap, epochs=epochs)
        assert prof["epoch"].values.tolist() == kept
        np.testing.assert_array_equal(prof.values, nap.sel(epoch=kept).values)
    # the same epochs as the NAPs computed from the activations
    np.testing.assert_allclose(profiles(nap, epochs=[2]).values,
                               profiles(ds, epochs=[2]).values, atol=1e-6)
    with pytest.raises(ProfileError, match=r"not all in \[0, 1, 2\]"):
        profiles(nap, epochs=[7])
    with pytest.raises(ProfileError, match="no epoch dimension"):
        profiles(nap.isel(epoch=0), epochs=[0])


@pytest.mark.parametrize("source", ["naps", "activations"])
def test_an_empty_epoch_selection_is_refused(source):
    ds = make_activations(n_neurons=12, n_samples=80)
    for obj in (ds, naps(ds)):
        with pytest.raises((ProfileError, ValueError), match="selects no epoch"):
            profiles(obj, source=source, epochs=[])
    if source == "activations":
        with pytest.raises(ProfileError, match=r"not all in \[0, 1, 2\]"):
            profiles(ds, source=source, epochs=[9])


def test_balanced_sampling_names_too_few_samples_for_the_labels():
    # with n_samples=3 < 4 labels the error blamed a label without eligible samples
    ds = make_activations(n_samples=40, n_labels=4)
    with pytest.raises(ProfileError, match="n_samples=3 is fewer than the 4 labels"):
        profiles(ds, source="activations", n_samples=3, balanced=True, random_state=1)
    # 4 samples for 4 labels: one of each
    p = profiles(ds, source="activations", n_samples=4, balanced=True, random_state=1)
    for e in range(ds.sizes["epoch"]):
        labels = ds.label.sel(sample=p["feature_sample"].values[:, e]).values
        assert sorted(labels.tolist()) == [0, 1, 2, 3]


def test_balanced_sampling_names_the_label_without_eligible_samples():
    ds = make_activations(n_samples=40, n_labels=4)
    committed = ds.committed.values.copy()
    committed[ds.label.values == 2, 1] = False  # label 2 has nothing committed at epoch 1
    ds = ds.assign_coords(committed=(("sample", "epoch"), committed), epoch=[10, 11, 12])
    with pytest.raises(ProfileError, match=r"label 2 has no eligible.*at epoch 11"):
        profiles(ds, source="activations", n_samples=8, balanced=True, random_state=1)


def test_distances_of_a_layer_dataset_use_its_activations():
    # distances() refused Datasets (TypeError), so Dataset.topo.distances() always failed
    ds = make_activations(n_neurons=10, n_samples=24, n_labels=4)
    got = distances(ds)
    xr.testing.assert_identical(got, distances(ds.activation))
    nap = naps(ds).transpose("neuron", "label", "epoch").values
    for e in range(ds.sizes["epoch"]):
        np.testing.assert_allclose(got.isel(epoch=e).values,
                                   cdist(nap[..., e], nap[..., e], "cosine"), atol=1e-6)
    with pytest.raises(ProfileError, match=r"'activation' variable"):
        distances(ds.rename(activation="act"))
    with pytest.raises(TypeError, match="DataTree"):
        distances(xr.DataTree.from_dict({"/m/l": ds}))


@pytest.mark.parametrize("tol", [-1.0, np.nan, 1.0, 2.0, np.inf, True, "1e-7"])
def test_tol_outside_zero_to_one_is_refused(tol):
    # tol=-1 or NaN found no dead neuron ever, tol=2 or inf made every neuron dead
    X = np.random.default_rng(0).normal(size=(6, 4))
    for func in (degenerate_rows, profile_matrix, pairwise_distances):
        for metric in ("cosine", "euclidean"):
            with pytest.raises(ProfileError, match="tol"):
                func(X, metric, tol=tol)
    with pytest.raises(ProfileError, match="tol"):
        distances(profiles(make_activations(n_neurons=6)), tol=tol)


def test_tol_zero_marks_exactly_the_zero_rows_dead():
    X = np.random.default_rng(0).normal(size=(6, 4))
    X[2] = 0.0
    X[4] = 1e-300  # tiny, not zero: live at tol=0, dead at the default
    dead, _ = degenerate_rows(X, "cosine", tol=0.0)
    np.testing.assert_array_equal(dead, np.linalg.norm(X, axis=1) == 0)
    assert degenerate_rows(X, "cosine")[0].tolist() == [False, False, True, False, True,
                                                        False]
    with pytest.raises(ProfileError, match="tol"):
        degenerate_rows(X, "cosine", tol=1.0)


@pytest.mark.parametrize("source", ["activations", "nap input"])
def test_an_epoch_named_twice_is_refused(source):
    # epochs=[2, 2] returned profiles with two slices labelled epoch 2
    ds = make_activations(n_neurons=8, n_samples=50, n_epochs=3, random_state=0)
    obj = naps(ds) if source == "nap input" else ds
    kwargs = {"source": "activations", "random_state": 0} if source == "activations" else {}
    with pytest.raises(ProfileError, match=r"epoch\(s\) \[2\] more than once"):
        profiles(obj, epochs=[2, 0, 2], **kwargs)
    got = profiles(obj, epochs=[2, 0], **kwargs)
    assert got.epoch.values.tolist() == [2, 0]
