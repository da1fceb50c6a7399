"""The one place where optional dependencies are imported."""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

__all__ = ["has_module", "import_optional"]


def has_module(name: str) -> bool:
    """Return whether ``name`` can be imported, without importing it."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def import_optional(name: str, *, extra: str, purpose: str) -> ModuleType:
    """Import an optional dependency or fail with an install hint.

    Parameters
    ----------
    name : str
        Module to import, e.g. ``"umap"``.
    extra : str
        The topoxr extra that installs it, e.g. ``"umap"``.
    purpose : str
        What needs it, used in the error message, e.g. ``"UMAPLayout"``.

    Returns
    -------
    module
        The imported module.

    Raises
    ------
    ImportError
        Naming the module and the ``pip install "topoxr[extra]"`` command.
    """
    try:
        return importlib.import_module(name)
    except ImportError as err:
        raise ImportError(
            f'{purpose} requires {name}; install it with `pip install "topoxr[{extra}]"`'
        ) from err
