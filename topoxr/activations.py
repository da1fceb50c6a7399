"""Validate and shape raw activation batches before they reach the store.

Adapters and user code hand the writer whatever a layer produced: a dense
``(batch, neurons)`` array or a convolutional map such as ``(batch, C, H, W)`` or
``(batch, H, W, C)``.  This module turns such a batch into the store's
``(batch, neuron)`` matrix plus the coordinates that say which unit each neuron is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from topoxr.conventions import CHANNEL
from topoxr.reduction import one_position

__all__ = ["REDUCE_MODES", "ReducedBatch", "reduce_units"]

#: How the spatial positions of a convolutional map become neurons.
REDUCE_MODES = ("mean", "max", "none")
#: Labels of reductions done before the store (sequence outputs); only 2-D input.
_PRE_REDUCED = ("first", "last", "tokens")
ReduceMode = Literal["mean", "max", "none"]

_SPATIAL_NAMES = {1: ("position",), 2: ("row", "col"), 3: ("depth", "row", "col")}


@dataclass
class ReducedBatch:
    """A batch flattened to ``(batch, neuron)`` with the neurons' unit coordinates."""

    values: np.ndarray
    unit_coords: dict[str, np.ndarray] = field(default_factory=dict)
    reduce: str = "mean"


def reduce_units(
    activations: object, *, channel_axis: int | None = None, reduce: str = "mean"
) -> ReducedBatch:
    """Turn one batch of layer outputs into a ``(batch, neuron)`` float32 matrix.

    Parameters
    ----------
    activations : array_like
        ``(batch, neurons)`` for dense layers, or ``(batch, ...)`` with one channel axis
        for convolutional layers.
    channel_axis : int, optional
        Axis of the channels for inputs with more than two dimensions, e.g. ``1`` for
        PyTorch's ``(N, C, H, W)`` or ``-1`` for Keras' ``(N, H, W, C)``. Required there.
    reduce : {"mean", "max", "none"}, default "mean"
        ``"mean"`` and ``"max"`` pool every channel over its spatial positions (one neuron
        per feature map); ``"none"`` keeps every unit, ordered channel-major, with
        ``channel`` and position coordinates (``row``, ``col``, ...).

    Returns
    -------
    ReducedBatch
        The float32 values and the per-neuron coordinates. Where no computation is
        needed (float32 ``(batch, neurons)`` input, or maps of one position) the values
        are a view of ``activations``, not a copy.

    Raises
    ------
    ValueError
        For non-numeric data, an unknown ``reduce`` mode, a missing ``channel_axis``
        or one that is no integer or no non-batch axis (for ``(batch, neurons)``
        input: 1 or -1, where it is given), or fewer than two dimensions.
    """
    array = np.asarray(activations)
    if reduce not in REDUCE_MODES and not (reduce in _PRE_REDUCED and array.ndim == 2):
        if reduce in _PRE_REDUCED:
            raise ValueError(f"reduce={reduce!r} labels (batch, neurons) values already "
                             "reduced over tokens; reduce them first (topoxr.reduction)")
        raise ValueError(f"unknown reduce mode {reduce!r}; choose one of {list(REDUCE_MODES)}")
    if array.dtype.kind not in "biuf":
        raise ValueError(
            f"activations must be real numbers, got an array of dtype {array.dtype}"
        )
    if array.ndim < 2:
        raise ValueError(
            f"activations must have shape (batch, neurons, ...), got shape {array.shape}"
        )
    if channel_axis is not None and (isinstance(channel_axis, bool | np.bool_)
                                     or not isinstance(channel_axis, int | np.integer)):
        raise ValueError(f"channel_axis must be an integer, got {channel_axis!r}")
    if array.ndim == 2:
        if channel_axis is not None and int(channel_axis) not in (1, -1):
            raise ValueError(f"channel_axis={channel_axis} is not the neuron axis of "
                             f"(batch, neurons) activations of shape {array.shape} (1 or -1)")
        return ReducedBatch(np.ascontiguousarray(array, dtype=np.float32), {}, reduce)
    if channel_axis is None:
        raise ValueError(
            f"activations of shape {array.shape} have spatial axes: pass channel_axis "
            "(1 for (batch, C, H, W) as in PyTorch, -1 for (batch, H, W, C) as in Keras)"
        )
    axis = int(channel_axis)
    if not -array.ndim <= axis < array.ndim or axis % array.ndim == 0:
        raise ValueError(
            f"channel_axis={channel_axis} is not a non-batch axis of shape {array.shape}"
        )
    channels_first = np.moveaxis(array, axis, 1)
    n_channels = channels_first.shape[1]
    spatial_shape = channels_first.shape[2:]
    spatial_axes = tuple(range(2, channels_first.ndim))
    # already pooled: the values themselves, not copied (like a (batch, neurons) input:
    # the writer copies them into its buffer)
    one = one_position(array, axis, copy=False) if reduce in ("mean", "max") else None
    if one is not None:
        return ReducedBatch(one, {CHANNEL: np.arange(n_channels)}, reduce)
    if reduce == "mean":
        values = channels_first.mean(axis=spatial_axes, dtype=np.float64)
        return ReducedBatch(
            values.astype(np.float32), {CHANNEL: np.arange(n_channels)}, reduce
        )
    if reduce == "max":
        values = channels_first.max(axis=spatial_axes)
        return ReducedBatch(
            np.asarray(values, dtype=np.float32), {CHANNEL: np.arange(n_channels)}, reduce
        )
    flat = channels_first.reshape(channels_first.shape[0], -1).astype(np.float32)
    grids = np.indices((n_channels, *spatial_shape)).reshape(1 + len(spatial_shape), -1)
    names = _SPATIAL_NAMES.get(len(spatial_shape)) or tuple(
        f"position_{i}" for i in range(len(spatial_shape))
    )
    coords = {CHANNEL: grids[0]}
    coords.update({name: grid for name, grid in zip(names, grids[1:], strict=True)})
    return ReducedBatch(np.ascontiguousarray(flat), coords, reduce)
