"""scripts/min_versions.py: every core dependency pinned to its floor, or refused."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.version import Version

ROOT = Path(__file__).parents[1]
SCRIPT = ROOT / "scripts" / "min_versions.py"


def _module():
    spec = importlib.util.spec_from_file_location("min_versions", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_core_dependency_is_pinned_to_its_floor():
    out = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True,
                         check=True).stdout.splitlines()
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert len(out) == len(declared)
    for line, requirement in zip(out, declared, strict=True):
        floor = requirement.split(",")[0]  # a ceiling (",<Y") is not part of the pin
        assert line == floor.replace(">=", "=="), (line, requirement)
    zarr_floor = next(line.split("==")[1] for line in out if line.startswith("zarr=="))
    # the first release with the store protocol topoxr imports (and renaming writes)
    assert Version(zarr_floor) >= Version("3.1.6")


@pytest.mark.parametrize("requirement", ["zarr", "zarr<4", "zarr>=3.1,!=3.1.2", "zarr~=3.1",
                                         "zarr<3.2,>=3.1",
                                         "zarr>=3.1; python_version<'3.12'"])
def test_a_dependency_without_a_single_floor_is_refused(tmp_path, requirement):
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(f'[project]\ndependencies = ["numpy>=2.0", "{requirement}"]\n')
    with pytest.raises(ValueError, match="no single '>=' floor"):
        _module().floors(pyproject)


def test_a_ceiling_is_left_out_of_the_pin(tmp_path):
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[project]\ndependencies = ["zarr>=3.1.6,<3.2", "numpy >= 2.0"]\n')
    assert _module().floors(pyproject) == ["zarr==3.1.6", "numpy==2.0"]


def test_extras_in_a_name_are_kept(tmp_path):
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[project]\ndependencies = ["dask[array]>=2024.12"]\n')
    assert _module().floors(pyproject) == ["dask[array]==2024.12"]


def test_named_extras_are_pinned_after_the_core(tmp_path):
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[project]\ndependencies = ["numpy>=2.0"]\n'
                         '[project.optional-dependencies]\n'
                         'viz = ["panel>=1.9", "bokeh>=3.8"]\nkeras = ["keras>=3.5"]\n')
    module = _module()
    assert module.floors(pyproject, ["viz"]) == ["numpy==2.0", "panel==1.9", "bokeh==3.8"]
    with pytest.raises(ValueError, match="no extra 'nope'"):
        module.floors(pyproject, ["nope"])
