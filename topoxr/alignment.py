"""Make layouts comparable: across epochs, across layers sharing neurons, across models.

A layout is only defined up to rotation, reflection, translation and scale. The paper
rotates one layout in 1-degree steps to match another; here the optimal rotation or
reflection is computed in closed form by orthogonal Procrustes
(:func:`scipy.linalg.orthogonal_procrustes`) on the neurons the two layouts share.
Neurons of two different models are first matched one to one by the correlation of
their activity (:func:`scipy.optimize.linear_sum_assignment`), then aligned the same way.
"""

from __future__ import annotations

import itertools
import json
import logging
from typing import Any

import numpy as np
import xarray as xr

from topoxr.conventions import ATTR_LAYOUT, EPOCH, NEURON, X, Y

__all__ = ["AlignmentError", "align", "align_epochs", "match_neurons", "procrustes"]

logger = logging.getLogger(__name__)


class AlignmentError(ValueError):
    """Layouts cannot be aligned (too few shared neurons, no layout, bad shapes)."""


def _unit_square(P: np.ndarray) -> np.ndarray:
    lo = P.min(axis=0)
    span = P.max(axis=0) - lo
    scale = span.max()
    if not scale > 0:
        return np.full_like(P, 0.5)
    return (P - lo) / scale + (1.0 - span / scale) / 2.0


def procrustes(
    points: Any,
    reference: Any,
    *,
    shared: Any = None,
    rescale: bool = True,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Rotate/reflect ``points`` onto ``reference`` (orthogonal Procrustes).

    The transform (centring, orthogonal matrix, translation to the reference's centre)
    is fitted on the ``shared`` rows and applied to every row of ``points``.

    Parameters
    ----------
    points : array_like, shape (n, 2)
        Layout to move.
    reference : array_like, shape (n_shared, 2) or (n, 2)
        Target positions of the shared neurons.
    shared : array_like of int, optional
        Rows of ``points`` matching the rows of ``reference`` (default: all rows, then
        ``reference`` must have ``n`` rows).
    rescale : bool, default True
        Scale the result back into the unit square (uniformly: shape and aspect ratio
        are kept). With False the transform is rigid.

    Returns
    -------
    aligned : numpy.ndarray, shape (n, 2)
    info : dict
        ``rotation`` (2x2 orthogonal matrix), ``reflection`` (bool) and ``rmsd`` (root
        mean square distance of the shared points after the rigid alignment).

    Raises
    ------
    AlignmentError
        For fewer than 2 shared points, bad shapes or non-finite values.

    Examples
    --------
    >>> P = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    >>> R = P @ np.array([[0.0, -1.0], [1.0, 0.0]])  # rotated by 90 degrees
    >>> aligned, info = procrustes(P, R, rescale=False)
    >>> np.allclose(aligned, R), bool(info["reflection"])
    (True, False)
    """
    from scipy.linalg import orthogonal_procrustes

    P = np.asarray(points, dtype=np.float64)
    Q = np.asarray(reference, dtype=np.float64)
    if P.ndim != 2 or P.shape[1] != 2 or Q.ndim != 2 or Q.shape[1] != 2:
        raise AlignmentError(f"layouts must have shape (n, 2); got {P.shape} and {Q.shape}")
    if not (np.isfinite(P).all() and np.isfinite(Q).all()):
        raise AlignmentError("layouts hold NaN or inf")
    idx = np.arange(len(P)) if shared is None else np.asarray(shared, dtype=np.int64)
    if len(idx) != len(Q):
        raise AlignmentError(f"{len(idx)} shared rows but the reference has {len(Q)} points")
    if len(idx) < 2:
        raise AlignmentError(f"alignment needs at least 2 shared neurons, got {len(idx)}")
    A = P[idx]
    ca, cq = A.mean(axis=0), Q.mean(axis=0)
    R, _ = orthogonal_procrustes(A - ca, Q - cq)
    aligned = (P - ca) @ R + cq
    rmsd = float(np.sqrt(np.mean(np.sum((aligned[idx] - Q) ** 2, axis=1))))
    if rescale:
        aligned = _unit_square(aligned)
    return aligned, {"rotation": R, "reflection": bool(np.linalg.det(R) < 0), "rmsd": rmsd}


def _xy(obj: Any) -> np.ndarray:
    if X not in obj.coords or Y not in obj.coords:
        raise AlignmentError(f"the object has no layout: coordinates {X!r}, {Y!r} are missing")
    if obj.coords[X].dims != (NEURON,):
        raise AlignmentError(f"expected one layout on ('neuron',); {X!r} has dims "
                             f"{obj.coords[X].dims} (use align_epochs for per-epoch layouts)")
    return np.stack([obj.coords[X].values, obj.coords[Y].values], axis=1)


def _with_xy(obj: Any, P: np.ndarray, note: dict[str, Any], dims: tuple[str, ...] = (NEURON,),
             ) -> Any:
    attrs = dict(obj.coords[X].attrs)
    out = obj.assign_coords({X: (dims, P[..., 0], attrs), Y: (dims, P[..., 1], attrs)})
    desc = json.loads(obj.attrs.get(ATTR_LAYOUT, "{}") or "{}")
    desc["aligned"] = note
    out.attrs = {**obj.attrs, ATTR_LAYOUT: json.dumps(desc)}
    return out


def match_neurons(a: Any, b: Any) -> tuple[np.ndarray, np.ndarray]:
    """Match the neurons of two layers one to one by the correlation of their activity.

    Parameters
    ----------
    a, b : xarray.DataArray
        Values of each neuron over a shared dimension (e.g. NAPs over ``label``, or
        activations over ``sample``): dims ``("neuron", dim)``, possibly with more dims
        that are flattened into the profile (e.g. ``epoch``). Values are aligned on the
        shared coordinate labels.

    Returns
    -------
    rows_a, rows_b : numpy.ndarray of int
        Positions of matched neurons: ``a[rows_a[i]]`` is matched with ``b[rows_b[i]]``;
        ``min(n_a, n_b)`` pairs maximising the total correlation.

    Raises
    ------
    AlignmentError
        If the two share no values to correlate.
    """
    from scipy.optimize import linear_sum_assignment

    if not isinstance(a, xr.DataArray) or not isinstance(b, xr.DataArray):
        raise TypeError("match_neurons needs two DataArrays with a 'neuron' dimension")
    if set(a.dims) != set(b.dims) or NEURON not in a.dims:
        raise AlignmentError(f"match_neurons needs two DataArrays of the same dims with "
                             f"'neuron' among them, got {a.dims} and {b.dims}")
    a, b = xr.align(a.drop_vars([X, Y], errors="ignore"),
                    b.drop_vars([X, Y], errors="ignore"), join="inner", exclude=[NEURON])
    b = b.transpose(*a.dims)  # the profiles are flattened: both in one order of dims
    A = np.asarray(a.transpose(NEURON, ...).values, dtype=np.float64).reshape(a.sizes[NEURON], -1)
    B = np.asarray(b.transpose(NEURON, ...).values, dtype=np.float64).reshape(b.sizes[NEURON], -1)
    keep = np.isfinite(A).all(axis=0) & np.isfinite(B).all(axis=0)
    A, B = A[:, keep], B[:, keep]
    if A.shape[1] < 2:
        raise AlignmentError("the two layers share fewer than 2 finite values to correlate")
    A = A - A.mean(axis=1, keepdims=True)
    B = B - B.mean(axis=1, keepdims=True)
    na, nb = np.linalg.norm(A, axis=1), np.linalg.norm(B, axis=1)
    A = np.divide(A, na[:, None], out=np.zeros_like(A), where=na[:, None] > 0)
    B = np.divide(B, nb[:, None], out=np.zeros_like(B), where=nb[:, None] > 0)
    corr = A @ B.T  # constant neurons correlate 0 with everything
    rows, cols = linear_sum_assignment(corr, maximize=True)
    return rows, cols


def align(
    laid: Any,
    reference: Any,
    *,
    match: str = "shared",
    rescale: bool = True,
) -> Any:
    """Align a laid-out object onto a reference layout.

    Parameters
    ----------
    laid : xarray.DataArray or xarray.Dataset
        Object with ``x``, ``y`` on ``neuron``.
    reference : xarray.DataArray or xarray.Dataset
        Object with the reference ``x``, ``y`` on ``neuron``.
    match : {"shared", "activity"}, default "shared"
        ``"shared"``: neurons with the same ``neuron`` label in both objects (layers of
        one model, epochs of one layer); each label must name one neuron in each object.
        ``"activity"``: neurons of different models, matched one to one by the
        correlation of the objects' values (:func:`match_neurons`), e.g. NAPs over the
        same labels.
    rescale : bool, default True
        Scale the aligned layout into the unit square (see :func:`procrustes`).

    Returns
    -------
    same type as ``laid``
        A new object with the aligned ``x``, ``y``; ``topoxr_layout`` attrs record the
        alignment (rotation, reflection, rmsd, number of matched neurons).

    Raises
    ------
    AlignmentError
        Without layouts, with fewer than two shared/matched neurons, or (for
        ``match="shared"``) with repeated neuron labels in ``laid`` or ``reference``.
    """
    from topoxr.similarity import ProfileError, _neuron_labels

    P, Q = _xy(laid), _xy(reference)
    if match == "shared":
        for obj, what in ((laid, "laid"), (reference, "reference")):
            try:  # a repeated label would be matched to one of its neurons only
                _neuron_labels(obj, what)
            except ProfileError as err:
                raise AlignmentError(str(err)) from err
        ids_l = np.asarray(laid[NEURON].values)
        ids_r = np.asarray(reference[NEURON].values)
        common, pos_l, pos_r = np.intersect1d(ids_l, ids_r, return_indices=True)
    elif match == "activity":
        val_l = laid if isinstance(laid, xr.DataArray) else laid[next(iter(laid.data_vars))]
        val_r = reference if isinstance(reference, xr.DataArray) else \
            reference[next(iter(reference.data_vars))]
        pos_l, pos_r = match_neurons(val_l, val_r)
        common = pos_l
    else:
        raise AlignmentError(f"match must be 'shared' or 'activity', got {match!r}")
    if len(common) < 2:
        raise AlignmentError(f"only {len(common)} neurons in common; need at least 2")
    aligned, info = procrustes(P, Q[pos_r], shared=pos_l, rescale=rescale)
    note = {"match": match, "n_matched": len(common), "reflection": info["reflection"],
            "rotation": np.round(info["rotation"], 12).tolist(), "rmsd": info["rmsd"]}
    return _with_xy(laid, aligned, note)


def align_epochs(laid: Any, *, rescale: bool = True) -> Any:
    """Align per-epoch layouts so that each epoch follows the previous one.

    Each epoch is aligned onto the (already aligned) epoch before it, in the order of
    the epoch labels (not the order the object holds them in), by orthogonal Procrustes
    on all neurons, so an animation over epochs does not flip or spin.

    Parameters
    ----------
    laid : xarray.DataArray or xarray.Dataset
        Object with ``x``, ``y`` coordinates on ``("neuron", "epoch")``. A single shared
        layout (``x`` on ``neuron`` only) is returned unchanged.
    rescale : bool, default True
        Scale every aligned epoch into the unit square.

    Returns
    -------
    same type as ``laid``
    """
    if X not in laid.coords or Y not in laid.coords:
        raise AlignmentError(f"the object has no layout: coordinates {X!r}, {Y!r} are missing")
    if EPOCH not in laid.coords[X].dims:
        return laid
    xs = laid.coords[X].transpose(NEURON, EPOCH).values
    ys = laid.coords[Y].transpose(NEURON, EPOCH).values
    P = np.stack([xs, ys], axis=-1)  # (neuron, epoch, 2)
    out = P.copy()
    # in the order of the epochs' labels, whatever order the object holds them in
    order = np.argsort(np.asarray(laid.coords[X].transpose(NEURON, EPOCH)[EPOCH].values),
                       kind="stable")
    if rescale:  # as every later epoch (each fitted to the one before, then rescaled)
        out[:, order[0]] = _unit_square(P[:, order[0]])
    reflections = []
    for before, e in itertools.pairwise(order):
        out[:, e], info = procrustes(P[:, e], out[:, before], rescale=rescale)
        reflections.append(info["reflection"])
    note = {"match": "previous_epoch", "reflections": reflections}
    return _with_xy(laid, out, note, dims=(NEURON, EPOCH))
