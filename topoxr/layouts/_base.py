"""Shared machinery of every layout estimator: validation, distances, unit-square output.

A layout estimator maps ``n`` neuron profiles (or an ``n x n`` distance matrix) to ``n``
points of the plane. Every estimator derives from :class:`BaseLayout`, which follows the
scikit-learn contract: ``__init__`` only stores parameters, :meth:`BaseLayout.fit`
validates its input and sets the fitted attribute ``embedding_``.
"""

from __future__ import annotations

import logging
import math
import numbers
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.metrics import pairwise_distances
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_array

__all__ = [
    "MIN_NEURONS",
    "METRICS",
    "BaseLayout",
    "LayoutInputError",
    "check_parameter",
    "distance_matrix",
    "features_for_metric",
    "to_unit_square",
]

logger = logging.getLogger(__name__)

#: Fewest neurons a layout is computed for.
MIN_NEURONS = 5
#: Metrics accepted by every estimator (``"precomputed"``: ``X`` is a distance matrix).
METRICS = ("cosine", "correlation", "euclidean", "precomputed")


class LayoutInputError(ValueError):
    """The profiles or distances given to a layout estimator are not usable."""


def check_parameter(name: str, value: Any, *, low: float | None = None,
                    high: float | None = None, low_open: bool = False, integer: bool = False,
                    optional: bool = False) -> None:
    """Refuse a numeric estimator parameter outside its range, naming it.

    Parameters
    ----------
    name : str
        The parameter's name, as the estimator takes it.
    value : object
        Its value.
    low, high : float, optional
        Bounds; ``low`` is inclusive unless ``low_open``, ``high`` is inclusive.
    low_open : bool, default False
        Whether ``low`` itself is refused (``learning_rate > 0``).
    integer : bool, default False
        Whether only whole numbers (Python or numpy integers) are taken.
    optional : bool, default False
        Whether None (the estimator's default) is taken.

    Raises
    ------
    LayoutInputError
        For a bool, a non-number, NaN or infinity, a float where an integer is
        needed, or a value out of range.
    """
    if value is None and optional:
        return
    kind = numbers.Integral if integer else numbers.Real
    ok = (isinstance(value, kind) and not isinstance(value, bool | np.bool_)
          and math.isfinite(value)
          and (low is None or (value > low if low_open else value >= low))
          and (high is None or value <= high))
    if not ok:
        bounds = [f"{'>' if low_open else '>='} {low:g}" if low is not None else "",
                  f"<= {high:g}" if high is not None else ""]
        rule = " and ".join(b for b in bounds if b)
        what = ("an integer" if integer else "a finite number") + (
            ", or None for the default" if optional else "")
        raise LayoutInputError(f"{name} must be {rule} ({what}), got {value!r}" if rule
                               else f"{name} must be {what}, got {value!r}")


def to_unit_square(coords: np.ndarray) -> np.ndarray:
    """Scale 2-D points into the unit square, keeping their aspect ratio.

    The longer side of the bounding box is mapped onto ``[0, 1]``; the shorter one is
    scaled by the same factor and centred, so distances keep their ratios. Points that
    all coincide are put at the centre ``(0.5, 0.5)``.

    Parameters
    ----------
    coords : ndarray of shape (n, 2)
        Finite coordinates.

    Returns
    -------
    ndarray of shape (n, 2), float64
        The scaled coordinates, all in ``[0, 1]``.

    Examples
    --------
    >>> to_unit_square(np.array([[0.0, 0.0], [4.0, 2.0]]))
    array([[0.  , 0.25],
           [1.  , 0.75]])
    """
    coords = np.asarray(coords, dtype=np.float64)
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise LayoutInputError(f"coordinates must have shape (n, 2), got {coords.shape}")
    if not np.isfinite(coords).all():
        raise LayoutInputError("the layout produced non-finite coordinates")
    if coords.size:
        # a power of two puts every value in [-1, 1] exactly (no rounding), so the result
        # is the same, but a span such as 1e308 - (-1e308) no longer overflows to inf
        _, exponent = np.frexp(np.abs(coords).max())
        coords = np.ldexp(coords, -int(exponent))
    lo = coords.min(axis=0)
    span = coords.max(axis=0) - lo
    scale = span.max()
    if not scale > 0:
        return np.full_like(coords, 0.5)
    out = (coords - lo) / scale
    out += (1.0 - span / scale) / 2.0  # centre the shorter side
    return np.clip(out, 0.0, 1.0)


def features_for_metric(X: np.ndarray, metric: str) -> np.ndarray:
    """Transform profiles so that Euclidean geometry matches ``metric``.

    Cosine: rows scaled to unit length (Euclidean distance between unit vectors is a
    monotone function of the cosine distance). Correlation: rows centred, then scaled to
    unit length. Euclidean: unchanged. Rows for which the metric is undefined, dead
    neurons (rows of norm at most 1e-7 times the largest, e.g. a constant output that
    normalisation left as rounding noise) and, under ``"correlation"``, constant rows
    (the rows :func:`topoxr.similarity.degenerate_rows` reports), become a unit vector
    along one extra column shared by all of them: at cosine distance 1 from every live
    neuron and 0 from each other (see :func:`topoxr.similarity.profile_matrix`).

    Parameters
    ----------
    X : ndarray of shape (n_neurons, n_features)
        Profiles.
    metric : {"cosine", "correlation", "euclidean"}
        The metric the layout should respect.

    Returns
    -------
    ndarray of shape (n_neurons, n_features)
    """
    if metric == "euclidean":
        return X
    if metric not in ("cosine", "correlation"):
        raise LayoutInputError(f"unknown metric {metric!r}; use one of {METRICS}")
    from topoxr.similarity import profile_matrix

    return profile_matrix(X, metric)[0]


def distance_matrix(X: np.ndarray, metric: str) -> np.ndarray:
    """Dense pairwise distances between profiles, with zero-norm rows handled.

    Under ``"cosine"`` (and ``"correlation"``) a zero (or constant) profile has no
    direction: it is at distance 1 (orthogonal) from every live neuron and 0 from the
    other degenerate ones, the convention of :func:`topoxr.similarity.pairwise_distances`
    (scikit-learn's :func:`~sklearn.metrics.pairwise.cosine_distances` puts two zero
    profiles at 1 instead). No epsilon is added to the data.

    Parameters
    ----------
    X : ndarray of shape (n_neurons, n_features) or (n, n)
        Profiles, or distances when ``metric="precomputed"`` (returned as they are).
    metric : {"cosine", "correlation", "euclidean", "precomputed"}

    Returns
    -------
    ndarray of shape (n, n), float64, symmetric, zero diagonal, non-negative
    """
    if metric == "precomputed":
        return X
    if metric in ("cosine", "correlation"):
        U = features_for_metric(X, metric)  # unit rows, degenerate ones included
        D = 1.0 - U @ U.T
    else:
        D = pairwise_distances(X, metric=metric)
    np.fill_diagonal(D, 0.0)
    np.clip(D, 0.0, None, out=D)
    return (D + D.T) / 2.0


class BaseLayout(TransformerMixin, BaseEstimator):
    """Base class of the layout estimators.

    Subclasses implement ``_embed(X, rng)``, returning raw ``(n, 2)`` coordinates for
    validated input ``X`` (profiles, or a distance matrix when ``metric="precomputed"``).
    :meth:`fit` validates, seeds, calls ``_embed`` and scales the result into the unit
    square keeping its aspect ratio.

    Attributes
    ----------
    embedding_ : ndarray of shape (n_neurons, 2)
        Neuron coordinates in ``[0, 1]^2``.
    n_features_in_ : int
        Number of profile features (``n_neurons`` for a precomputed distance matrix).
    n_zero_profiles_ : int
        Number of all-zero profiles (dead neurons) found in ``X`` (0 when precomputed).
    """

    #: Whether the estimator needs ``X`` as profiles (``False``: distances suffice).
    _needs_features = False

    def fit(self, X: Any, y: Any = None) -> BaseLayout:
        """Compute the layout of the neurons described by ``X``.

        Parameters
        ----------
        X : array-like of shape (n_neurons, n_features) or (n_neurons, n_neurons)
            One profile per neuron, or a distance matrix when ``metric="precomputed"``.
        y : None
            Ignored; present for API consistency.

        Returns
        -------
        self

        Raises
        ------
        LayoutInputError
            (a ``ValueError``) for non-finite values, fewer than 5 neurons, an unknown
            metric, or a precomputed matrix that is not a square, symmetric,
            non-negative distance matrix.
        """
        X = self._validate(X)
        rng = check_random_state(getattr(self, "random_state", None))
        raw = np.asarray(self._embed(X, rng), dtype=np.float64)
        if raw.shape != (X.shape[0], 2):
            raise RuntimeError(f"{type(self).__name__} returned shape {raw.shape}")
        self.embedding_ = to_unit_square(raw)
        return self

    def fit_transform(self, X: Any, y: Any = None, **fit_params: Any) -> np.ndarray:
        """Fit and return the coordinates, an array of shape (n_neurons, 2) in [0, 1]^2.

        Parameters
        ----------
        X : array-like of shape (n_neurons, n_features) or (n_neurons, n_neurons)
            Profiles, or distances when ``metric="precomputed"``.
        y : None
            Ignored.
        **fit_params
            Ignored; accepted for scikit-learn compatibility.

        Returns
        -------
        ndarray of shape (n_neurons, 2)
        """
        return self.fit(X, y).embedding_

    # -- helpers for subclasses ---------------------------------------------------------
    def _validate(self, X: Any) -> np.ndarray:
        metric = getattr(self, "metric", "cosine")
        if metric not in METRICS:
            raise LayoutInputError(f"unknown metric {metric!r}; use one of {list(METRICS)}")
        try:
            X = check_array(X, dtype=np.float64, ensure_min_samples=1, ensure_min_features=1)
        except ValueError as err:
            raise LayoutInputError(f"invalid neuron profiles: {err}") from err
        n = X.shape[0]
        if n < MIN_NEURONS:
            raise LayoutInputError(
                f"a layout needs at least {MIN_NEURONS} neurons (rows of X), got n_samples={n}"
                f" (X has shape {X.shape})"
            )
        self.n_features_in_ = X.shape[1]
        if metric == "precomputed":
            if X.shape[0] != X.shape[1]:
                raise LayoutInputError(
                    f"metric='precomputed' needs a square distance matrix, got {X.shape}"
                )
            if (X < 0).any():
                raise LayoutInputError("a precomputed distance matrix must be non-negative")
            if not np.allclose(X, X.T, atol=1e-8):
                raise LayoutInputError("a precomputed distance matrix must be symmetric")
            self.n_zero_profiles_ = 0
        else:
            zero = int((~np.any(X, axis=1)).sum())
            self.n_zero_profiles_ = zero
            if zero:
                logger.info("%d of %d neuron profiles are all zero (dead neurons)", zero, n)
        return X

    def _distances(self, X: np.ndarray) -> np.ndarray:
        """Dense distances for validated ``X`` under ``self.metric``."""
        return distance_matrix(X, getattr(self, "metric", "cosine"))

    def _features(self, X: np.ndarray, max_components: int = 50) -> np.ndarray:
        """Euclidean features for validated ``X`` that respect ``self.metric``.

        Precomputed distances are turned into features by classical (Torgerson)
        multidimensional scaling with at most ``max_components`` dimensions.
        """
        metric = getattr(self, "metric", "cosine")
        if metric != "precomputed":
            return features_for_metric(X, metric)
        return classical_mds(X, max_components)

    def _more_tags(self) -> dict[str, Any]:  # scikit-learn < 1.6
        return {"preserves_dtype": [np.float64], "non_deterministic": False}

    def __sklearn_tags__(self):  # scikit-learn >= 1.6
        tags = super().__sklearn_tags__()
        tags.transformer_tags.preserves_dtype = ["float64"]
        tags.requires_fit = True
        return tags


def classical_mds(D: np.ndarray, n_components: int) -> np.ndarray:
    """Classical (Torgerson) scaling: Euclidean coordinates whose distances match ``D``.

    Parameters
    ----------
    D : ndarray of shape (n, n)
        Symmetric distances.
    n_components : int
        Most dimensions to keep (only those with a positive eigenvalue are kept).

    Returns
    -------
    ndarray of shape (n, k), ``1 <= k <= n_components``
    """
    from scipy.linalg import eigh

    n = D.shape[0]
    k = max(1, min(n_components, n - 1))
    B = D**2
    B = B - B.mean(axis=0) - B.mean(axis=1)[:, None] + B.mean()
    B *= -0.5
    vals, vecs = eigh(B, subset_by_index=[n - k, n - 1])
    order = np.argsort(vals)[::-1]
    vals, vecs = vals[order], vecs[:, order]
    keep = vals > 1e-12 * max(vals[0], 1e-300)
    if not keep.any():
        return np.zeros((n, 1))
    return vecs[:, keep] * np.sqrt(vals[keep])
