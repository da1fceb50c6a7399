"""Manifold-learning layouts: t-SNE, UMAP and metric MDS of the neuron profiles."""

from __future__ import annotations

import sys
import warnings

import numpy as np

from topoxr._optional import import_optional
from topoxr.layouts._base import BaseLayout, LayoutInputError

__all__ = ["MDSLayout", "TSNELayout", "UMAPLayout"]


def _import_umap():
    """umap-learn without its TensorFlow path.

    ``import umap`` also imports ``umap.parametric_umap``, which loads TensorFlow when it
    is installed (15-20 s and about 1 GB); topoxr needs only ``umap.UMAP``. The submodule
    is blocked during the first import (umap-learn then defines its placeholder
    ``ParametricUMAP``) and unblocked afterwards, so ``import umap.parametric_umap``
    still works for whoever asks for it.
    """
    if "umap" in sys.modules:
        return sys.modules["umap"]
    blocked = "umap.parametric_umap" not in sys.modules
    if blocked:
        sys.modules["umap.parametric_umap"] = None  # type: ignore[assignment]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ImportWarning)
            return import_optional("umap", extra="umap", purpose="UMAPLayout")
    finally:
        if blocked and sys.modules.get("umap.parametric_umap", 0) is None:
            del sys.modules["umap.parametric_umap"]


class TSNELayout(BaseLayout):
    """t-SNE of the neuron profiles (scikit-learn, Barnes-Hut).

    Parameters
    ----------
    perplexity : float, default 30.0
        Effective number of neighbours; lowered to ``(n_neurons - 1) / 3`` for small layers.
    max_iter : int, default 1000
        Optimisation steps, at least 250 (scikit-learn's minimum; fewer are refused).
    metric : {"cosine", "correlation", "euclidean", "precomputed"}, default "cosine"
        Metric of the profiles, or ``"precomputed"`` when ``X`` holds distances.
    random_state : int, RandomState instance or None, default None
        Seed.

    Attributes
    ----------
    embedding_ : ndarray of shape (n_neurons, 2)
        Coordinates in ``[0, 1]^2``.

    Raises
    ------
    LayoutInputError
        (a ``ValueError``) when fitting with ``max_iter`` below 250, scikit-learn's
        minimum (its first 250 steps are the early-exaggeration phase).

    Notes
    -----
    Cost: ``O(n log n)`` per step after an ``O(n^2)``-time nearest-neighbour search on
    small inputs (scikit-learn computes a neighbour graph of ``3 * perplexity``
    neighbours). The PCA initialisation is used for profiles, a random one for
    precomputed distances (scikit-learn's rule) and for profiles whose first principal
    component has no spread, e.g. when every profile is the same (all neurons dead):
    scikit-learn scales its PCA start by that spread, which gives NaN there, and its
    Barnes-Hut step then crashes the Python process.
    """

    def __init__(
        self,
        *,
        perplexity: float = 30.0,
        max_iter: int = 1000,
        metric: str = "cosine",
        random_state=None,
    ) -> None:
        self.perplexity = perplexity
        self.max_iter = max_iter
        self.metric = metric
        self.random_state = random_state

    def _embed(self, X: np.ndarray, rng: np.random.RandomState) -> np.ndarray:
        from sklearn.manifold import TSNE

        n = X.shape[0]
        if not self.max_iter >= _TSNE_MIN_ITER:
            raise LayoutInputError(
                f"max_iter must be at least {_TSNE_MIN_ITER} for t-SNE (scikit-learn's "
                f"minimum: its first {_TSNE_MIN_ITER} steps are the early-exaggeration "
                f"phase), got max_iter={self.max_iter}")
        perplexity = float(min(self.perplexity, (n - 1) / 3.0))
        precomputed = self.metric == "precomputed"
        if self.metric in ("cosine", "correlation"):
            data, metric = self._features(X), "euclidean"  # unit vectors: same neighbours
        else:
            data, metric = X, self.metric
        init: str | np.ndarray = "random"
        if not precomputed and data.shape[1] >= 2:
            init = _pca_start(data, rng)
        tsne = TSNE(
            n_components=2,
            perplexity=perplexity,
            max_iter=int(self.max_iter),
            metric=metric,
            init=init,
            random_state=rng,
        )
        return tsne.fit_transform(data)


#: Fewest t-SNE steps scikit-learn accepts.
_TSNE_MIN_ITER = 250


def _pca_start(data: np.ndarray, rng: np.random.RandomState) -> str | np.ndarray:
    """scikit-learn's PCA start of t-SNE, or ``"random"`` where it would be NaN.

    The same computation as ``TSNE(init="pca")``: the first two principal components,
    in float32, scaled so that the first has standard deviation 1e-4. When that
    component has no spread (every profile the same) the scaling divides by zero; the
    random start (Gaussian, standard deviation 1e-4) is used then.
    """
    from sklearn.decomposition import PCA

    if not np.ptp(data, axis=0).any():
        return "random"  # every profile the same: no principal component at all
    start = PCA(n_components=2, random_state=rng).fit_transform(data).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        start = start / np.std(start[:, 0]) * 1e-4
    return start if np.isfinite(start).all() else "random"


class UMAPLayout(BaseLayout):
    """UMAP of the neuron profiles (umap-learn, imported when fitting).

    Parameters
    ----------
    n_neighbors : int, default 15
        Neighbourhood size; lowered to ``n_neurons - 1`` for small layers.
    min_dist : float, default 0.1
        How tightly UMAP packs neighbours.
    n_epochs : int, optional
        Optimisation epochs (umap-learn's default: 500 below 10,000 points, 200 above).
    metric : {"cosine", "correlation", "euclidean", "precomputed"}, default "cosine"
        Metric of the profiles, or ``"precomputed"`` when ``X`` holds distances.
    random_state : int, RandomState instance or None, default None
        Seed. A seed makes umap-learn run single-threaded (its rule).

    Attributes
    ----------
    embedding_ : ndarray of shape (n_neurons, 2)
        Coordinates in ``[0, 1]^2``.

    Raises
    ------
    ImportError
        When fitting without umap-learn installed (``pip install "topoxr[umap]"``).

    Notes
    -----
    Cost: approximate nearest neighbours (NN-descent) plus ``O(n k)`` per epoch; the
    first call in a process also pays numba's compilation (several seconds).
    """

    def __init__(
        self,
        *,
        n_neighbors: int = 15,
        min_dist: float = 0.1,
        n_epochs: int | None = None,
        metric: str = "cosine",
        random_state=None,
    ) -> None:
        self.n_neighbors = n_neighbors
        self.min_dist = min_dist
        self.n_epochs = n_epochs
        self.metric = metric
        self.random_state = random_state

    def _embed(self, X: np.ndarray, rng: np.random.RandomState) -> np.ndarray:
        umap = _import_umap()
        n = X.shape[0]
        if isinstance(self.n_neighbors, bool) or not self.n_neighbors >= 2:
            raise LayoutInputError(f"n_neighbors must be >= 2, got {self.n_neighbors!r} "
                                   "(values above the number of neurons - 1 are lowered)")
        if self.metric in ("cosine", "correlation"):
            data, metric = self._features(X), "euclidean"  # unit vectors: same neighbours
        else:
            data, metric = X, self.metric
        reducer = umap.UMAP(
            n_components=2,
            n_neighbors=int(max(2, min(self.n_neighbors, n - 1))),
            min_dist=self.min_dist,
            n_epochs=self.n_epochs,
            metric=metric,
            init="spectral" if n > 16 else "random",
            random_state=rng,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # n_jobs overridden by the seed, tiny graphs
            return reducer.fit_transform(data)


class MDSLayout(BaseLayout):
    """Metric multidimensional scaling (SMACOF) of the profile distances.

    Parameters
    ----------
    max_iter : int, default 300
        SMACOF iterations.
    metric : {"cosine", "correlation", "euclidean", "precomputed"}, default "cosine"
        Metric of the profiles, or ``"precomputed"`` when ``X`` holds distances.
    random_state : int, RandomState instance or None, default None
        Seed of the initial configuration.

    Attributes
    ----------
    embedding_ : ndarray of shape (n_neurons, 2)
        Coordinates in ``[0, 1]^2``.

    Notes
    -----
    Cost: ``O(n^2)`` memory and time per iteration; practical up to a few thousand neurons.
    Not one of the paper's methods; a classical reference for distance preservation.
    Like PCA, MDS gives neurons with the same profile the same position; when every
    profile is the same (all distances zero) every neuron is put at the centre.
    """

    def __init__(self, *, max_iter: int = 300, metric: str = "cosine", random_state=None) -> None:
        self.max_iter = max_iter
        self.metric = metric
        self.random_state = random_state

    def _embed(self, X: np.ndarray, rng: np.random.RandomState) -> np.ndarray:
        from sklearn.manifold import MDS

        D = self._distances(X)
        if not D.any():
            # every profile the same: all at one point is the exact (zero-stress) answer;
            # SMACOF would divide by the zero sum of distances at every iteration
            return np.zeros((X.shape[0], 2))
        mds = MDS(
            n_components=2,
            metric="precomputed",
            init="random",
            n_init=1,
            max_iter=int(self.max_iter),
            random_state=rng,
            normalized_stress="auto",
        )
        return mds.fit_transform(D)
