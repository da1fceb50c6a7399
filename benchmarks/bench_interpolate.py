"""Map interpolation: one triangulation for every map vs ``griddata`` per map.

The paper's code calls :func:`scipy.interpolate.griddata` once per group (and epoch),
re-triangulating the same layout every time. :class:`topoxr.interpolate.GridInterpolator`
triangulates once and interpolates every group and epoch with one sparse product.
Both are timed here on the same values (10 groups x 20 epochs x 512 neurons onto a
100 x 100 grid) and checked to give the same maps.
"""

from __future__ import annotations

import os
import time

import numpy as np


def _best_of(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main(quick: bool = False) -> dict:
    """Time both approaches; return seconds, the speed-up and the largest difference.

    The timings run in a child process whose BLAS/OpenMP pools have one thread
    (``OPENBLAS_NUM_THREADS=1`` etc., set before numpy loads). ``griddata`` sets up every
    triangle with small LAPACK calls; on a busy machine, multi-threaded BLAS pools make
    those erratic and up to ~100x slower, which would flatter our side. One thread gives
    the reference its best, stable timing.
    """
    import json
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1"}
    code = ("import json, sys; from benchmarks.bench_interpolate import _run; "
            f"print(json.dumps(_run({bool(quick)})))")
    out = subprocess.run([sys.executable, "-c", code], env=env, check=True, text=True,
                         capture_output=True, cwd=Path(__file__).resolve().parent.parent)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _run(quick: bool) -> dict:
    from scipy.interpolate import griddata

    from topoxr.interpolate import GridInterpolator

    n_groups, n_epochs, n_neurons, res = (10, 4, 512, 100) if quick else (10, 20, 512, 100)
    repeat = 5
    rng = np.random.default_rng(0)
    x, y = rng.random(n_neurons), rng.random(n_neurons)
    values = rng.normal(size=(n_groups, n_epochs, n_neurons))

    def vectorised() -> np.ndarray:
        return GridInterpolator(x, y, resolution=res)(values)  # includes the triangulation

    interp = GridInterpolator(x, y, resolution=res)
    gx, gy = np.meshgrid(interp.xs, interp.ys)

    def per_group() -> np.ndarray:
        out = np.empty((n_groups, n_epochs, res, res))
        for g in range(n_groups):
            for e in range(n_epochs):
                out[g, e] = griddata((x, y), values[g, e], (gx, gy), method="linear")
        return out

    vectorised()  # warm up (imports, caches)
    griddata((x, y), values[0, 0], (gx, gy), method="linear")
    t_vec = _best_of(vectorised, repeat)
    t0 = time.perf_counter()
    reference = per_group()  # slow: timed once
    t_ref = time.perf_counter() - t0
    diff = float(np.nanmax(np.abs(vectorised() - reference)))
    t_call = _best_of(lambda: interp(values), repeat)  # triangulation reused
    return {
        "groups": n_groups, "epochs": n_epochs, "neurons": n_neurons, "grid": f"{res}x{res}",
        "griddata_one_call_per_map_s": round(t_ref, 4),
        "grid_interpolator_s": round(t_vec, 4),  # triangulation included
        "grid_interpolator_reused_s": round(t_call, 4),
        "speedup": round(t_ref / t_vec, 1),
        "speedup_reused": round(t_ref / t_call, 1),
        "target_speedup": 5.0,
        "blas_threads": 1,
        "load_average_1min": round(os.getloadavg()[0], 1),
        "max_abs_difference": diff,
    }


if __name__ == "__main__":
    import json

    print(json.dumps(main(quick=True), indent=2))
