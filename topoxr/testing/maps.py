"""Small synthetic "laid-out NAPs" for testing and documenting :mod:`topoxr.viz`.

The arrays follow the format that ``topoxr.naps(...)`` followed by
``topoxr.layouts.attach(...)`` produces: a DataArray named ``nap`` with dims
``("neuron", <group dim>, "epoch")``, layout coordinates ``x``/``y`` on ``neuron`` and a
``count`` coordinate on (group, epoch).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import xarray as xr

from topoxr import conventions as cv

__all__ = ["make_laid_naps"]


def make_laid_naps(
    n_neurons: int = 30,
    n_labels: int = 4,
    n_epochs: int = 3,
    *,
    by: str | Sequence[str] = "label",
    random_state: int = 0,
    model: str | None = "mlp",
    layer: str = "hidden",
    empty: tuple[int, int] | None = None,
) -> xr.DataArray:
    """Build laid-out NAPs with planted, class-specific blobs.

    Each label ``k`` has a centre in the unit square; neurons close to it are active for
    that label. The contrast grows over epochs (epoch 0 is nearly flat), so a training
    animation visibly changes.

    Parameters
    ----------
    n_neurons, n_labels, n_epochs : int
        Sizes.
    by : str or sequence of str, default "label"
        ``"label"`` gives dims ``("neuron", "label", "epoch")``. ``["label", "correct"]``
        or ``["label", "prediction"]`` give a stacked ``group`` dim (pandas MultiIndex);
        some combinations are left out, as in real data where they never occur.
    random_state : int, default 0
        Seed.
    model, layer : str
        Stored in the ``topoxr_model`` / ``topoxr_layer`` attrs (model omitted if None).
    empty : (int, int), optional
        ``(group index, epoch index)`` made empty: NaN values and a zero count.

    Returns
    -------
    xarray.DataArray
        Named ``nap``, with coords ``x``, ``y`` (neuron), ``count`` (group, epoch) and
        ``epoch``.

    Examples
    --------
    >>> nap = make_laid_naps(12, 3, 2)
    >>> nap.dims
    ('neuron', 'label', 'epoch')
    """
    rng = np.random.default_rng(random_state)
    keys = [by] if isinstance(by, str) else list(by)
    x, y = rng.random(n_neurons), rng.random(n_neurons)
    centres = rng.random((n_labels, 2))
    labels = np.arange(n_labels)
    growth = np.linspace(0.2, 1.0, n_epochs)

    def blob(label: int) -> np.ndarray:
        d2 = (x - centres[label, 0]) ** 2 + (y - centres[label, 1]) ** 2
        return np.exp(-d2 / 0.05)

    if keys == [cv.LABEL]:
        groups: list[tuple] = [(int(k),) for k in labels]
        base = np.stack([blob(k) for k in labels])  # (group, neuron)
    elif len(keys) == 2 and keys[0] == cv.LABEL and keys[1] in (cv.CORRECT, cv.PREDICTION):
        if keys[1] == cv.CORRECT:
            second: list = [True, False]
        else:
            second = list(labels)
        groups = [(int(k), v) for k in labels for v in second]
        # leave out a few combinations (they never occur in the data)
        keep = [g for i, g in enumerate(groups) if i % 5 != 4]
        groups = keep
        base = np.stack([
            blob(k) * (1.0 if (v is True or v == k) else -0.5)
            + (0.0 if (v is True or v == k) else 0.5 * blob(int(v) if not isinstance(v, bool)
                                                        else (k + 1) % n_labels))
            for k, v in groups
        ])
    else:
        raise ValueError(
            f"by must be 'label', ['label', 'correct'] or ['label', 'prediction'], got {by!r}"
        )
    base = base - base.mean(axis=0, keepdims=True)
    values = base[:, :, None] * growth[None, None, :]
    values = values + 0.02 * rng.normal(size=values.shape)
    values = np.transpose(values, (1, 0, 2)).astype(np.float32)  # neuron, group, epoch
    counts = rng.integers(5, 20, size=(len(groups), n_epochs))
    if empty is not None:
        values[:, empty[0], empty[1]] = np.nan
        counts[empty[0], empty[1]] = 0

    coords: dict = {
        cv.NEURON: np.arange(n_neurons),
        cv.X: (cv.NEURON, x),
        cv.Y: (cv.NEURON, y),
        cv.EPOCH: np.arange(n_epochs),
    }
    if len(keys) == 1:
        group_dim = cv.LABEL
        coords[cv.LABEL] = [g[0] for g in groups]
        xcoords = xr.Coordinates(coords)
    else:
        group_dim = "group"
        index = pd.MultiIndex.from_tuples(groups, names=keys)
        xcoords = xr.Coordinates(coords).merge(
            xr.Coordinates.from_pandas_multiindex(index, group_dim)
        ).coords
    attrs = {cv.ATTR_LAYER: layer, "normalize": "mean over groups subtracted"}
    if model is not None:
        attrs[cv.ATTR_MODEL] = model
    da = xr.DataArray(values, dims=(cv.NEURON, group_dim, cv.EPOCH), coords=xcoords,
                      name="nap", attrs=attrs)
    return da.assign_coords(count=((group_dim, cv.EPOCH), counts))
