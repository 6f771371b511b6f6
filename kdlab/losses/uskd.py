"""USKD, the teacher-free self-distillation of Yang, Zeng, Yuan, Li, "From Knowledge Distillation to Self-Knowledge
Distillation: A Unified Approach with Normalized Loss and Customized Soft Labels", ICCV 2023 (arXiv 2303.13005).

NKD's two parts with soft labels the student makes for itself, no teacher: the target label is the student's own
target probability squared, shifted so that its batch mean is 1; the non-target labels are Zipf weights
(1 / rank) over the classes, ranked by a score that adds the student's final output to that of a weak extra head
(a linear classifier on the pooled output of the second-to-last stage, trained with label smoothing 0.1). As coded in
the official repository `yzd-v/cls_KD` (`mmcls/models/dis_losses/uskd.py`, ``USKDLoss``; the weak head's input in
`mmcls/models/classifiers/distiller.py`: ``neck(fea_s[-2])``). The head is a side module of the term: trained with
the student, saved in its checkpoints, absent from the exported student.

One detail of the official code is kept by default: by the time it ranks the classes, the variables holding the
student's probabilities have been reassigned to log-probabilities, so the student's share of the score is
``log p_k / (1 - log p_y)``; ``rank_source="prob"`` gives ``p_k / (1 - p_y)``, the normalised score the paper's
description suggests.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from kdlab.errors import ConfigError, LayerError
from kdlab.losses.base import Outputs, Term, TermOptions, register
from kdlab.losses.checks import as_float, check_choice, check_logits_targets, check_same_shape, float_math
from kdlab.losses.nkd import without_target

RANK_SOURCES = ("log_prob", "prob")
RANK_EPS = 1e-6
"""Added to the rank score's denominators, as in the official code."""
WEAK_SMOOTHING = 0.1
"""The weak head's label smoothing: 0.9 on the label plus 0.1 / K everywhere (official, not an option there)."""


def zipf_labels(score: Tensor, targets: Tensor) -> Tensor:
    """Zipf soft labels over the non-target classes, (N, K-1): class k of row n gets 1 / (its rank in ``score[n]``,
    1 = largest, counted over all K classes), the target dropped, the rest renormalised to sum 1."""
    order = torch.sort(score, dim=1, descending=True, stable=True).indices  # ties: the lower class index first
    rank = torch.empty_like(order).scatter_(
        1, order, torch.arange(1, score.shape[1] + 1, device=score.device).expand_as(order)
    )
    zipf = without_target(1.0 / rank.to(score.dtype), targets)
    return zipf / zipf.sum(1, keepdim=True)


@float_math
def uskd_parts(
    student_logits: Tensor, weak_logits: Tensor, targets: Tensor, rank_source: str = "log_prob"
) -> tuple[Tensor, Tensor, Tensor]:
    r"""USKD's three losses ``(L_target, L_non, L_weak)``, unweighted, as the official ``USKDLoss.forward``.

    .. math::
        p = \mathrm{softmax}(z_s),\quad
        \hat y_n = \mathrm{sg}\big[p_{n,y_n}^2 + 1 - \tfrac1N\textstyle\sum_m p_{m,y_m}^2\big]

        L_\mathrm{target} = -\frac1N \sum_n \hat y_n \log p_{n,y_n}

        L_\mathrm{weak} = -\frac1N \sum_n \sum_k \big(0.9\,[k = y_n] + 0.1/K\big) \log \mathrm{softmax}(z_w)_{nk}

        r_{nk} = \frac{w_{nk}}{1 - w_{n,y_n} + 10^{-6}} + \frac{s_{nk}}{1 - s_{n,y_n} + 10^{-6}},\quad
        w = \mathrm{softmax}(z_w),\ s = \log p\ (\text{``log_prob''})\ \text{or}\ p\ (\text{``prob''})

        L_\mathrm{non} = -\frac1N \sum_n \sum_{k \ne y_n} \tilde z_{nk} \log \mathrm{softmax}(\tilde z^s_n)_k

    with :math:`\tilde z_{nk} \propto 1/\mathrm{rank}_n(r_{nk})` over the non-target classes (summing to 1) and
    :math:`\tilde z^s` the student logits without the target column. sg: detached, as in the code; the ranks carry
    no gradient, so the weak head learns from ``L_weak`` only. The target label depends on the whole batch (its
    batch mean of ``p_y^2``). Ties in ``r`` are broken by class index (the official unstable sort leaves them open).
    """
    check_choice("uskd", "rank_source", rank_source, RANK_SOURCES)
    check_same_shape("uskd", student_logits, weak_logits, "logit", "the weak head must predict the same classes")
    check_logits_targets("uskd", student_logits, targets)
    n, k = student_logits.shape
    if k < 2:
        raise LayerError(f"uskd: needs at least 2 classes, got logits {tuple(student_logits.shape)}")
    zs, zw = as_float(student_logits, weak_logits)
    idx = targets[:, None]
    log_p = torch.log_softmax(zs, dim=1)  # (N, K)
    log_p_y = log_p.gather(1, idx)  # (N, 1)
    p_y2 = log_p_y.detach().exp().square()
    soft_target = p_y2 + 1.0 - p_y2.mean(0, keepdim=True)  # the official "value" is 1 for a hard label
    loss_target = -(soft_target * log_p_y).mean()

    log_w = torch.log_softmax(zw, dim=1)
    smoothed = torch.full_like(log_w, WEAK_SMOOTHING / k).scatter_add_(
        1, idx, torch.full((n, 1), 1.0 - WEAK_SMOOTHING, dtype=log_w.dtype, device=log_w.device)
    )
    loss_weak = -(smoothed * log_w).sum(1).mean()

    with torch.no_grad():
        w = log_w.exp()
        s = log_p if rank_source == "log_prob" else log_p.exp()
        score = w / (1 - w.gather(1, idx) + RANK_EPS) + s / (1 - s.gather(1, idx) + RANK_EPS)
        labels = zipf_labels(score, targets)  # (N, K-1)
    loss_non = -(labels * torch.log_softmax(without_target(zs, targets), dim=1)).sum(1).mean()
    return loss_target, loss_non, loss_weak


def uskd(
    student_logits: Tensor,
    weak_logits: Tensor,
    targets: Tensor,
    alpha: float = 0.1,
    beta: float = 0.1,
    mu: float = 0.1,
    rank_source: str = "log_prob",
) -> Tensor:
    """``alpha * L_target + beta * L_non + mu * L_weak`` (`uskd_parts`), the official ``loss_uskd``."""
    for what, value in (("alpha", alpha), ("beta", beta), ("mu", mu)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise ConfigError(f"uskd: {what} must be a number >= 0, got {value!r}")
    target, non, weak = uskd_parts(student_logits, weak_logits, targets, rank_source)
    return alpha * target + beta * non + mu * weak


class USKDOptions(TermOptions):
    weight: float = Field(
        default=1.0, ge=0, description="multiplies alpha * L_target + beta * L_non + mu * L_weak (official: 1, CE 1)"
    )
    alpha: float = Field(
        default=0.1, ge=0, description="weight of the target part (official: CIFAR-100 ResNet18 0.1, ImageNet 1)"
    )
    beta: float = Field(default=0.1, ge=0, description="weight of the Zipf non-target part (official: 0.1)")
    mu: float = Field(
        default=0.1,
        ge=0,
        description="weight of the weak head's label-smoothed CE (official: CIFAR-100 0.1, ImageNet ResNet18 0.005)",
    )
    rank_source: Literal["log_prob", "prob"] = Field(
        default="log_prob",
        description="the student's share of the rank score: log_prob, log p_k / (1 - log p_y), as the official code "
        "computes it; prob, p_k / (1 - p_y)",
    )
    student_layers: list[str] | None = Field(
        default=None,
        description="the one layer whose globally pooled output feeds the weak head; default the second-to-last stage",
    )


@register
class USKD(Term):
    """USKD, teacher-free. Example (the official CIFAR-100 ResNet18 config):
    `loss: {ce: 1.0, terms: {uskd: {alpha: 0.1, beta: 0.1, mu: 0.1}}}`, with no teachers."""

    name = "uskd"
    Options = USKDOptions
    needs_teacher = False
    default_student_layers = "penultimate"

    def __init__(self, opts, student, teachers):
        super().__init__(opts, student, teachers)
        if len(self.student_layers) != 1:
            raise ConfigError(
                f"loss.terms.uskd.student_layers: one layer feeds the weak head, got {self.student_layers}"
            )
        self.head: nn.Linear | None = None

    def pooled(self, out: Outputs) -> Tensor:
        f = out.feats[self.student_layers[0]]
        return f.flatten(2).mean(2) if f.dim() > 2 else f  # the official neck: global average pooling

    def build(self, probe: Outputs) -> None:
        # PyTorch's default Linear init, as the official nn.Linear(channel, num_classes)
        self.head = nn.Linear(self.pooled(probe).shape[1], probe.logits.shape[1]).to(probe.logits.device)

    def forward(self, out: Outputs) -> Tensor:
        if self.head is None:
            raise LayerError("uskd: the weak head is built from a probe batch; call Distiller.build(x, y) first")
        o = self.opts
        weak = self.head(self.pooled(out))
        return uskd(out.logits, weak, out.targets, o.alpha, o.beta, o.mu, o.rank_source)
