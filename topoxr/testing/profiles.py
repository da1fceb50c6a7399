"""Synthetic neuron profiles with planted cluster structure, for tests and benchmarks."""

from __future__ import annotations

import numpy as np
from sklearn.utils import check_random_state

__all__ = ["clustered_profiles"]


def clustered_profiles(
    n_neurons: int,
    n_features: int = 10,
    n_clusters: int | None = None,
    *,
    noise: float = 0.35,
    random_state=0,
    return_labels: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Neuron profiles drawn around cluster centres, like class NAPs of a trained layer.

    Each cluster centre is a Gaussian vector; each neuron is its cluster's centre scaled
    by a random positive gain (cosine geometry ignores it) plus Gaussian noise of
    relative size ``noise``. Neighbourhoods are therefore meaningful under the cosine
    metric, and a good layout keeps clusters together.

    Parameters
    ----------
    n_neurons : int
        Number of neurons (rows), at least 1.
    n_features : int, default 10
        Profile length (e.g. the number of classes of a NAP matrix).
    n_clusters : int, optional
        Number of clusters; defaults to ``max(2, round(sqrt(n_neurons) / 2))``.
    noise : float, default 0.35
        Standard deviation of the noise relative to the centres' unit scale.
    random_state : int, RandomState instance or None, default 0
        Seed.
    return_labels : bool, default False
        Also return the cluster of each neuron.

    Returns
    -------
    X : ndarray of shape (n_neurons, n_features), float64
    labels : ndarray of shape (n_neurons,), int
        Only when ``return_labels`` is true.

    Raises
    ------
    ValueError
        For non-positive sizes or a negative noise level.

    Examples
    --------
    >>> clustered_profiles(100, 10, 4).shape
    (100, 10)
    """
    if n_neurons < 1 or n_features < 1:
        raise ValueError(f"n_neurons and n_features must be >= 1, got {n_neurons}, {n_features}")
    if n_clusters is None:
        n_clusters = max(2, round(np.sqrt(n_neurons) / 2))
    if n_clusters < 1:
        raise ValueError(f"n_clusters must be >= 1, got {n_clusters}")
    if noise < 0:
        raise ValueError(f"noise must be >= 0, got {noise}")
    rng = check_random_state(random_state)
    centres = rng.standard_normal((n_clusters, n_features))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = rng.randint(n_clusters, size=n_neurons)
    gain = rng.uniform(0.5, 2.0, size=(n_neurons, 1))
    X = gain * (centres[labels] + noise * rng.standard_normal((n_neurons, n_features))
                / np.sqrt(n_features))
    return (X, labels) if return_labels else X
