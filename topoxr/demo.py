"""The embedded demo: scikit-learn's digits, recorded, laid out and drawn.

``topoxr demo`` (and ``make demo``) runs :func:`run_demo`. Every step uses only data
that ships with scikit-learn, so the demo runs offline.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["DemoResult", "digits_probe", "record_sklearn_mlp", "run_demo"]

logger = logging.getLogger(__name__)


@dataclass
class DemoResult:
    """What the demo produced."""

    out: Path
    store: Path
    summary: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)
    report: Path | None = None
    quality: list[dict[str, Any]] = field(default_factory=list)

    def summary_text(self) -> str:
        """A human-readable account of the run."""
        from topoxr.cli import format_summary

        lines = [format_summary(self.summary)]
        if self.quality:
            lines.append("")
            lines.append(f"{'model':<14}{'layer':<12}{'method':<18}{'trust':>7}{'smooth':>8}{'sec':>7}")
            for row in self.quality:
                lines.append(
                    f"{row['model']:<14}{row['layer']:<12}{row['method']:<18}"
                    f"{row['trustworthiness']:>7.3f}{row['smoothness']:>8.3f}{row['seconds']:>7.2f}"
                )
        lines.append("")
        lines.append("timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in self.timings.items()))
        if self.report is not None:
            lines.append(f"report: {self.report}")
        return "\n".join(lines)


def digits_probe(n_probe: int = 360, *, seed: int = 0) -> dict[str, np.ndarray]:
    """Split scikit-learn's digits into a training set and a fixed, class-balanced probe set.

    Returns
    -------
    dict
        ``x_train``, ``y_train``, ``x_probe``, ``y_probe`` (inputs scaled to [0, 1]) and
        ``probe_ids``, the stable sample ids (row numbers in ``load_digits``).
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    per_class = max(1, n_probe // 10)
    probe = np.sort(np.concatenate([
        rng.choice(np.flatnonzero(y == c), per_class, replace=False) for c in range(10)
    ]))
    train = np.setdiff1d(np.arange(len(y)), probe)
    return {"x_train": x[train], "y_train": y[train], "x_probe": x[probe], "y_probe": y[probe],
            "probe_ids": probe}


def record_sklearn_mlp(
    store: str | Path, data: dict[str, np.ndarray], *, epochs: int = 5, hidden: int = 64,
    seed: int = 0, progress: bool = True, model_name: str = "mlp_sklearn",
) -> None:
    """Train scikit-learn's ``MLPClassifier`` with ``partial_fit`` and record its hidden layer.

    The hidden activations are computed with numpy from the fitted weights on the fixed
    probe set after every epoch. scikit-learn initialises weights only inside
    ``partial_fit``, so epoch 0 is the network after a single one-sample step.
    """
    import warnings

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
                        clf.partial_fit(data["x_train"][batch], data["y_train"][batch], classes=classes)
            else:
                clf.partial_fit(data["x_train"][:1], data["y_train"][:1], classes=classes)
            hidden_act = np.maximum(x_probe @ clf.coefs_[0] + clf.intercepts_[0], 0.0)
            prediction = clf.predict(x_probe)
            writer.write("hidden", hidden_act, sample=ids, label=y_probe,
                         prediction=prediction, epoch=epoch)
            writer.complete_epoch(epoch)
            writer.log_epoch(epoch, accuracy=float((prediction == y_probe).mean()))


def run_demo(
    out: str | Path = "demo-output", *, seed: int = 0, quick: bool = False, progress: bool = True
) -> DemoResult:
    """Run the demo and return what it produced.

    Parameters
    ----------
    out : str or Path, default "demo-output"
        Output folder; the store is ``out/activations.zarr``.
    seed : int, default 0
        Seed of every random step; the same seed gives the same numbers.
    quick : bool, default False
        Fewer epochs, for a run under a minute.
    progress : bool, default True
        Show progress bars.

    Returns
    -------
    DemoResult
    """
    from topoxr.store import store_summary

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    store = out / "activations.zarr"
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    data = digits_probe(seed=seed)
    record_sklearn_mlp(store, data, epochs=3 if quick else 6, seed=seed, progress=progress)
    timings["record"] = time.perf_counter() - t0
    return DemoResult(out=out, store=store, summary=store_summary(str(store)), timings=timings)
