"""Transformed teacher matching (TTM) and its weighted form (WTTM): Zheng & Yang, "Knowledge Distillation Based on
Transformed Teacher Matching", ICLR 2024 (arXiv 2402.11148).

KD with a temperature on both sides equals matching the teacher's power-transformed distribution plus a Renyi-entropy
term on the student; TTM keeps only the first part: the student at temperature 1 matches the teacher's probabilities
raised to the power ``gamma`` and renormalised (teacher temperature 1/gamma). WTTM weighs each sample's KL by the
normaliser of that transform, ``sum_k p_t^gamma``, which is larger for an uncertain teacher. As coded in the official
repository `zkxufo/TTM` (`distiller_zoo/ttm.py`, `distiller_zoo/wttm.py`; weights in `train_student.py` /
`helper/loops.py`: ``opt.gamma * CE + opt.alpha * added + opt.beta * main``, the flags ``-r``, ``-a``, ``-b``, with
TTM or WTTM either the main loss or the added one): no ``T^2`` factor, KL summed over classes and averaged
over the batch.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from kdlab.errors import LayerError
from kdlab.losses.base import Outputs, Term, TermOptions, register
from kdlab.losses.checks import as_float, check_positive, check_same_shape, float_math, shape_of


@float_math
def ttm(student_logits: Tensor, teacher_logits: Tensor, gamma: float = 0.1, weighted: bool = False) -> Tensor:
    r"""TTM, or WTTM with ``weighted=True``, as the official ``TTM.forward`` / ``WTTM.forward`` compute them.

    .. math::
        q_n = \frac{(p^t_n)^\gamma}{\sum_k (p^t_{nk})^\gamma} = \mathrm{softmax}(\gamma z^t_n),\qquad
        \mathrm{KL}_n = \sum_k q_{nk}\,(\log q_{nk} - \log \mathrm{softmax}(z^s_n)_k)

        \mathrm{TTM} = \frac1N \sum_n \mathrm{KL}_n,\qquad
        \mathrm{WTTM} = \frac1N \sum_n \Big(\sum_k (p^t_{nk})^\gamma\Big)\,\mathrm{KL}_n

    with p^t = softmax(z^t). The transform is computed in log space (``gamma * log_softmax(z_t)``), where the
    official code raises float32 probabilities to the power: the two differ only where ``softmax(z_t)`` underflows
    to 0 (a logit gap above about 100), which the official code then drops. Nothing is detached: the WTTM weight
    depends on the teacher only, so it does not change the student's gradient.
    """
    gamma = check_positive("ttm", "the power-transform exponent gamma", gamma)
    check_same_shape("ttm", student_logits, teacher_logits, "logit", "student and teacher must share the classes")
    if student_logits.dim() != 2:
        raise LayerError(f"ttm: expected logits of shape (N, K), got student {shape_of(student_logits)}")
    zs, zt = as_float(student_logits, teacher_logits)
    scaled = gamma * torch.log_softmax(zt, dim=1)  # log p_t^gamma, (N, K)
    log_norm = torch.logsumexp(scaled, dim=1, keepdim=True)  # log sum_k p_t^gamma, (N, 1)
    log_q = scaled - log_norm
    kl = (log_q.exp() * (log_q - torch.log_softmax(zs, dim=1))).sum(1)  # (N,)
    if weighted:
        kl = log_norm.squeeze(1).exp() * kl
    return kl.mean()


class TTMOptions(TermOptions):
    weight: float = Field(
        default=45.0,
        ge=0,
        description="multiplies the batch-mean KL (the official -b; its README example, vgg13->vgg8: 45, with CE -r 1)",
    )
    gamma: float = Field(
        default=0.1,
        gt=0,
        description="the exponent of the teacher's power transform (--ttm_l; teacher temperature 1/gamma); "
        "the README example: 0.1",
    )
    teacher: int = Field(default=0, ge=0, description="which teacher (index in 'teachers')")


class WTTMOptions(TTMOptions):
    weight: float = Field(
        default=4.0,
        ge=0,
        description="multiplies the batch mean of the weighted KL (the README's only WTTM value: -a 4, beside CRD)",
    )
    gamma: float = Field(
        default=0.2, gt=0, description="the exponent of the teacher's power transform (the README's WTTM value: 0.2)"
    )


@register
class TTM(Term):
    """TTM: the student at temperature 1 matches the power-transformed teacher. Example (the official README,
    vgg13 -> vgg8): `loss: {ce: 1.0, terms: {ttm: {weight: 45, gamma: 0.1}}}`."""

    name = "ttm"
    Options = TTMOptions
    weighted = False

    def forward(self, out: Outputs) -> Tensor:
        o = self.opts
        return ttm(out.logits, out.teacher_logits[o.teacher], gamma=o.gamma, weighted=self.weighted)


@register
class WTTM(TTM):
    """WTTM: TTM with each sample's KL weighted by sum_k p_t^gamma. Example (the README's WTTM values):
    `loss: {ce: 1.0, terms: {wttm: {weight: 4, gamma: 0.2}}}`."""

    name = "wttm"
    Options = WTTMOptions
    weighted = True
