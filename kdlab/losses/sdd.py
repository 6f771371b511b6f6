"""Scale Decoupled Distillation (SDD: Wei, Luo, Luo, "Scale Decoupled Distillation", CVPR 2024, arXiv 2403.13512).

The logits of the whole image mix the knowledge of every region of it. SDD also distils the logits of local
regions: the last feature map is average-pooled over a spatial pyramid (1x1, 2x2, 4x4 grids: 1 + 4 + 16 = 21
regions) and each region goes through the network's own classifier (`kdlab.losses.class_maps.region_logits`),
for the student and the teacher. Every region pair is a KD (SD-KD) or DKD (SD-DKD) term; a local region whose
teacher prediction is right where the global one is wrong, or wrong where it is right (a "complementary" region),
counts twice. As coded in the official repository `shicaiwei123/SDD-CVPR2024`: `mdistiller/distillers/KD.py`
(``sdd_kd_loss``, ``SDD_KD``), `mdistiller/distillers/SDD_DKD.py` (``multi_dkd``, ``SDD_DKD``), the region
pooling ``SPP`` in `mdistiller/models/cifar/utils.py`.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from kdlab.errors import ConfigError, LayerError
from kdlab.losses.base import Outputs, Term, TermOptions, register
from kdlab.losses.checks import as_float, check_labels, check_positive, float_math, kl_rows
from kdlab.losses.class_maps import check_levels, classifier, region_logits
from kdlab.losses.dkd import dkd_per_sample, ramp

COMPLEMENTARY_WEIGHT = 2.0
"""The weight of a complementary region in the official code (hard-coded there; the paper's beta)."""


def _rows(student_regions: Tensor, teacher_regions: Tensor, targets: Tensor, name: str):
    """(N, K, R) region logits -> (R*N, K) rows, region-major (rows 0..N-1: the global region), as the official
    code's ``permute(2, 0, 1)`` and reshape; with the targets repeated per region."""
    for what, t in (("student", student_regions), ("teacher", teacher_regions)):
        if not isinstance(t, Tensor) or t.dim() != 3:
            raise LayerError(f"{name}: expected {what} region logits of shape (N, K, R), got {getattr(t, 'shape', t)}")
    if student_regions.shape != teacher_regions.shape:
        raise LayerError(
            f"{name}: region logit shapes differ: student {tuple(student_regions.shape)} vs teacher "
            f"{tuple(teacher_regions.shape)}; both need the same classes and the same levels"
        )
    n, k, r = student_regions.shape
    if targets.dim() != 1 or targets.shape[0] != n:
        raise LayerError(f"{name}: expected targets (N,) for region logits {tuple(student_regions.shape)}")
    check_labels(name, targets, k)
    zs, zt = as_float(student_regions, teacher_regions)
    return zs.permute(2, 0, 1).reshape(r * n, k), zt.permute(2, 0, 1).reshape(r * n, k), targets.repeat(r), n, r


def region_weights(teacher_rows: Tensor, targets_r: Tensor, n: int, complementary: float) -> Tensor:
    """(R*N,) weights: ``complementary`` where the teacher's prediction on a region is right and its global one
    (rows 0..N-1) wrong, or the other way round; 1 elsewhere, the global region included (it agrees with itself)."""
    correct = (teacher_rows.argmax(1) == targets_r).view(-1, n)  # (R, N)
    one = torch.ones((), dtype=teacher_rows.dtype, device=teacher_rows.device)
    return torch.where(correct != correct[:1], one * complementary, one).flatten()


@float_math
def sdd_kd(
    student_regions: Tensor,
    teacher_regions: Tensor,
    targets: Tensor,
    T: float = 4.0,
    complementary: float = COMPLEMENTARY_WEIGHT,
) -> Tensor:
    r"""SD-KD, the official ``sdd_kd_loss``: a weighted mean over regions and samples of the per-region KD.

    .. math::
        L = \frac{1}{RN} \sum_{r,n} w_{rn}\, T^2\, \mathrm{KL}\big(\mathrm{softmax}(P^t_{n,:,r}/T) \,\|\,
            \mathrm{softmax}(P^s_{n,:,r}/T)\big)

    ``P``: region logits (N, K, R), region 0 the global one (:func:`kdlab.losses.class_maps.region_logits`).
    :math:`w_{rn}` = ``complementary`` when the teacher's argmax on region r is right and on region 0 wrong, or
    wrong and right; else 1 (:func:`region_weights`). The official code sets NaN entries of the element-wise KL to
    0: they come from teacher probabilities that underflow to 0, whose limit 0·log 0 is 0, which is what this
    computes. The weights carry no gradient; the teacher side is not detached (the teacher runs without grad).
    """
    T = check_positive("sdd", "temperature T", T)
    complementary = check_positive("sdd", "complementary weight", complementary)
    zs, zt, y, n, _ = _rows(student_regions, teacher_regions, targets, "sdd")
    loss = (T * T) * kl_rows(torch.log_softmax(zt / T, dim=1), torch.log_softmax(zs / T, dim=1))
    return (region_weights(zt, y, n, complementary) * loss).mean()


@float_math
def sdd_dkd(
    student_regions: Tensor,
    teacher_regions: Tensor,
    targets: Tensor,
    alpha: float = 1.0,
    beta: float = 8.0,
    T: float = 4.0,
    complementary: float = COMPLEMENTARY_WEIGHT,
) -> Tensor:
    r"""SD-DKD, the official ``multi_dkd``: as :func:`sdd_kd` with DKD's per-row value in place of KD's,

    .. math:: L = \frac{1}{RN} \sum_{r,n} w_{rn}\, \big(\alpha\,\mathrm{TCKD}_{rn} + \beta\,\mathrm{NCKD}_{rn}\big)

    (:func:`kdlab.losses.dkd.dkd_per_sample`, each row with its sample's label). The warm-up is the term's.
    """
    complementary = check_positive("sdd_dkd", "complementary weight", complementary)
    zs, zt, y, n, _ = _rows(student_regions, teacher_regions, targets, "sdd_dkd")
    if zs.shape[1] < 2:
        raise LayerError(f"sdd_dkd: needs at least 2 classes, got region logits {tuple(student_regions.shape)}")
    return (region_weights(zt, y, n, complementary) * dkd_per_sample(zs, zt, y, alpha, beta, T)).mean()


class SDDOptions(TermOptions):
    weight: float = Field(default=0.9, ge=0, description="multiplies L_SD (the official KD_WEIGHT 0.9, with CE 0.1)")
    T: float = Field(default=4.0, gt=0, description="temperature of every region's KD (official: 4)")
    levels: list[int] = Field(
        default=[1, 2, 4],
        description="SPP grid sizes (the official --M): [1, 2, 4] gives 21 regions, [1, 2] 5, [1] plain KD; the "
        "official scripts use [1, 2] for resnet32x4->resnet8x4 and vgg13->vgg8, [1, 2, 4] for the other pairs",
    )
    complementary: float = Field(
        default=COMPLEMENTARY_WEIGHT,
        gt=0,
        description="weight of a region whose teacher prediction disagrees in correctness with the global one "
        "(hard-coded 2 in the official code)",
    )
    teacher: int = Field(default=0, ge=0, description="which teacher (index in 'teachers')")
    student_layers: list[str] | None = Field(
        default=None, description="the one map the regions are pooled from; default the global pooling's input"
    )
    teacher_layers: list[str] | None = Field(default=None, description="as student_layers, for the teacher")
    student_classifier: str | None = Field(
        default=None,
        description="the student's final nn.Linear, applied to every region; default found by kdlab's rule "
        "(kdlab.losses.class_maps)",
    )
    teacher_classifier: str | None = Field(default=None, description="as student_classifier, for the teacher")


class SDDDKDOptions(SDDOptions):
    weight: float = Field(default=1.0, ge=0, description="multiplies L_SD (the official SD-DKD: CE 1, no weight)")
    alpha: float = Field(default=1.0, ge=0, description="DKD's target-class weight (official: 1)")
    beta: float = Field(default=8.0, ge=0, description="DKD's non-target weight (official: 8)")
    warmup_epochs: float = Field(
        default=20.0, ge=0, description="linear ramp of the term over the first epochs (the official --warmup 20)"
    )


@register
class SDD(Term):
    """SD-KD. Example (official CIFAR-100, heterogeneous pairs):
    `loss: {ce: 0.1, terms: {sdd: {weight: 0.9, T: 4, levels: [1, 2, 4]}}}`."""

    name = "sdd"
    Options = SDDOptions
    reads_teacher_features = True
    default_student_layers = "pre_pool"
    default_teacher_layers = "pre_pool"

    def __init__(self, opts, student, teachers):
        super().__init__(opts, student, teachers)
        self.levels = check_levels(f"loss.terms.{self.name}.levels", opts.levels)
        if len(self.student_layers) != 1 or any(len(t) != 1 for t in self.teacher_layers):
            raise ConfigError(
                f"loss.terms.{self.name}: the regions come from one map per network, got student_layers "
                f"{self.student_layers} and teacher_layers {self.teacher_layers[opts.teacher]}"
            )
        prefix = f"loss.terms.{self.name}."
        s_fc = classifier(student, opts.student_classifier, "student", prefix + "student_classifier")
        t_fc = classifier(
            teachers[opts.teacher], opts.teacher_classifier, f"teacher {opts.teacher}", prefix + "teacher_classifier"
        )
        # a tuple, outside the module tree: they are the networks' own layers, saved and trained with them
        self._classifiers = (s_fc, t_fc)

    def regions(self, out: Outputs) -> tuple[Tensor, Tensor]:
        """(student, teacher) region logits, (N, K, R) each."""
        fs, ft = next(self.layer_pairs(out, self.opts.teacher))
        s_fc, t_fc = self._classifiers
        return region_logits(s_fc, fs, self.levels), region_logits(t_fc, ft, self.levels)

    def forward(self, out: Outputs) -> Tensor:
        s, t = self.regions(out)
        return sdd_kd(s, t, out.targets, self.opts.T, self.opts.complementary)


@register
class SDDDKD(SDD):
    """SD-DKD. Example (official CIFAR-100, heterogeneous pairs):
    `loss: {ce: 1.0, terms: {sdd_dkd: {alpha: 1, beta: 8, levels: [1, 2, 4]}}}`."""

    name = "sdd_dkd"
    Options = SDDDKDOptions
    needs_progress = True

    def forward(self, out: Outputs) -> Tensor:
        o = self.opts
        s, t = self.regions(out)
        value = sdd_dkd(s, t, out.targets, o.alpha, o.beta, o.T, o.complementary)
        return ramp(self.name, value, out.progress, o.warmup_epochs)
