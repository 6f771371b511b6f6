"""Attention transfer (Zagoruyko & Komodakis, ICLR 2017)."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from kdlab.losses import functional as F
from kdlab.losses.base import Outputs, Term, TermOptions, register


class ATOptions(TermOptions):
    weight: float = Field(default=1000.0, ge=0)
    p: float = Field(default=2.0, gt=0)
    student_layers: list[str] | None = None
    teacher_layers: list[str] | None = None
    pool: bool = Field(default=False, description="average-pool the larger map when spatial sizes differ")
    mode: Literal["code", "paper"] = Field(
        default="code",
        description="code: sum over layers of mean_{n,hw}(q_s-q_t)^2 (official, beta=1000); "
        "paper: 1/2 * sum over layers of mean_n ||q_s-q_t||_2",
    )


@register
class AT(Term):
    """Sum over the tapped layer pairs of the attention-map distance; defaults to every stage."""

    name = "at"
    Options = ATOptions
    reads_teacher_features = True
    default_student_layers = "all"
    default_teacher_layers = "all"

    def forward(self, out: Outputs) -> torch.Tensor:
        total = out.logits.new_zeros((), dtype=torch.float32)
        for fs, ft in self.layer_pairs(out, pool=self.opts.pool):
            if self.opts.mode == "code":
                total = total + F.at(fs, ft, p=self.opts.p)
            else:
                qs = F.attention_map(fs, p=self.opts.p)
                qt = F.attention_map(ft, p=self.opts.p)
                total = total + 0.5 * (qs - qt).norm(dim=1).mean()
        return total
