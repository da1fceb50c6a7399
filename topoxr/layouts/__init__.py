"""Layout estimators: neuron profiles in, 2-D neuron coordinates in the unit square out.

Every method is a scikit-learn style estimator (``fit_transform(X) -> (n, 2)``) and is
registered by name; :func:`get_estimator` builds one from a name such as ``"umap+force"``.
The everyday entry point is the function :func:`topoxr.layout`; this package holds the
estimators and helpers behind it. Names are imported on first access, so ``import
topoxr.layouts`` loads neither scikit-learn nor SciPy.

Seed rule (one rule for :func:`topoxr.layout`, :func:`attach`, :func:`compute_layouts`
and the estimators): a layout computed with ``random_state=s`` (an int in
``[0, 2**32)``) is ``get_estimator(method, random_state=s).fit_transform(profiles)``.
Per-epoch layouts use ``s`` for the first epoch and the seeds that
:func:`draw_seeds` draws from ``numpy.random.SeedSequence(s)`` for the others.
"""

from __future__ import annotations

import importlib
from typing import Any

_NAMES = {
    "BaseLayout": "_base", "LayoutInputError": "_base", "distance_matrix": "_base",
    "to_unit_square": "_base",
    "DEFAULT_METHOD": "_registry", "PAPER_METHODS": "_registry",
    "available_methods": "_registry", "get_estimator": "_registry", "register": "_registry",
    "attach": "_attach", "compute_layouts": "_attach", "draw_seeds": "_attach",
    "load_layout": "_attach", "save_layout": "_attach",
    "RandomLayout": "baseline", "ForceLayout": "force", "KNNForceLayout": "force",
    "SpringLayout": "graph", "GridSnap": "grid", "snap_to_grid": "grid",
    "PCALayout": "linear", "MDSLayout": "manifold", "TSNELayout": "manifold",
    "UMAPLayout": "manifold", "SOMLayout": "som",
}

__all__ = sorted(_NAMES)


def __getattr__(name: str) -> Any:
    module = _NAMES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_NAMES))
