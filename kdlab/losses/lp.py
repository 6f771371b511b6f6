"""Locality-preserving loss (Chen et al., "Learning student networks via feature embedding")."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from kdlab.losses import relational as R
from kdlab.losses.base import Outputs, Term, TermOptions, register


class LPOptions(TermOptions):
    weight: float = Field(
        default=1.5, ge=0, description="gamma; the third-party implementation's 1.5 with the 1/(N k) scaling"
    )
    k: int = Field(default=5, ge=1)
    sigma2: float | None = Field(
        default=None, gt=0, description="None: the detached mean teacher distance over the kNN pairs"
    )
    normalize: bool = Field(
        default=False,
        description="L2-normalise both features before any distance; without it the "
        "loss can be lowered by shrinking the student's features, which stalls a CIFAR student (docs/methods/lp.md)",
    )
    placement: Literal["embedding", "hint"] = Field(
        default="embedding",
        description="default layers when none are named: the penultimate embedding, or FitNet's "
        "hint layer (the 'middle' stage), where the LP paper places the loss",
    )
    gather: bool = Field(
        default=False,
        description="under torchrun: build the kNN graph over the global batch (every "
        "rank's embeddings gathered) instead of within each rank's share of it",
    )
    student_layers: list[str] | None = None
    teacher_layers: list[str] | None = None


@register
class LP(Term):
    """Student embeddings keep the teacher's k-nearest-neighbour structure within the mini-batch.

    No side module: student and teacher dimensions may differ. Defaults to the penultimate embedding.
    Under DDP each rank uses its own share of the global batch (the kNN graph is per-rank, over
    batch_size / world samples) unless `gather: true`, which gathers the embeddings of all ranks
    (differentiably) so every rank computes the loss of the whole global batch, as one process would.
    """

    name = "lp"
    Options = LPOptions
    reads_teacher_features = True

    @property
    def default_student_layers(self) -> str:
        return "middle" if self.opts.placement == "hint" else "embedding"

    default_teacher_layers = default_student_layers

    def forward(self, out: Outputs) -> torch.Tensor:
        total = out.logits.new_zeros((), dtype=torch.float32)
        for s, t in self.layer_pairs(out, gather=self.opts.gather):
            total = total + R.lp(s, t, k=self.opts.k, sigma2=self.opts.sigma2, normalize=self.opts.normalize)
        return total
