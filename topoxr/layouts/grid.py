"""Snap a layout onto a regular grid, one neuron per cell."""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment

from topoxr.layouts._base import BaseLayout, LayoutInputError, to_unit_square
from topoxr.layouts._registry import initial_positions

__all__ = ["MAX_GRID_ASPECT", "GridSnap", "grid_shape", "snap_to_grid"]

#: Largest width/height (or height/width) ratio of a snapped grid.
MAX_GRID_ASPECT = 2.0

#: Largest block solved exactly by linear assignment in the scalable approximation.
_EXACT_BLOCK = 512


def grid_shape(n: int, aspect: float = 1.0, slack: float = 0.0) -> tuple[int, int]:
    """Rows and columns of the smallest grid of about ``aspect`` (width / height) >= n cells.

    Parameters
    ----------
    n : int
        Number of neurons.
    aspect : float, default 1.0
        Width over height of the layout to match.
    slack : float, default 0.0
        Extra fraction of cells (0.1: at least 10% empty cells to choose from).

    Returns
    -------
    (rows, cols) : tuple of int
    """
    need = int(np.ceil(n * (1.0 + slack)))
    aspect = float(np.clip(aspect, 1e-3, 1e3))
    rows = max(1, int(round(np.sqrt(need / aspect))))
    cols = max(1, int(np.ceil(need / rows)))
    return rows, cols


def _cells(rows: int, cols: int) -> np.ndarray:
    r, c = np.divmod(np.arange(rows * cols), cols)
    return np.stack([(c + 0.5) / cols, (r + 0.5) / rows], axis=1)


def _exact(points: np.ndarray, cells: np.ndarray) -> np.ndarray:
    diff = points[:, None, :] - cells[None, :, :]
    cost = np.einsum("ijk,ijk->ij", diff, diff)
    _, col = linear_sum_assignment(cost)
    return col


def _split(points: np.ndarray, cells: np.ndarray, out: np.ndarray, pidx: np.ndarray,
           cidx: np.ndarray) -> None:
    """Recursive bisection: halve the cells along their longer side, send the points of
    the matching quantile to each half, and solve small blocks exactly."""
    stack = [(pidx, cidx)]
    while stack:
        p, c = stack.pop()
        if p.size <= _EXACT_BLOCK:
            out[p] = c[_exact(points[p], cells[c])]
            continue
        span = np.ptp(cells[c], axis=0)
        axis = int(span[1] > span[0])
        corder = c[np.argsort(cells[c, axis], kind="stable")]
        half = corder.size // 2
        c1, c2 = corder[:half], corder[half:]
        m1 = int(round(p.size * c1.size / corder.size))
        m1 = min(max(m1, p.size - c2.size), c1.size)
        porder = p[np.argsort(points[p, axis], kind="stable")]
        stack.append((porder[:m1], c1))
        stack.append((porder[m1:], c2))


def snap_to_grid(coords: np.ndarray, *, slack: float = 0.0, method: str = "auto") -> np.ndarray:
    """Move every point to its own cell of a regular grid, keeping neighbourhoods.

    The grid has the aspect ratio of the layout, clipped to between 1:2 and 2:1
    (:data:`MAX_GRID_ASPECT`), and at least ``n * (1 + slack)`` cells;
    points go to cell centres minimising the total squared displacement (linear
    assignment, :func:`scipy.optimize.linear_sum_assignment`).

    Parameters
    ----------
    coords : ndarray of shape (n, 2)
        A layout (any scale).
    slack : float, default 0.0
        Extra fraction of empty cells the assignment may choose from.
    method : {"auto", "exact", "split"}, default "auto"
        ``"exact"``: one assignment over all points (``O(n^3)`` time worst case,
        ``n x cells`` memory); ``"split"``: recursive bisection of the grid into halves
        with the matching quantiles of the points, exact assignment inside blocks of at
        most 512 points (``O(n log n)``, a little more displacement near block borders);
        ``"auto"``: exact up to 1024 points, split above.

    Returns
    -------
    ndarray of shape (n, 2)
        Cell centres, in the unit square (aspect ratio of the grid kept).
    """
    coords = to_unit_square(coords)
    n = coords.shape[0]
    if method not in ("auto", "exact", "split"):
        raise LayoutInputError(f"method must be 'auto', 'exact' or 'split', got {method!r}")
    span = np.ptp(coords, axis=0)
    aspect = span[0] / span[1] if span[1] > 0 else (1e3 if span[0] > 0 else 1.0)
    # A map is read as a picture: grids are kept between 1:2 and 2:1, so an elongated
    # layout becomes a readable map instead of a strip a few cells high.
    aspect = float(np.clip(aspect, 1.0 / MAX_GRID_ASPECT, MAX_GRID_ASPECT))
    rows, cols = grid_shape(n, aspect, slack)
    cells = _cells(rows, cols)
    # fit the points into the grid's box before matching
    lo, hi = coords.min(axis=0), coords.max(axis=0)
    points = (coords - lo) / np.where(hi > lo, hi - lo, 1.0)
    if method == "exact" or (method == "auto" and n <= 1024):
        assigned = _exact(points, cells)
    else:
        assigned = np.empty(n, dtype=np.int64)
        _split(points, cells, assigned, np.arange(n), np.arange(cells.shape[0]))
    out = cells[assigned]
    out[:, 0] *= cols / max(rows, cols)
    out[:, 1] *= rows / max(rows, cols)
    return out


class GridSnap(BaseLayout):
    """Any layout snapped onto a regular grid, one neuron per cell (``"<method>+grid"``).

    Parameters
    ----------
    init : str, estimator or array of shape (n_neurons, 2), default "knnforce"
        The layout to snap: a registered method name, an estimator fitted on the same
        ``X``, or given positions.
    slack : float, default 0.0
        Extra fraction of empty cells (see :func:`snap_to_grid`).
    solver : {"auto", "exact", "split"}, default "auto"
        Assignment solver, the ``method`` of :func:`snap_to_grid`.
    metric : {"cosine", "correlation", "euclidean", "precomputed"}, default "cosine"
        Handed to ``init``.
    random_state : int, RandomState instance or None, default None
        Handed to ``init``.

    Attributes
    ----------
    embedding_ : ndarray of shape (n_neurons, 2)
        Cell centres in ``[0, 1]^2``; no two neurons share a cell.
    init_embedding_ : ndarray of shape (n_neurons, 2)
        The layout before snapping.
    """

    def __init__(
        self,
        init: Any = "knnforce",
        *,
        slack: float = 0.0,
        solver: str = "auto",
        metric: str = "cosine",
        random_state=None,
    ) -> None:
        self.init = init
        self.slack = slack
        self.solver = solver
        self.metric = metric
        self.random_state = random_state

    def _embed(self, X: np.ndarray, rng: np.random.RandomState) -> np.ndarray:
        if self.slack < 0:
            raise LayoutInputError(f"slack must be >= 0, got {self.slack}")
        pos = initial_positions(self.init, X, X.shape[0], self.metric, rng)
        self.init_embedding_ = pos
        return snap_to_grid(pos, slack=self.slack, method=self.solver)
