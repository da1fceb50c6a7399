"""Positional inputs ``((input_ids, attention_mask), y)`` in the Keras adapter.

A model of several positional inputs had its batches wrapped in a mapping without an
``attention_mask``: the token reductions took the padding in, stored with
``topoxr_masked`` false and no warning. They are refused, as the torch adapter refuses
them, before anything is written; the ways out the message names work.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

keras = pytest.importorskip("keras")

import topoxr_keras  # noqa: E402
from topoxr.recording import RecordingError  # noqa: E402
from topoxr.reduction import MASKED_REDUCTIONS  # noqa: E402
from topoxr.testing.adapters import store_snapshot, stored_layer  # noqa: E402

pytestmark = pytest.mark.skipif(keras.backend.backend() != "tensorflow",
                                reason="these tests run Keras on the TensorFlow backend")

L = keras.layers
N, T = 10, 8
RTOL, ATOL = 1e-5, 1e-5


def _data(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Token ids (0 at the padding), their attention mask (int32 0/1), labels."""
    rng = np.random.default_rng(seed)
    mask = (np.arange(T)[None] < rng.integers(2, T + 1, N)[:, None]).astype("int32")
    ids = (rng.integers(1, 50, (N, T)) * mask).astype("int32")
    return ids, mask, rng.integers(0, 3, N)


def _attention_model(names: tuple[str | None, str | None] = (None, None),
                     length: int | None = T) -> keras.Model:
    """Ids and attention mask as two inputs, the mask given to the attention only: no
    Keras mask follows the tokens of ``res``."""
    keras.utils.set_random_seed(0)
    i1 = keras.Input((length,), dtype="int32", name=names[0])
    i2 = keras.Input((length,), dtype="int32", name=names[1])
    e = L.Embedding(50, 8, embeddings_initializer=keras.initializers.RandomNormal(stddev=1.0),
                    name="emb")(i1)
    am = L.Lambda(lambda z: keras.ops.cast(z[:, None, :], "bool"))(i2)
    h = L.Add(name="res")([e, L.MultiHeadAttention(2, 4, name="mha")(e, e, attention_mask=am)])
    model = keras.Model([i1, i2], L.Dense(3, name="out")(L.GlobalAveragePooling1D()(h)))
    model.compile("sgd", "sparse_categorical_crossentropy")
    return model


def _output(model: keras.Model, name: str, x) -> np.ndarray:
    """The layer's output from a plain sub-model (the independent computation)."""
    return np.asarray(keras.Model(model.inputs, model.get_layer(name).output).predict_on_batch(x))


def _rows(store: str, model: str, name: str) -> np.ndarray:
    """The stored ``(sample, neuron)`` values of epoch 0, rows in sample id order."""
    ds = stored_layer(store, model, name)
    act = ds.activation.isel(epoch=0).transpose("sample", "neuron")
    assert sorted(ds.sample.values.tolist()) == list(range(N))
    return np.asarray(act.values)[np.argsort(ds.sample.values)]


def _assert_refused(model: keras.Model, data, store: str, layers, match: str) -> None:
    """Recording ``layers`` is refused (``match``), and nothing is written."""
    with pytest.raises(RecordingError, match=match):
        topoxr_keras.record(model, data, store, model_name="m", layers=layers, progress=False)
    assert not os.path.exists(store)


def _masked_mean(out: np.ndarray, mask: np.ndarray) -> np.ndarray:
    w = mask[:, :, None].astype(np.float64)
    return (out * w).sum(1) / w.sum(1)


@pytest.mark.parametrize("reduce", sorted(MASKED_REDUCTIONS))
@pytest.mark.parametrize("length", [T, None], ids=["fixed", "variable"])
def test_positional_attention_mask_is_refused_before_anything_is_written(tmp_path, reduce,
                                                                        length):
    ids, mask, y = _data()
    model = _attention_model(length=length)
    store = str(tmp_path / "r.zarr")
    with pytest.raises(RecordingError) as err:
        topoxr_keras.record(model, ((ids, mask), y), store, model_name="m", progress=False,
                            layers={"res": {"reduce": reduce}})
    message = str(err.value)
    assert f"layer 'res': reduce={reduce!r} over its {T} tokens" in message
    assert "{'input_ids': ids, 'attention_mask': mask}" in message
    assert "name='attention_mask'" in message
    assert "reduce='none'" in message and "{'res': {'mask': False}}" in message
    assert not os.path.exists(store)
    assert store_snapshot(store) == {}


def test_refused_with_the_default_reduce_and_from_a_tf_dataset(tmp_path):
    import tensorflow as tf

    ids, mask, y = _data()
    model = _attention_model()
    store = str(tmp_path / "r.zarr")
    data = tf.data.Dataset.from_tensor_slices(((ids, mask), y)).batch(4)
    for given in (((ids, mask), y), data):
        with pytest.raises(RecordingError, match=r"layer 'res': reduce='mean'"):
            topoxr_keras.record(model, given, store, model_name="m", layers=["res"],
                                progress=False)
        assert store_snapshot(store) == {}


def test_refusal_leaves_a_store_as_it_was(tmp_path):
    """The model group and the layer are not written after the refusal, in a store that
    already holds another recording of the model."""
    ids, mask, y = _data()
    model = _attention_model()
    store = str(tmp_path / "r.zarr")
    topoxr_keras.record(model, ((ids, mask), y), store, model_name="m", progress=False,
                        layers={"res": {"reduce": "none"}})
    before = store_snapshot(store)
    assert len(before) == 1
    with pytest.raises(RecordingError, match="attention mask"):
        topoxr_keras.record(model, ((ids, mask), y), store, model_name="m", epoch=1,
                            progress=False, layers={"res": {"reduce": "none"}, "mha": {}})
    with pytest.raises(RecordingError, match="attention mask"):
        topoxr_keras.record(model, ((ids, mask), y), store, model_name="m2",
                            progress=False, layers={"res": {}})
    after = store_snapshot(store)
    assert sorted(after) == sorted(before)
    for path, ds in before.items():
        assert ds.sizes["epoch"] == after[path].sizes["epoch"] == 1


def test_mask_false_records_the_mean_over_every_token(store_path):
    ids, mask, y = _data()
    model = _attention_model()
    _assert_refused(model, ((ids, mask), y), store_path, {"res": {"reduce": "mean"}},
                    r"\{'res': \{'mask': False\}\} to reduce over every token")
    topoxr_keras.record(model, ((ids, mask), y), store_path, model_name="m", progress=False,
                        layers={"res": {"reduce": "mean", "mask": False}})
    out = _output(model, "res", [ids, mask])
    assert stored_layer(store_path, "m", "res").attrs["topoxr_masked"] in (False, 0)
    np.testing.assert_allclose(_rows(store_path, "m", "res"), out.mean(1), rtol=RTOL,
                               atol=ATOL)
    # the padding matters here: the unmasked mean is not the masked one
    assert not np.allclose(out.mean(1), _masked_mean(out, mask), rtol=RTOL, atol=ATOL)


def test_reduce_none_records_every_unit(store_path):
    ids, mask, y = _data()
    model = _attention_model()
    _assert_refused(model, ((ids, mask), y), store_path, {"res": {"reduce": "tokens"}},
                    r"or record this layer with reduce='none'")
    topoxr_keras.record(model, ((ids, mask), y), store_path, model_name="m", progress=False,
                        layers={"res": {"reduce": "none"}})
    out = _output(model, "res", [ids, mask])
    rows = _rows(store_path, "m", "res")
    assert rows.shape == (N, T * 8)
    np.testing.assert_allclose(np.sort(rows, axis=1), np.sort(out.reshape(N, -1), axis=1),
                               rtol=RTOL, atol=ATOL)


def test_dict_inputs_record_the_masked_mean(tmp_path):
    """The ways out the message names: a mapping keyed by the model's input names, masked
    where they are input_ids and attention_mask, or by the mask's ``mask`` setting."""
    ids, mask, y = _data()
    model = _attention_model(("input_ids", "attention_mask"))
    store = str(tmp_path / "named.zarr")
    x = {"input_ids": ids, "attention_mask": mask}
    topoxr_keras.record(model, (x, y), store, model_name="m", progress=False,
                        layers={"res": {"reduce": "mean"}})
    out = _output(model, "res", x)
    assert stored_layer(store, "m", "res").attrs["topoxr_masked"] in (True, 1)
    np.testing.assert_allclose(_rows(store, "m", "res"), _masked_mean(out, mask), rtol=RTOL,
                               atol=ATOL)

    _assert_refused(model, ((ids, mask), y), str(tmp_path / "refused.zarr"), ["res"],
                    r"\{'input_ids': ids, 'attention_mask': mask\}")
    other = _attention_model(("ids", "msk"))
    _assert_refused(other, ((ids, mask), y), str(tmp_path / "refused.zarr"), ["res"],
                    r"\['ids', 'msk'\].*\{'res': \{'mask': 'msk'\}\}")
    store = str(tmp_path / "keyed.zarr")
    x = {"ids": ids, "msk": mask}
    topoxr_keras.record(other, (x, y), store, model_name="m", progress=False,
                        layers={"res": {"reduce": "mean", "mask": "msk"}})
    out = _output(other, "res", x)
    assert stored_layer(store, "m", "res").attrs["topoxr_masked"] in (True, 1)
    np.testing.assert_allclose(_rows(store, "m", "res"), _masked_mean(out, mask), rtol=RTOL,
                               atol=ATOL)


@pytest.mark.filterwarnings("ignore:Layer '.*' \\(of type Conv1D\\) was passed an input with a mask")
def test_a_layer_masked_by_a_keras_mask_is_not_refused(tmp_path):
    """Embedding(mask_zero=True) masks its tokens itself: with two positional inputs,
    the second an attention mask, its layer is recorded masked; a layer beside it that
    drops the Keras mask (Conv1D) is refused, and one whose length is not the ids'
    (a valid Conv1D) is not."""
    ids, mask, y = _data()
    keras.utils.set_random_seed(0)
    i1, i2 = keras.Input((T,), dtype="int32"), keras.Input((T,), dtype="int32")
    e = L.Embedding(50, 8, mask_zero=True, name="emb",
                    embeddings_initializer=keras.initializers.RandomNormal(stddev=1.0))(i1)
    d = L.Dense(6, name="proj")(e)  # passes the mask on
    same = L.Conv1D(4, 3, padding="same", name="same")(e)  # drops it
    short = L.Conv1D(4, 3, padding="valid", name="short")(e)  # drops it, T - 2 steps
    gate = L.Lambda(lambda z: keras.ops.cast(z, "float32")[:, :, None])(i2)
    pooled = L.Concatenate()([L.GlobalAveragePooling1D()(d),
                              L.GlobalAveragePooling1D()(L.Multiply()([same, gate])),
                              L.GlobalAveragePooling1D()(short)])
    model = keras.Model([i1, i2], L.Dense(3, name="out")(pooled))
    store = str(tmp_path / "k.zarr")
    topoxr_keras.record(model, ((ids, mask), y), store, model_name="m", progress=False,
                        layers={"emb": {}, "proj": {"reduce": "max"}, "short": {}})
    for name, fn in (("emb", "mean"), ("proj", "max")):
        out = _output(model, name, [ids, mask])
        assert stored_layer(store, "m", name).attrs["topoxr_masked"] in (True, 1)
        want = (_masked_mean(out, mask) if fn == "mean"
                else np.where(mask[:, :, None] > 0, out, -np.inf).max(1))
        np.testing.assert_allclose(_rows(store, "m", name), want, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(_rows(store, "m", "short"),
                               _output(model, "short", [ids, mask]).mean(1), rtol=RTOL,
                               atol=ATOL)
    _assert_refused(model, ((ids, mask), y), str(tmp_path / "refused.zarr"), ["emb", "same"],
                    r"layer 'same': reduce='mean' over its 8 tokens")


def test_callback_refuses_a_positional_attention_mask(tmp_path):
    """RecordActivations with a probe set ((ids, mask), y): model.fit stops with the
    refusal before anything is written; with {'mask': False} it records."""
    ids, mask, y = _data()
    model = _attention_model()
    store = str(tmp_path / "cb.zarr")
    callback = topoxr_keras.RecordActivations(((ids, mask), y), store, model_name="m",
                                              layers={"res": {"reduce": "last"}})
    with pytest.raises(RecordingError, match=r"layer 'res': reduce='last'.*'attention_mask'"):
        model.fit([ids, mask], y, epochs=1, verbose=0, callbacks=[callback])
    assert store_snapshot(store) == {}
    assert callback.recorded == []
    callback = topoxr_keras.RecordActivations(((ids, mask), y), store, model_name="m",
                                              layers={"res": {"reduce": "last", "mask": False}})
    model.fit([ids, mask], y, epochs=1, verbose=0, callbacks=[callback])
    assert callback.recorded == [0, 1]
    np.testing.assert_allclose(
        stored_layer(store, "m", "res").activation.sel(epoch=1).transpose(
            "sample", "neuron").values[np.argsort(stored_layer(store, "m", "res").sample.values)],
        _output(model, "res", [ids, mask])[:, -1], rtol=RTOL, atol=ATOL)
