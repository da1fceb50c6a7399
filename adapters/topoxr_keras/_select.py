"""Layer selection and the probe sub-model for Keras 3 models."""

from __future__ import annotations

import dataclasses
import itertools
import types
import weakref
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np

from topoxr._optional import import_optional
from topoxr.recording import (
    Batch,
    RecordingError,
    positional_mask_length,
    positional_mask_message,
    take_inputs,
)
from topoxr.reduction import (
    DEFAULT_MASK,
    MASKED_REDUCTIONS,
    LayerSpec,
    resolve_layer_specs,
    token_info,
)

keras = import_optional("keras", extra="keras", purpose="topoxr_keras")

__all__ = ["ProbeModel", "layer_names", "probe_model"]

#: Per model: the model's graph as the cached probes saw it (the ids of its input and
#: output tensors, which the probes hold, so they stay unique) and a probe per selection.
#: A model whose graph changed (``Sequential.pop()``/``add()`` rebuilds it) drops them.
_CACHE: weakref.WeakKeyDictionary[
    Any, tuple[tuple[Any, ...], dict[tuple[Any, ...], ProbeModel]]] = weakref.WeakKeyDictionary()

#: The key under which a batch whose token reductions follow a Keras mask holds the
#: model's inputs, beside the masks (see :meth:`ProbeModel.follow_masks`).
INPUTS_KEY = "topoxr_keras_inputs"


def layer_names(model: keras.Model) -> list[str]:
    """Return the names of the model's layers (``model.layers``), in model order.

    Parameters
    ----------
    model : keras.Model
        The model.

    Returns
    -------
    list of str
        The name of each layer of ``model.layers``: its top-level layers only (the
        layers inside a nested model are not listed; the nested model is, by its name).

    Raises
    ------
    TypeError
        If ``model`` is not a ``keras.Model``.
    """
    if not isinstance(model, keras.Model):
        raise TypeError(f"model must be a keras.Model, got {type(model).__name__}")
    return [layer.name for layer in model.layers]


class ProbeModel:
    """A sub-model returning the chosen layers' outputs and the model's output.

    Built once per model graph and layer selection by :func:`probe_model`; it shares
    the model's weights, so it stays valid while the model trains.

    Parameters
    ----------
    model : keras.Model
        The model, with defined inputs.
    chosen : mapping of str to (Layer, int, LayerSpec)
        ``{recorded name: (layer, node index, settings)}`` in model order: the node is
        the layer's call in ``model`` that is recorded (see :func:`probe_model`).
    output_keys : mapping of str to str or int
        ``{recorded name: key}`` of layers whose output is a tuple, list or mapping.

    Attributes
    ----------
    plans_from_one_sample : bool
        True: :func:`topoxr.recording.run_recording` plans the layers from the first
        sample alone (one call of the unpooled sub-model), then runs every batch, the
        first included, through the pooled one: no batch of whole maps is copied out.
    layers : list of str
        The recorded layers.
    specs : dict of str to LayerSpec
        Per-layer settings.
    channel_axis : dict of str to int
        Neuron axis of each layer's output: the channel axis of its ``data_format``
        (-1 for channels-last; that of the wrapped layer for ``TimeDistributed``, one
        axis further), the ``axis`` of a normalisation layer, the last axis of Dense,
        Embedding, attention and RNN layers (``Bidirectional`` included); a layer of
        none of these (an activation, ``Add``...) has that of the layer of known axis
        it follows in the graph; else the channel axis of keras's
        ``image_data_format``, unless the model has layers of the other
        ``data_format`` (then refused, see :func:`_axis_rule`).
    rules : dict of str to str
        How each axis was chosen.
    masks : dict of str to KerasTensor or None
        The Keras mask of each layer's output (``Embedding(mask_zero=True)``,
        ``Masking`` and the layers that pass their mask on), or None.
    submodel : keras.Model
        ``keras.Model(model.inputs, [layer outputs..., model output])``.
    pool : dict of str to (int, str)
        Layers pooled as they are captured, ``{layer: (neuron axis, "mean"|"max")}``,
        set by the recording loop after the first batch (as for the torch capture):
        a second sub-model computes their mean or max over every axis but the batch
        and the neuron axis inside the model's own graph (half precision accumulated
        in float32), so whole maps are never copied out; they come with every pooled
        axis of length 1 (``keepdims``), which the recording loop's own pooling then
        leaves as they are.
    """

    plans_from_one_sample = True

    def __init__(self, model: keras.Model, chosen: Mapping[str, tuple[Any, int, LayerSpec]],
                 output_keys: Mapping[str, Any]) -> None:
        _check_inputs(model)
        layers = list(chosen)
        outputs = [_layer_output(layer, output_keys.get(name), node, name)
                   for name, (layer, node, _) in chosen.items()]
        # every output of the model: predict= gets them as the model returns them
        self._final = list(model.outputs)
        self._structure = model.output if len(self._final) > 1 else None
        self.layers = layers
        self.specs = {name: spec for name, (_, _, spec) in chosen.items()}
        self.has_final = bool(self._final)
        self.channel_axis, self.rules = {}, {}
        for (name, (layer, _, spec)), output in zip(chosen.items(), outputs, strict=True):
            try:
                rule = _axis_rule(layer, output, name, model=model)
            except RecordingError:
                if spec.channel_axis is None:
                    raise
                rule = int(spec.channel_axis), "channel_axis set by the user"
            self.channel_axis[name], self.rules[name] = rule
        self.masks = {name: getattr(output, "_keras_mask", None)
                      for name, output in zip(layers, outputs, strict=True)}
        self._inputs, self._outputs = model.inputs, outputs
        self._ranks = _input_ranks(model)
        self.submodel = keras.Model(model.inputs, [*outputs, *self._final],
                                    name=f"{model.name}_topoxr_probe")
        self.pool: dict[str, tuple[int, str]] = {}
        self._pooling: tuple[tuple[tuple[str, tuple[int, str]], ...], keras.Model] | None = None
        self._mask_models: dict[tuple[int, ...], keras.Model] = {}

    def __call__(self, x: Any) -> tuple[dict[str, Any], Any]:
        """Run one batch; return ``({layer: ndarray}, model output or None)``.

        The model output is an array for a model with one output; for several, the
        outputs as the model returns them (a dict by name, or a list), as arrays. A
        batch from :meth:`follow_masks` is run on the inputs it holds.
        """
        if isinstance(x, Mapping) and INPUTS_KEY in x:
            x = x[INPUTS_KEY]
        values = self._model().predict_on_batch(x)
        if not isinstance(values, list | tuple):
            values = [values]
        values = [np.asarray(keras.ops.convert_to_numpy(v)) for v in values]
        outputs = dict(zip(self.layers, values, strict=False))
        finals = values[len(self.layers):]
        if not self.has_final:
            return outputs, None
        if self._structure is None:
            return outputs, finals[0]
        return outputs, keras.tree.pack_sequence_as(self._structure, finals)

    def input_rank(self, key: str | int | None = None) -> int:
        """Rank (batch axis included) of the model input of name or position ``key``
        (the first input for None or a key the model does not know)."""
        return self._ranks.get(key, self._ranks[0]) if key is not None else self._ranks[0]

    def follow_masks(self, batches: Iterable[Batch], reduce: str
                     ) -> tuple[Iterable[Batch], dict[str, LayerSpec]]:
        """``batches`` and the layer settings to record them with, the Keras masks of
        the layers' outputs their attention masks.

        A sequence output ``(N, T, H)`` (its neurons on the last axis) reduced by
        ``mean``, ``max``, ``first``, ``last`` or ``tokens`` leaves out the padding
        steps its Keras mask marks (``Embedding(mask_zero=True)``, ``Masking``, and the
        layers that pass the mask on: RNNs with ``return_sequences``, Dense...), as the
        model's own ``GlobalAveragePooling1D`` does. For such layers each batch also
        runs a sub-model of the model's inputs and their masks (built once; it runs
        only the ops the masks depend on) and becomes a mapping: the inputs under
        :data:`INPUTS_KEY` (which :meth:`__call__` runs), the entries of mapping inputs
        as they are, and per mask ``keras_mask<i>_attention_mask`` with the token ids
        as ``keras_mask<i>_input_ids`` (where the inputs are token ids); each such
        layer's ``mask`` setting names its mask (:class:`~topoxr.reduction.LayerSpec`),
        so the recording loop applies it to that layer alone. A layer whose ``mask``
        setting is given keeps it.

        Positional inputs whose second looks like an attention mask of the first (see
        :func:`topoxr.recording.positional_mask_length`) are refused, before anything is
        written, for the token reductions of the layers that follow no Keras mask: a
        positional input is not known as the attention mask, so their padding would be
        reduced with the real tokens (:meth:`_refuse_positional_mask`).

        Parameters
        ----------
        batches : iterable of Batch
            The probe set's batches.
        reduce : str
            The recording's default reduce mode (a layer's own ``reduce`` wins).

        Returns
        -------
        batches : iterable of Batch
            ``batches`` themselves where no reduction follows a Keras mask.
        specs : dict of str to LayerSpec
            :attr:`specs`, with the ``mask`` of the layers that follow a Keras mask.

        Raises
        ------
        RecordingError
            Where the first batch's positional inputs look like token ids and their
            attention mask, and a layer that follows no Keras mask reduces its tokens.
        """
        follow = [name for name in self.layers
                  if self.masks[name] is not None and self._follows_mask(name, reduce)]
        batches = self._refuse_positional_mask(batches, reduce, follow)
        if not follow:
            if len(self.submodel.inputs) > 1:
                return _without_token_ids(batches), dict(self.specs)
            return batches, dict(self.specs)
        tensors = list({id(self.masks[n]): self.masks[n] for n in follow}.values())
        prefixes = {id(t): f"keras_mask{i}_" for i, t in enumerate(tensors)}
        specs = dict(self.specs)
        for name in follow:
            mask_key = prefixes[id(self.masks[name])] + DEFAULT_MASK
            specs[name] = dataclasses.replace(specs.get(name) or LayerSpec(), mask=mask_key)
        key = tuple(prefixes)
        if key not in self._mask_models:
            self._mask_models[key] = keras.Model(self._inputs, tensors,
                                                 name=f"{self.submodel.name}_masks")
        return _with_masks(batches, self._mask_models[key], list(prefixes.values())), specs

    def _follows_mask(self, name: str, reduce: str) -> bool:
        """Whether the recording loop's reduction of ``name`` follows a mask: of a
        ``(N, T, H)`` output, neurons on its last axis, over its steps; not where the
        layer's ``mask`` setting is given (its own key, or False)."""
        spec = self.specs.get(name) or LayerSpec()
        return spec.mask is None and self._reduces_tokens(name, reduce)

    def _reduces_tokens(self, name: str, reduce: str) -> bool:
        """Whether ``name``'s output is ``(N, T, H)``, neurons on its last axis, reduced
        over its steps by a mode that follows an attention mask."""
        spec = self.specs.get(name) or LayerSpec()
        output = self._outputs[self.layers.index(name)]
        if len(output.shape) != 3:
            return False
        axis = self.channel_axis[name] if spec.channel_axis is None else spec.channel_axis
        return int(axis) % 3 == 2 and (spec.reduce or reduce) in MASKED_REDUCTIONS

    def _refuse_positional_mask(self, batches: Iterable[Batch], reduce: str,
                                follow: list[str]) -> Iterable[Batch]:
        """``batches`` (the first one read, then put back), refused where the first
        batch's positional inputs look like token ids and their attention mask
        (:func:`topoxr.recording.positional_mask_length`) and a layer that follows no
        Keras mask (not in ``follow``) reduces its ``(N, T, H)`` output, ``T`` the ids'
        length, over its tokens: the recording loop knows an attention mask only as
        the ``attention_mask`` entry of a mapping, so its padding would be reduced with
        the real tokens, and ``topoxr_masked`` false is easily missed in the store. A
        layer whose ``mask`` setting is False, or that is recorded with ``reduce="none"``,
        is not refused.

        The first batch is read before anything is written (``run_recording`` reads it
        again); where no sequence length is known from the graph (``keras.Input((None,))``)
        the probe runs on the batch's first sample for the layers' lengths.
        """
        if len(self._inputs) < 2:
            return batches
        candidates = [name for name in self.layers if name not in follow
                      and (self.specs.get(name) or LayerSpec()).mask is not False
                      and self._reduces_tokens(name, reduce)]
        if not candidates:
            return batches
        iterator = iter(batches)
        first = next(iterator, None)
        if first is None:  # no samples: the recording loop says so
            return iterator
        batches = itertools.chain([first], iterator)
        x = first.x
        length = positional_mask_length(x, _host_array)
        if length is None:
            return batches
        lengths = {name: self._outputs[self.layers.index(name)].shape[1]
                   for name in candidates}
        if any(t is None for t in lengths.values()):
            values = self.submodel.predict_on_batch(take_inputs(x, slice(0, 1)))
            values = values if isinstance(values, list | tuple) else [values]
            lengths = {name: np.shape(values[self.layers.index(name)])[1]
                       for name in candidates}
        for name in candidates:
            if lengths[name] is not None and int(lengths[name]) == length:
                spec = self.specs.get(name) or LayerSpec()
                raise RecordingError(positional_mask_message(
                    name, spec.reduce or reduce, length,
                    mapping=self._mapping_hint(name), not_a_mask=""))
        return batches

    def _mapping_hint(self, name: str) -> str:
        """How a mapping of inputs reaches this Keras model, and how its attention mask
        is known, for the refusal of :meth:`_refuse_positional_mask`."""
        names = [str(getattr(t, "name", i)) for i, t in enumerate(self._inputs)]
        return (
            f"a mapping is matched to the model's inputs by their names, here {names}: "
            "name them so, keras.Input(..., name='input_ids') and keras.Input(..., "
            "name='attention_mask'), and the attention_mask masks the token reductions; "
            "or key the mapping by the names the inputs have and name the mask's key, "
            f"{{{name!r}: {{'mask': {names[1]!r}}}}}")

    def _model(self) -> keras.Model:
        """The sub-model for the layers pooled now (built once per ``pool`` setting)."""
        if not self.pool:
            return self.submodel
        key = tuple(sorted(self.pool.items()))
        if self._pooling is None or self._pooling[0] != key:
            outputs = [_pooled(out, *self.pool[name]) if name in self.pool else out
                       for name, out in zip(self.layers, self._outputs, strict=True)]
            self._pooling = key, keras.Model(self._inputs, [*outputs, *self._final],
                                             name=f"{self.submodel.name}_pooled")
        return self._pooling[1]


def _with_masks(batches: Iterable[Batch], masks: keras.Model,
                prefixes: list[str]) -> Iterator[Batch]:
    """Each batch as a mapping holding its inputs and the Keras masks ``masks``
    computes, under ``prefixes`` (see :meth:`ProbeModel.follow_masks`).

    The token ids of the inputs (:func:`~topoxr.reduction.token_info`) stay under
    ``input_ids`` for the layers that follow no Keras mask, as they were before the
    batch became a mapping. A mask gets them as its own only where the model has one
    input: with several, which input a mask comes from is not known, and the ids of
    another input would be stored as its tokens' ``token_id``.
    """
    single = len(masks.inputs) == 1
    for batch in batches:
        values = masks.predict_on_batch(batch.x)
        if not isinstance(values, list | tuple):
            values = [values]
        _, token_ids = token_info(batch.x)
        x = dict(batch.x) if isinstance(batch.x, Mapping) else {}
        if not isinstance(batch.x, Mapping) and token_ids is not None and single:
            x["input_ids"] = token_ids
        x[INPUTS_KEY] = batch.x
        for prefix, value in zip(prefixes, values, strict=True):
            x[prefix + DEFAULT_MASK] = np.asarray(keras.ops.convert_to_numpy(value)).astype(bool)
            if token_ids is not None and single:
                x[prefix + "input_ids"] = token_ids
        yield dataclasses.replace(batch, x=x)


def _without_token_ids(batches: Iterable[Batch]) -> Iterator[Batch]:
    """The batches of a model of several positional inputs, whose token ids are not
    known: each as a mapping holding its inputs under :data:`INPUTS_KEY` (which
    :meth:`ProbeModel.__call__` runs), so that no input is taken for the token ids of
    every layer (the first one was, whichever input a layer's tokens come from)."""
    for batch in batches:
        yield (batch if isinstance(batch.x, Mapping)
               else dataclasses.replace(batch, x={INPUTS_KEY: batch.x}))


def _host_array(value: Any) -> np.ndarray | None:
    """``value`` as a numpy array (a tensor of any backend), or None where it is none."""
    if isinstance(value, np.ndarray):
        return value
    if not hasattr(value, "shape") or not hasattr(value, "dtype"):
        return None
    try:
        return np.asarray(keras.ops.convert_to_numpy(value))
    except Exception:  # noqa: BLE001 - a ragged or sparse tensor: no ids or mask
        return None


def _input_ranks(model: keras.Model) -> dict[str | int, int]:
    """Rank of each model input, by position, by name and by key of a dict of inputs."""
    ranks: dict[str | int, int] = {}
    for i, tensor in enumerate(model.inputs):
        ranks[i] = len(tensor.shape)
        ranks.setdefault(str(getattr(tensor, "name", i)), len(tensor.shape))
    struct = getattr(model, "_inputs_struct", None)
    if isinstance(struct, Mapping):
        ranks.update({str(k): len(t.shape) for k, t in struct.items()
                      if hasattr(t, "shape")})
    return ranks


def _pooled(output: Any, neuron_axis: int, reduce: str) -> Any:
    """``output``'s mean or max over every axis but the batch and the neuron axis, those
    axes kept with length 1 (a symbolic op of the probe's graph; half precision is
    accumulated in float32)."""
    rank = len(output.shape)
    axis = neuron_axis % rank
    dims = tuple(d for d in range(1, rank) if d != axis)
    if reduce == "max":
        return keras.ops.cast(keras.ops.max(output, axis=dims, keepdims=True), "float32")
    if str(output.dtype) not in ("float64", "float32"):
        output = keras.ops.cast(output, "float32")
    return keras.ops.mean(output, axis=dims, keepdims=True)


#: Layers and ops that move axes: what follows them does not keep the neuron axis of
#: what ran before them, even where the shape is the same (a square map transposed).
_MOVES_AXES = frozenset({"Permute", "Reshape", "Transpose", "Swapaxes", "Moveaxis",
                         "Flatten", "RepeatVector", "Squeeze", "ExpandDims"})
#: How many layers or ops a layer of no axis semantics is followed back through.
_MAX_FOLLOW = 200


class _Disagree(Exception):
    """The inputs of a merging layer or op have different neuron axes."""

    def __init__(self, where: str, axes: dict[int, str]) -> None:
        super().__init__(where)
        self.where, self.axes = where, axes


def _own_rule(op: Any, output: Any) -> tuple[int, str] | None:
    """The neuron axis of ``output`` as the layer or op ``op`` that made it decides it:
    its ``data_format``, a normalisation's ``axis``, the last axis of a Dense (of its
    ``units``), Embedding, attention, RNN or ``Bidirectional`` layer; that of the layer
    a ``TimeDistributed`` wraps, one axis further; ``None`` for the others."""
    kind = type(op).__name__
    if isinstance(op, keras.layers.TimeDistributed):
        # the wrapped layer's rule on one step's output, one axis further (the time axis)
        inner = _own_rule(op.layer, types.SimpleNamespace(
            shape=(output.shape[0], *output.shape[2:])))
        if inner is None:
            return None
        axis, how = inner
        return (axis + 1 if axis >= 0 else axis), f"{how} inside {kind}"
    if isinstance(op, keras.layers.Bidirectional):
        return -1, f"last axis of {kind} (hidden units)"
    data_format = getattr(op, "data_format", None)
    if data_format in ("channels_first", "channels_last"):
        return (1 if data_format == "channels_first" else -1), f"data_format of {kind}"
    axis = getattr(op, "axis", None)
    if isinstance(axis, int) and not isinstance(axis, bool) and "Normalization" in kind:
        return axis, f"axis of {kind}"
    units = getattr(op, "units", None) if isinstance(op, keras.layers.Dense) else None
    if units is not None and output.shape[-1] == units:
        return -1, f"last axis of {kind} (units)"
    if isinstance(op, keras.layers.Embedding | keras.layers.MultiHeadAttention
                  | keras.layers.RNN):
        return -1, f"last axis of {kind} (hidden units)"
    return None


def _source(tensor: Any, memo: dict[int, Any], depth: int = 0) -> tuple[int, str] | None:
    """``(neuron axis, how)`` of a symbolic tensor of the functional graph, as the layer
    that made it decides it, or one it follows: through layers and ops that keep its
    shape (activations, dropout, ``Add``, ``Concatenate``...), back to one of known axis.

    Raises
    ------
    _Disagree
        Where the inputs of a merging layer or op have different neuron axes.
    """
    key = id(tensor)
    if key in memo:
        return memo[key]
    history = getattr(tensor, "_keras_history", None)
    if history is None or depth > _MAX_FOLLOW or tensor.shape is None:
        return None
    op, node_index, tensor_index = history[0], history[1], history[2]
    rank = len(tensor.shape)
    found: tuple[int, str] | None = None
    own = _own_rule(op, tensor)
    if own is not None:
        found = own[0] % rank, f"{op.name!r} ({own[1]})"
    elif type(op).__name__ in _MOVES_AXES:
        found = None
    elif isinstance(op, keras.Model):
        # a nested model: as the layer inside it that made its output
        inner = getattr(op, "outputs", None) or []
        if tensor_index < len(inner) and tuple(inner[tensor_index].shape) == tuple(tensor.shape):
            found = _source(inner[tensor_index], memo, depth + 1)
    else:
        nodes = getattr(op, "_inbound_nodes", None) or []
        if node_index < len(nodes):
            found = _merge(op, tensor, nodes[node_index].input_tensors, memo, depth)
    memo[key] = found
    return found


def _merge(op: Any, tensor: Any, inputs: Any, memo: dict[int, Any],
           depth: int) -> tuple[int, str] | None:
    """The neuron axis of ``tensor``, made by ``op`` (of no axis semantics) from
    ``inputs``, as those of its inputs of its shape have it (they must agree); a
    ``Concatenate`` may change the size of its axis."""
    shape = tuple(tensor.shape)
    rank = len(shape)
    along = getattr(op, "axis", None) if isinstance(op, keras.layers.Concatenate) else None
    along = along % rank if isinstance(along, int) else None
    axes: dict[int, str] = {}
    for x in inputs:
        xs = tuple(getattr(x, "shape", None) or ())
        if len(xs) != rank or any(a != b for i, (a, b) in enumerate(zip(xs, shape, strict=True))
                                  if i not in (0, along)):
            continue  # another shape (a broadcast gate): not what the output holds
        found = _source(x, memo, depth + 1)
        if found is not None:
            axes.setdefault(found[0], found[1])
    if len(axes) > 1:
        raise _Disagree(f"{op.name!r} ({type(op).__name__})", axes)
    return next(iter(axes.items()), None)


def _axis_rule(layer: Any, output: Any = None, name: str | None = None, *,
               model: Any = None) -> tuple[int, str]:
    """Neuron axis of a Keras layer's output and how it was chosen.

    By the layer's own semantics (``data_format``, a normalisation's ``axis``, Dense,
    Embedding, attention and RNN layers: the last axis); else, for a layer of none
    (activations, dropout, ``Add``, ``Concatenate``...), as the layer of known axis it
    follows in the functional graph through layers and ops that keep the output's shape
    (all inputs that do must agree); else by keras's ``image_data_format``. That last
    guess is refused for an output of three or more axes where ``model`` (when given)
    has layers of the other ``data_format``: following the graph stopped at a layer or
    op that changes the shape (a ``Lambda`` cropping a channels-first map, say), and
    what comes after it may hold the channels on either axis.

    Parameters
    ----------
    layer : keras.layers.Layer
        The layer.
    output : KerasTensor, optional
        The output recorded (``layer.output`` by default).
    name : str, optional
        The layer's name in messages (``layer.name`` by default).

    model : keras.Model, optional
        The model the layer belongs to, for the check of the last guess.

    Raises
    ------
    RecordingError
        Where inputs followed disagree (say, a channels-first conv added to a Dense
        output), or where the guess by ``image_data_format`` is refused (see above);
        the message names the layer and the ``channel_axis`` setting.
    """
    output = layer.output if output is None else output
    kind = type(layer).__name__
    own = _own_rule(layer, output)
    if own is not None:
        return own
    try:
        found = _source(output, {})
    except _Disagree as err:
        name = layer.name if name is None else name
        what = ", ".join(f"axis {axis} as {how}" for axis, how in err.axes.items())
        at = "" if err.where.startswith(f"{layer.name!r} ") else f" (at {err.where})"
        raise RecordingError(
            f"layer {name!r} ({kind}) follows inputs whose neuron axes disagree{at}: "
            f"{what}; set its neuron axis with {{{name!r}: {{'channel_axis': k}}}}"
        ) from None
    if found is not None:
        return found[0], f"as {found[1]}, which it follows"
    rank = len(output.shape)
    first = keras.config.image_data_format() == "channels_first" and rank > 3
    if rank >= 3 and model is not None:
        other = "channels_last" if first else "channels_first"
        against = [f"{op.name!r} ({type(op).__name__})" for op in _all_layers(model)
                   if getattr(op, "data_format", None) == other]
        if against:
            name = layer.name if name is None else name
            shown = ", ".join(against[:3]) + (f" and {len(against) - 3} more"
                                               if len(against) > 3 else "")
            raise RecordingError(
                f"layer {name!r} ({kind}) has no neuron axis of its own and cannot be "
                "followed back to a layer that has one (a layer or op before it changes "
                f"the shape or moves axes); keras's image_data_format "
                f"({keras.config.image_data_format()}) would put the neurons on axis "
                f"{1 if first else -1}, but the model also has {other} layers ({shown}); "
                f"set its neuron axis with {{{name!r}: {{'channel_axis': k}}}}"
            )
    if first:
        return 1, f"keras image_data_format channels_first ({kind})"
    return -1, f"last axis of {kind} (channels-last / hidden units)"


def _all_layers(model: Any) -> Iterator[Any]:
    """Every layer of ``model``, those of nested models and wrappers included."""
    for op in getattr(model, "layers", None) or []:
        yield from _with_inner(op)


def _with_inner(op: Any) -> Iterator[Any]:
    """``op``, and the layers inside it: of a nested model, of a wrapper
    (``TimeDistributed``, ``Bidirectional``)."""
    yield op
    if isinstance(op, keras.Model):
        yield from _all_layers(op)
    for name in ("layer", "forward_layer", "backward_layer"):
        inner = getattr(op, name, None)
        if isinstance(inner, keras.layers.Layer) and inner is not op:
            yield from _with_inner(inner)


def _check_inputs(model: keras.Model) -> None:
    try:
        defined = model.built and bool(model.inputs)
    except (AttributeError, ValueError):
        defined = False
    if not defined:
        raise RecordingError(
            f"keras model {model.name!r} has no defined inputs; build it with a "
            "keras.Input (Sequential([keras.Input(shape), ...]) or the functional API)"
        )


def _model_calls(model: keras.Model) -> dict[int, list[int]]:
    """``{id(layer): [node index, ...]}``: the calls of each layer in ``model``'s graph.

    A layer's ``_inbound_nodes`` hold every call it was ever given: those of another
    model that uses it too, and those of a ``Sequential`` built again after ``pop()``
    or ``add()``. The calls of ``model`` are the nodes met going from its outputs back
    to its inputs; their indices are in the order the calls were made.
    """
    inputs = {id(t) for t in model.inputs}
    calls: dict[int, set[int]] = {}
    todo, seen = list(model.outputs), set()
    while todo:
        tensor = todo.pop()
        history = getattr(tensor, "_keras_history", None)
        if history is None:
            continue
        op, node_index = history[0], history[1]
        if (id(op), node_index) in seen:
            continue
        seen.add((id(op), node_index))
        calls.setdefault(id(op), set()).add(node_index)
        nodes = getattr(op, "_inbound_nodes", None) or []
        if id(tensor) not in inputs and node_index < len(nodes):
            todo.extend(nodes[node_index].input_tensors)
    return {k: sorted(v) for k, v in calls.items()}


def _times(n: int) -> str:
    return "once" if n == 1 else f"{n} times"


def _pick_call(layer: Any, name: str, calls: list[int], call: int | None,
               model: keras.Model) -> int:
    """The node index of the call of ``layer`` recorded as ``name`` (see
    :func:`probe_model`)."""
    numbered = ("calls are numbered from 0 in the order the model was built, e.g. "
                "shared(a) before shared(b)")
    if not calls:
        raise RecordingError(
            f"layer {name!r} is not called in keras model {model.name!r} (not on a path "
            "from its inputs to its outputs)")
    if call is None:
        if len(calls) > 1:
            raise RecordingError(
                f"layer {layer.name!r} is called {_times(len(calls))} in keras model "
                f"{model.name!r} (a shared layer), and each call has its own output: record "
                f"each call as its own layer, e.g. '{layer.name}:0' and '{layer.name}:1', "
                f"or pick one with {{'{layer.name}': {{'call': 1}}}} ({numbered})")
        return calls[0]
    if call >= len(calls):
        raise RecordingError(
            f"layer {name!r}: layer {layer.name!r} is called {_times(len(calls))} in keras "
            f"model {model.name!r}, so it has no call {call} ({numbered})")
    return calls[call]


def _layer_output(layer: Any, key: Any, node: int = 0, name: str | None = None) -> Any:
    """The output of call ``node`` of ``layer`` (its entry ``key``), refused where it
    is not one tensor; ``name`` is the recorded name, for messages."""
    name = layer.name if name is None else name
    try:
        values = layer._inbound_nodes[node].output_tensors
    except (AttributeError, IndexError) as err:
        raise RecordingError(
            f"layer {name!r} has no single output tensor to record ({err})"
        ) from None
    output = values[0] if isinstance(values, list) and len(values) == 1 else values
    if key is not None:
        try:
            output = output[key]
        except (KeyError, IndexError, TypeError):
            raise RecordingError(
                f"layer {name!r}: output key {key!r} not found in {_describe(output)}"
            ) from None
    if isinstance(output, Mapping | list | tuple) and key is None:
        raise RecordingError(
            f"layer {name!r} returns {_describe(output)}, not a tensor; pick one with "
            f"output_keys={{{name!r}: <key or index>}} or choose another layer"
        )
    if not keras.utils.is_keras_tensor(output):
        raise RecordingError(f"layer {name!r} returns {_describe(output)}, not a tensor")
    return output


def _describe(output: Any) -> str:
    if isinstance(output, Mapping):
        return f"a {type(output).__name__} with keys {list(output)}"
    if isinstance(output, list | tuple):
        return f"a {type(output).__name__} of {len(output)} outputs"
    return f"a {type(output).__name__}"


def probe_model(
    model: keras.Model, layers: Any, *, output_keys: Mapping[str, Any] | None = None
) -> ProbeModel:
    """Resolve ``layers`` (names or globs) and return the cached probe sub-model.

    The sub-model is built once per model graph and layer selection (and output keys)
    and reused, e.g. at every epoch of a training run. A model whose graph changed
    since (``Sequential.pop()`` or ``add()``) gets a new one.

    Parameters
    ----------
    model : keras.Model
        A built model with defined inputs (Sequential with a ``keras.Input``, or
        functional).
    layers : str, sequence of str, or mapping
        Layer names (as :func:`layer_names` lists them) or glob patterns, or
        ``{name or pattern: settings}`` with per-layer ``reduce``, ``channel_axis``,
        ``call``, ``output_key``. A layer called more than once in the model (a shared
        layer: one ``Dense`` applied to two inputs, a siamese encoder, a layer applied
        to its own output) has one output per call: record call ``k`` as
        ``"name:k"`` (or ``{"name": {"call": k}}``), calls numbered from 0 in the
        order the model was built. The calls of another model that uses the same
        layer are not counted.
    output_keys : mapping of str to str or int, optional
        ``{layer: key}``: the entry to record of a layer whose output is a mapping (str)
        or a tuple or list (int). Every layer named must be recorded (by its recorded
        name, ``"name:k"``, or the layer's name); a layer's ``output_key`` setting wins
        over its entry here.

    Returns
    -------
    ProbeModel
        The sub-model returning the chosen layers' outputs, in model order, and the
        model's output: the same object on every call that resolves to the same layers,
        settings and output keys of the same model graph (a new one each time for a
        model that cannot be weakly referenced).

    Raises
    ------
    TypeError
        If ``model`` is not a ``keras.Model``.
    RecordingError
        If no layer is requested; a name is not a string; a name or pattern matches no
        layer (the message lists the model's layers); a layer's settings are not a
        mapping or :class:`~topoxr.reduction.LayerSpec`, or hold an unknown key, an
        unknown ``reduce``, or a ``channel_axis`` or ``call`` that is not an integer;
        a layer called more than once in the model is named without a call, or with a
        call it does not have (the message says how often it is called);
        ``output_keys`` names a layer that is not recorded; the model has no defined
        inputs; or a layer's output is not a single tensor (a mapping, tuple or list
        without an output key, or a key it does not hold).
    """
    resolved = resolve_layer_specs(layers, layer_names(model), what=f"keras model {model.name!r}",
                                   calls=True)
    names = list(resolved)
    bases = {base for base, _ in resolved.values()}
    specs = {name: spec for name, (_, spec) in resolved.items()}
    given = dict(output_keys or {})
    unknown = [k for k in given if k not in names and k not in bases]
    if unknown:
        raise RecordingError(f"output_keys names {unknown}, which are not recorded layers {names}")
    keys = {name: given[name] if name in given else given[base]
            for name, (base, _) in resolved.items() if name in given or base in given}
    keys.update({n: sp.output_key for n, sp in specs.items() if sp.output_key is not None})
    _check_inputs(model)
    calls = _model_calls(model)
    chosen = {}
    for name, (base, spec) in resolved.items():
        layer = model.get_layer(base)
        chosen[name] = (layer, _pick_call(layer, name, calls.get(id(layer), []), spec.call,
                                          model), spec)
    # what the probe is built from: the model's graph (its input and output tensors: a
    # Sequential built again after pop() or add() has new ones) and the recorded calls
    graph = (tuple(map(id, model.inputs)), tuple(map(id, model.outputs)))
    cache_key = (tuple((name, id(layer), node) for name, (layer, node, _) in chosen.items()),
                 tuple(sorted((k, repr(v)) for k, v in keys.items())),
                 tuple(sorted((k, repr(v)) for k, v in specs.items())))
    try:
        held, per_model = _CACHE.get(model, (None, {}))
    except TypeError:  # not weak-referenceable: build without caching
        return ProbeModel(model, chosen, keys)
    if held != graph:
        per_model = {}  # the probes of the model's former graph are dropped
        _CACHE[model] = graph, per_model
    if cache_key not in per_model:
        per_model[cache_key] = ProbeModel(model, chosen, keys)
    return per_model[cache_key]
