"""Keras 3 networks on scikit-learn's 8x8 digits, for tests, the demo and examples.

``mlp`` and ``cnn`` are small networks for fast tests; ``paper_mlp`` (one hidden layer of
128 ReLU units, dropout) and ``paper_cnn`` (two convolutions of 128 channels) are the
paper's networks.

Layer names and structure match :mod:`topoxr_torch.models`, and
:func:`copy_torch_weights_to_keras` copies a torch network's weights into its Keras twin,
so both frameworks compute the same function (the parity test). Both networks take flat
``(N, 64)`` inputs.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from topoxr._optional import import_optional
from topoxr.digits import DIGITS_LAYERS, load_digits_data

keras = import_optional("keras", extra="keras", purpose="topoxr_keras.models")

__all__ = [
    "RECORDED_LAYERS",
    "copy_torch_weights_to_keras",
    "load_digits_data",
    "make_model",
    "train",
    "train_and_record",
]


def _init(seed: int, i: int) -> Any:
    return keras.initializers.GlorotUniform(seed=seed * 1000 + i)


def make_model(
    kind: str,
    *,
    seed: int = 0,
    hidden: tuple[int, int] = (64, 32),
    channels: tuple[int, int] = (8, 16),
    width: int = 128,
    dropout: float = 0.2,
) -> keras.Model:
    """Build a digits network (Sequential or functional), with seeded initializers.

    ``mlp``: fc1 (hidden[0]) -> relu1 -> fc2 (hidden[1]) -> relu2 -> out (10).
    ``cnn``: reshape (8, 8, 1) -> conv1 (channels[0]) -> relu1 -> pool1 -> conv2 -> relu2 ->
    flatten -> fc1 (32) -> relu3 -> out (10); 3x3 convolutions, "same" padding.
    ``paper_mlp``: fc1 (width) -> relu1 -> drop1 (dropout) -> out (10).
    ``paper_cnn``: reshape -> conv1 (width) -> relu1 -> pool1 -> conv2 (width) -> relu2 ->
    pool2 -> flatten -> out (10).

    Parameters
    ----------
    kind : {"mlp", "cnn", "paper_mlp", "paper_cnn"}
        The architecture.
    seed : int, default 0
        Seed of the initializers.
    hidden : (int, int), default (64, 32)
        Widths of ``fc1`` and ``fc2`` of the MLP.
    channels : (int, int), default (8, 16)
        Channels of ``conv1`` and ``conv2`` of the CNN.
    width : int, default 128
        Hidden units (``paper_mlp``) or channels (``paper_cnn``) of the paper's networks.
    dropout : float, default 0.2
        Dropout rate of ``paper_mlp``.

    Returns
    -------
    keras.Model
        The untrained network.

    Raises
    ------
    ValueError
        For another ``kind``.
    """
    layers = keras.layers
    if kind == "mlp":
        return keras.Sequential([
            keras.Input((64,)),
            layers.Dense(hidden[0], name="fc1", kernel_initializer=_init(seed, 1)),
            layers.ReLU(name="relu1"),
            layers.Dense(hidden[1], name="fc2", kernel_initializer=_init(seed, 2)),
            layers.ReLU(name="relu2"),
            layers.Dense(10, name="out", kernel_initializer=_init(seed, 3)),
        ], name="digits_mlp")
    if kind == "cnn":
        inputs = keras.Input((64,))
        h = layers.Reshape((8, 8, 1), name="reshape")(inputs)
        h = layers.Conv2D(channels[0], 3, padding="same", name="conv1", data_format="channels_last",
                          kernel_initializer=_init(seed, 1))(h)
        h = layers.ReLU(name="relu1")(h)
        h = layers.MaxPooling2D(2, name="pool1", data_format="channels_last")(h)
        h = layers.Conv2D(channels[1], 3, padding="same", name="conv2", data_format="channels_last",
                          kernel_initializer=_init(seed, 2))(h)
        h = layers.ReLU(name="relu2")(h)
        h = layers.Flatten(name="flatten", data_format="channels_last")(h)
        h = layers.Dense(32, name="fc1", kernel_initializer=_init(seed, 3))(h)
        h = layers.ReLU(name="relu3")(h)
        outputs = layers.Dense(10, name="out", kernel_initializer=_init(seed, 4))(h)
        return keras.Model(inputs, outputs, name="digits_cnn")
    if kind == "paper_mlp":
        return keras.Sequential([
            keras.Input((64,)),
            layers.Dense(width, name="fc1", kernel_initializer=_init(seed, 1)),
            layers.ReLU(name="relu1"),
            layers.Dropout(dropout, name="drop1", seed=seed),
            layers.Dense(10, name="out", kernel_initializer=_init(seed, 2)),
        ], name="paper_mlp")
    if kind == "paper_cnn":
        inputs = keras.Input((64,))
        h = layers.Reshape((8, 8, 1), name="reshape")(inputs)
        for i in (1, 2):
            h = layers.Conv2D(width, 3, padding="same", name=f"conv{i}",
                              data_format="channels_last", kernel_initializer=_init(seed, i))(h)
            h = layers.ReLU(name=f"relu{i}")(h)
            h = layers.MaxPooling2D(2, name=f"pool{i}", data_format="channels_last")(h)
        h = layers.Flatten(name="flatten", data_format="channels_last")(h)
        outputs = layers.Dense(10, name="out", kernel_initializer=_init(seed, 3))(h)
        return keras.Model(inputs, outputs, name="paper_cnn")
    raise ValueError(f"unknown model kind {kind!r}; choose one of "
                     "['cnn', 'mlp', 'paper_cnn', 'paper_mlp']")


def train(
    model: keras.Model,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int = 3,
    lr: float = 1e-2,
    batch_size: int = 64,
    seed: int = 0,
    callbacks: list[Any] | None = None,
) -> dict[str, list[float]]:
    """Train with Adam and cross-entropy (``keras.utils.set_random_seed(seed)`` first).

    Returns
    -------
    dict
        ``history.history``: loss and accuracy per epoch.
    """
    keras.utils.set_random_seed(seed)
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=lr),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    history = model.fit(x, y, epochs=epochs, batch_size=batch_size, shuffle=True, verbose=0,
                        callbacks=callbacks or [])
    return dict(history.history)


def _numpy(tensor: Any) -> np.ndarray:
    """A torch parameter as numpy, without importing torch."""
    return np.asarray(tensor.detach().cpu().numpy())


def copy_torch_weights_to_keras(torch_model: Any, keras_model: keras.Model) -> None:
    """Copy the weights of a torch network into a Keras network with the same layer names.

    Dense kernels are transposed (torch stores ``(out, in)``), conv kernels go from
    OIHW to HWIO, and a dense layer fed by a ``Flatten`` of a conv map gets its input
    axis reordered from torch's (C, H, W) flatten order to Keras' (H, W, C).

    Parameters
    ----------
    torch_model : torch.nn.Module
        The source; modules are matched by ``named_modules()`` name.
    keras_model : keras.Model
        The target; every Keras layer with weights needs a torch module of its name.

    Raises
    ------
    ValueError
        A layer without a torch twin, or shapes that do not match.
    """
    modules = dict(torch_model.named_modules())
    for layer in keras_model.layers:
        if not layer.weights:
            continue
        if layer.name not in modules:
            raise ValueError(f"keras layer {layer.name!r} has no torch module of that name")
        module = modules[layer.name]
        weight = _numpy(module.weight)
        bias = _numpy(module.bias) if getattr(module, "bias", None) is not None else None
        if isinstance(layer, keras.layers.Conv2D):
            kernel = weight.transpose(2, 3, 1, 0)  # OIHW -> HWIO
        elif isinstance(layer, keras.layers.Dense):
            kernel = weight.T
            source = _input_layer(layer)
            if isinstance(source, keras.layers.Flatten):
                h, w, c = (int(d) for d in source.input.shape[1:])
                kernel = (weight.reshape(-1, c, h, w).transpose(0, 2, 3, 1)
                          .reshape(weight.shape[0], -1).T)
        else:
            raise ValueError(f"cannot copy weights into layer {layer.name!r} of "
                             f"type {type(layer).__name__}")
        new = [kernel] + ([bias] if bias is not None else [])
        expected = [tuple(v.shape) for v in layer.get_weights()]
        if [tuple(v.shape) for v in new] != expected:
            raise ValueError(f"layer {layer.name!r}: torch weights have shapes "
                             f"{[v.shape for v in new]}, keras expects {expected}")
        layer.set_weights(new)


def _input_layer(layer: Any) -> Any:
    """The layer whose output feeds ``layer`` (functional and Sequential models)."""
    try:
        return layer.input._keras_history[0]
    except (AttributeError, ValueError, IndexError):
        return None


#: Layers recorded by :func:`train_and_record` (every layer with its own neurons).
RECORDED_LAYERS = DIGITS_LAYERS


def train_and_record(
    kind: str,
    store: Any,
    *,
    epochs: int = 3,
    probe_size: int = 500,
    seed: int = 0,
    model_name: str | None = None,
    progress: bool = False,
) -> keras.Model:
    """Train a digits network with ``model.fit`` and record a held-out probe set.

    The same split and epochs as :func:`topoxr_torch.models.train_and_record`: the last
    ``probe_size`` digits are the probe set, recorded before training (epoch 0) and after
    every epoch by :class:`topoxr_keras.RecordActivations`, as ``<kind>_keras``.

    Returns
    -------
    keras.Model
        The trained network.
    """
    from topoxr_keras.recorder import RecordActivations

    x, y = load_digits_data()
    if not 0 < probe_size < len(x):
        raise ValueError(f"probe_size must be between 1 and {len(x) - 1}, got {probe_size}")
    split = len(x) - probe_size
    model = make_model(kind, seed=seed)
    callback = RecordActivations((x[split:], y[split:]), store,
                                 model_name=model_name or f"{kind}_keras",
                                 layers=RECORDED_LAYERS[kind],
                                 sample_ids=np.arange(split, len(x)), progress=progress)
    train(model, x[:split], y[:split], epochs=epochs, seed=seed, callbacks=[callback])
    return model
