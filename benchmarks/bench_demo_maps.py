"""Readable maps: how coherent the demo's class maps are, per layout method.

The demo's featured layer (the paper's MLP, 128 ReLU units, trained on scikit-learn's
digits with the demo's settings) is laid out with the default method, the paper's
``umap+force`` and ``graph+force``, and ``random`` (speckle by construction). For each:
the paper's smoothness score (lower: coherent blobs), blob count and mean blob area per
class map (:func:`topoxr.metrics.blobs`), mean correlation between class maps
(:func:`topoxr.findings.class_map_findings`), trustworthiness (k = 10) and seconds
(umap-learn's JIT compilation paid by a warm-up before timing), and the reference code's
own smoothness score (:func:`topoxr.metrics.paper_smoothness`).
"""

from __future__ import annotations

import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

METHODS = ("knnforce", "umap+force", "graph+force", "random")


def main(quick: bool = False) -> dict:
    """Record the demo's MLP, lay it out with every method and score the maps."""
    from topoxr import findings, open_store
    from topoxr.demo import ModelSpec, _one_torch_thread, _record, digits_probe
    from topoxr.grouping import naps
    from topoxr.layouts import attach
    from topoxr.layouts._registry import DEFAULT_METHOD, get_estimator
    from topoxr.findings import _maps
    from topoxr.metrics import paper_smoothness, quality

    epochs = 5 if quick else 10
    data = digits_probe(seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "maps.zarr"
        with _one_torch_thread(True):
            _record(store, data, ModelSpec("mlp_torch", "torch", "paper_mlp", ("relu1",)),
                    epochs=epochs, seed=0)
        ds = open_store(str(store))["mlp_torch/relu1"].to_dataset().load()
    by_label = naps(ds, by="label").isel(epoch=-1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        get_estimator("umap", random_state=0).fit_transform(np.random.default_rng(0).random((40, 6)))
    rows = []
    for method in METHODS:
        started = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            laid = attach(by_label, method, random_state=0)
        seconds = time.perf_counter() - started
        scores = quality(laid, k=10)
        cm = findings.class_map_findings(laid)
        rows.append({
            "method": method, "default": method == DEFAULT_METHOD, "seconds": round(seconds, 2),
            "trustworthiness": float(scores["trustworthiness"]),
            "smoothness": float(scores["smoothness"]),
            "blob_count": float(scores["blob_count"]), "blob_area": float(scores["blob_area"]),
            "mean_class_correlation": cm["mean_correlation"],
            # the reference code's own score (bwr-rendered maps, blurred), 100 x 100 maps
            "paper_smoothness": float(np.nanmean(paper_smoothness(_maps(laid, 100))["area"])),
        })
    return {"layer": "mlp_torch/relu1", "neurons": int(ds.sizes["neuron"]), "epochs": epochs,
            "accuracy": float(ds["correct"].isel(epoch=-1).mean()), "rows": rows}
