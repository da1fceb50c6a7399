"""One layout API: the function topoxr.layout, 2-D profiles, dims of x/y, one seed rule."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

import topoxr
from topoxr.layouts import attach, draw_seeds, get_estimator
from topoxr.testing import make_activations
from topoxr.testing.profiles import clustered_profiles


def test_layout_is_a_function_beside_naps_and_quality():
    assert callable(topoxr.layout) and callable(topoxr.naps) and callable(topoxr.quality)
    assert "layout" in topoxr.__all__


def test_layout_of_an_array_equals_the_estimator_with_the_same_seed():
    X = clustered_profiles(60, 6, random_state=1)
    for method in ("random", "pca", "knnforce"):
        expected = get_estimator(method, random_state=5).fit_transform(X)
        np.testing.assert_allclose(topoxr.layout(X, method, random_state=5), expected, atol=1e-5)
    assert not np.allclose(topoxr.layout(X, "random", random_state=5),
                           topoxr.layout(X, "random", random_state=6))


def test_layout_of_a_labeled_object_is_attach():
    ds = make_activations(n_neurons=12)
    laid = topoxr.layout(ds, "pca", random_state=0)
    ref = attach(ds, "pca", random_state=0)
    xr.testing.assert_identical(laid, ref)
    xr.testing.assert_identical(ds.topo.layout("pca", random_state=0), ref)


def test_attach_equals_the_estimator_for_the_same_seed():
    """The seed rule: a single layout with seed s is the estimator with seed s."""
    ds = make_activations(n_neurons=15, n_epochs=1)
    nap = topoxr.naps(ds).isel(epoch=0)
    prof = topoxr.profiles(nap)
    laid = attach(nap, "random", random_state=11)
    expected = get_estimator("random", random_state=11).fit_transform(
        prof.transpose("neuron", "feature").values)
    np.testing.assert_allclose(np.c_[laid.x.values, laid.y.values], expected)
    assert json.loads(laid.attrs["topoxr_layout"])["seeds"] == [11]


def test_draw_seeds_first_is_the_seed_itself_others_differ():
    root, seeds = draw_seeds(3, 4)
    assert root == 3 and seeds[0] == 3 and len(set(seeds)) == 4
    assert draw_seeds(3, 4) == (root, seeds)
    with pytest.raises(TypeError, match="random_state"):
        draw_seeds(np.random.RandomState(0), 2)


def test_attach_accepts_a_2d_profile_matrix():
    ds = make_activations(n_neurons=14)
    prof = topoxr.profiles(topoxr.naps(ds).isel(epoch=-1))
    assert set(prof.dims) == {"neuron", "feature"}
    laid = attach(prof, "pca", random_state=0)
    assert laid.x.dims == ("neuron",) and laid.y.dims == ("neuron",)
    assert np.isfinite(laid.x.values).all()
    np.testing.assert_allclose(np.c_[laid.x.values, laid.y.values],
                               topoxr.layout(prof.values, "pca", random_state=0))


def test_one_epoch_puts_xy_on_neuron():
    ds = make_activations(n_neurons=12, n_epochs=1)
    laid = attach(ds, "pca", random_state=0)
    assert laid.x.dims == ("neuron",) and laid.y.dims == ("neuron",)
    several = attach(make_activations(n_neurons=12, n_epochs=2), "pca", random_state=0)
    assert several.x.dims == ("neuron", "epoch")


def test_shared_layout_puts_xy_on_neuron():
    laid = attach(make_activations(n_neurons=12), "pca", random_state=0, share="all")
    assert laid.x.dims == ("neuron",)


def test_bad_array_input_is_refused():
    with pytest.raises(ValueError, match="2-D"):
        topoxr.layout(np.zeros((3, 4, 5)))
    with pytest.raises(ValueError, match="metric"):
        topoxr.layout(np.ones((10, 3)), metric="manhattan")
    with pytest.raises(ValueError, match="unknown layout method"):
        topoxr.layout(np.random.default_rng(0).normal(size=(10, 3)), "nope")


def _imports_of(path: Path) -> set[str]:
    """topoxr.layouts modules imported anywhere in a file (module level or in functions)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        out |= {n for n in names if n.startswith("topoxr.layouts.")
                and (Path(topoxr.__file__).parent / "layouts" /
                     (n.split(".")[2] + ".py")).exists()}
    return {".".join(n.split(".")[:3]) for n in out}


def test_no_import_cycles_between_layout_modules():
    pkg = Path(topoxr.__file__).parent / "layouts"
    graph = {f"topoxr.layouts.{p.stem}": _imports_of(p) - {f"topoxr.layouts.{p.stem}"}
             for p in pkg.glob("*.py") if p.stem != "__init__"}
    assert graph["topoxr.layouts.force"] and graph["topoxr.layouts.grid"]  # sees imports
    state: dict[str, int] = {}

    def visit(node, path):
        state[node] = 1
        for nxt in graph.get(node, ()):
            if state.get(nxt) == 1:
                pytest.fail(f"import cycle: {' -> '.join(path + [nxt])}")
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for mod in graph:
        if mod not in state:
            visit(mod, [mod])


def test_importing_the_layouts_package_is_light():
    code = ("import sys, topoxr, topoxr.layouts; "
            "print(any(m.split('.')[0] in ('sklearn', 'scipy') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True)
    assert out.stdout.strip() == "False"
