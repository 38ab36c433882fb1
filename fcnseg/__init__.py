"""fcnseg: Fully Convolutional Networks for semantic segmentation (Long, Shelhamer, Darrell), in PyTorch.

The public API::

    import fcnseg
    fcnseg.list_models()                        # every registered builder: ['fcn16s', ..., 'fcn8s_resnet50']
    model = fcnseg.get_model("fcn8s", num_classes=21, alignment="aligned")
    fcnseg.save_checkpoint(model, "fcn8s.pt", classes=[...])
    model = fcnseg.load("fcn8s.pt")             # ready for model.predict(image)
    model = fcnseg.load("fcn8s-heavy-pascal")   # published weights by name (``fcnseg weights`` lists them)
    model = fcnseg.from_pretrained("user/name") # a Hugging Face Hub model (fcnseg push, model.push_to_hub)
    fcnseg.Predictor(model, runtime="auto", tile=512, flip=True).outputs(["a.jpg"], confidence=True)

The modules form layers, each importing only from those below it (``tests/test_imports.py`` checks that no import
cycle exists): leaves such as ``_meta`` (the datasets' class names and means), ``errors``, ``io``, ``palette`` and
``preprocessing``; ``checkpoint`` (the file format) and ``pretrained`` (a Hugging Face Hub folder: safetensors,
config.json, model card; and the upload); ``runtime`` (the execution paths, which know models only by their
contract); ``inference`` (the one inference object, over ``runtime``); ``data`` and ``models`` (whose ``predict``
reaches ``inference``); ``hub`` (``load``, ``from_pretrained``: checkpoint files, published weights and Hub
repositories to models); ``engine``, ``export`` and ``ray_batch`` (prediction on a Ray cluster); ``cli`` on top.
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
    "SegmentationModel": "fcnseg.models.base",
    "Predictor": "fcnseg.inference",
    "save_checkpoint": "fcnseg.checkpoint",
    "load": "fcnseg.hub",
    "from_pretrained": "fcnseg.hub",
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
