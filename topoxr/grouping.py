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
from collections.abc import Hashable, Iterable, Iterator, Sequence
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
        if ACTIVATION not in act.data_vars:
            layers = [node.relative_to(act) for node in act.subtree
                      if ACTIVATION in node.data_vars]
            example = layers[0] if layers else "model/layer"
            raise GroupingError(
                f"naps() takes one layer, and the DataTree node {act.path!r} holds no "
                f"{ACTIVATION!r}: select a layer node, e.g. naps(tree[{example!r}])"
                + (f"; its layer nodes: {layers[:10]}{' ...' if len(layers) > 10 else ''}"
                   if layers else "")
                + " (or use tree.topo.naps() for every layer)")
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
    if isinstance(by, str):
        keys = [by]
    elif isinstance(by, Iterable):
        keys = list(by)
    else:
        raise GroupingError(f"by must be a coordinate name or a list of names, got {by!r}")
    if not keys:
        raise GroupingError("by must name at least one coordinate")
    if any(k is None for k in keys):
        raise GroupingError(f"by must name coordinates, got {keys!r}")
    if len(set(keys)) != len(keys):
        raise GroupingError(f"by names a coordinate twice: {keys}")
    keys = [str(k) for k in keys]
    # names of naps' own output: a key of that name would be replaced by it
    taken = [k for k in keys if k == COUNT or (k == GROUP and len(keys) > 1)]
    if taken:
        raise GroupingError(
            f"cannot group by {taken[0]!r}: naps() names its "
            + ("per-group sample counts" if taken[0] == COUNT
               else "stacked dimension of several keys")
            + f" {taken[0]!r}; rename that coordinate first, e.g. "
            f"ds.rename({{{taken[0]!r}: 'my_{taken[0]}'}})")
    return keys


def _flag(value: Any, name: str) -> bool:
    """``value`` of the bool argument ``name``; anything but True or False is refused."""
    if not isinstance(value, bool | np.bool_):
        raise GroupingError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def _truth(coord: xr.DataArray) -> np.ndarray:
    """A flag coordinate (``committed``, ``correct``) as bool; a missing value is False.

    ``committed`` or ``correct`` hold NaN where xarray had no value for a cell (e.g.
    after :func:`xarray.concat` of layers with different epochs): not committed, not
    known to be correct. Returns (sample, epoch) for a coordinate on ("sample",
    "epoch") and (sample, 1) for one on "sample" only, which broadcasts over the epochs.

    Raises
    ------
    GroupingError
        If the coordinate is not on "sample" (and "epoch"), or holds anything but True
        and False: bool, or 0 and 1 (integers, floats, Python objects) with NaN or None
        for a missing value. Strings are refused: ``"False"`` would read as True.
    """
    name = coord.name
    if SAMPLE not in coord.dims or not set(coord.dims) <= {SAMPLE, EPOCH}:
        raise GroupingError(f"coordinate {name!r} must be on ('sample',) or ('sample', "
                            f"'epoch'), got dims {coord.dims}")
    values = np.asarray(coord.transpose(SAMPLE, ...).values)
    if values.ndim == 1:
        values = values[:, None]
    if values.dtype.kind == "b":
        return values
    known = ~pd.isna(values) if values.dtype.kind in "fO" else np.ones(values.shape, bool)
    given = values[known]
    if values.dtype.kind == "O":
        kinds = {type(v) for v in given.tolist()}
        numeric = all(issubclass(t, int | float | np.bool_ | np.number) for t in kinds)
    else:
        numeric = values.dtype.kind in "iuf"
    if not numeric or not np.isin(given, (0, 1)).all():
        shown = pd.unique(given.ravel())[:5].tolist() if given.size else []
        raise GroupingError(
            f"coordinate {name!r} must hold True/False (bool, or 0/1 with NaN for missing "
            f"values), got dtype {values.dtype} with values {shown}; convert it first, e.g. "
            f"ds.assign_coords({name}=ds[{name!r}] == 'True') for strings")
    out = np.zeros(values.shape, dtype=bool)
    out[known] = given.astype(bool)
    return out


def _epoch_labels(epochs: Any) -> list[Any]:
    """The list of epoch labels that ``epochs`` (one label or a list of them) selects."""
    if isinstance(epochs, xr.DataArray | xr.Variable | pd.Index | pd.Series):
        epochs = np.asarray(epochs)  # e.g. ds.epoch[1:]
    if isinstance(epochs, str | bytes) or np.ndim(epochs) == 0:
        sel = [epochs.item() if isinstance(epochs, np.ndarray) else epochs]
    else:
        sel = list(epochs.ravel()) if isinstance(epochs, np.ndarray) else list(epochs)
    if not sel:
        raise GroupingError("epochs=[] selects no epoch; pass at least one epoch label, "
                            "or None for all")
    for label in sel:
        if isinstance(label, bool | np.bool_ | slice) or not isinstance(label, Hashable):
            raise GroupingError(
                f"epochs must be an epoch label or a list of labels, got {epochs!r} (a "
                f"{type(label).__name__} is not an epoch label); for a range of epochs "
                "select it first, e.g. naps(ds.sel(epoch=slice(0, 2)))")
    if len(set(sel)) != len(sel):
        seen: set[Any] = set()
        twice = [x for x in sel if x in seen or seen.add(x)]
        raise GroupingError(f"epochs names epoch(s) {twice} more than once: {epochs!r}")
    return sel


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


#: Most samples per BLAS product inside a block (fewer for wide layers or many groups,
#: see `_piece_samples`); the products are accumulated in float64.
_SUB_SAMPLES = 1 << 15
#: Bytes of the float64 copy of one piece of a block and of its one-hot matrix: one
#: buffer of that size per block, reused piece after piece, small enough to stay in cache.
_PIECE_BYTES = 1 << 20


def _piece_samples(n_neurons: int, n_groups: int) -> int:
    """Samples per BLAS product: its float64 operands hold at most ``_PIECE_BYTES``."""
    return max(1, min(_SUB_SAMPLES, _PIECE_BYTES // (8 * (n_neurons + n_groups))))


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
    products with a one-hot matrix of the groups present in it (BLAS, a piece of
    `_piece_samples` samples at a time, each cast to float64 first: sums of float16 would
    overflow or round away, sums of float32 would depend on how the samples are chunked),
    so each value is read once; NaN or inf show up as non-finite sums, and only then is
    that piece reduced again group by group with NaN skipped.
    """
    n_neurons, _, n_epochs = block.shape
    out = np.zeros((2, n_neurons, 1, n_epochs, n_groups))
    buffer = None
    for j in range(n_epochs):
        sums, counts = out[0, :, 0, j, :], out[1, :, 0, j, :]  # views
        c = codes[:, j]
        keep = c >= 0
        if not keep.any():
            continue
        vals = block[:, :, j] if keep.all() else block[:, keep, j]
        present, local = np.unique(c[keep], return_inverse=True)
        step = _piece_samples(n_neurons, len(present))
        if buffer is None or buffer.shape[1] < min(step, len(local)):
            buffer = np.empty((n_neurons, min(step, len(local))))
        for s0 in range(0, len(local), step):
            loc = local[s0:s0 + step]
            v = buffer[:, :len(loc)]  # float64, reused: no fresh memory per piece
            np.copyto(v, vals[:, s0:s0 + step], casting="unsafe")
            onehot = np.zeros((len(loc), len(present)))
            onehot[np.arange(len(loc)), loc] = 1
            with np.errstate(invalid="ignore", over="ignore"):
                s = v @ onehot
            if np.isfinite(s).all():
                counts[:, present] += onehot.sum(axis=0)
            else:  # NaN or inf inside: per group, so inf * 0 cannot spoil the other groups
                s = np.stack([np.nansum(v[:, loc == g], axis=1)
                              for g in range(len(present))], axis=1)
                counts[:, present] += (~np.isnan(v)).astype(np.float64) @ onehot
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


def _nap_dtype(dtype: np.dtype) -> type:
    """The dtype of NAPs of activations of ``dtype`` (see :func:`naps`, "Returns")."""
    dtype = np.dtype(dtype)
    floating = np.issubdtype(dtype, np.floating) or "float" in dtype.name  # bfloat16...
    return np.float32 if floating and dtype.itemsize <= 4 else np.float64


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
        whose values may then differ from epoch to epoch. ``"count"``, and ``"group"``
        among several keys, are names of the result and cannot be keys.
    normalize : bool, default True
        Subtract, per neuron and epoch, the mean over groups (the paper's normalisation:
        a map then shows how a group differs from the others). Only the groups whose
        mean is finite for that neuron at that epoch enter it: a group empty at an epoch
        (NaN for every neuron) is left out of that epoch's mean; a group whose values of
        one neuron are all NaN is left out of that neuron's mean only, so that neuron's
        other groups are centred on fewer groups than the other neurons' are; and a
        group whose mean is inf for a neuron (an inf activation, see Notes) stays inf
        and is left out of that neuron's mean, so the other groups stay finite.
    epochs : label or list of labels, optional
        Epochs to use (labels of the ``epoch`` coordinate, at least one); all by default.
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

        The dtype is float32 for activations of float32 or a narrower float type
        (float16, bfloat16), float64 otherwise (float64, integers, bool). The sums and
        counts are accumulated in float64 whatever the input's dtype. For float32 and
        narrower activations the rounding of those sums is far below float32 resolution,
        so the NAPs are in practice the same, bit for bit, whether the activations are
        read lazily or loaded and however they are chunked. For float64 and integer
        activations the NAPs are float64 and the sums' order, which follows the chunks,
        can change the last bits (relative differences of about 1e-16).

    Raises
    ------
    GroupingError
        If ``by`` names no usable coordinate (the message lists those available) or a
        name of the result (``count``, ``group``), or a coordinate whose values mix
        types that do not compare (``1`` and ``"a"``); if ``epochs`` selects none, is not
        a label or a list of labels (a bool, a slice) or repeats a label; if
        ``normalize`` or ``correct_only`` is not a bool; if ``committed`` or ``correct``
        holds anything but True/False (bool, or 0/1 with NaN for missing values; strings
        are refused) or is not on ``sample`` (and ``epoch``); if the activations have
        other dims than neuron, sample and epoch, or are not real numbers (complex,
        timedelta, strings); if ``act`` is a DataTree node without activations (select a
        layer node, e.g. ``tree["model/layer"]``); if there is only one group (nothing
        to contrast), or if no committed sample is left.
    TypeError
        If ``act`` is not an xarray object.

    Notes
    -----
    Only committed samples count (the ``committed`` coordinate written by the store);
    activations that are NaN are skipped by the mean (``nanmean``), so a NaN inside a
    committed sample lowers that neuron's effective count but does not poison the group.
    ``count`` counts samples, not non-NaN values. An inf activation (stored with
    ``ActivationWriter.write(..., allow_nonfinite=True)``) is kept: its group's NAP is
    inf for that neuron (NaN if the group holds both +inf and -inf), and the other
    groups are unaffected. A missing value (NaN) of ``committed`` or ``correct``, as
    :func:`xarray.concat` leaves where a layer lacks an epoch, counts as False; either
    may be on ``sample`` only, and then holds for every epoch.

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
    extra = [d for d in da.dims if d not in (NEURON, SAMPLE, EPOCH)]
    if extra:
        raise GroupingError(
            f"activations must have only dims ('neuron', 'sample', 'epoch'), got {da.dims}; "
            f"select one position of {extra} first, e.g. .isel({extra[0]}=0)")
    if da.dtype.kind not in "biuf" and "float" not in da.dtype.name:  # bfloat16: kind V
        raise GroupingError(
            f"activations must be real numbers (bool, integer or float), got dtype {da.dtype}")
    keys = _by_keys(by)
    normalize = _flag(normalize, "normalize")
    correct_only = _flag(correct_only, "correct_only")
    if epochs is not None:
        sel = _epoch_labels(epochs)
        try:
            da = da.sel({EPOCH: sel})
        except KeyError as err:
            raise GroupingError(f"epochs {sel} not all in {da[EPOCH].values.tolist()}") from err
    da = da.transpose(NEURON, SAMPLE, EPOCH)
    n_samples, n_epochs = da.sizes[SAMPLE], da.sizes[EPOCH]

    valid = np.ones((n_samples, n_epochs), dtype=bool)
    if COMMITTED in da.coords:
        valid &= _truth(da.coords[COMMITTED])
    if correct_only:
        if CORRECT not in da.coords:
            raise GroupingError("correct_only=True needs a 'correct' coordinate (predictions and "
                                "labels)")
        valid &= _truth(da.coords[CORRECT])

    # Factorize every key over the valid cells, then combine into one group code.
    columns = [_grouping_coord(da, key) for key in keys]
    if not valid.any():
        raise GroupingError("no committed samples to compute NAPs from"
                            + (" (after correct_only)" if correct_only else ""))
    frame = pd.DataFrame({key: col[valid] for key, col in zip(keys, columns, strict=True)})
    for key in keys:
        if frame[key].isna().any():
            raise GroupingError(f"coordinate {key!r} has missing values (NaN) in committed samples")
    uniques = frame.drop_duplicates()
    try:
        uniques = uniques.sort_values(keys, kind="stable").reset_index(drop=True)
    except TypeError as err:  # values of types that do not compare, e.g. 1 and "a"
        for key in keys:
            kinds = sorted({type(v).__name__ for v in uniques[key]})
            if len(kinds) > 1:
                raise GroupingError(
                    f"cannot order the groups of coordinate {key!r}: its values mix types "
                    f"{kinds}; give them one type first, e.g. "
                    f"ds.assign_coords({key}=ds[{key!r}].astype(str))") from err
        raise GroupingError(f"cannot order the groups of {keys}: {err}") from err
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

    means = _group_means(da.data, codes, n_groups).transpose(0, 2, 1)  # float64

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
        # The mean over the groups whose mean is finite: empty groups (NaN) are skipped,
        # and so is a group holding an inf, which would make every group -inf or NaN.
        out = out - out.where(np.isfinite(out)).mean(gdim, skipna=True)
        out.name = "nap"
    out = out.astype(_nap_dtype(da.dtype))
    empty = counts == 0
    if empty.any():
        logger.info("%d (group, epoch) cells have no samples and are NaN", int(empty.sum()))
    out.attrs = {**attrs, ATTR_NAP: json.dumps({"by": keys, "normalize": bool(normalize),
                                                "correct_only": bool(correct_only)})}
    return out
