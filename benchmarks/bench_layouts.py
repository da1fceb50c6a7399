"""Layout methods compared: seconds, peak RSS, trustworthiness, continuity, smoothness.

Profiles: class NAPs of an MLP (scikit-learn, briefly trained on digits) with n = 128,
512, 2048 hidden units, and synthetic clustered profiles at n = 8,192 and 65,536.
Metrics come from :mod:`topoxr.quality` (trustworthiness/continuity with k = 10 under the
cosine metric, dead neurons as in :mod:`topoxr.profiles`; smoothness of the 100 x 100
interpolated maps of every profile column). Every method runs in this process, one after
the other; RSS is sampled every 20 ms during the call (the whole process, so it includes
what was loaded before: ``rss_before_mib``; :class:`~topoxr.layouts.UMAPLayout` imports
umap-learn without its TensorFlow path). umap-learn's numba compilation is paid by a
warm-up fit before timing. ``quick=True`` runs n = 128 and 512 only.

Besides topoxr's scores, every row has the paper's own smoothness (``paper_smoothness``,
:func:`topoxr.metrics.paper_smoothness`) and the sampled 10-NN overlap (``knn_overlap``).
With the environment variable ``TOPOXR_REFERENCE`` set to a checkout of the paper's
reference code (github.com/valeriekrug/ANN-topomaps; never vendored), its ``train_PSO``
from a random start runs beside topoxr's ``force`` on the same cosine distances
(``reference:force`` rows, n <= 512). The default at 65,536 neurons runs in a child
process, so its peak RSS is its own; so does the fresh-process time from ``import
topoxr`` to the first default layout of 512 neurons. ``targets`` checks the default
against t-SNE and ``umap+force`` measured in this same run.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import Any

import numpy as np

from benchmarks._layout_data import digits_naps

logger = logging.getLogger(__name__)

DIGITS_SIZES = (128, 512, 2048)
SYNTHETIC_SIZES = (8192, 65536)
#: Dense force refinements run at 2048 in the full benchmark (each costs ~ umap+force).
DENSE_AT_2048 = ("force", "umap+force", "graph+force")
METHODS = (
    "random", "pca", "mds", "tsne", "umap", "som", "graph", "force",
    "pca+force", "tsne+force", "umap+force", "som+force", "graph+force",
    "knnforce", "knnforce(grid=False)", "knnforce(swap_rounds=0,nudge=0)",
    "knnforce(grid_neighbors=0)",
)
DEFAULT = "knnforce"
#: Run first in every dataset (the targets' methods), so a cut-short run still has them.
PRIORITY = ("knnforce", "tsne", "umap+force", "force")


class _PeakRSS:
    """Peak resident memory of this process while the block runs (sampled)."""

    def __enter__(self) -> _PeakRSS:
        import psutil

        self._proc = psutil.Process()
        self.before = self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


def _skip_reason(method: str, n: int, quick: bool) -> str | None:
    dense = method == "force" or method.endswith("+force")
    if n > 2048 and (dense or method in ("graph", "mds")):
        need = (32 if dense else 8 * 3) * n * n / 2**30
        return (f"dense O(n^2): needs about {need:.1f} GiB and O(n^2) time per step"
                f" ({'1000 steps' if dense else 'per iteration'})")
    if n == 2048 and dense and method not in DENSE_AT_2048:
        return ("time budget: a dense 1000-step force refinement costs about as much as"
                " umap+force (measured); run by adding it to DENSE_AT_2048")
    if n > 8192 and method in ("tsne", "umap", "som"):
        return "time budget of the shared 2-core machine (expected well over 5 minutes)"
    if n > 2048 and method == "som":
        return "time budget: O(n * cells) = O(n^2) per epoch in a Python loop"
    if n > 8192 and method == "knnforce":
        return "run in a child process (row 'knnforce (child process)')"
    return None


def _estimator(method: str):
    from topoxr.layouts import get_estimator

    if method.startswith("knnforce("):
        params = eval(f"dict({method[len('knnforce('):-1]})")  # noqa: S307 - fixed names
        return get_estimator("knnforce", random_state=0, **params)
    est = get_estimator(method, random_state=0)
    if "progress" in est.get_params():
        est.set_params(progress=False)
    return est


def _quality(X: np.ndarray, Y: np.ndarray) -> dict[str, float]:
    from topoxr.interpolate import GridInterpolator
    from topoxr.metrics import (
        knn_overlap,
        neighborhood_preservation,
        paper_smoothness,
        smoothness,
    )

    trust, cont = neighborhood_preservation(X, Y, 10, metric="cosine")
    maps = GridInterpolator(Y[:, 0], Y[:, 1], resolution=100)(X.T)
    return {"trustworthiness": round(float(trust), 4), "continuity": round(float(cont), 4),
            "smoothness": round(float(np.nanmean(smoothness(maps)["score"])), 4),
            "paper_smoothness": round(float(np.nanmean(paper_smoothness(maps)["area"])), 4),
            "knn_overlap": round(knn_overlap(X, Y, 10, metric="cosine", n_queries=2048), 4)}


def _warm_up_umap() -> None:
    try:
        from topoxr.layouts import UMAPLayout

        UMAPLayout(random_state=0, n_epochs=10).fit(np.random.default_rng(0).random((64, 5)))
    except ImportError:
        pass


def run_one(method: str, X: np.ndarray) -> dict[str, Any]:
    """Fit one method on ``X``; seconds, peak RSS (MiB) and quality."""
    est = _estimator(method)
    with _PeakRSS() as mem:
        start = time.perf_counter()
        Y = est.fit_transform(X)
        seconds = time.perf_counter() - start
    return {"seconds": round(seconds, 3), "peak_rss_mib": round(mem.peak / 2**20, 1),
            "rss_before_mib": round(mem.before / 2**20, 1), **_quality(X, Y)}


def _reference_force(X: np.ndarray, seed: int) -> np.ndarray | None:
    """The paper's ``train_PSO`` from a random start, if ``TOPOXR_REFERENCE`` names it."""
    import os
    import sys
    import types

    root = os.environ.get("TOPOXR_REFERENCE")
    if not root:
        return None
    from scipy.spatial.distance import pdist

    if root not in sys.path:
        sys.path.insert(0, root)
    if "minisom" not in sys.modules:  # only its SOM needs minisom; train_PSO does not
        stub = types.ModuleType("minisom")
        stub.MiniSom = None
        sys.modules["minisom"] = stub
    from src.topomaps import train_PSO  # the reference's module layout

    np.random.seed(seed)
    # the reference's NAP distances: cosine pdist of the profiles plus 1e-15
    return np.asarray(train_PSO(pdist(X + 1e-15, "cosine")))


_CHILD_DEFAULT = """
import json, sys, time
import numpy as np
t0 = time.perf_counter()
import topoxr
from topoxr.testing.profiles import clustered_profiles
X = clustered_profiles({n}, 10, random_state=0)
t1 = time.perf_counter()
Y = topoxr.layout(X, random_state=0)
t2 = time.perf_counter()
np.save({out!r}, Y)
print(json.dumps({{"seconds": t2 - t1, "import_and_data_s": t1 - t0,
                  "tensorflow": "tensorflow" in sys.modules, "umap": "umap" in sys.modules}}))
"""


def _child_default(n: int) -> dict[str, Any]:
    """The default layout of ``n`` synthetic neurons in a fresh process."""
    import tempfile
    from pathlib import Path

    from benchmarks._child import run_sampled

    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "Y.npy")
        res, peak = run_sampled(_CHILD_DEFAULT.format(n=n, out=out))
        Y = np.load(out)
    res["peak_rss_mib"] = round(peak / 2**20, 1)
    res["Y"] = Y
    return res


def fresh_process_first_layout(n: int = 512) -> dict[str, Any]:
    """Wall time of a fresh interpreter: ``import topoxr`` to the first default layout."""
    import subprocess
    import sys

    code = ("import time; t0 = time.perf_counter(); import sys, topoxr; "
            "from benchmarks._layout_data import digits_naps; X = digits_naps(%d); "
            "t1 = time.perf_counter(); topoxr.layout(X, random_state=0); "
            "t2 = time.perf_counter(); import json; print(json.dumps({'import_s': 0, "
            "'data_s': t1 - t0, 'total_s': t2 - t0, 'layout_s': t2 - t1, "
            "'tensorflow': 'tensorflow' in sys.modules, 'umap': 'umap' in sys.modules}))"
            % n)
    # the data (training the digits MLP) is timed apart; import + layout is the target
    imp = ("import time; t0 = time.perf_counter(); import topoxr; "
           "print(time.perf_counter() - t0)")
    t_import = float(subprocess.run([sys.executable, "-c", imp], capture_output=True,
                                    text=True, check=True).stdout.strip().splitlines()[-1])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    import json

    res = json.loads(out.stdout.strip().splitlines()[-1])
    res["import_s"] = round(t_import, 3)
    res["import_to_first_layout_s"] = round(t_import + res["layout_s"], 3)
    return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in res.items()}


def main(quick: bool = False) -> dict[str, Any]:
    """Run the layout benchmark; see the module docstring."""
    from topoxr.testing.profiles import clustered_profiles

    _warm_up_umap()
    datasets: list[tuple[str, int, Any]] = [
        ("digits_mlp_naps", n, lambda n=n: digits_naps(n)) for n in DIGITS_SIZES
        if not quick or n <= 512
    ]
    if not quick:
        datasets += [("synthetic_clusters", n,
                      lambda n=n: clustered_profiles(n, 10, random_state=0))
                     for n in SYNTHETIC_SIZES]
    rows: list[dict[str, Any]] = []
    fresh: dict[str, Any] = {}
    # pass 1: the targets' methods on every dataset (and the fresh-process check);
    # pass 2: every other method. A cut-short run still has what the targets need.
    passes = ([m for m in PRIORITY if m in METHODS], [m for m in METHODS if m not in PRIORITY])
    cache: dict[int, np.ndarray] = {}
    for p_i, methods in enumerate(passes):
        for data_name, n, make in datasets:
            X = cache.setdefault(n, make())
            dead = int((~X.any(axis=1)).sum())
            for method in methods:
                row: dict[str, Any] = {"data": data_name, "n": n, "method": method,
                                       "dead_neurons": dead}
                reason = _skip_reason(method, n, quick)
                if reason:
                    row["skipped"] = reason
                else:
                    logger.info("layout %s n=%d", method, n)
                    try:
                        row.update(run_one(method, X))
                    except MemoryError as err:
                        row["skipped"] = f"MemoryError: {err}"
                _add(rows, row, quick)
                if method == "force" and n <= 512 and "skipped" not in row:
                    ref = _reference_row(data_name, n, X)
                    if ref:
                        _add(rows, ref, quick)
            if p_i == 0 and n > 8192:
                logger.info("default layout n=%d in a child process", n)
                res = _child_default(n)
                Y = res.pop("Y")
                _add(rows, {"data": data_name, "n": n, "method": "knnforce (child process)",
                            "dead_neurons": dead, "seconds": round(res.pop("seconds"), 3),
                            **res, **_quality(X, Y)}, quick)
            if n > 8192:
                cache.pop(n, None)
        if p_i == 0:
            fresh = fresh_process_first_layout(512)
            sys.stderr.write(f"fresh process: {fresh}\n")
            sys.stderr.write(f"targets: {_targets(rows, fresh)}\n")
    return {"rows": rows, "ratios_default_vs_umap_force": _ratios(rows),
            "fresh_process_first_layout_512": fresh, "targets": _targets(rows, fresh)}


def _add(rows: list[dict[str, Any]], row: dict[str, Any], quick: bool) -> None:
    """Append a row, log it and keep the rows so far in ``results/layouts-partial.json``."""
    import json
    from pathlib import Path

    rows.append(row)
    sys.stderr.write(f"{row}\n")
    out = Path(__file__).parent / "results" / f"layouts{'-quick' if quick else ''}-partial.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"rows": rows}, indent=1, default=float) + "\n")


def _reference_row(data_name: str, n: int, X: np.ndarray) -> dict[str, Any] | None:
    try:
        with _PeakRSS() as mem:
            start = time.perf_counter()
            Y = _reference_force(X, 0)
            seconds = time.perf_counter() - start
    except ImportError as err:
        return {"data": data_name, "n": n, "method": "reference:force",
                "skipped": f"reference code not importable: {err}"}
    if Y is None:
        return None
    return {"data": data_name, "n": n, "method": "reference:force", "seconds": round(seconds, 3),
            "peak_rss_mib": round(mem.peak / 2**20, 1), **_quality(X, Y)}


def _targets(rows: list[dict[str, Any]], fresh: dict[str, Any]) -> list[dict[str, Any]]:
    """The default against t-SNE and umap+force of the same run, as in issue 14."""
    out: list[dict[str, Any]] = []

    def get(n, method):
        return next((r for r in rows if r["n"] == n and r["method"] == method
                     and "seconds" in r), None)

    def add(name, value, limit, ok):
        out.append({"target": name, "value": value, "limit": limit, "met": bool(ok)})

    for n in sorted({r["n"] for r in rows}):
        d = get(n, DEFAULT) or get(n, f"{DEFAULT} (child process)")
        t, u = get(n, "tsne"), get(n, "umap+force")
        if d and t:
            tol = 0.01 if n >= 8192 else 0.005
            diff = round(d["trustworthiness"] - t["trustworthiness"], 4)
            add(f"n={n} trustworthiness - tsne's", diff, -tol, diff >= -tol)
            if n >= 8192:
                ratio = round(d["knn_overlap"] / t["knn_overlap"], 3)
                add(f"n={n} knn_overlap / tsne's", ratio, 0.8, ratio >= 0.8)
        if d and u:
            ratio = round(d["smoothness"] / u["smoothness"], 3)
            add(f"n={n} smoothness / umap+force's", ratio, 0.9, ratio <= 0.9)
            pratio = round(d["paper_smoothness"] / u["paper_smoothness"], 3)
            out.append({"target": f"n={n} paper_smoothness / umap+force's (reported)",
                        "value": pratio})
            if n == 2048:
                tr = round(d["seconds"] / u["seconds"], 4)
                add(f"n={n} seconds / umap+force's", tr, 0.1, tr <= 0.1)
        if d and n == 8192:
            add("n=8192 seconds", d["seconds"], 30, d["seconds"] <= 30)
        if d and n == 65536:
            add("n=65536 seconds", d["seconds"], 120, d["seconds"] < 120)
            add("n=65536 peak RSS MiB", d.get("peak_rss_mib"), 2048,
                d.get("peak_rss_mib", 1e9) < 2048)
    add("fresh process import -> first 512 layout s", fresh["import_to_first_layout_s"], 5,
        fresh["import_to_first_layout_s"] < 5 and not fresh["tensorflow"])
    return out


def _ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for n in sorted({r["n"] for r in rows}):
        by = {r["method"]: r for r in rows if r["n"] == n and "seconds" in r}
        if DEFAULT in by and "umap+force" in by:
            d, u = by[DEFAULT], by["umap+force"]
            out.append({
                "n": n,
                "speedup": round(u["seconds"] / d["seconds"], 1),
                "trustworthiness": (d["trustworthiness"], u["trustworthiness"]),
                "smoothness_ratio": round(d["smoothness"] / u["smoothness"], 3),
            })
    return out
