"""Canonical names and :func:`topoxr.conventions.validate`."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from topoxr import conventions
from topoxr.conventions import DIMS, ConventionError, validate


def test_the_three_dims():
    assert DIMS == ("neuron", "sample", "epoch")
    assert (conventions.NEURON, conventions.SAMPLE, conventions.EPOCH) == DIMS
    assert (conventions.X, conventions.Y) == ("x", "y")


def test_every_exported_name_exists_and_names_are_distinct():
    for name in conventions.__all__:
        assert hasattr(conventions, name), name
    strings = [getattr(conventions, n) for n in conventions.__all__
               if isinstance(getattr(conventions, n), str)]
    assert len(strings) == len(set(strings))
    assert all(s and s == s.strip() for s in strings)


def test_conventions_error_is_a_value_error():
    assert issubclass(ConventionError, ValueError)


def _da(dims=DIMS, **coords):
    shape = tuple(range(2, 2 + len(dims)))
    return xr.DataArray(np.zeros(shape), dims=dims, coords=coords)


def test_validate_accepts_a_conforming_object():
    validate(_da())
    validate(_da(label=("sample", [0, 1, 0])), coords=("label",))
    validate(_da().to_dataset(name="activation"))
    validate(_da(dims=("neuron", "sample")), dims=("neuron", "sample"))


def test_validate_lists_every_problem():
    da = _da(dims=("unit", "sample"))
    with pytest.raises(ConventionError) as info:
        validate(da, coords=("label", "x"))
    message = str(info.value)
    assert "missing dimension(s) ['neuron', 'epoch']" in message
    assert "missing coordinate(s) ['label', 'x']" in message
    assert "the object has dims ['unit', 'sample']" in message


def test_validate_only_coordinates():
    with pytest.raises(ConventionError, match=r"missing coordinate\(s\) \['y'\]") as info:
        validate(_da(x=("neuron", [0.1, 0.2])), coords=("x", "y"))
    assert "dimension" not in str(info.value)


def test_validate_takes_one_name_given_as_a_string():
    # a string was iterated by character: dims="neuron" missed 'n', 'e', 'u'...
    da = xr.DataArray(np.zeros((2, 3)), dims=("neuron", "sample"), coords={"sample": [0, 1, 2]})
    validate(da, dims="neuron", coords="sample")
    with pytest.raises(ConventionError, match=r"missing dimension\(s\) \['epoch'\]"):
        validate(da, dims="epoch")
