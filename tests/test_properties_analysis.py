"""Property tests: NAPs do not depend on chunking; identity layouts score perfectly."""

from __future__ import annotations

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from topoxr.grouping import naps  # noqa: E402
from topoxr.metrics import neighborhood_preservation, rank_correlation  # noqa: E402
from topoxr.testing import make_activations  # noqa: E402

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)


@st.composite
def layer_and_chunks(draw):
    n_neurons = draw(st.integers(1, 6))
    n_samples = draw(st.integers(2, 30))
    n_epochs = draw(st.integers(1, 3))
    n_labels = draw(st.integers(2, min(5, n_samples)))
    chunks = {
        "neuron": draw(st.integers(1, n_neurons)),
        "sample": draw(st.integers(1, n_samples)),
        "epoch": draw(st.integers(1, n_epochs)),
    }
    by = draw(st.sampled_from(["label", "prediction", ("label", "correct")]))
    seed = draw(st.integers(0, 2**16))
    return (n_neurons, n_samples, n_epochs, n_labels), chunks, by, seed


@SETTINGS
@given(layer_and_chunks())
def test_naps_do_not_depend_on_chunking(case):
    (n_neurons, n_samples, n_epochs, n_labels), chunks, by, seed = case
    kwargs = {"n_neurons": n_neurons, "n_samples": n_samples, "n_epochs": n_epochs,
              "n_labels": n_labels, "random_state": seed}
    eager = make_activations(**kwargs)
    lazy = make_activations(chunks=chunks, **kwargs)
    by = list(by) if isinstance(by, tuple) else by
    try:
        expected = naps(eager, by=by)
    except ValueError as err:  # e.g. every prediction the same: a single group
        with pytest.raises(type(err)):
            naps(lazy, by=by)
        return
    got = naps(lazy, by=by).compute()
    np.testing.assert_allclose(got.values, expected.values, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got["count"].values, expected["count"].values)
    assert got.indexes[got.dims[1]].equals(expected.indexes[expected.dims[1]])


@SETTINGS
@given(
    points=st.integers(8, 60).flatmap(
        lambda n: st.lists(st.tuples(st.floats(-1e3, 1e3), st.floats(-1e3, 1e3)),
                           min_size=n, max_size=n)),
    k=st.integers(1, 3),
)
def test_identity_layout_is_perfect(points, k):
    P = np.asarray(points, dtype=np.float64)
    t, c = neighborhood_preservation(P, P, k, n_queries=None)
    assert t == pytest.approx(1.0)
    assert c == pytest.approx(1.0)
    if np.ptp(P, axis=0).max() > 0 and len(np.unique(P, axis=0)) > 2:
        assert rank_correlation(P, P) == pytest.approx(1.0)
