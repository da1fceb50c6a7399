"""Record PyTorch models into topoxr stores.

Importing this package is cheap: torch is imported when one of its functions is first
used, and a missing torch fails with ``pip install "topoxr[torch]"``.

Examples
--------
>>> import topoxr_torch
>>> from topoxr_torch.models import DigitsMLP, load_digits_data
>>> x, y = load_digits_data()
>>> topoxr_torch.record(DigitsMLP(), (x[:100], y[:100]), "memory://doc-torch.zarr",
...                     model_name="mlp_torch", layers="fc*", progress=False)  # doctest: +ELLIPSIS
RecordResult(model='mlp_torch', layers=['fc1', 'fc2'], epoch=0, samples=100, ...)
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["ProbeRecorder", "layer_names", "models", "record"]

_LAZY = {
    "ProbeRecorder": "topoxr_torch.recorder",
    "record": "topoxr_torch.recorder",
    "layer_names": "topoxr_torch._select",
    "models": "topoxr_torch.models",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(_LAZY[name])
        value = module if name == "models" else getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'topoxr_torch' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
