"""Self-organizing-map layout: neurons at the best-matching cell of a square SOM."""

from __future__ import annotations

import numpy as np

from topoxr.layouts._base import BaseLayout, check_parameter

__all__ = ["SOMLayout"]


class SOMLayout(BaseLayout):
    """Neurons placed on the grid of a self-organizing map trained on their profiles.

    As in the paper: a square map of ``(floor(sqrt(n)) + 1)^2`` cells (at least 2 x 2),
    weights initialised from randomly chosen profiles, online training over
    ``n_epochs * n`` randomly drawn profiles with a Gaussian neighbourhood and
    asymptotically decaying learning rate and radius (MiniSom's defaults, in numpy). Each
    neuron goes to its best-matching cell; neurons sharing a cell are spread evenly on a
    circle of radius ``collision_radius`` cells around it, from a random start angle.

    Parameters
    ----------
    n_epochs : int, default 10
        Training passes over the profiles.
    sigma : float, default 1.0
        Initial neighbourhood radius, in cells.
    learning_rate : float, default 0.5
        Initial learning rate.
    collision_radius : float, default 0.2
        Radius of the circle that neurons sharing a cell are spread on.
    metric : {"cosine", "correlation", "euclidean", "precomputed"}, default "cosine"
        Metric of the profiles (cosine: the map is trained on unit-length profiles), or
        ``"precomputed"`` (trained on a classical-MDS embedding of the distances).
    random_state : int, RandomState instance or None, default None
        Seed of the initial weights, the sample order and the circle angles.

    Attributes
    ----------
    embedding_ : ndarray of shape (n_neurons, 2)
        Coordinates in ``[0, 1]^2``.
    weights_ : ndarray of shape (side, side, n_features)
        The trained map.

    Notes
    -----
    Cost: ``O(n_epochs * n * cells * d)`` time with ``cells ~ n``, i.e. quadratic in the
    number of neurons; a Python loop over ``n_epochs * n`` updates.
    """

    def __init__(
        self,
        *,
        n_epochs: int = 10,
        sigma: float = 1.0,
        learning_rate: float = 0.5,
        collision_radius: float = 0.2,
        metric: str = "cosine",
        random_state=None,
    ) -> None:
        self.n_epochs = n_epochs
        self.sigma = sigma
        self.learning_rate = learning_rate
        self.collision_radius = collision_radius
        self.metric = metric
        self.random_state = random_state

    def _embed(self, X: np.ndarray, rng: np.random.RandomState) -> np.ndarray:
        check_parameter("n_epochs", self.n_epochs, low=1, integer=True)
        check_parameter("collision_radius", self.collision_radius, low=0)
        for name in ("sigma", "learning_rate"):
            check_parameter(name, getattr(self, name), low=0, low_open=True)
        F = self._features(X)
        n, d = F.shape
        side = max(int(np.sqrt(n)) + 1, 2)
        W = F[rng.randint(n, size=side * side)].copy()  # (cells, d)
        grid = np.arange(side, dtype=np.float64)
        n_iter = int(self.n_epochs * n)
        order = rng.randint(n, size=n_iter)
        half = n_iter / 2.0
        for t, i in enumerate(order):
            x = F[i]
            diff = x - W
            bmu = int(np.einsum("ij,ij->i", diff, diff).argmin())
            decay = 1.0 + t / half
            eta, sig = self.learning_rate / decay, self.sigma / decay
            bx, by = divmod(bmu, side)
            gx = np.exp(-((grid - bx) ** 2) / (2 * sig * sig))
            gy = np.exp(-((grid - by) ** 2) / (2 * sig * sig))
            h = np.outer(gx, gy).ravel()
            W += (eta * h)[:, None] * diff
        self.weights_ = W.reshape(side, side, d)
        # best-matching cell of every neuron, in chunks to bound memory
        bmus = np.empty(n, dtype=np.int64)
        sq = (W * W).sum(axis=1)
        for start in range(0, n, 4096):
            block = F[start : start + 4096]
            bmus[start : start + 4096] = (sq[None, :] - 2.0 * block @ W.T).argmin(axis=1)
        coords = np.stack(divmod(bmus, side), axis=1).astype(np.float64)
        counts = np.bincount(bmus, minlength=side * side)
        rank = np.empty(n, dtype=np.int64)
        order = np.argsort(bmus, kind="stable")
        starts = np.concatenate([[0], np.cumsum(counts)])[bmus[order]]
        rank[order] = np.arange(n) - starts
        m = counts[bmus]
        shared = m > 1
        offset = rng.uniform(0.0, 2 * np.pi, size=side * side)[bmus]
        angle = offset + 2 * np.pi * rank / m
        coords[shared, 0] += self.collision_radius * np.sin(angle[shared])
        coords[shared, 1] += self.collision_radius * np.cos(angle[shared])
        return coords
