"""PCA layout: the first two principal axes of the neuron profiles."""

from __future__ import annotations

import numpy as np
from sklearn.decomposition import PCA

from topoxr.layouts._base import BaseLayout

__all__ = ["PCALayout"]


class PCALayout(BaseLayout):
    """Neurons placed by the first two principal components of their profiles.

    Under ``metric="cosine"`` (``"correlation"``) the profiles are first scaled to unit
    length (centred and scaled), so that Euclidean geometry matches the metric. With
    ``metric="precomputed"`` this is classical multidimensional scaling of the distances.
    Profiles with a single feature give a line (second coordinate zero).

    Parameters
    ----------
    metric : {"cosine", "correlation", "euclidean", "precomputed"}, default "cosine"
        Metric of the profiles, or ``"precomputed"`` when ``X`` holds distances.
    random_state : int, RandomState instance or None, default None
        Seed of the randomized SVD solver (used by scikit-learn on large inputs).

    Attributes
    ----------
    embedding_ : ndarray of shape (n_neurons, 2)
        Coordinates in ``[0, 1]^2``.

    Notes
    -----
    Cost: ``O(n d min(n, d))`` time and ``O(n d)`` memory for ``n`` profiles of ``d``
    features; ``O(n^2)`` for precomputed distances.

    Examples
    --------
    >>> X = np.random.default_rng(0).random((10, 4))
    >>> PCALayout().fit_transform(X).shape
    (10, 2)
    """

    def __init__(self, *, metric: str = "cosine", random_state=None) -> None:
        self.metric = metric
        self.random_state = random_state

    def _embed(self, X: np.ndarray, rng: np.random.RandomState) -> np.ndarray:
        F = self._features(X, max_components=2)
        out = np.zeros((X.shape[0], 2))
        k = min(2, F.shape[1], F.shape[0])
        if k and np.ptp(F, axis=0).any():
            pca = PCA(n_components=k, random_state=rng)
            out[:, :k] = pca.fit_transform(F)
            # principal axes have an arbitrary sign: fix it for reproducible pictures
            signs = np.sign(out[np.abs(out).argmax(axis=0), range(2)])
            out *= np.where(signs == 0, 1.0, signs)
        return out
