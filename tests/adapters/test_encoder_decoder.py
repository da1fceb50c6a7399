"""Encoder-decoder transformers: two token sequences, two attention masks.

A Hugging Face BART built from a small config (random weights) takes the encoder's
``input_ids``/``attention_mask`` and the decoder's ``decoder_input_ids``/
``decoder_attention_mask``. Every test compares the stored values with a numpy reduction
of the layer's output captured by a plain torch forward hook in the test.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import topoxr_torch  # noqa: E402
from topoxr.recording import RecordingError  # noqa: E402
from topoxr.testing.adapters import stored_layer  # noqa: E402

RTOL = ATOL = 1e-5
N, T = 10, 8
ENCODER, DECODER = "encoder.layers.0", "decoder.layers.0"


@pytest.fixture(scope="module")
def bart():
    torch.manual_seed(0)
    cfg = transformers.BartConfig(vocab_size=50, d_model=32, encoder_layers=1,
                                  decoder_layers=1, encoder_attention_heads=2,
                                  decoder_attention_heads=2, encoder_ffn_dim=64,
                                  decoder_ffn_dim=64, max_position_embeddings=32)
    return transformers.BartModel(cfg).eval()


@pytest.fixture(scope="module")
def inputs():
    # both sequences padded to the same length T, with other lengths per input: the
    # encoder's mask fits a decoder layer's shape, so only the setting tells them apart
    rng = np.random.default_rng(0)
    masks = [(np.arange(T)[None] < rng.integers(2, T + 1, N)[:, None]).astype(np.int64)
             for _ in range(2)]
    return {"input_ids": rng.integers(3, 50, (N, T)) * masks[0], "attention_mask": masks[0],
            "decoder_input_ids": rng.integers(3, 50, (N, T)) * masks[1],
            "decoder_attention_mask": masks[1]}


def hooked(model, names, x):
    out, handles = {}, []
    modules = dict(model.named_modules())
    def keep(name, output):
        tensor = output[0] if isinstance(output, tuple) else output
        out[name] = tensor.detach().numpy().copy()

    for name in names:
        handles.append(modules[name].register_forward_hook(
            lambda m, a, o, name=name: keep(name, o)))
    with torch.no_grad():
        model(**{k: torch.from_numpy(v) for k, v in x.items()})
    for h in handles:
        h.remove()
    return out


def test_a_layer_must_say_which_sequence_its_tokens_follow(bart, inputs, store_path):
    with pytest.raises(RecordingError, match=r"layer 'decoder.layers.0': the inputs hold two "
                                             r"token sequences.*'decoder_attention_mask'"):
        topoxr_torch.record(bart, inputs, store_path, layers=[DECODER], progress=False)
    with pytest.raises(RecordingError, match=r"mask 'target_mask' is not among the inputs"):
        topoxr_torch.record(bart, inputs, store_path, progress=False,
                            layers={DECODER: {"mask": "target_mask"}})


@pytest.mark.parametrize("reduce", ["mean", "first", "last"])
def test_each_layer_follows_its_own_sequences_mask(bart, inputs, store_path, reduce):
    masks = {ENCODER: "attention_mask", DECODER: "decoder_attention_mask"}
    topoxr_torch.record(bart, inputs, store_path, progress=False, batch_size=4,
                        layers={k: {"reduce": reduce, "mask": v} for k, v in masks.items()})
    raw = hooked(bart, list(masks), inputs)
    rows = np.arange(N)
    for layer, key in masks.items():
        m = inputs[key].astype(bool)
        r = raw[layer]
        want = {"mean": (r * m[:, :, None]).sum(1) / m.sum(1)[:, None],
                "first": r[rows, m.argmax(1)],
                "last": r[rows, T - 1 - m[:, ::-1].argmax(1)]}[reduce]
        ds = stored_layer(store_path, "model", layer)
        assert ds.attrs["topoxr_masked"] is True
        np.testing.assert_allclose(ds.activation.values[..., 0].T, want, rtol=RTOL, atol=ATOL)


def test_decoder_tokens_are_the_decoders_real_tokens_with_its_ids(bart, inputs, store_path):
    topoxr_torch.record(bart, inputs, store_path, progress=False, batch_size=4,
                        layers={DECODER: {"reduce": "tokens",
                                          "mask": "decoder_attention_mask"},
                                ENCODER: {"reduce": "mean", "mask": False}})
    raw = hooked(bart, [DECODER, ENCODER], inputs)
    rows, pos = np.nonzero(inputs["decoder_attention_mask"])
    ds = stored_layer(store_path, "model", DECODER)
    order = np.argsort(ds.sample.values)
    np.testing.assert_array_equal(ds.sample.values[order], rows * T + pos)
    np.testing.assert_array_equal(ds.token_id.values[order],
                                  inputs["decoder_input_ids"][rows, pos])
    np.testing.assert_allclose(ds.activation.values[:, order, 0].T, raw[DECODER][rows, pos],
                               rtol=RTOL, atol=ATOL)
    unmasked = stored_layer(store_path, "model", ENCODER)  # mask False: every position
    assert unmasked.attrs["topoxr_masked"] is False
    np.testing.assert_allclose(unmasked.activation.values[..., 0].T, raw[ENCODER].mean(1),
                               rtol=RTOL, atol=ATOL)
