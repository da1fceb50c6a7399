"""Which axis of a layer's output holds the neurons, and how the other axes are reduced.

One framework-free place for the meaning of a layer's axes, used by every adapter.  An
adapter decides, per layer, the *neuron axis* of the output (a conv layer's channel axis,
the last axis of everything else, or the user's ``channel_axis``) and says how it decided
(the *rule*).  This module then reduces every other non-batch axis:

* conv maps ``(N, C, *spatial)``: ``mean`` / ``max`` over positions, or ``none`` (every
  unit a neuron);
* sequences ``(N, T, H)`` (neurons on the last axis): ``mean`` (masked by the attention
  mask when one is given), ``max`` (masked too), ``first`` (the first non-padding token:
  the CLS token of BERT-like models, also under left padding), ``last`` (the last
  non-padding token), ``none``, or ``tokens``: every token its own sample.

Per-token samples get stable ids: token ``t`` of the input with sample id ``s`` is sample
``s * T + t`` (``T`` the padded sequence length of the layer's output), with the
coordinates ``input`` (``s``), ``token_position`` (``t``) and, when the input ids are
known, ``token_id``; padding tokens (mask 0) are dropped.

What was reduced is stated in the store, per layer, by :func:`reduction_attrs`.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np

__all__ = [
    "RecordingError",
    "ATTR_AXIS_RULE",
    "ATTR_MASKED",
    "ATTR_NEURON_AXIS",
    "ATTR_OUTPUT_SHAPE",
    "ATTR_REDUCED_AXES",
    "DEFAULT_MASK",
    "MASKED_REDUCTIONS",
    "REDUCE_CHOICES",
    "TOKEN_COLUMNS",
    "LayerSpec",
    "ReducedLayer",
    "describe_reduction",
    "did_you_mean",
    "reduce_layer",
    "reduction_attrs",
    "resolve_layer_specs",
    "second_sequence",
    "token_info",
]

#: Every reduce mode; ``first``, ``last`` and ``tokens`` apply to sequence outputs only.
REDUCE_CHOICES = ("mean", "max", "none", "first", "last", "tokens")
_SEQUENCE_ONLY = ("first", "last", "tokens")
#: Reductions of a sequence output ``(N, T, H)`` over its tokens: they follow the layer's
#: attention mask, where it has one.
MASKED_REDUCTIONS = ("mean", "max", "first", "last", "tokens")
#: Per-sample coordinates added by ``reduce="tokens"``.
TOKEN_COLUMNS = ("input", "token_position", "token_id")

#: Layer attributes written at layer creation (see ``docs/store-format.md``).
ATTR_NEURON_AXIS = "topoxr_neuron_axis"
ATTR_REDUCED_AXES = "topoxr_reduced_axes"
ATTR_OUTPUT_SHAPE = "topoxr_output_shape"
ATTR_MASKED = "topoxr_masked"
ATTR_AXIS_RULE = "topoxr_axis_rule"
_ATTR_REDUCE = "topoxr_reduce"


class RecordingError(ValueError):
    """Bad input for a recorder (layers, data, labels, probe set); nothing was written."""


@dataclass(frozen=True)
class LayerSpec:
    """Settings of one recorded layer; ``None`` means "the recording's default".

    Parameters
    ----------
    reduce : str, optional
        One of :data:`REDUCE_CHOICES`.
    channel_axis : int, optional
        Axis of the neurons in the layer's output (batch axis 0), overriding the
        adapter's choice.
    call : int, optional
        Which call of a module that runs several times per forward pass (``0`` first);
        the same as the name suffix ``"relu:1"``.
    output_key : str or int, optional
        Entry of a tuple (int) or mapping (str) output to record.
    mask : str or False, optional
        Which attention mask of a mapping input the layer's tokens follow: its key
        (``"attention_mask"``, the default, or ``"decoder_attention_mask"`` for the
        decoder layers of an encoder-decoder model), or ``False`` for none.
    """

    reduce: str | None = None
    channel_axis: int | None = None
    call: int | None = None
    output_key: str | int | None = None
    mask: str | bool | None = None

    @classmethod
    def from_value(cls, layer: str, value: Any) -> LayerSpec:
        """Build a spec from a :class:`LayerSpec`, a mapping or ``None``."""
        if value is None:
            return cls()
        if isinstance(value, LayerSpec):
            return value
        if not isinstance(value, Mapping):
            raise RecordingError(f"layer {layer!r}: settings must be a mapping or LayerSpec, "
                             f"got {type(value).__name__}")
        known = {"reduce", "channel_axis", "call", "output_key", "mask"}
        unknown = sorted(set(value) - known)
        if unknown:
            raise RecordingError(f"layer {layer!r}: unknown settings {unknown}; "
                             f"known ones are {sorted(known)}")
        spec = cls(**dict(value))
        if spec.reduce is not None and spec.reduce not in REDUCE_CHOICES:
            raise RecordingError(f"layer {layer!r}: unknown reduce {spec.reduce!r}; "
                             f"choose one of {list(REDUCE_CHOICES)}")
        for name in ("channel_axis", "call"):
            v = getattr(spec, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int | np.integer)):
                raise RecordingError(f"layer {layer!r}: {name} must be an integer, got {v!r}")
        if spec.call is not None and spec.call < 0:
            raise RecordingError(f"layer {layer!r}: call must be >= 0, got {spec.call}")
        if spec.mask is not None and spec.mask is not False and not (
                isinstance(spec.mask, str) and spec.mask):
            raise RecordingError(f"layer {layer!r}: mask must be the key of an attention mask "
                                 f"among the inputs, or False, got {spec.mask!r}")
        return spec


def did_you_mean(unknown: Sequence[str], available: Sequence[str], *, what: str) -> str:
    """A message for names that match nothing: the three closest names and the count.

    Parameters
    ----------
    unknown : sequence of str
        The names asked for that match no layer.
    available : sequence of str
        The model's layer names.
    what : str
        What the names are looked up in, for the message (e.g. ``"model"``).

    Returns
    -------
    str
        The message, naming each unknown name with up to three close matches.
    """
    parts = []
    for name in unknown:
        close = difflib.get_close_matches(name, list(available), n=3, cutoff=0.4)
        hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
        parts.append(f"{name!r}{hint}")
    return (f"no layer of the {what} matches {', '.join(parts)}; it has {len(available)} "
            "layers (list them with layer_names(model))")


def _split_call(name: str, available: set[str]) -> tuple[str, int | None]:
    base, sep, tail = name.rpartition(":")
    if sep and tail.isdigit() and base in available and name not in available:
        return base, int(tail)
    return name, None


def resolve_layer_specs(
    requested: Any,
    available: Sequence[str],
    *,
    what: str = "model",
    calls: bool = False,
) -> dict[str, tuple[str, LayerSpec]]:
    """Resolve names, glob patterns or ``{name: settings}`` to layers and their settings.

    Parameters
    ----------
    requested : str, sequence of str, or mapping of str to settings
        Exact names or :mod:`fnmatch` patterns; a mapping gives per-layer settings
        (a mapping like ``{"reduce": "first"}``, a :class:`LayerSpec`, or ``{}``/``None``).
        Exact names win over patterns, and an exact name's settings over a pattern's. A
        layer several patterns match takes the settings of each (``{"*": {}, "conv*":
        {"reduce": "max"}}``); two patterns that set one of its settings differently are
        refused.
    available : sequence of str
        The layer names the framework reports, in model order.
    what : str
        How to call the model in messages.
    calls : bool, default False
        Accept ``"name:k"`` (call ``k`` of a shared module).

    Returns
    -------
    dict
        Recorded layer name -> (module/layer name, settings), in model order.

    Raises
    ------
    ValueError
        A name that matches nothing (with the closest names), or a bad setting.
    """
    if isinstance(requested, str):
        items: list[tuple[str, Any]] = [(requested, None)]
    elif isinstance(requested, Mapping):
        items = list(requested.items())
    else:
        items = [(r, None) for r in requested]
    if not items:
        raise RecordingError(f"no layers requested; the {what} has {len(available)} layers")
    avail = set(available)
    order = {name: i for i, name in enumerate(available)}
    chosen: dict[str, tuple[str, LayerSpec, bool]] = {}
    matched_by: dict[str, str] = {}  # the pattern that chose a layer
    unknown = []
    for pattern, value in items:
        if not isinstance(pattern, str):
            raise RecordingError(f"layer names must be strings, got {pattern!r}")
        spec = LayerSpec.from_value(pattern, value)
        base, call = _split_call(pattern, avail) if calls else (pattern, None)
        if call is not None:
            spec = replace(spec, call=call)
        if spec.call is not None and not calls:
            raise RecordingError(f"layer {pattern!r}: the {what} cannot record one call of a "
                             "shared layer (setting 'call')")
        if base in avail:
            name = base if spec.call is None else f"{base}:{spec.call}"
            chosen[name] = (base, spec, True)
            continue
        hits = fnmatch.filter(available, pattern)
        if not hits:
            unknown.append(pattern)
        for hit in hits:
            name = hit if spec.call is None else f"{hit}:{spec.call}"
            if name in chosen and chosen[name][2]:
                continue  # named exactly: its own settings win over any pattern's
            joined = spec
            if name in chosen:  # matched by an earlier pattern too: their settings join
                earlier = chosen[name][1]
                clash = [f.name for f in fields(LayerSpec)
                         if None not in (getattr(earlier, f.name), getattr(spec, f.name))
                         and getattr(earlier, f.name) != getattr(spec, f.name)]
                if clash:
                    raise RecordingError(
                        f"layer {name!r} matches the patterns {matched_by[name]!r} and "
                        f"{pattern!r}, which set its {clash} differently ({earlier} and "
                        f"{spec}); name it with its own settings, e.g. {{{name!r}: ...}}, or "
                        "make the patterns match apart")
                joined = replace(earlier, **{f.name: getattr(spec, f.name)
                                             for f in fields(LayerSpec)
                                             if getattr(spec, f.name) is not None})
            chosen[name] = (hit, joined, False)
            matched_by.setdefault(name, pattern)
    if unknown:
        raise RecordingError(did_you_mean(unknown, available, what=what))
    ordered = sorted(chosen, key=lambda n: (order[chosen[n][0]], n))
    return {name: chosen[name][:2] for name in ordered}


# --------------------------------------------------------------------------------------
# Token information carried by the inputs
# --------------------------------------------------------------------------------------
def _np(values: Any) -> np.ndarray:
    if hasattr(values, "detach"):
        values = values.detach().cpu()
    if hasattr(values, "numpy") and not isinstance(values, np.ndarray):
        values = values.numpy()
    return np.asarray(values)


#: The attention mask a layer's tokens follow by default: a tokenizer's.
DEFAULT_MASK = "attention_mask"


def token_info(x: Any, mask_key: str | None = DEFAULT_MASK
               ) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The attention mask and token ids of one batch of inputs, where they are known.

    A mapping input (tokenizer output) gives its ``mask_key`` entry and the token ids
    beside it: ``attention_mask`` with ``input_ids``, ``decoder_attention_mask`` with
    ``decoder_input_ids`` (any ``<prefix>attention_mask`` with ``<prefix>input_ids``).
    A 2-D integer array (or a tuple of positional inputs starting with one) is taken as
    the token ids themselves.

    Parameters
    ----------
    x : array_like, mapping or tuple
        One batch of a model's inputs.
    mask_key : str or None, default "attention_mask"
        The mask's key in a mapping input; None: no mask (the default token ids).

    Returns
    -------
    mask, token_ids : numpy.ndarray of shape (batch, T) or None
    """
    if isinstance(x, Mapping):
        mask = None if mask_key is None else x.get(mask_key)
        prefix = (mask_key[: -len(DEFAULT_MASK)]
                  if mask_key is not None and mask_key.endswith(DEFAULT_MASK) else "")
        ids = x.get(prefix + "input_ids")
        return (None if mask is None else _np(mask)), (None if ids is None else _np(ids))
    if isinstance(x, tuple | list) and x and not hasattr(x, "shape"):
        x = x[0]
    shape = getattr(x, "shape", None)
    dtype = getattr(x, "dtype", None)
    if shape is not None and len(shape) == 2 and dtype is not None:
        arr = _np(x)
        if arr.dtype.kind in "iu":
            return None, arr
    return None, None


def second_sequence(x: Any) -> list[str]:
    """The keys of a mapping input that belong to a second token sequence (an
    encoder-decoder model's ``decoder_input_ids``, ``decoder_attention_mask``...)."""
    return sorted(str(k) for k in x if str(k).startswith("decoder_")) if isinstance(
        x, Mapping) else []


# --------------------------------------------------------------------------------------
# Reduction
# --------------------------------------------------------------------------------------
@dataclass
class ReducedLayer:
    """One batch of one layer, ready for the writer.

    ``values`` is ``(rows, neurons)``, or ``(rows, C, *positions)`` for ``reduce="none"``
    (the writer flattens it and records the unit coordinates); ``source`` says which row
    of the batch each row comes from (``None``: row ``i`` is input ``i``).
    """

    values: np.ndarray
    source: np.ndarray | None = None
    token_position: np.ndarray | None = None
    token_id: np.ndarray | None = None


def _masked(mask: np.ndarray | None, n: int, t: int, layer: str) -> np.ndarray | None:
    if mask is None:
        return None
    mask = np.asarray(mask)
    if mask.shape != (n, t):
        raise RecordingError(
            f"layer {layer!r}: the attention mask has shape {mask.shape} but the layer's "
            f"output has {n} inputs x {t} tokens; record this layer with another reduce "
            "or without a mask"
        )
    return mask.astype(bool)


def _check_some_token(mask: np.ndarray, layer: str) -> None:
    if (mask.sum(axis=1) == 0).any():
        raise RecordingError(f"layer {layer!r}: an input has an all-zero attention mask")


def reduce_layer(
    array: np.ndarray,
    *,
    layer: str,
    neuron_axis: int,
    reduce: str,
    mask: np.ndarray | None = None,
    token_ids: np.ndarray | None = None,
) -> ReducedLayer:
    """Reduce one batch of a layer's output to one row of neurons per sample.

    Parameters
    ----------
    array : numpy.ndarray
        The layer's output ``(batch, ...)``.
    layer : str
        Layer name, for messages.
    neuron_axis : int
        Axis of the neurons (not 0).
    reduce : str
        One of :data:`REDUCE_CHOICES`.
    mask : numpy.ndarray, optional
        Attention mask ``(batch, T)`` (1 = real token); used by ``mean``, ``max``,
        ``first``, ``last`` and ``tokens`` on sequence outputs.
    token_ids : numpy.ndarray, optional
        Token ids ``(batch, T)``, for the ``token_id`` coordinate of ``tokens``.

    Returns
    -------
    ReducedLayer
        Its values are a view of ``array`` for ``(batch, neurons)`` outputs and
        ``reduce="none"``, fresh memory otherwise.

    Raises
    ------
    ValueError
        When the reduce mode cannot apply to this output (naming the layer).
    """
    array = np.asarray(array)
    if array.ndim < 2:
        raise RecordingError(f"layer {layer!r}: output of shape {array.shape} has no neuron axis")
    axis = _norm_axis(layer, neuron_axis, array.ndim)
    if reduce not in REDUCE_CHOICES:
        raise RecordingError(f"layer {layer!r}: unknown reduce {reduce!r}; "
                         f"choose one of {list(REDUCE_CHOICES)}")
    moved = np.moveaxis(array, axis, -1)  # (N, *rest, H)
    if array.ndim == 2:
        if reduce == "tokens":
            raise RecordingError(f"layer {layer!r}: reduce='tokens' needs a (batch, tokens, "
                             f"hidden) output, got shape {array.shape}")
        return ReducedLayer(moved)
    sequence = array.ndim == 3 and axis == 2
    if reduce in _SEQUENCE_ONLY and not sequence:
        raise RecordingError(
            f"layer {layer!r}: reduce={reduce!r} needs a (batch, tokens, hidden) output with "
            f"the neurons on the last axis; this one has shape {array.shape} with the "
            f"neurons on axis {axis}. Use reduce='mean', 'max' or 'none'"
        )
    n, t = array.shape[0], array.shape[1]
    m = _masked(mask, n, t, layer) if sequence else None
    if reduce == "none":
        return ReducedLayer(np.moveaxis(array, axis, 1))
    if reduce in ("mean", "max"):
        if m is None:
            # maps the adapter pooled as it captured them are copied (pool_positions),
            # although a view would give the same values: the background writer holds
            # them for many batches, and views kept the framework's small tensors alive
            # between its large ones, which split glibc's heap (a torch recording grew by
            # 33 MB per batch, tests/adapters/test_torch.py::
            # test_recording_memory_stays_flat_from_batch_to_batch)
            return ReducedLayer(pool_positions(array, axis, reduce))
        _check_some_token(m, layer)
        if reduce == "mean":
            # padded positions are left out, not weighted by 0 (an inf there would make
            # the mean NaN)
            vals = (np.where(m[:, :, None], moved, 0).sum(axis=1, dtype=np.float64)
                    / m.sum(axis=1, keepdims=True))
        else:
            vals = np.where(m[:, :, None], moved, -np.inf).max(axis=1)
        return ReducedLayer(np.asarray(vals, dtype=np.float32))
    if reduce == "first":
        if m is None:
            return ReducedLayer(np.ascontiguousarray(moved[:, 0, :]))
        # the first real token: with left padding, position 0 is padding
        _check_some_token(m, layer)
        return ReducedLayer(np.ascontiguousarray(moved[np.arange(n), np.argmax(m, axis=1), :]))
    if reduce == "last":
        if m is None:
            return ReducedLayer(np.ascontiguousarray(moved[:, -1, :]))
        _check_some_token(m, layer)
        last = t - 1 - np.argmax(m[:, ::-1], axis=1)
        return ReducedLayer(np.ascontiguousarray(moved[np.arange(n), last, :]))
    # tokens
    keep = np.ones((n, t), bool) if m is None else m
    rows, pos = np.nonzero(keep)
    tok = None
    if token_ids is not None:
        token_ids = np.asarray(token_ids)
        if token_ids.shape == (n, t):
            tok = token_ids[rows, pos].astype(np.int64)
    return ReducedLayer(np.ascontiguousarray(moved[rows, pos, :]), source=rows,
                        token_position=pos.astype(np.int64), token_id=tok)


def one_position(array: np.ndarray, neuron_axis: int, *, copy: bool = True
                 ) -> np.ndarray | None:
    """Maps of one position as float32 ``(batch, neurons)``, or None for larger maps.

    Every axis but the batch and the neurons of length 1 (e.g. maps an adapter pooled
    as it captured them): their mean and their max are the values themselves, to the
    bit, so they are copied rather than reduced (fresh memory). With ``copy=False`` a
    C-contiguous float32 input is returned as a view (the caller copies it itself).
    """
    n, width = array.shape[0], array.shape[neuron_axis]
    if array.size != n * width:
        return None
    if not copy:
        return np.ascontiguousarray(array.reshape(n, width), dtype=np.float32)
    return np.array(array.reshape(n, width), dtype=np.float32)


def pool_positions(array: np.ndarray, neuron_axis: int, reduce: str) -> np.ndarray:
    """Mean or max of every neuron over the other non-batch axes: ``(batch, neurons)``.

    Parameters
    ----------
    array : numpy.ndarray
        A layer's output ``(batch, ...)`` with at least 3 dims.
    neuron_axis : int
        Axis of the neurons (channels), not 0.
    reduce : {"mean", "max"}
        The reduction over positions.

    Returns
    -------
    numpy.ndarray
        float32 ``(batch, neurons)``: fresh memory, so the input may change afterwards.
    """
    array = np.asarray(array)
    axis = neuron_axis % array.ndim
    n = array.shape[0]
    one = one_position(array, axis)
    if one is not None:
        return one
    if axis == 1 and array.flags.c_contiguous:
        # channels first (torch's convention): every channel's positions are contiguous,
        # and numpy sums them pairwise (relative error ~1e-7 in float32), 3-4 times
        # faster than reducing the moved axes in float64
        flat = array.reshape(n, array.shape[1], -1)
        vals = flat.max(axis=2) if reduce == "max" else flat.mean(
            axis=2, dtype=np.float32 if array.dtype == np.float32 else np.float64)
        return np.array(vals, dtype=np.float32)
    moved = np.moveaxis(array, axis, -1)
    pos = tuple(range(1, array.ndim - 1))
    vals = moved.mean(axis=pos, dtype=np.float64) if reduce == "mean" else moved.max(axis=pos)
    return np.array(vals, dtype=np.float32)


def _norm_axis(layer: str, axis: int, ndim: int) -> int:
    if not -ndim <= axis < ndim or axis % ndim == 0:
        raise RecordingError(f"layer {layer!r}: channel_axis={axis} is not a non-batch axis of "
                         f"a {ndim}-D output")
    return axis % ndim


def reduction_attrs(
    shape: Sequence[int], *, neuron_axis: int, reduce: str, masked: bool, rule: str
) -> dict[str, Any]:
    """The layer attributes that say which axes of the output were reduced, and how.

    Parameters
    ----------
    shape : sequence of int
        Shape of one batch of the layer's output (batch axis included).
    neuron_axis : int
        Axis of the neurons.
    reduce : str
        Reduce mode.
    masked : bool
        Whether the attention mask was applied.
    rule : str
        How the neuron axis was chosen (``"conv channels"``, ``"last axis"``,
        ``"channel_axis set by the user"``, ...).

    Returns
    -------
    dict
        ``topoxr_neuron_axis``, ``topoxr_reduced_axes``, ``topoxr_output_shape``
        (without the batch axis), ``topoxr_masked``, ``topoxr_axis_rule``.
    """
    ndim = len(shape)
    axis = neuron_axis % ndim
    reduced = [] if reduce in ("none", "tokens") else [a for a in range(1, ndim) if a != axis]
    return {ATTR_NEURON_AXIS: int(axis), ATTR_REDUCED_AXES: reduced,
            ATTR_OUTPUT_SHAPE: [int(s) for s in shape[1:]], ATTR_MASKED: bool(masked),
            ATTR_AXIS_RULE: rule}


def describe_reduction(attrs: Mapping[str, Any]) -> str:
    """A short phrase for a layer's reduction, from its attributes (for messages).

    Parameters
    ----------
    attrs : mapping
        A stored layer's attributes (see :func:`reduction_attrs`).

    Returns
    -------
    str
        E.g. ``"reduce='mean' over axes [2, 3], neurons on axis 1 ..."``, or just
        ``"reduce='mean'"`` for a layer stored without its axes.
    """
    reduce = attrs.get(_ATTR_REDUCE, "mean")
    if ATTR_NEURON_AXIS not in attrs:
        return f"reduce={reduce!r}"
    axes = list(attrs.get(ATTR_REDUCED_AXES, []))
    masked = " masked by the attention mask" if attrs.get(ATTR_MASKED) else ""
    over = f" over axes {axes}" if axes and reduce in ("mean", "max") else ""
    return (f"reduce={reduce!r}{over}{masked}, neurons on axis {attrs[ATTR_NEURON_AXIS]} "
            f"of output shape {list(attrs.get(ATTR_OUTPUT_SHAPE, []))}")
