"""Topographic activation maps with HoloViews: maps, the paper's views, exports.

Import it explicitly (``import topoxr.viz``) or through the ``.topo.plot`` accessor; the
core package never imports it. It returns HoloViews objects and never calls
``hv.extension`` or shows anything: display them in a notebook after
``hv.extension("bokeh")``, export them with :class:`Report`, :func:`save_png` and
:func:`save_gif`, or browse a store with :func:`topoxr.viz.app.serve`.
"""

from __future__ import annotations

from topoxr.viz.report import Report, animation_frames, save_gif, save_html, save_png, to_bokeh
from topoxr.viz.topomap import MapCollection, collect, group_keys, topomap
from topoxr.viz.views import (
    attribute_grid,
    class_row,
    cluster_order,
    compare_models,
    confusion_grid,
    contrast_grid,
    example_inputs,
    training_animation,
)

__all__ = [
    "MapCollection",
    "Report",
    "animation_frames",
    "attribute_grid",
    "class_row",
    "cluster_order",
    "collect",
    "compare_models",
    "confusion_grid",
    "contrast_grid",
    "example_inputs",
    "group_keys",
    "save_gif",
    "save_html",
    "save_png",
    "to_bokeh",
    "topomap",
    "training_animation",
]
