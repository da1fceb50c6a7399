"""Which axis of a Keras layer's output holds the neurons: layers without axis semantics
of their own (activations, ``Add``, ``Concatenate``...) follow the layer they come from.

Every test records a real model into a store, reads it back with ``open_store`` and
compares the stored values with a reduction of the layer's output computed here from a
plain ``keras.Model(inputs, layer.output)``.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

keras = pytest.importorskip("keras")

import topoxr_keras

from topoxr.recording import RecordingError
from topoxr.testing.adapters import stored_layer

pytestmark = pytest.mark.skipif(keras.backend.backend() != "tensorflow",
                                reason="these tests run Keras on the TensorFlow backend")

L = keras.layers
RTOL = ATOL = 1e-5


def direct(model, name, x):
    """The layer's output on ``x``, from a plain sub-model."""
    return np.asarray(keras.Model(model.inputs, model.get_layer(name).output)
                      .predict_on_batch(x))


def values(ds):
    """``(sample, neuron)`` values of the first epoch."""
    return ds.activation.isel(epoch=0).transpose("sample", "neuron").values


def _channels_first_model() -> keras.Model:
    inputs = keras.Input((3, 12, 10))  # (C, H, W)
    h = L.Conv2D(16, 3, data_format="channels_first", name="conv")(inputs)  # (16, 10, 8)
    h = L.Activation("relu", name="act")(h)
    h = L.Conv2D(6, 3, data_format="channels_first", name="conv2")(h)  # (6, 8, 6)
    h = L.Add(name="add")([h, L.ReLU(name="relu2")(h)])
    out = L.GlobalAveragePooling2D(data_format="channels_first")(h)
    return keras.Model(inputs, L.Dense(2, name="out")(out))


def test_layers_after_a_channels_first_conv_keep_its_channels(store_path):
    """``act`` after a (N, 16, 10, 8) conv keeps its 16 channels, not the 8 columns;
    ``relu2`` and ``add`` after a (N, 6, 8, 6) conv are reduced per channel."""
    keras.utils.set_random_seed(0)
    model = _channels_first_model()
    x = np.random.default_rng(0).normal(size=(7, 3, 12, 10)).astype(np.float32)
    names = ["conv", "act", "relu2", "add"]
    topoxr_keras.record(model, x, store_path, layers=names, progress=False)
    for name in names:
        want = direct(model, name, x).mean((2, 3))
        ds = stored_layer(store_path, "model", name)
        assert ds.attrs["topoxr_neuron_axis"] == 1, name
        assert ds.attrs["topoxr_reduced_axes"] == [2, 3], name
        np.testing.assert_allclose(values(ds), want, rtol=RTOL, atol=ATOL, err_msg=name)


def test_concatenate_and_a_broadcast_gate_follow_channels_first_convs(store_path):
    """A channel concatenation of two channels-first convs, and a squeeze-excitation
    product with a (N, C, 1, 1) gate, keep the 10 channels (not the 6 columns)."""
    keras.utils.set_random_seed(1)
    inputs = keras.Input((3, 7, 6))
    a = L.Conv2D(4, 3, padding="same", data_format="channels_first", name="a")(inputs)
    b = L.Conv2D(6, 3, padding="same", data_format="channels_first", name="b")(inputs)
    cat = L.Concatenate(axis=1, name="cat")([a, L.ReLU(name="rb")(b)])  # (N, 10, 7, 6)
    gate = L.GlobalAveragePooling2D(data_format="channels_first", keepdims=True)(cat)
    se = L.Multiply(name="se")([cat, L.Activation("sigmoid", name="gate")(gate)])
    out = L.GlobalAveragePooling2D(data_format="channels_first")(se)
    model = keras.Model(inputs, L.Dense(2)(out))
    x = np.random.default_rng(1).normal(size=(5, 3, 7, 6)).astype(np.float32)
    topoxr_keras.record(model, x, store_path, layers=["cat", "se"], progress=False)
    for name in ("cat", "se"):
        ds = stored_layer(store_path, "model", name)
        assert ds.sizes["neuron"] == 10, name
        np.testing.assert_allclose(values(ds), direct(model, name, x).mean((2, 3)),
                                   rtol=RTOL, atol=ATOL, err_msg=name)


def test_inputs_whose_axes_disagree_are_refused_unless_channel_axis_is_set(store_path):
    """An ``Add`` of a channels-first conv and a Dense on it (its last axis): refused,
    naming the layer and ``channel_axis``; with ``channel_axis`` it is recorded."""
    keras.utils.set_random_seed(2)
    inputs = keras.Input((3, 6, 6))
    conv = L.Conv2D(6, 1, data_format="channels_first", name="conv")(inputs)  # (6, 6, 6)
    mixed = L.Add(name="mixed")([conv, L.Dense(6, name="dense")(conv)])
    model = keras.Model(inputs, L.Dense(2)(L.Flatten()(mixed)))
    x = np.random.default_rng(2).normal(size=(4, 3, 6, 6)).astype(np.float32)
    with pytest.raises(RecordingError, match=r"layer 'mixed' \(Add\).*disagree: axis 1 as "
                                             r"'conv'.*axis 3 as 'dense'.*'channel_axis'"):
        topoxr_keras.record(model, x, store_path, layers=["mixed"], progress=False)
    assert not os.path.exists(store_path)
    topoxr_keras.record(model, x, store_path, layers={"mixed": {"channel_axis": 1}},
                        progress=False)
    ds = stored_layer(store_path, "model", "mixed")
    assert ds.attrs["topoxr_axis_rule"] == "channel_axis set by the user"
    np.testing.assert_allclose(values(ds), direct(model, "mixed", x).mean((2, 3)),
                               rtol=RTOL, atol=ATOL)


def test_a_guess_after_a_shape_changing_lambda_is_refused_in_a_mixed_model(store_path):
    """A ``Lambda`` cropping a channels-first conv map (a shape change the graph is not
    followed through) and the activation after it: keras's image_data_format
    (channels-last) would record the 5 columns as neurons, while the model's conv is
    channels-first. Refused, naming the layers and ``channel_axis``, nothing stored;
    with ``channel_axis=1`` the 5 channels are recorded."""
    keras.utils.set_random_seed(3)
    inputs = keras.Input((3, 9, 8))
    conv = L.Conv2D(5, 3, data_format="channels_first", name="conv")(inputs)  # (5, 7, 6)
    crop = L.Lambda(lambda t: t[:, :, 1:, 1:], name="crop")(conv)  # (5, 6, 5)
    act = L.Activation("relu", name="act")(crop)
    model = keras.Model(inputs, L.Dense(2)(L.Flatten()(act)))
    x = np.random.default_rng(3).normal(size=(4, 3, 9, 8)).astype(np.float32)
    for name in ("crop", "act"):
        with pytest.raises(RecordingError, match=rf"layer '{name}' \(\w+\) has no neuron axis "
                                                 r".*channels_last.*axis -1.*channels_first "
                                                 r"layers \('conv' \(Conv2D\)\).*'channel_axis'"):
            topoxr_keras.record(model, x, store_path, layers=[name], progress=False)
        assert not os.path.exists(store_path)
    topoxr_keras.record(model, x, store_path, layers={n: {"channel_axis": 1}
                                                      for n in ("crop", "act")},
                        progress=False)
    for name in ("crop", "act"):
        ds = stored_layer(store_path, "model", name)
        assert ds.attrs["topoxr_axis_rule"] == "channel_axis set by the user"
        np.testing.assert_allclose(values(ds), direct(model, name, x).mean((2, 3)),
                                   rtol=RTOL, atol=ATOL, err_msg=name)


def test_a_guess_in_a_model_of_one_convention_is_kept(store_path):
    """The same crop in a channels-last model: the guess (the last axis) is the
    convention of every layer, and recorded as before."""
    keras.utils.set_random_seed(4)
    inputs = keras.Input((9, 8, 3))
    conv = L.Conv2D(5, 3, name="conv")(inputs)  # (7, 6, 5)
    crop = L.Lambda(lambda t: t[:, 1:, 1:, :], name="crop")(conv)  # (6, 5, 5)
    model = keras.Model(inputs, L.Dense(2)(L.Flatten()(crop)))
    x = np.random.default_rng(4).normal(size=(4, 9, 8, 3)).astype(np.float32)
    topoxr_keras.record(model, x, store_path, layers=["crop"], progress=False)
    ds = stored_layer(store_path, "model", "crop")
    assert ds.attrs["topoxr_axis_rule"] == "last axis of Lambda (channels-last / hidden units)"
    np.testing.assert_allclose(values(ds), direct(model, "crop", x).mean((1, 2)),
                               rtol=RTOL, atol=ATOL)


@pytest.fixture
def channels_first_default():
    """keras's ``image_data_format`` set to channels_first for the test."""
    before = keras.config.image_data_format()
    keras.config.set_image_data_format("channels_first")
    yield
    keras.config.set_image_data_format(before)


def test_dense_on_a_map_keeps_its_units_under_a_channels_first_default(
        store_path, channels_first_default):
    """A Dense on a (N, 4, 5, 6) map acts on its last axis: it and the ReLU after it
    keep the 3 units, whatever keras's image_data_format says."""
    keras.utils.set_random_seed(3)
    inputs = keras.Input((4, 5, 6))
    h = L.ReLU(name="relu")(L.Dense(3, name="dense")(inputs))  # (N, 4, 5, 3)
    model = keras.Model(inputs, L.Dense(2)(L.Flatten()(h)))
    x = np.random.default_rng(3).normal(size=(5, 4, 5, 6)).astype(np.float32)
    topoxr_keras.record(model, x, store_path, layers=["dense", "relu"], progress=False)
    for name in ("dense", "relu"):
        ds = stored_layer(store_path, "model", name)
        assert ds.sizes["neuron"] == 3 and ds.attrs["topoxr_neuron_axis"] == 3, name
        np.testing.assert_allclose(values(ds), direct(model, name, x).mean((1, 2)),
                                   rtol=RTOL, atol=ATOL, err_msg=name)


@pytest.mark.parametrize("data_format", ["channels_first", "channels_last"])
def test_time_distributed_conv_follows_the_wrapped_layers_data_format(store_path, data_format):
    """TimeDistributed(Conv2D(data_format="channels_first")) outputs (N, T, C, H, W): its
    8 channels are on axis 2, not the last axis (the 7 columns were stored as neurons)."""
    keras.utils.set_random_seed(5)
    first = data_format == "channels_first"
    inputs = keras.Input((4, 3, 6, 7) if first else (4, 6, 7, 3))
    conv = L.TimeDistributed(L.Conv2D(8, 3, padding="same", data_format=data_format),
                             name="td")(inputs)
    act = L.Activation("relu", name="act")(conv)
    model = keras.Model(inputs, L.Dense(2)(L.Flatten()(act)))
    rng = np.random.default_rng(5)
    x = rng.normal(size=(5, 4, 3, 6, 7) if first else (5, 4, 6, 7, 3)).astype(np.float32)
    topoxr_keras.record(model, x, store_path, layers=["td", "act"], progress=False)
    axes = (1, 3, 4) if first else (1, 2, 3)
    for name in ("td", "act"):
        ds = stored_layer(store_path, "model", name)
        assert ds.sizes["neuron"] == 8, name
        assert ds.attrs["topoxr_neuron_axis"] == (2 if first else 4), name
        np.testing.assert_allclose(values(ds), direct(model, name, x).mean(axes),
                                   rtol=RTOL, atol=ATOL, err_msg=name)
