"""Neuron activation patterns (NAPs): group means of a layer's activations.

A NAP of a group of samples is the mean activation of every neuron over the group's
samples (PAPER.md, step 2). Groups are defined by any sample coordinate (``label``, a
metadata column) or by coordinates that vary per epoch (``prediction``, ``correct``),
alone or combined: ``by=["label", "correct"]`` is the paper's binary contrast and
``by=["label", "prediction"]`` its confusion matrix.

The reduction is one out-of-core pass over the chunked store: the group of every
(sample, epoch) cell is encoded together with its epoch into one integer code, every
chunk is reduced to per-code sums and counts by a product with a one-hot matrix (BLAS),
and the partial results are summed by a dask tree reduction, so dask input gives a lazy
result and memory stays at a few chunks. (flox's generic engines measured 2-5x slower
than reading the chunks on this workload, and its numba engine needs tens of seconds of
JIT compilation on first use; the one-hot product is as fast as an in-memory numpy
group mean.)
"""

from __future__ import annotations

import json
import logging
from collections.abc import Hashable, Sequence
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


def _block_sums(block: np.ndarray, codes: np.ndarray, n_codes: int) -> np.ndarray:
    """Per-code sums and non-NaN counts of one (neuron, sample, epoch) block.

    Returns ``(2, neuron, 1, 1, n_codes)`` float64: sums, then counts. Every epoch slice
    is reduced by one product with a one-hot matrix of the codes present in it (BLAS, in
    the block's float dtype), so each value is read once; NaN or inf show up as non-finite
    sums, and only then is the slice reduced again group by group with NaN skipped.
    """
    out = np.zeros((2, block.shape[0], 1, 1, n_codes))
    sums, counts = out[0, :, 0, 0, :], out[1, :, 0, 0, :]  # views
    for j in range(block.shape[2]):
        c = codes[:, j]
        keep = c >= 0
        if not keep.any():
            continue
        vals = block[:, :, j] if keep.all() else block[:, keep, j]
        if not np.issubdtype(vals.dtype, np.floating):
            vals = vals.astype(np.float64)
        present, local = np.unique(c[keep], return_inverse=True)
        onehot = np.zeros((len(local), len(present)), dtype=vals.dtype)
        onehot[np.arange(len(local)), local] = 1
        with np.errstate(invalid="ignore", over="ignore"):
            s = vals @ onehot
        if np.isfinite(s).all():
            counts[:, present] += onehot.sum(axis=0)
        else:  # NaN or inf inside: per group, so inf * 0 cannot spoil the other groups
            nan = np.isnan(vals)
            s = np.stack([np.nansum(vals[:, local == g], axis=1)
                          for g in range(len(present))], axis=1)
            counts[:, present] += (~nan).astype(vals.dtype) @ onehot
        sums[:, present] += s
    return out


def _group_means(data: Any, codes: np.ndarray, n_codes: int) -> Any:
    """nan-mean of ``data`` (neuron, sample, epoch) per code of ``codes`` (sample, epoch).

    Codes < 0 are left out. For dask input the result is lazy: one task per chunk gives
    partial sums and counts, summed by a tree reduction, so memory stays at a few chunks.
    """
    if isinstance(data, np.ndarray) or not hasattr(data, "chunks"):
        sums = _block_sums(np.asarray(data), codes, n_codes)[:, :, 0, 0]
    else:
        import dask.array as dsa

        code_arr = dsa.from_array(codes, chunks=data.chunks[1:])
        partial = dsa.blockwise(
            _block_sums, "tnsek", data, "nse", code_arr, "se",
            new_axes={"t": 2, "k": n_codes}, adjust_chunks={"s": 1, "e": 1},
            dtype=np.float64, n_codes=n_codes, meta=np.empty((0,) * 5, dtype=np.float64),
        )
        sums = partial.sum(axis=(2, 3))
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
    codes = np.full((n_samples, n_epochs), -1, dtype=np.int64)
    epoch_idx = np.broadcast_to(np.arange(n_epochs)[None, :], (n_samples, n_epochs))
    codes[valid] = group_of_valid * n_epochs + epoch_idx[valid]

    counts = np.bincount(codes[codes >= 0], minlength=n_groups * n_epochs)
    counts = counts.reshape(n_groups, n_epochs)

    means = _group_means(da.data, codes, n_groups * n_epochs)
    means = means.reshape(da.sizes[NEURON], n_groups, n_epochs)
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
