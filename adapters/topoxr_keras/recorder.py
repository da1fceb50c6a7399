"""Record the layers of a Keras 3 model through a probe sub-model built once."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from topoxr._codecs import DEFAULT_COMPRESSOR
from topoxr._optional import import_optional
from topoxr.recording import (
    RecordingError,
    RecordResult,
    check_recorded_epoch,
    completed_epochs,
    iter_array_batches,
    n_inputs,
    number_batches,
    prepare_arrays,
    run_recording,
    stored_unless_recorded,
)
from topoxr_keras._select import ProbeModel, probe_model

keras = import_optional("keras", extra="keras", purpose="topoxr_keras")

__all__ = ["RecordActivations", "record"]


def _is_tf_dataset(data: Any) -> bool:
    return type(data).__module__.startswith("tensorflow") and hasattr(data, "element_spec")


#: What to do about each way a ``tf.data`` pipeline can change its order.
_FIXED_ORDER = ("a probe set must come in the same order every time, each sample once "
                "(its sample ids are positions)")


def _unordered(dataset: Any) -> str | None:
    """Why a ``tf.data`` pipeline may give its samples in another order each time it is
    iterated, and what to do; None where nothing says so.

    Walks from ``dataset`` to its inputs (``_inputs()``, or ``_input_dataset``; a
    private API, as TensorFlow 2.21 names its classes) and refuses a shuffle
    (``Dataset.shuffle``, ``Dataset.list_files`` with ``shuffle=True``, the default), a
    random source (``Dataset.random``, and so ``Dataset.sample_from_datasets``), a
    stage run with ``deterministic=False`` (``map``, ``batch``, ``interleave``), and
    ``tf.data.Options.deterministic = False``. Where a stage hides what it runs from
    Python (``interleave`` with ``num_parallel_calls``; the choice dataset of
    ``Dataset.choose_from_datasets``), its graph is read (:func:`_graph_unordered`).
    A pipeline whose inputs cannot be listed is taken as it comes.
    """
    if getattr(dataset.options(), "deterministic", None) is False:
        return ("sets tf.data.Options.deterministic = False (its parallel stages may give "
                f"their elements out of order): {_FIXED_ORDER}; build it with "
                "deterministic=True")
    seen: set[int] = set()
    todo = [dataset]
    while todo:
        node = todo.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        name = type(node).__name__
        if "Shuffle" in name:
            return (f"shuffles (a {name} in its pipeline): {_FIXED_ORDER}; build it "
                    "without .shuffle() (and Dataset.list_files with shuffle=False)")
        if "Random" in name:
            return (f"draws at random (a {name} in its pipeline: Dataset.random, or the "
                    f"choice of Dataset.sample_from_datasets): {_FIXED_ORDER}; build it "
                    "without them (Dataset.concatenate joins datasets in a fixed order)")
        if getattr(node, "_deterministic", None) == "false":
            return (f"runs a {name} with deterministic=False: {_FIXED_ORDER}; build it "
                    "with deterministic=True (or None)")
        found = _functions_unordered(node)
        if found is None and name in ("_ParallelInterleaveDataset", "_VariantDataset"):
            found = _graph_unordered(node)
        if found is not None:
            return (f"{found} (in a {name} of its pipeline): {_FIXED_ORDER}; build it "
                    "without (deterministic=True; no .shuffle(), Dataset.random or "
                    "random choices)")
        try:
            inputs = node._inputs()
        except Exception:  # noqa: BLE001 - a private API: no inputs where it fails
            inputs = [getattr(node, "_input_dataset", None)]
        todo.extend(d for d in inputs if d is not None and hasattr(d, "element_spec"))
    return None


def _graph_unordered(dataset: Any) -> str | None:
    """What in the graph of ``dataset`` (its stages and the functions they run) may
    change its order: a shuffle, a random source, ``deterministic=False``, or None.

    For the stages Python cannot see into. Reading the graph copies the constants of
    the pipeline (the arrays of ``from_tensor_slices``), so it is read only there.
    """
    import tensorflow as tf

    try:
        serialized = tf.raw_ops.DatasetToGraphV2(
            input_dataset=dataset._variant_tensor, external_state_policy=1,
            strip_device_assignment=True)
        graph = tf.compat.v1.GraphDef.FromString(serialized.numpy())
    except Exception:  # noqa: BLE001 - a private API: nothing found where it fails
        return None
    nodes = [*graph.node, *(n for f in graph.library.function for n in f.node_def)]
    for node in nodes:
        found = _op_unordered(
            node.op, node.attr["deterministic"].s if "deterministic" in node.attr else None,
            "sloppy" in node.attr and node.attr["sloppy"].b)
        if found is not None:
            return found
    return None


def _functions_unordered(dataset: Any) -> str | None:
    """What in the functions a stage of a pipeline runs (``interleave``, ``flat_map``,
    ``group_by_window``... build datasets in them) may change its order, or None.

    Each run of the function builds its dataset anew: a shuffle inside gives another
    order in every process, though one process may see the same order each time. The
    functions' own graphs are read (not the pipeline's constants).
    """
    try:
        functions = dataset._functions()
    except Exception:  # noqa: BLE001 - a private API: nothing found where it fails
        return None
    for function in functions:
        try:
            ops = function.function.graph.get_operations()
        except Exception:  # noqa: BLE001 - a private API
            continue
        for op in ops:
            def attr(key: str) -> Any:
                try:
                    return op.get_attr(key)
                except (ValueError, TypeError):
                    return None
            found = _op_unordered(op.type, attr("deterministic"), bool(attr("sloppy")))
            if found is not None:
                return found + " inside a function the pipeline runs"
    return None


def _op_unordered(op: str, deterministic: Any, sloppy: bool) -> str | None:
    """Why a dataset op of a graph may change the order, or None."""
    if "Dataset" not in op:
        return None
    if "Shuffle" in op:
        return f"shuffles (a {op})"
    if op.startswith("RandomDataset"):
        return f"draws at random (a {op}: Dataset.random as a choice dataset?)"
    if deterministic == b"false":
        return f"runs a {op} with deterministic=False"
    if sloppy:
        return f"runs a {op} with sloppy=True"
    return None


def _flat_labels(labels: Any) -> Any:
    """Labels of shape ``(N, 1)`` (``keras.datasets`` CIFAR) as ``(N,)``; others as
    they come (the recording checks them). For ``tf.data`` labels, batch by batch or
    given as ``labels=``: :func:`topoxr.recording.prepare_arrays` reads those of arrays
    so itself."""
    shape = getattr(labels, "shape", None)
    if shape is not None and len(shape) == 2 and shape[1] == 1:
        return np.asarray(keras.ops.convert_to_numpy(labels)).reshape(-1)
    return labels


def _dataset_batches(
    dataset: Any, probe: ProbeModel, batch_size: int
) -> tuple[Iterator[tuple[Any, Any]], Any]:
    """Split a ``tf.data.Dataset`` of ``x`` or ``(x, y, ...)`` into (x, y) batches.

    ``x`` is what the model takes: a tensor, a tuple of tensors (positional inputs) or
    a mapping (named inputs), as ``model.fit`` reads the elements; an ``x``-only
    mapping's ``labels`` entry is the labels (as for arrays).
    """
    problem = _unordered(dataset)
    if problem is not None:
        raise RecordingError(f"the tf.data.Dataset {problem}")
    if int(dataset.cardinality()) == -1:  # tf.data.INFINITE_CARDINALITY
        raise RecordingError(
            "the tf.data.Dataset is infinite (a .repeat() without a count?): a probe set "
            "must end; drop the .repeat() or .take(n) the samples to record")
    spec = dataset.element_spec
    x_spec = spec[0] if isinstance(spec, tuple) else spec
    key: str | int | None = None
    while isinstance(x_spec, Mapping | tuple | list) and x_spec:
        if isinstance(x_spec, Mapping):
            key, x_spec = next(((str(k), v) for k, v in x_spec.items() if k != "labels"),
                               ("labels", x_spec.get("labels")))
        else:
            key, x_spec = (0 if key is None else key), x_spec[0]
    shape = getattr(x_spec, "shape", None)
    if shape is None:
        raise RecordingError(
            f"the tf.data.Dataset's inputs hold {type(x_spec).__name__}, not tensors; make "
            "it yield x or (x, y), x a tensor, a tuple or a dict of tensors")
    if len(shape) == probe.input_rank(key) - 1:  # unbatched elements
        dataset = dataset.batch(batch_size)

    def gen() -> Iterator[tuple[Any, Any]]:
        for item in dataset.as_numpy_iterator():
            if isinstance(item, tuple):
                yield item[0], _flat_labels(item[1]) if len(item) > 1 else None
            elif isinstance(item, Mapping) and "labels" in item:
                # a tokenizer's batch with its labels, as topoxr.recording.prepare_arrays
                # reads a mapping of arrays: the labels, not an input
                yield ({k: v for k, v in item.items() if k != "labels"},
                       _flat_labels(item["labels"]))
            else:
                yield item, None

    return gen(), dataset


def _count(dataset: Any) -> int:
    return int(sum(n_inputs(b[0] if isinstance(b, tuple) else b)
                   for b in dataset.as_numpy_iterator()))


def _batches(
    data: Any, probe: ProbeModel, *, labels: Any, metadata: Any, sample_ids: Any,
    batch_size: int,
) -> tuple[Any, np.ndarray | None, np.ndarray | None, int | None]:
    if _is_tf_dataset(data):
        labels = _flat_labels(labels)
        gen, batched = _dataset_batches(data, probe, batch_size)
        # The probe ids must be known before anything is written (to check them against
        # the store): count the samples with one pass that runs no model.
        n = len(sample_ids) if sample_ids is not None else _count(batched)
        ids = (np.asarray(sample_ids, dtype=np.int64) if sample_ids is not None
               else np.arange(n, dtype=np.int64))
        batches = number_batches(gen, labels=labels, metadata=metadata, sample_ids=sample_ids,
                                 n_samples=n)
        return batches, ids, None if labels is None else np.asarray(labels), n
    x, y, ids, meta = prepare_arrays(data, labels=labels, metadata=metadata,
                                     sample_ids=sample_ids)
    return iter_array_batches(x, ids, y, meta, batch_size), ids, y, len(ids)


def record(
    model: keras.Model,
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
    """Record the outputs of layers of a Keras 3 model on some data into a store.

    The neurons of each layer are the channels of its ``data_format`` (channels-last by
    default) or the last axis of other outputs; the store states it per layer
    (``topoxr_neuron_axis``, ``topoxr_reduced_axes``, ``topoxr_axis_rule``). The layers
    are planned from the first sample alone (one call of the probe sub-model), then
    every batch runs once through a sub-model that pools conv maps inside the graph, so
    no batch of whole maps is copied out.

    Parameters
    ----------
    model : keras.Model
        A Sequential or functional model with defined inputs.
    data : array_like, tuple or tf.data.Dataset
        ``x`` or ``(x, y)`` arrays, or a dataset of ``x`` or ``(x, y, ...)`` elements,
        batched or not (unbatched ones are batched by ``batch_size``); ``x`` is what
        the model takes, as ``model.fit`` reads it: an array, a tuple of arrays
        (positional inputs) or a dict (named inputs; its ``labels`` entry, if any, is
        the labels). Labels of shape ``(N, 1)``
        (``keras.datasets`` CIFAR) are read as ``(N,)``. A dataset must yield its
        samples in one order every time, and end: one that shuffles
        (``.shuffle()``), draws at random (``Dataset.random``,
        ``sample_from_datasets``, a random ``choose_from_datasets``), runs a stage with
        ``deterministic=False`` (or ``tf.data.Options.deterministic = False``) is
        refused, and so is an infinite one (``.repeat()``).
    store : str or ActivationWriter
        A path or fsspec URL, or an open :class:`topoxr.ActivationWriter`.
    model_name : str, default "model"
        Name of the model group in the store.
    layers : str, sequence of str, or mapping
        Keras layer names or glob patterns, or ``{name or pattern: settings}`` with
        per-layer ``reduce``, ``channel_axis``, ``call``, ``output_key``. List the
        names with :func:`topoxr_keras.layer_names`. A layer called more than once in
        the model (a shared layer) is recorded per call, ``"name:0"``, ``"name:1"``
        (see :func:`topoxr_keras.probe_model`); named without a call it is refused.
    epoch : int, default 0
        Epoch label.
    reduce : {"mean", "max", "none", "first", "last", "tokens"}, default "mean"
        Default for every layer; conv outputs: mean or max over positions, or every
        unit; sequence outputs ``(N, T, H)`` as in :func:`topoxr_torch.record`. Where
        a sequence output carries a Keras mask (``Embedding(mask_zero=True)``,
        ``Masking``, and the layers that pass it on), ``mean``, ``max``, ``first``,
        ``last`` and ``tokens`` leave its padding steps out, as the model's own
        pooling does (``topoxr_masked`` is true in the store); each layer follows its
        own mask, and a layer's ``mask`` setting (a key of mapping inputs, or False)
        wins. An attention mask among the inputs is known only in a dict, as its
        ``attention_mask`` entry (a dict is matched to the model's inputs by their
        names); positional inputs ``(ids, mask)`` are refused for these reductions of
        layers no Keras mask masks, unless their ``mask`` setting is False.
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
        ``{layer: key}`` for layers with several outputs.
    scalars : mapping of str to float, optional
        Per-epoch values (loss, accuracy) stored as coordinates on ``epoch``.
    predict : callable, optional
        ``predict(output) -> (batch,)`` predictions from the model's output (numpy; of
        a model with several outputs, all of them as the model returns them: a dict by
        name, or a list). By default, with integer labels (class
        indices) and one model output: the argmax of a ``(batch, classes)`` output,
        logits or softmax probabilities alike; of one column, ``(batch, 1)`` or
        ``(batch,)``, ``output > 0.5`` where the output layer's ``activation`` is
        ``keras.activations.sigmoid`` (``Dense(1, activation="sigmoid")``), else
        ``output > 0`` (logits; a warning says when such a column lies in [0, 1] in
        the first batch). Labels that are not integers (class names) and models with
        several outputs get no default predictions: ``predict=`` sets them. A warning
        says when labels are given but no prediction is stored.
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
        Unknown layer names (with the closest names), a shared layer named without a
        call, outputs that are not single tensors, labels or metadata whose length
        differs from the data, a probe set or layer sizes that differ from what the
        store holds, a ``tf.data`` pipeline whose order is not fixed or that is
        infinite, positional inputs whose second looks like an attention mask of the
        first (the ids' shape, only 0 and 1) with a token reduction of a layer no Keras
        mask masks (see ``reduce``). Nothing is written then.

    Warns
    -----
    UserWarning
        Once, when labels are given but no prediction is stored (see ``predict``), or a
        one-column output not known to be a probability lies in [0, 1].
    """
    probe = probe_model(model, layers, output_keys=output_keys)
    batches, ids, probe_labels, n = _batches(
        data, probe, labels=labels, metadata=metadata, sample_ids=sample_ids,
        batch_size=batch_size)
    return _run(model, probe, batches, store, model_name=model_name, epoch=epoch,
                reduce=reduce, probe_ids=ids, probe_labels=probe_labels, n_samples=n,
                batch_size=batch_size, progress=progress, scalars=scalars, predict=predict,
                compressor=compressor, dtype=dtype)


def _run(model: keras.Model, probe: ProbeModel, batches: Any, store: Any, *,
         reduce: str, **kwargs: Any) -> RecordResult:
    batches, specs = probe.follow_masks(batches, reduce)
    return run_recording(
        probe, batches, store, reduce=reduce, layers=probe.layers, specs=specs,
        channel_axis=probe.channel_axis, axis_rules=probe.rules,
        attrs={"framework": "keras", "keras_backend": keras.backend.backend()},
        description="keras", probabilities=_ends_in_sigmoid(model),
        no_default_predictions=_several_outputs(model), **kwargs)


def _ends_in_sigmoid(model: keras.Model) -> bool:
    """Whether the model's (first) output comes from a layer whose ``activation`` is
    ``keras.activations.sigmoid`` (``Dense(1, activation="sigmoid")``,
    ``Activation("sigmoid")``), also as the output of a nested model."""
    for _ in range(32):  # nested models, each the operation of its parent's output
        outputs = getattr(model, "outputs", None)
        if not outputs:
            return False
        history = getattr(outputs[0], "_keras_history", None)
        layer = getattr(history, "operation", None)
        if getattr(layer, "activation", None) is keras.activations.sigmoid:
            return True
        if not isinstance(layer, keras.Model):
            return False
        model = layer
    return False


def _several_outputs(model: keras.Model) -> str | None:
    """Why no default prediction is derived from a model with several outputs, or None."""
    outputs = getattr(model, "outputs", None) or []
    if len(outputs) < 2:
        return None
    names = list(getattr(model, "output_names", None) or [t.name for t in outputs])
    return (
        f"keras model {model.name!r} has {len(outputs)} outputs {names}, and which one holds "
        "the classes is not known; predict= gets them all as the model returns them (a "
        "dict by name or a list), e.g. predict=lambda out: out['main'].argmax(1)")


#: Added to the error of :func:`topoxr.recording.check_recorded_epoch` by the callback.
_FIT_HINT = ("; Keras numbers the epochs of every fit call from 0: a fit that continues "
             "training needs initial_epoch=<epochs trained so far>")


class RecordActivations(keras.callbacks.Callback):
    """Keras callback recording a fixed probe set during ``model.fit``.

    The state a fit starts from is recorded at its first epoch's start
    (``on_epoch_begin``, before any update), labelled with that epoch's number:
    ``0``, or ``k`` for ``model.fit(..., initial_epoch=k)``. Epoch ``k`` is recorded
    after the k-th epoch of training (``on_epoch_end``) whenever ``k`` is a multiple of
    ``every``, with the epoch's logs (loss, accuracy, ...) as per-epoch scalars. Each
    recorded epoch costs one pass over the probe set (one sub-model returns the layers
    and the model output together); its time is logged (INFO).

    Epochs already complete in the store are checked, then skipped: the first probe
    batch is recorded again and compared with the store
    (:func:`topoxr.recording.check_recorded_epoch`). So a run restarted from a
    checkpoint of epoch ``k`` with ``model.fit(..., initial_epoch=k)`` and a new
    callback on the same store finds its starting state stored as epoch ``k``, and
    records epochs ``k + 1, ...`` (:attr:`recorded_epochs` lists what the store holds).
    A fit that continues training without ``initial_epoch`` numbers its epochs from 0
    again: its model no longer gives the values stored for those epochs, and the fit is
    stopped with a :class:`~topoxr.RecordingError` rather than record nothing, or
    record under the wrong epoch.

    Parameters
    ----------
    probe : array_like or tuple
        ``x`` or ``(x, y)``: the samples recorded at every epoch (labels of shape
        ``(N, 1)`` are read as ``(N,)``).
    store : str or ActivationWriter
        Where to record.
    model_name : str, default "model"
        Model group name.
    layers : str, sequence of str, or mapping
        Layer names or glob patterns, or ``{name: settings}`` (as for :func:`record`);
        the probe sub-model is built at the start of each fit.
    every : int, default 1
        Record every ``every`` epochs.
    record_initial : bool, default True
        Record the state before training: at the start of each fit, labelled with its
        first epoch (``initial_epoch``, 0 by default).
    labels, metadata, sample_ids, reduce, batch_size, output_keys, predict
        As for :func:`record`.
    progress : bool, default False
        Show a progress bar per recorded epoch.

    Raises
    ------
    RecordingError
        From ``model.fit``: where an epoch the store holds complete gives other values
        now (another training run, or a fit numbering its epochs from 0 again), or the
        recording does not fit the store.

    Examples
    --------
    >>> from topoxr_keras.models import load_digits_data, make_model, train
    >>> x, y = load_digits_data()
    >>> model = make_model("mlp")
    >>> cb = RecordActivations((x[:64], y[:64]), "memory://doc-cb.zarr", model_name="mlp",
    ...                        layers=["fc1", "fc2"])
    >>> _ = train(model, x[:256], y[:256], epochs=2, callbacks=[cb])
    >>> cb.recorded
    [0, 1, 2]
    """

    def __init__(
        self,
        probe: Any,
        store: Any,
        *,
        model_name: str = "model",
        layers: Any,
        every: int = 1,
        record_initial: bool = True,
        labels: Any = None,
        metadata: Mapping[str, Any] | None = None,
        sample_ids: Any = None,
        reduce: str = "mean",
        batch_size: int = 256,
        output_keys: Mapping[str, str | int] | None = None,
        progress: bool = False,
        predict: Callable[[np.ndarray], Any] | None = None,
    ) -> None:
        super().__init__()
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise RecordingError(f"every must be a positive integer, got {every!r}")
        self.store = store
        self.model_name = model_name
        self.layers = layers
        self.every = every
        self.record_initial = record_initial
        self.x, self.y, self.ids, self.metadata = prepare_arrays(
            probe, labels=labels, metadata=metadata, sample_ids=sample_ids)
        self.reduce = reduce
        self.batch_size = batch_size
        self.output_keys = output_keys
        self.progress = progress
        self.predict = predict
        self.recorded: list[int] = []
        self._probe: ProbeModel | None = None
        self._starting = False

    def on_train_begin(self, logs: Mapping[str, Any] | None = None) -> None:
        """Build the probe sub-model (for the model's graph as it is now).

        Parameters
        ----------
        logs : mapping of str to object, optional
            What Keras passes to ``on_train_begin``; not used.
        """
        self._probe = probe_model(self.model, self.layers, output_keys=self.output_keys)
        self._starting = self.record_initial

    def on_epoch_begin(self, epoch: int, logs: Mapping[str, Any] | None = None) -> None:
        """At the first epoch of a fit, record the state it starts from, labelled
        ``epoch`` (with ``record_initial``).

        Keras does not tell callbacks the ``initial_epoch`` of a fit; the number of the
        first epoch it begins is that. The epoch is checked and skipped where the store
        already holds it complete for every recorded layer (a fit continuing from a
        checkpoint of that epoch).

        Parameters
        ----------
        epoch : int
            Index of the epoch that begins, from 0, as Keras counts it (``initial_epoch``
            included).
        logs : mapping of str to object, optional
            What Keras passes to ``on_epoch_begin``; not used (the state before an
            epoch is recorded without scalars).
        """
        if self._starting:
            self._starting = False
            self._record(epoch, {}, starting=True)

    def on_epoch_end(self, epoch: int, logs: Mapping[str, Any] | None = None) -> None:
        """Record after the epoch (labelled ``epoch + 1``) if it is due.

        It is due when ``epoch + 1`` is a multiple of ``every``; where the store
        already holds that epoch complete for every recorded layer it is checked, then
        skipped.

        Parameters
        ----------
        epoch : int
            Index of the epoch that ended, from 0, as Keras counts it (``initial_epoch``
            included).
        logs : mapping of str to object, optional
            The epoch's metrics, as Keras passes them (``loss``, ``accuracy``, ``val_loss``,
            ...). Every entry whose key is a Python identifier and whose value converts to
            a finite float is stored as a per-epoch scalar; the others are left out.
        """
        if (epoch + 1) % self.every == 0:
            self._record(epoch + 1, logs or {})

    @property
    def recorded_epochs(self) -> list[int]:
        """Epochs the store holds complete for every recorded layer."""
        if self._probe is None:
            raise RuntimeError("recorded_epochs is known once training has started")
        return completed_epochs(self.store, self.model_name, self._probe.layers)

    def _record(self, epoch: int, logs: Mapping[str, Any], *, starting: bool = False) -> None:
        probe = self._probe
        if probe is None:
            raise RuntimeError("RecordActivations used outside model.fit")
        stored = stored_unless_recorded(self.store, self.model_name, probe.layers, epoch)
        if starting and stored and any(
                epoch in info.epochs and not info.complete[info.epochs.index(epoch)]
                for info in stored.values()):
            # an earlier run stopped while recording it: completed from this fit's start
            warnings.warn(
                f"epoch {epoch} of model {self.model_name!r} was left incomplete by an "
                "earlier run (stopped while recording it); it is completed from the state "
                "this fit starts from, without that run's logs (loss, ...) unless it had "
                "stored them", UserWarning, stacklevel=3)
        scalars = {}
        for key, value in logs.items():
            try:
                value = float(value)
            except (TypeError, ValueError):
                continue
            if key.isidentifier() and math.isfinite(value):
                scalars[key] = value
        batches = iter_array_batches(self.x, self.ids, self.y, self.metadata, self.batch_size)

        def run(batches: Any, store: Any, stored: Any, scalars: Mapping[str, float],
                progress: bool) -> RecordResult:
            return _run(self.model, probe, batches, store, model_name=self.model_name,
                        epoch=epoch, reduce=self.reduce, probe_ids=self.ids,
                        probe_labels=self.y, n_samples=len(self.ids),
                        batch_size=self.batch_size, progress=progress, scalars=scalars,
                        predict=self.predict, stored=stored)

        if stored is None:
            check_recorded_epoch(
                lambda first, scratch, held: run(first, scratch, held, {}, False),
                batches, self.store, model=self.model_name, layers=probe.layers,
                epoch=epoch, hint=_FIT_HINT)
            return
        run(batches, self.store, stored, scalars, self.progress)
        self.recorded.append(epoch)
