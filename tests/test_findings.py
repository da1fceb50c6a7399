"""topoxr.findings: the number of each application, on maps whose answer is planted."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from topoxr import findings

N = 60
RNG = np.random.default_rng(0)
X, Y = RNG.random(N), RNG.random(N)


def _blob(cx: float, cy: float) -> np.ndarray:
    return np.exp(-((X - cx) ** 2 + (Y - cy) ** 2) / 0.03)


CENTRES = [(0.2, 0.2), (0.8, 0.2), (0.5, 0.8), (0.2, 0.8)]
CLASS = [_blob(*c) - _blob(*c).mean() for c in CENTRES]


def _laid(groups: list[tuple], values: list[np.ndarray], names: list[str],
          epochs: int | None = None) -> xr.DataArray:
    """NAPs (neuron, group[, epoch]) on the fixed layout X, Y."""
    data = np.stack(values, axis=1)  # neuron, group[, epoch]
    if len(names) == 1:
        coords = {"label": [g[0] for g in groups]}
        gdim = "label"
        xc = xr.Coordinates(coords)
    else:
        gdim = "group"
        xc = xr.Coordinates.from_pandas_multiindex(
            pd.MultiIndex.from_tuples(groups, names=names), "group")
    dims = ["neuron", gdim] + (["epoch"] if epochs else [])
    da = xr.DataArray(data, dims=dims, coords=xc, name="nap")
    da = da.assign_coords(neuron=np.arange(N), x=("neuron", X), y=("neuron", Y))
    if epochs:
        da = da.assign_coords(epoch=np.arange(epochs))
    return da


def test_distinct_classes_correlate_less_than_alike_ones():
    distinct = _laid([(k,) for k in range(4)], CLASS, ["label"])
    alike = _laid([(k,) for k in range(4)], [CLASS[0] + 0.05 * c for c in CLASS], ["label"])
    d = findings.class_map_findings(distinct)
    a = findings.class_map_findings(alike)
    assert d["mean_correlation"] < 0.2 < 0.9 < a["mean_correlation"]
    assert set(d["blob_count"]) == {0, 1, 2, 3}
    assert all(count >= 1 for count in d["blob_count"].values())  # one blob per class at least
    assert 0 < d["mean_blob_area"] < 0.5


def test_wrong_samples_that_look_like_the_predicted_class():
    groups = [(0, 0), (1, 1), (2, 2), (0, 1), (2, 1)]
    values = [CLASS[0], CLASS[1], CLASS[2], CLASS[1] + 0.1 * CLASS[0], CLASS[2]]
    by_prediction = _laid(groups, values, ["label", "prediction"])
    by_prediction = by_prediction.assign_coords(count=("group", [10, 10, 10, 3, 1]))
    by_correct = _laid([(0, True), (1, True), (2, True), (0, False), (2, False)],
                       [CLASS[0], CLASS[1], CLASS[2], CLASS[1], CLASS[2]], ["label", "correct"])
    found = findings.error_findings(by_prediction, by_correct)
    assert found["wrong_samples"] == 4
    first = next(p for p in found["pairs"] if p["label"] == 0)
    assert first["r_predicted"] > 0.9 > first["r_true"]
    # 3 samples look like their prediction, 1 like its true class
    assert found["closer_to_predicted"] == pytest.approx(0.75)
    assert found["correct_vs_wrong"][2] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="label', 'prediction"):
        findings.error_findings(by_correct, by_correct)


def test_a_planted_attribute_effect_is_found_only_in_the_biased_model():
    groups = [(k, m) for k in range(3) for m in (True, False)]
    biased = _laid(groups, [CLASS[k] + (CLASS[3] if m else 0) for k, m in groups],
                   ["label", "marked"])
    control = _laid(groups, [CLASS[k] + RNG.normal(0, 0.01, N) for k, m in groups],
                    ["label", "marked"])
    found = findings.bias_findings(biased, control, attribute="marked")
    assert found["control"]["mean_effect"] < 0.05
    assert found["biased"]["mean_effect"] > 0.2
    assert found["ratio"] > 4
    with pytest.raises(ValueError, match="marked"):
        findings.bias_findings(biased.rename(marked="other"), control, attribute="marked")


def test_training_change_and_the_epoch_it_settles():
    # the maps move at epochs 1 and 2, then stay put
    steps = [CLASS[3], 0.5 * CLASS[3] + CLASS[0], CLASS[0], CLASS[0], CLASS[0]]
    values = [np.stack([s * (1 + 0.001 * e) + (k * CLASS[1] if k else 0)
                        for e, s in enumerate(steps)], axis=-1) for k in range(2)]
    laid = _laid([(0,), (1,)], values, ["label"], epochs=5)
    found = findings.training_findings(laid)
    assert found["epochs"] == [0, 1, 2, 3, 4]
    assert len(found["change"]) == 4
    assert found["change"][0] > 0.05 and found["change"][-1] < 0.01
    assert found["settled_at"] == 2
    assert found["correlation_with_last"][-1] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="two epochs"):
        findings.training_findings(laid.isel(epoch=[0]))


def test_maps_without_a_layout_are_refused():
    nap = _laid([(k,) for k in range(4)], CLASS, ["label"]).drop_vars(["x", "y"])
    with pytest.raises(ValueError, match="no layout"):
        findings.class_map_findings(nap)
