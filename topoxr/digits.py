"""scikit-learn's bundled digits, prepared for the demo, the examples and the tests.

One home for the example data that both recording adapters' ``models`` modules and
:mod:`topoxr.demo` use, so that neither the core imports an adapter nor an adapter
imports the demo:

- :func:`load_digits_data`: the 1797 digits as flat ``(N, 64)`` inputs in [0, 1];
- :func:`digits_probe`: a training set and a fixed, class-balanced probe set;
- :func:`plant_bias`: a known, planted bias (a mark tied to some classes);
- :data:`DIGITS_LAYERS`: the layers of the example networks, named the same in both
  frameworks.

Only numpy and scikit-learn are used; nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["BIAS_CLASSES", "DIGITS_LAYERS", "MARK", "add_mark", "digits_probe",
           "load_digits_data", "plant_bias"]

#: Layers of the example networks (``topoxr_torch.models``, ``topoxr_keras.models``),
#: which build the same architectures under the same layer names: every layer with its
#: own neurons. ``paper_mlp`` and ``paper_cnn`` are the paper's networks (128 hidden
#: units; two convolutions of 128 channels); ``transformer`` is PyTorch only.
DIGITS_LAYERS = {
    "mlp": ["fc1", "relu1", "fc2", "relu2", "out"],
    "cnn": ["conv1", "relu1", "pool1", "conv2", "relu2", "fc1", "relu3", "out"],
    "paper_mlp": ["fc1", "relu1", "out"],
    "paper_cnn": ["conv1", "relu1", "conv2", "relu2", "out"],
    "transformer": ["embed", "ffn", "pool", "out"],
}

#: Pixels of the planted mark, as ``(rows, columns)`` of the 8 x 8 image: the top-left
#: corner and the middle of the left and right edges, the only pixels that are blank in
#: every one of the 1797 digits: no digit, of any class, carries the mark unless it is
#: planted.
MARK = ((0, 4, 4), (0, 0, 7))
#: Classes the biased training data ties the mark to.
BIAS_CLASSES = (0, 1, 2, 3, 4)


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
        Size of the probe set: a multiple of 10 (``n_probe // 10`` samples per class).
    seed : int, default 0
        Seed of the split.

    Returns
    -------
    dict
        ``x_train``, ``y_train``, ``x_probe``, ``y_probe`` (flat inputs scaled to
        [0, 1]), ``images_probe`` (8x8) and ``probe_ids``, the stable sample ids (row
        numbers in ``load_digits``).

    Raises
    ------
    ValueError
        If ``n_probe`` is not a positive multiple of 10 (the probe would have another
        size), or leaves no sample of some class for training.
    """
    if isinstance(n_probe, bool) or not isinstance(n_probe, int | np.integer) or (
            n_probe < 10 or n_probe % 10):
        raise ValueError(f"n_probe must be a positive multiple of 10 (the same number of "
                         f"samples of each of the 10 classes), got {n_probe!r}")
    x, y = load_digits_data()
    per_class = int(n_probe) // 10
    smallest = int(np.bincount(y).min())
    if per_class >= smallest:
        raise ValueError(f"n_probe={n_probe} takes {per_class} samples per class; the "
                         f"smallest class has {smallest}")
    rng = np.random.default_rng(seed)
    probe = np.sort(np.concatenate([
        rng.choice(np.flatnonzero(y == c), per_class, replace=False) for c in range(10)
    ]))
    train = np.setdiff1d(np.arange(len(y)), probe)
    return {"x_train": x[train], "y_train": y[train], "x_probe": x[probe], "y_probe": y[probe],
            "images_probe": x[probe].reshape(-1, 8, 8), "probe_ids": probe}


def add_mark(x: np.ndarray, marked: np.ndarray) -> np.ndarray:
    """Return a copy of flat 8x8 inputs with the mark (:data:`MARK`) set where ``marked``.

    Parameters
    ----------
    x : numpy.ndarray
        ``(N, 64)`` inputs in [0, 1].
    marked : numpy.ndarray
        ``(N,)`` booleans.

    Returns
    -------
    numpy.ndarray
        The inputs, marked samples with the mark's pixels at full intensity.

    Raises
    ------
    ValueError
        If the shapes do not fit.
    """
    x = np.asarray(x)
    marked = np.asarray(marked, dtype=bool)
    if x.ndim != 2 or x.shape[1] != 64 or marked.shape != (len(x),):
        raise ValueError(f"add_mark needs inputs (N, 64) and marks (N,), got {x.shape} and "
                         f"{marked.shape}")
    images = x.reshape(-1, 8, 8).copy()
    rows, cols = MARK
    images[np.flatnonzero(marked)[:, None], rows, cols] = 1.0
    return images.reshape(len(x), 64)


def plant_bias(
    data: dict[str, np.ndarray], *, tied: Sequence[int] = BIAS_CLASSES, strength: float = 0.9,
    biased: bool = True, seed: int = 0,
) -> dict[str, np.ndarray]:
    """Plant a known bias: a sensitive attribute (a mark) that training ties to classes.

    The mark (:data:`MARK`) sets pixels that are blank in every digit, so no digit carries
    it unless it is planted. In the biased training set, a sample of a ``tied`` class
    carries the mark with probability ``strength`` and any other sample with probability
    ``1 - strength``; in the control set (``biased=False``) every sample carries it with
    probability 0.5, so the mark says nothing about the class. In the probe set every
    class carries it on every other sample, whatever ``biased`` is, so both models are
    probed alike.

    Parameters
    ----------
    data : dict
        The split of :func:`digits_probe`.
    tied : sequence of int, default (0, 1, 2, 3, 4)
        Classes the biased training data ties the mark to.
    strength : float, default 0.9
        Probability of the mark on tied classes (and of its absence on the others).
    biased : bool, default True
        Tie the mark to classes (False: the control, mark independent of class).
    seed : int, default 0
        Seed of which training samples carry the mark.

    Returns
    -------
    dict
        A copy of ``data`` with marked ``x_train``/``x_probe``/``images_probe`` and the
        boolean attribute of each sample: ``marked_train``, ``marked_probe``.

    Raises
    ------
    ValueError
        If ``strength`` is not in [0.5, 1].
    """
    if not 0.5 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0.5, 1], got {strength}")
    rng = np.random.default_rng(seed)
    y_train, y_probe = data["y_train"], data["y_probe"]
    p = np.full(len(y_train), 0.5)
    if biased:
        p = np.where(np.isin(y_train, list(tied)), strength, 1.0 - strength)
    marked_train = rng.random(len(y_train)) < p
    marked_probe = np.zeros(len(y_probe), dtype=bool)
    for c in np.unique(y_probe):  # every other probe sample of each class
        marked_probe[np.flatnonzero(y_probe == c)[::2]] = True
    out = dict(data)
    out["x_train"] = add_mark(data["x_train"], marked_train)
    out["x_probe"] = add_mark(data["x_probe"], marked_probe)
    out["images_probe"] = out["x_probe"].reshape(-1, 8, 8)
    out["marked_train"], out["marked_probe"] = marked_train, marked_probe
    return out
