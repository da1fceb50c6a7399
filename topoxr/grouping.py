"""Neuron activation patterns (NAPs): group means of a layer's activations.

A NAP of a group of samples is the mean activation of every neuron over the group's
samples (PAPER.md, step 2). Groups are defined by any sample coordinate (``label``, a
metadata column) or by coordinates that vary per epoch (``prediction``, ``correct``),
alone or combined: ``by=["label", "correct"]`` is the paper's binary contrast and
``by=["label", "prediction"]`` its confusion matrix.

The reduction is one out-of-core pass over the chunked store: every chunk is reduced
to per-(epoch, group) sums and counts by products with a one-hot matrix of the groups
(BLAS), and the partial results are summed over the sample blocks by a dask tree
reduction, so dask input gives a lazy result, memory stays at a few chunks and the work
grows linearly with the number of epochs (epochs are an axis of the partial results,
never folded into the group code). (flox's generic engines measured 2-5x slower
than reading the chunks on this workload, and its numba engine needs tens of seconds of
JIT compilation on first use; the one-hot product is as fast as an in-memory numpy
group mean.)
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Hashable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from topoxr.conventions import (
    ACTIVATION,
    COMMITTED,
    CORRECT,
    EPOCH,
    NEURON,
    SAMPLE,
)

__all__ = ["ATTR_NAP", "GROUP", "GroupingError", "naps"]

logger = logging.getLogger(__name__)

#: Name of the stacked group dimension when NAPs are grouped by several keys.
GROUP = "group"
#: Attribute of a NAP array describing how it was computed (JSON).
ATTR_NAP = "topoxr_nap"
#: Name of the per-group sample count coordinate.
COUNT = "count"


class GroupingError(ValueError):
    """The requested grouping cannot be computed from the object."""


def _as_activation(act: Any) -> tuple[xr.DataArray, dict[str, Any]]:
    """Return the activation DataArray and the attributes to carry over."""
    if isinstance(act, xr.DataTree):
        act = act.to_dataset()
    if isinstance(act, xr.Dataset):
        if ACTIVATION not in act.data_vars:
            raise GroupingError(
                f"the Dataset has no {ACTIVATION!r} variable; it has {sorted(map(str, act.data_vars))}"
            )
        attrs = {**act.attrs, **act[ACTIVATION].attrs}
        return act[ACTIVATION], attrs
    if isinstance(act, xr.DataArray):
        return act, dict(act.attrs)
    raise TypeError(
        f"naps() needs an xarray DataArray or Dataset of activations, got {type(act).__name__}"
    )


def _by_keys(by: Hashable | Sequence[Hashable]) -> list[str]:
    keys = [by] if isinstance(by, str) else list(by)  # type: ignore[arg-type]
    if not keys:
        raise GroupingError("by must name at least one coordinate")
    if len(set(keys)) != len(keys):
        raise GroupingError(f"by names a coordinate twice: {keys}")
    return [str(k) for k in keys]


def _grouping_coord(da: xr.DataArray, key: str) -> np.ndarray:
    """Values of coordinate ``key`` broadcast to (sample, epoch)."""
    if key not in da.coords:
        usable = sorted(
            str(name) for name, c in da.coords.items()
            if set(c.dims) <= {SAMPLE, EPOCH} and SAMPLE in c.dims
            and name not in (SAMPLE, COMMITTED)
        )
        raise GroupingError(f"cannot group by {key!r}: no such coordinate; "
                            f"coordinates on 'sample' to group by: {usable}")
    coord = da.coords[key]
    if SAMPLE not in coord.dims or not set(coord.dims) <= {SAMPLE, EPOCH}:
        raise GroupingError(
            f"cannot group by {key!r}: it has dims {coord.dims}, but a grouping coordinate "
            f"must be on ('sample',) or ('sample', 'epoch')"
        )
    values = coord.transpose(SAMPLE, ...).values
    if values.ndim == 1:
        values = np.broadcast_to(values[:, None], (da.sizes[SAMPLE], da.sizes[EPOCH]))
    return np.asarray(values)


#: Samples per BLAS product inside a block; the products are accumulated in float64, so
#: a large block (many zarr chunks) loses no precision to float32 accumulation.
_SUB_SAMPLES = 1 << 15


_BLAS = {"lock": threading.Lock(), "users": 0, "limiter": None, "controller": None}


@contextmanager
def _single_threaded_blas() -> Iterator[None]:
    """Run BLAS on one thread while any block is being reduced.

    The blocks are already reduced in parallel by dask's workers; a multi-threaded BLAS
    inside each worker oversubscribes the cores and its thin products (few groups) then
    run 2-3x slower. The limit is process-wide (BLAS has no per-thread setting), so it is
    reference-counted: set by the first block to start and restored by the last to end.
    """
    state = _BLAS
    with state["lock"]:
        if state["users"] == 0:
            if state["controller"] is None:
                from threadpoolctl import ThreadpoolController

                state["controller"] = ThreadpoolController()
            state["limiter"] = state["controller"].limit(limits=1, user_api="blas")
        state["users"] += 1
    try:
        yield
    finally:
        with state["lock"]:
            state["users"] -= 1
            if state["users"] == 0:
                state["limiter"].restore_original_limits()
                state["limiter"] = None


def _block_sums(block: np.ndarray, codes: np.ndarray, n_groups: int) -> np.ndarray:
    """:func:`_block_sums_unlimited` with BLAS on one thread (see `_single_threaded_blas`)."""
    with _single_threaded_blas():
        return _block_sums_unlimited(block, codes, n_groups)


def _block_sums_unlimited(block: np.ndarray, codes: np.ndarray, n_groups: int) -> np.ndarray:
    """Per-group sums and non-NaN counts of one (neuron, sample, epoch) block.

    ``codes`` (sample, epoch) holds the group index of every cell, -1 for cells left
    out. Returns ``(2, neuron, 1, epoch, n_groups)`` float64: sums, then counts, with
    the epochs of the block kept apart (never folded into the group code, so partial
    results stay small however many epochs there are). Every epoch slice is reduced by
    products with a one-hot matrix of the groups present in it (BLAS, in the block's
    float dtype, ``_SUB_SAMPLES`` samples at a time), so each value is read once; NaN or
    inf show up as non-finite sums, and only then is that piece reduced again group by
    group with NaN skipped.
    """
    n_neurons, _, n_epochs = block.shape
    out = np.zeros((2, n_neurons, 1, n_epochs, n_groups))
    for j in range(n_epochs):
        sums, counts = out[0, :, 0, j, :], out[1, :, 0, j, :]  # views
        c = codes[:, j]
        keep = c >= 0
        if not keep.any():
            continue
        vals = block[:, :, j] if keep.all() else block[:, keep, j]
        if not np.issubdtype(vals.dtype, np.floating):
            vals = vals.astype(np.float64)
        present, local = np.unique(c[keep], return_inverse=True)
        for s0 in range(0, len(local), _SUB_SAMPLES):
            v, loc = vals[:, s0:s0 + _SUB_SAMPLES], local[s0:s0 + _SUB_SAMPLES]
            onehot = np.zeros((len(loc), len(present)), dtype=v.dtype)
            onehot[np.arange(len(loc)), loc] = 1
            with np.errstate(invalid="ignore", over="ignore"):
                s = v @ onehot
            if np.isfinite(s).all():
                counts[:, present] += onehot.sum(axis=0)
            else:  # NaN or inf inside: per group, so inf * 0 cannot spoil the other groups
                s = np.stack([np.nansum(v[:, loc == g], axis=1)
                              for g in range(len(present))], axis=1)
                counts[:, present] += (~np.isnan(v)).astype(v.dtype) @ onehot
            sums[:, present] += s
    return out


def _group_means(data: Any, codes: np.ndarray, n_groups: int) -> Any:
    """nan-mean of ``data`` (neuron, sample, epoch) per group, epoch by epoch.

    ``codes`` (sample, epoch) gives the group index of every cell; codes < 0 are left
    out. Returns (neuron, epoch, group). For dask input the result is lazy: one task per
    chunk gives partial sums and counts per (epoch, group), summed over the sample
    blocks by a dask tree reduction, so memory stays at a few chunks and the work grows
    linearly with the number of epochs.
    """
    if isinstance(data, np.ndarray) or not hasattr(data, "chunks"):
        sums = _block_sums(np.asarray(data), codes, n_groups)[:, :, 0]
    else:
        import dask.array as dsa

        code_arr = dsa.from_array(codes, chunks=data.chunks[1:])
        partial = dsa.blockwise(
            _block_sums, "tnsek", data, "nse", code_arr, "se",
            new_axes={"t": 2, "k": n_groups}, adjust_chunks={"s": 1},
            dtype=np.float64, n_groups=n_groups, meta=np.empty((0,) * 5, dtype=np.float64),
        )
        sums = partial.sum(axis=2)
    counts = sums[1]
    # a group without values: divide by NaN rather than 0, which would warn
    return sums[0] / _nan_if_zero(counts)


def _nan_if_zero(counts: Any) -> Any:
    if isinstance(counts, np.ndarray):
        return np.where(counts > 0, counts, np.nan)
    import dask.array as dsa

    return dsa.where(counts > 0, counts, np.nan)


def naps(
    act: Any,
    by: str | Sequence[str] = "label",
    *,
    normalize: bool = True,
    epochs: Any = None,
    correct_only: bool = False,
) -> xr.DataArray:
    """Compute neuron activation patterns: the mean activation per group of samples.

    Parameters
    ----------
    act : xarray.DataArray or xarray.Dataset
        Activations of dims ``("neuron", "sample", "epoch")`` as :func:`topoxr.open_store`
        returns them (lazy dask or numpy), or a Dataset holding ``activation``.
    by : str or sequence of str, default "label"
        Coordinate(s) defining the groups: any coordinate on ``sample`` (``label``,
        metadata columns) or on ``("sample", "epoch")`` (``prediction``, ``correct``),
        whose values may then differ from epoch to epoch.
    normalize : bool, default True
        Subtract, per neuron and epoch, the mean over groups (the paper's normalisation:
        a map then shows how a group differs from the others). Groups empty at an epoch
        do not enter that epoch's mean.
    epochs : label or list of labels, optional
        Epochs to use (labels of the ``epoch`` coordinate); all by default.
    correct_only : bool, default False
        Use only samples whose prediction was correct (needs a ``correct`` coordinate).

    Returns
    -------
    xarray.DataArray
        Named ``"nap"``. Dims ``("neuron", <by>, "epoch")`` for one key, or
        ``("neuron", "group", "epoch")`` for several keys, where ``group`` is a stacked
        dimension (a pandas MultiIndex with one level per key) holding only the
        combinations that occur. A coordinate ``count`` on (group, epoch) gives the number
        of samples of each group at each epoch; a group empty at one epoch is NaN there,
        a group empty at every epoch is absent. Neuron and epoch coordinates and the
        input's attributes are kept; the attribute ``topoxr_nap`` records ``by`` and
        ``normalize`` (JSON). Lazy for dask input.

    Raises
    ------
    GroupingError
        If ``by`` names no usable coordinate (the message lists those available), if
        there is only one group (nothing to contrast), or if no committed sample is left.
    TypeError
        If ``act`` is not an xarray object.

    Notes
    -----
    Only committed samples count (the ``committed`` coordinate written by the store);
    activations that are NaN are skipped by the mean (``nanmean``), so a NaN inside a
    committed sample lowers that neuron's effective count but does not poison the group.
    ``count`` counts samples, not non-NaN values.

    Examples
    --------
    >>> from topoxr.testing import make_activations
    >>> nap = naps(make_activations(n_labels=4), by="label")
    >>> nap.dims, nap.sizes["label"]
    (('neuron', 'label', 'epoch'), 4)
    >>> naps(make_activations(), by=["label", "correct"]).dims
    ('neuron', 'group', 'epoch')
    """
    da, attrs = _as_activation(act)
    missing = [d for d in (NEURON, SAMPLE, EPOCH) if d not in da.dims]
    if missing:
        raise GroupingError(f"activations need dims ('neuron', 'sample', 'epoch'); "
                            f"missing {missing}, got {da.dims}")
    keys = _by_keys(by)
    if epochs is not None:
        sel = [epochs] if np.ndim(epochs) == 0 else list(epochs)
        try:
            da = da.sel({EPOCH: sel})
        except KeyError as err:
            raise GroupingError(f"epochs {sel} not all in {da[EPOCH].values.tolist()}") from err
    da = da.transpose(NEURON, SAMPLE, EPOCH)
    n_samples, n_epochs = da.sizes[SAMPLE], da.sizes[EPOCH]

    valid = np.ones((n_samples, n_epochs), dtype=bool)
    if COMMITTED in da.coords:
        valid &= da.coords[COMMITTED].transpose(SAMPLE, EPOCH).values.astype(bool)
    if correct_only:
        if CORRECT not in da.coords:
            raise GroupingError("correct_only=True needs a 'correct' coordinate (predictions)")
        valid &= da.coords[CORRECT].transpose(SAMPLE, EPOCH).values.astype(bool)

    # Factorize every key over the valid cells, then combine into one group code.
    columns = [_grouping_coord(da, key) for key in keys]
    if not valid.any():
        raise GroupingError("no committed samples to compute NAPs from"
                            + (" (after correct_only)" if correct_only else ""))
    frame = pd.DataFrame({key: col[valid] for key, col in zip(keys, columns, strict=True)})
    for key in keys:
        if frame[key].isna().any():
            raise GroupingError(f"coordinate {key!r} has missing values (NaN) in committed samples")
    uniques = frame.drop_duplicates().sort_values(keys, kind="stable").reset_index(drop=True)
    n_groups = len(uniques)
    if n_groups < 2:
        only = uniques.iloc[0].to_dict() if n_groups else {}
        raise GroupingError(f"grouping by {keys} gives a single group {only}; NAPs need at "
                            f"least two groups to contrast")
    index = pd.MultiIndex.from_frame(uniques) if len(keys) > 1 else pd.Index(uniques[keys[0]])
    group_of_valid = index.get_indexer(
        pd.MultiIndex.from_frame(frame) if len(keys) > 1 else pd.Index(frame[keys[0]])
    )
    codes = np.full((n_samples, n_epochs), -1, dtype=np.min_scalar_type(-max(n_groups, 1)))
    codes[valid] = group_of_valid
    epoch_idx = np.broadcast_to(np.arange(n_epochs)[None, :], (n_samples, n_epochs))
    counts = np.bincount(group_of_valid * n_epochs + epoch_idx[valid],
                         minlength=n_groups * n_epochs).reshape(n_groups, n_epochs)

    means = _group_means(da.data, codes, n_groups).transpose(0, 2, 1)
    means = means.astype(da.dtype if np.issubdtype(da.dtype, np.floating) else np.float64)

    gdim = keys[0] if len(keys) == 1 else GROUP
    coords: dict[str, Any] = {
        name: c.variable for name, c in da.coords.items() if set(c.dims) <= {NEURON, EPOCH}
    }
    out = xr.DataArray(means, dims=(NEURON, gdim, EPOCH), coords=coords, name="nap")
    if len(keys) == 1:
        out = out.assign_coords({gdim: index.values})
    else:
        out = out.assign_coords(xr.Coordinates.from_pandas_multiindex(index, GROUP))
    out = out.assign_coords({COUNT: ((gdim, EPOCH), counts)})
    if normalize:
        # Empty groups are NaN and are skipped; the mean is over the groups present.
        out = out - out.mean(gdim, skipna=True)
        out.name = "nap"
    empty = counts == 0
    if empty.any():
        logger.info("%d (group, epoch) cells have no samples and are NaN", int(empty.sum()))
    out.attrs = {**attrs, ATTR_NAP: json.dumps({"by": keys, "normalize": bool(normalize),
                                                "correct_only": bool(correct_only)})}
    return out
