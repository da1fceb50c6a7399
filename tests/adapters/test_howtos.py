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


def test_record_transformer_howto_runs(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    blocks = python_blocks(HOWTO / "record-transformer.md")
    assert len(blocks) >= 4
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "howto"}
    for i, block in enumerate(blocks):
        exec(compile(block, f"record-transformer.md block {i}", "exec"), namespace)  # noqa: S102
    assert (tmp_path / "tokens.zarr").is_dir()
    assert namespace["by_token"].sizes["token_id"] > 1
