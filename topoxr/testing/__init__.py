"""Test helpers: small synthetic layers with planted structure, and layout assertions.

Public so that downstream projects (and topoxr's own tests, docs and benchmarks) can
build objects shaped exactly like a layer node of :func:`topoxr.open_store` without a
deep learning framework.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import xarray as xr

from topoxr.conventions import (
    ACTIVATION,
    ATTR_LAYER,
    COMMITTED,
    CORRECT,
    EPOCH,
    EPOCH_COMPLETE,
    LABEL,
    NEURON,
    PREDICTION,
    SAMPLE,
    X,
    Y,
)

__all__ = ["assert_layout_close", "make_activations", "raise_if_dask_computes", "write_store"]


def make_activations(
    n_neurons: int = 12,
    n_samples: int = 40,
    n_epochs: int = 3,
    n_labels: int = 4,
    *,
    n_dead: int = 0,
    chunks: dict[str, int] | None = None,
    random_state: int | None = 0,
) -> xr.Dataset:
    """Build a synthetic layer node with class-selective neurons.

    Neuron ``i`` prefers label ``i % n_labels``: its activation is noise plus a bump for
    samples of that label, and the bump grows over the epochs (the layer "learns").
    Predictions become more accurate from epoch to epoch. The result has the variables,
    coordinates and attributes of a layer node of :func:`topoxr.open_store`.

    Parameters
    ----------
    n_neurons, n_samples, n_epochs, n_labels : int
        Sizes. Labels cycle over the samples so every label occurs.
    n_dead : int, default 0
        The last ``n_dead`` neurons are dead (always exactly zero).
    chunks : dict, optional
        If given, the activation is a dask array with these chunks, e.g.
        ``{"sample": 10, "epoch": 1}``.
    random_state : int, optional
        Seed of the noise.

    Returns
    -------
    xarray.Dataset
        ``activation`` of dims ``("neuron", "sample", "epoch")`` (float32) with the
        coordinates ``neuron``, ``sample``, ``epoch``, ``label``, ``prediction``,
        ``correct``, ``committed``, ``epoch_complete`` and a ``preferred`` coordinate on
        ``neuron`` giving the planted label of each neuron (-1 for dead ones).

    Examples
    --------
    >>> ds = make_activations(n_neurons=8, n_samples=20, n_epochs=2)
    >>> ds.activation.dims
    ('neuron', 'sample', 'epoch')
    """
    if min(n_neurons, n_samples, n_epochs, n_labels) < 1:
        raise ValueError("n_neurons, n_samples, n_epochs and n_labels must all be >= 1")
    if n_samples < n_labels:
        raise ValueError(f"n_samples={n_samples} cannot hold every one of n_labels={n_labels} "
                         "labels")
    if not 0 <= n_dead <= n_neurons:
        raise ValueError(f"n_dead must be between 0 and n_neurons={n_neurons}, got {n_dead}")
    rng = np.random.default_rng(random_state)
    labels = np.arange(n_samples) % n_labels
    preferred = np.arange(n_neurons) % n_labels
    strength = np.linspace(1.0, 3.0, n_epochs)
    noise = rng.normal(0.0, 0.3, size=(n_neurons, n_samples, n_epochs))
    bump = (preferred[:, None] == labels[None, :]).astype(float)
    values = noise + bump[:, :, None] * strength[None, None, :]
    # A little shared structure between neurons of the same label, so profiles differ.
    values += 0.2 * np.sin(preferred)[:, None, None]
    if n_dead:
        values[n_neurons - n_dead :] = 0.0
        preferred = preferred.copy()
        preferred[n_neurons - n_dead :] = -1
    accuracy = np.linspace(0.3, 0.9, n_epochs)
    hit = rng.random((n_samples, n_epochs)) < accuracy[None, :]
    wrong = (labels[:, None] + 1 + rng.integers(0, max(1, n_labels - 1), (n_samples, n_epochs)))
    prediction = np.where(hit, labels[:, None], wrong % n_labels)
    data: Any = values.astype(np.float32)
    if chunks is not None:
        import dask.array as dsa

        dims = (NEURON, SAMPLE, EPOCH)
        data = dsa.from_array(data, chunks=tuple(chunks.get(d, -1) for d in dims))
    coords = {
        NEURON: np.arange(n_neurons),
        SAMPLE: np.arange(n_samples) + 1000,
        EPOCH: np.arange(n_epochs),
        LABEL: (SAMPLE, labels),
        PREDICTION: ((SAMPLE, EPOCH), prediction),
        CORRECT: ((SAMPLE, EPOCH), prediction == labels[:, None]),
        COMMITTED: ((SAMPLE, EPOCH), np.ones((n_samples, n_epochs), dtype=bool)),
        EPOCH_COMPLETE: (EPOCH, np.ones(n_epochs, dtype=bool)),
        "preferred": (NEURON, preferred),
    }
    act = xr.DataArray(data, dims=(NEURON, SAMPLE, EPOCH), name=ACTIVATION)
    return xr.Dataset({ACTIVATION: act}, coords=coords, attrs={ATTR_LAYER: "synthetic"})


def _layout_coords(obj: Any) -> tuple[xr.DataArray, xr.DataArray]:
    if X not in obj.coords or Y not in obj.coords:
        raise AssertionError(f"object has no layout: coordinates {X!r} and {Y!r} are missing")
    xs, ys = obj.coords[X], obj.coords[Y]
    if NEURON not in xs.dims or set(xs.dims) != set(ys.dims):
        raise AssertionError(f"the layout's {X!r} and {Y!r} are not on the neurons alike: "
                             f"{xs.dims} and {ys.dims}")
    return xs, ys


def _matched(actual: xr.DataArray, desired: xr.DataArray) -> xr.DataArray:
    """``actual`` in ``desired``'s order of dims and labels: the same neurons (and epochs,
    or any other dim of the layout) by label, in any order; other labels fail."""
    if set(actual.dims) != set(desired.dims):
        raise AssertionError(f"the layouts are on other dims: {actual.dims} and {desired.dims}")
    for dim in desired.dims:
        have, want = actual[dim].values, desired[dim].values
        if len(set(have.tolist())) != len(have) or sorted(have.tolist()) != sorted(want.tolist()):
            what = "neurons" if dim == NEURON else f"{dim!r} labels"
            raise AssertionError(f"the layouts are of different {what}: {have.tolist()[:10]} "
                                 f"and {want.tolist()[:10]}")
    return actual.transpose(*desired.dims).sel({dim: desired[dim].values
                                                for dim in desired.dims})


def assert_layout_close(
    actual: Any,
    desired: Any,
    *,
    atol: float = 1e-6,
    rtol: float = 0.0,
    up_to_rotation: bool = False,
) -> None:
    """Assert that two laid-out objects place the same neurons at the same positions.

    Neurons are matched by label, in any order, and so are the labels of any other dim
    of the layout (``epoch`` of a per-epoch layout): the same labels are required.

    Parameters
    ----------
    actual, desired : xarray.DataArray or xarray.Dataset
        Objects with ``x`` and ``y`` coordinates on ``neuron`` (and possibly ``epoch``).
    atol, rtol : float
        Tolerances of :func:`numpy.testing.assert_allclose`.
    up_to_rotation : bool, default False
        Align ``actual`` onto ``desired`` with orthogonal Procrustes first (per epoch),
        so layouts that differ only by a rotation, reflection or translation compare
        equal; a layout of one neuron is compared up to translation.

    Raises
    ------
    AssertionError
        If neurons or other labels differ, a layout holds NaN or infinite positions, or
        positions are not close.
    """
    (ax, ay), (dx, dy) = _layout_coords(actual), _layout_coords(desired)
    dims = (NEURON, *[d for d in dx.dims if d != NEURON])
    dx, dy = dx.transpose(*dims), dy.transpose(*dims)
    ax, ay = _matched(ax, dx), _matched(ay, dy)
    a = np.stack([ax.values, ay.values], axis=-1).astype(np.float64)
    d = np.stack([dx.values, dy.values], axis=-1).astype(np.float64)
    for name, pos in (("actual", a), ("desired", d)):
        if not np.isfinite(pos).all():
            raise AssertionError(f"the {name} layout holds NaN or infinite positions")
    if up_to_rotation:
        from topoxr.alignment import procrustes

        a2 = a.reshape(a.shape[0], -1, 2)
        d2 = d.reshape(d.shape[0], -1, 2)
        if a2.shape[0] < 2:  # one neuron: nothing to rotate
            a2 = a2 - a2.mean(axis=0) + d2.mean(axis=0)
        else:
            a2 = np.stack([procrustes(a2[:, i], d2[:, i], rescale=False)[0]
                           for i in range(a2.shape[1])], axis=1)
        a = a2.reshape(a.shape)
    np.testing.assert_allclose(a, d, atol=atol, rtol=rtol, err_msg="layouts differ")


@contextmanager
def raise_if_dask_computes(max_computes: int = 0) -> Iterator[None]:
    """Fail if dask computes more than ``max_computes`` times inside the block.

    The check of xarray's and cf-xarray's test suites: it installs a counting
    synchronous scheduler, so a function that should stay lazy is caught computing.

    Parameters
    ----------
    max_computes : int, default 0
        Computes allowed inside the block.

    Yields
    ------
    None
        The block runs under the counting scheduler.

    Raises
    ------
    RuntimeError
        On the first compute beyond ``max_computes``.
    """
    import dask

    count = 0

    def scheduler(dsk: Any, keys: Any, **kwargs: Any) -> Any:
        nonlocal count
        count += 1
        if count > max_computes:
            raise RuntimeError(f"too many dask computes: {count} > {max_computes}")
        return dask.get(dsk, keys, **kwargs)

    with dask.config.set(scheduler=scheduler):
        yield


def write_store(
    ds: xr.Dataset,
    store: Any,
    *,
    model: str = "model",
    layer: str = "hidden",
    batch_size: int = 16,
    chunk_samples: int | None = None,
    complete: bool = True,
    mode: str = "w",
) -> str:
    """Record a synthetic layer (e.g. from :func:`make_activations`) into a real store.

    Every epoch is written in batches with :class:`topoxr.ActivationWriter`, with labels,
    predictions and the other per-sample coordinates (metadata columns), as a training
    loop would. The store numbers neurons ``0..n-1``: other neuron labels are refused,
    and coordinates on ``neuron`` (``preferred``) are not stored.

    Parameters
    ----------
    ds : xarray.Dataset
        A layer node with ``activation`` and ``label``/``prediction`` coordinates.
    store : str
        Path or fsspec URL of the store.
    model, layer : str
        Names in the store.
    batch_size : int, default 16
        Samples per write.
    chunk_samples : int, optional
        Passed to the writer.
    complete : bool, default True
        Call ``complete_epoch`` after each epoch. The writer also marks every fully
        written epoch complete when it closes, so ``False`` leaves no epoch incomplete;
        write part of an epoch's samples (select them first) for an incomplete one.
    mode : {"w", "a"}, default "w"
        ``"w"`` replaces ``model`` in the store, with every layer it had; ``"a"`` adds the
        layer to it (write a model of several layers with ``"a"`` after the first).

    Returns
    -------
    str
        ``store``.
    """
    from topoxr.store import ActivationWriter

    neurons = ds[NEURON].values
    if not np.array_equal(neurons, np.arange(len(neurons))):
        raise ValueError(f"the store numbers neurons 0..{len(neurons) - 1}; this layer's are "
                         f"{neurons.tolist()[:10]}: they would come back renumbered")
    values = np.asarray(ds[ACTIVATION].transpose(NEURON, SAMPLE, EPOCH).values)
    ids = ds[SAMPLE].values
    labels = ds[LABEL].values if LABEL in ds.coords else None
    preds = ds[PREDICTION].transpose(SAMPLE, EPOCH).values if PREDICTION in ds.coords else None
    metadata = {str(name): ds.coords[name].values for name in ds.coords
                if ds.coords[name].dims == (SAMPLE,) and name not in (SAMPLE, LABEL)}
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if mode not in ("w", "a"):
        raise ValueError(f"mode must be 'w' (replace the model) or 'a' (add the layer to "
                         f"it), got {mode!r}")
    with ActivationWriter(store, model=model, mode=mode, chunk_samples=chunk_samples) as w:
        for e, epoch in enumerate(ds[EPOCH].values.tolist()):
            for start in range(0, len(ids), batch_size):
                sl = slice(start, start + batch_size)
                kwargs: dict[str, Any] = {k: v[sl] for k, v in metadata.items()}
                if labels is not None:
                    kwargs["label"] = labels[sl]
                if preds is not None:
                    kwargs["prediction"] = preds[sl, e]
                w.write(layer, values[:, sl, e].T, sample=ids[sl], epoch=epoch, **kwargs)
            if complete:
                w.complete_epoch(epoch)
    return str(store)
