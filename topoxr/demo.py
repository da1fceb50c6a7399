"""The embedded demo: scikit-learn's digits, recorded, laid out and drawn.

``topoxr demo`` (and ``make demo``) runs :func:`run_demo`:

1. a fixed, class-balanced probe set is split off scikit-learn's bundled digits;
2. a small MLP and a small CNN are trained in PyTorch, and the same MLP (same initial
   weights, copied from PyTorch) in Keras; the probe set is recorded before training
   (epoch 0) and after every epoch into ``DIR/activations.zarr``;
3. NAPs by class, by (class, correct) and by (class, prediction) are computed for every
   recorded layer;
4. every layer is laid out with topoxr's default method and with the paper's
   ``umap+force`` (``graph+force`` with ``quick``, which skips UMAP's one-off JIT
   compilation), and both are scored (trustworthiness, smoothness) and timed;
5. ``DIR/report.html`` (self-contained, works offline), ``DIR/maps.png`` and
   ``DIR/training.gif`` are written.

Without PyTorch or Keras installed, the demo records scikit-learn's ``MLPClassifier``
instead, so the core pipeline can always be seen. Every step uses only data that ships
with scikit-learn; the same seed gives the same numbers.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["DIGITS_LAYERS", "DemoResult", "digits_probe", "load_digits_data", "record_sklearn_mlp",
           "run_demo"]

logger = logging.getLogger(__name__)

#: Layers recorded per demo model: ``{model_name: (framework, kind, layers)}``.
DEMO_MODELS = {
    "mlp_torch": ("torch", "mlp", ["relu1", "relu2"]),
    "cnn_torch": ("torch", "cnn", ["relu1", "relu2", "relu3"]),
    "mlp_keras": ("keras", "mlp", ["relu1", "relu2"]),
}


@dataclass
class DemoResult:
    """What the demo produced."""

    out: Path
    store: Path
    summary: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)
    report: Path | None = None
    quality: list[dict[str, Any]] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)

    def summary_text(self) -> str:
        """A human-readable account of the run."""
        from topoxr.cli import format_summary

        lines = [format_summary(self.summary)]
        if self.quality:
            lines += ["", f"{'model':<12}{'layer':<8}{'method':<12}{'trust':>7}{'smooth':>8}{'sec':>7}"]
            for row in self.quality:
                lines.append(
                    f"{row['model']:<12}{row['layer']:<8}{row['method']:<12}"
                    f"{row['trustworthiness']:>7.3f}{row['smoothness']:>8.3f}{row['seconds']:>7.2f}"
                )
        lines += ["", "timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in self.timings.items())]
        lines += [f"wrote {path}" for path in self.files]
        return "\n".join(lines)


#: Layers of the digits example models (``topoxr_torch.models``, ``topoxr_keras.models``),
#: which build the same architectures under the same layer names: every layer with its
#: own neurons.
DIGITS_LAYERS = {
    "mlp": ["fc1", "relu1", "fc2", "relu2", "out"],
    "cnn": ["conv1", "relu1", "pool1", "conv2", "relu2", "fc1", "relu3", "out"],
}


def load_digits_data() -> tuple[np.ndarray, np.ndarray]:
    """Return scikit-learn's bundled digits, ready for the example models.

    Returns
    -------
    x : numpy.ndarray
        ``(1797, 64)`` float32 pixel values scaled to [0, 1].
    y : numpy.ndarray
        ``(1797,)`` int64 class labels.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    return (digits.data / 16.0).astype(np.float32), digits.target.astype(np.int64)


def digits_probe(n_probe: int = 360, *, seed: int = 0) -> dict[str, np.ndarray]:
    """Split scikit-learn's digits into a training set and a fixed, class-balanced probe set.

    Parameters
    ----------
    n_probe : int, default 360
        Size of the probe set (``n_probe // 10`` samples per class).
    seed : int, default 0
        Seed of the split.

    Returns
    -------
    dict
        ``x_train``, ``y_train``, ``x_probe``, ``y_probe`` (flat inputs scaled to
        [0, 1]), ``images_probe`` (8x8) and ``probe_ids``, the stable sample ids (row
        numbers in ``load_digits``).
    """
    from sklearn.datasets import load_digits

    x, y = load_digits_data()
    images = load_digits().images
    rng = np.random.default_rng(seed)
    per_class = max(1, n_probe // 10)
    probe = np.sort(np.concatenate([
        rng.choice(np.flatnonzero(y == c), per_class, replace=False) for c in range(10)
    ]))
    train = np.setdiff1d(np.arange(len(y)), probe)
    return {"x_train": x[train], "y_train": y[train], "x_probe": x[probe], "y_probe": y[probe],
            "images_probe": images[probe] / 16.0, "probe_ids": probe}


def record_sklearn_mlp(
    store: str | Path, data: dict[str, np.ndarray], *, epochs: int = 5, hidden: int = 64,
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
        The split returned by :func:`digits_probe`.
    epochs : int, default 5
        Training epochs (epochs ``0..epochs`` are recorded).
    hidden : int, default 64
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


def _record_torch(store: Path, data: dict, kind: str, name: str, layers: list[str], *,
                  epochs: int, seed: int) -> Any:
    from topoxr_torch import ProbeRecorder
    from topoxr_torch.models import make_model, train

    model = make_model(kind, seed=seed)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    probe = ProbeRecorder(model, (data["x_probe"], data["y_probe"]), str(store), model_name=name,
                          layers=layers, sample_ids=data["probe_ids"])
    probe.record(0)
    train(model, data["x_train"], data["y_train"], epochs=epochs, seed=seed,
          on_epoch_end=lambda epoch, logs: probe.record(epoch, **logs))
    model.load_state_dict(initial)  # hand the *initial* weights to the Keras twin
    return model


def _record_keras(store: Path, data: dict, kind: str, name: str, layers: list[str], *,
                  epochs: int, seed: int, torch_twin: Any = None) -> None:
    from topoxr_keras import RecordActivations
    from topoxr_keras.models import copy_torch_weights_to_keras, make_model, train

    model = make_model(kind, seed=seed)
    if torch_twin is not None:
        copy_torch_weights_to_keras(torch_twin, model)
    callback = RecordActivations((data["x_probe"], data["y_probe"]), str(store), model_name=name,
                                 layers=layers, sample_ids=data["probe_ids"])
    train(model, data["x_train"], data["y_train"], epochs=epochs, seed=seed, callbacks=[callback])


def _frameworks() -> set[str]:
    from topoxr._optional import has_module

    return {name for name in ("torch", "keras") if has_module(name)}


def _with_layout(nap: Any, laid: Any) -> Any:
    """Give other NAPs of the same layer the coordinates of ``laid``."""
    from topoxr.conventions import ATTR_LAYOUT, NEURON, X, Y

    out = nap.assign_coords({X: (NEURON, laid[X].values), Y: (NEURON, laid[Y].values)})
    out.attrs[ATTR_LAYOUT] = laid.attrs.get(ATTR_LAYOUT, "{}")
    return out


def run_demo(
    out: str | Path = "demo-output", *, seed: int = 0, quick: bool = False, progress: bool = True
) -> DemoResult:
    """Run the demo and return what it produced.

    Parameters
    ----------
    out : str or Path, default "demo-output"
        Output folder; the store is ``out/activations.zarr`` (replaced if present).
    seed : int, default 0
        Seed of every random step; the same seed gives the same numbers.
    quick : bool, default False
        Three epochs, no CNN, and the paper's ``graph+force`` instead of ``umap+force``
        as the comparison, for a run of about a minute.
    progress : bool, default True
        Show progress bars.

    Returns
    -------
    DemoResult
    """
    from tqdm.auto import tqdm

    from topoxr.store import StoreError, open_store, store_summary

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    store = out / "activations.zarr"
    if store.exists():
        try:
            store_summary(str(store))
        except StoreError as err:
            raise StoreError(f"{store} exists and is not a topoxr store; not replacing it") from err
        shutil.rmtree(store)
    timings: dict[str, float] = {}
    epochs = 3 if quick else 8
    data = digits_probe(seed=seed)
    frameworks = _frameworks()
    plan = {name: spec for name, spec in DEMO_MODELS.items() if spec[0] in frameworks}
    if quick:
        plan = {k: v for k, v in plan.items() if k != "cnn_torch"}

    t0 = time.perf_counter()
    steps = tqdm(total=len(plan) or 1, desc="demo: train + record", disable=not progress)
    if not plan:
        logger.warning("neither torch nor keras is installed: recording scikit-learn's MLP")
        record_sklearn_mlp(store, data, epochs=epochs, seed=seed, progress=progress)
        steps.update()
    twin = None
    for name, (framework, kind, layers) in plan.items():
        steps.set_postfix_str(name)
        if framework == "torch":
            model = _record_torch(store, data, kind, name, layers, epochs=epochs, seed=seed)
            twin = model if kind == "mlp" else twin
        else:
            _record_keras(store, data, kind, name, layers, epochs=epochs, seed=seed,
                          torch_twin=twin)
        steps.update()
    steps.close()
    timings["record"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    tree = open_store(str(store))
    analysis = _analyse(tree, seed=seed, progress=progress, quick=quick, timings=timings)
    timings["analyse"] = time.perf_counter() - t0

    result = DemoResult(out=out, store=store, summary=store_summary(str(store)),
                        timings=timings, quality=analysis["quality"])
    t0 = time.perf_counter()
    result.files = _write_outputs(out, analysis, data, progress=progress)
    result.report = out / "report.html"
    timings["render"] = time.perf_counter() - t0
    (out / "quality.json").write_text(json.dumps(result.quality, indent=2) + "\n")
    return result


def _paper_method(quick: bool, timings: dict[str, float]) -> str:
    """The paper's method to compare with: ``umap+force``, its JIT compilation timed apart.

    UMAP's numba kernels compile on first use (tens of seconds on 2 cores); that one-off
    cost is measured separately so the table compares the methods themselves. ``--quick``
    compares with the paper's ``graph+force`` instead, which needs no compilation.
    """
    from topoxr._optional import has_module

    if quick or not has_module("umap"):
        return "graph+force"
    from topoxr.layouts._registry import get_estimator

    started = time.perf_counter()
    warm = np.random.default_rng(0).random((40, 6))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        get_estimator("umap", random_state=0).fit_transform(warm)
    timings["umap compile"] = time.perf_counter() - started
    return "umap+force"


def _analyse(tree: Any, *, seed: int, progress: bool, quick: bool = False,
             timings: dict[str, float] | None = None) -> dict[str, Any]:
    """NAPs, layouts (default and the paper's), quality and timing for every layer."""
    from tqdm.auto import tqdm

    from topoxr.conventions import ACTIVATION, EPOCH
    from topoxr.layouts._registry import DEFAULT_METHOD
    from topoxr.layouts import attach
    from topoxr.grouping import naps
    from topoxr.metrics import quality

    methods = [DEFAULT_METHOD, _paper_method(quick, timings if timings is not None else {})]
    layers = [(str(m), str(layer), node.to_dataset())
              for m, model in tree.children.items()
              for layer, node in model.children.items() if ACTIVATION in node.data_vars]
    rows: list[dict[str, Any]] = []
    maps: dict[tuple[str, str], dict[str, Any]] = {}
    bar = tqdm(total=len(layers) * len(methods), desc="demo: layouts", disable=not progress)
    for model, layer, ds in layers:
        ds = ds.load()  # a demo layer is small: read it once
        last = int(ds[EPOCH].values[-1])
        by_label = naps(ds, by="label")
        for method in methods:
            bar.set_postfix_str(f"{model}/{layer} {method}")
            started = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # numba/umap chatter on tiny layers
                laid = attach(by_label, method, random_state=seed, share=last)
            seconds = time.perf_counter() - started
            scores = quality(laid.sel({EPOCH: [last]}), k=5)
            rows.append({
                "model": model, "layer": layer, "method": method,
                "neurons": int(ds.sizes["neuron"]),
                "trustworthiness": float(scores["trustworthiness"].values[0]),
                "continuity": float(scores["continuity"].values[0]),
                "spearman": float(scores["spearman"].values[0]),
                "smoothness": float(scores["smoothness"].values[0]),
                "seconds": round(seconds, 3),
            })
            if method == DEFAULT_METHOD:
                maps[(model, layer)] = {
                    "label": laid,
                    "contrast": _with_layout(naps(ds, by=["label", "correct"]), laid),
                    "confusion": _with_layout(naps(ds, by=["label", "prediction"]), laid),
                }
            bar.update()
    bar.close()
    return {"quality": rows, "maps": maps}


def _write_outputs(out: Path, analysis: dict[str, Any], data: dict[str, np.ndarray], *,
                   progress: bool) -> list[Path]:
    """Write report.html, maps.png and training.gif."""
    from topoxr._optional import has_module

    if not has_module("holoviews"):
        logger.warning('holoviews is not installed: no report (pip install "topoxr[viz]")')
        return []
    from topoxr.alignment import align
    from topoxr.viz import (
        Report,
        class_row,
        compare_models,
        confusion_grid,
        contrast_grid,
        example_inputs,
        save_gif,
        save_png,
        training_animation,
    )

    maps = analysis["maps"]
    examples = example_inputs(data["images_probe"], data["y_probe"])
    report = Report(
        "topoxr demo: digits networks",
        description=(
            "Topographic activation maps of small networks trained on scikit-learn's digits. "
            "Each map places a layer's neurons on a plane so that neurons with similar class "
            "responses sit together (topoxr's default layout), and colours the plane by the "
            "normalised mean activation (NAP) of one group of probe samples: red above the "
            "neuron's average over groups, blue below. Colour limits are shared per layer."
        ),
    )
    for (model, layer), views in maps.items():
        report.add_section(f"{model} / {layer}: class maps (last epoch)",
                           class_row(views["label"], examples=examples))
    # The featured layer of the single-layer views: the widest layer (most neurons), which
    # makes the most readable map (the demo's PyTorch MLP's first hidden layer).
    first = max(maps, key=lambda key: (maps[key]["label"].sizes["neuron"], key[0] == "mlp_torch"))
    report.add_section(f"{first[0]} / {first[1]}: training process",
                       training_animation(maps[first]["label"]),
                       text="The probe set recorded at every epoch (0 = before training), drawn "
                            "on one fixed layout: use the slider or the play button.")
    report.add_section(f"{first[0]} / {first[1]}: correct vs wrong",
                       contrast_grid(maps[first]["contrast"]),
                       text="Per class, samples the network got right (top) and wrong (bottom), "
                            "last epoch. Classes without errors have no bottom map.")
    report.add_section(f"{first[0]} / {first[1]}: confusion grid",
                       confusion_grid(maps[first]["confusion"]),
                       text="One map per (true label, prediction) pair that occurs.")
    pair = [key for key in maps if key[1] == "relu2" and key[0] in ("mlp_torch", "mlp_keras")]
    if len(pair) == 2:
        torch_naps, keras_naps = maps[("mlp_torch", "relu2")]["label"], maps[("mlp_keras", "relu2")]["label"]
        keras_aligned = align(keras_naps, torch_naps, match="activity")
        report.add_section("PyTorch and Keras side by side (mlp / relu2)",
                           compare_models({"PyTorch": torch_naps, "Keras": keras_aligned}),
                           text="The same MLP (identical initial weights) trained in both "
                                "frameworks; the Keras layout is aligned onto the PyTorch one "
                                "by matching neurons on their activity (linear assignment, "
                                "then Procrustes).")
    report.add_section("Layout quality and time", analysis["quality"],
                       text="Trustworthiness and continuity (k = 5), Spearman correlation of "
                            "profile and map distances, smoothness (lower is smoother), "
                            "seconds per layout on this machine.")
    files = [report.save(out / "report.html")]
    files.append(save_png(class_row(maps[first]["label"], examples=examples), out / "maps.png"))
    files.append(save_gif(maps[first]["label"], out / "training.gif", progress=progress))
    return files
