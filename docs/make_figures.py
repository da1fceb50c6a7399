"""Make the pictures of docs/user-guide/topomaps.md from real code on real data.

Trains scikit-learn's MLP on the digits shipped with scikit-learn (the demo's recorder),
computes NAPs and one fixed layout, and saves small PNGs and a GIF into ``docs/_static``::

    .venv/bin/python docs/make_figures.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

STATIC = Path(__file__).parent / "_static"


def main() -> None:
    from sklearn.datasets import load_digits

    import topoxr
    import topoxr.viz as viz
    from topoxr.demo import digits_probe, record_sklearn_mlp
    from topoxr.layouts import attach
    from topoxr.grouping import naps

    STATIC.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "digits.zarr"
        data = digits_probe(seed=0)
        record_sklearn_mlp(store, data, epochs=4, hidden=64, seed=0, progress=False)
        layer = topoxr.open_store(str(store))["mlp_sklearn/hidden"].to_dataset()
        by_label = naps(layer, by="label").compute()
        last = int(by_label.epoch[-1])
        laid = attach(by_label, "pca", random_state=0, share=last)
        xy = {"x": laid["x"].variable, "y": laid["y"].variable}
        contrast = naps(layer, by=["label", "correct"]).compute().assign_coords(xy)

        digits = load_digits()
        examples = viz.example_inputs(digits.images, digits.target)

        row = viz.class_row(laid, examples=examples, resolution=80)
        viz.save_png(row, STATIC / "topomap_class_row.png", dpi=60)
        single = viz.topomap(laid.sel(label=0, epoch=last), contours=5, resolution=80)
        viz.save_png(single, STATIC / "topomap_single.png", dpi=70)
        viz.save_png(viz.contrast_grid(contrast, resolution=60),
                     STATIC / "topomap_contrast.png", dpi=50)
        box = viz.topomap(laid.sel(label=0, epoch=last), extrapolate="box", resolution=80)
        viz.save_png(box, STATIC / "topomap_box.png", dpi=70)
        viz.save_gif(laid.sel(label=[0, 1, 3, 7]), STATIC / "topomap_training.gif", fps=2,
                     resolution=60, dpi=50, progress=False)
    for f in sorted(STATIC.glob("topomap_*")):
        print(f"{f.name}: {f.stat().st_size / 1e3:.0f} kB")
    assert np.isfinite(laid.values).any()


if __name__ == "__main__":
    main()
