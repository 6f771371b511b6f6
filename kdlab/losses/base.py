"""What every loss term shares: options schema, tapped layers, side modules, and the registry."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from pydantic import Field
from torch import nn

from kdlab import distributed, taps
from kdlab.errors import ConfigError, LayerError
from kdlab.strict import Strict

TERMS: dict[str, type[Term]] = {}


@dataclass
class PreStage:
    """A short training stage a term asks for before the main one (FitNet's hints, FT's paraphraser).

    The term only describes it; `kdlab.stages.run_stage` trains it, saves ``modules`` under the run's
    ``stages/`` folder and loads them instead on a rerun. ``loss``: (x, y) -> scalar on one training
    batch. ``lr_option``: the recipe key that sets ``lr``, named by the non-finite-loss message.
    ``trainable_only_here``: the modules are frozen in the main stage (FT's paraphraser sits on the teacher
    side) and trainable only during this one.
    """

    name: str
    modules: dict[str, nn.Module]
    params: Callable[[], Iterable[nn.Parameter]]  # read when the stage starts, after the modules are unfrozen
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    epochs: int
    lr: float
    lr_option: str | None = None
    trainable_only_here: bool = False


@dataclass
class ParamGroup:
    """Parameters of a term that train in their own optimizer group (CTKD's temperature), not in the student's.

    ``lr_scale`` multiplies the run's learning rate at every step (the group follows the run's schedule
    scaled); ``weight_decay`` None takes ``train.weight_decay`` whatever the parameter's shape (the
    student's groups may exempt 1-d parameters, `train.decay_norm_and_bias`). `kdlab.optim.param_groups`
    builds the group and leaves these parameters out of the student's groups.
    """

    name: str
    params: list[nn.Parameter]
    lr_scale: float = 1.0
    weight_decay: float | None = None


def register(cls: type[Term]) -> type[Term]:
    TERMS[cls.name] = cls
    return cls


class TermOptions(Strict):  # unknown keys, NaN/inf and YAML booleans given as numbers are refused
    weight: float = Field(default=1.0, ge=0, description="multiplies the term's value as its docstring defines it")


@dataclass
class Outputs:
    """One forward pass of the student and the teachers, as the terms read it."""

    logits: torch.Tensor  # (N, K) student
    targets: torch.Tensor  # (N,) int64
    feats: dict[str, torch.Tensor] = field(default_factory=dict)  # student taps by spec
    teacher_logits: list[torch.Tensor] = field(default_factory=list)  # per teacher (N, K)
    teacher_feats: list[dict[str, torch.Tensor]] = field(default_factory=list)
    # epochs completed when this step runs (epoch + step / steps_per_epoch): a float, or a 0-dim device
    # tensor inside the graph step; None outside training (terms with needs_progress must say so)
    progress: torch.Tensor | float | None = None
    indices: torch.Tensor | None = None  # (N,) int64: each sample's index in the training set (needs_indices)


class Term(nn.Module):
    """A weighted loss term. Subclasses define `name`, `Options`, the taps and `value`.

    `forward` returns the UNWEIGHTED value; the Distiller multiplies by `weight` and logs both.
    Trainable side modules (regressors, translators) are submodules of the term, hence trained with
    the student and saved in its checkpoint, and never part of the exported student.
    """

    name: ClassVar[str]
    Options: ClassVar[type[TermOptions]] = TermOptions
    needs_teacher: ClassVar[bool] = True
    reads_teacher_features: ClassVar[bool] = False
    default_student_layers: ClassVar[str | None] = None  # 'all' | 'last' | 'middle' | 'penultimate' | 'embedding'
    default_teacher_layers: ClassVar[str | None] = None
    needs_progress: ClassVar[bool] = False  # reads Outputs.progress (a warm-up, a schedule inside the loss)
    needs_indices: ClassVar[bool] = False  # reads Outputs.indices (a memory bank over the training set)
    # draws from its own random stream every step (MGD's masks): a captured graph would replay one draw
    draws_random: ClassVar[bool] = False
    # False: the term trains only in its pre-stage (FitNet, AB, FSP with stages: two) and adds nothing to the main loss
    active_in_main: bool = True
    # True: the teachers run in train mode during the main stage (BatchNorm on batch statistics, running statistics
    # updated), as a reference code does (OFD's teacher_mode option); every other term reads eval-mode teachers
    teacher_train_mode: bool = False
    # the cost of one step beyond one student forward and backward, read by the tables (kdlab.tools.cost): more
    # augmented views of each batch the student (and each teacher) runs, and more backward passes
    extra_views: ClassVar[int] = 0
    extra_backward: ClassVar[int] = 0

    def __init__(self, opts: TermOptions, student: nn.Module, teachers: list[nn.Module]):
        super().__init__()
        self.opts = opts
        self.weight = opts.weight
        self.num_teachers = len(teachers)
        if self.needs_teacher and not teachers:
            raise LayerError(f"loss term {self.name!r} needs a teacher")
        index = getattr(opts, "teacher", None)  # the logit terms that read one teacher of several
        if index is not None and index >= len(teachers):
            raise ConfigError(f"loss.terms.{self.name}.teacher: index {index} but only {len(teachers)} teacher(s)")
        self.student_layers = self._layers(student, "student_layers", self.default_student_layers, "student")
        self.teacher_layers = (
            [
                self._layers(t, "teacher_layers", self.default_teacher_layers, f"teacher {i}")
                for i, t in enumerate(teachers)
            ]
            if self.reads_teacher_features
            else [[] for _ in teachers]
        )
        if (
            self.reads_teacher_features
            and self.student_layers
            and any(len(tl) != len(self.student_layers) for tl in self.teacher_layers)
        ):
            raise LayerError(
                f"{self.name}: {len(self.student_layers)} student layer(s) {self.student_layers} but teacher layers "
                f"{self.teacher_layers}; give the same number (student_layers / teacher_layers options)"
            )

    def _layers(self, model: nn.Module, key: str, default: str | None, role: str) -> list[str]:
        if default is None:
            return []
        given = getattr(self.opts, key, None)
        specs = list(given) if given else taps.default_layers(model, default, role)
        for spec in specs:
            taps.resolve(model, spec, role)  # fail before training, listing the valid names
        return specs

    def build(self, probe: Outputs) -> None:
        """Create side modules from the shapes of one probe batch (no-op by default)."""

    def param_groups(self) -> list[ParamGroup]:
        """Parameters that train with their own optimizer options (none by default: side modules join the
        student's groups)."""
        return []

    def attach_training_set(self, labels: torch.Tensor) -> None:
        """Size per-sample state (a memory bank over the training set) from the labels in index order;
        no-op by default."""

    def pre_stages(self, student: nn.Module, forward: Callable[..., Outputs]) -> list[PreStage]:
        """Stages to train before the main one, in order (none by default). ``forward(x, y, student=True)``
        runs the student with grad and the teachers without, as one main step does."""
        return []

    def layer_pairs(
        self, out: Outputs, teacher: int = 0, *, pool: bool | None = None, gather: bool = False
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(student map, teacher map) of every tapped layer pair, in the order the layer options list them.

        ``pool``: None leaves the spatial sizes alone; otherwise `pool_to_match` refuses (False) or
        average-pools (True) a pair whose sizes differ. ``gather``: both maps of the global batch (`gather_pair`).
        """
        feats = out.teacher_feats[teacher]
        for s_spec, t_spec in zip(self.student_layers, self.teacher_layers[teacher]):
            fs, ft = out.feats[s_spec], feats[t_spec]
            if pool is not None:
                fs, ft = pool_to_match(fs, ft, pool, f"{self.name} {s_spec}/{t_spec}")
            yield gather_pair(fs, ft, gather)

    def forward(self, out: Outputs) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class OwnRandomStream:
    """A term's own random stream (CRD's negatives, MGD's masks), for a `Term` subclass: ``start_stream`` seeds
    ``self.sampler`` from the run's stream (the same on every rank at that point), and the module's extra state
    carries its state through checkpoints, so torchrun ranks draw what one process draws and a resumed run draws
    what the uninterrupted one did."""

    def start_stream(self, device: torch.device | str | None = None) -> None:
        self.sampler = torch.Generator(device=device or "cpu")
        self.sampler.manual_seed(int(torch.randint(0, 2**62, ())))

    def get_extra_state(self) -> torch.Tensor:
        return self.sampler.get_state() if hasattr(self, "sampler") else torch.empty(0, dtype=torch.uint8)

    def set_extra_state(self, state: torch.Tensor) -> None:
        if hasattr(self, "sampler") and state.numel():
            self.sampler.set_state(state.cpu())


def pool_to_match(a: torch.Tensor, b: torch.Tensor, pool: bool, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Adaptive-average-pool the larger map to the smaller one's spatial size when asked to."""
    if a.shape[-2:] == b.shape[-2:]:
        return a, b
    if not pool:
        raise LayerError(
            f"{what}: spatial sizes differ, student {tuple(a.shape[1:])} vs teacher {tuple(b.shape[1:])}; "
            f"set the term's option pool: true to average-pool the larger map, or tap other layers"
        )
    if a.shape[-1] > b.shape[-1]:
        return nn.functional.adaptive_avg_pool2d(a, b.shape[-2:]), b
    return a, nn.functional.adaptive_avg_pool2d(b, a.shape[-2:])


def gather_pair(a: torch.Tensor, b: torch.Tensor, gather: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Both tensors over the global batch when ``gather`` (a term's option of that name), else as given.

    Relational terms compare the samples of a batch with each other, so under torchrun each rank
    otherwise sees only its own share of the pairs; `distributed.gather_batch` is the identity on one process.
    """
    if not gather:
        return a, b
    return distributed.gather_batch(a), distributed.gather_batch(b)
