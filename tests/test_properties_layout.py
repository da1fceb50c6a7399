"""Property-based tests of the layout estimators (hypothesis).

Permutation equivariance (relabelling the neurons relabels the layout) holds exactly for
the deterministic PCA layout and for the grid snap of a given layout. The other methods
draw random numbers per neuron index (random starts, negative samples, SOM sample order,
spring-layout starts), so with the same seed a permuted input gives a different, equally
valid layout: for them only the quality is checked to be similar.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from topoxr.layouts import PCALayout, get_estimator, snap_to_grid, to_unit_square
from topoxr.testing.profiles import clustered_profiles

FAST = {
    "random": {},
    "pca": {},
    "som": {"n_epochs": 2},
    "graph": {"iterations": 10},
    "force": {"n_steps": 15, "progress": False},
    "knnforce": {"n_epochs": 30},
    "knnforce+grid": {},
}

settings.register_profile("layout", max_examples=15, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])


@st.composite
def profile_matrices(draw):
    """Finite profiles, 5-25 neurons, with duplicated, constant and all-zero rows mixed in."""
    n = draw(st.integers(5, 25))
    d = draw(st.integers(1, 6))
    X = draw(arrays(np.float64, (n, d),
                    elements=st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False)))
    kind = draw(st.sampled_from(["plain", "duplicates", "constant", "zeros"]))
    if kind == "duplicates":
        X[n // 2:] = X[: n - n // 2]
    elif kind == "constant":
        X[: n // 2] = draw(st.floats(-5, 5, allow_nan=False))
    elif kind == "zeros":
        X[: max(1, n // 3)] = 0.0
    return X


@settings(settings.get_profile("layout"))
@given(X=profile_matrices(), method=st.sampled_from(sorted(FAST)),
       metric=st.sampled_from(["cosine", "euclidean", "correlation"]))
def test_finite_coordinates_in_unit_square(X, method, metric):
    params = dict(FAST[method])
    if method == "knnforce+grid":
        params = {}
    est = get_estimator(method, metric=metric, random_state=0, **params)
    if method == "knnforce+grid":
        est.init.set_params(n_epochs=30)
    Y = est.fit_transform(X)
    assert Y.shape == (X.shape[0], 2)
    assert np.isfinite(Y).all()
    assert Y.min() >= 0.0 and Y.max() <= 1.0


@settings(settings.get_profile("layout"))
@given(coords=arrays(np.float64, st.tuples(st.integers(1, 20), st.just(2)),
                     elements=st.floats(allow_nan=False, allow_infinity=False)),
       shift=st.integers(-60, 60))
@example(coords=np.array([[1e308, 0.0], [-1e308, 0.0], [0.0, 1.0]]), shift=-1)
def test_to_unit_square_of_any_finite_coordinates(coords, shift):
    """Finite coordinates of any size, up to the largest floats (whose span overflows),
    give coordinates in the unit square that do not change when the input is scaled by a
    power of two (where that scaling is exact)."""
    out = to_unit_square(coords)
    assert np.isfinite(out).all() and out.min() >= 0.0 and out.max() <= 1.0
    with np.errstate(over="ignore", under="ignore"):
        scaled = np.ldexp(coords, shift)
        exact = np.isfinite(scaled).all() and np.array_equal(np.ldexp(scaled, -shift), coords)
    if exact:
        np.testing.assert_array_equal(to_unit_square(scaled), out)


@settings(settings.get_profile("layout"))
@given(seed=st.integers(0, 2**16), n=st.integers(5, 60))
def test_pca_is_permutation_equivariant(seed, n):
    X = clustered_profiles(n, 6, random_state=seed)
    perm = np.random.default_rng(seed).permutation(n)
    Y = PCALayout().fit_transform(X)
    Yp = PCALayout().fit_transform(X[perm])
    np.testing.assert_allclose(Yp, Y[perm], atol=1e-8)


@settings(settings.get_profile("layout"))
@given(seed=st.integers(0, 2**16), n=st.integers(5, 200))
def test_grid_snap_is_permutation_equivariant(seed, n):
    rng = np.random.default_rng(seed)
    pts = rng.normal(size=(n, 2))
    perm = rng.permutation(n)
    np.testing.assert_allclose(snap_to_grid(pts[perm]), snap_to_grid(pts)[perm])


@pytest.mark.parametrize("method", ["knnforce", "som", "graph"])
def test_permuted_input_gives_equally_good_layout(method):
    from sklearn.manifold import trustworthiness

    X = clustered_profiles(200, 8, n_clusters=6, random_state=5)
    perm = np.random.default_rng(0).permutation(200)
    t = [trustworthiness(Z, get_estimator(method, random_state=0).fit_transform(Z),
                         n_neighbors=10, metric="cosine") for Z in (X, X[perm])]
    assert abs(t[0] - t[1]) < 0.05
