"""Layout estimators: neuron profiles in, 2-D neuron coordinates in the unit square out.

Every method is a scikit-learn style estimator (``fit_transform(X) -> (n, 2)``) and is
registered by name; :func:`get_estimator` builds one from a name such as ``"umap+force"``.
"""

from __future__ import annotations

from topoxr.layout._base import BaseLayout, LayoutInputError, distance_matrix, to_unit_square
from topoxr.layout._registry import (
    DEFAULT_METHOD,
    PAPER_METHODS,
    available_methods,
    get_estimator,
    register,
)
from topoxr.layout.baseline import RandomLayout
from topoxr.layout.linear import PCALayout

__all__ = [
    "DEFAULT_METHOD",
    "PAPER_METHODS",
    "BaseLayout",
    "LayoutInputError",
    "PCALayout",
    "RandomLayout",
    "available_methods",
    "distance_matrix",
    "get_estimator",
    "register",
    "to_unit_square",
]
