"""The panel app over a real store: widgets drive the shown maps; `serve` answers HTTP."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

from topoxr.testing import make_activations, write_store

pytest.importorskip("panel")
hv = pytest.importorskip("holoviews")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    ds = make_activations(n_neurons=16, n_samples=48, n_epochs=3, n_labels=4, random_state=0)
    path = str(tmp_path_factory.mktemp("app") / "run.zarr")
    write_store(ds, path, model="mlp", layer="hidden")
    # a saved layout: a circle, so we can recognise it
    from topoxr.layouts import save_layout

    angle = np.linspace(0, 2 * np.pi, 16, endpoint=False)
    laid = ds.assign_coords(x=("neuron", 0.5 + 0.4 * np.cos(angle)),
                            y=("neuron", 0.5 + 0.4 * np.sin(angle)))
    save_layout(path, "mlp", "hidden", laid, "circle")
    return path


@pytest.fixture(scope="module")
def app(store):
    from topoxr.viz.app import build_app

    return build_app(store, methods=("pca",), resolution=40)


def _points(obj):
    return next(el for el in obj.traverse(lambda x: x, [hv.Points]))


def test_widgets_offer_the_store_contents(app):
    assert app.model.options == ["mlp"]
    assert app.layer.options == ["hidden"]
    assert app.layout.options == ["circle", "compute: pca"]
    assert app.grouping.options[0] == "label"
    assert any("correct" in g for g in app.grouping.options)
    assert app.epoch.options == [0, 1, 2] and app.epoch.value == 2
    assert isinstance(app.view.object, hv.Layout)


def test_saved_layout_is_drawn(app):
    app.layout.value = "circle"
    pts = _points(app.view.object)
    angle = np.linspace(0, 2 * np.pi, 16, endpoint=False)
    np.testing.assert_allclose(np.sort(pts.dimension_values("x")),
                               np.sort(0.5 + 0.4 * np.cos(angle)))


def test_epoch_player_changes_the_shown_values(app):
    app.grouping.value = "label"
    app.epoch.value = 2
    late = _points(app.view.object).dimension_values("nap")
    app.epoch.value = 0
    early = _points(app.view.object).dimension_values("nap")
    assert not np.allclose(late, early)
    from topoxr.grouping import naps

    expected = naps(app._node().to_dataset(), by="label").isel(epoch=0).compute()
    # every label's NAP at epoch 0 is among the shown maps
    shown = [_points(o).dimension_values("nap") for o in app.view.object]
    assert len(shown) == expected.sizes["label"]
    for lab in expected.label.values:
        assert any(np.allclose(v, expected.sel(label=lab).values, rtol=1e-5) for v in shown)


def test_grouping_switches_to_the_contrast_grid_and_computed_layout(app):
    app.grouping.value = next(g for g in app.grouping.options if "correct" in g)
    # the grid is shown as a layout of titled cells, correct row over wrong row
    titles = [c.label for c in app.view.object if not isinstance(c, hv.Empty)]
    assert titles and all(t.endswith((", correct", ", wrong")) for t in titles)
    assert any(t.endswith(", correct") for t in titles)
    first_wrong = next(i for i, t in enumerate(titles) if t.endswith(", wrong"))
    assert all(t.endswith(", correct") for t in titles[:first_wrong])
    assert len(_bar_images(app.view.object)) == 1  # one colour bar for the grid
    app.layout.value = "compute: pca"
    assert isinstance(app.view.object, hv.Layout)
    assert "pca" in app.status.object
    assert app.panel() is not None


def test_store_without_layers_is_refused(tmp_path):
    import zarr

    from topoxr.viz.app import build_app

    zarr.open_group(str(tmp_path / "empty.zarr"), mode="w")
    with pytest.raises(Exception, match=r"(?i)store|layer"):
        build_app(str(tmp_path / "empty.zarr"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_answers_http(store):
    port = _free_port()
    code = f"from topoxr.viz.app import serve; serve({store!r}, port={port})"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        body = None
        while time.monotonic() < deadline and body is None:
            if proc.poll() is not None:
                pytest.fail(f"serve exited: {proc.stdout.read().decode()[-2000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=20) as r:
                    assert r.status == 200
                    body = r.read().decode()
            except OSError:
                time.sleep(0.5)
        assert body is not None, "the app did not answer within 60 s"
        assert "topoxr" in body and "bokeh" in body.lower()
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def _bar_images(obj):
    return [im for im in obj.traverse(lambda x: x, [hv.Image])
            if hv.Store.lookup_options("bokeh", im, "plot").kwargs.get("colorbar")]


def test_player_runs_in_epoch_order_and_opens_on_the_highest_epoch(tmp_path):
    """Epochs written 0, 9, 3: the player offers them in order and opens on 9."""
    import topoxr
    from topoxr.grouping import naps
    from topoxr.viz.app import build_app

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 40)
    path = str(tmp_path / "run.zarr")
    with topoxr.ActivationWriter(path, model="mlp", mode="w") as writer:
        for epoch in (0, 9, 3):
            acts = rng.normal(size=(40, 12)) + np.eye(12)[labels] * (1 + epoch)
            writer.write("hidden", acts.astype(np.float32), sample=np.arange(40),
                         label=labels, epoch=epoch)
            writer.complete_epoch(epoch)
    app = build_app(path, resolution=20)
    assert app.epoch.options == [0, 3, 9] and app.epoch.value == 9
    expected = naps(app._node().to_dataset(), by="label").sel(epoch=9).compute()
    shown = [_points(o).dimension_values("nap") for o in app.view.object]
    assert len(shown) == expected.sizes["label"]
    for lab in expected.label.values:
        assert any(np.allclose(v, expected.sel(label=lab).values, rtol=1e-5) for v in shown)


@pytest.fixture(scope="module")
def bare_store(tmp_path_factory):
    """A store with a recorded layer and no saved layout."""
    ds = make_activations(n_neurons=16, n_samples=48, n_epochs=2, n_labels=3, random_state=0)
    path = str(tmp_path_factory.mktemp("bare") / "run.zarr")
    write_store(ds, path, model="mlp", layer="hidden")
    return path


def test_bad_resolution_and_methods_are_refused_up_front(bare_store):
    from topoxr.viz.app import build_app

    for bad in (0, -5, 1, 2.5, "80", True, None):
        with pytest.raises(ValueError, match=rf"resolution must be an integer of at least 2, "
                                             rf"got {bad!r}"):
            build_app(bare_store, resolution=bad)
    for bad in (("nonexistent",), ("pca", "nonexistent"), ("pca+nonexistent",)):
        with pytest.raises(ValueError, match=r"methods: unknown layout method "
                                             r"'(pca\+)?nonexistent'"):
            build_app(bare_store, methods=bad)
    with pytest.raises(TypeError, match=r"methods must hold layout method names .*got 3"):
        build_app(bare_store, methods=("pca", 3))
    # a single name is one method (not its letters), compositions are accepted
    app = build_app(bare_store, methods="pca", resolution=np.int64(20))
    assert app.layout.options == ["compute: pca"] and app.resolution == 20
    assert isinstance(app.view.object, hv.Layout)
    app = build_app(bare_store, methods=("pca", "pca+grid"), resolution=20)
    assert app.layout.options == ["compute: pca", "compute: pca+grid"]


def test_no_methods_needs_a_saved_layout_for_every_layer(bare_store, store):
    from topoxr.viz.app import build_app

    with pytest.raises(ValueError, match=r"methods is empty and no layout is saved for "
                                         r"layer\(s\) \['mlp/hidden'\]"):
        build_app(bare_store, methods=())
    # with a saved layout the app shows it, and offers nothing to compute
    app = build_app(store, methods=(), resolution=20)
    assert app.layout.options == ["circle"] and app.layout.value == "circle"
    pts = _points(app.view.object)
    angle = np.linspace(0, 2 * np.pi, 16, endpoint=False)
    np.testing.assert_allclose(np.sort(pts.dimension_values("x")),
                               np.sort(0.5 + 0.4 * np.cos(angle)))
