"""Normalized KD (NKD: Yang, Zeng, Yuan, Li, "From Knowledge Distillation to Self-Knowledge Distillation: A Unified
Approach with Normalized Loss and Customized Soft Labels", ICCV 2023, arXiv 2303.13005).

KD's loss splits into a target part and a non-target part whose sum is tied to the teacher's target probability;
NKD normalises the non-target part (a softmax over the K-1 non-target logits only) so that its weight no longer
shrinks as the teacher grows confident, and keeps the target part as a cross-entropy weighted by the teacher's
target probability. As coded in the official repository `yzd-v/cls_KD` (`mmcls/models/dis_losses/nkd.py`,
``NKDLoss``; wiring in `mmcls/models/classifiers/distiller.py`): cross-entropy (not KL) on both parts, the target
part at temperature 1 and without ``T^2``, the non-target part at ``T`` with ``gamma * T^2``; both batch means.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from kdlab.errors import ConfigError, LayerError
from kdlab.losses.base import Outputs, Term, TermOptions, register
from kdlab.losses.checks import as_float, check_logits_targets, check_positive, check_same_shape, float_math


def without_target(z: Tensor, targets: Tensor) -> Tensor:
    """``z`` (N, K) without each row's target column: (N, K-1), the other classes in their order.

    A gather, not a boolean mask: the shapes stay static and nothing waits on the device (a mask's selection
    needs the host to learn its size, which breaks a captured graph step)."""
    j = torch.arange(z.shape[1] - 1, device=z.device)
    return z.gather(1, j + (j >= targets[:, None]).long())


@float_math
def nkd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    targets: Tensor,
    T: float = 3.0,
    gamma: float = 3.5,
    drop_target: bool = True,
) -> Tensor:
    r"""NKD's distillation loss, ``L_target + L_non``, as the official ``NKDLoss.forward`` computes it.

    .. math::
        L_\mathrm{target} = -\frac1N \sum_n \mathrm{sg}\big[p^t_{n,y_n}\big] \log p^s_{n,y_n},
        \qquad p = \mathrm{softmax}(z)

        L_\mathrm{non} = -\gamma T^2 \frac1N \sum_n \sum_{k \ne y_n}
            \mathrm{softmax}(\tilde z^t_n / T)_k \log \mathrm{softmax}(\tilde z^s_n / T)_k

    with :math:`\tilde z` the logits without the target column (a softmax over the K-1 other classes: the
    "normalised" non-target distribution). sg: the teacher's target probability is detached, as in the code;
    the teacher side of ``L_non`` is not (callers run the teacher without grad). Cross-entropy, not KL: the
    teacher-entropy constant is kept, so the value is not 0 when student equals teacher.

    ``drop_target=False`` keeps the target column in the second part (a softmax over all K classes): the copy of
    this loss in the SDD repository (`shicaiwei123/SDD-CVPR2024`, `mdistiller/distillers/nkd.py`) builds its mask
    with ``scatter_(1, label, 1)``, which removes nothing, and its CIFAR-100 NKD numbers come from that variant.
    """
    T = check_positive("nkd", "temperature T", T)
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not gamma >= 0:
        raise ConfigError(f"nkd: gamma must be a number >= 0, got {gamma!r}")
    check_same_shape("nkd", student_logits, teacher_logits, "logit", "student and teacher must share the classes")
    check_logits_targets("nkd", student_logits, targets)
    if student_logits.shape[1] < 2:
        raise LayerError(f"nkd: needs at least 2 classes, got logits {tuple(student_logits.shape)}")
    zs, zt = as_float(student_logits, teacher_logits)
    idx = targets[:, None]
    log_ps_y = torch.log_softmax(zs, dim=1).gather(1, idx)  # (N, 1)
    pt_y = torch.softmax(zt, dim=1).gather(1, idx).detach()  # (N, 1)
    loss_target = -(pt_y * log_ps_y).mean()
    if drop_target:
        zs, zt = without_target(zs, targets), without_target(zt, targets)  # (N, K-1)
    log_qs = torch.log_softmax(zs / T, dim=1)
    qt = torch.softmax(zt / T, dim=1)
    loss_non = -gamma * (T * T) * (qt * log_qs).sum(1).mean()
    return loss_target + loss_non


class NKDOptions(TermOptions):
    weight: float = Field(
        default=1.0, ge=0, description="multiplies L_target + L_non (the official code: CE 1 and NKD 1, no weight)"
    )
    T: float = Field(
        default=3.0,
        gt=0,
        description="temperature of the non-target part (official: 3 for its CIFAR-100 ResNet34->ResNet18 config, "
        "1 on ImageNet); the target part is always at temperature 1",
    )
    gamma: float = Field(
        default=3.5,
        ge=0,
        description="weight of the non-target part, times T^2 (official: CIFAR-100 3.5, ImageNet 1.5)",
    )
    drop_target: bool = Field(
        default=True,
        description="false: the second part keeps the target column (softmax over all K classes), as the SDD "
        "repository's copy of NKD does; its CIFAR-100 NKD numbers come from that variant",
    )
    teacher: int = Field(default=0, ge=0, description="which teacher (index in 'teachers')")


@register
class NKD(Term):
    """Normalized KD. Example (the official CIFAR-100 config): `loss: {ce: 1.0, terms: {nkd: {T: 3, gamma: 3.5}}}`."""

    name = "nkd"
    Options = NKDOptions

    def forward(self, out: Outputs) -> Tensor:
        o = self.opts
        return nkd(
            out.logits, out.teacher_logits[o.teacher], out.targets, T=o.T, gamma=o.gamma, drop_target=o.drop_target
        )
