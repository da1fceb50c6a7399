"""Attach layouts to labeled objects; compute many in parallel; save them in the store.

:func:`attach` is the xarray face of the layout estimators: profiles -> estimator ->
``x``, ``y`` coordinates on ``neuron``, with the provenance (method, parameters, seeds,
metric, profile) in the ``topoxr_layout`` attribute. :func:`compute_layouts` runs many
layouts (models x layers x epochs x methods x seeds) as independent dask tasks, on
threads, processes or a ``dask.distributed`` cluster; every task's seed is drawn up
front from the user's seed, so the result does not depend on chunking or scheduling.
:func:`save_layout` / :func:`load_layout` keep layouts inside the store, beside the layer
(``<model>/<layer>/layouts/<name>``), where :func:`topoxr.open_store` shows them as child
nodes of the layer.
"""

from __future__ import annotations

import copy
import json
import logging
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import xarray as xr

from topoxr.conventions import ATTR_LAYOUT, ATTR_SAVING, EPOCH, NEURON, X, Y
from topoxr.layouts._registry import (
    DEFAULT_METHOD,
    _copy_estimator,
    _own_settings,
    _same,
    get_estimator,
)
from topoxr.similarity import (
    ATTR_PROFILE,
    FEATURE,
    METRICS,
    ProfileError,
    _match_neurons,
    degenerate_rows,
    profiles,
    report_degenerate,
)

__all__ = [
    "LAYOUTS_GROUP",
    "attach",
    "compute_layouts",
    "draw_seeds",
    "load_layout",
    "save_layout",
]

logger = logging.getLogger(__name__)

#: Child group of a layer that holds saved layouts.
LAYOUTS_GROUP = "layouts"


# --------------------------------------------------------------------------------------
# Seeds and the single fit
# --------------------------------------------------------------------------------------
def draw_seeds(random_state: int | None, n: int) -> tuple[int, list[int]]:
    """Draw ``n`` task seeds from one user seed (topoxr's one seed rule).

    The first seed is ``random_state`` itself when it is an int in ``[0, 2**32)``, so a
    single layout with ``random_state=s`` equals ``get_estimator(method,
    random_state=s).fit_transform(X)``; the others come from
    ``numpy.random.SeedSequence(random_state)``.

    Parameters
    ----------
    random_state : int or None
        The user's seed; None draws fresh entropy (returned, so the run can be repeated).
    n : int
        Number of seeds (one per epoch).

    Returns
    -------
    entropy, seeds : int, list of int
        The root seed actually used and ``n`` seeds in ``[0, 2**32)``.

    Examples
    --------
    >>> draw_seeds(7, 3)[1][0]
    7
    """
    if random_state is not None and not isinstance(random_state, (int, np.integer)):
        raise TypeError(f"random_state must be an int or None, got {type(random_state).__name__}")
    ss = np.random.SeedSequence(random_state)
    seeds = [int(s) for s in ss.generate_state(max(n, 1))[:n]]
    root = int(ss.entropy)
    if seeds and 0 <= root < 2**32:
        seeds[0] = root
    return root, seeds


def _clean(X: np.ndarray) -> np.ndarray:
    X = np.asarray(X, dtype=np.float64)
    X = X[:, ~np.isnan(X).all(axis=0)]
    if not np.isfinite(X).all():
        rows = np.flatnonzero(~np.isfinite(X).all(axis=1))
        raise ProfileError(f"profiles hold NaN or inf for neuron position(s) {rows[:20].tolist()}")
    if X.shape[1] == 0:
        raise ProfileError("profiles have no finite feature")
    return X


def _build(method: Any, seed: Any, metric: str, params: Mapping[str, Any]) -> Any:
    """The estimator of one layout: a name's, or a copy of an instance (never the
    caller's object), with ``metric`` and ``seed`` set where it takes them."""
    probe = get_estimator(method if isinstance(method, str) else _copy_estimator(method),
                          **params)
    if isinstance(seed, np.random.RandomState):
        # a copy for every layout, as scikit-learn's clone makes: the caller's generator
        # would advance with every layout, and the same call give another layout
        seed = copy.deepcopy(seed)
    accepted = probe.get_params() if hasattr(probe, "get_params") else {}
    extra = {k: v for k, v in (("metric", metric), ("random_state", seed)) if k in accepted
             and k not in params}
    if not extra:
        return probe
    if isinstance(method, str):  # a composition hands metric and seed to its first step
        return get_estimator(method, **extra, **params)
    return probe.set_params(**extra)


def _settings(method: Any, metric: str | None, random_state: Any) -> tuple[str, Any]:
    """The metric of a layout of ``method`` and the seed an estimator instance fixes
    (None: draw seeds from ``random_state``); a setting given both on the instance and
    as an argument, with different values, is refused."""
    own = _own_settings(method)
    if metric is not None and "metric" in own and not _same(own["metric"], metric):
        raise ProfileError(f"the estimator has metric={own['metric']!r} and metric={metric!r} "
                           "was passed: set it in one place")
    metric = metric if metric is not None else own.get("metric", "cosine")
    if metric not in METRICS:
        raise ProfileError(f"unknown metric {metric!r}; choose one of {list(METRICS)}")
    fixed = own.get("random_state")
    if fixed is not None and random_state is not None and not _same(fixed, random_state):
        raise ValueError(f"the estimator has random_state={fixed!r} and random_state="
                         f"{random_state!r} was passed: set the seed in one place")
    return metric, fixed


def _seeds(random_state: int | None, fixed: Any, n: int) -> tuple[Any, list[Any]]:
    """The root seed and the ``n`` layouts' seeds: drawn from ``random_state``
    (:func:`draw_seeds`), or the seed an estimator instance fixes, for every layout."""
    if fixed is None:
        return draw_seeds(random_state, n)
    return fixed, [fixed] * n


def _root_seed(random_state: int | None, fixed: Any) -> Any:
    """The root seed of a layout, drawn once: ``random_state``, fresh entropy when it is
    None, or the seed an estimator instance fixes. ``draw_seeds(root, n)`` gives the
    seeds ``draw_seeds(random_state, n)`` would have drawn with that entropy."""
    if fixed is not None:
        return fixed
    return draw_seeds(random_state, 0)[0]


def _seeded(profile: Any, root: Any) -> Any:
    """``profile`` with the sample subset of activation profiles seeded by ``root``.

    A mapping of :func:`topoxr.profiles` arguments with ``source="activations"`` and no
    ``random_state`` of its own gets ``random_state=root`` (None for a root that is not
    an int, such as a RandomState an estimator holds: :func:`topoxr.profiles` then draws
    fresh entropy and records it), so a layout with ``random_state=s`` draws the same
    samples every time. Anything else is returned as it is.
    """
    if (isinstance(profile, Mapping) and profile.get("source", "naps") == "activations"
            and "random_state" not in profile):
        seed = int(root) if isinstance(root, (int, np.integer)) else None
        return {**profile, "random_state": seed}
    return profile


def _fit_one(X: np.ndarray, method: Any, seed: Any, metric: str,
             params: Mapping[str, Any]) -> np.ndarray:
    """One layout: validated profiles -> (n, 2) coordinates in the unit square."""
    est = _build(method, seed, metric, params)
    coords = np.asarray(est.fit_transform(X), dtype=np.float64)
    if coords.shape != (X.shape[0], 2) or not np.isfinite(coords).all():
        raise RuntimeError(f"layout {method!r} returned invalid coordinates {coords.shape}")
    return coords


def _method_name(method: Any) -> str:
    return method if isinstance(method, str) else type(method).__name__


def _jsonable(value: Any) -> Any:
    """``value`` as plain JSON types (objects JSON cannot hold become their ``repr``)."""
    return json.loads(json.dumps(dict(value) if isinstance(value, Mapping) else value,
                                 default=repr))


# --------------------------------------------------------------------------------------
# Profiles of an object, per epoch
# --------------------------------------------------------------------------------------
def _profiles_of(obj: Any, profile: Any) -> xr.DataArray:
    """The profiles to lay ``obj``'s neurons out from, ``(neuron, feature[, epoch])``, in
    ``obj``'s neuron order.

    Given profiles (a DataArray) are matched to ``obj`` by neuron label, not position:
    the same labels in another order are put in ``obj``'s order; other labels, repeated
    labels or dimensions besides neuron, feature and epoch are refused.
    """
    if isinstance(profile, xr.DataArray):
        prof = profile
    elif profile is None and isinstance(obj, xr.DataArray) and FEATURE in obj.dims:
        prof = obj  # the object is a profile matrix (neuron, feature[, epoch]) already
    elif profile is None:
        prof = profiles(obj)
    elif isinstance(profile, Mapping):
        prof = profiles(obj, **profile)
    else:
        raise TypeError("profile must be None, a mapping of profiles() arguments or a "
                        f"DataArray of profiles, got {type(profile).__name__}")
    if FEATURE not in prof.dims or NEURON not in prof.dims:
        raise ProfileError(f"profiles need dims ('neuron', 'feature'[, 'epoch']), got {prof.dims}")
    extra = [d for d in prof.dims if d not in (NEURON, FEATURE, EPOCH)]
    if extra:
        raise ProfileError(
            f"profiles have dims {extra} besides ('neuron', 'feature'[, 'epoch']): one "
            "layout lays out one layer's neurons; select one entry of each (e.g. "
            f".sel({extra[0]}=...)) or lay out each separately")
    if NEURON in obj.dims:
        prof = _match_neurons(prof, obj)
    return prof.transpose(NEURON, FEATURE, ...)


def _per_epoch(prof: xr.DataArray, obj: Any, share: Any) -> xr.DataArray:
    """Profiles with several epochs, for one layout per epoch, in ``obj``'s epochs
    (refused unless they hold exactly ``obj``'s epochs); others as they are."""
    if share is None and EPOCH in prof.dims and prof.sizes[EPOCH] > 1 and EPOCH in obj.dims:
        return _match_epochs(prof, obj)  # one layout per epoch, put on obj's epochs
    return prof


def _match_epochs(prof: xr.DataArray, obj: Any) -> xr.DataArray:
    """Per-epoch profiles in ``obj``'s epoch order, matched by label."""
    want = np.asarray(obj[EPOCH].values)
    have = np.asarray(prof[EPOCH].values)
    if np.array_equal(want, have):
        return prof
    if len(np.unique(have)) != len(have) or set(want.tolist()) != set(have.tolist()):
        raise ProfileError(
            f"per-epoch profiles hold epochs {have.tolist()}, the object "
            f"{want.tolist()}: one layout per epoch needs the profiles of every epoch of "
            "the object (select the same epochs, or pass share='all' or an epoch label)")
    return prof.sel({EPOCH: want})


def _matrices(prof: xr.DataArray, share: Any) -> tuple[list[Any], list[np.ndarray]]:
    """The profile matrix of every layout to compute: [(epoch label or None)], [X]."""
    values = np.asarray(prof.values, dtype=np.float64)  # computes dask input once
    if EPOCH not in prof.dims:
        return [None], [_clean(values)]
    epochs = prof[EPOCH].values.tolist()
    if share is None:
        return epochs, [_clean(values[:, :, e]) for e in range(len(epochs))]
    if isinstance(share, str) and share == "all":
        return ["all"], [_clean(values.reshape(values.shape[0], -1))]
    if share not in epochs:
        raise ProfileError(f"share={share!r} is neither None, 'all' nor an epoch of {epochs}")
    return [share], [_clean(values[:, :, epochs.index(share)])]


def _assemble(obj: Any, per_epoch: bool, coords: list[np.ndarray], desc: dict[str, Any],
              align: bool) -> Any:
    from topoxr.alignment import align_epochs

    if per_epoch:
        P = np.stack(coords, axis=1)  # (neuron, epoch, 2)
        out = obj.assign_coords({X: ((NEURON, EPOCH), P[..., 0]),
                                 Y: ((NEURON, EPOCH), P[..., 1])})
    else:
        out = obj.assign_coords({X: (NEURON, coords[0][:, 0]), Y: (NEURON, coords[0][:, 1])})
    out.attrs = {**obj.attrs, ATTR_LAYOUT: json.dumps(desc)}
    if align and per_epoch:
        out = align_epochs(out)
    return out


def attach(
    obj: Any,
    method: Any = DEFAULT_METHOD,
    *,
    random_state: int | None = None,
    profile: Any = None,
    metric: str | None = None,
    share: Any = None,
    align: bool = True,
    **params: Any,
) -> Any:
    """Lay out the neurons of ``obj`` and return it with ``x``, ``y`` coordinates.

    Parameters
    ----------
    obj : xarray.DataArray or xarray.Dataset
        Activations ``(neuron, sample, epoch)`` (a layer node of
        :func:`topoxr.open_store`), NAPs from :func:`topoxr.naps`, or a profile matrix
        ``(neuron, feature[, epoch])`` from :func:`topoxr.profiles` (used as it is).
    method : str or estimator, default :data:`topoxr.layouts._registry.DEFAULT_METHOD`
        A registered layout name (``"pca"``, ``"umap+force"``...; see
        :func:`topoxr.layouts.available_methods`) or an estimator instance. An
        instance is copied for every layout (it is never changed or fitted); its own
        ``metric`` and ``random_state``, where they differ from its class's defaults,
        are used, and passing a different one here as well is refused.
    random_state : int, optional
        Root seed. One seed per layout (epoch) is drawn from it up front with
        :func:`draw_seeds`: the first (or only) layout uses ``random_state`` itself, so
        it equals ``get_estimator(method, random_state=random_state)`` on the same
        profiles. With None, fresh entropy is drawn and recorded (or an estimator
        instance's own ``random_state`` is used for every layout).
    profile : mapping or xarray.DataArray, optional
        Arguments of :func:`topoxr.profiles` (e.g. ``{"source": "activations",
        "n_samples": 500, "balanced": True}``), or precomputed profiles. Default: NAPs by
        label (or the NAPs themselves when ``obj`` is NAPs). Activation profiles
        (``"source": "activations"``) without a ``random_state`` of their own draw
        their random subset of samples with the root seed (``random_state``, or the
        entropy drawn for it), so the same ``random_state`` gives the same samples and
        the same layout. Precomputed profiles are matched to ``obj``'s neurons by label
        (and, for one layout per epoch, to its epochs by label); other labels, repeated
        labels or dimensions besides ``neuron``, ``feature`` and ``epoch`` are refused.
    metric : {"cosine", "correlation", "euclidean"}, optional
        Profile distance handed to the estimator; default an estimator instance's own
        ``metric``, else ``"cosine"``. Dead/constant neurons are reported
        (``dead_neurons``/``constant_neurons`` in the layout description).
    share : None, "all" or an epoch label, default None
        ``None``: one layout per epoch, ``x``/``y`` on ``(neuron, epoch)`` (with a
        single epoch, one layout with ``x``/``y`` on ``neuron``). ``"all"``: one
        layout from the profiles of all epochs side by side. An epoch label: that
        epoch's layout for every epoch (the paper's fixed layout for animations).
        Shared layouts put ``x``/``y`` on ``neuron`` only.
    align : bool, default True
        For per-epoch layouts, align each epoch onto the previous one
        (:func:`topoxr.alignment.align_epochs`) so animations do not flip.
    **params
        Parameters of the estimator.

    Returns
    -------
    same type as ``obj``
        A new object (neurons never reordered, ``obj`` not modified) with coordinates
        ``x``, ``y`` on ``neuron`` and the JSON attribute ``topoxr_layout``: ``method``,
        ``params``, ``metric``, ``random_state``, ``seeds``, ``share``, ``profile`` (the
        profile description), ``dead_neurons``, ``constant_neurons``.

    Raises
    ------
    ValueError
        For an unknown method (the message lists the registered ones), an unknown
        metric, NaN/inf profiles or fewer than 5 neurons.

    Examples
    --------
    >>> from topoxr.testing import make_activations
    >>> laid = attach(make_activations(n_neurons=12), "pca", random_state=0)
    >>> laid.x.dims
    ('neuron', 'epoch')
    """
    metric, fixed = _settings(method, metric, random_state)
    get_estimator(method, **params)  # fail early on an unknown method or parameter
    root = _root_seed(random_state, fixed)
    prof = _per_epoch(_profiles_of(obj, _seeded(profile, root)), obj, share)
    epochs, mats = _matrices(prof, share)
    entropy, seeds = _seeds(root, fixed, len(mats))
    dead = np.zeros(prof.sizes[NEURON], dtype=bool)
    constant = np.zeros_like(dead)
    for Xm in mats:
        d, c = degenerate_rows(Xm, metric)
        dead |= d
        constant |= c
    rep = report_degenerate({"dead": dead, "constant": constant & ~dead},
                            np.asarray(prof[NEURON].values), metric, "layout")
    coords = [_fit_one(Xm, method, s, metric, params) for Xm, s in zip(mats, seeds, strict=True)]
    desc = {
        "method": _method_name(method), "params": _jsonable(params), "metric": metric,
        "random_state": _jsonable(entropy), "seeds": _jsonable(seeds),
        "share": share, "epochs": [e for e in epochs if e is not None],
        "profile": json.loads(prof.attrs.get(ATTR_PROFILE, "{}")), **rep,
    }
    # one layout (one epoch, or shared): x/y on neuron only
    per_epoch = epochs[0] is not None and share is None and len(epochs) > 1
    if per_epoch and EPOCH not in obj.dims:
        raise ProfileError("per-epoch profiles need an object with an 'epoch' dimension; "
                           "pass share='all' or an epoch label")
    return _assemble(obj, per_epoch, coords, desc, align)


# --------------------------------------------------------------------------------------
# Many layouts in parallel
# --------------------------------------------------------------------------------------
def _layer_nodes(tree: xr.DataTree, models: Iterable[str] | None,
                 layers: Iterable[str] | None) -> list[tuple[str, str, xr.Dataset]]:
    from topoxr.conventions import ACTIVATION

    want_m = None if models is None else set(models)
    want_l = None if layers is None else set(layers)
    out = []
    for model_name, model_node in tree.children.items():
        if want_m is not None and model_name not in want_m:
            continue
        for layer_name, node in model_node.children.items():
            if ACTIVATION not in node.data_vars:
                continue
            if want_l is not None and layer_name not in want_l:
                continue
            out.append((str(model_name), str(layer_name), node.to_dataset()))
    if not out:
        raise ValueError(f"no layer matches models={models} layers={layers}; the tree has "
                         f"{[f'{m}/{l}' for m, c in tree.children.items() for l in c.children]}")
    return out


def compute_layouts(
    tree: xr.DataTree,
    *,
    models: Iterable[str] | None = None,
    layers: Iterable[str] | None = None,
    epochs: Any = None,
    methods: Sequence[Any] = (DEFAULT_METHOD,),
    seeds: Sequence[int] = (0,),
    profile: Any = None,
    metric: str | None = None,
    align: bool = True,
    client: Any = None,
    scheduler: str | None = None,
    progress: bool = True,
    **params: Any,
) -> xr.DataTree:
    """Compute many layouts in parallel with dask.

    One task per (model, layer, epoch, method, seed). The task seeds are drawn up front
    exactly as :func:`attach` draws them (``draw_seeds(seed, n_epochs)`` per layer), so
    ``compute_layouts(tree, seeds=[s])`` equals ``attach(layer, method,
    random_state=s)`` for every layer, whatever the scheduler.

    Parameters
    ----------
    tree : xarray.DataTree
        As returned by :func:`topoxr.open_store`.
    models, layers : iterable of str, optional
        Node names to include (default: all).
    epochs : label or list of labels, optional
        Epochs to lay out (default: all); precomputed profiles are cut to them as well.
    methods : sequence of str or estimators, default ``(DEFAULT_METHOD,)``
    seeds : sequence of int, default ``(0,)``
        One full set of layouts per seed.
    profile, metric, align, **params
        As in :func:`attach`; precomputed profiles (a DataArray) only with one layer
        selected, and with several epochs only when they hold every (selected) epoch
        of the layer, as :func:`attach` requires. Activation profiles without a
        ``random_state`` draw their samples with each seed, as :func:`attach` does.
        Estimator instances among ``methods`` must leave ``random_state`` unset (every
        task's seed is drawn from ``seeds``), and share one ``metric``.
    client : distributed.Client, optional
        Run the profiles and the layout tasks on this cluster.
    scheduler : {"threads", "processes", "sync"}, optional
        Local dask scheduler when no client is given (default: dask's, i.e. threads).
        With ``"processes"`` the profiles are still reduced on threads (I/O bound) and
        only the layout tasks go to the process pool.
    progress : bool, default True
        Show a tqdm progress bar over the layout tasks.

    Returns
    -------
    xarray.DataTree
        Nodes ``/<model>/<layer>`` holding a Dataset with ``x``, ``y`` of dims
        ``("layout", "seed", "epoch", "neuron")`` (no ``epoch`` for layers without one)
        and the layer's neuron coordinates; attrs ``topoxr_layout`` (JSON: metric,
        params, profile, seeds per seed; ``profile`` is one description, or one per
        seed, keyed by seed, where the seeds draw their own samples). Method names are
        the ``layout`` coordinate (not ``method``, which would clash with the ``method``
        argument of ``.sel``).

    Raises
    ------
    ValueError
        For empty ``methods`` or ``seeds``, no matching layer, an unknown method, or an
        estimator instance with its own ``random_state``.
    topoxr.similarity.ProfileError
        For methods of different metrics, precomputed profiles given for several
        layers, or precomputed profiles that lack an epoch of ``epochs`` or hold
        several epochs but not exactly the layer's (selected) ones.
    """
    import dask
    from tqdm.auto import tqdm

    from topoxr.alignment import align_epochs

    methods = list(methods)
    seeds = [int(s) for s in seeds]
    if not methods or not seeds:
        raise ValueError("methods and seeds must not be empty")
    metrics = set()
    for method in methods:
        own_metric, fixed = _settings(method, metric, None)
        if fixed is not None:
            raise ValueError(f"the estimator {method!r} has its own random_state; "
                             "compute_layouts draws every task's seed from seeds=, so pass "
                             "an estimator with random_state=None")
        metrics.add(own_metric)
        get_estimator(method, **params)
    if len(metrics) > 1:
        raise ProfileError(f"the methods' estimators have different metrics {sorted(metrics)}; "
                           "lay them out with one metric per call")
    metric = metrics.pop()
    nodes = _layer_nodes(tree, models, layers)
    if isinstance(profile, xr.DataArray) and len(nodes) > 1:
        raise ProfileError(
            f"profile is one layer's profiles (a DataArray), and {len(nodes)} layers are "
            "laid out: pass profiles() arguments as a mapping, or select one layer with "
            "models=/layers=")
    if epochs is not None:
        sel = [epochs] if np.ndim(epochs) == 0 else list(epochs)
        nodes = [(m, l, ds.sel({EPOCH: sel})) for m, l, ds in nodes]
        if isinstance(profile, xr.DataArray) and EPOCH in profile.dims:
            missing = [e for e in sel if e not in profile[EPOCH].values.tolist()]
            if missing:
                raise ProfileError(
                    f"epochs={sel!r} selects epochs {missing} that the given profiles do "
                    f"not hold (they hold {profile[EPOCH].values.tolist()})")
            profile = profile.sel({EPOCH: sel})

    # The NAP reductions read chunks and release the GIL: threads serve them best, and a
    # process pool would only add start-up and pickling, so "processes" is kept for the
    # layout tasks (pure Python/numpy estimators that hold the GIL).
    get = client if client is not None else ("threads" if scheduler == "processes"
                                              else scheduler)
    # activation profiles draw their samples with each seed, as attach does
    variants = [_seeded(profile, seed) for seed in seeds]
    by_seed = any(v is not profile for v in variants)
    if not by_seed:
        variants = [profile]
    lazy_profiles = [_per_epoch(_profiles_of(ds, v), ds, None)
                     for _, _, ds in nodes for v in variants]
    computed = dask.compute(*lazy_profiles, scheduler=get)
    per_profile = [_matrices(p, None) for p in computed]

    def _variant(li: int, si: int) -> int:
        return li * len(variants) + (si if by_seed else 0)

    tasks, index = [], []
    # keys unique to this call: a scheduler shared by two calls at once (one cluster,
    # one or several clients) hands a task's result to every submission of its key, so
    # keys made of positions alone gave one call the other call's layouts
    call = uuid.uuid4().hex[:12]
    for li in range(len(nodes)):
        for mi, method in enumerate(methods):
            for si, seed in enumerate(seeds):
                _, mats = per_profile[_variant(li, si)]
                _, task_seeds = draw_seeds(seed, len(mats))
                for ei, (Xm, ts) in enumerate(zip(mats, task_seeds, strict=True)):
                    key = f"topoxr-layout-{call}-{li}-{mi}-{si}-{ei}"
                    tasks.append(dask.delayed(_fit_one, pure=True)(
                        Xm, method, ts, metric, dict(params), dask_key_name=key))
                    index.append((li, mi, si, ei))
    results = _run(tasks, client=client, scheduler=scheduler, progress=progress, tqdm=tqdm)

    out: dict[str, xr.Dataset] = {}
    for li, (model, layer, ds) in enumerate(nodes):
        ep_labels, mats = per_profile[_variant(li, 0)]
        n = mats[0].shape[0]
        P = np.empty((len(methods), len(seeds), len(ep_labels), n, 2))
        for (lj, mi, si, ei), coords in zip(index, results, strict=True):
            if lj == li:
                P[mi, si, ei] = coords
        has_epoch = ep_labels[0] is not None
        neuron_coords = {c: ds.coords[c].variable for c in ds.coords
                         if ds.coords[c].dims == (NEURON,)}
        if has_epoch and align:
            for mi in range(len(methods)):
                for si in range(len(seeds)):
                    tmp = xr.Dataset(coords={
                        NEURON: ds[NEURON].values, EPOCH: ep_labels,
                        X: ((NEURON, EPOCH), P[mi, si, :, :, 0].T),
                        Y: ((NEURON, EPOCH), P[mi, si, :, :, 1].T)})
                    tmp = align_epochs(tmp)
                    P[mi, si, :, :, 0] = tmp[X].transpose(EPOCH, NEURON).values
                    P[mi, si, :, :, 1] = tmp[Y].transpose(EPOCH, NEURON).values
        dims = ("layout", "seed", EPOCH, NEURON) if has_epoch else ("layout", "seed", NEURON)
        data = P if has_epoch else P[:, :, 0]
        coords = {"layout": [_method_name(m) for m in methods], "seed": seeds, **neuron_coords}
        if has_epoch:
            coords[EPOCH] = ep_labels
        described = [json.loads(computed[_variant(li, si)].attrs.get(ATTR_PROFILE, "{}"))
                     for si in range(len(seeds))]
        desc = {"metric": metric, "params": _jsonable(params),
                "profile": ({str(s): d for s, d in zip(seeds, described, strict=True)}
                            if by_seed else described[0]),
                "seeds": {str(s): draw_seeds(s, len(mats))[1] for s in seeds}}
        out[f"/{model}/{layer}"] = xr.Dataset(
            {X: (dims, data[..., 0]), Y: (dims, data[..., 1])}, coords=coords,
            attrs={**ds.attrs, ATTR_LAYOUT: json.dumps(desc)})
    return xr.DataTree.from_dict(out)


def _run(tasks: list[Any], *, client: Any, scheduler: str | None, progress: bool,
         tqdm: Any) -> list[np.ndarray]:
    import dask

    bar = tqdm(total=len(tasks), desc="layouts", unit="layout", disable=not progress)
    try:
        if client is not None:
            from distributed import as_completed

            futures = client.compute(tasks)
            position = {f.key: i for i, f in enumerate(futures)}
            results: list[Any] = [None] * len(futures)
            for fut in as_completed(futures):
                results[position[fut.key]] = fut.result()
                bar.update(1)
            return results
        from dask.callbacks import Callback

        def _posttask(key: Any, result: Any, dsk: Any, state: Any, worker_id: Any) -> None:
            if isinstance(key, str) and key.startswith("topoxr-layout-"):
                bar.update(1)

        with Callback(posttask=_posttask):
            return list(dask.compute(*tasks, scheduler=scheduler))
    finally:
        bar.close()


# --------------------------------------------------------------------------------------
# Saved layouts
# --------------------------------------------------------------------------------------
def _layer_group(store: Any, model: str, layer: str, mode: str,
                 storage_options: Mapping[str, Any] | None) -> tuple[Any, Any]:
    import zarr

    from topoxr.store import StoreError, _locate, safe_node_name

    loc = _locate(store, storage_options)
    if mode != "r":
        loc.refuse_writing("save a layout into it")
    root = zarr.open_group(loc.store, mode=mode, use_consolidated=False)
    path = f"{safe_node_name(model)}/{safe_node_name(layer)}"
    try:
        group = root[path]
    except KeyError as err:
        raise StoreError(f"no layer {layer!r} of model {model!r} in {loc.url!r}") from err
    return loc, group


def save_layout(
    store: Any,
    model: str,
    layer: str,
    laid: Any,
    name: str,
    *,
    overwrite: bool = True,
    storage_options: Mapping[str, Any] | None = None,
) -> str:
    """Save the ``x``, ``y`` coordinates of a laid-out object into the store.

    Parameters
    ----------
    store : str or os.PathLike
        Path or fsspec URL of a topoxr store holding ``model``/``layer``.
    model, layer : str
        The layer the layout belongs to (original names, as given to the writer).
    laid : xarray.DataArray or xarray.Dataset
        Object with ``x``, ``y`` on ``neuron`` (or on ``(neuron, epoch)``).
    name : str
        Layout name, e.g. ``"umap+force-seed0"`` (made node-safe).
    overwrite : bool, default True
        Replace a saved layout of the same name; with False that raises.
    storage_options : mapping, optional
        Passed to fsspec.

    Returns
    -------
    str
        The group path inside the store, ``<model>/<layer>/layouts/<name>``.

    Raises
    ------
    topoxr.StoreError
        If the layer does not exist; the layout's neurons (by ``neuron`` label, in any
        order) are not the layer's, or repeat; a per-epoch layout does not cover exactly
        the layer's epochs; the name is taken and ``overwrite`` is False; or another
        layout's name maps to the same node name (``"x y"`` and ``"x_y"`` are both
        ``x_y``; ``overwrite`` replaces a layout of the same name only). Nothing is
        written then. The layout is saved in the layer's neuron and epoch order (a
        layout in another order made the whole store unopenable: its group did not
        align with the layer's). Saving drops the store's record of the last
        :func:`topoxr.verify`, as a writer does: the new files were not verified.
    topoxr.StoreLockedError
        If a writer holds the store (saving waits for no one).
    topoxr.StoreWriteError
        If the storage fails. Nothing saved before is lost: a layout replaced with
        ``overwrite`` is first saved whole under a staging name (``<name>~saving``),
        then the old one is deleted and the new one written in its place. A layout
        whose saving failed stays marked as being saved; :func:`load_layout` then
        loads the complete staging copy where there is one and refuses the layout
        otherwise, until it is saved again.
    """
    import zarr

    from topoxr._chunkio import settle_zarr_io
    from topoxr._locking import WriterLock
    from topoxr.store import StoreCorruptionError, StoreError, StoreWriteError, safe_node_name
    from topoxr.store._integrity import lost_nodes, lost_nodes_message

    if not hasattr(laid, "coords"):
        raise TypeError(f"laid must be the DataArray or Dataset a layout was attached to "
                        f"(save_layout(store, model, layer, laid, name)), got "
                        f"{type(laid).__name__}")
    if X not in laid.coords or Y not in laid.coords:
        raise StoreError(f"the object has no layout: coordinates {X!r}, {Y!r} are missing")
    loc, group = _layer_group(store, model, layer, "r+", storage_options)
    laid = _in_stored_order(laid, group, layer)
    lock = WriterLock(loc.url, local_dir=loc.local_dir, fs=loc.fs, lock_path=loc.lock_path)
    lock.acquire()
    try:
        root = zarr.open_group(loc.store, mode="r", use_consolidated=False)
        if lost := lost_nodes(root):  # saving rewrites the listing: the loss would vanish
            raise StoreCorruptionError(lost_nodes_message(loc.url, lost))
        parent = group.require_group(LAYOUTS_GROUP)
        safe = safe_node_name(name)
        staging = _staging_name(safe)
        members = dict(parent.members())
        for node in (safe, staging):
            other = members[node].attrs.get("name", name) if node in members else name
            if other != name:
                raise StoreError(f"layout name {name!r} maps to node {safe!r}, already used "
                                 f"by layout {other!r} of {model}/{layer}; choose another "
                                 "name")
        replaces = safe in members
        if replaces and not overwrite:
            raise StoreError(f"a layout named {name!r} exists; pass overwrite=True")
        try:
            # the store changes: its verification is outdated, and its listing is
            # dropped before anything is deleted (as a writer does), so that a reader
            # that finds a listed layout missing meanwhile knows a writer is at work
            _drop_listing(loc.store)
            if staging in members:  # left by a save that failed
                del parent[staging]
            if replaces:  # the new layout whole first, so that a failure loses nothing
                _write_layout(parent, staging, name, laid)
                del parent[safe]
            _write_layout(parent, safe, name, laid)
            if replaces:
                del parent[staging]
            _consolidate(loc.store)
        except Exception as err:
            settle_zarr_io()  # nothing of it may still be writing once the lock is released
            raise StoreWriteError(
                f"saving layout {name!r} of {model}/{layer} to {loc.url!r} failed "
                f"({type(err).__name__}: {err}); nothing saved before is lost and "
                "load_layout refuses an incomplete layout: save it again"
            ) from err
    finally:
        lock.release()
    logger.info("saved layout %r of %s/%s in %s", name, model, layer, loc.url)
    return f"{safe_node_name(model)}/{safe_node_name(layer)}/{LAYOUTS_GROUP}/{safe}"


def _drop_listing(zstore: Any) -> None:
    """Remove the root's listing of nodes (consolidated metadata) and its record of the
    last verification, as a writer does on opening (both written again at the end)."""
    import zarr

    from topoxr.store.verify import ATTR_VERIFIED

    root = zarr.open_group(zstore, mode="r+", use_consolidated=False)
    root.update_attributes({})  # rewrites zarr.json without the listing
    if ATTR_VERIFIED in root.attrs:
        del root.attrs[ATTR_VERIFIED]


def _staging_name(safe: str) -> str:
    """Where a layout replacing ``safe`` is saved whole first (``~``: no layout's name)."""
    return f"{safe}~saving"


def _in_stored_order(laid: Any, group: Any, layer: str) -> Any:
    """``laid`` with its neurons (and, per epoch, its epochs) in the order of the stored
    layer ``group``, matched by label; other or repeated labels are refused."""
    from topoxr.store import StoreError
    from topoxr.store._schema import _ids_text, _logical_lengths

    neurons = np.asarray(group[NEURON][...])
    if laid.sizes.get(NEURON) != len(neurons):
        raise StoreError(f"the layout has {laid.sizes.get(NEURON, 0)} neurons, layer "
                         f"{layer!r} has {len(neurons)}")
    if NEURON in laid.indexes:
        labels = np.asarray(laid[NEURON].values)
        if len(np.unique(labels)) != len(labels):
            raise StoreError(f"the layout repeats neuron labels; layer {layer!r} has each once")
        other = np.setdiff1d(labels, neurons)
        if len(other):
            raise StoreError(f"the layout holds neurons {_ids_text(other)} that layer "
                             f"{layer!r} does not have")
        laid = laid.sel({NEURON: neurons})
    if EPOCH in laid.coords[X].dims:
        _, _, _, epochs = _logical_lengths(dict(group.arrays()))
        have = np.asarray(laid[EPOCH].values)
        missing, extra = np.setdiff1d(epochs, have), np.setdiff1d(have, epochs)
        if len(missing) or len(extra) or len(have) != len(epochs):
            raise StoreError(
                f"a per-epoch layout must cover exactly the epochs of layer {layer!r} "
                f"{_ids_text(epochs)}; it has {_ids_text(have)} (missing "
                f"{_ids_text(missing)}, not stored {_ids_text(extra)}); lay out every "
                "epoch, or save one shared layout (x, y on 'neuron' only)"
            )
        laid = laid.sel({EPOCH: epochs})
    return laid


def _write_layout(parent: Any, node_name: str, name: str, laid: Any) -> None:
    """Write the layout ``laid`` as group ``node_name`` of ``parent``, marked as being
    saved until every array is written (a failure in between leaves a layout that
    load_layout refuses, not one with values zarr would fill in)."""
    from topoxr.store import checked_array_spec

    dims = tuple(str(d) for d in laid.coords[X].dims)
    node = parent.create_group(node_name, attributes={
        "name": name, ATTR_LAYOUT: laid.attrs.get(ATTR_LAYOUT, "{}"), ATTR_SAVING: True})
    columns = [(key, np.asarray(laid.coords[key].transpose(*dims).values, dtype=np.float64),
                dims, {"fill_value": np.nan}) for key in (X, Y)]
    columns += [(dim, np.asarray(laid[dim].values), (dim,), {}) for dim in dims]
    for key, values, key_dims, fill in columns:
        # one chunk, every chunk stored and ending in a crc32c, as the layers' arrays:
        # a damaged or missing chunk is refused on reading, never read as other values
        arr = node.create_array(key, **checked_array_spec(
            shape=values.shape, chunks=tuple(max(1, n) for n in values.shape),
            dtype=values.dtype, dimension_names=key_dims, **fill))
        arr[...] = values
    node.update_attributes({ATTR_SAVING: False})


def _consolidate(zstore: Any) -> None:
    """Refresh consolidated metadata, so plain ``xarray.open_datatree`` sees the layout."""
    from topoxr._chunkio import consolidate

    consolidate(zstore)


def load_layout(
    store: Any,
    model: str,
    layer: str,
    name: str,
    *,
    onto: Any = None,
    storage_options: Mapping[str, Any] | None = None,
) -> Any:
    """Load a saved layout.

    Parameters
    ----------
    store, model, layer, name, storage_options
        As in :func:`save_layout`.
    onto : xarray.DataArray or xarray.Dataset, optional
        Attach the layout to this object (matched by ``neuron`` label) and return it.

    Returns
    -------
    xarray.Dataset or same type as ``onto``
        ``x``, ``y`` (dims as saved) with the ``topoxr_layout`` attribute, or ``onto``
        with those coordinates.

    Raises
    ------
    topoxr.StoreError
        If the layer or the layout does not exist (the message lists saved layouts, or
        names the layout of another name saved under the same node name), or the layout
        was not saved completely.
    """
    from topoxr.store import Context, StoreError, read_whole, safe_node_name

    _, group = _layer_group(store, model, layer, "r", storage_options)
    saved = dict(group[LAYOUTS_GROUP].members()) if LAYOUTS_GROUP in dict(group.members()) else {}
    safe = safe_node_name(name)
    node, staged = saved.get(safe), saved.get(_staging_name(safe))
    if (node is None or node.attrs.get(ATTR_SAVING)) and staged is not None \
            and not staged.attrs.get(ATTR_SAVING):
        logger.warning("layout %r of %s/%s: its last save failed after the new layout was "
                       "written whole; loading that copy (save it again to tidy up)",
                       name, model, layer)
        node = staged
    if node is not None and node.attrs.get("name", name) != name:
        raise StoreError(f"no layout {name!r} saved for {model}/{layer}: its node "
                         f"{node.basename!r} holds layout {node.attrs['name']!r}")
    if node is None:
        raise StoreError(f"no layout {name!r} saved for {model}/{layer}; saved: "
                         f"{sorted(k for k in saved if '~' not in k)}")
    if node.attrs.get(ATTR_SAVING):
        raise StoreError(f"layout {name!r} of {model}/{layer} was not saved completely "
                         "(saving failed or was interrupted): save it again")
    arrays = dict(node.arrays())
    dims = tuple(arrays[X].metadata.dimension_names)
    ctx = Context(f"layout {name!r} of {model}/{layer}")
    values = {key: read_whole(arrays[key], ctx) for key in (X, Y, *dims)}
    ds = xr.Dataset({X: (dims, values[X]), Y: (dims, values[Y])},
                    coords={d: values[d] for d in dims},
                    attrs={ATTR_LAYOUT: node.attrs.get(ATTR_LAYOUT, "{}")})
    if onto is None:
        return ds
    ds = ds.reindex({NEURON: onto[NEURON].values})
    if bool(ds[X].isnull().any()):
        raise StoreError("the saved layout does not cover every neuron of `onto`")
    if EPOCH in dims:  # a layout per epoch: the epochs of `onto`, one or several
        if EPOCH not in onto.coords:
            raise StoreError(f"layout {name!r} of {model}/{layer} has one layout per epoch; "
                             "`onto` has no epoch coordinate to take them by: select "
                             "epochs of an object that has one")
        wanted = onto[EPOCH].values
        missing = sorted(set(np.atleast_1d(wanted).tolist()) - set(ds[EPOCH].values.tolist()))
        if missing:
            raise StoreError(f"layout {name!r} of {model}/{layer} holds epochs "
                             f"{ds[EPOCH].values.tolist()}, not {missing} of `onto`")
        ds = ds.sel({EPOCH: wanted})  # a scalar epoch of `onto` gives x, y on neuron
    out = onto.assign_coords({X: ds[X].variable, Y: ds[Y].variable})
    out.attrs = {**onto.attrs, ATTR_LAYOUT: ds.attrs[ATTR_LAYOUT]}
    return out
