"""GridInterpolator: one triangulation, every group and epoch, same maps as griddata."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
from scipy.interpolate import griddata
from scipy.spatial import Delaunay

from topoxr.conventions import ConventionError
from topoxr.interpolate import GridInterpolator, InterpolationError


@pytest.fixture
def layout():
    rng = np.random.default_rng(1)
    return rng.random(40), rng.random(40)


def _griddata(x, y, values, interp, method):
    gx, gy = np.meshgrid(interp.xs, interp.ys)
    return griddata((x, y), values, (gx, gy), method=method)


@pytest.mark.parametrize("method", ["linear", "cubic"])
def test_matches_griddata_for_every_group_and_epoch(layout, method):
    x, y = layout
    rng = np.random.default_rng(2)
    values = rng.normal(size=(3, 4, x.size))  # groups x epochs x neurons
    interp = GridInterpolator(x, y, resolution=(30, 25), method=method)
    maps = interp(values)
    assert maps.shape == (3, 4, 25, 30)
    for g in range(3):
        for e in range(4):
            ref = _griddata(x, y, values[g, e], interp, method)
            np.testing.assert_array_equal(np.isnan(maps[g, e]), np.isnan(ref))
            np.testing.assert_allclose(maps[g, e], ref, rtol=1e-6, atol=1e-9, equal_nan=True)


def test_nearest_matches_griddata_inside_hull_and_is_masked_outside(layout):
    x, y = layout
    values = np.random.default_rng(3).normal(size=x.size)
    interp = GridInterpolator(x, y, resolution=32, method="nearest")
    got = interp(values)
    ref = _griddata(x, y, values, interp, "nearest")
    np.testing.assert_array_equal(got[interp.mask], ref[interp.mask])
    assert np.isnan(got[~interp.mask]).all()
    assert (~interp.mask).any()


def test_hull_mask_is_the_convex_hull(layout):
    x, y = layout
    interp = GridInterpolator(x, y, resolution=40)
    gx, gy = np.meshgrid(interp.xs, interp.ys)
    inside = Delaunay(np.column_stack([x, y])).find_simplex(np.column_stack([gx.ravel(),
                                                                              gy.ravel()])) >= 0
    np.testing.assert_array_equal(interp.mask.ravel(), inside)
    maps = interp(np.ones(x.size))
    np.testing.assert_allclose(maps[interp.mask], 1.0)  # weights sum to one
    assert np.isnan(maps[~interp.mask]).all()


def test_grid_spans_the_layout_bounding_box(layout):
    x, y = layout
    interp = GridInterpolator(x, y, resolution=(11, 7))
    assert interp.xs[0] == x.min() and interp.xs[-1] == x.max()
    assert interp.ys[0] == y.min() and interp.ys[-1] == y.max()
    assert interp.grid[0].shape == (11,) and interp.grid[1].shape == (7,)
    assert interp.shape == (7, 11)


def test_linear_reproduces_linear_functions_and_vertices():
    # a regular grid of neurons: linear interpolation of a plane is exact
    gx, gy = np.meshgrid(np.linspace(0, 1, 5), np.linspace(0, 1, 5))
    x, y = gx.ravel(), gy.ravel()
    interp = GridInterpolator(x, y, resolution=9)
    plane = 2 * x - 3 * y + 0.5
    got = interp(plane)
    X, Y = np.meshgrid(interp.xs, interp.ys)
    np.testing.assert_allclose(got, 2 * X - 3 * Y + 0.5, atol=1e-12)
    # the grid hits every neuron: values there are the neuron's own values
    assert interp.mask.all()


def test_nan_group_gives_nan_map_without_touching_others(layout):
    x, y = layout
    values = np.random.default_rng(4).normal(size=(2, x.size))
    values[1] = np.nan  # an empty group
    maps = GridInterpolator(x, y, resolution=20)(values)
    assert np.isnan(maps[1]).all()
    assert np.isfinite(maps[0]).sum() > 0


@pytest.mark.parametrize("border", ["mean", 0.0])
def test_box_extrapolation_fills_every_pixel(layout, border):
    x, y = layout
    values = np.random.default_rng(5).normal(size=x.size)
    interp = GridInterpolator(x, y, resolution=30, extrapolate="box", border=border)
    got = interp(values)
    assert interp.mask.all() and np.isfinite(got).all()
    # the grid is larger than the neurons' box
    assert interp.xs[0] < x.min() and interp.xs[-1] > x.max()
    if border == 0.0:
        # helper points are zero: values on the outermost pixel ring shrink toward 0
        corner = got[0, 0]
        assert corner == pytest.approx(0.0, abs=1e-12)


def test_box_extrapolation_is_linear_in_the_values(layout):
    x, y = layout
    rng = np.random.default_rng(6)
    a, b = rng.normal(size=(2, x.size))
    interp = GridInterpolator(x, y, resolution=16, extrapolate="box")
    np.testing.assert_allclose(interp(a + 2 * b), interp(a) + 2 * interp(b), atol=1e-12)


def test_local_extrapolation_extends_the_hull_but_not_to_the_corners(layout):
    x, y = layout
    hull = GridInterpolator(x, y, resolution=50)
    local = GridInterpolator(x, y, resolution=50, extrapolate="local", margin=0.1)
    def area(interp):
        xmin, xmax, ymin, ymax = interp.bounds
        return interp.mask.mean() * (xmax - xmin) * (ymax - ymin)

    assert area(local) > area(hull) * 1.05
    assert local.xs[0] < x.min()
    v = np.random.default_rng(7).normal(size=x.size)
    got = local(v)
    assert np.isfinite(got[local.mask]).all()
    assert not local.mask.all()  # corners of the box stay empty


def test_dataarray_layout_constructor():
    da = xr.DataArray(
        np.zeros(4), dims="neuron", coords={"x": ("neuron", [0, 1, 0, 1.0]),
                                           "y": ("neuron", [0, 0, 1, 1.0])}
    )
    interp = GridInterpolator.from_layout(da, resolution=5)
    assert interp.n_neurons == 4 and interp.mask.all()
    with pytest.raises(ConventionError, match="x"):
        GridInterpolator.from_layout(da.drop_vars("x"))


def test_from_layout_refuses_a_per_epoch_layout():
    rng = np.random.default_rng(8)
    n, epochs = 12, 3
    xs, ys = rng.random((n, epochs)), rng.random((n, epochs))
    da = xr.DataArray(rng.normal(size=(n, epochs)), dims=("neuron", "epoch"),
                      coords={"neuron": np.arange(n), "epoch": np.arange(epochs),
                              "x": (("neuron", "epoch"), xs), "y": (("neuron", "epoch"), ys)})
    with pytest.raises(InterpolationError, match=r"one epoch.*sel\(epoch="):
        GridInterpolator.from_layout(da, resolution=20)
    one = GridInterpolator.from_layout(da.sel(epoch=1), resolution=20)
    assert one.n_neurons == n
    values = da.sel(epoch=1).values
    got = one(values)
    np.testing.assert_allclose(got, _griddata(xs[:, 1], ys[:, 1], values, one, "linear"),
                               atol=1e-12, equal_nan=True)


@pytest.mark.parametrize("border", ["mean", 0.0])
def test_box_extrapolation_fills_the_given_bounds(border):
    rng = np.random.default_rng(9)
    x, y = 0.2 + 0.6 * rng.random(50), 0.2 + 0.6 * rng.random(50)
    values = np.sin(6 * x) + y
    interp = GridInterpolator(x, y, resolution=50, extrapolate="box", border=border,
                              bounds=(0, 1, 0, 1))
    got = interp(values)
    assert interp.bounds == (0.0, 1.0, 0.0, 1.0)
    assert interp.mask.all() and np.isfinite(got).all()
    if border == 0.0:  # the helper points sit on the grid's corners
        assert got[0, 0] == got[0, -1] == got[-1, 0] == got[-1, -1] == 0.0
    # bounds inside the neurons' box: the helpers stay around the neurons
    inner = GridInterpolator(x, y, resolution=20, extrapolate="box", border=border,
                             bounds=(0.4, 0.6, 0.4, 0.6))
    assert np.isfinite(inner(values)).all()
    # without bounds the grid is the neurons' box enlarged by margin * extent
    pad = 0.1 * max(np.ptp(x), np.ptp(y))
    default = GridInterpolator(x, y, resolution=20, extrapolate="box", margin=0.1)
    np.testing.assert_allclose(default.bounds, [x.min() - pad, x.max() + pad,
                                                y.min() - pad, y.max() + pad], atol=1e-12)
    assert np.isfinite(default(values)).all()


@pytest.mark.parametrize(
    ("x", "y", "match"),
    [
        ([0, 1], [0, 1], "at least 3"),
        ([0, 1, 2], [0, 1], "differ in length"),
        ([0, 1, np.nan], [0, 1, 2], "NaN"),
        ([0, 1, 2, 3], [0, 1, 2, 3], "on one line"),
    ],
)
def test_bad_layouts_raise_clear_errors(x, y, match):
    with pytest.raises(InterpolationError, match=match):
        GridInterpolator(x, y)


def test_bad_arguments_raise_clear_errors(layout):
    x, y = layout
    with pytest.raises(ValueError, match="method"):
        GridInterpolator(x, y, method="spline")
    with pytest.raises(ValueError, match="extrapolate"):
        GridInterpolator(x, y, extrapolate="far")
    with pytest.raises(ValueError, match="resolution"):
        GridInterpolator(x, y, resolution=1)
    interp = GridInterpolator(x, y, resolution=10)
    with pytest.raises(ValueError, match=r"one value per neuron"):
        interp(np.zeros((3, x.size + 1)))
