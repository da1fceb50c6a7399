"""Random layout: the baseline every other method is compared with."""

from __future__ import annotations

import numpy as np

from topoxr.layouts._base import BaseLayout

__all__ = ["RandomLayout"]


class RandomLayout(BaseLayout):
    """Neurons placed uniformly at random in the unit square (the paper's baseline).

    Parameters
    ----------
    metric : {"cosine", "correlation", "euclidean", "precomputed"}, default "cosine"
        Accepted for a uniform interface; the profiles are only validated.
    random_state : int, RandomState instance or None, default None
        Seed of the positions.

    Attributes
    ----------
    embedding_ : ndarray of shape (n_neurons, 2)
        Coordinates in ``[0, 1]^2``.

    Examples
    --------
    >>> X = np.random.default_rng(0).random((10, 4))
    >>> RandomLayout(random_state=0).fit_transform(X).shape
    (10, 2)
    """

    def __init__(self, *, metric: str = "cosine", random_state=None) -> None:
        self.metric = metric
        self.random_state = random_state

    def _embed(self, X: np.ndarray, rng: np.random.RandomState) -> np.ndarray:
        return rng.uniform(size=(X.shape[0], 2))
