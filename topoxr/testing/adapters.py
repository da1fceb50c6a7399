"""The contract every recording adapter must honour, as a reusable pytest class.

Like ``zarr.testing.store.StoreTests``: an adapter's test module subclasses
:class:`RecorderContract`, provides a few fixtures and hooks, and inherits every test::

    class TestTorchRecorder(RecorderContract):
        @pytest.fixture(scope="class")
        def adapter(self):
            return topoxr_torch
        ...

The tests run real models through the adapter into real Zarr stores and read them back
with :func:`topoxr.open_store`; each bad-input test proves the store is unchanged.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np
import pytest
import xarray as xr

from topoxr.recording import RecordingError
from topoxr.store import ActivationWriter, open_store

__all__ = ["RecorderContract", "store_snapshot", "stored_layer"]

#: Neurons per layer of the digits networks (``topoxr_*.models``).
MLP_SIZES = {"fc1": 64, "relu1": 64, "fc2": 32, "relu2": 32, "out": 10}
CNN_SIZES = {"conv1": 8, "conv2": 16, "fc1": 32, "out": 10}


def _layer(store: str, path: str) -> xr.Dataset:
    """One layer's dataset, loaded (reads are done once, eagerly)."""
    return open_store(store)[path].to_dataset().load()


def stored_layer(store: str, model: str, name: str) -> xr.Dataset:
    """The layer a recording named ``name`` (its original name: node names are made
    safe, e.g. ``"encoder.layer.0"``), of ``model`` in ``store``, loaded.

    Parameters
    ----------
    store : str
        The store's path or URL.
    model : str
        The model's node name.
    name : str
        The layer's name as the recorder was given it (its ``topoxr_layer`` attribute).

    Returns
    -------
    xarray.Dataset
        The layer's dataset, read into memory.
    """
    nodes = open_store(store)[model].children.values()
    node = next(n for n in nodes if n.attrs.get("topoxr_layer") == name)
    return node.to_dataset().load()


def store_snapshot(store: str) -> dict[str, xr.Dataset]:
    """Every layer of every model of a store, loaded into memory (empty if none)."""
    try:
        tree = open_store(store)
    except FileNotFoundError:
        return {}
    return {
        node.path: node.to_dataset().load()
        for node in tree.subtree
        if "activation" in node.to_dataset(inherit=False)
    }


def assert_unchanged(before: dict[str, xr.Dataset], store: str) -> None:
    """The store holds exactly what ``before`` held."""
    after = store_snapshot(store)
    assert sorted(after) == sorted(before)
    for path, ds in before.items():
        xr.testing.assert_identical(after[path], ds)


class RecorderContract:
    """Tests every recording adapter must pass.

    Subclasses provide the fixtures ``adapter`` (the adapter module, with ``record``),
    ``mlp`` and ``cnn`` (the digits networks of the adapter's ``models``, shared, never
    changed by the tests) and ``probe`` (``(x, y)`` arrays), and implement
    :meth:`make_model`, :meth:`perturb`, :meth:`model_state` and
    :meth:`non_tensor_layer`.
    """

    #: Class-wide defaults; override when needed.
    mlp_sizes = MLP_SIZES
    cnn_sizes = CNN_SIZES

    # -- to implement ------------------------------------------------------------------
    @pytest.fixture(scope="class")
    @classmethod
    def adapter(cls) -> ModuleType:
        raise NotImplementedError

    @pytest.fixture(scope="class")
    @classmethod
    def mlp(cls) -> Any:
        raise NotImplementedError

    @pytest.fixture(scope="class")
    @classmethod
    def cnn(cls) -> Any:
        raise NotImplementedError

    @pytest.fixture(scope="class")
    @classmethod
    def probe(cls) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def make_model(self, kind: str, *, seed: int = 0, **kwargs: Any) -> Any:
        """A fresh digits network (``kwargs``: ``hidden=(a, b)`` for a wider MLP)."""
        raise NotImplementedError

    def perturb(self, model: Any) -> None:
        """Change the model's weights in place (stands for a training epoch)."""
        raise NotImplementedError

    def model_state(self, model: Any) -> Any:
        """A comparable snapshot of hooks, nodes or modes that recording must restore."""
        raise NotImplementedError

    def non_tensor_layer(self) -> tuple[Any, str]:
        """A model and the name of one of its layers whose output is not a tensor."""
        raise NotImplementedError

    # -- helpers -----------------------------------------------------------------------
    def record(self, adapter: ModuleType, model: Any, data: Any, store: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("model_name", "net")
        kwargs.setdefault("progress", False)
        return adapter.record(model, data, store, **kwargs)

    # -- shapes, labels, epochs --------------------------------------------------------
    def test_shapes_and_dims(self, adapter, mlp, probe, store_path):
        x, y = probe
        result = self.record(adapter, mlp, (x, y), store_path, layers=["fc1", "fc2", "out"],
                             batch_size=32)
        assert result.layers == ["fc1", "fc2", "out"]
        assert result.samples == len(x)
        for layer in result.layers:
            ds = _layer(store_path, f"net/{layer}")
            assert ds.activation.dims == ("neuron", "sample", "epoch")
            assert ds.activation.dtype == np.float32
            assert ds.sizes == {"neuron": self.mlp_sizes[layer], "sample": len(x), "epoch": 1}
            np.testing.assert_array_equal(ds.sample, np.arange(len(x)))
            assert bool(ds.epoch_complete.all())
            assert np.isfinite(ds.activation.values).all()

    def test_labels_predictions_and_metadata_carried(self, adapter, mlp, probe, store_path):
        x, y = probe
        group = np.where(np.arange(len(x)) % 2 == 0, "even", "odd")
        self.record(adapter, mlp, (x, y), store_path, layers="out", batch_size=16,
                    metadata={"group": group})
        ds = _layer(store_path, "net/out")
        np.testing.assert_array_equal(ds.label, y)
        np.testing.assert_array_equal(ds.group, group)
        # The prediction is the argmax of the model output, here the recorded "out" layer.
        expected = ds.activation.isel(epoch=0).argmax("neuron").values
        np.testing.assert_array_equal(ds.prediction.isel(epoch=0), expected)
        np.testing.assert_array_equal(ds.correct.isel(epoch=0), expected == y)

    def test_no_labels_no_predictions(self, adapter, mlp, probe, store_path):
        x, _ = probe
        self.record(adapter, mlp, x, store_path, layers="fc1")
        ds = _layer(store_path, "net/fc1")
        assert "label" not in ds.coords
        assert "prediction" not in ds.coords

    def test_conv_layers_one_neuron_per_channel(self, adapter, cnn, probe, store_path):
        x, y = probe
        self.record(adapter, cnn, (x, y), store_path, layers="conv*", model_name="mean")
        self.record(adapter, cnn, (x, y), store_path, layers="conv1", model_name="all",
                    reduce="none")
        for layer in ("conv1", "conv2"):
            ds = _layer(store_path, f"mean/{layer}")
            assert ds.sizes["neuron"] == self.cnn_sizes[layer]
            np.testing.assert_array_equal(ds.channel, np.arange(self.cnn_sizes[layer]))
        units = _layer(store_path, "all/conv1")
        assert units.sizes["neuron"] == self.cnn_sizes["conv1"] * 8 * 8
        assert {"channel", "row", "col"} <= set(units.coords)
        # The per-channel mean of every unit is the reduced value, whatever the layout.
        pooled = units.activation.groupby("channel").mean().rename(channel="neuron")
        mean = _layer(store_path, "mean/conv1").activation.values
        np.testing.assert_allclose(pooled.values, mean, atol=1e-5)

    def test_epochs_appended(self, adapter, probe, store_path):
        x, y = probe
        model = self.make_model("mlp", seed=3)
        self.record(adapter, model, (x, y), store_path, layers="fc*", epoch=0)
        before = _layer(store_path, "net/fc1").activation
        self.perturb(model)
        self.record(adapter, model, (x, y), store_path, layers="fc*", epoch=1,
                    scalars={"loss": 0.5})
        ds = _layer(store_path, "net/fc1")
        np.testing.assert_array_equal(ds.epoch, [0, 1])
        assert bool(ds.epoch_complete.all())
        np.testing.assert_array_equal(ds.activation.isel(epoch=0), before.isel(epoch=0))
        assert not np.allclose(ds.activation.isel(epoch=1), ds.activation.isel(epoch=0))
        assert float(ds.loss.sel(epoch=1)) == 0.5

    def test_open_writer_as_store(self, adapter, mlp, probe, store_path):
        x, y = probe
        with ActivationWriter(store_path, model="given") as writer:
            result = self.record(adapter, mlp, (x, y), writer, layers="fc1", epoch=0)
            self.record(adapter, mlp, (x, y), writer, layers="fc1", epoch=1)
        assert result.model == "given"
        ds = _layer(store_path, "given/fc1")
        np.testing.assert_array_equal(ds.epoch, [0, 1])
        np.testing.assert_array_equal(ds.activation.isel(epoch=0), ds.activation.isel(epoch=1))

    def test_glob_patterns_in_model_order(self, adapter, mlp, probe, store_path):
        x, _ = probe
        result = self.record(adapter, mlp, x[:10], store_path, layers=["relu*", "fc1"])
        assert result.layers == ["fc1", "relu1", "relu2"]

    # -- cleanliness -------------------------------------------------------------------
    def test_model_left_as_it_was(self, adapter, mlp, probe, store_path):
        x, y = probe
        before = self.model_state(mlp)
        self.record(adapter, mlp, (x, y), store_path, layers="*")
        assert self.model_state(mlp) == before
        with pytest.raises(RecordingError):
            self.record(adapter, mlp, (x, y[:-1]), store_path, layers="*", model_name="bad")
        assert self.model_state(mlp) == before

    def test_no_state_leaks_between_runs(self, adapter, probe, tmp_path):
        x, y = probe
        a, b = self.make_model("mlp", seed=1), self.make_model("mlp", seed=2)
        stores = [str(tmp_path / f"{i}.zarr") for i in range(3)]
        self.record(adapter, a, (x, y), stores[0], layers="fc*")
        self.record(adapter, b, (x[:20], y[:20]), stores[1], layers="relu1", batch_size=7)
        self.record(adapter, a, (x, y), stores[2], layers="fc*")
        first, third = store_snapshot(stores[0]), store_snapshot(stores[2])
        assert sorted(first) == sorted(third) == ["/net/fc1", "/net/fc2"]
        for path, ds in first.items():
            np.testing.assert_array_equal(ds.activation, third[path].activation)
        assert list(store_snapshot(stores[1])) == ["/net/relu1"]

    # -- bad input: a clear error and an unchanged store ---------------------------------
    def _existing_store(self, adapter, mlp, probe, store_path) -> dict[str, xr.Dataset]:
        x, y = probe
        self.record(adapter, mlp, (x, y), store_path, layers="fc*")
        return store_snapshot(store_path)

    def test_unknown_layer_suggests_close_names(self, adapter, mlp, probe, store_path):
        before = self._existing_store(adapter, mlp, probe, store_path)
        n = len(adapter.layer_names(mlp))
        with pytest.raises(RecordingError,
                           match=rf"'fc_3' \(did you mean 'fc[12]'.*it has {n} layers") as err:
            self.record(adapter, mlp, probe, store_path, layers=["fc1", "fc_3"], epoch=1)
        # the three closest names, not the whole list
        assert str(err.value).count("'") <= 2 + 2 * 3
        assert_unchanged(before, store_path)

    def test_unknown_layer_creates_no_store(self, adapter, mlp, probe, tmp_path):
        path = str(tmp_path / "never.zarr")
        with pytest.raises(RecordingError, match="layer_names"):
            self.record(adapter, mlp, probe, path, layers="conv*")
        assert not (tmp_path / "never.zarr").exists()

    def test_non_tensor_output(self, adapter, probe, store_path):
        model, layer = self.non_tensor_layer()
        x, y = probe
        with pytest.raises(RecordingError, match=rf"{layer}.*not a tensor|{layer}.*no tensor"):
            self.record(adapter, model, (x, y), store_path, layers=[layer])
        assert store_snapshot(store_path) == {}

    def test_label_length_mismatch(self, adapter, mlp, probe, store_path):
        before = self._existing_store(adapter, mlp, probe, store_path)
        x, y = probe
        with pytest.raises(RecordingError, match="labels has"):
            self.record(adapter, mlp, x, store_path, layers="fc*", labels=y[:-3], epoch=1)
        assert_unchanged(before, store_path)

    @pytest.mark.parametrize("change", ["fewer", "more", "other_ids"])
    def test_different_probe_set(self, adapter, mlp, probe, store_path, change):
        before = self._existing_store(adapter, mlp, probe, store_path)
        x, y = probe
        n = len(x)
        if change == "fewer":
            data, ids = (x[:-5], y[:-5]), None
        elif change == "more":
            data, ids = (np.concatenate([x, x[:5]]), np.concatenate([y, y[:5]])), None
        else:
            data, ids = (x, y), np.arange(n) + 1000
        with pytest.raises(RecordingError, match="probe set differs"):
            self.record(adapter, mlp, data, store_path, layers="fc*", epoch=1, sample_ids=ids,
                        batch_size=8)
        assert_unchanged(before, store_path)

    def test_different_layer_sizes(self, adapter, mlp, probe, store_path):
        before = self._existing_store(adapter, mlp, probe, store_path)
        wider = self.make_model("mlp", hidden=(48, 32))
        with pytest.raises(RecordingError, match=r"fc1.*64 neurons in the store but 48"):
            self.record(adapter, wider, probe, store_path, layers="fc*", epoch=1)
        assert_unchanged(before, store_path)
