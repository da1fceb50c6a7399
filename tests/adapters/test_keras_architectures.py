"""Keras applications (weights=None, small inputs), a sequence model and a resumed
training run, each checked against a numpy reduction of the layer's output computed
here from a plain Keras sub-model."""

from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras")

import topoxr_keras  # noqa: E402
from topoxr import open_store  # noqa: E402
from topoxr.recording import RecordingError  # noqa: E402

RTOL = ATOL = 1e-5


def layer(store, model, name):
    nodes = open_store(store)[model].children.values()
    node = next(n for n in nodes if n.attrs.get("topoxr_layer") == name)
    return node.to_dataset().load()


def direct(model, name, x):
    return np.asarray(keras.Model(model.inputs, model.get_layer(name).output).predict_on_batch(x))


@pytest.mark.slow
@pytest.mark.parametrize(("app", "names"), [
    ("MobileNetV2", ["Conv1", "block_3_expand_relu", "out_relu"]),
    ("ResNet50", ["conv1_conv", "conv2_block1_out", "avg_pool"]),
])
def test_keras_applications_record_channels(store_path, app, names):
    keras.utils.set_random_seed(0)
    model = getattr(keras.applications, app)(weights=None, input_shape=(32, 32, 3),
                                             include_top=True, classes=5,
                                             **({"pooling": "avg"} if app == "ResNet50" else {}))
    x = np.random.default_rng(0).normal(size=(6, 32, 32, 3)).astype(np.float32)
    topoxr_keras.record(model, x, store_path, model_name=app, progress=False,
                        layers={names[0]: {}, names[1]: {"reduce": "max"}, names[2]: {}})
    for name, fn in zip(names, (np.mean, np.max, np.mean), strict=True):
        out = direct(model, name, x)
        ds = layer(store_path, app, name)
        assert ds.sizes["neuron"] == out.shape[-1]  # channels-last: the channels
        want = out if out.ndim == 2 else fn(out, axis=(1, 2))
        np.testing.assert_allclose(ds.activation.values[..., 0].T, want, rtol=RTOL, atol=ATOL)
        if out.ndim == 4:
            assert ds.attrs["topoxr_neuron_axis"] == 3
            assert ds.attrs["topoxr_reduced_axes"] == [1, 2]


def test_keras_sequence_model_tokens_and_masked_mean(store_path):
    keras.utils.set_random_seed(1)
    ids = keras.Input((12,), dtype="int32", name="input_ids")
    mask = keras.Input((12,), dtype="int32", name="attention_mask")
    h = keras.layers.Embedding(30, 16, name="emb")(ids)
    h = keras.layers.Dense(24, activation="relu", name="dense")(h)
    out = keras.layers.Dense(3, name="out")(keras.layers.GlobalAveragePooling1D()(h))
    model = keras.Model({"input_ids": ids, "attention_mask": mask}, out)
    rng = np.random.default_rng(1)
    m = (np.arange(12)[None] < rng.integers(3, 13, 20)[:, None]).astype(np.int32)
    x = {"input_ids": rng.integers(1, 30, (20, 12)).astype(np.int32) * m, "attention_mask": m}
    topoxr_keras.record(model, x, store_path, model_name="seq", progress=False,
                        layers={"dense": {}, "emb": {"reduce": "tokens"}})
    sub = keras.Model(model.inputs, model.get_layer("dense").output).predict_on_batch(x)
    ds = layer(store_path, "seq", "dense")
    assert ds.sizes["neuron"] == 24
    w = m[:, :, None].astype(np.float64)
    np.testing.assert_allclose(ds.activation.values[..., 0].T, (sub * w).sum(1) / w.sum(1),
                               rtol=RTOL, atol=ATOL)
    tok = layer(store_path, "seq", "emb")
    rows, pos = np.nonzero(m)
    assert tok.sizes["sample"] == len(rows) and tok.sizes["neuron"] == 16
    emb = np.asarray(model.get_layer("emb").embeddings)
    order = np.argsort(tok.sample.values)
    np.testing.assert_array_equal(tok.token_id.values[order], x["input_ids"][rows, pos])
    np.testing.assert_allclose(tok.activation.values[:, order, 0].T,
                               emb[x["input_ids"][rows, pos]], rtol=RTOL, atol=ATOL)
    with pytest.raises(RecordingError, match="cannot record one call"):
        topoxr_keras.record(model, x, store_path, layers={"dense": {"call": 1}},
                            progress=False)
    with pytest.raises(RecordingError, match="did you mean 'dense'"):
        topoxr_keras.record(model, x, store_path, layers="dense:0", progress=False)


def test_callback_resumes_after_a_restart(store_path, caplog):
    keras.utils.set_random_seed(2)
    rng = np.random.default_rng(2)
    x = rng.normal(size=(64, 6)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)

    def make():
        model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, name="h"),
                                  keras.layers.Dense(2, name="out")])
        model.compile("sgd", "sparse_categorical_crossentropy")
        return model

    model = make()
    cb = topoxr_keras.RecordActivations((x[:20], y[:20]), store_path, layers="h")
    model.fit(x, y, epochs=2, verbose=0, callbacks=[cb])
    assert cb.recorded == [0, 1, 2]
    before = layer(store_path, "model", "h")
    # "restart from the checkpoint": a new callback on the same store, fit from epoch 2
    cb2 = topoxr_keras.RecordActivations((x[:20], y[:20]), store_path, layers="h",
                                         progress=True)
    with caplog.at_level("INFO"):
        model.fit(x, y, epochs=4, initial_epoch=2, verbose=0, callbacks=[cb2])
    assert cb2.recorded == [3, 4]  # epoch 0 was not recorded again
    assert cb2.recorded_epochs == [0, 1, 2, 3, 4]
    assert any("already recorded" in r.message for r in caplog.records)
    after = layer(store_path, "model", "h")
    np.testing.assert_array_equal(after.activation.values[..., :3], before.activation.values)
    np.testing.assert_allclose(after.activation.values[..., 4].T, direct(model, "h", x[:20]),
                               rtol=RTOL, atol=ATOL)
