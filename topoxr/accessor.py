"""The ``.topo`` accessor on xarray DataArray, Dataset and DataTree.

Every method is a one-line delegation to a public function, so the accessor holds no
state and adds no behaviour: ``obj.topo.naps(by="label")`` is
``topoxr.naps(obj, by="label")``. On a DataTree, methods map over the layer nodes
(nodes holding an ``activation`` variable) and return a DataTree with the same paths;
the exception is :meth:`TopoAccessor.plot`, which draws one layer and is refused on a
tree (select one layer's laid-out NAPs first).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import xarray as xr

from topoxr.conventions import ACTIVATION

__all__ = ["TopoAccessor", "TopoDataArrayAccessor", "TopoDatasetAccessor", "TopoTreeAccessor"]


class TopoAccessor:
    """Shared methods of ``.topo``; subclasses only say how to apply a function."""

    __slots__ = ("_obj",)

    def __init__(self, obj: Any) -> None:
        self._obj = obj

    def _apply(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return func(self._obj, *args, **kwargs)

    def naps(self, by: Any = "label", **kwargs: Any) -> Any:
        """Neuron activation patterns; see :func:`topoxr.grouping.naps`.

        Parameters
        ----------
        by : str or sequence of str, default "label"
            Coordinate(s) defining the groups.
        **kwargs
            Other arguments of :func:`topoxr.grouping.naps`.

        Returns
        -------
        xarray.DataArray or xarray.DataTree
            The NAPs (a tree of them, one node per layer, on a DataTree).
        """
        from topoxr.grouping import naps

        return self._apply(naps, by, **kwargs)

    def profiles(self, **kwargs: Any) -> Any:
        """Neuron profiles; see :func:`topoxr.similarity.profiles`.

        Parameters
        ----------
        **kwargs
            Arguments of :func:`topoxr.similarity.profiles`.

        Returns
        -------
        xarray.DataArray or xarray.DataTree
            One profile row per neuron.
        """
        from topoxr.similarity import profiles

        return self._apply(profiles, **kwargs)

    def distances(self, metric: str = "cosine", **kwargs: Any) -> Any:
        """Pairwise profile distances; see :func:`topoxr.similarity.distances`.

        On a DataArray of profiles or NAPs, their distances; on activations, a Dataset
        holding ``activation`` (a layer node), or a DataTree (every layer node), the
        distances of their default profiles (:func:`topoxr.similarity.profiles`: NAPs by
        label).

        Parameters
        ----------
        metric : {"cosine", "correlation", "euclidean"}, default "cosine"
            Distance between profiles.
        **kwargs
            Other arguments of :func:`topoxr.similarity.distances`.

        Returns
        -------
        xarray.DataArray or xarray.DataTree
            Square distance matrices (a tree of them, one node per layer, on a DataTree).

        Raises
        ------
        topoxr.similarity.ProfileError
            For a Dataset without an ``activation`` variable, and as
            :func:`topoxr.similarity.distances`.
        """
        from topoxr.similarity import distances

        return self._apply(distances, metric, **kwargs)

    def layout(self, method: Any = None, **kwargs: Any) -> Any:
        """Attach a layout; the accessor form of :func:`topoxr.layout`.

        Parameters
        ----------
        method : str or estimator, optional
            A registered layout name (default:
            :data:`topoxr.layouts.DEFAULT_METHOD`) or an estimator instance.
        **kwargs
            Other arguments of :func:`topoxr.layouts.attach` (``random_state``, ``share``...).

        Returns
        -------
        same type as the object
            The object with ``x``, ``y`` coordinates on ``neuron``.
        """
        from topoxr.layouts._api import layout

        return self._apply(layout, method, **kwargs)

    def quality(self, **kwargs: Any) -> Any:
        """Layout quality metrics; see :func:`topoxr.metrics.quality`.

        Parameters
        ----------
        **kwargs
            Arguments of :func:`topoxr.metrics.quality`.

        Returns
        -------
        xarray.Dataset or xarray.DataTree
            One variable per metric, per epoch.
        """
        from topoxr.metrics import quality

        return self._apply(quality, **kwargs)

    def align(self, reference: Any = None, **kwargs: Any) -> Any:
        """Align onto ``reference``, or epochs onto each other when no reference is given.

        Parameters
        ----------
        reference : xarray object, optional
            Object with the reference layout (:func:`topoxr.alignment.align`). Without it,
            per-epoch layouts are aligned each onto the previous epoch
            (:func:`topoxr.alignment.align_epochs`).
        **kwargs
            Other arguments of those functions (``match``, ``rescale``).

        Returns
        -------
        same type as the object
            The object with aligned ``x``, ``y``.
        """
        from topoxr.alignment import align, align_epochs

        if reference is None:
            return self._apply(align_epochs, **kwargs)
        return self._apply(align, reference, **kwargs)

    def plot(self, **kwargs: Any) -> Any:
        """Topographic map (HoloViews); see :func:`topoxr.viz.topomap`.

        Parameters
        ----------
        **kwargs
            Arguments of :func:`topoxr.viz.topomap` (``by``, ``interpolate``...).

        Returns
        -------
        holoviews object
            An overlay, or a ``HoloMap``/``DynamicMap`` keyed by the ``by`` dims.
        """
        from topoxr.viz import topomap

        return topomap(self._obj, **kwargs)


@xr.register_dataarray_accessor("topo")
class TopoDataArrayAccessor(TopoAccessor):
    """``DataArray.topo``: activations or NAPs of one layer."""

    __slots__ = ()


@xr.register_dataset_accessor("topo")
class TopoDatasetAccessor(TopoAccessor):
    """``Dataset.topo``: a layer node (``activation`` and its coordinates)."""

    __slots__ = ()


@xr.register_datatree_accessor("topo")
class TopoTreeAccessor(TopoAccessor):
    """``DataTree.topo``: every method but ``plot`` maps over the layer nodes of a store's
    tree (nodes holding an ``activation`` variable). ``plot`` draws one layer, so on a tree
    it raises a TypeError that says how to select a layer's NAPs."""

    __slots__ = ()

    def plot(self, **kwargs: Any) -> Any:
        """Refused: a map shows one layer, so select one layer's laid-out NAPs first.

        Parameters
        ----------
        **kwargs
            Arguments of :func:`topoxr.viz.topomap` (not used).

        Raises
        ------
        TypeError
            Always; the message names the tree's layer nodes and how to plot one of them,
            e.g. ``tree.topo.layout().topo.naps()["model/layer"]["nap"].topo.plot()``.
        """
        layers = [node.path for node in self._obj.subtree if node.data_vars]
        example = layers[0].lstrip("/") if layers else "model/layer"
        raise TypeError(
            "DataTree.topo.plot() is not supported: a topographic map shows the NAPs of one "
            "layer, and .topo.plot() does not map over the layer nodes as the other "
            f"methods do. Select one layer's laid-out NAPs, e.g. "
            f"tree.topo.layout().topo.naps()[{example!r}]['nap'].topo.plot() "
            f"(nodes with data: {layers[:10]}{' ...' if len(layers) > 10 else ''})"
        )

    def _apply(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> xr.DataTree:
        out: dict[str, Any] = {}
        for node in self._obj.subtree:
            if ACTIVATION not in node.data_vars:
                continue
            # with the coordinates the node inherits (an epoch coordinate of the group)
            result = func(node.to_dataset(inherit=True), *args, **kwargs)
            if isinstance(result, xr.DataArray):
                result = result.to_dataset(name=result.name or "result")
            out[node.path] = result
        if not out:
            raise ValueError("the tree has no layer node (no node holds an 'activation')")
        return xr.DataTree.from_dict(out)
