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

_REQUIRED_ATTRS = ("feature_info", "embedding_module", "classifier_module", "pool_module")


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


def create(
    name: str, num_classes: int = 100, in_chans: int = 3, *, classifier_bias: bool = True, **kwargs
) -> nn.Module:
    """Build the registered model ``name``; it returns logits of shape (N, num_classes).

    ``classifier_bias=False`` (an option of every zoo model) builds the final Linear without a bias, its weight
    initialised as the model's own: the "CAM network" form of CAT-KD (Guo et al., CVPR 2023; official code
    `GzyAftermath/CAT-KD`, the ``*_test`` models), whose logits are the pooled maps of a bias-free 1x1 conv, which
    equals a bias-free Linear after the pooling.
    """
    if not isinstance(classifier_bias, bool):
        raise ConfigError(f"model option classifier_bias must be true or false, got {classifier_bias!r}")
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
    if not classifier_bias:
        _drop_classifier_bias(model)
    return model


def _drop_classifier_bias(model: nn.Module) -> None:
    old = model.get_submodule(model.classifier_module)
    new = nn.Linear(old.in_features, old.out_features, bias=False)
    new.weight.data.copy_(old.weight.data)  # the model's own init of the weight, one less parameter
    parent_name, _, leaf = model.classifier_module.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, leaf, new)


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
