"""A measured number for each of the paper's applications of topographic maps.

Every function takes laid-out NAPs (``topoxr.naps`` then a layout: dims ``("neuron",
<group>[, "epoch"])`` and ``x``/``y`` on ``neuron``), draws them as interpolated maps on
their layout (:class:`topoxr.interpolate.GridInterpolator`, what the pictures show) and
compares the maps by Pearson correlation over the pixels inside the neurons' hull:

- :func:`class_map_findings`: how distinct the classes' maps are, and their blobs;
- :func:`error_findings`: whether wrongly classified samples look like their true class
  or like the class they were taken for;
- :func:`bias_findings`: how much an attribute changes the maps of each class;
- :func:`training_findings`: how much the maps change per epoch, and when they settle.

Only numpy, scipy and xarray are used (no plotting library).
"""

from __future__ import annotations

import logging
from collections.abc import Hashable
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from topoxr.conventions import EPOCH, NEURON, X, Y

__all__ = ["bias_findings", "class_map_findings", "error_findings", "map_correlation",
           "training_findings"]

logger = logging.getLogger(__name__)


def _groups(nap: xr.DataArray) -> tuple[str, list[str], list[tuple]]:
    """The group dim, its key names and the key tuple of every group."""
    gdims = [d for d in nap.dims if d not in (NEURON, EPOCH)]
    if len(gdims) != 1:
        raise ValueError(f"the NAPs need exactly one group dim besides neuron and epoch, "
                         f"got dims {nap.dims}")
    gdim = gdims[0]
    index = nap.indexes.get(gdim)
    if isinstance(index, pd.MultiIndex):
        return gdim, [str(n) for n in index.names], [tuple(_plain(v) for v in t) for t in index]
    return gdim, [gdim], [(_plain(v),) for v in nap[gdim].values]


def _plain(v: Any) -> Any:
    return v.item() if isinstance(v, np.generic) else v


def _positions(nap: xr.DataArray) -> np.ndarray:
    """The fixed layout ``(neuron, 2)`` of laid-out NAPs."""
    if X not in nap.coords or Y not in nap.coords:
        raise ValueError("the NAPs have no layout: coordinates 'x' and 'y' on 'neuron' are "
                         "missing (lay them out first)")
    if nap[X].dims != (NEURON,) or nap[Y].dims != (NEURON,):
        raise ValueError(f"the findings need one fixed layout ('x' on 'neuron'), got 'x' on "
                         f"{nap[X].dims}")
    return np.stack([np.asarray(nap[X].values, float), np.asarray(nap[Y].values, float)], 1)


def _maps(nap: xr.DataArray, resolution: int) -> np.ndarray:
    """Interpolated maps ``(group, [epoch,] ny, nx)`` of laid-out NAPs on a fixed layout.

    A NaN neuron value spoils only the pixels of the triangles touching that neuron
    (:class:`topoxr.interpolate.GridInterpolator`), so a map keeps its other pixels; only
    a group without any value at an epoch (empty there) gives an all-NaN map.
    """
    from topoxr.interpolate import GridInterpolator

    pos = _positions(nap)
    gdim = _groups(nap)[0]
    order = [gdim, *([EPOCH] if EPOCH in nap.dims else []), NEURON]
    values = np.asarray(nap.transpose(*order).values, dtype=np.float64)
    interp = GridInterpolator(pos[:, 0], pos[:, 1], resolution=resolution)
    return interp(values)


def map_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two maps over the pixels finite in both (NaN if undefined).

    Parameters
    ----------
    a, b : numpy.ndarray
        Maps of the same shape.

    Returns
    -------
    float
    """
    a, b = np.asarray(a, float).ravel(), np.asarray(b, float).ravel()
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3:
        return float("nan")
    a, b = a[ok] - a[ok].mean(), b[ok] - b[ok].mean()
    denom = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denom) if denom > 0 else float("nan")


def _in_epoch_order(nap: xr.DataArray) -> xr.DataArray:
    """``nap`` with its epochs in ascending order (they are held as recorded)."""
    return nap.sortby(EPOCH) if EPOCH in nap.dims and EPOCH in nap.coords else nap


def _last(nap: xr.DataArray) -> xr.DataArray:
    """``nap`` at its last epoch: the highest, whatever order the epochs are held in."""
    return _in_epoch_order(nap).isel({EPOCH: -1}) if EPOCH in nap.dims else nap


def _on_same_layout(ref: xr.DataArray, other: xr.DataArray, names: tuple[str, str],
                    ) -> xr.DataArray:
    """``other`` with ``ref``'s neurons in ``ref``'s order, refused unless it holds the same
    neurons (by label) at the same positions, at the same epoch."""
    from topoxr.similarity import _neuron_labels

    want, have = _neuron_labels(ref, names[0]), _neuron_labels(other, names[1])
    if ref.sizes[NEURON] != other.sizes[NEURON] or (want is None) != (have is None) or (
            want is not None and np.setdiff1d(want, have).size):
        detail = ("" if want is None or have is None else
                  f"; {names[0]} only: {np.setdiff1d(want, have)[:10].tolist()}, "
                  f"{names[1]} only: {np.setdiff1d(have, want)[:10].tolist()}")
        raise ValueError(f"{names[0]} and {names[1]} must hold the same neurons, matched by "
                         f"their 'neuron' labels (both labelled, or neither): "
                         f"{ref.sizes[NEURON]} and {other.sizes[NEURON]} neurons{detail}")
    if want is not None and not np.array_equal(want, have):
        other = other.sel({NEURON: want})
    if EPOCH in ref.coords and EPOCH in other.coords and ref[EPOCH].values.tolist() != \
            other[EPOCH].values.tolist():
        raise ValueError(f"{names[0]} and {names[1]} end at different epochs "
                         f"({_plain(ref[EPOCH].values)} and {_plain(other[EPOCH].values)}); "
                         "the findings compare the maps of the last epoch")
    if not np.allclose(_positions(ref), _positions(other), rtol=1e-6, atol=1e-9):
        raise ValueError(f"{names[0]} and {names[1]} must be on the same layout: the same "
                         "neurons have other x/y positions (attach one layout to both)")
    return other


def class_map_findings(
    laid_naps: xr.DataArray, *, resolution: int = 64, threshold: float = 0.5
) -> dict[str, Any]:
    """How distinct the class maps are, and how many blobs each has (last epoch).

    Parameters
    ----------
    laid_naps : xarray.DataArray
        Laid-out NAPs grouped by one key (e.g. ``label``).
    resolution : int, default 64
        Grid of the maps.
    threshold : float, default 0.5
        Blob threshold (see :func:`topoxr.metrics.blobs`).

    Returns
    -------
    dict
        ``mean_correlation`` (mean over pairs of classes of the correlation of their
        maps; for NAPs normalised over the groups, as :func:`topoxr.naps` makes them by
        default, the maps sum to about zero at every pixel, which pins this mean near
        ``-1 / (G - 1)`` for ``G`` classes whatever the network does: then it tells
        nothing of how distinct the classes are, and ``max_pair`` does), ``max_pair``
        (the most alike pair of two classes and its correlation; None when there are
        fewer than two classes or no pair has a finite correlation, e.g. classes with
        empty or constant maps), per class ``blob_count`` (an int) and ``blob_area``
        (mean blob area as a fraction of the map, 0 for a map without blobs), and over
        all maps ``mean_blob_count`` and ``mean_blob_area``, the mean area of one blob
        (maps without blobs do not count; NaN when no map has one).

        A class without samples at the last epoch has an empty (all-NaN) map: its
        ``blob_count`` and ``blob_area`` are NaN (floats) and it does not enter the
        means (``mean_blob_count`` is NaN when no class has a map). A NaN value of some
        neurons only blanks the pixels next to them: the class keeps its map.
    """
    from topoxr.metrics import blobs

    nap = _last(laid_naps)
    _, keys, groups = _groups(nap)
    maps = _maps(nap, resolution)
    n = len(groups)
    corr = np.full((n, n), np.nan)
    for i in range(n):
        for j in range(i + 1, n):
            corr[i, j] = corr[j, i] = map_correlation(maps[i], maps[j])
    upper = corr[np.triu_indices(n, 1)]
    finite = upper[np.isfinite(upper)]
    found = blobs(maps, threshold=threshold)
    names = [_name(g) for g in groups]
    max_pair = None
    if finite.size:
        best = np.unravel_index(np.argmax(np.where(np.isfinite(corr), corr, -np.inf)),
                                corr.shape)
        max_pair = {"groups": [names[best[0]], names[best[1]]], "correlation": float(corr[best])}
    count, area = found["count"], found["area"]
    has_map = np.isfinite(count)
    return {
        "key": keys[0] if len(keys) == 1 else keys,
        "mean_correlation": float(finite.mean()) if finite.size else float("nan"),
        "max_pair": max_pair,
        "blob_count": dict(zip(names, [int(c) if ok else float("nan")
                                       for c, ok in zip(count, has_map, strict=True)],
                               strict=True)),
        "blob_area": dict(zip(names, np.round(area, 4).tolist(), strict=True)),
        "mean_blob_count": float(count[has_map].mean()) if has_map.any() else float("nan"),
        # the mean area of one blob: "N blobs per map, each X% of the map"
        "mean_blob_area": (float((count[has_map] * area[has_map]).sum()
                                 / count[has_map].sum())
                           if count[has_map].sum() else float("nan")),
    }


def _name(group: tuple) -> Hashable:
    return group[0] if len(group) == 1 else ", ".join(map(str, group))


def error_findings(
    by_prediction: xr.DataArray, by_correct: xr.DataArray, *, resolution: int = 64,
) -> dict[str, Any]:
    """Where the wrong samples' maps sit: near their true class or the class predicted.

    For each (true label ``l``, prediction ``p != l``) pair that occurs at the last
    epoch, the map of its samples is correlated with the map of the correctly
    classified samples of ``l`` (``r_true``) and of ``p`` (``r_predicted``).

    Parameters
    ----------
    by_prediction : xarray.DataArray
        Laid-out NAPs grouped by ``["label", "prediction"]``.
    by_correct : xarray.DataArray
        The same layer's NAPs grouped by ``["label", "correct"]`` on the same layout: the
        same neurons (matched by their ``neuron`` labels, in any order) at the same
        ``x``/``y`` positions at the last epoch, which the findings use.
    resolution : int, default 64
        Grid of the maps.

    Returns
    -------
    dict
        ``pairs`` (one record per wrong pair, with ``count``), ``mean_r_true``,
        ``mean_r_predicted`` (weighted by the pairs' sample counts), ``closer_to_predicted``
        (share of wrong samples in confusions whose map, the NAP of that (true, predicted)
        pair, is closer to the predicted class's map than to the true class's; single
        samples' maps are not compared) and, per class,
        ``correct_vs_wrong`` (correlation of its correct and wrong maps).

    Raises
    ------
    ValueError
        If the NAPs are not grouped by those keys, have no fixed layout, hold other
        neurons than each other (or repeated neuron labels), place them at other
        positions, or end at different epochs.
    """
    pred, corr_ = _last(by_prediction), _last(by_correct)
    _, pkeys, pgroups = _groups(pred)
    _, ckeys, cgroups = _groups(corr_)
    if set(pkeys) != {"label", "prediction"} or set(ckeys) != {"label", "correct"}:
        raise ValueError(f"error_findings needs NAPs by ['label', 'prediction'] and by "
                         f"['label', 'correct'], got {pkeys} and {ckeys}")
    corr_ = _on_same_layout(pred, corr_, ("by_prediction", "by_correct"))
    pmaps, cmaps = _maps(pred, resolution), _maps(corr_, resolution)
    li, pi = pkeys.index("label"), pkeys.index("prediction")
    cl, cc = ckeys.index("label"), ckeys.index("correct")
    correct_map = {g[cl]: cmaps[i] for i, g in enumerate(cgroups) if bool(g[cc])
                   and np.isfinite(cmaps[i]).any()}
    wrong_map = {g[cl]: cmaps[i] for i, g in enumerate(cgroups) if not bool(g[cc])
                 and np.isfinite(cmaps[i]).any()}
    counts = _counts(pred)
    pairs = []
    for i, g in enumerate(pgroups):
        label, p = g[li], g[pi]
        if label == p or not np.isfinite(pmaps[i]).any():
            continue
        if label not in correct_map or p not in correct_map:
            continue
        pairs.append({"label": label, "prediction": p, "count": int(counts[i]),
                      "r_true": map_correlation(pmaps[i], correct_map[label]),
                      "r_predicted": map_correlation(pmaps[i], correct_map[p])})
    weights = np.array([q["count"] for q in pairs], float)
    r_true = np.array([q["r_true"] for q in pairs], float)
    r_pred = np.array([q["r_predicted"] for q in pairs], float)
    ok = np.isfinite(r_true) & np.isfinite(r_pred) & (weights > 0)
    total = weights[ok].sum()
    return {
        "wrong_samples": int(weights.sum()),
        "pairs": pairs,
        "mean_r_true": float((weights[ok] * r_true[ok]).sum() / total) if total else float("nan"),
        "mean_r_predicted": (float((weights[ok] * r_pred[ok]).sum() / total) if total
                             else float("nan")),
        "closer_to_predicted": (float(weights[ok][r_pred[ok] > r_true[ok]].sum() / total)
                                if total else float("nan")),
        "correct_vs_wrong": {label: map_correlation(correct_map[label], wrong_map[label])
                             for label in sorted(wrong_map) if label in correct_map},
    }


def _counts(nap: xr.DataArray) -> np.ndarray:
    gdim = _groups(nap)[0]
    if "count" not in nap.coords:
        return np.ones(nap.sizes[gdim])
    cnt = nap["count"]
    if EPOCH in cnt.dims:
        cnt = _last(cnt)
    return np.asarray(cnt.values, float)


def bias_findings(
    biased: xr.DataArray, control: xr.DataArray, *, attribute: str, resolution: int = 64,
) -> dict[str, Any]:
    """The attribute's effect on each class's map, in a biased model and in a control.

    The effect on class ``l`` is ``1 - r``, with ``r`` the correlation of the maps of
    ``l``'s samples with and without the attribute (0: the attribute changes nothing).

    Parameters
    ----------
    biased, control : xarray.DataArray
        Laid-out NAPs grouped by ``["label", attribute]`` of the model trained on biased
        data and of the same model trained without the bias.
    attribute : str
        The boolean sample attribute (e.g. ``"marked"``): its levels in the NAPs must be
        exactly False and True (or 0 and 1).
    resolution : int, default 64
        Grid of the maps.

    Returns
    -------
    dict
        ``effect`` per class for ``biased`` and ``control``, their means, and ``ratio``
        (biased mean over control mean).

    Raises
    ------
    ValueError
        If the NAPs are not grouped by ``["label", attribute]``, have no fixed layout, or
        the attribute does not have exactly the two levels False and True (0 and 1).
    """
    out: dict[str, Any] = {"attribute": attribute}
    for name, nap in (("biased", biased), ("control", control)):
        nap = _last(nap)
        _, keys, groups = _groups(nap)
        if set(keys) != {"label", attribute}:
            raise ValueError(f"bias_findings needs NAPs by ['label', {attribute!r}], got {keys}")
        li, ai = keys.index("label"), keys.index(attribute)
        levels = sorted({g[ai] for g in groups}, key=str)
        if len(levels) != 2 or not all(isinstance(v, bool | int | float) and v in (0, 1)
                                       for v in levels):
            raise ValueError(f"bias_findings needs a boolean attribute with the two levels "
                             f"False and True (or 0 and 1); {attribute!r} of {name} has "
                             f"levels {levels} (recode it as True/False first)")
        maps = _maps(nap, resolution)
        with_, without = {}, {}
        for i, g in enumerate(groups):
            (with_ if bool(g[ai]) else without)[g[li]] = maps[i]
        effect = {label: 1.0 - map_correlation(with_[label], without[label])
                  for label in sorted(with_) if label in without}
        values = np.array([v for v in effect.values() if np.isfinite(v)])
        out[name] = {"effect": effect,
                     "mean_effect": float(values.mean()) if values.size else float("nan")}
    control_mean = out["control"]["mean_effect"]
    out["ratio"] = (float(out["biased"]["mean_effect"] / control_mean) if control_mean > 0
                    else float("nan"))
    return out


def training_findings(
    laid_naps: xr.DataArray, *, resolution: int = 64, settle: float = 0.1,
) -> dict[str, Any]:
    """How much the maps change from one epoch to the next, and when they settle.

    The change at epoch ``e`` is ``1 - r``, with ``r`` the correlation of all class maps
    of epoch ``e`` with those of the epoch before it (epochs in ascending order, whatever
    order ``laid_naps`` holds them in; one fixed layout, so pixels are the
    same neurons). The organisation has settled at the first epoch from which every
    later change stays below ``settle`` times the largest change.

    Parameters
    ----------
    laid_naps : xarray.DataArray
        Laid-out NAPs with an ``epoch`` dim, on one fixed layout.
    resolution : int, default 64
        Grid of the maps.
    settle : float, default 0.1
        Fraction of the largest change below which the maps count as settled.

    Returns
    -------
    dict
        ``epochs``, ``change`` (per epoch from the second), ``settled_at`` (an epoch, or
        None if the last change is still large), ``correlation_with_last`` per epoch.
    """
    if EPOCH not in laid_naps.dims or laid_naps.sizes[EPOCH] < 2:
        raise ValueError("training_findings needs NAPs with at least two epochs")
    laid_naps = _in_epoch_order(laid_naps)  # the changes from one epoch to the next
    maps = _maps(laid_naps, resolution)  # (group, epoch, ny, nx)
    epochs = [_plain(e) for e in laid_naps[EPOCH].values]
    per_epoch = np.moveaxis(maps, 1, 0)  # (epoch, group, ny, nx)
    change = [1.0 - map_correlation(per_epoch[e], per_epoch[e - 1])
              for e in range(1, len(epochs))]
    to_last = [map_correlation(per_epoch[e], per_epoch[-1]) for e in range(len(epochs))]
    arr = np.array(change)
    settled_at = None
    if np.isfinite(arr).all() and arr.max() > 0:
        below = arr < settle * arr.max()
        for i in range(len(arr)):
            if below[i:].all():
                settled_at = epochs[i]  # the maps of this epoch hardly differ from then on
                break
    return {"epochs": epochs, "change": [round(float(c), 4) for c in change],
            "settled_at": settled_at,
            "correlation_with_last": [round(float(c), 4) for c in to_last]}
