"""Input checks and the precision rule shared by every functional module of :mod:`kdlab.losses`.

:mod:`~kdlab.losses.functional`, :mod:`~kdlab.losses.relational`, :mod:`~kdlab.losses.feature_functional`
and the terms that compute their own maths (DKD) validate their inputs with one set of checks, so a
bad shape or option reads the same for every method (:class:`~kdlab.errors.LayerError` naming both
shapes, :class:`~kdlab.errors.ConfigError` for option values, :class:`~kdlab.errors.DataError` for
labels out of range), and run their maths under one precision rule: at least float32, with autocast
switched off (:func:`float_math` and :func:`as_float`).
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable
from typing import TypeVar

import torch
from torch import Tensor

from kdlab.errors import ConfigError, DataError, LayerError

__all__ = [
    "float_math",
    "as_float",
    "shape_of",
    "require_tensor",
    "check_same_shape",
    "check_maps",
    "check_positive",
    "check_unit_interval",
    "check_choice",
    "check_logits_targets",
    "check_labels",
    "kl_bm",
    "kl_rows",
]

_Fn = TypeVar("_Fn", bound=Callable[..., Tensor])


def float_math(fn: _Fn) -> _Fn:
    """Run ``fn`` with autocast disabled on the device of its first tensor argument."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        device_type = "cpu"
        for value in (*args, *kwargs.values()):
            if isinstance(value, Tensor):
                device_type = value.device.type
                break
        if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
            with torch.autocast(device_type=device_type, enabled=False):
                return fn(*args, **kwargs)
        return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def as_float(*tensors: Tensor) -> tuple[Tensor, ...]:
    """Cast floating tensors to one common dtype of at least float32 (half/bf16 -> float32)."""
    dtype = torch.float32
    for t in tensors:
        if t.is_floating_point():
            dtype = torch.promote_types(dtype, t.dtype)
        else:
            raise LayerError(f"expected a floating-point tensor, got dtype {t.dtype} with shape {shape_of(t)}")
    return tuple(t if t.dtype == dtype else t.to(dtype) for t in tensors)


def shape_of(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def require_tensor(name: str, what: str, x: object) -> None:
    if not isinstance(x, Tensor):
        raise LayerError(f"{name}: {what} must be a tensor, got {type(x).__name__}")


def check_same_shape(name: str, student: Tensor, teacher: Tensor, what: str, fix: str) -> None:
    require_tensor(name, "student input", student)
    require_tensor(name, "teacher input", teacher)
    if student.shape != teacher.shape:
        raise LayerError(
            f"{name}: {what} shapes differ: student {shape_of(student)} vs teacher {shape_of(teacher)}; {fix}"
        )


def check_maps(name: str, fs: Tensor, ft: Tensor) -> None:
    """(N, C, *spatial) maps with equal N and equal spatial sizes; channel counts may differ."""
    require_tensor(name, "student feature map", fs)
    require_tensor(name, "teacher feature map", ft)
    if fs.dim() < 3 or ft.dim() < 3:
        raise LayerError(
            f"{name}: expected feature maps of shape (N, C, H, W) (at least 3 dims), "
            f"got student {shape_of(fs)} vs teacher {shape_of(ft)}"
        )
    if fs.shape[0] != ft.shape[0]:
        raise LayerError(
            f"{name}: batch sizes differ: student {shape_of(fs)} vs teacher {shape_of(ft)}; "
            "student and teacher must see the same batch"
        )
    if fs.shape[2:] != ft.shape[2:]:
        raise LayerError(
            f"{name}: spatial sizes differ: student {shape_of(fs)[1:]} vs teacher {shape_of(ft)[1:]}; "
            "pool the larger map (option pool: true)"
        )


def check_positive(name: str, what: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{name}: {what} must be a finite number > 0, got {value!r}")
    return float(value)


def check_unit_interval(name: str, what: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value <= 1.0:
        raise ConfigError(f"{name}: {what} must be a number in [0, 1], got {value!r}")
    return float(value)


def check_choice(name: str, what: str, value: object, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ConfigError(f"{name}: unknown {what} {value!r}; expected one of {', '.join(map(repr, choices))}")
    return value  # type: ignore[return-value]


def check_logits_targets(name: str, logits: Tensor, targets: Tensor) -> None:
    require_tensor(name, "student logits", logits)
    require_tensor(name, "targets", targets)
    if logits.dim() != 2:
        raise LayerError(f"{name}: expected student logits of shape (N, K), got {shape_of(logits)}")
    if targets.dim() != 1 or targets.shape[0] != logits.shape[0]:
        raise LayerError(
            f"{name}: expected targets of shape (N,) matching the logits' batch, "
            f"got logits {shape_of(logits)} vs targets {shape_of(targets)}"
        )
    check_labels(name, targets, logits.shape[1])


def check_labels(name: str, targets: Tensor, num_classes: int) -> None:
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise LayerError(f"{name}: targets must be integer class indices, got dtype {targets.dtype}")
    # Range check only on CPU: on an accelerator it would force a host sync every step (the
    # backend's own index assertion still fires there).
    if targets.device.type == "cpu" and targets.numel() > 0:
        lo, hi = int(targets.min()), int(targets.max())
        if lo < 0 or hi >= num_classes:
            raise DataError(
                f"{name}: class index out of range: labels span [{lo}, {hi}] but there are {num_classes} classes"
            )


def kl_rows(log_p: Tensor, log_q: Tensor) -> Tensor:
    """``KL(p_n || q_n) = sum_k p_nk (log p_nk - log q_nk)`` of each row, (N,), from log-probabilities.

    Terms with ``p_nk = 0`` contribute 0 (``xlogy`` convention), as in ``F.kl_div``.
    """
    p = log_p.exp()
    return (p * torch.where(p > 0, log_p - log_q, torch.zeros_like(p))).sum(1)


def kl_bm(log_p: Tensor, log_q: Tensor) -> Tensor:
    """``KL_bm(p || q) = (1/N) sum_n sum_k p_nk (log p_nk - log q_nk)``: the batch mean of :func:`kl_rows`."""
    return kl_rows(log_p, log_q).sum() / log_p.shape[0]
