"""The function :func:`topoxr.layout`: lay out neurons from labeled objects or arrays.

Light at import (numpy only); the estimators are imported when a layout is computed.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["layout"]


def layout(
    obj: Any,
    method: Any = None,
    *,
    random_state: int | None = None,
    metric: str | None = None,
    **kwargs: Any,
) -> Any:
    """Lay out the neurons of ``obj`` in 2-D.

    Parameters
    ----------
    obj : xarray.DataArray, xarray.Dataset or array-like of shape (n_neurons, n_features)
        Activations, NAPs (:func:`topoxr.naps`) or profiles (:func:`topoxr.profiles`):
        handled by :func:`topoxr.layouts.attach`, which returns the object with ``x``,
        ``y`` coordinates. A plain array holds one profile per row; its layout is
        returned as an array.
    method : str or estimator, optional
        A registered name (:func:`topoxr.layouts.available_methods`), a composition such
        as ``"umap+force"``, or an estimator (copied, never changed; its own ``metric``
        and ``random_state`` are kept, see :func:`topoxr.layouts.attach`). Default:
        :data:`topoxr.layouts.DEFAULT_METHOD`.
    random_state : int, optional
        Seed. One rule everywhere: a single layout with ``random_state=s`` equals
        ``topoxr.layouts.get_estimator(method, random_state=s).fit_transform(X)``;
        per-epoch layouts use ``s`` for the first epoch and seeds drawn from it for the
        others (:func:`topoxr.layouts.draw_seeds`).
    metric : {"cosine", "correlation", "euclidean"}, optional
        Profile distance; default an estimator instance's own, else ``"cosine"``.
    **kwargs
        For labeled objects: the other arguments of :func:`topoxr.layouts.attach`
        (``profile``, ``share``, ``align``) and estimator parameters; for arrays:
        estimator parameters.

    Returns
    -------
    xarray object or ndarray of shape (n_neurons, 2)
        The object with ``x``/``y`` coordinates on ``neuron`` (or ``(neuron, epoch)``
        for per-epoch layouts), or the coordinates in ``[0, 1]^2``.

    Raises
    ------
    ValueError
        For an unknown method or metric, NaN/inf profiles or fewer than 5 neurons.

    Examples
    --------
    >>> import numpy as np, topoxr
    >>> X = np.random.default_rng(0).normal(size=(20, 4))
    >>> topoxr.layout(X, "pca", random_state=0).shape
    (20, 2)
    """
    import xarray as xr

    from topoxr.layouts._registry import DEFAULT_METHOD

    method = DEFAULT_METHOD if method is None else method
    if isinstance(obj, (xr.DataArray, xr.Dataset)):
        from topoxr.layouts._attach import attach

        return attach(obj, method, random_state=random_state, metric=metric, **kwargs)
    from topoxr.layouts._attach import _clean, _fit_one, _seeds, _settings
    from topoxr.similarity import ProfileError

    metric, fixed = _settings(method, metric, random_state)
    X = np.asarray(obj)
    if X.ndim != 2:
        raise ProfileError(f"profiles must be a 2-D array (neuron, feature), got shape {X.shape}")
    _, (seed,) = _seeds(random_state, fixed, 1)
    return _fit_one(_clean(X), method, seed, metric, kwargs)
