"""Layout estimators: scikit-learn contract, quality thresholds, determinism, errors."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.manifold import trustworthiness
from sklearn.utils.estimator_checks import parametrize_with_checks

from tests.conftest import has_umap, requires_umap
from topoxr.layouts import (
    DEFAULT_METHOD,
    ForceLayout,
    GridSnap,
    KNNForceLayout,
    LayoutInputError,
    MDSLayout,
    PCALayout,
    RandomLayout,
    SOMLayout,
    SpringLayout,
    TSNELayout,
    UMAPLayout,
    available_methods,
    distance_matrix,
    get_estimator,
    register,
    snap_to_grid,
    to_unit_square,
)
from topoxr.layouts.grid import grid_shape
from topoxr.similarity import pairwise_distances
from topoxr.testing.profiles import clustered_profiles

HAS_UMAP = has_umap  # found, not imported: umap-learn is imported when a UMAP is fitted

# small, fast configurations of every estimator for the scikit-learn checks
SMALL = [
    RandomLayout(random_state=0),
    PCALayout(),
    MDSLayout(max_iter=10, random_state=0),
    TSNELayout(max_iter=250, random_state=0),
    SOMLayout(n_epochs=1, random_state=0),
    SpringLayout(iterations=5, random_state=0),
    ForceLayout(n_steps=5, random_state=0, progress=False),
    ForceLayout(init="pca", n_steps=5, random_state=0, progress=False),
    KNNForceLayout(n_epochs=5, random_state=0),
    KNNForceLayout(n_epochs=5, grid=False, random_state=0),
    GridSnap(init="pca"),
]
if HAS_UMAP:
    SMALL.append(UMAPLayout(n_epochs=5, random_state=0))


def _listed(mark: pytest.MarkDecorator) -> pytest.MarkDecorator:
    """``mark`` with its cases in a list: scikit-learn 1.8 (the floor) passes a generator
    to ``pytest.mark.parametrize``, which pytest 9 deprecates and pytest 10 refuses."""
    names, cases = mark.args
    return pytest.mark.parametrize(names, list(cases), **mark.kwargs)


@_listed(parametrize_with_checks(SMALL))
def test_sklearn_compatible(estimator, check):
    check(estimator)


@pytest.fixture(scope="module")
def clusters():
    return clustered_profiles(300, n_features=10, n_clusters=8, random_state=1)


def _trust(X, Y):
    return trustworthiness(X, Y, n_neighbors=10, metric="cosine")


@pytest.mark.parametrize(
    ("method", "params", "minimum"),
    [
        ("pca", {}, 0.85),
        ("tsne", {"max_iter": 500}, 0.9),
        pytest.param("umap", {}, 0.9, marks=requires_umap),
        ("som", {}, 0.8),
        ("graph", {}, 0.75),
        ("force", {"n_steps": 300, "progress": False}, 0.68),
        ("knnforce", {}, 0.88),
        ("knnforce", {"grid": False}, 0.9),
        ("pca+grid", {}, 0.8),
        ("pca+force", {"n_steps": 300, "progress": False}, 0.8),
    ],
)
def test_trustworthiness_beats_random(clusters, method, params, minimum):
    Y = get_estimator(method, random_state=0, **params).fit_transform(clusters)
    random = _trust(clusters, RandomLayout(random_state=0).fit_transform(clusters))
    assert random < 0.65
    assert _trust(clusters, Y) >= minimum


@pytest.mark.parametrize("method", ["random", "pca", "som", "graph", "knnforce"])
def test_same_seed_same_layout(clusters, method):
    a = get_estimator(method, random_state=3).fit_transform(clusters)
    b = get_estimator(method, random_state=3).fit_transform(clusters)
    np.testing.assert_array_equal(a, b)
    if method != "pca":
        c = get_estimator(method, random_state=4).fit_transform(clusters)
        assert not np.array_equal(a, c)


def test_to_unit_square_keeps_aspect_ratio():
    rng = np.random.default_rng(0)
    pts = rng.uniform(size=(50, 2)) * [8.0, 2.0] + [-3.0, 7.0]
    out = to_unit_square(pts)
    assert out.min() >= 0 and out.max() <= 1
    span = np.ptp(out, axis=0)
    assert span[0] == pytest.approx(1.0)
    assert span[1] / span[0] == pytest.approx(np.ptp(pts[:, 1]) / np.ptp(pts[:, 0]))
    assert out[:, 1].min() == pytest.approx(1 - out[:, 1].max())  # shorter side centred
    # distance ratios survive
    d_in = np.linalg.norm(pts[0] - pts[1]) / np.linalg.norm(pts[2] - pts[3])
    d_out = np.linalg.norm(out[0] - out[1]) / np.linalg.norm(out[2] - out[3])
    assert d_out == pytest.approx(d_in)


def test_to_unit_square_of_spans_beyond_the_float_range():
    """Finite coordinates whose span overflows (1e308 - (-1e308)) still map into the unit
    square, as the same points scaled down by a power of two do."""
    pts = np.array([[1e308, 0.0], [-1e308, 0.0], [0.0, 1.0], [-1.7e308, 1.2e308]])
    out = to_unit_square(pts)
    assert np.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
    np.testing.assert_array_equal(out, to_unit_square(pts / 2.0**1000))
    # x spans 2.7e308 (the longer side), y spans 1.2e308 and is centred
    want = np.array([[2.7, 0.75], [0.7, 0.75], [1.7, 0.75], [0.0, 1.95]]) / 2.7
    np.testing.assert_allclose(out, want, atol=1e-12)


@pytest.mark.parametrize("method", ["random", "pca", "knnforce", "som"])
def test_output_fills_unit_square(clusters, method):
    Y = get_estimator(method, random_state=0).fit_transform(clusters)
    assert Y.shape == (clusters.shape[0], 2)
    assert Y.min() >= 0.0 and Y.max() <= 1.0
    assert np.ptp(Y, axis=0).max() == pytest.approx(1.0)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_profiles_rejected(clusters, bad):
    X = clusters[:20].copy()
    X[3, 2] = bad
    with pytest.raises(LayoutInputError, match="NaN|infinity"):
        KNNForceLayout().fit(X)


@pytest.mark.parametrize("n", [1, 4])
def test_too_few_neurons(n):
    with pytest.raises(ValueError, match=r"at least 5 neurons.*n_samples=" + str(n)):
        PCALayout().fit(np.ones((n, 3)))


def test_unknown_method_lists_registered():
    with pytest.raises(ValueError, match="unknown layout method 'nope'") as err:
        get_estimator("nope")
    for name in ("random", "pca", "tsne", "umap", "som", "graph", "force", DEFAULT_METHOD):
        assert name in str(err.value)
    with pytest.raises(ValueError, match="unknown layout method"):
        get_estimator("pca+nope")
    with pytest.raises(ValueError, match="unknown layout method"):
        get_estimator("nope+force")


def test_unknown_metric():
    with pytest.raises(ValueError, match="unknown metric 'manhattan'"):
        PCALayout(metric="manhattan").fit(np.eye(6))


def test_registry_compositions():
    est = get_estimator("umap+force", random_state=7, n_steps=10)
    assert isinstance(est, ForceLayout)
    assert isinstance(est.init, UMAPLayout)
    assert est.init.random_state == 7 and est.random_state == 7 and est.n_steps == 10
    grid = get_estimator("knnforce+grid", metric="euclidean")
    assert isinstance(grid, GridSnap) and grid.init.metric == "euclidean"
    assert isinstance(get_estimator(), type(get_estimator(DEFAULT_METHOD)))
    for name in ("pca+force", "graph+force", "som+force", "umap+force", DEFAULT_METHOD):
        assert name in available_methods()
    given = PCALayout()
    assert get_estimator(given) is given
    with pytest.raises(TypeError, match="fit_transform"):
        get_estimator(42)


def test_register_a_new_method(clusters):
    class Diagonal(RandomLayout):
        def _embed(self, X, rng):
            t = np.arange(X.shape[0], dtype=float)
            return np.stack([t, t], axis=1)

    register("diagonal_test", Diagonal)
    Y = get_estimator("diagonal_test+grid").fit_transform(clusters)
    assert len({tuple(p) for p in Y}) == clusters.shape[0]
    with pytest.raises(ValueError, match="without '\\+'"):
        register("a+b", Diagonal)


def test_zero_profiles_are_reported_and_placed(clusters):
    X = clusters[:60].copy()
    X[:7] = 0.0  # dead neurons
    for method in ("pca", "knnforce", "som", "graph", "tsne"):
        est = get_estimator(method, random_state=0)
        Y = est.fit_transform(X)
        assert est.n_zero_profiles_ == 7
        assert np.isfinite(Y).all() and Y.min() >= 0 and Y.max() <= 1


def test_zero_profiles_are_orthogonal_to_live_ones_and_together():
    """The convention of ``topoxr.similarity.pairwise_distances``: a zero profile is at
    1 from every live one and at 0 from another zero profile."""
    X = np.array([[1.0, 0.0], [0.0, 0.0], [0.0, 0.0], [2.0, 0.0], [0.0, 3.0]])
    D = distance_matrix(X, "cosine")
    np.testing.assert_allclose(D[1], [1.0, 0.0, 0.0, 1.0, 1.0], atol=1e-12)
    np.testing.assert_allclose(D[0, 3], 0.0, atol=1e-12)
    np.testing.assert_allclose(D, pairwise_distances(X, "cosine")[0], atol=1e-12)


@pytest.mark.parametrize("metric", ["cosine", "correlation"])
def test_knnforce_neighbour_graph_keeps_the_distances_of_dead_neurons(metric):
    """The attraction graph's neighbours are the nearest under the library's distances
    (``distance_matrix``: a dead neuron is at 1 from every live one, 0 from other dead
    ones): a Euclidean search on zeroed features had put dead neurons at 0.5 from every
    live one, nearer than most live neighbours. Profiles with negative values, so that
    some live neurons are farther than 1 apart and dead ones belong among their
    neighbours."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(40, 5))
    dead = [3, 11, 12, 25, 30, 39]
    X[dead] = 0.0 if metric == "cosine" else 2.5  # constant rows under correlation
    k = 15
    est = KNNForceLayout(n_neighbors=k, metric=metric, n_epochs=5, swap_rounds=0, nudge=0,
                         random_state=0).fit(X)
    idx, dist = est.graph_
    D = distance_matrix(X, metric)
    assert idx.shape == dist.shape == (40, k)
    for i in range(40):
        assert i not in idx[i] and len(set(idx[i])) == k
        np.testing.assert_allclose(dist[i], D[i, idx[i]], atol=1e-9)
        np.testing.assert_allclose(dist[i], np.sort(np.delete(D[i], i))[:k], atol=1e-9)
    # a dead neuron's nearest neighbours are the other dead ones, at 0
    for i in dead:
        assert set(idx[i][:len(dead) - 1]) == set(dead) - {i}
        np.testing.assert_allclose(dist[i][:len(dead) - 1], 0.0, atol=1e-12)
    # dead neurons are among live neurons' neighbours only where those are farther
    live = np.setdiff1d(np.arange(40), dead)
    took_dead = np.isin(idx[live], dead)
    assert took_dead.any()
    np.testing.assert_allclose(dist[live][took_dead], 1.0, atol=1e-12)


def test_knnforce_graph_of_profiles_all_dead_or_all_but_one():
    for n_live in (0, 1):
        X = np.zeros((8, 3))
        X[:n_live] = 1.0
        idx, dist = KNNForceLayout(n_neighbors=5, n_epochs=5, random_state=0).fit(X).graph_
        np.testing.assert_allclose(dist[n_live:], 0.0, atol=1e-12)  # dead among dead
        np.testing.assert_allclose(dist[:n_live], 1.0, atol=1e-12)  # the live one
        assert all(i not in row and len(set(row)) == 5 for i, row in enumerate(idx))


#: Methods that once crashed the Python process (SIGSEGV in scikit-learn's Barnes-Hut
#: t-SNE, from a NaN PCA start) on identical profiles: fitted in a child process, so
#: that a crash fails the test instead of ending the test run.
_CRASHED = ("tsne",)

_IDENTICAL = {
    "identical": np.tile([1.0, 2.0, 3.0], (12, 1)),
    "all dead": np.zeros((12, 3)),
}


def _fit_in_child(method: str, X: np.ndarray) -> np.ndarray:
    import json
    import subprocess
    import sys

    code = ("import json, sys, numpy as np\n"
            "from topoxr.layouts import get_estimator\n"
            "X = np.array(json.loads(sys.argv[2]))\n"
            "Y = get_estimator(sys.argv[1], random_state=0).fit_transform(X)\n"
            "print(json.dumps(Y.tolist()))\n")
    out = subprocess.run([sys.executable, "-c", code, method, json.dumps(X.tolist())],
                         capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, (f"{method!r} ended the process with return code "
                                 f"{out.returncode}: {out.stderr[-2000:]}")
    return np.array(json.loads(out.stdout.splitlines()[-1]))


@pytest.mark.parametrize("profiles", sorted(_IDENTICAL))
@pytest.mark.parametrize("method", [
    pytest.param(m, marks=requires_umap) if "umap" in m else m for m in available_methods()])
def test_identical_profiles_give_finite_layout(method, profiles):
    """Every registered method (and the paper's refinements) gives a layout of finite
    coordinates in the unit square when every profile is the same; the methods that
    give each neuron a spot of its own (docs/user-guide/layouts.md) do so here too."""
    X = _IDENTICAL[profiles]
    if any(part in _CRASHED for part in method.split("+")):
        Y = _fit_in_child(method, X)
    else:
        Y = get_estimator(method, random_state=0).fit_transform(X)
    assert Y.shape == (12, 2)
    assert np.isfinite(Y).all() and Y.min() >= 0 and Y.max() <= 1
    if method.split("+")[-1] in ("random", "som", "graph", "force", "knnforce", "grid"):
        assert len(np.unique(Y, axis=0)) == 12, Y  # a spot of its own for every neuron


def test_tsne_of_a_layer_of_dead_neurons_does_not_crash():
    """The audit's case: topoxr.layout of a layer whose every neuron is dead."""
    import subprocess
    import sys

    code = ("import numpy as np, topoxr\n"
            "from topoxr.testing import make_activations\n"
            "ds = make_activations(n_neurons=10, n_dead=10)\n"
            "for method in ('tsne', 'tsne+force'):\n"
            "    out = topoxr.layout(ds, method, random_state=0)\n"
            "    assert np.isfinite(out.x.values).all() and np.isfinite(out.y.values).all()\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, check=False)
    assert out.returncode == 0 and out.stdout.split()[-1:] == ["ok"], (
        f"return code {out.returncode}: {out.stderr[-2000:]}")


def test_tsne_starts_from_scikit_learns_pca_start_where_it_is_defined(clusters):
    """The PCA start topoxr computes (to check it) is scikit-learn's own: the layout is
    the one of ``TSNE(init="pca")`` on the same unit-length profiles (60 neurons:
    perplexity lowered to 59 / 3)."""
    from sklearn.manifold import TSNE

    from topoxr.layouts._base import features_for_metric

    X = clusters[:60]
    got = TSNELayout(max_iter=300, random_state=0).fit_transform(X)
    want = TSNE(perplexity=59 / 3, max_iter=300, init="pca", metric="euclidean",
                random_state=np.random.RandomState(0)).fit_transform(
        features_for_metric(X, "cosine"))
    np.testing.assert_array_equal(got, to_unit_square(want))


def test_tsne_refuses_fewer_steps_than_scikit_learn_runs():
    """max_iter below scikit-learn's minimum (250) was silently raised to 250."""
    X = np.random.default_rng(0).normal(size=(30, 6))
    with pytest.raises(LayoutInputError, match="at least 250"):
        TSNELayout(max_iter=249, random_state=0).fit(X)
    assert np.isfinite(TSNELayout(max_iter=250, random_state=0).fit_transform(X)).all()


def test_knnforce_refuses_zero_epochs():
    """n_epochs=0 silently ran the default 500 epochs."""
    X = np.random.default_rng(0).normal(size=(30, 6))
    for bad in (0, -3):
        with pytest.raises(LayoutInputError, match="n_epochs must be >= 1"):
            KNNForceLayout(n_epochs=bad, random_state=0).fit(X)
    one = KNNForceLayout(n_epochs=1, grid=False, spreading=0, random_state=0).fit_transform(X)
    assert not np.array_equal(
        one, KNNForceLayout(grid=False, spreading=0, random_state=0).fit_transform(X))


@pytest.mark.parametrize("dead", [1, 3])
def test_force_keeps_a_relu_layer_with_dead_neurons_spread(dead):
    """With non-negative profiles, a dead neuron (cosine distance 1 from every live one
    by convention) sat at d_max, where the global term repels in proportion to the
    layout distance: it flew off (1e20) and the live neurons, scaled into the unit
    square, all landed on one point."""
    X = np.random.default_rng(0).random((30, 8))  # a ReLU layer's profiles
    X[-dead:] = 0
    for seed in range(3):
        xy = ForceLayout(random_state=seed).fit_transform(X)
        live = xy[:-dead]
        assert len(np.unique(np.round(live, 6), axis=0)) == len(live)
        assert np.ptp(live, axis=0).min() > 0.3  # spread over the square, not a point


def test_force_refuses_a_layout_that_diverges():
    """A neuron pushed off without bound is refused, not scaled into a collapsed map:
    here a ReLU neuron that fires on one sample of raw activation profiles, nearly d_max
    from every other (the others ended within 0.04 of each other, without an error)."""
    rng = np.random.default_rng(0)
    X = np.maximum(rng.normal(size=(30, 100)), 0)
    X[0] = 0
    X[0, 5] = 0.3
    with pytest.raises(FloatingPointError, match="diverged"):
        ForceLayout(random_state=0).fit(X)
    with pytest.raises(FloatingPointError, match="diverged"):
        ForceLayout(global_repulsion=50.0, random_state=0).fit(rng.random((30, 8)))


def test_layout_parameters_without_meaning_are_refused():
    """UMAP ran n_neighbors=0 as 2; SOM's sigma=0 divided by zero (16 of 36 cells NaN,
    every neuron on one circle)."""
    X = np.random.default_rng(0).random((30, 6))
    if has_umap:
        for bad in (0, 1, -3):
            with pytest.raises(LayoutInputError, match="n_neighbors must be >= 2"):
                UMAPLayout(n_neighbors=bad, random_state=0).fit(X)
    for name in ("sigma", "learning_rate"):
        for bad in (0, -1.0):
            with pytest.raises(LayoutInputError, match=f"{name} must be > 0"):
                SOMLayout(**{name: bad}, random_state=0).fit(X)


@pytest.mark.parametrize("make, name, bad", [
    (ForceLayout, "n_steps", 2.5),  # ran int(2.5) = 2 steps
    (ForceLayout, "n_steps", True),
    (ForceLayout, "local_scale", 0.0),
    (ForceLayout, "global_scale", -2.0),
    (ForceLayout, "min_distance", float("nan")),
    (ForceLayout, "local_repulsion", -15.0),
    (ForceLayout, "global_attraction", float("inf")),
    (KNNForceLayout, "learning_rate", -1.0),  # ran, moving neighbours apart
    (KNNForceLayout, "learning_rate", 0.0),
    (KNNForceLayout, "negative_sample_rate", -5),
    (KNNForceLayout, "min_dist", 2.0),
    (KNNForceLayout, "min_dist", -0.1),
    (KNNForceLayout, "n_epochs", 2.5),
    (KNNForceLayout, "n_neighbors", 7.5),
    (KNNForceLayout, "swap_rounds", -1),
    (KNNForceLayout, "grid_neighbors", 2.5),
    (KNNForceLayout, "nudge", -1.0),
    (KNNForceLayout, "spreading", float("nan")),
    (SOMLayout, "n_epochs", 0.5),
    (SOMLayout, "collision_radius", -0.2),
])
def test_numeric_parameters_out_of_range_are_refused_by_name(make, name, bad):
    """A parameter outside its meaning ran silently (a fractional step count rounded
    down, a negative learning rate reversing every move)."""
    X = np.random.default_rng(0).random((30, 6))
    with pytest.raises(LayoutInputError, match=rf"^{name} must be .*got {bad!r}$"):
        make(**{name: bad}, random_state=0).fit(X)


def test_numpy_numbers_are_taken_as_parameters():
    X = np.random.default_rng(0).random((30, 6))
    knn = KNNForceLayout(n_neighbors=np.int64(5), n_epochs=np.int32(20), min_dist=np.float32(0.1),
                         random_state=0).fit_transform(X)
    plain = KNNForceLayout(n_neighbors=5, n_epochs=20, min_dist=0.1,
                           random_state=0).fit_transform(X)
    np.testing.assert_allclose(knn, plain, atol=1e-6)
    assert ForceLayout(n_steps=np.int64(5), random_state=0).fit_transform(X).shape == (30, 2)


def test_an_estimator_with_a_random_state_object_lays_out_the_same_each_call():
    """attach copied the estimator but handed it the caller's RandomState, which then
    advanced: the same call gave another layout (difference 1.0)."""
    from topoxr.layouts import attach
    from topoxr.testing import make_activations

    ds = make_activations(n_neurons=20, n_samples=40, n_epochs=1, n_labels=4)
    state = np.random.RandomState(0)
    est = KNNForceLayout(random_state=state)
    before = state.get_state()[1].copy()
    first, second = attach(ds, est), attach(ds, est)
    np.testing.assert_array_equal(first.x.values, second.x.values)
    np.testing.assert_array_equal(state.get_state()[1], before)  # the caller's untouched


def test_init_estimator_keeps_its_own_metric():
    """An init estimator's own metric is kept (it was replaced by the refinement's); a
    default one takes the refinement's; 'precomputed' on one side only is refused."""
    X = np.random.default_rng(0).normal(size=(30, 6)) + 2.0
    euclidean = PCALayout(metric="euclidean").fit_transform(X)
    cosine = PCALayout(metric="cosine").fit_transform(X)
    assert not np.allclose(euclidean, cosine)
    for refine in (ForceLayout(init=PCALayout(metric="euclidean"), n_steps=1),
                   GridSnap(init=PCALayout(metric="euclidean")),
                   ForceLayout(init=PCALayout(), n_steps=1, metric="euclidean")):
        np.testing.assert_array_equal(refine.fit(X).init_embedding_, euclidean)
    np.testing.assert_array_equal(
        ForceLayout(init=PCALayout(), n_steps=1).fit(X).init_embedding_, cosine)
    D = distance_matrix(X, "euclidean")
    with pytest.raises(LayoutInputError, match="precomputed"):
        ForceLayout(init=PCALayout(metric="euclidean"), n_steps=1,
                    metric="precomputed").fit(D)
    start = ForceLayout(init=PCALayout(metric="precomputed"), n_steps=1,
                        metric="precomputed").fit(D).init_embedding_
    np.testing.assert_array_equal(start, PCALayout(metric="precomputed").fit_transform(D))


def test_graph_joins_identical_profiles_and_keeps_the_live_neurons_edges():
    """12 dead neurons of 40: 66 of 780 pairs (8.5 %) are at distance 0, the paper's
    threshold (7.5th percentile) is 0 and no pair is below it. The graph must still join
    the live neurons below the percentile of the other distances, computed here
    independently (scipy's cosine distances, the dead-neuron convention by hand)."""
    import networkx as nx
    from scipy.spatial.distance import cdist

    from topoxr import profiles
    from topoxr.testing import make_activations

    ds = make_activations(n_neurons=40, n_dead=12, n_epochs=1, n_samples=200)
    P = profiles(ds).isel(epoch=0).values
    live = np.arange(28)
    assert not P[28:].any() and np.linalg.norm(P[live], axis=1).min() > 0
    D = np.ones((40, 40))
    D[np.ix_(live, live)] = cdist(P[live], P[live], "cosine")
    D[28:, 28:] = 0.0
    np.fill_diagonal(D, 0.0)
    iu = np.triu_indices(40, 1)
    pairs = D[iu]
    threshold = np.percentile(pairs[pairs > 1e-12], 7.5)
    want = {(int(i), int(j)) for i, j, d in zip(*iu, pairs, strict=True)
            if d < threshold or d <= 1e-12}
    graph = SpringLayout(random_state=0).fit(P).graph_
    got = {tuple(sorted(e)) for e in graph.edges()}
    assert want <= got
    expected = nx.Graph(list(want))
    expected.add_nodes_from(range(40))
    # the only other edges join the components, one per component but the largest
    assert len(got - want) == nx.number_connected_components(expected) - 1
    assert nx.is_connected(graph)
    assert {e for e in want if e[0] < 28 and e[1] < 28}  # live neurons keep their edges
    assert max(d for _, d in graph.degree()) < 39  # no star around one neuron
    # live neurons that prefer the same label are joined far more often than by chance
    pref = ds.preferred.values
    same = [pref[i] == pref[j] for i, j in got if i < 28 and j < 28]
    assert np.mean(same) > 0.8


def test_graph_threshold_is_the_papers_without_zero_distances(clusters):
    from topoxr.layouts.graph import threshold_graph

    D = distance_matrix(clusters[:80], "cosine")
    iu = np.triu_indices(80, 1)
    adj = D < np.percentile(D[iu], 7.5)
    np.fill_diagonal(adj, False)
    edges = {tuple(sorted(e)) for e in threshold_graph(D).edges()}
    assert {(int(i), int(j)) for i, j in zip(*np.nonzero(np.triu(adj, 1)), strict=True)} <= edges


def test_precomputed_distances(clusters):
    D = distance_matrix(clusters, "cosine")
    for est in (KNNForceLayout(metric="precomputed", random_state=0),
                PCALayout(metric="precomputed"),
                SpringLayout(metric="precomputed", random_state=0)):
        Y = est.fit_transform(D)
        assert _trust(clusters, Y) > 0.75
    with pytest.raises(ValueError, match="square"):
        PCALayout(metric="precomputed").fit(clusters)
    with pytest.raises(ValueError, match="symmetric"):
        PCALayout(metric="precomputed").fit(D + np.triu(np.ones_like(D)))
    with pytest.raises(ValueError, match="non-negative"):
        PCALayout(metric="precomputed").fit(D - 1.0)


def test_force_refines_given_positions(clusters):
    start = PCALayout().fit_transform(clusters)
    est = ForceLayout(init=start, n_steps=100, progress=False, random_state=0).fit(clusters)
    np.testing.assert_array_equal(est.init_embedding_, start)
    # the local pass spreads points: the closest pair gets farther apart (relative to size)
    def closest(Y):
        d = np.linalg.norm(Y[:, None] - Y[None], axis=-1)
        np.fill_diagonal(d, np.inf)
        return d.min()

    assert closest(est.embedding_) > closest(start)


def test_som_spreads_shared_cells():
    X = np.repeat(clustered_profiles(10, random_state=2), 4, axis=0)  # 4 copies each
    Y = SOMLayout(random_state=0).fit_transform(X)
    assert len({tuple(np.round(p, 9)) for p in Y}) == X.shape[0]


def test_graph_is_connected(clusters):
    import networkx as nx

    est = SpringLayout(random_state=0).fit(clusters)
    assert nx.is_connected(est.graph_)
    n = clusters.shape[0]
    # about 7.5% of the pairs are edges, plus the joins
    assert 0.05 * n * (n - 1) / 2 < est.graph_.number_of_edges() < 0.1 * n * (n - 1) / 2


@pytest.mark.parametrize("method", ["exact", "split"])
def test_grid_snap_one_neuron_per_cell(method, monkeypatch):
    rng = np.random.default_rng(0)
    pts = rng.normal(size=(700, 2)) * [3.0, 1.0]
    if method == "split":
        monkeypatch.setattr("topoxr.layouts.grid._EXACT_BLOCK", 64)
    out = snap_to_grid(pts, method=method)
    rows, cols = grid_shape(700, np.ptp(pts[:, 0]) / np.ptp(pts[:, 1]))
    assert rows * cols >= 700 and cols > rows
    keys = {tuple(np.round(p * max(rows, cols) - 0.5).astype(int)) for p in out}
    assert len(keys) == 700
    # order is kept: snapped x correlates strongly with the original x
    assert np.corrcoef(out[:, 0], pts[:, 0])[0, 1] > 0.95


@pytest.mark.slow
@requires_umap
def test_umap_layout_does_not_import_tensorflow():
    """umap-learn's ``import umap`` loads TensorFlow (ParametricUMAP) when it is installed;
    UMAPLayout imports umap without that path, and it stays importable on request."""
    import subprocess
    import sys

    code = ("import sys, numpy as np\n"
            "from topoxr.layouts import UMAPLayout\n"
            "UMAPLayout(random_state=0, n_epochs=5).fit(np.random.default_rng(0).random((40, 4)))\n"
            "print('tensorflow' in sys.modules, 'umap.parametric_umap' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=300)
    assert out.stdout.split()[-2:] == ["False", "False"], out.stdout + out.stderr[-2000:]
