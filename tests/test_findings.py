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


def test_mean_blob_area_is_the_area_of_one_blob():
    """Maps without blobs do not count in the mean area of a blob (the demo reports "N
    blobs per map, each X% of the map"): with one class of blobs and one flat class, the
    mean is that of the blobs, not half of it."""
    one = findings.class_map_findings(_laid([(0,)], [CLASS[0]], ["label"]))
    both = findings.class_map_findings(_laid([(0,), (1,)], [CLASS[0], np.zeros(N)], ["label"]))
    assert both["blob_count"][1] == 0 and both["blob_count"][0] == one["blob_count"][0] >= 1
    counts = np.array(list(both["blob_count"].values()))
    areas = np.array(list(both["blob_area"].values()))
    assert both["mean_blob_area"] == pytest.approx((counts * areas).sum() / counts.sum(), abs=1e-4)
    assert both["mean_blob_area"] == pytest.approx(one["mean_blob_area"])
    flat = findings.class_map_findings(_laid([(0,), (1,)], [np.zeros(N), np.zeros(N)], ["label"]))
    assert np.isnan(flat["mean_blob_area"])


def _wrong_looking_like_predicted() -> tuple[xr.DataArray, xr.DataArray]:
    """NAPs by (label, prediction) and by (label, correct): the wrong samples of class 0
    look like class 1, those of class 2 like class 2."""
    groups = [(0, 0), (1, 1), (2, 2), (0, 1), (2, 1)]
    values = [CLASS[0], CLASS[1], CLASS[2], CLASS[1] + 0.1 * CLASS[0], CLASS[2]]
    by_prediction = _laid(groups, values, ["label", "prediction"])
    by_prediction = by_prediction.assign_coords(count=("group", [10, 10, 10, 3, 1]))
    by_correct = _laid([(0, True), (1, True), (2, True), (0, False), (2, False)],
                       [CLASS[0], CLASS[1], CLASS[2], CLASS[1], CLASS[2]], ["label", "correct"])
    return by_prediction, by_correct


def test_wrong_samples_that_look_like_the_predicted_class():
    by_prediction, by_correct = _wrong_looking_like_predicted()
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


def _griddata_map(values: np.ndarray, resolution: int = 64) -> np.ndarray:
    """The linear map the findings draw, computed with scipy on the neurons' box."""
    from scipy.interpolate import griddata

    gx, gy = np.meshgrid(np.linspace(X.min(), X.max(), resolution),
                         np.linspace(Y.min(), Y.max(), resolution))
    return griddata((X, Y), values, (gx, gy), method="linear")


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    ok = np.isfinite(a) & np.isfinite(b)
    return float(np.corrcoef(a[ok], b[ok])[0, 1])


def _error_pair(epochs: int | None = None):
    groups = [(0, 0), (1, 1), (2, 2), (0, 1), (2, 1)]
    values = [CLASS[0], CLASS[1], CLASS[2], CLASS[1] + 0.3 * CLASS[0], CLASS[2]]
    cvalues = [CLASS[0], CLASS[1], CLASS[2], CLASS[1], CLASS[2]]
    if epochs:
        values = [np.stack([v] * epochs, axis=-1) for v in values]
        cvalues = [np.stack([v] * epochs, axis=-1) for v in cvalues]
    by_prediction = _laid(groups, values, ["label", "prediction"], epochs=epochs)
    by_prediction = by_prediction.assign_coords(count=("group", [10, 10, 10, 3, 1]))
    by_correct = _laid([(0, True), (1, True), (2, True), (0, False), (2, False)], cvalues,
                       ["label", "correct"], epochs=epochs)
    return by_prediction, by_correct


def test_error_findings_match_neurons_by_label_and_refuse_other_layouts():
    by_prediction, by_correct = _error_pair()
    found = findings.error_findings(by_prediction, by_correct)
    first = next(p for p in found["pairs"] if p["label"] == 0)
    assert first["r_true"] == pytest.approx(
        _pearson(_griddata_map(CLASS[1] + 0.3 * CLASS[0]), _griddata_map(CLASS[0])), abs=1e-9)
    # the same neurons in another order: matched by label, same answer
    perm = np.random.default_rng(3).permutation(N)
    again = findings.error_findings(by_prediction, by_correct.isel(neuron=perm))
    assert again["pairs"] == found["pairs"]
    assert again["correct_vs_wrong"] == found["correct_vs_wrong"]
    # other neuron labels
    with pytest.raises(ValueError, match="same neurons"):
        findings.error_findings(by_prediction, by_correct.assign_coords(neuron=np.arange(N) + 100))
    # a subset of the neurons
    with pytest.raises(ValueError, match="same neurons"):
        findings.error_findings(by_prediction, by_correct.isel(neuron=slice(0, N - 5)))
    # the same neurons laid out elsewhere
    rng = np.random.default_rng(4)
    moved = by_correct.assign_coords(x=("neuron", rng.random(N)), y=("neuron", rng.random(N)))
    with pytest.raises(ValueError, match="same layout"):
        findings.error_findings(by_prediction, moved)


def test_error_findings_refuse_per_epoch_layouts_that_differ_at_the_epoch_used():
    by_prediction, by_correct = _error_pair(epochs=2)
    xs = np.stack([X, X], axis=1)
    ys = np.stack([Y, Y], axis=1)
    per_epoch = {"x": (("neuron", "epoch"), xs), "y": (("neuron", "epoch"), ys)}
    by_prediction = by_prediction.assign_coords(per_epoch)
    same = findings.error_findings(by_prediction, by_correct.assign_coords(per_epoch))
    assert same == findings.error_findings(by_prediction.isel(epoch=-1),
                                           by_correct.isel(epoch=-1))
    moved = xs.copy()
    moved[:, -1] = np.random.default_rng(5).random(N)
    other = by_correct.assign_coords(x=(("neuron", "epoch"), moved),
                                     y=(("neuron", "epoch"), ys))
    with pytest.raises(ValueError, match="same layout"):
        findings.error_findings(by_prediction, other)
    with pytest.raises(ValueError, match="epoch"):
        findings.error_findings(by_prediction, by_correct.assign_coords(epoch=[0, 5]))


def test_max_pair_is_none_when_no_pair_correlates():
    # one class with a map, two empty at the last epoch (NaN NAPs): no pair has a correlation
    empty = np.full(N, np.nan)
    found = findings.class_map_findings(_laid([("cat",), ("dog",), ("eel",)],
                                              [CLASS[0], empty, empty], ["label"]))
    assert found["max_pair"] is None
    assert np.isnan(found["mean_correlation"])
    # with a finite pair, the most alike pair of two different classes
    alike = findings.class_map_findings(
        _laid([(k,) for k in range(3)], [CLASS[0], CLASS[1], CLASS[1] + 0.1 * CLASS[2]],
              ["label"]))
    assert alike["max_pair"]["groups"] == [1, 2]
    assert alike["max_pair"]["correlation"] == pytest.approx(
        _pearson(_griddata_map(CLASS[1]), _griddata_map(CLASS[1] + 0.1 * CLASS[2])), abs=1e-9)


@pytest.mark.parametrize("levels", [("female", "male"), (1, 2), (True,), (0, 1, 2)])
def test_bias_findings_refuse_an_attribute_that_is_not_boolean(levels):
    groups = [(k, m) for k in range(2) for m in levels]
    nap = _laid(groups, [CLASS[k] + (CLASS[3] if m == levels[-1] else 0) for k, m in groups],
                ["label", "sex"])
    with pytest.raises(ValueError, match="boolean"):
        findings.bias_findings(nap, nap, attribute="sex")


def test_bias_findings_accept_a_zero_one_attribute():
    groups = [(k, m) for k in range(2) for m in (0, 1)]
    marked = [CLASS[k] + (CLASS[3] if m else 0) for k, m in groups]
    nap = _laid(groups, marked, ["label", "marked"])
    found = findings.bias_findings(nap, nap, attribute="marked")
    for k in range(2):
        expected = 1 - _pearson(_griddata_map(CLASS[k] + CLASS[3]), _griddata_map(CLASS[k]))
        assert found["biased"]["effect"][k] == pytest.approx(expected, abs=1e-9)


def _scipy_blob_counts(imgs: np.ndarray, threshold: float = 0.5) -> list[int]:
    """Blob counts with scipy.ndimage.label (4-connected), shared max, NaN never strong."""
    from scipy.ndimage import label

    vmax = np.nanmax(np.abs(imgs))
    filled = np.nan_to_num(imgs, nan=0.0)
    return [label(f >= threshold * vmax)[1] + label(f <= -threshold * vmax)[1] for f in filled]


def test_a_class_empty_at_the_last_epoch_has_nan_blobs_and_is_not_averaged():
    # an all-NaN map (no sample of that class) counted as 0 blobs and pulled the mean down
    from topoxr.interpolate import GridInterpolator
    from topoxr.testing.maps import make_laid_naps

    nap = make_laid_naps(n_neurons=30, n_labels=4, n_epochs=2, empty=(0, 1))
    found = findings.class_map_findings(nap, resolution=30)
    assert np.isnan(found["blob_count"][0]) and np.isnan(found["blob_area"][0])
    imgs = GridInterpolator(nap.x.values, nap.y.values, resolution=30)(
        nap.isel(epoch=-1).transpose("label", "neuron").values)
    counts = _scipy_blob_counts(imgs[1:])
    assert [found["blob_count"][k] for k in (1, 2, 3)] == counts
    assert found["mean_blob_count"] == pytest.approx(np.mean(counts))
    # the same numbers as without the empty class
    without = findings.class_map_findings(nap.isel(label=[1, 2, 3]), resolution=30)
    assert {k: found["blob_count"][k] for k in (1, 2, 3)} == without["blob_count"]
    assert found["mean_blob_count"] == pytest.approx(without["mean_blob_count"])
    assert found["mean_blob_area"] == pytest.approx(without["mean_blob_area"])
    assert found["mean_correlation"] == pytest.approx(without["mean_correlation"])
    # no map at all: NaN means
    all_empty = findings.class_map_findings(nap.isel(label=[0]), resolution=30)
    assert np.isnan(all_empty["mean_blob_count"]) and np.isnan(all_empty["mean_blob_area"])


def _with_nan(nap: xr.DataArray, neuron: int, **where: int) -> xr.DataArray:
    out = nap.copy(deep=True)
    out[{"neuron": neuron, **where}] = np.nan
    return out


def test_a_nan_neuron_blanks_only_its_pixels_not_the_whole_class_map():
    # one NaN neuron value dropped the whole class map: the class left the correlations
    # and the shared blob threshold moved ({0: 2, 1: 0, 2: 0} became {0: 0, 1: 5, 2: 5})
    from topoxr.interpolate import GridInterpolator
    from topoxr.testing.maps import make_laid_naps

    nap = make_laid_naps(n_neurons=30, n_labels=3, n_epochs=1)
    holed = _with_nan(nap, 5, label=0, epoch=0)
    clean, found = (findings.class_map_findings(n, resolution=30) for n in (nap, holed))
    assert found["blob_count"] == clean["blob_count"]
    assert found["mean_correlation"] == pytest.approx(clean["mean_correlation"], abs=0.02)
    assert found["mean_blob_area"] == pytest.approx(clean["mean_blob_area"], rel=0.1)
    # the maps are those of the interpolator: NaN exactly at the pixels whose triangle
    # touches neuron 5, the NaN-free values everywhere else
    interp = GridInterpolator(nap.x.values, nap.y.values, resolution=30)
    touch = (interp.weights[:, [5]].toarray().ravel() != 0).reshape(interp.shape)
    maps = findings._maps(holed.isel(epoch=0), 30)
    ref = interp(nap.isel(epoch=0).transpose("label", "neuron").values)
    assert np.array_equal(np.isnan(maps[0]), np.isnan(ref[0]) | touch)
    np.testing.assert_array_equal(maps[0][~touch], ref[0][~touch])
    np.testing.assert_array_equal(maps[1:], ref[1:])


def test_error_findings_keep_a_map_with_a_nan_neuron():
    # the wrong pair whose map held one NaN neuron value was dropped from the pairs
    by_prediction, by_correct = _wrong_looking_like_predicted()
    clean = findings.error_findings(by_prediction, by_correct)
    # a NaN in the wrong pair (0 -> 1) and in the correct map of class 1
    holed = findings.error_findings(_with_nan(by_prediction, 7, group=3),
                                    _with_nan(by_correct, 11, group=1))
    assert [(p["label"], p["prediction"]) for p in holed["pairs"]] == \
        [(p["label"], p["prediction"]) for p in clean["pairs"]]
    assert holed["wrong_samples"] == clean["wrong_samples"] == 4
    assert holed["closer_to_predicted"] == pytest.approx(clean["closer_to_predicted"])
    assert holed["mean_r_true"] == pytest.approx(clean["mean_r_true"], abs=0.02)
    assert holed["mean_r_predicted"] == pytest.approx(clean["mean_r_predicted"], abs=0.02)


def test_bias_findings_keep_a_map_with_a_nan_neuron():
    # the class whose map held one NaN neuron value got a NaN effect
    groups = [(k, m) for k in range(3) for m in (True, False)]
    biased = _laid(groups, [CLASS[k] + (CLASS[3] if m else 0) for k, m in groups],
                   ["label", "marked"])
    control = _laid(groups, [CLASS[k] + 0.01 * CLASS[(k + 1) % 4] for k, m in groups],
                    ["label", "marked"])
    clean = findings.bias_findings(biased, control, attribute="marked")
    holed = findings.bias_findings(_with_nan(biased, 3, group=0), control, attribute="marked")
    assert set(holed["biased"]["effect"]) == {0, 1, 2}
    for k in range(3):
        assert holed["biased"]["effect"][k] == pytest.approx(clean["biased"]["effect"][k],
                                                             abs=0.02)
    assert holed["biased"]["mean_effect"] == pytest.approx(clean["biased"]["mean_effect"],
                                                           abs=0.01)


def test_training_findings_keep_a_map_with_a_nan_neuron():
    # the class map with one NaN neuron value left that epoch's comparison
    steps = [CLASS[3], 0.5 * CLASS[3] + CLASS[0], CLASS[0], CLASS[0], CLASS[0]]
    values = [np.stack([s * (1 + 0.001 * e) + (k * CLASS[1] if k else 0)
                        for e, s in enumerate(steps)], axis=-1) for k in range(2)]
    laid = _laid([(0,), (1,)], values, ["label"], epochs=5)
    clean = findings.training_findings(laid)
    holed = findings.training_findings(_with_nan(laid, 9, label=0, epoch=1))
    assert holed["settled_at"] == clean["settled_at"] == 2
    np.testing.assert_allclose(holed["change"], clean["change"], atol=0.02)
    np.testing.assert_allclose(holed["correlation_with_last"],
                               clean["correlation_with_last"], atol=0.02)


def test_findings_take_the_highest_epoch_as_the_last_whatever_the_order_held():
    """NAPs holding epochs as recorded, 0, 9, 3: the findings took epoch 3 as the last
    and walked the training in the order 0, 9, 3."""
    from topoxr.testing.maps import make_laid_naps

    nap = make_laid_naps(n_neurons=30, n_labels=3, n_epochs=3)
    held = nap.assign_coords(epoch=[0, 9, 3])  # position 1 holds epoch 9
    got = findings.class_map_findings(held, resolution=30)
    want = findings.class_map_findings(held.sel(epoch=9), resolution=30)
    assert got["mean_correlation"] == want["mean_correlation"]
    assert got["blob_count"] == want["blob_count"]
    walked = findings.training_findings(held, resolution=30)
    ordered = findings.training_findings(held.sortby("epoch"), resolution=30)
    assert walked["epochs"] == [0, 3, 9]
    assert walked == ordered
