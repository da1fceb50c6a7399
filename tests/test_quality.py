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
