"""Correlation congruence (Peng et al., ICCV 2019): the samples' correlation, student against teacher."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from kdlab.losses import relational as R
from kdlab.losses.base import Outputs, Term, TermOptions, gather_pair, register


class CCOptions(TermOptions):
    weight: float = Field(default=0.02, ge=0, description="RepDistiller's 0.02, for mode 'code'")
    mode: Literal["code", "paper"] = Field(
        default="code",
        description="code: RepDistiller's form (from code the authors sent): products of consecutive samples' "
        "|e_s - e_t|, batch-order dependent; paper: MSE between the two Taylor-RBF correlation matrices of the batch",
    )
    embed_dim: int | None = Field(
        default=128,
        ge=1,
        description="a linear head on each side maps the embedding to this width, trained with the "
        "student (RepDistiller's LinearEmbed; the teacher's head is trained too); null: no heads",
    )
    gamma: float = Field(default=0.4, gt=0, description="mode 'paper': RBF kernel exp(-gamma ||x - y||^2)")
    order: int = Field(default=2, ge=0, le=10, description="mode 'paper': order P of the kernel's Taylor series")
    gather: bool = Field(
        default=False,
        description="under torchrun: relate the samples of the global batch (every rank's "
        "embeddings (after the heads) gathered, the student's differentiably) instead of each rank's share",
    )
    student_layers: list[str] | None = None
    teacher_layers: list[str] | None = None


@register
class CC(Term):
    """CC between the (embedded) penultimate features; the heads are side modules, dropped on export."""

    name = "cc"
    Options = CCOptions
    reads_teacher_features = True
    default_student_layers = "embedding"
    default_teacher_layers = "embedding"

    def build(self, probe: Outputs) -> None:
        self.embed_s = nn.ModuleList()
        self.embed_t = nn.ModuleList()
        if self.opts.embed_dim is None:
            return
        for s, t in self.layer_pairs(probe):
            self.embed_s.append(nn.Linear(s.flatten(1).shape[1], self.opts.embed_dim))
            self.embed_t.append(nn.Linear(t.flatten(1).shape[1], self.opts.embed_dim))

    def forward(self, out: Outputs) -> torch.Tensor:
        total = out.logits.new_zeros((), dtype=torch.float32)
        for i, (s, t) in enumerate(self.layer_pairs(out)):
            es, et = s.flatten(1), t.flatten(1)
            if self.opts.embed_dim is not None:
                es, et = self.embed_s[i](es), self.embed_t[i](et)
            # after the heads: gathering first would run each rank's heads on every rank's rows
            es, et = gather_pair(es, et, self.opts.gather)
            total = total + R.cc(es, et, mode=self.opts.mode, gamma=self.opts.gamma, order=self.opts.order)
        return total
