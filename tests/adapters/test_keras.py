"""The Keras adapter on the TensorFlow backend (and, in a subprocess, the torch backend)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

keras = pytest.importorskip("keras")

import topoxr_keras  # noqa: E402
from topoxr import open_store  # noqa: E402
from topoxr.recording import RecordingError  # noqa: E402
from topoxr.testing.adapters import (  # noqa: E402
    RecorderContract,
    assert_unchanged,
    store_snapshot,
)
from topoxr_keras import models  # noqa: E402

pytestmark = pytest.mark.skipif(keras.backend.backend() != "tensorflow",
                                reason="these tests run Keras on the TensorFlow backend")


class _Split(keras.layers.Layer):
    """A layer with two outputs: its ``output`` is a list, not a tensor."""

    def call(self, x):
        return [x * 2.0, x + 1.0]


def _split_model() -> keras.Model:
    inputs = keras.Input((64,))
    h = keras.layers.Dense(6, name="fc")(inputs)
    a, b = _Split(name="split")(h)
    return keras.Model(inputs, keras.layers.Add(name="add")([a, b]), name="split_net")


class TestKerasRecorder(RecorderContract):
    @pytest.fixture(scope="class")
    @classmethod
    def adapter(cls):
        return topoxr_keras

    @pytest.fixture(scope="class")
    @classmethod
    def mlp(cls):
        return models.make_model("mlp", seed=0)

    @pytest.fixture(scope="class")
    @classmethod
    def cnn(cls):
        return models.make_model("cnn", seed=0)

    @pytest.fixture(scope="class")
    @classmethod
    def probe(cls):
        x, y = models.load_digits_data()
        return x[:60], y[:60]

    def make_model(self, kind, *, seed=0, **kwargs):
        return models.make_model(kind, seed=seed, **kwargs)

    def perturb(self, model):
        for variable in model.weights:
            variable.assign(variable + 0.1)

    def model_state(self, model):
        return [(layer.name, len(layer._inbound_nodes), len(layer._outbound_nodes))
                for layer in model.layers]

    def non_tensor_layer(self):
        return _split_model(), "split"


# -- keras specifics ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits():
    x, y = models.load_digits_data()
    return x[:50], y[:50]


def test_probe_model_built_once_per_selection():
    model = models.make_model("mlp")
    first = topoxr_keras.probe_model(model, ["fc*"])
    assert topoxr_keras.probe_model(model, ["fc1", "fc2"]) is first
    assert topoxr_keras.probe_model(model, ["out"]) is not first
    assert first.layers == ["fc1", "fc2"]


@pytest.mark.parametrize(("layers", "output_keys", "match"), [
    ([], None, "no layers requested"),
    ([3], None, "layer names must be strings"),
    (["fc9"], None, "fc1"),  # the message lists the model's layers
    ({"fc1": 3}, None, "settings must be a mapping or LayerSpec"),
    ({"fc1": {"pool": "mean"}}, None, "unknown settings"),
    ({"fc1": {"reduce": "median"}}, None, "unknown reduce"),
    ({"fc1": {"channel_axis": 1.5}}, None, "channel_axis must be an integer"),
    ({"fc1": {"call": 1}}, None, "cannot record one call"),
    (["fc1"], {"fc2": 0}, "not recorded layers"),
    (["split"], None, "not a tensor"),
    (["split"], {"split": 5}, "output key 5 not found"),
])
def test_probe_model_refusals_are_those_its_docstring_lists(layers, output_keys, match):
    """Every case of ``probe_model``'s Raises section, each with its own message."""
    model = _split_model() if "split" in str(layers) else models.make_model("mlp")
    with pytest.raises(RecordingError, match=match):
        topoxr_keras.probe_model(model, layers, output_keys=output_keys)


def test_probe_model_refuses_what_is_no_keras_model():
    with pytest.raises(TypeError, match=r"must be a keras\.Model"):
        topoxr_keras.probe_model(object(), ["fc1"])


def test_output_key_selects_one_output(digits, store_path):
    x, _ = digits
    model = _split_model()
    topoxr_keras.record(model, x, store_path, layers=["fc", "split"],
                        output_keys={"split": 1}, progress=False)
    tree = open_store(store_path)
    fc = tree["model/fc"].activation.values
    np.testing.assert_allclose(tree["model/split"].activation.values, fc + 1.0, rtol=1e-6)


@pytest.mark.parametrize("batched", [True, False])
def test_tf_data_matches_arrays(digits, tmp_path, batched):
    import tensorflow as tf

    x, y = digits
    model = models.make_model("cnn")
    dataset = tf.data.Dataset.from_tensor_slices((x, y))
    if batched:
        dataset = dataset.batch(16)
    a, b = str(tmp_path / "a.zarr"), str(tmp_path / "b.zarr")
    topoxr_keras.record(model, dataset, a, layers=["conv1", "out"], batch_size=9,
                        progress=False)
    topoxr_keras.record(model, (x, y), b, layers=["conv1", "out"], progress=False)
    other = store_snapshot(b)
    for path, ds in store_snapshot(a).items():
        np.testing.assert_array_equal(ds.sample, other[path].sample)
        np.testing.assert_array_equal(ds.label, other[path].label)
        np.testing.assert_allclose(ds.activation, other[path].activation, atol=1e-6)


def test_channels_last_conv_is_pooled_per_channel(digits, store_path):
    x, _ = digits
    model = models.make_model("cnn")
    topoxr_keras.record(model, x, store_path, layers="conv2", progress=False)
    direct = keras.Model(model.inputs, model.get_layer("conv2").output).predict_on_batch(x)
    assert direct.shape[-1] == 16  # (N, H, W, C)
    stored = open_store(store_path)["model/conv2"].activation.values[..., 0]
    np.testing.assert_allclose(stored, direct.mean(axis=(1, 2)).T, atol=1e-6)


def _conv_model(dtype: str = "float32") -> keras.Model:
    inputs = keras.Input((6, 5, 2))
    maps = keras.layers.Conv2D(4, 3, padding="same", name="conv", dtype=dtype)(inputs)
    pooled = keras.layers.GlobalAveragePooling2D(dtype="float32")(maps)
    return keras.Model(inputs, keras.layers.Dense(3, name="out")(pooled))


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("reduce", ["mean", "max"])
def test_pooled_in_the_probe_over_many_batches_equals_pooling_the_whole_maps(
        store_path, reduce, dtype):
    """After the first batch the probe pools conv maps inside the model's graph (half
    precision accumulated in float32) and returns no whole maps: the stored channel
    values are those of the maps the layer returned."""
    keras.utils.set_random_seed(4)
    model = _conv_model(dtype)
    x = np.random.default_rng(3).normal(size=(11, 6, 5, 2)).astype(np.float32)
    topoxr_keras.record(model, x, store_path, layers={"conv": {"reduce": reduce}},
                        batch_size=3, progress=False)
    maps = np.asarray(keras.Model(model.inputs, model.get_layer("conv").output)
                      .predict_on_batch(x)).astype(np.float64)
    assert maps.shape == (11, 6, 5, 4)
    ds = open_store(store_path)["model/conv"].to_dataset()
    assert ds.attrs["topoxr_reduced_axes"] == [1, 2] and ds.sizes["neuron"] == 4
    want = maps.mean((1, 2)) if reduce == "mean" else maps.max((1, 2))
    np.testing.assert_allclose(ds.activation.values[..., 0].T, want, rtol=1e-6, atol=1e-6)
    probe = topoxr_keras.probe_model(model, {"conv": {"reduce": reduce}})
    assert probe.pool == {"conv": (3, reduce)}
    outputs, _ = probe(x[:5])
    assert outputs["conv"].shape == (5, 1, 1, 4)  # pooled in the graph: no maps copied
    np.testing.assert_allclose(outputs["conv"][:, 0, 0], want[:5], rtol=1e-6, atol=1e-6)


def test_unbuilt_sequential_is_refused(digits, store_path):
    x, _ = digits
    model = keras.Sequential([keras.layers.Dense(4, name="d")])
    with pytest.raises(RecordingError, match="no defined inputs"):
        topoxr_keras.record(model, x, store_path, layers="d", progress=False)
    assert store_snapshot(store_path) == {}


def test_callback_records_every_n_epochs(store_path):
    x, y = models.load_digits_data()
    model = models.make_model("mlp")
    callback = topoxr_keras.RecordActivations((x[:40], y[:40]), store_path, model_name="mlp",
                                              layers=["fc1", "out"], every=2)
    history = models.train(model, x[:300], y[:300], epochs=3, callbacks=[callback])
    assert callback.recorded == [0, 2]
    ds = open_store(store_path)["mlp/out"].to_dataset().load()
    np.testing.assert_array_equal(ds.epoch, [0, 2])
    assert bool(ds.epoch_complete.all())
    np.testing.assert_allclose(float(ds.loss.sel(epoch=2)), history["loss"][1], rtol=1e-6)
    assert np.isnan(float(ds.loss.sel(epoch=0)))
    assert not np.allclose(ds.activation.sel(epoch=0), ds.activation.sel(epoch=2))


def test_callback_refuses_another_probe_set_before_writing(store_path):
    """One read of the store per epoch serves the callback's skip and the recording's
    checks: a probe set other than the stored one is refused with nothing written."""
    x, y = models.load_digits_data()
    model = models.make_model("mlp")
    topoxr_keras.record(model, (x[:40], y[:40]), store_path, model_name="mlp", layers="out",
                        progress=False)
    before = store_snapshot(store_path)
    callback = topoxr_keras.RecordActivations((x[40:80], y[40:80]), store_path,
                                              model_name="mlp", layers="out",
                                              sample_ids=np.arange(40, 80),
                                              record_initial=False)
    with pytest.raises(RecordingError, match="probe set differs"):
        models.train(model, x[:100], y[:100], epochs=1, callbacks=[callback])
    assert callback.recorded == []
    assert_unchanged(before, store_path)


def test_callback_refuses_bad_every():
    with pytest.raises(RecordingError, match="every"):
        topoxr_keras.RecordActivations(np.zeros((4, 64)), "unused.zarr", layers="fc1", every=0)


_TORCH_BACKEND_SCRIPT = textwrap.dedent("""
    import json, sys
    import keras
    import topoxr_keras
    from topoxr_keras.models import copy_torch_weights_to_keras, make_model, train
    from topoxr_torch.models import load_digits_data, make_model as make_torch

    store = sys.argv[1]
    x, y = load_digits_data()
    for kind, layers in (("mlp", ["fc1", "relu2", "out"]), ("cnn", ["conv1", "conv2", "out"])):
        model = make_model(kind)
        copy_torch_weights_to_keras(make_torch(kind, seed=5), model)
        topoxr_keras.record(model, (x[:64], y[:64]), store, model_name=kind, layers=layers,
                            progress=False)
    callback = topoxr_keras.RecordActivations((x[:32], y[:32]), store, model_name="trained",
                                              layers="fc1")
    train(make_model("mlp"), x[:128], y[:128], epochs=1, callbacks=[callback])
    print(json.dumps({"backend": keras.backend.backend(), "recorded": callback.recorded}))
""")


@pytest.mark.slow
def test_torch_backend_in_a_subprocess(tmp_path):
    pytest.importorskip("torch")
    import topoxr_torch
    from topoxr_torch.models import make_model as make_torch

    store = str(tmp_path / "torch_backend.zarr")
    env = {**os.environ, "KERAS_BACKEND": "torch"}
    proc = subprocess.run([sys.executable, "-c", _TORCH_BACKEND_SCRIPT, store], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report == {"backend": "torch", "recorded": [0, 1]}
    tree = open_store(store)
    assert tree["mlp"].attrs["keras_backend"] == "torch"
    x, y = models.load_digits_data()
    reference = str(tmp_path / "reference.zarr")
    for kind, layers in (("mlp", ["fc1", "relu2", "out"]), ("cnn", ["conv1", "conv2", "out"])):
        topoxr_torch.record(make_torch(kind, seed=5), (x[:64], y[:64]), reference,
                            model_name=kind, layers=layers, progress=False)
    ref = open_store(reference)
    for kind, layers in (("mlp", ["fc1", "relu2", "out"]), ("cnn", ["conv1", "conv2", "out"])):
        for layer in layers:
            np.testing.assert_allclose(tree[f"{kind}/{layer}"].activation.values,
                                       ref[f"{kind}/{layer}"].activation.values, atol=1e-5)
    np.testing.assert_array_equal(tree["trained/fc1"].epoch.values, [0, 1])


def test_train_and_record_for_the_demo(store_path):
    models.train_and_record("mlp", store_path, epochs=1, probe_size=40)
    ds = open_store(store_path)["mlp_keras/fc2"].to_dataset().load()
    n = len(models.load_digits_data()[1])
    np.testing.assert_array_equal(ds.sample, np.arange(n - 40, n))
    np.testing.assert_array_equal(ds.epoch, [0, 1])
    assert np.isfinite(ds.loss.sel(epoch=1))


# -- default predictions ------------------------------------------------------------------
def _binary_probe(n=60):
    x = np.random.default_rng(1).normal(size=(n, 4)).astype(np.float32)
    return x, (x[:, 0] > 0).astype(np.int64)


def _sigmoid_model(how: str) -> keras.Model:
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,))
    h = keras.layers.Dense(8, activation="relu", name="fc")(inputs)
    if how == "dense":
        out = keras.layers.Dense(1, activation="sigmoid", name="out")(h)
    elif how == "activation":
        out = keras.layers.Activation("sigmoid", name="act")(keras.layers.Dense(1)(h))
    else:  # the sigmoid is the last layer of a nested model
        head = keras.Sequential([keras.Input((8,)), keras.layers.Dense(1, activation="sigmoid")],
                                name="head")
        out = head(h)
    return keras.Model(inputs, out)


@pytest.mark.parametrize("how", ["dense", "activation", "nested"])
def test_sigmoid_output_predictions_are_thresholded_at_one_half(store_path, how):
    """Dense(1, activation="sigmoid"): class 1 where the probability is over 0.5; over 0
    (for logits) made every prediction 1."""
    import warnings

    x, y = _binary_probe()
    model = _sigmoid_model(how)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        topoxr_keras.record(model, (x, y), store_path, layers="fc", batch_size=16,
                            progress=False)
    expected = (model.predict_on_batch(x)[:, 0] > 0.5).astype(np.int64)
    assert 0 < expected.sum() < len(y)
    ds = open_store(store_path)["model/fc"].to_dataset().load()
    np.testing.assert_array_equal(ds.prediction.values[:, 0], expected)
    np.testing.assert_array_equal(ds.correct.values[:, 0], expected == y)


def test_one_column_logits_are_thresholded_at_zero(store_path):
    import warnings

    x, y = _binary_probe()
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, name="fc"),
                              keras.layers.Dense(1, name="out")])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        topoxr_keras.record(model, (x, y), store_path, layers="fc", progress=False)
    expected = (model.predict_on_batch(x)[:, 0] > 0).astype(np.int64)
    assert 0 < expected.sum() < len(y)
    ds = open_store(store_path)["model/fc"].to_dataset()
    np.testing.assert_array_equal(ds.prediction.values[:, 0], expected)


@pytest.mark.parametrize("outputs", ["dict", "list"])
def test_a_model_with_several_outputs_gets_no_default_predictions(store_path, tmp_path,
                                                                  outputs):
    """Of {'main': ..., 'aux': ...} model.outputs[0] is 'aux' (sorted keys): predictions
    from it were stored silently, compared with the labels of 'main'."""
    inputs = keras.Input((6,))
    h = keras.layers.Dense(8, name="fc")(inputs)
    main, aux = keras.layers.Dense(5, name="main")(h), keras.layers.Dense(2, name="aux")(h)
    model = keras.Model(inputs, {"main": main, "aux": aux} if outputs == "dict" else
                        [main, aux])
    x = np.random.default_rng(0).normal(size=(9, 6)).astype(np.float32)
    y = np.asarray(model.predict_on_batch(x)["main" if outputs == "dict" else 0]).argmax(1)
    names = r"\['aux', 'main'\]" if outputs == "dict" else r"\['main', 'aux'\]"
    with pytest.warns(UserWarning, match=rf"has 2 outputs {names}.*gets them all.*"
                                         r"Pass predict="):
        topoxr_keras.record(model, (x, y), store_path, layers=["fc"], progress=False)
    ds = open_store(store_path)["model/fc"].to_dataset().load()
    assert "prediction" not in ds and "correct" not in ds
    np.testing.assert_array_equal(ds.label, y)
    direct = keras.Model(model.inputs, model.get_layer("fc").output).predict_on_batch(x)
    np.testing.assert_allclose(ds.activation.values[..., 0].T, direct, rtol=1e-5, atol=1e-6)
    # the way out the warning names: predict= gets every output, as the model returns them
    chosen = str(tmp_path / "chosen.zarr")
    pick = (lambda out: out["main"].argmax(1)) if outputs == "dict" else (
        lambda out: out[0].argmax(1))
    topoxr_keras.record(model, (x, y), chosen, layers=["fc"], predict=pick, progress=False)
    stored = open_store(chosen)["model/fc"].to_dataset()
    np.testing.assert_array_equal(stored.prediction.isel(epoch=0), y)
    assert bool(stored.correct.all())


# -- tf.data pipelines that shuffle ---------------------------------------------------------
@pytest.mark.parametrize("pipeline", ["shuffle", "shuffle-map-batch-prefetch", "zip"])
def test_shuffling_tf_data_is_refused_before_writing(store_path, pipeline):
    import tensorflow as tf

    x = np.random.default_rng(0).normal(size=(10, 6)).astype(np.float32)
    data = tf.data.Dataset.from_tensor_slices(x)
    if pipeline == "shuffle":
        data = data.shuffle(10)
    elif pipeline == "zip":
        data = tf.data.Dataset.zip((data, tf.data.Dataset.range(10).shuffle(10)))
    else:
        data = data.shuffle(10).map(lambda v: v * 1.0).batch(4).prefetch(2)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4, name="fc")])
    with pytest.raises(RecordingError, match=r"shuffles \(a _ShuffleDataset.*\.shuffle\(\)"):
        topoxr_keras.record(model, data, store_path, layers=["fc"], progress=False)
    assert store_snapshot(store_path) == {}
