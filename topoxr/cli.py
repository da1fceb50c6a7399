"""The ``topoxr`` command line: a thin layer over the public API.

Exit status: 0 on success, 1 when the command fails (a missing store, an unknown layer,
bad data), 2 on usage errors. User errors are printed as one line on stderr, without a
traceback; ``--debug`` shows the traceback. Every ``--out`` file gets its missing parent
folders created, and none may lie inside a Zarr store (one rule for all subcommands).
Models and layers are selected by their original names (as ``info`` prints them) or
their node names in the store.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["main"]

logger = logging.getLogger("topoxr")


class CommandError(Exception):
    """A user error, reported as one line."""


class UsageError(CommandError):
    """Arguments that do not fit together, found after parsing: a usage error (exit 2)."""


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
            if "epochs" not in layer:  # damaged: its problems are listed below
                lines.append(f"    layer {layer['name']:<24} damaged")
                continue
            epochs = sorted(layer["epochs"])  # as recorded, not necessarily in order
            span = f"{epochs[0]}..{epochs[-1]}" if epochs else "none"
            text = (
                f"    layer {layer['name']:<24} {layer['neurons']:>6} neurons "
                f"x {layer['samples']:>6} samples x {len(epochs):>3} epochs ({span})"
            )
            if layer["incomplete_epochs"]:
                text += f"  incomplete: {layer['incomplete_epochs']}"
            if not layer["checksums"]:
                text += "  (no checksums: written by an earlier topoxr)"
            lines.append(text)
    verified = summary.get("verified")
    if verified:
        lines.append(f"  verified {verified['at']}: "
                     + ("no problems" if not verified["problems"] else
                        f"{verified['problems']} problem(s); run `topoxr verify` for details"))
    else:
        lines.append("  never verified since last written (`topoxr verify` reads every chunk)")
    lines.extend(f"  problem: {problem}" for problem in summary.get("problems", []))
    return "\n".join(lines)


def _cmd_info(args: argparse.Namespace) -> int:
    from topoxr.store import store_summary

    summary = store_summary(args.path)
    if args.json:
        sys.stdout.write(json.dumps(summary, indent=2) + "\n")
    else:
        sys.stdout.write(format_summary(summary) + "\n")
    verified = summary.get("verified") or {}
    return 1 if summary["problems"] or verified.get("problems") else 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from topoxr.store import verify

    report = verify(args.path, progress=not args.no_progress and not args.json)
    if args.json:
        sys.stdout.write(json.dumps(report.to_dict(), indent=2) + "\n")
    else:
        for problem in report.problems:
            sys.stdout.write(problem.line() + "\n")
        state = "ok" if report.ok else f"{len(report.problems)} problem(s)"
        sys.stdout.write(f"{report.store}: {report.layers} layer(s), {report.chunks_read} "
                         f"chunks read: {state}\n")
    return 0 if report.ok else 1


# --------------------------------------------------------------------------------------
# demo
# --------------------------------------------------------------------------------------
def _cmd_demo(args: argparse.Namespace) -> int:
    import os

    # The demo is an application: keep TensorFlow's C++ start-up chatter off its output.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # Its networks are small: one TensorFlow thread trains them fastest on a busy machine.
    os.environ.setdefault("TF_NUM_INTRAOP_THREADS", "1")
    os.environ.setdefault("TF_NUM_INTEROP_THREADS", "1")
    from topoxr.demo import run_demo

    result = run_demo(out=args.out, seed=args.seed, quick=args.quick, progress=not args.no_progress)
    sys.stdout.write(format_summary(result.summary) + "\n\n" + result.summary_text() + "\n")
    return 0


# --------------------------------------------------------------------------------------
# analysis commands: naps, layout, render, compare, serve
# --------------------------------------------------------------------------------------
def _layer_nodes(path: str, models: Sequence[str] | None, layers: Sequence[str] | None):
    """The (model, layer, Dataset) triples of a store matching the selection."""
    from topoxr.conventions import ACTIVATION, ATTR_LAYER, ATTR_MODEL, EPOCH
    from topoxr.store import open_store

    # saved layouts unread: none of the commands needs them in the tree (render reads
    # its --layout with load_layout), and a damaged one would stop every command, and
    # `topoxr layout` from saving it again
    tree = open_store(path, saved_groups=False)
    # (node name, original name) of every model and layer
    available = [((str(m), str(node.attrs.get(ATTR_MODEL, m))),
                  (str(l), str(leaf.attrs.get(ATTR_LAYER, l))))
                 for m, node in tree.children.items()
                 for l, leaf in node.children.items() if ACTIVATION in leaf.data_vars]
    chosen = [(m[0], l[0]) for m, l in available
              if (not models or set(m) & set(models)) and (not layers or set(l) & set(layers))]
    unmatched = ([f"--model {v!r}" for v in models or ()
                  if not any(v in m for m, _ in available)]
                 + [f"--layer {v!r}" for v in layers or ()
                    if not any(v in l for m, l in available
                               if not models or set(m) & set(models))])
    if chosen and unmatched:
        names = ", ".join(f"{m[0]}/{l[0]}" for m, l in available)
        raise CommandError(f"{', '.join(unmatched)} matches nothing; the store has: {names}")
    if not chosen:
        names = ", ".join(f"{m[0]}/{l[0]}" for m, l in available) or "none"
        raise CommandError(
            f"no layer matches --model {models or 'any'} --layer {layers or 'any'}; "
            f"the store has: {names}"
        )
    # epochs in ascending order, whatever order they were recorded in: "last" is the
    # highest epoch, and maps and reports walk them in training order
    return [(m, l, tree[f"{m}/{l}"].to_dataset().sortby(EPOCH)) for m, l in chosen]


def _by(text: str) -> str | list[str]:
    keys = [k.strip() for k in text.split(",") if k.strip()]
    if not keys:
        raise CommandError("--by needs at least one coordinate name")
    return keys[0] if len(keys) == 1 else keys


def _last_epoch(ds: Any, where: str, *, say: bool = True) -> int:
    """The highest complete epoch (said on stderr, where ``say``, if a later one is
    incomplete)."""
    from topoxr.conventions import EPOCH

    epochs = [int(e) for e in ds[EPOCH].values]
    complete = (ds["epoch_complete"].values.astype(bool) if "epoch_complete" in ds.coords
                else [True] * len(epochs))
    done = sorted(e for e, ok in zip(epochs, complete, strict=True) if ok)
    last = max(epochs)
    if done and done[-1] == last:
        return last
    if done:
        if say:
            sys.stderr.write(f"{where}: epoch {last} is incomplete; using epoch {done[-1]}, "
                             f"the last complete one (--epoch {last} uses it anyway)\n")
        return done[-1]
    if say:
        sys.stderr.write(f"{where}: no epoch is complete yet; using epoch {last}, the last\n")
    return last


def _epoch_of(ds: Any, epoch: str, where: str = "") -> int:
    from topoxr.conventions import EPOCH

    epochs = sorted(int(e) for e in ds[EPOCH].values)
    if epoch == "last":
        return _last_epoch(ds, where)
    try:
        value = int(epoch)
    except ValueError:
        raise CommandError(
            f"--epoch must be an integer, 'last' or 'all', got {epoch!r}") from None
    if value not in epochs:
        raise CommandError(f"epoch {value} is not recorded; epochs: {epochs}")
    return value


def _cmd_naps(args: argparse.Namespace) -> int:
    from topoxr.grouping import naps

    rows = []
    if args.out and not args.out.endswith(".csv"):
        raise CommandError("--out must name a .csv file")
    for model, layer, ds in _layer_nodes(args.path, args.model, args.layer):
        nap = naps(ds, by=_by(args.by), normalize=not args.no_normalize).compute()
        if args.out:
            frame = nap.reset_index([d for d in nap.dims if d == "group"]).to_dataframe()
            frame.insert(0, "layer", layer)
            frame.insert(0, "model", model)
            rows.append(frame.reset_index())
        else:
            group_dim = [d for d in nap.dims if d not in ("neuron", "epoch")][0]
            sys.stdout.write(
                f"{model}/{layer}: {nap.sizes['neuron']} neurons x {nap.sizes[group_dim]} "
                f"groups ({group_dim}) x {nap.sizes['epoch']} epochs, "
                f"|nap| max {float(abs(nap).max()):.4g}\n"
            )
    if args.out:
        import pandas as pd

        table = pd.concat(rows, ignore_index=True)
        table.to_csv(_output(args.out), index=False)
        sys.stdout.write(f"wrote {len(table)} rows to {args.out}\n")
    return 0


def _cmd_layout(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from topoxr.layouts._registry import DEFAULT_METHOD
    from topoxr.layouts import attach, save_layout
    from topoxr.grouping import naps
    from topoxr.metrics import quality

    from topoxr.store._location import _locate

    _locate(args.path).refuse_writing("save a layout into it")  # before any work
    nodes = _layer_nodes(args.path, args.model, args.layer)
    method = args.method or DEFAULT_METHOD
    if args.name is not None and not args.name.strip():
        raise UsageError("--name must not be empty (default: the method)")
    name = args.name or method
    table = []
    # every layout first: a layer that fails leaves the store as it was
    for model, layer, ds in tqdm(nodes, desc="layouts", disable=args.no_progress):
        try:
            nap = naps(ds, by=_by(args.by)).compute()
            share = ("all" if args.epoch == "all"
                     else _epoch_of(ds, args.epoch, f"{model}/{layer}"))
            laid = attach(nap, method, random_state=args.seed, share=share)
            # the epoch the layout was computed from (with "all": the last complete one)
            scored = share if share != "all" else _last_epoch(ds, f"{model}/{layer}")
            score = quality(laid.sel(epoch=[scored]), k=args.k)
        except _user_errors() as err:
            raise CommandError(f"{model}/{layer}: {_message(err)}; no layout saved") from err
        table.append((model, layer, laid, score))
    for model, layer, laid, _ in table:
        save_layout(args.path, model, layer, laid, name)
    sys.stdout.write(f"saved layout {name!r} ({method}, seed {args.seed})\n")
    for model, layer, _, score in table:
        sys.stdout.write(f"  {model}/{layer}: at epoch {int(score['epoch'].values[0])}, "
                         f"trustworthiness {float(score['trustworthiness'].values[0]):.3f} "
                         f"(k={score.attrs['k']}), "
                         f"smoothness {float(score['smoothness'].values[0]):.3f}\n")
    return 0


def _laid_naps(path: str, model: str, layer: str, ds: Any, by: Any, layout: str | None,
               seed: int) -> Any:
    """NAPs of a layer with a saved layout (by name) or a fresh default one."""
    from topoxr.layouts import attach, load_layout
    from topoxr.grouping import naps

    nap = naps(ds, by=by).compute()
    if layout:
        try:
            return load_layout(path, model, layer, layout, onto=nap)
        except (KeyError, ValueError, FileNotFoundError) as err:
            raise CommandError(
                f"no layout {layout!r} saved for {model}/{layer}; run `topoxr layout` first"
            ) from err
    # the default layout is laid out on class NAPs (the paper's), on the grouping drawn
    # where the layer has no labels
    labelled = (nap if by == "label" or "label" not in ds.coords
                else naps(ds, by="label").compute())
    laid = attach(labelled, random_state=seed, share=_last_epoch(ds, f"{model}/{layer}"))
    if labelled is nap:
        return laid
    from topoxr.conventions import ATTR_LAYOUT

    out = nap.assign_coords(x=("neuron", laid.x.values), y=("neuron", laid.y.values))
    out.attrs[ATTR_LAYOUT] = laid.attrs.get(ATTR_LAYOUT, "{}")
    return out


def _cmd_render(args: argparse.Namespace) -> int:
    from topoxr._optional import import_optional

    out = args.out
    suffix = out.rsplit(".", 1)[-1].lower() if "." in out else ""
    if suffix not in ("html", "png", "gif"):
        raise CommandError("--out must end in .html, .png or .gif")
    by = _by(args.by)
    nodes = _layer_nodes(args.path, args.model, args.layer)
    if suffix != "html" and len(nodes) > 1:
        names = ", ".join(f"{m}/{l}" for m, l, _ in nodes)
        raise UsageError(f"a .{suffix} shows one layer and --model/--layer select "
                         f"{len(nodes)} ({names}): select one, or write an .html report")
    out = _output(out, create=False)
    import_optional("holoviews", extra="viz", purpose="topoxr render")
    from topoxr.viz import Report, save_gif, save_png, topomap

    keys = [by] if isinstance(by, str) else list(by)
    laid = [(m, l, _laid_naps(args.path, m, l, ds, by, args.layout, args.seed))
            for m, l, ds in nodes]
    if suffix == "html":
        report = Report(args.title or f"topoxr: {args.path}")
        for model, layer, nap in laid:
            report.add_section(f"{model} / {layer}", topomap(nap, by=[*keys, "epoch"]))
        report.save(_output(out))
    elif suffix == "png":  # the last complete epoch, as a computed layout takes
        (model, layer, nap), = laid
        epoch = _last_epoch(nodes[0][2], f"{model}/{layer}", say=args.layout is not None)
        save_png(topomap(nap.sel(epoch=[epoch]), by=keys), _output(out))
    else:
        (_, _, nap), = laid
        save_gif(nap, _output(out), progress=not args.no_progress)
    sys.stdout.write(f"wrote {out}\n")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from topoxr._optional import import_optional

    if len(args.layer) > 2:
        raise UsageError(f"--layer takes one layer, or one per model (two); got "
                         f"{len(args.layer)}: {' '.join(args.layer)}")
    if not args.out.lower().endswith(".html"):
        raise CommandError("--out must name an .html file")
    out = _output(args.out, create=False)
    import_optional("holoviews", extra="viz", purpose="topoxr compare")
    from topoxr.alignment import align
    from topoxr.viz import Report, compare_models

    (a, layer_a, ds_a), = _layer_nodes(args.path, args.models[:1], args.layer[:1])
    (b, layer_b, ds_b), = _layer_nodes(args.path, args.models[1:], args.layer[-1:])
    laid_ab = []
    for model, layer, ds in ((a, layer_a, ds_a), (b, layer_b, ds_b)):
        try:
            nap = _laid_naps(args.path, model, layer, ds, "label", None, args.seed)
        except _user_errors() as err:
            raise CommandError(f"{model}/{layer}: {_message(err)}") from err
        # drawn at the last complete epoch, the one its layout was computed from
        last = _last_epoch(ds, f"{model}/{layer}", say=False)
        laid_ab.append(nap.sel(epoch=nap["epoch"] <= last))
    nap_a, nap_b = laid_ab
    nap_b = align(nap_b, nap_a, match="activity")
    note = json.loads(nap_b.attrs.get("topoxr_layout", "{}")).get("aligned", {})
    report = Report(f"topoxr compare: {a}/{layer_a} vs {b}/{layer_b}")
    report.add_section("Side by side (last epoch)", compare_models({a: nap_a, b: nap_b}),
                       text=f"{b} is aligned onto {a} by matching neurons on their activity. "
                            f"{json.dumps(note) if note else ''}")
    report.save(_output(out))
    sys.stdout.write(f"wrote {out}\n")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from topoxr._optional import import_optional

    import_optional("panel", extra="viz", purpose="topoxr serve")
    from topoxr.store import open_store
    from topoxr.viz.app import serve

    open_store(args.path)  # a missing store is a one-line error, before the server starts
    sys.stderr.write(f"serving {args.path} on http://{args.address}:{args.port} (Ctrl-C stops)\n")
    serve(args.path, port=args.port, address=args.address, show=args.show)
    return 0


def _output(path: str, *, create: bool = True) -> str:
    """An output file path, its missing parent folders created (the rule for every --out).

    A folder, or a path inside a Zarr store (whose files it would replace or add to, also
    through a symbolic link), is refused. With ``create=False`` only checked: a command
    checks its output first and creates its folders when it writes, so that a command
    that fails leaves no new folder behind.
    """
    import os

    from topoxr.store._location import zarr_store_holding

    parent = os.path.dirname(os.path.realpath(path))
    if os.path.isdir(path):
        raise CommandError(f"--out {path!r} is a folder; name a file")
    store = zarr_store_holding(parent)
    if store is not None:
        raise CommandError(f"--out {path!r} lies inside the Zarr store {str(store)!r}; "
                           "write it outside any store")
    if not create:
        return path
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as err:
        raise CommandError(f"cannot create the folder {parent!r} for --out: "
                           f"{err.strerror or err}") from None
    if not os.access(parent, os.W_OK):
        raise CommandError(f"cannot write --out {path!r}: the folder {parent!r} is not writable")
    return path


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"a seed is an integer from 0 to 2**32 - 1, got {value}")
    return value


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 < port < 65536:
        raise argparse.ArgumentTypeError(f"port {port} is out of range (1 to 65535)")
    return port


def _selection_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="store path or fsspec URL")
    p.add_argument("--model", action="append", help="model name (repeatable; default: all)")
    p.add_argument("--layer", action="append", help="layer name (repeatable; default: all)")


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

    p = sub.add_parser("verify", help="read every chunk and check the store",
                       description="Read every chunk of a store once, check its checksums "
                       "and invariants; one line per problem. Exit 0 when all is well, "
                       "1 otherwise.")
    p.add_argument("path", help="store path or fsspec URL")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=_cmd_verify)

    p = sub.add_parser(
        "demo", help="run the digits demo end to end",
        description="Train the paper's networks (MLP, CNN, a row transformer, and a biased "
        "MLP with its control) on scikit-learn's digits, record every epoch, lay out their "
        "neurons and write an HTML report with a number for each finding.",
    )
    p.add_argument("--out", default="demo-output", help="output folder (default: demo-output)")
    p.add_argument("--seed", type=_seed, default=0, help="random seed (default: 0)")
    p.add_argument("--quick", action="store_true", help="5 epochs instead of 10, no CNN, no Keras (well under a minute)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("naps", help="neuron activation patterns by any label",
                       description="Compute NAPs (group means, normalised per neuron).")
    _selection_options(p)
    p.add_argument("--by", default="label",
                   help="sample coordinate(s), comma separated (default: label; "
                   "e.g. label,correct or label,prediction)")
    p.add_argument("--no-normalize", action="store_true", help="keep raw group means")
    p.add_argument("--out", help="write a tidy table to this .csv file")
    p.set_defaults(func=_cmd_naps)

    p = sub.add_parser("layout", help="lay out neurons and save the layout in the store",
                       description="Lay out every selected layer and save it in the store.")
    _selection_options(p)
    p.add_argument("--method", default=None, help="layout method (default: topoxr's default)")
    p.add_argument("--name", help="name of the saved layout (default: the method)")
    p.add_argument("--by", default="label", help="grouping of the NAP profiles (default: label)")
    p.add_argument("--epoch", default="last",
                   help="epoch whose NAPs define the layout: an epoch, 'last' (default) or 'all'")
    p.add_argument("--seed", type=_seed, default=0, help="random seed (default: 0)")
    p.add_argument("--k", type=_positive_int, default=10,
                   help="neighbours for trustworthiness, at least 1 (default: 10; small "
                   "layers use fewer: the k used is printed)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=_cmd_layout)

    p = sub.add_parser("render", help="draw maps to HTML, PNG or GIF",
                       description="Draw topographic maps of the selected layers.")
    _selection_options(p)
    p.add_argument("--out", required=True,
                   help="output file: .html (report of every selected layer), or .png or .gif "
                   "(one layer)")
    p.add_argument("--by", default="label", help="grouping, comma separated (default: label)")
    p.add_argument("--layout", help="name of a saved layout (default: compute the default)")
    p.add_argument("--seed", type=_seed, default=0, help="seed of a computed layout (default: 0)")
    p.add_argument("--title", help="report title")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=_cmd_render)

    p = sub.add_parser("compare", help="two models (or frameworks) side by side",
                       description="Align one model's layer onto another's and draw both.")
    p.add_argument("path", help="store path or fsspec URL")
    p.add_argument("--models", nargs=2, required=True, metavar=("A", "B"), help="two models")
    p.add_argument("--layer", nargs="+", required=True, metavar="LAYER",
                   help="layer name, or one per model (at most two)")
    p.add_argument("--out", default="compare.html",
                   help="output report, an .html file (default: compare.html)")
    p.add_argument("--seed", type=_seed, default=0, help="random seed (default: 0)")
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser("serve", help="browse a store in a live panel app",
                       description="Serve a panel app over a store.")
    p.add_argument("path", help="store path or fsspec URL")
    p.add_argument("--port", type=_port, default=5006, help="port (default: 5006)")
    p.add_argument("--address", default="127.0.0.1", help="interface (default: 127.0.0.1)")
    p.add_argument("--show", action="store_true", help="open a browser tab")
    p.set_defaults(func=_cmd_serve)
    for p in sub.choices.values():  # for usage errors found after parsing
        p.set_defaults(subparser=p)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    from topoxr._locking import StoreLockedError
    from topoxr.conventions import ConventionError
    from topoxr.store import StoreError

    return (CommandError, StoreError, StoreLockedError, ConventionError, OSError,
            KeyError, ValueError, ImportError)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``topoxr`` command line.

    Parameters
    ----------
    argv : sequence of str, optional
        Arguments without the program name; default: ``sys.argv[1:]``.

    Returns
    -------
    int
        Exit status: 0 on success, 1 when the command fails (one line on stderr), 2 on
        usage errors (from argparse), 130 when interrupted.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except UsageError as err:
        args.subparser.error(str(err))  # usage and message on stderr, exit status 2
    except KeyboardInterrupt:
        sys.stderr.write("topoxr: interrupted\n")
        return 130
    except _user_errors() as err:
        if args.debug:
            raise
        sys.stderr.write(f"topoxr {args.command}: error: {_one_line(_message(err))}\n")
        return 1
    except Exception as err:  # never a traceback for a user; --debug shows it
        if args.debug:
            raise
        sys.stderr.write(f"topoxr {args.command}: error: {type(err).__name__}: "
                         f"{_one_line(err)} (run with --debug for the traceback)\n")
        return 1


def _message(err: BaseException) -> object:
    """What an error says (a KeyError's message without its quotes)."""
    return err.args[0] if isinstance(err, KeyError) and err.args else err


def _one_line(message: object) -> str:
    return " ".join(str(message).split())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
