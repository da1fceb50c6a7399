"""Importing topoxr (or one adapter) loads no heavy framework it does not need.

Each check runs in a fresh interpreter and subtracts what a bare ``python -c pass``
already has loaded (``.pth`` files, editable-install finders), as MNE does.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "tensorflow", "keras", "jax", "holoviews", "bokeh", "panel", "umap",
         "numba", "hypothesis", "matplotlib")
CORE_FORBIDDEN = HEAVY[:-1]  # matplotlib is not promised away; reported, not enforced

_CODE = """
import json, sys
before = set(sys.modules)
{statement}
print(json.dumps(sorted(m.split(".")[0] for m in set(sys.modules) - before)))
"""


def _loaded(statement: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", _CODE.format(statement=statement)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


@pytest.fixture(scope="module")
def baseline() -> set[str]:
    return _loaded("pass")


def test_import_topoxr_is_light(baseline):
    loaded = _loaded("import topoxr") - baseline
    assert "topoxr" in loaded and "xarray" in loaded  # the check can see imports
    assert not loaded & set(CORE_FORBIDDEN), sorted(loaded & set(CORE_FORBIDDEN))


def test_the_store_round_trip_stays_light(baseline, tmp_path):
    statement = (
        "import numpy as np, topoxr\n"
        f"with topoxr.ActivationWriter({str(tmp_path / 's.zarr')!r}, model='m') as w:\n"
        "    w.write('h', np.ones((2, 3)), sample=[0, 1])\n"
        f"topoxr.open_store({str(tmp_path / 's.zarr')!r})['m/h'].activation.values"
    )
    loaded = _loaded(statement) - baseline
    assert not loaded & set(CORE_FORBIDDEN), sorted(loaded & set(CORE_FORBIDDEN))


@pytest.mark.parametrize("adapter, forbidden", [
    ("topoxr_torch", ("keras", "tensorflow", "jax")),
    ("topoxr_keras", ("torch", "jax")),
])
def test_adapters_load_only_their_framework(baseline, adapter, forbidden):
    if importlib.util.find_spec(adapter) is None:
        pytest.skip(f"{adapter} is not installed")
    loaded = _loaded(f"import {adapter}") - baseline
    assert adapter in loaded
    assert not loaded & set(forbidden), sorted(loaded & set(forbidden))


@pytest.mark.parametrize("function, module, extra", [
    ("naps", "grouping", "GroupingError"),
    ("profiles", "similarity", "profile_matrix"),
    ("distances", "similarity", "pairwise_distances"),
    ("quality", "metrics", "trustworthiness"),
    ("align", "alignment", "procrustes"),
])
def test_top_level_functions_leave_their_modules_reachable(function, module, extra):
    """``topoxr.quality`` is the function; its module, ``topoxr.metrics``, stays a module."""
    top = importlib.import_module("topoxr")
    mod = importlib.import_module(f"topoxr.{module}")
    assert callable(getattr(top, function))
    assert getattr(top, function) is getattr(mod, function)
    assert getattr(top, module) is mod  # the attribute is the module, not a function
    assert hasattr(mod, extra)


def _imported_modules(path) -> set[str]:
    """Every module an ``import`` statement of a source file names (at any depth)."""
    import ast

    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_no_import_circle_between_the_core_and_the_adapters():
    """The core reaches adapters only through the registry; adapters never import the demo
    or the CLI; the demo does not import the CLI."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    adapters = ("topoxr_torch", "topoxr_keras")
    core = sorted((root / "topoxr").rglob("*.py"))
    assert len(core) > 20  # the scan sees the package
    for path in core:
        names = _imported_modules(path)
        wrong = sorted(n for n in names if n.split(".")[0] in adapters)
        assert not wrong, f"{path.relative_to(root)} imports adapter modules by name: {wrong}"
    for path in (root / "topoxr").glob("*demo*.py"):
        names = _imported_modules(path)
        assert not {n for n in names if n.startswith("topoxr.cli")}, path.name
    for path in sorted((root / "adapters").rglob("*.py")):
        names = _imported_modules(path)
        wrong = sorted(n for n in names if n.startswith(("topoxr.demo", "topoxr._demo",
                                                          "topoxr.cli")))
        assert not wrong, f"{path.relative_to(root)} imports {wrong}"
