"""A summary of a store that reads no activations (``topoxr info``)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import zarr

from topoxr.conventions import (
    ACTIVATION,
    ATTR_FORMAT,
    ATTR_LAYER,
    ATTR_MODEL,
)
from topoxr.store._errors import StoreCorruptionError, StoreError
from topoxr.store._integrity import (
    check_model_name,
    child_groups,
    children,
    consistent_snapshot,
    lost_nodes,
    lost_nodes_message,
)
from topoxr.store._location import _locate, _open_root_readonly
from topoxr.store._schema import _ATTR_READY, _ATTR_REDUCE, _guarded, _where
from topoxr.store.verify import ATTR_VERIFIED, unready_layer_damage

logger = logging.getLogger(__name__)


def store_summary(store: Any, *, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Summarise a store without reading activations.

    Parameters
    ----------
    store : str or path-like
        Path or fsspec URL of the store.
    storage_options : mapping, optional
        Options of the fsspec filesystem (remote stores).

    Returns
    -------
    dict
        ``{"store", "format_version", "created", "description", "verified", "models":
        {model: {"name", "attrs", "layers": {layer: {"name", "neurons", "samples",
        "epochs", "complete_epochs", "incomplete_epochs", "committed_fraction", "chunks",
        "checksums", "problems"}}}}, "problems"}``, JSON-serialisable. ``verified`` is
        the outcome of the last :func:`topoxr.verify` (None: never verified since the
        store was last written); ``problems`` lists the damage found without reading
        activations (a damaged layer's entry then holds only ``name`` and ``problems``),
        as :func:`topoxr.open_store` refuses it: damaged metadata or coordinates,
        contradicting arrays, a model or layer whose name attribute does not give its
        node name; and a layer that lost its ``topoxr_ready`` mark but holds committed
        data. A layer half-created by a crashed writer (not ready, nothing committed) is
        left out.

    Raises
    ------
    FileNotFoundError
        If nothing exists at ``store``.
    StoreError
        If it is not a topoxr store, or its root metadata is damaged.
    """
    loc = _locate(store, storage_options)
    root = _open_root_readonly(loc)
    out: dict[str, Any] = {
        "store": loc.url,
        "format_version": root.attrs.get(ATTR_FORMAT),
        "created": root.attrs.get("created"),
        "description": root.attrs.get("description", ""),
        "verified": root.attrs.get(ATTR_VERIFIED),
        "models": {},
    }
    problems: list[str] = []
    if lost := lost_nodes(root):
        problems.append(lost_nodes_message(loc.url, lost))
    for model_name, model_group in child_groups(root, problems):
        try:
            check_model_name(model_name, model_group)
        except StoreError as err:
            problems.append(str(err))
        layers: dict[str, Any] = {}
        members = children(model_group, problems)
        for layer_name, group in sorted(members.items()):
            if not isinstance(group, zarr.Group):
                continue
            try:
                if not group.attrs.get(_ATTR_READY, False):
                    damage = unready_layer_damage(group)
                    if damage is None:
                        continue  # half-created by a crashed writer: the next one removes it
                    raise StoreCorruptionError(damage)
                layers[layer_name] = _layer_summary(group)
            except StoreError as err:
                problems.append(f"{model_name}/{layer_name}: {err}")
                layers[layer_name] = {"name": group.attrs.get(ATTR_LAYER, layer_name),
                                      "problems": [str(err)]}
        out["models"][model_name] = {
            "name": model_group.attrs.get(ATTR_MODEL, model_name),
            "attrs": {k: v for k, v in model_group.attrs.items() if k != ATTR_MODEL},
            "layers": layers,
        }
    out["problems"] = problems
    return out


def _layer_summary(group: zarr.Group) -> dict[str, Any]:
    arrays, snap = _guarded(_where(group), lambda: consistent_snapshot(group))
    epochs = [int(e) for e in snap.epochs]
    complete, committed = snap.complete, snap.committed
    return {
        "name": group.attrs.get(ATTR_LAYER, group.basename),
        "neurons": int(arrays[ACTIVATION].shape[0]),
        "samples": int(snap.n),
        "epochs": epochs,
        "complete_epochs": [e for e, c in zip(epochs, complete, strict=True) if c],
        "incomplete_epochs": [e for e, c in zip(epochs, complete, strict=True) if not c],
        "committed_fraction": float(committed.mean()) if committed.size else 0.0,
        "reduce": group.attrs.get(_ATTR_REDUCE, "mean"),
        "chunks": list(arrays[ACTIVATION].chunks),
        "checksums": snap.checked,
        "problems": [],
    }
