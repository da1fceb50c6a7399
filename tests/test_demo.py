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
    assert -1 <= cm["mean_correlation"] < 0.5  # pinned near -1/(G-1): not distinctness
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


# --------------------------------------------------------------------------------------
# the demo's output folder, its planted mark and its numbers (audit of the demo)
# --------------------------------------------------------------------------------------
def _files(root) -> dict[str, bytes]:
    """Every file under ``root`` with its bytes (to show that nothing changed)."""
    from pathlib import Path

    return {str(p.relative_to(root)): p.read_bytes()
            for p in sorted(Path(root).rglob("*")) if p.is_file()}


def _small_store(path) -> None:
    from topoxr import ActivationWriter

    with ActivationWriter(path, model="precious") as writer:
        writer.write("h", np.arange(48, dtype=float).reshape(8, 6), sample=np.arange(8),
                     label=np.arange(8) % 2, epoch=0)


@pytest.mark.parametrize("inside", ["", "sub", "sub/deeper"])
def test_the_demo_refuses_an_output_folder_in_a_zarr_store(tmp_path, inside):
    from topoxr import StoreError, verify
    from topoxr.demo import run_demo

    store = tmp_path / "mine.zarr"
    _small_store(store)
    before = _files(store)
    with pytest.raises(StoreError, match="Zarr store") as err:
        run_demo(store / inside, quick=True, frameworks=set(), progress=False)
    assert str(store) in str(err.value)
    assert _files(store) == before  # nothing written, no folder created
    assert not (store / "sub").exists()
    assert verify(store, record=False).ok


def test_the_demo_cli_refuses_a_store_as_its_output_folder(tmp_path, capsys):
    from topoxr.cli import main

    store = tmp_path / "mine.zarr"
    _small_store(store)
    before = _files(store)
    assert main(["demo", "--quick", "--no-progress", "--out", str(store)]) == 1
    err = capsys.readouterr().err
    assert "Zarr store" in err and "Traceback" not in err
    assert _files(store) == before


def test_the_demo_does_not_replace_a_store_another_process_writes(tmp_path):
    import subprocess
    import sys

    from topoxr import StoreLockedError, store_summary
    from topoxr.demo import run_demo

    out = tmp_path / "out"
    store = out / "activations.zarr"
    holder = subprocess.Popen([sys.executable, "-c", f"""
import sys, numpy as np, topoxr
w = topoxr.ActivationWriter({str(store)!r}, model="precious", mode="w")
w.write("h", np.ones((8, 6), "float32"), sample=np.arange(8), epoch=0); w.flush()
print("HOLDING", flush=True)
sys.stdin.read()  # until the test closes stdin
w.write("h", np.ones((8, 6), "float32"), sample=np.arange(8, 16), epoch=0)
w.close(); print("CLOSED", flush=True)
"""], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "HOLDING"
        with pytest.raises(StoreLockedError, match="not replacing"):
            run_demo(out, quick=True, frameworks=set(), progress=False)
        assert list(store_summary(store)["models"]) == ["precious"]
    finally:
        stdout, _ = holder.communicate("", timeout=60)
    assert holder.returncode == 0 and "CLOSED" in stdout
    summary = store_summary(store)
    assert list(summary["models"]) == ["precious"] and not summary["problems"]
    assert summary["models"]["precious"]["layers"]["h"]["samples"] == 16
    assert not (out / "report.html").exists()


def test_the_mark_lies_on_pixels_that_no_digit_inks():
    """The planted attribute must not be confounded with the class: on scikit-learn's
    bundled digits, every pixel of the mark is blank in every image."""
    from sklearn.datasets import load_digits

    from topoxr.digits import add_mark, digits_probe, plant_bias

    images = load_digits().images / 16.0
    area = add_mark(np.zeros((1, 64)), np.array([True])).reshape(8, 8) > 0
    assert area.any()  # a mark to see
    assert (images[:, area] == 0).all()
    flat = images.reshape(len(images), 64)
    marked = add_mark(flat, np.ones(len(flat), dtype=bool)).reshape(-1, 8, 8)
    assert (marked[:, area] == 1).all()
    assert np.array_equal(marked[:, ~area], images[:, ~area])  # nothing else changes
    probe = plant_bias(digits_probe(seed=0), seed=0)
    ink = (probe["images_probe"][:, area] > 0).any(axis=1)
    assert np.array_equal(ink, probe["marked_probe"])  # the mark is all that inks there


@pytest.fixture(scope="module")
def sklearn_demo(tmp_path_factory):
    """The demo without PyTorch or Keras (``frameworks=set()``) and the log records."""
    import logging

    from topoxr.demo import run_demo

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("topoxr")
    logger.addHandler(handler)
    try:
        result = run_demo(tmp_path_factory.mktemp("sk") / "out", quick=True, progress=False,
                          frameworks=set())
    finally:
        logger.removeHandler(handler)
    return result, records


@pytest.mark.slow
def test_the_demo_says_why_it_records_scikit_learn(sklearn_demo):
    _, records = sklearn_demo
    lines = [r.getMessage() for r in records if "scikit-learn" in r.getMessage()]
    assert len(lines) == 1, lines
    assert "frameworks" in lines[0]  # the caller chose none
    assert "not installed" not in lines[0]  # torch is installed here: not the reason


@pytest.mark.slow
def test_the_quality_table_counts_the_blobs_of_the_findings(sklearn_demo):
    from topoxr.layouts._registry import DEFAULT_METHOD

    result, _ = sklearn_demo
    row, = [r for r in result.quality if r["method"] == DEFAULT_METHOD]
    cm = result.findings["class_maps"]["mlp_sklearn/hidden"]
    assert row["blob_count"] == pytest.approx(cm["mean_blob_count"])


@pytest.mark.parametrize("n_probe", [5, 15, 0, -10, 360.0])
def test_a_probe_size_the_classes_cannot_share_is_refused(n_probe):
    # any size became 10 per class or its floor: n_probe=5, 0 and -10 gave 10 samples
    from topoxr.digits import digits_probe

    with pytest.raises(ValueError, match="n_probe must be a positive multiple of 10"):
        digits_probe(n_probe)
    assert len(digits_probe(20)["probe_ids"]) == 20


def test_synthetic_layers_hold_every_label_and_chunk_as_asked():
    # fewer samples than labels left labels out, and chunks={} gave numpy, not dask
    import dask.array as dsa

    from topoxr.testing import make_activations

    with pytest.raises(ValueError, match="cannot hold every one of n_labels=5"):
        make_activations(n_samples=3, n_labels=5)
    assert isinstance(make_activations(chunks={}).activation.data, dsa.Array)


# --------------------------------------------------------------------------------------
# the report's claims say what was measured (audit of the report's wording)
# --------------------------------------------------------------------------------------
def _stdout_line(result, start: str) -> str:
    line, = [line for line in result.stdout.splitlines() if line.startswith(start)]
    return line


@pytest.mark.slow
def test_the_report_does_not_sell_the_pinned_mean_correlation_as_distinctness(demo_run):
    # normalised NAPs sum to ~0 over the classes at every pixel: the mean correlation of
    # all class pairs sits near -1/(G-1) whatever the data, so it cannot show distinctness
    out, result = demo_run
    found = json.loads((out / "quality.json").read_text())["findings"]
    for cm in found["class_maps"].values():
        g = len(cm["blob_count"])
        assert cm["mean_correlation"] == pytest.approx(-1 / (g - 1), abs=0.05)
    html = (out / "report.html").read_text()
    for claim in ("Mean correlation between class maps", "lower is more distinct",
                  "1: all classes alike", "Distinctness", "Mean correlation between the rows"):
        assert claim not in html, claim
    cm = found["class_maps"]["mlp_torch/relu1"]
    (a, b), r = cm["max_pair"]["groups"], cm["max_pair"]["correlation"]
    assert f"Most alike: classes {a} and {b} (r {r:.2f})" in html  # the informative number
    assert f"-1/({len(cm['blob_count'])} - 1)" in html  # what the mean is pinned to
    line = _stdout_line(result, "class maps (mlp_torch/relu1)")
    assert f"most alike: classes {a} and {b} (r {r:.2f})" in line
    assert "mean correlation" not in line


@pytest.mark.slow
def test_the_report_tells_its_two_blob_areas_apart(demo_run):
    # quality table: each map's mean blob area averaged over maps (no blob: 0); findings:
    # the area of one blob, count-weighted, maps without blobs left out
    out, result = demo_run
    html = (out / "report.html").read_text()
    assert "<th>mean blob area per map</th>" in html  # the layout quality table
    assert "<th>mean area of one blob</th>" in html  # the class-maps table
    assert "<th>blob area</th>" not in html and "<th>blob_area</th>" not in html
    found = json.loads((out / "quality.json").read_text())["findings"]
    area = found["class_maps"]["mlp_torch/relu1"]["mean_blob_area"]
    assert f"mean area of one blob {100 * area:.1f}% of the map" in html
    line = _stdout_line(result, "class maps (mlp_torch/relu1)")
    assert f"mean area of one blob {100 * area:.1f}% of the map" in line
    assert "of the map each" not in line


@pytest.mark.slow
def test_the_errors_claim_counts_and_states_no_direction_from_few_samples(demo_run):
    threshold = 20  # fewer compared wrong samples: counts only, no "most ..."
    out, result = demo_run
    err = json.loads((out / "quality.json").read_text())["findings"]["errors"]["mlp_torch/relu1"]
    pairs = [p for p in err["pairs"] if p["r_true"] is not None and p["r_predicted"] is not None
             and np.isfinite(p["r_true"]) and np.isfinite(p["r_predicted"])]
    compared = sum(p["count"] for p in pairs)
    own = sum(p["count"] for p in pairs if p["r_true"] > p["r_predicted"])
    predicted = sum(p["count"] for p in pairs if p["r_predicted"] > p["r_true"])
    claim = (f"{own} of {compared} wrong probes are in confusions whose map is closer to "
             f"their own class, {predicted} in ones closer to the class predicted")
    html = (out / "report.html").read_text()
    assert claim in html and claim in _stdout_line(result, "errors (mlp_torch/relu1)")
    assert "arises later" not in html  # nothing measured says where the confusion arises
    if compared < threshold:
        for direction in ("Most wrong samples", "most look to this layer", "most are in"):
            assert direction not in html and direction not in result.stdout
        assert f"too few (under {threshold})" in html
    from topoxr.demo import MIN_WRONG_FOR_DIRECTION

    assert threshold == MIN_WRONG_FOR_DIRECTION  # the documented threshold


def test_the_keras_twin_is_drawn_on_the_torch_layout(tmp_path):
    # two layouts of twins are not related by a rotation: aligning them (Procrustes) made
    # the frameworks look differently organised; one shared layout shows the activity
    from topoxr._demo_report import on_shared_layout
    from topoxr.alignment import match_neurons
    from topoxr.demo import ModelSpec, _record, digits_probe
    from topoxr.grouping import naps
    from topoxr.layouts import attach

    data = digits_probe(seed=1)
    store = tmp_path / "twins.zarr"
    twin = _record(store, data, ModelSpec("mlp_torch", "torch", "paper_mlp", ("relu1",)),
                   epochs=1, seed=1)
    _record(store, data, ModelSpec("mlp_keras", "keras", "paper_mlp", ("relu1",),
                                   twin="mlp_torch"), epochs=1, seed=1, twin=twin)
    tree = open_store(store)
    torch_naps, keras_naps = (
        attach(naps(tree[f"{m}/relu1"].to_dataset(), by="label"), "pca", random_state=0,
               share=1) for m in ("mlp_torch", "mlp_keras"))
    drawn, info = on_shared_layout(torch_naps, keras_naps)
    rows_k, rows_t = match_neurons(keras_naps, torch_naps)
    assert info["n_matched"] == len(rows_k) == 128
    # every Keras neuron sits exactly where its matched PyTorch twin sits ...
    np.testing.assert_array_equal(drawn["x"].values, torch_naps["x"].values[rows_t])
    np.testing.assert_array_equal(drawn["y"].values, torch_naps["y"].values[rows_t])
    # ... and keeps its own activity
    np.testing.assert_array_equal(drawn.values, keras_naps.isel(neuron=rows_k).values)
    np.testing.assert_array_equal(drawn["neuron"].values, keras_naps["neuron"].values[rows_k])
    assert -1 <= info["median_r"] <= 1
    assert json.loads(drawn.attrs["topoxr_layout"])["shared"]["n_matched"] == 128


@pytest.mark.slow
def test_error_counts_are_probes_not_token_rows(demo_run):
    """quality.json gave transformer_torch/ffn 112 "wrong samples" for 14 wrong digits
    (each of 8 row tokens counted); error counts now come from layers of one row per
    probe, and each equals the probes predicted wrong at the last epoch."""
    import xarray as xr

    out, _ = demo_run
    errors = json.loads((out / "quality.json").read_text())["findings"]["errors"]
    tree = xr.open_datatree(out / "activations.zarr", engine="zarr")
    assert errors
    for key, err in errors.items():
        ds = tree[key].to_dataset()
        assert "token_position" not in ds.coords, key
        last = ds.sel(epoch=int(ds.epoch.max()))
        wrong = int(((last.prediction != last.label) & last.committed).sum())
        assert err["wrong_samples"] == wrong, key
