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
    stored_layer,
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
    ({"fc1": {"call": 1}}, None, r"'fc1' is called once in keras model .* no call 1"),
    ({"fc1": {"call": -1}}, None, "call must be >= 0"),
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


# -- every check below compares the stored values, per sample id and neuron, with a plain
# keras.Model(inputs, layer output) of the same model and numpy -----------------------------
def _values(store, model, name, epoch=None):
    """``{sample id: row of neurons}`` of a stored layer (at ``epoch``, or its only one)."""
    ds = stored_layer(store, model, name)
    act = ds.activation.sel(epoch=epoch) if epoch is not None else ds.activation.isel(epoch=0)
    act = act.transpose("sample", "neuron").values
    return dict(zip(ds.sample.values.tolist(), act, strict=True))


def _assert_rows(store, model, name, want, *, ids=None, epoch=None):
    """The stored rows of ``name`` equal ``want`` (row i: sample id ``ids[i]``)."""
    got = _values(store, model, name, epoch)
    ids = range(len(want)) if ids is None else ids
    assert sorted(got) == sorted(int(i) for i in ids)
    for i, row in zip(ids, want, strict=True):
        np.testing.assert_allclose(got[int(i)], row, rtol=1e-5, atol=1e-5,
                                   err_msg=f"{name} sample {i}")


def _plain(model, layer_output, x):
    """A layer output's values from a plain sub-model (the independent computation)."""
    return np.asarray(keras.Model(model.inputs, layer_output).predict_on_batch(x))


def _small_classifier():
    keras.utils.set_random_seed(7)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, name="h"),
                              keras.layers.Dense(2, name="out")])
    model.compile(keras.optimizers.SGD(0.1), "sparse_categorical_crossentropy")
    x = np.random.default_rng(7).normal(size=(96, 6)).astype(np.float32)
    return model, x, (x[:, 0] + x[:, 1] > 0).astype(np.int64)


# -- a second fit, and a fit from initial_epoch ---------------------------------------------
def test_a_second_fit_numbered_from_0_again_is_refused_not_skipped(store_path):
    """Keras numbers the epochs of every fit from 0: a fine-tuning fit after a first one
    found epochs 0..2 stored and skipped them without a word (then stored the state after
    5 epochs as 'epoch 3'). Its first epoch is checked against the store instead and the
    fit stops, naming initial_epoch; the store keeps the first fit's values."""
    model, x, y = _small_classifier()
    probe = (x[:30], y[:30])
    first = topoxr_keras.RecordActivations(probe, store_path, layers="h")
    model.fit(x, y, epochs=2, verbose=0, callbacks=[first])
    assert first.recorded == [0, 1, 2]
    before = store_snapshot(store_path)
    _assert_rows(store_path, "model", "h", _plain(model, model.get_layer("h").output, x[:30]),
                 epoch=2)
    second = topoxr_keras.RecordActivations(probe, store_path, layers="h")
    with pytest.raises(RecordingError, match=r"epoch 0 of model 'model' is already recorded.*"
                                             r"other values.*initial_epoch="):
        model.fit(x, y, epochs=3, verbose=0, callbacks=[second])
    assert second.recorded == []
    assert_unchanged(before, store_path)
    # without the initial state, the first due epoch (1) is checked the same way
    third = topoxr_keras.RecordActivations(probe, store_path, layers="h",
                                           record_initial=False)
    with pytest.raises(RecordingError, match=r"epoch 1 .* already recorded.*initial_epoch="):
        model.fit(x, y, epochs=3, verbose=0, callbacks=[third])
    assert_unchanged(before, store_path)


def test_a_fit_from_initial_epoch_labels_its_starting_state_with_that_epoch(store_path):
    """fit(initial_epoch=2) of a model trained for 2 epochs stored its trained weights
    as 'epoch 0'; its starting state is epoch 2 now, and the epochs after it follow."""
    model, x, y = _small_classifier()
    model.fit(x, y, epochs=2, verbose=0)
    start = _plain(model, model.get_layer("h").output, x[:30])
    callback = topoxr_keras.RecordActivations((x[:30], y[:30]), store_path, layers="h")
    model.fit(x, y, epochs=4, initial_epoch=2, verbose=0, callbacks=[callback])
    assert callback.recorded == [2, 3, 4]
    assert callback.recorded_epochs == [2, 3, 4]
    _assert_rows(store_path, "model", "h", start, epoch=2)
    _assert_rows(store_path, "model", "h", _plain(model, model.get_layer("h").output, x[:30]),
                 epoch=4)
    assert not np.allclose(start, _plain(model, model.get_layer("h").output, x[:30]))


# -- shared layers --------------------------------------------------------------------------
def _shared_models():
    """Models in which a layer is called twice, and how each call is computed."""
    L = keras.layers
    keras.utils.set_random_seed(3)
    a, b = keras.Input((4,)), keras.Input((4,))
    shared = L.Dense(3, name="shared")
    two_inputs = keras.Model([a, b], L.Dense(2)(L.Concatenate()([shared(a), shared(b)])))
    encoder = keras.Sequential([keras.Input((4,)), L.Dense(3, name="e1")], name="encoder")
    a, b = keras.Input((4,)), keras.Input((4,))
    siamese = keras.Model([a, b], L.Dense(2)(L.Subtract()([encoder(a), encoder(b)])))
    i = keras.Input((3,))
    square = L.Dense(3, name="sq")
    chain = keras.Model(i, L.Dense(2)(square(square(i))))
    return {"shared": two_inputs, "encoder": siamese, "sq": chain}


@pytest.mark.parametrize("name", ["shared", "encoder", "sq"])
def test_a_shared_layer_is_refused_unless_a_call_is_picked(tmp_path, name):
    """A layer called twice (a shared Dense on two inputs, a siamese encoder, a layer
    applied to its own output) was recorded at its first call only, silently. Named
    alone it is refused, naming the layer and its calls; 'name:0' and 'name:1' record
    each call's own output."""
    model = _shared_models()[name]
    rng = np.random.default_rng(0)
    x = ([rng.normal(size=(9, 4)).astype(np.float32) for _ in range(2)]
         if len(model.inputs) == 2 else rng.normal(size=(9, 3)).astype(np.float32))
    data = (tuple(x),) if isinstance(x, list) else x
    refused = str(tmp_path / "refused.zarr")
    with pytest.raises(RecordingError, match=rf"layer '{name}' is called 2 times in keras "
                                             rf"model .*'{name}:0' and '{name}:1'"):
        topoxr_keras.record(model, data, refused, layers=[name], progress=False)
    assert store_snapshot(refused) == {}
    store = str(tmp_path / "calls.zarr")
    topoxr_keras.record(model, data, store, layers=[f"{name}:0", f"{name}:1"], batch_size=4,
                        progress=False)
    layer = model.get_layer(name)
    if name == "sq":
        w, bias = layer.get_weights()
        want = [x @ w + bias, (x @ w + bias) @ w + bias]
    elif name == "shared":
        w, bias = layer.get_weights()
        want = [x[0] @ w + bias, x[1] @ w + bias]
    else:
        want = [np.asarray(layer.predict_on_batch(x[0])), np.asarray(layer.predict_on_batch(x[1]))]
    for call in (0, 1):
        _assert_rows(store, "model", f"{name}:{call}", want[call])
    assert not np.allclose(want[0], want[1])
    # {"call": k} is the same as "name:k"; a call the layer does not have is refused
    topoxr_keras.record(model, data, str(tmp_path / "setting.zarr"),
                        layers={name: {"call": 1}}, progress=False)
    _assert_rows(str(tmp_path / "setting.zarr"), "model", f"{name}:1", want[1])
    with pytest.raises(RecordingError, match=rf"'{name}' is called 2 times .* no call 2"):
        topoxr_keras.record(model, data, refused, layers=f"{name}:2", progress=False)


def test_a_layer_also_called_by_another_model_records_its_call_in_this_one(store_path):
    """A layer first used in another model: its first call is not this model's
    (a raw ValueError 'not connected to inputs' before); the call of this model is
    recorded, and the other model's call does not count."""
    L = keras.layers
    keras.utils.set_random_seed(5)
    reused = L.Dense(3, name="reused")
    i1 = keras.Input((4,))
    keras.Model(i1, reused(i1))
    i2 = keras.Input((4,))
    model = keras.Model(i2, L.Dense(2)(reused(L.Dense(4, name="pre")(i2))))
    x = np.random.default_rng(5).normal(size=(7, 4)).astype(np.float32)
    topoxr_keras.record(model, x, store_path, layers=["reused"], progress=False)
    w, bias = reused.get_weights()
    _assert_rows(store_path, "model", "reused",
                 _plain(model, model.get_layer("pre").output, x) @ w + bias)


# -- the probe of a model whose graph changed ------------------------------------------------
def test_a_sequential_changed_by_pop_and_add_gets_a_new_probe(tmp_path):
    """probe_model cached per model and layer selection and kept the removed head: the
    predictions stored after pop()/add() were the argmax of the old 3-class output."""
    L = keras.layers
    keras.utils.set_random_seed(6)
    model = keras.Sequential([keras.Input((6,)), L.Dense(5, name="h"), L.Dense(3, name="out")])
    rng = np.random.default_rng(6)
    x = rng.normal(size=(40, 6)).astype(np.float32)
    y = rng.integers(0, 4, 40)
    first = str(tmp_path / "v1.zarr")
    topoxr_keras.record(model, (x, y), first, layers="h", progress=False)
    old = topoxr_keras.probe_model(model, "h")
    model.pop()
    model.add(L.Dense(4, name="out2"))
    new = topoxr_keras.probe_model(model, "h")
    assert new is not old
    assert topoxr_keras.probe_model(model, "h") is new  # cached for the new graph
    second = str(tmp_path / "v2.zarr")
    topoxr_keras.record(model, (x, y), second, layers="h", progress=False)
    ds = stored_layer(second, "model", "h")
    out = np.asarray(model.predict_on_batch(x))
    assert out.shape == (40, 4)
    np.testing.assert_array_equal(ds.prediction.isel(epoch=0).values,
                                  out[ds.sample.values].argmax(1))
    _assert_rows(second, "model", "h", _plain(model, model.get_layer("h").output, x))


# -- tf.data pipelines --------------------------------------------------------------------------
def _unordered_pipeline(kind):
    import tensorflow as tf

    x = np.random.default_rng(0).normal(size=(12, 6)).astype(np.float32)
    a = tf.data.Dataset.from_tensor_slices(x[:6])
    b = tf.data.Dataset.from_tensor_slices(x[6:])
    whole = tf.data.Dataset.from_tensor_slices(x)
    if kind == "sample_from_datasets":
        return tf.data.Dataset.sample_from_datasets([a, b], [0.5, 0.5])
    if kind == "choose_from_datasets":
        choice = tf.data.Dataset.random(seed=1).map(lambda v: v % 2).take(12)
        return tf.data.Dataset.choose_from_datasets([a, b], choice)
    if kind == "map":
        return whole.map(lambda v: v * 1.0, num_parallel_calls=2, deterministic=False)
    if kind == "interleave":
        return whole.batch(3).interleave(tf.data.Dataset.from_tensors, num_parallel_calls=2,
                                         deterministic=False)
    if kind == "batch":
        return whole.batch(4, num_parallel_calls=2, deterministic=False)
    # a shuffle inside a function the pipeline runs: another order in every process,
    # though one process may see the same order at every pass
    if kind == "shuffle_in_interleave":
        return tf.data.Dataset.range(2).interleave(lambda i: whole.take(6).shuffle(6),
                                                   cycle_length=2)
    if kind == "shuffle_in_flat_map":
        return tf.data.Dataset.range(2).flat_map(lambda i: whole.take(6).shuffle(6))
    options = tf.data.Options()
    options.deterministic = False
    return whole.map(lambda v: v * 1.0, num_parallel_calls=2).with_options(options)


@pytest.mark.parametrize(("kind", "match"), [
    ("sample_from_datasets", r"draws at random \(a _RandomDataset"),
    ("choose_from_datasets", r"draws at random \(a RandomDataset"),
    ("map", r"_ParallelMapDataset with deterministic=False"),
    ("interleave", r"ParallelInterleaveDataset\w* with deterministic=False"),
    ("batch", r"_ParallelBatchDataset with deterministic=False"),
    ("shuffle_in_interleave", r"shuffles \(a ShuffleDataset\w*\) inside a function the "
                              r"pipeline runs \(in a _InterleaveDataset"),
    ("shuffle_in_flat_map", r"shuffles \(a ShuffleDataset\w*\) inside a function the "
                            r"pipeline runs \(in a _FlatMapDataset"),
    ("options", r"tf\.data\.Options\.deterministic = False"),
])
def test_tf_data_of_random_order_is_refused_before_writing(store_path, kind, match):
    """Only .shuffle() was refused: a probe set sampled from datasets, or run with
    deterministic=False, gave other samples under the same ids at every epoch."""
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4, name="fc")])
    with pytest.raises(RecordingError, match=match + r".*same order every time"):
        topoxr_keras.record(model, _unordered_pipeline(kind), store_path, layers=["fc"],
                            progress=False)
    assert store_snapshot(store_path) == {}


def test_tf_data_chosen_in_a_fixed_order_is_recorded(store_path):
    """choose_from_datasets with a choice dataset of fixed order is not random."""
    import tensorflow as tf

    x = np.random.default_rng(1).normal(size=(12, 6)).astype(np.float32)
    a = tf.data.Dataset.from_tensor_slices(x[0::2])
    b = tf.data.Dataset.from_tensor_slices(x[1::2])
    data = tf.data.Dataset.choose_from_datasets([a, b], tf.data.Dataset.range(2).repeat(6))
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4, name="fc")])
    topoxr_keras.record(model, data, store_path, layers=["fc"], progress=False)
    _assert_rows(store_path, "model", "fc", _plain(model, model.get_layer("fc").output, x))


@pytest.mark.timeout(120)
def test_an_infinite_tf_data_is_refused_at_once(store_path):
    """A .repeat() without a count was counted forever."""
    import tensorflow as tf

    x = np.zeros((8, 6), np.float32)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4, name="fc")])
    with pytest.raises(RecordingError, match=r"infinite.*\.repeat\(\)"):
        topoxr_keras.record(model, tf.data.Dataset.from_tensor_slices(x).repeat(), store_path,
                            layers=["fc"], progress=False)
    assert store_snapshot(store_path) == {}


@pytest.mark.parametrize("inputs", ["dict", "tuple", "dict-with-labels"])
@pytest.mark.parametrize("batched", [True, False])
def test_tf_data_of_several_inputs_with_labels(tmp_path, inputs, batched):
    """({"a": .., "b": ..}, y) was refused as 'yields mappings', ((x1, x2), y) raised a raw
    AttributeError; model.fit takes both, and so does record, with (N, 1) labels. A
    mapping's 'labels' entry is the labels, as for arrays."""
    import tensorflow as tf

    L = keras.layers
    keras.utils.set_random_seed(2)
    a, b = keras.Input((4,), name="a"), keras.Input((3,), name="b")
    hidden = L.Dense(5, name="hidden")(L.Concatenate()([a, b]))
    model = keras.Model([a, b] if inputs == "tuple" else {"a": a, "b": b},
                        L.Dense(3, name="out")(hidden))
    rng = np.random.default_rng(2)
    xa, xb = rng.normal(size=(20, 4)).astype(np.float32), rng.normal(size=(20, 3)).astype(
        np.float32)
    y = rng.integers(0, 3, (20, 1))  # as keras.datasets.cifar10 gives them
    x = (xa, xb) if inputs == "tuple" else {"a": xa, "b": xb}
    data = tf.data.Dataset.from_tensor_slices(
        {**x, "labels": y} if inputs == "dict-with-labels" else (x, y))
    if batched:
        data = data.batch(6)
    store = str(tmp_path / "tf.zarr")
    topoxr_keras.record(model, data, store, layers=["hidden"], batch_size=7, progress=False)
    _assert_rows(store, "model", "hidden", _plain(model, model.get_layer("hidden").output, x))
    ds = stored_layer(store, "model", "hidden")
    np.testing.assert_array_equal(ds.label.values, y[ds.sample.values, 0])
    out = np.asarray(model.predict_on_batch(x))
    np.testing.assert_array_equal(ds.prediction.isel(epoch=0).values,
                                  out[ds.sample.values].argmax(1))


def test_labels_of_shape_n_by_1_are_read_as_n(tmp_path):
    """keras.datasets CIFAR labels have shape (N, 1): refused as 'must be one-dimensional'
    with a tf.data.Dataset (in its elements, or as labels=); arrays and the callback's
    probe set take them too."""
    import tensorflow as tf

    model, x, y = _small_classifier()
    y2 = y[:, None]
    out = np.asarray(model.predict_on_batch(x[:30])).argmax(1)
    for how in ("data", "labels", "tf.data", "tf.data labels="):
        store = str(tmp_path / f"{how}.zarr")
        data = {"data": (x[:30], y2[:30]), "labels": x[:30],
                "tf.data": tf.data.Dataset.from_tensor_slices((x[:30], y2[:30])).batch(8),
                "tf.data labels=": tf.data.Dataset.from_tensor_slices(x[:30])}[how]
        labels = y2[:30] if how in ("labels", "tf.data labels=") else None
        topoxr_keras.record(model, data, store, labels=labels, layers="h", progress=False)
        ds = stored_layer(store, "model", "h")
        np.testing.assert_array_equal(ds.label.values, y[ds.sample.values])
        np.testing.assert_array_equal(ds.prediction.isel(epoch=0).values, out[ds.sample.values])
        _assert_rows(store, "model", "h", _plain(model, model.get_layer("h").output, x[:30]))
    store = str(tmp_path / "callback.zarr")
    callback = topoxr_keras.RecordActivations((x[:30], y2[:30]), store, layers="h")
    model.fit(x, y2, epochs=1, verbose=0, callbacks=[callback])
    ds = stored_layer(store, "model", "h")
    np.testing.assert_array_equal(ds.label.values, y[ds.sample.values])
    _assert_rows(store, "model", "h", _plain(model, model.get_layer("h").output, x[:30]),
                 epoch=1)


_KILLED_WHILE_COMPLETING = r'''
import os, signal, sys
import keras
import topoxr_keras
from topoxr.store import ActivationWriter
from topoxr_keras import models

x, y = models.load_digits_data()
model = models.make_model("mlp")


class Checkpoint(keras.callbacks.Callback):  # before the recording, as a user's would be
    def on_epoch_end(self, epoch, logs=None):
        self.model.save_weights(sys.argv[2])


complete = ActivationWriter.complete_epoch


def killed(self, epoch, *args, **kwargs):  # the process dies as epoch 2 is completed
    if epoch == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return complete(self, epoch, *args, **kwargs)


ActivationWriter.complete_epoch = killed
callback = topoxr_keras.RecordActivations((x[:40], y[:40]), sys.argv[1], model_name="mlp",
                                          layers=["fc1"])
models.train(model, x[:200], y[:200], epochs=3, callbacks=[Checkpoint(), callback])
'''


def test_a_fit_resumed_from_a_checkpoint_keeps_the_killed_runs_logs_and_says_so(tmp_path):
    """Killed while recording epoch 2, after its checkpoint: the resumed fit completed
    epoch 2 without the first run's loss and accuracy (NaN), and said nothing."""
    store, weights = str(tmp_path / "run.zarr"), str(tmp_path / "ckpt.weights.h5")
    result = subprocess.run([sys.executable, "-c", _KILLED_WHILE_COMPLETING, store, weights],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == -9, result.stderr
    x, y = models.load_digits_data()
    model = models.make_model("mlp")
    model.load_weights(weights)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=1e-2),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    callback = topoxr_keras.RecordActivations((x[:40], y[:40]), store, model_name="mlp",
                                              layers=["fc1"])
    with pytest.warns(UserWarning, match="epoch 2 of model 'mlp' was left incomplete"):
        model.fit(x[:200], y[:200], epochs=3, initial_epoch=2, verbose=0,
                  callbacks=[callback])
    ds = open_store(store)["mlp/fc1"].to_dataset()
    assert ds.epoch.values.tolist() == [0, 1, 2, 3]
    assert bool(ds.epoch_complete.all())
    assert np.isfinite(ds["loss"].sel(epoch=[1, 2, 3]).values).all()
