"""Quality metrics at scale: time and peak RSS of trustworthiness/continuity.

Synthetic clustered profiles (64 clusters, 16 features) and a layout that keeps the
clusters (their first two coordinates plus noise) for n = 8,192 and 65,536 neurons
(2,048 and 8,192 with ``quick``). Each size runs in a fresh child process, which
records its peak RSS with a sampling thread, for the default ``n_queries="auto"``
(exact up to 8,192 neurons, 4,096 random queries above) and, for the smaller size,
the exact computation as well. Spearman correlation over 200,000 sampled pairs is
timed too. An ``n x n`` float64 matrix would need 34 GB at n = 65,536.
"""

from __future__ import annotations

import json
import subprocess
import sys

_CHILD = r"""
import json, sys, threading, time
import numpy as np, psutil
from topoxr.metrics import neighborhood_preservation, rank_correlation

n, mode = int(sys.argv[1]), sys.argv[2]
rng = np.random.default_rng(0)
centres = rng.normal(size=(64, 16)) * 3
lab = rng.integers(0, 64, n)
X = centres[lab] + rng.normal(size=(n, 16))
E = centres[lab, :2] + rng.normal(scale=0.5, size=(n, 2))
proc = psutil.Process()
peak = [proc.memory_info().rss]
stop = threading.Event()
def sample():
    while not stop.is_set():
        peak[0] = max(peak[0], proc.memory_info().rss)
        time.sleep(0.01)
before = proc.memory_info().rss
threading.Thread(target=sample, daemon=True).start()
t0 = time.perf_counter()
t, c = neighborhood_preservation(X, E, 10, n_queries=None if mode == "exact" else "auto")
t_nb = time.perf_counter() - t0
t0 = time.perf_counter()
r = rank_correlation(X, E)
t_sp = time.perf_counter() - t0
stop.set()
print(json.dumps({"n": n, "mode": mode, "trustworthiness": t, "continuity": c, "spearman": r,
                  "seconds_trust_cont": t_nb, "seconds_spearman": t_sp,
                  "rss_before_mb": before / 2**20, "peak_rss_mb": peak[0] / 2**20}))
"""


def _child(n: int, mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _CHILD, str(n), mode], capture_output=True,
                         text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    res = json.loads(out.stdout.strip().splitlines()[-1])
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in res.items()}


def main(quick: bool = False) -> dict:
    """Run the benchmark; see the module docstring."""
    small, large = (2048, 8192) if quick else (8192, 65536)
    runs = [_child(small, "exact"), _child(large, "auto")]
    return {"runs": runs, "target": "n = 65,536 within ~2 GB peak RSS"}


if __name__ == "__main__":
    print(json.dumps(main(quick="--quick" in sys.argv), indent=2))
