"""Similarity-preserving KD (Tung & Mori, ICCV 2019): the batch Gram matrix of a feature map."""

from __future__ import annotations

import torch
from pydantic import Field

from kdlab.losses import relational as R
from kdlab.losses.base import Outputs, Term, TermOptions, register


class SPOptions(TermOptions):
    weight: float = Field(
        default=3000.0, ge=0, description="gamma, for the squared Frobenius norm over N^2 (RepDistiller's 3000)"
    )
    gather: bool = Field(
        default=False,
        description="under torchrun: relate the samples of the global batch (every rank's "
        "feature maps gathered, the student's differentiably) instead of each rank's share",
    )
    student_layers: list[str] | None = None
    teacher_layers: list[str] | None = None


@register
class SP(Term):
    """Sum over the tapped layer pairs of `||rownorm(G_t) - rownorm(G_s)||_F^2 / N^2`; defaults to the last stage."""

    name = "sp"
    Options = SPOptions
    reads_teacher_features = True
    default_student_layers = "last"
    default_teacher_layers = "last"

    def forward(self, out: Outputs) -> torch.Tensor:
        total = out.logits.new_zeros((), dtype=torch.float32)
        for s, t in self.layer_pairs(out, gather=self.opts.gather):
            total = total + R.sp(s, t)
        return total
