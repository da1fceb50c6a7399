"""Recording throughput of the torch and Keras adapters against hand-written baselines.

For an MLP and a CNN on 8x8 inputs (scikit-learn digits tiled to ``n`` samples), batch
256, in both frameworks, each timed in the same process (median of ``repeats`` runs):

* ``a_forward``: the bare forward pass of the model over all batches;
* ``b_direct``: the forward pass capturing the same layer outputs (plain hooks / a plain
  sub-model), pooling conv maps per channel, and writing every batch synchronously with
  zarr into arrays with the same shape, chunks and codec as the store's (``activation``
  per layer, plus ``label`` and ``prediction``), one region write per batch;
* ``b_direct_whole_chunks``: the same, but buffering batches so that every zarr write
  covers whole chunks (a smarter hand-written writer);
* ``record``: ``topoxr_torch.record`` / ``topoxr_keras.record`` into a fresh local store
  (labels, predictions, ``correct``, masks, crash-safe commits, background writer).

Torch and TensorFlow run on ``THREADS`` compute threads. Full runs add
``cnn_wide_torch``, a CNN with ``WIDE_CHANNELS`` channels whose forward pass costs about
as much as writing.

Ratios ``record / b_direct`` (the issue's target: at most 1.15) and
``record / b_direct_whole_chunks`` and ``record / a_forward`` are reported with the
absolute seconds.

Two more sections (issue 11), timed the same way:

* ``bert_torch``: a small BERT (Hugging Face, random weights, hidden 128, 2 layers) on
  token sequences with an attention mask: the bare forward pass against
  ``topoxr_torch.record`` of its encoder layers (masked mean over tokens) and of one
  layer per token (``reduce="tokens"``);
* ``callback_keras``: the cost of the ``RecordActivations`` callback per recorded epoch
  (``fit`` with the callback minus ``fit`` without, over the recorded epochs) against
  ``model.predict`` on the probe set, the one pass over it that a recorded epoch needs,
  and against ``topoxr_keras.record`` of the probe set (one pass plus the writes).
"""

from __future__ import annotations

import gc
import logging
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

LAYERS = {
    "mlp": ["fc1", "relu1", "fc2", "relu2", "out"],
    "cnn": ["conv1", "relu1", "pool1", "conv2", "relu2", "fc1", "relu3", "out"],
}
BATCH = 256
#: Compute threads per framework: these models are tiny, and one thread (plus topoxr's
#: writer thread) keeps the timings stable on a small shared machine.
THREADS = 1
#: Channels of the wider torch CNN (full runs only), whose forward pass costs about as
#: much as writing its activations.
WIDE_CHANNELS = (48, 96)


def _inputs(n: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    reps = -(-n // len(digits.target))
    x = np.tile((digits.data / 16.0).astype(np.float32), (reps, 1))[:n]
    y = np.tile(digits.target.astype(np.int64), reps)[:n]
    return np.ascontiguousarray(x), y


def _timed(fn: Callable[[], Any]) -> float:
    gc.collect()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _medians(variants: dict[str, Callable[[], Any]], repeats: int,
             prepare: dict[str, Callable[[], Any]] | None = None) -> dict[str, float]:
    """Warm every variant up, then time them interleaved (load changes hit them all).

    ``prepare[key]``, where given, runs untimed before every run of variant ``key``
    (deleting the output of its previous run: not part of what is measured).
    """
    prepare = prepare or {}
    for key, fn in variants.items():
        prepare.get(key, lambda: None)()
        fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(repeats):
        for key, fn in variants.items():
            prepare.get(key, lambda: None)()
            times[key].append(_timed(fn))
    return {k: statistics.median(v) for k, v in times.items()}


# -- per-framework pieces ---------------------------------------------------------------------
class _Torch:
    name = "torch"
    channel_axis = 1

    def __init__(self) -> None:
        import torch

        import topoxr_torch
        from topoxr_torch.models import make_model

        self.torch = torch
        self.adapter = topoxr_torch
        self.make_model = make_model
        torch.set_num_threads(THREADS)

    def forward(self, model: Any) -> Callable[[np.ndarray], Any]:
        torch = self.torch
        model.eval()

        def run(x: np.ndarray) -> Any:
            with torch.inference_mode():
                return model(torch.from_numpy(x)).numpy()

        return run

    def capture(self, model: Any, layers: list[str]) -> Callable[[np.ndarray], Any]:
        torch = self.torch
        modules = dict(model.named_modules())
        captured: dict[str, np.ndarray] = {}
        for name in layers:
            modules[name].register_forward_hook(
                lambda m, a, out, name=name: captured.__setitem__(name, out.detach().numpy()))
        model.eval()

        def run(x: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
            with torch.inference_mode():
                out = model(torch.from_numpy(x)).numpy()
            return dict(captured), out

        return run


class _Keras:
    name = "keras"
    channel_axis = -1

    def __init__(self) -> None:
        import keras
        import tensorflow as tf

        import topoxr_keras

        try:
            tf.config.threading.set_intra_op_parallelism_threads(THREADS)
            tf.config.threading.set_inter_op_parallelism_threads(THREADS)
        except RuntimeError:  # TensorFlow already initialised: keep its settings
            logger.warning("could not limit TensorFlow's threads")
        from topoxr_keras.models import make_model

        self.keras = keras
        self.adapter = topoxr_keras
        self.make_model = make_model

    def forward(self, model: Any) -> Callable[[np.ndarray], Any]:
        return model.predict_on_batch

    def capture(self, model: Any, layers: list[str]) -> Callable[[np.ndarray], Any]:
        sub = self.keras.Model(model.inputs,
                               [model.get_layer(n).output for n in layers] + model.outputs)

        def run(x: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
            values = sub.predict_on_batch(x)
            return dict(zip(layers, values[:-1], strict=True)), values[-1]

        return run


def _pool(values: np.ndarray, channel_axis: int) -> np.ndarray:
    if values.ndim == 2:
        return values
    moved = np.moveaxis(values, channel_axis, 1)
    return moved.mean(axis=tuple(range(2, moved.ndim)), dtype=np.float64).astype(np.float32)


# -- the variants -----------------------------------------------------------------------------
def _bare(fw: Any, model: Any, x: np.ndarray) -> None:
    run = fw.forward(model)
    for start in range(0, len(x), BATCH):
        run(x[start:start + BATCH])


def _direct(fw: Any, capture: Callable, x: np.ndarray, y: np.ndarray, path: str,
            layout: dict[str, tuple[int, list[int], Any]], whole_chunks: bool) -> None:
    import zarr

    n = len(x)
    root = zarr.open_group(zarr.storage.LocalStore(path), mode="w")
    arrays = {
        layer: root.create_array(layer, shape=(neurons, n, 1), chunks=tuple(chunks),
                                 dtype="float32", fill_value=np.nan, compressors=codecs)
        for layer, (neurons, chunks, codecs) in layout.items()
    }
    label = root.create_array("label", shape=(n,), chunks=(1 << 16,), dtype="int64")
    pred = root.create_array("prediction", shape=(n, 1), chunks=(1 << 16, 1), dtype="int64")
    label[:] = y
    buffers: dict[str, list[np.ndarray]] = {k: [] for k in arrays}
    starts = dict.fromkeys(arrays, 0)
    preds = []
    for start in range(0, n, BATCH):
        outputs, out = capture(x[start:start + BATCH])
        preds.append(out.argmax(1))
        for layer, arr in arrays.items():
            values = _pool(outputs[layer], fw.channel_axis)
            if not whole_chunks:
                arr[:, start:start + len(values), 0] = values.T
                continue
            buffers[layer].append(values)
            rows = sum(len(v) for v in buffers[layer])
            if rows >= arr.chunks[1] or start + BATCH >= n:
                block = np.concatenate(buffers[layer])
                arr[:, starts[layer]:starts[layer] + rows, 0] = block.T
                starts[layer] += rows
                buffers[layer] = []
    pred[:, 0] = np.concatenate(preds)


def _run_config(fw: Any, kind: str, x: np.ndarray, y: np.ndarray, repeats: int,
                tmp: str, **model_kwargs: Any) -> dict[str, Any]:
    from topoxr import store_summary

    layers = LAYERS[kind]
    model = fw.make_model(kind, seed=0, **model_kwargs)
    capture = fw.capture(fw.make_model(kind, seed=0, **model_kwargs), layers)

    record_path = os.path.join(tmp, f"{fw.name}-{kind}-record.zarr")
    direct_path = os.path.join(tmp, f"{fw.name}-{kind}-direct.zarr")

    def record() -> None:
        path = record_path
        fw.adapter.record(model, (x, y), path, model_name=f"{kind}_{fw.name}", layers=layers,
                          batch_size=BATCH, progress=False)

    shutil.rmtree(record_path, ignore_errors=True)
    record()  # warm-up (graph tracing), and it tells the store's chunking
    summary = store_summary(os.path.join(tmp, f"{fw.name}-{kind}-record.zarr"))
    stored = summary["models"][f"{kind}_{fw.name}"]["layers"]
    import zarr

    root = zarr.open_group(os.path.join(tmp, f"{fw.name}-{kind}-record.zarr"), mode="r")
    # the store's chunks and activation codec (the writer's default may change)
    layout = {info["name"]: (info["neurons"], info["chunks"],
                             root[f"{kind}_{fw.name}/{key}/activation"].compressors or None)
              for key, info in stored.items()}

    def direct(whole: bool) -> Callable[[], None]:
        def run() -> None:
            _direct(fw, capture, x, y, direct_path, layout, whole)
        return run

    variants = {
        "a_forward": lambda: _bare(fw, model, x),
        "b_direct": direct(False),
        "b_direct_whole_chunks": direct(True),
        "record": record,
    }
    # the previous run's output is deleted before each timed run, untimed
    med = _medians(variants, repeats, prepare={
        "b_direct": lambda: shutil.rmtree(direct_path, ignore_errors=True),
        "b_direct_whole_chunks": lambda: shutil.rmtree(direct_path, ignore_errors=True),
        "record": lambda: shutil.rmtree(record_path, ignore_errors=True)})
    return {
        "seconds": {k: round(v, 4) for k, v in med.items()},
        "record_over_b_direct": round(med["record"] / med["b_direct"], 3),
        "record_over_b_direct_whole_chunks": round(
            med["record"] / med["b_direct_whole_chunks"], 3),
        "record_over_a_forward": round(med["record"] / med["a_forward"], 3),
        "b_direct_over_a_forward": round(med["b_direct"] / med["a_forward"], 3),
        "chunks": {k: v[1] for k, v in layout.items()},
        "neurons": {k: v[0] for k, v in layout.items()},
    }


def _bert_torch(n: int, repeats: int, tmp: str) -> dict[str, Any]:
    """Recording a small BERT against its bare forward pass (same process, same inputs)."""
    import torch
    import transformers

    import topoxr_torch

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=1000, hidden_size=128, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=256,
                                  max_position_embeddings=64)
    model = transformers.BertModel(cfg).eval()
    rng = np.random.default_rng(0)
    t = 32
    mask = (np.arange(t)[None, :] < rng.integers(8, t + 1, n)[:, None]).astype(np.int64)
    inputs = {"input_ids": rng.integers(1, 1000, (n, t)) * mask, "attention_mask": mask}
    layers = ["encoder.layer.0", "encoder.layer.0.intermediate", "encoder.layer.1"]

    def bare() -> None:
        with torch.inference_mode():
            for start in range(0, n, BATCH):
                model(**{k: torch.from_numpy(v[start:start + BATCH])
                         for k, v in inputs.items()})

    def record(spec: Any) -> Callable[[], None]:
        def run() -> None:
            path = os.path.join(tmp, "bert.zarr")
            shutil.rmtree(path, ignore_errors=True)
            topoxr_torch.record(model, inputs, path, layers=spec, batch_size=BATCH,
                                progress=False)
        return run

    variants = {"a_forward": bare, "record_mean": record(layers),
                "record_tokens": record({"encoder.layer.1": {"reduce": "tokens"}})}
    med = _medians(variants, repeats)
    return {"sequences": n, "tokens": t, "real_tokens": int(mask.sum()),
            "seconds": {k: round(v, 4) for k, v in med.items()},
            "record_mean_over_a_forward": round(med["record_mean"] / med["a_forward"], 3),
            "record_tokens_over_a_forward": round(
                med["record_tokens"] / med["a_forward"], 3)}


def _callback_keras(n_train: int, n_probe: int, epochs: int, repeats: int,
                    tmp: str) -> dict[str, Any]:
    """Cost of RecordActivations per recorded epoch against model.predict on the probe."""
    import keras

    import topoxr_keras
    from topoxr_keras.models import make_model

    x, y = _inputs(n_train)
    probe = (x[:n_probe], y[:n_probe])
    layers = LAYERS["mlp"]

    def fit(with_callback: bool) -> Callable[[], None]:
        def run() -> None:
            keras.utils.set_random_seed(0)
            model = make_model("mlp", seed=0)
            model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
            callbacks = []
            if with_callback:
                path = os.path.join(tmp, "callback.zarr")
                shutil.rmtree(path, ignore_errors=True)
                callbacks = [topoxr_keras.RecordActivations(probe, path, layers=layers,
                                                            batch_size=BATCH)]
            model.fit(x, y, epochs=epochs, batch_size=BATCH, verbose=0, callbacks=callbacks)
        return run

    predict_model = make_model("mlp", seed=0)

    def predict() -> None:
        predict_model.predict(probe[0], batch_size=BATCH, verbose=0)

    def record() -> None:
        path = os.path.join(tmp, "record.zarr")
        shutil.rmtree(path, ignore_errors=True)
        topoxr_keras.record(predict_model, probe, path, layers=layers, batch_size=BATCH,
                            progress=False)

    variants = {"fit": fit(False), "fit_with_callback": fit(True), "predict_probe": predict,
                "record_probe": record}
    med = _medians(variants, repeats)
    recorded = epochs + 1  # epoch 0 before training, then every epoch
    per_epoch = (med["fit_with_callback"] - med["fit"]) / recorded
    return {"train_samples": n_train, "probe_samples": n_probe, "epochs": epochs,
            "recorded_epochs": recorded, "seconds": {k: round(v, 4) for k, v in med.items()},
            "callback_seconds_per_recorded_epoch": round(per_epoch, 4),
            "callback_per_epoch_over_predict_probe": round(per_epoch / med["predict_probe"], 3),
            "callback_per_epoch_over_record_probe": round(per_epoch / med["record_probe"], 3)}


def main(quick: bool = False) -> dict[str, Any]:
    """Run the adapter benchmark.

    Parameters
    ----------
    quick : bool, default False
        2,000 samples and one repeat instead of 20,000 samples and the median of 5.

    Returns
    -------
    dict
        Per framework and network: median seconds of each variant and the ratios.
    """
    import psutil

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    n, repeats = (2_000, 1) if quick else (20_000, 5)
    x, y = _inputs(n)
    result: dict[str, Any] = {"samples": n, "batch": BATCH, "repeats": repeats}
    tmp = tempfile.mkdtemp(prefix="topoxr-bench-adapters-")
    try:
        for fw_cls in (_Torch, _Keras):
            fw = fw_cls()
            for kind in ("mlp", "cnn"):
                key = f"{kind}_{fw.name}"
                result[key] = _run_config(fw, kind, x, y, repeats, tmp)
                logger.info("%s: %s", key, result[key])
            if not quick and fw.name == "torch":
                # A wider CNN, where computing costs about as much as writing.
                result["cnn_wide_torch"] = _run_config(fw, "cnn", x, y, repeats, tmp,
                                                       channels=WIDE_CHANNELS)
            if fw.name == "torch":
                result["bert_torch"] = _bert_torch(512 if quick else 2_000, repeats, tmp)
                logger.info("bert_torch: %s", result["bert_torch"])
            else:
                result["callback_keras"] = _callback_keras(
                    2_000 if quick else 10_000, 500 if quick else 2_000, 3,
                    max(repeats, 3), tmp)
                logger.info("callback_keras: %s", result["callback_keras"])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result["peak_rss_mb"] = round(psutil.Process().memory_info().rss / 2**20, 1)
    return result
