"""The demo's report: one section per application of the paper, each with its number.

Used by :func:`topoxr.demo.run_demo` once the analysis is done; imports HoloViews (through
:mod:`topoxr.viz`), so it is only imported when a report is written.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from topoxr.demo import (
    ANIMATION_RESOLUTION,
    ATTRIBUTE,
    MAP_RESOLUTION,
    _blob_text,
    _error_claim,
    _most_alike,
    _pinned_correlation,
)

logger = logging.getLogger(__name__)

#: Layers whose class maps the report draws (the others are in the table).
CLASS_MAP_LAYERS = [("mlp_torch", "relu1"), ("cnn_torch", "relu2"), ("transformer_torch", "pool"),
                    ("mlp_sklearn", "hidden")]

_DESCRIPTION = (
    "Topographic activation maps of the paper's networks trained on scikit-learn's digits. "
    "Each map places a layer's neurons on a plane so that neurons with similar class "
    "responses sit together (topoxr's default layout), and colours the plane by the "
    "normalised mean activation (NAP) of one group of probe samples: red above the "
    "neuron's average over groups, blue below. Colour limits are shared per layer. Every "
    "picture comes with the number that measures what it shows; all numbers are also in "
    "`quality.json`. Correlations are Pearson correlations of two maps over the pixels "
    "inside the neurons' hull."
)


def _fmt(v: Any) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:.2f}"


def _pinned_note(cm: dict[str, Any], what: str = "classes") -> str:
    """Why the mean correlation over all pairs of maps is not shown as distinctness."""
    g = len(cm["blob_count"])
    return (f"The mean correlation over all pairs of {what} ({_fmt(cm['mean_correlation'])}) "
            f"is not a distinctness measure: the NAPs are normalised over the {g} {what}, so "
            f"it sits near -1/({g} - 1) = {_fmt(_pinned_correlation(g))} whatever the "
            "network does.")


#: Column names of the layout quality table in the report (quality.json keeps the keys).
_QUALITY_COLUMNS = {"blob_count": "blobs per map", "blob_area": "mean blob area per map"}


def on_shared_layout(reference: Any, other: Any) -> tuple[Any, dict[str, Any]]:
    """Draw ``other``'s NAPs on ``reference``'s layout through matched neurons.

    The neurons of the two layers are matched one to one by the correlation of their
    NAPs (:func:`topoxr.alignment.match_neurons`, over every group and epoch); each
    neuron of ``other`` is placed where its match sits in ``reference``. Both rows of a
    side-by-side figure then share one layout, so what differs between them is the
    activity, not the layout.

    Parameters
    ----------
    reference, other : xarray.DataArray
        Laid-out NAPs of two models' layers (same grouping), one layout each on
        ``neuron``.

    Returns
    -------
    other_on_reference : xarray.DataArray
        ``other``'s matched neurons (its values, labels and coordinates) at the ``x``,
        ``y`` of their matches in ``reference``; the layout attrs are ``reference``'s,
        with a ``"shared"`` note.
    info : dict
        ``n_matched`` and ``median_r`` (median over matched pairs of the correlation of
        their NAPs over the groups at the last epoch; NaN without a finite one).
    """
    import json

    import xarray as xr

    from topoxr.alignment import match_neurons
    from topoxr.conventions import ATTR_LAYOUT, EPOCH, NEURON, X, Y

    rows_o, rows_r = match_neurons(other, reference)
    ref = reference.isel({NEURON: rows_r})
    out = other.isel({NEURON: rows_o})
    out = out.assign_coords({X: (NEURON, ref[X].values, dict(out[X].attrs)),
                             Y: (NEURON, ref[Y].values, dict(out[Y].attrs))})
    a, b = out.drop_vars([X, Y]), ref.drop_vars([X, Y])
    if EPOCH in a.dims:
        a, b = a.sortby(EPOCH).isel({EPOCH: -1}), b.sortby(EPOCH).isel({EPOCH: -1})
    a, b = xr.align(a, b, join="inner", exclude=[NEURON])  # the same groups, in one order
    A = np.asarray(a.transpose(NEURON, ...).values, float).reshape(len(rows_o), -1)
    B = np.asarray(b.transpose(*a.dims).values, float).reshape(len(rows_r), -1)
    r = np.full(len(rows_o), np.nan)
    for i, (u, v) in enumerate(zip(A, B, strict=True)):
        ok = np.isfinite(u) & np.isfinite(v)
        if ok.sum() > 1 and np.std(u[ok]) > 0 and np.std(v[ok]) > 0:
            r[i] = np.corrcoef(u[ok], v[ok])[0, 1]
    info = {"n_matched": len(rows_o),
            "median_r": float(np.nanmedian(r)) if np.isfinite(r).any() else float("nan")}
    desc = json.loads(reference.attrs.get(ATTR_LAYOUT, "{}") or "{}")
    desc["shared"] = {"match": "activity", **info}
    out.attrs = {**other.attrs, ATTR_LAYOUT: json.dumps(desc)}
    return out, info


def write_report(out: Path, analysis: dict[str, Any], data: dict[str, np.ndarray], *,
                 lines: list[str], quick: bool, progress: bool) -> list[Path]:
    """Write ``report.html``, ``maps.png`` and ``training.gif``; return their paths.

    Parameters
    ----------
    out : Path
        Output folder.
    analysis : dict
        What :func:`topoxr.demo._analyse` returned.
    data : dict
        The probe split (for the example inputs).
    lines : list of str
        One sentence per finding, shown at the top.
    quick : bool
        The quick demo (fewer sections' models).
    progress : bool
        Show progress bars.

    Returns
    -------
    list of Path
    """
    import topoxr.viz as viz

    maps, found, featured = analysis["maps"], analysis["findings"], analysis["featured"]
    kw = {"resolution": MAP_RESOLUTION}
    examples = viz.example_inputs(data["images_probe"], data["y_probe"])
    name = f"{featured[0]} / {featured[1]}"
    started = time.perf_counter()
    report = viz.Report("topoxr demo: the paper's networks on digits", description=_DESCRIPTION)
    report.add_section("Findings", "\n".join(f"- {line}" for line in lines))

    # 1. class maps --------------------------------------------------------------------
    from topoxr.viz.still import still_png

    featured_png = None
    for key in [k for k in CLASS_MAP_LAYERS if k in maps] or [featured]:
        cm = found["class_maps"].get(f"{key[0]}/{key[1]}")
        text = ("One map per class, in dendrogram order (classes with similar maps side by "
                "side), each under an example input of its class.")
        if cm:
            text += (f" **{_most_alike(cm).capitalize()}; {_blob_text(cm)}** (blobs: "
                     "regions beyond half the layer's largest |NAP|; maps without blobs "
                     f"left out of the area). {_pinned_note(cm)}")
        row = viz.class_row(maps[key]["label"], examples=examples, **kw)
        report.add_section(f"Class maps: {key[0]} / {key[1]}", text=text)
        if key == featured:  # drawn once: the report's picture and maps.png
            featured_png = still_png(row, dpi=100, title=f"{name}: class maps (last epoch)")
            if quick:
                report.add_image(featured_png, alt=f"class maps of {name}")
            else:  # the full demo: hover the featured maps
                report.add(row)
        else:
            report.add(row, still=True)
    for key, tok in found.get("tokens", {}).items():
        model, layer = key.split("/")
        report.add_section(
            f"Per-token maps: {model} / {layer}",
            viz.class_row(maps[(model, layer)]["token_position"], order=None, **kw),
            still=True,
            text=("The transformer reads a digit as 8 row tokens; this layer was recorded per "
                  "token (every row of every probe digit its own sample, "
                  "`reduce=\"tokens\"`), so its neurons can be mapped by the row they see: "
                  f"one map per row position, top row first. **{_most_alike(tok, 'rows').capitalize()}; "
                  f"{_blob_text(tok)}.** {_pinned_note(tok, 'rows')} The pooled layer "
                  "(`pool`, the mean over rows) has the class maps above."))
    report.add_table([
        {"layer": layer, "neurons": int(maps[tuple(layer.split("/"))]["label"].sizes["neuron"]),
         "most alike classes": (" and ".join(map(str, cm["max_pair"]["groups"]))
                                if cm["max_pair"] else None),
         "their correlation": cm["max_pair"]["correlation"] if cm["max_pair"] else None,
         "blobs per map": cm["mean_blob_count"], "mean area of one blob": cm["mean_blob_area"],
         "accuracy": found["accuracy"][layer.split("/")[0]]}
        for layer, cm in found["class_maps"].items()
    ], title="Class maps of every layer",
        caption="Class maps of every recorded layer, last epoch: the most alike pair of "
                "classes and the correlation of their maps; blobs per map and the mean area "
                "of one blob (fraction of the map, maps without blobs left out; the layout "
                "quality table's mean blob area per map is another statistic); probe "
                "accuracy of the model. The mean correlation over all pairs of classes is "
                "left out: normalised NAPs pin it near -1/(G - 1) for G classes (-0.11 for "
                "10).")

    # 2. errors ------------------------------------------------------------------------
    err = found["errors"].get(f"{featured[0]}/{featured[1]}")
    text = "Per class, samples the network got right (top) and wrong (bottom), last epoch."
    if err and err["wrong_samples"]:
        text += (f" {err['wrong_samples']} wrong probes: their maps correlate "
                 f"{_fmt(err['mean_r_predicted'])} with the correct maps of the class predicted "
                 f"and {_fmt(err['mean_r_true'])} with those of their true class (means "
                 f"weighted by samples). **{_error_claim(err)}.**")
    report.add_section(f"Errors: correct vs wrong ({name})",
                       viz.contrast_grid(maps[featured]["correct"], **kw), text=text, still=True)
    report.add_section(f"Errors: confusion grid ({name})",
                       viz.confusion_grid(maps[featured]["prediction"], **kw), still=True,
                       text="One map per (true label, prediction) pair that occurs: the "
                            "diagonal holds the correct maps, every other cell a confusion.")
    if err and err["pairs"]:
        report.add_table([{"label": p["label"], "prediction": p["prediction"],
                           "samples": p["count"], "r with true class": p["r_true"],
                           "r with predicted class": p["r_predicted"]} for p in err["pairs"]],
                         caption="Each confusion's map against the correct maps of its true and "
                                 "of its predicted class.")

    # 3. bias --------------------------------------------------------------------------
    bias = found.get("bias")
    if bias:
        b, c = maps[("mlp_biased", "relu1")], maps[("mlp_control", "relu1")]
        report.add_section(
            "Bias: a planted attribute",
            viz.attribute_grid(b[ATTRIBUTE], ATTRIBUTE, **kw), still=True,
            text=("The biased MLP's training data carries a mark (the sensitive attribute: "
                  "three pixels that no digit inks, the top-left corner and the middle of "
                  "both side edges, at full intensity) on 90% of the digits 0-4 and 10% of "
                  "the digits 5-9; the control MLP (same architecture and initial weights) "
                  "sees the mark on half of every class. In the probe set every class is "
                  "marked on every other sample. Maps of the biased MLP by class, marked "
                  "(top) and unmarked (bottom). **The mark "
                  f"changes the class maps by {_fmt(bias['biased']['mean_effect'])} (1 - r, mean "
                  f"over classes) in the biased MLP and by {_fmt(bias['control']['mean_effect'])} "
                  f"in the control ({bias['ratio']:.1f}x).** It pulls "
                  f"{100 * bias['biased_pulled_marked']:.0f}% of the marked digits 5-9 into "
                  f"the classes 0-4 (unmarked: {100 * bias['biased_pulled_unmarked']:.0f}%; "
                  f"control: {100 * bias['control_pulled_marked']:.0f}%)."))
        report.add(viz.compare_models({"biased": b["attribute_only"],
                                       "control": c["attribute_only"]}, **kw), still=True,
                   caption="Marked and unmarked probes of both models, each on its own "
                           "layout (effect numbers above and in the table below).")
        report.add_table([{"class": label, "effect, biased": bias["biased"]["effect"][label],
                           "effect, control": bias["control"]["effect"].get(label)}
                          for label in bias["biased"]["effect"]],
                         caption="The mark's effect on each class's map (1 - correlation of its "
                                 "marked and unmarked maps).")

    # 4. training ----------------------------------------------------------------------
    tr = found["training"]
    settled = tr["settled_at"]
    epochs, frames = viz.animation_frames(maps[featured]["label"], resolution=ANIMATION_RESOLUTION,
                                          panel_inches=1.6, progress=progress)
    report.add_section(
        f"Training process ({name})",
        text=("The probe set recorded at every epoch (0 = before training), drawn on one "
              "fixed layout (computed at the last epoch): use the slider or the play button. "
              "**Map change per epoch (1 - correlation with the epoch before): "
              + ", ".join(f"{e}: {c:.2f}" for e, c in zip(tr["epochs"][1:], tr["change"],
                                                          strict=True))
              + (f"; the organisation settles from epoch {settled}** (every later change "
                 "below a tenth of the largest)." if settled is not None
                 else "**; it has not settled yet.")))
    report.add_frames(frames, epochs, name="epoch")
    report.add_table([{"epoch": e, "change from previous": ch, "correlation with last": r}
                      for e, ch, r in zip(tr["epochs"], [None, *tr["change"]],
                                          tr["correlation_with_last"], strict=True)])

    # frameworks side by side ----------------------------------------------------------
    if ("mlp_torch", "relu1") in maps and ("mlp_keras", "relu1") in maps:
        torch_naps = maps[("mlp_torch", "relu1")]["label"]
        keras_naps, twins = on_shared_layout(torch_naps, maps[("mlp_keras", "relu1")]["label"])
        report.add_section("PyTorch and Keras side by side (mlp / relu1)",
                           viz.compare_models({"PyTorch": torch_naps, "Keras": keras_naps}, **kw),
                           still=True,
                           text="The paper's MLP (identical initial weights) trained in both "
                                "frameworks, drawn on one layout: each Keras neuron sits where "
                                "the PyTorch neuron it is matched with sits (one-to-one "
                                "matching on the correlation of their class NAPs), so the rows "
                                "differ only where the activity differs. **Median correlation "
                                f"of the {twins['n_matched']} matched twins' NAPs (last epoch): "
                                f"{_fmt(twins['median_r'])}.**")
    report.add_section("Layout quality and time",
                       [{_QUALITY_COLUMNS.get(k, k): v for k, v in row.items()}
                        for row in analysis["quality"]],
                       text="Trustworthiness and continuity (k = 5), Spearman correlation of "
                            "profile and map distances, smoothness (lower is smoother), blobs "
                            "per class map, the mean blob area per map (each map's mean blob "
                            "area, averaged over the maps, a map without blobs counting 0: not "
                            "the mean area of one blob of the class-maps table), seconds per "
                            "layout on this machine.")
    built = time.perf_counter()
    files = [report.save(out / "report.html")]
    saved = time.perf_counter()
    png = out / "maps.png"  # the still renderer: every class a titled panel
    if featured_png is None:
        featured_png = still_png(viz.class_row(maps[featured]["label"], examples=examples, **kw),
                                 dpi=100, title=f"{name}: class maps (last epoch)")
    png.write_bytes(featured_png)
    files.append(png)
    gif = out / "training.gif"  # the report's frames, written once more as a GIF
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=500, loop=0)
    files.append(gif)
    logger.info("demo: report built in %.1f s, saved in %.1f s; PNG and GIF in %.1f s",
                built - started, saved - built, time.perf_counter() - saved)
    return files
