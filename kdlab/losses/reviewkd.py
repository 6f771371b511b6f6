"""Knowledge review (Chen, Liu, Zhao, Jia, "Distilling Knowledge via Knowledge Review", CVPR 2021);
reference code: mdistiller's `ReviewKD` (the CIFAR-100 setting) and the authors' repository.

The student's stage outputs plus its pooled embedding are fused from the deepest to the shallowest by
attention-based fusion (ABF) modules: each ABF projects its stage to a middle width, blends in the
fused result of the deeper stage with two learned attention maps, and projects to the teacher's width.
Each fused map is matched to the teacher's pre-activation stage output (and the pooled embedding) by
the hierarchical context loss (HCL): the MSE of the maps plus the MSE of their 4x4, 2x2 and 1x1
average-pooled versions, weighted 1, 1/2, 1/4, 1/8 and normalised. The loss ramps up over the first
epochs like DKD's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as nnf
from pydantic import Field
from torch import Tensor, nn

from kdlab.errors import ConfigError, LayerError
from kdlab.losses.base import Outputs, Term, TermOptions, register
from kdlab.losses.dkd import ramp


def hcl(student_maps: list[Tensor], teacher_maps: list[Tensor]) -> Tensor:
    r"""Hierarchical context loss summed over the map pairs.

    For maps of size h:
    ``(mse(f_s, f_t) + sum_{l in (4, 2, 1), l < h} 2^{-i_l} mse(pool_l f_s, pool_l f_t)) / (1 + sum 2^{-i_l})``
    with i_l = 1, 2, 3 for the levels actually used (mdistiller's ``hcl_loss``), each mse a mean over N*C*l*l.
    """
    if len(student_maps) != len(teacher_maps):
        raise LayerError(f"reviewkd: {len(student_maps)} student maps for {len(teacher_maps)} teacher maps")
    total = student_maps[0].new_zeros((), dtype=torch.float32)
    for fs, ft in zip(student_maps, teacher_maps):
        if fs.shape != ft.shape:
            raise LayerError(
                f"reviewkd: fused student map {tuple(fs.shape)} does not match the teacher's {tuple(ft.shape)}"
            )
        fs, ft = fs.float(), ft.float()
        loss, weight, norm = nnf.mse_loss(fs, ft), 1.0, 1.0
        for level in (4, 2, 1):
            if level >= fs.shape[2]:
                continue
            weight /= 2.0
            loss = loss + weight * nnf.mse_loss(nnf.adaptive_avg_pool2d(fs, level), nnf.adaptive_avg_pool2d(ft, level))
            norm += weight
        total = total + loss / norm
    return total


class ABF(nn.Module):
    """Attention-based fusion: 1x1 conv to the middle width, then (except the deepest) a blend with the deeper
    fused map by two sigmoid attention maps, then a 3x3 conv to the teacher's width."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, mid_channels, 1, bias=False), nn.BatchNorm2d(mid_channels))
        self.conv2 = nn.Sequential(
            nn.Conv2d(mid_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels)
        )
        self.att = nn.Sequential(nn.Conv2d(2 * mid_channels, 2, 1), nn.Sigmoid()) if fuse else None
        for conv in (self.conv1[0], self.conv2[0]):  # the reference code's init
            nn.init.kaiming_uniform_(conv.weight, a=1)

    def forward(self, x: Tensor, deeper: Tensor | None, out_size: int) -> tuple[Tensor, Tensor]:
        """(the map matched to the teacher, the fused middle map handed to the next shallower stage)."""
        x = self.conv1(x)
        if self.att is not None:
            deeper = nnf.interpolate(deeper, size=x.shape[-2:], mode="nearest")
            z = self.att(torch.cat([x, deeper], dim=1))
            x = x * z[:, :1] + deeper * z[:, 1:]
        if x.shape[-1] != out_size:
            x = nnf.interpolate(x, size=(out_size, out_size), mode="nearest")
        return self.conv2(x), x


class ReviewKDOptions(TermOptions):
    weight: float = Field(default=1.0, ge=0, description="mdistiller's CIFAR-100 ReviewKD weight (with CE 1)")
    warmup_epochs: float = Field(
        default=20.0, ge=0, description="linear ramp of the term over the first epochs (0: none)"
    )
    max_mid_channels: int = Field(
        default=512, ge=1, description="the ABFs' middle width: min(this, the student's last width)"
    )
    student_layers: list[str] | None = Field(
        default=None, description="default: every stage's output, then the embedding"
    )
    teacher_layers: list[str] | None = Field(
        default=None, description="default: every stage's pre-activation output, then the embedding"
    )


@register
class ReviewKD(Term):
    """ReviewKD. mdistiller's CIFAR-100 recipe:
    `loss: {ce: 1.0, terms: {reviewkd: {weight: 1.0, warmup_epochs: 20}}}`."""

    name = "reviewkd"
    Options = ReviewKDOptions
    reads_teacher_features = True
    needs_progress = True
    default_student_layers = "all"
    default_teacher_layers = "all:pre"

    def __init__(self, opts, student, teachers):
        # the pooled embedding closes both lists, as the reference appends the pooled feature
        if opts.student_layers is None or opts.teacher_layers is None:
            from kdlab import taps

            opts = (
                opts.model_copy(
                    update={
                        "student_layers": opts.student_layers
                        or taps.default_layers(student, "all", "student") + ["embedding"],
                        "teacher_layers": opts.teacher_layers
                        or [s + ":pre" for s in taps.default_layers(teachers[0], "all", "teacher 0")] + ["embedding"],
                    }
                )
                if teachers
                else opts
            )
        super().__init__(opts, student, teachers)
        if len(teachers) != 1:
            raise ConfigError(f"loss.terms.reviewkd: ReviewKD distils one teacher, got {len(teachers)}")
        self.abfs: nn.ModuleList | None = None

    @staticmethod
    def as_map(f: Tensor) -> Tensor:
        return f[:, :, None, None] if f.dim() == 2 else f

    def build(self, probe: Outputs) -> None:
        s = [self.as_map(probe.feats[k]) for k in self.student_layers]
        t = [self.as_map(probe.teacher_feats[0][k]) for k in self.teacher_layers[0]]
        mid = min(self.opts.max_mid_channels, s[-1].shape[1])
        # built shallow to deep, used deep to shallow; every ABF but the deepest fuses
        abfs = [ABF(fs.shape[1], mid, ft.shape[1], fuse=i < len(s) - 1) for i, (fs, ft) in enumerate(zip(s, t))]
        self.abfs = nn.ModuleList(abfs[::-1])
        self.out_sizes = [ft.shape[-1] for ft in t][::-1]

    def forward(self, out: Outputs) -> Tensor:
        s = [self.as_map(out.feats[k]) for k in self.student_layers][::-1]
        t = [self.as_map(out.teacher_feats[0][k]) for k in self.teacher_layers[0]]
        fused, deeper = [], None
        for x, abf, size in zip(s, self.abfs, self.out_sizes):
            y, deeper = abf(x, deeper, size)
            fused.insert(0, y)
        return ramp(self.name, hcl(fused, t), out.progress, self.opts.warmup_epochs)
