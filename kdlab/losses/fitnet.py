"""FitNets (Romero et al., ICLR 2015): a conv regressor maps the student's guided layer onto the teacher's hint."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from kdlab.losses import functional as F
from kdlab.losses.base import Outputs, PreStage, Term, TermOptions, register
from kdlab.losses.heads import conv_regressor


class FitNetOptions(TermOptions):
    weight: float = Field(
        default=100.0, ge=0, description="weight of the hint MSE (mean over elements) in single-stage mode"
    )
    stages: Literal["two", "single"] = Field(
        default="two",
        description="two: the paper's hint stage first (student up to the guided layer + regressor), then the main "
        "stage without the hint term; single: CE + weight * hint throughout (RepDistiller)",
    )
    hint_epochs: int = Field(default=20, ge=1, description="epochs of the hint stage (two-stage mode)")
    hint_lr: float = Field(default=0.05, gt=0)
    student_layers: list[str] | None = None
    teacher_layers: list[str] | None = None


@register
class FitNet(Term):
    """Hint loss `mean (r(v_g) - u_h)^2`; the guided and hint layers default to the second stage."""

    name = "fitnet"
    Options = FitNetOptions
    reads_teacher_features = True
    default_student_layers = "middle"
    default_teacher_layers = "middle"

    def __init__(self, opts, student, teachers):
        super().__init__(opts, student, teachers)
        self.active_in_main = opts.stages == "single"

    def build(self, probe: Outputs) -> None:
        self.regressors = torch.nn.ModuleList(
            conv_regressor(tuple(s.shape[1:]), tuple(t.shape[1:])) for s, t in self.layer_pairs(probe)
        )

    def forward(self, out: Outputs) -> torch.Tensor:
        total = out.logits.new_zeros((), dtype=torch.float32)
        for reg, (s, t) in zip(self.regressors, self.layer_pairs(out)):
            total = total + F.hint(reg(s), t)
        return total

    def pre_stages(self, student, forward) -> list[PreStage]:
        if self.opts.stages != "two":
            return []
        # Every student parameter is offered to the optimizer, but only those before the guided
        # layer receive gradients (the rest keep grad None, so SGD leaves them and their decay alone).
        return [
            PreStage(
                "fitnet_hint",
                {"student": student, "regressors": self.regressors},
                lambda: list(student.parameters()) + list(self.regressors.parameters()),
                lambda x, y: self(forward(x, y)),
                self.opts.hint_epochs,
                self.opts.hint_lr,
                f"loss.terms.{self.name}.hint_lr",
            )
        ]
