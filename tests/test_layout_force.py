"""The paper's force layout from a random start behaves as its reference (Krug et al.)."""

from __future__ import annotations

import numpy as np
import pytest

from topoxr.layouts import ForceLayout, RandomLayout
from topoxr.layouts.grid import grid_shape, refine_grid, snap_to_grid
from topoxr.metrics import trustworthiness
from topoxr.testing.profiles import clustered_profiles


@pytest.fixture(scope="module")
def clusters():
    return clustered_profiles(150, 10, random_state=3)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_force_from_random_start_keeps_neighbourhoods(clusters, seed):
    """From uniform random positions the reference reaches ~0.8 on NAP-like profiles
    (0.5 is random); a float32 or otherwise unfaithful swarm stays near random."""
    Y = ForceLayout(random_state=seed).fit_transform(clusters)
    rand = RandomLayout(random_state=seed).fit_transform(clusters)
    t = trustworthiness(clusters, Y, 10, metric="cosine")
    t_rand = trustworthiness(clusters, rand, 10, metric="cosine")
    assert t_rand < 0.6
    assert t > 0.75, t


def test_force_swarm_contracts_then_reexpands(clusters):
    """The global term first pulls the swarm together; the local term spreads it out
    again from the positions' tiny differences. Both phases must survive."""
    est = ForceLayout(random_state=0, n_steps=1000, metric="cosine")
    X = est._validate(clusters)
    raw = est._embed(X, np.random.RandomState(0))
    span = np.ptp(raw, axis=0)
    assert (span > 1.0).all(), span  # re-expanded well beyond the unit start square
    d = np.linalg.norm(raw[:, None] - raw[None], axis=-1)[np.triu_indices(len(raw), 1)]
    assert np.quantile(d, 0.01) > 1e-3 * span.max()  # not collapsed onto a few spots


def test_refine_grid_keeps_one_neuron_per_cell_and_raises_similarity():
    rng = np.random.default_rng(0)
    X = clustered_profiles(300, 8, random_state=0)
    F = X / np.linalg.norm(X, axis=1, keepdims=True)
    _, cells, shape = snap_to_grid(rng.uniform(size=(300, 2)), return_cells=True)
    assert shape == grid_shape(300, shape[1] / shape[0])

    def neighbour_similarity(cell_of):
        rows, cols = shape
        occ = np.full(rows * cols, -1)
        occ[cell_of] = np.arange(300)
        r, c = np.divmod(cell_of, cols)
        total = 0.0
        for dr, dc in ((0, 1), (1, 0)):
            ok = (r + dr < rows) & (c + dc < cols)
            j = occ[((r + dr) * cols + c + dc)[ok]]
            i = np.arange(300)[ok][j >= 0]
            total += float(np.einsum("if,if->", F[i], F[j[j >= 0]]))
        return total

    coords, refined = refine_grid(cells, shape, F, n_rounds=100, random_state=0)
    assert np.unique(refined).size == 300
    assert neighbour_similarity(refined) > neighbour_similarity(cells) + 10
    assert trustworthiness(X, coords, 10, metric="cosine") > trustworthiness(
        X, rng.uniform(size=(300, 2)), 10, metric="cosine") + 0.2
    # the nudge stays inside each neuron's cell: nearest cell centre is its own
    centres, _ = refine_grid(refined, shape, F, n_rounds=0, nudge=0.0)
    nearest = np.argmin(((coords[:, None] - centres[None]) ** 2).sum(-1), axis=1)
    np.testing.assert_array_equal(nearest, np.arange(300))
    again, _ = refine_grid(cells, shape, F, n_rounds=100, random_state=0)
    np.testing.assert_array_equal(again, coords)  # seeded


def test_refine_grid_rejects_shared_cells():
    F = np.eye(6)
    with pytest.raises(ValueError, match="own cell"):
        refine_grid(np.array([0, 0, 1, 2, 3, 4]), (3, 3), F)


def test_refine_grid_knn_terms_keep_profile_neighbours_adjacent():
    """With each neuron's profile-space neighbours given, the swaps, proposals and nudge
    keep more of them next to it (sampled 10-NN overlap), one neuron per cell, seeded."""
    from sklearn.neighbors import NearestNeighbors

    from topoxr.metrics import knn_overlap

    X = clustered_profiles(600, 10, random_state=1)
    F = X / np.linalg.norm(X, axis=1, keepdims=True)
    knn = NearestNeighbors(n_neighbors=11).fit(F).kneighbors(F)[1][:, 1:]
    _, cells, shape = snap_to_grid(np.random.default_rng(1).uniform(size=(600, 2)),
                                   return_cells=True)
    plain, _ = refine_grid(cells, shape, F, random_state=0)
    coords, refined = refine_grid(cells, shape, F, knn=knn, random_state=0)
    assert np.unique(refined).size == 600
    assert knn_overlap(X, coords, 10, metric="cosine") > knn_overlap(
        X, plain, 10, metric="cosine") + 0.02
    again, _ = refine_grid(cells, shape, F, knn=knn, random_state=0)
    np.testing.assert_array_equal(again, coords)
    with pytest.raises(ValueError, match="knn must have shape"):
        refine_grid(cells, shape, F, knn=knn[:10])
    with pytest.raises(ValueError, match="neuron indices"):
        refine_grid(cells, shape, F, knn=knn - 1)


def _tied_profiles():
    """NAP profiles of 40 neurons, 8 of them dead, plus exact copies, multiples (the same
    direction: cosine distance 0) and copies with noise at 1e-12 of live neurons."""
    from topoxr import profiles
    from topoxr.testing import make_activations

    P = profiles(make_activations(n_neurons=40, n_dead=8, n_epochs=1)).isel(epoch=0).values
    noise = 1e-12 * np.random.default_rng(0).normal(size=(3, P.shape[1]))
    return np.vstack([P, P[:3], 2.5 * P[3:6], P[6:9] + noise])


@pytest.mark.parametrize("method", ["force", "pca+force", "tsne+force", "graph+force",
                                    "knnforce"])
def test_force_layouts_keep_neurons_with_identical_profiles_apart(method):
    """Identical profiles feel identical forces: once two such neurons share a position
    they never leave it, and the map's interpolation then draws only one of them. Every
    neuron must have a position of its own, about as far from its nearest neighbour as
    neurons usually are, and show in the interpolated map."""
    from topoxr.interpolate import GridInterpolator
    from topoxr.layouts import get_estimator

    X = _tied_profiles()
    n = X.shape[0]
    Y = get_estimator(method, random_state=0).fit_transform(X)
    assert len(np.unique(Y, axis=0)) == n
    d = np.linalg.norm(Y[:, None] - Y[None], axis=-1)
    np.fill_diagonal(d, np.inf)
    nearest = d.min(axis=1)
    tied = np.r_[32:40, 40:49, 0:9]  # dead neurons, and the live ones with copies
    assert nearest[tied].min() > 0.2 * np.median(nearest), (nearest[tied], np.median(nearest))
    seen = np.nanmax(GridInterpolator(Y[:, 0], Y[:, 1], resolution=100)(np.eye(n)),
                     axis=(1, 2))
    assert (seen > 0.1).all(), np.flatnonzero(seen <= 0.1)

