"""Make the pictures of docs/concepts.md from real code on real data.

Trains scikit-learn's MLP on the digits shipped with scikit-learn (the demo's recorder),
records its hidden layer into a Zarr store, and draws with matplotlib what topoxr computes:
the activations, the NAPs, maps under three layouts with their quality, and the alignment
of two independent layouts. Writes ``docs/_static/concepts_*.png``::

    .venv/bin/python docs/make_concept_figures.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

STATIC = Path(__file__).parent / "_static"
CMAP = "RdBu_r"


def _map(ax, laid, values, vmax, title):  # noqa: ANN001
    """Draw one interpolated map (hull mask, symmetric limits) with the neurons on top."""
    from topoxr.interpolate import GridInterpolator

    x, y = laid["x"].values, laid["y"].values
    grid = GridInterpolator(x, y, resolution=80)
    img = grid(np.asarray(values)[None, :])[0]
    ax.imshow(img, origin="lower", cmap=CMAP, vmin=-vmax, vmax=vmax,
              extent=(grid.xs[0], grid.xs[-1], grid.ys[0], grid.ys[-1]))
    ax.scatter(x, y, s=4, c="k", linewidths=0)
    ax.set_title(title, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_aspect("equal")


def _layout_benchmark(plt) -> None:  # noqa: ANN001
    """Plot seconds against trustworthiness per layout method from the layouts benchmark.

    Uses ``benchmarks/results/layouts.json`` (the full run) if present, else the quick run.
    """
    import json

    results = Path(__file__).parents[1] / "benchmarks" / "results"
    path = next((p for p in (results / "layouts.json", results / "layouts-partial.json",
                             results / "layouts-quick.json") if p.is_file()), None)
    if path is None:
        return
    bench = json.loads(path.read_text())
    all_rows = bench["result"]["rows"] if "result" in bench else bench["rows"]
    rows = [r for r in all_rows if r["data"] == "digits_mlp_naps" and "seconds" in r]
    sizes = sorted({r["n"] for r in rows})
    kind = ("partial run" if "result" not in bench
            else "quick run" if bench.get("quick") else "full run")
    for name, ykey, ylabel in (("concepts_layout_benchmark.png", "seconds", "seconds (log)"),
                               ("layouts_smoothness_trust.png", "smoothness",
                                "smoothness (lower is smoother)")):
        fig, axes = plt.subplots(1, len(sizes), figsize=(4.2 * len(sizes), 3.6),
                                 squeeze=False, layout="constrained")
        for ax, n in zip(axes[0], sizes, strict=True):
            for r in (r for r in rows if r["n"] == n):
                default = r["method"] == "knnforce"
                paper = r["method"] in ("umap+force", "force", "som", "graph", "random",
                                        "reference:force")
                xy = (r["trustworthiness"], max(r[ykey], 1e-3))
                ax.scatter(*xy, s=40 if default else 18,
                           c="C3" if default else ("C0" if paper else "C7"), zorder=3)
                ax.annotate(r["method"], xy, fontsize=6, xytext=(3, 2),
                            textcoords="offset points")
            if ykey == "seconds":
                ax.set_yscale("log")
            ax.set_xlabel("trustworthiness (k = 10, cosine)")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{n} neurons (MLP on digits, class NAPs)")
            ax.grid(alpha=0.3)
        fig.suptitle(f"Layout methods: trustworthiness vs {ykey} ({path.name}, {kind}); "
                     "red: default, blue: the paper's", fontsize=8)
        fig.savefig(STATIC / name, dpi=80)
        plt.close(fig)


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import topoxr
    from topoxr.alignment import align
    from topoxr.demo import digits_probe, record_sklearn_mlp
    from topoxr.layouts import attach
    from topoxr.grouping import naps
    from topoxr.metrics import quality

    STATIC.mkdir(exist_ok=True)
    plt.rcParams.update({"font.size": 8})
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "digits.zarr"
        data = digits_probe(seed=0)
        record_sklearn_mlp(store, data, epochs=4, hidden=64, seed=0, progress=False)
        record_sklearn_mlp(store, data, epochs=4, hidden=64, seed=1, progress=False,
                           model_name="mlp_b")
        tree = topoxr.open_store(str(store))
        layer = tree["mlp_sklearn/hidden"].to_dataset().compute()
        layer_b = tree["mlp_b/hidden"].to_dataset().compute()
    last = int(layer.epoch[-1])
    act = layer.activation.sel(epoch=last)
    nap = naps(layer, by="label").sel(epoch=last).compute()

    # 1. From activations to NAPs ------------------------------------------------------
    order = np.argsort(act.label.values, kind="stable")
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.0), gridspec_kw={"width_ratios": [3, 1.2]})
    a = act.values[:, order]
    axes[0].imshow(a, aspect="auto", cmap="viridis", interpolation="nearest")
    axes[0].set_xlabel("probe sample (sorted by label)")
    axes[0].set_ylabel("neuron")
    axes[0].set_title("activations of one layer at one epoch (neuron x sample)")
    bounds = np.flatnonzero(np.diff(act.label.values[order])) + 0.5
    for b in bounds:
        axes[0].axvline(b, color="w", lw=0.5)
    v = float(np.abs(nap).max())
    axes[1].imshow(nap.transpose("neuron", "label").values, aspect="auto", cmap=CMAP,
                   vmin=-v, vmax=v, interpolation="nearest")
    axes[1].set_xticks(range(nap.sizes["label"]), nap.label.values)
    axes[1].set_xlabel("label")
    axes[1].set_title("NAPs: mean per label,\nminus the mean over labels")
    axes[1].set_yticks([])
    fig.tight_layout()
    fig.savefig(STATIC / "concepts_naps.png", dpi=80)
    plt.close(fig)

    # 2. The same NAPs under three layouts, with their quality --------------------------
    methods = ["random", "pca", "knnforce"]
    laid = {m: attach(nap, m, random_state=0) for m in methods}
    qual = {m: quality(laid[m]) for m in methods}
    labels = [0, 3, 7]
    fig, axes = plt.subplots(len(methods), len(labels), figsize=(5.4, 5.8))
    for i, m in enumerate(methods):
        q = qual[m]
        for j, lab in enumerate(labels):
            title = f"digit {lab}"
            _map(axes[i, j], laid[m], nap.sel(label=lab).values, v, title)
        axes[i, 0].set_ylabel(f"{m}\ntrust {float(q.trustworthiness):.2f}\n"
                              f"smooth {float(q.smoothness):.2f}", fontsize=8)
    fig.suptitle("one layer's NAPs under three layouts (rows)", fontsize=9)
    fig.tight_layout()
    fig.savefig(STATIC / "concepts_layouts.png", dpi=75)
    plt.close(fig)

    # 3. Alignment: the same layer of a second network (another seed) -----------------
    nap_b = naps(layer_b, by="label").sel(epoch=last).compute()
    ref = attach(nap, "tsne", random_state=0)
    own = attach(nap_b, "tsne", random_state=0)
    aligned = align(own, ref, match="activity")  # neurons matched by their NAPs

    def preferred(n):  # noqa: ANN001, ANN202
        pref = n.argmax("label").values.astype(float)  # each neuron's preferred digit
        pref[np.abs(n).max("label").values == 0] = np.nan  # dead neurons: no preference
        return pref

    fig, axes = plt.subplots(1, 3, figsize=(8.5, 3.0), layout="constrained")
    panels = [(ref, nap, "network A"), (own, nap_b, "network B: own layout"),
              (aligned, nap_b, "network B: aligned onto A")]
    for ax, (obj, values, title) in zip(axes, panels, strict=True):
        pref = preferred(values)
        ax.scatter(obj["x"], obj["y"], c="0.8", s=14)  # dead neurons stay grey
        sc = ax.scatter(obj["x"], obj["y"], c=pref, cmap="tab10", vmin=-0.5, vmax=9.5, s=14,
                        plotnonfinite=False)
        ax.set_title(title)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_aspect("equal")
    fig.colorbar(sc, ax=axes, ticks=range(10), label="preferred digit (grey: dead)",
                 shrink=0.8)
    fig.savefig(STATIC / "concepts_align.png", dpi=80)
    plt.close(fig)

    _layout_benchmark(plt)
    for f in sorted(STATIC.glob("concepts_*.png")):
        print(f"{f.name}: {f.stat().st_size / 1e3:.0f} kB")
        assert f.stat().st_size < 150_000, f"{f.name} is over 150 kB"
    for m in methods:
        print(m, {k: round(float(qual[m][k]), 3) for k in ("trustworthiness", "continuity",
                                                          "spearman", "smoothness")})


if __name__ == "__main__":
    main()
