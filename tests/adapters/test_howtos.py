"""The code of the recording how-tos runs as written (in a temporary directory)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

HOWTO = Path(__file__).resolve().parents[2] / "docs" / "how-to"


def python_blocks(path: Path) -> list[str]:
    """The ```python blocks of a Markdown page, in order."""
    return re.findall(r"^```python\n(.*?)^```", path.read_text(encoding="utf-8"),
                      flags=re.DOTALL | re.MULTILINE)


def run_page(name: str, directory: Path) -> dict:
    """Run the page's code blocks in order, in one namespace, inside ``directory``."""
    blocks = python_blocks(HOWTO / name)
    assert blocks, f"{name} has no python code blocks"
    namespace: dict = {"__name__": "howto"}
    for i, block in enumerate(blocks):
        exec(compile(block, f"{name} block {i}", "exec"), namespace)  # noqa: S102
    return namespace


@pytest.mark.slow
def test_record_transformer_howto_runs(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    monkeypatch.chdir(tmp_path)
    namespace = run_page("record-transformer.md", tmp_path)
    assert (tmp_path / "tokens.zarr").is_dir()
    assert namespace["by_token"].sizes["token_id"] > 1
    assert namespace["cls"].attrs["topoxr_reduce"] == "first"


@pytest.mark.slow
def test_record_torch_howto_runs(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    monkeypatch.chdir(tmp_path)
    namespace = run_page("record-torch.md", tmp_path)
    # the resume block went on after the epochs recorded before it
    assert namespace["probe"].recorded_epochs == list(range(6))
