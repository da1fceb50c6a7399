"""The ``topoxr`` command line: a thin layer over the public API.

Exit status: 0 on success, 1 when the command fails (a missing store, an unknown layer,
bad data), 2 on usage errors. User errors are printed as one line on stderr, without a
traceback; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["main"]

logger = logging.getLogger("topoxr")


class CommandError(Exception):
    """A user error, reported as one line."""


# --------------------------------------------------------------------------------------
# info
# --------------------------------------------------------------------------------------
def format_summary(summary: dict[str, Any]) -> str:
    """Render :func:`topoxr.store_summary` as a human-readable text block."""
    lines = [f"topoxr store {summary['store']}"]
    lines.append(
        f"  format v{summary['format_version']}, created {summary['created']}"
        + (f", {summary['description']}" if summary.get("description") else "")
    )
    if not summary["models"]:
        lines.append("  (no models yet)")
    for model in summary["models"].values():
        extra = ", ".join(f"{k}={v}" for k, v in sorted(model["attrs"].items()))
        lines.append(f"  model {model['name']}" + (f" ({extra})" if extra else ""))
        for layer in model["layers"].values():
            epochs = layer["epochs"]
            span = f"{epochs[0]}..{epochs[-1]}" if epochs else "none"
            text = (
                f"    layer {layer['name']:<24} {layer['neurons']:>6} neurons "
                f"x {layer['samples']:>6} samples x {len(epochs):>3} epochs ({span})"
            )
            if layer["incomplete_epochs"]:
                text += f"  incomplete: {layer['incomplete_epochs']}"
            lines.append(text)
    return "\n".join(lines)


def _cmd_info(args: argparse.Namespace) -> int:
    from topoxr.store import store_summary

    summary = store_summary(args.path)
    if args.json:
        sys.stdout.write(json.dumps(summary, indent=2) + "\n")
    else:
        sys.stdout.write(format_summary(summary) + "\n")
    return 0


# --------------------------------------------------------------------------------------
# demo
# --------------------------------------------------------------------------------------
def _cmd_demo(args: argparse.Namespace) -> int:
    from topoxr.demo import run_demo

    result = run_demo(out=args.out, seed=args.seed, quick=args.quick, progress=not args.no_progress)
    sys.stdout.write(result.summary_text() + "\n")
    return 0


# --------------------------------------------------------------------------------------
# parser
# --------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser of the ``topoxr`` command."""
    from topoxr import __version__

    parser = argparse.ArgumentParser(
        prog="topoxr",
        description="Record deep-network activations and draw topographic activation maps.",
    )
    parser.add_argument("--version", action="version", version=f"topoxr {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("info", help="summarise a store", description="Summarise a topoxr store.")
    p.add_argument("path", help="store path or fsspec URL")
    p.add_argument("--json", action="store_true",
                   help="print models, layers, neuron/sample counts and epochs as JSON")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser(
        "demo", help="run the digits demo end to end",
        description="Train small networks on scikit-learn's digits, record them, lay out "
        "their neurons and write an HTML report.",
    )
    p.add_argument("--out", default="demo-output", help="output folder (default: demo-output)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--quick", action="store_true", help="fewer epochs and layouts (< 1 minute)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=_cmd_demo)

    for register in _EXTRA_COMMANDS:
        register(sub)
    return parser


#: Further sub-commands register themselves here (see topoxr/_cli_analysis.py).
_EXTRA_COMMANDS: list[Callable[[Any], None]] = []


def _user_errors() -> tuple[type[BaseException], ...]:
    from topoxr._locking import StoreLockedError
    from topoxr.conventions import ConventionError
    from topoxr.store import StoreError

    return (CommandError, StoreError, StoreLockedError, ConventionError, FileNotFoundError,
            KeyError, ValueError, ImportError)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``topoxr`` command line; return the exit status."""
    try:
        import topoxr._cli_analysis  # noqa: F401  (registers naps/layout/render/compare/serve)
    except ImportError:  # pragma: no cover - partial installs
        pass
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        sys.stderr.write("topoxr: interrupted\n")
        return 130
    except _user_errors() as err:
        if args.debug:
            raise
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        sys.stderr.write(f"topoxr {args.command}: error: {message}\n")
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
