"""Locality-preserving loss (Chen et al., "Learning student networks via feature embedding")."""

from __future__ import annotations

import torch
from pydantic import Field

from kdlab.losses import functional as F
from kdlab.losses.base import Outputs, Term, TermOptions, register


class LPOptions(TermOptions):
    weight: float = Field(default=1.5, ge=0, description="gamma; the third-party implementation's 1.5 with the 1/(N k) scaling")
    k: int = Field(default=5, ge=1)
    sigma2: float | None = Field(default=None, gt=0, description="None: the detached mean teacher distance over the kNN pairs")
    normalize: bool = Field(default=False, description="L2-normalise both embeddings before any distance")
    student_layers: list[str] | None = None
    teacher_layers: list[str] | None = None


@register
class LP(Term):
    """Student embeddings keep the teacher's k-nearest-neighbour structure within the mini-batch.

    No side module: student and teacher dimensions may differ. Defaults to the penultimate embedding.
    Under DDP each rank uses its own batch (the kNN graph is per-rank).
    """

    name = "lp"
    Options = LPOptions
    reads_teacher_features = True
    default_student_layers = "embedding"
    default_teacher_layers = "embedding"

    def forward(self, out: Outputs) -> torch.Tensor:
        total = out.logits.new_zeros((), dtype=torch.float32)
        teacher = out.teacher_feats[0]
        for s_spec, t_spec in zip(self.student_layers, self.teacher_layers[0]):
            total = total + F.lp(out.feats[s_spec], teacher[t_spec], k=self.opts.k, sigma2=self.opts.sigma2, normalize=self.opts.normalize)
        return total
