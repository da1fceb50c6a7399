"""The documentation builds with warnings as errors (as ``make docs`` and CI build it)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sphinx", reason="building the docs needs sphinx (dependency group 'docs')")

DOCS = Path(__file__).resolve().parents[1] / "docs"


@pytest.mark.slow
def test_docs_build_without_warnings(tmp_path: Path) -> None:
    # Build from a copy so that the autosummary stubs (docs/generated/) and the build
    # output never touch the working tree, and a stale stub there cannot hide a failure.
    src = tmp_path / "docs"
    shutil.copytree(DOCS, src, ignore=shutil.ignore_patterns("_build", "generated"))
    out = tmp_path / "html"
    proc = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
         str(src), str(out)],
        capture_output=True, text=True, timeout=540, check=False,
    )
    warnings = [line for line in proc.stderr.splitlines() if "WARNING" in line or "ERROR" in line]
    assert proc.returncode == 0, "sphinx failed:\n" + ("\n".join(warnings) or proc.stderr[-4000:])
    for page in ("index", "getting-started", "concepts", "api", "cli", "benchmarks",
                 "whats-new", "store-format"):
        assert (out / f"{page}.html").is_file(), f"{page}.html was not built"
    # The API reference really documents the public API (autosummary imported it).
    api = (out / "api.html").read_text(encoding="utf-8")
    for name in ("ActivationWriter", "open_store", "naps", "attach", "topomap"):
        assert name in api
    assert (out / "generated" / "topoxr.grouping.naps.html").is_file()
