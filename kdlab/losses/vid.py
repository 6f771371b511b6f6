"""Variational information distillation (Ahn et al., CVPR 2019): a Gaussian likelihood of the teacher's maps."""

from __future__ import annotations

import math

import torch
from pydantic import Field, model_validator
from torch import nn

from kdlab.losses import feature_functional as FF
from kdlab.losses.base import Outputs, Term, TermOptions, register
from kdlab.losses.heads import vid_regressor


class VIDOptions(TermOptions):
    weight: float = Field(
        default=1.0, ge=0, description="for the mean negative log-likelihood per element (RepDistiller's 1)"
    )
    init_var: float = Field(
        default=5.0, gt=0, description="initial variance of every channel (RepDistiller's init_pred_var)"
    )
    eps: float = Field(default=1e-5, gt=0, description="variance floor: sigma^2 = softplus(alpha) + eps")
    mid_channels: int | None = Field(
        default=None,
        ge=1,
        description="width of the regressor's hidden 1x1 convs; null: the teacher's channels (RepDistiller)",
    )
    student_layers: list[str] | None = None
    teacher_layers: list[str] | None = None
    pool: bool = Field(
        default=True, description="average-pool the larger map when spatial sizes differ (as RepDistiller)"
    )

    @model_validator(mode="after")
    def _var_above_eps(self):
        if self.init_var <= self.eps:
            raise ValueError(f"init_var ({self.init_var}) must exceed eps ({self.eps})")
        return self


@register
class VID(Term):
    """Sum over the tapped layer pairs of VID's Gaussian NLL; one regressor and one variance vector per pair."""

    name = "vid"
    Options = VIDOptions
    reads_teacher_features = True
    default_student_layers = "all"
    default_teacher_layers = "all"

    def build(self, probe: Outputs) -> None:
        self.regressors = nn.ModuleList()
        self.log_scales = nn.ParameterList()
        # softplus(alpha) + eps = init_var at the start
        alpha = math.log(math.expm1(self.opts.init_var - self.opts.eps))
        for s, t in self.layer_pairs(probe):
            cs, ct = s.shape[1], t.shape[1]
            self.regressors.append(vid_regressor(cs, self.opts.mid_channels or ct, ct))
            self.log_scales.append(nn.Parameter(torch.full((ct,), alpha)))

    def forward(self, out: Outputs) -> torch.Tensor:
        total = out.logits.new_zeros((), dtype=torch.float32)
        for i, (fs, ft) in enumerate(self.layer_pairs(out, pool=self.opts.pool)):
            total = total + FF.vid(self.regressors[i](fs), ft, self.log_scales[i], eps=self.opts.eps)
        return total
