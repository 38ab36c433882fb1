"""fcnseg: Fully Convolutional Networks for semantic segmentation (Long, Shelhamer, Darrell), in PyTorch.

The public API::

    import fcnseg
    fcnseg.list_models()                        # ['fcn16s', 'fcn32s', 'fcn8s', 'fcn8s_atonce']
    model = fcnseg.get_model("fcn8s", num_classes=21, alignment="aligned")
    fcnseg.save_checkpoint(model, "fcn8s.pt", classes=[...])
    model = fcnseg.load("fcn8s.pt")             # ready for model.predict(image)
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

# Names resolved on first use, so that `import fcnseg` stays cheap (no torchvision import) and a CLI command
# pays only for what it uses.
_LAZY = {
    "get_model": "fcnseg.models",
    "list_models": "fcnseg.models",
    "register_model": "fcnseg.models",
    "FCN": "fcnseg.models",
    "save_checkpoint": "fcnseg.checkpoint",
    "load": "fcnseg.checkpoint",
    "Preprocessing": "fcnseg.preprocessing",
    "ConfusionMatrix": "fcnseg.metrics",
    "FcnsegError": "fcnseg.errors",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fcnseg' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
