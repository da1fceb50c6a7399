"""The ``topoxr`` command line: exit codes, one-line errors, info output."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from topoxr import ActivationWriter
from topoxr.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "topoxr.cli", *args], capture_output=True,
                          text=True, timeout=300)


@pytest.fixture
def small_store(store_path):
    with ActivationWriter(store_path, model="net", attrs={"framework": "numpy"}) as writer:
        for epoch in range(2):
            writer.write("dense.0", np.arange(24, dtype=float).reshape(4, 6) + epoch,
                         sample=np.arange(4), label=[0, 1, 0, 1], epoch=epoch)
        writer.write("dense.0", np.ones((4, 6)), sample=np.arange(4), label=[0, 1, 0, 1], epoch=2)
    # epoch 3 left incomplete: only half the probe set
    with ActivationWriter(store_path, model="net") as writer:
        writer.write("dense.0", np.ones((2, 6)), sample=np.arange(2), label=[0, 1], epoch=3)
    return store_path


def test_info_json_reports_layers_and_incomplete_epochs(small_store):
    result = run_cli("info", small_store, "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    layer = info["models"]["net"]["layers"]["dense.0"]
    assert layer["neurons"] == 6
    assert layer["samples"] == 4
    assert layer["epochs"] == [0, 1, 2, 3]
    assert layer["complete_epochs"] == [0, 1, 2]
    assert layer["incomplete_epochs"] == [3]
    assert info["models"]["net"]["attrs"]["framework"] == "numpy"


def test_info_text_names_model_layer_and_incomplete_epoch(small_store):
    result = run_cli("info", small_store)
    assert result.returncode == 0
    assert "model net" in result.stdout
    assert "dense.0" in result.stdout
    assert "incomplete: [3]" in result.stdout


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        (["info", "/definitely/not/here.zarr"], 1, "no topoxr store"),
        (["info"], 2, "required"),
        (["nonsense-command"], 2, "invalid choice"),
    ],
)
def test_errors_are_one_line_with_exit_codes(args, code, needle):
    result = run_cli(*args)
    assert result.returncode == code
    assert needle in result.stderr
    assert "Traceback" not in result.stderr


def test_info_on_a_folder_that_is_not_a_store(tmp_path, capsys):
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "file.txt").write_text("hello")
    assert main(["info", str(tmp_path / "stuff")]) == 1
    err = capsys.readouterr().err
    assert "not a topoxr store" in err
    assert (tmp_path / "stuff" / "file.txt").read_text() == "hello"


def test_help_of_every_command():
    for command in ["info", "demo"]:
        result = run_cli(command, "--help")
        assert result.returncode == 0
        assert "usage: topoxr" in result.stdout
