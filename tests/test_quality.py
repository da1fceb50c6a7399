"""Quality metrics: agreement with scikit-learn, identity and random layouts, map scores."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import xarray as xr
from sklearn.manifold import trustworthiness as sk_trustworthiness

from topoxr.layouts import attach
from topoxr.metrics import (
    QualityError,
    blobs,
    continuity,
    neighborhood_preservation,
    quality,
    rank_correlation,
    smoothness,
    trustworthiness,
)
from topoxr.testing import make_activations


def _clustered(n=200, f=8, centers=6, seed=0):
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(centers, f)) * 3
    lab = rng.integers(0, centers, n)
    return c[lab] + rng.normal(size=(n, f)), lab


@pytest.mark.parametrize("k", [1, 5, 12])
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_agrees_with_sklearn(k, metric):
    X, _ = _clustered()
    rng = np.random.default_rng(1)
    E = X[:, :2] + rng.normal(scale=0.5, size=(len(X), 2))
    t, c = neighborhood_preservation(X, E, k, metric=metric, n_queries=None)
    assert t == pytest.approx(sk_trustworthiness(X, E, n_neighbors=k, metric=metric), abs=1e-12)
    # continuity is trustworthiness with the spaces swapped
    Xc = X / np.linalg.norm(X, axis=1, keepdims=True) if metric == "cosine" else X
    assert c == pytest.approx(sk_trustworthiness(E, Xc, n_neighbors=k), abs=1e-12)


def test_identity_layout_is_perfect_and_random_layout_is_not():
    rng = np.random.default_rng(0)
    P = rng.random((300, 2))
    assert trustworthiness(P, P, 10) == pytest.approx(1.0)
    assert continuity(P, P, 10) == pytest.approx(1.0)
    assert rank_correlation(P, P) == pytest.approx(1.0)
    X, _ = _clustered(300)
    R = rng.random((300, 2))
    t, c = neighborhood_preservation(X, R, 10)
    assert t < 0.65 and c < 0.65
    assert abs(rank_correlation(X, R)) < 0.1


def test_query_subset_estimates_the_exact_value():
    X, _ = _clustered(600)
    E = X[:, :2]
    exact = neighborhood_preservation(X, E, 10, n_queries=None)
    est = neighborhood_preservation(X, E, 10, n_queries=300, random_state=0)
    assert est[0] == pytest.approx(exact[0], abs=0.03)
    assert est[1] == pytest.approx(exact[1], abs=0.03)
    again = neighborhood_preservation(X, E, 10, n_queries=300, random_state=0)
    assert est == again


def test_memory_stays_linear_in_n():
    """n = 20,000: an n x n float64 matrix would be 3.2 GB; the blocks stay far below."""
    rng = np.random.default_rng(0)
    n = 20_000
    X = rng.normal(size=(n, 8))
    E = X[:, :2] + rng.normal(scale=0.1, size=(n, 2))
    tracemalloc.start()
    try:
        t, c = neighborhood_preservation(X, E, 10, n_queries=400)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 300e6
    assert 0.5 < t <= 1.0 and 0.5 < c <= 1.0


def test_rank_correlation_samples_pairs_for_large_n():
    X, _ = _clustered(400)
    E = X[:, :2]
    full = rank_correlation(X, E, n_pairs=10**6)
    sampled = rank_correlation(X, E, n_pairs=20_000, random_state=0)
    assert sampled == pytest.approx(full, abs=0.03)


def test_bad_inputs_are_named():
    X = np.random.default_rng(0).normal(size=(20, 3))
    with pytest.raises(QualityError, match="k must satisfy"):
        trustworthiness(X, X[:, :2], k=10)
    with pytest.raises(QualityError, match="rows"):
        trustworthiness(X, X[:10, :2], k=3)
    E = X[:, :2].copy()
    E[0, 0] = np.nan
    with pytest.raises(QualityError, match="NaN"):
        trustworthiness(X, E, k=3)
    with pytest.raises(QualityError, match="n_queries"):
        trustworthiness(X, X[:, :2], k=3, n_queries="many")


def test_smoothness_ranks_smooth_maps_below_noisy_ones():
    yy, xx = np.mgrid[0:100, 0:100] / 100.0
    rng = np.random.default_rng(0)
    smooth = np.sin(2 * np.pi * xx) * np.cos(np.pi * yy)
    blobby = np.sin(8 * np.pi * xx) * np.cos(8 * np.pi * yy)
    noisy = rng.normal(size=(100, 100))
    res = smoothness(np.stack([smooth, blobby, noisy]))
    assert res["score"].shape == (3,)
    assert res["score"][0] < res["score"][1] < res["score"][2]
    assert res["blur_curve"].shape == (3, 10)
    # the degradation curves grow with strength
    assert np.all(np.diff(res["blur_curve"][2]) >= -1e-9)


def test_smoothness_ignores_pixels_outside_the_hull():
    yy, xx = np.mgrid[0:100, 0:100] / 100.0
    img = xx.copy()
    masked = np.where((xx - 0.5) ** 2 + (yy - 0.5) ** 2 < 0.16, img, np.nan)
    res = smoothness(np.stack([img, masked, np.full((100, 100), np.nan),
                               np.zeros((100, 100))]))
    assert np.isfinite(res["score"][1]) and res["score"][1] < 0.2
    assert np.isnan(res["score"][2])
    assert res["score"][3] == 0.0


def test_blobs_count_and_area():
    img = np.zeros((50, 50))
    img[5:15, 5:15] = 1.0       # positive blob of 100 px
    img[30:35, 30:40] = 0.8     # positive blob of 50 px
    img[20:30, 40:45] = -0.9    # negative blob of 50 px
    img[45:, :] = np.nan
    out = blobs(img[None], threshold=0.5)
    assert out["count"].tolist() == [3.0]
    assert out["area"][0] == pytest.approx((100 + 50 + 50) / 3 / np.isfinite(img).sum())
    with pytest.raises(QualityError, match="threshold"):
        blobs(img[None], threshold=0)


@pytest.mark.parametrize("backend", ["numpy", "dask"])
def test_quality_of_laid_out_objects(backend):
    chunks = {"sample": 10, "epoch": 1} if backend == "dask" else None
    ds = make_activations(n_neurons=40, n_samples=80, chunks=chunks)
    good = attach(ds, "pca", random_state=0, metric="euclidean")
    bad = attach(ds, "random", random_state=0, metric="euclidean")
    qg, qb = quality(good), quality(bad)
    assert set(qg.data_vars) == {"trustworthiness", "continuity", "spearman", "smoothness",
                                 "smoothness_blur", "smoothness_shrink", "blob_count",
                                 "blob_area", "knn_overlap", "smoothness_paper"}
    assert (qg["knn_overlap"] > qb["knn_overlap"]).all()
    assert qg["trustworthiness"].dims == ("epoch",)
    assert qg.attrs["metric"] == "euclidean"  # read from the layout's provenance
    assert (qg["trustworthiness"] > qb["trustworthiness"]).all()
    assert (qg["smoothness"] < qb["smoothness"]).all()


def test_quality_of_an_identity_layout_is_perfect():
    rng = np.random.default_rng(0)
    pts = rng.random((50, 2))
    nap = xr.DataArray(np.concatenate([pts, np.zeros((50, 1))], axis=1)[:, :, None],
                       dims=("neuron", "label", "epoch"),
                       coords={"neuron": np.arange(50), "label": [0, 1, 2], "epoch": [0]},
                       name="nap", attrs={"topoxr_nap": "{}"})
    laid = nap.assign_coords(x=("neuron", pts[:, 0]), y=("neuron", pts[:, 1]))
    q = quality(laid, metric="euclidean", k=5)
    assert float(q["trustworthiness"][0]) == pytest.approx(1.0)
    assert float(q["continuity"][0]) == pytest.approx(1.0)
    assert float(q["spearman"][0]) == pytest.approx(1.0)


def test_quality_without_layout_is_refused():
    with pytest.raises(QualityError, match="no layout"):
        quality(make_activations())


def test_quality_reads_lazy_input_once():
    from topoxr.testing import raise_if_dask_computes

    ds = make_activations(n_neurons=20, chunks={"sample": 10, "epoch": 1})
    laid = attach(ds, "pca", random_state=0)
    with raise_if_dask_computes(max_computes=1):
        q = quality(laid, k=5)
    assert q.sizes["epoch"] == 3


def test_paper_smoothness_ranks_smooth_below_rough_without_wraparound():
    from topoxr.metrics import paper_smoothness

    yy, xx = np.mgrid[0:60, 0:60] / 60.0
    smooth = np.sin(3 * xx) * np.cos(2 * yy)
    rough = np.random.default_rng(0).normal(size=(60, 60))
    out = paper_smoothness(np.stack([smooth, rough]))
    assert out["curve"].shape == (2, 10)
    assert out["area"][0] < out["area"][1]
    # errors grow with the blur radius and are never negative (no 8-bit wrap-around)
    assert (np.diff(out["curve"], axis=1) >= -1e-12).all() and (out["curve"] >= 0).all()
    # a constant map at the centre of the colour range does not change when blurred
    flat = paper_smoothness(np.zeros((30, 30)), clim=(-1.0, 1.0))
    assert flat["area"] == pytest.approx(0.0, abs=1e-12)
    # NaN outside the hull is rendered black, and the map still scores finitely
    holed = smooth.copy()
    holed[:10] = np.nan
    assert np.isfinite(paper_smoothness(holed)["area"])


def test_knn_overlap_perfect_random_and_sampled():
    from topoxr.metrics import knn_overlap

    rng = np.random.default_rng(1)
    P = rng.normal(size=(400, 2))
    assert knn_overlap(P, P, k=10) == 1.0
    shuffled = knn_overlap(P, rng.permutation(P), k=10)
    assert shuffled < 0.1  # about k / (n - 1) = 0.025 for a random layout
    sampled = knn_overlap(P, P + rng.normal(scale=0.05, size=P.shape), k=10, n_queries=100)
    full = knn_overlap(P, P + rng.normal(scale=0.05, size=P.shape), k=10, n_queries=None)
    assert 0.3 < sampled <= 1.0 and 0.3 < full <= 1.0


def _labelled_pair(n=60, f=6, seed=0):
    """Profiles (neuron, feature) and a layout (neuron, coord), labelled 100..100+n."""
    X, _ = _clustered(n=n, f=f, seed=seed)
    E = X[:, :2] + np.random.default_rng(seed + 1).normal(scale=0.5, size=(n, 2))
    ids = np.arange(100, 100 + n)
    prof = xr.DataArray(X, dims=("neuron", "feature"), coords={"neuron": ids})
    pos = xr.DataArray(E, dims=("neuron", "coord"), coords={"neuron": ids, "coord": ["x", "y"]})
    return X, E, prof, pos


def test_array_metrics_match_labelled_inputs_by_neuron_label():
    from scipy.spatial.distance import pdist
    from scipy.stats import spearmanr

    from topoxr.metrics import knn_overlap

    X, E, prof, pos = _labelled_pair()
    perm = np.random.default_rng(2).permutation(len(X))
    shuffled = prof.isel(neuron=perm).transpose("feature", "neuron")  # other order, other dims
    k = 5
    assert trustworthiness(shuffled, pos, k) == pytest.approx(
        sk_trustworthiness(X, E, n_neighbors=k), abs=1e-12)
    assert continuity(shuffled, pos, k) == pytest.approx(
        sk_trustworthiness(E, X, n_neighbors=k), abs=1e-12)
    assert rank_correlation(shuffled, pos) == pytest.approx(
        spearmanr(pdist(X), pdist(E)).statistic, abs=1e-12)
    assert knn_overlap(shuffled, pos, k) == knn_overlap(X, E, k)
    # the layout shuffled instead: the profiles' order is the layout's
    assert trustworthiness(prof, pos.isel(neuron=perm), k) == pytest.approx(
        sk_trustworthiness(X[perm], E[perm], n_neighbors=k), abs=1e-12)


def test_array_metrics_refuse_labelled_inputs_of_other_neurons():
    _, _, prof, pos = _labelled_pair()
    with pytest.raises(QualityError, match="lack neurons"):
        trustworthiness(prof.assign_coords(neuron=prof.neuron.values + 1000), pos, 5)
    with pytest.raises(QualityError, match="repeated neuron labels"):
        rank_correlation(prof.assign_coords(neuron=np.zeros(prof.sizes["neuron"], int)), pos)


def test_array_metrics_pair_a_plain_array_by_position():
    X, E, prof, pos = _labelled_pair()
    perm = np.random.default_rng(3).permutation(len(X))
    # one side without neuron labels: rows are paired by position (documented)
    assert trustworthiness(prof.isel(neuron=perm), E[perm], 5) == pytest.approx(
        sk_trustworthiness(X[perm], E[perm], n_neighbors=5), abs=1e-12)
    assert trustworthiness(X, pos, 5) == pytest.approx(
        sk_trustworthiness(X, E, n_neighbors=5), abs=1e-12)


@pytest.mark.parametrize("k", [0, -3])
def test_quality_refuses_k_below_one(k):
    laid = attach(make_activations(n_neurons=20), "pca", random_state=0)
    with pytest.raises(QualityError, match="k must be >= 1"):
        quality(laid, k=k)


@pytest.mark.parametrize("bad", [0, -3, 2.5, np.float64(4.0), True])
def test_n_queries_must_be_a_positive_integer(bad):
    # 0 and negative values raised numpy/sklearn errors, 2.5 was truncated to 2
    from topoxr.metrics import knn_overlap

    X, _ = _clustered(n=60)
    E = X[:, :2]
    with pytest.raises(QualityError, match="n_queries"):
        neighborhood_preservation(X, E, 5, n_queries=bad)
    with pytest.raises(QualityError, match="n_queries"):
        knn_overlap(X, E, 5, n_queries=bad)
    with pytest.raises(QualityError, match="n_queries"):
        knn_overlap(X, E, 5, n_queries="auto")  # knn_overlap has no "auto"


def test_n_queries_accepts_numpy_integers_and_none():
    from topoxr.metrics import knn_overlap

    X, _ = _clustered(n=60)
    E = X[:, :2] + np.random.default_rng(1).normal(scale=2, size=(60, 2))
    assert neighborhood_preservation(X, E, 5, n_queries=np.int64(20)) == \
        neighborhood_preservation(X, E, 5, n_queries=20)
    assert knn_overlap(X, E, 5, n_queries=np.int32(20)) == knn_overlap(X, E, 5, n_queries=20)
    t, _ = neighborhood_preservation(X, E, 5, n_queries=None)
    assert t == pytest.approx(sk_trustworthiness(X, E, n_neighbors=5))
    assert knn_overlap(X, E, 5, n_queries=None) == knn_overlap(X, E, 5, n_queries=1000)


@pytest.mark.parametrize("strengths", [(2, 2), (3, 1), (1, 2, 2), (-1, 2), (1, np.inf)])
def test_smoothness_refuses_strengths_without_a_range(strengths):
    # strengths=(2, 2) rescaled the strengths by 0/0 and returned NaN scores
    img = np.sin(np.mgrid[0:40, 0:40][1] / 6.0)
    with pytest.raises(QualityError, match="strengths"):
        smoothness(img[None], strengths=strengths)


def test_smoothness_of_two_strengths_is_the_mean_of_the_curve_ends():
    # area under a straight segment over a range rescaled to [0, 1]
    img = np.sin(np.mgrid[0:40, 0:40][1] / 6.0)
    res = smoothness(img[None], strengths=(2, 5))
    assert res["blur"][0] == pytest.approx(res["blur_curve"][0].mean())
    assert np.isfinite(res["score"]).all()


@pytest.mark.parametrize("clim", [(1, -1), (0.5, 0.5), (-1, np.nan), (0, np.inf), (1,)])
def test_paper_smoothness_refuses_colour_limits_without_a_range(clim):
    # clim=(1, -1) gave NaN areas
    from topoxr.metrics import paper_smoothness

    img = np.sin(np.mgrid[0:40, 0:40][1] / 6.0)
    with pytest.raises(QualityError, match="clim"):
        paper_smoothness(img[None], clim=clim)


def test_paper_smoothness_with_explicit_limits_equal_to_the_default():
    from topoxr.metrics import paper_smoothness

    img = np.sin(np.mgrid[0:40, 0:40][1] / 6.0) * 0.7
    m = np.abs(img).max()
    np.testing.assert_array_equal(paper_smoothness(img[None], clim=(-m, m))["area"],
                                  paper_smoothness(img[None])["area"])


def _scipy_blob_counts(imgs: np.ndarray, threshold: float = 0.5) -> list[float]:
    """Blob counts with scipy.ndimage.label (4-connected), shared max, NaN never strong."""
    from scipy.ndimage import label

    vmax = np.nanmax(np.abs(imgs))
    counts = []
    for img in imgs:
        filled = np.nan_to_num(img, nan=0.0)
        counts.append(float(label(filled >= threshold * vmax)[1]
                            + label(filled <= -threshold * vmax)[1]))
    return counts


def test_blobs_of_an_empty_map_are_nan():
    img = np.zeros((20, 20))
    img[2:6, 2:6] = 1.0
    out = blobs(np.stack([img, np.full((20, 20), np.nan)]))
    assert out["count"][0] == 1 and np.isnan(out["count"][1]) and np.isnan(out["area"][1])


def test_quality_blob_means_skip_groups_empty_at_an_epoch():
    # a group with no sample at an epoch (all-NaN map) counted as 0 blobs of area 0,
    # while the smoothness scores skipped it
    from topoxr.interpolate import GridInterpolator
    from topoxr.testing.maps import make_laid_naps

    nap = make_laid_naps(n_neurons=30, n_labels=4, n_epochs=2, empty=(0, 1))
    q = quality(nap, k=3, resolution=30)
    interp = GridInterpolator(nap.x.values, nap.y.values, resolution=30)
    for e in range(2):
        imgs = interp(nap.isel(epoch=e).transpose("label", "neuron").values)
        present = [i for i in range(4) if np.isfinite(imgs[i]).any()]
        assert len(present) == (3 if e == 1 else 4)
        counts = _scipy_blob_counts(imgs)
        assert q.blob_count.values[e] == pytest.approx(np.mean([counts[i] for i in present]))
        assert np.isfinite(q.blob_area.values[e])
        assert q.blob_area.values[e] == pytest.approx(
            np.mean(blobs(imgs[present])["area"]))


# --------------------------------------------------------------------------------------
# Ties in the map: collapsed neurons
# --------------------------------------------------------------------------------------
def _midrank_continuity(X, E, k):
    """Continuity from full distance matrices, neuron by neuron: a profile neighbour's
    map rank is 1 + those strictly closer on the map + half those as close on the map
    but not as close in profile space (tied in both: indistinguishable, not counted)."""
    from scipy.spatial.distance import cdist

    n = len(X)
    DX, DE = cdist(X, X), cdist(E, E)
    np.fill_diagonal(DX, np.inf)
    np.fill_diagonal(DE, np.inf)
    pen = 0.0
    for i in range(n):
        # profile neighbours; any choice among profile ties gives the same penalty here
        for j in np.argsort(DX[i], kind="stable")[:k]:
            map_tied = DE[i] == DE[i, j]
            both = map_tied & (DX[i] == DX[i, j])
            rank = 1 + np.sum(DE[i] < DE[i, j]) + (map_tied.sum() - both.sum()) / 2
            pen += max(rank - k, 0)
    return 1.0 - 2.0 * pen / (n * k * (2.0 * n - 3.0 * k - 1.0))


def _four_spots(n):
    return np.repeat(np.array([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]]), n // 4,
                     axis=0)


@pytest.mark.parametrize("layout", ["one spot", "four spots", "dead on one spot"])
def test_continuity_ranks_neurons_tied_on_the_map_at_their_mid_rank(layout):
    # every neuron on one spot scored continuity 1.0 (tied map distances all ranked 1),
    # four spots 0.70; sklearn with the spaces swapped (ties by index) gives 0.514, 0.515
    rng = np.random.default_rng(0)
    n, k = 200, 10
    X = rng.normal(size=(n, 8))
    E = np.zeros((n, 2)) if layout == "one spot" else _four_spots(n)
    if layout == "dead on one spot":
        # 30 dead neurons (tied in profile space) on one spot with 20 live ones: ties
        # with the dead count among the live only
        X[:30] = 0.0
        E = rng.random((n, 2))
        E[:50] = 5.0
    c = continuity(X, E, k, n_queries=None)
    assert c == pytest.approx(_midrank_continuity(X, E, k), abs=1e-12)
    if layout != "dead on one spot":
        assert c == pytest.approx(sk_trustworthiness(E, X, n_neighbors=k), abs=0.01)
        assert c < 0.53  # no better than random: the profiles are unrelated to the spots
    # a layout that is the profiles themselves stays perfect, duplicates included
    dup = np.repeat(X[:50, :2], 4, axis=0)
    assert continuity(dup, dup, k, n_queries=None) == 1.0
    perm = rng.permutation(n)
    assert continuity(X[perm], E[perm], k, n_queries=None) == pytest.approx(c, abs=1e-12)
    if layout == "dead on one spot":
        return  # the choice among tied profile neighbours (dead) depends on order
    # without map ties the mid-rank is the rank: sklearn's value, exactly
    U = E + rng.normal(scale=0.3, size=E.shape)
    assert continuity(X, U, k, n_queries=None) == pytest.approx(
        _midrank_continuity(X, U, k), abs=1e-12)
    assert continuity(X, U, k, n_queries=None) == pytest.approx(
        sk_trustworthiness(U, X, n_neighbors=k), abs=1e-12)


@pytest.mark.parametrize("layout", ["one spot", "four spots"])
def test_trustworthiness_of_tied_map_neighbours_does_not_depend_on_neuron_order(layout):
    # profiles along a curve, neurons in curve order: the map neighbours sklearn picks
    # among collapsed neurons depend on that order (0.32 in this order, 0.49 shuffled,
    # for one spot). Now: the mean over the choices, i.e. over neuron orders
    rng = np.random.default_rng(0)
    n, k = 120, 5
    t = np.sort(rng.random(n)) * 6
    X = np.stack([np.cos(t), np.sin(t), t], axis=1) + rng.normal(scale=0.01, size=(n, 3))
    E = np.zeros((n, 2)) if layout == "one spot" else _four_spots(n)
    got = trustworthiness(X, E, k, n_queries=None)
    perm = rng.permutation(n)
    assert trustworthiness(X[perm], E[perm], k, n_queries=None) == pytest.approx(got,
                                                                               abs=1e-12)
    orders = [rng.permutation(n) for _ in range(200)]
    sk = np.array([sk_trustworthiness(X[o], E[o], n_neighbors=k) for o in orders])
    assert got == pytest.approx(sk.mean(), abs=4 * sk.std() / np.sqrt(len(sk)) + 1e-3)
    # the same rule on a query subset (all neurons but one)
    assert trustworthiness(X, E, k, n_queries=n - 1) == pytest.approx(got, abs=0.01)


# --------------------------------------------------------------------------------------
# quality(): epochs of the profiles, the layout and the maps
# --------------------------------------------------------------------------------------
def _laid_three_epochs(**kwargs):
    ds = make_activations(n_neurons=30, n_samples=60, n_epochs=3, random_state=0)
    return attach(ds, "pca", random_state=0, metric="euclidean", **kwargs)


def test_quality_scores_every_epoch_against_a_profile_without_epoch_shared_layout():
    # a profile without epoch dim: the map scores were pooled over all epochs (one
    # number, shared colour limits over epochs) while trust used the one profile
    from topoxr import naps
    from topoxr.interpolate import GridInterpolator
    from topoxr.similarity import profiles

    laid = _laid_three_epochs(share=2)
    assert laid.x.dims == ("neuron",)
    last = profiles(laid).isel(epoch=-1)
    q = quality(laid, profile=last, k=5, resolution=30)
    assert q.smoothness.dims == ("epoch",)
    np.testing.assert_array_equal(q.epoch.values, laid.epoch.values)
    pts = np.stack([laid.x.values, laid.y.values], axis=1)
    nap = naps(laid, by="label")
    interp = GridInterpolator(pts[:, 0], pts[:, 1], resolution=30)
    for e in range(3):
        imgs = interp(nap.isel(epoch=e).transpose("label", "neuron").values)
        assert q.smoothness.values[e] == pytest.approx(np.nanmean(smoothness(imgs)["score"]))
        assert q.blob_count.values[e] == pytest.approx(np.nanmean(blobs(imgs)["count"]))
        assert q.trustworthiness.values[e] == pytest.approx(
            sk_trustworthiness(last.values, pts, n_neighbors=5), abs=1e-12)


def test_quality_scores_every_epoch_of_a_per_epoch_layout_against_one_profile():
    # raised "embedding must be 2-D (n, d), got shape (30, 2, 3)"
    from topoxr.similarity import profiles

    laid = _laid_three_epochs()
    assert "epoch" in laid.x.dims
    last = profiles(laid).isel(epoch=-1)
    q = quality(laid, profile=last, k=5, resolution=30)
    np.testing.assert_array_equal(q.epoch.values, laid.epoch.values)
    for e in range(3):
        pts = np.stack([laid.x.isel(epoch=e).values, laid.y.isel(epoch=e).values], axis=1)
        assert q.trustworthiness.values[e] == pytest.approx(
            sk_trustworthiness(last.values, pts, n_neighbors=5), abs=1e-12)
        assert q.continuity.values[e] == pytest.approx(
            sk_trustworthiness(pts, last.values, n_neighbors=5), abs=1e-12)


def test_quality_refuses_inputs_that_lack_an_epoch_scored():
    from topoxr import naps

    laid = _laid_three_epochs()
    with pytest.raises(QualityError, match=r"the maps lack epoch\(s\) \[2\]"):
        quality(laid, maps=naps(laid, by="label").isel(epoch=[0, 1]), k=5, resolution=30)


# --------------------------------------------------------------------------------------
# Parameters refused by name
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [0, -1, 1, 2, 2.5, True, np.float64(100.0)])
def test_rank_correlation_refuses_n_pairs_that_is_not_an_integer_of_at_least_3(bad):
    # 0, -1 and 2.5 raised numpy errors, 1 gave NaN, 2 gave -1.0
    X, _ = _clustered(n=40)
    with pytest.raises(QualityError, match="n_pairs"):
        rank_correlation(X, X[:, :2], n_pairs=bad)
    laid = _laid_three_epochs(share=2)
    with pytest.raises(QualityError, match="n_pairs"):
        quality(laid, n_pairs=bad, k=5, resolution=30)
    # integers (numpy ones too) are taken: all 780 pairs, scipy's value
    from scipy.spatial.distance import pdist
    from scipy.stats import spearmanr

    E = X[:, :2] + np.random.default_rng(2).normal(size=(40, 2))
    assert rank_correlation(X, E, n_pairs=np.int64(780)) == pytest.approx(
        spearmanr(pdist(X), pdist(E)).statistic, abs=1e-12)
    assert np.isfinite(rank_correlation(X, E, n_pairs=3))


@pytest.mark.parametrize("bad", [2.5, True, np.float64(3.0)])
def test_k_must_be_an_integer(bad):
    # k=2.5 raised sklearn's InvalidParameterError, k=True ran as k=1
    from topoxr.metrics import knn_overlap

    X, _ = _clustered(n=40)
    for func in (neighborhood_preservation, trustworthiness, continuity, knn_overlap):
        with pytest.raises(QualityError, match="k must be an int"):
            func(X, X[:, :2], bad)
    with pytest.raises(QualityError, match="k must be an int"):
        quality(_laid_three_epochs(share=2), k=bad)
    E = X[:, :2] + np.random.default_rng(2).normal(size=(40, 2))
    assert trustworthiness(X, E, np.int64(3), n_queries=None) == pytest.approx(
        sk_trustworthiness(X, E, n_neighbors=3), abs=1e-12)


def _sine_map():
    return np.sin(np.mgrid[0:30, 0:30][1] / 5.0)


def test_map_scores_refuse_infinite_values_and_keep_nan_as_outside():
    # one inf pixel set the shared maximum to inf: blobs counted 0 instead of 2
    from topoxr.metrics import paper_smoothness

    img = _sine_map()
    bad = img.copy()
    bad[3, 4] = np.inf
    for func in (blobs, smoothness, paper_smoothness):
        with pytest.raises(QualityError, match=r"1 infinite value\(s\).*index \(0, 3, 4\)"):
            func(bad[None])
        with pytest.raises(QualityError, match="infinite"):
            func(-bad[None])
    holed = img.copy()
    holed[3, 4] = np.nan
    assert blobs(holed[None])["count"].tolist() == _scipy_blob_counts(holed[None])
    assert blobs(img[None])["count"].tolist() == [2.0]


@pytest.mark.parametrize("radii", [(-1, 2), (3, 1, 0.5), (1, np.nan), (1, 1), (2, np.inf),
                                   ("a", "b")])
def test_paper_smoothness_refuses_radii_without_a_growing_blur(radii):
    # negative, NaN and decreasing radii returned numbers
    from scipy.ndimage import gaussian_filter

    from topoxr.metrics import _bwr, paper_smoothness

    with pytest.raises(QualityError, match="radii"):
        paper_smoothness(_sine_map()[None], radii=radii)
    # increasing radii (from 0, no blur) are taken: the area of the blur curve
    img = _sine_map() * 0.8
    out = paper_smoothness(img[None], radii=(0, 1, 2.5))
    m = np.abs(img).max()
    rgb = _bwr((img + m) / (2 * m))
    curve = [np.abs(rgb - gaussian_filter(rgb, (r, r, 0), mode="nearest")).sum() / rgb.sum()
             for r in (0, 1, 2.5)]
    np.testing.assert_allclose(out["curve"][0], curve)
    assert out["area"][0] == pytest.approx(np.trapezoid(curve))
