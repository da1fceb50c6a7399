"""topoxr.recording: adapter discovery, lazy imports and the framework-free helpers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import zarr

from topoxr import ActivationWriter, StoreError, open_store
from topoxr.recording import (
    BackgroundWriter,
    LayerPlan,
    RecordingError,
    check_against_store,
    get_adapter,
    iter_array_batches,
    number_batches,
    prepare_arrays,
    resolve_layers,
    run_recording,
    stored_layers,
)


def _run(code: str, env: dict[str, str] | None = None) -> dict:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=120, env={**os.environ, **(env or {})})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


HEAVY = ("torch", "tensorflow", "keras", "jax")


# -- discovery ----------------------------------------------------------------------------
def test_installed_adapters_are_listed_without_importing_them():
    out = _run(f"""
        import json, sys
        from topoxr.recording import available_adapters
        names = available_adapters()
        print(json.dumps({{"names": names,
                          "loaded": [m for m in {HEAVY!r} + ("topoxr_torch", "topoxr_keras")
                                     if m in sys.modules]}}))
    """)
    assert {"torch", "keras"} <= set(out["names"])
    assert out["loaded"] == []


def test_unknown_adapter_lists_installed_ones():
    with pytest.raises(KeyError, match=r"no topoxr adapter named 'mxnet'.*keras.*torch"):
        get_adapter("mxnet")


def test_plugin_from_a_dist_info_is_found_and_loaded_on_request(tmp_path):
    (tmp_path / "fake_topoxr_adapter.py").write_text("RECORDS = 'fake'\n")
    info = tmp_path / "fake_topoxr_adapter-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-topoxr-adapter\n"
                                   "Version: 0.1\n")
    (info / "entry_points.txt").write_text("[topoxr.adapters]\nfake = fake_topoxr_adapter\n")
    out = _run("""
        import json, sys
        from topoxr.recording import available_adapters, get_adapter
        names = available_adapters()
        before = "fake_topoxr_adapter" in sys.modules
        module = get_adapter("fake")
        print(json.dumps({"names": names, "before": before, "records": module.RECORDS}))
    """, env={"PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})
    assert "fake" in out["names"]
    assert out["before"] is False
    assert out["records"] == "fake"


def test_adapter_packages_import_their_framework_lazily():
    pytest.importorskip("torch")
    out = _run(f"""
        import json, sys
        import topoxr_torch, topoxr_keras
        light = [m for m in {HEAVY!r} if m in sys.modules]
        topoxr_torch.record  # first use imports torch, and only torch
        torch_use = [m for m in {HEAVY!r} if m in sys.modules]
        print(json.dumps({{"light": light, "torch_use": torch_use}}))
    """)
    assert out["light"] == []
    assert out["torch_use"] == ["torch"]


def test_keras_adapter_does_not_import_torch():
    pytest.importorskip("keras")
    out = _run(f"""
        import json, sys
        import topoxr_keras
        topoxr_keras.record
        print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))
    """, env={"KERAS_BACKEND": "tensorflow"})
    assert "torch" not in out
    assert "keras" in out


@pytest.mark.parametrize(("package", "extra"), [("topoxr_torch", "torch"),
                                                ("topoxr_keras", "keras")])
def test_missing_framework_names_the_extra(package, extra):
    out = _run(f"""
        import json, sys
        sys.modules[{extra!r}] = None  # as if the framework were not installed
        import {package}
        try:
            {package}.record
        except ImportError as err:
            print(json.dumps(str(err)))
    """)
    assert f'pip install "topoxr[{extra}]"' in out


# -- layer selection ----------------------------------------------------------------------
AVAILABLE = ["features.0", "features.1", "features.10", "head[0]", "fc1", "fc2", "out"]


def test_resolve_layers_exact_glob_and_order():
    assert resolve_layers("fc1", AVAILABLE) == ["fc1"]
    assert resolve_layers(["out", "fc*"], AVAILABLE) == ["fc1", "fc2", "out"]
    assert resolve_layers("features.?", AVAILABLE) == ["features.0", "features.1"]
    assert resolve_layers(["head[0]"], AVAILABLE) == ["head[0]"]  # exact wins over a glob


def test_patterns_that_match_one_layer_join_their_settings_in_any_order():
    """The last pattern's settings replaced the earlier's: {"fc*": max, "*": {}} recorded
    fc1 with the default mean, and {"fc*": max, "*1": none} fc1 with "none" (the other
    order: "max"), without a word."""
    from topoxr.reduction import resolve_layer_specs

    for requested in ({"fc*": {"reduce": "max"}, "*": {}}, {"*": {}, "fc*": {"reduce": "max"}}):
        specs = resolve_layer_specs(requested, AVAILABLE)
        assert specs["fc1"][1].reduce == "max" and specs["out"][1].reduce is None
    joined = resolve_layer_specs({"fc*": {"reduce": "max"}, "*1": {"channel_axis": 1}},
                                 AVAILABLE)
    assert (joined["fc1"][1].reduce, joined["fc1"][1].channel_axis) == ("max", 1)
    assert (joined["fc2"][1].reduce, joined["fc2"][1].channel_axis) == ("max", None)
    for requested in ({"fc*": {"reduce": "max"}, "*1": {"reduce": "none"}},
                      {"*1": {"reduce": "none"}, "fc*": {"reduce": "max"}}):
        with pytest.raises(RecordingError, match=r"layer 'fc1' matches the patterns .*"
                                                 r"set its \['reduce'\] differently"):
            resolve_layer_specs(requested, AVAILABLE)
    # an exact name's settings still win over any pattern's
    exact = resolve_layer_specs({"fc1": {"reduce": "none"}, "fc*": {"reduce": "max"}}, AVAILABLE)
    assert exact["fc1"][1].reduce == "none" and exact["fc2"][1].reduce == "max"


@pytest.mark.parametrize("requested", [["fc3"], "conv*", []])
def test_resolve_layers_errors_give_the_layer_count(requested):
    with pytest.raises(RecordingError, match=rf"{len(AVAILABLE)} layers"):
        resolve_layers(requested, AVAILABLE)


def test_resolve_layers_suggests_the_three_closest_names():
    many = [f"encoder.layer.{i}.{part}" for i in range(12) for part in ("attention", "output")]
    with pytest.raises(RecordingError) as err:
        resolve_layers(["encoder.layer.1.atention"], many)
    msg = str(err.value)
    assert "did you mean 'encoder.layer.1.attention'" in msg
    assert f"it has {len(many)} layers" in msg
    assert sum(name in msg for name in many) <= 3  # not the whole list


# -- data normalisation -------------------------------------------------------------------
def test_prepare_arrays_ids_labels_metadata():
    x = np.zeros((5, 3))
    got_x, y, ids, meta = prepare_arrays((x, [0, 1, 0, 1, 0]), metadata={"site": list("abcab")},
                                         sample_ids=[10, 11, 12, 13, 14])
    assert got_x is x
    np.testing.assert_array_equal(y, [0, 1, 0, 1, 0])
    np.testing.assert_array_equal(ids, np.arange(10, 15))
    np.testing.assert_array_equal(meta["site"], list("abcab"))
    batches = list(iter_array_batches(x, ids, y, meta, 2))
    assert [len(b) for b in batches] == [2, 2, 1]
    np.testing.assert_array_equal(batches[2].metadata["site"], ["b"])


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"data": (np.zeros((4, 2)), [0, 1])}, "labels has 2 entries but the data has 4"),
    ({"data": np.zeros((4, 2)), "labels": [0, 1, 2]}, "labels has 3"),
    ({"data": (np.zeros((4, 2)), [0] * 4), "labels": [0] * 4}, "labels are given twice"),
    ({"data": np.zeros((4, 2)), "sample_ids": [1, 1, 2, 3]}, "duplicate sample ids"),
    ({"data": np.zeros((4, 2)), "sample_ids": [0.5, 1, 2, 3]}, "must be integers"),
    ({"data": np.zeros((4, 2)), "metadata": {"m": [1, 2]}}, "metadata 'm' has 2"),
    ({"data": np.zeros((0, 2))}, "no samples"),
    ({"data": [1, 2, 3]}, "data must be x or a pair"),
    # refused before the model runs, as the store would refuse them at the first write
    ({"data": (np.zeros((4, 2)), [0.5, 1.0, 0.0, 1.0])},
     r"labels must be integers or strings \(class indices or names\), got float64"),
    ({"data": (np.zeros((4, 2)), [True, False, True, True])}, "got bool"),
    ({"data": np.zeros((4, 2)), "metadata": {"row": [1, 2, 3, 4]}},
     r"metadata \['row'\] cannot name columns"),
    ({"data": np.zeros((4, 2)), "metadata": {"a b": [1, 2, 3, 4]}}, "cannot name columns"),
    ({"data": ({"input_ids": np.zeros((4, 2)), "labels": [0] * 4}, [0] * 4)},
     "labels are given twice: in the inputs' 'labels' entry"),
])
def test_prepare_arrays_errors(kwargs, message):
    data = kwargs.pop("data")
    with pytest.raises(RecordingError, match=message):
        prepare_arrays(data, **kwargs)


def test_labels_inside_a_mapping_and_labels_of_one_column_are_the_labels():
    # a tokenizer batch carrying its labels (Hugging Face's convention) and (n, 1) labels
    # (keras.datasets' CIFAR) are labels, not an input nor an error
    batch = {"input_ids": np.ones((4, 3), np.int64), "labels": np.array([2, 0, 1, 2])}
    x, y, _, _ = prepare_arrays(batch)
    assert sorted(x) == ["input_ids"]
    np.testing.assert_array_equal(y, [2, 0, 1, 2])
    _, y, _, _ = prepare_arrays((np.zeros((4, 2)), np.array([[3], [1], [0], [3]])))
    np.testing.assert_array_equal(y, [3, 1, 0, 3])


def test_number_batches_running_ids_and_length_check():
    batches = [(np.zeros((3, 2)), None), (np.zeros((2, 2)), None)]
    out = list(number_batches(batches, labels=[1, 2, 3, 4, 5]))
    np.testing.assert_array_equal(np.concatenate([b.ids for b in out]), np.arange(5))
    np.testing.assert_array_equal(out[1].labels, [4, 5])
    with pytest.raises(RecordingError, match="labels has 6 entries but the data has 5"):
        list(number_batches(batches, labels=np.arange(6)))


# -- probe-set checks and the recording loop on a numpy "model" ---------------------------
def _numpy_forward(weights: np.ndarray):
    def forward(x):
        hidden = x @ weights
        return {"hidden": hidden, "out": hidden[:, :3]}, hidden[:, :3]
    return forward


def _record(store, x, y=None, *, epoch=0, ids=None, weights=None, **kwargs):
    weights = np.eye(x.shape[1], 4, dtype=np.float32) if weights is None else weights
    ids = np.arange(len(x)) if ids is None else ids
    return run_recording(
        _numpy_forward(weights), iter_array_batches(x, ids, y, {}, 8), store,
        model_name="np", layers=["hidden", "out"], epoch=epoch, probe_ids=ids, probe_labels=y,
        n_samples=len(x), batch_size=8, progress=False, **kwargs)


def test_layers_whose_nodes_collide_are_refused_before_anything_is_written(store_path):
    """A second call "dense:1" is stored as node dense_1, Keras's name of its second Dense
    layer: the writer refused the second when it first wrote it, after the first was
    stored. Refused before writing, also against the layers already stored."""
    x = np.random.default_rng(0).normal(size=(10, 3)).astype(np.float32)

    def forward(x):
        return {"dense:1": x, "dense_1": 2 * x, "other": x[:, :2]}, None

    def run(layers):
        run_recording(forward, iter_array_batches(x, np.arange(10), None, {}, 4), store_path,
                      model_name="m", layers=layers, progress=False)

    with pytest.raises(RecordingError, match=r"layers 'dense:1' and 'dense_1' of model 'm' "
                                             r"would both be stored as node 'dense_1'"):
        run(["dense:1", "dense_1"])
    assert not os.path.exists(store_path)
    run(["dense:1"])
    with pytest.raises(RecordingError, match="would both be stored as node 'dense_1'"):
        run(["other", "dense_1"])
    assert sorted(open_store(store_path)["m"].children) == ["dense_1"]


def test_chunks_are_sized_from_the_batches_the_data_yields(store_path, tmp_path):
    """Batches of 8 recorded with batch_size=256 (which sizes only the coalesced writes,
    as for a loader with batches of its own): the layers' chunks are those of batches
    of 8 written one by one, as when the first batch was written alone."""
    x = np.random.default_rng(1).normal(size=(40, 5)).astype(np.float32)
    ids = np.arange(40)
    run_recording(_numpy_forward(np.eye(5, 4, dtype=np.float32)),
                  iter_array_batches(x, ids, None, {}, 8), store_path, model_name="np",
                  layers=["hidden"], probe_ids=ids, n_samples=40, batch_size=256,
                  progress=False)
    one_by_one = str(tmp_path / "one-by-one.zarr")
    with ActivationWriter(one_by_one, model="np", expected_samples=40,
                          expected_epochs=1) as writer:
        for start in range(0, 40, 8):
            writer.write("hidden", x[start:start + 8] @ np.eye(5, 4, dtype=np.float32),
                         sample=ids[start:start + 8])
    for name in ("activation", "sample", "committed"):
        assert (zarr.open_array(f"{store_path}/np/hidden/{name}").chunks
                == zarr.open_array(f"{one_by_one}/np/hidden/{name}").chunks), name


def test_run_recording_writes_complete_epochs(store_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 5)).astype(np.float32)
    y = rng.integers(0, 3, 30)
    _record(store_path, x, y, epoch=0)
    _record(store_path, x * 2, y, epoch=1, scalars={"loss": 0.25})
    ds = open_store(store_path)["np/hidden"].to_dataset().load()
    np.testing.assert_array_equal(ds.epoch, [0, 1])
    assert bool(ds.epoch_complete.all())
    np.testing.assert_allclose(ds.activation.values[..., 0], (x @ np.eye(5, 4)).T, rtol=1e-6)
    np.testing.assert_allclose(ds.activation.values[..., 1], 2 * ds.activation.values[..., 0])
    np.testing.assert_array_equal(ds.prediction.values[:, 0], x[:, :3].argmax(1))
    assert float(ds.loss.values[1]) == 0.25
    layers = stored_layers(store_path, "np")
    assert layers["out"].n_neurons == 3
    assert layers["hidden"].epochs == [0, 1]


def test_what_the_store_holds_is_read_per_model_and_checked(store_path):
    """stored_layers reads one model's layers with open_store's checks, as open_store
    reports them: equal values, damage of that model refused before anything is
    written, damage of another model no obstacle to recording this one."""
    import glob

    from topoxr import StoreCorruptionError

    rng = np.random.default_rng(3)
    x = rng.normal(size=(30, 5)).astype(np.float32)
    y = rng.integers(0, 3, 30)
    _record(store_path, x, y, epoch=0)
    with ActivationWriter(store_path, model="other") as writer:
        writer.write("h", x, sample=np.arange(30), label=y)
    tree = open_store(store_path)
    for name, info in stored_layers(store_path, "np").items():
        ds = tree[f"np/{name}"].to_dataset()
        assert info.n_neurons == ds.sizes["neuron"]
        np.testing.assert_array_equal(info.sample_ids, ds["sample"].values)
        np.testing.assert_array_equal(info.labels, ds["label"].values)
        assert info.epochs == [0] and info.complete == [True]
        assert info.attrs == dict(ds.attrs)
    (lost,) = glob.glob(f"{store_path}/other/h/committed/c.*")
    os.unlink(lost)
    with pytest.raises(StoreCorruptionError):
        open_store(store_path)
    assert stored_layers(store_path, "np")["hidden"].epochs == [0]
    _record(store_path, x * 2, y, epoch=1)  # the damage of "other" is not this model's
    with pytest.raises(StoreCorruptionError, match="layer 'h' of model 'other'"):
        stored_layers(store_path, "other")


def test_check_against_store_allows_resuming_an_epoch():
    from topoxr.recording import StoredLayer

    stored = {"h": StoredLayer(n_neurons=4, reduce="mean", sample_ids=np.arange(5), epochs=[0],
                               complete=[False], labels=None)}
    # The same epoch, not complete yet: the full probe set may add the missing samples.
    check_against_store(stored, model="m", neurons={"h": 4}, reduce="mean", epoch=0,
                        ids=np.arange(10), labels=None)
    with pytest.raises(RecordingError, match="probe set differs"):
        check_against_store(stored, model="m", neurons={"h": 4}, reduce="mean", epoch=1,
                            ids=np.arange(10), labels=None)
    with pytest.raises(RecordingError, match="recorded with reduce='mean'.*asks for reduce='max'"):
        check_against_store(stored, model="m", neurons={"h": 4}, reduce="max", epoch=0,
                            ids=np.arange(5), labels=None)


def test_changed_labels_are_refused_before_writing(store_path):
    x = np.ones((12, 5), np.float32)
    _record(store_path, x, np.zeros(12, int))
    before = open_store(store_path)["np/out"].to_dataset().load()
    with pytest.raises(RecordingError, match="labels of samples"):
        _record(store_path, x, np.ones(12, int), epoch=1)
    after = open_store(store_path)["np/out"].to_dataset().load()
    np.testing.assert_array_equal(after.epoch, [0])
    np.testing.assert_array_equal(after.activation, before.activation)


# -- background writer ----------------------------------------------------------------------
@pytest.mark.parametrize(("chunks_per_write", "writes"), [(1, 3), (4, 2)])
def test_background_writer_coalesces_into_whole_writes(store_path, tmp_path, chunks_per_write,
                                                       writes):
    with ActivationWriter(store_path, model="m", expected_samples=100) as writer:
        with BackgroundWriter(writer, epoch=0, plans={"a": LayerPlan("mean", 1, "test")},
                              write_bytes=4 * 2 * 40, chunks_per_write=chunks_per_write) as bg:
            bg.set_targets({"a": 2}, batch_size=10)  # 40 rows per write
            for start in range(0, 100, 10):
                ids = np.arange(start, start + 10)
                bg.submit({"a": np.stack([ids, -ids], 1).astype(np.float32)}, ids, None,
                          None, {})
        assert bg.written == 100
        # Up to the first chunk boundary (40), then chunks_per_write chunks at a time,
        # and the rest at close.
        assert bg.writes == writes
    ds = open_store(store_path)["m/a"].to_dataset().load()
    np.testing.assert_array_equal(ds.activation.values[0, :, 0], np.arange(100))
    np.testing.assert_array_equal(ds.activation.values[1, :, 0], -np.arange(100))
    # The layer's chunks are those of batches of 10 written one by one, although its
    # first write joined four of them.
    one_by_one = str(tmp_path / "one-by-one.zarr")
    with ActivationWriter(one_by_one, model="m", expected_samples=100) as writer:
        for start in range(0, 100, 10):
            ids = np.arange(start, start + 10)
            writer.write("a", np.stack([ids, -ids], 1).astype(np.float32), sample=ids)
    for name in ("activation", "sample", "committed"):
        assert (zarr.open_array(f"{store_path}/m/a/{name}").chunks
                == zarr.open_array(f"{one_by_one}/m/a/{name}").chunks), name


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_background_writer_writes_whole_chunks_at_the_stored_value_size(store_path, dtype):
    """The write target is sized at the store's bytes per value: float16 chunks hold
    twice the rows of float32 ones, and each write still fills whole chunks."""
    n_neurons, batch, n = 1024, 64, 4096
    rng = np.random.default_rng(0)
    values = rng.standard_normal((n, n_neurons)).astype(np.float32)
    # as run_recording opens it: the probe set's size known (without it, a chunk holds 16
    # first batches at most)
    with ActivationWriter(store_path, model="m", dtype=dtype, expected_samples=n) as writer:
        assert writer.value_bytes("a") == np.dtype(dtype).itemsize
        with BackgroundWriter(writer, epoch=0, plans={"a": LayerPlan("mean", 1, "test")}) as bg:
            bg.set_targets({"a": n_neurons}, batch_size=batch)
            for start in range(0, n, batch):
                ids = np.arange(start, start + batch)
                bg.submit({"a": values[start:start + batch]}, ids, None, None, {})
        assert writer.value_bytes("a") == np.dtype(dtype).itemsize  # now stored
    chunk_rows = zarr.open_array(f"{store_path}/m/a/activation").chunks[1]
    assert chunk_rows == {"float32": 1024, "float16": 2048}[dtype]
    assert bg.written == n
    assert bg.writes == n // chunk_rows  # one write per chunk, none split
    stored = open_store(store_path)["m/a"].to_dataset().activation.isel(epoch=0)
    np.testing.assert_array_equal(stored.transpose("sample", "neuron").values,
                                  values.astype(dtype).astype(np.float32))


@pytest.mark.parametrize("bad", [0, -10, 2.5, True, "10"])
def test_a_bad_batch_rows_is_refused_before_writing(store_path, bad):
    with ActivationWriter(store_path, model="m") as writer:
        with pytest.raises(StoreError, match="batch_rows must be a positive integer"):
            writer.write("a", np.zeros((4, 3), np.float32), sample=np.arange(4), batch_rows=bad)
        assert writer.layers == []


def test_background_writer_errors_reach_the_caller(store_path):
    with ActivationWriter(store_path, model="m") as writer:
        writer.write("a", np.zeros((4, 3)), sample=np.arange(4))
        bg = BackgroundWriter(writer, epoch=0, plans={"a": LayerPlan("mean", 1, "test")},
                              queue_size=1)
        bg.set_targets({"a": 5}, batch_size=1)
        # Five neurons where the store has three: the thread fails, the caller hears it.
        with pytest.raises(ValueError, match="3 neurons in the store"):
            for i in range(100, 200):
                bg.submit({"a": np.zeros((1, 5), np.float32)}, np.array([i]), None, None, {})
            bg.close()
        bg.close()  # closing again is harmless


def test_stored_unless_recorded_skips_only_epochs_complete_for_every_layer(tmp_path):
    """The recorders' once-per-epoch read: None where the epoch is complete for every one
    of the recorder's layers, else what the store holds for the model."""
    from topoxr.recording import stored_unless_recorded

    path = str(tmp_path / "s.zarr")
    assert stored_unless_recorded(path, "m", ["a"], 0) == {}  # no store yet
    ids = np.arange(6)
    with ActivationWriter(path, model="m") as writer:
        for layer in ("a", "b"):
            writer.write(layer, np.ones((6, 3), np.float32), sample=ids, epoch=0)
        writer.write("a", np.ones((6, 3), np.float32), sample=ids, epoch=1)
    assert stored_unless_recorded(path, "m", ["a", "b"], 0) is None
    stored = stored_unless_recorded(path, "m", ["a", "b"], 1)  # "b" lacks epoch 1
    assert sorted(stored) == ["a", "b"]
    assert list(stored["a"].epochs) == [0, 1] and list(stored["b"].epochs) == [0]
    assert stored_unless_recorded(path, "m", ["a"], 1) is None
    assert stored_unless_recorded(path, "m", ["a"], 2) is not None
    assert stored_unless_recorded(path, "other", ["a"], 0) == {}
    # an open writer's model wins over the name given, as in stored_layers
    with ActivationWriter(path, model="m") as writer:
        assert stored_unless_recorded(writer, "other", ["a", "b"], 0) is None


# -- default predictions -------------------------------------------------------------------
def _one_column(sigmoid: bool, seed: int = 5):
    """A numpy "model" with one output column: probabilities or logits, and its forward."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(40, 5)).astype(np.float32)
    w = rng.normal(size=(5, 1)).astype(np.float32)

    def model(x):
        z = x @ w
        return 1 / (1 + np.exp(-z)) if sigmoid else z * 3

    def forward(x):
        return {"hidden": x @ np.eye(5, 4, dtype=np.float32)}, model(x)

    return x, model, forward


def _record_one_column(store, forward, x, y, **kwargs):
    ids = np.arange(len(x))
    run_recording(forward, iter_array_batches(x, ids, y, {}, 8), store, model_name="np",
                  layers=["hidden"], probe_ids=ids, probe_labels=y, n_samples=len(x),
                  batch_size=8, progress=False, **kwargs)
    return open_store(store)["np/hidden"].to_dataset().load()


@pytest.mark.parametrize("probabilities", [True, lambda: True], ids=["bool", "asked"])
def test_one_column_known_to_be_probabilities_is_thresholded_at_one_half(store_path,
                                                                        probabilities):
    """A sigmoid's output: class 1 where it is over 0.5 (over 0 made every one class 1)."""
    import warnings

    x, model, forward = _one_column(sigmoid=True)
    y = np.arange(40) % 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = _record_one_column(store_path, forward, x, y, probabilities=probabilities)
    expected = (model(x)[:, 0] > 0.5).astype(np.int64)
    assert 0 < expected.sum() < 40
    np.testing.assert_array_equal(ds.prediction.values[:, 0], expected)
    np.testing.assert_array_equal(ds.correct.values[:, 0], expected == y)


def test_one_column_in_zero_one_not_known_as_probabilities_warns(store_path, tmp_path):
    """Not known to come from a sigmoid: taken for logits (over 0), with a warning where
    the first batch lies in [0, 1]; logits outside [0, 1] are thresholded at 0 silently."""
    import warnings

    x, model, forward = _one_column(sigmoid=True)
    y = np.arange(40) % 2
    with pytest.warns(UserWarning, match=r"looks like probabilities.*predict=") as record:
        ds = _record_one_column(store_path, forward, x, y)
    assert len([w for w in record if "looks like" in str(w.message)]) == 1  # once
    np.testing.assert_array_equal(ds.prediction.values[:, 0], model(x)[:, 0] > 0)
    x, model, forward = _one_column(sigmoid=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = _record_one_column(str(tmp_path / "logits.zarr"), forward, x, y)
    expected = (model(x)[:, 0] > 0).astype(np.int64)
    assert 0 < expected.sum() < 40
    np.testing.assert_array_equal(ds.prediction.values[:, 0], expected)


@pytest.mark.parametrize("labels", [np.array(["cat", "dog", "eel"]),
                                    np.array(["cat", "dog", "eel"], dtype=object)],
                         ids=["str", "object"])
def test_labels_that_are_no_integers_get_no_default_predictions(store_path, labels):
    """Class indices never equal class names: no predictions and no 'correct' are
    stored, with one warning naming the labels' dtype and predict=."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 5)).astype(np.float32)
    y = labels[x[:, :3].argmax(1)]  # the labels of the classes the model predicts
    with pytest.warns(UserWarning, match=rf"not integers \(dtype {labels.dtype}\).*predict=") \
            as record:
        _record(store_path, x, y)
    assert len(record) == 1
    ds = open_store(store_path)["np/out"].to_dataset().load()
    assert "prediction" not in ds and "correct" not in ds
    np.testing.assert_array_equal(ds.label, y)
    np.testing.assert_allclose(ds.activation.values[..., 0], x[:, :3].T, rtol=1e-6)


def test_outputs_that_hold_no_scores_get_no_default_predictions(store_path):
    """A model returning class indices (integers) has no argmax or threshold to take:
    no predictions (its values thresholded at 0 gave 0 or 1, never a class above 1)."""
    x = np.random.default_rng(0).normal(size=(30, 5)).astype(np.float32)
    y = x[:, :3].argmax(1)

    def forward(x):
        return {"hidden": x[:, :4]}, x[:, :3].argmax(1)  # (batch,) int64 class indices

    with pytest.warns(UserWarning, match=r"holds int64 values, not scores.*predict=lambda out"):
        run_recording(forward, iter_array_batches(x, np.arange(30), y, {}, 8), store_path,
                      model_name="np", layers=["hidden"], progress=False)
    assert "prediction" not in open_store(store_path)["np/hidden"].to_dataset()


def test_one_column_with_labels_other_than_zero_and_one_gets_no_default_predictions(
        store_path):
    """One logit thresholded predicts 0 or 1: with labels -1/+1 'correct' was never true
    for the -1 samples. No predictions, and a warning naming the labels."""
    x, _, forward = _one_column(sigmoid=False)
    y = np.where(x[:, 0] > 0, 1, -1)
    with pytest.warns(UserWarning, match=r"predictions \(the column thresholded\) are 0 or 1, "
                                         r"while the labels hold \[-1\]"):
        ds = _record_one_column(store_path, forward, x, y)
    assert "prediction" not in ds and "correct" not in ds


def test_no_default_predictions_says_why(store_path, tmp_path):
    """An adapter that cannot tell which output holds the classes says why: no
    predictions are stored (predict= still derives them)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 5)).astype(np.float32)
    y = x[:, :3].argmax(1)
    why = "model 'np' has 2 outputs ['a', 'b'], and which one holds the classes is not known"
    with pytest.warns(UserWarning, match=r"has 2 outputs \['a', 'b'\].*Pass predict="):
        _record(store_path, x, y, no_default_predictions=why)
    assert "prediction" not in open_store(store_path)["np/out"].to_dataset()
    other = str(tmp_path / "predicted.zarr")
    _record(other, x, y, no_default_predictions=why, predict=lambda out: out.argmax(1))
    np.testing.assert_array_equal(open_store(other)["np/out"].prediction.values[:, 0], y)
