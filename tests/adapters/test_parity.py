"""Cross-framework parity: the same weights give the same activations in torch and Keras."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")
keras = pytest.importorskip("keras")

import topoxr_keras  # noqa: E402
import topoxr_torch  # noqa: E402
from topoxr import open_store  # noqa: E402
from topoxr_keras.models import copy_torch_weights_to_keras  # noqa: E402
from topoxr_keras.models import make_model as make_keras  # noqa: E402
from topoxr_torch.models import load_digits_data  # noqa: E402
from topoxr_torch.models import make_model as make_torch  # noqa: E402

LAYERS = {
    "mlp": ["fc1", "relu1", "fc2", "relu2", "out"],
    "cnn": ["reshape", "conv1", "relu1", "pool1", "conv2", "relu2", "flatten", "fc1", "relu3",
            "out"],
}


@pytest.fixture(scope="module")
def parity_store(tmp_path_factory):
    """Both nets, weights copied torch -> keras, recorded into ONE store."""
    store = str(tmp_path_factory.mktemp("parity") / "parity.zarr")
    x, y = load_digits_data()
    x, y = x[:300], y[:300]
    for net, layers in LAYERS.items():
        torch_model = make_torch(net, seed=11)
        keras_model = make_keras(net, seed=99)  # other initial weights, overwritten below
        copy_torch_weights_to_keras(torch_model, keras_model)
        topoxr_torch.record(torch_model, (x, y), store, model_name=f"{net}_torch",
                            layers=layers, batch_size=64, progress=False)
        topoxr_keras.record(keras_model, (x, y), store, model_name=f"{net}_keras",
                            layers=layers, batch_size=64, progress=False)
    return store


@pytest.mark.parametrize(("net", "layer"), [(n, la) for n, ls in LAYERS.items() for la in ls
                                            if la != "flatten"])
def test_every_neuron_and_sample_agree(parity_store, net, layer):
    tree = open_store(parity_store)
    a = tree[f"{net}_torch/{layer}"].to_dataset().load()
    b = tree[f"{net}_keras/{layer}"].to_dataset().load()
    assert a.activation.shape == b.activation.shape
    np.testing.assert_array_equal(a.sample, b.sample)
    np.testing.assert_array_equal(a.label, b.label)
    np.testing.assert_allclose(a.activation.values, b.activation.values, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(a.prediction, b.prediction)
    assert a.activation.std() > 0  # not trivially equal


def test_flatten_units_agree_up_to_memory_order(parity_store):
    """torch flattens (C, H, W), Keras (H, W, C): the same units in another order."""
    tree = open_store(parity_store)
    a = tree["cnn_torch/flatten"].activation.values
    b = tree["cnn_keras/flatten"].activation.values
    c, h, w = 16, 4, 4
    torch_order = np.arange(c * h * w).reshape(c, h, w).transpose(1, 2, 0).reshape(-1)
    np.testing.assert_allclose(a[torch_order], b, rtol=0, atol=1e-5)
    assert not np.allclose(a, b, atol=1e-5)


def test_weight_copy_refuses_mismatched_networks():
    with pytest.raises(ValueError, match="fc1"):
        copy_torch_weights_to_keras(make_torch("mlp"), make_keras("mlp", hidden=(48, 32)))
    with pytest.raises(ValueError, match="no torch module"):
        copy_torch_weights_to_keras(make_torch("mlp"), make_keras("cnn"))
