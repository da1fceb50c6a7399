"""A summary of a store that reads no activations (``topoxr info``)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np

from topoxr.conventions import (
    ACTIVATION,
    ATTR_FORMAT,
    ATTR_LAYER,
    ATTR_MODEL,
    COMMITTED,
    EPOCH,
    EPOCH_COMPLETE,
)
from topoxr.store._location import _locate, _open_root_readonly
from topoxr.store._schema import _ATTR_READY, _ATTR_REDUCE, _guarded, _logical_lengths, _where

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
        ``{"store", "format_version", "created", "description", "models": {model:
        {"name", "attrs", "layers": {layer: {"name", "neurons", "samples", "epochs",
        "complete_epochs", "incomplete_epochs", "committed_fraction", "chunks"}}}}}``,
        JSON-serialisable.
    """
    loc = _locate(store, storage_options)
    root = _open_root_readonly(loc)
    out: dict[str, Any] = {
        "store": loc.url,
        "format_version": root.attrs.get(ATTR_FORMAT),
        "created": root.attrs.get("created"),
        "description": root.attrs.get("description", ""),
        "models": {},
    }
    for model_name, model_group in sorted(root.groups()):
        layers: dict[str, Any] = {}
        for layer_name, group in sorted(model_group.groups()):
            if not group.attrs.get(_ATTR_READY, False):
                continue
            arrays = dict(group.arrays())
            n, m = _guarded(_where(group), lambda arrays=arrays: _logical_lengths(arrays))
            epochs = [int(e) for e in arrays[EPOCH][:m]]
            complete = np.asarray(arrays[EPOCH_COMPLETE][:m], dtype=bool)
            committed = np.asarray(arrays[COMMITTED][:n, :m], dtype=bool) if n and m else \
                np.zeros((n, m), bool)
            layers[layer_name] = {
                "name": group.attrs.get(ATTR_LAYER, layer_name),
                "neurons": int(arrays[ACTIVATION].shape[0]),
                "samples": int(n),
                "epochs": epochs,
                "complete_epochs": [e for e, c in zip(epochs, complete, strict=True) if c],
                "incomplete_epochs": [e for e, c in zip(epochs, complete, strict=True) if not c],
                "committed_fraction": float(committed.mean()) if committed.size else 0.0,
                "reduce": group.attrs.get(_ATTR_REDUCE, "mean"),
                "chunks": list(arrays[ACTIVATION].chunks),
            }
        out["models"][model_name] = {
            "name": model_group.attrs.get(ATTR_MODEL, model_name),
            "attrs": {k: v for k, v in model_group.attrs.items() if k != ATTR_MODEL},
            "layers": layers,
        }
    return out
