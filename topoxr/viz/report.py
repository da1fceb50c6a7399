"""Export topographic maps: a self-contained HTML report, PNG figures and an animated GIF.

The HTML report embeds BokehJS inline (no CDN, works offline). HoloViews collections
(``HoloMap``, layouts of them, ``GridSpace``) keep their sliders: every frame is rendered
once with HoloViews' bokeh plotting classes, the changing data of each frame is stored in
the page, and a small bokeh ``CustomJS`` callback swaps it in when a slider moves (an
``epoch`` slider also gets a play button). No server, no Panel, no network.

PNG figures use HoloViews' matplotlib backend; the GIF is drawn with matplotlib and
written with Pillow.
"""

from __future__ import annotations

import html
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from topoxr import conventions as cv
from topoxr._optional import import_optional
from topoxr.viz.topomap import collect, hv

__all__ = ["Report", "animation_frames", "save_gif", "save_html", "save_png", "to_bokeh"]

logger = logging.getLogger(__name__)

_PLAY_JS = """
const key = 'topoxr_player_' + slider.id;
if (toggle.active) {
  toggle.label = '\u23f8 Pause';
  window[key] = setInterval(() => {
    slider.value = slider.value >= slider.end ? slider.start : slider.value + 1;
  }, interval);
} else {
  toggle.label = '\u25b6 Play';
  clearInterval(window[key]);
}
"""

# Widgets name a frame by their positions in the sorted values of each key dim, "2,0":
# no value is ever encoded to match across Python and JS. A combination of values that
# has no frame shows the blank frame (every changing value NaN), titled with its key.
_SWAP_JS = """
const pos = widgets.map((w, i) => kinds[i] === 'slider' ? w.value : w.options.indexOf(w.value));
for (let i = 0; i < labels.length; i++) { labels[i].text = texts[i][pos[i]]; }
const idx = lookup[pos.join(',')];
const frame = idx === undefined ? blank : frames[idx];
if (frame === null) { return; }
const key = names.map((n, i) => n + ': ' + values[i][pos[i]]).join(', ') + ' (no samples)';
const escape = (text) => text.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;');
for (let s = 0; s < sources.length; s++) {
  const cols = frame.data[s];
  if (cols !== null) {
    const data = Object.assign({}, sources[s].data);
    for (const [name, column] of Object.entries(cols)) { data[name] = column; }
    sources[s].data = data;
  }
}
for (let t = 0; t < titles.length; t++) {
  if (frame.titles[t] !== null) {
    titles[t].text = idx !== undefined ? frame.titles[t] : (divs[t] ? escape(key) : key);
  }
}
"""


def _plot_dims(plot: Any) -> list[Any]:
    return list(getattr(plot, "dimensions", None) or [])


def _column_changed(a: Any, b: Any) -> bool:
    try:
        if isinstance(a, list | tuple) and isinstance(b, list | tuple):
            return len(a) != len(b) or any(_column_changed(x, y) for x, y in zip(a, b, strict=True))
        aa, bb = np.asarray(a), np.asarray(b)
        if aa.shape != bb.shape:
            return True
        if aa.dtype.kind in "fc" and bb.dtype.kind in "fc":
            return not np.array_equal(aa, bb, equal_nan=True)
        return not np.array_equal(aa, bb)
    except Exception:  # columns we cannot compare: treat as changed
        return True


def _compact(column: Any) -> Any:
    """Store float64 data as float32 in the page (half the size, plenty for colours)."""
    if isinstance(column, list):
        return [_compact(c) for c in column]
    if isinstance(column, np.ndarray) and column.dtype == np.float64:
        return column.astype(np.float32)
    return column


def _compact_sources(state: Any, source_type: Any) -> None:
    """Store the float64 columns of every data source as float32 (half the page)."""
    for source in state.select({"type": source_type}):
        data = dict(source.data)
        changed = {k: _compact(v) for k, v in data.items()
                   if isinstance(v, np.ndarray | list) and _has_float64(v)}
        if changed:
            source.data = {**data, **changed}


def _nan_like(column: Any) -> Any:
    """A float column with every value NaN (other columns as they are)."""
    if isinstance(column, list):
        return [_nan_like(c) for c in column]
    if isinstance(column, np.ndarray) and column.dtype.kind == "f":
        return np.full(column.shape, np.nan, dtype=column.dtype)
    return column


def _has_float64(column: Any) -> bool:
    if isinstance(column, np.ndarray):
        return column.dtype == np.float64
    return any(isinstance(c, np.ndarray) and c.dtype == np.float64 for c in column)


def to_bokeh(obj: Any, *, max_frames: int = 500, interval_ms: int = 700) -> Any:
    """Render a HoloViews object to a standalone bokeh layout, sliders included.

    Parameters
    ----------
    obj : HoloViews object
        An element, overlay, layout, ``GridSpace``, ``HoloMap`` or a ``DynamicMap``
        whose key dimensions have explicit values (it is sampled on all of them). A
        ``GridSpace`` is drawn as a grid of titled maps, top row first, with blank cells
        where there is no map (as :func:`save_png` draws it).
    max_frames : int, default 500
        Refuse collections with more frames than this (the page holds every frame).
    interval_ms : int, default 700
        Time between frames of the play button.

    Returns
    -------
    bokeh.models.UIElement
        A bokeh model; with sliders (and a play button for ``epoch``) when the object
        has key dimensions. It opens on the first frame, the widgets set to its key. A
        combination of widget values that has no frame (e.g. ``(3, False)`` of a
        ``(label, correct)`` collection where every 3 is correct) shows an empty map
        (every value NaN) titled with that key and "(no samples)". So does each map of
        a layout or grid that has no frame for the widgets' key while others do (e.g.
        ``compare_models(..., epoch="all")`` of a model recorded over fewer epochs):
        that map alone is emptied and titled with its own title, the key and
        "(no samples)".

    Raises
    ------
    ValueError
        If the collection has more than ``max_frames`` frames.
    """
    from bokeh.layouts import column, row
    from bokeh.models import (
        ColumnDataSource,
        CustomJS,
        Div,
        Select,
        Slider,
        Title,
        Toggle,
    )

    if isinstance(obj, hv.DynamicMap):
        obj = _sample_dynamic(obj, max_frames)
    if isinstance(obj, hv.GridSpace):
        obj = _grid_as_layout(obj, last_frame=False)
    renderer = hv.renderer("bokeh")
    plot = renderer.get_plot(obj)
    dims = _plot_dims(plot)
    keys = list(plot.keys or [])
    _compact_sources(plot.state, ColumnDataSource)
    if not dims or len(keys) <= 1:
        return plot.state
    if len(keys) > max_frames:
        raise ValueError(
            f"the collection has {len(keys)} frames, more than max_frames={max_frames}; "
            "select fewer epochs or groups"
        )
    sources = list(plot.state.select({"type": ColumnDataSource}))
    # titles of the plots and of the layout (a Div), updated by HoloViews per frame
    titles = [*plot.state.select({"type": Title}), *plot.state.select({"type": Div})]
    first = {i: {k: v for k, v in s.data.items()} for i, s in enumerate(sources)}
    first_titles = [t.text for t in titles]
    names = [str(d.pprint_label) if hasattr(d, "pprint_label") else str(d) for d in dims]
    cells = _cell_plots(plot, sources, titles)
    # HoloViews hides the glyphs of a cell without a map at a key and leaves its previous
    # frame: such a cell is blanked below, its glyphs drawn as where it has a map
    shown: dict[int, bool] = {}
    raw = []
    for key in keys:
        plot.update(key)
        data = [dict(s.data) for s in sources]
        texts = [t.text for t in titles]
        missing_text = ", ".join(f"{n}: {_plain(v)}" for n, v in zip(names, key, strict=True))
        for c in cells:
            if c.plot.current_frame is not None:
                shown.update((id(r), r.visible) for r in c.renderers)
            else:  # this cell has no map at this key
                for i in c.sources:
                    data[i] = {name: _nan_like(col) for name, col in data[i].items()}
                for j in c.titles:
                    texts[j] = (f"{c.label} \u2014 " if c.label else "") + missing_text \
                        + " (no samples)"
        raw.append((data, texts))
    plot.update(keys[0])
    for c in cells:  # the page opens on the first frame: its blank cells as stored there
        if c.plot.current_frame is None:
            for i in c.sources:
                sources[i].data = raw[0][0][i]
            for j in c.titles:
                titles[j].text = raw[0][1][j]
            for r in c.renderers:
                r.visible = shown.get(id(r), True)
    # keep only the columns that change between frames
    changing = [
        sorted({c for data, _ in raw for c, col in data[i].items()
                if c not in first[i] or _column_changed(col, first[i][c])})
        for i in range(len(sources))
    ]
    title_changes = [any(r[1][j] != first_titles[j] for r in raw) for j in range(len(titles))]
    frames = [
        {
            "data": [{c: _compact(data[i][c]) for c in changing[i]} if changing[i] else None
                     for i in range(len(sources))],
            "titles": [t if title_changes[j] else None for j, t in enumerate(ttl)],
        }
        for data, ttl in raw
    ]
    values = [[_plain(v) for v in _unique([k[i] for k in keys])] for i in range(len(dims))]
    # each frame's widget positions: the index of its key's values in `values`
    positions = [[values[i].index(_plain(v)) for i, v in enumerate(k)] for k in keys]
    lookup = {",".join(map(str, p)): n for n, p in enumerate(positions)}
    blank = None
    if len(keys) < math.prod(len(vs) for vs in values):  # combinations without a frame
        blank = {"data": [None if d is None else {c: _nan_like(col) for c, col in d.items()}
                          for d in frames[0]["data"]],
                 "titles": ["" if changed else None for changed in title_changes]}
    texts = [[f"<b>{html.escape(names[i])}:</b> {html.escape(str(v))}" for v in vs]
             for i, vs in enumerate(values)]
    widgets: list[Any] = []
    kinds: list[str] = []
    labels: list[Any] = []
    controls: list[Any] = []
    for i, dim in enumerate(dims):
        start = positions[0][i]  # the widgets open on the first frame, which is shown
        label = Div(text=texts[i][start], width=160)
        vals = values[i]
        numeric = all(isinstance(v, int | float | np.number) and not isinstance(v, bool)
                      for v in vals)
        if numeric and len(vals) > 1:
            w = Slider(start=0, end=len(vals) - 1, value=start, step=1, title=None,
                       show_value=False, width=260, name=f"slider-{dim.name}")
            kinds.append("slider")
            widget_row = [label, w]
            if str(dim.name) == cv.EPOCH:
                toggle = Toggle(label="\u25b6 Play", width=90, name="play")
                toggle.js_on_change("active", CustomJS(
                    args={"slider": w, "toggle": toggle, "interval": int(interval_ms)},
                    code=_PLAY_JS))
                widget_row.append(toggle)
        else:
            w = Select(options=[str(v) for v in vals], value=str(vals[start]), width=160,
                       name=f"select-{dim.name}")
            kinds.append("select")
            widget_row = [label, w]
        widgets.append(w)
        labels.append(label)
        controls.append(row(*widget_row))
    callback = CustomJS(
        args={"widgets": widgets, "kinds": kinds, "values": [[str(v) for v in vs]
                                                             for vs in values],
              "lookup": lookup, "frames": frames, "blank": blank, "sources": sources,
              "titles": titles, "divs": [isinstance(t, Div) for t in titles],
              "labels": labels, "texts": texts, "names": names},
        code=_SWAP_JS,
    )
    for w in widgets:
        w.js_on_change("value", callback)
    return column(plot.state, *controls)


@dataclass
class _Cell:
    """One map of a rendered layout: its HoloViews plot and its bokeh models."""

    plot: Any  # the cell's (overlay) element plot; ``current_frame`` is None without a map
    label: str  # the cell's title, as the layout draws it
    sources: list[int]  # positions of its data sources in ``to_bokeh``'s ``sources``
    titles: list[int]  # positions of its title in ``to_bokeh``'s ``titles``
    renderers: list[Any]  # its glyph renderers, hidden by HoloViews where it has no map


def _cell_plots(plot: Any, sources: list[Any], titles: list[Any]) -> list[_Cell]:
    """The maps (element or overlay plots with their own figure) of a rendered plot.

    Each cell of a layout is its own collection: where it has no frame for a key of the
    layout (a model with fewer epochs than the other), HoloViews leaves its previous
    frame on the figure and hides its glyphs.
    """
    from bokeh.models import ColumnDataSource, GlyphRenderer
    from holoviews.plotting.plot import GenericElementPlot

    source_at = {id(s): i for i, s in enumerate(sources)}
    title_at = {id(t): j for j, t in enumerate(titles)}
    cells = []
    for sub in plot.traverse(lambda p: p, [lambda p: isinstance(p, GenericElementPlot)
                                           and not p.overlaid]):
        figure = sub.handles.get("plot")
        if figure is None:
            continue
        title = getattr(figure, "title", None)
        last = sub.hmap.last if len(sub.hmap) else None
        cells.append(_Cell(
            plot=sub, label=str(getattr(last, "label", "") or ""),
            sources=[source_at[id(s)] for s in figure.select({"type": ColumnDataSource})
                     if id(s) in source_at],
            titles=[title_at[id(title)]] if id(title) in title_at else [],
            renderers=list(figure.select({"type": GlyphRenderer}))))
    return cells


def _sample_dynamic(dmap: Any, max_frames: int) -> Any:
    import itertools

    values = []
    for d in dmap.kdims:
        if not d.values:
            raise ValueError(
                f"cannot export a DynamicMap whose key dimension {d.name!r} has no explicit "
                "values; use a HoloMap (topomap(..., dynamic=False))"
            )
        values.append(list(d.values))
    keys = list(itertools.product(*values))
    if len(keys) > max_frames:
        raise ValueError(
            f"the DynamicMap has {len(keys)} frames, more than max_frames={max_frames}"
        )
    return hv.HoloMap({k: dmap[k] for k in keys}, kdims=dmap.kdims)


def _plain(v: Any) -> Any:
    return v.item() if isinstance(v, np.generic) else v


def _unique(seq: Iterable[Any]) -> list[Any]:
    out = list(dict.fromkeys(seq))
    try:
        return sorted(out)
    except TypeError:
        return out


_CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif;
       margin: 2em auto; max-width: 1400px; padding: 0 1em; color: #222; }
h1 { border-bottom: 2px solid #c33; padding-bottom: .2em; }
h2 { margin-top: 2em; border-bottom: 1px solid #ddd; }
table.topoxr { border-collapse: collapse; margin: 1em 0; font-size: 0.92em; }
table.topoxr th, table.topoxr td { border: 1px solid #ccc; padding: .3em .7em; text-align: right; }
table.topoxr th { background: #f3f3f3; }
table.topoxr td:first-child, table.topoxr th:first-child { text-align: left; }
.caption { color: #555; font-size: .9em; margin: .3em 0 1.2em; }
.figure { margin: 1em 0; }
.still img, .player img { max-width: 100%; height: auto; }
.player .controls { margin: .4em 0; }
footer { margin-top: 3em; color: #888; font-size: .8em; }
"""


@dataclass
class _Item:
    kind: str  # "html" or "bokeh"
    content: Any
    caption: str | None = None


def _table_number(value: float) -> str:
    """A float cell of a report table: three decimals, no exponent from 0.01 on."""
    magnitude = abs(value)
    if value == 0 or 0.01 <= magnitude < 1000:
        return f"{value:.3f}"
    if magnitude >= 1000:
        return f"{value:,.1f}"
    return f"{value:.2e}"


@dataclass
class Report:
    """A self-contained HTML report of topographic maps, tables and text.

    Parameters
    ----------
    title : str
        Title of the page.
    description : str, optional
        Text under the title (Markdown or HTML).

    Examples
    --------
    >>> from topoxr.testing.maps import make_laid_naps
    >>> from topoxr.viz import topomap
    >>> report = Report("Digits MLP")
    >>> report.add_section("Hidden layer", topomap(make_laid_naps(12, 3, 2), by="label"))
    Report(title='Digits MLP', sections=1)
    >>> report.add_table([{"method": "pca", "trustworthiness": 0.91}], title="Quality")
    Report(title='Digits MLP', sections=2)
    """

    title: str
    description: str | None = None
    _sections: list[tuple[str | None, list[_Item]]] = field(default_factory=list)

    def __repr__(self) -> str:
        return f"Report(title={self.title!r}, sections={len(self._sections)})"

    def _current(self) -> list[_Item]:
        if not self._sections:
            self._sections.append((None, []))
        return self._sections[-1][1]

    def add_section(self, title: str, obj: Any = None, *, text: str | None = None,
                    caption: str | None = None, still: bool = False) -> Report:
        """Start a section, optionally with a figure (HoloViews object) or HTML/Markdown.

        Parameters
        ----------
        title : str
            Section heading.
        obj : HoloViews object, str, DataFrame or list of dicts, optional
            The section's first item: a figure, text (Markdown, or HTML if it starts with
            ``<``), or a table.
        text : str, optional
            Text placed before ``obj``.
        caption : str, optional
            Caption under ``obj``.
        still : bool, default False
            Draw the figure as a still image (see :meth:`add`).

        Returns
        -------
        Report
            ``self``, to chain calls.
        """
        self._sections.append((title, []))
        if text is not None:
            self.add_text(text)
        if obj is not None:
            self.add(obj, caption=caption, still=still)
        return self

    def add(self, obj: Any, *, caption: str | None = None, still: bool = False) -> Report:
        """Add a figure, text or table to the current section (see :meth:`add_section`).

        Parameters
        ----------
        obj : HoloViews object, str, DataFrame or list of dicts
            What to add.
        caption : str, optional
            Caption under it.
        still : bool, default False
            Draw a figure as a still PNG image (:func:`topoxr.viz.still.still_png`) instead
            of interactive bokeh plots: a tenth of the weight and of the time, no hover.
            An animation (HoloMaps keyed by one dimension, e.g.
            :func:`topoxr.viz.training_animation`) becomes one image per key with a slider
            and a play button.

        Returns
        -------
        Report
        """
        if isinstance(obj, str):
            self._current().append(_Item("html", _markup(obj), caption))
            return self
        if _is_table(obj):
            return self.add_table(obj, caption=caption)
        if isinstance(obj, hv.core.dimension.ViewableElement | hv.core.dimension.ViewableTree
                      | hv.core.spaces.HoloMap | hv.core.spaces.GridSpace):
            self._current().append(_Item(_still_kind(obj) if still else "bokeh", obj, caption))
            return self
        raise TypeError(
            "a report item must be a HoloViews object, a str (Markdown/HTML), a pandas "
            f"DataFrame or a list of dicts; got {type(obj).__name__}"
        )

    def add_frames(self, frames: Sequence[Any], values: Sequence[Any], *, name: str = "epoch",
                   caption: str | None = None) -> Report:
        """Add an animation from ready images: one shown at a time, a slider, a play button.

        Parameters
        ----------
        frames : sequence of PIL.Image.Image or PNG bytes
            The images (e.g. from :func:`animation_frames`).
        values : sequence
            The key of each frame (e.g. its epoch), shown next to the slider.
        name : str, default "epoch"
            Name of the key.
        caption : str, optional
            Caption under the animation.

        Returns
        -------
        Report

        Raises
        ------
        ValueError
            If there are no frames, or not one value per frame.
        """
        from topoxr.viz.still import _quantized_png

        if not frames or len(frames) != len(values):
            raise ValueError(f"add_frames needs one value per frame, got {len(frames)} frames "
                             f"and {len(values)} values")
        pngs = [f if isinstance(f, bytes) else _quantized_png(np.asarray(f.convert("RGB")))
                for f in frames]
        self._current().append(_Item("player", (str(name), list(values), pngs), caption))
        return self

    def add_image(self, png: bytes, *, alt: str = "figure", caption: str | None = None) -> Report:
        """Add a ready PNG image (e.g. from :func:`topoxr.viz.still.still_png`).

        Parameters
        ----------
        png : bytes
            The PNG file's bytes.
        alt : str, default "figure"
            Text alternative.
        caption : str, optional
            Caption under the image.

        Returns
        -------
        Report

        Raises
        ------
        ValueError
            If ``png`` is not a PNG file.
        """
        if not bytes(png[:8]) == b"\x89PNG\r\n\x1a\n":
            raise ValueError("add_image needs the bytes of a PNG file")
        tag = f'<div class="figure still">{_png_tag(bytes(png), alt)}</div>'
        self._current().append(_Item("html", tag, caption))
        return self

    def add_figure(self, obj: Any, *, caption: str | None = None) -> Report:
        """Add a HoloViews figure (sliders kept) to the current section.

        Parameters
        ----------
        obj : HoloViews object
            The figure, drawn as interactive bokeh plots. Passed on to :meth:`add` (with
            ``still=False``), so a str or a table is added as :meth:`add` adds it.
        caption : str, optional
            Caption under the figure.

        Returns
        -------
        Report
            ``self``, to chain calls.

        Raises
        ------
        TypeError
            If ``obj`` is neither a HoloViews object, a str, a DataFrame nor a list of dicts.
        """
        return self.add(obj, caption=caption)

    def add_text(self, text: str) -> Report:
        """Add Markdown (or HTML, if it starts with ``<``) to the current section.

        Parameters
        ----------
        text : str
            Markdown, or HTML (kept as is) if it starts with ``<`` after any leading
            whitespace. Without ``markdown-it-py``, each paragraph (split on blank lines) is
            escaped into a plain ``<p>``.

        Returns
        -------
        Report
            ``self``, to chain calls.
        """
        self._current().append(_Item("html", _markup(text)))
        return self

    def add_table(self, data: Any, *, title: str | None = None, caption: str | None = None,
                  float_format: str | None = None) -> Report:
        """Add a table: a pandas DataFrame, a list of dicts or a dict of columns.

        Parameters
        ----------
        data : pandas.DataFrame, list of dict or dict of lists
            The rows.
        title : str, optional
            Starts a new section with this heading.
        caption : str, optional
            Caption under the table.
        float_format : str, optional
            Format of floating point cells (e.g. ``"{:.3g}"``). By default three decimals
            (``0.9995`` shows as ``1.000``, not ``1``), a thousands separator from 1,000
            (``1,234.5``, not ``1.23e+03``) and scientific notation below 0.01; a
            missing value (NaN) shows as ``n/a``.

        Returns
        -------
        Report
        """
        import pandas as pd

        if title is not None:
            self._sections.append((title, []))
        if isinstance(data, pd.DataFrame):
            df = data
        elif isinstance(data, Mapping) or (isinstance(data, list) and all(
                isinstance(r, Mapping) for r in data)):
            df = pd.DataFrame(data)
        else:
            raise TypeError(
                f"a table must be a pandas DataFrame, a list of dicts or a dict of columns, "
                f"got {type(data).__name__}"
            )
        table = df.to_html(classes="topoxr", border=0, index=not isinstance(
            df.index, pd.RangeIndex),
            float_format=_table_number if float_format is None else float_format.format,
            na_rep="n/a", escape=True)
        self._current().append(_Item("html", table, caption))
        return self

    def save(self, path: str | Path, *, max_frames: int = 500) -> Path:
        """Write the report as one self-contained HTML file (BokehJS inline).

        Parameters
        ----------
        path : str or Path
            Output file (``.html``).
        max_frames : int, default 500
            Largest collection embedded (see :func:`to_bokeh`).

        Returns
        -------
        Path
            The written file.
        """
        from bokeh.embed import components

        path = Path(path)
        models, slots = [], []
        for _, items in self._sections:
            for item in items:
                if item.kind == "bokeh":
                    slots.append(len(models))
                    models.append(to_bokeh(item.content, max_frames=max_frames))
        with _quiet_validation():
            script, divs = components(models) if models else ("", ())
        resources = _inline_resources(models) if models else ""
        body = [f"<h1>{html.escape(self.title)}</h1>"]
        if self.description:
            body.append(_markup(self.description))
        n = 0
        players = 0
        for title, items in self._sections:
            body.append('<section class="topoxr-section">')
            if title is not None:
                body.append(f"<h2>{html.escape(title)}</h2>")
            for item in items:
                if item.kind == "bokeh":
                    body.append(f'<div class="figure">{divs[n]}</div>')
                    n += 1
                elif item.kind == "still":
                    body.append(_still_html(item.content))
                elif item.kind == "player":
                    body.append(_player_html(item.content, players))
                    players += 1
                else:
                    body.append(item.content)
                if item.caption:
                    body.append(f'<p class="caption">{html.escape(item.caption)}</p>')
            body.append("</section>")
        if players:
            body.append(f"<script>{_PLAYER_JS}</script>")
        import topoxr

        page = (
            "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{html.escape(self.title)}</title>\n<style>{_CSS}</style>\n"
            f"{resources}\n{script}\n</head>\n<body>\n" + "\n".join(body)
            + f"\n<footer>made with topoxr {html.escape(str(topoxr.__version__))}</footer>"
            "\n</body>\n</html>\n"
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(page, encoding="utf-8")
        logger.info("wrote report %s (%.1f MB)", path, path.stat().st_size / 1e6)
        return path


def _still_kind(obj: Any) -> str:
    """``"player"`` for an animation (HoloMaps sharing one key), else ``"still"``."""
    maps = list(obj.values()) if isinstance(obj, hv.Layout) else [obj]
    if maps and all(isinstance(m, hv.HoloMap) and not isinstance(m, hv.GridSpace)
                    and len(m.kdims) == 1 for m in maps):
        if len({m.kdims[0].name for m in maps}) == 1 and max(len(m) for m in maps) > 1:
            return "player"
    return "still"


def _png_tag(png: bytes, alt: str, **attrs: str) -> str:
    import base64

    extra = "".join(f' {k}="{html.escape(v)}"' for k, v in attrs.items())
    data = base64.b64encode(png).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}"{extra}>'


def _still_html(obj: Any) -> str:
    from topoxr.viz.still import still_png

    return f'<div class="figure still">{_png_tag(still_png(obj), "topographic maps")}</div>'


def _player_html(content: Any, index: int) -> str:
    """Frames of an animation as images, one shown at a time, a slider and a play button.

    ``content`` is a HoloViews animation (drawn with :func:`topoxr.viz.still.still_frames`)
    or ``(name, values, frames)`` of :meth:`Report.add_frames`.
    """
    from topoxr.viz.still import still_frames

    name, values, frames = content if isinstance(content, tuple) else still_frames(content)
    imgs = "".join(
        _png_tag(png, f"{name} {v}", **{"class": "frame", "data-value": str(v),
                                        "style": "" if i == 0 else "display:none"})
        for i, (v, png) in enumerate(zip(values, frames, strict=True)))
    return (
        f'<div class="figure player" id="topoxr-player-{index}" data-name="{html.escape(name)}">'
        f'<div class="frames">{imgs}</div><div class="controls">'
        f'<button type="button" class="play">\u25b6 Play</button> '
        f'<input type="range" class="slider" min="0" max="{len(frames) - 1}" value="0" step="1">'
        f' <span class="value"><b>{html.escape(name)}:</b> {html.escape(str(values[0]))}</span>'
        "</div></div>"
    )


#: Slider and play button of the still animations (no library, no network).
_PLAYER_JS = """
document.querySelectorAll('.player').forEach((player) => {
  const frames = player.querySelectorAll('.frame');
  const slider = player.querySelector('.slider');
  const label = player.querySelector('.value');
  const button = player.querySelector('.play');
  const name = player.dataset.name;
  let timer = null;
  const show = (i) => {
    frames.forEach((f, j) => { f.style.display = j === i ? '' : 'none'; });
    slider.value = String(i);
    label.innerHTML = '<b>' + name + ':</b> ' + frames[i].dataset.value;
  };
  slider.addEventListener('input', () => show(Number(slider.value)));
  button.addEventListener('click', () => {
    if (timer === null) {
      button.textContent = '\u23f8 Pause';
      timer = setInterval(() => show((Number(slider.value) + 1) % frames.length), 700);
    } else {
      button.textContent = '\u25b6 Play';
      clearInterval(timer);
      timer = null;
    }
  });
});
"""


def _inline_resources(models: list[Any]) -> str:
    """BokehJS (and the extensions the models use) inline; no URL is ever referenced."""
    from bokeh.embed.bundle import bundle_for_objs_and_resources
    from bokeh.resources import INLINE

    bundle = bundle_for_objs_and_resources(models or None, INLINE)
    dropped = [str(u) for u in [*bundle.js_files, *bundle.css_files]]
    if dropped:  # e.g. Panel's registered ES-module shim: not needed by plain bokeh plots
        logger.debug("report: not referencing external resources %s", dropped)
    bundle.js_files, bundle.css_files = [], []
    return "".join(bundle)


def _quiet_validation() -> Any:
    """Silence two harmless bokeh warnings.

    Empty cells of a grid (pairs that never occur) have no renderers, and HoloViews sizes
    figures by their frame (``frame_width``/``frame_height``), which bokeh's "fixed
    sizing mode needs width and height" check does not know about.
    """
    from contextlib import ExitStack

    from bokeh.core.validation.check import silenced
    from bokeh.core.validation.warnings import FIXED_SIZING_MODE, MISSING_RENDERERS

    stack = ExitStack()
    stack.enter_context(silenced(MISSING_RENDERERS))
    stack.enter_context(silenced(FIXED_SIZING_MODE))
    return stack


def _is_table(obj: Any) -> bool:
    try:
        import pandas as pd
    except ImportError:  # pragma: no cover - pandas is a core dependency
        return False
    return isinstance(obj, pd.DataFrame) or (
        isinstance(obj, list) and bool(obj) and all(isinstance(r, Mapping) for r in obj))


def _markup(text: str) -> str:
    if text.lstrip().startswith("<"):
        return text
    try:
        from markdown_it import MarkdownIt
    except ImportError:
        return "".join(f"<p>{html.escape(p)}</p>" for p in text.split("\n\n"))
    return MarkdownIt("commonmark", {"html": False}).enable("table").render(text)


def save_html(obj: Any, path: str | Path, *, title: str = "topoxr", max_frames: int = 500) -> Path:
    """Save one HoloViews object as a self-contained HTML page (sliders kept).

    Parameters
    ----------
    obj : HoloViews object
        What to save.
    path : str or Path
        Output file.
    title : str, default "topoxr"
        Page title.
    max_frames : int, default 500
        See :func:`to_bokeh`.

    Returns
    -------
    Path
    """
    return Report(title).add(obj).save(path, max_frames=max_frames)


def save_png(
    obj: Any, path: str | Path, *, dpi: int = 100, fig_inches: float | None = None
) -> Path:
    """Save a HoloViews object as a PNG figure with the matplotlib backend.

    A collection keyed by labels is drawn whole, every key as a titled panel: one key
    (e.g. ``label``) gives rows of at most five maps, two keys a grid (e.g. classes by
    ``correct``). An ``epoch`` key is drawn at its last epoch (the trained network): each
    panel at its own last epoch, so a model recorded over fewer epochs than another is
    drawn at its last one, and where the panels' epochs differ each title names its
    epoch; pass ``hmap.select(epoch=e)`` for another one.

    Parameters
    ----------
    obj : HoloViews object
        A map, a layout, a grid...
    path : str or Path
        Output ``.png`` file.
    dpi : int, default 100
        Resolution.
    fig_inches : float, optional
        Size of each sub-figure in inches (HoloViews' default if None).

    Returns
    -------
    Path
    """
    import_optional("matplotlib", extra="viz", purpose="PNG export")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(obj, hv.DynamicMap):
        obj = _sample_dynamic(obj, max_frames=10_000)
    if isinstance(obj, hv.HoloMap):
        obj = _holomap_as_panels(obj)
    if isinstance(obj, hv.GridSpace):
        obj = _grid_as_layout(obj)
    renderer = hv.renderer("matplotlib").instance(dpi=dpi, fig="png")
    plot = renderer.get_plot(obj)
    if fig_inches is not None:
        plot.fig_inches = fig_inches
    renderer.save(plot, str(path.with_suffix("")), fmt="png")
    out = path.with_suffix(".png")
    if out != path:
        out.replace(path)
    _close_mpl(plot)
    return path


def _holomap_as_panels(hmap: Any) -> Any:
    """A HoloMap as what a still image can show: every non-epoch key a titled panel.

    An ``epoch`` key is drawn at its last epoch: every combination of the other keys at
    its own last (highest) one, so that a model recorded over fewer epochs than another
    is drawn at its last epoch rather than left out. Where the panels show different
    epochs, each title names its epoch (``label 0, B, epoch 1``).
    """
    from topoxr.viz.views import MAX_COLS, _layout_opts, _row_length

    names = [d.name for d in hmap.kdims]
    notes: dict[tuple, str] = {}
    if cv.EPOCH in names:
        frames, epochs = _at_own_last_epoch(hmap)
        keep = [d for d in hmap.kdims if d.name != cv.EPOCH]
        if not keep:
            return next(iter(frames.values()))
        hmap = hv.HoloMap(frames, kdims=keep)
        names = [d.name for d in keep]
        notes = _epoch_notes(epochs)
        if len(names) == 2:
            return _grid_as_layout(hmap.grid(names), epochs=epochs)
    if len(hmap) == 1 and len(names) == 1:
        key, el = next(iter(hmap.data.items()))
        return el.relabel(f"{names[0]} {key[0]}{notes.get(key, '')}")
    if len(names) == 2:
        return _grid_as_layout(hmap.grid(names))
    panels = [el.relabel(", ".join(f"{d} {v}" for d, v in zip(names, k, strict=True))
                         + notes.get(k, ""))
              for k, el in hmap.data.items()]
    return _layout_opts(hv.Layout(panels).cols(_row_length(len(panels), MAX_COLS)))


def _at_own_last_epoch(hmap: Any) -> tuple[dict[tuple, Any], dict[tuple, Any]]:
    """Each combination of a HoloMap's other keys at its own last (highest) epoch.

    Returns
    -------
    frames : dict
        ``{other key: element}``, the key without its epoch value.
    epochs : dict
        ``{other key: the epoch drawn}``.
    """
    at = [d.name for d in hmap.kdims].index(cv.EPOCH)
    frames: dict[tuple, Any] = {}
    epochs: dict[tuple, Any] = {}
    for key, el in hmap.data.items():
        rest = key[:at] + key[at + 1:]
        if rest not in epochs or key[at] > epochs[rest]:
            frames[rest], epochs[rest] = el, key[at]
    return frames, epochs


def _epoch_notes(epochs: Mapping[Any, Any]) -> dict[Any, str]:
    """``", epoch 2"`` for each panel's title where the panels show different epochs.

    Panels that all show the same (last) epoch are titled without it, as documented: an
    epoch key is drawn at its last epoch.
    """
    if len({_plain(e) for e in epochs.values()}) <= 1:
        return {}
    return {k: f", {cv.EPOCH} {_plain(e)}" for k, e in epochs.items()}


def _grid_cells(grid: Any, *, last_frame: bool = True,
                epochs: Mapping[tuple, Any] | None = None
                ) -> tuple[list[tuple[Any, str | None]], int]:
    """The cells of a GridSpace in reading order, top row first, each with its title.

    A cell without a map (a combination that never occurs, or a map without samples) is
    ``hv.Empty()`` with no title. With ``last_frame``, a cell that is a HoloMap is drawn
    at its last frame: one keyed by ``epoch`` at its own last epoch. ``epochs`` gives the
    epoch each cell shows where the cells are already frames. Where the cells show
    different epochs, each title names its epoch.

    Returns
    -------
    cells : list of (element, title)
        The cells, row after row.
    ncols : int
        Cells per row.
    """
    xdim, ydim = (d.name for d in grid.kdims)
    keys = list(grid.keys())
    xs = _unique(k[0] for k in keys)
    ys = _unique(k[1] for k in keys)
    if ydim != cv.LABEL:  # top row first: correct over wrong; label rows read 0 downwards
        ys = ys[::-1]
    shown: dict[tuple, Any] = {}
    chosen: dict[tuple, Any] = {}
    for key, cell in grid.data.items():
        if last_frame and isinstance(cell, hv.HoloMap):
            if len(cell) and [d.name for d in cell.kdims] == [cv.EPOCH]:
                frames, cell_epochs = _at_own_last_epoch(cell)
                cell, shown[key] = frames[()], cell_epochs[()]
            else:
                cell = cell.last
        elif epochs is not None and key in epochs:
            shown[key] = epochs[key]
        if cell is not None and not _is_blank(cell):
            chosen[key] = cell
    notes = _epoch_notes({k: e for k, e in shown.items() if k in chosen})
    cells: list[tuple[Any, str | None]] = []
    for y in ys:
        for x in xs:
            cell = chosen.get((x, y))
            if cell is None:
                cells.append((hv.Empty(), None))
            else:
                cells.append((cell, _cell_title(xdim, x, ydim, y) + notes.get((x, y), "")))
    return cells, len(xs)


def _grid_as_layout(grid: Any, *, last_frame: bool = True,
                    epochs: Mapping[tuple, Any] | None = None) -> Any:
    """A GridSpace as a Layout of titled cells, top row first.

    Both backends draw it: HoloViews' grid plots give every cell the same width, so a
    cell with a colour bar would overlap its neighbour and shift the axes, and
    matplotlib draws grid cells too small. Cells without a map (combinations that never
    occur, or maps without samples) are left blank, with no title. See
    :func:`_grid_cells` for ``last_frame`` and ``epochs``.
    """
    cells, ncols = _grid_cells(grid, last_frame=last_frame, epochs=epochs)
    items = [cell if title is None
             else cell.relabel(title).opts(fontsize={"title": "9pt"}, backend="bokeh")
             for cell, title in cells]
    layout = hv.Layout(items).cols(ncols)
    layout = layout.opts(shared_axes=False, show_title=False, backend="bokeh")
    return layout.opts(sublabel_format="", backend="matplotlib")


def _cell_title(xdim: str, x: Any, ydim: str, y: Any) -> str:
    """A short title for a grid cell: ``label 3, correct``, ``label 2, pred 7``."""
    def part(dim: str, v: Any) -> str:
        if dim == cv.CORRECT and isinstance(v, bool | np.bool_):
            return "correct" if v else "wrong"
        if isinstance(v, bool | np.bool_):  # a boolean attribute: "marked", "not marked"
            return dim if v else f"not {dim}"
        if dim == "model":
            return str(v)
        return f"{'pred' if dim == cv.PREDICTION else dim} {v}"

    pairs = [(xdim, x), (ydim, y)]
    if ydim == cv.LABEL:  # the true label first
        pairs = pairs[::-1]
    return ", ".join(part(d, v) for d, v in pairs)


def _is_blank(cell: Any) -> bool:
    """Whether every value of a map (every frame of a HoloMap) is NaN."""
    frames = cell.values() if isinstance(cell, hv.HoloMap) else [cell]
    for frame in frames:
        for el in (frame if isinstance(frame, hv.Overlay) else [frame]):
            if isinstance(el, hv.Image | hv.Points) and el.vdims:
                if np.isfinite(np.asarray(el.dimension_values(el.vdims[0]),
                                          dtype=float)).any():
                    return False
    return True


def _close_mpl(plot: Any) -> None:
    import matplotlib.pyplot as plt

    fig = getattr(plot, "state", None)
    if fig is not None:
        plt.close(fig)


def save_gif(
    laid_naps: Any,
    path: str | Path,
    *,
    fps: float = 2.0,
    groups: Sequence[Any] | None = None,
    order: str | Sequence[Any] | None = "cluster",
    method: str = "linear",
    resolution: int = 100,
    cmap: str = "RdBu_r",
    panel_inches: float = 1.8,
    dpi: int = 80,
    points: bool = True,
    max_cols: int = 5,
    progress: bool = True,
) -> Path:
    """Save the training process as an animated GIF: one frame per epoch, in ascending order.

    Each frame shows the maps of every group side by side (dendrogram order of the last
    epoch, rows of at most ``max_cols`` maps), with colour limits shared by all groups
    and epochs and one colour bar.

    Parameters
    ----------
    laid_naps : xarray.DataArray
        Laid-out NAPs with an ``epoch`` dim (one fixed or per-epoch aligned layout).
    path : str or Path
        Output ``.gif`` file.
    fps : float, default 2
        Frames (epochs) per second.
    groups : sequence, optional
        Group keys to draw (default: all).
    order : "cluster", None or sequence, default "cluster"
        Order of the groups (see :func:`topoxr.viz.class_row`).
    method, resolution, cmap, points
        As in :func:`topoxr.viz.topomap`.
    panel_inches : float, default 1.8
        Size of each map.
    dpi : int, default 80
        Resolution of the frames.
    max_cols : int, default 5
        Most maps per row; more groups wrap onto further rows.
    progress : bool, default True
        Show a progress bar over epochs.

    Returns
    -------
    Path

    Raises
    ------
    ValueError
        If ``fps`` is not positive, or ``order`` names a group that is not in the NAPs.
    """
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    _, frames = animation_frames(
        laid_naps, groups=groups, order=order, method=method, resolution=resolution,
        cmap=cmap, panel_inches=panel_inches, dpi=dpi, points=points, max_cols=max_cols,
        progress=progress)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=int(1000 / fps),
                   loop=0, optimize=False)
    return path


def _pixel_edges(interp: Any) -> tuple[float, float, float, float]:
    """matplotlib's ``extent`` of an interpolated grid: the outer edges of its pixels.

    The values lie at the pixel centres ``interp.xs``, ``interp.ys``; the image reaches
    half a pixel beyond them, as the maps' ``hv.Image`` does (its bounds are what
    :func:`topoxr.viz.still.still_figure` draws with).
    """
    hx = (interp.xs[-1] - interp.xs[0]) / (len(interp.xs) - 1) / 2
    hy = (interp.ys[-1] - interp.ys[0]) / (len(interp.ys) - 1) / 2
    return (interp.xs[0] - hx, interp.xs[-1] + hx, interp.ys[0] - hy, interp.ys[-1] + hy)


def animation_frames(
    laid_naps: Any,
    *,
    groups: Sequence[Any] | None = None,
    order: str | Sequence[Any] | None = "cluster",
    method: str = "linear",
    resolution: int = 100,
    cmap: str = "RdBu_r",
    panel_inches: float = 1.8,
    dpi: int = 80,
    points: bool = True,
    max_cols: int = 5,
    progress: bool = True,
) -> tuple[list[Any], list[Any]]:
    """The frames of the training process, one image per epoch (what :func:`save_gif` writes).

    The epochs run in ascending order, whatever order they are stored in.

    Each frame shows the maps of every group as titled panels (dendrogram order of the last
    epoch, rows of at most ``max_cols`` maps), colour limits shared by all groups and
    epochs, one colour bar. Drawn straight from the maps with matplotlib.

    Parameters
    ----------
    laid_naps : xarray.DataArray
        Laid-out NAPs with an ``epoch`` dim (one fixed or per-epoch aligned layout).
    groups, order, method, resolution, cmap, panel_inches, dpi, points, max_cols, progress
        As in :func:`save_gif`.

    Returns
    -------
    epochs : list
        The epoch of each frame, ascending.
    frames : list of PIL.Image.Image
        RGB images.

    Raises
    ------
    ValueError
        If the NAPs hold several models, or ``order`` names a group that is not in
        them (as :func:`topoxr.viz.class_row`).
    """
    plt = import_optional("matplotlib.pyplot", extra="viz", purpose="GIF export")
    image_mod = import_optional("PIL.Image", extra="viz", purpose="GIF export")
    from tqdm.auto import tqdm

    from topoxr.viz.views import _explicit_order, _key_title, _row_length, cluster_order

    col = collect(laid_naps, by=None, method=method, resolution=resolution, cmap=cmap)
    if col.multi:
        raise ValueError("save_gif draws one model; pass one DataArray")
    src = col.sources[0]
    lo, hi = col.clims[0]
    if order == "cluster" and src.keys:
        ordered = cluster_order(src.da)
    elif order is None or not src.keys:
        ordered = list(src.groups)
    else:
        ordered = _explicit_order(order, src.groups)
    if groups is not None:
        wanted = set(_explicit_order(groups, src.groups, "groups"))  # unknown: refused
        ordered = [g for g in ordered if g in wanted]
    index = {g: i for i, g in enumerate(src.groups)}
    maps = src.all_maps()
    n = len(ordered)
    ncols = _row_length(n, max_cols)
    nrows = -(-n // ncols)
    frames = []
    for ei, epoch in enumerate(tqdm(src.epochs, desc="GIF frames", disable=not progress,
                                    leave=False)):
        fig, axes = plt.subplots(
            nrows, ncols, figsize=(panel_inches * ncols + 0.9, (panel_inches + 0.3) * nrows
                                   + 0.4), squeeze=False, dpi=dpi)
        extent = _pixel_edges(src.interpolator(ei))
        x, y = src.positions(ei)
        for ax in axes.flat[n:]:
            ax.set_axis_off()
        image = None
        for ax, g in zip(axes.flat, ordered, strict=False):
            gi = index[g]
            image = ax.imshow(maps[gi, ei], origin="lower", extent=extent,
                              cmap=cmap, vmin=lo, vmax=hi, interpolation="nearest")
            if points:
                ax.scatter(x, y, c=src.values[gi, ei], cmap=cmap, vmin=lo, vmax=hi, s=8,
                           edgecolors="black", linewidths=0.3)
            ax.set_title(_key_title(src.keys, g), fontsize=9)
            ax.set_axis_off()
            ax.set_aspect("equal")
        fig.suptitle(f"{src.layer} \u2014 epoch {epoch}", fontsize=10)
        right = 1 - 0.9 / fig.get_figwidth()
        fig.subplots_adjust(left=0.02, right=right - 0.02, bottom=0.03, top=0.85 if nrows == 1
                            else 0.9, wspace=0.08, hspace=0.25)
        if image is not None:  # one colour bar: the limits are shared by all maps and epochs
            cax = fig.add_axes((right, 0.15, 0.12 / fig.get_figwidth(), 0.65))
            bar = fig.colorbar(image, cax=cax)
            bar.set_label(src.vlabel, fontsize=8)
            bar.ax.tick_params(labelsize=7)
        fig.canvas.draw()
        rgba = np.asarray(fig.canvas.buffer_rgba())
        frames.append(image_mod.fromarray(rgba[..., :3].copy()))
        plt.close(fig)
    return [_plain(e) for e in src.epochs], frames
