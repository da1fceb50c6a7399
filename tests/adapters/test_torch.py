"""The PyTorch adapter: the shared recorder contract plus torch specifics."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import topoxr_torch  # noqa: E402
from topoxr import open_store  # noqa: E402
from topoxr.recording import RecordingError  # noqa: E402
from topoxr.store import ActivationWriter  # noqa: E402
from topoxr.testing.adapters import (  # noqa: E402
    RecorderContract,
    assert_unchanged,
    store_snapshot,
)
from topoxr_torch import models  # noqa: E402


class _TupleNet(torch.nn.Module):
    """A module whose blocks return a tuple, a dict and something that is no tensor."""

    class Pair(torch.nn.Module):
        def forward(self, x):
            return x * 2, x + 1

    class Named(torch.nn.Module):
        def forward(self, x):
            return {"a": x - 1, "b": x * 3}

    class Count(torch.nn.Module):
        def forward(self, x):
            return (len(x), "rows")

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(64, 6)
        self.pair = self.Pair()
        self.named = self.Named()
        self.count = self.Count()

    def forward(self, x):
        h = self.fc(x)
        first, _ = self.pair(h)
        self.count(h)
        return self.named(first)["b"]


class TestTorchRecorder(RecorderContract):
    @pytest.fixture(scope="class")
    @classmethod
    def adapter(cls):
        return topoxr_torch

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
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1)

    def model_state(self, model):
        return [
            (name, m.training, len(m._forward_hooks), len(m._forward_pre_hooks))
            for name, m in model.named_modules()
        ]

    def non_tensor_layer(self):
        return _TupleNet(), "count"


# -- torch specifics ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits():
    x, y = models.load_digits_data()
    return x[:50], y[:50]


def test_tuple_and_dict_outputs(digits, store_path):
    x, _ = digits
    net = _TupleNet()
    topoxr_torch.record(net, x, store_path, model_name="t", layers=["pair", "named"],
                        progress=False)
    topoxr_torch.record(net, x, store_path, model_name="k", layers=["pair", "named"],
                        output_keys={"pair": 1, "named": "a"}, progress=False)
    tree = open_store(store_path)
    with torch.no_grad():
        h = net.fc(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(tree["t/pair"].activation.values[..., 0], (h * 2).T, rtol=1e-6)
    np.testing.assert_allclose(tree["t/named"].activation.values[..., 0], (h * 2 - 1).T,
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(tree["k/pair"].activation.values[..., 0], (h + 1).T, rtol=1e-6)
    np.testing.assert_allclose(tree["k/named"].activation.values[..., 0], (h * 2 - 1).T,
                               rtol=1e-5, atol=1e-6)


def test_missing_output_key_is_clear(digits, store_path):
    x, _ = digits
    with pytest.raises(RecordingError, match=r"named.*no tensor under key 'zzz'"):
        topoxr_torch.record(_TupleNet(), x, store_path, layers="named",
                            output_keys={"named": "zzz"}, progress=False)
    assert store_snapshot(store_path) == {}


def test_hooks_removed_and_modes_restored_after_a_failing_forward(digits, store_path):
    model = models.make_model("mlp")
    model.train()
    model.fc2.eval()
    x, _ = digits
    with pytest.raises(RuntimeError):  # wrong input width: torch raises inside forward
        topoxr_torch.record(model, x[:, :10], store_path, layers="*", progress=False)
    assert all(not m._forward_hooks for m in model.modules())
    assert model.training and model.fc1.training and not model.fc2.training


def test_recording_runs_without_autograd(digits, store_path):
    model = models.make_model("mlp")
    x, y = digits
    topoxr_torch.record(model, (torch.from_numpy(x), torch.from_numpy(y)), store_path,
                        layers="out", progress=False)
    assert all(p.grad is None for p in model.parameters())
    ds = open_store(store_path)["model/out"].to_dataset().load()
    np.testing.assert_array_equal(ds.label, y)


def test_dataloader_matches_arrays(digits, tmp_path):
    x, y = digits
    model = models.make_model("cnn")
    dataset = torch.utils.data.TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
    loader = torch.utils.data.DataLoader(dataset, batch_size=16, shuffle=False)
    a, b = str(tmp_path / "a.zarr"), str(tmp_path / "b.zarr")
    topoxr_torch.record(model, loader, a, layers=["conv2", "out"], progress=False)
    topoxr_torch.record(model, (x, y), b, layers=["conv2", "out"], batch_size=7,
                        progress=False)
    for path, ds in store_snapshot(a).items():
        other = store_snapshot(b)[path]
        np.testing.assert_array_equal(ds.sample, other.sample)
        np.testing.assert_array_equal(ds.label, other.label)
        np.testing.assert_allclose(ds.activation, other.activation, atol=1e-6)


def test_shuffling_dataloader_is_refused(digits, store_path):
    x, y = digits
    dataset = torch.utils.data.TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
    loader = torch.utils.data.DataLoader(dataset, batch_size=16, shuffle=True)
    with pytest.raises(RecordingError, match="shuffle"):
        topoxr_torch.record(models.make_model("mlp"), loader, store_path, layers="fc1",
                            progress=False)


def test_probe_recorder_inside_a_training_loop(store_path):
    x, y = models.load_digits_data()
    model = models.make_model("mlp")
    probe = topoxr_torch.ProbeRecorder(model, (x[:40], y[:40]), store_path,
                                       model_name="mlp", layers=["fc1", "out"])
    probe.record(0)
    history = models.train(model, x[:400], y[:400], epochs=2,
                           on_epoch_end=lambda epoch, logs: probe.record(epoch, **logs))
    ds = open_store(store_path)["mlp/out"].to_dataset().load()
    np.testing.assert_array_equal(ds.epoch, [0, 1, 2])
    np.testing.assert_allclose(ds.loss.sel(epoch=[1, 2]), [h["loss"] for h in history])
    assert model.training is False  # train() leaves eval mode; recording restored it
    assert not np.allclose(ds.activation.sel(epoch=0), ds.activation.sel(epoch=2))


def test_probe_recorder_refuses_another_probe_set_before_writing(store_path):
    """The recorder's one read of the store per epoch serves both the skip and the
    recording's checks: a probe set other than the stored one is refused, with nothing
    written, at a new epoch and at an epoch already complete (not skipped)."""
    x, y = models.load_digits_data()
    model = models.make_model("mlp")
    first = topoxr_torch.ProbeRecorder(model, (x[:40], y[:40]), store_path,
                                       model_name="mlp", layers=["fc1", "out"])
    first.record(0)
    before = store_snapshot(store_path)
    other = topoxr_torch.ProbeRecorder(model, (x[40:80], y[40:80]), store_path,
                                       model_name="mlp", layers=["fc1", "out"],
                                       sample_ids=np.arange(40, 80))
    assert other.recorded_epochs == [0]
    for epoch in (0, 1):  # complete for these layers (checked before skipping), and new
        with pytest.raises(RecordingError, match="probe set differs"):
            other.record(epoch)
    assert_unchanged(before, store_path)
    assert first.record(1).samples == 40
    assert first.recorded_epochs == [0, 1]


def test_probe_recorder_skips_a_recorded_epoch_only_for_the_model_that_recorded_it(
        store_path):
    """A run restarted from a checkpoint skips the epochs the store holds (in batches of
    another size too: the values agree within rounding), while another training run into
    the same store and model name is refused, not skipped: it would have kept the first
    run's values under the second run's name."""
    x, y = models.load_digits_data()
    model = models.make_model("mlp")
    first = topoxr_torch.ProbeRecorder(model, (x[:100], y[:100]), store_path,
                                       model_name="mlp", layers=["fc1", "out"], batch_size=64)
    first.record(0)
    before = store_snapshot(store_path)
    resumed = topoxr_torch.ProbeRecorder(model, (x[:100], y[:100]), store_path,
                                         model_name="mlp", layers=["fc1", "out"], batch_size=7)
    assert resumed.record(0) is None
    assert_unchanged(before, store_path)
    other = models.make_model("mlp", seed=1)  # another seed: another run
    again = topoxr_torch.ProbeRecorder(other, (x[:100], y[:100]), store_path,
                                       model_name="mlp", layers=["fc1", "out"], batch_size=64)
    with pytest.raises(RecordingError, match=r"epoch 0 of model 'mlp' is already recorded, "
                                             r"and the model now gives other values"):
        again.record(0)
    assert_unchanged(before, store_path)


def test_the_check_before_a_skip_compares_float16_stores_as_stored(store_path):
    """A float16 layer reads back as float32: the fresh values are rounded to float16
    before the comparison, as the writer rounds them (the same model was refused, its
    rounding error 2.3e-4 above 1e-4 of the layer's scale)."""
    x, y = models.load_digits_data()
    model = models.make_model("mlp")
    topoxr_torch.record(model, (x[:100], y[:100]), store_path, model_name="mlp",
                        layers=["fc1", "out"], dtype="float16", progress=False)
    probe = topoxr_torch.ProbeRecorder(model, (x[:100], y[:100]), store_path,
                                       model_name="mlp", layers=["fc1", "out"], batch_size=7)
    assert probe.record(0) is None


class TokenModel(torch.nn.Module):
    """Embeddings of ``input_ids`` (keyword inputs, as a tokenizer's batch is passed)."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(20, 6)

    def forward(self, input_ids, attention_mask):
        return self.emb(input_ids)


def test_the_check_before_a_skip_refuses_other_tokens_clearly(store_path):
    """Per-token samples of a masked layer are known only once the batch has run: tokens
    the store does not hold (another attention mask) are refused with a RecordingError,
    not a KeyError of the comparison."""
    torch.manual_seed(0)
    model = TokenModel().eval()
    ids = np.arange(1, 17).reshape(4, 4) % 20
    mask = np.array([[1, 1, 1, 0]] * 4)
    x = {"input_ids": ids, "attention_mask": mask}
    topoxr_torch.ProbeRecorder(model, x, store_path, layers={"emb": {"reduce": "tokens"}}
                               ).record(0)
    again = topoxr_torch.ProbeRecorder(model, x, store_path,
                                       layers={"emb": {"reduce": "tokens"}})
    assert again.record(0) is None
    other = {"input_ids": ids, "attention_mask": np.ones((4, 4), np.int64)}
    with pytest.raises(RecordingError, match=r"layer 'emb' now gives samples the store does "
                                             r"not hold \(\[3, 7, 11, 15\]\)"):
        topoxr_torch.ProbeRecorder(model, other, store_path,
                                   layers={"emb": {"reduce": "tokens"}}).record(0)


def test_probe_recorder_into_an_open_writer_uses_the_writers_model(store_path):
    x, y = models.load_digits_data()
    model = models.make_model("mlp")
    with ActivationWriter(store_path, model="kept") as writer:
        probe = topoxr_torch.ProbeRecorder(model, (x[:30], y[:30]), writer,
                                           model_name="ignored", layers="out")
        probe.record(0)
        assert probe.recorded_epochs == [0]
        assert probe.record(0) is None
        probe.record(1)
        assert probe.recorded_epochs == [0, 1]
    tree = open_store(store_path)
    assert list(tree.children) == ["kept"]
    np.testing.assert_array_equal(tree["kept/out"].epoch, [0, 1])


def test_training_is_deterministic():
    x, y = models.load_digits_data()
    runs = []
    for _ in range(2):
        model = models.make_model("mlp", seed=4)
        models.train(model, x[:200], y[:200], epochs=1, seed=7)
        runs.append(model.fc1.weight.detach().clone())
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_outputs_moved_to_cpu(digits, store_path):
    x, y = digits
    model = models.make_model("cnn").cuda()
    topoxr_torch.record(model, (x, y), store_path, layers="conv1", progress=False)
    cpu = models.make_model("cnn")
    cpu.load_state_dict({k: v.cpu() for k, v in model.state_dict().items()})
    topoxr_torch.record(cpu, (x, y), store_path, model_name="cpu", layers="conv1",
                        progress=False)
    tree = open_store(store_path)
    np.testing.assert_allclose(tree["model/conv1"].activation, tree["cpu/conv1"].activation,
                               atol=1e-5)


def test_train_and_record_for_the_demo(store_path):
    models.train_and_record("cnn", store_path, epochs=1, probe_size=40)
    ds = open_store(store_path)["cnn_torch/conv2"].to_dataset().load()
    n = len(models.load_digits_data()[1])
    np.testing.assert_array_equal(ds.sample, np.arange(n - 40, n))  # held-out digits
    np.testing.assert_array_equal(ds.epoch, [0, 1])
    assert sorted(open_store(store_path)["cnn_torch"].children) == sorted(
        models.RECORDED_LAYERS["cnn"])


_MEMORY_SCRIPT = r'''
import json, sys
import numpy as np, torch
import topoxr_torch

torch.manual_seed(0)
# every batch of 64 makes maps of 16.7 MB: under glibc's largest mmap threshold, so the
# framework takes them from the heap and frees them again, batch after batch
model = torch.nn.Sequential(
    torch.nn.Conv2d(3, 64, 3, padding=1), torch.nn.BatchNorm2d(64), torch.nn.ReLU(),
    torch.nn.Conv2d(64, 64, 3, padding=1), torch.nn.ReLU(),
    torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(64, 10)).eval()
n, batch = 64 * 40, 64
x = np.random.default_rng(0).standard_normal((n, 3, 32, 32), dtype=np.float32)
y = np.arange(n) % 10
rss = []
forward = model.forward

def measured(*args, **kwargs):
    out = forward(*args, **kwargs)
    with open("/proc/self/statm") as f:
        rss.append(int(f.read().split()[1]) * 4096)
    return out

model.forward = measured
topoxr_torch.record(model, (x, y), sys.argv[1], model_name="convnet",
                    layers=[str(i) for i in range(8)], batch_size=batch, progress=False)
print(json.dumps(rss))
'''


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"),
                    reason="reads the resident set size from /proc")
def test_recording_memory_stays_flat_from_batch_to_batch(tmp_path):
    """Memory does not grow with the probe set: a batch's arrays are released in time.

    Held by the recording loop (or the capture, or the writer thread) while the next
    batch runs, a batch's arrays split the heap memory torch frees and takes again at
    every batch; glibc then took fresh memory for each batch's maps: 64-80 MB per batch
    of 64 here (2.2-2.4 GB over the last 32 batches, in 3 of 3 runs before the fix),
    and 3.5 GB for 4096 samples of the benchmark's ResNet-18. The pooled activations
    kept until the end are 2560 x 458 x 4 bytes (4.7 MB). With the fix the heap still
    moves by a map now and then (16.7 MB steps, up and down: one clean-clone run grew by
    five maps, 83 MB, from a dip at batch 8), so the growth is taken from the median of
    batches 6-11 to the largest of the last 8, and bounded by 128 MB (under eight maps,
    a seventeenth of the growth before the fix).
    """
    path = tmp_path / "memory.zarr"
    result = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, str(path)],
                            capture_output=True, text=True, timeout=300, check=True)
    rss = np.array(json.loads(result.stdout.strip().splitlines()[-1])) / 2**20
    assert len(rss) == 40  # one forward pass per batch (the plans are made in the first)
    growth = rss[-8:].max() - np.median(rss[6:12])
    assert growth < 128, (f"resident memory grew by {growth:.0f} MB from batches 6-11 to "
                          f"the last 8: {np.round(rss).astype(int).tolist()}")
    stored = open_store(path)["convnet"]
    assert stored["7"].activation.shape == (10, 64 * 40, 1)


# -- what the capture decided and pooled reaches the store ----------------------------------
def test_stored_axis_rule_is_the_one_the_capture_decided(store_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(2),
                              torch.nn.Linear(25, 6))
    x = torch.randn(5, 3, 7, 7)
    topoxr_torch.record(net, x, store_path, layers=["0", "1", "3"], progress=False)
    with topoxr_torch.recorder.capture(net, ["0", "1", "3"]) as cap:
        cap(x)
    tree = open_store(store_path)
    for name in ("0", "1", "3"):
        assert tree[f"model/{name}"].to_dataset().attrs["topoxr_axis_rule"] == cap.rules[name]
    assert "Conv2d" in cap.rules["0"]
    with torch.no_grad():
        conv = net[0](x)
        fc = net(x)
    np.testing.assert_allclose(tree["model/0"].activation.values[..., 0].T,
                               conv.mean((2, 3)).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(tree["model/3"].activation.values[..., 0].T,
                               fc.mean(1).numpy(), rtol=1e-5, atol=1e-6)


class _ChannelsLast(torch.nn.Module):
    """A conv map (N, C, H, W), then a Linear over its channels last (N, H, W, C)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3)
        self.fc = torch.nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(self.conv(x).permute(0, 2, 3, 1)).mean((1, 2))


@pytest.mark.parametrize("reduce", ["mean", "max"])
def test_maps_pooled_by_the_capture_keep_their_neuron_axis(store_path, reduce):
    """The capture pools a map over every axis but the neurons' and hands (N, neurons, 1)
    over: the neurons are then on axis 1 whichever axis held them in the map (a
    channel_axis=2 or 3 of (N, C, H, W), or a channels-last output), not one neuron
    holding the whole map's mean, nor a refusal after the model group was made."""
    torch.manual_seed(0)
    net = _ChannelsLast()
    x = torch.randn(6, 3, 9, 7)  # conv: (6, 8, 7, 5)
    for name, layers in (("h", {"conv": {"channel_axis": 2}}),
                         ("w", {"conv": {"channel_axis": 3}}), ("last", ["fc"])):
        topoxr_torch.record(net, x, store_path, model_name=name, layers=layers, reduce=reduce,
                            progress=False)
    with torch.no_grad():
        conv = net.conv(x)
        fc = net.fc(conv.permute(0, 2, 3, 1))

    def pool(t, dims):
        return (t.mean(dims) if reduce == "mean" else t.amax(dims)).numpy()

    tree = open_store(store_path)
    for path, expected in (("h/conv", pool(conv, (1, 3))), ("w/conv", pool(conv, (1, 2))),
                           ("last/fc", pool(fc, (1, 2)))):
        stored = tree[path].activation.isel(epoch=0).transpose("sample", "neuron").values
        assert stored.shape == expected.shape, path
        np.testing.assert_allclose(stored, expected, rtol=1e-5, atol=1e-6, err_msg=path)


# -- default predictions ------------------------------------------------------------------
class _SigmoidHead(torch.nn.Module):
    def __init__(self, how):
        super().__init__()
        self.fc1 = torch.nn.Linear(4, 8)
        self.fc2 = torch.nn.Linear(8, 1)
        self.act = torch.nn.Sigmoid()
        self.how = how

    def forward(self, x):
        h = self.fc1(x)
        if self.how == "gate":  # an nn.Sigmoid inside, logits out
            return self.fc2(h * self.act(h))
        if self.how == "functional":
            return torch.sigmoid(self.fc2(h))
        return self.act(self.fc2(h))


def _binary_probe(n=60):
    torch.manual_seed(1)
    x = torch.randn(n, 4)
    return x, (x[:, 0] > 0).long().numpy()


@pytest.mark.parametrize("kind", ["sequential", "module"])
def test_sigmoid_output_predictions_are_thresholded_at_one_half(store_path, kind):
    """A binary classifier ending in nn.Sigmoid: class 1 where the probability is over
    0.5; over 0 (for logits) made every prediction 1."""
    import warnings

    x, y = _binary_probe()
    torch.manual_seed(0)
    net = (torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1),
                               torch.nn.Sigmoid())
           if kind == "sequential" else _SigmoidHead("module"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        topoxr_torch.record(net, (x, y), store_path, layers=["0" if kind == "sequential"
                                                             else "fc1"],
                            batch_size=16, progress=False)
    with torch.no_grad():
        expected = (net(x)[:, 0] > 0.5).long().numpy()
    assert 0 < expected.sum() < len(y)
    ds = store_snapshot(store_path)
    (layer,) = ds.values()
    np.testing.assert_array_equal(layer.prediction.values[:, 0], expected)
    np.testing.assert_array_equal(layer.correct.values[:, 0], expected == y)
    assert all(not m._forward_hooks for m in net.modules())


def test_one_column_not_known_as_a_probability_is_taken_for_logits(tmp_path):
    """torch.sigmoid in forward is not seen: logits' threshold 0 and a warning, as the
    column lies in [0, 1]; an nn.Sigmoid inside the model whose output is not the model's
    does not make logits probabilities (threshold 0, no warning)."""
    import warnings

    x, y = _binary_probe()
    torch.manual_seed(0)
    net = _SigmoidHead("functional")
    with pytest.warns(UserWarning, match=r"looks like probabilities.*predict="):
        topoxr_torch.record(net, (x, y), str(tmp_path / "f.zarr"), layers="fc1",
                            progress=False)
    got = open_store(str(tmp_path / "f.zarr"))["model/fc1"].prediction.values[:, 0]
    np.testing.assert_array_equal(got, np.ones(len(y)))
    torch.manual_seed(0)
    net = _SigmoidHead("gate")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        topoxr_torch.record(net, (x, y), str(tmp_path / "g.zarr"), layers="fc1",
                            progress=False)
    with torch.no_grad():
        expected = (net(x)[:, 0] > 0).long().numpy()
    assert 0 < expected.sum() < len(y)
    got = open_store(str(tmp_path / "g.zarr"))["model/fc1"].prediction.values[:, 0]
    np.testing.assert_array_equal(got, expected)


def test_string_labels_get_no_default_predictions(store_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3))
    x = torch.randn(12, 4)
    with torch.no_grad():
        out = net(x).numpy()
    y = np.array(["cat", "dog", "eel"])[out.argmax(1)]  # the names of the predicted classes
    with pytest.warns(UserWarning, match=r"not integers \(dtype <U3\).*predict="):
        topoxr_torch.record(net, (x, y), store_path, layers=["0"], progress=False)
    ds = open_store(store_path)["model/0"].to_dataset().load()
    assert "prediction" not in ds and "correct" not in ds
    np.testing.assert_array_equal(ds.label, y)
    np.testing.assert_allclose(ds.activation.values[..., 0].T, out, rtol=1e-5, atol=1e-6)
    named = store_path.replace(".zarr", "-named.zarr")  # predict= returns class names
    topoxr_torch.record(net, (x, y), named, layers=["0"], progress=False,
                        predict=lambda logits: np.array(["cat", "dog", "eel"])[logits.argmax(1)])
    assert bool(open_store(named)["model/0"].correct.all())


# -- data loaders that do not yield every sample in one order -----------------------------
def _loaders():
    data = torch.utils.data
    ds = data.TensorDataset(torch.randn(10, 4))
    return {
        "SubsetRandomSampler": {"batch_size": 4,
                                "sampler": data.SubsetRandomSampler(range(10))},
        "WeightedRandomSampler": {"batch_size": 4,
                                  "sampler": data.WeightedRandomSampler([1.0] * 10, 10)},
        "RandomSampler": {  # under a batch sampler
            "batch_sampler": data.BatchSampler(data.RandomSampler(ds), 4, False)},
        "DistributedSampler with shuffle=True": {
            "batch_size": 4,
            "sampler": data.distributed.DistributedSampler(ds, num_replicas=1, rank=0)},
    }, ds


@pytest.mark.parametrize("name", list(_loaders()[0]))
def test_random_samplers_are_refused_before_writing(store_path, name):
    kwargs, ds = _loaders()
    loader = torch.utils.data.DataLoader(ds, **kwargs[name])
    with pytest.raises(RecordingError, match=rf"random order \({name}\).*shuffle=False"):
        topoxr_torch.record(torch.nn.Sequential(torch.nn.Linear(4, 6)), loader, store_path,
                            layers=["0"], progress=False)
    assert store_snapshot(store_path) == {}


def test_a_distributed_sampler_without_shuffle_is_recorded(store_path):
    data = torch.utils.data
    torch.manual_seed(0)
    x = torch.randn(10, 4)
    net = torch.nn.Sequential(torch.nn.Linear(4, 6))
    ds = data.TensorDataset(x)
    loader = data.DataLoader(ds, batch_size=4, sampler=data.distributed.DistributedSampler(
        ds, num_replicas=1, rank=0, shuffle=False))
    topoxr_torch.record(net, loader, store_path, layers=["0"], progress=False)
    with torch.no_grad():
        expected = net(x).numpy()
    np.testing.assert_allclose(open_store(store_path)["model/0"].activation.values[..., 0].T,
                               expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("labels", [False, True])
@pytest.mark.parametrize("how", ["loader", "batch_sampler"])
def test_drop_last_is_refused_before_writing(store_path, labels, how):
    """drop_last leaves the last 2 of 10 samples out: refused up front, with or without
    labels=, rather than 8 samples at epoch 0 and a wrong count at epoch 1."""
    data = torch.utils.data
    ds = data.TensorDataset(torch.randn(10, 4))
    loader = (data.DataLoader(ds, batch_size=4, drop_last=True) if how == "loader" else
              data.DataLoader(ds, batch_sampler=data.BatchSampler(
                  data.SequentialSampler(ds), 4, drop_last=True)))
    with pytest.raises(RecordingError, match=r"drop_last=True.*every sample.*drop_last=False"):
        topoxr_torch.record(torch.nn.Sequential(torch.nn.Linear(4, 3)), loader, store_path,
                            layers=["0"], labels=np.arange(10) % 2 if labels else None,
                            progress=False)
    assert store_snapshot(store_path) == {}


# -- per-token layers need one padded length ------------------------------------------------
class _TokenNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(20, 6)
        self.fc = torch.nn.Linear(6, 4)

    def forward(self, input_ids, attention_mask):
        return self.fc(self.emb(input_ids)).mean(1)


def _padded(length=None):
    """A collate function padding to ``length``, or to each batch's longest sequence."""
    def collate(rows):
        t = length or max(map(len, rows))
        ids = torch.zeros(len(rows), t, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, row in enumerate(rows):
            ids[i, :len(row)] = torch.as_tensor(row)
            mask[i, :len(row)] = 1
        return {"input_ids": ids, "attention_mask": mask}
    return collate


def test_tokens_of_batches_padded_to_other_lengths_are_refused(store_path, tmp_path):
    """Token t of input s is sample s * T + t: with T = 6 in the first batch and 3 in the
    second, input 2's token 0 and input 4's token 0 would both be 12. Refused at the
    second batch, before it is written (a StoreError half-way before); padded to one
    length, the same data is recorded."""
    rng = np.random.default_rng(0)
    seqs = [rng.integers(1, 20, n) for n in (6, 2, 3, 1, 3, 2, 3, 1)]
    torch.manual_seed(0)
    net = _TokenNet()
    layers = {"fc": {"reduce": "tokens"}}
    loader = torch.utils.data.DataLoader(seqs, batch_size=4, collate_fn=_padded())
    with pytest.raises(RecordingError, match=r"padded length.*6 in the first batch but 3 in "
                                             r"the batch of samples 4\.\.7.*max_length"):
        topoxr_torch.record(net, loader, store_path, layers=layers, progress=False)
    # what stays: at most the first batch (written at once for per-token layers)
    for ds in store_snapshot(store_path).values():
        assert set(ds.input.values.tolist()) <= {0, 1, 2, 3}
        assert not bool(ds.epoch_complete.any())
    fixed = str(tmp_path / "fixed.zarr")
    loader = torch.utils.data.DataLoader(seqs, batch_size=4, collate_fn=_padded(6))
    topoxr_torch.record(net, loader, fixed, layers=layers, progress=False)
    ds = open_store(fixed)["model/fc"].to_dataset().load()
    src = np.repeat(np.arange(8), [len(s) for s in seqs])
    pos = np.concatenate([np.arange(len(s)) for s in seqs])
    np.testing.assert_array_equal(ds.sample, src * 6 + pos)
    with torch.no_grad():
        expected = net.fc(net.emb(torch.as_tensor(np.concatenate(seqs)))).numpy()
    np.testing.assert_allclose(ds.activation.values[..., 0].T, expected, rtol=1e-5, atol=1e-6)


# -- a recording that is the model's first forward pass leaves it trainable -----------------
class _CachedTable(torch.nn.Module):
    """Builds a table on its first forward pass and keeps it (as rotary embeddings do)."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 3)
        self.table = None

    def forward(self, x):
        if self.table is None:
            self.table = torch.linspace(0.5, 1.0, 3)
        return self.fc(x) * self.table


def _sgd_steps(net, x, y, steps=3):
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    net.train()
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    net.eval()


def test_recording_a_models_first_forward_pass_leaves_it_trainable(store_path):
    """A LazyLinear materialises its weight in the first forward pass, here the
    recording's: the weight must train afterwards (under inference_mode it became an
    inference tensor, got no gradient and never changed, without an error), and a tensor
    a module keeps from its first pass must not break the training's backward pass. The
    stored epochs are the model's outputs before and after the training steps."""
    torch.manual_seed(0)
    x, y = torch.randn(32, 4), torch.arange(32) % 3
    net = torch.nn.Sequential(torch.nn.LazyLinear(8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    probe = topoxr_torch.ProbeRecorder(net, (x.numpy(), y.numpy()), store_path,
                                       model_name="lazy", layers=["0"])
    probe.record(0)
    assert not net[0].weight.is_inference()
    before = net[0].weight.detach().clone()
    with torch.no_grad():
        want0 = net[0](x).numpy()
    _sgd_steps(net, x, y)
    assert net[0].weight.grad is not None
    assert not torch.equal(before, net[0].weight.detach())
    probe.record(1)
    with torch.no_grad():
        want1 = net[0](x).numpy()
    ds = open_store(store_path)["lazy/0"].to_dataset().load()
    for epoch, want in ((0, want0), (1, want1)):
        got = ds.activation.sel(epoch=epoch).transpose("sample", "neuron")
        np.testing.assert_allclose(got.values[np.argsort(got.sample.values)], want,
                                   rtol=1e-5, atol=1e-6)
    cached = _CachedTable()
    topoxr_torch.ProbeRecorder(cached, (x.numpy(), y.numpy()), store_path, model_name="cache",
                               layers=["fc"]).record(0)
    assert not cached.table.is_inference()
    before = cached.fc.weight.detach().clone()
    _sgd_steps(cached, x, y)  # raised "Inference tensors cannot be saved for backward"
    assert not torch.equal(before, cached.fc.weight.detach())


# -- a sampler that yields part of the dataset -------------------------------------------
def _partial_loaders(ds):
    data = torch.utils.data
    return {
        "DistributedSampler": (data.DataLoader(ds, batch_size=2, sampler=(
            data.distributed.DistributedSampler(ds, num_replicas=2, rank=1, shuffle=False))),
            [1, 3, 5, 7, 9]),
        "index list": (data.DataLoader(ds, batch_size=2, sampler=[8, 6, 4, 2, 0]),
                       [8, 6, 4, 2, 0]),
        "BatchSampler": (data.DataLoader(ds, batch_sampler=data.BatchSampler(
            [9, 0, 5], batch_size=2, drop_last=False)), [9, 0, 5]),
    }


@pytest.mark.parametrize("name", ["DistributedSampler", "index list", "BatchSampler"])
def test_a_sampler_yielding_part_of_the_dataset_records_every_epoch(store_path, name):
    """The samples are the ones the sampler yields (one DistributedSampler replica,
    indices), numbered by position; the probe set was taken as the whole dataset, so
    epoch 0 stored 5 of 10 samples and every later epoch was refused."""
    torch.manual_seed(0)
    x, y = torch.randn(10, 4), torch.arange(10) % 3
    net = torch.nn.Sequential(torch.nn.Linear(4, 6))
    loader, order = _partial_loaders(torch.utils.data.TensorDataset(x, y))[name]
    for epoch in (0, 1):
        result = topoxr_torch.record(net, loader, store_path, layers=["0"], epoch=epoch,
                                     progress=False)
        assert result.samples == len(order)
        with torch.no_grad():
            net[0].weight.add_(0.5)  # another epoch, other values
    ds = open_store(store_path)["model/0"].to_dataset().load()
    np.testing.assert_array_equal(ds.epoch, [0, 1])
    assert bool(ds.epoch_complete.all())
    np.testing.assert_array_equal(ds.sample, np.arange(len(order)))
    np.testing.assert_array_equal(ds.label, y[order].numpy())
    with torch.no_grad():
        weight = net[0].weight.detach().numpy()
        bias = net[0].bias.detach().numpy()
    xs = x[order].numpy()
    for epoch, shift in ((0, 1.0), (1, 0.5)):  # the weight each epoch was recorded with
        want = xs @ (weight - shift).T + bias
        got = ds.activation.sel(epoch=epoch).transpose("sample", "neuron").values
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


_KILLED_WHILE_LOGGING = r'''
import os, signal, sys
import topoxr_torch
from topoxr.store import ActivationWriter
from topoxr_torch.models import load_digits_data, make_model

x, y = load_digits_data()
recorder = topoxr_torch.ProbeRecorder(make_model("mlp", seed=0), (x[:64], y[:64]),
                                      sys.argv[1], model_name="mlp", layers=["fc1"])
recorder.record(0, loss=1.0)
log_epoch = ActivationWriter.log_epoch

def killed(self, epoch, **scalars):  # the process dies as it stores epoch 1's scalars
    if epoch == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return log_epoch(self, epoch, **scalars)

ActivationWriter.log_epoch = killed
recorder.record(1, loss=2.0)
'''


def test_scalars_are_stored_before_the_epoch_is_marked_complete(store_path):
    """A process killed between completing an epoch and storing its scalars left the
    epoch complete without its loss, and the resumed run skipped it (loss NaN for good).
    The scalars now come first: the epoch stays incomplete and is recorded again."""
    result = subprocess.run([sys.executable, "-c", _KILLED_WHILE_LOGGING, store_path],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == -9, result.stderr
    x, y = models.load_digits_data()
    recorder = topoxr_torch.ProbeRecorder(models.make_model("mlp", seed=0), (x[:64], y[:64]),
                                          store_path, model_name="mlp", layers=["fc1"])
    assert recorder.record(1, loss=2.0) is not None  # recorded, not skipped
    ds = open_store(store_path)["mlp/fc1"].to_dataset()
    np.testing.assert_array_equal(ds["loss"].values, [1.0, 2.0])
    assert ds["epoch_complete"].values.tolist() == [True, True]


def test_scalars_given_as_tensors_or_arrays_are_stored(store_path):
    """A loss tensor passed straight from the training loop (stored before the check up
    front of this session, which refused it)."""
    torch = pytest.importorskip("torch")
    x, y = models.load_digits_data()
    recorder = topoxr_torch.ProbeRecorder(models.make_model("mlp", seed=0), (x[:64], y[:64]),
                                          store_path, model_name="mlp", layers=["fc1"])
    recorder.record(0, loss=torch.tensor(0.25), accuracy=np.array(0.5), step=np.int64(3))
    ds = open_store(store_path)["mlp/fc1"].to_dataset()
    assert (float(ds["loss"][0]), float(ds["accuracy"][0]), float(ds["step"][0])) == (
        0.25, 0.5, 3.0)
    with pytest.raises(RecordingError, match="must be a real number"):
        recorder.record(1, loss=True)


@pytest.mark.parametrize(("scalars", "match"), [
    ({"loss": None}, "epoch scalar 'loss' must be a real number"),
    ({"label": 0.5}, "'label' cannot be an epoch scalar name"),
])
def test_bad_scalars_are_refused_before_the_epoch_is_recorded(store_path, scalars, match):
    """They were refused after the epoch was marked complete: the resumed run skipped it."""
    x, y = models.load_digits_data()
    recorder = topoxr_torch.ProbeRecorder(models.make_model("mlp", seed=0), (x[:64], y[:64]),
                                          store_path, model_name="mlp", layers=["fc1"])
    recorder.record(0, loss=1.0)
    with pytest.raises(RecordingError, match=match):
        recorder.record(1, **scalars)
    assert open_store(store_path)["mlp/fc1"].sizes["epoch"] == 1
    recorder.record(1, loss=0.5)
    np.testing.assert_array_equal(open_store(store_path)["mlp/fc1"]["loss"].values, [1.0, 0.5])
