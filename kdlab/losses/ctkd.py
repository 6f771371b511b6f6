"""Curriculum temperature (CTKD: Li et al., "Curriculum Temperature for Knowledge Distillation", AAAI 2023).

A learnable temperature ``tau = t_start + t_end * sigmoid(theta)`` behind a gradient-reversal layer: the
student minimises the distillation loss while ``theta`` is pushed to *raise* it, more strongly as the
curriculum goes on. As coded in the official repository `zhengli97/CTKD` (`models/temp_global.py`:
``Global_T`` and ``GradientReversalFunction``; `helper/loops.py::train_distill`; `train_student.py`:
``CosineDecay``): the reversal layer multiplies the incoming gradient by ``lambda`` (not by ``-lambda``),
and ``lambda`` itself runs from 0 down to -1 along a cosine over the first ``decay_epochs`` epochs
(1-based epochs), so the sign comes from ``lambda``. ``theta`` starts at 1 (``tau`` about 15.6) and sits
in the student's SGD group with its weight decay; here it is the term's own `ParamGroup`, whose options
default to the student's.

The term wraps a logit term that takes a temperature (``value_at(out, T)``: kd, dkd) and supplies the
learned ``tau`` to it, as the official code passes ``temp`` to ``DistillKL`` and ``dkd_loss``.
The instance-wise variant of the paper is not implemented: its code is not in the official repository.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from kdlab.errors import LayerError
from kdlab.losses.base import TERMS, Outputs, ParamGroup, Term, TermOptions, register


class _GradientReversal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor) -> Tensor:
        ctx.save_for_backward(scale)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (scale,) = ctx.saved_tensors
        return grad * scale.to(grad.dtype), None


def gradient_reversal(x: Tensor, scale: Tensor | float) -> Tensor:
    """The identity forward; backward multiplies the gradient by ``scale`` (CTKD's ``lambda``, <= 0)."""
    return _GradientReversal.apply(x, torch.as_tensor(scale, dtype=x.dtype, device=x.device))


def curriculum_lambda(
    progress: Tensor | float, decay_epochs: float = 10.0, lambda_max: float = 0.0, lambda_min: float = -1.0
) -> Tensor | float:
    """``lambda(e) = lambda_min + (lambda_max - lambda_min) * (1 + cos(pi * min(e, L) / L)) / 2``, ``e`` the
    1-based epoch (completed epochs + 1, as the official loop's ``range(1, epochs + 1)``), ``L`` = decay_epochs."""
    if isinstance(progress, Tensor):
        e = (torch.floor(progress) + 1).clamp(0, decay_epochs)
        return lambda_min + (lambda_max - lambda_min) * (torch.cos(e * math.pi / decay_epochs) + 1) / 2
    e = min(max(int(progress) + 1, 0), decay_epochs)
    return lambda_min + (lambda_max - lambda_min) * (math.cos(e * math.pi / decay_epochs) + 1) / 2


def curriculum_temperature(theta: Tensor, lam: Tensor | float, t_start: float = 1.0, t_end: float = 20.0) -> Tensor:
    """``tau = t_start + t_end * sigmoid(grl(theta, lam))``: the official order (the reversal on theta)."""
    return t_start + t_end * torch.sigmoid(gradient_reversal(theta, lam))


class CTKDOptions(TermOptions):
    weight: float = Field(default=0.9, ge=0, description="multiplies the wrapped term's value at the learned tau")
    base: str = Field(default="kd", description="the logit term the learned temperature is supplied to (kd, dkd)")
    base_options: dict[str, Any] = Field(
        default_factory=dict, description="the wrapped term's options, without weight and T (the learned tau)"
    )
    t_start: float = Field(default=1.0, ge=0, description="tau = t_start + t_end * sigmoid(theta)")
    t_end: float = Field(default=20.0, gt=0, description="tau = t_start + t_end * sigmoid(theta)")
    theta_init: float = Field(default=1.0, description="theta at the start (the official Global_T: 1, tau about 15.6)")
    decay_epochs: float = Field(
        default=10.0, gt=0, description="epochs of the cosine curriculum (CIFAR 10, ImageNet 5)"
    )
    lambda_max: float = Field(default=0.0, description="the reversal scale at epoch 0 of the curriculum")
    lambda_min: float = Field(default=-1.0, description="the reversal scale after decay_epochs (negative: adversarial)")
    lr_scale: float = Field(default=1.0, gt=0, description="theta's learning rate = the run's lr times this")
    weight_decay: float | None = Field(
        default=None, ge=0, description="theta's weight decay; null: train.weight_decay, as the official code"
    )

    @model_validator(mode="after")
    def _base_known(self):
        term = TERMS.get(self.base)
        if term is None or not hasattr(term, "value_at"):
            takers = sorted(n for n, t in TERMS.items() if hasattr(t, "value_at"))
            raise ValueError(
                f"base: term {self.base!r} does not take a learned temperature; one of {', '.join(takers)}"
            )
        for key in ("weight", "T"):
            if key in self.base_options:
                raise ValueError(f"base_options.{key}: set by ctkd (its weight option, the learned tau); remove it")
        term.Options.model_validate(self.base_options)  # its own one-line errors
        return self


@register
class CTKD(Term):
    """CTKD: the wrapped logit term at a learned, adversarial temperature. Example (the official CIFAR-100 KD+CTKD):
    `loss: {ce: 0.1, terms: {ctkd: {weight: 0.9, base: kd}}}`."""

    name = "ctkd"
    Options = CTKDOptions
    needs_progress = True

    def __init__(self, opts, student, teachers):
        super().__init__(opts, student, teachers)
        base_cls = TERMS[opts.base]
        self.base = base_cls(base_cls.Options.model_validate(opts.base_options), student, teachers)
        if self.base.student_layers or any(self.base.teacher_layers):
            raise LayerError(f"ctkd: base term {opts.base!r} taps layers; ctkd wraps logit terms only")
        self.theta = nn.Parameter(torch.full((1,), float(opts.theta_init)))

    def param_groups(self) -> list[ParamGroup]:
        return [ParamGroup("temperature", [self.theta], self.opts.lr_scale, self.opts.weight_decay)]

    def temperature(self, progress: Tensor | float) -> Tensor:
        o = self.opts
        lam = curriculum_lambda(progress, o.decay_epochs, o.lambda_max, o.lambda_min)
        return curriculum_temperature(self.theta, lam, o.t_start, o.t_end)[0]

    def forward(self, out: Outputs) -> Tensor:
        if out.progress is None:
            raise LayerError(
                "ctkd: its curriculum needs the training progress, which kdlab's trainer passes; "
                "call the Distiller with progress=<epochs completed>"
            )
        return self.base.value_at(out, self.temperature(out.progress))
