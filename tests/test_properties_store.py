"""Property tests: how a recording is cut into batches and chunks never shows in the data."""

from __future__ import annotations

import uuid

import fsspec
import numpy as np
import pytest
import xarray as xr

hypothesis = pytest.importorskip("hypothesis")
st = pytest.importorskip("hypothesis.strategies")
from hypothesis import HealthCheck, given, settings  # noqa: E402

from topoxr import ActivationWriter, open_store  # noqa: E402


@st.composite
def recordings(draw):
    """Data for a recording plus two different ways of writing it."""
    n_samples = draw(st.integers(1, 24))
    n_neurons = draw(st.integers(1, 5))
    n_epochs = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    values = rng.normal(size=(n_epochs, n_samples, n_neurons)).astype(np.float32)
    ids = rng.permutation(n_samples * 3)[:n_samples].astype(np.int64)

    def cutting():
        cuts = draw(st.lists(st.integers(1, max(1, n_samples - 1)), max_size=6, unique=True))
        bounds = [0, *sorted(c for c in cuts if c < n_samples), n_samples]
        return [(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]

    ways = [(cutting(), draw(st.integers(1, 30)), draw(st.booleans())) for _ in range(2)]
    return ids, values, ways


def _write(ids, values, batches, chunk, shuffle_batches):
    url = f"memory://prop-{uuid.uuid4().hex}.zarr"
    order = list(batches)
    if shuffle_batches:
        order = order[::-1]
    with ActivationWriter(url, model="m", chunk_samples=chunk) as writer:
        for epoch in range(values.shape[0]):
            for a, b in order if epoch == 0 else batches:
                writer.write("h", values[epoch, a:b], sample=ids[a:b], label=ids[a:b] % 2,
                             epoch=epoch)
    ds = open_store(url)["m/h"].to_dataset().compute()
    fs = fsspec.filesystem("memory")
    fs.rm(url.removeprefix("memory://"), recursive=True)
    return ds


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(recordings())
def test_any_batching_and_chunking_gives_the_same_arrays(recording):
    ids, values, ways = recording
    opened = [_write(ids, values, *way) for way in ways]
    for ds in opened:
        # the data, by sample id, whatever the order the batches arrived in
        got = ds.activation.sel(sample=ids).transpose("epoch", "sample", "neuron").values
        np.testing.assert_array_equal(got, values)
        np.testing.assert_array_equal(ds.label.sel(sample=ids), ids % 2)
        assert ds.committed.values.all() and ds.epoch_complete.values.all()
    a, b = (ds.sortby("sample") for ds in opened)
    xr.testing.assert_identical(a, b)
