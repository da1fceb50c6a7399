"""Recording real architectures right: transformers (Hugging Face, built from small configs
with random weights), a module that runs twice per forward pass, dict inputs, per-layer
settings. Every test compares the stored values with a numpy reduction of the layer's
output captured by a plain torch forward hook in the test."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import topoxr  # noqa: E402
import topoxr_torch  # noqa: E402
from topoxr.testing.adapters import stored_layer  # noqa: E402
from topoxr.recording import RecordingError  # noqa: E402

RTOL = ATOL = 1e-5


def hooked(model, names, x):
    """The raw outputs of ``names`` (first tensor) on input ``x``, with plain torch hooks."""
    out, handles = {}, []
    modules = dict(model.named_modules())

    def make(name):
        def hook(module, args, output):
            t = output[0] if isinstance(output, tuple) else output
            out.setdefault(name, []).append(t.detach().numpy().copy())
        return hook

    for name in names:
        handles.append(modules[name].register_forward_hook(make(name)))
    model.eval()
    with torch.no_grad():
        if isinstance(x, dict):
            model(**{k: torch.from_numpy(v) for k, v in x.items()})
        else:
            model(x)
    for h in handles:
        h.remove()
    return out


def tokens(n, t, vocab, seed=0, pad_from=None):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab, size=(n, t)).astype(np.int64)
    mask = np.ones((n, t), np.int64)
    if pad_from is not None:  # right padding of random length
        lengths = rng.integers(pad_from, t + 1, size=n)
        mask = (np.arange(t)[None, :] < lengths[:, None]).astype(np.int64)
        ids = ids * mask
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture(scope="module")
def bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=60, hidden_size=128, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=256,
                                  max_position_embeddings=32)
    return transformers.BertModel(cfg).eval()


def test_bert_layer_records_hidden_units_as_masked_mean(bert, store_path):
    x = tokens(24, 16, 60, pad_from=5)
    names = ["encoder.layer.1", "encoder.layer.1.intermediate"]
    topoxr_torch.record(bert, x, store_path, model_name="bert", layers=names, batch_size=10,
                        progress=False)
    raw = {k: np.concatenate(v) for k, v in hooked(bert, names, x).items()}
    m = x["attention_mask"][:, :, None].astype(np.float64)
    for name, hidden in zip(names, (128, 256), strict=True):
        ds = stored_layer(store_path, "bert", name)
        assert ds.sizes["neuron"] == hidden
        want = (raw[name] * m).sum(1) / m.sum(1)
        np.testing.assert_allclose(ds.activation.values[..., 0].T, want, rtol=RTOL, atol=ATOL)
        assert ds.attrs["topoxr_neuron_axis"] == 2
        assert ds.attrs["topoxr_reduced_axes"] == [1]
        assert ds.attrs["topoxr_masked"] is True
        assert ds.attrs["topoxr_output_shape"] == [16, hidden]


def test_minimal_reproduction_linear_on_sequences(store_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 32), torch.nn.Linear(32, 32))
    x = np.random.default_rng(0).normal(size=(50, 7, 4)).astype(np.float32)
    topoxr_torch.record(model, x, store_path, layers="1", progress=False)
    ds = stored_layer(store_path, "model", "1")
    assert ds.sizes["neuron"] == 32  # not 7, the token count
    want = hooked(model, ["1"], torch.from_numpy(x))["1"][0].mean(1)
    np.testing.assert_allclose(ds.activation.values[..., 0].T, want, rtol=RTOL, atol=ATOL)


def test_sequence_classifier_first_token_and_predictions(store_path):
    torch.manual_seed(1)
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=64,
                                  max_position_embeddings=16, num_labels=3)
    model = transformers.BertForSequenceClassification(cfg).eval()
    x = tokens(20, 12, 50, seed=1, pad_from=4)
    y = np.arange(20) % 3
    topoxr_torch.record(model, (x, y), store_path, model_name="cls", progress=False,
                        layers={"bert.encoder.layer.1": {"reduce": "first"},
                                "bert.encoder.layer.0": {"reduce": "last"},
                                "classifier": {}})
    raw = hooked(model, ["bert.encoder.layer.1", "bert.encoder.layer.0", "classifier"], x)
    first = stored_layer(store_path, "cls", "bert.encoder.layer.1")
    np.testing.assert_allclose(first.activation.values[..., 0].T,
                               raw["bert.encoder.layer.1"][0][:, 0, :], rtol=RTOL, atol=ATOL)
    assert first.attrs["topoxr_reduce"] == "first"
    last_pos = x["attention_mask"].sum(1) - 1
    last = stored_layer(store_path, "cls", "bert.encoder.layer.0")
    np.testing.assert_allclose(last.activation.values[..., 0].T,
                               raw["bert.encoder.layer.0"][0][np.arange(20), last_pos],
                               rtol=RTOL, atol=ATOL)
    logits = raw["classifier"][0]
    head = stored_layer(store_path, "cls", "classifier")
    assert head.sizes["neuron"] == 3
    np.testing.assert_array_equal(head.prediction.values[:, 0], logits.argmax(1))
    np.testing.assert_array_equal(head.correct.values[:, 0], logits.argmax(1) == y)


def test_left_padded_inputs_take_their_first_and_last_real_tokens(bert, store_path):
    # left padding (as for decoder models): position 0 of a short input is padding, and
    # its first real token (the CLS of a BERT input) sits further right
    x = tokens(12, 16, 60, seed=5, pad_from=3)
    x = {k: v[:, ::-1].copy() for k, v in x.items()}
    mask = x["attention_mask"].astype(bool)
    assert not mask[:, 0].all()
    names = {"encoder.layer.0": {"reduce": "first"}, "encoder.layer.1": {"reduce": "last"}}
    topoxr_torch.record(bert, x, store_path, model_name="b", layers=names, batch_size=5,
                        progress=False)
    raw = hooked(bert, list(names), x)
    rows = np.arange(12)
    first = stored_layer(store_path, "b", "encoder.layer.0")
    np.testing.assert_allclose(first.activation.values[..., 0].T,
                               raw["encoder.layer.0"][0][rows, mask.argmax(1)],
                               rtol=RTOL, atol=ATOL)
    assert first.attrs["topoxr_masked"] is True
    last = stored_layer(store_path, "b", "encoder.layer.1")
    np.testing.assert_allclose(last.activation.values[..., 0].T,
                               raw["encoder.layer.1"][0][:, -1], rtol=RTOL, atol=ATOL)


def test_a_setting_that_cannot_apply_names_the_layer(store_path):
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten())
    x = np.zeros((4, 1, 6, 6), np.float32)
    with pytest.raises(RecordingError, match=r"layer '0': reduce='first' needs a \(batch, tok"):
        topoxr_torch.record(model, x, store_path, layers={"0": {"reduce": "first"}},
                            progress=False)
    with pytest.raises(RecordingError, match="layer '0': unknown settings"):
        topoxr_torch.record(model, x, store_path, layers={"0": {"reduc": "max"}},
                            progress=False)


def test_per_token_recording_gives_token_samples_and_naps(store_path):
    torch.manual_seed(2)
    cfg = transformers.BertConfig(vocab_size=30, hidden_size=32, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=64,
                                  max_position_embeddings=16)
    model = transformers.BertModel(cfg).eval()
    x = tokens(200, 16, 30, seed=2)
    y = np.arange(200) % 4
    topoxr_torch.record(model, (x, y), store_path, model_name="tok", progress=False,
                        layers={"encoder.layer.0": {"reduce": "tokens"}}, batch_size=64,
                        predict=lambda out: out[:, 0, :].argmax(1))
    ds = stored_layer(store_path, "tok", "encoder.layer.0")
    assert ds.sizes["sample"] == 3200
    assert ds.sizes["neuron"] == 32
    np.testing.assert_array_equal(ds.sample.values, np.arange(3200))  # input * 16 + position
    np.testing.assert_array_equal(ds["input"].values, np.repeat(np.arange(200), 16))
    np.testing.assert_array_equal(ds.token_position.values, np.tile(np.arange(16), 200))
    np.testing.assert_array_equal(ds.token_id.values, x["input_ids"].reshape(-1))
    np.testing.assert_array_equal(ds.label.values, np.repeat(y, 16))  # broadcast
    raw = hooked(model, ["encoder.layer.0"], {k: v[:64] for k, v in x.items()})
    np.testing.assert_allclose(ds.activation.values[:, :64 * 16, 0].T,
                               raw["encoder.layer.0"][0].reshape(-1, 32), rtol=RTOL, atol=ATOL)
    act = topoxr.open_store(store_path)["tok/encoder.layer.0"].to_dataset().activation
    by_token = topoxr.naps(act, by="token_id", normalize=False)
    values = ds.activation.values[..., 0]
    tid = ds.token_id.values
    some = int(tid[0])
    got = by_token.sel(token_id=some).squeeze().values
    np.testing.assert_allclose(got, values[:, tid == some].mean(1), rtol=1e-4, atol=1e-5)
    assert topoxr.naps(act, by="token_position").sizes["token_position"] == 16


def test_per_token_recording_drops_padding(store_path, bert):
    x = tokens(10, 16, 60, seed=3, pad_from=3)
    topoxr_torch.record(bert, x, store_path, model_name="b", progress=False,
                        layers="encoder.layer.0", reduce="tokens")
    ds = stored_layer(store_path, "b", "encoder.layer.0")
    rows, pos = np.nonzero(x["attention_mask"])
    assert ds.sizes["sample"] == len(rows)
    np.testing.assert_array_equal(np.sort(ds.sample.values), np.sort(rows * 16 + pos))
    raw = hooked(bert, ["encoder.layer.0"], x)["encoder.layer.0"][0]
    order = np.argsort(ds.sample.values)
    np.testing.assert_allclose(ds.activation.values[:, order, 0].T, raw[rows, pos],
                               rtol=RTOL, atol=ATOL)


def test_other_reduction_is_refused_naming_both(bert, store_path):
    x = tokens(8, 16, 60, seed=4)
    topoxr_torch.record(bert, x, store_path, model_name="b", layers="encoder.layer.0",
                        progress=False)
    before = stored_layer(store_path, "b", "encoder.layer.0")
    with pytest.raises(RecordingError,
                       match=r"recorded with reduce='mean' over axes \[1\].*asks for "
                             r"reduce='first'") as err:
        topoxr_torch.record(bert, x, store_path, model_name="b", epoch=1, progress=False,
                            layers={"encoder.layer.0": {"reduce": "first"}})
    assert "architecture" not in str(err.value)
    after = stored_layer(store_path, "b", "encoder.layer.0")
    np.testing.assert_array_equal(after.epoch, before.epoch)


def test_gpt2_last_token_mlp_and_lm_head_prediction_warning(store_path):
    torch.manual_seed(3)
    cfg = transformers.GPT2Config(vocab_size=40, n_positions=16, n_embd=32, n_layer=2,
                                  n_head=2)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    x = tokens(12, 10, 40, seed=5, pad_from=3)
    y = np.arange(12) % 2
    with pytest.warns(UserWarning, match="no prediction can be derived") as record:
        topoxr_torch.record(model, (x, y), store_path, model_name="gpt", progress=False,
                            layers={"transformer.h.1": {"reduce": "last"},
                                    "transformer.h.0.mlp.c_fc": {}})
    assert len([w for w in record if "no prediction" in str(w.message)]) == 1  # once
    raw = hooked(model, ["transformer.h.1", "transformer.h.0.mlp.c_fc"], x)
    last = x["attention_mask"].sum(1) - 1
    ds = stored_layer(store_path, "gpt", "transformer.h.1")
    np.testing.assert_allclose(ds.activation.values[..., 0].T,
                               raw["transformer.h.1"][0][np.arange(12), last],
                               rtol=RTOL, atol=ATOL)
    assert "prediction" not in ds
    fc = stored_layer(store_path, "gpt", "transformer.h.0.mlp.c_fc")
    assert fc.sizes["neuron"] == 4 * 32  # HF Conv1D is a linear layer: hidden units
    m = x["attention_mask"][:, :, None].astype(np.float64)
    np.testing.assert_allclose(fc.activation.values[..., 0].T,
                               (raw["transformer.h.0.mlp.c_fc"][0] * m).sum(1) / m.sum(1),
                               rtol=RTOL, atol=ATOL)
    # predict= for anything else: the next token after the last real one
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        topoxr_torch.record(model, (x, y), store_path, model_name="gpt2", progress=False,
                            layers="transformer.h.1",
                            predict=lambda logits: logits[np.arange(len(logits)), -1].argmax(1))
    got = stored_layer(store_path, "gpt2", "transformer.h.1")
    with torch.no_grad():
        logits = model(**{k: torch.from_numpy(v) for k, v in x.items()}).logits.numpy()
    np.testing.assert_array_equal(got.prediction.values[:, 0], logits[:, -1].argmax(1))


def test_gpt2_model_tuple_input(store_path):
    torch.manual_seed(4)
    cfg = transformers.GPT2Config(vocab_size=40, n_positions=16, n_embd=32, n_layer=1,
                                  n_head=2)
    model = transformers.GPT2Model(cfg).eval()
    ids = tokens(6, 8, 40, seed=6)["input_ids"]
    topoxr_torch.record(model, ((ids,),), store_path, model_name="g", progress=False,
                        layers={"h.0": {"reduce": "tokens"}})
    ds = stored_layer(store_path, "g", "h.0")
    np.testing.assert_array_equal(ds.token_id.values, ids.reshape(-1))
    raw = hooked(model, ["h.0"], torch.from_numpy(ids))["h.0"][0]
    np.testing.assert_allclose(ds.activation.values[..., 0].T, raw.reshape(-1, 32),
                               rtol=RTOL, atol=ATOL)


def test_vit_patch_conv_keeps_channels_and_blocks_keep_hidden(store_path):
    torch.manual_seed(5)
    cfg = transformers.ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=32,
                                 num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=64)
    model = transformers.ViTModel(cfg, add_pooling_layer=False).eval()
    x = np.random.default_rng(0).normal(size=(6, 3, 32, 32)).astype(np.float32)
    names = ["embeddings.patch_embeddings.projection", "embeddings.patch_embeddings",
             "layers.0"]
    topoxr_torch.record(model, x, store_path, model_name="vit", progress=False,
                        layers={names[0]: {}, names[1]: {},
                                names[2]: {"reduce": "first"}})
    raw = hooked(model, names, torch.from_numpy(x))
    conv = stored_layer(store_path, "vit", names[0])
    assert conv.sizes["neuron"] == 32 and conv.attrs["topoxr_reduced_axes"] == [2, 3]
    np.testing.assert_allclose(conv.activation.values[..., 0].T,
                               raw[names[0]][0].mean((2, 3)), rtol=RTOL, atol=ATOL)
    patches = stored_layer(store_path, "vit", names[1])  # (N, 16 patches, 32): hidden units
    assert patches.sizes["neuron"] == 32 and patches.attrs["topoxr_neuron_axis"] == 2
    np.testing.assert_allclose(patches.activation.values[..., 0].T,
                               raw[names[1]][0].mean(1), rtol=RTOL, atol=ATOL)
    cls = stored_layer(store_path, "vit", names[2])
    assert cls.sizes["neuron"] == 32
    np.testing.assert_allclose(cls.activation.values[..., 0].T, raw[names[2]][0][:, 0],
                               rtol=RTOL, atol=ATOL)


class SharedReLU(torch.nn.Module):
    """A block that reuses one ReLU, as torchvision's BasicBlock does."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(2, 6, 3, padding=1)
        self.bn1 = torch.nn.BatchNorm2d(6)
        self.conv2 = torch.nn.Conv2d(6, 6, 3, padding=1)
        self.relu = torch.nn.ReLU(inplace=True)

    def forward(self, x):
        h = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.conv2(h) + h)


def test_shared_module_is_recorded_per_call(store_path):
    torch.manual_seed(6)
    model = SharedReLU().eval()
    x = np.random.default_rng(1).normal(size=(9, 2, 5, 5)).astype(np.float32)
    with pytest.raises(RecordingError, match=r"ran more than once.*'relu:0' and 'relu:1'"):
        topoxr_torch.record(model, x, store_path, layers="relu", progress=False)
    # batches of 4: the axis decided in the first pass (from conv/bn, followed by hooks
    # removed after it) holds for the later batches too
    topoxr_torch.record(model, x, store_path, progress=False, batch_size=4,
                        layers={"relu:0": {}, "relu": {"call": 1, "reduce": "max"}})
    raw = hooked(model, ["relu"], torch.from_numpy(x))["relu"]
    assert len(raw) == 2
    for call, fn in ((0, np.mean), (1, np.max)):
        ds = stored_layer(store_path, "model", f"relu:{call}")
        assert ds.sizes["neuron"] == 6  # channels, decided from the conv/bn before it
        assert ds.attrs["topoxr_neuron_axis"] == 1
        np.testing.assert_allclose(ds.activation.values[..., 0].T, fn(raw[call], axis=(2, 3)),
                                   rtol=RTOL, atol=ATOL)


class RankChanger(torch.nn.Module):
    """Returns its input flattened to 2-D on its first call, as it is (4-D) after."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return x.flatten(1) if self.calls == 1 else x


def test_a_layer_whose_output_changes_rank_between_batches_is_refused(store_path):
    torch.manual_seed(6)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3, padding=1), RankChanger()).eval()
    x = np.random.default_rng(1).normal(size=(9, 2, 5, 5)).astype(np.float32)
    with pytest.raises(RecordingError, match=r"layer '1' returned a 4-D output after 2-D"):
        topoxr_torch.record(model, x, store_path, layers=["1"], batch_size=4, progress=False)


def test_probe_recorder_resumes_from_a_checkpoint(store_path, caplog):
    torch.manual_seed(7)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU())
    x = np.random.default_rng(2).normal(size=(30, 5)).astype(np.float32)
    probe = topoxr_torch.ProbeRecorder(model, x, store_path, layers="0")
    for epoch in range(3):
        probe.record(epoch)
    before = stored_layer(store_path, "model", "0")
    # restart: a new process would build a new recorder on the same store
    again = topoxr_torch.ProbeRecorder(model, x, store_path, layers="0", progress=True)
    assert again.recorded_epochs == [0, 1, 2]
    with caplog.at_level("INFO"):
        assert again.record(2) is None  # already there: not recorded twice
        with torch.no_grad():
            model[0].weight.mul_(2)
        result = again.record(3)
    assert result.samples == 30
    assert any("already recorded" in r.message for r in caplog.records)
    assert any(" s" in r.message and "epoch 3" in r.message for r in caplog.records)
    after = stored_layer(store_path, "model", "0")
    np.testing.assert_array_equal(after.epoch, [0, 1, 2, 3])
    np.testing.assert_array_equal(after.activation.values[..., :3], before.activation.values)
    want = hooked(model, ["0"], torch.from_numpy(x))["0"][0]
    np.testing.assert_allclose(after.activation.values[..., 3].T, want, rtol=RTOL, atol=ATOL)


def test_dataloader_of_mappings(store_path, bert):
    x = tokens(12, 16, 60, seed=8, pad_from=6)
    y = np.arange(12) % 2
    rows = [{"input_ids": torch.from_numpy(x["input_ids"][i]),
             "attention_mask": torch.from_numpy(x["attention_mask"][i]),
             "labels": int(y[i])} for i in range(12)]
    loader = torch.utils.data.DataLoader(rows, batch_size=5)
    with pytest.warns(UserWarning, match="no prediction"):
        topoxr_torch.record(bert, loader, store_path, model_name="b", layers="encoder.layer.0",
                            progress=False)
    ds = stored_layer(store_path, "b", "encoder.layer.0")
    np.testing.assert_array_equal(ds.label.values, y)
    raw = hooked(bert, ["encoder.layer.0"], x)["encoder.layer.0"][0]
    m = x["attention_mask"][:, :, None].astype(np.float64)
    np.testing.assert_allclose(ds.activation.values[..., 0].T, (raw * m).sum(1) / m.sum(1),
                               rtol=RTOL, atol=ATOL)


def test_channel_axis_override_is_stated_in_the_store(store_path):
    torch.manual_seed(8)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6))
    x = np.random.default_rng(3).normal(size=(10, 5, 4)).astype(np.float32)
    topoxr_torch.record(model, x, store_path, progress=False,
                        layers={"0": {"channel_axis": 1, "reduce": "max"}})
    ds = stored_layer(store_path, "model", "0")
    assert ds.sizes["neuron"] == 5  # the user asked for axis 1
    assert ds.attrs["topoxr_axis_rule"] == "channel_axis set by the user"
    assert ds.attrs["topoxr_reduced_axes"] == [2]
    want = hooked(model, ["0"], torch.from_numpy(x))["0"][0].max(2)
    np.testing.assert_allclose(ds.activation.values[..., 0].T, want, rtol=RTOL, atol=ATOL)


class ConvThenInplace(torch.nn.Module):
    """A conv whose output is changed in place right after its hook ran."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 4, 3, padding=1)

    def forward(self, x):
        h = self.conv(x)
        h.mul_(-3.0)  # in place: what the conv returned is gone
        return torch.relu(h).sum((2, 3))


@pytest.mark.parametrize("reduce", ["mean", "max"])
def test_pooled_as_captured_over_many_batches_equals_pooling_the_whole_maps(store_path, reduce):
    """Batches after the first are pooled in the hook (no copy of the maps): same values."""
    torch.manual_seed(8)
    model = ConvThenInplace().eval()
    x = np.random.default_rng(3).normal(size=(11, 2, 6, 5)).astype(np.float32)
    topoxr_torch.record(model, x, store_path, layers={"conv": {"reduce": reduce}},
                        batch_size=3, progress=False)
    with torch.inference_mode():  # the conv's own output, before the in-place change
        maps = model.conv(torch.from_numpy(x)).numpy()
    ds = stored_layer(store_path, "model", "conv")
    assert ds.attrs["topoxr_reduced_axes"] == [2, 3] and ds.sizes["neuron"] == 4
    want = maps.mean((2, 3)) if reduce == "mean" else maps.max((2, 3))
    np.testing.assert_allclose(ds.activation.values[..., 0].T, want, rtol=1e-6, atol=1e-6)


class CountingConv(torch.nn.Module):
    """A conv that notes the batch size of every call."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 4, 3, padding=1)
        self.sizes = []

    def forward(self, x):
        self.sizes.append(int(x.shape[0]))
        return torch.relu(self.conv(x)).amax((2, 3))


def test_layers_are_planned_in_the_first_batch_and_every_batch_is_pooled_as_captured(
        store_path):
    """The plans are made in the first batch, from each layer's first sample as the
    layer runs; every batch, the first included, runs once and is pooled as it is
    captured (no batch of whole maps is copied out): the values are those of pooling
    the whole maps, and the stored plan is that of the whole output."""
    torch.manual_seed(10)
    model = CountingConv().eval()
    x = np.random.default_rng(6).normal(size=(11, 2, 6, 5)).astype(np.float32)
    topoxr_torch.record(model, x, store_path, layers=["conv"], batch_size=3, progress=False)
    assert model.sizes == [3, 3, 3, 2]
    attrs = stored_layer(store_path, "model", "conv").attrs
    assert list(attrs["topoxr_output_shape"]) == [4, 6, 5]
    assert attrs["topoxr_neuron_axis"] == 1
    with torch.inference_mode():
        maps = model.conv(torch.from_numpy(x)).numpy()
    stored = stored_layer(store_path, "model", "conv").activation.values[..., 0].T
    np.testing.assert_allclose(stored, maps.mean((2, 3)), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("reduce", ["mean", "max"])
def test_half_precision_maps_are_pooled_in_float32_as_captured(store_path, dtype, reduce):
    """A half-precision conv (CPU) is pooled by torch from its own maps, accumulating
    in float32: the stored channel values are those of the maps it returned."""
    torch.manual_seed(9)
    dt = getattr(torch, dtype)
    model = ConvThenInplace().to(dt).eval()
    x = np.random.default_rng(5).normal(size=(11, 2, 6, 5)).astype(np.float32)
    topoxr_torch.record(model, x, store_path, layers={"conv": {"reduce": reduce}},
                        batch_size=3, progress=False)
    with torch.inference_mode():  # the conv's own output, before the in-place change
        maps = model.conv(torch.from_numpy(x).to(dt)).float().numpy().astype(np.float64)
    want = maps.mean((2, 3)) if reduce == "mean" else maps.max((2, 3))
    ds = stored_layer(store_path, "model", "conv")
    assert ds.activation.dtype == np.float32
    np.testing.assert_allclose(ds.activation.values[..., 0].T, want, rtol=1e-6, atol=1e-6)


# -- torch's TransformerEncoder: nested tensors inside, on its fast path -------------------
class PaddedEncoder(torch.nn.Module):
    """Embeddings, a TransformerEncoder with a key padding mask, a head on token 0. In
    eval mode without autograd, torch runs the encoder's layers on nested tensors."""

    def __init__(self, nested=True):
        super().__init__()
        self.emb = torch.nn.Embedding(30, 16)
        layer = torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.enc = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=nested)
        self.head = torch.nn.Linear(16, 3)

    def forward(self, input_ids, attention_mask):
        h = self.enc(self.emb(input_ids), src_key_padding_mask=attention_mask == 0)
        return self.head(h[:, 0])


def test_a_transformer_encoder_on_nested_tensors_is_recorded_around_its_layers(
        store_path, tmp_path):
    """Outside the encoder and its own (padded) output are recorded (the first pass's
    hooks read the shape of every module's output, and a nested tensor has none: every
    recording of such a model failed inside torch); a layer inside, whose output is
    nested, is refused naming the encoder and enable_nested_tensor=False; built so, the
    layer is recorded."""
    import os

    torch.manual_seed(10)
    model = PaddedEncoder().eval()
    x = tokens(12, 7, 30, seed=10, pad_from=2)
    x["attention_mask"][0] = 1  # one full row: every batch is padded to 7
    x["input_ids"][0] = np.arange(1, 8)
    names = {"emb": {}, "enc": {}, "head": {}}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The PyTorch API of nested tensors")
        topoxr_torch.record(model, x, store_path, layers=names, batch_size=5, progress=False)
        raw = {k: np.concatenate(v) for k, v in hooked(model, list(names), x).items()}
    m = x["attention_mask"][:, :, None].astype(np.float64)
    for name in ("emb", "enc"):
        ds = stored_layer(store_path, "model", name)
        assert ds.sizes["neuron"] == 16 and ds.attrs["topoxr_masked"] is True, name
        np.testing.assert_allclose(ds.activation.values[..., 0].T,
                                   (raw[name] * m).sum(1) / m.sum(1), rtol=1e-4, atol=1e-5,
                                   err_msg=name)
    head = stored_layer(store_path, "model", "head")
    np.testing.assert_allclose(head.activation.values[..., 0].T, raw["head"],
                               rtol=RTOL, atol=ATOL)

    refused = str(tmp_path / "refused.zarr")
    with warnings.catch_warnings(), pytest.raises(
            RecordingError, match=r"layer 'enc\.layers\.0'.*nested tensor.*'enc'.*"
                                  r"enable_nested_tensor=False"):
        warnings.filterwarnings("ignore", "The PyTorch API of nested tensors")
        topoxr_torch.record(model, x, refused, layers=["enc.layers.0", "head"],
                            batch_size=5, progress=False)
    assert not os.path.exists(refused)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())

    padded = PaddedEncoder(nested=False).eval()
    padded.load_state_dict(model.state_dict())
    plain = str(tmp_path / "plain.zarr")
    topoxr_torch.record(padded, x, plain, layers=["enc.layers.0"], batch_size=5,
                        progress=False)
    layer = np.concatenate(hooked(padded, ["enc.layers.0"], x)["enc.layers.0"])
    np.testing.assert_allclose(stored_layer(plain, "model", "enc.layers.0")
                               .activation.values[..., 0].T,
                               (layer * m).sum(1) / m.sum(1), rtol=1e-4, atol=1e-5)


# -- positional inputs: an attention mask is not known as one --------------------------
def test_token_reductions_over_a_positional_attention_mask_are_refused(bert, store_path,
                                                                       tmp_path):
    """((input_ids, attention_mask),) calls bert(input_ids, attention_mask), but the mask
    cannot be known as one: the mean and last token were taken over the padding
    (topoxr_masked False), silently. Refused before writing, naming the mapping to pass;
    the mapping gives the masked values, and a positional mask is fine for layers with
    no token reduction (the pooler's (N, H)), with reduce="none", and where the layer
    says it follows no mask ({"mask": False}: the mean over every token)."""
    import os

    x = tokens(9, 8, 60, seed=11, pad_from=2)
    ids, mask = x["input_ids"], x["attention_mask"]
    for reduce in ("mean", "last", "tokens"):
        with pytest.raises(RecordingError, match=r"layer 'encoder\.layer\.0'.*second "
                                                 r"positional input.*attention_mask"):
            topoxr_torch.record(bert, ((ids, mask),), store_path, progress=False,
                                layers={"encoder.layer.0": {"reduce": reduce}})
        assert not os.path.exists(store_path)
    topoxr_torch.record(bert, x, store_path, layers={"encoder.layer.0": {"reduce": "last"}},
                        progress=False)
    raw = hooked(bert, ["encoder.layer.0", "pooler"], x)
    last = raw["encoder.layer.0"][0][np.arange(9), mask.sum(1) - 1]
    ds = stored_layer(store_path, "model", "encoder.layer.0")
    assert ds.attrs["topoxr_masked"] is True
    np.testing.assert_allclose(ds.activation.values[..., 0].T, last, rtol=RTOL, atol=ATOL)
    positional = str(tmp_path / "positional.zarr")
    topoxr_torch.record(bert, ((ids, mask),), positional, progress=False,
                        layers={"pooler": {}, "encoder.layer.0.output.dense": {"reduce": "none"},
                                "encoder.layer.0": {"mask": False}})  # said: every token
    unmasked = stored_layer(positional, "model", "encoder.layer.0")
    assert unmasked.attrs["topoxr_masked"] is False
    np.testing.assert_allclose(unmasked.activation.values[..., 0].T,
                               raw["encoder.layer.0"][0].mean(1), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(stored_layer(positional, "model", "pooler")
                               .activation.values[..., 0].T, raw["pooler"][0],
                               rtol=RTOL, atol=ATOL)
    dense = hooked(bert, ["encoder.layer.0.output.dense"], x)["encoder.layer.0.output.dense"]
    units = stored_layer(positional, "model", "encoder.layer.0.output.dense")
    assert units.sizes["neuron"] == 8 * 128  # every (token, unit), the padding's too
    want = dense[0][:, units.position.values, units.channel.values]
    np.testing.assert_allclose(units.activation.values[..., 0].T, want, rtol=RTOL, atol=ATOL)
