"""Layer selection and output handling for PyTorch modules."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from topoxr._optional import import_optional
from topoxr.recording import RecordingError, resolve_layers

torch = import_optional("torch", extra="torch", purpose="topoxr_torch")

__all__ = ["check_key", "describe", "first_tensor", "layer_names", "select_layers"]


def layer_names(model: torch.nn.Module) -> list[str]:
    """Return the dotted names of every submodule, as ``named_modules()`` gives them.

    The model itself (name ``""``) is not a layer.

    Raises
    ------
    TypeError
        If ``model`` is not a ``torch.nn.Module``.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return [name for name, _ in model.named_modules() if name]


def select_layers(model: torch.nn.Module, layers: Any) -> dict[str, torch.nn.Module]:
    """Resolve names or glob patterns to ``{name: module}`` in model order.

    Raises
    ------
    RecordingError
        If a name or pattern matches no submodule; the message lists them all.
    """
    names = resolve_layers(layers, layer_names(model), what=f"torch model {type(model).__name__}")
    modules = dict(model.named_modules())
    return {name: modules[name] for name in names}


def first_tensor(output: Any, key: str | int | None = None) -> torch.Tensor | None:
    """Pick the tensor to record from what a module returned.

    Parameters
    ----------
    output : Any
        A tensor, a tuple/list or a mapping (e.g. ``{"logits": ..., "hidden": ...}``).
    key : str or int, optional
        The entry to take from a tuple/list (int) or a mapping (str); by default the
        first tensor.

    Returns
    -------
    torch.Tensor or None
        ``None`` if no tensor was found.
    """
    if isinstance(output, torch.Tensor):
        return output if key is None else None
    if isinstance(output, Mapping):
        if key is not None:
            value = output.get(key)
            return value if isinstance(value, torch.Tensor) else None
        values = list(output.values())
    elif isinstance(output, tuple | list):
        if key is not None:
            if not isinstance(key, int) or not -len(output) <= key < len(output):
                return None
            value = output[key]
            return value if isinstance(value, torch.Tensor) else None
        values = list(output)
    else:
        return None
    return next((v for v in values if isinstance(v, torch.Tensor)), None)


def describe(output: Any) -> str:
    """A short description of a module's output for error messages."""
    if isinstance(output, Mapping):
        return f"a {type(output).__name__} with keys {list(output)}"
    if isinstance(output, tuple | list):
        return f"a {type(output).__name__} of {[type(v).__name__ for v in output]}"
    return f"a {type(output).__name__}"


def check_key(layer: str, key: Any) -> None:
    """Refuse output keys that are neither str nor int."""
    if key is not None and (isinstance(key, bool) or not isinstance(key, str | int)):
        raise RecordingError(f"output key of layer {layer!r} must be a str or int, got {key!r}")
