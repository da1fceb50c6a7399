"""Many layouts in parallel with dask: every layer, epoch, method and seed of a store.

Records synthetic activations of two layers over four epochs, then lays out every
(layer, epoch, method, seed) combination in parallel, on the local threaded scheduler
or, with ``--cluster``, on a ``dask.distributed.LocalCluster`` (swap in
``Client("tcp://scheduler:8786")`` for a real cluster), and prints a quality table.
Run ``python examples/04_parallel_layouts.py --out /tmp/x [--cluster]``.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import topoxr
from topoxr.layouts import compute_layouts
from topoxr.metrics import quality
from topoxr.testing import make_activations


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="example-output", help="output folder")
    parser.add_argument("--cluster", action="store_true", help="use a 2-process LocalCluster")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    store = out / "parallel.zarr"
    shutil.rmtree(store, ignore_errors=True)
    with topoxr.ActivationWriter(store, model="net") as writer:
        for layer, n in [("layer1", 48), ("layer2", 24)]:
            act = make_activations(n_neurons=n, n_samples=120, n_epochs=4, n_labels=4,
                                   random_state=n)["activation"]
            for epoch in act.epoch.values:
                frame = act.sel(epoch=epoch)
                writer.write(layer, frame.values.T, sample=frame.sample.values,
                             label=frame.label.values, epoch=int(epoch))

    client = None
    if args.cluster:
        from dask.distributed import Client, LocalCluster

        cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True)
        client = Client(cluster)
    try:
        tree = topoxr.open_store(store)
        layouts = compute_layouts(tree, methods=["pca", "knnforce"], seeds=[0, 1],
                                  client=client, progress=False)
    finally:
        if client is not None:
            client.close()
            cluster.close()
    print(f"{'layer':<16}{'layout':<12}{'seed':>6}{'trustworthiness (last epoch)':>32}")
    for model, layer in [("net", "layer1"), ("net", "layer2")]:
        xy = layouts[f"{model}/{layer}"].to_dataset()
        acts = tree[f"{model}/{layer}"].to_dataset()
        last = acts.isel(epoch=[-1])
        for method in xy.layout.values:
            for seed in xy.seed.values:
                pick = xy.sel(layout=method, seed=seed).isel(epoch=[-1])
                laid = last.assign_coords(x=pick.x.transpose("neuron", "epoch"),
                                          y=pick.y.transpose("neuron", "epoch"))
                score = float(quality(laid).trustworthiness.values[-1])
                print(f"{layer:<16}{method:<12}{seed:>6}{score:>32.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
