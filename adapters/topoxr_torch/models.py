"""Small PyTorch networks on scikit-learn's 8x8 digits, for tests, the demo and examples.

The layer names match :mod:`topoxr_keras.models` one for one, so the same ``layers=``
selects the same layers in both frameworks. Both networks take flat ``(N, 64)`` inputs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from topoxr._optional import import_optional
from topoxr.demo import DIGITS_LAYERS, load_digits_data

torch = import_optional("torch", extra="torch", purpose="topoxr_torch.models")
nn = torch.nn

__all__ = [
    "RECORDED_LAYERS",
    "DigitsCNN",
    "DigitsMLP",
    "load_digits_data",
    "make_model",
    "train",
    "train_and_record",
]


class DigitsMLP(nn.Module):
    """64 -> fc1 (64) -> relu1 -> fc2 (32) -> relu2 -> out (10)."""

    def __init__(self, hidden: tuple[int, int] = (64, 32)) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, hidden[0])
        self.relu1 = nn.ReLU()
        self.fc2 = nn.Linear(hidden[0], hidden[1])
        self.relu2 = nn.ReLU()
        self.out = nn.Linear(hidden[1], 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the 10 classes."""
        return self.out(self.relu2(self.fc2(self.relu1(self.fc1(x)))))


class DigitsCNN(nn.Module):
    """(N, 64) -> reshape (N, 1, 8, 8) -> conv1 (8) -> relu1 -> pool1 (4x4) -> conv2 (16)
    -> relu2 -> flatten -> fc1 (32) -> relu3 -> out (10). Convolutions are 3x3, padding 1.
    """

    def __init__(self, channels: tuple[int, int] = (8, 16)) -> None:
        super().__init__()
        c1, c2 = channels
        self.reshape = nn.Unflatten(1, (1, 8, 8))
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(c2 * 4 * 4, 32)
        self.relu3 = nn.ReLU()
        self.out = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the 10 classes."""
        h = self.pool1(self.relu1(self.conv1(self.reshape(x))))
        h = self.flatten(self.relu2(self.conv2(h)))
        return self.out(self.relu3(self.fc1(h)))


def make_model(kind: str, *, seed: int = 0, **kwargs: Any) -> nn.Module:
    """Build ``"mlp"`` or ``"cnn"`` with weights drawn from ``torch.manual_seed(seed)``.

    Parameters
    ----------
    kind : {"mlp", "cnn"}
        :class:`DigitsMLP` or :class:`DigitsCNN`.
    seed : int, default 0
        Seed of the initial weights.
    **kwargs
        Arguments of the class (``hidden=(64, 32)`` for the MLP, ``channels=(8, 16)`` for
        the CNN).

    Returns
    -------
    torch.nn.Module
        The untrained network.

    Raises
    ------
    ValueError
        For another ``kind``.
    """
    classes = {"mlp": DigitsMLP, "cnn": DigitsCNN}
    if kind not in classes:
        raise ValueError(f"unknown model kind {kind!r}; choose one of {sorted(classes)}")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return classes[kind](**kwargs)


def train(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int = 3,
    lr: float = 1e-2,
    batch_size: int = 64,
    seed: int = 0,
    on_epoch_end: Callable[[int, dict[str, float]], None] | None = None,
) -> list[dict[str, float]]:
    """Train with Adam and cross-entropy, deterministically (seeded shuffling).

    Parameters
    ----------
    model : torch.nn.Module
        Model to train in place.
    x, y : numpy.ndarray
        Inputs ``(N, 64)`` and integer labels.
    epochs : int, default 3
        Passes over the data.
    lr : float, default 1e-2
        Adam learning rate.
    batch_size : int, default 64
        Mini-batch size.
    seed : int, default 0
        Seed of the shuffling.
    on_epoch_end : callable, optional
        ``on_epoch_end(epoch, logs)`` after each epoch, with 1-based ``epoch`` and
        ``logs = {"loss": ..., "accuracy": ...}`` (e.g. a ``ProbeRecorder.record``).

    Returns
    -------
    list of dict
        The logs of every epoch.
    """
    generator = torch.Generator().manual_seed(seed)
    xt, yt = torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.long)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    history = []
    for epoch in range(1, epochs + 1):
        model.train()
        order = torch.randperm(len(xt), generator=generator)
        total, correct = 0.0, 0
        for start in range(0, len(xt), batch_size):
            idx = order[start:start + batch_size]
            optimizer.zero_grad()
            logits = model(xt[idx])
            loss = loss_fn(logits, yt[idx])
            loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)
            correct += int((logits.argmax(1) == yt[idx]).sum())
        logs = {"loss": total / len(xt), "accuracy": correct / len(xt)}
        history.append(logs)
        if on_epoch_end is not None:
            on_epoch_end(epoch, logs)
    model.eval()
    return history


#: Layers recorded by :func:`train_and_record` (every layer with its own neurons).
RECORDED_LAYERS = DIGITS_LAYERS


def train_and_record(
    kind: str,
    store: Any,
    *,
    epochs: int = 3,
    probe_size: int = 500,
    seed: int = 0,
    model_name: str | None = None,
    progress: bool = False,
) -> nn.Module:
    """Train a digits network and record a held-out probe set at every epoch.

    The last ``probe_size`` digits are the probe set (never trained on); the network
    trains on the others. Epoch 0 is recorded before training, then one epoch per
    training epoch, with the loss and accuracy, into ``store`` as ``<kind>_torch``.

    Parameters
    ----------
    kind : {"mlp", "cnn"}
        The network.
    store : str or ActivationWriter
        Where to record.
    epochs : int, default 3
        Training epochs.
    probe_size : int, default 500
        Held-out samples recorded at every epoch.
    seed : int, default 0
        Seed of the weights and the shuffling.
    model_name : str, optional
        Model group name; default ``f"{kind}_torch"``.
    progress : bool, default False
        Show progress bars.

    Returns
    -------
    torch.nn.Module
        The trained network.
    """
    from topoxr_torch.recorder import ProbeRecorder

    x, y = load_digits_data()
    if not 0 < probe_size < len(x):
        raise ValueError(f"probe_size must be between 1 and {len(x) - 1}, got {probe_size}")
    split = len(x) - probe_size
    model = make_model(kind, seed=seed)
    probe = ProbeRecorder(model, (x[split:], y[split:]), store,
                          model_name=model_name or f"{kind}_torch",
                          layers=RECORDED_LAYERS[kind], sample_ids=np.arange(split, len(x)),
                          progress=progress)
    probe.record(0)
    train(model, x[:split], y[:split], epochs=epochs, seed=seed,
          on_epoch_end=lambda epoch, logs: probe.record(epoch, **logs))
    return model
