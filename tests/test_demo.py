"""`topoxr demo --quick` end to end, as a user runs it, and its determinism."""

from __future__ import annotations

import json

import numpy as np
import pytest

from topoxr import open_store

pytest.importorskip("torch")
pytest.importorskip("keras")
pytest.importorskip("holoviews")

#: The report's sections: one per application of the paper, each with its number.
SECTIONS = ("Findings", "Class maps: mlp_torch / relu1", "Class maps: transformer_torch / pool",
            "Per-token maps: transformer_torch / ffn",
            "Class maps of every layer", "Errors: correct vs wrong", "Errors: confusion grid",
            "Bias: a planted attribute", "Training process", "Layout quality and time")


@pytest.fixture(scope="module")
def demo_run(quick_demo):
    return quick_demo


@pytest.mark.slow
def test_demo_writes_store_report_and_figures(demo_run):
    out, result = demo_run
    for name in ("report.html", "maps.png", "training.gif", "quality.json"):
        assert (out / name).stat().st_size > 0, name
    tree = open_store(out / "activations.zarr")
    assert set(tree.children) == {"mlp_torch", "transformer_torch", "mlp_biased",
                                  "mlp_control"}  # quick: no CNN, no Keras
    layer = tree["mlp_torch/relu1"].to_dataset()
    assert layer.sizes["neuron"] == 128  # the paper's hidden layer
    assert layer.sizes["epoch"] == 6  # epoch 0 before training + 5 epochs (quick)
    assert bool(layer.epoch_complete.all())
    tokens = tree["transformer_torch/ffn"].to_dataset()
    assert tokens.sizes["neuron"] == 128 and tokens.sizes["sample"] == 8 * 360  # every row
    assert sorted(set(tokens["token_position"].values.tolist())) == list(range(8))
    assert tree["transformer_torch/pool"].to_dataset().sizes["sample"] == 360  # pooled
    biased = tree["mlp_biased/relu1"].to_dataset()
    assert biased["marked"].values.mean() == pytest.approx(0.5)  # the probe set: half marked
    assert "class maps (mlp_torch/relu1)" in result.stdout and "report.html" in result.stdout
    html = (out / "report.html").read_text()
    for section in SECTIONS:
        assert f"<h2>{section}" in html, section
    assert "cdn.bokeh.org" not in html and "https://" not in html.split("<body>")[1]


@pytest.mark.slow
def test_demo_numbers_of_each_application(demo_run):
    out, _ = demo_run
    quality = json.loads((out / "quality.json").read_text())
    found = quality["findings"]
    assert found["featured"] == "mlp_torch/relu1"
    cm = found["class_maps"]["mlp_torch/relu1"]
    assert -1 <= cm["mean_correlation"] < 0.5  # trained class maps are distinct
    assert len(cm["blob_count"]) == 10 and cm["mean_blob_count"] >= 1
    err = found["errors"]["mlp_torch/relu1"]
    assert err["wrong_samples"] == sum(p["count"] for p in err["pairs"])
    assert np.isfinite(err["mean_r_true"]) and np.isfinite(err["mean_r_predicted"])
    bias = found["bias"]
    assert bias["biased"]["mean_effect"] > bias["control"]["mean_effect"]  # the planted bias
    assert bias["biased_pulled_marked"] > bias["control_pulled_marked"]
    training = found["training"]
    assert training["epochs"] == list(range(6)) and len(training["change"]) == 5
    methods = {row["method"] for row in quality["layouts"]}
    assert len(methods) == 2
    for row in quality["layouts"]:
        assert 0.0 <= row["trustworthiness"] <= 1.0
        assert np.isfinite(row["smoothness"]) and row["seconds"] >= 0
    assert set(quality["timings_s"]) >= {"record", "analyse", "render", "total"}


def test_same_seed_same_numbers(tmp_path):
    """Recording is deterministic: two runs with one seed store identical activations."""
    from topoxr.demo import ModelSpec, _record, digits_probe

    data = digits_probe(seed=5)
    torch_spec = ModelSpec("mlp_torch", "torch", "paper_mlp", ("relu1",))
    keras_spec = ModelSpec("mlp_keras", "keras", "paper_mlp", ("relu1",), twin="mlp_torch")
    stores = []
    for run in range(2):
        store = tmp_path / f"run{run}.zarr"
        twin = _record(store, data, torch_spec, epochs=2, seed=5)
        _record(store, data, keras_spec, epochs=2, seed=5, twin=twin)
        stores.append(open_store(store))
    for node in ("mlp_torch/relu1", "mlp_keras/relu1"):
        a = stores[0][node].to_dataset().activation.values
        b = stores[1][node].to_dataset().activation.values
        np.testing.assert_array_equal(a, b)
    # identical initial weights: epoch 0 is the same network in both frameworks
    t0 = stores[0]["mlp_torch/relu1"].to_dataset().activation.isel(epoch=0).values
    k0 = stores[0]["mlp_keras/relu1"].to_dataset().activation.isel(epoch=0).values
    np.testing.assert_allclose(t0, k0, atol=1e-5)


def test_the_plan_without_keras_drops_the_twins():
    from topoxr.demo import demo_plan

    plan = demo_plan(quick=True, frameworks={"torch", "keras"})
    assert [s.name for s in plan] == ["mlp_torch", "transformer_torch", "mlp_biased",
                                      "mlp_control"]
    full = demo_plan(frameworks={"torch", "keras"})
    assert {s.name: s.twin for s in full}["cnn_keras"] == "cnn_torch"  # same initial weights
    alone = demo_plan(frameworks={"keras"})
    assert [s.name for s in alone] == ["mlp_keras", "cnn_keras"]
    assert all(s.twin is None for s in alone)  # no torch twin to copy from
    assert [s.name for s in demo_plan(frameworks=set())] == []


@pytest.mark.slow
def test_without_frameworks_the_demo_records_scikit_learn(tmp_path):
    """No PyTorch or Keras: the core pipeline still runs, on scikit-learn's MLP."""
    from topoxr.demo import run_demo

    result = run_demo(tmp_path / "out", quick=True, progress=False, frameworks=set())
    tree = open_store(result.store)
    assert set(tree.children) == {"mlp_sklearn"}
    assert tree["mlp_sklearn/hidden"].to_dataset().sizes["neuron"] == 128
    found = json.loads((tmp_path / "out" / "quality.json").read_text())["findings"]
    assert found["featured"] == "mlp_sklearn/hidden" and "bias" not in found
    html = result.report.read_text()
    assert "<h2>Class maps: mlp_sklearn / hidden" in html and "Bias" not in html
    assert "class maps (mlp_sklearn/hidden)" in result.summary_text()


def test_summary_text_shows_only_the_sections_it_has(tmp_path):
    from topoxr.demo import DemoResult

    bare = DemoResult(out=tmp_path, store=tmp_path / "s.zarr", summary={})
    assert bare.summary_text() == ""
    timed = DemoResult(out=tmp_path, store=tmp_path / "s.zarr", summary={},
                       timings={"record": 1.25}, files=[tmp_path / "report.html"])
    assert timed.summary_text() == f"timings: record 1.2s\nwrote {tmp_path / 'report.html'}"
    row = {"model": "m", "layer": "l", "method": "umap", "trustworthiness": 0.9,
           "smoothness": 0.5, "blob_count": 2.0, "seconds": 1.0}
    table = DemoResult(out=tmp_path, store=tmp_path / "s.zarr", summary={}, quality=[row],
                       cpu={"layout": 2.0})
    lines = table.summary_text().split("\n")
    assert lines[0].startswith("model") and lines[1].startswith("m ")
    assert lines[2:] == ["", "CPU time: layout 2.0s"]  # one blank line between sections
