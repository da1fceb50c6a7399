"""topoxr.viz exports of collections whose maps do not share every key (models side by side
recorded over different epochs), and explicit group orders naming groups that do not exist."""

from __future__ import annotations

import re

import numpy as np
import pytest
import xarray as xr

from tests.conftest import requires_holoviews
from topoxr.testing.maps import make_laid_naps

pytestmark = requires_holoviews

hv = pytest.importorskip("holoviews")


@pytest.fixture(scope="module")
def viz():
    import topoxr.viz

    return topoxr.viz


def _models(b_epochs: list[int]) -> dict[str, xr.DataArray]:
    """Model A recorded at epochs 0, 1, 2; model B at ``b_epochs`` (other values)."""
    a = make_laid_naps(12, 2, 3, model="A").astype("float64")
    b = make_laid_naps(12, 2, len(b_epochs), model="B", random_state=5).astype("float64")
    return {"A": a, "B": b.assign_coords(epoch=b_epochs)}


_CELL = re.compile(r"^label (\d+), (A|B)")


def _page_cells(page):
    """``{(model, label): (title, [source positions])}`` of a ``to_bokeh`` page."""
    from bokeh.models import ColumnDataSource, CustomJS, GlyphRenderer, Plot

    args = next(c.args for c in page.select({"type": CustomJS}) if "lookup" in c.args)
    cells = {}
    for fig in page.select({"type": Plot}):
        match = _CELL.match(fig.title.text)
        if match is None:
            continue
        sources = [r.data_source for r in fig.select({"type": GlyphRenderer})]
        assert all(isinstance(s, ColumnDataSource) for s in sources)
        cells[(match[2], int(match[1]))] = (
            args["titles"].index(fig.title),
            [next(i for i, s in enumerate(args["sources"]) if s is src) for src in sources])
    assert len(cells) == 4, [f.title.text for f in page.select({"type": Plot})]
    return args, cells


def _shown(args, frame, s):
    """The columns of source ``s`` once ``frame`` is swapped in (what the page shows)."""
    return {**args["sources"][s].data, **(frame["data"][s] or {})}


def _expected_nap(nap, label, epoch, neurons):
    return nap.sel(label=label, epoch=epoch).sel(neuron=list(neurons)).values


@pytest.mark.parametrize("b_epochs", [[0, 1], [0, 7], [1, 2]])
def test_html_cell_without_the_sliders_epoch_is_blank_not_another_epochs_map(viz,
                                                                             b_epochs):
    models = _models(b_epochs)
    page = viz.to_bokeh(viz.compare_models(models, epoch="all"))
    args, cells = _page_cells(page)
    epochs = sorted({0, 1, 2, *b_epochs})
    assert args["values"] == [[str(e) for e in epochs]]
    for pos, epoch in enumerate(epochs):
        frame = args["frames"][args["lookup"][str(pos)]]
        for (model, label), (t, sources) in cells.items():
            nap = models[model]
            title = frame["titles"][t] if frame["titles"][t] is not None \
                else args["titles"][t].text
            points = next(_shown(args, frame, s) for s in sources
                          if "nap" in args["sources"][s].data)
            image = next(_shown(args, frame, s) for s in sources
                         if "image" in args["sources"][s].data)
            values = np.asarray(points["nap"], float)
            if epoch in nap.epoch.values:
                np.testing.assert_allclose(
                    values, _expected_nap(nap, label, epoch, points["neuron"]), rtol=1e-5)
                assert np.isfinite(np.asarray(image["image"][0], float)).any()
                assert title == f"label {label}, {model}", (epoch, title)
            else:  # no map of this model at this epoch: blank, and titled so
                assert np.isnan(values).all(), (model, label, epoch)
                assert np.isnan(np.asarray(image["image"][0], float)).all()
                assert title.startswith(f"label {label}, {model}")
                assert f"epoch: {epoch}" in title and "(no samples)" in title, title
    # the page opens on the first epoch, every map's glyphs drawn (a blank one is NaN)
    from bokeh.models import GlyphRenderer

    hidden = [r for r in page.select({"type": GlyphRenderer}) if not r.visible]
    assert hidden == [], [list(r.data_source.data) for r in hidden]
    first = args["frames"][args["lookup"]["0"]]
    for t, sources in cells.values():
        for s in sources:
            for name, column in (first["data"][s] or {}).items():
                assert _same(args["sources"][s].data[name], column), name
        if first["titles"][t] is not None:
            assert args["titles"][t].text == first["titles"][t]


def _same(a, b) -> bool:
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype.kind in "fc":  # frames store float32 (topoxr.viz.report._compact)
        return np.array_equal(a.astype(np.float32), b.astype(np.float32), equal_nan=True)
    return np.array_equal(a, b)


#: In the page: set the epoch slider, then each figure's title and neuron values.
_FIGURES_JS = """async ([position]) => {
  const doc = Bokeh.documents[0];
  doc.get_model_by_name('slider-epoch').value = position;
  await new Promise(resolve => setTimeout(resolve, 500));
  const figures = [...doc.all_models].filter(m => m.type === 'Figure');
  return figures.map(f => {
    const renderers = f.renderers.filter(r => r.data_source && 'nap' in r.data_source.data);
    const nap = Array.from(renderers[0].data_source.data.nap);
    return {title: f.title.text, visible: f.renderers.every(r => r.visible),
            nap: nap.map(v => Number.isNaN(v) ? null : v),
            neuron: Array.from(renderers[0].data_source.data.neuron)};
  });
}"""


@pytest.mark.browser
def test_html_page_blanks_the_model_without_the_sliders_epoch(viz, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    from tests.test_viz import _browser_page

    models = _models([0, 7])
    page_path = viz.save_html(viz.compare_models(models, epoch="all"), tmp_path / "m.html")
    epochs = [0, 1, 2, 7]
    with sync_api.sync_playwright() as p:
        browser, page, errors = _browser_page(p, page_path)
        try:
            for pos in [3, 1, 0, 2, 3]:
                epoch = epochs[pos]
                figures = page.evaluate(_FIGURES_JS, [pos])
                seen = set()
                for fig in figures:
                    match = _CELL.match(fig["title"])
                    assert match is not None, fig["title"]
                    model, label = match[2], int(match[1])
                    seen.add((model, label))
                    nap = models[model]
                    values = np.array([np.nan if v is None else v for v in fig["nap"]])
                    if epoch in nap.epoch.values:
                        np.testing.assert_allclose(
                            values, _expected_nap(nap, label, epoch, fig["neuron"]),
                            rtol=1e-5)
                        assert fig["visible"]
                    else:
                        assert np.isnan(values).all(), (model, label, epoch)
                        assert f"epoch: {epoch} (no samples)" in fig["title"]
                assert len(seen) == 4
            assert errors == [], errors
        finally:
            browser.close()


def _panel_points(panel):
    points = next(el for el in panel if isinstance(el, hv.Points))
    return points.dimension_values("neuron"), points.dimension_values("nap")


def test_still_panels_draw_each_model_at_its_own_last_epoch_titled_with_it(viz, tmp_path):
    import matplotlib.pyplot as plt

    from topoxr.viz.report import _holomap_as_panels
    from topoxr.viz.still import still_figure

    models = _models([0, 1])
    hmap = viz.topomap(models, resolution=20)
    assert [d.name for d in hmap.kdims] == ["model", "label", "epoch"]
    panels = [p for p in _holomap_as_panels(hmap) if not isinstance(p, hv.Empty)]
    last = {"A": 2, "B": 1}
    assert sorted(p.label for p in panels) == sorted(
        f"label {lab}, {m}, epoch {last[m]}" for m in "AB" for lab in (0, 1))
    for panel in panels:
        match = re.match(r"label (\d), (A|B), epoch (\d)", panel.label)
        model, label = match[2], int(match[1])
        neurons, values = _panel_points(panel)
        np.testing.assert_allclose(
            values, _expected_nap(models[model], label, last[model], neurons), rtol=1e-5)
    fig = still_figure(hmap)
    titles = sorted(t for ax in fig.axes if (t := ax.get_title()))
    plt.close(fig)
    assert titles == sorted(p.label for p in panels)
    # models side by side over epochs, drawn still: each model's row at its own last epoch
    fig = still_figure(viz.compare_models(models, epoch="all"))
    titles = sorted(t for ax in fig.axes if (t := ax.get_title()))
    plt.close(fig)
    assert titles == sorted(p.label for p in panels)
    assert viz.save_png(hmap, tmp_path / "models.png").stat().st_size > 0


def test_still_panels_of_one_last_epoch_do_not_name_it(viz):
    from topoxr.viz.report import _holomap_as_panels

    models = _models([0, 1, 2])  # both models end at epoch 2
    panels = [p for p in _holomap_as_panels(viz.topomap(models, resolution=20))
              if not isinstance(p, hv.Empty)]
    assert sorted(p.label for p in panels) == sorted(
        f"label {lab}, {m}" for m in "AB" for lab in (0, 1))


_UNKNOWN = "order names groups that are not in the NAPs: \\[\\(9,\\)\\]"


def test_training_animation_refuses_an_order_naming_a_group_not_in_the_naps(viz):
    nap = make_laid_naps(12, 3, 2)
    with pytest.raises(ValueError, match=_UNKNOWN):
        viz.class_row(nap, order=[0, 1, 9])
    with pytest.raises(ValueError, match=_UNKNOWN):
        viz.training_animation(nap, order=[0, 1, 9])
    # the groups it names are drawn in that order
    anim = viz.training_animation(nap, order=[2, 0, 1])
    assert [m.last.label for m in anim.values()] == ["label=2", "label=0", "label=1"]


def test_animation_frames_and_gif_refuse_an_order_naming_a_group_not_in_the_naps(viz,
                                                                                tmp_path):
    nap = make_laid_naps(12, 3, 2)
    with pytest.raises(ValueError, match=_UNKNOWN):
        viz.animation_frames(nap, order=[0, 9], progress=False)
    with pytest.raises(ValueError, match=_UNKNOWN):
        viz.save_gif(nap, tmp_path / "training.gif", order=[0, 9], progress=False)
    assert not (tmp_path / "training.gif").exists()
    epochs, frames = viz.animation_frames(nap, order=[(1,), 2], progress=False)
    assert epochs == [0, 1] and len(frames) == 2
    # groups= naming a group the NAPs lack was dropped without a word
    with pytest.raises(ValueError, match=_UNKNOWN.replace("order", "groups")):
        viz.animation_frames(nap, groups=[0, 9], progress=False)
    assert len(viz.animation_frames(nap, groups=[0, 2], progress=False)[1]) == 2


def test_an_order_naming_a_group_twice_or_given_as_a_string_is_refused(viz, tmp_path):
    """class_row(order=[0, 0, 1]) drew label 0 twice, and order="alpha" was read letter
    by letter (with one-letter string labels, silently as an order)."""
    nap = make_laid_naps(12, 3, 2)
    with pytest.raises(ValueError, match=r"order names groups more than once: \[\(0,\)\]"):
        viz.class_row(nap, order=[0, 0, 1])
    with pytest.raises(ValueError, match="order names groups more than once"):
        viz.training_animation(nap, order=[1, 1])
    letters = nap.assign_coords(label=["a", "l", "p"])
    with pytest.raises(ValueError, match="order must be a sequence of group keys, got the "
                                         "string 'alp'"):
        viz.class_row(letters, order="alp")
    with pytest.raises(ValueError, match=r"^groups names groups that are not in the NAPs"):
        viz.save_gif(nap, tmp_path / "t.gif", groups=[5], progress=False)
    assert not (tmp_path / "t.gif").exists()


def test_layers_of_one_model_in_a_list_are_each_named_model_and_layer(viz):
    """The first layer was named after the model alone ('m', then 'm/L2'); a third
    input of the same model and layer failed with "the labels [] vary too"."""
    a = make_laid_naps(12, 3, 1).assign_attrs(topoxr_model="m", topoxr_layer="L1")
    b = make_laid_naps(10, 3, 1, random_state=1).assign_attrs(topoxr_model="m",
                                                              topoxr_layer="L2")
    maps = viz.topomap([a, b], by=["label", "model"])
    assert sorted({k[1] for k in maps.keys()}) == ["m/L1", "m/L2"]
    points = next(el for el in maps[(0, "m/L2")] if isinstance(el, hv.Points))
    assert len(points) == 10  # the L2 panel draws L2's neurons
    with pytest.raises(ValueError, match=r"several inputs are named \['m/L1'\].*mapping"):
        viz.topomap([a, b, a], by=["label", "model"])


def test_a_group_held_twice_is_named_as_such(viz):
    nap = make_laid_naps(12, 3, 1).assign_coords(label=[1, 1, 2])
    with pytest.raises(ValueError, match=r"the group \{'label': 1\} appears more than once"):
        viz.topomap(nap, by="label")


def _scaled_model(scale: float, rng: np.random.Generator, n: int = 80) -> xr.DataArray:
    """Laid NAPs of two groups whose values span about ``scale`` (a model's own limits)."""
    import json

    x, y = rng.random(n), rng.random(n)
    nap = (x - 0.5)[:, None, None] * np.array([[1.0], [-1.0]]) * scale
    return xr.DataArray(
        nap, dims=("neuron", "marked", "epoch"), name="nap",
        coords={"neuron": np.arange(n), "marked": [False, True], "epoch": [3],
                "x": ("neuron", x), "y": ("neuron", y)},
        attrs={"topoxr_nap": json.dumps({"by": ["marked"], "normalize": True,
                                         "correct_only": False})})


def _bars_and_maps(fig):
    """``[(bar range, [clims of the maps beside it])]``: maps whose extent overlaps it."""
    fig.canvas.draw()  # the boxes the maps are drawn in
    maps = [ax for ax in fig.axes if ax.images]
    bars = [ax for ax in fig.axes if not ax.images and ax.get_ylabel()]
    out = []
    for bar in bars:
        b = bar.get_position()
        beside = [tuple(float(c) for c in ax.images[0].get_clim()) for ax in maps
                  if ax.get_position().y0 < b.y1 and b.y0 < ax.get_position().y1]
        out.append((tuple(float(c) for c in bar.get_ylim()), beside))
    return maps, out


@pytest.mark.parametrize("scales", [[10.0, 0.01], [0.01, 10.0], [10.0, 1.0, 0.01]])
def test_still_colour_bars_sit_beside_the_rows_whose_limits_they_show(viz, scales):
    import matplotlib.pyplot as plt

    from topoxr.viz.still import still_figure

    rng = np.random.default_rng(0)
    models = {f"m{i}": _scaled_model(s, rng) for i, s in enumerate(scales)}
    fig = still_figure(viz.compare_models(models, resolution=32))
    maps, bars = _bars_and_maps(fig)
    plt.close(fig)
    assert len(bars) == len(scales)  # each model's own limits: one bar each
    for shown, beside in bars:
        assert beside, shown
        for clim in beside:
            np.testing.assert_allclose(clim, shown, rtol=1e-9)
    # every map is beside a bar
    assert sum(len(beside) for _, beside in bars) == len(maps) == 2 * len(scales)
    # limits shared across the models: one bar beside every row
    fig = still_figure(viz.compare_models(models, resolution=32, clim="shared"))
    maps, bars = _bars_and_maps(fig)
    plt.close(fig)
    assert len(bars) == 1
    (shown, beside), = bars
    assert len(beside) == len(maps) == 2 * len(scales)
    for clim in beside:
        np.testing.assert_allclose(clim, shown, rtol=1e-9)
    # one model: one row, its bar beside it
    fig = still_figure(viz.compare_models({"m": models["m0"]}, resolution=32))
    maps, bars = _bars_and_maps(fig)
    plt.close(fig)
    assert len(bars) == 1 and len(bars[0][1]) == len(maps) == 2


def test_compare_models_refuses_one_array_and_single_group_models_by_name(viz):
    """A bare DataArray was iterated along `neuron` ("missing dimension(s) ['neuron']"),
    and models of one group failed with "'label' is not in list"."""
    nap = make_laid_naps(12, 3, 2)
    with pytest.raises(TypeError, match="models must be a dict"):
        viz.compare_models(nap)
    one = nap.isel(label=[0])
    with pytest.raises(ValueError, match="fewer than two groups of 'label'"):
        viz.compare_models({"a": one, "b": one})
    grid = viz.compare_models({"a": nap, "b": nap})
    assert sorted({k[1] for k in grid.keys()}) == ["a", "b"]
