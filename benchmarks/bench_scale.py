"""Larger than memory: record a store far bigger than the process's memory, then analyse it.

Step 1 (``record``): a child process writes a layer of 1024 neurons for a probe set of
32768 samples over as many epochs as make 8 GB (quick: 512 neurons x 16384 samples,
about 300 MB) through :class:`topoxr.ActivationWriter`, batch by batch.
Step 2 (``read_all``): a child opens the store and sums every value (the reader alone).
Step 3 (``naps``): another child opens the store lazily and computes the neuron
activation patterns by label for every epoch (:func:`topoxr.grouping.naps`, one out-of-core
dask pass), then checks one epoch against an in-memory numpy computation.

Each step reports wall time, throughput and the child's peak RSS (the kernel's maximum
resident set of the child at the end of the step; psutil samples every 20 ms of the
whole child, numpy check included, are reported beside it).  Free disk is checked first; the data is deleted afterwards.
Run ``python -m benchmarks scale [--quick]``.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from benchmarks._child import run_sampled

SCRATCH = Path(__file__).parent / "scratch"
ROOT = Path(__file__).parent.parent
MB = 1 << 20
N_LABELS = 10

_RECORD = """
import sys, time, json
import numpy as np, psutil
sys.path.insert(0, {root!r})
from topoxr import ActivationWriter
n_neurons, n_samples, epochs, batch = {n_neurons}, {n_samples}, {epochs}, {batch}
rng = np.random.default_rng(0)
# a pool of batches reused with an epoch offset: generating data is not what we time
pool = [np.round(rng.normal(size=(batch, n_neurons)) * 64).astype(np.float32) / 64
        for _ in range(8)]
rss0 = psutil.Process().memory_info().rss
t = time.perf_counter()
with ActivationWriter({path!r}, model="big", mode="w") as w:
    k = 0
    for epoch in range(epochs):
        for start in range(0, n_samples, batch):
            ids = np.arange(start, start + batch)
            w.write("layer", pool[k % len(pool)] + np.float32(0.01 * epoch), sample=ids,
                    label=ids % {n_labels}, epoch=epoch)
            k += 1
print(json.dumps({{"seconds": time.perf_counter() - t, "rss_after_imports": rss0}}))
"""

_READ = """
import sys, time, json, resource
import numpy as np, psutil
sys.path.insert(0, {root!r})
from topoxr import open_store
rss0 = psutil.Process().memory_info().rss
t = time.perf_counter()
ds = open_store({path!r})["big/layer"].to_dataset()
total = float(ds.activation.sum(dtype="float64").compute())
seconds = time.perf_counter() - t
print(json.dumps({{"seconds": seconds, "rss_after_imports": rss0, "total": total,
                   "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}}))
"""

_NAPS = """
import sys, time, json, resource
import numpy as np, psutil, dask
sys.path.insert(0, {root!r})
from topoxr import open_store
from topoxr.grouping import naps
rss0 = psutil.Process().memory_info().rss
t = time.perf_counter()
ds = open_store({path!r})["big/layer"].to_dataset()
nap = naps(ds, by="label", normalize=False).compute()
seconds = time.perf_counter() - t
peak_naps = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
# check one epoch against plain numpy on that epoch alone
e = ds.sizes["epoch"] // 2
one = ds.activation.isel(epoch=e).values
labels = ds.label.values
want = np.stack([one[:, labels == g].mean(axis=1) for g in range(nap.sizes["label"])], axis=1)
err = float(np.abs(nap.isel(epoch=e).values - want).max())
print(json.dumps({{"seconds": seconds, "rss_after_imports": rss0, "max_abs_error": err,
                   "peak_rss_naps": peak_naps,
                   "nap_shape": list(nap.shape), "threads": dask.system.CPU_COUNT}}))
"""


def main(quick: bool = False) -> dict:
    """Record then analyse; ``quick`` uses about 300 MB instead of 8 GB."""
    import psutil

    n_neurons, n_samples, batch = (512, 16384, 512) if quick else (1024, 32768, 512)
    target = (300 if quick else 8192) * MB
    epochs = max(2, round(target / (n_neurons * n_samples * 4)))
    size = n_neurons * n_samples * epochs * 4
    SCRATCH.mkdir(exist_ok=True)
    free = shutil.disk_usage(SCRATCH).free
    if free < size + 2 * 1024 * MB:
        raise RuntimeError(f"needs {size / MB:.0f} MB + 2 GB free disk in {SCRATCH}, "
                           f"has {free / MB:.0f} MB")
    path = str(SCRATCH / "scale.zarr")
    fmt = dict(root=str(ROOT), path=path, n_neurons=n_neurons, n_samples=n_samples,
               epochs=epochs, batch=batch, n_labels=N_LABELS)
    try:
        rec, rec_peak = run_sampled(_RECORD.format(**fmt))
        on_disk = sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
        read, _ = run_sampled(_READ.format(**fmt))
        ana, ana_peak = run_sampled(_NAPS.format(**fmt))
    finally:
        shutil.rmtree(path, ignore_errors=True)
    total_memory = psutil.virtual_memory().total
    return {
        "store": {"neurons": n_neurons, "samples": n_samples, "epochs": epochs,
                  "batch": batch, "bytes": size, "bytes_on_disk": on_disk,
                  "machine_memory_mb": round(total_memory / MB)},
        "record": {
            "seconds": round(rec["seconds"], 2),
            "throughput_mb_s": round(size / MB / rec["seconds"], 1),
            "peak_rss_mb": round(rec_peak / MB, 1),
            "rss_after_imports_mb": round(rec["rss_after_imports"] / MB, 1),
            "store_over_peak_rss": round(size / rec_peak, 1),
        },
        "read_all": {
            "what": "open_store + sum of every activation (one dask pass)",
            "seconds": round(read["seconds"], 2),
            "throughput_mb_s": round(size / MB / read["seconds"], 1),
            "peak_rss_mb": round(read["peak_rss"] / MB, 1),
            "rss_after_imports_mb": round(read["rss_after_imports"] / MB, 1),
            "store_over_peak_rss": round(size / read["peak_rss"], 1),
        },
        "naps_by_label": {
            "seconds": round(ana["seconds"], 2),
            "throughput_mb_s": round(size / MB / ana["seconds"], 1),
            "peak_rss_mb": round(ana["peak_rss_naps"] / MB, 1),
            "peak_rss_with_numpy_check_mb": round(ana_peak / MB, 1),
            "rss_after_imports_mb": round(ana["rss_after_imports"] / MB, 1),
            "store_over_peak_rss": round(size / ana["peak_rss_naps"], 1),
            "dask_threads": ana["threads"],
            "nap_shape": ana["nap_shape"],
            "max_abs_error_vs_numpy_one_epoch": ana["max_abs_error"],
        },
    }


if __name__ == "__main__":
    print(json.dumps(main(quick="--quick" in sys.argv), indent=2))
