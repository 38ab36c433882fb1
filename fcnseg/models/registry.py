"""A registry of model builders by name, as in torchvision: ``register_model``, ``get_model``, ``list_models``."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from torch import nn

from ..errors import FcnsegError

M = TypeVar("M", bound=Callable[..., nn.Module])

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str | None = None) -> Callable[[M], M]:
    """Decorator adding a keyword-only builder to the registry; a name can be registered once only.

    The model a registered builder returns remembers how it was built (``model.build_config``), which is what a
    checkpoint stores to rebuild it.
    """

    def wrap(fn: M) -> M:
        key = name or fn.__name__
        if key in _MODELS:
            raise ValueError(f"a model named {key!r} is already registered")
        params = inspect.signature(fn).parameters.values()
        if any(p.kind is not inspect.Parameter.KEYWORD_ONLY for p in params):
            raise TypeError(f"builder {fn.__name__} must take keyword-only arguments")

        @functools.wraps(fn)
        def builder(**kwargs: Any) -> nn.Module:
            model = fn(**kwargs)
            bound = inspect.signature(fn).bind(**kwargs)
            bound.apply_defaults()
            model.build_config = {"name": key, "kwargs": dict(bound.arguments)}
            return model

        _MODELS[key] = builder
        return builder  # type: ignore[return-value]

    return wrap


def list_models() -> list[str]:
    """Names of every registered model, sorted."""
    return sorted(_MODELS)


def get_builder(name: str) -> Callable[..., nn.Module]:
    try:
        return _MODELS[name]
    except KeyError:
        raise FcnsegError(f"unknown model {name!r}; expected one of: {', '.join(list_models())}") from None


# fc6/fc7's options and batch norm were once taken, and ignored, by the builders of networks without them
# (GoogLeNet, ResNet, MobileNet; batch norm by AlexNet too). Checkpoints and run configurations saved then
# record them, so those readers drop them where the builder has no such option: the value never had an effect.
ONCE_IGNORED: tuple[str, ...] = ("fc_dim", "batch_norm", "dropout")


def once_ignored(name: str) -> set[str]:
    """The options of :data:`ONCE_IGNORED` that model ``name``'s builder does not take (none for an unknown name)."""
    if name not in _MODELS:
        return set()
    return set(ONCE_IGNORED) - set(inspect.signature(_MODELS[name]).parameters)


def saved_options(name: str, config: Mapping[str, Any]) -> dict[str, Any]:
    """A builder configuration as saved (in a checkpoint, or a run's ``config.yaml``), without the options the
    builder of ``name`` once ignored and no longer takes."""
    dropped = once_ignored(name)
    return {k: v for k, v in config.items() if k not in dropped}


def get_model(name: str, **config: Any) -> nn.Module:
    """Build the registered model ``name`` with keyword arguments ``config``."""
    builder = get_builder(name)
    accepted = inspect.signature(builder).parameters
    unknown = sorted(set(config) - set(accepted))
    if unknown:
        raise FcnsegError(
            f"model {name!r} takes no option(s) {', '.join(unknown)}; expected some of: {', '.join(accepted)}"
        )
    return builder(**config)
