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


# -- audited defects: bad parameters, NaN neurons, shared positions ------------------------

def _box_reference(interp, x, y, values, k=3):
    """Values of the interpolator's points (neurons, then helpers: mean of k nearest)."""
    helpers = interp.triangulation.points[len(x):]
    d = np.hypot(helpers[:, :1] - x, helpers[:, 1:] - y)
    nearest = np.argsort(d, axis=1)[:, :k]
    return np.r_[values, values[nearest].mean(axis=1)]


@pytest.mark.parametrize("extrapolate", ["box", "local"])
def test_border_must_be_mean_or_a_finite_number(layout, extrapolate):
    x, y = layout
    for bad in (np.nan, np.inf, -np.inf, True, np.float64("nan")):
        with pytest.raises(ValueError, match=r"border must be .*finite.*got"):
            GridInterpolator(x, y, resolution=12, extrapolate=extrapolate, border=bad)
    # numpy numbers are numbers: the same map as the Python number
    v = np.random.default_rng(10).normal(size=x.size)
    for np_border, py_border in ((np.float32(0.5), 0.5), (np.int64(0), 0.0)):
        got = GridInterpolator(x, y, resolution=12, extrapolate=extrapolate,
                               border=np_border)(v)
        ref_interp = GridInterpolator(x, y, resolution=12, extrapolate=extrapolate,
                                      border=py_border)
        np.testing.assert_array_equal(got, ref_interp(v))
        # and the helper points really hold that constant (griddata over all points)
        pts = ref_interp.triangulation.points
        vals = np.r_[v, np.full(len(pts) - x.size, py_border)]
        gx, gy = np.meshgrid(ref_interp.xs, ref_interp.ys)
        ref = griddata(pts, vals, (gx, gy), method="linear")
        np.testing.assert_allclose(got, ref, atol=1e-12, equal_nan=True)


def test_margin_and_n_border_neighbors_are_checked(layout):
    x, y = layout
    for extrapolate in ("hull", "local", "box"):
        for bad in (-0.3, np.nan, np.inf, True, "0.1"):
            with pytest.raises(ValueError, match=r"margin .*got"):
                GridInterpolator(x, y, resolution=12, extrapolate=extrapolate, margin=bad)
    for extrapolate in ("local", "box"):  # helper points on the neurons: refused
        with pytest.raises(ValueError, match=r"margin must be positive"):
            GridInterpolator(x, y, resolution=12, extrapolate=extrapolate, margin=0)
    for bad in (0, -5, 2.5, True):
        with pytest.raises(ValueError, match=r"n_border_neighbors .*got"):
            GridInterpolator(x, y, resolution=12, extrapolate="box", n_border_neighbors=bad)
    # accepted values do what they say: helpers hold the mean of the k nearest neurons
    v = np.random.default_rng(11).normal(size=x.size)
    for k in (1, 2, np.int64(4)):
        interp = GridInterpolator(x, y, resolution=16, extrapolate="box",
                                  n_border_neighbors=k)
        gx, gy = np.meshgrid(interp.xs, interp.ys)
        ref = griddata(interp.triangulation.points, _box_reference(interp, x, y, v, int(k)),
                       (gx, gy), method="linear")
        np.testing.assert_allclose(interp(v), ref, atol=1e-12)


def test_bad_bounds_and_resolution_raise_clear_errors(layout):
    x, y = layout
    for bad in ((0, np.inf, 0, 1), (0, 1, np.nan, 1), (-np.inf, 1, 0, 1), (), (0, 1, 0),
                (1, 0, 0, 1), "0101"):
        with pytest.raises(ValueError, match=r"bounds must be"):
            GridInterpolator(x, y, resolution=10, bounds=bad)
    for bad in ("20", (10.9, 5), 2.5, np.float64(20), (20.0, 20), True, (20, True), (20,)):
        with pytest.raises(ValueError, match=r"resolution must be an int or a pair of ints"):
            GridInterpolator(x, y, resolution=bad)
    # integers of any kind are fine
    assert GridInterpolator(x, y, resolution=(np.int32(7), 5)).shape == (5, 7)


def test_cubic_grid_outside_the_hull_gives_all_nan_maps():
    x, y, v = np.array([0, 1, 0.0]), np.array([0, 0, 1.0]), np.array([1.0, 2, 3])
    for method in ("cubic", "linear", "nearest"):  # cubic as the others
        interp = GridInterpolator(x, y, resolution=5, bounds=(2, 3, 2, 3), method=method)
        for values in (v, np.stack([v, 2 * v]), np.r_[np.nan, 2, 3]):
            got = interp(values)
            assert got.shape == (*np.shape(values)[:-1], 5, 5) and np.isnan(got).all()
        assert not interp.mask.any()


def _missing_mask(interp, missing):
    """Pixels whose linear interpolation puts a nonzero weight on a missing point."""
    gx, gy = np.meshgrid(interp.xs, interp.ys)
    share = griddata(interp.triangulation.points, missing.astype(float), (gx, gy),
                     method="linear")
    return np.nan_to_num(share, nan=0.0) != 0


@pytest.mark.parametrize("extrapolate", ["hull", "box"])
def test_cubic_blanks_the_pixels_of_a_nan_neuron_like_linear(extrapolate):
    from scipy.interpolate import CloughTocher2DInterpolator

    rng = np.random.default_rng(3)
    x, y = rng.random(40), rng.random(40)
    v = rng.normal(size=40)
    v[7] = np.nan
    cubic = GridInterpolator(x, y, resolution=50, method="cubic", extrapolate=extrapolate)
    linear = GridInterpolator(x, y, resolution=50, method="linear", extrapolate=extrapolate)
    got = cubic(v)
    # the same pixels are blank for both methods, and only those
    np.testing.assert_array_equal(np.isnan(got), np.isnan(linear(v)))
    # independent reference: values of every interpolation point (helpers: mean of the
    # 3 nearest neurons, NaN when one of them is the NaN neuron); a pixel is NaN when its
    # triangle gives a missing point a nonzero weight, or outside the hull
    pts = cubic.triangulation.points
    vals = v if extrapolate == "hull" else _box_reference(cubic, x, y, v)
    missing = np.isnan(vals)
    assert missing.sum() >= 1
    expected_nan = _missing_mask(cubic, missing) | ~cubic.mask
    np.testing.assert_array_equal(np.isnan(got), expected_nan)
    r = np.argmin(np.abs(cubic.ys - y[7]))
    c = np.argmin(np.abs(cubic.xs - x[7]))
    assert np.isnan(got[r, c])  # the pixel at the NaN neuron shows no made-up value
    # elsewhere: the Clough-Tocher interpolant of the points that have a value
    ct = CloughTocher2DInterpolator(pts[~missing], vals[~missing])
    gx, gy = np.meshgrid(cubic.xs, cubic.ys)
    ref = ct(gx, gy)
    keep = ~expected_nan
    np.testing.assert_allclose(got[keep], ref[keep], rtol=1e-10, atol=1e-12)
    # a map without NaN is unchanged by the NaN handling (batched with a NaN map)
    w = np.nan_to_num(v)
    both = cubic(np.stack([w, v]))
    np.testing.assert_array_equal(both[1], got)
    np.testing.assert_allclose(both[0], cubic(w), atol=0)


def test_nan_neuron_does_not_blank_pixels_on_other_neurons():
    from fractions import Fraction

    # a 5 x 5 lattice, the grid hits every neuron and every edge midpoint
    gx, gy = np.meshgrid(np.linspace(0, 1, 5), np.linspace(0, 1, 5))
    x, y = gx.ravel(), gy.ravel()
    values = 2 * x - 3 * y + 0.5
    values[12] = np.nan  # the centre neuron (0.5, 0.5)
    interp = GridInterpolator(x, y, resolution=9)
    got = interp(values)
    # exact barycentric weights (rational arithmetic) on the same triangles: a pixel is
    # NaN only when the centre neuron has a nonzero weight in its triangle
    pts = [(Fraction(round(a * 4), 4), Fraction(round(b * 4), 4))
           for a, b in zip(x, y, strict=True)]
    expected = np.full((9, 9), np.nan)
    for i in range(9):
        for j in range(9):
            px, py = Fraction(j, 8), Fraction(i, 8)
            for tri in interp.triangulation.simplices:
                (ax, ay), (bx, by), (cx, cy) = (pts[k] for k in tri)
                den = (bx - ax) * (cy - ay) - (cx - ax) * (by - ay)
                l1 = ((px - ax) * (cy - ay) - (cx - ax) * (py - ay)) / den
                l2 = ((bx - ax) * (py - ay) - (px - ax) * (by - ay)) / den
                lam = (1 - l1 - l2, l1, l2)
                if min(lam) < 0:
                    continue
                if any(k == 12 and w != 0 for k, w in zip(tri, lam, strict=True)):
                    break  # a triangle that uses the NaN neuron
                expected[i, j] = float(2 * px - 3 * py) + 0.5
                break
    np.testing.assert_array_equal(np.isnan(got), np.isnan(expected))
    np.testing.assert_allclose(got, expected, atol=1e-12, equal_nan=True)
    # every pixel on a finite neuron shows that neuron's value
    for n in range(25):
        if n != 12:
            i, j = round(y[n] * 8), round(x[n] * 8)
            assert got[i, j] == pytest.approx(values[n], abs=1e-12)
    # no explicit zeros are stored: only contributing neurons can blank a pixel
    assert (interp.weights.data != 0).all()


@pytest.mark.parametrize("method", ["linear", "cubic", "nearest"])
def test_neurons_at_one_position_contribute_their_mean(method):
    rng = np.random.default_rng(12)
    xu, yu = rng.random(30), rng.random(30)
    vu = rng.normal(size=30)
    # neuron 30 sits on neuron 5, neurons 31 and 32 on neuron 9
    x, y = np.r_[xu, xu[5], xu[9], xu[9]], np.r_[yu, yu[5], yu[9], yu[9]]
    v = np.r_[vu, 0.0, 0.0, 0.0]
    v[5], v[30] = 10.0, -4.0
    v[9], v[31], v[32] = 1.0, 2.0, 6.0
    mean_v = vu.copy()
    mean_v[5], mean_v[9] = 3.0, 3.0
    interp = GridInterpolator(x, y, resolution=40, method=method)
    got = interp(v)
    ref = _griddata(xu, yu, mean_v, interp, method)
    np.testing.assert_array_equal(interp.mask, GridInterpolator(xu, yu, resolution=40).mask)
    np.testing.assert_allclose(got[interp.mask], ref[interp.mask], rtol=1e-9, atol=1e-12)
    assert np.isnan(got[~interp.mask]).all()
    # the order of the neurons does not matter
    perm = rng.permutation(x.size)
    again = GridInterpolator(x[perm], y[perm], resolution=40, method=method)(v[perm])
    # (cubic's iterative gradient estimate converges to 1e-6, whatever the point order)
    tol = {"rtol": 1e-5, "atol": 1e-6} if method == "cubic" else {"rtol": 1e-9, "atol": 1e-12}
    np.testing.assert_allclose(again, got, equal_nan=True, **tol)
    if method != "cubic":  # the duplicates share the weight of their position
        w = interp.weights
        np.testing.assert_allclose(w[:, [5]].toarray(), w[:, [30]].toarray())
        np.testing.assert_allclose(w[:, [9]].toarray(), w[:, [32]].toarray())
        assert w[:, [30]].sum() > 0
    # a NaN on either neuron of a shared position blanks the same pixels: that position's
    first, second = v.copy(), v.copy()
    first[5], second[30] = np.nan, np.nan
    ref_nan = mean_v.copy()
    ref_nan[5] = np.nan
    expected = GridInterpolator(xu, yu, resolution=40, method=method)(ref_nan)
    for vals in (first, second):
        out = interp(vals)
        np.testing.assert_array_equal(np.isnan(out), np.isnan(expected))
        assert np.isnan(out).sum() > np.isnan(got).sum()
        np.testing.assert_allclose(out, expected, rtol=1e-9, atol=1e-12, equal_nan=True)


def test_shared_position_exact_values():
    x = np.array([0, 1, 0, 1, 0.5, 0.5])
    y = np.array([0, 0, 1, 1, 0.5, 0.5])
    v = np.array([0, 0, 0, 0, 10.0, -10.0])
    interp = GridInterpolator(x, y, resolution=3)
    assert interp(v)[1, 1] == 0.0
    assert GridInterpolator(x, y, resolution=3)(v[[0, 1, 2, 3, 5, 4]])[1, 1] == 0.0
    v[5] = np.nan
    assert np.isnan(interp(v)[1, 1])
