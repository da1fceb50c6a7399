"""Neuron profiles and the distances between them.

A *profile* is the vector that describes one neuron's behaviour (PAPER.md, step 3):
its column of the NAP matrix (values across groups), or its raw activations over a
seeded random subset of samples. Layouts place neurons with similar profiles close
together, so profiles and their distances are the input of every layout method.

Notes
-----
Degenerate neurons: cosine distance is undefined for a profile of zeros (a *dead*
neuron, or a neuron whose NAPs are the same for every group, which normalisation turns
into zeros) and correlation distance for a constant profile. topoxr never hides this
behind an epsilon. A profile whose norm (after centring, for ``"correlation"``) is at
most ``tol`` times the largest norm of the layer is *degenerate*; then, by definition:

* its distance to every non-degenerate neuron is 1 (what an orthogonal/uncorrelated
  neuron would get), and its distance to other degenerate neurons is 0;
* a warning is logged and the neuron ids are listed in the ``dead_neurons`` (all-zero
  profile) and ``constant_neurons`` (constant, non-zero profile) attributes.

The same convention holds for the Euclidean coordinates of :func:`profile_matrix`
(used by :mod:`topoxr.quality` and, through
:func:`topoxr.layouts._base.features_for_metric`, by the layout estimators): rows are
L2-normalised (centred first for correlation) and degenerate rows become a unit vector
along one extra column, the same for all of them, so the Euclidean distance between any
two rows is ``sqrt(2 * d)``, ``d`` the distance defined here (1 between a live and a
degenerate neuron, 0 between degenerate ones): Euclidean methods see the same
neighbourhoods as the cosine distances.
"""

from __future__ import annotations

import json
import logging
import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np
import xarray as xr

from topoxr.conventions import ACTIVATION, COMMITTED, CORRECT, EPOCH, LABEL, NEURON, SAMPLE
from topoxr.grouping import ATTR_NAP, _truth, naps

__all__ = [
    "ATTR_PROFILE",
    "FEATURE",
    "METRICS",
    "ProfileError",
    "degenerate_rows",
    "distances",
    "pairwise_distances",
    "profile_matrix",
    "profiles",
]

logger = logging.getLogger(__name__)

#: Dimension of the profile vectors.
FEATURE = "feature"
#: Attribute describing how profiles were computed (JSON).
ATTR_PROFILE = "topoxr_profile"
#: Supported distance metrics.
METRICS = ("cosine", "correlation", "euclidean")
#: Default relative tolerance under which a profile counts as zero.
DEFAULT_TOL = 1e-7


class ProfileError(ValueError):
    """Profiles cannot be computed or compared as asked."""


def _is_nap(obj: Any) -> bool:
    return isinstance(obj, xr.DataArray) and (ATTR_NAP in obj.attrs or obj.name == "nap")


def _nap_profiles(nap: xr.DataArray) -> xr.DataArray:
    gdims = [d for d in nap.dims if d not in (NEURON, EPOCH)]
    if len(gdims) != 1:
        raise ProfileError(f"NAPs must have exactly one group dimension besides 'neuron' and "
                           f"'epoch'; got dims {nap.dims}")
    gdim = gdims[0]
    drop = [c for c in nap.coords if gdim in nap.coords[c].dims]
    prof = nap.drop_vars(drop)
    prof = prof.rename({gdim: FEATURE}).assign_coords(
        {FEATURE: np.arange(nap.sizes[gdim])}
    )
    # Keep what each feature is, as a plain string coordinate.
    labels = [str(v) if not isinstance(v, tuple) else ",".join(map(str, v))
              for v in nap.indexes[gdim]] if gdim in nap.indexes else \
        [str(i) for i in range(nap.sizes[gdim])]
    return prof.assign_coords({"feature_group": (FEATURE, np.asarray(labels, dtype=str))})


def _choose_samples(
    da: xr.DataArray,
    n_samples: int,
    balanced: bool,
    correct_only: bool,
    rng: np.random.Generator,
) -> np.ndarray:
    """Positions (feature, epoch) of the samples chosen for every epoch."""
    n, m = da.sizes[SAMPLE], da.sizes[EPOCH]
    ok = np.ones((n, m), dtype=bool)
    if COMMITTED in da.coords:
        ok &= _truth(da.coords[COMMITTED])  # a missing value (NaN) is not committed
    if correct_only:
        if CORRECT not in da.coords:
            raise ProfileError("correct_only=True needs a 'correct' coordinate (predictions "
                               "and labels)")
        ok &= _truth(da.coords[CORRECT])
    if balanced:
        if LABEL not in da.coords:
            raise ProfileError("balanced=True needs a 'label' coordinate")
        labels = np.asarray(da.coords[LABEL].values)
        classes = np.unique(labels)
        if n_samples < len(classes):
            raise ProfileError(
                f"balanced sampling needs at least one sample per label: n_samples={n_samples} "
                f"is fewer than the {len(classes)} labels {classes.tolist()[:20]}; pass "
                f"n_samples >= {len(classes)} or balanced=False")
        per_epoch = np.array([[int((ok[labels == c, e]).sum()) for e in range(m)]
                              for c in classes]).reshape(len(classes), m)
        if (per_epoch < 1).any():
            c_i, e_i = np.argwhere(per_epoch < 1)[0]
            what = "committed" + (", correctly predicted" if correct_only else "")
            raise ProfileError(
                f"balanced sampling impossible: label {_plain(classes[c_i])!r} has no eligible "
                f"({what}) sample at epoch {_plain(da[EPOCH].values[e_i])!r} (labels "
                f"{classes.tolist()[:20]}); pass balanced=False, or select epochs where "
                "every label has samples")
        per_class = min(n_samples // len(classes), int(per_epoch.min()))
        k = per_class * len(classes)
    else:
        k = min(n_samples, int(ok.sum(axis=0).min()))
        if k < 1:
            raise ProfileError("no eligible (committed"
                               + (", correct" if correct_only else "") + ") samples at some epoch")
    if k < n_samples:
        logger.warning("profiles use %d samples per epoch instead of n_samples=%d "
                       "(not enough eligible samples)", k, n_samples)
    chosen = np.empty((k, m), dtype=np.int64)
    for e in range(m):
        if balanced:
            parts = [rng.choice(np.flatnonzero(ok[:, e] & (labels == c)), per_class, replace=False)
                     for c in classes]
            pos = np.concatenate(parts)
        else:
            pos = rng.choice(np.flatnonzero(ok[:, e]), k, replace=False)
        chosen[:, e] = np.sort(pos)
    return chosen


def _plain(v: Any) -> Any:
    return v.item() if isinstance(v, np.generic) else v


def _select_epochs(da: xr.DataArray, epochs: Any) -> xr.DataArray:
    """``da`` at the epochs ``epochs`` (a label or a list of labels; None: all)."""
    if epochs is None:
        return da
    sel = [epochs] if np.ndim(epochs) == 0 else list(epochs)
    if not sel:
        raise ProfileError("epochs=[] selects no epoch; pass at least one epoch label, or "
                           "None for all")
    if EPOCH not in da.dims:
        raise ProfileError(f"epochs={epochs!r} was given but the input has no epoch "
                           f"dimension (dims {da.dims})")
    repeated = [_plain(e) for i, e in enumerate(sel) if e in sel[:i]]
    if repeated:
        raise ProfileError(f"epochs={sel!r} names epoch(s) {list(dict.fromkeys(repeated))} "
                           "more than once: each epoch is one slice of the profiles, so "
                           "name it once")
    try:
        return da.sel({EPOCH: sel})
    except KeyError as err:
        raise ProfileError(f"epochs {sel} not all in {da[EPOCH].values.tolist()}") from err


def profiles(
    obj: Any,
    *,
    source: str = "naps",
    by: str | Sequence[str] = "label",
    normalize: bool = True,
    n_samples: int = 500,
    balanced: bool = False,
    correct_only: bool = False,
    epochs: Any = None,
    random_state: int | None = None,
) -> xr.DataArray:
    """Describe every neuron by a feature vector, per epoch.

    Parameters
    ----------
    obj : xarray.DataArray or xarray.Dataset
        Activations ``(neuron, sample, epoch)`` (or a Dataset holding them), or NAPs as
        returned by :func:`topoxr.naps` (then used as they are, whatever ``source``,
        ``by`` and ``normalize``; ``epochs`` still selects their epochs).
    source : {"naps", "activations"}, default "naps"
        ``"naps"``: the neuron's NAP values across groups (see ``by``, ``normalize``);
        ``"activations"``: its raw activations over a random subset of samples.
    by, normalize : see :func:`topoxr.naps`
        Grouping and normalisation of NAP profiles.
    n_samples : int, default 500
        Number of samples per epoch for ``source="activations"`` (fewer if fewer are
        eligible, with a logged warning).
    balanced : bool, default False
        Draw the same number of samples from every label.
    correct_only : bool, default False
        Only samples predicted correctly (at that epoch).
    epochs : label or list of labels, optional
        Epochs to use, for activations and NAPs alike, each named once; all by default.
    random_state : int, optional
        Seed of the sample subset. None draws fresh entropy, which the description
        (attribute ``topoxr_profile``) records, so the same subset can be drawn again.

    Returns
    -------
    xarray.DataArray
        Named ``"profile"``, dims ``("neuron", "feature", "epoch")``; neuron coordinates
        kept. For ``source="activations"`` the coordinate ``feature_sample`` on
        (feature, epoch) names the sample behind each feature (the subset is drawn per
        epoch because ``correct`` changes from epoch to epoch). The attribute
        ``topoxr_profile`` describes the profile (JSON). Lazy for dask input.

    Raises
    ------
    ProfileError
        For an unknown ``source``, when no eligible sample is left, for
        ``balanced=True`` with ``n_samples`` below the number of labels or a label
        without an eligible sample at some epoch, or when ``epochs``
        selects no epoch, names epochs the input does not have or an epoch twice, or is
        given for NAPs without an epoch dimension.
    topoxr.grouping.GroupingError
        From :func:`topoxr.naps` for NAP profiles of activations (e.g. ``epochs=[]``).

    Examples
    --------
    >>> from topoxr.testing import make_activations
    >>> p = profiles(make_activations(n_labels=4))
    >>> p.dims, p.sizes["feature"]
    (('neuron', 'feature', 'epoch'), 4)
    """
    if source not in ("naps", "activations"):
        raise ProfileError(f"source must be 'naps' or 'activations', got {source!r}")
    if _is_nap(obj):
        prof = _nap_profiles(_select_epochs(obj, epochs))
        desc = {"source": "naps", **json.loads(obj.attrs.get(ATTR_NAP, "{}"))}
    elif source == "naps":
        nap = naps(obj, by=by, normalize=normalize, epochs=epochs, correct_only=correct_only)
        prof = _nap_profiles(nap)
        desc = {"source": "naps", **json.loads(nap.attrs[ATTR_NAP])}
    else:
        if isinstance(obj, xr.Dataset):
            if ACTIVATION not in obj:
                raise ProfileError(f"the Dataset has no {ACTIVATION!r} variable")
            da = obj[ACTIVATION]
        elif isinstance(obj, xr.DataArray):
            da = obj
        else:
            raise TypeError(f"profiles() needs an xarray object, got {type(obj).__name__}")
        da = _select_epochs(da, epochs).transpose(NEURON, SAMPLE, EPOCH)
        if int(n_samples) < 1:
            raise ProfileError(f"n_samples must be >= 1, got {n_samples}")
        if random_state is None:  # drawn here, so that the description can record it
            # (kept below 2**63: the description is JSON, read by other languages too)
            random_state = int(np.random.SeedSequence().entropy) % (1 << 63)
        chosen = _choose_samples(da, int(n_samples), balanced, correct_only,
                                 np.random.default_rng(random_state))
        drop = [c for c in da.coords if SAMPLE in da.coords[c].dims
                or (EPOCH in da.coords[c].dims and c != EPOCH)]
        cols = [da.isel({EPOCH: e, SAMPLE: chosen[:, e]}).drop_vars(drop)
                .rename({SAMPLE: FEATURE}) for e in range(da.sizes[EPOCH])]
        prof = xr.concat(cols, dim=EPOCH, coords="minimal", compat="override",
                         join="override").transpose(NEURON, FEATURE, EPOCH)
        prof = prof.assign_coords({c: da.coords[c].variable for c in drop
                                   if da.coords[c].dims == (EPOCH,)})
        sample_ids = da[SAMPLE].values[chosen]
        prof = prof.assign_coords({FEATURE: np.arange(chosen.shape[0]),
                                   "feature_sample": ((FEATURE, EPOCH), sample_ids)})
        desc = {"source": "activations", "n_samples": int(chosen.shape[0]),
                "balanced": bool(balanced), "correct_only": bool(correct_only),
                "random_state": random_state}
    prof = prof.transpose(NEURON, FEATURE, ...)
    prof.name = "profile"
    prof.attrs = {k: v for k, v in obj.attrs.items() if k != ATTR_NAP}
    prof.attrs[ATTR_PROFILE] = json.dumps(desc)
    return prof


# --------------------------------------------------------------------------------------
# Array level
# --------------------------------------------------------------------------------------
def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ProfileError(f"unknown metric {metric!r}; choose one of {list(METRICS)}")


def _finite_2d(X: Any) -> np.ndarray:
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2:
        raise ProfileError(f"profiles must be a 2-D (neuron, feature) array, got shape {X.shape}")
    # Features that are NaN for every neuron (a group empty at this epoch) carry no
    # information: drop them.
    X = X[:, ~np.isnan(X).all(axis=0)]
    bad = ~np.isfinite(X)
    if bad.any():
        rows = np.flatnonzero(bad.any(axis=1))
        raise ProfileError(f"profiles hold NaN or inf for neuron position(s) {rows[:20].tolist()}"
                           f"{' ...' if len(rows) > 20 else ''}; clean or drop them first")
    if X.shape[1] == 0:
        raise ProfileError("profiles have no finite feature")
    return X


def _neuron_labels(obj: Any, what: str) -> np.ndarray | None:
    """The neuron labels of ``obj`` (None without a neuron coordinate); repeated labels
    are refused, as a layout could not say which neuron a position belongs to."""
    if NEURON not in obj.coords:
        return None
    labels = np.asarray(obj[NEURON].values)
    uniq, counts = np.unique(labels, return_counts=True)
    if (counts > 1).any():
        raise ProfileError(f"{what} has repeated neuron labels "
                           f"{uniq[counts > 1][:10].tolist()}: each neuron needs a label of "
                           "its own (e.g. lay out each layer separately)")
    return labels


def _match_neurons(prof: xr.DataArray, obj: Any) -> xr.DataArray:
    """``prof`` in ``obj``'s neuron order, matched by label (by position only where
    neither has neuron labels)."""
    if prof.sizes[NEURON] != obj.sizes[NEURON]:
        raise ProfileError(f"profiles have {prof.sizes[NEURON]} neurons, the object "
                           f"{obj.sizes[NEURON]}")
    if prof is obj:
        _neuron_labels(obj, "the object")
        return prof
    want = _neuron_labels(obj, "the object")
    have = _neuron_labels(prof, "the profile matrix")
    if want is None or have is None:
        if want is not None or have is not None:
            raise ProfileError("the object or the profiles have no neuron labels, so the "
                               "profiles cannot be matched to the object's neurons")
        return prof
    if np.array_equal(want, have):
        return prof
    missing = np.setdiff1d(want, have)
    if missing.size:
        raise ProfileError(
            f"the profiles lack neurons {missing[:10].tolist()} of the object (and hold "
            f"{np.setdiff1d(have, want)[:10].tolist()} instead); profiles are matched "
            "to neurons by label")
    return prof.sel({NEURON: want})


def _check_tol(tol: Any) -> None:
    """``tol`` checked: a real number with ``0 <= tol < 1`` (a fraction of the largest norm)."""
    if isinstance(tol, bool) or not isinstance(tol, numbers.Real):
        raise ProfileError(f"tol must be a number (a fraction of the largest profile norm), "
                           f"got tol={tol!r}")
    if not (np.isfinite(tol) and 0 <= tol < 1):
        raise ProfileError(
            f"tol must be finite with 0 <= tol < 1, got tol={tol!r}: a profile counts as "
            "zero when its norm is at most tol times the largest norm, so a negative or NaN "
            "tol finds no dead neuron ever and tol >= 1 makes every neuron dead; e.g. the "
            f"default {DEFAULT_TOL}")


def degenerate_rows(
    X: Any, metric: str = "cosine", *, tol: float = DEFAULT_TOL
) -> tuple[np.ndarray, np.ndarray]:
    """Find the profiles for which ``metric`` is undefined.

    Parameters
    ----------
    X : array_like, shape (n, f)
        Profiles.
    metric : {"cosine", "correlation", "euclidean"}
        Euclidean distance is defined everywhere, but dead neurons are still reported.
    tol : float, default 1e-7
        Relative tolerance, ``0 <= tol < 1``: a row whose norm is at most ``tol`` times
        the largest row norm counts as zero (at ``tol >= 1`` every row would, the
        largest one too).

    Returns
    -------
    dead, constant : numpy.ndarray of bool, shape (n,)
        ``dead``: the profile is (numerically) all zero. ``constant``: not dead, but
        constant across features (only flagged for ``metric="correlation"``).

    Raises
    ------
    ProfileError
        For NaN or inf values, an unknown metric, or ``tol`` that is not a finite
        number in ``[0, 1)``.
    """
    _check_metric(metric)
    _check_tol(tol)
    X = _finite_2d(X)
    norms = np.linalg.norm(X, axis=1)
    scale = norms.max() if len(norms) else 0.0
    dead = norms <= tol * scale if scale > 0 else np.ones(len(X), dtype=bool)
    constant = np.zeros(len(X), dtype=bool)
    if metric == "correlation":
        cnorm = np.linalg.norm(X - X.mean(axis=1, keepdims=True), axis=1)
        constant = (cnorm <= tol * max(scale, 1e-300)) & ~dead
    return dead, constant


def profile_matrix(
    X: Any, metric: str = "cosine", *, tol: float = DEFAULT_TOL
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Prepare profiles so that Euclidean geometry matches ``metric``.

    For ``"cosine"`` rows are L2-normalised, for ``"correlation"`` centred and then
    normalised, for ``"euclidean"`` kept. Degenerate rows (see
    :func:`degenerate_rows`) become a unit vector along one extra column (added only
    where there are any, zero for every other row): the Euclidean distance between any
    two rows is then ``sqrt(2 * d)`` with ``d`` the distance of
    :func:`pairwise_distances`, 1 between a live and a degenerate neuron and 0 between
    degenerate ones. Columns that are NaN for every neuron are dropped.

    Parameters
    ----------
    X : array_like, shape (n, f)
        Profiles.
    metric : {"cosine", "correlation", "euclidean"}, default "cosine"
    tol : float, default 1e-7
        See :func:`degenerate_rows`.

    Returns
    -------
    matrix : numpy.ndarray, shape (n, f')
        Float64 coordinates for Euclidean methods (for cosine and correlation, one
        column more than the kept columns where some rows are degenerate).
    info : dict
        ``{"dead": bool array, "constant": bool array}``.

    Raises
    ------
    ProfileError
        For NaN or inf values, or an unknown metric.
    """
    _check_metric(metric)
    X = _finite_2d(X)
    dead, constant = degenerate_rows(X, metric, tol=tol)
    if metric == "euclidean":
        return X, {"dead": dead, "constant": constant}
    Y = X - X.mean(axis=1, keepdims=True) if metric == "correlation" else X.copy()
    bad = dead | constant
    norms = np.linalg.norm(Y, axis=1)
    Y[~bad] /= norms[~bad, None]
    Y[bad] = 0.0
    if bad.any():
        # a direction of their own, orthogonal to every live row: zero rows would be
        # at Euclidean distance 1 from live rows, which is cosine distance 0.5
        Y = np.hstack([Y, bad[:, None].astype(np.float64)])
    return Y, {"dead": dead, "constant": constant}


def pairwise_distances(
    X: Any, metric: str = "cosine", *, tol: float = DEFAULT_TOL
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """All pairwise distances between profiles, with explicit degenerate handling.

    Parameters
    ----------
    X : array_like, shape (n, f)
        Profiles (n neurons). Memory is ``8 n^2`` bytes: use it for up to a few
        thousand neurons; layouts and quality metrics never need the full matrix.
    metric : {"cosine", "correlation", "euclidean"}, default "cosine"
    tol : float, default 1e-7
        See :func:`degenerate_rows`.

    Returns
    -------
    D : numpy.ndarray, shape (n, n)
        Symmetric, zero diagonal. For cosine/correlation, a degenerate neuron is at
        distance 1 from every other neuron and 0 from other degenerate neurons.
    info : dict
        ``{"dead": bool array, "constant": bool array}``.

    Examples
    --------
    >>> D, info = pairwise_distances([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]])
    >>> D.round(3).tolist(), info["dead"].tolist()
    ([[0.0, 1.0, 1.0], [1.0, 0.0, 1.0], [1.0, 1.0, 0.0]], [False, False, True])
    """
    from scipy.spatial.distance import cdist

    _check_metric(metric)
    X = _finite_2d(X)
    if metric == "euclidean":
        dead, constant = degenerate_rows(X, metric, tol=tol)
        D = cdist(X, X)
        np.fill_diagonal(D, 0.0)
        return D, {"dead": dead, "constant": constant}
    Y, info = profile_matrix(X, metric, tol=tol)
    D = np.clip(1.0 - Y @ Y.T, 0.0, 2.0)
    bad = info["dead"] | info["constant"]
    D[np.ix_(bad, ~bad)] = 1.0
    D[np.ix_(~bad, bad)] = 1.0
    D[np.ix_(bad, bad)] = 0.0
    np.fill_diagonal(D, 0.0)
    return D, info


def report_degenerate(info: dict[str, np.ndarray], neuron_ids: np.ndarray, metric: str,
                      where: str = "") -> dict[str, list[int]]:
    """Log a warning for degenerate neurons and return them as attribute lists."""
    dead = neuron_ids[info["dead"]].tolist()
    constant = neuron_ids[info["constant"]].tolist()
    if metric != "euclidean" and (dead or constant):
        logger.warning(
            "%s%d dead (all zero) and %d constant neuron(s) of %d have no defined %s "
            "distance: they are placed at distance 1 from every other neuron and 0 from each "
            "other (dead=%s%s; all ids are in the result's attrs)",
            f"{where}: " if where else "", len(dead), len(constant), len(neuron_ids), metric,
            dead[:10], "..." if len(dead) > 10 else "",
        )
    return {"dead_neurons": dead, "constant_neurons": constant}


def distances(
    profiles: xr.DataArray, metric: str = "cosine", *, tol: float = DEFAULT_TOL
) -> xr.DataArray:
    """Pairwise distances between the neurons' profiles, per epoch.

    Parameters
    ----------
    profiles : xarray.DataArray or xarray.Dataset
        Output of :func:`profiles` (dims ``("neuron", "feature"[, "epoch"])``), or NAPs,
        or activations (then profiled with :func:`profiles`' defaults), or a Dataset
        holding an ``activation`` variable (a layer node, treated as its activations).
    metric : {"cosine", "correlation", "euclidean"}, default "cosine"
    tol : float, default 1e-7
        Relative norm under which a profile counts as zero (see the module notes),
        ``0 <= tol < 1``.

    Returns
    -------
    xarray.DataArray
        Named ``"distance"``, dims ``("neuron", "neuron_other"[, "epoch"])``. Attributes
        ``metric``, ``dead_neurons`` and ``constant_neurons`` (neuron ids, over all
        epochs), and the profile description.

    Raises
    ------
    ProfileError
        For an unknown metric, NaN/inf profiles, a Dataset without an ``activation``
        variable, or ``tol`` outside ``[0, 1)``.
    TypeError
        For anything but a DataArray or Dataset (a DataTree: use its ``.topo`` accessor,
        which maps over the layer nodes).

    Examples
    --------
    >>> from topoxr.testing import make_activations
    >>> d = distances(profiles(make_activations(n_neurons=6)))
    >>> d.dims
    ('neuron', 'neuron_other', 'epoch')
    """
    _check_metric(metric)
    _check_tol(tol)
    if isinstance(profiles, xr.DataTree):
        raise TypeError("distances() takes one layer, not a DataTree: use "
                        "tree.topo.distances() for every layer node, or pass one node, e.g. "
                        "distances(tree['model/layer'].to_dataset())")
    if isinstance(profiles, xr.Dataset):
        # a layer node: its activations, profiled as profiles() does by default
        if ACTIVATION not in profiles.data_vars:
            raise ProfileError(
                f"distances() of a Dataset uses its {ACTIVATION!r} variable, and this Dataset "
                f"has none (variables {sorted(map(str, profiles.data_vars))}); pass the "
                "DataArray of profiles, NAPs or activations instead, e.g. distances(ds[name])")
        profiles = globals()["profiles"](profiles)
    if not isinstance(profiles, xr.DataArray):
        raise TypeError(f"distances() needs a DataArray of profiles (or NAPs, activations, a "
                        f"Dataset holding {ACTIVATION!r}), got {type(profiles).__name__}")
    if FEATURE not in profiles.dims:
        profiles = globals()["profiles"](profiles)
    prof = profiles.transpose(NEURON, FEATURE, ...)
    ids = np.asarray(prof[NEURON].values)
    has_epoch = EPOCH in prof.dims
    values = np.asarray(prof.values)
    if not has_epoch:
        values = values[..., None]
    mats = []
    dead = np.zeros(len(ids), dtype=bool)
    constant = np.zeros(len(ids), dtype=bool)
    for e in range(values.shape[-1]):
        D, info = pairwise_distances(values[..., e], metric, tol=tol)
        dead |= info["dead"]
        constant |= info["constant"]
        mats.append(D)
    rep = report_degenerate({"dead": dead, "constant": constant & ~dead}, ids, metric)
    data = np.stack(mats, axis=-1)
    coords: dict[str, Any] = {
        NEURON: ids, "neuron_other": ids,
    }
    dims: tuple[str, ...] = (NEURON, "neuron_other", EPOCH)
    if has_epoch:
        coords[EPOCH] = prof[EPOCH].values
    else:
        data, dims = data[..., 0], (NEURON, "neuron_other")
    out = xr.DataArray(data, dims=dims, coords=coords, name="distance")
    out.attrs = {**{k: v for k, v in prof.attrs.items() if k == ATTR_PROFILE}, "metric": metric,
                 **rep}
    return out
