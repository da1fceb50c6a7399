"""Sphinx configuration for the topoxr documentation (built with warnings as errors)."""

from __future__ import annotations

import topoxr

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
