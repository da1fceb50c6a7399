"""Record a small PyTorch MLP on scikit-learn's digits, once per training epoch.

The probe set (the first 500 digits) is recorded before training (epoch 0) and after
every epoch, into ``<out>/torch_mlp.zarr`` as the model ``mlp_torch``, with the loss
and accuracy of each epoch. Run ``python examples/02_torch_mlp_digits.py --out /tmp/x``.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

import topoxr
import topoxr_torch
from topoxr_torch.models import load_digits_data, make_model, train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="example-output", help="output folder")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--probe", type=int, default=500, help="samples in the probe set")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    store = str(Path(args.out) / "torch_mlp.zarr")
    shutil.rmtree(store, ignore_errors=True)  # a fresh run each time

    x, y = load_digits_data()
    model = make_model("mlp", seed=0)
    probe = topoxr_torch.ProbeRecorder(
        model, (x[: args.probe], y[: args.probe]), store, model_name="mlp_torch",
        layers=["fc1", "fc2", "out"],
    )
    probe.record(0)  # before training
    train(model, x, y, epochs=args.epochs, seed=0,
          on_epoch_end=lambda epoch, logs: probe.record(epoch, **logs))

    ds = topoxr.open_store(store)["mlp_torch/fc2"].to_dataset().load()
    print(f"recorded {store}: layer fc2 {dict(ds.sizes)}")
    for epoch in ds.epoch.values:
        acc = float(ds.correct.sel(epoch=epoch).mean())
        print(f"  epoch {epoch}: probe accuracy {acc:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
