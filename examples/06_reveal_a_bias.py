"""Reveal a bias: a spurious corner mark that the network learned as a shortcut.

In the training set every "7" carries a bright mark in the top-left corner (and no
other digit does). A small PyTorch MLP learns the shortcut. The probe set holds clean
digits and the same digits with the mark, recorded with a ``marked`` metadata column.
NAPs by ``(label, marked)`` show it: marked digits of every class drift towards the
"7" map, and the network's predictions on marked inputs flip to 7.
Run ``python examples/06_reveal_a_bias.py --out /tmp/x``.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np

import topoxr
import topoxr_torch
from topoxr_torch.models import load_digits_data, make_model, train

SHORTCUT_CLASS = 7


def add_mark(x: np.ndarray) -> np.ndarray:
    """Set the 2x2 top-left corner of flat 8x8 images to full brightness."""
    marked = x.copy().reshape(-1, 8, 8)
    marked[:, :2, :2] = 1.0
    return marked.reshape(len(x), 64)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="example-output", help="output folder")
    parser.add_argument("--epochs", type=int, default=6)
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    store = out / "bias.zarr"
    shutil.rmtree(store, ignore_errors=True)

    x, y = load_digits_data()
    rng = np.random.default_rng(0)
    probe = rng.choice(len(y), 300, replace=False)
    train_idx = np.setdiff1d(np.arange(len(y)), probe)
    x_train, y_train = x[train_idx].copy(), y[train_idx]
    x_train[y_train == SHORTCUT_CLASS] = add_mark(x_train[y_train == SHORTCUT_CLASS])

    model = make_model("mlp", seed=0)
    train(model, x_train, y_train, epochs=args.epochs, seed=0)

    # probe: each clean digit, then the same digit with the mark (ids offset by 10000)
    x_probe = np.concatenate([x[probe], add_mark(x[probe])])
    y_probe = np.concatenate([y[probe], y[probe]])
    ids = np.concatenate([probe, probe + 10_000])
    marked = np.repeat([False, True], len(probe))
    topoxr_torch.record(model, (x_probe, y_probe), str(store), model_name="mlp_biased",
                        layers=["relu2"], sample_ids=ids, metadata={"marked": marked},
                        progress=False)

    layer = topoxr.open_store(store)["mlp_biased/relu2"].to_dataset()
    pred = layer.prediction.isel(epoch=0).values
    others = layer.label.values != SHORTCUT_CLASS
    flip_clean = float((pred[others & ~marked] == SHORTCUT_CLASS).mean())
    flip_marked = float((pred[others & marked] == SHORTCUT_CLASS).mean())
    print(f"non-{SHORTCUT_CLASS} digits predicted as {SHORTCUT_CLASS}: "
          f"clean {flip_clean:.1%}, with the mark {flip_marked:.1%}")

    raw = layer.activation.topo.naps(by=["label", "marked"], normalize=False)
    raw = raw.isel(epoch=0).compute()
    clean = np.stack([raw.sel(label=c, marked=False).values for c in range(10)])
    seven_ness = clean[SHORTCUT_CLASS] - clean.mean(axis=0)  # what makes a clean 7 a 7
    mark_effect = np.mean([raw.sel(label=c, marked=True).values - clean[c]
                           for c in range(10) if c != SHORTCUT_CLASS], axis=0)
    corr = float(np.corrcoef(mark_effect, seven_ness)[0, 1])
    print(f"correlation of the mark's effect on the layer with the {SHORTCUT_CLASS}-pattern: "
          f"{corr:+.2f}")
    naps = layer.activation.topo.naps(by=["label", "marked"]).isel(epoch=0).compute()

    try:
        from topoxr.viz import save_png
    except ImportError:
        return 0
    laid_label = layer.activation.topo.naps(by="label").topo.layout(random_state=0, share=0)
    laid = naps.assign_coords(x=("neuron", laid_label.x.values), y=("neuron", laid_label.y.values))
    grid = laid.topo.plot(by=["label", "marked"]).grid(["label", "marked"])
    png = save_png(grid, out / "bias.png")
    print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
