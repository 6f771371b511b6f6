"""DIST (Huang et al., NeurIPS 2022): inter- and intra-class Pearson correlation of the predictions."""

from __future__ import annotations

import torch
from pydantic import Field

from kdlab import distributed
from kdlab.losses import relational as R
from kdlab.losses.base import Outputs, Term, TermOptions, register


class DISTOptions(TermOptions):
    weight: float = Field(default=1.0, ge=0, description="the official kd_loss_weight (1), on top of CE weight 1")
    T: float = Field(
        default=1.0,
        gt=0,
        description="temperature tau of both softmaxes; the loss is scaled by tau^2 "
        "(official default 1; its CIFAR-100 recipes use 4)",
    )
    beta: float = Field(
        default=1.0, ge=0, description="weight of the inter-class term (correlation within each sample)"
    )
    gamma: float = Field(
        default=1.0, ge=0, description="weight of the intra-class term (correlation within each class)"
    )
    logit_standardize: bool = Field(
        default=False,
        description="z-score both logits per sample before the temperature (logit standardisation, Sun et al. 2024)",
    )
    teacher: int = Field(default=0, ge=0, description="which teacher (index in 'teachers')")
    gather: bool = Field(
        default=False,
        description="under torchrun: correlate each class over the global batch (every rank's "
        "logits gathered, the student's differentiably) instead of each rank's share",
    )


@register
class DIST(Term):
    """`T^2 [beta (1 - mean_n rho(y_s[n], y_t[n])) + gamma (1 - mean_k rho(y_s[:, k], y_t[:, k]))]`,
    y = softmax(z/T)."""

    name = "dist"
    Options = DISTOptions

    def forward(self, out: Outputs) -> torch.Tensor:
        o = self.opts
        zs, zt = out.logits, out.teacher_logits[o.teacher]
        if o.gather:
            zs, zt = distributed.gather_batch(zs), distributed.gather_batch(zt)
        return R.dist(zs, zt, T=o.T, beta=o.beta, gamma=o.gamma, standardize=o.logit_standardize)
