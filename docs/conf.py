"""Sphinx configuration for the topoxr documentation (built with warnings as errors)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

# Quieter TensorFlow while autodoc imports topoxr_keras (set before anything imports it).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import topoxr  # noqa: E402

project = "topoxr"
author = "topoxr developers"
copyright = "2026, topoxr developers"  # noqa: A001
version = release = topoxr.__version__

extensions = [
    "myst_parser",
    "numpydoc",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx_autosummary_accessors",
]
# No intersphinx: the docs build offline, in CI, with warnings as errors.
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3
exclude_patterns = ["_build", "**/.ipynb_checkpoints"]
import sphinx_autosummary_accessors  # noqa: E402

templates_path = ["_templates", sphinx_autosummary_accessors.templates_path]
autosummary_generate = True
autodoc_typehints = "none"
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False
html_theme = "pydata_sphinx_theme"
html_static_path = ["_static"]
html_title = "topoxr"
suppress_warnings = ["myst.header"]


def _clean_generated(app: object) -> None:
    """Remove the autosummary stubs of a previous build before they are regenerated.

    ``docs/generated/`` is written by autosummary on every build and git-ignored; a stub
    left over from a renamed or removed function would otherwise fail the ``-W`` build
    with "document isn't included in any toctree".
    """
    generated = Path(app.srcdir) / "generated"  # type: ignore[attr-defined]
    if generated.is_dir():
        shutil.rmtree(generated)


def setup(app: object) -> dict[str, bool]:
    """Register the stub cleanup ahead of autosummary's own ``builder-inited`` handler."""
    app.connect("builder-inited", _clean_generated, priority=100)  # type: ignore[attr-defined]
    return {"parallel_read_safe": True}
