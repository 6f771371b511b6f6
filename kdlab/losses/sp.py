"""Similarity-preserving KD (Tung & Mori, ICCV 2019): the batch Gram matrix of a feature map."""

from __future__ import annotations

import torch
from pydantic import Field

from kdlab import distributed
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

    def _pair(self, s: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.opts.gather:
            return distributed.gather_batch(s), distributed.gather_batch(t)
        return s, t

    def forward(self, out: Outputs) -> torch.Tensor:
        total = out.logits.new_zeros((), dtype=torch.float32)
        teacher = out.teacher_feats[0]
        for s_spec, t_spec in zip(self.student_layers, self.teacher_layers[0]):
            total = total + R.sp(*self._pair(out.feats[s_spec], teacher[t_spec]))
        return total
