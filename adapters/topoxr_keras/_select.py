"""Layer selection and the probe sub-model for Keras 3 models."""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Mapping
from typing import Any

from topoxr._optional import import_optional
from topoxr.recording import RecordingError
from topoxr.reduction import LayerSpec, resolve_layer_specs

keras = import_optional("keras", extra="keras", purpose="topoxr_keras")

__all__ = ["ProbeModel", "layer_names", "probe_model"]

_CACHE: weakref.WeakKeyDictionary[Any, dict[tuple[Any, ...], ProbeModel]] = \
    weakref.WeakKeyDictionary()


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

    Built once per model and layer selection by :func:`probe_model`; it shares the
    model's weights, so it stays valid while the model trains.

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
        (-1 for channels-last), the ``axis`` of a normalisation layer, the last axis of
        Dense, Embedding, attention and RNN layers; a layer of none of these (an
        activation, ``Add``...) has that of the layer of known axis it follows in the
        graph; else the channel axis of keras's ``image_data_format``, unless the model
        has layers of the other ``data_format`` (then refused, see :func:`_axis_rule`).
    rules : dict of str to str
        How each axis was chosen.
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

    def __init__(self, model: keras.Model, layers: list[str],
                 output_keys: Mapping[str, Any],
                 specs: Mapping[str, LayerSpec] | None = None) -> None:
        if not model.built or not _has_inputs(model):
            raise RecordingError(
                f"keras model {model.name!r} has no defined inputs; build it with a "
                "keras.Input (Sequential([keras.Input(shape), ...]) or the functional API)"
            )
        outputs = [_layer_output(model.get_layer(name), output_keys.get(name))
                   for name in layers]
        # every output of the model: predict= gets them as the model returns them
        self._final = list(model.outputs)
        self._structure = model.output if len(self._final) > 1 else None
        self.layers = layers
        self.specs = dict(specs or {})
        self.has_final = bool(self._final)
        self.channel_axis, self.rules = {}, {}
        for name, output in zip(layers, outputs, strict=True):
            spec = self.specs.get(name)
            try:
                rule = _axis_rule(model.get_layer(name), output, name, model=model)
            except RecordingError:
                if spec is None or spec.channel_axis is None:
                    raise
                rule = int(spec.channel_axis), "channel_axis set by the user"
            self.channel_axis[name], self.rules[name] = rule
        self._inputs, self._outputs = model.inputs, outputs
        self.submodel = keras.Model(model.inputs, [*outputs, *self._final],
                                    name=f"{model.name}_topoxr_probe")
        self.input_rank = len(model.inputs[0].shape)
        self.pool: dict[str, tuple[int, str]] = {}
        self._pooling: tuple[tuple[tuple[str, tuple[int, str]], ...], keras.Model] | None = None

    def __call__(self, x: Any) -> tuple[dict[str, Any], Any]:
        """Run one batch; return ``({layer: ndarray}, model output or None)``.

        The model output is an array for a model with one output; for several, the
        outputs as the model returns them (a dict by name, or a list), as arrays.
        """
        import numpy as np

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
    ``units``), Embedding, attention or RNN layer; ``None`` for the others."""
    kind = type(op).__name__
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
    """Every layer of ``model``, those of nested models included."""
    for op in getattr(model, "layers", None) or []:
        yield op
        if isinstance(op, keras.Model):
            yield from _all_layers(op)


def _has_inputs(model: keras.Model) -> bool:
    try:
        return bool(model.inputs)
    except (AttributeError, ValueError):
        return False


def _layer_output(layer: Any, key: Any) -> Any:
    try:
        output = layer.output
    except (AttributeError, ValueError) as err:
        raise RecordingError(
            f"layer {layer.name!r} has no single output tensor to record ({err})"
        ) from None
    if key is not None:
        try:
            output = output[key]
        except (KeyError, IndexError, TypeError):
            raise RecordingError(
                f"layer {layer.name!r}: output key {key!r} not found in {_describe(output)}"
            ) from None
    if isinstance(output, Mapping | list | tuple) and key is None:
        raise RecordingError(
            f"layer {layer.name!r} returns {_describe(output)}, not a tensor; pick one with "
            f"output_keys={{{layer.name!r}: <key or index>}} or choose another layer"
        )
    if not keras.utils.is_keras_tensor(output):
        raise RecordingError(f"layer {layer.name!r} returns {_describe(output)}, not a tensor")
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

    The sub-model is built once per model and layer selection (and output keys) and
    reused, e.g. at every epoch of a training run.

    Parameters
    ----------
    model : keras.Model
        A built model with defined inputs (Sequential with a ``keras.Input``, or
        functional).
    layers : str, sequence of str, or mapping
        Layer names (as :func:`layer_names` lists them) or glob patterns, or
        ``{name or pattern: settings}`` with per-layer ``reduce``, ``channel_axis``,
        ``output_key``.
    output_keys : mapping of str to str or int, optional
        ``{layer: key}``: the entry to record of a layer whose output is a mapping (str)
        or a tuple or list (int). Every layer named must be recorded; a layer's
        ``output_key`` setting wins over its entry here.

    Returns
    -------
    ProbeModel
        The sub-model returning the chosen layers' outputs, in model order, and the
        model's output: the same object on every call that resolves to the same layers,
        settings and output keys of the same model (a new one each time for a model
        that cannot be weakly referenced).

    Raises
    ------
    TypeError
        If ``model`` is not a ``keras.Model``.
    RecordingError
        If no layer is requested; a name is not a string; a name or pattern matches no
        layer (the message lists the model's layers); a layer's settings are not a
        mapping or :class:`~topoxr.reduction.LayerSpec`, or hold an unknown key, an
        unknown ``reduce``, a non-integer ``channel_axis`` or a ``call`` (Keras records
        a layer's output, not one call of a shared layer); ``output_keys`` names a layer
        that is not recorded; the model has no defined inputs; or a layer's output is
        not a single tensor (a mapping, tuple or list without an output key, or a key
        it does not hold).
    """
    resolved = resolve_layer_specs(layers, layer_names(model), what=f"keras model {model.name!r}")
    names = list(resolved)
    specs = {name: spec for name, (_, spec) in resolved.items()}
    keys = dict(output_keys or {})
    keys.update({n: sp.output_key for n, sp in specs.items() if sp.output_key is not None})
    unknown = [k for k in keys if k not in names]
    if unknown:
        raise RecordingError(f"output_keys names {unknown}, which are not recorded layers {names}")
    cache_key = (tuple(names), tuple(sorted((k, repr(v)) for k, v in keys.items())),
                 tuple(sorted((k, repr(v)) for k, v in specs.items())))
    try:
        per_model = _CACHE.setdefault(model, {})
    except TypeError:  # not weak-referenceable: build without caching
        return ProbeModel(model, names, keys, specs)
    if cache_key not in per_model:
        per_model[cache_key] = ProbeModel(model, names, keys, specs)
    return per_model[cache_key]
