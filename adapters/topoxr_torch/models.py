"""PyTorch networks on scikit-learn's 8x8 digits, for tests, the demo and examples.

- ``mlp`` and ``cnn``: small networks for fast tests (:class:`DigitsMLP`, :class:`DigitsCNN`);
- ``paper_mlp`` and ``paper_cnn``: the paper's networks, one hidden layer of 128 ReLU
  units with dropout (:class:`PaperMLP`) and two convolutions of 128 channels
  (:class:`PaperCNN`);
- ``transformer``: a small transformer that reads each digit as 8 row tokens
  (:class:`RowTransformer`), PyTorch only.

The layer names match :mod:`topoxr_keras.models` one for one, so the same ``layers=``
selects the same layers in both frameworks. Every network takes flat ``(N, 64)`` inputs
(the 8 x 8 digits need no resize: the convolutions keep their 128 channels either way).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from topoxr._optional import import_optional
from topoxr.digits import DIGITS_LAYERS, load_digits_data

torch = import_optional("torch", extra="torch", purpose="topoxr_torch.models")
nn = torch.nn

__all__ = [
    "RECORDED_LAYERS",
    "DigitsCNN",
    "DigitsMLP",
    "PaperCNN",
    "PaperMLP",
    "RowTransformer",
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


class PaperMLP(nn.Module):
    """The paper's MLP: 64 -> fc1 (128) -> relu1 -> dropout -> out (10)."""

    def __init__(self, hidden: int = 128, dropout: float = 0.2) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, hidden)
        self.relu1 = nn.ReLU()
        self.drop1 = nn.Dropout(dropout)
        self.out = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the 10 classes."""
        return self.out(self.drop1(self.relu1(self.fc1(x))))


class PaperCNN(nn.Module):
    """The paper's shallow CNN: (N, 64) -> (N, 1, 8, 8) -> conv1 (128) -> relu1 -> pool1
    -> conv2 (128) -> relu2 -> pool2 -> flatten -> out (10). 3x3 convolutions, padding 1.
    """

    def __init__(self, channels: int = 128) -> None:
        super().__init__()
        self.reshape = nn.Unflatten(1, (1, 8, 8))
        self.conv1 = nn.Conv2d(1, channels, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.out = nn.Linear(channels * 2 * 2, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the 10 classes."""
        h = self.pool1(self.relu1(self.conv1(self.reshape(x))))
        return self.out(self.flatten(self.pool2(self.relu2(self.conv2(h)))))


class TokenMean(nn.Module):
    """Mean over the token axis: ``(N, T, D) -> (N, D)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled tokens."""
        return x.mean(dim=1)


class RowTransformer(nn.Module):
    """A one-block transformer that reads a digit as a sequence of its 8 rows.

    (N, 64) -> 8 row tokens of 8 pixels -> embed (d) + learned positions -> self-attention
    (``attn``, residual, ``norm1``) -> ``ffn`` (Linear d -> ffn_width, ReLU; per token)
    -> ``proj`` (back to d, residual, ``norm2``) -> ``pool`` (mean over tokens, d) ->
    ``out`` (10). ``embed`` and ``ffn`` give one vector per token, ``pool`` one per
    sample.
    """

    def __init__(self, d: int = 64, heads: int = 4, ffn_width: int = 128) -> None:
        super().__init__()
        self.rows = nn.Unflatten(1, (8, 8))
        self.embed = nn.Linear(8, d)
        self.position = nn.Parameter(torch.zeros(1, 8, d))
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.norm1 = nn.LayerNorm(d)
        self.ffn = nn.Sequential(nn.Linear(d, ffn_width), nn.ReLU())
        self.proj = nn.Linear(ffn_width, d)
        self.norm2 = nn.LayerNorm(d)
        self.pool = TokenMean()
        self.out = nn.Linear(d, 10)
        nn.init.normal_(self.position, std=0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the 10 classes."""
        h = self.embed(self.rows(x)) + self.position
        h = self.norm1(h + self.attn(h, h, h, need_weights=False)[0])
        h = self.norm2(h + self.proj(self.ffn(h)))
        return self.out(self.pool(h))


def make_model(kind: str, *, seed: int = 0, **kwargs: Any) -> nn.Module:
    """Build a digits network with weights drawn from ``torch.manual_seed(seed)``.

    Parameters
    ----------
    kind : {"mlp", "cnn", "paper_mlp", "paper_cnn", "transformer"}
        :class:`DigitsMLP`, :class:`DigitsCNN`, :class:`PaperMLP`, :class:`PaperCNN` or
        :class:`RowTransformer`.
    seed : int, default 0
        Seed of the initial weights.
    **kwargs
        Arguments of the class (e.g. ``hidden=(64, 32)`` for the MLP, ``channels=128``
        for the paper's CNN).

    Returns
    -------
    torch.nn.Module
        The untrained network.

    Raises
    ------
    ValueError
        For another ``kind``.
    """
    classes = {"mlp": DigitsMLP, "cnn": DigitsCNN, "paper_mlp": PaperMLP, "paper_cnn": PaperCNN,
               "transformer": RowTransformer}
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
    with torch.random.fork_rng():  # dropout draws from the global generator: seed it too
        torch.manual_seed(seed)
        return _train(model, x, y, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
                      on_epoch_end=on_epoch_end)


def _train(model: nn.Module, x: np.ndarray, y: np.ndarray, *, epochs: int, lr: float,
           batch_size: int, seed: int,
           on_epoch_end: Callable[[int, dict[str, float]], None] | None) -> list[dict[str, float]]:
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
    kind : {"mlp", "cnn", "paper_mlp", "paper_cnn", "transformer"}
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
