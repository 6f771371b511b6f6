"""Flow of solution procedure (Yim, Joo, Bae, Kim, CVPR 2017): match the Gram matrices between consecutive layers.

As in the paper and RepDistiller, the FSP loss drives an initialisation stage of the student; the
main stage then trains on the recipe's other terms (RepDistiller: cross-entropy alone).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from kdlab.losses import feature_functional as FF
from kdlab.losses.base import Outputs, PreStage, Term, TermOptions, register


class FSPOptions(TermOptions):
    weight: float = Field(
        default=50.0,
        ge=0,
        description="multiplies the FSP loss in the main stage when stages: single "
        "(RepDistiller's -b 50, which its two-stage runs never apply)",
    )
    stages: Literal["two", "single"] = Field(
        default="two",
        description="two: an initialisation stage on the FSP loss, then the main stage without it (paper and "
        "RepDistiller); single: weight * FSP added to the main loss throughout",
    )
    init_epochs: int = Field(default=30, ge=1, description="epochs of the initialisation stage (RepDistiller's 30)")
    init_lr: float = Field(
        default=0.05, gt=0, description="learning rate of the initialisation stage (RepDistiller: the student's)"
    )
    student_layers: list[str] | None = Field(
        default=None,
        description="student layers, shallow to deep: one FSP matrix "
        "per consecutive pair (RepDistiller: the stem and every stage); null: every stage",
    )
    teacher_layers: list[str] | None = None


@register
class FSP(Term):
    """Sum over consecutive tapped layers of mean (G_s - G_t)^2; channel counts must match the teacher's
    layer by layer."""

    name = "fsp"
    Options = FSPOptions
    reads_teacher_features = True
    default_student_layers = "all"
    default_teacher_layers = "all"

    def __init__(self, opts, student, teachers):
        super().__init__(opts, student, teachers)
        self.active_in_main = opts.stages == "single"
        if len(self.student_layers) < 2:
            from kdlab.errors import LayerError

            raise LayerError(
                f"fsp: needs at least two layers (one FSP matrix per consecutive pair), got {self.student_layers}"
            )

    def build(self, probe: Outputs) -> None:
        with torch.no_grad():  # fail here, before any training, when the channel counts do not match
            self(probe)

    def forward(self, out: Outputs) -> torch.Tensor:
        teacher = out.teacher_feats[0]
        return FF.fsp([out.feats[s] for s in self.student_layers], [teacher[t] for t in self.teacher_layers[0]])

    def pre_stages(self, student, forward) -> list[PreStage]:
        if self.opts.stages != "two":
            return []
        return [
            PreStage(
                "fsp_init",
                {"student": student},
                student.parameters,
                lambda x, y: self(forward(x, y)),
                self.opts.init_epochs,
                self.opts.init_lr,
            )
        ]
