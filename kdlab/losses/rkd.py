"""Relational knowledge distillation (Park et al., CVPR 2019): distances and angles within the batch."""

from __future__ import annotations

import torch
from pydantic import Field

from kdlab.losses import relational as R
from kdlab.losses.base import Outputs, Term, TermOptions, register


class RKDOptions(TermOptions):
    weight: float = Field(
        default=1.0, ge=0, description="multiplies distance_weight * L_D + angle_weight * L_A (RepDistiller's 1)"
    )
    distance_weight: float = Field(
        default=25.0, ge=0, description="weight of the distance term inside the loss (RepDistiller's 25)"
    )
    angle_weight: float = Field(
        default=50.0, ge=0, description="weight of the angle term inside the loss (RepDistiller's 50)"
    )
    gather: bool = Field(
        default=False,
        description="under torchrun: relate the samples of the global batch (every rank's "
        "embeddings gathered, the student's differentiably) instead of each rank's share",
    )
    student_layers: list[str] | None = None
    teacher_layers: list[str] | None = None


@register
class RKD(Term):
    """RKD-D + RKD-A on the penultimate embedding (RepDistiller's choice); no side module."""

    name = "rkd"
    Options = RKDOptions
    reads_teacher_features = True
    default_student_layers = "embedding"
    default_teacher_layers = "embedding"

    def forward(self, out: Outputs) -> torch.Tensor:
        total = out.logits.new_zeros((), dtype=torch.float32)
        for s, t in self.layer_pairs(out, gather=self.opts.gather):
            total = total + R.rkd(s, t, self.opts.distance_weight, self.opts.angle_weight)
        return total
