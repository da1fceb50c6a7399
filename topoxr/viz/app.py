"""``topoxr serve``: a Panel app to browse the topographic maps of a store.

Selectors for model, layer, layout and grouping, and an epoch player. NAPs
(:func:`topoxr.grouping.naps`) and layouts (saved ones from ``<layer>/layouts/<name>``, or
computed with :func:`topoxr.layouts.attach`) are computed when first selected and
cached for the session.

:func:`build_app` returns the app (testable without a server); :func:`serve` serves it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from topoxr import conventions as cv
from topoxr._optional import import_optional

__all__ = ["COMPUTED_PREFIX", "TopomapApp", "build_app", "serve"]

logger = logging.getLogger(__name__)

#: Prefix of the layout choices that are computed on demand rather than loaded.
COMPUTED_PREFIX = "compute: "
_LAYOUTS_NODE = "layouts"


def _groupings(ds: Any) -> dict[str, list[str]]:
    """The groupings offered for a layer: label, contrasts, and metadata columns."""
    out: dict[str, list[str]] = {}
    sample_coords = [str(c) for c, v in ds.coords.items() if v.dims == (cv.SAMPLE,)
                     and c not in (cv.SAMPLE, cv.COMMITTED)]
    if cv.LABEL in ds.coords:
        out["label"] = [cv.LABEL]
        if cv.CORRECT in ds.coords:
            out["label \u00d7 correct (binary contrast)"] = [cv.LABEL, cv.CORRECT]
        if cv.PREDICTION in ds.coords:
            out["label \u00d7 prediction (confusion)"] = [cv.LABEL, cv.PREDICTION]
    for c in sample_coords:
        if c != cv.LABEL:
            out[c] = [c]
    return out


class TopomapApp:
    """The state and widgets of the app over one store.

    Parameters
    ----------
    path : str or Path
        A topoxr store.
    methods : str or sequence of str, default ("pca",)
        Layout methods offered for on-demand computation (registered names or
        compositions such as ``"pca+force"``, see
        :func:`topoxr.layouts.available_methods`), besides the layouts saved in the store.
        May be empty when every layer has a saved layout.
    random_state : int, default 0
        Seed of computed layouts.
    resolution : int, default 80
        Grid size of the maps: an integer of at least 2.

    Attributes
    ----------
    model, layer, layout, grouping : panel.widgets.Select
        The selectors.
    epoch : panel.widgets.DiscretePlayer
        The epoch player.
    view : panel.pane.HoloViews
        The maps shown for the current selection.

    Raises
    ------
    ValueError
        If the store has no recorded layer, ``resolution`` is not an integer of at least
        2, ``methods`` names an unknown layout method, or ``methods`` is empty and a
        layer has no saved layout (nothing could be drawn for it).
    TypeError
        If ``methods`` is not a name or a sequence of names.
    """

    def __init__(self, path: str | Path, *, methods: Any = ("pca",), random_state: int = 0,
                 resolution: int = 80) -> None:
        pn = import_optional("panel", extra="viz", purpose="topoxr serve")
        from topoxr.store import open_store

        self.methods = _check_methods(methods)
        self.resolution = _check_resolution(resolution)
        self.path = str(path)
        self.tree = open_store(self.path)
        self.random_state = random_state
        self._naps: dict[tuple, Any] = {}
        self._layouts: dict[tuple, Any] = {}
        models = [m for m in self.tree.children if self._layers(m)]
        if not models:
            raise ValueError(f"the store {self.path!r} holds no recorded layer")
        if not self.methods:
            bare = [f"{m}/{layer}" for m in models for layer in self._layers(m)
                    if not self._saved_layouts(f"{m}/{layer}")]
            if bare:
                raise ValueError(
                    f"methods is empty and no layout is saved for layer(s) {bare} of "
                    f"{self.path!r}: nothing to draw there; pass methods=('pca',) (or another "
                    "layout method) or save a layout first")
        self.model = pn.widgets.Select(label="Model", options=models, value=models[0])
        self.layer = pn.widgets.Select(label="Layer")
        self.layout = pn.widgets.Select(label="Layout")
        self.grouping = pn.widgets.Select(label="Grouping")
        self.epoch = pn.widgets.DiscretePlayer(label="Epoch", options=[0], value=0,
                                               interval=800, loop_policy="loop")
        self.status = pn.pane.Markdown("", sizing_mode="stretch_width")
        self.view = pn.pane.HoloViews(None, sizing_mode="stretch_width")
        self._update_layers()
        self.model.param.watch(lambda e: self._update_layers(), "value")
        self.layer.param.watch(lambda e: self._update_layer_options(), "value")
        for w in (self.layout, self.grouping, self.epoch):
            w.param.watch(lambda e: self.refresh(), "value")
        self.refresh()

    # -- store structure -------------------------------------------------------------
    def _layers(self, model: str) -> list[str]:
        node = self.tree[model]
        return [name for name, child in node.children.items()
                if cv.ACTIVATION in child.ds.data_vars]

    def _node(self) -> Any:
        return self.tree[f"{self.model.value}/{self.layer.value}"]

    def _saved_layouts(self, key: str | None = None) -> list[str]:
        node = self._node() if key is None else self.tree[key]
        if _LAYOUTS_NODE not in node.children:
            return []
        return list(node.children[_LAYOUTS_NODE].children)

    def _update_layers(self) -> None:
        layers = self._layers(self.model.value)
        with _hold(self):
            self.layer.options = layers
            self.layer.value = layers[0]
        self._update_layer_options()

    def _update_layer_options(self) -> None:
        from topoxr.viz.topomap import _ascending_epochs

        ds = self._node().ds
        layouts = self._saved_layouts() + [COMPUTED_PREFIX + m for m in self.methods]
        groupings = _groupings(ds)
        # the player runs forwards in training and opens on the last epoch, the highest
        epochs = [int(e) for e in _ascending_epochs(ds[cv.EPOCH]).values]
        with _hold(self):
            self.layout.options = layouts
            self.layout.value = layouts[0]
            self.grouping.options = list(groupings)
            self.grouping.value = next(iter(groupings))
            self.epoch.options = epochs
            self.epoch.value = epochs[-1]
        self._group_keys = groupings
        self.refresh()

    # -- computations (cached) -------------------------------------------------------
    def naps(self) -> Any:
        """NAPs of the current model, layer and grouping (all epochs), laid out."""
        from topoxr.grouping import naps

        keys = tuple(self._group_keys[self.grouping.value])
        k = (self.model.value, self.layer.value, keys)
        if k not in self._naps:
            ds = self._node().to_dataset()
            self._naps[k] = naps(ds, by=list(keys) if len(keys) > 1 else keys[0]).compute()
        nap = self._naps[k]
        xy = self.layout_coords()
        return nap.assign_coords({cv.X: xy[cv.X].variable, cv.Y: xy[cv.Y].variable})

    def layout_coords(self) -> Any:
        """``x``, ``y`` of the selected layout (loaded or computed, then cached)."""
        k = (self.model.value, self.layer.value, self.layout.value)
        if k in self._layouts:
            return self._layouts[k]
        node = self._node()
        name = str(self.layout.value)
        if name.startswith(COMPUTED_PREFIX):
            from topoxr.grouping import naps
            from topoxr.layouts._attach import attach
            from topoxr.viz.topomap import _ascending_epochs

            base = naps(node.to_dataset(), by=cv.LABEL if cv.LABEL in node.ds.coords
                        else next(iter(self._group_keys.values()))[0]).compute()
            last = _ascending_epochs(base[cv.EPOCH]).values[-1].item()
            laid = attach(base, name.removeprefix(COMPUTED_PREFIX),
                          random_state=self.random_state, share=last)
            coords = laid.coords.to_dataset()[[cv.X, cv.Y]]
        else:
            from topoxr.layouts._attach import load_layout

            model_name = self.tree[self.model.value].ds.attrs.get(cv.ATTR_MODEL, self.model.value)
            layer_name = node.ds.attrs.get(cv.ATTR_LAYER, self.layer.value)
            coords = load_layout(self.path, model_name, layer_name, name)
        self._layouts[k] = coords
        return coords

    def figure(self) -> Any:
        """The HoloViews object for the current selection and epoch."""
        from topoxr.viz.report import _grid_as_layout
        from topoxr.viz.views import class_row, confusion_grid, contrast_grid

        nap = self.naps()
        keys = self._group_keys[self.grouping.value]
        # the views' colour limits are those of the whole layer (all epochs): the player
        # shows real changes, not rescaling
        kwargs = {"epoch": self.epoch.value, "resolution": self.resolution}
        # grids as titled layouts (as in the HTML report): one colour bar, blank empty cells
        if keys == [cv.LABEL, cv.CORRECT]:
            return _grid_as_layout(contrast_grid(nap, **kwargs))
        if keys == [cv.LABEL, cv.PREDICTION]:
            return _grid_as_layout(confusion_grid(nap, **kwargs))
        return class_row(nap, frame_width=160, **kwargs)

    def refresh(self) -> None:
        """Redraw the maps for the current widget values."""
        if getattr(self, "_holding", 0) or not self.layer.value or not self.layout.value:
            return
        try:
            self.view.object = self.figure()
            self.status.object = (
                f"**{self.model.value} / {self.layer.value}** \u2014 layout "
                f"`{self.layout.value}`, grouped by {self.grouping.value}, epoch "
                f"{self.epoch.value}"
            )
        except Exception as err:  # show the problem in the app instead of a blank page
            logger.exception("topoxr app: cannot draw the selection")
            self.status.object = f"**Cannot draw this selection:** {err}"
            self.view.object = None

    def panel(self) -> Any:
        """The Panel layout: the selectors in a sidebar, the maps beside them."""
        pn = import_optional("panel", extra="viz", purpose="topoxr serve")
        controls = pn.Column(
            pn.pane.Markdown(f"### topoxr\n`{Path(self.path).name}`"),
            self.model, self.layer, self.layout, self.grouping, self.epoch, width=300,
        )
        return pn.Row(controls, pn.Column(self.status, self.view, sizing_mode="stretch_width"),
                      sizing_mode="stretch_width")


def _check_methods(methods: Any) -> list[str]:
    """The layout methods as a list, each a name that :func:`get_estimator` knows."""
    from topoxr.layouts import get_estimator

    names = [methods] if isinstance(methods, str) else methods
    try:
        names = list(names)
    except TypeError as err:
        raise TypeError(
            f"methods must be a layout method name or a sequence of them, got {methods!r}"
        ) from err
    for name in names:
        if not isinstance(name, str):
            raise TypeError(
                f"methods must hold layout method names (str), got {name!r} in {methods!r}")
        try:
            get_estimator(name)
        except ValueError as err:
            raise ValueError(f"methods: {err}") from err
    return names


def _check_resolution(resolution: Any) -> int:
    """``resolution`` as an int of at least 2."""
    import numbers

    if (not isinstance(resolution, numbers.Integral) or isinstance(resolution, bool)
            or int(resolution) < 2):
        raise ValueError(f"resolution must be an integer of at least 2, got {resolution!r}")
    return int(resolution)


class _hold:
    """Suspend redraws while several widgets change together."""

    def __init__(self, app: TopomapApp) -> None:
        self.app = app

    def __enter__(self) -> None:
        self.app._holding = getattr(self.app, "_holding", 0) + 1

    def __exit__(self, *exc: Any) -> None:
        self.app._holding -= 1


def build_app(path: str | Path, **kwargs: Any) -> Any:
    """Build the Panel app for a store, without serving it.

    Parameters
    ----------
    path : str or Path
        A topoxr store.
    **kwargs
        Passed to :class:`TopomapApp` (``methods``, ``random_state``, ``resolution``).

    Returns
    -------
    TopomapApp
        Its :meth:`TopomapApp.panel` is the servable layout; its widgets drive the view.

    Raises
    ------
    ValueError
        If the store has no recorded layer, or for a bad ``resolution`` or ``methods``
        (see :class:`TopomapApp`).
    TypeError
        If ``methods`` is not a name or a sequence of names.
    """
    return TopomapApp(path, **kwargs)


def serve(path: str | Path, *, port: int = 5006, address: str = "127.0.0.1",
          show: bool = False, **kwargs: Any) -> None:
    """Serve the app over a store (blocks until stopped).

    Parameters
    ----------
    path : str or Path
        A topoxr store.
    port : int, default 5006
        Port to listen on (0 picks a free one).
    address : str, default "127.0.0.1"
        Interface to listen on.
    show : bool, default False
        Open a browser tab.
    **kwargs
        Passed to :class:`TopomapApp`.
    """
    pn = import_optional("panel", extra="viz", purpose="topoxr serve")
    from topoxr.store import open_store

    open_store(str(path))  # fail now, with the store's own message, if it is not a store
    origins = [f"{address}:{port}", f"localhost:{port}", f"127.0.0.1:{port}"]
    logger.info("serving %s on http://%s:%d", path, address, port)
    pn.serve({"/": lambda: build_app(path, **kwargs).panel()}, port=port, address=address,
             show=show, title="topoxr", websocket_origin=origins, threaded=False,
             print_url=False)
