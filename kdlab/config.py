"""Typed recipe schema: every key a recipe may hold, its type, default and allowed range.

A recipe is YAML validated against `Recipe`. Unknown keys, wrong types and impossible values are
rejected with a one-line message naming the dotted key (`format_validation_error`), which the CLI
prints before exiting with code 2.
"""

from __future__ import annotations

import copy
import os
import re
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from kdlab import models
from kdlab.data.augment import uncacheable_views
from kdlab.data_names import DATASETS
from kdlab.errors import ConfigError
from kdlab.losses import TERMS
from kdlab.methods import METHODS
from kdlab.strict import Strict

# torch.manual_seed takes at most 2**64 - 1 and the data order needs a non-negative seed; 2**63 - 1 leaves
# room for the seeds derived from it (teachers: seed + 1 + index, generations: seed + g)
SEED_MAX = 2**63 - 1


def _check_model_name(name: str) -> str:
    if name not in models.names():
        try:
            models.create(name)
        except ConfigError as e:  # its message lists the close matches; pydantic adds the key
            raise ValueError(str(e)) from None
    return name


def stream_conflict(augment) -> str | None:
    """Why data.augment cannot apply to the stream loader, which crops with RandomResizedCrop, or None
    (the message names the key below data.)."""
    if augment.crop_pad is not None:
        return (
            "augment.crop_pad: the stream loader crops with RandomResizedCrop (scale 0.08-1), not a padded "
            "crop; remove crop_pad or set data.loader=memory"
        )
    if augment.rotation:
        return "augment.rotation: the stream loader does not rotate; remove rotation or set data.loader=memory"
    return None


STREAM_TEACHER_CACHE = (
    "train.teacher_cache: the stream loader's random-resized crops have no finite set of views to cache teacher "
    "logits for; set train.teacher_cache=false (or data.loader=memory)"
)


class AugmentConfig(Strict):
    """None means the data set's published default (see kdlab.data.default_augment)."""

    crop_pad: int | None = Field(default=None, ge=0)
    flip: bool | None = None
    rotation: float | None = Field(default=None, ge=0, le=180)


class DataConfig(Strict):
    name: Literal[DATASETS] = "digits"
    root: str | None = None
    image_size: int = Field(
        default=32,
        ge=8,
        description="imagefolder only: images are resized to this (stream loader: the side of the random-resized "
        "crop, and of the central crop after resizing the shorter side to image_size x 256/224)",
    )
    skip_unreadable: bool = Field(
        default=False,
        description="imagefolder only: leave out files that cannot be decoded "
        "(counted in the log) instead of stopping at the first one",
    )
    augment: AugmentConfig = AugmentConfig()
    val_split: int = Field(
        default=0,
        ge=0,
        description="hold out this many training images as a validation split (stratified by class, drawn from "
        "the run's seed): each epoch is evaluated on it, and the selected epoch (top1_selected, teachers' "
        "checkpoint: best) is chosen on it instead of on the test set; 0: no split",
    )

    loader: Literal["auto", "memory", "stream"] = Field(
        default="auto",
        description="memory: every image decoded at start-up and held on the training device (uint8); stream "
        "(imagefolder only): decoded from disk batch by batch in data.workers processes, with RandomResizedCrop + "
        "flip for training and resize + central crop for evaluation, ImageNet's mean/std; auto: stream an "
        "imagefolder whose decoded train + test splits (images x 3 x image_size^2 bytes, counted from the file "
        "index) exceed a quarter of the physical memory, memory otherwise (cifar and digits: always memory)",
    )
    workers: int | None = Field(
        default=None,
        ge=0,
        le=64,
        description="stream loader: DataLoader worker processes decoding images (0: in the training process); "
        "default min(8, CPU count)",
    )
    prefetch: int = Field(
        default=2, ge=1, le=64, description="stream loader: batches each worker prepares ahead (prefetch_factor)"
    )

    @model_validator(mode="after")
    def _root_needed(self):
        if self.name == "imagefolder" and not self.root:
            raise ValueError("data.root is required for data.name=imagefolder")
        problem = stream_conflict(self.augment) if self.loader == "stream" else None
        if problem:
            raise ValueError(problem)
        return self

    @field_validator("loader")
    @classmethod
    def _stream_needs_a_folder(cls, v: str, info) -> str:
        name = info.data.get("name")
        if v == "stream" and name not in (None, "imagefolder"):
            raise ValueError(f"stream reads image folders only; {name} is held in memory (memory or auto)")
        return v

    def stream_workers(self) -> int:
        return min(8, os.cpu_count() or 1) if self.workers is None else self.workers


class ScheduleConfig(Strict):
    type: Literal["multistep", "step", "cosine", "constant"] = "multistep"
    milestones: list[int] = Field(default_factory=lambda: [150, 180, 210])
    gamma: float = Field(default=0.1, gt=0, le=1)
    step_size: int = Field(default=30, ge=1, description="step schedule: decay every this many epochs")
    warmup_epochs: float = Field(default=0.0, ge=0, description="linear warm-up from 0, per iteration")
    min_lr: float = Field(default=0.0, ge=0, description="cosine floor")

    @field_validator("milestones")
    @classmethod
    def _increasing(cls, v: list[int]) -> list[int]:
        if any(m <= 0 for m in v) or sorted(v) != v:
            raise ValueError("milestones must be positive and increasing")
        return v


class FastConfig(Strict):
    """Speed options (kdlab.fast); each keeps the recipe's maths. Only fold_teacher is on by default."""

    graph_step: bool = Field(
        default=False,
        description="each step as one device-side function (foreach SGD with the lr in a "
        "device tensor, no host sync), captured as a CUDA graph on CUDA; needs nonfinite=stop",
    )
    cuda_graph: bool = Field(
        default=True,
        description="with graph_step on CUDA: capture the step as a CUDA graph (refused "
        "under torchrun: set false there); a batch of another shape runs eagerly",
    )
    fold_teacher: bool = Field(
        default=True,
        description="fold the teachers' BatchNorm into their convolutions: the "
        "same outputs within float rounding (the teachers are inference-only), one pass less "
        "over every map; false for bit-level comparisons with unfolded teachers",
    )
    cache_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        default="auto", description="teacher cache: auto = bfloat16 on CUDA, float32 (exact) on CPU"
    )
    cache_storage: Literal["auto", "device", "disk"] = Field(
        default="auto",
        description="teacher cache: auto = device memory "
        "on CUDA, a memory-mapped file on CPU; disk cannot be "
        "captured in a CUDA graph (a host gather per step)",
    )


class TrainConfig(Strict):
    epochs: int = Field(default=240, ge=1)
    batch_size: int = Field(
        default=64,
        ge=1,
        description="the global batch: under torchrun each of the W ranks "
        "takes batch_size / W (must divide), so a run means the same at any W",
    )
    lr: float = Field(default=0.05, gt=0)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    nesterov: bool = False
    optimizer: Literal["sgd", "dot"] = Field(
        default="sgd",
        description="sgd, or dot: DOT (Zhao et al., ICCV 2023), SGD with one momentum buffer for the cross-entropy "
        "gradient (momentum - dot_delta, with the weight decay) and one for the distillation terms' gradient "
        "(momentum + dot_delta); two backward passes per step",
    )
    dot_delta: float = Field(
        default=0.075,
        ge=0,
        lt=1,
        description="dot: the two momenta are momentum -/+ dot_delta (official: 0.075 on CIFAR-100, 0.09 on ImageNet)",
    )
    weight_decay: float = Field(default=5e-4, ge=0)
    decay_norm_and_bias: bool = Field(
        default=True, description="apply weight decay to BN and bias too (the published recipes do)"
    )
    schedule: ScheduleConfig = ScheduleConfig()
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: Literal["auto", "bf16", "off"] = Field(
        default="auto", description="auto: bf16 autocast on CUDA, off on CPU; off is fp32, with TF32 turned off on CUDA"
    )
    channels_last: Literal["auto", "on", "off"] = Field(
        default="auto", description="NHWC memory format; auto: on for CUDA and CPU"
    )
    compile: bool = False
    eval_every: int = Field(default=1, ge=1)
    grad_clip: float | None = Field(default=None, gt=0)
    nonfinite: Literal["stop", "skip"] = Field(
        default="stop", description="what a NaN/Inf loss does: stop the run, or skip the step"
    )
    max_steps_per_epoch: int | None = Field(default=None, ge=1, description="cap on steps per epoch (smoke tests)")
    keep_epochs: list[int] = Field(
        default_factory=list, description="also keep the weights of these epochs (defective-KD teachers)"
    )
    keep_best: bool = Field(
        default=False,
        description="also keep the weights of the epoch with the best test top-1 "
        "(checkpoints/best.safetensors; ties: the later epoch, as the Tf-KD code); set for a teacher "
        "whose checkpoint is best",
    )
    teacher_cache: bool = Field(
        default=False,
        description="compute the teachers' logits for every crop/flip view once and read "
        "them instead of running the teachers (only when every term reads teacher logits alone)",
    )
    fast: FastConfig = FastConfig()

    @model_validator(mode="after")
    def _graph_step_stops_on_nonfinite(self):
        if self.fast.graph_step and self.nonfinite == "skip":
            raise ValueError(
                "fast.graph_step: the step updates the weights on the device before the loss is seen; "
                "use nonfinite=stop (or graph_step=false)"
            )
        return self

    @model_validator(mode="after")
    def _dot_is_plain_momentum_sgd(self):
        if self.optimizer != "dot":
            return self
        if not (self.momentum - self.dot_delta >= 0 and self.momentum + self.dot_delta < 1):
            raise ValueError(
                f"dot_delta: momentum -/+ dot_delta must lie in [0, 1), got {self.momentum} -/+ {self.dot_delta}"
            )
        if self.nesterov:
            raise ValueError("optimizer: dot has no Nesterov form (DOT is plain momentum SGD); set nesterov=false")
        if self.grad_clip is not None:
            raise ValueError("optimizer: dot updates the weights from two gradients apart; grad_clip is not defined")
        if self.fast.graph_step:
            raise ValueError("optimizer: dot takes two backward passes, which fast.graph_step does not; set it false")
        return self

    @field_validator("channels_last", mode="before")
    @classmethod
    def _yaml_on_off(cls, v):
        # YAML 1.1 reads a bare on/off as a boolean: `--set train.channels_last=on` must still mean "on"
        return {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v

    @field_validator("keep_epochs")
    @classmethod
    def _kept_epochs_exist(cls, v: list[int], info) -> list[int]:
        epochs = info.data.get("epochs")
        outside = [e for e in v if e < 0 or (epochs is not None and e > epochs)]
        if outside:
            raise ValueError(f"{outside} outside 0..{epochs} (the run's epochs)")
        return v

    sync_bn: bool = Field(
        default=False,
        description="under torchrun: the student's BatchNorm uses the statistics of "
        "the global batch (kdlab's GlobalBatchNorm on every device), not those of each rank's share",
    )


class ModelConfig(Strict):
    name: str
    kwargs: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _known_model(cls, v: str) -> str:
        return _check_model_name(v)


class TeacherConfig(Strict):
    """A teacher: given weights, or trained first (vanilla CE) with `train` overriding the recipe's train."""

    name: str
    kwargs: dict[str, Any] = Field(default_factory=dict)
    weights: str | None = Field(
        default=None,
        description="student.safetensors file, a finished run directory, or a reference "
        "implementation's torch checkpoint (RepDistiller/mdistiller/Tf-KD .pth, read with weights_only=True)",
    )
    train: dict[str, Any] = Field(
        default_factory=dict, description="overrides of the recipe's train section for this teacher"
    )
    epoch: int | None = Field(
        default=None, ge=0, description="use the teacher as it was after this epoch (0 = at init): defective KD"
    )
    checkpoint: Literal["last", "best"] = Field(
        default="last",
        description="which weights of a teacher trained here teach: the last epoch's, or those of the epoch "
        "with the best TEST top-1 (model selection on the test set, as the official Tf-KD code does for every teacher)",
    )
    seed: int | None = Field(
        default=None, ge=0, le=SEED_MAX, description="default: the run seed + 1 + the teacher's index"
    )

    @field_validator("name")
    @classmethod
    def _known_model(cls, v: str) -> str:
        return _check_model_name(v)

    @model_validator(mode="after")
    def _train_overrides_valid(self):
        try:
            TrainConfig.model_validate(self.train)
        except ValidationError as e:
            raise ValueError(format_validation_error(e, prefix="train")) from None
        if self.weights and self.epoch is not None:
            raise ValueError(
                "teacher: 'epoch' picks a checkpoint of a teacher trained here; it cannot be combined with 'weights'"
            )
        if self.checkpoint == "best" and (self.weights or self.epoch is not None):
            raise ValueError(
                "teacher: checkpoint: best picks the best epoch of a teacher trained here; it cannot be combined "
                f"with '{'weights' if self.weights else 'epoch'}'"
            )
        return self


class LossConfig(Strict):
    ce: float = Field(default=1.0, ge=0, description="weight of the cross-entropy on the labels (mean over the batch)")
    terms: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _terms_valid(self):
        if self.ce == 0 and not self.terms:
            raise ValueError("ce is 0 and there are no terms: nothing to train")
        for name, opts in self.terms.items():
            if name not in TERMS:
                raise ValueError(f"unknown loss term {name!r}; registered: {', '.join(sorted(TERMS))}")
            try:
                TERMS[name].Options.model_validate(opts or {})
            except ValidationError as e:
                raise ValueError(format_validation_error(e, prefix=f"terms.{name}")) from None
        return self


class Recipe(Strict):
    method: str = "vanilla"
    seed: int = Field(default=0, ge=0, le=SEED_MAX)
    data: DataConfig = DataConfig()
    student: ModelConfig
    teachers: list[TeacherConfig] = Field(default_factory=list)
    generations: int = Field(default=0, ge=0, description="sequential methods: student generations after generation 0")
    generation_init: Literal["fresh", "previous"] = Field(
        default="fresh",
        description="each generation starts from a fresh init (BAN) or from the previous generation's weights",
    )
    bane: bool = Field(default=False, description="also evaluate the ensemble of generations 1..G (BAN)")
    generation_checkpoint: Literal["last", "best"] = Field(
        default="last",
        description="sequential methods: which weights of generation g-1 teach generation g: the last "
        "epoch's, or the best-TEST-top-1 epoch's (the official Tf-KD code's self-training teacher)",
    )
    loss: LossConfig = LossConfig()
    train: TrainConfig = TrainConfig()
    cache_dir: str | None = Field(
        default=None, description="where trained teachers are cached; default <out>/teachers or $KDLAB_CACHE"
    )
    note: str = ""

    @field_validator("method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        if v not in METHODS:
            raise ValueError(f"unknown method {v!r}; registered: {', '.join(sorted(METHODS))}")
        return v

    @model_validator(mode="after")
    def _consistent(self):
        needs_teacher = [n for n in self.loss.terms if TERMS[n].needs_teacher]
        if needs_teacher and not self.teachers and self.generations == 0:
            raise ValueError(f"loss term(s) {', '.join(needs_teacher)} need a teacher: add 'teachers' or 'generations'")
        if self.generations and self.teachers:
            raise ValueError("'generations' trains each generation's teacher itself; remove 'teachers'")
        if self.generation_checkpoint != "last" and not self.generations:
            raise ValueError(
                "generation_checkpoint applies to sequential methods (generations > 0); "
                "a teacher's is teachers.N.checkpoint"
            )
        for i, teacher in enumerate(self.teachers):
            epochs = teacher_train_config(self, teacher).epochs
            if teacher.epoch is not None and teacher.epoch > epochs:
                raise ValueError(f"teachers.{i}.epoch: {teacher.epoch} is past the teacher's last epoch ({epochs})")
        return self

    @model_validator(mode="after")
    def _teacher_cache_possible(self):
        # checked here, before any teacher is trained: the cache holds logits of enumerable crop/flip views only
        if not self.train.teacher_cache:
            return self
        if self.data.loader == "stream":  # data.loader=auto is checked once the folder is indexed (load_data)
            raise ValueError(STREAM_TEACHER_CACHE)
        readers = [n for n in self.loss.terms if TERMS[n].reads_teacher_features]
        if readers:
            raise ValueError(
                f"train.teacher_cache: term(s) {', '.join(readers)} read teacher features and the cache holds "
                "logits only; set train.teacher_cache=false"
            )
        problem = uncacheable_views(self.data.augment.rotation)
        if problem:
            raise ValueError(f"train.teacher_cache: {problem}")
        return self


# ----------------------------------------------------------------------------------------------
# Error formatting and the teacher's train section


# a section validator's own message that names sub-keys: "terms.kd.T: must be > 0; terms.kd.x: unknown key"
_NAMED_PROBLEM = re.compile(r"^([A-Za-z_][\w]*(?:\.[\w]+)+): (.*)$", re.S)
_NEXT_NAMED_PROBLEM = re.compile(r"; (?=[A-Za-z_][\w]*(?:\.[\w]+)+: )")
SHOWN_PROBLEMS = 6


def format_validation_error(err: ValidationError, prefix: str = "") -> str:
    """One line with every problem (the first few, and a count of the rest), each with its dotted key path;
    unknown keys first, since a misspelt key often causes the "Field required" beside it."""
    problems: list[tuple[str, str]] = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not str(p).startswith("function-after"))
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"].removeprefix("Value error, ")
        for part in _NEXT_NAMED_PROBLEM.split(msg):
            named = _NAMED_PROBLEM.match(part)
            key, what = (".".join(p for p in (loc, named.group(1)) if p), named.group(2)) if named else (loc, part)
            problems.append((".".join(p for p in (prefix, key) if p), what))
    problems.sort(key=lambda kw: kw[1] != "unknown key")  # stable: otherwise pydantic's order
    shown = "; ".join(f"{k}: {m}" if k else m for k, m in problems[:SHOWN_PROBLEMS])
    rest = len(problems) - SHOWN_PROBLEMS
    return shown + (f" (and {rest} more)" if rest > 0 else "")


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def teacher_train_config(recipe: Recipe, teacher: TeacherConfig) -> TrainConfig:
    # a student's optimizer is not its teachers': DOT splits a distillation gradient that a teacher does not have
    inherited = recipe.train.model_dump(mode="json", exclude={"optimizer", "dot_delta"})
    cfg = TrainConfig.model_validate(deep_merge(inherited, teacher.train))
    if teacher.epoch is not None and teacher.epoch not in cfg.keep_epochs:
        cfg = cfg.model_copy(update={"keep_epochs": sorted({*cfg.keep_epochs, teacher.epoch})})
    if teacher.checkpoint == "best" and not cfg.keep_best:  # the weights it will be read from
        cfg = cfg.model_copy(update={"keep_best": True})
    return cfg
