"""Snap a layout onto a regular grid, one neuron per cell."""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment

from topoxr.layouts._base import BaseLayout, LayoutInputError, check_parameter, to_unit_square
from topoxr.layouts._registry import initial_positions

__all__ = ["MAX_GRID_ASPECT", "GridSnap", "grid_shape", "refine_grid", "snap_to_grid"]

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
           cidx: np.ndarray, block: int | None = None) -> None:
    """Recursive bisection: halve the cells along their longer side, send the points of
    the matching quantile to each half, and solve small blocks exactly."""
    block = _EXACT_BLOCK if block is None else block
    stack = [(pidx, cidx)]
    while stack:
        p, c = stack.pop()
        if p.size <= block:
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


def snap_to_grid(coords: np.ndarray, *, slack: float = 0.0, method: str = "auto",
                 block: int | None = None, return_cells: bool = False) -> Any:
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
    block : int, optional
        Largest block solved exactly by ``"split"`` (default 512).
    return_cells : bool, default False
        Also return the grid: ``(coords, cell_of, (rows, cols))``, ``cell_of[i]`` being
        the row-major cell index of point ``i``.

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
        _split(points, cells, assigned, np.arange(n), np.arange(cells.shape[0]), block)
    out = cell_centres(assigned, rows, cols)
    return (out, assigned, (rows, cols)) if return_cells else out


def cell_centres(cell_of: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Centres of row-major grid cells, in the unit square (the grid's aspect kept)."""
    out = _cells(rows, cols)[cell_of]
    out[:, 0] *= cols / max(rows, cols)
    out[:, 1] *= rows / max(rows, cols)
    return out


def _window(radius: int) -> tuple[np.ndarray, np.ndarray]:
    """Offsets (d_row, d_col) of the cells around a cell and their weights 1 / distance."""
    off = np.array([(dr, dc) for dr in range(-radius, radius + 1)
                    for dc in range(-radius, radius + 1) if (dr, dc) != (0, 0)])
    return off, 1.0 / np.hypot(off[:, 0], off[:, 1])


def refine_grid(
    cell_of: np.ndarray,
    shape: tuple[int, int],
    features: np.ndarray,
    *,
    n_rounds: int = 300,
    radius: int = 2,
    max_jump: int = 3,
    batch: int = 16384,
    nudge: float = 0.8,
    knn: np.ndarray | None = None,
    knn_weight: float = 0.05,
    knn_jumps: float = 0.3,
    knn_nudge: float = 1.0,
    random_state: Any = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Local swap optimisation of a one-neuron-per-cell grid, then a sub-cell nudge.

    Every round, a batch of neurons each proposes a swap with the occupant (or the empty
    cell) at a random offset of at most ``max_jump`` cells. A swap is accepted when it
    raises the weighted sum of profile similarities between every neuron and the neurons within
    ``radius`` cells (weight 1 / cell distance), as topographic-network work arranges
    units; accepted swaps touch disjoint cells, the largest gains first. This replaces
    a global assignment's distortion by local order, at ``O(n * radius^2 * features)``
    per round.

    Finally every neuron is moved inside its cell (at most 0.45 cell) towards the
    neighbours it is most similar to (``nudge`` times the similarity-weighted mean
    direction), which breaks the ties of equidistant grid neighbours in favour of the
    similar ones (never outwards across the grid's border, so the map's hull stays the
    grid's box); the map keeps one neuron per cell.

    With ``knn`` (each neuron's nearest neighbours in profile space) three things also
    keep those neighbours next to it: a swap also gains ``knn_weight`` (times 1 / cell
    distance) for every neighbour pair (``j`` among ``i``'s neighbours or ``i`` among
    ``j``'s) that ends in adjacent cells; a fraction ``knn_jumps`` of the proposals aim at
    a cell next to one of the proposer's neighbours instead of a random offset; and the
    nudge adds ``knn_nudge`` for each such pair to the similarity it moves along. This
    raises the share of profile-space neighbours that are map neighbours (see
    :func:`topoxr.metrics.knn_overlap`) at little cost in smoothness.

    Parameters
    ----------
    cell_of : ndarray of int, shape (n,)
        Row-major cell of every neuron (distinct), as from ``snap_to_grid(...,
        return_cells=True)``.
    shape : (rows, cols)
        The grid.
    features : ndarray of shape (n, f)
        Features of the profiles; similarity is their dot product (the cosine
        similarity for unit vectors, see
        :func:`~topoxr.layouts._base.features_for_metric`).
    n_rounds, radius, max_jump, batch : int
        Most rounds (the loop stops after five rounds in a row accepting at most
        ``batch / 500`` swaps), neighbourhood radius (cells), largest proposed jump
        (cells) and neurons proposing per round.
    nudge : float, default 0.8
        Strength of the final sub-cell move (0: cell centres).
    knn : ndarray of int, shape (n, k), optional
        Indices of each neuron's nearest profile-space neighbours (as
        :attr:`KNNForceLayout.graph_ <topoxr.layouts.KNNForceLayout>` gives them).
    knn_weight, knn_jumps, knn_nudge : float, default 0.05, 0.3, 1.0
        Weight of a neighbour pair in adjacent cells in the swap gain, fraction of
        proposals aimed next to a neighbour's cell, and weight of a neighbour pair in the
        nudge; used only with ``knn``.
    random_state : int, RandomState, Generator or None
        Seed of the proposals.

    Returns
    -------
    coords, cell_of : ndarray of shape (n, 2), ndarray of shape (n,)
        Positions in the unit square and the refined cells.
    """
    rows, cols = shape
    F = np.asarray(features, dtype=np.float32)
    n = F.shape[0]
    cell_of = np.asarray(cell_of, dtype=np.intp).copy()
    if cell_of.shape != (n,) or np.unique(cell_of).size != n or cell_of.max() >= rows * cols:
        raise LayoutInputError("cell_of must give every neuron its own cell of the grid")
    rng = random_state if isinstance(random_state, np.random.Generator) else \
        np.random.default_rng(check_seed(random_state))
    occ = np.full(rows * cols, n, dtype=np.intp)  # n = empty
    occ[cell_of] = np.arange(n)
    Fz = np.vstack([F, np.zeros((1, F.shape[1]), dtype=np.float32)])
    off, w = _window(radius)
    r_of, c_of = np.divmod(np.arange(rows * cols), cols)
    nr, nc = r_of[:, None] + off[:, 0], c_of[:, None] + off[:, 1]
    valid = (nr >= 0) & (nr < rows) & (nc >= 0) & (nc < cols)
    nbr = np.where(valid, nr * cols + nc, 0)
    weight = np.where(valid, w, 0.0).astype(np.float32)

    if knn is not None:
        knn = np.asarray(knn, dtype=np.intp)
        if knn.ndim != 2 or knn.shape[0] != n or knn.size == 0:
            raise LayoutInputError(f"knn must have shape ({n}, k), got {knn.shape}")
        if knn.min() < 0 or knn.max() >= n:
            raise LayoutInputError(f"knn must hold neuron indices in [0, {n})")
        # every listed pair both ways, as sorted keys i * (n + 1) + j with their counts
        src = np.repeat(np.arange(n, dtype=np.int64), knn.shape[1])
        dst = knn.ravel().astype(np.int64)
        pair_keys, pair_count = np.unique(np.concatenate([src * (n + 1) + dst,
                                                          dst * (n + 1) + src]),
                                          return_counts=True)
        pair_count = pair_count.astype(np.float32)
        ring = np.flatnonzero(np.abs(off).max(axis=1) == 1)  # the 8 adjacent cells
    use_knn = knn is not None and knn_weight > 0

    def linked(i, o):
        """How often i and o (o with a trailing window axis; n: nobody) list each other."""
        key = i[:, None].astype(np.int64) * (n + 1) + o
        at = np.minimum(np.searchsorted(pair_keys, key), pair_keys.size - 1)
        return np.where(pair_keys[at] == key, pair_count[at], np.float32(0.0))

    def change(c, enter, leave):
        """Score of ``enter`` (n: nobody) at cells c minus that of ``leave``, each against
        the occupants of c's window but the two swapped neurons (similarity is linear:
        one gather of the window serves both)."""
        o = occ[nbr[c]]
        ww = weight[c] * ((o != enter[:, None]) & (o != leave[:, None]) & (o < n))
        s = np.einsum("mw,mw->m", np.einsum("mf,mwf->mw", Fz[enter] - Fz[leave], Fz[o]), ww)
        if use_knn:
            o = o[:, ring]
            s += np.float32(knn_weight) * np.einsum(
                "mw,mw->m", linked(enter, o) - linked(leave, o), ww[:, ring])
        return s

    batch = int(min(max(batch, 1), n))
    tol, quiet = max(1, batch // 500), 0
    for _ in range(int(n_rounds)):
        a = rng.choice(n, batch, replace=False) if batch < n else rng.permutation(n)
        ca = cell_of[a]
        jump = rng.integers(-max_jump, max_jump + 1, size=(2, a.size))
        base_r, base_c = r_of[ca], c_of[ca]
        if knn is not None and knn_jumps > 0:
            # some proposals: a cell next to one of the proposer's profile neighbours
            aim = rng.random(a.size) < knn_jumps
            target = cell_of[knn[a, rng.integers(0, knn.shape[1], a.size)]]
            near = rng.integers(-1, 2, size=(2, a.size))
            base_r = np.where(aim, r_of[target], base_r)
            base_c = np.where(aim, c_of[target], base_c)
            jump = np.where(aim, near, jump)
        cb = (np.clip(base_r + jump[0], 0, rows - 1) * cols
              + np.clip(base_c + jump[1], 0, cols - 1))
        move = cb != ca
        a, ca, cb = a[move], ca[move], cb[move]
        b = occ[cb]
        gain = change(cb, a, b) + change(ca, b, a)
        good = np.flatnonzero(gain > 1e-6)
        good = good[np.argsort(-gain[good], kind="stable")]
        a, ca, cb, b = a[good], ca[good], cb[good], b[good]
        # each cell in at most one accepted swap per round, the largest gains first
        both = np.concatenate([ca, cb])
        first = np.zeros(both.size, dtype=bool)
        first[np.unique(both, return_index=True)[1]] = True
        ok = first[: ca.size] & first[ca.size:]
        a, ca, cb, b = a[ok], ca[ok], cb[ok], b[ok]
        quiet = quiet + 1 if a.size <= tol else 0
        if quiet >= 5:  # converged: five rounds in a row with (almost) no accepted swap
            break
        occ[cb], occ[ca] = a, b
        cell_of[a] = cb
        filled = b < n
        cell_of[b[filled]] = ca[filled]
    coords = cell_centres(cell_of, rows, cols)
    if nudge > 0:
        o = occ[nbr[cell_of]]
        present = o < n
        sim = np.einsum("if,iwf->iw", F, Fz[o])
        if knn is not None and knn_nudge > 0:
            sim += np.float32(knn_nudge) * linked(np.arange(n), o)
        sim *= present
        count = np.maximum(present.sum(axis=1, keepdims=True), 1)
        rel = np.where(present, sim - sim.sum(axis=1, keepdims=True) / count, 0.0)
        unit = off[:, ::-1] / np.hypot(off[:, 0], off[:, 1])[:, None]  # (d_col, d_row)
        shift = (rel @ unit) / (np.abs(rel).sum(axis=1, keepdims=True) + 1e-12)
        shift = np.clip(nudge * shift, -0.45, 0.45)
        # neurons on the border do not move outwards: the map's hull stays the grid's box
        r, c = np.divmod(cell_of, cols)
        shift[:, 0] = np.where(c == 0, np.maximum(shift[:, 0], 0), shift[:, 0])
        shift[:, 0] = np.where(c == cols - 1, np.minimum(shift[:, 0], 0), shift[:, 0])
        shift[:, 1] = np.where(r == 0, np.maximum(shift[:, 1], 0), shift[:, 1])
        shift[:, 1] = np.where(r == rows - 1, np.minimum(shift[:, 1], 0), shift[:, 1])
        coords = coords + shift / max(rows, cols)
    return coords, cell_of


def check_seed(random_state: Any) -> int:
    """An int seed from None, an int or a RandomState (drawn from it)."""
    if random_state is None or isinstance(random_state, (int, np.integer)):
        return random_state
    return int(random_state.randint(np.iinfo(np.int32).max))


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
        Handed to ``init``, unless an ``init`` estimator has a metric of its own (one
        that differs from its class's default), which is kept.
    random_state : int, RandomState instance or None, default None
        Handed to ``init`` (an estimator with a seed of its own keeps it).

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
        check_parameter("slack", self.slack, low=0)
        pos = initial_positions(self.init, X, X.shape[0], self.metric, rng)
        self.init_embedding_ = pos
        return snap_to_grid(pos, slack=self.slack, method=self.solver)
