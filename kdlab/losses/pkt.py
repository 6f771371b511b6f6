"""Probabilistic knowledge transfer (Passalis & Tefas, ECCV 2018): cosine-kernel conditional distributions."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from kdlab.losses import relational as R
from kdlab.losses.base import Outputs, Term, TermOptions, register


class PKTOptions(TermOptions):
    weight: float = Field(
        default=30000.0, ge=0, description="for the mean over the N^2 KL entries (RepDistiller's 30000)"
    )
    mode: Literal["code", "paper"] = Field(
        default="code",
        description="code: the authors' code (each sample's self-similarity kept in its distribution, mean over N^2); "
        "paper: conditional distributions over the other samples only (mean over N(N-1))",
    )
    gather: bool = Field(
        default=False,
        description="under torchrun: relate the samples of the global batch (every rank's "
        "embeddings gathered, the student's differentiably) instead of each rank's share",
    )
    student_layers: list[str] | None = None
    teacher_layers: list[str] | None = None


@register
class PKT(Term):
    """KL between the teacher's and student's cosine-similarity distributions over the batch; penultimate embedding."""

    name = "pkt"
    Options = PKTOptions
    reads_teacher_features = True
    default_student_layers = "embedding"
    default_teacher_layers = "embedding"

    def forward(self, out: Outputs) -> torch.Tensor:
        total = out.logits.new_zeros((), dtype=torch.float32)
        for s, t in self.layer_pairs(out, gather=self.opts.gather):
            total = total + R.pkt(s, t, mode=self.opts.mode)
        return total
