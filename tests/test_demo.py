"""`topoxr demo --quick` end to end, as a user runs it, and its determinism."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from topoxr import open_store

pytest.importorskip("torch")
pytest.importorskip("keras")
pytest.importorskip("holoviews")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = subprocess.run(
        [sys.executable, "-m", "topoxr.cli", "demo", "--quick", "--out", str(out), "--seed", "3"],
        capture_output=True, text=True, timeout=900, env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


def test_demo_writes_store_report_and_figures(demo_run):
    out, result = demo_run
    for name in ("report.html", "maps.png", "training.gif", "quality.json"):
        assert (out / name).stat().st_size > 0, name
    tree = open_store(out / "activations.zarr")
    assert {"mlp_torch", "mlp_keras"} <= set(tree.children)
    layer = tree["mlp_torch/relu1"].to_dataset()
    assert layer.sizes["epoch"] == 4  # epoch 0 before training + 3 epochs (quick)
    assert bool(layer.epoch_complete.all())
    assert "report:" in result.stdout or "report.html" in result.stdout
    html = (out / "report.html").read_text()
    for section in ("class maps", "training process", "correct vs wrong", "confusion grid",
                    "PyTorch and Keras side by side", "Layout quality"):
        assert section in html, section
    assert "cdn.bokeh.org" not in html  # self-contained: works offline


def test_demo_quality_table_compares_default_with_the_paper(demo_run):
    out, _ = demo_run
    rows = json.loads((out / "quality.json").read_text())
    methods = {row["method"] for row in rows}
    assert len(methods) == 2
    for row in rows:
        assert 0.0 <= row["trustworthiness"] <= 1.0
        assert np.isfinite(row["smoothness"]) and row["seconds"] >= 0


def test_same_seed_same_numbers(tmp_path):
    """Recording is deterministic: two runs with one seed store identical activations."""
    from topoxr.demo import _record_keras, _record_torch, digits_probe

    data = digits_probe(seed=5)
    stores = []
    for run in range(2):
        store = tmp_path / f"run{run}.zarr"
        twin = _record_torch(store, data, "mlp", "mlp_torch", ["relu1"], epochs=2, seed=5)
        _record_keras(store, data, "mlp", "mlp_keras", ["relu1"], epochs=2, seed=5,
                      torch_twin=twin)
        stores.append(open_store(store))
    for node in ("mlp_torch/relu1", "mlp_keras/relu1"):
        a = stores[0][node].to_dataset().activation.values
        b = stores[1][node].to_dataset().activation.values
        np.testing.assert_array_equal(a, b)
