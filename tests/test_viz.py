"""topoxr.viz: structure of the HoloViews objects (types, dims, keys, values), and exports."""

from __future__ import annotations

import re

import numpy as np
import pytest
import xarray as xr

from tests.conftest import requires_holoviews
from topoxr.conventions import ConventionError
from topoxr.interpolate import GridInterpolator
from topoxr.testing.maps import make_laid_naps

pytestmark = requires_holoviews

hv = pytest.importorskip("holoviews")


@pytest.fixture(scope="module")
def viz():
    import topoxr.viz

    return topoxr.viz


@pytest.fixture(scope="module")
def nap():
    return make_laid_naps(n_neurons=25, n_labels=4, n_epochs=3)


def _image(overlay):
    return next(el for el in overlay if isinstance(el, hv.Image))


def _points(overlay):
    return next(el for el in overlay if isinstance(el, hv.Points))


def test_holomap_keys_dims_and_values_under_a_key(viz, nap):
    hmap = viz.topomap(nap, by=["label", "epoch"])
    assert isinstance(hmap, hv.HoloMap)
    assert [d.name for d in hmap.kdims] == ["label", "epoch"]
    assert set(hmap.keys()) == {(lab, e) for lab in range(4) for e in range(3)}
    overlay = hmap[(2, 1)]
    image, points = _image(overlay), _points(overlay)
    assert [d.name for d in image.kdims] == ["x", "y"]
    assert [d.name for d in image.vdims] == ["nap"]
    assert [d.name for d in points.vdims] == ["nap", "neuron", "layer"]
    # the points carry exactly the NAP values of label 2 at epoch 1, at the layout positions
    expected = nap.sel(label=2, epoch=1)
    np.testing.assert_allclose(points.dimension_values("nap"), expected.values)
    np.testing.assert_allclose(points.dimension_values("x"), nap.x.values)
    np.testing.assert_array_equal(points.dimension_values("neuron"), nap.neuron.values)
    assert set(points.dimension_values("layer")) == {"hidden"}
    # the image is the linear interpolation of those values
    interp = GridInterpolator(nap.x.values, nap.y.values)
    grid = image.dimension_values("nap", flat=False)
    ref = interp(expected.values)
    assert grid.shape == ref.shape == (100, 100)  # rows are y, ascending
    np.testing.assert_allclose(grid, ref, equal_nan=True, rtol=1e-6)


def test_image_is_masked_outside_the_hull(viz, nap):
    overlay = viz.topomap(nap.isel(epoch=-1), by="label")[0]
    grid = _image(overlay).dimension_values("nap", flat=False)
    interp = GridInterpolator(nap.x.values, nap.y.values)
    nan = np.isnan(grid)
    np.testing.assert_array_equal(nan, ~interp.mask)
    assert nan.any() and not nan.all()


def test_box_extrapolation_fills_the_image(viz, nap):
    overlay = viz.topomap(nap, by=["label", "epoch"], extrapolate="box")[(0, 0)]
    assert np.isfinite(_image(overlay).dimension_values("nap")).all()


def test_color_limits_symmetric_and_shared_by_the_whole_layer(viz, nap):
    hmap = viz.topomap(nap, by=["label", "epoch"])
    m = float(np.nanmax(np.abs(nap.values)))
    ranges = {_image(o).vdims[0].range for o in hmap.values()}
    assert ranges == {(-m, m)}
    assert {_points(o).vdims[0].range for o in hmap.values()} == {(-m, m)}
    opts = hv.Store.lookup_options("bokeh", _image(hmap[(0, 0)]), "plot").kwargs
    assert opts["clim"] == (-m, m) and opts["colorbar"] is True


def test_clim_options(viz, nap):
    other = make_laid_naps(n_neurons=25, n_labels=4, n_epochs=3, random_state=5) * 3
    per_layer = viz.topomap({"a": nap, "b": other}, by=["model", "label", "epoch"])
    ma, mb = float(np.nanmax(abs(nap.values))), float(np.nanmax(abs(other.values)))
    assert _image(per_layer[("a", 0, 0)]).vdims[0].range == (-ma, ma)
    assert _image(per_layer[("b", 0, 0)]).vdims[0].range == (-mb, mb)
    shared = viz.topomap({"a": nap, "b": other}, by=["model", "label", "epoch"], clim="shared")
    top = max(ma, mb)
    assert _image(shared[("a", 0, 0)]).vdims[0].range == (-top, top)
    fixed = viz.topomap(nap, by="label", clim=0.5)
    assert _image(fixed[1]).vdims[0].range == (-0.5, 0.5)
    with pytest.raises(ValueError, match="clim"):
        viz.topomap(nap, clim="wide")


def test_default_by_is_every_varying_key_and_epoch_defaults_to_last(viz, nap):
    assert [d.name for d in viz.topomap(nap).kdims] == ["label", "epoch"]
    by_label = viz.topomap(nap, by="label")
    np.testing.assert_allclose(_points(by_label[3]).dimension_values("nap"),
                               nap.sel(label=3).isel(epoch=-1).values)
    # limits are those of the whole layer, every epoch included
    m = float(np.nanmax(np.abs(nap.values)))
    assert _image(by_label[0]).vdims[0].range == (-m, m)
    single = viz.topomap(nap.sel(label=1, epoch=2))
    assert isinstance(single, hv.Overlay)


def test_dynamicmap_returns_the_right_subset(viz, nap):
    dmap = viz.topomap(nap, by=["label", "epoch"], dynamic=True)
    assert isinstance(dmap, hv.DynamicMap)
    assert [d.name for d in dmap.kdims] == ["label", "epoch"]
    assert list(dmap.kdims[0].values) == [0, 1, 2, 3]
    overlay = dmap[(3, 0)]
    np.testing.assert_allclose(_points(overlay).dimension_values("nap"),
                               nap.sel(label=3, epoch=0).values)
    static = viz.topomap(nap, by=["label", "epoch"])[(3, 0)]
    np.testing.assert_allclose(_image(overlay).dimension_values("nap"),
                               _image(static).dimension_values("nap"), equal_nan=True)


def test_stacked_groups_only_combinations_that_occur(viz):
    nap = make_laid_naps(n_neurons=20, n_labels=3, n_epochs=2, by=["label", "correct"])
    hmap = viz.topomap(nap, by=["label", "correct", "epoch"])
    occurring = {(int(lab), bool(c)) for lab, c in nap.indexes["group"]}
    assert {(k[0], k[1]) for k in hmap.data} == occurring
    key = next(iter(occurring))
    expected = nap.sel(group=key).isel(epoch=0)
    np.testing.assert_allclose(_points(hmap[(*key, 0)]).dimension_values("nap"), expected.values)


def test_by_leaving_out_a_varying_key_is_an_error(viz):
    nap = make_laid_naps(n_neurons=20, n_labels=3, by=["label", "correct"])
    with pytest.raises(ValueError, match=r"'correct'.*vary"):
        viz.topomap(nap, by=["label"])
    with pytest.raises(ValueError, match=r"available keys are \['label', 'correct', 'epoch'\]"):
        viz.topomap(nap, by=["colour"])


def test_empty_group_is_an_empty_map(viz):
    nap = make_laid_naps(n_neurons=20, n_labels=3, n_epochs=2, empty=(1, 0))
    overlay = viz.topomap(nap, by=["label", "epoch"])[(1, 0)]
    assert np.isnan(_image(overlay).dimension_values("nap")).all()


def test_models_side_by_side_keyed_by_model(viz, nap):
    other = make_laid_naps(n_neurons=18, n_labels=4, n_epochs=3, random_state=2, model="keras")
    hmap = viz.topomap([nap, other], by=["model", "label"])
    assert {k[0] for k in hmap.data} == {"mlp", "keras"}
    pts = _points(hmap[("keras", 2)])
    assert len(pts) == 18
    np.testing.assert_allclose(pts.dimension_values("x"), other.x.values)
    grid = viz.compare_models({"torch": nap, "keras": other})
    assert isinstance(grid, hv.GridSpace)
    assert [d.name for d in grid.kdims] == ["label", "model"]
    assert set(grid.keys()) == {(lab, m) for lab in range(4) for m in ("torch", "keras")}


def test_per_epoch_layouts_use_each_epochs_positions(viz, nap):
    rng = np.random.default_rng(0)
    xs = xr.DataArray(rng.random((25, 3)), dims=("neuron", "epoch"))
    moved = nap.assign_coords(x=xs)
    hmap = viz.topomap(moved, by=["label", "epoch"])
    for e in range(3):
        np.testing.assert_allclose(_points(hmap[(0, e)]).dimension_values("x"), xs[:, e].values)


def test_no_interpolation_draws_only_points(viz, nap):
    overlay = viz.topomap(nap, by="label", interpolate=False)[0]
    assert [type(el) for el in overlay] == [hv.Points]


def test_contours_are_symmetric_levels(viz, nap):
    overlay = viz.topomap(nap, by="label", contours=4)[0]
    assert any(isinstance(el, hv.Contours) for el in overlay)


@pytest.mark.parametrize("contours, match", [
    (1, "at least 2"), (-2, "at least 2"),  # failed inside numpy ("zero-size array")
    ("yes", "True/False, a number of levels"), (1.5, "True/False, a number of levels"),
    ([], "at least one"), ([0.1, float("nan")], "finite"),
])
def test_bad_contours_are_refused_by_name(viz, nap, contours, match):
    with pytest.raises((TypeError, ValueError), match=match):
        viz.topomap(nap, by="label", contours=contours)


@pytest.mark.parametrize("name", ["interpolate", "points", "colorbar", "dynamic"])
def test_switches_take_only_bools(viz, nap, name):
    """interpolate="no" and dynamic="no" read as True (a DynamicMap came back)."""
    with pytest.raises(TypeError, match=rf"{name} must be True or False, got 'no'"):
        viz.topomap(nap, by="label", **{name: "no"})


@pytest.mark.parametrize("n", [2, 3, 5])
def test_a_number_of_contours_draws_the_levels_of_the_colour_range_but_zero(viz, nap, n):
    overlay = viz.topomap(nap.isel(label=0, epoch=-1), contours=n, clim=1.0)
    lines = next(el for el in overlay if isinstance(el, hv.Contours))
    drawn = sorted({round(float(v), 6) for v in lines.dimension_values(lines.vdims[0])})
    expected = [round(v, 6) for v in np.linspace(-1, 1, n + 2)[1:-1] if abs(v) > 1e-9]
    assert set(drawn) <= set(expected) and drawn


def test_method_cubic_and_nearest(viz, nap):
    for method in ("cubic", "nearest"):
        img = _image(viz.topomap(nap, by="label", method=method)[0])
        assert np.isfinite(img.dimension_values("nap")).any()


def test_bad_inputs_give_clear_errors(viz, nap):
    with pytest.raises(ConventionError, match="x"):
        viz.topomap(nap.drop_vars("x"))
    with pytest.raises(TypeError, match="DataArray"):
        viz.topomap(np.zeros((3, 3)))
    with pytest.raises(ValueError, match="empty"):
        viz.topomap({})


def test_class_row_in_dendrogram_order_with_examples(viz):
    from scipy.cluster.hierarchy import leaves_list, linkage

    nap = make_laid_naps(n_neurons=25, n_labels=5, n_epochs=2)
    values = nap.isel(epoch=-1).transpose("label", "neuron").values
    expected = [(int(i),) for i in leaves_list(linkage(values, "average",
                                                       optimal_ordering=True))]
    assert viz.cluster_order(nap) == expected
    images = np.arange(5 * 64, dtype=float).reshape(5, 8, 8)
    examples = viz.example_inputs(images, np.arange(5))
    row = viz.class_row(nap, examples=examples)
    assert isinstance(row, hv.Layout)
    items = list(row)
    assert len(items) == 10  # 5 examples above 5 maps
    assert [el.label for el in items[5:]] == [f"label={k[0]}" for k in expected]
    first_label = expected[0][0]
    # the example is drawn upright: hv.Image takes the first array row as the top
    np.testing.assert_array_equal(np.flipud(items[0].dimension_values("input", flat=False)),
                                  images[first_label])
    np.testing.assert_allclose(_points(items[5]).dimension_values("nap"),
                               nap.sel(label=first_label).isel(epoch=-1).values)


def test_contrast_and_confusion_grids(viz):
    contrast = viz.contrast_grid(make_laid_naps(20, 3, 2, by=["label", "correct"]))
    assert isinstance(contrast, hv.GridSpace)
    assert [d.name for d in contrast.kdims] == ["label", "correct"]
    confusion = viz.confusion_grid(make_laid_naps(20, 3, 2, by=["label", "prediction"]),
                                   epoch="all")
    assert [d.name for d in confusion.kdims] == ["prediction", "label"]
    cell = next(iter(confusion.values()))
    assert isinstance(cell, hv.HoloMap) and cell.kdims[0].name == "epoch"
    with pytest.raises(ValueError, match="grouped by"):
        viz.contrast_grid(make_laid_naps(20, 3, 2))


def test_training_animation_one_holomap_per_group(viz, nap):
    anim = viz.training_animation(nap)
    assert isinstance(anim, hv.Layout)
    assert all(isinstance(h, hv.HoloMap) and h.kdims[0].name == "epoch" for h in anim)
    assert all(list(h.keys()) == [0, 1, 2] for h in anim)


def test_report_is_self_contained_with_tables_and_sliders(viz, nap, tmp_path):
    import pandas as pd

    report = viz.Report("Digits", description="A *test* report.")
    report.add_section("Training", viz.training_animation(nap), caption="epochs")
    report.add_table(pd.DataFrame({"method": ["pca", "umap"], "trust": [0.912345, 0.95]}),
                     title="Quality")
    report.add_table([{"layer": "hidden", "seconds": 1.5}])
    # cells read as rounded, not as other numbers: 0.99951 showed as "1", 1234.5 as
    # "1.23e+03", NaN as an empty cell
    report.add_table([{"method": "pca", "trust": 0.99951, "seconds": 1234.5,
                       "smoothness": float("nan")}])
    report.add("Some **text**.", caption="a caption under text")  # kept, not dropped
    out = report.save(tmp_path / "r.html")
    page = out.read_text()
    assert all(f"<td>{cell}</td>" in page for cell in ("1.000", "1,234.5", "n/a"))
    assert "<h2>Quality</h2>" in page and "0.912" in page and "<em>test</em>" in page
    assert "<strong>text</strong>" in page and "a caption under text" in page
    # offline: no script or stylesheet is loaded from anywhere
    assert not re.search(r"<script[^>]+src=", page)
    assert not re.search(r"<link[^>]+href=", page)
    assert "cdn.bokeh.org" not in page and "cdn.holoviz.org" not in page
    assert "slider-epoch" in page and "Play" in page
    with pytest.raises(TypeError, match="report item"):
        report.add(object())


def test_to_bokeh_stores_each_frames_changing_data(viz, nap):
    from bokeh.models import CustomJS, Slider

    model = viz.to_bokeh(viz.topomap(nap.sel(label=0), by="epoch"))
    slider = next(iter(model.select({"type": Slider})))
    assert (slider.start, slider.end) == (0, 2)
    callback = next(cb for cb in model.select({"type": CustomJS}) if "frames" in cb.args)
    frames = callback.args["frames"]
    assert len(frames) == 3
    images = [next(d["image"] for d in f["data"] if d and "image" in d) for f in frames]
    assert not np.allclose(np.nan_to_num(images[0][0]), np.nan_to_num(images[2][0]))


def test_save_png_and_gif(viz, nap, tmp_path):
    from PIL import Image

    png = viz.save_png(viz.class_row(nap), tmp_path / "row.png")
    with Image.open(png) as im:
        assert im.format == "PNG"
        pixels = np.asarray(im.convert("RGB")).reshape(-1, 3)
        assert len(np.unique(pixels, axis=0)) > 50  # a real picture, not blank
    gif = viz.save_gif(nap, tmp_path / "train.gif", fps=4, progress=False)
    with Image.open(gif) as im:
        assert im.format == "GIF" and im.n_frames == 3
        frames = []
        for i in range(im.n_frames):
            im.seek(i)
            frames.append(np.asarray(im.convert("RGB")))
    assert not np.array_equal(frames[0], frames[-1])  # the maps change over training
    with pytest.raises(ValueError, match="fps"):
        viz.save_gif(nap, tmp_path / "x.gif", fps=0)


def test_core_does_not_import_viz():
    import subprocess
    import sys

    code = ("import sys, topoxr, topoxr.interpolate; "
            "print(any(m.startswith(('topoxr.viz', 'holoviews', 'bokeh')) for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_real_store_naps_and_layouts_end_to_end(viz, tmp_path):
    """NAPs of a real on-disk store, laid out per epoch, keyed by label x correct."""
    from topoxr import open_store
    from topoxr.layouts import attach
    from topoxr.grouping import naps
    from topoxr.testing import make_activations, write_store

    ds = make_activations(n_neurons=16, n_samples=48, n_epochs=2, n_labels=3, random_state=0)
    path = write_store(ds, str(tmp_path / "run.zarr"), model="mlp", layer="hidden")
    layer = open_store(path)["mlp/hidden"].to_dataset()
    laid = attach(naps(layer, by="label").compute(), "pca", random_state=0)
    assert laid.x.dims == ("neuron", "epoch")  # one aligned layout per epoch
    contrast = naps(layer, by=["label", "correct"]).compute().assign_coords(
        x=laid.x.variable, y=laid.y.variable)
    hmap = viz.topomap(contrast, by=["label", "correct", "epoch"])
    assert len(hmap) == contrast.sizes["group"] * 2
    lab, cor = contrast.indexes["group"][0]
    pts = _points(hmap[(int(lab), bool(cor), 1)])
    np.testing.assert_allclose(pts.dimension_values("nap"),
                               contrast.sel(group=(lab, cor), epoch=1).values, equal_nan=True)
    np.testing.assert_allclose(pts.dimension_values("x"), laid.x.sel(epoch=1).values)


def test_to_bokeh_select_for_text_keys_and_sampled_dynamicmap(viz, nap):
    from bokeh.models import Select, Slider

    other = make_laid_naps(n_neurons=25, n_labels=4, n_epochs=3, random_state=1, model="b")
    model = viz.to_bokeh(viz.topomap({"a": nap, "b": other}, by=["model", "label"]))
    select = next(iter(model.select({"type": Select})))
    assert select.options == ["a", "b"]
    slider = next(iter(model.select({"type": Slider})))
    assert (slider.start, slider.end) == (0, 3)  # four labels
    dynamic = viz.topomap(nap.sel(label=1), by="epoch", dynamic=True)
    sampled = viz.to_bokeh(dynamic)
    assert next(iter(sampled.select({"type": Slider}))).end == 2
    with pytest.raises(ValueError, match="max_frames"):
        viz.to_bokeh(viz.topomap(nap, by=["label", "epoch"]), max_frames=5)


def _bokeh_colorbars(viz, obj):
    from bokeh.models import ColorBar

    return list(viz.to_bokeh(obj).select({"type": ColorBar}))


def _mpl_figure(obj):
    plot = hv.renderer("matplotlib").get_plot(obj)
    return plot.state


def _mpl_colorbars(fig):
    return [ax for ax in fig.axes if hasattr(ax, "_colorbar")]


def _bar_flags(obj):
    """Whether each map (Image) of a layout/grid asks for a colour bar, per backend."""
    images = [el for el in obj.traverse(lambda x: x, [hv.Image])
              if el.vdims and el.vdims[0].name == "nap"]
    return [(hv.Store.lookup_options("bokeh", im, "plot").kwargs["colorbar"],
             hv.Store.lookup_options("matplotlib", im, "plot").kwargs["colorbar"])
            for im in images]


def test_long_class_row_wraps_with_examples_above_and_one_colorbar(viz):
    nap = make_laid_naps(n_neurons=25, n_labels=10, n_epochs=2)
    examples = viz.example_inputs(np.random.default_rng(0).random((10, 8, 8)), np.arange(10))
    row = viz.class_row(nap, examples=examples, resolution=20)
    assert row._max_cols == 5  # 10 classes: two rows of 5
    items = list(row)
    assert len(items) == 20
    for start in (0, 10):  # each row of examples lies above its row of maps
        exs, maps = items[start:start + 5], items[start + 5:start + 10]
        assert all(isinstance(e, hv.Image) and e.vdims[0].name == "input" for e in exs)
        assert all(isinstance(m, hv.Overlay) for m in maps)
        assert [e.label for e in exs] == [m.label for m in maps]
    assert [m.label for m in items[5:10] + items[15:20]] == [
        f"label={k[0]}" for k in viz.cluster_order(nap)]
    flags = _bar_flags(row)
    assert len(flags) == 10 and flags.count((True, True)) == 1
    assert flags[4] == (True, True)  # the last map of the first row
    assert len(_bokeh_colorbars(viz, row)) == 1
    fig = _mpl_figure(row)
    assert len(_mpl_colorbars(fig)) == 1
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_short_last_row_is_padded_so_examples_stay_above_their_maps(viz):
    nap = make_laid_naps(n_neurons=25, n_labels=7, n_epochs=2)
    examples = viz.example_inputs(np.zeros((7, 8, 8)), np.arange(7))
    row = viz.class_row(nap, examples=examples)
    assert row._max_cols == 4  # 7 maps: rows of 4 and 3, not 5 and 2
    items = list(row)
    assert len(items) == 16
    assert isinstance(items[11], hv.Empty) and isinstance(items[15], hv.Empty)
    assert [e.label for e in items[8:11]] == [m.label for m in items[12:15]]
    assert len(viz.class_row(nap, max_cols=7)) == 7
    with pytest.raises(ValueError, match="max_cols"):
        viz.class_row(nap, max_cols=0)


def test_training_animation_one_colorbar_for_all_groups(viz):
    nap = make_laid_naps(n_neurons=25, n_labels=6, n_epochs=3)
    anim = viz.training_animation(nap, resolution=20)
    assert anim._max_cols == 3
    assert len(_bokeh_colorbars(viz, anim)) == 1
    assert all(list(h.keys()) == [0, 1, 2] for h in anim)


def test_grids_one_colorbar_each_model_row_one(viz):
    contrast = viz.contrast_grid(make_laid_naps(20, 4, 2, by=["label", "correct"]), resolution=20)
    assert len(_bokeh_colorbars(viz, contrast)) == 1
    confusion = viz.confusion_grid(make_laid_naps(20, 4, 2, by=["label", "prediction"]),
                                   resolution=20)
    assert len(_bokeh_colorbars(viz, confusion)) == 1
    from bokeh.models import Slider

    over_epochs = viz.to_bokeh(viz.contrast_grid(make_laid_naps(20, 4, 3, by=["label", "correct"]),
                                                 epoch="all", resolution=20))
    assert next(iter(over_epochs.select({"type": Slider}))).end == 2  # the slider is kept
    # models may have their own limits: one bar per model row, on its rightmost map
    a = make_laid_naps(n_neurons=20, n_labels=4, n_epochs=2)
    b = make_laid_naps(n_neurons=18, n_labels=4, n_epochs=2, random_state=3) * 4
    grid = viz.compare_models({"torch": a, "keras": b}, resolution=20)
    assert len(_bokeh_colorbars(viz, grid)) == 2
    with_bar = {k for k, cell in grid.items() if _bar_flags(cell)[0][0]}
    assert with_bar == {(3, "torch"), (3, "keras")}


def test_explicit_colorbar_overrides_the_style_and_views_keep_the_style(viz):
    from topoxr.viz.topomap import collect

    nap = make_laid_naps(n_neurons=20, n_labels=4, n_epochs=2)
    col = collect(nap, by="label", colorbar=False, resolution=20)
    key = next(iter(col.frames))
    assert len(_bokeh_colorbars(viz, col.element(key))) == 0  # the style: no bar
    assert len(_bokeh_colorbars(viz, col.element(key, colorbar=True))) == 1
    on = collect(nap, by="label", resolution=20)
    assert len(_bokeh_colorbars(viz, on.element(key, colorbar=False))) == 0
    # the views draw their one bar only where the style has bars
    assert len(_bokeh_colorbars(viz, viz.class_row(nap, colorbar=False, resolution=20))) == 0
    assert len(_bokeh_colorbars(viz, viz.training_animation(nap, colorbar=False,
                                                             resolution=20))) == 0
    grid = viz.contrast_grid(make_laid_naps(20, 4, 2, by=["label", "correct"]),
                             colorbar=False, resolution=20)
    assert len(_bokeh_colorbars(viz, grid)) == 0


def test_empty_grid_cells_draw_nothing_in_png(viz, tmp_path):
    from topoxr.viz.report import _grid_as_layout

    # group 1 is label 0, correct=False; it has no samples at the last epoch
    nap = make_laid_naps(20, 3, 2, by=["label", "correct"], empty=(1, 1))
    grid = viz.contrast_grid(nap)
    assert (0, False) not in grid.data  # no samples: no map (it is drawn at epoch="all")
    layout = _grid_as_layout(grid)
    titles = [item.label for item in layout if not isinstance(item, hv.Empty)]
    present = {(int(lab), bool(c)) for lab, c in nap.indexes["group"]} - {(0, False)}
    assert len(titles) == len(present)
    assert "label 0, wrong" not in titles and "label 0, correct" in titles
    fig = _mpl_figure(layout)
    drawn = [ax.get_title() for ax in fig.axes if ax.get_title()]
    import matplotlib.pyplot as plt

    plt.close(fig)
    assert sorted(drawn) == sorted(titles)  # empty cells have no axes title
    assert viz.save_png(grid, tmp_path / "c.png").stat().st_size > 0
    everything = viz.contrast_grid(nap, epoch="all")
    assert (0, False) in everything.data


def test_colorbar_title_names_the_normalisation(viz, nap):
    assert _image(viz.topomap(nap, by="label")[0]).vdims[0].label == "NAP (normalised)"
    plain = nap.copy()
    plain.attrs = {"topoxr_nap": '{"normalize": false}'}
    assert _image(viz.topomap(plain, by="label")[0]).vdims[0].label == "NAP (mean activation)"
    assert _image(viz.topomap(nap.rename("z"), by="label")[0]).vdims[0].label == "z"
    named = viz.topomap(nap, by="label", value_label="activity")
    assert _image(named[0]).vdims[0].label == "activity"


def test_gif_wraps_long_rows(viz, tmp_path):
    from PIL import Image

    sizes = {}
    for n in (5, 10):
        nap = make_laid_naps(n_neurons=20, n_labels=n, n_epochs=2)
        with Image.open(viz.save_gif(nap, tmp_path / f"{n}.gif", progress=False)) as im:
            sizes[n] = im.size
    assert sizes[10][0] == sizes[5][0]  # still 5 maps wide
    assert sizes[10][1] > 1.6 * sizes[5][1]  # on two rows


def test_maps_keep_a_margin_and_true_proportions(viz, nap):
    from bokeh.models import Range1d

    fig = viz.to_bokeh(viz.topomap(nap.sel(label=0, epoch=2)))
    xr_, yr_ = fig.x_range, fig.y_range
    assert isinstance(xr_, Range1d) and isinstance(yr_, Range1d)
    assert xr_.start < float(nap.x.min()) and xr_.end > float(nap.x.max())
    assert yr_.start < float(nap.y.min()) and yr_.end > float(nap.y.max())
    # a layout twice as tall as wide keeps its shape: equal spans in a square frame
    tall = nap.assign_coords(x=nap.x * 0.5)
    fig = viz.to_bokeh(viz.topomap(tall.sel(label=0, epoch=2)))
    spans = (fig.x_range.end - fig.x_range.start, fig.y_range.end - fig.y_range.start)
    assert spans[0] == pytest.approx(spans[1])
    assert spans[1] > float(tall.y.max() - tall.y.min())


def test_wide_grids_get_smaller_maps_and_neurons_unless_asked(viz):
    nap = make_laid_naps(20, 10, 2, by=["label", "correct"])

    def sizes(grid):
        pts = next(el for el in next(iter(grid.values())) if isinstance(el, hv.Points))
        return (hv.Store.lookup_options("bokeh", pts, "plot").kwargs["frame_width"],
                hv.Store.lookup_options("bokeh", pts, "style").kwargs["size"])

    width, size = sizes(viz.contrast_grid(nap))
    assert width * 10 <= 1000 and size < 5
    assert sizes(viz.contrast_grid(nap, frame_width=200, point_size=6)) == (200, 6)


def _titles(fig):
    return [ax.get_title() for ax in fig.axes if ax.get_title()]


def test_png_of_a_collection_keyed_by_labels_draws_every_key_as_a_titled_panel(viz, nap,
                                                                                tmp_path):
    from topoxr.viz.report import _holomap_as_panels

    by_label = viz.topomap(nap, by="label")
    panels = _holomap_as_panels(by_label)
    assert [p.label for p in panels] == [f"label {k}" for k in range(4)]
    fig = _mpl_figure(panels)
    import matplotlib.pyplot as plt

    assert sorted(_titles(fig)) == [f"label {k}" for k in range(4)]
    plt.close(fig)
    # an epoch key is drawn at its last epoch, the labels still all there
    over_epochs = _holomap_as_panels(viz.topomap(nap, by=["label", "epoch"]))
    assert [p.label for p in over_epochs] == [f"label {k}" for k in range(4)]
    last = _points(viz.topomap(nap, by=["label", "epoch"])[(2, 2)]).dimension_values(2)
    np.testing.assert_allclose(_points(over_epochs[2]).dimension_values(2), last)
    # two keys: a grid of titled cells
    grid = _holomap_as_panels(viz.topomap(make_laid_naps(20, 3, 2, by=["label", "correct"]),
                                          by=["label", "correct"]))
    assert "label 0, correct" in [c.label for c in grid if not isinstance(c, hv.Empty)]
    png = viz.save_png(by_label, tmp_path / "by_label.png")
    from PIL import Image

    with Image.open(png) as im:
        assert im.size[0] > 2 * im.size[1]  # panels side by side, not one map


def test_still_figure_draws_titled_panels_blank_cells_and_one_bar_per_range(viz):
    import matplotlib.pyplot as plt

    from topoxr.viz.still import still_figure, still_png

    nap = make_laid_naps(20, 3, 2, by=["label", "correct"], empty=(1, 1))
    grid = viz.contrast_grid(nap)
    fig = still_figure(grid)
    titles = _titles(fig)
    assert "label 0, correct" in titles and "label 0, wrong" not in titles
    assert len(titles) == len(grid.data)  # every map titled, no title on blank cells
    assert len(_mpl_colorbars(fig)) == 1  # one colour range: one bar
    plt.close(fig)
    row = viz.class_row(make_laid_naps(20, 4, 2), examples={k: np.eye(8) for k in range(4)})
    fig = still_figure(row)
    assert sorted(_titles(fig)) == sorted([f"label={k}" for k in range(4)] * 2)  # input + map
    plt.close(fig)
    a, b = make_laid_naps(20, 3, 2), make_laid_naps(20, 3, 2, random_state=1) * 3
    fig = still_figure(viz.compare_models({"a": a, "b": b}))
    assert len(_mpl_colorbars(fig)) == 2  # each model's own limits
    plt.close(fig)
    assert still_png(row)[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("cmap", ["PuOr", "viridis"])
def test_still_figures_draw_the_maps_in_their_own_colormap(viz, nap, cmap):
    """Still images drew every map in RdBu_r whatever cmap it was made with, so a
    report's still read against colours the interactive figure never showed."""
    import matplotlib.pyplot as plt
    from holoviews.plotting.util import process_cmap
    from matplotlib.colors import to_hex

    from topoxr.viz.still import still_figure

    expected = process_cmap(cmap, ncolors=256)
    maps = viz.topomap(nap.isel(epoch=[-1]), by="label", cmap=cmap)
    for fig in (still_figure(maps), still_figure(viz.class_row(nap, cmap=cmap))):
        drawn = [m for ax in fig.axes for m in (*ax.get_images(), *ax.collections)
                 if getattr(m, "get_cmap", None) and m.get_array() is not None]
        assert drawn
        for mappable in drawn:
            colours = [to_hex(mappable.get_cmap()(i / 255)) for i in (0, 128, 255)]
            assert colours == [expected[0], expected[128], expected[255]]
        plt.close(fig)
    fig = still_figure(maps, cmap="RdBu_r")  # the caller's choice still wins
    image = fig.axes[0].get_images()[0]
    assert to_hex(image.get_cmap()(0.0)) == process_cmap("RdBu_r", ncolors=256)[0]
    plt.close(fig)


def test_report_stills_and_players_are_light_and_keyed(viz, nap, tmp_path):
    report = viz.Report("Stills")
    report.add_section("Grid", viz.class_row(nap), still=True)
    report.add_section("Animation", viz.training_animation(nap), still=True)
    epochs, frames = viz.animation_frames(nap, progress=False)
    assert epochs == [0, 1, 2] and len(frames) == 3
    report.add_frames(frames, epochs, caption="straight from the maps")
    with pytest.raises(ValueError, match="one value per frame"):
        report.add_frames(frames, epochs[:2])
    from topoxr.viz.still import still_png

    report.add_image(still_png(viz.class_row(nap)), alt="the class row", caption="once more")
    with pytest.raises(ValueError, match="PNG"):
        report.add_image(b"GIF89a not a png")
    path = report.save(tmp_path / "stills.html")
    page = path.read_text()
    assert "Bokeh" not in page  # no interactive figure: no BokehJS in the page
    assert page.count('class="figure player"') == 2
    assert page.count('class="frame"') == 6 and 'data-value="2"' in page
    assert page.count('<section class="topoxr-section">') == 2
    assert path.stat().st_size < 1_000_000


# -- maps from real stores: epoch order, colour limits, HTML widgets, GIF geometry ---------


def _write_store(path, *, labels, epochs, scales=None, n_neurons=16, seed=0, **metadata):
    """A real store of one layer, written epoch by epoch in the order given; its dataset.

    Each class drives its own neurons harder, so class maps differ; ``scales`` multiplies
    each epoch's activations.
    """
    import topoxr

    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    codes = np.unique(labels, return_inverse=True)[1]
    drive = np.eye(n_neurons)[codes % n_neurons] + np.eye(n_neurons)[(3 * codes + 1) % n_neurons]
    with topoxr.ActivationWriter(str(path), model="mlp", mode="w") as writer:
        for i, epoch in enumerate(epochs):
            acts = rng.normal(size=(len(labels), n_neurons)) + (1 + i) * drive
            if scales is not None:
                acts = acts * scales[i]
            writer.write("hidden", acts.astype(np.float32), sample=np.arange(len(labels)),
                         label=labels, epoch=epoch, **metadata)
            writer.complete_epoch(epoch)
    return topoxr.open_store(str(path))["mlp/hidden"].to_dataset()


def _laid(ds, by="label", *, normalize=True):
    """NAPs of a stored layer grouped ``by``, on one PCA layout of its class NAPs."""
    from topoxr.grouping import naps
    from topoxr.layouts import attach

    by_label = naps(ds, by="label", normalize=normalize).compute()
    layout = attach(by_label, "pca", random_state=0, share=int(by_label.epoch.max()))
    nap = by_label if by == "label" else naps(ds, by=by, normalize=normalize).compute()
    return nap.assign_coords(x=layout.x.variable, y=layout.y.variable)


@pytest.fixture(scope="module")
def unordered(tmp_path_factory):
    """Class NAPs of a store whose epochs were written in the order 0, 9, 3."""
    labels = np.random.default_rng(1).integers(0, 4, 60)
    ds = _write_store(tmp_path_factory.mktemp("order") / "run.zarr", labels=labels,
                      epochs=(0, 9, 3))
    laid = _laid(ds)
    assert laid.epoch.values.tolist() == [0, 9, 3]  # as stored
    return laid


def _drawn_epoch(points, nap, label):
    """The epoch whose NAPs of ``label`` the points carry."""
    hits = [e for e in nap.epoch.values.tolist()
            if np.allclose(points.dimension_values("nap"), nap.sel(label=label, epoch=e).values)]
    assert len(hits) == 1
    return hits[0]


def test_last_epoch_is_the_highest_and_animations_run_in_epoch_order(viz, unordered):
    last = int(unordered.epoch.max())
    assert _drawn_epoch(_points(viz.topomap(unordered, by="label")[2]), unordered, 2) == last
    row = viz.class_row(unordered, order=None)
    assert _drawn_epoch(_points(row.values()[0]), unordered, 0) == last
    grid = viz.compare_models({"a": unordered, "b": unordered}, resolution=20)
    assert _drawn_epoch(_points(grid[(1, "a")]), unordered, 1) == last
    # the clustering of the default epoch is that of the highest epoch
    assert viz.cluster_order(unordered) == viz.cluster_order(unordered, epoch=last)
    ascending = sorted(unordered.epoch.values.tolist())
    epochs, frames = viz.animation_frames(unordered, progress=False, resolution=20)
    assert epochs == ascending and len(frames) == len(ascending)
    anim = viz.training_animation(unordered, resolution=20)
    assert all([k[0] for k in h.data] == ascending for h in anim)


def test_gif_image_covers_its_pixels_as_the_maps_do(viz, unordered, monkeypatch):
    """imshow's extent is the pixels' edges: the GIF's image lies where HoloViews puts it."""
    from matplotlib.axes import Axes

    extents = []
    imshow = Axes.imshow

    def recording_imshow(self, *args, **kwargs):
        extents.append(kwargs.get("extent"))
        return imshow(self, *args, **kwargs)

    monkeypatch.setattr(Axes, "imshow", recording_imshow)
    viz.animation_frames(unordered, progress=False, resolution=10, order=None)
    image = _image(viz.topomap(unordered, by="label", resolution=10)[0])
    left, bottom, right, top = image.bounds.lbrt()
    assert len(extents) == 4 * 3  # every class at every epoch, one fixed layout
    for extent in extents:
        np.testing.assert_allclose(extent, (left, right, bottom, top))


def test_default_colour_limits_span_every_group_and_epoch_of_the_layer(viz, tmp_path):
    labels = np.random.default_rng(2).integers(0, 3, 60)
    preds = np.where(np.arange(60) % 4 == 0, (labels + 1) % 3, labels)
    ds = _write_store(tmp_path / "run.zarr", labels=labels, epochs=(0, 1, 2),
                      scales=(3.0, 1.0, 1.0), prediction=preds)
    laid = _laid(ds, normalize=False)
    m = float(np.nanmax(np.abs(laid.values)))
    m_last = float(np.nanmax(np.abs(laid.sel(epoch=2).values)))
    assert m_last < m  # the largest NAP is not at the last epoch
    assert _image(viz.topomap(laid, by="label")[0]).vdims[0].range == (-m, m)
    for epoch in (0, 1, 2):  # rows of different epochs share one scale
        row = viz.class_row(laid, epoch=epoch, order=None)
        assert {_image(o).vdims[0].range for o in row} == {(-m, m)}
    contrast = _laid(ds, by=["label", "correct"], normalize=False)
    mc = float(np.nanmax(np.abs(contrast.values)))
    grid = viz.contrast_grid(contrast, epoch=1)
    assert {_image(c).vdims[0].range for c in grid.values()} == {(-mc, mc)}
    other = laid * 0.5
    models = viz.compare_models({"a": laid, "b": other})
    assert _image(models[(0, "a")]).vdims[0].range == (-m, m)
    assert _image(models[(0, "b")]).vdims[0].range == (-m / 2, m / 2)


def test_clim_accepts_numpy_numbers_and_refuses_empty_or_endless_limits(viz, nap):
    for clim, expected in [(np.float32(0.5), (-0.5, 0.5)), (np.int64(2), (-2.0, 2.0)),
                           ((np.float32(-0.25), 1), (-0.25, 1.0))]:
        assert _image(viz.topomap(nap, by="label", clim=clim)[0]).vdims[0].range == expected
    for bad in (0, -0.3, np.nan, np.inf, (0.2, np.nan), (1, np.inf), (2, 1), (1, 1),
                np.float64(0.0)):
        with pytest.raises(ValueError, match="clim"):
            viz.topomap(nap, by="label", clim=bad)
    for bad in (True, (1, 2, 3), object()):
        with pytest.raises((TypeError, ValueError), match="clim"):
            viz.topomap(nap, by="label", clim=bad)


@pytest.fixture(scope="module")
def sparse_contrast(tmp_path_factory):
    """(label, correct) NAPs of a real store in which label 0 is always predicted right and
    label 3 too: (0, False) and (3, False) never occur."""
    labels = np.random.default_rng(3).integers(0, 4, 80)
    preds = np.where((np.arange(80) % 3 == 0) & (labels % 3 != 0), (labels + 1) % 4, labels)
    ds = _write_store(tmp_path_factory.mktemp("sparse") / "run.zarr", labels=labels,
                      epochs=(0,), prediction=preds)
    laid = _laid(ds, by=["label", "correct"])
    groups = {(int(lab), bool(c)) for lab, c in laid.indexes["group"]}
    assert (0, False) not in groups and (3, False) not in groups and (1, False) in groups
    return laid


def test_to_bokeh_opens_on_the_map_its_widgets_name(viz, sparse_contrast):
    from bokeh.models import Div, Select, Slider, Title

    hmap = viz.topomap(sparse_contrast, by=["label", "correct"], resolution=20)
    model = viz.to_bokeh(hmap)
    slider = next(iter(model.select({"type": Slider})))
    select = next(iter(model.select({"type": Select})))
    label = sorted({k[0] for k in hmap.data})[slider.value]
    (title,) = [t.text for t in model.select({"type": Title})]
    assert title.endswith(f"label: {label}, correct: {select.value}")
    divs = [d.text for d in model.select({"type": Div})]
    assert f"<b>label:</b> {label}" in divs and f"<b>correct:</b> {select.value}" in divs


def _browser_page(playwright, html_path):
    """A headless Chromium page showing ``html_path``; its list of errors."""
    from tests.test_browser import CHROMIUM_ARGS, _chromium

    executable = _chromium()
    browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
    page = browser.new_page(viewport={"width": 1300, "height": 900})
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(html_path.as_uri())
    page.wait_for_function("window.Bokeh && Bokeh.documents.length > 0", timeout=20_000)
    return browser, page, errors


#: In the page: set widgets by name, then what the map shows (title, image, neuron values).
_SHOWN_JS = """async ([values]) => {
  const doc = Bokeh.documents[0];
  for (const [name, value] of Object.entries(values)) {
    doc.get_model_by_name(name).value = value;
  }
  // the callbacks run asynchronously (a promise); half a second leaves a loaded machine room
  await new Promise(resolve => setTimeout(resolve, 500));
  const models = [...doc.all_models];
  const title = models.filter(m => m.type === 'Title').map(m => m.text);
  const data = models.filter(m => m.type === 'ColumnDataSource').map(m => m.data);
  const image = Array.from(data.find(d => 'image' in d).image[0]);
  const nap = Array.from(data.find(d => 'nap' in d).nap);
  const labels = models.filter(m => m.type === 'Div').map(m => m.text);
  return {title, image: image.map(v => Number.isNaN(v) ? null : v),
          nap: nap.map(v => Number.isNaN(v) ? null : v), labels};
}"""


def _shows(shown, overlay):
    """Whether the page's map has the image and neuron values of ``overlay``."""
    image = np.array([np.nan if v is None else v for v in shown["image"]], float)
    nap = np.array([np.nan if v is None else v for v in shown["nap"]], float)
    expected = _image(overlay).dimension_values("nap", flat=False)  # rows: y ascending
    return (np.allclose(image, expected.ravel(), equal_nan=True, rtol=1e-5)
            and np.allclose(nap, _points(overlay).dimension_values("nap"), rtol=1e-5))


@pytest.mark.browser
def test_html_widgets_always_name_the_map_shown_even_without_samples(viz, sparse_contrast,
                                                                     tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    hmap = viz.topomap(sparse_contrast, by=["label", "correct"], resolution=20)
    page_path = viz.save_html(hmap, tmp_path / "contrast.html")
    labels = sorted({k[0] for k in hmap.data})
    with sync_api.sync_playwright() as p:
        browser, page, errors = _browser_page(p, page_path)
        try:
            opened = page.evaluate(_SHOWN_JS, [{}])
            slider = page.evaluate("Bokeh.documents[0].get_model_by_name('slider-label').value")
            correct = page.evaluate("Bokeh.documents[0].get_model_by_name('select-correct')"
                                    ".value")
            assert opened["title"][0].endswith(f"label: {labels[slider]}, correct: {correct}")
            assert _shows(opened, hmap[(labels[slider], correct == "True")])
            two_wrong = page.evaluate(_SHOWN_JS, [{"slider-label": labels.index(2),
                                                   "select-correct": "False"}])
            assert two_wrong["title"][0].endswith("label: 2, correct: False")
            assert _shows(two_wrong, hmap[(2, False)])
            # (3, False) never occurs: the widgets say so, and the map is empty
            three_wrong = page.evaluate(_SHOWN_JS, [{"slider-label": labels.index(3)}])
            assert "<b>label:</b> 3" in three_wrong["labels"]
            assert "label: 3, correct: False" in three_wrong["title"][0]
            assert "no samples" in three_wrong["title"][0]
            assert all(v is None for v in three_wrong["image"] + three_wrong["nap"])
            three_right = page.evaluate(_SHOWN_JS, [{"select-correct": "True"}])
            assert three_right["title"][0].endswith("label: 3, correct: True")
            assert _shows(three_right, hmap[(3, True)])
            assert errors == [], errors
        finally:
            browser.close()


@pytest.mark.browser
def test_html_select_finds_the_maps_of_non_ascii_labels(viz, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    names = np.array(["cat", "café", "dog", "Ölfass"])
    labels = names[np.random.default_rng(4).integers(0, 4, 60)]
    ds = _write_store(tmp_path / "run.zarr", labels=labels, epochs=(0, 1))
    hmap = viz.topomap(_laid(ds), by="label", resolution=20)
    page_path = viz.save_html(hmap, tmp_path / "names.html")
    with sync_api.sync_playwright() as p:
        browser, page, errors = _browser_page(p, page_path)
        try:
            for name in ["dog", "café", "cat", "Ölfass", "dog"]:
                shown = page.evaluate(_SHOWN_JS, [{"select-label": name}])
                assert shown["title"][0].endswith(f"label: {name}"), (name, shown["title"])
                assert _shows(shown, hmap[name]), name
            assert errors == [], errors
        finally:
            browser.close()
