"""Alignment: Procrustes on shared neurons, epochs, and neurons matched across models."""

from __future__ import annotations

import json

import numpy as np
import pytest
import xarray as xr

from topoxr.alignment import AlignmentError, align, align_epochs, match_neurons, procrustes
from topoxr.layouts import attach
from topoxr.grouping import naps
from topoxr.testing import assert_layout_close, make_activations


def _rotation(deg, reflect=False):
    t = np.deg2rad(deg)
    R = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    return R @ np.diag([1.0, -1.0]) if reflect else R


@pytest.mark.parametrize("reflect", [False, True])
def test_procrustes_undoes_rotation_reflection_and_translation(reflect):
    rng = np.random.default_rng(0)
    ref = rng.random((30, 2))
    moved = ref @ _rotation(73, reflect) + np.array([3.0, -1.0])
    aligned, info = procrustes(moved, ref, rescale=False)
    np.testing.assert_allclose(aligned, ref, atol=1e-10)
    assert info["reflection"] is reflect
    assert info["rmsd"] == pytest.approx(0.0, abs=1e-10)


def test_procrustes_fits_on_shared_rows_and_moves_all():
    rng = np.random.default_rng(1)
    ref = rng.random((20, 2))
    moved = ref @ _rotation(40)
    shared = np.arange(0, 20, 2)
    aligned, _ = procrustes(moved, ref[shared], shared=shared, rescale=False)
    np.testing.assert_allclose(aligned, ref, atol=1e-10)  # unshared rows follow


def test_procrustes_rescale_keeps_unit_square_and_shape():
    rng = np.random.default_rng(2)
    ref = rng.random((25, 2))
    aligned, _ = procrustes(ref @ _rotation(30), ref)
    assert aligned.min() >= 0 and aligned.max() <= 1 + 1e-12
    d0 = np.linalg.norm(ref[:, None] - ref[None], axis=-1)
    d1 = np.linalg.norm(aligned[:, None] - aligned[None], axis=-1)
    ratio = d1[d0 > 0] / d0[d0 > 0]
    np.testing.assert_allclose(ratio, ratio[0])  # uniform scale only


def test_procrustes_errors():
    with pytest.raises(AlignmentError, match="shape"):
        procrustes(np.ones((3, 3)), np.ones((3, 3)))
    with pytest.raises(AlignmentError, match="at least 2"):
        procrustes(np.ones((3, 2)), np.ones((1, 2)), shared=[0])
    with pytest.raises(AlignmentError, match="NaN"):
        procrustes(np.full((3, 2), np.nan), np.ones((3, 2)))


def test_align_on_shared_neuron_labels():
    ds = make_activations(n_neurons=20)
    ref = attach(naps(ds).isel(epoch=-1), "pca", random_state=0, metric="euclidean")
    rng = np.random.default_rng(0)
    pts = np.stack([ref.x.values, ref.y.values], 1) @ _rotation(120, True)
    other = ref.isel(neuron=rng.permutation(20)[:15])  # a subset, in another order
    sub = pts[other.neuron.values]
    other = other.assign_coords(x=("neuron", sub[:, 0]), y=("neuron", sub[:, 1]))
    out = align(other, ref, rescale=False)
    np.testing.assert_allclose(out.x.values, ref.x.sel(neuron=other.neuron).values, atol=1e-9)
    np.testing.assert_allclose(out.y.values, ref.y.sel(neuron=other.neuron).values, atol=1e-9)
    note = json.loads(out.attrs["topoxr_layout"])["aligned"]
    assert note["n_matched"] == 15 and note["reflection"] is True
    np.testing.assert_allclose(other.x.values, sub[:, 0])


def test_match_neurons_recovers_a_permutation_between_models():
    ds = make_activations(n_neurons=16, n_samples=60)
    nap = naps(ds, normalize=False).isel(epoch=-1)
    rng = np.random.default_rng(3)
    perm = rng.permutation(16)
    noisy = nap.isel(neuron=perm) + rng.normal(scale=0.01, size=(16, 4))
    other = noisy.assign_coords(neuron=np.arange(100, 116))
    rows_a, rows_b = match_neurons(nap, other)
    # nap[rows_a[i]] is matched with other[rows_b[i]] == nap[perm[rows_b[i]]]
    assert (perm[rows_b] == rows_a).mean() > 0.6  # neurons of one label are near-duplicates
    assert (nap.preferred.values[rows_a] == other.preferred.values[rows_b]).all()


def test_match_neurons_pairs_profiles_whatever_the_order_of_their_dims():
    # profiles are flattened per neuron: (label, epoch) and (epoch, label) columns must be
    # the same cells (they were paired by position)
    ds = make_activations(n_neurons=16, n_samples=60)
    nap = naps(ds, normalize=False)  # (neuron, label, epoch)
    perm = np.random.default_rng(3).permutation(16)
    other = nap.isel(neuron=perm).assign_coords(neuron=np.arange(100, 116))
    want_a, want_b = match_neurons(nap, other)
    for dims in (("neuron", "epoch", "label"), ("epoch", "label", "neuron")):
        rows_a, rows_b = match_neurons(nap, other.transpose(*dims))
        np.testing.assert_array_equal(rows_a, want_a)
        np.testing.assert_array_equal(rows_b, want_b)
        assert (perm[rows_b] == rows_a).all()
    with pytest.raises(AlignmentError, match="same dims"):
        match_neurons(nap, other.isel(epoch=0))


def test_align_models_by_activity():
    ds = make_activations(n_neurons=16, n_samples=60)
    nap = naps(ds).isel(epoch=-1)
    a = attach(nap, "pca", random_state=0, metric="euclidean")
    perm = np.random.default_rng(4).permutation(16)
    b = a.isel(neuron=perm).assign_coords(neuron=np.arange(100, 116))
    pts = np.stack([b.x.values, b.y.values], 1) @ _rotation(200)
    b = b.assign_coords(x=("neuron", pts[:, 0]), y=("neuron", pts[:, 1]))
    out = align(b, a, match="activity", rescale=False)
    np.testing.assert_allclose(out.x.values, a.x.values[perm], atol=1e-8)
    with pytest.raises(AlignmentError, match="match"):
        align(b, a, match="names")


def test_align_epochs_removes_flips_between_epochs():
    ds = make_activations(n_neurons=20)
    base = attach(ds, "pca", random_state=0, share=2, metric="euclidean")
    pts = np.stack([base.x.values, base.y.values], 1)
    per_epoch = np.stack([pts, pts @ _rotation(90) + 1, pts @ _rotation(0, True)], axis=1)
    laid = ds.assign_coords(x=(("neuron", "epoch"), per_epoch[..., 0]),
                            y=(("neuron", "epoch"), per_epoch[..., 1]))
    out = align_epochs(laid, rescale=False)
    for e in range(3):
        np.testing.assert_allclose(out.x.isel(epoch=e).values, pts[:, 0], atol=1e-9)
    # rescaled, every epoch lies in the unit square, the first too (it was left as given),
    # so epochs that are rotations of the first coincide
    scaled = align_epochs(laid.assign_coords(x=laid.x * 100, y=laid.y * 100))
    for e in range(3):
        np.testing.assert_allclose(scaled.x.isel(epoch=e).values, scaled.x.isel(epoch=0).values,
                                   atol=1e-9)
        np.testing.assert_allclose(scaled.y.isel(epoch=e).values, scaled.y.isel(epoch=0).values,
                                   atol=1e-9)
    assert float(scaled.x.max()) <= 1 + 1e-12 and float(scaled.x.min()) >= -1e-12
    # a shared layout is returned unchanged
    xr.testing.assert_identical(align_epochs(base), base)
    with pytest.raises(AlignmentError, match="no layout"):
        align_epochs(ds)


def test_align_epochs_chains_epochs_in_label_order_whatever_order_they_are_held_in():
    """Epochs held as [2, 0, 1] were chained by position: epoch 0 fitted onto epoch 2."""
    ds = make_activations(n_neurons=20)
    rng = np.random.default_rng(5)
    per_epoch = rng.normal(size=(20, 3, 2))  # unrelated layouts: the chain order matters
    laid = ds.assign_coords(x=(("neuron", "epoch"), per_epoch[..., 0]),
                            y=(("neuron", "epoch"), per_epoch[..., 1]))
    shuffled = [2, 0, 1]
    for rescale in (False, True):
        want = align_epochs(laid, rescale=rescale).isel(epoch=shuffled)
        got = align_epochs(laid.isel(epoch=shuffled), rescale=rescale)
        for coord in ("x", "y"):
            np.testing.assert_allclose(got[coord].transpose("neuron", "epoch").values,
                                       want[coord].transpose("neuron", "epoch").values,
                                       atol=1e-12)


def test_assert_layout_close_up_to_rotation():
    ds = make_activations(n_neurons=10)
    a = attach(ds, "pca", random_state=0, share="all", metric="euclidean")
    pts = np.stack([a.x.values, a.y.values], 1) @ _rotation(33) + 2
    b = a.assign_coords(x=("neuron", pts[:, 0]), y=("neuron", pts[:, 1]))
    assert_layout_close(b, a, up_to_rotation=True, atol=1e-8)
    with pytest.raises(AssertionError):
        assert_layout_close(b, a)


def test_assert_layout_close_matches_neurons_and_epochs_by_label():
    """The helper compared epochs and neurons by position: per-epoch layouts of epochs
    [5, 6] passed against those of [0, 1], the same layout stored in another order
    failed, and two all-NaN layouts passed. One neuron compared with itself raised an
    AlignmentError up to rotation."""
    ds = make_activations(n_neurons=10)
    a = attach(ds, "pca", random_state=0, metric="euclidean")  # x, y on (neuron, epoch)
    assert a.x.dims == ("neuron", "epoch")
    perm = np.random.default_rng(0).permutation(10)
    assert_layout_close(a.isel(neuron=perm, epoch=[2, 0, 1]), a)
    assert_layout_close(a.isel(neuron=perm), a, up_to_rotation=True)
    with pytest.raises(AssertionError, match="different 'epoch' labels"):
        assert_layout_close(a.assign_coords(epoch=a.epoch + 5), a)
    with pytest.raises(AssertionError, match="different neurons"):
        assert_layout_close(a.assign_coords(neuron=a.neuron + 100), a)
    nan = a.assign_coords(x=a.x * np.nan, y=a.y * np.nan)
    with pytest.raises(AssertionError, match="NaN or infinite positions"):
        assert_layout_close(nan, nan)
    one = a.isel(neuron=[3], epoch=0)
    assert_layout_close(one.assign_coords(x=one.x + 2), one, up_to_rotation=True)


@pytest.mark.parametrize("where", ["laid", "reference"])
def test_align_refuses_repeated_neuron_labels(where):
    # two layers concatenated, each numbered 0..n-1: a label names two neurons
    rng = np.random.default_rng(5)
    n = 12

    def laid_out(ids):
        pts = rng.random((len(ids), 2))
        return xr.DataArray(np.zeros(len(ids)), dims="neuron",
                            coords={"neuron": ids, "x": ("neuron", pts[:, 0]),
                                    "y": ("neuron", pts[:, 1])})

    twice = laid_out(np.r_[np.arange(n), np.arange(n)])
    once = laid_out(np.arange(n))
    laid, reference = (twice, once) if where == "laid" else (once, twice)
    with pytest.raises(AlignmentError, match=rf"{where} has repeated neuron labels \[0, 1"):
        align(laid, reference)
