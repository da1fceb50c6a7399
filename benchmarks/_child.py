"""Run benchmark code in a child process and sample its peak resident memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time


def run_sampled(code: str, *, every: float = 0.02,
                env: dict[str, str] | None = None) -> tuple[dict, int]:
    """Run ``code`` with this Python; return its last stdout line as JSON and its peak RSS.

    The child's resident set size is sampled with psutil every ``every`` seconds; ``env``
    adds variables to the child's environment.
    """
    import psutil

    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            env=None if env is None else {**os.environ, **env})
    child = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            peak = max(peak, child.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(every)
    out = proc.stdout.read()
    proc.stdout.close()
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark child failed with exit code {proc.returncode}")
    return json.loads(out.strip().splitlines()[-1]), peak
