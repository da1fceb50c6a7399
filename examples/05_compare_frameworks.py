"""Record the same networks in PyTorch and Keras into one store and compare them.

An MLP and a CNN are built in PyTorch, their weights copied into Keras twins with the
same layer names, and both are recorded on the same digits into ``<out>/compare.zarr``
as ``<net>_torch`` and ``<net>_keras``. The script prints the largest absolute difference
per layer and exits with status 1 if any exceeds ``--tol``.
Run ``python examples/05_compare_frameworks.py --out /tmp/x``.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

import topoxr  # noqa: E402
import topoxr_keras  # noqa: E402
import topoxr_torch  # noqa: E402
from topoxr_keras.models import copy_torch_weights_to_keras  # noqa: E402
from topoxr_keras.models import make_model as make_keras  # noqa: E402
from topoxr_torch.models import load_digits_data  # noqa: E402
from topoxr_torch.models import make_model as make_torch  # noqa: E402

LAYERS = {"mlp": ["fc1", "relu1", "fc2", "relu2", "out"],
          "cnn": ["conv1", "relu1", "pool1", "conv2", "relu2", "fc1", "relu3", "out"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="example-output", help="output folder")
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--tol", type=float, default=1e-5)
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    store = str(Path(args.out) / "compare.zarr")
    shutil.rmtree(store, ignore_errors=True)

    x, y = load_digits_data()
    x, y = x[: args.samples], y[: args.samples]
    for net, layers in LAYERS.items():
        torch_model = make_torch(net, seed=0)
        keras_model = make_keras(net)
        copy_torch_weights_to_keras(torch_model, keras_model)
        topoxr_torch.record(torch_model, (x, y), store, model_name=f"{net}_torch",
                            layers=layers, progress=False)
        topoxr_keras.record(keras_model, (x, y), store, model_name=f"{net}_keras",
                            layers=layers, progress=False)

    tree = topoxr.open_store(store)
    worst = 0.0
    for net, layers in LAYERS.items():
        for layer in layers:
            a = tree[f"{net}_torch/{layer}"].activation.values
            b = tree[f"{net}_keras/{layer}"].activation.values
            diff = float(np.abs(a - b).max())
            worst = max(worst, diff)
            print(f"{net:>4} {layer:<6} {a.shape[0]:>3} neurons  max |torch - keras| = {diff:.2e}")
    print(f"largest difference {worst:.2e} (tolerance {args.tol:.0e}), store {store}")
    return 0 if worst <= args.tol else 1


if __name__ == "__main__":
    raise SystemExit(main())
