"""Canonical names of the topoxr data model.

Every dimension, coordinate and attribute name that topoxr reads or writes is defined
here, once, so that conventions are data rather than string literals scattered over the
code base (the idea of cf-xarray's ``criteria.py``).

The store contract (see ``docs/store-format.md``)::

    <store>/                     attrs: topoxr_format_version, created, description
      <model>/                   attrs: topoxr_model
        <layer>/                 attrs: topoxr_layer (original layer name), ...
          activation (neuron, sample, epoch) float32
          sample (sample) int64      stable id of each probe input
          label (sample)             class label (int or str), where known
          <metadata> (sample)        any user column: str, int, float or bool
          prediction (sample, epoch) model output argmax, where known
          correct (sample, epoch)    prediction == label
          committed (sample, epoch)  bool: this value was fully written
          epoch (epoch) int64        epoch label (0 = before training)
          epoch_complete (epoch)     bool: the writer finished this epoch
          neuron (neuron) int64      0..n-1
          channel, row, col (neuron) unit position for conv layers kept unreduced
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "ACTIVATION",
    "ATTR_FORMAT",
    "ATTR_LAYER",
    "ATTR_LAYOUT",
    "ATTR_SAVING",
    "ATTR_MODEL",
    "CHANNEL",
    "COMMITTED",
    "CORRECT",
    "DIMS",
    "EPOCH",
    "EPOCH_COMPLETE",
    "FORMAT_VERSION",
    "LABEL",
    "NEURON",
    "PREDICTION",
    "SAMPLE",
    "X",
    "Y",
    "ConventionError",
    "validate",
]

# Dimensions ---------------------------------------------------------------------------
NEURON = "neuron"
SAMPLE = "sample"
EPOCH = "epoch"
DIMS = (NEURON, SAMPLE, EPOCH)

# Variables and coordinates ------------------------------------------------------------
ACTIVATION = "activation"
LABEL = "label"
PREDICTION = "prediction"
CORRECT = "correct"
COMMITTED = "committed"
EPOCH_COMPLETE = "epoch_complete"
CHANNEL = "channel"
#: Layout coordinates on the ``neuron`` dimension.
X = "x"
Y = "y"

# Attributes ---------------------------------------------------------------------------
ATTR_FORMAT = "topoxr_format_version"
ATTR_MODEL = "topoxr_model"
ATTR_LAYER = "topoxr_layer"
ATTR_LAYOUT = "topoxr_layout"
#: Attribute of a saved layout's group: True until all its arrays are written (readers
#: skip such a group: its missing values would read as fill values).
ATTR_SAVING = "topoxr_saving"
FORMAT_VERSION = 2  # 2: every chunk ends in a crc32c checksum (1: no checksums)


class ConventionError(ValueError):
    """An object does not follow the topoxr data model."""


def validate(obj: Any, *, dims: tuple[str, ...] = DIMS, coords: tuple[str, ...] = ()) -> None:
    """Check that an xarray object follows the topoxr conventions.

    Parameters
    ----------
    obj : xarray.DataArray or xarray.Dataset
        The object to check.
    dims : tuple of str, default ``("neuron", "sample", "epoch")``
        Dimensions the object must have (a single name may be given as a string).
    coords : tuple of str, default ``()``
        Coordinates the object must have (a single name may be given as a string).

    Raises
    ------
    ConventionError
        Listing every missing dimension and coordinate, and what the object has.

    Examples
    --------
    >>> import numpy as np, xarray as xr
    >>> da = xr.DataArray(np.zeros((2, 3, 1)), dims=("neuron", "sample", "epoch"))
    >>> validate(da)
    >>> validate(da, coords=("label",))
    Traceback (most recent call last):
    ...
    topoxr.conventions.ConventionError: missing coordinate(s) ['label']; ...
    """
    # one name given as a string is one name, not its characters
    dims = (dims,) if isinstance(dims, str) else tuple(dims)
    coords = (coords,) if isinstance(coords, str) else tuple(coords)
    problems = []
    missing_dims = [d for d in dims if d not in obj.dims]
    if missing_dims:
        problems.append(f"missing dimension(s) {missing_dims}")
    missing_coords = [c for c in coords if c not in obj.coords]
    if missing_coords:
        problems.append(f"missing coordinate(s) {missing_coords}")
    if problems:
        raise ConventionError(
            "; ".join(problems)
            + f"; the object has dims {list(obj.dims)} and coords {sorted(map(str, obj.coords))}"
        )
