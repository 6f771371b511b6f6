"""Class Attention Transfer KD (CAT-KD: Guo, Yan, Li, Lin, "Class Attention Transfer Based Knowledge Distillation",
CVPR 2023, arXiv 2304.12777).

A CNN's class activation maps (CAMs: the classifier applied at every position of the last feature map, before the
global pooling) show where the network finds each class. CAT-KD transfers them: both maps are average-pooled to a
small r x r grid, optionally L2-normalised per class map, and matched by a mean squared error; there is no logit
KD term. As coded in the official repository `GzyAftermath/CAT-KD`: the loss in `mdistiller/distillers/CAT_KD.py`
(``CAT_loss``); both networks rebuilt as "CAM networks" in `tools/train.py` (the ``if_test`` block) and the
``*_test`` model classes (e.g. ``ResNet_test`` in `mdistiller/models/cifar/resnet.py`): the classifier is a 1x1
conv without bias before the pooling, the teacher's holding its fc weight, its fc bias dropped.

In kdlab the maps come from `kdlab.losses.class_maps.class_maps` on the networks' own classifiers (no conversion:
by linearity, a bias-free 1x1 conv and then the pooling is the pooling and then a bias-free Linear). The teacher's
maps leave its bias out (``teacher_bias``). The official student has no bias at all: build it with the model option
``classifier_bias: false`` (`kdlab.models.create`); a student that has one is refused unless ``student_bias`` says
what to do with it.
"""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from kdlab.errors import ConfigError, LayerError
from kdlab.losses.base import Outputs, Term, TermOptions, register
from kdlab.losses.checks import as_float, float_math
from kdlab.losses.class_maps import class_maps, classifier

NORMALIZE_EPS = 1e-12
"""F.normalize's default eps, as the official ``_Normalize``."""


@float_math
def cat_loss(student_cams: Tensor, teacher_cams: Tensor, resolution: int = 2, normalize: bool = False) -> Tensor:
    r"""The official ``CAT_loss``: MSE between the class activation maps pooled to ``resolution`` x ``resolution``.

    .. math::
        \tilde A = \mathrm{AdaptiveAvgPool}_{r \times r}(A),\qquad
        \tilde A \leftarrow \tilde A / \max(\|\tilde A_{nk}\|_2, 10^{-12})\ \text{(normalize: per class map)}

        L_\mathrm{CAT} = \frac{1}{N K r^2} \sum_{n,k,i,j} \big(\tilde A^s_{nkij} - \tilde A^t_{nkij}\big)^2

    ``A``: (N, K, H, W) maps (:func:`kdlab.losses.class_maps.class_maps`); student and teacher may differ in H, W.
    The teacher side is not detached (the teacher runs without grad).
    """
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
        raise ConfigError(f"cat_kd: resolution must be an integer >= 1, got {resolution!r}")
    for what, t in (("student", student_cams), ("teacher", teacher_cams)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            raise LayerError(f"cat_kd: expected {what} class maps (N, K, H, W), got {getattr(t, 'shape', t)}")
    if student_cams.shape[:2] != teacher_cams.shape[:2]:
        raise LayerError(
            f"cat_kd: class map shapes differ in (N, K): student {tuple(student_cams.shape)} vs teacher "
            f"{tuple(teacher_cams.shape)}; both networks must predict the same classes"
        )
    s, t = as_float(student_cams, teacher_cams)
    s, t = F.adaptive_avg_pool2d(s, resolution), F.adaptive_avg_pool2d(t, resolution)
    if normalize:
        s, t = F.normalize(s, dim=(2, 3), eps=NORMALIZE_EPS), F.normalize(t, dim=(2, 3), eps=NORMALIZE_EPS)
    return F.mse_loss(s, t)


class CATKDOptions(TermOptions):
    weight: float = Field(
        default=15.0,
        ge=0,
        description="beta, multiplies L_CAT (official CAT_loss_weight: 15 for resnet32x4->resnet8x4, 0.7 to 600 by "
        "pair; the README: tune it so that L_CAT is about 1-50 after the first epoch)",
    )
    resolution: int = Field(
        default=2,
        ge=1,
        description="r, the maps are average-pooled to r x r (official CAM_RESOLUTION: 2, 4 for "
        "the ShuffleNet students)",
    )
    normalize: bool = Field(
        default=False,
        description="L2-normalise each pooled class map first (official IF_NORMALIZE: false for the same-family "
        "pairs, true for the cross-family ones)",
    )
    teacher_bias: bool = Field(
        default=False, description="the teacher's maps include its classifier bias (official: dropped, false)"
    )
    student_bias: Literal["refuse", "drop", "keep"] = Field(
        default="refuse",
        description="a student whose classifier has a bias: refuse (the official student is a CAM network without "
        "one: build it with student kwargs classifier_bias: false), drop it from the maps (it trains by CE only), "
        "or keep it in the maps",
    )
    teacher: int = Field(default=0, ge=0, description="which teacher (index in 'teachers')")
    student_layers: list[str] | None = Field(
        default=None, description="the one map the student's CAMs come from; default the global pooling's input"
    )
    teacher_layers: list[str] | None = Field(default=None, description="as student_layers, for the teacher")
    student_classifier: str | None = Field(
        default=None,
        description="the student's final nn.Linear; default found by kdlab's rule (kdlab.losses.class_maps)",
    )
    teacher_classifier: str | None = Field(default=None, description="as student_classifier, for the teacher")


@register
class CATKD(Term):
    """CAT-KD. Example (official CIFAR-100 resnet32x4 -> resnet8x4): student kwargs `classifier_bias: false`,
    `loss: {ce: 1.0, terms: {cat_kd: {weight: 15, resolution: 2, normalize: false}}}`."""

    name = "cat_kd"
    Options = CATKDOptions
    reads_teacher_features = True
    default_student_layers = "pre_pool"
    default_teacher_layers = "pre_pool"

    def __init__(self, opts, student, teachers):
        super().__init__(opts, student, teachers)
        if len(self.student_layers) != 1 or any(len(t) != 1 for t in self.teacher_layers):
            raise ConfigError(
                f"loss.terms.{self.name}: the class maps come from one map per network, got student_layers "
                f"{self.student_layers} and teacher_layers {self.teacher_layers[opts.teacher]}"
            )
        prefix = f"loss.terms.{self.name}."
        s_fc = classifier(student, opts.student_classifier, "student", prefix + "student_classifier")
        t_fc = classifier(
            teachers[opts.teacher], opts.teacher_classifier, f"teacher {opts.teacher}", prefix + "teacher_classifier"
        )
        if s_fc.bias is not None and opts.student_bias == "refuse":
            raise ConfigError(
                f"{prefix}student_bias: the student's classifier has a bias, and CAT-KD's student is a CAM network "
                "without one; build it with the model option classifier_bias: false (student: {kwargs: "
                "{classifier_bias: false}}), or set student_bias: drop or keep"
            )
        # a tuple, outside the module tree: they are the networks' own layers, saved and trained with them
        self._classifiers = (s_fc, t_fc)

    def forward(self, out: Outputs) -> Tensor:
        o = self.opts
        fs, ft = next(self.layer_pairs(out, o.teacher))
        s_fc, t_fc = self._classifiers
        cams_s = class_maps(s_fc, fs, bias=o.student_bias == "keep")
        cams_t = class_maps(t_fc, ft, bias=o.teacher_bias)
        return cat_loss(cams_s, cams_t, o.resolution, o.normalize)
