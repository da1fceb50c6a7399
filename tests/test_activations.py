"""Shaping raw layer outputs into ``(batch, neuron)`` matrices: :mod:`topoxr.activations`."""

from __future__ import annotations

import numpy as np
import pytest

from topoxr.activations import REDUCE_MODES, ReducedBatch, reduce_units

RNG = np.random.default_rng(42)


def test_dense_batches_pass_through_as_float32():
    data = RNG.normal(size=(4, 7))
    out = reduce_units(data)
    assert isinstance(out, ReducedBatch)
    assert out.values.dtype == np.float32 and out.values.flags.c_contiguous
    np.testing.assert_array_equal(out.values, data.astype(np.float32))
    assert out.unit_coords == {}


@pytest.mark.parametrize("dtype", [np.int8, np.uint16, np.int64, bool, np.float16, np.float64])
def test_real_dtypes_are_accepted(dtype):
    data = (RNG.normal(size=(3, 2)) * 3).astype(dtype)
    np.testing.assert_array_equal(reduce_units(data).values, data.astype(np.float32))


def test_a_non_contiguous_view_is_copied_contiguously():
    data = RNG.normal(size=(6, 8)).astype(np.float32)[::2, ::2]
    out = reduce_units(data)
    assert out.values.flags.c_contiguous
    np.testing.assert_array_equal(out.values, data)


@pytest.mark.parametrize("reduce, pool", [("mean", np.mean), ("max", np.max)])
def test_pooling_per_channel(reduce, pool):
    nchw = RNG.normal(size=(5, 3, 4, 6))
    out = reduce_units(nchw, channel_axis=1, reduce=reduce)
    np.testing.assert_allclose(out.values, pool(nchw, axis=(2, 3)), rtol=1e-6)
    np.testing.assert_array_equal(out.unit_coords["channel"], [0, 1, 2])
    assert out.reduce == reduce


@pytest.mark.parametrize("reduce", REDUCE_MODES)
def test_channels_last_equals_channels_first(reduce):
    nchw = RNG.normal(size=(2, 3, 4, 5))
    a = reduce_units(nchw, channel_axis=1, reduce=reduce)
    for axis in (-1, 3):
        b = reduce_units(np.moveaxis(nchw, 1, -1), channel_axis=axis, reduce=reduce)
        np.testing.assert_array_equal(a.values, b.values)
        assert a.unit_coords.keys() == b.unit_coords.keys()
        for key in a.unit_coords:
            np.testing.assert_array_equal(a.unit_coords[key], b.unit_coords[key])


def test_none_keeps_every_unit_channel_major():
    nchw = RNG.normal(size=(2, 3, 4, 5))
    out = reduce_units(nchw, channel_axis=1, reduce="none")
    assert out.values.shape == (2, 60)
    c, r, col = (out.unit_coords[k] for k in ("channel", "row", "col"))
    assert c.tolist() == sorted(c.tolist())  # channel-major
    for k in range(60):
        np.testing.assert_allclose(out.values[:, k], nchw[:, c[k], r[k], col[k]], rtol=1e-6)


@pytest.mark.parametrize("spatial, names", [
    ((7,), ("channel", "position")),
    ((2, 3, 4), ("channel", "depth", "row", "col")),
    ((2, 2, 2, 2), ("channel", "position_0", "position_1", "position_2", "position_3")),
])
def test_unit_coordinates_name_the_spatial_axes(spatial, names):
    data = RNG.normal(size=(2, 3, *spatial))
    out = reduce_units(data, channel_axis=1, reduce="none")
    assert tuple(out.unit_coords) == names
    assert out.values.shape == (2, 3 * int(np.prod(spatial)))
    coords = np.stack([out.unit_coords[n] for n in names])
    assert len({tuple(col) for col in coords.T}) == out.values.shape[1]  # unique units


@pytest.mark.parametrize("data, kwargs, match", [
    (np.ones((2, 3)), dict(reduce="median"), "unknown reduce mode 'median'"),
    (np.array([["a", "b"]]), {}, "must be real numbers.*<U1"),
    (np.ones((2, 2), complex), {}, "must be real numbers"),
    (np.array([[None, 1]], dtype=object), {}, "must be real numbers.*object"),
    (np.ones(3), {}, r"shape \(batch, neurons, \.\.\.\), got shape \(3,\)"),
    (np.float32(1), {}, r"got shape \(\)"),
    (np.ones((2, 3, 4)), {}, "pass channel_axis"),
    (np.ones((2, 3, 4)), dict(channel_axis=0), "channel_axis=0 is not a non-batch axis"),
    (np.ones((2, 3, 4)), dict(channel_axis=-3), "channel_axis=-3 is not a non-batch axis"),
    (np.ones((2, 3, 4)), dict(channel_axis=3), "channel_axis=3 is not a non-batch axis"),
    # were truncated by int(): 1.9 read axis 1, True axis 1, -1.5 axis -1
    (np.ones((2, 3, 4, 5)), dict(channel_axis=1.9), "channel_axis must be an integer, got 1.9"),
    (np.ones((2, 3, 4, 5)), dict(channel_axis=True), "channel_axis must be an integer, got True"),
    (np.ones((2, 3, 4, 5)), dict(channel_axis="1"), "channel_axis must be an integer, got '1'"),
    (np.ones((2, 3, 4, 5)), dict(channel_axis=-1.5), "channel_axis must be an integer"),
    # was ignored for (batch, neurons) input
    (np.ones((2, 3)), dict(channel_axis=5), r"channel_axis=5 is not the neuron axis"),
    (np.ones((2, 3)), dict(channel_axis=0), r"channel_axis=0 is not the neuron axis"),
])
def test_bad_input(data, kwargs, match):
    with pytest.raises(ValueError, match=match):
        reduce_units(data, **kwargs)


def test_lists_are_accepted():
    out = reduce_units([[1, 2], [3, 4]])
    np.testing.assert_array_equal(out.values, [[1, 2], [3, 4]])


@pytest.mark.parametrize("reduce", ["mean", "max"])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("shape, axis", [((6, 5, 1, 1), 1), ((6, 1, 1, 5), -1),
                                         ((6, 1, 5), 2), ((6, 5, 1), 1)])
def test_pooling_one_position_keeps_every_value_and_its_neuron(reduce, dtype, shape, axis):
    # maps an adapter pooled as it captured them reach the store with every pooled axis
    # of length 1: pooling them again (the background writer, then `write()`) must return
    # each value to the bit, in its neuron's column (NaN, infinities and signed zeros
    # included), as fresh float32 memory
    from topoxr.reduction import pool_positions

    data = RNG.normal(size=shape).astype(dtype)
    flat = data.reshape(-1)
    flat[:4] = [np.nan, np.inf, -0.0, -np.inf]
    out = pool_positions(data, axis, reduce)
    expected = np.moveaxis(data, axis, 1).reshape(shape[0], -1).astype(np.float32)
    assert out.dtype == np.float32 and out.shape == expected.shape
    np.testing.assert_array_equal(out, expected)
    assert np.array_equal(np.signbit(out), np.signbit(expected))
    assert not np.shares_memory(out, data)
    # the same as the general paths, which pool maps of two equal positions
    other = next(d for d in range(1, data.ndim) if d != axis % data.ndim)
    twice = np.concatenate([data, data], axis=other)
    np.testing.assert_array_equal(pool_positions(twice, axis, reduce), expected)
    # and the writer's pooling of such maps (``reduce_units``) gives the same values:
    # float32 maps of one position as a view (the writer copies them into its buffer,
    # see tests/test_store.py::test_a_batch_changed_after_write_is_stored_as_written),
    # any other dtype converted
    for maps in (data, twice):
        got = reduce_units(maps, channel_axis=axis, reduce=reduce)
        np.testing.assert_array_equal(got.values, expected)
        assert got.values.dtype == np.float32
        assert np.shares_memory(got.values, data) == (maps is data and dtype == np.float32)
        np.testing.assert_array_equal(got.unit_coords["channel"], np.arange(shape[axis]))


@pytest.mark.parametrize("reduce", ["mean", "max", "first", "last", "tokens"])
def test_token_reductions_leave_padding_out_whatever_it_holds(reduce):
    # padded positions hold anything a model leaves there (here inf and NaN): the masked
    # reductions must never read them, and the first and last real tokens are found on
    # both sides (left padding puts padding at position 0)
    from topoxr.reduction import reduce_layer

    n, t, h = 4, 6, 3
    out = RNG.normal(size=(n, t, h)).astype(np.float32)
    mask = np.zeros((n, t), np.int64)
    mask[0, :] = 1                      # no padding
    mask[1, :4] = 1                     # right padding
    mask[2, 2:] = 1                     # left padding
    mask[3, 1:5] = 1                    # both
    out[mask == 0] = np.inf
    out[3, 0] = np.nan
    got = reduce_layer(out, layer="seq", neuron_axis=2, reduce=reduce, mask=mask).values
    real = [out[i, mask[i] == 1] for i in range(n)]
    want = {"mean": [r.mean(0) for r in real], "max": [r.max(0) for r in real],
            "first": [r[0] for r in real], "last": [r[-1] for r in real],
            "tokens": np.concatenate(real)}[reduce]
    np.testing.assert_allclose(got, np.asarray(want, dtype=np.float32), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("axis", [1, -1, np.int64(1), np.int32(-1), None])
def test_the_neuron_axis_of_dense_input_may_be_given(axis):
    values = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_array_equal(reduce_units(values, channel_axis=axis).values, values)
