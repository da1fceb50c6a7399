"""Layer selection and the probe sub-model for Keras 3 models."""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from typing import Any

from topoxr._optional import import_optional
from topoxr.reduction import LayerSpec, resolve_layer_specs
from topoxr.recording import RecordingError

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
        (-1 for channels-last), the ``axis`` of a normalisation layer, else the last.
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
        final = model.outputs[0] if len(model.outputs) else None
        self.layers = layers
        self.specs = dict(specs or {})
        self.has_final = final is not None
        self.channel_axis, self.rules = {}, {}
        for name in layers:
            self.channel_axis[name], self.rules[name] = _axis_rule(model.get_layer(name))
        self._inputs, self._outputs = model.inputs, outputs
        self._final = [final] if final is not None else []
        self.submodel = keras.Model(model.inputs, [*outputs, *self._final],
                                    name=f"{model.name}_topoxr_probe")
        self.input_rank = len(model.inputs[0].shape)
        self.pool: dict[str, tuple[int, str]] = {}
        self._pooling: tuple[tuple[tuple[str, tuple[int, str]], ...], keras.Model] | None = None

    def __call__(self, x: Any) -> tuple[dict[str, Any], Any]:
        """Run one batch; return ``({layer: ndarray}, model output or None)``."""
        import numpy as np

        values = self._model().predict_on_batch(x)
        if not isinstance(values, list | tuple):
            values = [values]
        values = [np.asarray(keras.ops.convert_to_numpy(v)) for v in values]
        outputs = dict(zip(self.layers, values, strict=False))
        final = values[-1] if self.has_final else None
        return outputs, final

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


def _axis_rule(layer: Any) -> tuple[int, str]:
    """Neuron axis of a Keras layer's output and how it was chosen."""
    data_format = getattr(layer, "data_format", None)
    kind = type(layer).__name__
    if data_format in ("channels_first", "channels_last"):
        return (1 if data_format == "channels_first" else -1), f"data_format of {kind}"
    axis = getattr(layer, "axis", None)
    if isinstance(axis, int) and not isinstance(axis, bool) and "Normalization" in kind:
        return axis, f"axis of {kind}"
    if keras.config.image_data_format() == "channels_first" and len(layer.output.shape) > 3:
        return 1, f"keras image_data_format channels_first ({kind})"
    return -1, f"last axis of {kind} (channels-last / hidden units)"


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
