"""How good is a layout? Neighbourhood preservation and map smoothness.

Array-level functions work on numpy arrays (``X``: profiles ``(n, f)``, ``embedding``:
positions ``(n, 2)``, ``maps``: images ``(..., ny, nx)``), paired row by row; two
DataArrays with a ``neuron`` dim are paired by neuron label instead. :func:`quality`
applies them to a laid-out xarray object, per epoch.

* :func:`trustworthiness` / :func:`continuity`: are the map's neighbours neighbours in
  profile space (and vice versa)? Same definition as
  :func:`sklearn.manifold.trustworthiness` (ties aside: resolved without regard to
  neuron order, see :func:`neighborhood_preservation`), computed in blocks of query neurons so that
  memory is ``O(block * n)``, never ``n x n``; ``n_queries`` estimates them from a random
  subset of neurons for very large layers.
* :func:`rank_correlation`: Spearman correlation between profile distances and map
  distances over all pairs, or over a seeded random sample of pairs.
* :func:`smoothness`: the paper's score. Each map is degraded by a Gaussian blur and by a
  shrink-and-enlarge of growing strength; the relative change is measured at every
  strength and the area under that curve is the score (lower = smoother, made of
  coherent blobs).
* :func:`paper_smoothness`: the paper's own measure, the area under the blur-degradation
  curve of the map rendered with the ``bwr`` colour map (as its reference code), computed
  on float arrays (the reference subtracts 8-bit images, which wraps around).
* :func:`knn_overlap`: the mean fraction of each neuron's k nearest profile neighbours that
  are among its k nearest map neighbours, on a seeded sample of neurons.
* :func:`blobs`: number and mean area of connected regions of strong positive or negative
  activity.

Smoothness alone can be gamed by collapsing neurons onto one spot, so always read it
together with trustworthiness and continuity.
"""

from __future__ import annotations

import json
import logging
import numbers
import warnings
from typing import Any

import numpy as np
import xarray as xr

from topoxr.conventions import ATTR_LAYOUT, EPOCH, NEURON, X, Y
from topoxr.similarity import (
    ATTR_PROFILE,
    FEATURE,
    ProfileError,
    _match_neurons,
    profile_matrix,
    profiles,
)

__all__ = [
    "QualityError",
    "blobs",
    "continuity",
    "knn_overlap",
    "neighborhood_preservation",
    "paper_smoothness",
    "quality",
    "rank_correlation",
    "smoothness",
    "trustworthiness",
]

logger = logging.getLogger(__name__)

#: Degradation strengths of the smoothness score (blur sigma in pixels; shrink divisor - 1).
STRENGTHS = tuple(range(1, 11))
_BLOCK_BYTES = 32 << 20
#: Largest layer for which ``n_queries="auto"`` computes trustworthiness exactly.
AUTO_EXACT = 8192
#: Query neurons used by ``n_queries="auto"`` above :data:`AUTO_EXACT`.
AUTO_QUERIES = 4096


class QualityError(ValueError):
    """Inputs of a quality metric are inconsistent or unusable."""


def _by_neuron(obj: Any) -> Any:
    """An xarray object with a ``neuron`` dim as rows, anything else as it is."""
    if isinstance(obj, xr.DataArray) and NEURON in obj.dims:
        return obj.transpose(NEURON, ...)
    return obj


def _check_pair(X: Any, embedding: Any, k: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Profiles and positions as arrays with one row per neuron, in the same order.

    Two DataArrays with a ``neuron`` dim are matched by neuron label (``X`` put in the
    embedding's order; other labels are refused); otherwise rows are paired by position.
    """
    X, embedding = _by_neuron(X), _by_neuron(embedding)
    if all(isinstance(a, xr.DataArray) and NEURON in a.dims for a in (X, embedding)):
        try:
            X = _match_neurons(X, embedding)
        except ProfileError as err:
            raise QualityError(f"X (the profiles) and the embedding (the object) are "
                               f"matched by neuron label: {err}") from err
    E = np.asarray(embedding, dtype=np.float64)
    if E.ndim != 2:
        raise QualityError(f"embedding must be 2-D (n, d), got shape {E.shape}")
    Xp, _ = profile_matrix(X, metric)
    if Xp.shape[0] != E.shape[0]:
        raise QualityError(f"X has {Xp.shape[0]} rows but the embedding {E.shape[0]}")
    if not np.isfinite(E).all():
        raise QualityError("embedding holds NaN or inf")
    n = E.shape[0]
    _check_k(k)
    if not 1 <= k < n / 2:
        raise QualityError(f"k must satisfy 1 <= k < n/2 = {n / 2}, got k={k}")
    return Xp, E


def _check_k(k: Any) -> None:
    """``k`` is a whole number of neighbours (numpy integers too), not a float or a bool."""
    _whole_number("k", k, "a number of neighbours")


def _whole_number(name: str, value: Any, what: str) -> None:
    """Refuse a float, a bool or a non-number where a count is meant (numpy ints pass)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise QualityError(f"{name} must be an int ({what}), got {name}={value!r}")


def _check_n_queries(n_queries: Any, *, auto: bool) -> int | str | None:
    """``n_queries`` checked: None, ``"auto"`` (where ``auto``) or a positive integer."""
    if n_queries is None or (auto and isinstance(n_queries, str) and n_queries == "auto"):
        return n_queries
    allowed = "a positive int, 'auto' or None" if auto else "a positive int or None"
    if isinstance(n_queries, bool) or not isinstance(n_queries, numbers.Integral):
        raise QualityError(f"n_queries must be {allowed} (None: every neuron), got "
                           f"{n_queries!r}; round it to a whole number of query neurons")
    if n_queries < 1:
        raise QualityError(f"n_queries must be {allowed} (None: every neuron), got "
                           f"{n_queries}; pass at least 1 query neuron")
    return int(n_queries)


def _check_n_pairs(n_pairs: Any) -> int:
    """``n_pairs`` checked: an integer (numpy integers too) of at least 3."""
    _whole_number("n_pairs", n_pairs, "a number of neuron pairs")
    if n_pairs < 3:
        raise QualityError(f"n_pairs must be at least 3 (a rank correlation of fewer pairs "
                           f"is meaningless: two pairs always give +-1), got n_pairs={n_pairs}")
    return int(n_pairs)


def _knn(A: np.ndarray, k: int, queries: np.ndarray | None, *,
         n_more: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Distances and indices of the ``k + n_more`` nearest neighbours of every query row.

    Self excluded, nearest first. The search structure is chosen for ``k`` neighbours
    whatever ``n_more``, so the first ``k`` are those of a plain ``k``-neighbour search.
    """
    from sklearn.neighbors import NearestNeighbors

    m = k + n_more
    nn = NearestNeighbors(n_neighbors=k).fit(A)
    if queries is None:
        return nn.kneighbors(n_neighbors=m)
    dist, ind = nn.kneighbors(A[queries], n_neighbors=m + 1)
    out_d = np.empty((len(queries), m))
    out_i = np.empty((len(queries), m), dtype=np.int64)
    for r, q in enumerate(queries):
        keep = ind[r] != q
        out_i[r] = ind[r][keep][:m]
        out_d[r] = dist[r][keep][:m]
    return out_d, out_i


def _rank_excess(dist: np.ndarray, nbrs: np.ndarray, k: int, *,
                 other: Any = None) -> float:
    """Sum over rows of max(rank - k, 0) of the given neighbours in distance rows ``dist``.

    ``rank`` of j in row i is 1 + the number of points strictly closer to i than j.
    With ``other`` (a function of row positions giving those rows' distances in the
    other space, self at inf), half the number of points exactly as close as j is added
    (the mid-rank, the mean of the ranks tied points share), leaving out points that tie
    with j in the other space too (indistinguishable from j as seen from i).
    """
    b = dist.shape[0]
    average = other is not None
    T = np.take_along_axis(dist, nbrs, axis=1)  # (b, k) distances of the neighbours
    tmax = T.max(axis=1)
    cand = dist <= tmax[:, None] if average else dist < tmax[:, None]
    m = int(np.count_nonzero(cand))
    less = np.empty((b, k))
    upto = np.empty((b, k)) if average else less
    if m <= dist.size // 16:  # few candidates: count among them only
        rows, cols = np.nonzero(cand)
        vals = dist[rows, cols]
        for c in range(k):
            less[:, c] = np.bincount(rows, weights=vals < T[rows, c], minlength=b)
            if average:
                upto[:, c] = np.bincount(rows, weights=vals <= T[rows, c], minlength=b)
    else:
        for c in range(k):
            less[:, c] = np.count_nonzero(dist < T[:, c : c + 1], axis=1)
            if average:
                upto[:, c] = np.count_nonzero(dist <= T[:, c : c + 1], axis=1)
    if not average:
        return float(np.maximum(less + 1 - k, 0).sum())
    tied = upto - less - 1.0  # other points exactly as close as j (j itself left out)
    sel = np.flatnonzero((tied > 0).any(axis=1))
    if sel.size:  # tied in both spaces: not counted
        d_other = other(sel)
        d_sel = dist[sel]
        t_other = np.take_along_axis(d_other, nbrs[sel], axis=1)
        for c in range(k):
            both = (d_sel == T[sel, c : c + 1]) & (d_other == t_other[:, c : c + 1])
            tied[sel, c] -= np.count_nonzero(both, axis=1) - 1.0
    # exactly ``less`` where nothing ties
    return float(np.maximum(less + tied / 2.0 + 1 - k, 0).sum())


def _distances_from(A: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Distances from ``A[rows]`` to every row of ``A``, self at inf (as in the blocks)."""
    from sklearn.metrics import pairwise_distances

    D = pairwise_distances(A[rows], A)
    D[np.arange(len(rows)), rows] = np.inf
    return D


def _tied_trust_excess(DX: np.ndarray, E: np.ndarray, rows: np.ndarray, k: int) -> float:
    """Trustworthiness penalty of query ``rows`` whose k-th map neighbour ties with others.

    The expected penalty over every way of choosing the k map neighbours among the tied
    neurons: the neurons strictly closer on the map than the k-th count fully, each of
    the ``t`` neurons at exactly the k-th distance with weight ``r / t`` (``r`` places
    left). Ranks in profile space (``DX``, self at inf) are 1 + the number strictly
    closer, as everywhere in trustworthiness.
    """
    from scipy.spatial.distance import cdist
    from scipy.stats import rankdata

    d = cdist(E[rows], E)
    d[np.arange(len(rows)), rows] = np.inf
    dk = np.partition(d, k - 1, axis=1)[:, k - 1 : k]
    sure, tied = d < dk, d == dk
    w = sure + tied * ((k - sure.sum(axis=1, keepdims=True))
                       / tied.sum(axis=1, keepdims=True))
    rank = rankdata(DX, method="min", axis=1)
    return float((w * np.maximum(rank - k, 0)).sum())


def neighborhood_preservation(
    X: Any,
    embedding: Any,
    k: int = 10,
    *,
    metric: str = "euclidean",
    n_queries: int | str | None = "auto",
    random_state: int | None = 0,
) -> tuple[float, float]:
    """Trustworthiness and continuity in one pass.

    Ties between distances are resolved without regard to neuron order:

    * Map ties, trustworthiness: when neurons tie with the k-th map neighbour of a
      neuron (e.g. collapsed onto one spot), the penalty is its mean over every choice
      of the k map neighbours among them (each of ``t`` tied neurons counts with weight
      ``r / t`` for the ``r`` places left). scikit-learn takes those its neighbour
      search returns first, which depends on neuron order.
    * Map ties, continuity: a profile neighbour's map rank is its mid-rank,
      ``1 + (number strictly closer) + (number of others exactly as close) / 2``, the
      mean of the ranks the tied neurons share (the standard treatment of ties in rank
      statistics). A layout that puts every neuron on one spot scores about 0.5, as a
      random one does, not 1. Neurons tied with the neighbour in profile space too
      (identical as seen from the neuron, e.g. dead neurons placed together) are not
      counted: a layout identical to the profiles scores 1, duplicates included.
    * Profile ties, trustworthiness: a map neighbour's profile rank is
      ``1 + (number strictly closer)`` (see :func:`trustworthiness`: dead neurons count
      as each other's neighbours).

    Without ties both equal :func:`sklearn.manifold.trustworthiness` (continuity with the
    two spaces swapped).

    Parameters
    ----------
    X : array_like or xarray.DataArray, shape (n, f)
        Profiles (high-dimensional space). One row per neuron: a DataArray with a
        ``neuron`` dim has its neurons as rows whatever its dim order.
    embedding : array_like or xarray.DataArray, shape (n, 2)
        The layout. When ``X`` and ``embedding`` are both DataArrays with a ``neuron``
        dim, their neurons are matched by label (``X`` taken in the embedding's order;
        other or repeated labels are refused). Otherwise (numpy arrays, or one side
        without a ``neuron`` dim) rows are paired by position.
    k : int, default 10
        Neighbourhood size, an integer (numpy integers too) with ``1 <= k < n / 2``.
    metric : {"euclidean", "cosine", "correlation"}, default "euclidean"
        Distance in profile space (dead/constant neurons as in :mod:`topoxr.profiles`).
    n_queries : int, "auto" or None, default "auto"
        Estimate both from this many random query neurons, a positive integer (numpy
        integers too), instead of all ``n`` (an unbiased estimate of the exact value:
        the metrics are means over neurons). ``None``: exact, over all neurons (time
        ``O(n^2)``, memory ``O(n)`` per block). ``"auto"``: exact up to
        :data:`AUTO_EXACT` neurons, else :data:`AUTO_QUERIES` queries.
    random_state : int, optional
        Seed of the query subset.

    Returns
    -------
    trustworthiness, continuity : float
        In ``[0, 1]``; 1 means every neighbourhood is preserved.

    Raises
    ------
    QualityError
        For rows that do not pair up (counts, or neuron labels of labelled inputs),
        ``k`` not an integer or out of range, an ``n_queries`` that is not a positive
        integer, ``"auto"`` or None, or NaN or inf positions.
    topoxr.similarity.ProfileError
        For NaN or inf profiles or an unknown metric.
    """
    from sklearn.metrics import pairwise_distances

    n_queries = _check_n_queries(n_queries, auto=True)
    Xp, E = _check_pair(X, embedding, k, metric)
    n = E.shape[0]
    queries = None
    if n_queries == "auto":
        n_queries = None if n <= AUTO_EXACT else AUTO_QUERIES
    if n_queries is not None and n_queries < n:
        rng = np.random.default_rng(random_state)
        queries = np.sort(rng.choice(n, int(n_queries), replace=False))
    d_E, nb_E = _knn(E, k, queries, n_more=1)
    # queries whose k-th map neighbour is as close as the next one (collapsed neurons):
    # which of the tied neurons sklearn returns depends on their order
    tied_E = d_E[:, k - 1] == d_E[:, k]
    nb_E = nb_E[:, :k]
    nb_X = _knn(Xp, k, queries)[1]
    q_idx = np.arange(n) if queries is None else queries
    block = max(1, _BLOCK_BYTES // (8 * n))
    trust_pen = cont_pen = 0.0
    for start in range(0, len(q_idx), block):
        rows = q_idx[start : start + block]
        local = np.arange(len(rows))
        DX = pairwise_distances(Xp[rows], Xp)
        DX[local, rows] = np.inf
        tied = tied_E[start : start + block]
        if tied.any():
            trust_pen += _tied_trust_excess(DX[tied], E, rows[tied], k)
            trust_pen += _rank_excess(DX[~tied], nb_E[start : start + block][~tied], k)
        else:
            trust_pen += _rank_excess(DX, nb_E[start : start + block], k)
        del DX
        DE = pairwise_distances(E[rows], E)
        DE[local, rows] = np.inf
        cont_pen += _rank_excess(DE, nb_X[start : start + block], k,
                                 other=lambda sel, rows=rows: _distances_from(Xp, rows[sel]))
    scale = 2.0 / (n * k * (2.0 * n - 3.0 * k - 1.0)) * (n / len(q_idx))
    return 1.0 - trust_pen * scale, 1.0 - cont_pen * scale


def trustworthiness(X: Any, embedding: Any, k: int = 10, **kwargs: Any) -> float:
    """Trustworthiness of a layout: are the map's neighbours neighbours in profile space?

    Same value as :func:`sklearn.manifold.trustworthiness` where no two profile
    distances from a neuron tie, in memory ``O(n)`` per query block. Tied neurons rank
    as close as the closest of them (a neuron's rank is 1 + the number of neurons
    strictly closer): dead neurons, whose identical profiles lie at distance 0 from each
    other, count as each other's neighbours wherever they are placed. scikit-learn
    breaks ties by index instead. So a random layout of a layer with many dead neurons
    scores above 0.5 (0.64 for the 64-neuron layer of ``docs/concepts.md``, 15 of them
    dead). Ties in the map are another matter: where neurons tie with a neuron's k-th
    map neighbour (neurons collapsed onto one spot), the score is its mean over every
    choice of k map neighbours among them (see :func:`neighborhood_preservation`), so
    it does not depend on neuron order: a fully collapsed layout scores about 0.5.

    Parameters
    ----------
    X, embedding : array_like or xarray.DataArray
        Neuron profiles ``(n_neurons, n_features)`` and the layout ``(n_neurons, 2)``,
        paired as in :func:`neighborhood_preservation` (by neuron label where both are
        DataArrays with a ``neuron`` dim, else row by row).
    k : int, default 10
        Neighbourhood size.
    **kwargs
        ``metric``, ``n_queries``, ``random_state``: see
        :func:`neighborhood_preservation`.

    Returns
    -------
    float
        Between 0 and 1 (higher is better; about 0.5 for a random layout).

    Raises
    ------
    QualityError, topoxr.similarity.ProfileError
        See :func:`neighborhood_preservation`.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> P = rng.normal(size=(60, 2))
    >>> round(trustworthiness(P, P, k=5), 6)
    1.0
    """
    return neighborhood_preservation(X, embedding, k, **kwargs)[0]


def continuity(X: Any, embedding: Any, k: int = 10, **kwargs: Any) -> float:
    """Continuity of a layout: are profile-space neighbours neighbours on the map?

    Trustworthiness with the roles of the two spaces swapped: for each neuron, its k
    nearest neighbours in profile space are ranked by map distance, and ranks beyond k
    are penalised. Neurons at exactly the same map distance (e.g. collapsed onto one
    spot) share their mid-rank, ``1 + (number strictly closer) + (number of others
    exactly as close) / 2``, whatever their order: a layout with every neuron on one spot
    scores about 0.5 (0.512 for 200 random profiles, k = 10), as a random layout does.
    Neurons that tie with the neighbour in profile space as well are left out of that
    count (see :func:`neighborhood_preservation`).
    Without map ties the value equals :func:`sklearn.manifold.trustworthiness` with the
    two spaces swapped (scikit-learn breaks ties by order instead).

    Parameters
    ----------
    X, embedding : array_like or xarray.DataArray
        Neuron profiles ``(n_neurons, n_features)`` and the layout ``(n_neurons, 2)``,
        paired as in :func:`neighborhood_preservation` (by neuron label where both are
        DataArrays with a ``neuron`` dim, else row by row).
    k : int, default 10
        Neighbourhood size.
    **kwargs
        ``metric``, ``n_queries``, ``random_state``: see
        :func:`neighborhood_preservation`.

    Returns
    -------
    float
        Between 0 and 1 (higher is better).

    Raises
    ------
    QualityError, topoxr.similarity.ProfileError
        See :func:`neighborhood_preservation`.
    """
    return neighborhood_preservation(X, embedding, k, **kwargs)[1]


def rank_correlation(
    X: Any,
    embedding: Any,
    *,
    metric: str = "euclidean",
    n_pairs: int = 200_000,
    random_state: int | None = 0,
) -> float:
    """Spearman correlation between profile distances and map distances.

    Parameters
    ----------
    X, embedding : array_like or xarray.DataArray
        Profiles ``(n, f)`` and the layout ``(n, 2)``, paired as in
        :func:`neighborhood_preservation` (by neuron label where both are DataArrays
        with a ``neuron`` dim, else row by row).
    metric : {"euclidean", "cosine", "correlation"}, default "euclidean"
        Profile distance. Cosine is evaluated as the (monotone) chord distance of
        normalised profiles, which gives the same ranks.
    n_pairs : int, default 200_000
        All pairs are used when there are at most this many, otherwise a seeded random
        sample of this many pairs. An integer (numpy integers too) of at least 3: a rank
        correlation of fewer pairs is meaningless (two pairs always give +-1).
    random_state : int, optional
        Seed of the pair sample.

    Returns
    -------
    float
        In ``[-1, 1]``; NaN when one of the distance sets is constant.

    Raises
    ------
    QualityError
        For rows that do not pair up (counts, or neuron labels of labelled inputs),
        fewer than 3 neurons, NaN or inf positions, or ``n_pairs`` that is not an
        integer of at least 3.
    topoxr.similarity.ProfileError
        For NaN or inf profiles or an unknown metric.
    """
    from scipy.spatial.distance import pdist
    from scipy.stats import spearmanr

    n_pairs = _check_n_pairs(n_pairs)
    Xp, E = _check_pair(X, embedding, 1, metric)
    n = E.shape[0]
    if n * (n - 1) // 2 <= n_pairs:
        dx, de = pdist(Xp), pdist(E)
    else:
        rng = np.random.default_rng(random_state)
        i = rng.integers(0, n, n_pairs)
        j = rng.integers(0, n - 1, n_pairs)
        j = j + (j >= i)  # uniform over j != i
        dx = np.linalg.norm(Xp[i] - Xp[j], axis=1)
        de = np.linalg.norm(E[i] - E[j], axis=1)
    if np.ptp(dx) == 0 or np.ptp(de) == 0:
        return float("nan")
    return float(spearmanr(dx, de).statistic)


# --------------------------------------------------------------------------------------
# Map-based scores
# --------------------------------------------------------------------------------------
def _nan_blur(img: np.ndarray, mask: np.ndarray, sigma: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    num = gaussian_filter(np.where(mask, img, 0.0), sigma, mode="constant")
    den = gaussian_filter(mask.astype(float), sigma, mode="constant")
    with np.errstate(invalid="ignore", divide="ignore"):
        return num / den


def _shrink_enlarge(img: np.ndarray, mask: np.ndarray, factor: float) -> np.ndarray:
    from scipy.ndimage import zoom

    shape = np.array(img.shape)
    small = np.maximum(2, np.round(shape / factor)).astype(int)
    down = tuple(small / shape)
    num = zoom(np.where(mask, img, 0.0), down, order=1, grid_mode=True, mode="grid-constant")
    den = zoom(mask.astype(float), down, order=1, grid_mode=True, mode="grid-constant")
    up = tuple(shape / small)
    num = zoom(num, up, order=1, grid_mode=True, mode="nearest")
    den = zoom(den, up, order=1, grid_mode=True, mode="nearest")
    num, den = num[: shape[0], : shape[1]], den[: shape[0], : shape[1]]
    with np.errstate(invalid="ignore", divide="ignore"):
        return num / den


def _relative_change(img: np.ndarray, mask: np.ndarray, degraded: np.ndarray) -> float:
    ok = mask & np.isfinite(degraded)
    ref = np.linalg.norm(img[ok])
    if ref == 0:
        return 0.0
    return float(np.linalg.norm(degraded[ok] - img[ok]) / ref)


def smoothness(
    maps: Any, *, strengths: tuple[int, ...] = STRENGTHS
) -> dict[str, np.ndarray]:
    """The paper's smoothness score of interpolated maps (lower = smoother).

    Every map is degraded by a Gaussian blur with ``sigma = s`` pixels and by shrinking
    it to ``1 / (s + 1)`` of its size and enlarging it back (bilinear), for each strength
    ``s``. The relative change ``||degraded - map|| / ||map||`` over the pixels inside
    the hull forms a curve over the strengths; its area (trapezoid rule, strengths
    rescaled to ``[0, 1]``) is the score of that degradation. NaN pixels (outside the
    hull) are excluded by normalised convolution, so the hull's edge is not a feature.

    Parameters
    ----------
    maps : array_like, shape (..., ny, nx)
        Interpolated maps (e.g. from :class:`topoxr.interpolate.GridInterpolator`); NaN
        outside the hull, no +-inf.
    strengths : tuple of int, default 1..10
        Degradation strengths: at least two, non-negative and strictly increasing.

    Returns
    -------
    dict
        ``"blur"``, ``"shrink"`` (areas, shape ``maps.shape[:-2]``), ``"score"`` (their
        mean), ``"blur_curve"``/``"shrink_curve"`` (``(..., len(strengths))``). A map
        without any finite pixel gives NaN.

    Raises
    ------
    QualityError
        For maps of fewer than two dims or holding +-inf (NaN marks pixels outside the
        hull), or ``strengths`` that are fewer than two, not finite, negative or not
        strictly increasing (they would not span a range).

    Examples
    --------
    >>> yy, xx = np.mgrid[0:100, 0:100] / 100
    >>> smooth, rough = np.sin(3 * xx), np.random.default_rng(0).normal(size=(100, 100))
    >>> s = smoothness(np.stack([smooth, rough]))["score"]
    >>> bool(s[0] < s[1])
    True
    """
    arr = _map_stack(maps, strengths, "smoothness", "strengths")
    t = np.asarray(strengths, dtype=float)
    if t.ndim != 1 or not np.isfinite(t).all() or (t < 0).any() or (np.diff(t) <= 0).any():
        raise QualityError(f"strengths must be finite, non-negative and strictly increasing "
                           f"(the curve's area is taken over their range), got "
                           f"{tuple(strengths)}; e.g. the default {STRENGTHS}")
    lead = arr.shape[:-2]
    flat = arr.reshape(-1, *arr.shape[-2:])
    curves = np.full((2, len(flat), len(strengths)), np.nan)
    for m, img in enumerate(flat):
        mask = np.isfinite(img)
        if not mask.any():
            continue
        for s_i, s in enumerate(strengths):
            curves[0, m, s_i] = _relative_change(img, mask, _nan_blur(img, mask, float(s)))
            curves[1, m, s_i] = _relative_change(img, mask,
                                                 _shrink_enlarge(img, mask, float(s) + 1.0))
    t = (t - t[0]) / (t[-1] - t[0])
    areas = np.trapezoid(curves, t, axis=-1)
    return {
        "blur": areas[0].reshape(lead),
        "shrink": areas[1].reshape(lead),
        "score": areas.mean(axis=0).reshape(lead),
        "blur_curve": curves[0].reshape(*lead, len(strengths)),
        "shrink_curve": curves[1].reshape(*lead, len(strengths)),
    }


def _bwr(v: np.ndarray) -> np.ndarray:
    """matplotlib's ``bwr`` colour map (blue - white - red, linear) of values in [0, 1]."""
    v = np.clip(v, 0.0, 1.0)
    return np.stack([np.minimum(1.0, 2.0 * v), 1.0 - np.abs(2.0 * v - 1.0),
                     np.minimum(1.0, 2.0 - 2.0 * v)], axis=-1)


def paper_smoothness(
    maps: Any,
    *,
    clim: tuple[float, float] | None = None,
    radii: tuple[float, ...] = tuple(0.5 * p + 0.5 for p in range(10)),
) -> dict[str, np.ndarray]:
    """The paper's blur-degradation smoothness of rendered maps (lower = smoother).

    As in the reference code of Krug et al.: every map is rendered with the ``bwr``
    colour map between ``clim`` (pixels outside the hull are black, as matplotlib's
    default "bad" colour), blurred with a Gaussian of each radius (standard deviation in
    pixels; the reference's radii ``0.5 p + 0.5`` for ``p = 0..9``), and the error
    ``sum |rendered - blurred| / sum rendered`` over the RGB channels is taken per radius;
    the score is the area under that curve over ``p`` (trapezoid rule, unit spacing).
    Differences from the reference, on purpose: images stay float (the reference
    converts to 8 bits and subtracts ``uint8`` arrays, so negative differences wrap
    around to large positive ones), and the blur is :func:`scipy.ndimage.gaussian_filter`
    with edge extension instead of PIL's box approximation.

    Parameters
    ----------
    maps : array_like, shape (..., ny, nx)
        Interpolated maps; NaN outside the hull, no +-inf.
    clim : (float, float), optional
        Colour limits, finite with ``low < high``; default symmetric ``(-m, m)`` with
        ``m`` the largest absolute value over all maps (the shared limits of a layer's
        maps; NaN areas when every map is zero or NaN).
    radii : tuple of float
        Blur radii in pixels: at least two, finite, non-negative and strictly increasing
        (the curve of growing blur, as the reference's).

    Returns
    -------
    dict
        ``"area"`` (shape ``maps.shape[:-2]``) and ``"curve"`` (``(..., len(radii))``).
        A map without any finite pixel gives NaN.

    Raises
    ------
    QualityError
        For maps of fewer than two dims or holding +-inf, ``radii`` that are fewer than
        two, not finite, negative or not strictly increasing, or a ``clim`` that is not
        a finite pair with ``low < high``.

    Examples
    --------
    >>> yy, xx = np.mgrid[0:100, 0:100] / 100
    >>> smooth, rough = np.sin(3 * xx), np.random.default_rng(0).normal(size=(100, 100))
    >>> a = paper_smoothness(np.stack([smooth, rough]))["area"]
    >>> bool(a[0] < a[1])
    True
    """
    from scipy.ndimage import gaussian_filter

    arr = _map_stack(maps, radii, "paper_smoothness", "radii")
    try:
        r = np.asarray(radii, dtype=float)
    except (TypeError, ValueError) as err:
        raise QualityError(f"radii must be numbers (blur radii in pixels), got {radii!r}"
                           ) from err
    if r.ndim != 1 or not np.isfinite(r).all() or (r < 0).any() or (np.diff(r) <= 0).any():
        raise QualityError(f"radii must be finite, non-negative and strictly increasing "
                           f"(blur radii in pixels, a curve of growing blur), got "
                           f"{tuple(radii)}; e.g. the default "
                           f"{tuple(0.5 * p + 0.5 for p in range(10))}")
    if clim is None:
        m = float(np.nanmax(np.abs(arr))) if np.isfinite(arr).any() else 0.0
        lo, hi = -m, m
    else:
        try:
            lo, hi = (float(c) for c in clim)
        except (TypeError, ValueError) as err:
            raise QualityError(f"clim must be a pair of numbers (low, high), got {clim!r}"
                               ) from err
        if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
            raise QualityError(f"clim must be finite with low < high, got {clim!r}; e.g. "
                               "(-m, m), or None for the maps' own symmetric limits")
    lead = arr.shape[:-2]
    flat = arr.reshape(-1, *arr.shape[-2:])
    curves = np.full((len(flat), len(radii)), np.nan)
    for m_i, img in enumerate(flat):
        mask = np.isfinite(img)
        if not mask.any() or not hi > lo:
            continue
        rgb = np.where(mask[..., None], _bwr((np.where(mask, img, lo) - lo) / (hi - lo)), 0.0)
        total = rgb.sum()
        for r_i, radius in enumerate(radii):
            blurred = gaussian_filter(rgb, sigma=(radius, radius, 0), mode="nearest")
            curves[m_i, r_i] = np.abs(rgb - blurred).sum() / total
    area = np.trapezoid(curves, dx=1.0, axis=-1)
    return {"area": area.reshape(lead), "curve": curves.reshape(*lead, len(radii))}


def knn_overlap(
    X: Any,
    embedding: Any,
    k: int = 10,
    *,
    metric: str = "euclidean",
    n_queries: int | None = 2048,
    random_state: int | None = 0,
) -> float:
    """Mean fraction of each neuron's k profile-space neighbours that are map neighbours.

    Parameters
    ----------
    X, embedding : array_like or xarray.DataArray
        Profiles ``(n, f)`` and the layout ``(n, 2)``, paired as in
        :func:`neighborhood_preservation` (by neuron label where both are DataArrays
        with a ``neuron`` dim, else row by row).
    k : int, default 10
        Neighbourhood size, an integer (numpy integers too) with ``1 <= k < n / 2``.
    metric : {"euclidean", "cosine", "correlation"}, default "euclidean"
        Profile distance.
    n_queries : int or None, default 2048
        Neurons sampled (seeded) as queries, a positive integer (numpy integers too; all
        when at least ``n``); None: all.
    random_state : int, optional
        Seed of the sample.

    Returns
    -------
    float
        In ``[0, 1]``; ``k / (n - 1)`` is expected from a random layout.

    Raises
    ------
    QualityError
        For rows that do not pair up (counts, or neuron labels of labelled inputs),
        ``k`` not an integer or out of range, ``n_queries`` not a positive integer or
        None, or NaN or inf positions.
    topoxr.similarity.ProfileError
        For NaN or inf profiles or an unknown metric.

    Examples
    --------
    >>> P = np.random.default_rng(0).normal(size=(50, 2))
    >>> knn_overlap(P, P, k=5)
    1.0
    """
    n_queries = _check_n_queries(n_queries, auto=False)
    Xp, E = _check_pair(X, embedding, k, metric)
    n = E.shape[0]
    queries = None
    if n_queries is not None and n_queries < n:
        queries = np.sort(np.random.default_rng(random_state).choice(n, int(n_queries),
                                                                     replace=False))
    a, b = _knn(Xp, k, queries)[1], _knn(E, k, queries)[1]
    hits = sum(np.intersect1d(r, s).size for r, s in zip(a, b, strict=True))
    return float(hits / (k * a.shape[0]))


def blobs(maps: Any, *, threshold: float = 0.5) -> dict[str, np.ndarray]:
    """Connected regions of strong positive and strong negative activity.

    A pixel is strong when ``|value| >= threshold * max|value|``, the maximum taken over
    all given maps (like the shared symmetric colour limits of a layer's maps).
    Regions are 4-connected (:func:`scipy.ndimage.label`).

    Parameters
    ----------
    maps : array_like, shape (..., ny, nx)
        Interpolated maps; NaN pixels (outside the hull) are never strong; +-inf values
        are refused (they would set the maximum, leaving no finite pixel strong).
    threshold : float, default 0.5
        Fraction of the largest absolute value.

    Returns
    -------
    dict
        ``"count"``: number of positive plus negative regions per map; ``"area"``: their
        mean area as a fraction of the map's finite pixels (0 when there is none). A map
        without any finite pixel (an empty group) has no blobs to count: NaN for both,
        as :func:`smoothness` gives it, so that means over maps (``np.nanmean``) skip it.

    Raises
    ------
    QualityError
        For maps of fewer than two dims or holding +-inf, or a ``threshold`` outside
        ``(0, 1]``.
    """
    from scipy.ndimage import label

    arr = _map_array(maps, "blobs")
    if not 0 < threshold <= 1:
        raise QualityError(f"threshold must be in (0, 1], got {threshold}")
    lead = arr.shape[:-2]
    flat = arr.reshape(-1, *arr.shape[-2:])
    vmax = np.nanmax(np.abs(arr)) if np.isfinite(arr).any() else 0.0
    count = np.zeros(len(flat))
    area = np.zeros(len(flat))
    for m, img in enumerate(flat):
        valid = np.isfinite(img)
        if not valid.any():
            count[m] = area[m] = np.nan
            continue
        if vmax == 0:
            continue
        filled = np.where(valid, img, 0.0)
        sizes: list[int] = []
        for strong in (filled >= threshold * vmax, filled <= -threshold * vmax):
            labels, n = label(strong)
            if n:
                sizes.extend(np.bincount(labels.ravel())[1:].tolist())
        count[m] = len(sizes)
        area[m] = np.mean(sizes) / valid.sum() if sizes else 0.0
    return {"count": count.reshape(lead), "area": area.reshape(lead)}


# --------------------------------------------------------------------------------------
# Labeled objects
# --------------------------------------------------------------------------------------
def _layout_xy(obj: Any) -> xr.Dataset:
    if X not in obj.coords or Y not in obj.coords:
        raise QualityError(f"the object has no layout: coordinates {X!r}, {Y!r} on 'neuron' "
                           f"are missing (compute one with topoxr.layouts.attach)")
    return xr.Dataset({X: obj.coords[X], Y: obj.coords[Y]})


def quality(
    laid_out: Any,
    *,
    k: int = 10,
    metric: str | None = None,
    profile: xr.DataArray | None = None,
    maps: xr.DataArray | None = None,
    resolution: int = 100,
    n_queries: int | str | None = "auto",
    n_pairs: int = 200_000,
    random_state: int | None = 0,
) -> xr.Dataset:
    """Every quality metric of a laid-out object, per epoch.

    The epochs scored are those of ``profile`` where it has an epoch dim, else those of
    the layout (a per-epoch layout), else those of ``maps``. An input without an epoch
    dim is used at every epoch: a profile without one, e.g. one epoch's
    (``profiles(obj).isel(epoch=-1)``) or a reference, is compared with the layout at
    every epoch, and the maps of every epoch are scored with it, one value per epoch
    (they are never pooled over epochs). To score one epoch only, keep a length-1 epoch
    dim: ``profile=profiles(obj).isel(epoch=[-1])``.

    Parameters
    ----------
    laid_out : xarray.DataArray or xarray.Dataset
        An object with ``x``, ``y`` coordinates on ``neuron`` (on ``(neuron, epoch)`` for
        per-epoch layouts), e.g. the result of :func:`topoxr.layouts.attach`: NAPs or
        activations.
    k : int, default 10
        Neighbourhood size of trustworthiness and continuity, an integer of at least 1
        (reduced to ``(n-1)//2`` for tiny layers, recorded in the attributes).
    metric : str, optional
        Profile distance; default: the layout's metric from its ``topoxr_layout``
        attribute, else ``"cosine"``.
    profile : xarray.DataArray, optional
        Profiles to compare with, dims ``(neuron, feature[, epoch])``; default
        :func:`topoxr.similarity.profiles` of ``laid_out`` (its NAPs by label, or the
        NAPs themselves). Matched to ``laid_out``'s neurons by label. Without an epoch
        dim, used at every epoch of the layout and maps (see above).
    maps : xarray.DataArray, optional
        Values to draw as maps for smoothness and blobs, dims ``(neuron, <group>,
        epoch)``; default: the NAPs by label (or ``laid_out`` itself if it is NAPs).
        Matched to ``laid_out``'s neurons by label.
    resolution : int, default 100
        Grid of the interpolated maps.
    n_queries : int, "auto" or None, default "auto"
        Neurons queried for trustworthiness and continuity; see
        :func:`neighborhood_preservation`.
    n_pairs : int, default 200000
        Neuron pairs sampled for the rank correlation; see :func:`rank_correlation`.
    random_state : int, optional
        Seed of the sampling (queries and pairs).

    Returns
    -------
    xarray.Dataset
        Variables ``trustworthiness``, ``continuity``, ``spearman``, ``knn_overlap``
        (:func:`knn_overlap`), ``smoothness`` (mean over groups), ``smoothness_blur``,
        ``smoothness_shrink``, ``smoothness_paper`` (:func:`paper_smoothness`, the
        paper's own measure, same shared colour limits for a layer's maps),
        ``blob_count``, ``blob_area`` (:func:`blobs`), each on ``epoch`` (if the input
        has one, see above). Map scores are means over the groups that have a map at
        that epoch (never over epochs): a
        group without samples there (all-NaN map) is skipped, not counted as 0; attrs
        ``k``, ``metric``, ``resolution``, ``n_queries`` and ``profile``: the description
        of the profiles compared with (JSON, as :func:`topoxr.profiles` records it;
        ``null`` for given profiles without one).

    Raises
    ------
    QualityError
        For ``k`` not an integer or below 1, ``n_pairs`` not an integer of at least 3, an
        object without a layout, maps without one group dim, or inputs with epoch dims
        that lack epochs scored (see above).
    topoxr.similarity.ProfileError
        For profiles or maps that hold other neurons than ``laid_out`` (matched by label).

    Notes
    -----
    A warning is logged (logger ``topoxr.metrics``) when the profiles compared with are
    described otherwise than those the layout was fitted on (the ``profile`` of its
    ``topoxr_layout`` attribute), e.g. a layout of activation profiles scored against
    the default NAPs by label.
    """
    from topoxr.grouping import naps as compute_naps
    from topoxr.interpolate import GridInterpolator
    from topoxr.similarity import _is_nap

    _check_k(k)
    if not k >= 1:
        raise QualityError(f"k must be >= 1, got k={k}")
    n_pairs = _check_n_pairs(n_pairs)
    xy = _layout_xy(laid_out)
    desc = json.loads(laid_out.attrs.get(ATTR_LAYOUT, "{}") or "{}")
    if metric is None:
        metric = desc.get("metric", "cosine")
    if profile is None:
        profile = profiles(laid_out)
    used = json.loads(profile.attrs[ATTR_PROFILE]) if ATTR_PROFILE in profile.attrs else None
    fitted = desc.get("profile")
    if used is not None and fitted and used != fitted:
        logger.warning(
            "the layout was fitted on profiles %s, and quality compares the positions with "
            "profiles %s: the scores measure how well it keeps the latter; pass "
            "profile=topoxr.profiles(obj, ...) with the layout's to score what it was "
            "fitted on", json.dumps(fitted), json.dumps(used))
    if maps is None:
        maps = laid_out if _is_nap(laid_out) else compute_naps(laid_out, by="label")
    # One pass over the data for both (they are the same NAPs by default), not one per epoch.
    import dask

    profile, maps = dask.compute(profile, maps)
    # matched to the layout's neurons by label: the same neurons in another order are
    # put in the layout's order, other labels are refused
    profile = _match_neurons(profile, laid_out).transpose(NEURON, FEATURE, ...)
    maps = _match_neurons(maps, laid_out)
    gdim = [d for d in maps.dims if d not in (NEURON, EPOCH)]
    if len(gdim) != 1:
        raise QualityError(f"maps need dims (neuron, <group>[, epoch]), got {maps.dims}")
    maps = maps.transpose(NEURON, gdim[0], ...)
    epochs = _scored_epochs(profile, xy, maps)
    n = profile.sizes[NEURON]
    k_used = max(1, min(int(k), int(np.ceil(n / 2)) - 1))
    records: dict[str, list[float]] = {name: [] for name in (
        "trustworthiness", "continuity", "spearman", "knn_overlap", "smoothness",
        "smoothness_blur", "smoothness_shrink", "smoothness_paper", "blob_count",
        "blob_area")}
    for epoch in epochs:
        P = np.asarray(_at_epoch(profile, epoch).values)
        xy_e = _at_epoch(xy, epoch)
        pts = np.stack([xy_e[X].values, xy_e[Y].values], axis=1)
        t, c = neighborhood_preservation(P, pts, k_used, metric=metric, n_queries=n_queries,
                                         random_state=random_state)
        r = rank_correlation(P, pts, metric=metric, n_pairs=n_pairs, random_state=random_state)
        ov = knn_overlap(P, pts, k_used, metric=metric,
                         n_queries=None if n_queries == "auto" and n <= AUTO_EXACT
                         else (AUTO_QUERIES if n_queries == "auto" else n_queries),
                         random_state=random_state)
        vals = np.asarray(_at_epoch(maps, epoch)).T  # (groups, neurons)
        img = GridInterpolator(pts[:, 0], pts[:, 1], resolution=resolution)(vals)
        sm = smoothness(img)
        paper = paper_smoothness(img)["area"]
        bl = blobs(img)
        for name, value in (("trustworthiness", t), ("continuity", c), ("spearman", r),
                            ("knn_overlap", ov),
                            ("smoothness", _nanmean(sm["score"])),
                            ("smoothness_paper", _nanmean(paper)),
                            ("smoothness_blur", _nanmean(sm["blur"])),
                            ("smoothness_shrink", _nanmean(sm["shrink"])),
                            # groups empty at this epoch (all-NaN maps) are NaN: skipped
                            ("blob_count", _nanmean(bl["count"])),
                            ("blob_area", _nanmean(bl["area"]))):
            records[name].append(float(value))
    if epochs[0] is None:
        data = {name: ((), v[0]) for name, v in records.items()}
        coords: dict[str, Any] = {}
    else:
        data = {name: ((EPOCH,), np.asarray(v)) for name, v in records.items()}
        coords = {EPOCH: np.asarray(epochs)}
    return xr.Dataset(data, coords=coords, attrs={"k": int(k_used), "metric": metric,
                                                  "resolution": int(resolution),
                                                  "n_queries": str(n_queries),
                                                  "profile": json.dumps(used)})


def _scored_epochs(profile: xr.DataArray, xy: xr.Dataset, maps: xr.DataArray) -> Any:
    """The epochs :func:`quality` scores, checked to be in every input that has epochs.

    The profiles' epochs where they have an epoch dim, else the layout's (per-epoch
    layouts), else the maps'; ``[None]`` when none has one. An input without an epoch
    dim is the same at every epoch.
    """
    sources = [(name, obj) for name, obj in (("the profiles", profile),
                                            ("the layout (x, y)", xy), ("the maps", maps))
               if EPOCH in obj.dims]
    if not sources:
        return [None]
    first, ref = sources[0]
    epochs = ref[EPOCH].values
    for name, obj in sources[1:]:
        have = obj[EPOCH].values
        missing = [_plain(e) for e in epochs if e not in have]
        if missing:
            raise QualityError(
                f"quality scores the epochs of {first} {[_plain(e) for e in epochs]}, and "
                f"{name} lack epoch(s) {missing} (they have {[_plain(e) for e in have]}); "
                "pass inputs with the same epochs, or one without an epoch dim (used at "
                "every epoch)")
    return epochs


def _plain(v: Any) -> Any:
    return v.item() if isinstance(v, np.generic) else v


def _at_epoch(obj: Any, epoch: Any) -> Any:
    """``obj`` at ``epoch`` where it has an epoch dim, else ``obj`` itself (broadcast)."""
    return obj.sel({EPOCH: epoch}) if epoch is not None and EPOCH in obj.dims else obj


def _nanmean(values: np.ndarray) -> float:
    """Mean of the finite values (maps of groups empty at an epoch are NaN); NaN if none."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "mean of empty slice"
        return float(np.nanmean(values))


def _map_array(maps: Any, func: str) -> np.ndarray:
    """``maps`` as float64 ``(..., ny, nx)``: NaN (outside the hull) allowed, inf refused."""
    arr = np.asarray(maps, dtype=np.float64)
    if arr.ndim < 2:
        raise QualityError(f"maps must have shape (..., ny, nx), got {arr.shape}")
    inf = np.isinf(arr)
    if inf.any():
        first = tuple(int(i) for i in np.argwhere(inf)[0])
        raise QualityError(
            f"{func}: maps hold {int(inf.sum())} infinite value(s) (the first at index "
            f"{first}); NaN marks pixels without a value (outside the hull), but +-inf is "
            "no activity value: check the values drawn (e.g. overflowed activations)")
    return arr


def _map_stack(maps: Any, steps: Any, func: str, what: str) -> np.ndarray:
    """``maps`` as float64 ``(..., ny, nx)``, checked, for a degradation curve of ``steps``."""
    arr = _map_array(maps, func)
    if len(steps) < 2:
        raise QualityError(f"{func} needs at least two {what}")
    return arr
