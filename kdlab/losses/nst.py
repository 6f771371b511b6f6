"""Neuron selectivity transfer (Huang & Wang 2017): MMD^2 between channel activation patterns."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from kdlab.losses import feature_functional as FF
from kdlab.losses.base import Outputs, Term, TermOptions, register


class NSTOptions(TermOptions):
    weight: float = Field(default=50.0, ge=0, description="multiplies MMD^2 (the official code's 50 = lambda/2)")
    kernel: Literal["linear", "poly", "gaussian"] = "poly"
    sigma2: float | None = Field(
        default=None,
        gt=0,
        description="gaussian bandwidth; None: the detached mean pairwise squared distance per sample",
    )
    teacher_term: bool = Field(
        default=True, description="keep the constant teacher-teacher term (true MMD^2 >= 0); the official code drops it"
    )
    student_layers: list[str] | None = None
    teacher_layers: list[str] | None = None
    pool: bool = Field(
        default=True, description="average-pool the larger map when spatial sizes differ (as RepDistiller)"
    )


@register
class NST(Term):
    """Sum over tapped layer pairs of mean_n MMD^2; defaults to every stage (RepDistiller's choice).

    The official ImageNet code taps the last block's pre-ReLU output only: `student_layers: [last:pre]`.
    """

    name = "nst"
    Options = NSTOptions
    reads_teacher_features = True
    default_student_layers = "all"
    default_teacher_layers = "all"

    def forward(self, out: Outputs) -> torch.Tensor:
        total = out.logits.new_zeros((), dtype=torch.float32)
        for fs, ft in self.layer_pairs(out, pool=self.opts.pool):
            total = total + FF.nst(
                fs, ft, kernel=self.opts.kernel, sigma2=self.opts.sigma2, teacher_term=self.opts.teacher_term
            )
        return total
