"""Record Keras 3 models into topoxr stores (TensorFlow, torch or JAX backend).

Importing this package is cheap: keras is imported when one of its functions is first
used, and a missing keras fails with ``pip install "topoxr[keras]"``. It never imports
torch itself (Keras does, on its torch backend).

Examples
--------
>>> import topoxr_keras
>>> from topoxr_keras.models import load_digits_data, make_model
>>> x, y = load_digits_data()
>>> topoxr_keras.record(make_model("mlp"), (x[:100], y[:100]), "memory://doc-keras.zarr",
...                     model_name="mlp_keras", layers="fc*", progress=False)  # doctest: +ELLIPSIS
RecordResult(model='mlp_keras', layers=['fc1', 'fc2'], epoch=0, samples=100, ...)
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["RecordActivations", "layer_names", "models", "probe_model", "record"]

_LAZY = {
    "RecordActivations": "topoxr_keras.recorder",
    "record": "topoxr_keras.recorder",
    "probe_model": "topoxr_keras._select",
    "layer_names": "topoxr_keras._select",
    "models": "topoxr_keras.models",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(_LAZY[name])
        value = module if name == "models" else getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'topoxr_keras' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
