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
from topoxr.layout._attach import attach, compute_layouts, draw_seeds, load_layout, save_layout
from topoxr.layout.baseline import RandomLayout
from topoxr.layout.force import ForceLayout, KNNForceLayout
from topoxr.layout.graph import SpringLayout
from topoxr.layout.grid import GridSnap, snap_to_grid
from topoxr.layout.linear import PCALayout
from topoxr.layout.manifold import MDSLayout, TSNELayout, UMAPLayout
from topoxr.layout.som import SOMLayout

__all__ = [
    "DEFAULT_METHOD",
    "PAPER_METHODS",
    "BaseLayout",
    "ForceLayout",
    "GridSnap",
    "KNNForceLayout",
    "LayoutInputError",
    "MDSLayout",
    "PCALayout",
    "RandomLayout",
    "SOMLayout",
    "SpringLayout",
    "TSNELayout",
    "UMAPLayout",
    "attach",
    "available_methods",
    "compute_layouts",
    "distance_matrix",
    "draw_seeds",
    "get_estimator",
    "load_layout",
    "register",
    "save_layout",
    "snap_to_grid",
    "to_unit_square",
]
