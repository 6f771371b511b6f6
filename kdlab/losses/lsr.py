"""Label smoothing (Szegedy et al. 2016) and Tf-KD's manually designed teacher (Yuan et al. 2020)."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from kdlab.losses import functional as F
from kdlab.losses.base import Outputs, Term, TermOptions, register


class LSROptions(TermOptions):
    eps: float = Field(default=0.1, ge=0, lt=1)
    spread: Literal["all", "others"] = Field(
        default="all",
        description="all: eps/K on every class (Szegedy); others: eps/(K-1) on the wrong classes (Tf-KD repo)",
    )


@register
class LSR(Term):
    """Cross-entropy against smoothed labels; use with `ce: 0` since it replaces the plain CE.

    Example: `loss: {ce: 0, terms: {lsr: {eps: 0.1}}}`.
    """

    name = "lsr"
    Options = LSROptions
    needs_teacher = False

    def forward(self, out: Outputs) -> torch.Tensor:
        return F.lsr(out.logits, out.targets, eps=self.opts.eps, spread=self.opts.spread)


class TfKDRegOptions(TermOptions):
    weight: float = Field(default=0.95, ge=0)
    a: float = Field(default=0.99, gt=0, lt=1, description="probability of the true class in the manual distribution")
    T: float = Field(default=20.0, gt=0)
    mode: Literal["code", "paper"] = Field(
        default="code",
        description="code: KL(softmax(p_d/T) || softmax(z)), student untempered (official); "
        "paper: both tempered, T^2-scaled",
    )
    reduction: Literal["batchmean", "mean"] = Field(
        default="mean", description="mean divides by K as the official code's nn.KLDivLoss"
    )


@register
class TfKDReg(Term):
    """Tf-KD_reg: KD from the manually designed distribution `a` / `(1-a)/(K-1)`.

    The official CIFAR-100 recipe is `(1-alpha)*CE + alpha*multiplier*KL_mean`, i.e.
    `loss: {ce: 0.05, terms: {tfkd_reg: {weight: 0.95, T: 40, reduction: mean}}}` for MobileNetV2.
    """

    name = "tfkd_reg"
    Options = TfKDRegOptions
    needs_teacher = False

    def forward(self, out: Outputs) -> torch.Tensor:
        value = F.tfkd_reg(out.logits, out.targets, a=self.opts.a, T=self.opts.T, mode=self.opts.mode)
        if self.opts.reduction == "mean":
            value = value / out.logits.shape[1]
        return value
