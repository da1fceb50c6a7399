"""topoxr benchmarks: ``make bench`` (``python -m benchmarks``) runs every ``bench_*`` module.

Each module defines ``main(quick: bool = False) -> dict`` that measures a ratio against a
baseline run in the same process and returns a JSON-serialisable result; the runner
writes it to ``benchmarks/results/<module>.json`` with the machine's description.
"""
