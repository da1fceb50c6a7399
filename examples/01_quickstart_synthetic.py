"""Quick start without a deep-learning framework: synthetic activations to a map.

Writes synthetic activations with planted class-selective neurons into a Zarr store,
computes NAPs by label, lays the neurons out with the default method, scores the layout
and saves a PNG of the class maps. Run ``python examples/01_quickstart_synthetic.py --out /tmp/x``.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import topoxr
from topoxr.testing import make_activations


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="example-output", help="output folder")
    parser.add_argument("--neurons", type=int, default=64)
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    store = out / "synthetic.zarr"
    shutil.rmtree(store, ignore_errors=True)

    # 1. record: any code that yields numpy batches can write a store
    act = make_activations(n_neurons=args.neurons, n_samples=200, n_epochs=2, n_labels=5,
                           random_state=0)["activation"]
    with topoxr.ActivationWriter(store, model="synthetic") as writer:
        for epoch in act.epoch.values:
            frame = act.sel(epoch=epoch)
            for start in range(0, frame.sizes["sample"], 50):  # stream in batches
                batch = frame.isel(sample=slice(start, start + 50))
                writer.write("layer1", batch.values.T, sample=batch.sample.values,
                             label=batch.label.values, epoch=int(epoch))

    # 2. analyse: lazy, dask-backed; .topo is registered by `import topoxr`
    layer = topoxr.open_store(store)["synthetic/layer1"].to_dataset()
    naps = layer.activation.topo.naps(by="label")
    laid = naps.topo.layout(random_state=0, share=int(naps.epoch[-1]))
    scores = laid.topo.quality()
    print(f"trustworthiness {float(scores.trustworthiness[-1]):.3f}, "
          f"smoothness {float(scores.smoothness[-1]):.3f}")

    # 3. draw (needs the [viz] extra)
    from topoxr.viz import save_png

    png = save_png(laid.isel(epoch=-1).topo.plot(by="label"), out / "quickstart.png")
    print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
