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


def test_token_ids_stay_with_their_layers_beside_a_keras_mask(store_path):
    """A layer following a Keras mask made every batch a mapping: the layers beside it
    lost their token_id (and a store recorded without that layer could not go on), and
    with two inputs the tokens got the first input's ids, whichever input they come
    from. Each layer keeps the ids of a one-input model; with several positional inputs
    no layer gets any."""
    keras.utils.set_random_seed(3)
    ids = keras.Input((6,), dtype="int32", name="ids")
    raw = keras.layers.Embedding(30, 4, name="raw")(ids)
    masked = keras.layers.Embedding(30, 4, mask_zero=True, name="emb")(ids)
    out = keras.layers.Dense(2, name="out")(keras.layers.GlobalAveragePooling1D()(
        keras.layers.Add()([raw, masked])))
    model = keras.Model(ids, out)
    rng = np.random.default_rng(3)
    x = rng.integers(1, 30, (8, 6)).astype(np.int32)
    x[:, 4:] = 0
    layers = {"raw": {"reduce": "tokens"}, "emb": {"reduce": "tokens"}}
    topoxr_keras.record(model, x, store_path, layers=layers, progress=False)
    for name, keep in (("raw", np.ones_like(x, bool)), ("emb", x != 0)):
        tok = layer(store_path, "model", name)
        rows, pos = np.nonzero(keep)
        order = np.argsort(tok.sample.values)
        np.testing.assert_array_equal(tok.token_id.values[order], x[rows, pos], err_msg=name)

    a = keras.Input((5,), dtype="int32", name="a")
    b = keras.Input((5,), dtype="int32", name="b")
    eb = keras.layers.Embedding(30, 4, mask_zero=True, name="eb")(b)
    rb = keras.layers.Embedding(30, 4, name="rb")(b)
    pooled = keras.layers.GlobalAveragePooling1D()
    two = keras.Model([a, b], keras.layers.Add()([pooled(eb), pooled(rb)]))
    xa = rng.integers(1, 30, (6, 5)).astype(np.int32)
    xb = rng.integers(1, 30, (6, 5)).astype(np.int32)
    xb[:, 3:] = 0
    for i, names in enumerate((["eb", "rb"], ["rb"])):  # with a Keras mask and without
        other = store_path.replace(".zarr", f"-two{i}.zarr")
        topoxr_keras.record(two, ((xa, xb),), other, progress=False,
                            layers={name: {"reduce": "tokens"} for name in names})
        if "eb" in names:
            assert layer(other, "model", "eb").sizes["sample"] == int((xb != 0).sum())
        for name in names:  # which input the tokens come from is not known: no ids
            assert "token_id" not in layer(other, "model", name).coords, (names, name)


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
    with pytest.raises(RecordingError, match=r"'dense' is called once .* no call 1"):
        topoxr_keras.record(model, x, store_path, layers={"dense": {"call": 1}},
                            progress=False)
    with pytest.raises(RecordingError, match="did you mean 'dense'"):
        topoxr_keras.record(model, x, store_path, layers="dens:0", progress=False)


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
    # its starting state is epoch 2, stored by the first fit: checked against the store
    # and skipped (before, the state before a fit was labelled epoch 0 whatever its epoch)
    assert cb2.recorded == [3, 4]
    assert cb2.recorded_epochs == [0, 1, 2, 3, 4]
    assert any("epoch 2 of model 'model' is already recorded (its first batch checked)"
               in r.getMessage() for r in caplog.records)
    after = layer(store_path, "model", "h")
    np.testing.assert_array_equal(after.activation.values[..., :3], before.activation.values)
    np.testing.assert_allclose(after.activation.values[..., 4].T, direct(model, "h", x[:20]),
                               rtol=RTOL, atol=ATOL)


def _padded_ids(n=24, t=9, vocab=30, seed=0):
    """Token ids with 0 as padding: some inputs padded at the end, some at the start
    (keras.utils.pad_sequences pads at the start by default)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, t + 1, n)
    ids = np.zeros((n, t), np.int32)
    for i, length in enumerate(lengths):
        tokens = rng.integers(1, vocab, length)
        if i % 2:
            ids[i, t - length:] = tokens
        else:
            ids[i, :length] = tokens
    return ids


def _masked_reduction(out, mask, reduce):
    """The reduction of (N, T, H) ``out`` over the steps ``mask`` marks, in numpy."""
    n = len(out)
    if reduce == "mean":
        w = mask[:, :, None].astype(np.float64)
        return (out * w).sum(1) / w.sum(1)
    if reduce == "max":
        return np.where(mask[:, :, None], out, -np.inf).max(1)
    steps = np.arange(mask.shape[1])
    first = np.where(mask, steps, mask.shape[1]).min(1)
    last = np.where(mask, steps, -1).max(1)
    return out[np.arange(n), first if reduce == "first" else last]


@pytest.mark.filterwarnings("ignore:Layer 'conv' .* does not support masking:UserWarning")
@pytest.mark.parametrize("reduce", ["mean", "max", "first", "last", "tokens"])
def test_keras_masks_leave_padding_out_of_token_reductions(store_path, reduce):
    """Embedding(mask_zero=True) -> LSTM: the model's own pooling leaves the padding steps
    out, the recorded reductions used them (mean over all T, 'first' at a padding step of
    a pre-padded input, 'tokens' stored padding as samples). Each layer now follows its
    Keras mask; a Conv1D beside them, which drops the mask, is reduced over every step."""
    keras.utils.set_random_seed(5)
    L = keras.layers
    ids_in = keras.Input((9,), dtype="int32")
    emb = L.Embedding(30, 8, mask_zero=True, name="emb")(ids_in)
    lstm = L.LSTM(6, return_sequences=True, name="lstm")(emb)
    conv = L.Conv1D(4, 3, padding="same", name="conv")(emb)
    pooled = L.Concatenate()([L.GlobalAveragePooling1D()(lstm), L.GlobalMaxPooling1D()(conv)])
    model = keras.Model(ids_in, L.Dense(3, name="out")(pooled))
    x = _padded_ids()
    mask = x != 0
    assert mask[0, -1] == 0 and mask[1, 0] == 0  # padded at the end and at the start
    topoxr_keras.record(model, x, store_path, model_name="seq", batch_size=10,
                        progress=False, layers={"emb": {"reduce": reduce},
                                                "lstm": {"reduce": reduce}, "conv": {}})
    for name in ("emb", "lstm"):
        out = direct(model, name, x).astype(np.float64)
        ds = layer(store_path, "seq", name)
        assert ds.attrs["topoxr_masked"] is True, name
        got = ds.activation.isel(epoch=0).transpose("sample", "neuron").values
        if reduce == "tokens":
            rows, steps = np.nonzero(mask)
            want_ids = rows * x.shape[1] + steps
            order = np.argsort(want_ids)
            np.testing.assert_array_equal(ds.sample.values, want_ids[order])
            np.testing.assert_array_equal(ds.token_id.values, x[rows, steps][order])
            np.testing.assert_allclose(got, out[rows, steps][order], rtol=RTOL, atol=ATOL,
                                       err_msg=name)
        else:
            np.testing.assert_array_equal(ds.sample.values, np.arange(len(x)))
            np.testing.assert_allclose(got, _masked_reduction(out, mask, reduce), rtol=RTOL,
                                       atol=ATOL, err_msg=name)
    conv_ds = layer(store_path, "seq", "conv")
    assert conv_ds.attrs["topoxr_masked"] is False
    np.testing.assert_allclose(conv_ds.activation.isel(epoch=0).transpose("sample", "neuron"),
                               direct(model, "conv", x).mean(1), rtol=RTOL, atol=ATOL)


def test_a_masking_layer_masks_the_rnn_after_it_in_the_callback(store_path):
    """keras.layers.Masking on float steps, a GRU after it, recorded by the callback:
    the GRU's mean leaves the masked steps out at every epoch."""
    keras.utils.set_random_seed(6)
    L = keras.layers
    inputs = keras.Input((7, 3))
    gru = L.GRU(5, return_sequences=True, name="gru")(L.Masking(0.0, name="masking")(inputs))
    model = keras.Model(inputs, L.Dense(2, name="out")(L.GlobalAveragePooling1D()(gru)))
    model.compile("sgd", "sparse_categorical_crossentropy")
    rng = np.random.default_rng(6)
    x = rng.normal(size=(16, 7, 3)).astype(np.float32)
    x[np.arange(16) % 3 == 0, 4:] = 0.0  # padded steps
    y = rng.integers(0, 2, 16)
    cb = topoxr_keras.RecordActivations((x, y), store_path, layers="gru", batch_size=5)
    model.fit(x, y, epochs=1, verbose=0, callbacks=[cb])
    mask = np.any(x != 0, axis=-1)
    assert not mask.all()
    ds = layer(store_path, "model", "gru")
    assert ds.attrs["topoxr_masked"] is True
    got = ds.activation.sel(epoch=1).transpose("sample", "neuron").values
    want = _masked_reduction(direct(model, "gru", x).astype(np.float64), mask, "mean")
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
