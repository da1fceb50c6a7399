"""Layer selection and output handling for PyTorch modules."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from topoxr._optional import import_optional
from topoxr.reduction import LayerSpec, resolve_layer_specs
from topoxr.recording import RecordingError

torch = import_optional("torch", extra="torch", purpose="topoxr_torch")

__all__ = ["axis_rule", "check_key", "describe", "final_state", "first_tensor", "layer_names",
           "neuron_count", "resolve_specs", "select_layers", "sequence_first"]


def layer_names(model: torch.nn.Module) -> list[str]:
    """Return the dotted names of every submodule, as ``named_modules()`` gives them.

    The model itself (name ``""``) is not a layer.

    Parameters
    ----------
    model : torch.nn.Module
        The model.

    Returns
    -------
    list of str
        The names, e.g. ``"block.relu"``, in ``named_modules()`` order (each module
        before its children, in registration order). A module registered under several
        names is listed once, under the first.

    Raises
    ------
    TypeError
        If ``model`` is not a ``torch.nn.Module``.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return [name for name, _ in model.named_modules() if name]


def resolve_specs(model: torch.nn.Module, layers: Any) -> dict[str, tuple[str, LayerSpec]]:
    """Resolve names, patterns or ``{name: settings}`` to ``{layer: (module name, spec)}``.

    A name ``"block.relu:1"`` (or the setting ``{"call": 1}``) records the second call
    of a module that runs several times per forward pass.

    Raises
    ------
    RecordingError
        If a name or pattern matches no submodule (the message gives the closest names),
        or a setting is invalid.
    """
    return resolve_layer_specs(layers, layer_names(model),
                               what=f"torch model {type(model).__name__}", calls=True)


def select_layers(model: torch.nn.Module, layers: Any) -> dict[str, torch.nn.Module]:
    """Resolve names or glob patterns to ``{layer name: module}`` in model order.

    Raises
    ------
    RecordingError
        If a name or pattern matches no submodule; the message gives the closest names.
    """
    modules = dict(model.named_modules())
    return {name: modules[base] for name, (base, _) in resolve_specs(model, layers).items()}


def _types(*names: str) -> tuple[type, ...]:
    nn = torch.nn
    found = []
    for name in names:
        obj: Any = nn
        for part in name.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, type):
            found.append(obj)
    return tuple(found)


#: Modules whose output is ``(N, C, *spatial)``: the neurons are the channels (axis 1).
CHANNEL_FIRST = _types(
    "modules.conv._ConvNd", "modules.pooling._MaxPoolNd", "modules.pooling._AvgPoolNd",
    "modules.pooling._AdaptiveAvgPoolNd", "modules.pooling._AdaptiveMaxPoolNd",
    "modules.pooling._LPPoolNd", "modules.batchnorm._BatchNorm",
    "modules.instancenorm._InstanceNorm", "GroupNorm", "LocalResponseNorm", "Dropout1d",
    "Dropout2d", "Dropout3d", "Upsample",
)
#: Modules that act on the last axis ``(N, ..., H)``: the neurons are the hidden units.
LAST_AXIS = _types(
    "Linear", "Bilinear", "LayerNorm", "RMSNorm", "Embedding", "EmbeddingBag",
    "MultiheadAttention", "TransformerEncoderLayer", "TransformerDecoderLayer",
    "TransformerEncoder", "TransformerDecoder", "Transformer", "RNNBase",
)


def axis_rule(module: torch.nn.Module) -> tuple[int, str] | None:
    """The neuron axis of a module's output as its type decides it, or ``None``.

    Conv, pooling and batch/instance/group-norm outputs ``(N, C, *spatial)`` keep the
    channels (axis 1); Linear, LayerNorm, embeddings, attention and Hugging Face's
    ``Conv1D`` (a linear layer) keep the last axis. Other modules (activations, dropout,
    containers) are decided by the recorder from the output they follow (their input,
    or for a container the output of a module inside it), else by their output's rank
    (4-D and more: axis 1; 3-D: the last axis).

    The rule is matched by type, subclasses included: the recorder checks it against the
    module's own sizes (:func:`neuron_count`) before using it, as a subclass may return
    another layout (torchvision's ``LayerNorm2d`` returns ``(N, C, H, W)``).
    """
    if isinstance(module, CHANNEL_FIRST):
        return 1, f"channels of {type(module).__name__} (N, C, *spatial)"
    if isinstance(module, LAST_AXIS) or (type(module).__name__ == "Conv1D"
                                         and hasattr(module, "nf")):
        return -1, f"last axis of {type(module).__name__} (hidden units)"
    return None


def neuron_count(module: torch.nn.Module) -> tuple[int, str] | None:
    """The number of neurons a module's own sizes give its output, and which size says so.

    Parameters
    ----------
    module : torch.nn.Module
        A module of known semantics (:func:`axis_rule` is not ``None``).

    Returns
    -------
    (int, str) or None
        E.g. ``(64, "out_channels")`` of a conv, ``(8, "normalized_shape[-1]")`` of a
        LayerNorm, ``(32, "out_features")`` of a Linear; ``None`` for modules whose
        output size no attribute states (pooling, dropout, upsampling).
    """
    for attr in ("out_channels", "num_features", "num_channels", "out_features",
                 "embedding_dim", "embed_dim", "d_model", "nf"):
        value = getattr(module, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value, attr
    shape = getattr(module, "normalized_shape", None)
    if isinstance(shape, tuple | list) and shape and isinstance(shape[-1], int):
        return int(shape[-1]), "normalized_shape[-1]"
    attention = _self_attention(module)
    if attention is not None and isinstance(getattr(attention, "embed_dim", None), int):
        return int(attention.embed_dim), "embed_dim of its self-attention"
    return None


#: Modules with a ``batch_first`` setting (``False`` by default): their (first) output is
#: ``(T, N, ...)`` unless it is ``True``.
SEQUENCE_MODULES = _types(
    "RNNBase", "MultiheadAttention", "Transformer", "TransformerEncoderLayer",
    "TransformerDecoderLayer", "TransformerEncoder", "TransformerDecoder",
)
_RNN = _types("RNNBase")


def _self_attention(module: torch.nn.Module) -> Any:
    """The self-attention of a transformer layer, or of the first layer of a stack."""
    layers = getattr(module, "layers", None)
    if isinstance(layers, torch.nn.ModuleList) and len(layers):
        module = layers[0]
    return getattr(module, "self_attn", None)


def sequence_first(module: torch.nn.Module) -> bool:
    """Whether a module's first output is sequence-first, ``(T, N, ...)``.

    True for RNNs, attention and transformer modules built with ``batch_first=False``
    (torch's default), whose batch is axis 1 of their output.
    """
    if not isinstance(module, SEQUENCE_MODULES):
        return False
    owner = module if hasattr(module, "batch_first") else _self_attention(module)
    return getattr(owner, "batch_first", True) is False


def final_state(module: torch.nn.Module, output: Any, tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is the final hidden state ``h_n`` (or ``c_n``) an RNN returned.

    Those are ``(num_layers * num_directions, N, H)``: their first axis is no batch.
    """
    if not isinstance(module, _RNN) or not isinstance(output, tuple | list):
        return False
    return any(state is tensor or (isinstance(state, tuple | list)
                                   and any(part is tensor for part in state))
               for state in output[1:])


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
