"""Activation boundaries (Heo, Lee, Yun, Choi, AAAI 2019): the student learns where the teacher's neurons fire.

The transfer is an initialisation stage: the student (up to its last tapped layer) and one connector
per layer pair minimise the AB loss on pre-ReLU maps; then the main stage trains on the recipe's
other terms (RepDistiller: cross-entropy alone) without it.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from kdlab.losses import feature_functional as FF
from kdlab.losses.base import Outputs, PreStage, Term, TermOptions, register
from kdlab.losses.heads import conv_regressor

# The official code's scale: layer l of L weighted 2^(l - L + 1) (the deepest 1, halving towards the
# input), and the sum divided by 1000 and multiplied by 3.
AB_SCALE = 3.0 / 1000.0


class ABOptions(TermOptions):
    weight: float = Field(
        default=1.0,
        ge=0,
        description="multiplies the AB loss in the main stage when stages: single "
        "(RepDistiller's -b 1, which its two-stage runs never apply)",
    )
    margin: float = Field(default=1.0, gt=0, description="mu of the squared-hinge loss on pre-ReLU values")
    stages: Literal["two", "single"] = Field(
        default="two",
        description="two: an initialisation stage on the AB loss (student + connectors), "
        "then the main stage without it (paper, official code and RepDistiller); "
        "single: weight * AB added to the main loss throughout",
    )
    init_epochs: int = Field(default=30, ge=1, description="epochs of the initialisation stage (RepDistiller's 30)")
    init_lr: float = Field(
        default=0.05, gt=0, description="learning rate of the initialisation stage (RepDistiller: the student's)"
    )
    student_layers: list[str] | None = None
    teacher_layers: list[str] | None = None


@register
class AB(Term):
    """`3/1000 * sum_l 2^(l-L+1) * AB(connector_l(s_l), t_l)`; defaults to every stage before its ReLU
    (`stageN:pre`)."""

    name = "ab"
    Options = ABOptions
    reads_teacher_features = True
    default_student_layers = "all:pre"
    default_teacher_layers = "all:pre"

    def __init__(self, opts, student, teachers):
        super().__init__(opts, student, teachers)
        self.active_in_main = opts.stages == "single"

    def build(self, probe: Outputs) -> None:
        # RepDistiller's Connector: identity when channels and size already match, else its ConvReg without ReLU
        self.connectors = nn.ModuleList()
        for s, t in self.layer_pairs(probe):
            s_shape, t_shape = tuple(s.shape[1:]), tuple(t.shape[1:])
            self.connectors.append(
                nn.Identity() if s_shape == t_shape else conv_regressor(s_shape, t_shape, relu=False, what="ab")
            )

    def forward(self, out: Outputs) -> torch.Tensor:
        total = out.logits.new_zeros((), dtype=torch.float32)
        n = len(self.student_layers)
        for i, (conn, (s, t)) in enumerate(zip(self.connectors, self.layer_pairs(out))):
            total = total + 2.0 ** (i - n + 1) * FF.ab(conn(s), t, margin=self.opts.margin)
        return AB_SCALE * total

    def pre_stages(self, student, forward) -> list[PreStage]:
        if self.opts.stages != "two":
            return []
        # as FitNet's hint stage: every student parameter is offered, those after the last tapped layer get no gradient
        return [
            PreStage(
                "ab_init",
                {"student": student, "connectors": self.connectors},
                lambda: list(student.parameters()) + list(self.connectors.parameters()),
                lambda x, y: self(forward(x, y)),
                self.opts.init_epochs,
                self.opts.init_lr,
            )
        ]
