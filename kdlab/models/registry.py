"""Name -> builder registry of the model zoo.

A builder is a callable ``builder(num_classes=..., in_chans=..., **options) -> nn.Module``.
Zoo modules register theirs with the :func:`register` decorator; everything else goes
through :func:`create` and :func:`names`.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable

from torch import nn

from kdlab.errors import ConfigError

Builder = Callable[..., nn.Module]

#: The registry itself: a plain dict from model name to builder.
REGISTRY: dict[str, Builder] = {}

_REQUIRED_ATTRS = ("feature_info", "embedding_module", "classifier_module")


def register(name: str) -> Callable[[Builder], Builder]:
    """Decorator that registers ``builder`` under ``name`` (names are unique)."""

    def deco(builder: Builder) -> Builder:
        if name in REGISTRY:
            raise ValueError(f"model name {name!r} is registered twice")
        REGISTRY[name] = builder
        return builder

    return deco


def names() -> list[str]:
    """Every registered model name, sorted."""
    return sorted(REGISTRY)


def _closest(name: str, choices: list[str]) -> str | None:
    """The most similar name (case-insensitive), however far."""
    lowered = {c.lower(): c for c in choices}
    close = difflib.get_close_matches(name.lower(), list(lowered), n=1, cutoff=0.0)
    return lowered[close[0]] if close else None


def _check_positive_int(key: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"model option {key} must be a positive integer, got {value!r}")


def create(name: str, num_classes: int = 100, in_chans: int = 3, **kwargs) -> nn.Module:
    """Build the registered model ``name``; it returns logits of shape (N, num_classes)."""
    builder = REGISTRY.get(name)
    if builder is None:
        valid = names()
        hint = _closest(str(name), valid)
        did_you_mean = f" (closest match: {hint!r})" if hint else ""
        raise ConfigError(f"unknown model {name!r}{did_you_mean}; valid names: {', '.join(valid)}")
    _check_positive_int("num_classes", num_classes)
    _check_positive_int("in_chans", in_chans)
    try:
        inspect.signature(builder).bind(num_classes=num_classes, in_chans=in_chans, **kwargs)
    except TypeError as exc:
        raise ConfigError(f"model {name!r} does not accept these options {sorted(kwargs)}: {exc}") from None
    model = builder(num_classes=num_classes, in_chans=in_chans, **kwargs)
    _check_model(name, model)
    return model


def _check_model(name: str, model: nn.Module) -> None:
    """Guard against zoo bugs: every advertised tap must name a real submodule."""
    for attr in _REQUIRED_ATTRS:
        if not hasattr(model, attr):
            raise RuntimeError(f"zoo model {name!r} lacks the attribute {attr!r}")
    modules = dict(model.named_modules())
    taps = [model.embedding_module, model.classifier_module]
    for info in model.feature_info:
        taps.append(info["module"])
        if info["preact_module"] is not None:
            taps.append(info["preact_module"])
    for tap in taps:
        if tap not in modules:
            raise RuntimeError(f"zoo model {name!r} names a missing module {tap!r}")
    if not isinstance(modules[model.classifier_module], nn.Linear):
        raise RuntimeError(f"zoo model {name!r}: classifier_module is not an nn.Linear")
