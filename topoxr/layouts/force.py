"""Force-directed layouts: the paper's particle optimisation and its k-NN successor.

:class:`ForceLayout` is the paper's "PSO" (a force-directed particle optimisation), kept
faithful to the reference implementation, dense ``O(n^2)`` per step. :class:`KNNForceLayout`
is topoxr's default: the same idea (activity neighbours attract, everything else
repels) restricted to a k-nearest-neighbour graph and sampled repulsion, ``O(n k)``
memory and time per step, so it lays out tens of thousands of neurons.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from topoxr.layouts._base import BaseLayout, LayoutInputError, check_parameter
from topoxr.layouts._registry import initial_positions

__all__ = ["ForceLayout", "KNNForceLayout"]

logger = logging.getLogger(__name__)

#: Relative size of the noise that separates neurons sharing a position (see :func:`_jitter`).
JITTER = 1e-5


def _jitter(pos: np.ndarray, rng: np.random.RandomState, scale: float,
            rows: np.ndarray | None = None) -> np.ndarray:
    """``pos`` with Gaussian noise of standard deviation ``scale`` added to ``rows`` (all
    rows by default): separates neurons that share a position.

    Neurons with identical (or nearly identical) profiles get identical forces, so a
    force layout cannot move apart two of them that share a position: the difference
    between their positions, which every force is proportional to, is zero. Both force
    layouts use this: :class:`KNNForceLayout` on its start, :class:`ForceLayout` on every
    tie (see :func:`_separate_ties`).
    """
    if rows is None:
        return pos + rng.normal(scale=scale, size=pos.shape)
    out = pos.copy()
    out[rows] += rng.normal(scale=scale, size=(len(rows), pos.shape[1]))
    return out


def _tied_rows(pos: np.ndarray) -> np.ndarray:
    """Indices of the neurons whose position equals an earlier one's, bit for bit (one
    neuron of each group of tied neurons is left out)."""
    order = np.lexsort(pos.T[::-1])
    sorted_pos = pos[order]
    same = (sorted_pos[1:] == sorted_pos[:-1]).all(axis=1)
    return order[1:][same]


def _separate_ties(pos: np.ndarray, rng: np.random.RandomState, size: float) -> np.ndarray:
    """``pos`` with neurons that share a position moved apart by :func:`_jitter`.

    The noise is ``JITTER`` times the layout's extent (``size`` where all positions
    coincide), and at least eight float64 spacings of the positions, so that it is not
    rounded away. Without ties ``pos`` is returned as it is and ``rng`` is not used.
    """
    tied = _tied_rows(pos)
    if not tied.size:
        return pos
    extent = float(np.ptp(pos, axis=0).max())
    scale = max(JITTER * (extent if extent > 0 else size),
                8.0 * float(np.spacing(np.abs(pos).max())))
    return _jitter(pos, rng, scale, tied)


#: |position| beyond which a force layout counts as diverged. Its starts lie in a square
#: of side 1 or ``init_scale``, and runs on NAPs or random profiles stay within about 40
#: (measured on digits MLPs' NAPs, raw and normalised); runs whose far pairs repel
#: without bound (a neuron near d_max from every other: raw activation profiles of a
#: ReLU layer) passed 1e5 while their other neurons, scaled into the unit square, lay
#: within 0.003 of each other
_DIVERGED = 1e4


class ForceLayout(BaseLayout):
    """The paper's force-directed particle optimisation ("PSO"), faithful to its reference.

    Every pair of neurons ``i, j`` feels a force along ``p_j - p_i`` with strength

    ``f = (l(t) * f_local(r) + g(t) * f_global(d)) / 2``

    where ``d`` is the activity (profile) distance and ``r`` the current layout distance
    (clipped below at ``min_distance``):

    - global term ``f_global = a_g (1 - (d / d_max)^3) - b_g exp(-d / c_g)``;
    - local term ``f_local = a_l / (r + 1)^3 - b_l exp(-r / c_l)`` (bounded repulsion);
    - a tanh schedule over ``t`` in ``[-3, 6]``: ``g = (1 - tanh t) / 2``,
      ``l = (1 + tanh t) / 2`` moves the weight from the global to the local term.

    Each step moves every neuron by the mean of its pairwise forces. Neurons whose
    profile has no direction (dead; constant under ``"correlation"``) feel and exert no
    global force (a departure from the reference: at distance 1 from everyone, often
    ``d_max``, they were repelled without bound), and ``d_max`` is over live pairs; a run
    whose positions pass 1e4 (runs on NAPs stay within about 40) is refused. From a random start
    (``init=None``) both terms act (``a_g = 1.5``, ``b_g = 0.5``); when refining another
    layout (``init`` given) the reference switches the global term off
    (``a_g = b_g = 0``), so the refinement is a pure local spreading pass. Override with
    ``global_attraction`` / ``global_repulsion``.

    Parameters
    ----------
    init : None, str, estimator or array of shape (n_neurons, 2), default None
        Start: uniform random positions (None), the layout of a registered method name
        or estimator fitted on the same ``X`` (``"umap"`` gives the paper's UMAP_PSO), or
        given positions. Initial layouts are scaled into a square of side ``init_scale``.
        An estimator's own ``metric``, where it differs from its class's default, is
        kept (``ForceLayout(init=PCALayout(metric="euclidean"))`` starts from a Euclidean
        PCA); where it does not, it gets this estimator's ``metric``. A start from
        profiles and a ``"precomputed"`` metric on only one side is refused.
    n_steps : int, default 1000
        Optimisation steps.
    global_attraction, global_repulsion : float, optional
        ``a_g`` and ``b_g``; default 1.5 and 0.5 from a random start, 0 when refining.
    global_scale : float, default 2.0
        ``c_g``.
    local_attraction, local_repulsion, local_scale : float, default 1.5, 15.0, 2.0
        ``a_l``, ``b_l`` and ``c_l``.
    min_distance : float, default 0.01
        Lower clip of both distances.
    init_scale : float, default 10.0
        Side of the square an ``init`` layout is scaled into, keeping its aspect ratio.
        The reference normalises every layout to ``[0, 1]`` per axis before refining it,
        so it starts at scale 1. The local term spreads the swarm to a size set by its
        own constants, whatever the size of the start: refining from side 10 or from the
        reference's start changed trustworthiness and 10-NN overlap by less than 0.01
        (umap, pca, tsne, som and graph starts; 64 and 150 neurons; 4 seeds each).
    metric : {"cosine", "correlation", "euclidean", "precomputed"}, default "cosine"
        Metric of the profiles, or ``"precomputed"`` when ``X`` holds distances.
    random_state : int, RandomState instance or None, default None
        Seed of the random start and of the ``init`` estimator.
    progress : bool, default False
        Show a tqdm progress bar over the steps (off by default: callers such as
        :func:`topoxr.layouts.attach` and :func:`compute_layouts` show their own).

    Attributes
    ----------
    embedding_ : ndarray of shape (n_neurons, 2)
        Coordinates in ``[0, 1]^2``.
    init_embedding_ : ndarray of shape (n_neurons, 2) or None
        The starting layout when ``init`` was given.

    Notes
    -----
    Cost: ``O(n^2)`` memory (the global force matrix and five work arrays, float32:
    ``24 n^2`` bytes, 1.6 GB at n = 8192, plus ``8 n^2`` transiently for the distances)
    and ``O(n^2)`` time per step, ``n_steps`` steps. The pairwise terms are computed in
    float32 (the reference uses float64; the layout does not need the precision). Use
    :class:`KNNForceLayout` for large layers.

    Neurons with identical profiles (dead neurons, duplicates) feel identical forces, so
    once they share a position they never leave it; in the reference they end on one
    point, and a map drawn from the layout shows only one of them. Here neurons that
    share a position (bit for bit) are moved apart by a tiny Gaussian jitter (the one
    :class:`KNNForceLayout` applies to its start): at the start, and after every step
    once the local term outweighs the global one (before that, the global term pulls
    the swarm together until its positions round to the same values, and ties between
    different profiles come apart by themselves). Runs without such ties are the same,
    step for step, as without this separation.

    References
    ----------
    Krug, Ratul, Olson, Stober, "Visualizing Deep Neural Networks with Topographic
    Activation Maps", HHAI 2023, arXiv:2204.03528.
    """

    def __init__(
        self,
        init: Any = None,
        *,
        n_steps: int = 1000,
        global_attraction: float | None = None,
        global_repulsion: float | None = None,
        global_scale: float = 2.0,
        local_attraction: float = 1.5,
        local_repulsion: float = 15.0,
        local_scale: float = 2.0,
        min_distance: float = 0.01,
        init_scale: float = 10.0,
        metric: str = "cosine",
        random_state=None,
        progress: bool = False,
    ) -> None:
        self.init = init
        self.n_steps = n_steps
        self.global_attraction = global_attraction
        self.global_repulsion = global_repulsion
        self.global_scale = global_scale
        self.local_attraction = local_attraction
        self.local_repulsion = local_repulsion
        self.local_scale = local_scale
        self.min_distance = min_distance
        self.init_scale = init_scale
        self.metric = metric
        self.random_state = random_state
        self.progress = progress

    def _degenerate(self, X: np.ndarray) -> np.ndarray:
        """Neurons whose profile has no direction under the metric (dead; constant under
        ``"correlation"``); none for Euclidean or precomputed distances."""
        if self.metric not in ("cosine", "correlation"):
            return np.zeros(X.shape[0], dtype=bool)
        from topoxr.similarity import degenerate_rows

        dead, constant = degenerate_rows(X, self.metric)
        return dead | constant

    def _embed(self, X: np.ndarray, rng: np.random.RandomState) -> np.ndarray:
        from tqdm.auto import tqdm

        n = X.shape[0]
        check_parameter("n_steps", self.n_steps, low=1, integer=True)
        for name in ("global_attraction", "global_repulsion"):
            check_parameter(name, getattr(self, name), low=0, optional=True)
        for name in ("local_attraction", "local_repulsion"):
            check_parameter(name, getattr(self, name), low=0)
        for name in ("global_scale", "local_scale", "min_distance", "init_scale"):
            check_parameter(name, getattr(self, name), low=0, low_open=True)
        init = initial_positions(self.init, X, n, self.metric, rng)
        self.init_embedding_ = init
        if init is None:
            pos = rng.uniform(size=(n, 2))
            a_g, b_g = 1.5, 0.5
        else:
            lo, span = init.min(axis=0), np.ptp(init, axis=0).max()
            pos = (init - lo) / (span if span > 0 else 1.0) * self.init_scale
            a_g, b_g = 0.0, 0.0
        if self.global_attraction is not None:
            a_g = float(self.global_attraction)
        if self.global_repulsion is not None:
            b_g = float(self.global_repulsion)
        # neurons that share a position get identical forces if their profiles are the
        # same, and then stay together for good: separate them at the start (identical
        # profiles give identical init positions) and, once the local term outweighs the
        # global one, after every step (the global term pulls the swarm together until
        # positions round to the same float64 value; ties of different profiles come
        # apart again by themselves, so the reference's run is kept until then)
        size = float(self.init_scale) if init is not None else 1.0
        pos = _separate_ties(pos, rng, size)

        # as the reference: the global term is computed from the unclipped distances
        D = self._distances(X)
        # ... but not for neurons whose profile has no direction (dead, or constant under
        # "correlation"): the convention puts them at distance 1 from every live neuron,
        # which under cosine is d_max for non-negative profiles (a ReLU layer), where the
        # global term repels in proportion to the layout distance: from everyone at
        # once, such a neuron flew off without bound (1e20) and the live neurons, scaled
        # into the unit square, collapsed onto one point. Their activity says nothing:
        # no global term for them, only the local spreading.
        degenerate = self._degenerate(X)
        live = ~degenerate
        dmax = max(float(D[np.ix_(live, live)].max()) if live.any() else 0.0,
                   self.min_distance)
        f_glob = (a_g * (1.0 - (D / dmax) ** 3) - b_g * np.exp(-D / self.global_scale)).astype(
            np.float32
        )
        f_glob[degenerate, :] = 0.0
        f_glob[:, degenerate] = 0.0
        del D
        t = np.linspace(-3.0, 6.0, int(self.n_steps))
        g_coef = (1.0 - np.tanh(t)) / 2.0
        l_coef = (1.0 + np.tanh(t)) / 2.0
        a_l, b_l = np.float32(self.local_attraction), np.float32(self.local_repulsion)
        inv_c = np.float32(1.0 / self.local_scale)
        r_min = np.float32(self.min_distance)
        use_global = max(abs(a_g), abs(b_g)) > 0
        # float32 work arrays: the n x n pairwise terms dominate time and memory
        dx = np.empty((n, n), dtype=np.float32)
        dy = np.empty((n, n), dtype=np.float32)
        r = np.empty((n, n), dtype=np.float32)
        f = np.empty((n, n), dtype=np.float32)
        r3 = np.empty((n, n), dtype=np.float32)
        for step in tqdm(range(int(self.n_steps)), desc="force layout", disable=not self.progress,
                         leave=False):
            # differences from float64 positions: the global term first contracts the
            # swarm to ~1e-16 around its centre and the local term re-expands it from
            # those differences, which float32 positions (ulp ~6e-8) would erase
            np.subtract(pos[None, :, 0], pos[:, None, 0], out=dx, casting="same_kind")
            np.subtract(pos[None, :, 1], pos[:, None, 1], out=dy, casting="same_kind")
            np.hypot(dx, dy, out=r)
            np.maximum(r, r_min, out=r)
            # local term a/(r+1)^3 - b exp(-r/c), weighted, plus the weighted global term
            np.multiply(r, -inv_c, out=f)
            np.exp(f, out=f)
            f *= -b_l
            r += np.float32(1.0)
            np.multiply(r, r, out=r3)
            r3 *= r
            np.divide(a_l, r3, out=r)
            f += r
            f *= np.float32(l_coef[step] / 2.0)
            if use_global and g_coef[step] > 0:
                f += np.float32(g_coef[step] / 2.0) * f_glob
            dx *= f
            dy *= f
            pos[:, 0] += dx.mean(axis=1, dtype=np.float64)
            pos[:, 1] += dy.mean(axis=1, dtype=np.float64)
            if not np.isfinite(pos).all() or np.abs(pos).max() > _DIVERGED:
                raise FloatingPointError(
                    f"force layout diverged at step {step}: a neuron's position passed "
                    f"{_DIVERGED:g} (the global term repels pairs whose profile distance "
                    "is near the largest, in proportion to their layout distance; a neuron "
                    "that far from every other flies off and the others collapse onto one "
                    "point once scaled); lay out NAPs (the default profile) rather than "
                    "raw activations, start from a layout ('umap+force', 'pca+force'), or "
                    "use another method")
            if not use_global or l_coef[step] >= g_coef[step]:
                pos = _separate_ties(pos, rng, size)
        return pos


# -- k-nearest-neighbour force layout (the default) ------------------------------------------


def knn_graph(X: np.ndarray, n_neighbors: int, metric: str, features: np.ndarray | None):
    """Indices and distances of each neuron's ``n_neighbors`` nearest other neurons.

    Parameters
    ----------
    X : ndarray
        Validated input: a distance matrix when ``metric="precomputed"``.
    n_neighbors : int
        Neighbours per neuron (at most ``n - 1``).
    metric : str
        The estimator's metric.
    features : ndarray or None
        Euclidean features matching the metric (unit vectors for cosine), when not
        precomputed.

    Returns
    -------
    indices, distances : ndarray of shape (n, k)
        Sorted by distance; distances are in the metric's units (cosine distance for
        ``"cosine"``).

    Notes
    -----
    The features of :func:`~topoxr.layouts._base.features_for_metric` give a dead
    neuron (and, under ``"correlation"``, a constant one) a direction of its own, shared
    with the other degenerate neurons: it is at distance 1 from every live neuron and 0
    from the other degenerate ones, as in :func:`topoxr.similarity.pairwise_distances`.
    """
    n = X.shape[0]
    k = int(min(n_neighbors, n - 1))
    if metric == "precomputed":
        D = X.copy()
        np.fill_diagonal(D, np.inf)
        idx = np.argpartition(D, k - 1, axis=1)[:, :k]
        dist = np.take_along_axis(D, idx, axis=1)
    else:
        from sklearn.neighbors import NearestNeighbors

        nn = NearestNeighbors(n_neighbors=k + 1).fit(features)
        dist, idx = nn.kneighbors(features)
        # drop each point itself (duplicates may come first: remove by identity, not rank)
        self_mask = idx == np.arange(n)[:, None]
        drop = np.where(self_mask.any(axis=1), self_mask.argmax(axis=1), k)
        keep = np.ones_like(idx, dtype=bool)
        keep[np.arange(n), drop] = False
        idx = idx[keep].reshape(n, k)
        dist = dist[keep].reshape(n, k)
        if metric in ("cosine", "correlation"):
            dist = dist**2 / 2.0  # chord length of unit vectors -> cosine distance
    order = np.argsort(dist, axis=1, kind="stable")
    return np.take_along_axis(idx, order, axis=1), np.take_along_axis(dist, order, axis=1)


def fuzzy_weights(dist: np.ndarray, n_iter: int = 64) -> np.ndarray:
    """UMAP's membership strengths ``exp(-(d - rho) / sigma)`` with ``sum = log2(k)``.

    ``rho`` is the distance to the nearest neighbour and ``sigma`` is found per neuron by
    bisection, all neurons at once.
    """
    n, k = dist.shape
    target = np.log2(k) if k > 1 else 1.0
    rho = dist[:, :1]
    excess = np.maximum(dist - rho, 0.0)
    lo = np.zeros((n, 1))
    hi = np.full((n, 1), np.inf)
    sigma = np.ones((n, 1))
    for _ in range(n_iter):
        total = np.exp(-excess / sigma).sum(axis=1, keepdims=True)
        big = total > target
        hi = np.where(big, sigma, hi)
        lo = np.where(big, lo, sigma)
        sigma = np.where(np.isinf(hi), sigma * 2.0, (lo + hi) / 2.0)
    mean_d = max(float(dist.mean()), 1e-12)
    sigma = np.maximum(sigma, 1e-3 * mean_d)
    return np.exp(-excess / sigma)


def _ab_params(spread: float, min_dist: float) -> tuple[float, float]:
    """Fit ``1 / (1 + a r^(2b))`` to UMAP's target curve (as umap-learn does)."""
    from scipy.optimize import curve_fit

    r = np.linspace(0, spread * 3, 300)
    target = np.where(r < min_dist, 1.0, np.exp(-(r - min_dist) / spread))
    (a, b), _ = curve_fit(lambda x, a, b: 1.0 / (1.0 + a * x ** (2 * b)), r, target)
    return float(a), float(b)


class KNNForceLayout(BaseLayout):
    """k-nearest-neighbour force layout: topoxr's default, for layers of any size.

    The paper's force optimisation lets every pair of neurons interact, which costs
    ``O(n^2)`` per step. Here attraction acts only along the edges of the k-nearest-
    neighbour graph of the profiles (weighted by UMAP-style fuzzy memberships), and
    repulsion acts on a few randomly drawn partners per neuron per step (negative
    sampling), with the heavy-tailed kernel ``1 / (1 + a r^(2b))``. All neurons move at
    once (vectorised numpy), ``O(n k)`` time and memory per step. Finally the layout is
    snapped onto a regular grid, one neuron per cell (``grid=True``), or, without the
    grid, a local spreading phase pushes apart neurons closer than the typical spacing,
    so that the map has no collapsed spots.

    Parameters
    ----------
    n_neighbors : int, default 15
        Neighbours per neuron in the attraction graph.
    n_epochs : int, optional
        Optimisation steps, at least 1; default (None) 500 up to 10,000 neurons, 200
        above.
    init : {"pca", "spectral", "random"}, estimator or array, default "pca"
        Starting positions: PCA of the (metric-adjusted) profiles, a spectral embedding of
        the neighbour graph, uniform random, the layout of an estimator, or given positions.
    min_dist : float, default 0.1
        Kernel shape, as in UMAP (smaller packs neighbours tighter).
    negative_sample_rate : int, default 5
        Repelling partners drawn per unit of attraction weight per step.
    learning_rate : float, default 1.0
        Initial step size (decays linearly to zero).
    grid : bool, default True
        Put one neuron per cell of a regular grid: a fast snap
        (:func:`~topoxr.layouts.grid.snap_to_grid`, small exact blocks), then local swap
        optimisation and a sub-cell nudge towards similar neighbours
        (:func:`~topoxr.layouts.grid.refine_grid`): uniform density, no overlaps, and
        neighbourhoods kept as well as t-SNE keeps them (see docs/benchmarks.md).
    swap_rounds : int, default 300
        Rounds of the grid's swap optimisation (0: the plain snap).
    nudge : float, default 1.5
        Strength of the final move of each neuron inside its cell (0: cell centres).
    grid_neighbors : int, default 10
        Nearest profile-space neighbours (of the attraction graph) that the grid's swaps,
        proposals and nudge also keep next to each neuron (the ``knn`` of
        :func:`~topoxr.layouts.grid.refine_grid`; 0: similarity alone). Ten matches the
        ``k`` of the quality metrics; it raises the sampled 10-NN overlap of the map.
    spreading : float, default 0.5
        Without ``grid``: strength of a final local spreading phase (0 turns it off):
        neurons closer than ``spreading`` times the mean spacing of a uniform layout are
        pushed apart.
    metric : {"cosine", "correlation", "euclidean", "precomputed"}, default "cosine"
        Metric of the profiles, or ``"precomputed"`` when ``X`` holds distances.
    random_state : int, RandomState instance or None, default None
        Seed of the initialisation and of the negative samples.

    Attributes
    ----------
    embedding_ : ndarray of shape (n_neurons, 2)
        Coordinates in ``[0, 1]^2``.
    graph_ : tuple of ndarray
        ``(indices, distances)`` of the neighbour graph, each of shape (n, k).

    Notes
    -----
    Cost: the neighbour search (a tree on the profiles, ``O(n log n)`` for few
    features; ``O(n^2)`` for precomputed distances), then ``O(n k)`` per epoch.
    """

    def __init__(
        self,
        *,
        n_neighbors: int = 15,
        n_epochs: int | None = None,
        init: Any = "pca",
        min_dist: float = 0.1,
        negative_sample_rate: int = 5,
        learning_rate: float = 1.0,
        grid: bool = True,
        swap_rounds: int = 300,
        nudge: float = 1.5,
        grid_neighbors: int = 10,
        spreading: float = 0.5,
        metric: str = "cosine",
        random_state=None,
    ) -> None:
        self.n_neighbors = n_neighbors
        self.n_epochs = n_epochs
        self.init = init
        self.min_dist = min_dist
        self.negative_sample_rate = negative_sample_rate
        self.learning_rate = learning_rate
        self.grid = grid
        self.swap_rounds = swap_rounds
        self.nudge = nudge
        self.grid_neighbors = grid_neighbors
        self.spreading = spreading
        self.metric = metric
        self.random_state = random_state

    def _embed(self, X: np.ndarray, rng: np.random.RandomState) -> np.ndarray:
        n = X.shape[0]
        check_parameter("n_neighbors", self.n_neighbors, low=1, integer=True)
        check_parameter("n_epochs", self.n_epochs, low=1, integer=True, optional=True)
        # as umap-learn: 0 <= min_dist <= spread (1 here), a positive learning rate
        check_parameter("min_dist", self.min_dist, low=0, high=1)
        check_parameter("learning_rate", self.learning_rate, low=0, low_open=True)
        check_parameter("negative_sample_rate", self.negative_sample_rate, low=0)
        check_parameter("swap_rounds", self.swap_rounds, low=0, integer=True)
        check_parameter("grid_neighbors", self.grid_neighbors, low=0, integer=True)
        for name in ("nudge", "spreading"):
            check_parameter(name, getattr(self, name), low=0)
        F = None if self.metric == "precomputed" else self._features(X)
        idx, dist = knn_graph(X, self.n_neighbors, self.metric, F)
        self.graph_ = (idx, dist)
        k = idx.shape[1]
        w = fuzzy_weights(dist)
        # symmetrise: w_ij + w_ji - w_ij w_ji (fuzzy union), as a sparse matrix
        from scipy import sparse

        A = sparse.csr_matrix((w.ravel(), (np.repeat(np.arange(n), k), idx.ravel())), shape=(n, n))
        A = (A + A.T - A.multiply(A.T)).tocoo()
        heads, tails, weight = A.row, A.col, A.data
        keep = weight > weight.max() * 1e-3
        heads, tails, weight = heads[keep], tails[keep], weight[keep] / weight.max()

        pos = self._init_positions(X, F, heads, tails, weight, n, rng)
        a, b = _ab_params(1.0, self.min_dist)
        n_epochs = self.n_epochs if self.n_epochs is not None else (500 if n <= 10_000 else 200)
        degree = np.bincount(heads, weights=weight, minlength=n)
        n_neg = np.maximum(np.rint(degree * self.negative_sample_rate), 1).astype(np.intp)
        pos = _optimize(pos, heads, tails, weight, n_neg, a, b, int(n_epochs),
                        float(self.learning_rate), rng)
        if self.grid:
            from topoxr.layouts.grid import refine_grid, snap_to_grid

            _, cell_of, shape = snap_to_grid(pos, block=64, return_cells=True)
            if self.swap_rounds <= 0 and self.nudge <= 0:
                return _
            # similarity on the grid: cosine for unit vectors, else scaled Euclidean
            grid_features = (F if self.metric in ("cosine", "correlation")
                             else _unit_scale(F if F is not None else self._features(X)))
            m = int(min(max(self.grid_neighbors, 0), k))
            coords, _ = refine_grid(cell_of, shape, grid_features, n_rounds=self.swap_rounds,
                                    nudge=self.nudge, knn=idx[:, :m] if m else None,
                                    random_state=rng)
            return coords
        if self.spreading > 0:
            pos = _spread(pos, float(self.spreading), rng)
        return pos

    def _init_positions(self, X, F, heads, tails, weight, n, rng) -> np.ndarray:
        init = self.init
        if isinstance(init, str) and init in ("pca", "spectral", "random"):
            if init == "random":
                pos = rng.uniform(size=(n, 2))
            elif init == "pca":
                from topoxr.layouts.linear import PCALayout

                pos = PCALayout(metric=self.metric, random_state=rng).fit_transform(X)
            else:
                pos = _spectral(heads, tails, weight, n, rng)
        else:
            pos = initial_positions(init, X, n, self.metric, rng)
        pos = pos - pos.min(axis=0)
        span = pos.max()
        pos = pos / (span if span > 0 else 1.0) * 10.0
        # a little noise separates duplicate profiles, which share a start
        return _jitter(pos, rng, 1e-4)


def _optimize(pos, heads, tails, weight, n_neg, a, b, n_epochs, learning_rate,
              rng) -> np.ndarray:
    """Move ``pos``: attraction along the edges, repulsion from random partners.

    Gradients are UMAP's for the kernel ``1 / (1 + a d^(2b))``, each term clipped to
    [-4, 4]; every epoch applies the graph's expected update at once (full batch).
    Neuron ``i`` draws ``n_neg[i]`` random partners per epoch (UMAP's expected number of
    negative samples: the sampling rate times its attraction weight). Arithmetic is in
    float32, accumulation in float64.
    """
    n = pos.shape[0]
    pos = pos.astype(np.float32)
    heads = heads.astype(np.intp)
    tails = tails.astype(np.intp)
    weight = weight.astype(np.float32)
    neg_heads = np.repeat(np.arange(n, dtype=np.intp), n_neg)
    gen = np.random.default_rng(rng.randint(np.iinfo(np.int32).max))
    a = np.float32(a)
    b = np.float32(b)
    step = np.empty((n, 2), dtype=np.float64)
    for epoch in range(n_epochs):
        alpha = np.float32(learning_rate * (1.0 - epoch / n_epochs))
        # attraction along the graph: -2ab d2^(b-1) / (1 + a d2^b)
        diff = pos[heads]
        diff -= pos[tails]
        d2 = np.einsum("ij,ij->i", diff, diff)
        np.maximum(d2, np.float32(1e-12), out=d2)
        p = np.log(d2)
        p *= b
        np.exp(p, out=p)
        coef = np.float32(-2.0) * a * b * p
        coef /= d2 * (np.float32(1.0) + a * p)
        diff *= coef[:, None]
        np.clip(diff, -4.0, 4.0, out=diff)
        diff *= weight[:, None]
        # repulsion from random partners: 2b / ((0.001 + d2) (1 + a d2^b))
        neg_tails = gen.integers(0, n, size=neg_heads.size)
        ndiff = pos[neg_heads]
        ndiff -= pos[neg_tails]
        nd2 = np.einsum("ij,ij->i", ndiff, ndiff)
        q = np.log(np.maximum(nd2, np.float32(1e-30)))
        q *= b
        np.exp(q, out=q)
        q *= a
        q += np.float32(1.0)
        q *= nd2 + np.float32(0.001)
        ncoef = np.float32(2.0) * b / q
        ncoef[neg_tails == neg_heads] = 0.0
        ndiff *= ncoef[:, None]
        np.clip(ndiff, -4.0, 4.0, out=ndiff)
        for c in range(2):
            step[:, c] = np.bincount(heads, diff[:, c], minlength=n)
            step[:, c] += np.bincount(neg_heads, ndiff[:, c], minlength=n)
        pos += alpha * step.astype(np.float32)
    return pos.astype(np.float64)


def _unit_scale(F: np.ndarray) -> np.ndarray:
    """Centre features and scale them to a mean squared norm of 1."""
    F = F - F.mean(axis=0)
    scale = np.sqrt(max(float(np.einsum("if,if->", F, F)) / F.shape[0], 1e-300))
    return F / scale


def _spectral(heads, tails, weight, n, rng) -> np.ndarray:
    """Two leading non-trivial eigenvectors of the normalised graph Laplacian."""
    from scipy import sparse
    from scipy.sparse.csgraph import connected_components, laplacian
    from scipy.sparse.linalg import eigsh

    A = sparse.csr_matrix((weight, (heads, tails)), shape=(n, n))
    n_comp, _ = connected_components(A, directed=False)
    if n_comp > 1 or n < 10:
        return rng.uniform(size=(n, 2))
    L = laplacian(A, normed=True)
    v0 = rng.uniform(size=n)
    try:
        vals, vecs = eigsh(L, k=3, which="SM", tol=1e-4, v0=v0, maxiter=n * 5)
    except Exception:  # ARPACK did not converge: fall back to random
        logger.info("spectral initialisation did not converge; using a random start")
        return rng.uniform(size=(n, 2))
    order = np.argsort(vals)
    return vecs[:, order[1:3]]


def _spread(pos: np.ndarray, strength: float, rng) -> np.ndarray:
    """Push apart neurons closer than ``strength`` times the uniform spacing (k-d tree)."""
    from scipy.spatial import cKDTree

    n = pos.shape[0]
    pos = pos.copy()
    for _ in range(30):
        span = np.ptp(pos, axis=0)
        area = max(float(span[0] * span[1]), float(span.max()) ** 2 * 1e-3)
        radius = strength * np.sqrt(area / n)
        pairs = cKDTree(pos).query_pairs(radius, output_type="ndarray")
        if pairs.size == 0:
            break
        i, j = pairs[:, 0], pairs[:, 1]
        diff = pos[i] - pos[j]
        d = np.sqrt(np.einsum("ij,ij->i", diff, diff))
        same = d < 1e-12 * radius
        if same.any():
            diff[same] = rng.normal(size=(int(same.sum()), 2))
            d[same] = np.linalg.norm(diff[same], axis=1)
        push = ((radius - d) / 2.0 / np.maximum(d, 1e-300))[:, None] * diff * 0.5
        move = np.zeros_like(pos)
        for c in range(2):
            move[:, c] = np.bincount(i, push[:, c], minlength=n) - np.bincount(
                j, push[:, c], minlength=n
            )
        pos += move
    return pos
