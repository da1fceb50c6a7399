"""Run the benchmarks: ``python -m benchmarks [--quick] [NAME ...]``."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import pkgutil
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def machine() -> dict:
    """Describe the machine the numbers come from."""
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("names", nargs="*", help="benchmark modules to run (default: all)")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    args = parser.parse_args(argv)
    here = Path(__file__).parent
    names = args.names or sorted(
        m.name for m in pkgutil.iter_modules([str(here)]) if m.name.startswith("bench_")
    )
    RESULTS.mkdir(exist_ok=True)
    failed = 0
    for name in names:
        name = name if name.startswith("bench_") else f"bench_{name}"
        module = importlib.import_module(f"benchmarks.{name}")
        sys.stderr.write(f"== {name}\n")
        started = time.perf_counter()
        try:
            result = module.main(quick=args.quick)
        except Exception as err:  # report and go on with the others
            failed += 1
            sys.stderr.write(f"{name} failed: {err!r}\n")
            continue
        payload = {"benchmark": name, "quick": args.quick, "machine": machine(),
                   "seconds": round(time.perf_counter() - started, 2), "result": result}
        out = RESULTS / f"{name.removeprefix('bench_')}{'-quick' if args.quick else ''}.json"
        out.write_text(json.dumps(payload, indent=2, default=float) + "\n")
        sys.stderr.write(json.dumps(result, indent=2, default=float) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
