"""Fast still images of the views, drawn straight from their data with matplotlib.

HoloViews' plotting builds a whole plot object per map; a report of a hundred maps spends
most of its time there, and each interactive map weighs tens of kilobytes in the page.
:func:`still_figure` draws the same view (a map, a :func:`~topoxr.viz.class_row`, a grid,
models side by side, one epoch of a :func:`~topoxr.viz.training_animation`) from the
elements' data: interpolated image, neurons, titles, blank cells, one colour bar per
colour range. :func:`still_png` returns it as PNG bytes; :func:`still_frames` draws one
PNG per epoch of an animation. :class:`topoxr.viz.Report` uses them for
``add(obj, still=True)``.
"""

from __future__ import annotations

import io
import logging
from typing import Any

import numpy as np

from topoxr._optional import import_optional
from topoxr.viz.topomap import hv

__all__ = ["still_figure", "still_frames", "still_png"]

logger = logging.getLogger(__name__)


def _cells(obj: Any) -> tuple[list[tuple[Any, str | None]], int]:
    """The panels of a view in reading order, each with its title, and the columns.

    Built without HoloViews' relabelling and option machinery, which costs more than
    drawing the panel.
    """
    from topoxr.viz.report import _grid_cells, _holomap_as_panels

    if isinstance(obj, hv.HoloMap) and not isinstance(obj, hv.GridSpace):
        obj = _holomap_as_panels(obj)
    if isinstance(obj, hv.GridSpace):  # as topoxr.viz.report._grid_as_layout draws it
        return _grid_cells(obj)
    if isinstance(obj, hv.Layout):
        items = [_holomap_as_panels(el) if isinstance(el, hv.HoloMap) else el
                 for el in obj.values()]
        return [(el, None) for el in items], int(obj._max_cols or len(items))
    return [(obj, None)], 1


def _parts(el: Any) -> dict[str, Any]:
    """Image, points and styling of one panel (an overlay of our maps, or an input)."""
    parts: dict[str, Any] = {"title": str(el.label or ""), "image": None, "points": None,
                             "clim": None, "input": False, "vlabel": "", "cmap": None}
    for item in (el if isinstance(el, hv.Overlay) else [el]):
        if isinstance(item, hv.Image):
            vdim = item.vdims[0]
            parts["image"] = (np.asarray(item.dimension_values(2, flat=False), float),
                              item.bounds.lbrt())
            parts["input"] = vdim.name == "input"
            parts["clim"] = vdim.range if not parts["input"] else None
            parts["cmap"] = parts["cmap"] or _cmap_of(item)
            parts["vlabel"] = vdim.pprint_label
            parts["title"] = parts["title"] or str(item.label or "")
        elif isinstance(item, hv.RGB):
            parts["rgb"] = (np.dstack([item.dimension_values(d, flat=False)
                                       for d in item.vdims[:3]]), item.bounds.lbrt())
        elif isinstance(item, hv.Points):
            vdim = item.vdims[0]
            parts["points"] = (item.dimension_values(0), item.dimension_values(1),
                               np.asarray(item.dimension_values(2), float))
            parts["clim"] = parts["clim"] or vdim.range
            parts["vlabel"] = parts["vlabel"] or vdim.pprint_label
            parts["cmap"] = parts["cmap"] or _cmap_of(item)
            x_range, y_range = item.kdims[0].range, item.kdims[1].range
            if None not in (*x_range, *y_range):
                parts["ranges"] = (x_range, y_range)
    return parts


def _cmap_of(item: Any) -> Any:
    """The colormap ``item`` was styled with (``.opts(cmap=...)``), None where none."""
    try:
        return hv.Store.lookup_options(hv.Store.current_backend, item, "style").kwargs.get(
            "cmap")
    except Exception:  # no options registered for the backend
        return None


def _matplotlib_cmap(cmap: Any) -> Any:
    """A matplotlib colormap for a HoloViews one (a name of any of its palettes, or a list
    of colours)."""
    from holoviews.plotting.util import process_cmap
    from matplotlib.colors import ListedColormap

    return ListedColormap(process_cmap(cmap, ncolors=256))


def still_figure(obj: Any, *, panel_inches: float = 1.7, dpi: int = 80,
                 cmap: str | None = None, point_size: float = 6.0,
                 title: str | None = None) -> Any:
    """Draw a view as one matplotlib figure, every map a titled panel.

    Parameters
    ----------
    obj : HoloViews object
        A map (overlay), a layout of maps (e.g. :func:`topoxr.viz.class_row`), a
        ``GridSpace`` (grids, models side by side) or a ``HoloMap`` (drawn as panels; an
        ``epoch`` key at its last epoch, each panel at its own, titled with it where the
        panels' epochs differ, as :func:`topoxr.viz.save_png` draws it).
    panel_inches : float, default 1.7
        Size of each panel.
    dpi : int, default 80
        Resolution.
    cmap : str, optional
        Colormap of the maps; by default each map's own (``topomap(..., cmap=...)``),
        as the interactive figure and :func:`topoxr.viz.save_png` draw it.
    point_size : float, default 6
        Marker area of the neurons.
    title : str, optional
        Figure title.

    Returns
    -------
    matplotlib.figure.Figure
        One colour bar per colour range (the maps of a layer share theirs).
    """
    plt = import_optional("matplotlib.pyplot", extra="viz", purpose="still images")
    cells, ncols = _cells(obj)
    n = len(cells)
    ncols = max(1, min(ncols, n))
    nrows = -(-n // ncols)
    parts = []
    for cell, cell_title in cells:
        part = None if isinstance(cell, hv.Empty) else _parts(cell)
        if part is not None and cell_title is not None:
            part["title"] = cell_title
        parts.append(part)
    clims = list(dict.fromkeys(tuple(p["clim"]) for p in parts if p and p["clim"]))
    bars = len(clims)
    width = panel_inches * ncols + 0.25 + 0.9 * min(bars, 1)
    height = (panel_inches + 0.3) * nrows + (0.35 if title else 0.1)
    fig, axes = plt.subplots(nrows, ncols, figsize=(width, height), squeeze=False, dpi=dpi)
    mappables: dict[tuple, Any] = {}
    labels: dict[tuple, str] = {}
    users: dict[tuple, list[Any]] = {}  # the axes of the maps drawn with each range
    for ax, part in zip(axes.flat, parts + [None] * (nrows * ncols - n), strict=True):
        ax.set_axis_off()
        if part is None:
            continue
        if part.get("rgb") is not None:
            rgb, (l, b, r, t) = part["rgb"]
            ax.imshow(rgb, origin="lower", extent=(l, r, b, t))
        elif part["image"] is not None and part["input"]:
            img, (l, b, r, t) = part["image"]
            ax.imshow(img, origin="lower", extent=(l, r, b, t), cmap="gray_r",
                      interpolation="nearest")
        else:
            lo, hi = part["clim"] or (-1.0, 1.0)
            colours = _matplotlib_cmap(cmap or part["cmap"] or "RdBu_r")
            if part["image"] is not None:
                img, (l, b, r, t) = part["image"]
                m = ax.imshow(img, origin="lower", extent=(l, r, b, t), cmap=colours,
                              vmin=lo, vmax=hi, interpolation="nearest")
                mappables.setdefault((lo, hi), m)
            if part["points"] is not None:
                x, y, v = part["points"]
                m = ax.scatter(x, y, c=v, cmap=colours, vmin=lo, vmax=hi, s=point_size,
                               edgecolors="black", linewidths=0.3)
                mappables.setdefault((lo, hi), m)
            labels.setdefault((lo, hi), part["vlabel"])
            users.setdefault((lo, hi), []).append(ax)
            if "ranges" in part:
                ax.set_xlim(*part["ranges"][0])
                ax.set_ylim(*part["ranges"][1])
        ax.set_title(part["title"], fontsize=8)
        ax.set_aspect("equal")
    right = 1 - (0.9 / width if bars else 0.02)
    fig.subplots_adjust(left=0.01, right=right - 0.01, bottom=0.02,
                        top=1 - (0.45 if title else 0.25) / height, wspace=0.06, hspace=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    extents = _bar_extents({clim: users[clim] for clim in mappables})
    for clim, mappable in mappables.items():
        y0, y1 = extents[clim]
        cax = fig.add_axes((right + 0.1 / width, y0, 0.12 / width, y1 - y0))
        bar = fig.colorbar(mappable, cax=cax)
        bar.set_label(labels.get(clim, ""), fontsize=7)
        bar.ax.tick_params(labelsize=6)
    return fig


def _bar_extents(users: dict[tuple, list[Any]]) -> dict[tuple, tuple[float, float]]:
    """The vertical extent (figure fraction) of the colour bar of each range.

    Each bar spans the maps drawn with its range (from the lowest to the highest of their
    axes), so it sits beside the row, or rows, it belongs to whatever the order the ranges
    were met in. Ranges whose maps share rows (two ranges in one row) split the rows'
    extent between them, top to bottom in the order of their highest map.
    """
    spans: dict[tuple, tuple[float, float]] = {}
    for clim, axes in users.items():
        boxes = []
        for ax in axes:
            ax.apply_aspect()  # the box the map is drawn in, not its grid slot
            boxes.append(ax.get_position())
        spans[clim] = (min(b.y0 for b in boxes), max(b.y1 for b in boxes))
    # ranges top first; a range overlapping the group above joins it
    order = sorted(spans, key=lambda c: -spans[c][1])
    clusters: list[list[tuple]] = []
    for clim in order:
        if clusters and spans[clim][1] > min(spans[c][0] for c in clusters[-1]):
            clusters[-1].append(clim)
        else:
            clusters.append([clim])
    extents: dict[tuple, tuple[float, float]] = {}
    for cluster in clusters:
        bottom = min(spans[c][0] for c in cluster)
        top = max(spans[c][1] for c in cluster)
        step = (top - bottom) / len(cluster)
        for i, clim in enumerate(cluster):
            hi = top - i * step
            pad = 0.05 * step if len(cluster) > 1 else 0.0
            extents[clim] = (hi - step + pad, hi - pad)
    return extents


def still_png(obj: Any, **kwargs: Any) -> bytes:
    """:func:`still_figure` as PNG bytes (the figure is closed).

    Parameters
    ----------
    obj : HoloViews object
        See :func:`still_figure`.
    **kwargs
        Passed to :func:`still_figure`.

    Returns
    -------
    bytes
    """
    import matplotlib.pyplot as plt

    fig = still_figure(obj, **kwargs)
    fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba())
    plt.close(fig)
    return _quantized_png(rgba[..., :3])


def _quantized_png(rgb: np.ndarray, colors: int = 128) -> bytes:
    """A PNG of at most ``colors`` colours: a third of the bytes, no visible difference."""
    image_mod = import_optional("PIL.Image", extra="viz", purpose="still images")
    image = image_mod.fromarray(np.ascontiguousarray(rgb)).quantize(
        colors=colors, method=image_mod.Quantize.MEDIANCUT, dither=image_mod.Dither.NONE)
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def still_frames(obj: Any, **kwargs: Any) -> tuple[str, list[Any], list[bytes]]:
    """One PNG per value of the key of an animation (e.g. every epoch).

    Parameters
    ----------
    obj : holoviews.Layout or holoviews.HoloMap
        HoloMaps that share one key dimension (as :func:`topoxr.viz.training_animation`
        returns them), or one HoloMap with one key.
    **kwargs
        Passed to :func:`still_figure`.

    Returns
    -------
    name : str
        The key dimension (e.g. ``"epoch"``).
    values : list
        Its values, sorted.
    frames : list of bytes
        One PNG per value, every group's map as a titled panel.

    Raises
    ------
    ValueError
        If the HoloMaps do not share exactly one key dimension.
    """
    maps = list(obj.values()) if isinstance(obj, hv.Layout) else [obj]
    if not maps or not all(isinstance(m, hv.HoloMap) for m in maps):
        raise ValueError("still_frames needs HoloMaps (e.g. topoxr.viz.training_animation)")
    dims = {tuple(d.name for d in m.kdims) for m in maps}
    if len(dims) != 1 or len(next(iter(dims))) != 1:
        raise ValueError(f"the HoloMaps must share one key dimension, got {sorted(dims)}")
    (name,) = next(iter(dims))
    values = sorted({k[0] for m in maps for k in m.data})
    ncols = int(obj._max_cols) if isinstance(obj, hv.Layout) and obj._max_cols else len(maps)
    frames = []
    for v in values:
        panels = [m.data.get((v,), hv.Empty()) for m in maps]
        layout = hv.Layout(panels).cols(min(ncols, len(panels)))
        frames.append(still_png(layout, title=f"{name} {v}", **kwargs))
    logger.debug("still_frames: %d frames of %d maps (key %s)", len(frames), len(maps), name)
    return str(name), [v.item() if isinstance(v, np.generic) else v for v in values], frames

