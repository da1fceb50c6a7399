"""Topographic activation maps as HoloViews objects, sliceable by any label.

A map is an interpolated :class:`holoviews.Image` (NaN, i.e. transparent, outside the
neurons' convex hull unless an extrapolation is chosen) overlaid with the neurons as
:class:`holoviews.Points` (hover: neuron id, value, layer). Collections of maps are keyed
by any labels of the NAPs (``label``, ``correct``, ``prediction``, ``epoch``, ``model``,
...) and returned as a :class:`holoviews.HoloMap` (static, exportable) or a
:class:`holoviews.DynamicMap` (computed on demand).

Every layout is triangulated once (:class:`topoxr.interpolate.GridInterpolator`); all
groups and epochs drawn with it are interpolated in one vectorised step.

This module imports HoloViews and registers the bokeh (and, when matplotlib is present,
matplotlib) plotting options; it never calls ``hv.extension`` and never shows anything.
"""

from __future__ import annotations

import logging
import numbers
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from topoxr import conventions as cv
from topoxr._optional import has_module, import_optional
from topoxr.interpolate import GridInterpolator

hv = import_optional("holoviews", extra="viz", purpose="topoxr.viz")
import_optional("holoviews.plotting.bokeh", extra="viz", purpose="topoxr.viz")
_HAS_MPL = has_module("matplotlib")
if _HAS_MPL:  # options for PNG export; does not change the current backend
    _current = hv.Store.current_backend
    import holoviews.plotting.mpl  # noqa: F401
    hv.Store.set_current_backend(_current)

__all__ = ["MODEL", "MapCollection", "collect", "group_keys", "to_holoviews", "topomap"]

logger = logging.getLogger(__name__)

#: Key dimension naming the model when several models are drawn side by side.
MODEL = "model"
#: Name of the value dimension when the NAPs are unnamed.
DEFAULT_VALUE = "nap"
# attribute written by topoxr.naps (not imported: topoxr.naps is not needed to draw maps)
_ATTR_NAP = "topoxr_nap"


@dataclass
class _Source:
    """One model's laid-out NAPs, normalised to ``(group, epoch, neuron)`` numpy arrays."""

    name: Hashable
    da: xr.DataArray
    keys: list[str]  # group key names (MultiIndex levels or the group dim)
    groups: list[tuple]  # key values of each group position
    epochs: np.ndarray
    values: np.ndarray  # (group, epoch, neuron) float64
    x: np.ndarray  # (neuron,) or (epoch, neuron)
    y: np.ndarray
    neurons: np.ndarray
    layer: str
    model: str | None
    vname: str
    vlabel: str  # colour bar title
    counts: np.ndarray | None  # (group, epoch)
    interp_kwargs: dict[str, Any]
    _interps: dict[int, GridInterpolator] = field(default_factory=dict)
    _cache: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)

    @property
    def per_epoch_layout(self) -> bool:
        return self.x.ndim == 2

    def interpolator(self, epoch_index: int) -> GridInterpolator:
        """The interpolator of an epoch's layout (one shared one for a fixed layout)."""
        k = epoch_index if self.per_epoch_layout else 0
        if k not in self._interps:
            x = self.x[k] if self.per_epoch_layout else self.x
            y = self.y[k] if self.per_epoch_layout else self.y
            self._interps[k] = GridInterpolator(x, y, **self.interp_kwargs)
        return self._interps[k]

    def positions(self, epoch_index: int) -> tuple[np.ndarray, np.ndarray]:
        if self.per_epoch_layout:
            return self.x[epoch_index], self.y[epoch_index]
        return self.x, self.y

    def precompute(self, pairs: Iterable[tuple[int, int]]) -> None:
        """Interpolate the maps of many (group, epoch) pairs: one call per layout."""
        todo = sorted({p for p in pairs if p not in self._cache})
        by_layout: dict[int, list[tuple[int, int]]] = {}
        for gi, ei in todo:
            by_layout.setdefault(ei if self.per_epoch_layout else 0, []).append((gi, ei))
        for k, items in by_layout.items():
            g, e = np.array(items).T
            maps = self.interpolator(k)(self.values[g, e])  # (n_items, ny, nx)
            self._cache.update(zip(items, maps, strict=True))

    def all_maps(self) -> np.ndarray:
        """Every (group, epoch) map as an array ``(group, epoch, ny, nx)``."""
        n_g, n_e = self.values.shape[:2]
        self.precompute((g, e) for g in range(n_g) for e in range(n_e))
        return np.stack([np.stack([self._cache[(g, e)] for e in range(n_e)])
                         for g in range(n_g)])

    def one_map(self, gi: int, ei: int) -> np.ndarray:
        if (gi, ei) not in self._cache:
            return self.interpolator(ei)(self.values[gi, ei])
        return self._cache[(gi, ei)]

    def max_abs(self) -> float:
        """Largest absolute NAP over every group and epoch (0 when none is finite)."""
        finite = self.values[np.isfinite(self.values)]
        return float(np.abs(finite).max()) if finite.size else 0.0


def group_keys(nap: xr.DataArray) -> list[str]:
    """Names of the labels that define the groups of laid-out NAPs.

    Parameters
    ----------
    nap : xarray.DataArray
        NAPs with dims ``("neuron", <group dim>, "epoch")``.

    Returns
    -------
    list of str
        The MultiIndex level names of a stacked ``group`` dim, or the group dim's name
        (``["label"]`` for ``by="label"``); empty when there is no group dim.
    """
    dims = [d for d in nap.dims if d not in (cv.NEURON, cv.EPOCH)]
    if not dims:
        return []
    if len(dims) > 1:
        return list(dims)
    dim = dims[0]
    index = nap.indexes.get(dim)
    if isinstance(index, pd.MultiIndex):
        return [str(n) for n in index.names]
    return [str(dim)]


def _ascending_epochs(obj: Any) -> Any:
    """``obj`` (a DataArray or Dataset) with its epochs in ascending order.

    Epochs are kept in the order they were written; the maps read them by epoch label, so
    that "the last epoch" is the highest one (the trained network) and animations and
    sliders run forwards in training.
    """
    if cv.EPOCH not in obj.dims or obj.indexes[cv.EPOCH].is_monotonic_increasing:
        return obj
    return obj.sortby(cv.EPOCH)


def _normalise(nap: Any) -> xr.DataArray:
    if isinstance(nap, xr.Dataset):
        if DEFAULT_VALUE in nap.data_vars:
            nap = nap[DEFAULT_VALUE]
        elif len(nap.data_vars) == 1:
            nap = next(iter(nap.data_vars.values()))
        else:
            raise TypeError(
                "pass the NAPs as a DataArray (the Dataset has several variables: "
                f"{sorted(map(str, nap.data_vars))})"
            )
    if not isinstance(nap, xr.DataArray):
        raise TypeError(
            f"laid-out NAPs must be an xarray.DataArray (or a dict/list of them), got "
            f"{type(nap).__name__}"
        )
    cv.validate(nap, dims=(cv.NEURON,), coords=(cv.X, cv.Y))
    for c in (cv.X, cv.Y):
        extra = set(nap[c].dims) - {cv.NEURON, cv.EPOCH}
        if extra or cv.NEURON not in nap[c].dims:
            raise cv.ConventionError(
                f"layout coordinate {c!r} must have dims ('neuron',) or ('neuron', 'epoch'), "
                f"got {nap[c].dims}"
            )
    if cv.EPOCH not in nap.dims:  # one epoch (a scalar epoch coord keeps its value)
        if cv.EPOCH in nap.coords and nap[cv.EPOCH].ndim == 0:
            nap = nap.expand_dims(cv.EPOCH, axis=-1)
        else:
            nap = nap.expand_dims({cv.EPOCH: [0]}, axis=-1)
    nap = _ascending_epochs(nap)
    group_dims = [d for d in nap.dims if d not in (cv.NEURON, cv.EPOCH)]
    if len(group_dims) > 1:  # several group dims: stack them, keep what occurs
        nap = nap.stack(group=group_dims)
        occurs = nap.notnull().any([cv.NEURON, cv.EPOCH]).values
        nap = nap.isel(group=np.flatnonzero(occurs))
    return nap


def _make_source(name: Hashable, nap: Any, interp_kwargs: dict[str, Any]) -> _Source:
    nap = _normalise(nap)
    keys = group_keys(nap)
    group_dims = [d for d in nap.dims if d not in (cv.NEURON, cv.EPOCH)]
    if group_dims:
        gdim = group_dims[0]
        index = nap.indexes.get(gdim)
        if isinstance(index, pd.MultiIndex):
            groups = [tuple(_plain(v) for v in t) for t in index]
        elif gdim in nap.coords:
            groups = [(_plain(v),) for v in nap[gdim].values]
        else:
            groups = [(i,) for i in range(nap.sizes[gdim])]
        values = nap.transpose(gdim, cv.EPOCH, cv.NEURON).values
    else:
        groups = [()]
        values = nap.transpose(cv.EPOCH, cv.NEURON).values[None]
    counts = None
    if "count" in nap.coords and group_dims:
        cnt = nap["count"]
        if cv.EPOCH not in cnt.dims:
            cnt = cnt.expand_dims({cv.EPOCH: nap.sizes[cv.EPOCH]})
        if group_dims[0] not in cnt.dims:
            cnt = cnt.expand_dims({group_dims[0]: nap.sizes[group_dims[0]]})
        counts = cnt.transpose(group_dims[0], cv.EPOCH).values
    x = nap[cv.X].transpose(*[d for d in (cv.EPOCH, cv.NEURON) if d in nap[cv.X].dims]).values
    y = nap[cv.Y].transpose(*[d for d in (cv.EPOCH, cv.NEURON) if d in nap[cv.Y].dims]).values
    if x.ndim != y.ndim:
        x, y = np.broadcast_arrays(np.atleast_2d(x), np.atleast_2d(y))
        if x.shape[0] == 1:
            x = np.broadcast_to(x, (nap.sizes[cv.EPOCH], x.shape[1]))
            y = np.broadcast_to(y, x.shape)
    neurons = nap[cv.NEURON].values if cv.NEURON in nap.coords else np.arange(nap.sizes[cv.NEURON])
    epochs = nap[cv.EPOCH].values if cv.EPOCH in nap.coords else np.arange(nap.sizes[cv.EPOCH])
    return _Source(
        name=name, da=nap, keys=keys, groups=groups,
        epochs=np.array([_plain(e) for e in epochs]),
        values=np.asarray(values, dtype=np.float64),
        x=np.asarray(x, dtype=np.float64), y=np.asarray(y, dtype=np.float64),
        neurons=np.asarray(neurons),
        layer=str(nap.attrs.get(cv.ATTR_LAYER, nap.name or "layer")),
        model=nap.attrs.get(cv.ATTR_MODEL),
        vname=str(nap.name) if nap.name is not None else DEFAULT_VALUE,
        vlabel=_value_label(nap), counts=counts, interp_kwargs=interp_kwargs,
    )


def _value_label(nap: xr.DataArray) -> str:
    """Colour bar title: ``long_name``, else what :func:`topoxr.naps` says it computed."""
    import json

    if nap.attrs.get("long_name"):
        return str(nap.attrs["long_name"])
    name = str(nap.name) if nap.name is not None else DEFAULT_VALUE
    if name != DEFAULT_VALUE:
        return name
    try:
        normalize = json.loads(nap.attrs.get(_ATTR_NAP, "{}")).get("normalize")
    except (TypeError, ValueError):
        normalize = None
    if normalize is None and "normalize" in nap.attrs:  # topoxr.testing.maps
        normalize = True
    if normalize is True:
        return "NAP (normalised)"
    if normalize is False:
        return "NAP (mean activation)"
    return "NAP"


def _plain(v: Any) -> Any:
    """numpy scalars to Python scalars, so keys are hashable and print nicely."""
    return v.item() if isinstance(v, np.generic) else v


def _sources(laid_naps: Any, interp_kwargs: dict[str, Any]) -> tuple[list[_Source], bool]:
    if isinstance(laid_naps, Mapping):
        if not laid_naps:
            raise ValueError("no NAPs given: the mapping is empty")
        return [_make_source(k, v, interp_kwargs) for k, v in laid_naps.items()], True
    if isinstance(laid_naps, list | tuple):
        if not laid_naps:
            raise ValueError("no NAPs given: the list is empty")
        attrs = [getattr(da, "attrs", {}) for da in laid_naps]
        models = [a.get(cv.ATTR_MODEL) or f"model {i}" for i, a in enumerate(attrs)]
        # a model given with several layers: each of them named model/layer
        names: list[Hashable] = [
            f"{m}/{a.get(cv.ATTR_LAYER, i)}" if models.count(m) > 1 else m
            for i, (m, a) in enumerate(zip(models, attrs, strict=True))]
        twice = sorted({str(n) for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(
                f"several inputs are named {twice} (by their model and layer attributes): "
                "their maps could not be told apart; pass a mapping {name: laid NAPs} "
                "to name each")
        pairs = zip(names, laid_naps, strict=True)
        return [_make_source(n, d, interp_kwargs) for n, d in pairs], True
    src = _make_source(None, laid_naps, interp_kwargs)
    src.name = src.model
    return [src], False


@dataclass
class MapCollection:
    """The frames of a collection of topographic maps, before they become HoloViews objects.

    Built by :func:`topoxr.viz.topomap`; exposed for the views and exports that need the
    numbers (for example the animated GIF).
    """

    sources: list[_Source]
    multi: bool
    by: list[str]
    frames: dict[tuple, tuple[int, int, int]]  # key -> (source, group, epoch)
    clims: list[tuple[float, float]]
    style: dict[str, Any]

    @property
    def key_dims(self) -> list[str]:
        return self.by

    def key_values(self, dim: str) -> list:
        """Sorted distinct values of a key dim over the frames.

        Parameters
        ----------
        dim : str
            One of :attr:`key_dims`.

        Returns
        -------
        list
            The distinct values ``dim`` takes in the frames' keys, sorted; in no set order
            when they cannot be compared with one another.

        Raises
        ------
        ValueError
            If ``dim`` is not one of :attr:`key_dims`.
        """
        i = self.by.index(dim)
        vals = {k[i] for k in self.frames}
        try:
            return sorted(vals)
        except TypeError:
            return list(vals)

    def precompute(self) -> None:
        """Interpolate every frame's map: one vectorised call per layout."""
        if not self.style["interpolate"]:
            return
        for si, src in enumerate(self.sources):
            src.precompute((gi, ei) for s2, gi, ei in self.frames.values() if s2 == si)

    def element(self, key: tuple, *, colorbar: bool | None = None) -> hv.Overlay:
        """The overlay (image, contours, points) of one frame, or an empty one if absent.

        Parameters
        ----------
        key : tuple
            The frame's key (values of :attr:`key_dims`).
        colorbar : bool, optional
            Whether this frame draws its colour bar; default the collection's
            ``colorbar`` style. Given, it overrides the style for this frame. Views that
            place many maps side by side draw one bar per row where the style has bars
            (the limits are shared, so one bar describes the whole row).

        Returns
        -------
        holoviews.Overlay
            The frame's interpolated ``Image`` (when the style interpolates) with its
            ``Contours`` (when the style asks for them) and its ``Points`` (when the style
            asks for them, or without an image). For a key with no frame, the same overlay
            filled with NaN and titled "(no samples)", drawn on the first source's layout
            (or, with a ``model`` key dim, on that model's).
        """
        style = self.style if colorbar is None else {**self.style, "colorbar": bool(colorbar)}
        if key not in self.frames:
            return self._empty(key, style)
        si, gi, ei = self.frames[key]
        return _overlay(self.sources[si], gi, ei, self.clims[si], style)

    def _empty(self, key: tuple, style: dict[str, Any]) -> hv.Overlay:
        src = self.sources[0]
        si = 0
        if MODEL in self.by:
            name = key[self.by.index(MODEL)]
            si = next((i for i, s in enumerate(self.sources) if s.name == name), 0)
            src = self.sources[si]
        interp = src.interpolator(0)
        nan_map = np.full(interp.shape, np.nan)
        return _build_overlay(
            src, interp, nan_map, np.full(src.neurons.shape, np.nan), *src.positions(0),
            self.clims[si], style, title_suffix="(no samples)",
        )


def _overlay(src: _Source, gi: int, ei: int, clim: tuple[float, float],
             style: dict[str, Any]) -> hv.Overlay:
    interp = src.interpolator(ei)
    grid = src.one_map(gi, ei) if style["interpolate"] else None
    x, y = src.positions(ei)
    return _build_overlay(src, interp, grid, src.values[gi, ei], x, y, clim, style)


def _build_overlay(
    src: _Source, interp: GridInterpolator, grid: np.ndarray | None, values: np.ndarray,
    x: np.ndarray, y: np.ndarray, clim: tuple[float, float], style: dict[str, Any],
    title_suffix: str = "",
) -> hv.Overlay:
    vdim = hv.Dimension(src.vname, label=style["value_label"] or src.vlabel, range=clim)
    xrange, yrange = _square_ranges(interp.bounds)
    kx = hv.Dimension(cv.X, range=xrange)
    ky = hv.Dimension(cv.Y, range=yrange)
    label = src.layer if not title_suffix else f"{src.layer} {title_suffix}"
    layers: list[Any] = []
    cmap = style["cmap"]
    if grid is not None:
        image = hv.Image((interp.xs, interp.ys, grid), kdims=[kx, ky], vdims=[vdim])
        image = image.opts(
            cmap=cmap, clim=clim, colorbar=style["colorbar"], tools=["hover"],
            clipping_colors={"NaN": (0, 0, 0, 0)},
            frame_width=style["frame_width"], frame_height=style["frame_width"],
            xaxis=None, yaxis=None, backend="bokeh",
        )
        if _HAS_MPL:
            image = image.opts(cmap=cmap, clim=clim, colorbar=style["colorbar"], aspect="equal",
                               xaxis=None, yaxis=None, backend="matplotlib")
        layers.append(image)
        if style["contours"]:
            levels = style["contours"] if not isinstance(style["contours"], bool) else 6
            if isinstance(levels, int):
                levels = [lv for lv in np.linspace(clim[0], clim[1], levels + 2)[1:-1]
                          if abs(lv) > 1e-12 * max(abs(clim[1]), 1e-300)]
            contours = hv.operation.contours(image, levels=list(levels), filled=False)
            contours = contours.opts(line_color="black", line_width=0.6, alpha=0.6,
                                     colorbar=False, backend="bokeh")
            if _HAS_MPL:
                contours = contours.opts(color="black", linewidth=0.6, alpha=0.6,
                                         backend="matplotlib")
            layers.append(contours)
    if style["points"] or grid is None:
        data = {cv.X: x, cv.Y: y, src.vname: values, "neuron": src.neurons,
                "layer": np.full(len(x), src.layer)}
        points = hv.Points(data, kdims=[kx, ky], vdims=[vdim, "neuron", "layer"])
        size = style["point_size"] if grid is not None else max(style["point_size"], 9)
        points = points.opts(
            color=src.vname, cmap=cmap, clim=clim, size=size, line_color="black",
            line_width=0.5, tools=["hover"], colorbar=grid is None and style["colorbar"],
            frame_width=style["frame_width"], frame_height=style["frame_width"],
            xaxis=None, yaxis=None, backend="bokeh",
        )
        if _HAS_MPL:
            points = points.opts(color=src.vname, cmap=cmap, clim=clim, s=size * 2,
                                 edgecolors="black", linewidth=0.4,
                                 colorbar=grid is None and style["colorbar"],
                                 xaxis=None, yaxis=None, backend="matplotlib")
        layers.append(points)
    overlay = hv.Overlay(layers, label=label).opts(show_legend=False, backend="bokeh")
    if _HAS_MPL:
        overlay = overlay.opts(show_legend=False, backend="matplotlib")
    return overlay


#: Margin around the map, as a fraction of its size, so that neurons on the edge of the
#: layout are drawn whole instead of cut by the frame.
_MARGIN = 0.04


def _square_ranges(
    bounds: tuple[float, float, float, float],
) -> tuple[tuple[float, float], tuple[float, float]]:
    """x and y ranges of equal span around the layout, with a margin.

    Maps are drawn in square frames; equal spans keep distances on the map true (a
    layout taller than wide is not stretched sideways).
    """
    xmin, xmax, ymin, ymax = bounds
    half = (1 + 2 * _MARGIN) * max(xmax - xmin, ymax - ymin) / 2
    cx, cy = (xmin + xmax) / 2, (ymin + ymax) / 2
    return (cx - half, cx + half), (cy - half, cy + half)


def _resolve_by(by: str | Sequence[str] | None, sources: list[_Source], multi: bool) -> list[str]:
    keys = sources[0].keys
    n_epochs = max(len(s.epochs) for s in sources)
    if by is None:
        out = ([MODEL] if multi else []) + list(keys) + ([cv.EPOCH] if n_epochs > 1 else [])
        return [k for k in out if not (k in keys and all(len(s.groups) <= 1 for s in sources))]
    out = [by] if isinstance(by, str) else list(by)
    available = list(dict.fromkeys([*(k for s in sources for k in s.keys), cv.EPOCH]
                                   + ([MODEL] if multi else [])))
    unknown = [k for k in out if k not in available]
    if unknown:
        raise ValueError(f"cannot key maps by {unknown}: available keys are {available}")
    if len(set(out)) != len(out):
        raise ValueError(f"by has repeated keys: {out}")
    return out


def _frames(
    sources: list[_Source], by: list[str], multi: bool
) -> dict[tuple, tuple[int, int, int]]:
    frames: dict[tuple, tuple[int, int, int]] = {}
    for si, src in enumerate(sources):
        # epoch not in by: draw the last epoch, the highest (the trained network)
        epoch_idx = range(len(src.epochs)) if cv.EPOCH in by else [len(src.epochs) - 1]
        for gi, gvals in enumerate(src.groups):
            gmap = dict(zip(src.keys, gvals, strict=True))
            for ei in epoch_idx:
                parts = []
                for k in by:
                    if k == cv.EPOCH:
                        parts.append(_plain(src.epochs[ei]))
                    elif k == MODEL:
                        parts.append(src.name)
                    elif k in gmap:
                        parts.append(gmap[k])
                    else:
                        raise ValueError(
                            f"model {src.name!r} has no group key {k!r} (its keys: {src.keys})"
                        )
                key = tuple(parts)
                if key in frames:
                    varying = [
                        k for k in src.keys
                        if k not in by and len({g[src.keys.index(k)] for g in src.groups}) > 1
                    ]
                    if multi and MODEL not in by:
                        varying = [MODEL, *varying]
                    if not varying:
                        raise ValueError(
                            f"several maps share the key {dict(zip(by, key, strict=True))}: "
                            f"the group {gmap} appears more than once in "
                            f"{'model ' + repr(src.name) if multi else 'the NAPs'} (a group "
                            "coordinate holding a value twice)")
                    raise ValueError(
                        f"several maps share the key {dict(zip(by, key, strict=True))}: the "
                        f"labels {varying} vary too; add them to `by` or select one value "
                        "first (e.g. nap.sel(...))"
                    )
                frames[key] = (si, gi, ei)
    return frames


def collect(
    laid_naps: Any,
    *,
    by: str | Sequence[str] | None = None,
    interpolate: bool = True,
    method: str = "linear",
    extrapolate: str = "hull",
    resolution: int = 100,
    contours: bool | int | Sequence[float] = False,
    cmap: str = "RdBu_r",
    clim: float | tuple[float, float] | str | None = None,
    points: bool = True,
    point_size: int = 5,
    colorbar: bool = True,
    frame_width: int = 220,
    value_label: str | None = None,
) -> MapCollection:
    """Resolve inputs, keys and colour limits into a :class:`MapCollection`.

    Parameters
    ----------
    laid_naps, by, interpolate, method, extrapolate, resolution, contours, cmap, clim, \
points, point_size, colorbar, frame_width, value_label
        As for :func:`topomap` (which takes ``dynamic`` besides).

    Returns
    -------
    MapCollection
        Every frame's key and source, the colour limits and the style, before any
        HoloViews object is made.

    Raises
    ------
    ValueError
        If models drawn side by side are grouped by different labels, or as
        :func:`topomap` raises for its arguments.
    TypeError
        If ``clim`` is neither None, a str, a number nor a pair of numbers.
    """
    limits = _parse_clim(clim)
    contours = _parse_contours(contours)
    for name, value in (("interpolate", interpolate), ("points", points),
                        ("colorbar", colorbar)):
        _check_flag(name, value)
    interp_kwargs = {"resolution": resolution, "method": method, "extrapolate": extrapolate}
    sources, multi = _sources(laid_naps, interp_kwargs)
    keys0 = sources[0].keys
    if multi and any(s.keys != keys0 for s in sources[1:]):
        raise ValueError(
            "models drawn side by side must be grouped by the same labels, got "
            f"{[s.keys for s in sources]}"
        )
    by_list = _resolve_by(by, sources, multi)
    frames = _frames(sources, by_list, multi)
    if isinstance(limits, tuple):
        clims = [limits] * len(sources)
    else:  # symmetric around zero, over every group and epoch of the layer (or of all layers)
        tops = [s.max_abs() for s in sources]
        tops = [max(tops)] * len(sources) if limits == "shared" else tops
        clims = [(-m, m) if m > 0 else (-1.0, 1.0) for m in tops]
    style = {"interpolate": interpolate, "contours": contours, "cmap": cmap, "points": points,
             "point_size": point_size, "colorbar": colorbar, "frame_width": frame_width,
             "value_label": value_label}
    if interpolate:
        for s in sources:  # fail early on a degenerate layout, with a clear message
            s.interpolator(0)
    return MapCollection(sources=sources, multi=multi, by=by_list, frames=frames,
                         clims=clims, style=style)


def _parse_clim(clim: Any) -> tuple[float, float] | str | None:
    """``clim`` as given to :func:`collect`: None, ``"shared"`` or finite ``(low, high)``."""
    usage = 'clim must be None, "shared", a positive number c for (-c, c) or (low, high)'
    if clim is None or isinstance(clim, str):
        if clim not in (None, "shared"):
            raise ValueError(f"{usage}, got {clim!r}")
        return clim
    if isinstance(clim, bool | np.bool_):
        raise TypeError(f"{usage}, got {clim!r}")
    if isinstance(clim, numbers.Real):
        c = float(clim)
        if not (np.isfinite(c) and c > 0):
            raise ValueError(f"a number clim must be positive and finite, got {clim!r}")
        return (-c, c)
    try:
        lo, hi = (float(v) for v in clim)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{usage}, got {clim!r}") from err
    if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
        raise ValueError(f"clim (low, high) must be finite with low < high, got {clim!r}")
    return (lo, hi)


def _check_flag(name: str, value: Any) -> None:
    """Refuse a non-bool switch: ``interpolate="no"`` would read as True."""
    if not isinstance(value, bool | np.bool_):
        raise TypeError(f"{name} must be True or False, got {value!r}")


def _parse_contours(contours: Any) -> bool | int | list[float]:
    """``contours`` checked: a bool, a number of levels (at least 2), or finite levels."""
    if isinstance(contours, bool | np.bool_):
        return bool(contours)
    if isinstance(contours, numbers.Integral):
        if contours < 2:
            raise ValueError(
                f"contours={contours}: a number of levels must be at least 2 (levels "
                "evenly spaced inside the colour range, the one at zero left out: one "
                "level would draw no line); pass explicit levels for others")
        return int(contours)
    try:
        levels = [float(v) for v in contours]
    except (TypeError, ValueError) as err:
        raise TypeError("contours must be True/False, a number of levels or a sequence of "
                        f"levels, got {contours!r}") from err
    if not levels or not np.isfinite(levels).all():
        raise ValueError(f"contour levels must be finite numbers, at least one, got {contours!r}")
    return levels


def topomap(
    laid_naps: Any,
    *,
    by: str | Sequence[str] | None = None,
    interpolate: bool = True,
    method: str = "linear",
    extrapolate: str = "hull",
    resolution: int = 100,
    contours: bool | int | Sequence[float] = False,
    cmap: str = "RdBu_r",
    clim: float | tuple[float, float] | str | None = None,
    points: bool = True,
    point_size: int = 5,
    colorbar: bool = True,
    frame_width: int = 220,
    value_label: str | None = None,
    dynamic: bool = False,
) -> Any:
    """Draw laid-out NAPs as topographic activation maps.

    Parameters
    ----------
    laid_naps : xarray.DataArray, or dict/list of them
        NAPs with dims ``("neuron", <group dim>, "epoch")`` and layout coordinates ``x``,
        ``y`` on ``neuron`` (or on ``("neuron", "epoch")`` for one layout per epoch), as
        ``topoxr.naps(...)`` then ``topoxr.layouts.attach(...)`` produce them. The group
        dim is ``label`` for ``by="label"`` or a stacked ``group`` dim whose MultiIndex
        levels are the keys. A dict ``{model_name: naps}`` (or a list, named by their
        ``topoxr_model`` attr) draws models side by side, keyed by ``"model"``.
    by : str or list of str, optional
        Key dimensions of the collection, any of the group keys, ``"epoch"`` and (for
        several models) ``"model"``, e.g. ``["label"]``, ``["label", "epoch"]``,
        ``["model", "label"]``. Default: every key that varies. When ``"epoch"`` is not
        in ``by``, the last epoch (the highest, whatever order the epochs are stored
        in) is drawn; an ``epoch`` key runs in ascending order. Keys that vary but are
        left out raise an error (select a value first).
    interpolate : bool, default True
        Draw the interpolated image; False draws only the neurons (the paper's scatter).
    method : {"linear", "cubic", "nearest"}, default "linear"
        Interpolation method (see :class:`topoxr.interpolate.GridInterpolator`).
    extrapolate : {"hull", "local", "box"}, default "hull"
        ``"hull"`` leaves everything outside the neurons' convex hull empty (honest:
        no neuron is there); ``"local"`` extends a little beyond it; ``"box"`` fills the
        whole square from helper points valued as their nearest neurons (MNE's choices).
    resolution : int, default 100
        Grid size of the image (the paper's 100 x 100).
    contours : bool, int or sequence of float, default False
        Draw contour lines: True for 6 levels; an int ``n >= 2`` for ``n`` levels evenly
        spaced inside the colour range, symmetric around zero, the level at zero (odd
        ``n``) left out, so ``n - 1`` lines; or explicit levels (finite numbers).
    cmap : str, default "RdBu_r"
        A diverging colormap (blue negative, white zero, red positive).
    clim : None, "shared", float or (float, float), optional
        Colour limits. Default: ``(-m, m)`` with ``m`` the largest absolute NAP of the
        layer over all its groups and epochs (those drawn or not), so every map of a
        layer is comparable; ``(-1, 1)`` if every NAP is zero or NaN. ``"shared"``: one
        ``m`` for all models; a positive, finite number ``c`` (numpy numbers too):
        ``(-c, c)``; finite ``(low, high)`` with ``low < high``: those.
    points : bool, default True
        Overlay the neurons (hover shows neuron id, value and layer).
    point_size, colorbar, frame_width
        Styling of the bokeh (and matplotlib) output.
    value_label : str, optional
        Title of the colour bar. Default: the NAPs' ``long_name`` attr, else
        ``"NAP (normalised)"`` for normalised NAPs of :func:`topoxr.naps` (``"NAP (mean
        activation)"`` without normalisation), else the array's name.
    dynamic : bool, default False
        Return a :class:`holoviews.DynamicMap` that computes each map when shown,
        instead of a :class:`holoviews.HoloMap` holding all of them.

    Returns
    -------
    holoviews.Overlay, holoviews.HoloMap or holoviews.DynamicMap
        One overlay (``Image * Points``, plus ``Contours``) when ``by`` is empty,
        otherwise a collection keyed by ``by``. Its ``Image`` value dimension carries
        the symmetric colour range.

    Raises
    ------
    ValueError
        For an unknown key in ``by``, keys that leave several maps per frame, or bad
        options (``clim`` zero, negative, not finite, or with ``low >= high``).
    TypeError
        If ``clim`` is neither None, a str, a number nor a pair of numbers.
    topoxr.conventions.ConventionError
        If ``neuron`` or the layout coordinates ``x``/``y`` are missing.

    Examples
    --------
    >>> from topoxr.testing.maps import make_laid_naps
    >>> maps = topomap(make_laid_naps(12, 3, 2), by=["label", "epoch"])
    >>> maps.kdims
    [Dimension('label'), Dimension('epoch')]
    """
    col = collect(
        laid_naps, by=by, interpolate=interpolate, method=method, extrapolate=extrapolate,
        resolution=resolution, contours=contours, cmap=cmap, clim=clim, points=points,
        point_size=point_size, colorbar=colorbar, frame_width=frame_width,
        value_label=value_label,
    )
    _check_flag("dynamic", dynamic)
    return to_holoviews(col, dynamic=dynamic)


def to_holoviews(col: MapCollection, *, dynamic: bool = False) -> Any:
    """Turn a :class:`MapCollection` into an Overlay, a HoloMap or a DynamicMap.

    Parameters
    ----------
    col : MapCollection
        The collection, from :func:`collect`.
    dynamic : bool, default False
        DynamicMap instead of HoloMap.

    Returns
    -------
    holoviews.Overlay, holoviews.HoloMap or holoviews.DynamicMap
    """
    if not col.by:
        (key,) = col.frames
        return col.element(key)
    if dynamic:
        kdims = [hv.Dimension(d, values=col.key_values(d)) for d in col.by]

        def callback(*key: Any) -> hv.Overlay:
            return col.element(tuple(key))

        return hv.DynamicMap(callback, kdims=kdims)
    col.precompute()
    return hv.HoloMap({k: col.element(k) for k in col.frames}, kdims=list(col.by))
