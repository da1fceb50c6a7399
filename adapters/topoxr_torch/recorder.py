"""Record the layers of a PyTorch model with forward hooks."""

from __future__ import annotations

import contextlib
import fnmatch
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from topoxr._codecs import DEFAULT_COMPRESSOR
from topoxr._optional import import_optional
from topoxr.reduction import LayerSpec
from topoxr.recording import (
    RecordingError,
    RecordResult,
    completed_epochs,
    iter_array_batches,
    number_batches,
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

    Yields
    ------
    Capture
        ``forward(x) -> ({layer: ndarray}, model output ndarray or None)``, run under
        :func:`torch.inference_mode`, outputs moved to the CPU; dict inputs are passed
        as keyword arguments, tuples as positional ones.
    """
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
    # The last module of known axis semantics that finished, for modules of unknown
    # semantics (activations, dropout, containers): (axis, ndim, size on axis, name).
    last_known: list[tuple[int, int, int, str]] = []

    def decide(name: str, base: str, tensor: torch.Tensor) -> None:
        if name in axes or tensor.ndim <= 2:
            return
        if not tracking:
            # the modules that would decide it are no longer followed (see forward)
            raise RecordingError(
                f"layer {name!r} returned a {tensor.ndim}-D output after 2-D outputs in "
                "earlier batches; a layer's output must keep its rank from batch to batch"
            )
        known = axis_rule(modules[base])
        if known is not None:
            axes[name], rules[name] = known
            return
        if last_known:
            axis, ndim, size, source = last_known[-1]
            if ndim == tensor.ndim and tensor.shape[axis] == size:
                axes[name] = axis
                rules[name] = f"as the output of {source!r}, which ran before it"
                return
        kind = type(modules[base]).__name__
        if tensor.ndim >= 4:  # torch's image convention (N, C, *spatial)
            axes[name], rules[name] = 1, f"channels of a {tensor.ndim}-D output of {kind}"
        else:
            axes[name], rules[name] = -1, f"last axis of a 3-D output of {kind} (hidden units)"

    def make_hook(base: str) -> Any:
        targets = by_module[base]

        def hook(module: Any, args: Any, output: Any) -> None:
            index = calls.get(base, 0)
            calls[base] = index + 1
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
                decide(name, base, tensor)
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
                _track(module, base, output)

        return hook

    def _track(module: Any, base: str, output: Any) -> None:
        known = axis_rule(module)
        if known is None or not isinstance(output, torch.Tensor) or output.ndim <= 2:
            return
        axis = known[0] % output.ndim
        last_known[:] = [(axis, output.ndim, int(output.shape[axis]), base)]

    def tracker(base: str) -> Any:
        def hook(module: Any, args: Any, output: Any) -> None:
            _track(module, base, output)
        return hook

    states = {m: m.training for m in model.modules()}
    handles = []
    # Hooks on every module of known axis semantics, followed until each recorded layer's
    # axis is decided (the first forward pass): then removed, as they cost time per call.
    trackers: list[Any] = []
    tracking = True
    try:
        for base in by_module:
            handles.append(modules[base].register_forward_hook(make_hook(base)))
        if any(axis_rule(modules[base]) is None for base in by_module):
            for mname, module in modules.items():
                if mname and mname not in by_module and axis_rule(module) is not None:
                    trackers.append(module.register_forward_hook(tracker(mname)))
        handles.extend(trackers)
        model.eval()

        def forward(x: Any) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
            nonlocal tracking
            captured.clear()
            calls.clear()
            last_known.clear()
            with torch.inference_mode():
                out = _call(model, _as_input(x, device, dtype))
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
                last_known.clear()
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
        if isinstance(data.sampler, torch.utils.data.RandomSampler):
            raise RecordingError(
                "the DataLoader shuffles (shuffle=True): a probe set must come in the same "
                "order every time; use shuffle=False"
            )
        try:
            n = len(data.dataset)  # type: ignore[arg-type]
        except TypeError:
            n = None

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
        ``(x,)`` a tuple of them (positional arguments); or a non-shuffling DataLoader
        yielding ``x``, ``(x, y, ...)`` or mappings (a ``labels`` entry is taken as y).
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
        (masked), ``first`` (CLS), ``last`` (last non-padding token), ``none``, or
        ``tokens``: every token its own sample (id ``input_id * T + position``, with
        coordinates ``input``, ``token_position``, ``token_id``; padding dropped).
    batch_size : int, default 256
        Batch size for array data.
    labels : array_like, optional
        Labels, when ``data`` has none; with labels, predictions and ``correct`` are
        stored.
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
        ``predict(output) -> (batch,)`` predictions from the model's output as numpy
        (``.logits`` of a ModelOutput, else its first tensor); by default the argmax of
        a ``(batch, classes)`` output. A warning says when labels are given but no
        prediction can be derived.
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
        holds for the model. Nothing is written then.
    """
    batches, ids, probe_labels, n = _batches(
        data, labels=labels, metadata=metadata, sample_ids=sample_ids, batch_size=batch_size)
    with capture(model, layers, output_keys=output_keys) as forward:
        return _run(forward, batches, store, model_name=model_name, epoch=epoch,
                    reduce=reduce, probe_ids=ids, probe_labels=probe_labels, n_samples=n,
                    batch_size=batch_size, progress=progress, scalars=scalars,
                    predict=predict, compressor=compressor, dtype=dtype)


record.__doc__ = (record.__doc__ or "").format(layers=_LAYERS_DOC)


def _run(forward: Capture, batches: Any, store: Any, **kwargs: Any) -> RecordResult:
    return run_recording(
        forward, batches, store, layers=forward.layers, specs=forward.specs,
        channel_axis=forward.axes, axis_rules=forward.rules, attrs={"framework": "torch"},
        description="torch", **kwargs)


class ProbeRecorder:
    """Record a fixed probe set once per epoch, from inside any training loop.

    Epochs already complete in the store are skipped (logged), so a run restarted from
    a checkpoint resumes recording where it stopped: create the recorder again and call
    :meth:`record` from epoch ``k`` on (:attr:`recorded_epochs` says which are stored).

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
        """
        stored = stored_unless_recorded(self.store, self.model_name, self._names, epoch)
        if stored is None:
            return None
        batches: Any = iter_array_batches(self.x, self.ids, self.y, self.metadata,
                                          self.batch_size)
        with capture(self.model, self.layers, output_keys=self.output_keys) as forward:
            return _run(forward, batches, self.store, model_name=self.model_name,
                        epoch=epoch, reduce=self.reduce, probe_ids=self.ids,
                        probe_labels=self.y, n_samples=len(self.ids),
                        batch_size=self.batch_size, progress=self.progress,
                        scalars=scalars, predict=self.predict, stored=stored)
