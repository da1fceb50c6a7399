"""Record a small Keras 3 MLP on scikit-learn's digits with the ``RecordActivations`` callback.

The probe set (the first 500 digits) is recorded before training (epoch 0) and after
every epoch of ``model.fit``, into ``<out>/keras_mlp.zarr`` as the model ``mlp_keras``.
Works on any Keras backend (``KERAS_BACKEND=tensorflow`` or ``torch``).
Run ``python examples/03_keras_mlp_digits.py --out /tmp/x``.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import topoxr  # noqa: E402
import topoxr_keras  # noqa: E402
from topoxr_keras.models import load_digits_data, make_model, train  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="example-output", help="output folder")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--probe", type=int, default=500, help="samples in the probe set")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    store = str(Path(args.out) / "keras_mlp.zarr")
    shutil.rmtree(store, ignore_errors=True)  # a fresh run each time

    x, y = load_digits_data()
    model = make_model("mlp", seed=0)
    callback = topoxr_keras.RecordActivations(
        (x[: args.probe], y[: args.probe]), store, model_name="mlp_keras",
        layers=["fc1", "fc2", "out"],
    )
    train(model, x, y, epochs=args.epochs, seed=0, callbacks=[callback])

    ds = topoxr.open_store(store)["mlp_keras/fc2"].to_dataset().load()
    print(f"recorded {store}: layer fc2 {dict(ds.sizes)}")
    for epoch in ds.epoch.values:
        acc = float(ds.correct.sel(epoch=epoch).mean())
        print(f"  epoch {epoch}: probe accuracy {acc:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
