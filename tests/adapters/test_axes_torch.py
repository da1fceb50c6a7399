"""Which axis of a torch layer's output holds the neurons, and which the samples.

Every test records a real model into a store, reads it back with ``open_store`` and
compares the stored values with a reduction of the layer's output captured here by a
plain torch forward hook.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import topoxr_torch

from topoxr.recording import RecordingError
from topoxr.testing.adapters import stored_layer

nn = torch.nn
RTOL = ATOL = 1e-5


def hooked(model, names, x):
    """The raw outputs of ``names`` (their first tensor) on ``x``, by plain torch hooks."""
    out = {}
    modules = dict(model.named_modules())

    def make(name):
        def hook(module, args, output):
            t = output[0] if isinstance(output, tuple) else output
            out[name] = t.detach().numpy().copy()
        return hook

    handles = [modules[name].register_forward_hook(make(name)) for name in names]
    model.eval()
    with torch.no_grad():
        model(torch.from_numpy(x))
    for h in handles:
        h.remove()
    return out


def values(ds):
    """``(sample, neuron)`` values of the first epoch."""
    return ds.activation.isel(epoch=0).transpose("sample", "neuron").values


# -- modules without a rule of their own follow their input ---------------------------
class TokensAfterConv(nn.Module):
    """A Conv1d whose (N, C, L) output is transposed to (N, L, C) before a GELU; the
    blocks return such a transposed activation, and a residual sum of a conv."""

    class Transposing(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(16, 16, 3, padding=1)

        def forward(self, x):
            return nn.functional.gelu(self.conv(x).transpose(1, 2))

    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(16, 16, 3, padding=1)

        def forward(self, x):
            return torch.relu(self.conv(x) + x)

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(3, 16, 3, padding=1)
        self.act = nn.GELU()
        self.residual = self.Residual()
        self.transposing = self.Transposing()
        self.fc = nn.Linear(16, 2)

    def forward(self, x):
        h = self.conv(x)
        a = self.act(h.transpose(1, 2))  # (N, L, 16): hidden units last
        t = self.transposing(self.residual(h))  # (N, L, 16)
        return self.fc(a.mean(1) + t.mean(1))


def test_an_activation_of_a_transposed_conv_output_keeps_its_hidden_units(store_path):
    """With as many positions as channels (L == C == 16) the GELU's output has the conv's
    shape; it is recorded along its last axis (the conv's channels), not axis 1."""
    torch.manual_seed(0)
    model = TokensAfterConv().eval()
    x = np.random.default_rng(0).normal(size=(6, 3, 16)).astype(np.float32)
    names = ["conv", "act", "residual", "transposing"]
    topoxr_torch.record(model, x, store_path, layers=names, progress=False)
    raw = hooked(model, names, x)
    for name, axis in (("conv", 1), ("act", 2), ("residual", 1), ("transposing", 2)):
        ds = stored_layer(store_path, "model", name)
        assert ds.attrs["topoxr_neuron_axis"] == axis, name
        other = 3 - axis  # the position axis, averaged
        np.testing.assert_allclose(values(ds), raw[name].mean(other), rtol=RTOL, atol=ATOL,
                                   err_msg=name)


# -- a type's rule is checked against the module's own sizes --------------------------
class LayerNorm2d(nn.LayerNorm):
    """torchvision ConvNeXt's LayerNorm2d: (N, C, H, W) in and out."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = nn.functional.layer_norm(x, self.normalized_shape, self.weight, self.bias,
                                     self.eps)
        return x.permute(0, 3, 1, 2)


class ConvNeXtLike(nn.Module):
    """A conv, a channels-first LayerNorm2d, and a Linear on the channels-last map."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.ln = LayerNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(self.ln(self.conv(x)).permute(0, 2, 3, 1)).mean((1, 2))


def test_layernorm_subclass_returning_nchw_and_linear_on_nhwc(store_path):
    """The LayerNorm2d's (N, 8, 7, 5) output keeps its 8 channels (axis 1), not its 5
    columns; the Linear on the (N, 7, 5, 8) map keeps its 5 units (the last axis)."""
    torch.manual_seed(1)
    model = ConvNeXtLike().eval()
    x = np.random.default_rng(1).normal(size=(6, 3, 9, 7)).astype(np.float32)
    topoxr_torch.record(model, x, store_path, layers=["ln", "fc"], progress=False)
    raw = hooked(model, ["ln", "fc"], x)
    ln = stored_layer(store_path, "model", "ln")
    assert ln.sizes["neuron"] == 8 and ln.attrs["topoxr_neuron_axis"] == 1
    assert "LayerNorm2d" in ln.attrs["topoxr_axis_rule"]
    np.testing.assert_allclose(values(ln), raw["ln"].mean((2, 3)), rtol=RTOL, atol=ATOL)
    fc = stored_layer(store_path, "model", "fc")
    assert fc.sizes["neuron"] == 5 and fc.attrs["topoxr_neuron_axis"] == 3
    np.testing.assert_allclose(values(fc), raw["fc"].mean((1, 2)), rtol=RTOL, atol=ATOL)


class HeadsLinear(nn.Linear):
    """A Linear subclass returning its 8 units split into (N, 2 heads, 4)."""

    def forward(self, x):
        return super().forward(x).reshape(len(x), 2, 4)


def test_a_subclass_whose_output_fits_no_rule_is_refused_unless_channel_axis_is_set(
        store_path):
    torch.manual_seed(2)
    model = nn.Sequential(HeadsLinear(6, 8), nn.Flatten(), nn.Linear(8, 2)).eval()
    x = np.random.default_rng(2).normal(size=(5, 6)).astype(np.float32)
    with pytest.raises(RecordingError, match=r"layer '0' \(HeadsLinear\).*out_features is 8"
                                             r".*\{'0': \{'channel_axis': k\}\}"):
        topoxr_torch.record(model, x, store_path, layers=["0"], progress=False)
    assert not os.path.exists(store_path)
    topoxr_torch.record(model, x, store_path, layers={"0": {"channel_axis": 1}},
                        progress=False)
    ds = stored_layer(store_path, "model", "0")
    assert ds.attrs["topoxr_axis_rule"] == "channel_axis set by the user"
    np.testing.assert_allclose(values(ds), hooked(model, ["0"], x)["0"].mean(2),
                               rtol=RTOL, atol=ATOL)


# -- the samples are the batch: sequence-first outputs --------------------------------
class SequenceFirst(nn.Module):
    """Takes (N, T, 8); runs torch's default (batch_first=False) modules on (T, N, 8)."""

    def __init__(self):
        super().__init__()
        self.enc = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0)
        self.lstm = nn.LSTM(8, 6)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        h = self.enc(x.transpose(0, 1))  # (T, N, 8)
        o, _ = self.lstm(h)  # (T, N, 6)
        return self.fc(self.drop(o)[-1])


def test_sequence_first_outputs_are_recorded_per_input(store_path):
    """(T, N, ...) outputs of a transformer layer, an LSTM and a dropout after it are
    recorded as (N, T, ...): per input, the mean over its steps, or its last step."""
    torch.manual_seed(3)
    model = SequenceFirst().eval()
    x = np.random.default_rng(3).normal(size=(8, 5, 8)).astype(np.float32)  # N=8, T=5
    layers = {"enc": {}, "lstm": {"reduce": "last"}, "drop": {}}
    topoxr_torch.record(model, x, store_path, layers=layers, batch_size=4, progress=False)
    raw = hooked(model, list(layers), x)
    enc, lstm, drop = (stored_layer(store_path, "model", name) for name in layers)
    assert enc.sizes == {"sample": 8, "neuron": 8, "epoch": 1}
    np.testing.assert_allclose(values(enc), raw["enc"].mean(0), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(values(lstm), raw["lstm"][-1], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(values(drop), raw["drop"].mean(0), rtol=RTOL, atol=ATOL)


def test_sequence_first_output_with_as_many_steps_as_inputs_is_refused(store_path):
    """With N == T the batch may be either axis: refused, not read along axis 0."""
    torch.manual_seed(4)
    model = SequenceFirst().eval()
    x = np.random.default_rng(4).normal(size=(5, 5, 8)).astype(np.float32)
    with pytest.raises(RecordingError, match=r"layer 'enc'.*\(5, 5, 8\).*batch_first"):
        topoxr_torch.record(model, x, store_path, layers=["enc"], progress=False)
    assert not os.path.exists(store_path)


class SequenceFirstHead(nn.Module):
    """A Linear and a LayerNorm on the (T, N, 6) output of a batch_first=False LSTM."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(5, 6)
        self.fc = nn.Linear(6, 3)
        self.norm = nn.LayerNorm(3)

    def forward(self, x):
        o, _ = self.lstm(x.transpose(0, 1))  # (T, N, 6)
        return self.norm(self.fc(o)).mean(0)  # fc, norm: (T, N, 3)


def test_modules_of_their_own_rule_after_a_sequence_first_output_keep_its_axes(store_path):
    """A Linear after a sequence-first LSTM was read as (N, T, 3): refused where T != N
    ("its first axis is not the batch"), and with T == N its steps stored as samples."""
    torch.manual_seed(5)
    model = SequenceFirstHead().eval()
    x = np.random.default_rng(5).normal(size=(16, 8, 5)).astype(np.float32)  # N=16, T=8
    layers = {"fc": {"reduce": "last"}, "norm": {}}
    topoxr_torch.record(model, x, store_path, layers=layers, batch_size=4, progress=False)
    raw = hooked(model, list(layers), x)
    fc, norm = (stored_layer(store_path, "model", name) for name in layers)
    np.testing.assert_allclose(values(fc), raw["fc"][-1], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(values(norm), raw["norm"].mean(0), rtol=RTOL, atol=ATOL)
    assert "recorded as (N, T, ...)" in fc.attrs["topoxr_axis_rule"]


def test_a_sequence_first_head_with_as_many_steps_as_inputs_is_refused(tmp_path):
    torch.manual_seed(5)
    model = SequenceFirstHead().eval()
    x = np.random.default_rng(5).normal(size=(16, 8, 5)).astype(np.float32)
    path = str(tmp_path / "run.zarr")
    with pytest.raises(RecordingError, match=r"layer 'fc'.*\(8, 8, 3\).*batch_first"):
        topoxr_torch.record(model, x, path, layers=["fc"], batch_size=8, progress=False)
    assert not os.path.exists(path)


class SequenceFirstThroughAnOp(nn.Module):
    """A Linear on the (T, N, 6) output of a batch_first=False LSTM, an elementwise op
    (no module) between them, or a transpose back to batch-first (``batch_first_again``)."""

    def __init__(self, batch_first_again: bool = False):
        super().__init__()
        self.batch_first_again = batch_first_again
        self.lstm = nn.LSTM(5, 6)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        o, _ = self.lstm(x.transpose(0, 1))  # (T, N, 6)
        if self.batch_first_again:
            return self.fc(o.transpose(0, 1).contiguous() * 2.0).mean(1)  # fc: (N, T, 3)
        return self.fc(o * 2.0).mean(0)  # fc: (T, N, 3), its input no module's output


@pytest.mark.parametrize("batch_first_again", [False, True])
def test_a_module_after_an_op_on_a_sequence_first_output_with_as_many_steps_as_inputs_is_refused(
        tmp_path, batch_first_again):
    """``fc(lstm_out * 2)`` with T == N: the op hides where the output came from, and
    its (T, N, 3) steps were stored as samples (error 0.12 against the per-input
    values); either reading is possible from the shapes, so it is refused."""
    torch.manual_seed(5)
    model = SequenceFirstThroughAnOp(batch_first_again).eval()
    x = np.random.default_rng(5).normal(size=(16, 8, 5)).astype(np.float32)  # N=16, T=8
    path = str(tmp_path / "run.zarr")
    with pytest.raises(RecordingError, match=r"layer 'fc'.*\(8, 8, 3\) after the sequence-first "
                                             r"output.*'lstm'.*batch_size other than"):
        topoxr_torch.record(model, x, path, layers=["fc"], batch_size=8, progress=False)
    assert not os.path.exists(path)
    if batch_first_again:  # with T != N the batch-first reading is the one that fits
        topoxr_torch.record(model, x, path, layers={"fc": {"reduce": "last"}}, batch_size=4,
                            progress=False)
        raw = hooked(model, ["fc"], x)["fc"]  # (N, T, 3)
        np.testing.assert_allclose(values(stored_layer(path, "model", "fc")), raw[:, -1],
                                   rtol=RTOL, atol=ATOL)


class Recurrent(nn.Module):
    def __init__(self):
        super().__init__()
        self.gru = nn.GRU(4, 6, num_layers=2, batch_first=True)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        _, h_n = self.gru(x)
        return self.fc(h_n[-1])


def test_rnn_final_state_is_refused_and_its_output_sequence_recorded(store_path):
    """h_n is (layers, N, H): refused; the message's way, the output sequence's last
    step, gives the last layer's h_n per input."""
    torch.manual_seed(5)
    model = Recurrent().eval()
    x = np.random.default_rng(5).normal(size=(2, 5, 4)).astype(np.float32)  # N == layers
    with pytest.raises(RecordingError, match=r"layer 'gru' \(GRU\).*h_n.*'reduce': 'last'"):
        topoxr_torch.record(model, x, store_path, layers={"gru": {"output_key": 1}},
                            progress=False)
    assert not os.path.exists(store_path)
    topoxr_torch.record(model, x, store_path, layers={"gru": {"reduce": "last"}},
                        progress=False)
    with torch.no_grad():
        _, h_n = model.gru(torch.from_numpy(x))
    np.testing.assert_allclose(values(stored_layer(store_path, "model", "gru")), h_n[-1].numpy(),
                               rtol=RTOL, atol=ATOL)


class NotPerSample(nn.Module):
    """A block returning its (N, T, E) input transposed to (T, N, E)."""

    def forward(self, x):
        return x.transpose(0, 1)


def test_an_output_whose_first_axis_is_not_the_batch_is_refused(store_path):
    model = nn.Sequential(nn.Linear(4, 4), NotPerSample()).eval()
    x = np.random.default_rng(6).normal(size=(6, 3, 4)).astype(np.float32)
    with pytest.raises(RecordingError, match=r"layer '1' \(NotPerSample\) returned shape "
                                             r"\(3, 6, 4\) for a batch of 6 inputs"):
        topoxr_torch.record(model, x, store_path, layers=["0", "1"], progress=False)
    assert not os.path.exists(store_path)


# -- a module that permutes its input is not followed by a size coincidence -------------
class Permute(nn.Module):
    def __init__(self, *dims):
        super().__init__()
        self.dims = dims

    def forward(self, x):
        return x.permute(*self.dims)


class Transpose(nn.Module):
    def forward(self, x):
        return x.transpose(1, 2)


class PermuteCopy(Permute):
    def forward(self, x):
        return x.permute(*self.dims).contiguous()


def channels_last_block(c, permute=Permute):
    """A ConvNeXt-like block: conv, channels-last LayerNorm, Linear and GELU, back to
    (N, C, H, W), a ReLU."""
    return nn.Sequential(nn.Conv2d(2, c, 1), permute(0, 2, 3, 1), nn.LayerNorm(c),
                         nn.Linear(c, c), nn.GELU(), permute(0, 3, 1, 2), nn.ReLU()).eval()


@pytest.mark.parametrize("permute", [Permute, PermuteCopy])
@pytest.mark.parametrize("width", [6, 8])
def test_a_permuted_output_keeps_its_channels_whatever_its_sizes(store_path, width, permute):
    """The back-permuted map (N, 8, 5, W) and the ReLU after it keep their 8 channels
    (axis 1). With W == C == 8 the map was recorded along W, as its input's neuron axis
    (3, the channels last) has size 8 there too: silently the mean over the wrong axes."""
    torch.manual_seed(7)
    model = channels_last_block(8, permute)
    x = np.random.default_rng(7).normal(size=(5, 2, 5, width)).astype(np.float32)
    names = ["4", "5", "6"]
    topoxr_torch.record(model, x, store_path, layers=names, progress=False)
    raw = hooked(model, names, x)
    for name, axis in (("4", 3), ("5", 1), ("6", 1)):
        ds = stored_layer(store_path, "model", name)
        assert ds.attrs["topoxr_neuron_axis"] == axis, (name, ds.attrs["topoxr_axis_rule"])
        other = tuple(d for d in (1, 2, 3) if d != axis)
        np.testing.assert_allclose(values(ds), raw[name].mean(other), rtol=RTOL, atol=ATOL,
                                   err_msg=name)


class TransposingBlock(nn.Module):
    """A block returning its Linear's output transposed (a view of it)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 8)

    def forward(self, x):
        return self.fc(x).transpose(1, 2)


@pytest.mark.parametrize("block", [False, True])
@pytest.mark.parametrize("steps", [5, 8])
def test_a_transpose_module_moves_the_hidden_units(store_path, steps, block):
    """A Linear's (N, T, 8) output transposed by a module to (N, 8, T) (or a block
    returning it so): its hidden units are axis 1 then, and the ReLU after it keeps them.
    With T == 8 the transpose was taken to keep them last (the token axis recorded as
    neurons); with T == 5 the rank's rule took the 5 steps for neurons."""
    torch.manual_seed(8)
    model = (nn.Sequential(nn.Identity(), TransposingBlock(), nn.ReLU()) if block else
             nn.Sequential(nn.Linear(3, 8), Transpose(), nn.ReLU())).eval()
    x = np.random.default_rng(8).normal(size=(4, steps, 3)).astype(np.float32)
    _layers_1_and_2_keep_axis_1(model, x, store_path, 8)


def _layers_1_and_2_keep_axis_1(model, x, store_path, neurons):
    """Layers "1" and "2" of ``model`` recorded with their ``neurons`` on axis 1: the mean
    over axis 2 of each output, as a plain hook sees it."""
    names = ["1", "2"]
    topoxr_torch.record(model, x, store_path, layers=names, progress=False)
    raw = hooked(model, names, x)
    for name in names:
        ds = stored_layer(store_path, "model", name)
        assert ds.sizes["neuron"] == neurons and ds.attrs["topoxr_neuron_axis"] == 1, name
        np.testing.assert_allclose(values(ds), raw[name].mean(2), rtol=RTOL, atol=ATOL,
                                   err_msg=name)


class Chomp(nn.Module):
    """A TCN's Chomp1d: the last positions of a (N, C, L) conv output dropped."""

    def forward(self, x):
        return x[:, :, :-2].contiguous()


def test_a_module_cropping_positions_keeps_the_channels_it_follows(store_path):
    """A Conv1d's (N, 6, 12) output cropped to (N, 6, 10) (a copy), then a ReLU: both keep
    the conv's 6 channels, not the 10 positions a 3-D output's rank would give."""
    torch.manual_seed(9)
    model = nn.Sequential(nn.Conv1d(3, 6, 3, padding=1), Chomp(), nn.ReLU()).eval()
    x = np.random.default_rng(9).normal(size=(4, 3, 12)).astype(np.float32)
    _layers_1_and_2_keep_axis_1(model, x, store_path, 6)
