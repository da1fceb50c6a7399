"""The ``.topo`` accessor on xarray DataArray, Dataset and DataTree.

Every method is a one-line delegation to a public function, so the accessor holds no
state and adds no behaviour: ``obj.topo.naps(by="label")`` is
``topoxr.naps(obj, by="label")``. On a DataTree, methods map over the layer nodes
(nodes holding an ``activation`` variable) and return a DataTree with the same paths,
relative to the node they are called on, and the attributes of the groups above the
layers; a DataTree argument gives each layer its node at the same path, and a single
DataArray or Dataset argument is refused on a tree of several layers. The exception is
:meth:`TopoAccessor.plot`, which draws one layer and is refused on a tree (select one
layer's laid-out NAPs first).
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
            if "match" in kwargs:
                raise TypeError("match= chooses how neurons are matched to a reference's; "
                                "pass the reference: .topo.align(reference, match=...) "
                                "(without one, epochs are aligned onto each other)")
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
        layers = [node.relative_to(self._obj) for node in self._obj.subtree
                  if ACTIVATION in node.data_vars]
        example = layers[0] if layers else "model/layer"
        raise TypeError(
            "DataTree.topo.plot() is not supported: a topographic map shows the NAPs of one "
            "layer, and .topo.plot() does not map over the layer nodes as the other "
            f"methods do. Select one layer's laid-out NAPs, e.g. "
            f"tree.topo.layout().topo.naps()[{example!r}]['nap'].topo.plot() "
            f"(nodes with data: {layers[:10]}{' ...' if len(layers) > 10 else ''})"
        )

    def _apply(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> xr.DataTree:
        """``func`` on every layer node, as a tree with the paths relative to this one.

        An xarray argument is matched to the layers: a DataTree gives each layer its node
        at the same relative path (``tree.topo.align(reference_tree)``); a DataArray or
        Dataset serves a tree of one layer only, as one layer's ``profile=`` or ``maps=``
        would otherwise be used for every layer. An error raised for one layer carries a
        note naming the node. The groups above the layers keep their attributes.
        """
        tree = self._obj
        layers = [node for node in tree.subtree if ACTIVATION in node.data_vars]
        if not layers:
            raise ValueError("the tree has no layer node (no node holds an 'activation')")
        paths = [node.relative_to(tree) for node in layers]
        named = [(f"argument {i + 1}", value) for i, value in enumerate(args)]
        named += list(kwargs.items())
        for name, value in named:
            if isinstance(value, xr.DataArray | xr.Dataset) and len(layers) > 1:
                raise TypeError(
                    f"{name} is one {type(value).__name__} for a tree of {len(layers)} layer "
                    f"nodes: each layer would be given it. Pass a DataTree holding a node "
                    f"for each layer at the same paths ({paths[:3]}"
                    f"{' ...' if len(paths) > 3 else ''}), or call the method on one layer, "
                    f"e.g. tree[{paths[0]!r}].topo.{func.__name__}(...)")
        out: dict[str, Any] = {}
        for node, path in zip(layers, paths, strict=True):
            node_args = [_node_of(value, path, f"argument {i + 1}")
                         for i, value in enumerate(args)]
            node_kwargs = {key: _node_of(value, path, key) for key, value in kwargs.items()}
            try:
                # with the coordinates the node inherits (an epoch coordinate of the group)
                result = func(node.to_dataset(inherit=True), *node_args, **node_kwargs)
            except Exception as err:
                err.add_note(f"in the layer node {path!r} of the tree")
                raise
            if isinstance(result, xr.DataArray):
                result = result.to_dataset(name=result.name or "result")
            out["/" if path == "." else path] = result
        result_tree = xr.DataTree.from_dict(out)
        for node in result_tree.subtree:
            path = node.relative_to(result_tree)
            if ("/" if path == "." else path) not in out:  # a group above the layers
                node.attrs = dict(tree[path].attrs) if path != "." else dict(tree.attrs)
        return result_tree


def _node_of(value: Any, path: str, name: str) -> Any:
    """The part of argument ``value`` for the layer at ``path``: a DataTree's node there."""
    if not isinstance(value, xr.DataTree):
        return value
    try:
        node = value if path == "." else value[path]
    except KeyError:
        raise ValueError(f"{name} is a DataTree without a node {path!r}, the layer it is "
                         "matched with (a tree argument gives each layer its node at the "
                         "same path)") from None
    return node.to_dataset(inherit=True)
