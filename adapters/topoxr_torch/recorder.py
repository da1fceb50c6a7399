"""Record the layers of a PyTorch model with forward hooks."""

from __future__ import annotations

import contextlib
import fnmatch
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from topoxr._codecs import DEFAULT_COMPRESSOR
from topoxr._optional import import_optional
from topoxr.recording import (
    RecordingError,
    RecordResult,
    iter_array_batches,
    number_batches,
    prepare_arrays,
    run_recording,
)
from topoxr_torch._select import check_key, describe, first_tensor, select_layers

torch = import_optional("torch", extra="torch", purpose="topoxr_torch")

__all__ = ["ProbeRecorder", "record"]

#: Channel axis of PyTorch conv outputs (N, C, H, W).
CHANNEL_AXIS = 1


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
    if isinstance(x, tuple | list):
        return type(x)(_as_input(v, device, dtype) for v in x)
    return x


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


@contextlib.contextmanager
def capture(
    model: torch.nn.Module,
    layers: Any,
    *,
    output_keys: Mapping[str, str | int] | None = None,
) -> Iterator[Any]:
    """Hook ``layers`` of ``model`` for the duration of the block.

    Inside the block the model is in eval mode; on exit, errors included, every hook is
    removed and each module's train/eval state is restored.

    Yields
    ------
    callable
        ``forward(x) -> ({layer: ndarray}, model output ndarray or None)``, run under
        :func:`torch.inference_mode`, outputs moved to the CPU.
    """
    modules = select_layers(model, layers)
    names = list(modules)
    keys = _output_keys(names, output_keys)
    device, dtype = _model_device_dtype(model)
    captured: dict[str, np.ndarray] = {}
    calls: dict[str, int] = {}

    def make_hook(name: str) -> Any:
        key = keys.get(name)

        def hook(module: Any, args: Any, output: Any) -> None:
            calls[name] = calls.get(name, 0) + 1
            if calls[name] > 1:
                raise RecordingError(
                    f"layer {name!r} ran more than once in one forward pass (a shared module); "
                    "record a layer that runs once"
                )
            tensor = first_tensor(output, key)
            if tensor is None:
                how = f"no tensor under key {key!r}" if key is not None else "no tensor"
                raise RecordingError(
                    f"layer {name!r} returned {describe(output)}: {how} to record; pick one "
                    f"with output_keys={{{name!r}: <key or index>}} or choose another layer"
                )
            captured[name] = _to_numpy(tensor)

        return hook

    states = {m: m.training for m in model.modules()}
    handles = []
    try:
        for name, module in modules.items():
            handles.append(module.register_forward_hook(make_hook(name)))
        model.eval()

        def forward(x: Any) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
            captured.clear()
            calls.clear()
            with torch.inference_mode():
                out = model(_as_input(x, device, dtype))
            missing = [n for n in names if n not in captured]
            if missing:
                raise RecordingError(
                    f"layers {missing} did not run in the forward pass, so there is nothing "
                    "to record for them"
                )
            final = first_tensor(out)
            return dict(captured), None if final is None else _to_numpy(final)

        yield forward
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
                    raise RecordingError(
                        "the DataLoader yields mappings; make it yield x or (x, y) batches"
                    )
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
    compressor: Any = DEFAULT_COMPRESSOR,
    dtype: str = "float32",
) -> RecordResult:
    """Record the outputs of layers of a PyTorch model on some data into a store.

    Parameters
    ----------
    model : torch.nn.Module
        Any module; it is put in eval mode while recording and restored afterwards.
    data : array_like, tuple or torch.utils.data.DataLoader
        ``x`` or ``(x, y)`` as numpy arrays or tensors, or a non-shuffling DataLoader
        yielding ``x`` or ``(x, y, ...)`` batches.
    store : str or ActivationWriter
        A path or fsspec URL, or an open :class:`topoxr.ActivationWriter` (whose model
        name is used).
    model_name : str, default "model"
        Name of the model group in the store.
    layers : str or sequence of str
        ``named_modules()`` names or glob patterns (``"features.*"``).
    epoch : int, default 0
        Epoch label.
    reduce : {"mean", "max", "none"}, default "mean"
        Conv outputs (N, C, H, W): one neuron per channel (mean or max over positions),
        or every unit.
    batch_size : int, default 256
        Batch size for array data.
    labels : array_like, optional
        Labels, when ``data`` has none; with labels, predictions (argmax of the model
        output) and ``correct`` are stored.
    metadata : mapping of str to array_like, optional
        Per-sample columns stored as coordinates.
    progress : bool, default True
        Show a progress bar.
    sample_ids : array_like of int, optional
        Stable ids of the samples; default their position ``0..n-1``.
    output_keys : mapping, optional
        ``{layer or pattern: key}`` to pick the recorded tensor of layers returning a
        tuple (int index) or a mapping (str key); default the first tensor.
    scalars : mapping of str to float, optional
        Per-epoch values (loss, accuracy) stored as coordinates on ``epoch``.
    compressor : str, zarr codec or None, default "none"
        Codec of the activations of layers created by this recording (see
        :class:`topoxr.ActivationWriter`): ``"none"``, ``"lz4"``, ``"zstd"``, ...
    dtype : {"float32", "float16"}, default "float32"
        Storage dtype of the activations of layers created by this recording.

    Returns
    -------
    topoxr.recording.RecordResult

    Raises
    ------
    RecordingError
        Unknown layer names (the message lists them), outputs that are not tensors,
        labels or metadata whose length differs from the data, a probe set or layer sizes
        that differ from what the store holds for the model. Nothing is written then.
    """
    batches, ids, probe_labels, n = _batches(
        data, labels=labels, metadata=metadata, sample_ids=sample_ids, batch_size=batch_size)
    with capture(model, layers, output_keys=output_keys) as forward:
        names = list(select_layers(model, layers))
        return run_recording(
            forward, batches, store, model_name=model_name, layers=names, epoch=epoch,
            reduce=reduce, channel_axis=CHANNEL_AXIS, probe_ids=ids, probe_labels=probe_labels,
            n_samples=n, batch_size=batch_size, progress=progress, attrs={"framework": "torch"},
            scalars=scalars, description="torch", compressor=compressor, dtype=dtype,
        )


class ProbeRecorder:
    """Record a fixed probe set once per epoch, from inside any training loop.

    Parameters
    ----------
    model : torch.nn.Module
        The model being trained.
    probe : array_like or tuple
        ``x`` or ``(x, y)``: the same samples are recorded at every epoch.
    store : str or ActivationWriter
        Where to record.
    model_name : str, default "model"
        Model group name.
    layers : str or sequence of str
        Names or glob patterns, resolved once here.
    labels, metadata, sample_ids, reduce, batch_size, output_keys, progress
        As for :func:`record`.

    Examples
    --------
    >>> from topoxr_torch.models import DigitsMLP, load_digits_data
    >>> x, y = load_digits_data()
    >>> model = DigitsMLP()
    >>> probe = ProbeRecorder(model, (x[:64], y[:64]), "memory://doc-probe.zarr",
    ...                       model_name="mlp", layers=["fc1", "fc2"])
    >>> for epoch in range(2):
    ...     _ = probe.record(epoch, loss=1.0 / (epoch + 1))  # after each epoch's training
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
    ) -> None:
        self.model = model
        self.store = store
        self.model_name = model_name
        self.layers = list(select_layers(model, layers))
        self.x, self.y, self.ids, self.metadata = prepare_arrays(
            probe, labels=labels, metadata=metadata, sample_ids=sample_ids)
        self.reduce = reduce
        self.batch_size = batch_size
        self.output_keys = output_keys
        self.progress = progress

    def record(self, epoch: int, **scalars: float) -> RecordResult:
        """Record the probe set as ``epoch``.

        Parameters
        ----------
        epoch : int
            Epoch label (0 for the network before training).
        **scalars : float
            Per-epoch values stored with the epoch (``loss=...``, ``accuracy=...``).

        Returns
        -------
        RecordResult
            What was recorded.
        """
        batches: Any = iter_array_batches(self.x, self.ids, self.y, self.metadata,
                                          self.batch_size)
        with capture(self.model, self.layers, output_keys=self.output_keys) as forward:
            return run_recording(
                forward, batches, self.store, model_name=self.model_name, layers=self.layers,
                epoch=epoch, reduce=self.reduce, channel_axis=CHANNEL_AXIS, probe_ids=self.ids,
                probe_labels=self.y, n_samples=len(self.ids), batch_size=self.batch_size,
                progress=self.progress, attrs={"framework": "torch"}, scalars=scalars,
                description="torch",
            )
