"""The embedded demo: the paper's networks on scikit-learn's digits, and its four applications.

``topoxr demo`` (and ``make demo``) runs :func:`run_demo`:

1. a fixed, class-balanced probe set is split off scikit-learn's bundled digits
   (:mod:`topoxr.digits`);
2. the paper's networks are trained: its MLP (one hidden layer of 128 ReLU units,
   dropout) and its shallow CNN (two convolutions of 128 channels) in PyTorch and, from
   the same initial weights, in Keras, and a small transformer reading each digit as 8 row
   tokens; two more MLPs are trained on data with a planted bias (a mark on pixels that
   no digit inks, tied to the classes 0-4) and on the same data without the tie (the
   control). The probe set is recorded before training (epoch 0) and after every epoch
   into ``DIR/activations.zarr``;
3. every hidden layer is laid out with topoxr's default method (and, for the layout
   quality table, with the paper's ``graph+force``), NAPs are computed by class, by
   (class, correct), by (class, prediction) and by (class, mark);
4. each of the paper's applications gets its number (:mod:`topoxr.findings`): which
   classes' maps are most alike and the maps' blobs; how many wrong samples look more
   like their class or the one predicted; the mark's effect on the maps against the
   control; how much the maps change per epoch and when they settle;
5. ``DIR/report.html`` (self-contained, works offline), ``DIR/quality.json`` (every
   number), ``DIR/maps.png`` and ``DIR/training.gif`` are written.

The networks come from the recording adapters, found through the adapter registry
(:func:`topoxr.recording.get_adapter`): the core never imports an adapter by name.
Without PyTorch, the demo records scikit-learn's ``MLPClassifier`` instead, so the core
pipeline can always be seen. Every step uses only data that ships with scikit-learn; the
same seed gives the same numbers. Phase timings are logged and written to quality.json.
"""

from __future__ import annotations

import copy
import json
import logging
import platform
import shutil
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from topoxr.digits import DIGITS_LAYERS, digits_probe, load_digits_data, plant_bias

__all__ = ["DIGITS_LAYERS", "DemoResult", "ModelSpec", "demo_plan", "digits_probe",
           "load_digits_data", "record_sklearn_mlp", "run_demo"]

logger = logging.getLogger(__name__)

#: Learning rate and batch size of every demo network (Adam, cross-entropy).
LEARNING_RATE = 2e-3
BATCH_SIZE = 32
#: Grid of the report's maps (the paper's 100 x 100 is not needed for 128 neurons and
#: would make the page four times heavier); the animation uses a coarser one.
MAP_RESOLUTION = 64
ANIMATION_RESOLUTION = 48
#: Sample attribute of the planted bias.
ATTRIBUTE = "marked"


@dataclass(frozen=True)
class ModelSpec:
    """One network of the demo.

    Attributes
    ----------
    name : str
        Model group in the store.
    framework : {"torch", "keras"}
        Adapter that builds, trains and records it.
    kind : str
        Architecture (see :data:`topoxr.digits.DIGITS_LAYERS`).
    layers : tuple of str
        Hidden layers recorded.
    reduce : tuple of (str, str), optional
        ``(layer, reduce)`` pairs for layers whose output is not reduced by the default
        (e.g. ``("ffn", "tokens")``: every row token of a digit its own sample; see
        :mod:`topoxr.reduction`).
    twin : str, optional
        A PyTorch model whose initial weights this (Keras) model starts from.
    data : {"clean", "biased", "control"}
        Training data: the digits, or the digits with the planted mark tied to classes
        (``biased``) or independent of them (``control``).
    """

    name: str
    framework: str
    kind: str
    layers: tuple[str, ...]
    twin: str | None = None
    data: str = "clean"
    reduce: tuple[tuple[str, str], ...] = ()

    def layer_settings(self) -> dict[str, dict[str, str]]:
        """The recorders' ``layers=`` mapping: every layer, with its reduce if set.

        Returns
        -------
        dict of str to dict of str to str
            ``{layer: settings}`` for every layer of :attr:`layers`, in order: the
            settings are ``{"reduce": reduce}`` for a layer named in :attr:`reduce`, else
            ``{}`` (the recording's default).
        """
        reduce = dict(self.reduce)
        return {layer: ({"reduce": reduce[layer]} if layer in reduce else {})
                for layer in self.layers}


def demo_plan(quick: bool = False, frameworks: set[str] | None = None) -> list[ModelSpec]:
    """The networks the demo trains, in order.

    Parameters
    ----------
    quick : bool, default False
        Leave out the CNNs (the slowest to train) and the Keras twins (TensorFlow's
        start-up alone costs several seconds).
    frameworks : set of str, optional
        Installed frameworks (default: those whose adapter and framework are installed).

    Returns
    -------
    list of ModelSpec
    """
    frameworks = _frameworks() if frameworks is None else frameworks
    plan = [
        ModelSpec("mlp_torch", "torch", "paper_mlp", ("relu1",)),
        ModelSpec("mlp_keras", "keras", "paper_mlp", ("relu1",), twin="mlp_torch"),
        ModelSpec("cnn_torch", "torch", "paper_cnn", ("relu1", "relu2")),
        ModelSpec("cnn_keras", "keras", "paper_cnn", ("relu1", "relu2"), twin="cnn_torch"),
        # per token (every row of a digit its own sample) and pooled (mean over rows)
        ModelSpec("transformer_torch", "torch", "transformer", ("ffn", "pool"),
                  reduce=(("ffn", "tokens"),)),
        ModelSpec("mlp_biased", "torch", "paper_mlp", ("relu1",), data="biased"),
        ModelSpec("mlp_control", "torch", "paper_mlp", ("relu1",), data="control"),
    ]
    if quick:
        plan = [s for s in plan if s.kind != "paper_cnn" and s.framework != "keras"]
    plan = [s for s in plan if s.framework in frameworks]
    names = {s.name for s in plan}
    return [s if s.twin is None or s.twin in names else
            ModelSpec(s.name, s.framework, s.kind, s.layers, None, s.data, s.reduce)
            for s in plan]


@dataclass
class DemoResult:
    """What the demo produced."""

    out: Path
    store: Path
    summary: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)
    report: Path | None = None
    quality: list[dict[str, Any]] = field(default_factory=list)
    findings: dict[str, Any] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)

    def summary_text(self) -> str:
        """A human-readable account of the run: the findings, layout quality and timings.

        Returns
        -------
        str
            Lines joined by newlines (no final newline), in sections separated by a
            blank line, each only where it has lines: one line per application found in
            :attr:`findings`; a table of the layouts when :attr:`quality` has rows
            (model, layer, method, trustworthiness, smoothness, blob count, seconds);
            the phase timings when :attr:`timings` has any, then the CPU times when
            :attr:`cpu` has any, then one ``wrote PATH`` line per file of :attr:`files`.
        """
        table = []
        if self.quality:
            table.append(f"{'model':<18}{'layer':<8}{'method':<12}{'trust':>7}{'smooth':>8}"
                         f"{'blobs':>7}{'sec':>7}")
            for row in self.quality:
                table.append(
                    f"{row['model']:<18}{row['layer']:<8}{row['method']:<12}"
                    f"{row['trustworthiness']:>7.3f}{row['smoothness']:>8.3f}"
                    f"{row['blob_count']:>7.1f}{row['seconds']:>7.2f}"
                )
        last = []
        if self.timings:
            last.append("timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in self.timings.items()))
        if self.cpu:
            last.append("CPU time: " + ", ".join(f"{k} {v:.1f}s" for k, v in self.cpu.items()))
        last += [f"wrote {path}" for path in self.files]
        sections = (list(_finding_lines(self.findings)), table, last)
        return "\n\n".join("\n".join(lines) for lines in sections if lines)


def record_sklearn_mlp(
    store: str | Path, data: dict[str, np.ndarray], *, epochs: int = 5, hidden: int = 128,
    seed: int = 0, progress: bool = True, model_name: str = "mlp_sklearn",
) -> None:
    """Train scikit-learn's ``MLPClassifier`` with ``partial_fit`` and record its hidden layer.

    The hidden activations are computed with numpy from the fitted weights on the fixed
    probe set after every epoch. scikit-learn initialises weights only inside
    ``partial_fit``, so epoch 0 is the network after a single one-sample step.

    Parameters
    ----------
    store : str or Path
        Store to write; the model group is replaced.
    data : dict
        The split returned by :func:`topoxr.digits.digits_probe`.
    epochs : int, default 5
        Training epochs (epochs ``0..epochs`` are recorded).
    hidden : int, default 128
        Width of the hidden layer, recorded as layer ``hidden``.
    seed : int, default 0
        Seed of the weights and of the batch order.
    progress : bool, default True
        Show a progress bar.
    model_name : str, default "mlp_sklearn"
        Model group name in the store.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier
    from tqdm.auto import tqdm

    from topoxr.store import ActivationWriter

    clf = MLPClassifier(hidden_layer_sizes=(hidden,), random_state=seed, learning_rate_init=1e-2)
    classes = np.arange(10)
    rng = np.random.default_rng(seed)
    x_probe, y_probe, ids = data["x_probe"], data["y_probe"], data["probe_ids"]
    with ActivationWriter(store, model=model_name, mode="w",
                          attrs={"framework": "scikit-learn", "architecture": f"64-{hidden}-10"}) as writer:
        for epoch in tqdm(range(epochs + 1), desc=f"{model_name}: train + record",
                          disable=not progress, leave=False):
            if epoch > 0:
                order = rng.permutation(len(data["y_train"]))
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", ConvergenceWarning)
                    for batch in np.array_split(order, 8):
                        clf.partial_fit(data["x_train"][batch], data["y_train"][batch],
                                        classes=classes)
            else:
                clf.partial_fit(data["x_train"][:1], data["y_train"][:1], classes=classes)
            hidden_act = np.maximum(x_probe @ clf.coefs_[0] + clf.intercepts_[0], 0.0)
            prediction = clf.predict(x_probe)
            writer.write("hidden", hidden_act, sample=ids, label=y_probe,
                         prediction=prediction, epoch=epoch)
            writer.complete_epoch(epoch)
            writer.log_epoch(epoch, accuracy=float((prediction == y_probe).mean()))


def _frameworks() -> set[str]:
    """Frameworks whose adapter is registered and whose library is installed."""
    from topoxr._optional import has_module
    from topoxr.recording import available_adapters

    return {name for name in available_adapters() if name in ("torch", "keras")
            and has_module(name)}


def _record(store: Path, data: dict[str, np.ndarray], spec: ModelSpec, *, epochs: int,
            seed: int, twin: Any = None, metadata: dict[str, Any] | None = None) -> Any:
    """Build, train and record one network through its adapter; return its initial state.

    For PyTorch the returned object is the network holding its *initial* weights (for a
    Keras twin); for Keras, None.
    """
    from topoxr.recording import get_adapter

    adapter = get_adapter(spec.framework)
    models = adapter.models
    probe = (data["x_probe"], data["y_probe"])
    common = {"model_name": spec.name, "layers": spec.layer_settings(),
              "sample_ids": data["probe_ids"], "metadata": metadata}
    fit = {"epochs": epochs, "seed": seed, "lr": LEARNING_RATE, "batch_size": BATCH_SIZE}
    if spec.framework == "torch":
        model = models.make_model(spec.kind, seed=seed)
        initial = copy.deepcopy(model.state_dict())
        recorder = adapter.ProbeRecorder(model, probe, str(store), **common)
        recorder.record(0)
        models.train(model, data["x_train"], data["y_train"],
                     on_epoch_end=lambda epoch, logs: recorder.record(epoch, **logs), **fit)
        model.load_state_dict(initial)  # hand the *initial* weights to a Keras twin
        return model
    model = models.make_model(spec.kind, seed=seed)
    if twin is not None:
        models.copy_torch_weights_to_keras(twin, model)
    callback = adapter.RecordActivations(probe, str(store), **common)
    models.train(model, data["x_train"], data["y_train"], callbacks=[callback], **fit)
    return None


def _record_all(store: Path, plan: list[ModelSpec], data: dict[str, Any], *, epochs: int,
                seed: int, progress: bool) -> None:
    """Train and record every network of ``plan``; scikit-learn's MLP if it is empty."""
    from tqdm.auto import tqdm

    variants = {"clean": data}
    if any(s.data != "clean" for s in plan):
        variants["biased"] = plant_bias(data, biased=True, seed=seed)
        variants["control"] = plant_bias(data, biased=False, seed=seed)
    twins: dict[str, Any] = {}
    bar = tqdm(plan, desc="demo: train + record", disable=not progress)
    for spec in bar:
        bar.set_postfix_str(spec.name)
        started = time.perf_counter()
        split = variants[spec.data]
        meta = {ATTRIBUTE: split["marked_probe"]} if spec.data != "clean" else None
        twins[spec.name] = _record(store, split, spec, epochs=epochs, seed=seed,
                                   twin=twins.get(spec.twin or ""), metadata=meta)
        logger.info("demo: trained and recorded %s in %.1f s", spec.name,
                    time.perf_counter() - started)
    if not plan:
        record_sklearn_mlp(store, data, epochs=epochs, seed=seed, progress=progress)


@contextmanager
def _one_torch_thread(active: bool) -> Iterator[None]:
    """Train the (small) demo networks on one PyTorch thread.

    On a busy 2-core machine, PyTorch's thread pool spins against other processes and
    trains these networks 10 to 50 times slower than one thread does.
    """
    if not active:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _clock() -> tuple[float, float]:
    """Wall and CPU time of this process (CPU time tells on a busy machine)."""
    return time.perf_counter(), time.process_time()


def _phase(timings: dict[str, float], name: str, started: tuple[float, float],
           cpu: dict[str, float]) -> None:
    wall, proc = _clock()
    timings[name] = round(wall - started[0], 2)
    cpu[name] = round(proc - started[1], 2)
    logger.info("demo: %s took %.1f s (%.1f s of CPU)", name, timings[name], cpu[name])


def run_demo(
    out: str | Path = "demo-output", *, seed: int = 0, quick: bool = False, progress: bool = True,
    frameworks: set[str] | None = None,
) -> DemoResult:
    """Run the demo and return what it produced.

    Parameters
    ----------
    out : str or Path, default "demo-output"
        Output folder, outside any Zarr store; the store is ``out/activations.zarr``
        (that of an earlier run is replaced, unless a writer holds it).
    seed : int, default 0
        Seed of every random step; the same seed gives the same numbers.
    quick : bool, default False
        Five epochs instead of ten, no CNNs and no Keras twin, for a run of well under a
        minute.
    progress : bool, default True
        Show progress bars.
    frameworks : set of str, optional
        Frameworks to train with (default: every installed one of ``{"torch", "keras"}``);
        an empty set records scikit-learn's MLP only.

    Returns
    -------
    DemoResult

    Raises
    ------
    topoxr.StoreError
        If ``out`` is a Zarr store or lies inside one (a folder holding ``zarr.json``,
        ``.zgroup`` or ``.zarray``, or below one), or if ``out/activations.zarr`` exists
        and is not a topoxr store. Nothing is written.
    topoxr.StoreLockedError
        If a writer holds ``out/activations.zarr`` (it is not replaced).
    """
    from topoxr.store import StoreError, open_store, store_summary
    from topoxr.store._location import zarr_store_holding

    start = _clock()
    out = Path(out)
    holder = zarr_store_holding(out)
    if holder is not None:
        where = ("is a Zarr store" if holder == out.absolute()
                 else f"lies inside the Zarr store {holder}")
        raise StoreError(f"the demo's output folder {out} {where}; the demo writes a store and "
                         "a report of its own: choose a folder outside any store")
    out.mkdir(parents=True, exist_ok=True)
    store = out / "activations.zarr"
    if store.exists():
        _remove_old_store(store)
    timings: dict[str, float] = {}
    epochs = 5 if quick else 10
    data = digits_probe(seed=seed)
    chosen = _frameworks() if frameworks is None else frameworks
    plan = demo_plan(quick, chosen)
    if not plan:
        logger.warning("%s: recording scikit-learn's MLP",
                       _why_no_plan(frameworks, chosen, quick))

    cpu: dict[str, float] = {}
    t0 = _clock()
    with _one_torch_thread(any(s.framework == "torch" for s in plan)):
        _record_all(store, plan, data, epochs=epochs, seed=seed, progress=progress)
    _phase(timings, "record", t0, cpu)

    t0 = _clock()
    analysis = _analyse(open_store(str(store)), seed=seed, progress=progress)
    _phase(timings, "analyse", t0, cpu)

    result = DemoResult(out=out, store=store, summary=store_summary(str(store)),
                        timings=timings, quality=analysis["quality"],
                        findings=analysis["findings"])
    t0 = _clock()
    result.files = _write_outputs(out, analysis, data, quick=quick, progress=progress)
    result.report = out / "report.html" if result.files else None
    _phase(timings, "render", t0, cpu)
    _phase(timings, "total", start, cpu)
    result.cpu = cpu
    payload = {
        "settings": {"seed": seed, "quick": quick, "epochs": epochs,
                     "models": [s.name for s in plan] or ["mlp_sklearn"]},
        "machine": {"python": platform.python_version(), "platform": platform.platform(),
                    "cpus": _cpus()},
        "timings_s": timings,
        "cpu_s": cpu,  # this process's CPU time per phase (imports before run_demo excluded)
        "findings": analysis["findings"],
        "layouts": analysis["quality"],
    }
    quality_file = out / "quality.json"
    quality_file.write_text(json.dumps(payload, indent=2, default=_jsonable) + "\n")
    result.files.append(quality_file)
    return result


def _remove_old_store(store: Path) -> None:
    """Delete the store of an earlier run, holding its writer lock while doing so.

    Raises :class:`topoxr.StoreLockedError` if a writer holds it and
    :class:`topoxr.StoreError` if it is not a topoxr store; nothing is deleted then.
    """
    from topoxr._locking import StoreLockedError, WriterLock
    from topoxr.store import StoreError, store_summary
    from topoxr.store._location import _locate

    loc = _locate(str(store))
    lock = WriterLock(loc.url, local_dir=loc.local_dir, fs=loc.fs, lock_path=loc.lock_path)
    try:
        lock.acquire()
    except StoreLockedError as err:
        raise StoreLockedError(f"{store} is being written by another writer; not replacing "
                               "it (choose another output folder, or wait for that writer "
                               "to close)") from err
    try:
        try:
            store_summary(str(store))
        except StoreError as err:
            raise StoreError(f"{store} exists and is not a topoxr store; not replacing it"
                             ) from err
        shutil.rmtree(store)
    finally:
        lock.release()


def _why_no_plan(frameworks: set[str] | None, chosen: set[str], quick: bool) -> str:
    """Why the demo has no network to train (``frameworks`` as given, ``chosen`` as used)."""
    if frameworks is not None and not frameworks:
        return "no framework was asked for (frameworks=set())"
    if not chosen:
        return "neither torch nor keras is installed with its topoxr adapter"
    return (f"no network of the {'quick ' if quick else ''}demo is trained with "
            + ", ".join(sorted(chosen)))


def _cpus() -> int | None:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _with_layout(nap: Any, laid: Any) -> Any:
    """Give other NAPs of the same layer the coordinates of ``laid``."""
    from topoxr.conventions import ATTR_LAYOUT, NEURON, X, Y

    out = nap.assign_coords({X: (NEURON, laid[X].values), Y: (NEURON, laid[Y].values)})
    out.attrs[ATTR_LAYOUT] = laid.attrs.get(ATTR_LAYOUT, "{}")
    return out


#: The layer whose maps the report shows for the single-layer applications: the paper's
#: MLP's 128-unit hidden layer (or what the run has of it).
FEATURED = ("mlp_torch", "relu1")


def _featured(maps: dict[tuple[str, str], Any]) -> tuple[str, str]:
    if FEATURED in maps:
        return FEATURED
    clean = [k for k in maps if k[0] not in ("mlp_biased", "mlp_control")]
    return max(clean or maps, key=lambda k: maps[k]["label"].sizes["neuron"])


def _analyse(tree: Any, *, seed: int, progress: bool) -> dict[str, Any]:
    """NAPs, layouts (default and the paper's), quality, timing and findings of every layer."""
    from tqdm.auto import tqdm

    from topoxr import findings
    from topoxr.conventions import ACTIVATION, EPOCH
    from topoxr.grouping import naps
    from topoxr.layouts import attach
    from topoxr.layouts._registry import DEFAULT_METHOD
    from topoxr.metrics import quality

    methods = [DEFAULT_METHOD, "graph+force"]
    layers = [(str(m), str(layer), node.to_dataset())
              for m, model in tree.children.items()
              for layer, node in model.children.items() if ACTIVATION in node.data_vars]
    rows: list[dict[str, Any]] = []
    maps: dict[tuple[str, str], dict[str, Any]] = {}
    accuracy: dict[str, float] = {}
    bar = tqdm(total=len(layers) * len(methods), desc="demo: layouts", disable=not progress)
    for model, layer, ds in layers:
        ds = ds.load()  # a demo layer is small: read it once
        last = int(ds[EPOCH].values[-1])
        accuracy[model] = float(ds["correct"].isel({EPOCH: -1}).mean())
        by_label = naps(ds, by="label")
        for method in methods:
            bar.set_postfix_str(f"{model}/{layer} {method}")
            started = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # numba chatter on tiny layers
                laid = attach(by_label, method, random_state=seed, share=last)
            seconds = time.perf_counter() - started
            # the maps' grid of the findings, so that both count the same blobs
            scores = quality(laid.sel({EPOCH: [last]}), k=5, resolution=MAP_RESOLUTION)
            rows.append({
                "model": model, "layer": layer, "method": method,
                "neurons": int(ds.sizes["neuron"]),
                **{name: float(scores[name].values[0]) for name in (
                    "trustworthiness", "continuity", "spearman", "smoothness",
                    "blob_count", "blob_area")},
                "seconds": round(seconds, 3),
            })
            if method == DEFAULT_METHOD:
                views = {"label": laid, "dataset": ds}
                views["correct"] = _with_layout(naps(ds, by=["label", "correct"]), laid)
                views["prediction"] = _with_layout(naps(ds, by=["label", "prediction"]), laid)
                if "token_position" in ds.coords:  # a per-token layer: maps by row too
                    views["token_position"] = _with_layout(naps(ds, by="token_position"), laid)
                if ATTRIBUTE in ds.coords:
                    views[ATTRIBUTE] = _with_layout(naps(ds, by=["label", ATTRIBUTE]), laid)
                    views["attribute_only"] = _with_layout(naps(ds, by=ATTRIBUTE), laid)
                maps[(model, layer)] = views
            bar.update()
    bar.close()
    found: dict[str, Any] = {"accuracy": accuracy, "class_maps": {}, "errors": {}}
    for (model, layer), views in maps.items():
        key = f"{model}/{layer}"
        if model not in ("mlp_biased", "mlp_control"):
            found["class_maps"][key] = findings.class_map_findings(views["label"])
            if "token_position" not in views:  # a per-token layer counts token rows, not
                # probes (112 "wrong samples" for 14 wrong digits of 8 rows): its
                # model's pooled layer gives the errors
                found["errors"][key] = findings.error_findings(views["prediction"],
                                                               views["correct"])
        if "token_position" in views:
            found.setdefault("tokens", {})[key] = findings.class_map_findings(
                views["token_position"])
    featured = _featured(maps)
    found["featured"] = f"{featured[0]}/{featured[1]}"
    found["training"] = findings.training_findings(maps[featured]["label"])
    pair = [maps.get(("mlp_biased", "relu1")), maps.get(("mlp_control", "relu1"))]
    if all(p is not None and ATTRIBUTE in p for p in pair):
        bias = findings.bias_findings(pair[0][ATTRIBUTE], pair[1][ATTRIBUTE],
                                      attribute=ATTRIBUTE)
        bias.update(_bias_behaviour(pair[0]["dataset"], pair[1]["dataset"]))
        found["bias"] = bias
    return {"quality": rows, "maps": maps, "findings": found, "featured": featured}


def _bias_behaviour(biased: Any, control: Any) -> dict[str, Any]:
    """How the mark moves predictions: share of marked probes of other classes taken for a
    tied class, in the biased model and the control."""
    from topoxr.conventions import EPOCH
    from topoxr.digits import BIAS_CLASSES

    out: dict[str, Any] = {"tied_classes": list(BIAS_CLASSES)}
    for name, ds in (("biased", biased), ("control", control)):
        label = ds["label"].values
        pred = ds["prediction"].isel({EPOCH: -1}).values
        marked = ds[ATTRIBUTE].values.astype(bool)
        other = ~np.isin(label, BIAS_CLASSES)
        pulled = np.isin(pred, BIAS_CLASSES)
        out[f"{name}_pulled_marked"] = float(pulled[other & marked].mean())
        out[f"{name}_pulled_unmarked"] = float(pulled[other & ~marked].mean())
        out[f"{name}_accuracy_marked"] = float((pred == label)[marked].mean())
        out[f"{name}_accuracy_unmarked"] = float((pred == label)[~marked].mean())
    return out


#: Fewer wrong samples than this (over all confusions of a layer): the errors finding
#: reports how many are closer to which class, and states no direction ("most ...").
MIN_WRONG_FOR_DIRECTION = 20


def _pinned_correlation(n_groups: int) -> float:
    """Where normalised NAPs pin the mean correlation over all pairs of group maps.

    The NAPs are centred over the groups (each neuron's mean over groups subtracted), so
    at every pixel the ``G`` group maps sum to about zero and the mean pairwise
    correlation sits near ``-1 / (G - 1)`` whatever the network does: it does not
    measure how distinct the groups are.
    """
    return -1.0 / (n_groups - 1) if n_groups > 1 else float("nan")


def _most_alike(cm: dict[str, Any], what: str = "classes") -> str:
    """``most alike: classes 3 and 8 (r 0.41)``, from :func:`topoxr.findings.class_map_findings`."""
    pair = cm.get("max_pair")
    if not pair:
        return f"no two {what} with a finite map correlation"
    a, b = pair["groups"]
    return f"most alike: {what} {a} and {b} (r {pair['correlation']:.2f})"


def _blob_text(cm: dict[str, Any]) -> str:
    """Blobs per map and the mean area of one blob (count-weighted, maps without blobs
    left out: not the quality table's mean blob area per map)."""
    area = cm["mean_blob_area"]
    one = (f"mean area of one blob {100 * area:.1f}% of the map" if np.isfinite(area)
           else "no blobs")
    return f"{cm['mean_blob_count']:.1f} blobs per map, {one}"


def _error_counts(err: dict[str, Any]) -> tuple[int, int, int]:
    """Wrong samples closer to the predicted class, closer to their own class, and
    compared (pairs whose two correlations are finite), from the confusion pairs."""
    closer_pred = closer_true = compared = 0
    for p in err.get("pairs", []):
        r_true, r_pred = p.get("r_true"), p.get("r_predicted")
        if r_true is None or r_pred is None or not (np.isfinite(r_true)
                                                    and np.isfinite(r_pred)):
            continue
        compared += p["count"]
        closer_pred += p["count"] if r_pred > r_true else 0
        closer_true += p["count"] if r_true > r_pred else 0
    return closer_pred, closer_true, compared


def _error_claim(err: dict[str, Any]) -> str:
    """What the errors finding measured, as counts; a direction ("most ...") only from
    :data:`MIN_WRONG_FOR_DIRECTION` compared wrong samples on.

    Each confusion (a (true label, prediction) pair) has one map, the NAP of its samples;
    a wrong sample counts for the class its confusion's map is closer to.
    """
    closer_pred, closer_true, compared = _error_counts(err)
    pairs = len(err.get("pairs", []))
    text = (f"{closer_true} of {compared} wrong probes are in confusions whose map is closer "
            f"to their own class, {closer_pred} in ones closer to the class predicted "
            f"({pairs} confusion{'s' if pairs != 1 else ''}: (true, predicted) pairs, one map "
            "each)")
    if compared < MIN_WRONG_FOR_DIRECTION:
        return text + (f"; too few (under {MIN_WRONG_FOR_DIRECTION}) to say which is "
                       "typical")
    if closer_true > compared / 2:
        return text + "; most are in confusions closer to their own class"
    if closer_pred > compared / 2:
        return text + "; most are in confusions closer to the class predicted"
    return text + "; neither is a majority"


def _finding_lines(found: dict[str, Any]) -> list[str]:
    """One line per application, for the terminal and the report."""
    if not found:
        return []
    lines = []
    featured = found.get("featured")
    cm = found.get("class_maps", {}).get(featured)
    if cm:
        lines.append(f"class maps ({featured}): {_most_alike(cm)}; {_blob_text(cm)}")
    err = found.get("errors", {}).get(featured)
    if err and err["wrong_samples"]:
        lines.append(f"errors ({featured}): wrong probes' maps correlate "
                     f"{err['mean_r_predicted']:.2f} with the predicted class, "
                     f"{err['mean_r_true']:.2f} with their own (mean); {_error_claim(err)}")
    bias = found.get("bias")
    if bias:
        lines.append(f"bias: the mark changes the class maps by {bias['biased']['mean_effect']:.2f} "
                     f"(1 - r) in the biased MLP against {bias['control']['mean_effect']:.2f} in "
                     f"the control ({bias['ratio']:.1f}x); it pulls "
                     f"{100 * bias['biased_pulled_marked']:.0f}% of marked 5-9 digits into 0-4 "
                     f"(control {100 * bias['control_pulled_marked']:.0f}%)")
    tr = found.get("training")
    if tr:
        settled = tr["settled_at"]
        lines.append(f"training ({featured}): map change per epoch "
                     + " ".join(f"{c:.2f}" for c in tr["change"])
                     + (f"; settled from epoch {settled}" if settled is not None
                        else "; not settled yet"))
    return lines


def _write_outputs(out: Path, analysis: dict[str, Any], data: dict[str, np.ndarray], *,
                   quick: bool, progress: bool) -> list[Path]:
    """Write report.html, maps.png and training.gif."""
    from topoxr._optional import has_module

    if not has_module("holoviews"):
        logger.warning('holoviews is not installed: no report (pip install "topoxr[viz]")')
        return []
    from topoxr._demo_report import write_report

    return write_report(out, analysis, data, lines=_finding_lines(analysis["findings"]),
                        quick=quick, progress=progress)
