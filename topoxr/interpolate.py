"""Scattered neuron positions onto a regular grid: one triangulation for every map.

A topographic map colours the plane by the values of a layer's neurons, which sit at
scattered positions ``(x, y)`` (the layout). The paper calls
:func:`scipy.interpolate.griddata` once per group and epoch, which triangulates the same
points again every time. :class:`GridInterpolator` triangulates a layout **once**
(:class:`scipy.spatial.Delaunay`), precomputes the barycentric weights of every grid pixel
as a sparse ``(n_pixels, n_neurons)`` matrix, and then interpolates any number of value
vectors (all groups and all epochs) with one sparse matrix product.

This module is part of the core (numpy and scipy only); :mod:`topoxr.viz` and
:mod:`topoxr.quality` build on it.
"""

from __future__ import annotations

import logging
import numbers
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from scipy import sparse
from scipy.spatial import ConvexHull, Delaunay, QhullError, cKDTree

if TYPE_CHECKING:
    import xarray as xr

__all__ = ["GridInterpolator", "InterpolationError"]

logger = logging.getLogger(__name__)

Method = Literal["linear", "cubic", "nearest"]
Extrapolate = Literal["hull", "local", "box"]

_METHODS = ("linear", "cubic", "nearest")
_EXTRAPOLATE = ("hull", "local", "box")


class InterpolationError(ValueError):
    """A layout cannot be interpolated (too few points, all on a line, NaN positions...)."""


class GridInterpolator:
    """Interpolate neuron values at scattered positions onto a regular grid.

    The layout is triangulated once; calling the instance interpolates value arrays of
    shape ``(..., n_neurons)`` (any number of groups and epochs) in one vectorised step.

    Parameters
    ----------
    x, y : array_like of shape (n_neurons,)
        Neuron positions (a layout, usually in the unit square).
    resolution : int or (int, int), default 100
        Number of grid points along x and y (``(nx, ny)`` for a non-square grid): integers
        of at least 2.
    method : {"linear", "cubic", "nearest"}, default "linear"
        ``"linear"``: barycentric interpolation on the Delaunay triangles (the paper's
        choice, identical to ``griddata(..., method="linear")``); ``"cubic"``: C1
        Clough-Tocher interpolation on the same triangulation; ``"nearest"``: value of the
        nearest neuron.
    extrapolate : {"hull", "local", "box"}, default "hull"
        What to do outside the convex hull of the neurons (the names follow MNE's
        ``plot_topomap``). ``"hull"``: nothing is drawn there (NaN), the honest default.
        ``"local"``: the hull is enlarged by ``margin`` (relative to the layout's extent)
        with helper points whose value is ``border``; pixels outside the enlarged hull
        are NaN. ``"box"``: helper points on the border of a box around the neurons (their
        bounding box enlarged by ``margin``, and by ``bounds`` when given), so every pixel
        of the grid gets a value.
    border : "mean" or float, default "mean"
        Value of the helper points of ``"local"``/``"box"`` extrapolation: the mean of
        the ``n_border_neighbors`` nearest neuron positions, or a finite constant (e.g.
        ``0``; numpy numbers are accepted).
    margin : float, default 0.05
        Relative distance by which the helper points of ``"local"``/``"box"`` lie outside
        the neurons' bounding box or hull: a finite number, positive for
        ``"local"``/``"box"`` (it is ignored for ``"hull"``, but must not be negative).
    bounds : (xmin, xmax, ymin, ymax), optional
        Extent of the grid, finite with ``xmin < xmax`` and ``ymin < ymax``. Default: the
        bounding box of the neurons (plus the helper points for ``"local"``/``"box"``). A
        grid that misses the hull gives all-NaN maps.
    n_border_neighbors : int, default 3
        Neighbours averaged for ``border="mean"``: an integer of at least 1 (more than
        the number of distinct neuron positions means all of them).

    Attributes
    ----------
    xs, ys : ndarray
        The grid axes (ascending), of length ``nx`` and ``ny``.
    mask : ndarray of bool, shape (ny, nx)
        True where a pixel gets a value, False where it is NaN whatever the values.
    shape : (int, int)
        ``(ny, nx)``: the last two dimensions of every result.
    triangulation : scipy.spatial.Delaunay
        The one triangulation, of the distinct neuron positions (in order of first
        appearance), then the helper points when extrapolating.

    Raises
    ------
    InterpolationError
        If positions contain NaN/inf, differ in length, or fewer than three of them span
        a triangle (all points equal or on a line).
    ValueError
        For an unknown ``method``/``extrapolate``, or a ``resolution``, ``border``,
        ``margin``, ``bounds`` or ``n_border_neighbors`` outside the values above.

    Notes
    -----
    **Neurons at the same position.** Neurons whose positions are exactly equal form one
    point of the triangulation, whose value is the mean of theirs (NaN if any of them is
    NaN). The map does not depend on the order of the neurons, and :attr:`weights` gives
    each of them the same share.

    **NaN values.** A NaN value blanks exactly the pixels whose interpolation uses it:
    for ``"linear"`` and ``"cubic"`` the pixels whose triangle has that neuron (or a
    helper point whose ``border="mean"`` value it spoils) as a vertex with a nonzero
    barycentric weight, the same pixels for both methods; for ``"nearest"`` the pixels
    nearest to it. A pixel lying exactly on a neuron, or on an edge between two neurons,
    keeps their value even when the third vertex of its triangle is NaN. For
    ``"cubic"``, the gradients at the other neurons are estimated from the finite
    values alone (the Clough-Tocher interpolant of the neurons with a value); it treats
    ``inf`` the same way as NaN.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> x, y = rng.random(50), rng.random(50)
    >>> interp = GridInterpolator(x, y, resolution=64)
    >>> values = rng.normal(size=(10, 20, 50))  # 10 groups x 20 epochs x 50 neurons
    >>> interp(values).shape
    (10, 20, 64, 64)
    """

    def __init__(
        self,
        x: Any,
        y: Any,
        *,
        resolution: int | tuple[int, int] = 100,
        method: Method = "linear",
        extrapolate: Extrapolate = "hull",
        border: Literal["mean"] | float = "mean",
        margin: float = 0.05,
        bounds: tuple[float, float, float, float] | None = None,
        n_border_neighbors: int = 3,
    ) -> None:
        if method not in _METHODS:
            raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
        if extrapolate not in _EXTRAPOLATE:
            raise ValueError(f"extrapolate must be one of {_EXTRAPOLATE}, got {extrapolate!r}")
        border = _parse_border(border)
        margin = _parse_margin(margin, extrapolate)
        n_border_neighbors = _parse_n_border_neighbors(n_border_neighbors)
        nx, ny = _parse_resolution(resolution)
        points = _parse_points(x, y)
        self.method: Method = method
        self.extrapolate: Extrapolate = extrapolate
        self.border = border
        self.n_neurons = len(points)
        self.points = points
        # neurons at one position are one node, valued by their mean
        nodes, self._merge = _merge_duplicates(points)
        self._n_nodes = len(nodes)

        if bounds is not None:
            bounds = _parse_bounds(bounds)
        extra = (_helper_points(nodes, extrapolate, margin, bounds)
                 if extrapolate != "hull" else None)
        all_points = nodes if extra is None else np.vstack([nodes, extra])
        try:
            self.triangulation = Delaunay(all_points)
        except QhullError as err:  # all points equal or collinear
            raise InterpolationError(
                f"cannot triangulate {self.n_neurons} neuron positions: fewer than three of "
                "them span a triangle (all equal or on one line); use a 2-D layout"
            ) from err

        if bounds is None:
            lo, hi = all_points.min(axis=0), all_points.max(axis=0)
            bounds = (float(lo[0]), float(hi[0]), float(lo[1]), float(hi[1]))
        xmin, xmax, ymin, ymax = bounds
        self.bounds = (xmin, xmax, ymin, ymax)
        self.xs = np.linspace(xmin, xmax, nx)
        self.ys = np.linspace(ymin, ymax, ny)
        self.shape = (ny, nx)
        gx, gy = np.meshgrid(self.xs, self.ys)
        self._grid = np.column_stack([gx.ravel(), gy.ravel()])

        simplex, self._bary = _rasterise(self.triangulation, self.xs, self.ys)
        inside = simplex >= 0
        self.mask = inside.reshape(self.shape)
        self._inside = np.flatnonzero(inside)
        self._simplex = simplex

        # helper points' values as a linear (or constant) function of the nodes' values
        n_extra = 0 if extra is None else len(extra)
        helper_op = None
        helper_const = 0.0
        if n_extra:
            if border == "mean":
                k = min(n_border_neighbors, self._n_nodes)
                _, idx = cKDTree(nodes).query(extra, k=k)
                idx = np.asarray(idx).reshape(n_extra, k)
                rows = np.repeat(np.arange(n_extra), k)
                helper_op = sparse.csr_array(
                    (np.full(n_extra * k, 1.0 / k), (rows, idx.ravel())),
                    shape=(n_extra, self._n_nodes),
                )
            else:
                helper_op = sparse.csr_array((n_extra, self._n_nodes))
                helper_const = float(border)
        self._helper_op = helper_op
        self._helper_const = helper_const

        self._weights: sparse.csr_array | None = None
        self._weights_inside: sparse.csr_array | None = None
        self._support: sparse.csr_array | None = None  # cubic's NaN rule, built once
        self._offset: np.ndarray | None = None
        if method == "linear":
            self._weights, self._offset = self._linear_weights(simplex)
        elif method == "nearest":
            self._weights, self._offset = self._nearest_weights()
        logger.debug(
            "GridInterpolator: %d neurons, %d helper points, grid %dx%d, %d pixels inside",
            self.n_neurons, n_extra, nx, ny, self._inside.size,
        )

    # -- construction helpers --------------------------------------------------------
    def _linear_weights(
        self, simplex: np.ndarray
    ) -> tuple[sparse.csr_array, np.ndarray | None]:
        tri = self.triangulation
        inside = self._inside
        weights = self._bary[inside]  # (m, 3) barycentric weights
        vertices = tri.simplices[simplex[inside]]  # (m, 3) indices into all points
        n_pix = self._grid.shape[0]
        rows = np.repeat(inside, 3)
        full = sparse.csr_array(
            (weights.ravel(), (rows, vertices.ravel())),
            shape=(n_pix, tri.points.shape[0]),
        )
        return self._fold_helpers(full)

    def _nearest_weights(self) -> tuple[sparse.csr_array, np.ndarray | None]:
        inside = self._inside
        _, nearest = cKDTree(self.triangulation.points).query(self._grid[inside])
        full = sparse.csr_array(
            (np.ones(inside.size), (inside, nearest)),
            shape=(self._grid.shape[0], self.triangulation.points.shape[0]),
        )
        return self._fold_helpers(full)

    def _fold_helpers(
        self, full: sparse.csr_array
    ) -> tuple[sparse.csr_array, np.ndarray | None]:
        """Express weights on helper points and shared positions through the neurons.

        Exact zeros are dropped, so that only the neurons that contribute to a pixel can
        make it NaN (``0 * nan`` would).
        """
        n = self._n_nodes
        offset = None
        if self._helper_op is None:
            weights = sparse.csr_array(full)
        else:
            on_nodes = full[:, :n]
            on_helpers = full[:, n:]
            weights = sparse.csr_array(on_nodes + on_helpers @ self._helper_op)
            if self._helper_const:
                offset = self._helper_const * np.asarray(on_helpers.sum(axis=1)).ravel()
        if self._merge is not None:
            weights = sparse.csr_array(weights @ self._merge)
        weights.eliminate_zeros()
        return weights, offset

    def _node_values(self, flat: np.ndarray) -> np.ndarray:
        """Values of the triangulation's points: nodes (mean of their neurons), helpers."""
        if self._merge is not None:
            flat = self._merge @ flat
        if self._helper_op is not None:
            flat = np.vstack([flat, self._helper_op @ flat + self._helper_const])
        return flat

    # -- public API ------------------------------------------------------------------
    @property
    def grid(self) -> tuple[np.ndarray, np.ndarray]:
        """The grid axes ``(xs, ys)``."""
        return self.xs, self.ys

    @property
    def weights(self) -> sparse.csr_array | None:
        """Sparse ``(ny * nx, n_neurons)`` interpolation matrix (None for ``"cubic"``).

        Only nonzero weights are stored; neurons at one position share its weight equally.
        """
        return self._weights

    def __call__(self, values: Any) -> np.ndarray:
        """Interpolate values given at the neurons onto the grid.

        Parameters
        ----------
        values : array_like of shape (..., n_neurons)
            One value per neuron for any number of leading (group, epoch, ...) dims. A
            NaN value blanks only the pixels whose interpolation uses that neuron (see
            Notes of :class:`GridInterpolator`; the same pixels for ``"linear"`` and
            ``"cubic"``), so an empty group (all NaN) gives an all-NaN map.

        Returns
        -------
        ndarray of float64, shape (..., ny, nx)
            NaN where :attr:`mask` is False.

        Raises
        ------
        ValueError
            If the last dimension is not ``n_neurons``.
        """
        arr = np.asarray(values, dtype=np.float64)
        if arr.ndim == 0 or arr.shape[-1] != self.n_neurons:
            raise ValueError(
                f"values must have shape (..., {self.n_neurons}) (one value per neuron), "
                f"got shape {arr.shape}"
            )
        lead = arr.shape[:-1]
        flat = arr.reshape(-1, self.n_neurons).T  # (n_neurons, n_maps)
        n_maps = flat.shape[1]
        out = np.full((n_maps, self._grid.shape[0]), np.nan)
        if self.method == "cubic":
            out[:, self._inside] = self._cubic(flat).T
        elif self._inside.size:
            if self._weights_inside is None:  # rows of the pixels inside, sliced once
                rows = self._weights[self._inside]  # type: ignore[index]
                self._weights_inside = sparse.csr_array(rows)
            res = (self._weights_inside @ flat).T
            if self._offset is not None:
                res = res + self._offset[self._inside]
            out[:, self._inside] = res
        return out.reshape(*lead, *self.shape)

    def _cubic(self, flat: np.ndarray) -> np.ndarray:
        from scipy.interpolate import CloughTocher2DInterpolator

        n_maps = flat.shape[1]
        n_in = self._inside.size
        result = np.full((n_in, n_maps), np.nan)
        if n_in == 0:  # the grid misses the hull: all NaN, as for "linear"
            return result
        flat = self._node_values(flat)
        pixels = self._grid[self._inside]
        missing = ~np.isfinite(flat)  # (n_points, n_maps)
        # columns with NaN would spoil the global gradient estimate of the others
        finite = ~missing.any(axis=0)
        if finite.any():
            ct = CloughTocher2DInterpolator(self.triangulation, flat[:, finite])
            result[:, finite] = ct(pixels).reshape(n_in, -1)
        bad = np.flatnonzero(~finite)
        if not bad.size:
            return result
        # pixels whose triangle has a missing vertex with nonzero weight are NaN (as for
        # "linear"); elsewhere, the interpolant of the points with a value (its gradients
        # estimated from them alone). One triangulation per pattern of missing points.
        support = self._support_inside()
        patterns, which = np.unique(missing[:, bad].T, axis=0, return_inverse=True)
        which = np.asarray(which).ravel()
        for p, pattern in enumerate(patterns):
            cols = bad[which == p]
            keep = (support @ pattern.astype(np.float64)) == 0
            ok = ~pattern
            if ok.sum() < 3 or not keep.any():
                continue
            try:
                ct = CloughTocher2DInterpolator(self.triangulation.points[ok],
                                                flat[np.ix_(ok, cols)])
            except QhullError:  # the points with a value are all on one line
                continue
            result[np.ix_(keep, cols)] = ct(pixels[keep]).reshape(int(keep.sum()), -1)
        return result

    def _support_inside(self) -> sparse.csr_array:
        """``(n_inside, n_points)``: the triangle vertices with nonzero weight per pixel."""
        if self._support is not None:
            return self._support
        inside = self._inside
        bary = self._bary[inside]
        vertices = self.triangulation.simplices[self._simplex[inside]]
        nonzero = bary != 0
        rows = np.repeat(np.arange(inside.size), 3).reshape(-1, 3)
        self._support = sparse.csr_array(
            (np.ones(int(nonzero.sum())), (rows[nonzero], vertices[nonzero])),
            shape=(inside.size, self.triangulation.points.shape[0]),
        )
        return self._support

    @classmethod
    def from_layout(cls, obj: xr.DataArray | xr.Dataset, **kwargs: Any) -> GridInterpolator:
        """Build an interpolator from the ``x``/``y`` coordinates on ``neuron``.

        Parameters
        ----------
        obj : xarray.DataArray or xarray.Dataset
            An object with one layout: coordinates :data:`topoxr.conventions.X` and
            :data:`topoxr.conventions.Y` on ``("neuron",)``. For a per-epoch layout
            (``x`` on ``("neuron", "epoch")``) select one epoch first, e.g.
            ``GridInterpolator.from_layout(obj.sel(epoch=e))``.
        **kwargs
            Passed to :class:`GridInterpolator`.

        Returns
        -------
        GridInterpolator

        Raises
        ------
        topoxr.conventions.ConventionError
            If the layout coordinates are missing.
        InterpolationError
            If ``x`` or ``y`` is not on ``("neuron",)`` alone (a per-epoch layout).
        """
        from topoxr import conventions as cv

        cv.validate(obj, dims=(cv.NEURON,), coords=(cv.X, cv.Y))
        for name in (cv.X, cv.Y):
            if obj[name].dims != (cv.NEURON,):
                raise InterpolationError(
                    f"from_layout needs one layout with {name!r} on ('neuron',), got "
                    f"{name!r} on {obj[name].dims}; for a per-epoch layout select one epoch "
                    f"first, e.g. GridInterpolator.from_layout(obj.sel(epoch=e))")
        return cls(obj[cv.X].values, obj[cv.Y].values, **kwargs)

    def __repr__(self) -> str:
        ny, nx = self.shape
        return (
            f"GridInterpolator(n_neurons={self.n_neurons}, resolution=({nx}, {ny}), "
            f"method={self.method!r}, extrapolate={self.extrapolate!r})"
        )


def _rasterise(tri: Delaunay, xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Locate every pixel of a regular grid in the triangulation, vectorised.

    Each triangle is tested against the grid pixels of its bounding box only, with
    barycentric coordinates computed in closed form. This replaces
    ``Delaunay.find_simplex`` (whose per-simplex LAPACK set-up is slow and erratic
    under contention) and gives the same answer: a pixel lies in a triangle when all
    three barycentric coordinates are >= -eps (eps = sqrt(machine epsilon), the
    tolerance qhull-based location applies near the hull).

    Returns
    -------
    simplex : ndarray of int, shape (ny * nx,)
        Triangle of each pixel, -1 outside the hull.
    bary : ndarray of float, shape (ny * nx, 3)
        Barycentric weights of the triangle's vertices (zeros outside).
    """
    eps = float(np.sqrt(np.finfo(np.float64).eps))
    pts, simplices = tri.points, tri.simplices
    nx, ny = xs.size, ys.size
    dx, dy = (xs[-1] - xs[0]) / (nx - 1), (ys[-1] - ys[0]) / (ny - 1)
    a, b, c = pts[simplices[:, 0]], pts[simplices[:, 1]], pts[simplices[:, 2]]
    tx = np.stack([a[:, 0], b[:, 0], c[:, 0]], axis=1)
    ty = np.stack([a[:, 1], b[:, 1], c[:, 1]], axis=1)
    pad = 1e-9
    ix0 = np.clip(np.ceil((tx.min(1) - xs[0]) / dx - pad), 0, nx - 1).astype(np.int64)
    ix1 = np.clip(np.floor((tx.max(1) - xs[0]) / dx + pad), 0, nx - 1).astype(np.int64)
    iy0 = np.clip(np.ceil((ty.min(1) - ys[0]) / dy - pad), 0, ny - 1).astype(np.int64)
    iy1 = np.clip(np.floor((ty.max(1) - ys[0]) / dy + pad), 0, ny - 1).astype(np.int64)
    w = np.maximum(ix1 - ix0 + 1, 0)
    h = np.maximum(iy1 - iy0 + 1, 0)
    counts = w * h
    simplex = np.full(nx * ny, -1, dtype=np.int64)
    bary = np.zeros((nx * ny, 3))
    total = int(counts.sum())
    if total == 0:
        return simplex, bary
    t = np.repeat(np.arange(len(simplices)), counts)
    local = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
    px = ix0[t] + local % w[t]
    py = iy0[t] + local // w[t]
    gx, gy = xs[px], ys[py]
    ax, ay = a[t, 0], a[t, 1]
    v0x, v0y = b[t, 0] - ax, b[t, 1] - ay
    v1x, v1y = c[t, 0] - ax, c[t, 1] - ay
    v2x, v2y = gx - ax, gy - ay
    den = v0x * v1y - v1x * v0y
    ok = den != 0
    with np.errstate(divide="ignore", invalid="ignore"):
        l1 = (v2x * v1y - v1x * v2y) / den
        l2 = (v0x * v2y - v2x * v0y) / den
    l0 = 1.0 - l1 - l2
    hit = ok & (l0 >= -eps) & (l1 >= -eps) & (l2 >= -eps)
    pix = (py * nx + px)[hit]
    # a pixel on a shared edge lies in two triangles: keep the first (same value)
    pix_u, first = np.unique(pix, return_index=True)
    sel = np.flatnonzero(hit)[first]
    simplex[pix_u] = t[sel]
    bary[pix_u] = np.column_stack([l0[sel], l1[sel], l2[sel]])
    return simplex, bary


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool | np.bool_)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool | np.bool_)


def _parse_resolution(resolution: int | tuple[int, int]) -> tuple[int, int]:
    if _is_int(resolution):
        nx = ny = int(resolution)  # type: ignore[call-overload]
    else:
        pair = (tuple(resolution) if isinstance(resolution, tuple | list | np.ndarray)
                else None)
        if pair is None or len(pair) != 2 or not all(_is_int(r) for r in pair):
            raise ValueError(
                f"resolution must be an int or a pair of ints (nx, ny), got {resolution!r}"
            )
        nx, ny = (int(r) for r in pair)
    if nx < 2 or ny < 2:
        raise ValueError(f"resolution must be at least 2 along each axis, got {(nx, ny)}")
    return nx, ny


def _parse_border(border: Any) -> str | float:
    if isinstance(border, str) and border == "mean":
        return border
    if not _is_real(border) or not np.isfinite(float(border)):
        raise ValueError(f'border must be "mean" or a finite number, got {border!r}')
    return float(border)


def _parse_margin(margin: Any, extrapolate: str) -> float:
    if not _is_real(margin) or not np.isfinite(float(margin)) or float(margin) < 0:
        raise ValueError(f"margin must be a finite number >= 0, got {margin!r}")
    if extrapolate != "hull" and float(margin) == 0:
        raise ValueError(
            f"margin must be positive for extrapolate={extrapolate!r} (the helper points "
            f"must lie outside the neurons), got {margin!r}")
    return float(margin)


def _parse_n_border_neighbors(n: Any) -> int:
    if not _is_int(n) or int(n) < 1:
        raise ValueError(f"n_border_neighbors must be an integer >= 1, got {n!r}")
    return int(n)


def _parse_bounds(bounds: Any) -> tuple[float, float, float, float]:
    try:
        if isinstance(bounds, str | bytes):
            raise TypeError("a string")
        values = tuple(float(b) for b in bounds)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"bounds must be four numbers (xmin, xmax, ymin, ymax), got {bounds!r}"
        ) from err
    if len(values) != 4 or not np.isfinite(values).all() or not (
            values[0] < values[1] and values[2] < values[3]):
        raise ValueError(
            f"bounds must be four finite numbers (xmin, xmax, ymin, ymax) with xmin < xmax "
            f"and ymin < ymax, got {bounds!r}")
    return values  # type: ignore[return-value]


def _merge_duplicates(points: np.ndarray) -> tuple[np.ndarray, sparse.csr_array | None]:
    """Distinct positions (in order of first appearance) and the mean over each.

    Returns
    -------
    nodes : ndarray, shape (n_nodes, 2)
        ``points`` itself when all positions differ.
    merge : scipy.sparse.csr_array of shape (n_nodes, n_neurons), or None
        Row ``i`` averages the neurons at ``nodes[i]``; None when all positions differ.
    """
    _, first, inverse, counts = np.unique(points, axis=0, return_index=True,
                                          return_inverse=True, return_counts=True)
    if first.size == len(points):
        return points, None
    order = np.argsort(first)  # unique rows in order of first appearance
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    node = rank[np.asarray(inverse).ravel()]
    merge = sparse.csr_array(
        (1.0 / counts[np.asarray(inverse).ravel()], (node, np.arange(len(points)))),
        shape=(first.size, len(points)),
    )
    logger.debug("GridInterpolator: %d neurons share %d positions",
                 len(points), first.size)
    return points[np.sort(first)], merge


def _parse_points(x: Any, y: Any) -> np.ndarray:
    xa = np.asarray(x, dtype=np.float64).ravel()
    ya = np.asarray(y, dtype=np.float64).ravel()
    if xa.shape != ya.shape:
        raise InterpolationError(f"x and y differ in length: {xa.size} != {ya.size}")
    if xa.size < 3:
        raise InterpolationError(
            f"need at least 3 neuron positions to interpolate a map, got {xa.size}"
        )
    if not (np.isfinite(xa).all() and np.isfinite(ya).all()):
        raise InterpolationError("neuron positions contain NaN or inf")
    return np.column_stack([xa, ya])


def _helper_points(points: np.ndarray, extrapolate: str, margin: float,
                   bounds: tuple[float, ...] | None = None) -> np.ndarray:
    lo, hi = points.min(axis=0), points.max(axis=0)
    extent = float(np.max(hi - lo)) or 1.0
    pad = margin * extent
    if extrapolate == "box":
        lo, hi = lo - pad, hi + pad
        if bounds is not None:  # the box holds the grid, so every pixel gets a value
            lo = np.minimum(lo, [bounds[0], bounds[2]])
            hi = np.maximum(hi, [bounds[1], bounds[3]])
        t = np.linspace(0.0, 1.0, 9)[:-1]  # 8 points per side, corners included once
        bottom = np.column_stack([lo[0] + t * (hi[0] - lo[0]), np.full_like(t, lo[1])])
        right = np.column_stack([np.full_like(t, hi[0]), lo[1] + t * (hi[1] - lo[1])])
        top = np.column_stack([hi[0] - t * (hi[0] - lo[0]), np.full_like(t, hi[1])])
        left = np.column_stack([np.full_like(t, lo[0]), hi[1] - t * (hi[1] - lo[1])])
        return np.vstack([bottom, right, top, left])
    # "local": hull vertices pushed outward from the centroid, plus edge midpoints
    try:
        hull = ConvexHull(points)
    except QhullError as err:
        raise InterpolationError(
            "cannot build the hull of the neuron positions (all equal or on one line)"
        ) from err
    verts = points[hull.vertices]
    mids = (verts + np.roll(verts, -1, axis=0)) / 2
    ring = np.vstack([verts, mids])
    centre = points.mean(axis=0)
    direction = ring - centre
    norm = np.linalg.norm(direction, axis=1, keepdims=True)
    norm[norm == 0] = 1.0
    return ring + pad * direction / norm
