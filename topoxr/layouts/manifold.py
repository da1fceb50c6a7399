"""Manifold-learning layouts: t-SNE, UMAP and metric MDS of the neuron profiles."""

from __future__ import annotations

import sys
import warnings

import numpy as np

from topoxr._optional import import_optional
from topoxr.layouts._base import BaseLayout

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
        Optimisation steps.
    metric : {"cosine", "correlation", "euclidean", "precomputed"}, default "cosine"
        Metric of the profiles, or ``"precomputed"`` when ``X`` holds distances.
    random_state : int, RandomState instance or None, default None
        Seed.

    Attributes
    ----------
    embedding_ : ndarray of shape (n_neurons, 2)
        Coordinates in ``[0, 1]^2``.

    Notes
    -----
    Cost: ``O(n log n)`` per step after an ``O(n^2)``-time nearest-neighbour search on
    small inputs (scikit-learn computes a neighbour graph of ``3 * perplexity``
    neighbours). The PCA initialisation is used for profiles, a random one for
    precomputed distances (scikit-learn's rule).
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
        perplexity = float(min(self.perplexity, (n - 1) / 3.0))
        precomputed = self.metric == "precomputed"
        if self.metric in ("cosine", "correlation"):
            data, metric = self._features(X), "euclidean"  # unit vectors: same neighbours
        else:
            data, metric = X, self.metric
        tsne = TSNE(
            n_components=2,
            perplexity=perplexity,
            max_iter=max(int(self.max_iter), 250),
            metric=metric,
            init="random" if precomputed or data.shape[1] < 2 else "pca",
            random_state=rng,
        )
        return tsne.fit_transform(data)


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
    """

    def __init__(self, *, max_iter: int = 300, metric: str = "cosine", random_state=None) -> None:
        self.max_iter = max_iter
        self.metric = metric
        self.random_state = random_state

    def _embed(self, X: np.ndarray, rng: np.random.RandomState) -> np.ndarray:
        from sklearn.manifold import MDS

        D = self._distances(X)
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
