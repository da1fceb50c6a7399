"""Layout methods by name: ``get_estimator("umap+force", random_state=0)``.

Names map to estimator classes. A name ``"<init>+force"`` builds the paper's force
optimisation started from the ``<init>`` layout (``"umap+force"``, ``"graph+force"``...),
and ``"<method>+grid"`` snaps any layout onto a regular grid, one neuron per cell.
Classes are registered as ``"module:Class"`` strings and imported on first use, so the
registry costs nothing at import time.
"""

from __future__ import annotations

import importlib
from typing import Any

import numpy as np

__all__ = [
    "DEFAULT_METHOD",
    "PAPER_METHODS",
    "REFINEMENTS",
    "available_methods",
    "get_estimator",
    "initial_positions",
    "register",
]

#: The method used when none is named: the k-nearest-neighbour force layout.
DEFAULT_METHOD = "knnforce"

_REGISTRY: dict[str, Any] = {
    "random": "topoxr.layouts.baseline:RandomLayout",
    "pca": "topoxr.layouts.linear:PCALayout",
    "mds": "topoxr.layouts.manifold:MDSLayout",
    "tsne": "topoxr.layouts.manifold:TSNELayout",
    "umap": "topoxr.layouts.manifold:UMAPLayout",
    "som": "topoxr.layouts.som:SOMLayout",
    "graph": "topoxr.layouts.graph:SpringLayout",
    "force": "topoxr.layouts.force:ForceLayout",
    "knnforce": "topoxr.layouts.force:KNNForceLayout",
}

#: Suffixes that turn a layout into another: ``"<init>+force"``, ``"<method>+grid"``.
REFINEMENTS = {
    "force": "topoxr.layouts.force:ForceLayout",
    "grid": "topoxr.layouts.grid:GridSnap",
}

#: The layouts of the paper, in its own naming (``"<init>+force"`` is its ``"<INIT>_PSO"``).
PAPER_METHODS = (
    "random",
    "pca",
    "tsne",
    "umap",
    "som",
    "graph",
    "force",
    "pca+force",
    "tsne+force",
    "umap+force",
    "som+force",
    "graph+force",
)

#: Parameters a refinement hands on to the layout it starts from.
_SHARED_PARAMS = ("metric", "random_state")


def register(name: str, cls: Any) -> None:
    """Register a layout estimator class under ``name``.

    Parameters
    ----------
    name : str
        Lower-case name without ``"+"`` (that character composes refinements).
    cls : type or str
        A class whose instances have ``fit_transform(X) -> (n, 2)``, or a
        ``"module:Class"`` string imported on first use.

    Raises
    ------
    ValueError
        If ``name`` is empty or contains ``"+"``.
    """
    if not isinstance(name, str) or not name or "+" in name:
        raise ValueError(f"a layout name must be a non-empty string without '+', got {name!r}")
    _REGISTRY[name.lower()] = cls


def available_methods() -> list[str]:
    """Names of the registered layout methods, then the paper's ``"<init>+force"`` names.

    Any ``"<method>+force"`` and ``"<method>+grid"`` combination of a registered method
    is accepted by :func:`get_estimator` as well.

    Returns
    -------
    list of str
    """
    names = list(_REGISTRY)
    return names + [m for m in PAPER_METHODS if m not in names]


def _load(entry: Any) -> Any:
    if isinstance(entry, str):
        module, _, attr = entry.partition(":")
        return getattr(importlib.import_module(module), attr)
    return entry


def _unknown(name: str) -> ValueError:
    return ValueError(
        f"unknown layout method {name!r}; registered methods: {', '.join(sorted(_REGISTRY))}"
        f" (refine any of them with '+force' or '+grid', e.g. 'umap+force')"
    )


def get_estimator(method: Any = None, **params: Any) -> Any:
    """Build a layout estimator from a name, or configure a given estimator.

    Parameters
    ----------
    method : str or estimator, optional
        A registered name (see :func:`available_methods`), a composition such as
        ``"umap+force"`` or ``"knnforce+grid"``, or an estimator instance (returned as
        it is, or, with ``params``, a copy with them set: the instance is never
        changed). Defaults to :data:`DEFAULT_METHOD`.
    **params
        Estimator parameters. For a composition they go to the last step; ``metric``
        and ``random_state`` are also handed to the steps before it.

    Returns
    -------
    estimator
        An unfitted estimator with ``fit_transform(X) -> ndarray (n_neurons, 2)``.

    Raises
    ------
    ValueError
        For an unknown name (the message lists the registered ones).
    TypeError
        If ``method`` is neither a string nor an object with ``fit_transform``.

    Examples
    --------
    >>> get_estimator("pca")
    PCALayout()
    >>> get_estimator("umap+force", random_state=0).init
    UMAPLayout(random_state=0)
    """
    if method is None:
        method = DEFAULT_METHOD
    if not isinstance(method, str):
        if not hasattr(method, "fit_transform"):
            raise TypeError(
                "method must be a layout name or an estimator with fit_transform, "
                f"got {type(method).__name__}"
            )
        return _copy_estimator(method).set_params(**params) if params else method
    name = method.strip().lower()
    if not name:
        raise _unknown(method)
    *head, last = name.split("+")
    if not head:
        if last not in _REGISTRY:
            raise _unknown(method)
        return _load(_REGISTRY[last])(**params)
    if last not in REFINEMENTS:
        raise _unknown(method)
    shared = {k: params[k] for k in _SHARED_PARAMS if k in params}
    init = get_estimator("+".join(head), **_accepted(head, shared))
    return _load(REFINEMENTS[last])(init=init, **params)


def _copy_estimator(estimator: Any) -> Any:
    """An unfitted copy of ``estimator`` with the same parameters.

    scikit-learn's :func:`~sklearn.base.clone` for objects with ``get_params``, else a
    deep copy.

    Parameters
    ----------
    estimator : object
        An estimator with ``fit_transform``.

    Returns
    -------
    object
        A new estimator; fitting or changing it leaves ``estimator`` as it was.
    """
    if hasattr(estimator, "get_params"):
        from sklearn.base import clone

        return clone(estimator)
    import copy

    return copy.deepcopy(estimator)


def _accepted(head: list[str], shared: dict[str, Any]) -> dict[str, Any]:
    """Keep the shared parameters that the initial estimator accepts."""
    if not shared:
        return shared
    first = "+".join(head)
    if "+" in first:  # nested composition: its last step accepts metric/random_state
        return shared
    if first not in _REGISTRY:
        raise _unknown(first)
    cls = _load(_REGISTRY[first])
    accepted = cls().get_params() if hasattr(cls, "get_params") else {}
    return {k: v for k, v in shared.items() if k in accepted}


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a is b or a == b)
    except (TypeError, ValueError):  # e.g. arrays, whose == is not one bool
        return False


def _own_settings(method: Any) -> dict[str, Any]:
    """The ``metric`` and ``random_state`` an estimator instance was given: those that
    differ from its class's defaults (as scikit-learn's ``repr`` shows them)."""
    if isinstance(method, str) or not hasattr(method, "get_params"):
        return {}
    import inspect

    try:
        defaults = {k: p.default for k, p in
                    inspect.signature(type(method).__init__).parameters.items()}
    except (TypeError, ValueError):
        defaults = {}
    own = method.get_params(deep=False)
    out = {}
    for key in _SHARED_PARAMS:
        if key in own and own[key] is not None:
            default = defaults.get(key, inspect.Parameter.empty)
            if default is inspect.Parameter.empty or not _same(own[key], default):
                out[key] = own[key]
    return out


def initial_positions(init: Any, X: np.ndarray, n: int, metric: str, rng) -> np.ndarray | None:
    """Resolve ``init`` (None, name, estimator or array) into (n, 2) positions or None.

    A name or estimator is fitted on ``X``; an estimator without a seed gets one drawn
    from ``rng``. Its metric is ``metric`` (the refinement's), unless the estimator was
    given a metric of its own (one that differs from its class's default): that one is
    kept. Shared by the refinements (force, grid) so that neither imports the other.

    Raises
    ------
    LayoutInputError
        If exactly one of ``metric`` and the estimator's own metric is
        ``"precomputed"``: one of them would read a distance matrix as profiles, or
        profiles as distances.
    """
    from topoxr.layouts._base import LayoutInputError

    if init is None:
        return None
    if isinstance(init, str) or hasattr(init, "fit_transform"):
        from sklearn.base import clone

        est = get_estimator(init) if isinstance(init, str) else clone(init)
        params = est.get_params() if hasattr(est, "get_params") else {}
        own = _own_settings(est).get("metric")
        if own is not None and (own == "precomputed") != (metric == "precomputed"):
            raise LayoutInputError(
                f"the init estimator {est!r} has metric={own!r} and the refinement "
                f"metric={metric!r}: one of them is 'precomputed', so one would read a "
                "distance matrix as profiles or profiles as distances; give both the "
                "same kind of metric")
        update = {}
        if "metric" in params and own is None:
            update["metric"] = metric
        if "random_state" in params and params["random_state"] is None:
            update["random_state"] = rng.randint(np.iinfo(np.int32).max)
        if update:
            est.set_params(**update)
        pos = np.asarray(est.fit_transform(X), dtype=np.float64)
    else:
        pos = np.asarray(init, dtype=np.float64)
    if pos.shape != (n, 2) or not np.isfinite(pos).all():
        raise LayoutInputError(
            f"init positions must be finite with shape ({n}, 2), got {pos.shape}")
    return pos.copy()
