"""Record the layers of a PyTorch model with forward hooks."""

from __future__ import annotations

import contextlib
import fnmatch
import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from topoxr._codecs import DEFAULT_COMPRESSOR
from topoxr._optional import import_optional
from topoxr.reduction import MASKED_REDUCTIONS, LayerSpec
from topoxr.recording import (
    RecordingError,
    RecordResult,
    check_recorded_epoch,
    completed_epochs,
    iter_array_batches,
    number_batches,
    positional_mask_length,
    positional_mask_message,
    prepare_arrays,
    run_recording,
    stored_unless_recorded,
)
from topoxr_torch._select import axis_rule, check_key, describe, first_tensor, resolve_specs

torch = import_optional("torch", extra="torch", purpose="topoxr_torch")

__all__ = ["Capture", "ProbeRecorder", "capture", "record"]


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """Detach, move to the CPU and copy (so later in-place ops cannot change it)."""
    tensor = tensor.detach()
    if tensor.device.type == "cpu":
        tensor = tensor.clone()
    else:
        tensor = tensor.cpu()
    if tensor.dtype in (torch.bfloat16, torch.float16):
        tensor = tensor.float()
    return tensor.numpy()


def _pool(tensor: torch.Tensor, neuron_axis: int, reduce: str) -> np.ndarray:
    """Mean or max of every neuron over the other non-batch axes, ``(batch, neurons)``.

    Computed by torch on the tensor's device, with its compute threads, from the
    tensor's own memory (the maps are not copied; the mean accumulates in float32 or
    wider), and returned as fresh float32 memory on the CPU: the same values as
    :func:`topoxr.reduction.pool_positions` on the copied maps, to float32 rounding.
    """
    axis = neuron_axis % tensor.ndim
    dims = tuple(d for d in range(1, tensor.ndim) if d != axis)
    if reduce == "max":
        pooled = tensor.amax(dim=dims).float()
    elif tensor.dtype in (torch.float32, torch.float64):
        # the same values as with dtype= (checked bit for bit), and faster: with dtype=
        # torch takes a slower path even where no conversion is needed (0.57 against
        # 0.45 ms for a (64, 64, 32, 32) float32 output not in cache, 2 threads)
        pooled = tensor.mean(dim=dims).float()
    else:  # half precision and integers accumulate in float32
        pooled = tensor.mean(dim=dims, dtype=torch.float32).float()
    return pooled.cpu().numpy() if pooled.device.type != "cpu" else pooled.numpy()


def _model_device_dtype(model: torch.nn.Module) -> tuple[Any, Any]:
    param = next(iter(model.parameters()), None)
    if param is None:
        return torch.device("cpu"), torch.get_default_dtype()
    return param.device, param.dtype


def _as_input(x: Any, device: Any, dtype: Any) -> Any:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if isinstance(x, torch.Tensor):
        if x.is_floating_point() and x.dtype != dtype:
            x = x.to(dtype)
        return x.to(device, non_blocking=True)
    if isinstance(x, Mapping):
        return {k: _as_input(v, device, dtype) for k, v in x.items()}
    if isinstance(x, tuple | list):
        return type(x)(_as_input(v, device, dtype) for v in x)
    return x


def _call(model: torch.nn.Module, x: Any) -> Any:
    """Dict inputs are keyword arguments (``input_ids=...``), tuples positional ones."""
    if isinstance(x, Mapping):
        return model(**x)
    if isinstance(x, tuple | list):
        return model(*x)
    return model(x)


def _final_tensor(out: Any) -> torch.Tensor | None:
    """The model output predictions come from: ``.logits`` of a ModelOutput, or the first."""
    if isinstance(out, Mapping) and isinstance(out.get("logits"), torch.Tensor):
        return out["logits"]
    return first_tensor(out)


def _output_keys(layers: list[str], output_keys: Mapping[str, Any] | None) -> dict[str, Any]:
    keys: dict[str, Any] = {}
    for pattern, key in (output_keys or {}).items():
        hits = [name for name in layers if name == pattern or fnmatch.fnmatchcase(name, pattern)]
        if not hits:
            raise RecordingError(
                f"output_keys names {pattern!r}, which is not a recorded layer ({layers})"
            )
        for name in hits:
            check_key(name, key)
            keys[name] = key
    return keys


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` share their memory (one is a view of the other)."""
    try:
        return (a.device == b.device
                and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr())
    except (RuntimeError, NotImplementedError):  # no storage (a tensor subclass)
        return False


def _followed_axis(axis: int, shape: tuple[int, ...], strides: tuple[int, ...], seq: bool,
                   tensor: torch.Tensor, source: torch.Tensor | None
                   ) -> tuple[int, bool] | None:
    """The axis of ``tensor`` holding the neurons of the followed output of ``shape`` and
    ``strides`` (its neuron axis ``axis``, sequence-first or not: ``seq``), and whether
    ``tensor`` is sequence-first; None where ``tensor`` does not keep them.

    ``source`` is the module's input that is that output, or for a container's output
    that is a view of it, the tensor both view (None for a container's output that is
    the followed output itself or has its shape and strides). The
    output keeps the input's neuron axis where its shape is the input's (for a view of
    the input, its strides too). A view of the input of its rank but another shape or
    strides (a permute, a transpose, a crop) holds the neurons at its one axis of the
    same size and stride; a view of another rank (a flatten) is not followed. A copy of
    another shape keeps them where it is no permutation of the input (its sizes,
    sorted, differ) and the neurons' size is at the same axes
    (a crop of positions, a pooling): a permuted copy is not followed, as which of its
    axes holds the neurons is not known (a channels-last map permuted back with as many
    columns as channels had its columns taken for the channels).
    """
    out_shape = tuple(tensor.shape)
    if source is not None and _same_storage(tensor, source):  # a view of the input
        out_strides = tuple(tensor.stride())
        if out_shape == shape and all(a == b for a, b, n in zip(out_strides, strides, shape,
                                                                  strict=True) if n > 1):
            return axis, seq
        size, stride = shape[axis], strides[axis]
        hits = [d for d, (n, st) in enumerate(zip(out_shape, out_strides, strict=True))
                if n == size and st == stride]
        if size <= 1 or len(hits) != 1 or len(out_shape) != len(shape):
            return None
        # still sequence-first where the view keeps the first two axes (T, N) as they were
        keeps = seq and len(out_shape) >= 2 and all(
            (out_shape[d], out_strides[d]) == (shape[d], strides[d]) for d in (0, 1))
        return hits[0], keeps
    if out_shape == shape:
        return axis, seq
    if len(out_shape) != len(shape) or sorted(out_shape) == sorted(shape):
        return None
    size = shape[axis]
    if ({d for d, n in enumerate(out_shape) if n == size}
            != {d for d, n in enumerate(shape) if n == size}):
        return None
    return axis, seq


def _host_array(value: Any) -> np.ndarray | None:
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, torch.Tensor) and not value.is_nested:
        return value.detach().cpu().numpy()
    return None


def _refuse_positional_mask(name: str, spec: LayerSpec, reduce: str, tensor: torch.Tensor,
                            axis: int, length: int) -> None:
    """Refuse a token reduction of ``name``'s ``(N, T, H)`` output over positional inputs
    whose second looks like an attention mask (see
    :func:`topoxr.recording.positional_mask_length`).

    A warning would let values reduced over padding into the store, where they look
    right (``topoxr_masked`` false is easily missed), and the store's layer cannot be
    recorded again with other values under its name: refused before anything is written.
    """
    mode = spec.reduce or reduce
    if spec.channel_axis is not None:
        axis = spec.channel_axis
    if (tensor.ndim != 3 or axis % 3 != 2 or int(tensor.shape[1]) != length
            or mode not in MASKED_REDUCTIONS or spec.mask is False):
        return
    raise RecordingError(positional_mask_message(name, mode, length))


def _nested_message(name: str, kind: str, base: str, modules: Mapping[str, Any]) -> str:
    """Why a layer whose output is a nested tensor is refused, and what to record."""
    encoder = next((owner for owner in _owners(base)
                    if type(modules.get(owner)).__name__ == "TransformerEncoder"), None)
    where = (f"record {encoder!r} (the TransformerEncoder, whose output is padded again), "
             "or build it with enable_nested_tensor=False" if encoder is not None else
             "record a module whose output is padded again (the TransformerEncoder), or "
             "build the TransformerEncoder with enable_nested_tensor=False")
    return (f"layer {name!r} ({kind}) returned a nested tensor: torch's nested-tensor fast "
            "path (nn.TransformerEncoder with a src_key_padding_mask, in eval mode without "
            "autograd) runs its layers on the real tokens of each input only, with no "
            f"padded (batch, tokens, hidden) shape to record; {where}")


def _owners(name: str) -> list[str]:
    """The names of the modules holding ``name``, innermost first."""
    parts = name.split(".")
    return [".".join(parts[:k]) for k in range(len(parts) - 1, 0, -1)]


class Capture:
    """The forward function of :func:`capture`, with what it learnt about the layers.

    Attributes
    ----------
    plans_in_first_batch : bool
        True: :func:`topoxr.recording.run_recording` sets :attr:`planner` for the
        first batch; each layer's plan is then made from its output's first sample as
        the layer runs, and the layer is pooled at once where the plan pools it. No
        batch of whole maps is copied out, and the model runs once per batch.
    planner : callable or None
        ``planner(layer, first_sample) -> (neuron axis, "mean" | "max") or None``, set
        by the recording loop for one call: where it returns a pair, the layer is
        pooled so, in this call and the later ones (entered in :attr:`pool`).
    layers : list of str
        Recorded layer names (``"name:k"`` for call ``k`` of a shared module).
    specs : dict of str to LayerSpec
        Per-layer settings.
    axes, rules : dict
        Neuron axis of each layer's output and how it was chosen, filled by the first
        forward pass.
    """

    plans_in_first_batch = True

    def __init__(self, fn: Any, layers: list[str], specs: dict[str, LayerSpec],
                 axes: dict[str, int], rules: dict[str, str],
                 pool: dict[str, tuple[int, str]] | None = None) -> None:
        self._fn = fn
        self.layers, self.specs, self.axes, self.rules = layers, specs, axes, rules
        #: Layers pooled as they are captured, ``{layer: (neuron axis, "mean"|"max")}``:
        #: their outputs come as ``(batch, channels, 1)`` (set by the recording loop).
        self.pool = {} if pool is None else pool
        self.planner: Callable[[str, np.ndarray], tuple[int, str] | None] | None = None

    def __call__(self, x: Any) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
        """Run one batch; return ``({layer: ndarray}, model output ndarray or None)``."""
        return self._fn(x)


@contextlib.contextmanager
def capture(
    model: torch.nn.Module,
    layers: Any,
    *,
    output_keys: Mapping[str, str | int] | None = None,
    reduce: str = "mean",
) -> Iterator[Capture]:
    """Hook ``layers`` of ``model`` for the duration of the block.

    Inside the block the model is in eval mode; on exit, errors included, every hook is
    removed and each module's train/eval state is restored.

    Parameters
    ----------
    model : torch.nn.Module
        The model.
    layers : str, sequence of str or mapping
        Names, patterns or ``{name: settings}`` (see :func:`record`).
    output_keys : mapping, optional
        ``{layer or pattern: key}`` for layers returning a tuple or mapping.
    reduce : str, default "mean"
        The recording's reduction of the layers whose settings give none: token
        reductions over a positional attention mask are refused (see Raises).

    Yields
    ------
    Capture
        ``forward(x) -> ({layer: ndarray}, model output ndarray or None)``, run under
        :func:`torch.no_grad`, outputs moved to the CPU; dict inputs are passed as
        keyword arguments, tuples as positional ones. Not under
        :func:`torch.inference_mode`: what a module makes in the first forward pass (the
        weights of ``nn.LazyLinear``, a table it keeps) would stay an inference tensor,
        which never trains, when a recording is the model's first forward pass.

    Notes
    -----
    A layer's neuron axis is decided in the first forward pass: by its type, where its
    output has the size the module's own parameters give (``out_channels``,
    ``normalized_shape``...); else as the output it follows (an activation's input, or
    for a container the output it returns, that of a module of known axis); else by its
    output's rank. An output follows its input where it has the input's shape (a view of
    the input: its strides too); a view of its rank but another shape or strides (a
    module that permutes, transposes or crops) where one of its axes has the size and
    stride of the input's neuron axis; a copy of another shape where it is no
    permutation of the input and the neurons' size stays at the same axes (a crop or
    pooling of positions). A
    permuted copy, or a module whose input is no output followed, is decided by its
    output's rank. A sequence-first output ``(T, N, ...)`` of torch's RNN, attention and
    transformer modules built with ``batch_first=False`` (and of modules following one) is
    recorded as ``(N, T, ...)``.

    Raises
    ------
    RecordingError
        From ``forward``: a layer's output whose first axis is not the batch of the input
        (an RNN's final state ``h_n``, a sequence-first output where the batch size equals
        the sequence length), or whose type's rule does not fit its sizes with no other
        axis of that size (set ``channel_axis``); a layer whose output is a nested tensor
        (the layers inside an ``nn.TransformerEncoder`` on torch's fast path: record the
        encoder, or build it with ``enable_nested_tensor=False``); a token reduction
        (``mean``, ``max``, ``first``, ``last``, ``tokens``) of a sequence layer when the
        inputs are positional and the second looks like an attention mask of the first,
        the token ids (only 0 and 1, of their shape): the mask is not known as one, and
        the tokens would be reduced over the padding (pass the inputs as a mapping with
        ``input_ids`` and ``attention_mask``).
    """
    import weakref

    from topoxr_torch._select import final_state, neuron_count, sequence_first

    resolved = resolve_specs(model, layers)
    names = list(resolved)
    specs = {name: spec for name, (_, spec) in resolved.items()}
    keys = _output_keys(names, output_keys)
    for name, spec in specs.items():
        if spec.output_key is not None:
            check_key(name, spec.output_key)
            keys[name] = spec.output_key
    modules = dict(model.named_modules())
    by_module: dict[str, list[tuple[str, int | None]]] = {}
    for name, (base, spec) in resolved.items():
        by_module.setdefault(base, []).append((name, spec.call))
    device, dtype = _model_device_dtype(model)
    captured: dict[str, np.ndarray] = {}
    cap: Capture | None = None  # what the block gets (its planner is read by the hooks)
    pool: dict[str, tuple[int, str]] = {}
    calls: dict[str, int] = {}
    axes: dict[str, int] = {}
    rules: dict[str, str] = {}
    # Layers whose output is sequence-first, (T, N, ...): recorded as (N, T, ...).
    transposed: set[str] = set()
    batch: list[int | None] = [None]  # the batch size of the input being run
    # The padded length T of positional inputs (token ids, attention mask, ...) in the
    # first pass, where the mask cannot be known as one: token reductions are refused.
    positional_mask: list[int | None] = [None]
    # The first forward pass follows the neuron axis from output to output: the outputs
    # of modules of known semantics, and of the modules that follow one (an activation
    # whose input is such an output, a container that returns one). By the output's
    # memory, shape and strides, while it lives (it is not kept): {view: (weak reference,
    # neuron axis, shape, strides, module name, sequence first, order, weak reference to
    # the tensor whose memory it is: itself, or the base it views, which lives as long
    # as any view of it)}.
    followed: dict[tuple[Any, ...], tuple[Any, int, tuple[int, ...], tuple[int, ...], str,
                                          bool, int, Any]] = {}
    newest: list[tuple[Any, int, tuple[int, ...], tuple[int, ...], str, bool, int, Any]] = []
    starts: dict[str, int] = {}  # each container's call: the order its first output gets
    order = [0]

    def view(tensor: torch.Tensor) -> tuple[Any, ...]:
        try:
            return tensor.device, tensor.data_ptr(), tuple(tensor.shape), tensor.stride()
        except (RuntimeError, NotImplementedError):  # no storage (a tensor subclass)
            return (id(tensor),)

    def lookup(tensor: Any) -> tuple[Any, ...] | None:
        """What is followed of ``tensor`` (it is, or views as it is, a followed output)."""
        if not isinstance(tensor, torch.Tensor) or tensor.is_nested:
            return None
        entry = followed.get(view(tensor))
        return entry if entry is not None and entry[0]() is not None else None

    def note(tensor: torch.Tensor, axis: int, base: str, seq: bool) -> None:
        try:
            ref = weakref.ref(tensor)
            root = ref if tensor._base is None else weakref.ref(tensor._base)
        except TypeError:
            return
        entry = (ref, axis, tuple(tensor.shape), tuple(tensor.stride()), base, seq, order[0],
                 root)
        order[0] += 1
        followed[view(tensor)] = entry
        newest[:] = [entry]

    def sequence_first_source(n: int) -> str | None:
        """The module whose sequence-first output of this pass had leading axes (n, n)."""
        for entry in followed.values():
            if entry[5] and entry[2][:2] == (n, n):
                return entry[4]
        return None

    def inherits_sequence_first(tensor: torch.Tensor, args: Any, kwargs: Any) -> bool:
        """Whether ``tensor`` keeps the ``(T, N)`` leading axes of a sequence-first input
        (a ``Linear`` or ``LayerNorm`` after an RNN or attention with batch_first=False)."""
        entry = lookup(first_tensor([*args, *kwargs.values()]))
        return (entry is not None and entry[5] and tensor.ndim >= 2
                and tuple(tensor.shape[:2]) == entry[2][:2])

    def follow(module: Any, base: str, tensor: torch.Tensor, args: Any, kwargs: Any,
               main: bool) -> tuple[int | None, str, bool] | None:
        """``(neuron axis, how, sequence first)`` of ``tensor``, one of ``module``'s
        outputs (``main``: its first), as the module's type or the output it follows
        decides it; ``None`` where neither does; ``(None, why, False)`` where the type's
        rule does not fit the module's own sizes and no other axis has them."""
        kind = type(module).__name__
        known = axis_rule(module) if main else None
        count = neuron_count(module) if known is not None else None
        seq = main and sequence_first(module)
        misfit = ""
        if known is not None:
            size = int(tensor.shape[known[0] % tensor.ndim])
            if count is None or size == count[0]:
                return known[0], known[1], seq or (main and inherits_sequence_first(
                    tensor, args, kwargs))
            misfit = (f"; the rule of its type, the {known[1]}, does not fit: that axis has "
                      f"size {size}, its {count[1]} is {count[0]}")
        if next(module.children(), None) is not None:  # a container
            entry, how = lookup(tensor), "as {source!r} inside it, whose output it returns"
            start = starts.get(base, order[0])
            source = None
            if entry is None and newest and newest[0][6] >= start:
                # the last followed output of this call: a residual sum `f(x) + x` has its
                # shape and strides (a transpose copied has not); a view of it (a
                # transpose, a flatten) holds its neurons where their size and stride are
                last = newest[0]
                root = tensor._base  # the tensor it views (alive as long as the view)
                if last[2] == tuple(tensor.shape) and last[3] == tuple(tensor.stride()):
                    entry, how = last, ("as {source!r}, the last module of known axis that "
                                        "ran inside it (same shape and strides)")
                elif root is not None and last[7]() is root:
                    entry, source, how = last, root, (
                        "as {source!r}, the last module of known axis that ran inside it, "
                        "returning a view of its output")
        else:
            source = first_tensor([*args, *kwargs.values()])
            entry = lookup(source)
            how = "as its input, the output of {source!r}"
        if entry is not None:
            found = _followed_axis(entry[1], entry[2], entry[3], entry[5], tensor, source)
            if found is not None and (count is None or tensor.shape[found[0]] == count[0]):
                if found[0] != entry[1]:
                    how += f" (its axis {entry[1]} is axis {found[0]} of this view)"
                return found[0], how.format(source=entry[4]) + misfit, found[1] or seq
        if known is None:
            return None
        axis = 1 if tensor.ndim >= 4 else tensor.ndim - 1
        if tensor.shape[axis] == count[0]:  # type: ignore[index]
            return axis, f"axis {axis} of a {tensor.ndim}-D output of {kind}{misfit}", seq
        return None, misfit[2:], False

    def decide(name: str, module: Any, base: str, tensor: torch.Tensor, args: Any,
               kwargs: Any, main: bool) -> None:
        if name in axes or tensor.ndim <= 2:
            return
        if not tracking:
            # the modules that would decide it are no longer followed (see forward)
            raise RecordingError(
                f"layer {name!r} returned a {tensor.ndim}-D output after 2-D outputs in "
                "earlier batches; a layer's output must keep its rank from batch to batch"
            )
        kind = type(module).__name__
        how = follow(module, base, tensor, args, kwargs, main)
        if how is None:
            seq = False
            if tensor.ndim >= 4:  # torch's image convention (N, C, *spatial)
                axis, rule = 1, f"channels of a {tensor.ndim}-D output of {kind}"
            else:
                axis, rule = -1, f"last axis of a 3-D output of {kind} (hidden units)"
        else:
            found, rule, seq = how
            if found is None and specs[name].channel_axis is None:
                raise RecordingError(
                    f"layer {name!r} ({kind}) returned shape {tuple(tensor.shape)}: {rule}, "
                    "and no axis the recorder knows for its output has that size; set the "
                    f"neuron axis with {{'{name}': {{'channel_axis': k}}}}"
                )
            axis = -1 if found is None else found  # None: the user's channel_axis wins
        n = batch[0]
        if (not seq and tensor.ndim == 3 and n is not None
                and tensor.shape[0] == tensor.shape[1] == n):
            source = sequence_first_source(n)
            if source is not None and lookup(first_tensor([*args, *kwargs.values()])) is None:
                # the axes of its input are not known (an op that is no module, `out * 2`,
                # came between): it may keep the (T, N) axes of that output, with T == N
                raise RecordingError(
                    f"layer {name!r} ({kind}) returned shape {tuple(tensor.shape)} after the "
                    f"sequence-first output (T, N, ...) of {source!r} (batch_first=False) "
                    f"had shape ({n}, {n}, ...), and an operation that is no module came "
                    f"between them: the batch of {n} inputs may be its axis 0 or 1; record "
                    "with a batch_size other than the sequence length, or build the "
                    "modules with batch_first=True"
                )
        if seq and tensor.ndim == 3 and n is not None:
            shape = tuple(tensor.shape)
            if shape[0] == shape[1] == n:
                raise RecordingError(
                    f"layer {name!r} ({kind}) returned shape {shape} and its output is "
                    f"sequence-first (batch_first=False): the batch of {n} inputs may be "
                    f"axis 0 or 1, as the sequence has {n} steps too; record with a "
                    "batch_size other than the sequence length, or build the module with "
                    "batch_first=True"
                )
            if shape[1] == n:
                transposed.add(name)
                rule += "; its sequence-first output (T, N, ...) recorded as (N, T, ...)"
        axes[name], rules[name] = axis, rule

    def make_hook(base: str) -> Any:
        targets = by_module[base]

        def hook(module: Any, args: Any, kwargs: Any, output: Any) -> None:
            index = calls.get(base, 0)
            calls[base] = index + 1
            main = first_tensor(output)
            for name, call in targets:
                if call is None and index > 0:
                    raise RecordingError(
                        f"layer {name!r} ran more than once in one forward pass (a shared "
                        f"module); record each call as its own layer, e.g. '{base}:0' and "
                        f"'{base}:1', or {{'{base}': {{'call': 1}}}}"
                    )
                if call is not None and call != index:
                    continue
                key = keys.get(name)
                tensor = first_tensor(output, key)
                if tensor is None:
                    how = f"no tensor under key {key!r}" if key is not None else "no tensor"
                    raise RecordingError(
                        f"layer {name!r} returned {describe(output)}: {how} to record; pick "
                        f"one with output_keys={{{name!r}: <key or index>}} or choose "
                        "another layer"
                    )
                kind = type(module).__name__
                if tensor.is_nested:
                    raise RecordingError(_nested_message(name, kind, base, modules))
                if final_state(module, output, tensor):
                    raise RecordingError(
                        f"layer {name!r} ({kind}): the recorded output, of shape "
                        f"{tuple(tensor.shape)}, is the RNN's final state h_n (or c_n), "
                        "(num_layers * num_directions, N, H), whose first axis is no batch; "
                        "record its output sequence instead (the default output) with "
                        f"{{'{name}': {{'reduce': 'last'}}}} (for a one-direction RNN its "
                        "last step is h_n of the last layer)"
                    )
                decide(name, module, base, tensor, args, kwargs, tensor is main)
                if name in transposed:
                    tensor = tensor.transpose(0, 1)
                if tracking and positional_mask[0] is not None and tensor.ndim == 3:
                    _refuse_positional_mask(name, specs[name], reduce, tensor,
                                            axes[name], positional_mask[0])
                n = batch[0]
                if n is not None and tensor.ndim and tensor.shape[0] != n:
                    raise RecordingError(
                        f"layer {name!r} ({kind}) returned shape {tuple(tensor.shape)} for a "
                        f"batch of {n} inputs: its first axis is not the batch, so its rows "
                        "are no samples; record a layer whose output has the batch first "
                        "(torch's RNN, attention and transformer modules built with "
                        "batch_first=False are read as (T, N, ...))"
                    )
                planner = cap.planner if cap is not None else None
                if planner is not None and name not in pool:
                    # planned from this batch's first sample, as the layer runs
                    how = planner(name, _to_numpy(tensor[:1] if tensor.ndim else tensor))
                    if how is not None:
                        pool[name] = how
                how = pool.get(name)
                if how is not None and tensor.is_floating_point():
                    # pooled now, by torch, where the tensor lives: no copy of the map
                    captured[name] = _pool(tensor.detach(), *how)[:, :, None]
                else:
                    captured[name] = _to_numpy(tensor)
            if tracking:
                _track(module, base, args, kwargs, output)

        return hook

    def _track(module: Any, base: str, args: Any, kwargs: Any, output: Any) -> None:
        tensor = first_tensor(output)
        # a nested tensor (torch's TransformerEncoder fast path) has no shape to follow
        if tensor is None or tensor.is_nested or tensor.ndim <= 2:
            return
        how = follow(module, base, tensor, args, kwargs, True)
        if how is not None and how[0] is not None:
            note(tensor, how[0] % tensor.ndim, base, how[2])

    def tracker(base: str) -> Any:
        def hook(module: Any, args: Any, kwargs: Any, output: Any) -> None:
            _track(module, base, args, kwargs, output)
        return hook

    def starter(base: str) -> Any:
        def hook(module: Any, args: Any) -> None:
            starts[base] = order[0]
        return hook

    states = {m: m.training for m in model.modules()}
    handles = []
    # Hooks on every module, following the neuron axis from output to output until each
    # recorded layer's axis is decided (the first forward pass): then removed, as they
    # cost time per call.
    trackers: list[Any] = []
    tracking = True
    try:
        for base in by_module:
            handles.append(modules[base].register_forward_hook(make_hook(base),
                                                               with_kwargs=True))
        for mname, module in modules.items():
            if not mname or isinstance(module, torch.jit.ScriptModule):
                continue
            if next(module.children(), None) is not None:
                trackers.append(module.register_forward_pre_hook(starter(mname)))
            if mname not in by_module:
                trackers.append(module.register_forward_hook(tracker(mname), with_kwargs=True))
        handles.extend(trackers)
        model.eval()

        def forward(x: Any) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
            nonlocal tracking
            captured.clear()
            calls.clear()
            if tracking:  # a first pass that failed left nothing to follow
                followed.clear()
                newest.clear()
                positional_mask[0] = positional_mask_length(x, _host_array)
            # no_grad, not inference_mode: tensors made in inference mode stay inference
            # tensors, and a recording may be a model's first forward pass (the weights
            # of lazy modules, tables a module keeps): they would never train after it
            with torch.no_grad():
                inputs = _as_input(x, device, dtype)
                first = first_tensor(inputs)
                batch[0] = int(first.shape[0]) if first is not None and first.ndim else None
                out = _call(model, inputs)
            missing = [n for n in names if n not in captured]
            if missing:
                ran = {n: calls.get(resolved[n][0], 0) for n in missing}
                raise RecordingError(
                    f"layers {missing} did not run in the forward pass (calls seen: {ran}), "
                    "so there is nothing to record for them"
                )
            if tracking:  # every layer is decided now (a later change of rank is refused)
                tracking = False
                for handle in trackers:
                    handle.remove()
                followed.clear()
                newest.clear()
            final = _final_tensor(out)
            batch_outputs = dict(captured)
            captured.clear()  # the caller holds the batch's arrays, not this closure
            return batch_outputs, None if final is None else _to_numpy(final)

        cap = Capture(forward, names, specs, axes, rules, pool)
        yield cap
    finally:
        for handle in handles:
            handle.remove()
        for module, training in states.items():
            module.train(training)


def _check_loader(loader: Any) -> None:
    """Refuse a DataLoader that does not yield every sample, in one order, every time.

    The samples are numbered by their position in the loader's batches, so a sampler
    that draws them in random order (torch's ``RandomSampler``, ``SubsetRandomSampler``,
    ``WeightedRandomSampler``, or any sampler with ``shuffle=True`` such as a shuffling
    ``DistributedSampler``), also under a ``batch_sampler``, or ``drop_last=True``
    (which leaves out the last incomplete batch) would give a sample another id, or
    none, from one recording to the next.

    Raises
    ------
    RecordingError
        Naming the sampler's class, or ``drop_last``.
    """
    data = torch.utils.data
    randomised = (data.RandomSampler, data.SubsetRandomSampler, data.WeightedRandomSampler)
    batch_sampler = getattr(loader, "batch_sampler", None)
    for sampler in (loader.sampler, getattr(batch_sampler, "sampler", None)):
        shuffle = getattr(sampler, "shuffle", False)
        shuffles = isinstance(shuffle, bool | np.bool_) and bool(shuffle)
        if isinstance(sampler, randomised) or shuffles:
            raise RecordingError(
                f"the DataLoader draws its samples in random order ({type(sampler).__name__}"
                f"{' with shuffle=True' if shuffles else ''}): a probe set must come "
                "in the same order every time, each sample once; use shuffle=False and no "
                "random sampler (torch.utils.data.Subset takes a fixed part of a dataset)"
            )
    if getattr(loader, "drop_last", False) or getattr(batch_sampler, "drop_last", False):
        raise RecordingError(
            "the DataLoader drops its last incomplete batch (drop_last=True): a probe set "
            "must yield every sample every time; use drop_last=False"
        )


def _loader_samples(loader: Any) -> int | None:
    """How many samples ``loader`` yields per pass, where its sampler says; else None.

    That is the length of its sampler (the batch sampler's, where it has one), not of
    its dataset: a ``DistributedSampler`` replica, or a sampler given as a list of
    indices, yields part of the dataset. A batch sampler without a ``sampler`` (a list
    of index lists, a custom class) or a sampler without a length gives None: the probe
    set is then known only once the loader has run, and checked against the store as it
    is written. An ``IterableDataset`` has no sampler of its own: its length, if any.
    """
    data = torch.utils.data
    if isinstance(loader.dataset, data.IterableDataset):
        sampler: Any = loader.dataset
    else:
        batch_sampler = getattr(loader, "batch_sampler", None)
        sampler = (loader.sampler if batch_sampler is None
                   else getattr(batch_sampler, "sampler", None))
    try:
        return None if sampler is None else len(sampler)
    except TypeError:
        return None


def _batches(
    data: Any,
    *,
    labels: Any,
    metadata: Mapping[str, Any] | None,
    sample_ids: Any,
    batch_size: int,
) -> tuple[Any, np.ndarray | None, np.ndarray | None, int | None]:
    """Turn arrays or a DataLoader into numbered batches; also the probe ids if known."""
    loader_cls = torch.utils.data.DataLoader
    if isinstance(data, loader_cls):
        _check_loader(data)
        n = _loader_samples(data)

        def split(loader: Any) -> Iterator[tuple[Any, Any]]:
            for item in loader:
                if isinstance(item, tuple | list):
                    if len(item) == 0:
                        raise RecordingError("the DataLoader yielded an empty batch")
                    yield item[0], item[1] if len(item) > 1 else None
                elif isinstance(item, Mapping):
                    # tokenizer-style batches: the label entry (if any) is no model input
                    key = next((k for k in ("labels", "label") if k in item), None)
                    yield ({k: v for k, v in item.items() if k != key},
                           None if key is None else item[key])
                else:
                    yield item, None

        batches = number_batches(split(data), labels=labels, metadata=metadata,
                                 sample_ids=sample_ids, n_samples=n)
        if sample_ids is not None:
            ids = np.asarray(sample_ids, dtype=np.int64)
        else:
            ids = None if n is None else np.arange(n, dtype=np.int64)
        probe_labels = None if labels is None else np.asarray(labels)
        return batches, ids, probe_labels, n
    x, y, ids, meta = prepare_arrays(data, labels=labels, metadata=metadata,
                                     sample_ids=sample_ids)
    return iter_array_batches(x, ids, y, meta, batch_size), ids, y, len(ids)


_LAYERS_DOC = """
    layers : str, sequence of str, or mapping
        ``named_modules()`` names or glob patterns (``"features.*"``), or
        ``{name or pattern: settings}`` with per-layer settings ``reduce``,
        ``channel_axis``, ``call``, ``output_key`` (a mapping or
        :class:`topoxr.reduction.LayerSpec`; ``{}`` for the defaults). A module that runs
        several times per forward pass is recorded per call: ``"block.relu:0"``,
        ``"block.relu:1"``. List the names with :func:`topoxr_torch.layer_names`."""


def record(
    model: torch.nn.Module,
    data: Any,
    store: Any,
    *,
    model_name: str = "model",
    layers: Any,
    epoch: int = 0,
    reduce: str = "mean",
    batch_size: int = 256,
    labels: Any = None,
    metadata: Mapping[str, Any] | None = None,
    progress: bool = True,
    sample_ids: Any = None,
    output_keys: Mapping[str, str | int] | None = None,
    scalars: Mapping[str, float] | None = None,
    predict: Callable[[np.ndarray], Any] | None = None,
    compressor: Any = DEFAULT_COMPRESSOR,
    dtype: str = "float32",
) -> RecordResult:
    """Record the outputs of layers of a PyTorch model on some data into a store.

    The model runs once per batch. The layers' plans are made in the first batch, each
    from its output's first sample as the layer runs; conv maps are pooled as they are
    captured, the first batch's too, so no batch of whole maps is copied out.

    Which axis holds the neurons is decided per layer: the channels ``C`` of conv,
    pooling and batch-norm outputs ``(N, C, *spatial)``; the last axis ``H`` of every
    other output ``(N, ..., H)`` (Linear, LayerNorm, attention, MLP, embeddings);
    activations, dropout and containers follow the module that ran before them. The
    store states it per layer (``topoxr_neuron_axis``, ``topoxr_reduced_axes``,
    ``topoxr_axis_rule``).

    Parameters
    ----------
    model : torch.nn.Module
        Any module; it is put in eval mode while recording and restored afterwards.
    data : array_like, mapping, tuple or torch.utils.data.DataLoader
        ``x`` or ``(x, y)``: ``x`` an array or tensor, a mapping of them (tokenizer
        output, passed as keyword arguments; its ``attention_mask`` masks the token
        reductions and its ``input_ids`` give ``token_id``), or inside ``(x, y)`` /
        ``(x,)`` a tuple of them (positional arguments: a second one that looks like an
        attention mask of the first, the token ids, is not known as one, so token
        reductions of sequence layers are then refused; pass a mapping); or a DataLoader
        yielding ``x``, ``(x, y, ...)`` or mappings (a ``labels`` entry is taken as y)
        that yields its samples in one order, every time: one with ``shuffle=True``, a
        random sampler (``RandomSampler``, ``SubsetRandomSampler``,
        ``WeightedRandomSampler``, any sampler with ``shuffle=True`` such as a shuffling
        ``DistributedSampler``; also under a ``batch_sampler``) or ``drop_last=True`` is
        refused. Its samples are those its sampler yields (a ``DistributedSampler``
        replica, a list of indices: part of the dataset), numbered by their position.
    store : str or ActivationWriter
        A path or fsspec URL, or an open :class:`topoxr.ActivationWriter` (whose model
        name is used).
    model_name : str, default "model"
        Name of the model group in the store.{layers}
    epoch : int, default 0
        Epoch label.
    reduce : {{"mean", "max", "none", "first", "last", "tokens"}}, default "mean"
        Default for every layer. Conv outputs: mean or max over positions, or every unit
        (``none``). Sequence outputs ``(N, T, H)``: ``mean`` / ``max`` over tokens
        (masked), ``first`` (first non-padding token: CLS), ``last`` (last non-padding
        token), ``none``, or ``tokens``: every token its own sample (id
        ``input_id * T + position``, with coordinates ``input``, ``token_position``,
        ``token_id``; padding dropped): every batch must then be padded to one length
        ``T`` (a DataLoader padding each batch to its longest sequence is refused at the
        first batch of another length).
    batch_size : int, default 256
        Batch size for array data.
    labels : array_like, optional
        Labels, when ``data`` has none; with labels, predictions and ``correct`` are
        stored (see ``predict``).
    metadata : mapping of str to array_like, optional
        Per-sample columns stored as coordinates.
    progress : bool, default True
        Show a progress bar.
    sample_ids : array_like of int, optional
        Stable ids of the samples; default their position ``0..n-1``.
    output_keys : mapping, optional
        ``{{layer or pattern: key}}`` to pick the recorded tensor of layers returning a
        tuple (int index) or a mapping (str key); default the first tensor.
    scalars : mapping of str to float, optional
        Per-epoch values (loss, accuracy) stored as coordinates on ``epoch``.
    predict : callable, optional
        ``predict(output) -> (batch,)`` predictions from the model's output as numpy:
        its ``logits`` entry (a ModelOutput), else its first tensor (a tuple or list's
        first, a mapping's first in its own order: of several outputs, the first is
        taken for the one with the classes). By default, with integer labels (class
        indices): the argmax of a ``(batch, classes)`` output, logits or softmax
        probabilities alike; of one column, ``(batch, 1)`` or ``(batch,)``,
        ``output > 0.5`` where it is the output of an ``nn.Sigmoid`` (the model's last
        module, or what ``forward`` returns), else ``output > 0`` (logits; a warning
        says when such a column lies in [0, 1] in the first batch, as after
        ``torch.sigmoid`` in ``forward``). Labels that are not integers (class names)
        get no default predictions: ``predict=`` may return names. A warning says when
        labels are given but no prediction is stored.
    compressor : str, zarr codec or None, default "none"
        Codec of the activations of layers created by this recording (see
        :class:`topoxr.ActivationWriter`): ``"none"``, ``"lz4"``, ``"zstd"``, ...
    dtype : {{"float32", "float16"}}, default "float32"
        Storage dtype of the activations of layers created by this recording.

    Returns
    -------
    topoxr.recording.RecordResult

    Raises
    ------
    RecordingError
        Unknown layer names (with the closest names), a setting that cannot apply to a
        layer, outputs that are not tensors, labels or metadata whose length differs from
        the data, a probe set, reduction or layer sizes that differ from what the store
        holds for the model, a DataLoader that shuffles or drops its last batch, a layer
        whose output is a nested tensor (inside an ``nn.TransformerEncoder`` on torch's
        fast path), a token reduction of a sequence layer over positional inputs whose
        second looks like an attention mask. Nothing is written then. A per-token layer
        (``reduce="tokens"``) whose padded length differs from the first batch's is
        refused at that batch: the batches before it may be stored already, their epoch incomplete.

    Warns
    -----
    UserWarning
        Once, when labels are given but no prediction is stored (see ``predict``), or a
        one-column output not known to be a probability lies in [0, 1].
    """
    batches, ids, probe_labels, n = _batches(
        data, labels=labels, metadata=metadata, sample_ids=sample_ids, batch_size=batch_size)
    with capture(model, layers, output_keys=output_keys, reduce=reduce) as forward:
        return _run(model, forward, batches, store, model_name=model_name, epoch=epoch,
                    reduce=reduce, probe_ids=ids, probe_labels=probe_labels, n_samples=n,
                    batch_size=batch_size, progress=progress, scalars=scalars,
                    predict=predict, compressor=compressor, dtype=dtype)


record.__doc__ = (record.__doc__ or "").format(layers=_LAYERS_DOC)


def _run(model: torch.nn.Module, forward: Capture, batches: Any, store: Any,
         **kwargs: Any) -> RecordResult:
    sigmoid = _SigmoidOutput(model)
    try:
        return run_recording(
            forward, batches, store, layers=forward.layers, specs=forward.specs,
            channel_axis=forward.axes, axis_rules=forward.rules,
            attrs={"framework": "torch"}, description="torch", probabilities=sigmoid,
            **kwargs)
    finally:
        sigmoid.close()


class _SigmoidOutput:
    """Whether the model's output is the output of an ``nn.Sigmoid``: a probability.

    Learnt in the model's first forward pass by hooks on the model and on its
    ``nn.Sigmoid`` modules, removed after it: the output predictions come from
    (:func:`_final_tensor`) is a probability where it is the very tensor the last
    ``nn.Sigmoid`` to run returned (``nn.Sequential(..., nn.Sigmoid())``, or a
    ``forward`` returning ``self.sigmoid(...)``). A ``torch.sigmoid`` call in
    ``forward`` is not seen: only a ``TorchFunctionMode`` would see it, and one turns
    off fast paths such as ``nn.MultiheadAttention``'s, so the first batch would be
    computed otherwise than the rest.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.found = False
        self._last: weakref.ref[torch.Tensor] | None = None
        self._handles = [module.register_forward_hook(self._sigmoid)
                         for module in model.modules() if isinstance(module, torch.nn.Sigmoid)]
        if self._handles:  # without any nn.Sigmoid there is nothing to learn
            self._handles.append(model.register_forward_hook(self._check))

    def __call__(self) -> bool:
        """Whether the first forward pass returned an ``nn.Sigmoid``'s output."""
        return self.found

    def _sigmoid(self, module: Any, args: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor):
            self._last = weakref.ref(output)

    def _check(self, module: Any, args: Any, output: Any) -> None:
        final = _final_tensor(output)
        last = None if self._last is None else self._last()
        self.found = final is not None and last is final
        self.close()

    def close(self) -> None:
        """Remove the hooks (at the end of the first forward pass, or of the recording)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._last = None


class ProbeRecorder:
    """Record a fixed probe set once per epoch, from inside any training loop.

    Epochs already complete in the store are skipped (logged), so a run restarted from
    a checkpoint resumes recording where it stopped: create the recorder again and call
    :meth:`record` from epoch ``k`` on (:attr:`recorded_epochs` says which are stored).
    Before skipping an epoch, its first batch is recorded again and compared with the
    store: another run into the same store and model name is refused, not skipped.

    Parameters
    ----------
    model : torch.nn.Module
        The model being trained.
    probe : array_like, mapping or tuple
        ``x`` or ``(x, y)`` as for :func:`record`: the same samples at every epoch.
    store : str or ActivationWriter
        Where to record.
    model_name : str, default "model"
        Model group name.
    layers : str, sequence of str, or mapping
        As for :func:`record`, resolved once here.
    labels, metadata, sample_ids, reduce, batch_size, output_keys, predict
        As for :func:`record`.
    progress : bool, default False
        Show a progress bar per recorded epoch; the time of each is logged (INFO).

    Examples
    --------
    >>> from topoxr_torch.models import DigitsMLP, load_digits_data
    >>> x, y = load_digits_data()
    >>> model = DigitsMLP()
    >>> probe = ProbeRecorder(model, (x[:64], y[:64]), "memory://doc-probe.zarr",
    ...                       model_name="mlp", layers=["fc1", "fc2"])
    >>> for epoch in range(2):
    ...     _ = probe.record(epoch, loss=1.0 / (epoch + 1))  # after each epoch's training
    >>> probe.recorded_epochs
    [0, 1]
    """

    def __init__(
        self,
        model: torch.nn.Module,
        probe: Any,
        store: Any,
        *,
        model_name: str = "model",
        layers: Any,
        labels: Any = None,
        metadata: Mapping[str, Any] | None = None,
        sample_ids: Any = None,
        reduce: str = "mean",
        batch_size: int = 256,
        output_keys: Mapping[str, str | int] | None = None,
        progress: bool = False,
        predict: Callable[[np.ndarray], Any] | None = None,
    ) -> None:
        self.model = model
        self.store = store
        self.model_name = model_name
        self.layers = layers
        self._names = list(resolve_specs(model, layers))
        self.x, self.y, self.ids, self.metadata = prepare_arrays(
            probe, labels=labels, metadata=metadata, sample_ids=sample_ids)
        self.reduce = reduce
        self.batch_size = batch_size
        self.output_keys = output_keys
        self.progress = progress
        self.predict = predict

    @property
    def recorded_epochs(self) -> list[int]:
        """Epochs the store holds complete for every recorded layer."""
        return completed_epochs(self.store, self.model_name, self._names)

    def record(self, epoch: int, **scalars: float) -> RecordResult | None:
        """Record the probe set as ``epoch``, unless the store already holds it.

        Parameters
        ----------
        epoch : int
            Epoch label (0 for the network before training).
        **scalars : float
            Per-epoch values stored with the epoch (``loss=...``, ``accuracy=...``).

        Returns
        -------
        RecordResult or None
            What was recorded; ``None`` when the epoch was already complete (skipped).

        Raises
        ------
        topoxr.RecordingError
            When the epoch is already complete but the model gives other values for the
            first probe batch than the store holds (another run, or changed weights).
        """
        stored = stored_unless_recorded(self.store, self.model_name, self._names, epoch)
        batches: Any = iter_array_batches(self.x, self.ids, self.y, self.metadata,
                                          self.batch_size)
        with capture(self.model, self.layers, output_keys=self.output_keys,
                     reduce=self.reduce) as forward:
            def run(batches: Any, store: Any, stored: Any, scalars: Mapping[str, float],
                    progress: bool) -> Any:
                return _run(self.model, forward, batches, store,
                            model_name=self.model_name, epoch=epoch, reduce=self.reduce,
                            probe_ids=self.ids, probe_labels=self.y,
                            n_samples=len(self.ids), batch_size=self.batch_size,
                            progress=progress, scalars=scalars, predict=self.predict,
                            stored=stored)

            if stored is None:
                check_recorded_epoch(
                    lambda first, scratch, held: run(first, scratch, held, {}, False),
                    batches, self.store, model=self.model_name, layers=self._names,
                    epoch=epoch)
                return None
            return run(batches, self.store, stored, scalars, self.progress)
