"""Profiles for the layout benchmarks: digits-MLP class NAPs and synthetic clusters."""

from __future__ import annotations

import warnings

import numpy as np


def digits_naps(n_hidden: int, random_state: int = 0, max_iter: int = 30) -> np.ndarray:
    """Class NAP profiles (n_hidden, 10) of an MLP briefly trained on sklearn's digits.

    The hidden ReLU activations are computed with numpy from the fitted weights, averaged
    per class, and centred per neuron over the classes (the paper's normalisation).
    """
    from sklearn.datasets import load_digits
    from sklearn.neural_network import MLPClassifier

    X, y = load_digits(return_X_y=True)
    X = X / 16.0
    mlp = MLPClassifier(hidden_layer_sizes=(n_hidden,), max_iter=max_iter,
                        random_state=random_state)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning: brief training on purpose
        mlp.fit(X, y)
    hidden = np.maximum(X @ mlp.coefs_[0] + mlp.intercepts_[0], 0.0)
    naps = np.stack([hidden[y == c].mean(axis=0) for c in np.unique(y)])  # (10, n)
    naps -= naps.mean(axis=0, keepdims=True)
    return naps.T.copy()
