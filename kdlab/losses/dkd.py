"""Decoupled KD (Zhao, Cui, Song, Qiu, Liang, "Decoupled Knowledge Distillation", CVPR 2022).

KD's KL splits into a target-class part (TCKD: the binary distribution [p_target, 1 - p_target]) and a
non-target part (NCKD: the distribution over the other classes, renormalised); DKD weights them
independently, alpha * TCKD + beta * NCKD, both T^2-scaled batch means. The loss ramps up linearly over
the first `warmup_epochs` epochs, as mdistiller's DKD does (its factor min(epoch / warmup, 1) with the
1-based epoch): the term reads the training progress the trainer gives it.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from kdlab.errors import ConfigError, LayerError
from kdlab.losses.base import Outputs, Term, TermOptions, register
from kdlab.losses.checks import as_float, check_logits_targets, check_positive, check_same_shape, kl_rows


def dkd_per_sample(
    student_logits: Tensor,
    teacher_logits: Tensor,
    targets: Tensor,
    alpha: float = 1.0,
    beta: float = 8.0,
    T: float = 4.0,
) -> Tensor:
    r"""``alpha * TCKD_n + beta * NCKD_n`` of each row, (N,): :func:`dkd` before its batch mean.

    .. math::
        b = [p_y, 1 - p_y],\quad \hat p_k = \frac{e^{z_k/T}}{\sum_{j\ne y} e^{z_j/T}}\ (k \ne y)

        \mathrm{TCKD}_n = T^2\,\mathrm{KL}(b^t_n \| b^s_n),\qquad
        \mathrm{NCKD}_n = T^2\,\mathrm{KL}(\hat p^t_n \| \hat p^s_n)

    with p = softmax(z / T). The non-target distribution is computed exactly (the target class removed),
    where mdistiller subtracts 1000 from the target logit; the two agree to float precision. SDD's SD-DKD
    weights these rows per region (`kdlab.losses.sdd`).
    """
    T = T if isinstance(T, Tensor) else check_positive("dkd", "temperature T", T)  # a tensor: learned (CTKD)
    for what, value in (("alpha", alpha), ("beta", beta)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
            raise ConfigError(f"dkd: {what} must be a number >= 0, got {value!r}")
    check_same_shape("dkd", student_logits, teacher_logits, "logit", "student and teacher must share the classes")
    check_logits_targets("dkd", student_logits, targets)
    if student_logits.shape[1] < 2:
        raise LayerError(f"dkd: needs at least 2 classes, got logits {tuple(student_logits.shape)}")
    zs, zt = as_float(student_logits, teacher_logits)
    target = torch.nn.functional.one_hot(targets, zs.shape[1]).bool()
    ps, pt = torch.softmax(zs / T, dim=1), torch.softmax(zt / T, dim=1)
    bs = torch.stack([ps[target], (ps.masked_fill(target, 0)).sum(1)], dim=1)
    bt = torch.stack([pt[target], (pt.masked_fill(target, 0)).sum(1)], dim=1)
    tckd = kl_rows(bt.clamp_min(1e-30).log(), bs.clamp_min(1e-30).log())
    # the target class removed: log-softmax over the other K-1 logits
    log_ns = torch.log_softmax(zs.masked_fill(target, float("-inf")) / T, dim=1).masked_fill(target, 0.0)
    log_nt = torch.log_softmax(zt.masked_fill(target, float("-inf")) / T, dim=1).masked_fill(target, 0.0)
    nckd = torch.where(target, torch.zeros_like(log_nt), log_nt.exp() * (log_nt - log_ns)).sum(1)
    return (T * T) * (alpha * tckd + beta * nckd)


def dkd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    targets: Tensor,
    alpha: float = 1.0,
    beta: float = 8.0,
    T: float = 4.0,
) -> Tensor:
    r"""``alpha * TCKD + beta * NCKD``, each ``T^2 * (1/N) sum_n KL(teacher || student)``: the batch mean of
    :func:`dkd_per_sample`, whose docstring has the equations."""
    return dkd_per_sample(student_logits, teacher_logits, targets, alpha, beta, T).mean()


def warmup_factor(progress: Tensor | float, warmup_epochs: float) -> Tensor | float:
    """min((completed epochs + 1) / warmup, 1): mdistiller's factor, whose epoch counter starts at 1."""
    if warmup_epochs <= 0:
        return 1.0
    if isinstance(progress, Tensor):
        return ((torch.floor(progress) + 1) / warmup_epochs).clamp(max=1.0)
    return min((int(progress) + 1) / warmup_epochs, 1.0)


def ramp(term: str, value: Tensor, progress: Tensor | float | None, warmup_epochs: float) -> Tensor:
    """`value` scaled by the warm-up factor; a term with a warm-up called without the progress is an error."""
    if warmup_epochs <= 0:
        return value
    if progress is None:
        raise LayerError(
            f"{term}: its warm-up needs the training progress, which kdlab's trainer passes; "
            "call the Distiller with progress=<epochs completed> or set warmup_epochs: 0"
        )
    return value * warmup_factor(progress, warmup_epochs)


class DKDOptions(TermOptions):
    weight: float = Field(
        default=1.0, ge=0, description="multiplies alpha * TCKD + beta * NCKD (mdistiller: CE 1, DKD 1)"
    )
    alpha: float = Field(default=1.0, ge=0, description="weight of the target-class part (TCKD)")
    beta: float = Field(
        default=8.0,
        ge=0,
        description="weight of the non-target part (NCKD); mdistiller uses 8 by default, "
        "2 for resnet56->resnet20 and resnet110->resnet32, 6 for vgg13->vgg8 and vgg13->MobileNetV2",
    )
    T: float = Field(default=4.0, gt=0)
    warmup_epochs: float = Field(
        default=20.0, ge=0, description="linear ramp of the whole term over the first epochs (0: none)"
    )
    teacher: int = Field(default=0, ge=0, description="which teacher (index in 'teachers')")


@register
class DKD(Term):
    """Decoupled KD. Example (mdistiller's CIFAR-100 setting): `loss: {ce: 1.0, terms: {dkd: {beta: 8}}}`."""

    name = "dkd"
    Options = DKDOptions
    needs_progress = True

    def forward(self, out: Outputs) -> Tensor:
        return self.value_at(out, self.opts.T)

    def value_at(self, out: Outputs, T: Tensor | float) -> Tensor:
        """The term at temperature ``T`` (a float, or a learned 0-dim tensor: the ctkd term)."""
        value = dkd(out.logits, out.teacher_logits[self.opts.teacher], out.targets, self.opts.alpha, self.opts.beta, T)
        return ramp(self.name, value, out.progress, self.opts.warmup_epochs)
