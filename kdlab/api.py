"""Distil any nn.Module from Python, with any registered loss term, layers named by module name.

    from kdlab.api import Distill

    d = Distill(student, teachers=[teacher], ce=0.1,
                terms={"kd": {"weight": 0.9, "T": 4},
                       "at": {"student_layers": ["layer1"], "teacher_layers": ["block1"]}})
    history = d.fit((train_images, train_labels), epochs=10, lr=0.05, test_data=(test_images, test_labels))
    d.evaluate((test_images, test_labels))     # {'top1': ..., 'top5': ..., 'loss': ...}
    d.student                                  # the trained plain module, nothing attached

The training loop is kdlab's own (`kdlab.train.fit`): the same optimizer, schedule, checkpoints,
metrics and pre-stages (FitNet hints, FT paraphrasers) as `kdlab train`. Data can be a kdlab
`ArrayDataset`, a pair `(uint8 images (N, C, H, W), int labels (N,))`, or any iterable of
`(x, y)` batches such as a torch `DataLoader` (used as it is: its own transforms, no normalisation).
"""

from __future__ import annotations

import contextlib
import tempfile
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import ValidationError
from torch import nn

from kdlab.compute import resolve_device
from kdlab.config import LossConfig, TrainConfig, format_validation_error
from kdlab.data import ArrayDataset, AugmentSpec, DeviceLoader, channel_stats, default_augment
from kdlab.data_names import FIXED
from kdlab.distiller import Distiller
from kdlab.errors import ConfigError, DataError
from kdlab.student import EVAL_BATCH, train_student
from kdlab.train import evaluate

__all__ = ["Distill", "distill", "as_dataset"]


def as_dataset(data, like: ArrayDataset | None = None, name: str = "arrays") -> ArrayDataset:
    """An ArrayDataset from a pair (uint8 images (N, C, H, W), integer labels (N,)).

    Normalisation statistics are those of `like` when given (a test set uses its training set's),
    else the images' own per-channel mean and std.
    """
    if isinstance(data, ArrayDataset):
        return data
    if not (isinstance(data, (tuple, list)) and len(data) == 2):
        raise DataError(
            f"data: expected an ArrayDataset, an (images, labels) pair or a DataLoader, got {type(data).__name__}"
        )
    images, labels = (torch.as_tensor(np.asarray(v)) if not isinstance(v, torch.Tensor) else v for v in data)
    if images.dtype != torch.uint8:
        raise DataError(
            f"images must be uint8 (N, C, H, W) pixels 0..255, got {images.dtype}; "
            "for float inputs pass a DataLoader yielding (x, y) batches"
        )
    if images.dim() != 4:
        raise DataError(f"images must have 4 dimensions (N, C, H, W), got shape {tuple(images.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise DataError(f"labels must be integer class indices, got {labels.dtype}")
    labels = labels.to(torch.int64).reshape(-1).cpu()
    images = images.cpu()
    if like is not None:
        num_classes, mean, std, classes = like.num_classes, like.mean, like.std, like.class_names
    else:
        num_classes = int(labels.max()) + 1 if len(labels) else 1
        mean, std = channel_stats(images)
        classes = [str(k) for k in range(num_classes)]
    return ArrayDataset(
        images=images,
        labels=labels,
        num_classes=num_classes,
        mean=mean,
        std=std,
        class_names=list(classes),
        name=name,
        source=name,
    )


class BatchSource:
    """A user's iterable of (x, y) batches (a torch DataLoader...) in the shape kdlab's loop reads:
    batches moved to the device, `set_epoch` passed on to a sampler that has one, a length."""

    def __init__(
        self,
        loader: Iterable,
        device: torch.device,
        max_steps: int | None = None,
        batch_size: int | None = None,
        seed: int = 0,
    ):
        self.loader, self.device, self.max_steps, self.seed = loader, torch.device(device), max_steps, seed
        self.batch_size = getattr(loader, "batch_size", None) or batch_size or 1
        dataset = getattr(loader, "dataset", None)
        self.num_samples = len(dataset) if hasattr(dataset, "__len__") else None

    def __len__(self) -> int:
        try:
            return len(self.loader)
        except TypeError:
            if self.max_steps is None:
                raise ConfigError(
                    "the training data has no length (an iterable loader): pass max_steps_per_epoch=N"
                ) from None
            return self.max_steps

    def set_epoch(self, epoch: int) -> None:
        for holder in (self.loader, getattr(self.loader, "sampler", None), getattr(self.loader, "batch_sampler", None)):
            if holder is not None and hasattr(holder, "set_epoch"):
                holder.set_epoch(epoch)
                return

    def __iter__(self):
        for batch in self.loader:
            if not (isinstance(batch, (tuple, list)) and len(batch) >= 2):
                raise DataError(f"a training batch must be (x, y), got {type(batch).__name__}")
            x, y = batch[0], batch[1]
            yield x.to(self.device, non_blocking=True), torch.as_tensor(y).to(self.device, non_blocking=True).long()


class Distill:
    """A student, its teachers (frozen here: eval mode, no gradients) and weighted loss terms.

    `terms` maps a registered term name (`kdlab.losses.TERMS`) to its options, as in a recipe's
    `loss.terms`; `ce` weighs the label cross-entropy. Layers are named by module name
    (`dict(model.named_modules())`) or, for kdlab's zoo models, by stage alias (`stage2`, `last`).
    Bad names and options fail here, with the valid names in the message.
    """

    def __init__(
        self,
        student: nn.Module,
        teachers: nn.Module | list[nn.Module] = (),
        terms: dict[str, dict] | None = None,
        ce: float = 1.0,
    ):
        if isinstance(teachers, nn.Module):
            teachers = [teachers]
        try:
            self.loss = LossConfig(ce=ce, terms={k: dict(v or {}) for k, v in (terms or {}).items()})
        except ValidationError as e:
            raise ConfigError(f"loss: {format_validation_error(e)}") from None
        self.distiller = Distiller(student, list(teachers), self.loss)
        self.history: list[dict] = []
        self._train_set: ArrayDataset | None = None

    @property
    def student(self) -> nn.Module:
        """The plain student module; side modules (regressors, translators) live in `self.distiller.terms`."""
        return self.distiller.student

    @property
    def teachers(self) -> list[nn.Module]:
        return self.distiller.teachers

    # ------------------------------------------------------------------------------------------

    def _loader(self, data, batch_size: int, train: bool, device: torch.device, seed: int, augment, max_steps=None):
        if isinstance(data, (ArrayDataset, tuple, list)):
            ds = as_dataset(data, like=None if train else self._train_set, name="train" if train else "test")
            if train:
                self._train_set = ds
            spec = _augment_spec(augment, ds) if train else None
            return DeviceLoader(ds, batch_size, train=train, augment=spec, device=device, seed=seed), ds.num_classes
        if isinstance(data, (str, Path)):
            raise DataError(f"data: got a path {data!r}; load it first (kdlab.data.load_dataset(name, root, split))")
        if not hasattr(data, "__iter__"):
            raise DataError(
                f"data: expected an ArrayDataset, an (images, labels) pair or a DataLoader, got {type(data).__name__}"
            )
        return BatchSource(data, device, max_steps if train else None, batch_size, seed), None

    def fit(
        self,
        train_data,
        epochs: int = 1,
        lr: float = 0.05,
        test_data=None,
        device: str = "auto",
        batch_size: int = 64,
        schedule: str | dict = "cosine",
        augment: Any = "auto",
        seed: int = 0,
        run_dir: str | Path | None = None,
        resume: bool = False,
        verbose: bool = False,
        **train_options,
    ) -> list[dict]:
        """Train the student (and the terms' side modules); returns one dict per epoch (lr, the loss
        and each weighted term, train top-1, and test top-1/top-5 when `test_data` is given).

        `train_options` are any other `TrainConfig` keys (momentum, weight_decay, max_steps_per_epoch,
        grad_clip, amp, ...). `run_dir` keeps the checkpoints, metrics.jsonl and TensorBoard events
        (default: a temporary folder, removed afterwards); `resume=True` continues the run there.
        `augment`: "auto" (the published default of kdlab's data sets, none otherwise), None, or an
        AugmentSpec / dict such as {"crop_pad": 4, "flip": True}.
        """
        sched = {"type": schedule} if isinstance(schedule, str) else dict(schedule)
        try:
            cfg = TrainConfig.model_validate(
                {
                    "epochs": epochs,
                    "lr": lr,
                    "batch_size": batch_size,
                    "device": device,
                    "schedule": sched,
                    **train_options,
                }
            )
        except ValidationError as e:
            raise ConfigError(f"fit: {format_validation_error(e)}") from None
        if resume and run_dir is None:
            raise ConfigError("fit: resume=True needs the run_dir of the run to continue")
        dev = resolve_device(cfg.device)
        torch.manual_seed(seed)  # the side modules' initialisation
        train_loader, num_classes = self._loader(
            train_data, cfg.batch_size, True, dev, seed, augment, cfg.max_steps_per_epoch
        )
        test_loader = self._loader(test_data, EVAL_BATCH, False, dev, seed, None)[0] if test_data is not None else None
        log = print if verbose else _warnings_only
        with _run_folder(run_dir) as folder:
            state = train_student(
                self.distiller,
                train_loader,
                test_loader,
                cfg,
                folder,
                log,
                dev,
                train_set=self._train_set if isinstance(train_loader, DeviceLoader) else None,
                resume=resume,
                keeps_checkpoints=run_dir is not None,
                on_probe=lambda x: _check_classes(self.student, x[:2], num_classes),
            )
        self.history = state.history
        return self.history

    def evaluate(self, data, device: str | None = None, batch_size: int = EVAL_BATCH) -> dict[str, float]:
        """Top-1 / top-5 (%) and mean cross-entropy of the student on `data` (any form `fit` takes)."""
        dev = resolve_device(device) if device else next(self.student.parameters()).device
        loader, _ = self._loader(data, batch_size, False, dev, 0, None)
        return evaluate(self.student.to(dev), loader)


def distill(
    student: nn.Module,
    teachers: nn.Module | list[nn.Module],
    train_data,
    terms: dict[str, dict] | None = None,
    ce: float = 1.0,
    **fit_options,
) -> Distill:
    """`Distill(student, teachers, terms, ce)` fitted on `train_data`; returns it (`.student`, `.history`)."""
    d = Distill(student, teachers, terms, ce)
    d.fit(train_data, **fit_options)
    return d


def _warnings_only(msg: str) -> None:
    """Without verbose=True the loop's lines are dropped, but its warnings (a loss term that is always 0)
    reach the user as Python warnings."""
    if msg.startswith("warning: "):
        warnings.warn(msg.removeprefix("warning: "), UserWarning, stacklevel=4)


def _augment_spec(augment, ds: ArrayDataset) -> AugmentSpec | None:
    if augment == "auto":
        return default_augment(ds.name) if ds.name in FIXED else None
    if augment is None or isinstance(augment, AugmentSpec):
        return augment
    if isinstance(augment, dict):
        try:
            return AugmentSpec(**augment)
        except TypeError as e:
            raise ConfigError(f"augment: {e}") from None
    raise ConfigError(f"augment: expected 'auto', None, an AugmentSpec or a dict, got {augment!r}")


@torch.no_grad()
def _check_classes(student: nn.Module, x: torch.Tensor, num_classes: int | None) -> None:
    if num_classes is None:
        return
    was_training = student.training
    student.eval()
    width = student(x).shape[-1]
    student.train(was_training)
    if width < num_classes:
        raise DataError(f"the labels go up to {num_classes - 1} but the student outputs {width} classes")


@contextlib.contextmanager
def _run_folder(run_dir):
    if run_dir is not None:
        path = Path(run_dir)
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="kdlab-fit-") as tmp:
        yield Path(tmp)
