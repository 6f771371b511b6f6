"""Hinton KD (Hinton, Vinyals, Dean 2015) and KD from the averaged logits of several teachers."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from kdlab.losses import functional as F
from kdlab.losses.base import Outputs, Term, TermOptions, register


class KDOptions(TermOptions):
    weight: float = Field(default=0.9, ge=0)
    T: float = Field(default=4.0, gt=0)
    teacher: int = Field(default=0, ge=0, description="which teacher (index in 'teachers')")
    reduction: Literal["batchmean", "mean"] = Field(
        default="batchmean",
        description="batchmean: KL summed over classes, mean over samples; mean: also divided by the class count "
        "K, as nn.KLDivLoss's legacy default in the Tf-KD official code",
    )
    logit_standardize: bool = Field(
        default=False,
        description="z-score both logits per sample before the temperature (logit standardisation, Sun et al. 2024; "
        "its recipes pair it with T 2 and weight 9)",
    )


@register
class KD(Term):
    """`T^2 * mean_n KL(softmax(t_n/T) || softmax(s_n/T))`, divided by K when reduction='mean'.

    RepDistiller's recipe: CE weight 0.1, KD weight 0.9, T=4. Example:
    `loss: {ce: 0.1, terms: {kd: {weight: 0.9, T: 4}}}`. With `logit_standardize: true` both logits
    are z-scored per sample first (Sun et al., CVPR 2024): `{kd: {weight: 9, T: 2, logit_standardize: true}}`.
    """

    name = "kd"
    Options = KDOptions

    def teacher_logits(self, out: Outputs) -> torch.Tensor:
        return out.teacher_logits[self.opts.teacher]

    def forward(self, out: Outputs) -> torch.Tensor:
        return self.value_at(out, self.opts.T)

    def value_at(self, out: Outputs, T: torch.Tensor | float) -> torch.Tensor:
        """The term at temperature ``T`` (a float, or a learned 0-dim tensor: the ctkd term)."""
        value = F.kd(out.logits, self.teacher_logits(out), T=T, standardize=self.opts.logit_standardize)
        if self.opts.reduction == "mean":
            value = value / out.logits.shape[1]
        return value


class EnsembleKDOptions(KDOptions):
    average: Literal["logits", "probs"] = Field(
        default="logits", description="average the teachers' logits, or their tempered probabilities"
    )


@register
class EnsembleKD(KD):
    """KD towards the average of all teachers: their logits (default) or their tempered probabilities."""

    name = "ensemble_kd"
    Options = EnsembleKDOptions

    def teacher_logits(self, out: Outputs) -> torch.Tensor:
        stacked = torch.stack([t.float() for t in out.teacher_logits])  # (M, N, K)
        if self.opts.average == "logits":
            return stacked.mean(0)
        # log of the mean tempered distribution, rescaled by T so that softmax(./T) gives that mean back
        probs = torch.softmax(stacked / self.opts.T, dim=-1).mean(0)
        return self.opts.T * probs.clamp_min(1e-30).log()
