"""The paper's views of topographic maps, built on :func:`topoxr.viz.topomap`.

- :func:`class_row`: one map per group, ordered by hierarchical clustering of the NAPs
  (dendrogram order), with an example input above each map where inputs are given;
- :func:`contrast_grid`: binary contrast, the correctly classified row over the wrongly
  classified row, one column per class;
- :func:`confusion_grid`: one map per (label, prediction) pair;
- :func:`training_animation`: the class row over epochs (slider and player when exported);
- :func:`compare_models`: models side by side, one row per model.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import xarray as xr

from topoxr import conventions as cv
from topoxr.viz.topomap import (
    _HAS_MPL,
    MODEL,
    MapCollection,
    _normalise,
    collect,
    group_keys,
    hv,
)

__all__ = [
    "attribute_grid",
    "class_row",
    "cluster_order",
    "compare_models",
    "confusion_grid",
    "contrast_grid",
    "example_inputs",
    "training_animation",
]

logger = logging.getLogger(__name__)


def _last_epoch(nap: xr.DataArray, epoch: Any) -> xr.DataArray:
    """NAPs (normalised: epochs ascending) at ``epoch``, default the last, the highest."""
    if cv.EPOCH not in nap.dims:
        return nap
    if epoch is None:
        return nap.isel({cv.EPOCH: -1})
    if epoch not in set(nap[cv.EPOCH].values.tolist()):
        raise ValueError(f"epoch {epoch!r} not in the NAPs' epochs {nap[cv.EPOCH].values.tolist()}")
    return nap.sel({cv.EPOCH: epoch})


def _at_epoch(col: MapCollection, epoch: Any, *, drop_empty: bool = False) -> MapCollection:
    """The frames of one epoch (default: each model's last, its highest), keyed without it.

    The colour limits stay the collection's, those of every epoch, so that maps of a layer
    drawn at different epochs share one scale. ``drop_empty`` leaves out the groups without
    samples (all NaN) at that epoch.
    """
    wanted = []
    for src in col.sources:
        epochs = src.epochs.tolist()
        if epoch is not None and epoch not in epochs:
            raise ValueError(f"epoch {epoch!r} not in the NAPs' epochs {epochs}")
        wanted.append(len(epochs) - 1 if epoch is None else epochs.index(epoch))
    keep = [i for i, d in enumerate(col.by) if d != cv.EPOCH]
    frames = {
        tuple(key[i] for i in keep): (si, gi, ei) for key, (si, gi, ei) in col.frames.items()
        if ei == wanted[si]
        and not (drop_empty and np.isnan(col.sources[si].values[gi, ei]).all())
    }
    if not frames:
        raise ValueError("every group of the NAPs is empty (all NaN) at the epoch drawn")
    return dataclasses.replace(col, by=[col.by[i] for i in keep], frames=frames)


def cluster_order(
    laid_naps: xr.DataArray, *, epoch: Any = None, method: str = "average",
    metric: str = "euclidean",
) -> list[tuple]:
    """Order the groups by hierarchical clustering of their NAPs (dendrogram leaf order).

    Parameters
    ----------
    laid_naps : xarray.DataArray
        NAPs with dims ``("neuron", <group dim>[, "epoch"])``.
    epoch : optional
        Epoch whose NAPs are clustered (default: the last one, the highest).
    method, metric : str
        Passed to :func:`scipy.cluster.hierarchy.linkage` (optimal leaf ordering on).

    Returns
    -------
    list of tuple
        Group keys (tuples of key values) in dendrogram order; groups that are empty
        at that epoch come last.

    Examples
    --------
    >>> from topoxr.testing.maps import make_laid_naps
    >>> sorted(cluster_order(make_laid_naps(12, 3, 2)))
    [(0,), (1,), (2,)]
    """
    from scipy.cluster.hierarchy import leaves_list, linkage

    nap = _last_epoch(_normalise(laid_naps), epoch)
    keys = group_keys(nap)
    if not keys:
        raise ValueError("the NAPs have no group dim to order")
    col = collect(nap, by=keys, interpolate=False)
    src = col.sources[0]
    values = src.values[:, -1]  # (group, neuron)
    ok = np.flatnonzero(np.isfinite(values).all(axis=1))
    order = list(ok)
    if ok.size > 2:
        z = linkage(values[ok], method=method, metric=metric, optimal_ordering=True)
        order = list(ok[leaves_list(z)])
    order += [i for i in range(len(src.groups)) if i not in set(ok)]
    return [src.groups[i] for i in order]


def example_inputs(
    inputs: Any, labels: Any, *, groups: Sequence[Hashable] | None = None
) -> dict[Hashable, np.ndarray]:
    """Pick the first input of every label, to show above the label's map.

    Parameters
    ----------
    inputs : array_like of shape (n_samples, height, width) or (n_samples, h, w, 3)
        Images (e.g. ``sklearn.datasets.load_digits().images``).
    labels : array_like of shape (n_samples,)
        Label of each input.
    groups : sequence, optional
        Labels to pick (default: every label, sorted).

    Returns
    -------
    dict
        ``{label: image}``.

    Raises
    ------
    ValueError
        If lengths differ or a requested label has no input.
    """
    inputs = np.asarray(inputs)
    labels = np.asarray(labels)
    if len(inputs) != len(labels):
        raise ValueError(f"{len(inputs)} inputs but {len(labels)} labels")
    wanted = sorted(set(labels.tolist())) if groups is None else list(groups)
    out = {}
    for g in wanted:
        hit = np.flatnonzero(labels == g)
        if hit.size == 0:
            raise ValueError(f"no input has label {g!r}")
        out[g] = inputs[hit[0]]
    return out


def _example_element(image: np.ndarray, title: str) -> Any:
    img = np.asarray(image, dtype=float)
    if img.ndim == 1:
        side = round(float(np.sqrt(img.size)))
        if side * side != img.size:
            raise ValueError(f"a flat example input of {img.size} values is not a square image")
        img = img.reshape(side, side)
    if img.ndim == 3 and img.shape[-1] in (3, 4):
        lo, hi = np.nanmin(img), np.nanmax(img)
        el = hv.RGB((img - lo) / (hi - lo or 1.0), label=title)
        return el.opts(xaxis=None, yaxis=None, frame_width=120, frame_height=120, backend="bokeh")
    if img.ndim != 2:
        raise ValueError(f"example inputs must be 2-D images (or RGB), got shape {img.shape}")
    h, w = img.shape
    el = hv.Image(img, bounds=(0, 0, w, h), label=title, vdims=["input"])
    el = el.opts(cmap="gray_r", xaxis=None, yaxis=None, frame_width=120, frame_height=120,
                 colorbar=False, toolbar=None, backend="bokeh")
    if _HAS_MPL:
        el = el.opts(cmap="gray_r", xaxis=None, yaxis=None, colorbar=False,
                     backend="matplotlib")
    return el


def _explicit_order(order: Sequence[Hashable], groups: Iterable[tuple],
                    name: str = "order") -> list[tuple]:
    """An explicit group order as key tuples, refused where it names an unknown group.

    Parameters
    ----------
    order : sequence
        Group keys: tuples, or plain values for a single key.
    groups : iterable of tuple
        The keys of the groups of the NAPs.

    name : str, default "order"
        The argument's name, for messages (``groups`` of :func:`topoxr.viz.save_gif`).

    Returns
    -------
    list of tuple

    Raises
    ------
    ValueError
        If ``order`` is a string (it would be read letter by letter), names a group
        that is not in the NAPs, or names one more than once (its map drawn twice).
    """
    if isinstance(order, str | bytes):
        raise ValueError(f"{name} must be a sequence of group keys, got the string {order!r}"
                         + (" (or None: as stored, 'cluster': by similarity)"
                            if name == "order" else ""))
    ordered = [k if isinstance(k, tuple) else (k,) for k in order]
    known = list(dict.fromkeys(groups))
    missing = [k for k in ordered if k not in set(known)]
    if missing:
        shown = [k[0] if len(k) == 1 else k for k in known]
        raise ValueError(
            f"{name} names groups that are not in the NAPs: {missing}; name groups among "
            f"{shown}" + (", or pass order=None (as stored) or order='cluster'"
                          if name == "order" else "")
        )
    twice = [k for k, n in Counter(ordered).items() if n > 1]
    if twice:
        raise ValueError(f"{name} names groups more than once: {twice}")
    return ordered


def _key_title(keys: list[str], key: tuple) -> str:
    return ", ".join(f"{k}={v}" for k, v in zip(keys, key, strict=True))


def class_row(
    laid_naps: xr.DataArray,
    *,
    epoch: Any = None,
    order: str | Sequence[Hashable] | None = "cluster",
    examples: Mapping[Hashable, Any] | None = None,
    max_cols: int = 5,
    **topomap_kwargs: Any,
) -> Any:
    """One map per group in a row, ordered by hierarchical clustering of the NAPs.

    Rows longer than ``max_cols`` maps wrap (10 classes: two rows of 5), each example
    input staying above its map. The colour limits are shared by every map, so only the
    last map of the first row draws the colour bar; by default they are those of every
    group and epoch of the layer, so that rows drawn at different epochs compare.

    Parameters
    ----------
    laid_naps : xarray.DataArray
        Laid-out NAPs (see :func:`topoxr.viz.topomap`).
    epoch : optional
        Epoch to draw (default: the last, the highest).
    order : "cluster", None or sequence, default "cluster"
        ``"cluster"``: dendrogram order of the NAPs (the paper's); None: as stored; or an
        explicit sequence of group keys (plain values for a single key).
    examples : dict, optional
        ``{group: image}`` drawn above each map (see :func:`example_inputs`); for a
        stacked grouping the first key (e.g. ``label``) selects the example.
    max_cols : int, default 5
        Most maps per row.
    **topomap_kwargs
        Passed to :func:`topoxr.viz.topomap` (``method``, ``contours``, ``cmap``...).

    Returns
    -------
    holoviews.Layout
        The maps in order, titled by their key; with ``examples``, each row of examples
        lies above its row of maps (``hv.Empty`` pads a short last row).

    Raises
    ------
    ValueError
        If the NAPs have no group dim, or ``order`` names a group that is not in them.
    """
    nap = _normalise(laid_naps)
    keys = group_keys(nap)
    if not keys:
        raise ValueError("class_row needs NAPs with a group dim (e.g. 'label')")
    col = _at_epoch(collect(nap, by=[*keys, cv.EPOCH], **topomap_kwargs), epoch)
    frames = list(col.frames)
    if order == "cluster":
        ordered = cluster_order(nap, epoch=epoch)
    elif order is None:
        ordered = frames
    else:
        ordered = _explicit_order(order, col.frames)
    col.precompute()
    ncols = _row_length(len(ordered), max_cols)
    bar_at = _bar_index(len(ordered), ncols)
    maps = [col.element(k, colorbar=i == bar_at and col.style["colorbar"])
            .relabel(_key_title(keys, k)) for i, k in enumerate(ordered)]
    if examples is None:
        return _layout_opts(hv.Layout(maps).cols(ncols))
    shown = []
    for k in ordered:
        ex = examples.get(k if len(k) > 1 else k[0], examples.get(k[0]))
        if ex is None:
            raise ValueError(f"no example input for group {k!r}")
        shown.append(_example_element(ex, _key_title(keys, k)))
    items: list[Any] = []
    for start in range(0, len(ordered), ncols):  # examples of a row, then its maps
        pad = [hv.Empty() for _ in range(ncols - len(maps[start:start + ncols]))]
        items += shown[start:start + ncols] + pad + maps[start:start + ncols] + pad
    return _layout_opts(hv.Layout(items).cols(ncols))


#: Most maps in one row of a class row or training animation; longer rows wrap.
MAX_COLS = 5


def _row_length(n: int, max_cols: int) -> int:
    """Maps per row: at most ``max_cols``, rows as even as possible (7 maps: 4 + 3)."""
    if max_cols < 1:
        raise ValueError(f"max_cols must be at least 1, got {max_cols}")
    n_rows = -(-max(n, 1) // max_cols)
    return -(-max(n, 1) // n_rows)


def _bar_index(n: int, ncols: int) -> int:
    """The map that draws the collection's one colour bar: the last of the first row.

    The limits are shared by every map of a layer, so one bar describes them all; the
    first row's last map keeps the columns of wrapped rows aligned.
    """
    return min(n, ncols) - 1


def _layout_opts(layout: Any) -> Any:
    # no layout title in HTML: a collection's sliders already name the shown key
    layout = layout.opts(shared_axes=False, show_title=False, backend="bokeh")
    if _HAS_MPL:
        layout = layout.opts(sublabel_format="", backend="matplotlib")
    return layout


def _grid(laid_naps: xr.DataArray, xkey: str, ykey: str, epoch: Any,
          topomap_kwargs: dict[str, Any], what: str) -> Any:
    nap = _normalise(laid_naps)
    keys = group_keys(nap)
    if set(keys) != {xkey, ykey}:
        raise ValueError(
            f"{what} needs NAPs grouped by ['{ykey}', '{xkey}'] (e.g. topoxr.naps(act, "
            f"by=['label', '{xkey if xkey != 'label' else ykey}'])), got groups {keys}"
        )
    col = collect(nap, by=[xkey, ykey, cv.EPOCH], **topomap_kwargs)
    if epoch != "all":  # groups without samples at that epoch: their cell stays empty
        col = _at_epoch(col, epoch, drop_empty=True)
    return _grid_space(col, xkey, ykey, one_bar_per_row=False,
                       auto_width="frame_width" not in topomap_kwargs,
                       auto_points="point_size" not in topomap_kwargs)


#: Widest a grid of maps gets by default (pixels of maps per row in the HTML report).
GRID_WIDTH = 1000


def _grid_space(col: Any, xkey: str, ykey: str, *, one_bar_per_row: bool,
                auto_width: bool, auto_points: bool) -> Any:
    """A GridSpace of a collection's maps, with one colour bar per grid (or per row).

    The bar goes on the rightmost cell of the top row (of every row with
    ``one_bar_per_row``, for rows with their own limits such as models side by side).
    """
    xi, yi = col.by.index(xkey), col.by.index(ykey)
    xs, ys = col.key_values(xkey), col.key_values(ykey)
    cells = {(k[xi], k[yi]) for k in col.frames}
    bars = set()
    top_first = ys if ykey == cv.LABEL else ys[::-1]  # the order the rows are drawn in
    for y in (ys if one_bar_per_row else top_first):
        row = [x for x in xs if (x, y) in cells]
        if row:
            bars.add((row[-1], y))
            if not one_bar_per_row:
                break
    if auto_width:  # keep wide grids (10 classes) on the page, with smaller neurons
        width = int(max(90, min(col.style["frame_width"], GRID_WIDTH // max(len(xs), 1))))
        scale = width / col.style["frame_width"]
        col.style["frame_width"] = width
        if auto_points:
            col.style["point_size"] = max(2, int(col.style["point_size"] * scale + 0.5))
    col.precompute()
    frames = {k: col.element(k, colorbar=(k[xi], k[yi]) in bars and col.style["colorbar"])
              for k in col.frames}
    hmap = hv.HoloMap(frames, kdims=list(col.by))
    return hmap.grid([xkey, ykey])


def contrast_grid(laid_naps: xr.DataArray, *, epoch: Any = None, **topomap_kwargs: Any) -> Any:
    """Binary contrast: per class, the map of correctly over wrongly predicted samples.

    Parameters
    ----------
    laid_naps : xarray.DataArray
        NAPs grouped by ``["label", "correct"]`` (a stacked ``group`` dim).
    epoch : optional
        Epoch to draw (default the last; ``"all"`` keeps an epoch slider).
    **topomap_kwargs
        Passed to :func:`topoxr.viz.topomap`.

    Returns
    -------
    holoviews.GridSpace
        Keyed by ``(label, correct)``: columns are classes, the ``correct=True`` row
        lies above the ``correct=False`` row. Combinations that never occur are empty.
    """
    return _grid(laid_naps, cv.LABEL, cv.CORRECT, epoch, topomap_kwargs, "contrast_grid")


def attribute_grid(laid_naps: xr.DataArray, attribute: str, *, epoch: Any = None,
                   **topomap_kwargs: Any) -> Any:
    """Per class, the maps of the samples with each value of a sample attribute.

    The view that reveals a bias: group the NAPs by class and by a sensitive attribute
    (e.g. ``topoxr.naps(act, by=["label", "marked"])``); where the attribute changes how
    the network sees a class, the rows differ.

    Parameters
    ----------
    laid_naps : xarray.DataArray
        NAPs grouped by ``["label", attribute]``.
    attribute : str
        The attribute (a sample coordinate of the recorded activations).
    epoch : optional
        Epoch to draw (default the last; ``"all"`` keeps an epoch slider).
    **topomap_kwargs
        Passed to :func:`topoxr.viz.topomap`.

    Returns
    -------
    holoviews.GridSpace
        Keyed by ``(label, attribute)``: columns are classes, one row per attribute value
        (the largest on top); combinations that never occur are empty.
    """
    return _grid(laid_naps, cv.LABEL, attribute, epoch, topomap_kwargs, "attribute_grid")


def confusion_grid(laid_naps: xr.DataArray, *, epoch: Any = None, **topomap_kwargs: Any) -> Any:
    """Confusion grid: one map per (label, prediction) pair, like a confusion matrix.

    Parameters
    ----------
    laid_naps : xarray.DataArray
        NAPs grouped by ``["label", "prediction"]``.
    epoch : optional
        Epoch to draw (default the last; ``"all"`` keeps an epoch slider).
    **topomap_kwargs
        Passed to :func:`topoxr.viz.topomap`.

    Returns
    -------
    holoviews.GridSpace
        Keyed by ``(prediction, label)``: predictions along x, labels along y; pairs
        that never occur are empty.
    """
    return _grid(laid_naps, cv.PREDICTION, cv.LABEL, epoch, topomap_kwargs, "confusion_grid")


def training_animation(
    laid_naps: xr.DataArray,
    *,
    order: str | Sequence[Hashable] | None = "cluster",
    max_cols: int = 5,
    **topomap_kwargs: Any,
) -> Any:
    """The class row over epochs: one frame per epoch, for a slider and a player.

    Use one fixed layout (``x``/``y`` on ``neuron``) or per-epoch layouts aligned with
    :mod:`topoxr.align` (``x``/``y`` on ``("neuron", "epoch")``), so frames are comparable.
    Colour limits are shared by every epoch.

    Parameters
    ----------
    laid_naps : xarray.DataArray
        Laid-out NAPs with an ``epoch`` dim.
    order : "cluster", None or sequence, default "cluster"
        Group order (clustered on the last epoch).
    max_cols : int, default 5
        Most maps per row; longer rows wrap. The last map of the first row draws the
        colour bar (the limits are shared by all maps and epochs).
    **topomap_kwargs
        Passed to :func:`topoxr.viz.topomap`.

    Returns
    -------
    holoviews.Layout
        One :class:`holoviews.HoloMap` per group, each keyed by ``epoch``; exported,
        they share one epoch slider and player.

    Raises
    ------
    ValueError
        If ``order`` names a group that is not in the NAPs (as :func:`class_row`).
    """
    nap = _normalise(laid_naps)
    keys = group_keys(nap)
    col = collect(nap, by=[*keys, cv.EPOCH], **topomap_kwargs)
    if order == "cluster" and keys:
        ordered = cluster_order(nap)
    elif order is None or not keys:
        ordered = list(dict.fromkeys(k[:-1] for k in col.frames))
    else:
        ordered = _explicit_order(order, (k[:-1] for k in col.frames))
    col.precompute()
    epochs = col.key_values(cv.EPOCH)
    ncols = _row_length(len(ordered), max_cols)
    panels = []
    for i, g in enumerate(ordered):
        bar = i == _bar_index(len(ordered), ncols) and col.style["colorbar"]
        frames = {(e,): col.element((*g, e), colorbar=bar)
                  .relabel(_key_title(keys, g) if keys else "")
                  for e in epochs if (*g, e) in col.frames}
        panels.append(hv.HoloMap(frames, kdims=[cv.EPOCH]))
    return _layout_opts(hv.Layout(panels).cols(ncols))


def compare_models(
    models: Mapping[Hashable, xr.DataArray] | Sequence[xr.DataArray],
    *,
    epoch: Any = None,
    **topomap_kwargs: Any,
) -> Any:
    """Models side by side: one row of group maps per model.

    Parameters
    ----------
    models : dict or list of xarray.DataArray
        Laid-out NAPs of each model (same grouping), e.g. ``{"torch": a, "keras": b}``.
    epoch : optional
        Epoch to draw (default the last of each; ``"all"`` keeps an epoch slider).
    **topomap_kwargs
        Passed to :func:`topoxr.viz.topomap` (``clim="shared"`` shares colour limits
        across models; by default each model's layer has its own symmetric limits).

    Returns
    -------
    holoviews.GridSpace
        Keyed by (group key, ``model``).
    """
    if not isinstance(models, Mapping | list | tuple):
        raise TypeError(f"models must be a dict {{name: laid NAPs}} or a list of laid NAPs, "
                        f"got {type(models).__name__} (one model: use topomap or class_row)")
    col = collect(models if isinstance(models, Mapping) else list(models), by=None,
                  **topomap_kwargs)
    if epoch != "all":
        col = _at_epoch(col, epoch)
    keys = col.sources[0].keys
    if len(keys) != 1:
        raise ValueError(f"compare_models needs NAPs grouped by one key, got {keys}")
    if len(col.sources[0].groups) < 2 or any(len(s.groups) < 2 for s in col.sources):
        raise ValueError(f"compare_models draws a row of group maps per model; a model has "
                         f"fewer than two groups of {keys[0]!r}")
    return _grid_space(col, keys[0], MODEL, one_bar_per_row=True,
                       auto_width="frame_width" not in topomap_kwargs,
                       auto_points="point_size" not in topomap_kwargs)
