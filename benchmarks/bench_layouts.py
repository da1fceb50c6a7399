"""Layout methods compared: seconds, peak RSS, trustworthiness, continuity, smoothness.

Profiles: class NAPs of an MLP (scikit-learn, briefly trained on digits) with n = 128,
512, 2048 hidden units, and synthetic clustered profiles at n = 8,192 and 65,536.
Metrics come from :mod:`topoxr.quality` (trustworthiness/continuity with k = 10 under the
cosine metric, dead neurons as in :mod:`topoxr.profiles`; smoothness of the 100 x 100
interpolated maps of every profile column). Every method runs in this process, one after
the other; RSS is sampled every 20 ms during the call (the whole process, so it includes
what was loaded before: ``rss_before_mib``; importing umap-learn also loads TensorFlow
when it is installed, about 1 GB). umap-learn's numba compilation is paid by a warm-up fit before
timing. ``quick=True`` runs n = 128 and 512 only.
"""

from __future__ import annotations

import logging
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
    "knnforce", "knnforce(grid=False)",
)
DEFAULT = "knnforce"


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
    if n > 2048 and method == "tsne":
        return "time budget: Barnes-Hut t-SNE takes minutes at this size on 2 cores"
    return None


def _estimator(method: str):
    from topoxr.layouts import get_estimator

    if method == "knnforce(grid=False)":
        return get_estimator("knnforce", random_state=0, grid=False)
    est = get_estimator(method, random_state=0)
    if "progress" in est.get_params():
        est.set_params(progress=False)
    return est


def _quality(X: np.ndarray, Y: np.ndarray) -> dict[str, float]:
    from topoxr.interpolate import GridInterpolator
    from topoxr.metrics import neighborhood_preservation, smoothness

    trust, cont = neighborhood_preservation(X, Y, 10, metric="cosine")
    maps = GridInterpolator(Y[:, 0], Y[:, 1], resolution=100)(X.T)
    return {"trustworthiness": round(float(trust), 4), "continuity": round(float(cont), 4),
            "smoothness": round(float(np.nanmean(smoothness(maps)["score"])), 4)}


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
    for data_name, n, make in datasets:
        X = make()
        dead = int((~X.any(axis=1)).sum())
        for method in METHODS:
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
            rows.append(row)
            import sys

            sys.stderr.write(f"{row}\n")
    return {"rows": rows, "ratios_default_vs_umap_force": _ratios(rows)}


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
