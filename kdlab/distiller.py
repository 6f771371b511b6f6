"""The Distiller: a student, frozen teachers, and weighted loss terms; one forward gives every term.

Teachers are held outside the module tree (not in `parameters()`, `state_dict()` or the optimizer)
but follow `.to()`, and stay in eval mode with gradients off whatever `.train()` is called with, unless a
term asks for train-mode teachers (`Term.teacher_train_mode`: OFD as its reference code runs it), whose BatchNorm
then uses batch statistics while the student trains; their gradients stay off.
"""

from __future__ import annotations

import torch
import torch.nn.functional as nnf
from torch import nn

from kdlab.config import LossConfig
from kdlab.losses import TERMS, Outputs
from kdlab.taps import FeatureTaps


def freeze(model: nn.Module) -> nn.Module:
    model.eval()
    model.requires_grad_(False)
    return model


class Distiller(nn.Module):
    def __init__(self, student: nn.Module, teachers: list[nn.Module], loss: LossConfig):
        super().__init__()
        self.student = student
        self._teachers = [freeze(t) for t in teachers]
        self.ce_weight = loss.ce
        self.terms = nn.ModuleDict(
            {
                name: TERMS[name](TERMS[name].Options.model_validate(opts or {}), student, self._teachers)
                for name, opts in loss.terms.items()
            }
        )
        s_specs = [s for term in self.terms.values() for s in term.student_layers]
        t_specs = [[s for term in self.terms.values() for s in term.teacher_layers[i]] for i in range(len(teachers))]
        self.student_taps = FeatureTaps(student, s_specs, "student")
        self.teacher_taps = [
            FeatureTaps(t, specs, f"teacher {i}") for i, (t, specs) in enumerate(zip(self._teachers, t_specs))
        ]
        self.uses_teachers = any(term.needs_teacher for term in self.terms.values())
        self.needs_progress = any(term.needs_progress for term in self.terms.values())
        self.needs_indices = any(term.needs_indices for term in self.terms.values())
        self.teacher_train_mode = any(term.teacher_train_mode for term in self.terms.values())
        self.built = False
        self.attached = False

    @property
    def teachers(self) -> list[nn.Module]:
        return self._teachers

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        for t in self._teachers:
            t._apply(fn, recurse)
        return self

    def train(self, mode: bool = True):
        super().train(mode)
        for t in self._teachers:
            t.train(mode and self.teacher_train_mode)
        return self

    def term_names(self) -> list[str]:
        return (["ce"] if self.ce_weight > 0 else []) + [n for n, t in self.terms.items() if t.active_in_main]

    def outputs(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        student: bool = True,
        teacher_logits: list[torch.Tensor] | None = None,
        progress: torch.Tensor | float | None = None,
        indices: torch.Tensor | None = None,
    ) -> Outputs:
        """Forward the student (with grad) and the teachers (without) and collect every tap.

        ``teacher_logits`` given (a teacher cache, kdlab.fast): the teachers do not run, and their
        features are empty; only for terms that read teacher logits alone. ``progress`` (epochs
        completed) and ``indices`` (the samples' indices in the training set) are passed on to the terms.
        """
        if teacher_logits is not None:
            teacher_logits, teacher_feats = list(teacher_logits), [{} for _ in teacher_logits]
        else:
            teacher_logits, teacher_feats = [], []
        if self.uses_teachers and not teacher_logits:
            with torch.no_grad():
                for t, taps in zip(self._teachers, self.teacher_taps):
                    teacher_logits.append(t(x))
                    teacher_feats.append(taps.take())
        if student:
            logits = self.student(x)
            feats = self.student_taps.take()
        else:
            logits, feats = teacher_logits[0] if teacher_logits else x.new_zeros(()), {}
        return Outputs(
            logits=logits,
            targets=y,
            feats=feats,
            teacher_logits=teacher_logits,
            teacher_feats=teacher_feats,
            progress=progress,
            indices=indices,
        )

    @torch.no_grad()
    def build(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Size every side module from one probe batch, without touching BN statistics."""
        was_training = self.training
        self.student.eval()
        for t in self._teachers:  # a train-mode teacher's running statistics stay untouched too
            t.eval()
        probe = self.outputs(x, y, progress=0.0, indices=torch.arange(len(y), device=y.device))
        for term in self.terms.values():
            term.build(probe)
        self.to(x.device)
        self.train(was_training)
        self.built = True

    def attach_training_set(self, labels: torch.Tensor) -> None:
        """Give the terms that keep per-sample state (CRD's memory bank) the training set's labels, in index
        order; after `build`, before training or loading a checkpoint (the state is part of it)."""
        for term in self.terms.values():
            term.attach_training_set(labels)
        self.attached = True

    def forward(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        teacher_logits: list[torch.Tensor] | None = None,
        progress: torch.Tensor | float | None = None,
        indices: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """(total loss, student logits, {term: weighted value}); the functional maths runs in float32 under autocast.

        ``progress``: epochs completed (epoch + step / steps per epoch), for terms that change with training
        (DKD's warm-up); ``indices``: each sample's index in the training set (CRD's memory bank)."""
        out = self.outputs(x, y, teacher_logits=teacher_logits, progress=progress, indices=indices)
        values: dict[str, torch.Tensor] = {}
        if self.ce_weight > 0:
            values["ce"] = self.ce_weight * nnf.cross_entropy(out.logits.float(), y)
        for name, term in self.terms.items():
            if term.active_in_main:
                values[name] = term.weight * term(out).float()
        total = torch.stack([v.float() for v in values.values()]).sum()
        return total, out.logits, values

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]
