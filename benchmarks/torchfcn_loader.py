"""Import torchfcn's model classes without its package __init__ (which needs pytz, scikit-image and `fcn`).

torchfcn 1.9.7 (PyPI, installed with --no-deps) is the reference implementation the importer tests and
``vs_torchfcn.py`` compare against. Its model modules need only torch, numpy and an importable `fcn` module, used
for downloads alone; an empty module stands in for it.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types


def load_torchfcn_models() -> types.ModuleType:
    """``torchfcn.models`` (FCN32s, FCN16s, FCN8s, FCN8sAtOnce); registers stand-ins in sys.modules."""
    if "torchfcn.models" in sys.modules:
        return sys.modules["torchfcn.models"]
    spec = importlib.util.find_spec("torchfcn")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("torchfcn is not installed: pip install --no-deps torchfcn==1.9.7")
    package = types.ModuleType("torchfcn")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules.setdefault("fcn", types.ModuleType("fcn"))
    sys.modules["torchfcn"] = package
    return importlib.import_module("torchfcn.models")
