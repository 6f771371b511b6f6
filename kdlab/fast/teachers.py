"""A run's teachers prepared for its speed options: their logits cached, or their BatchNorm folded."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from kdlab.config import STREAM_TEACHER_CACHE, TrainConfig
from kdlab.data.arrays import ArrayDataset
from kdlab.errors import ConfigError
from kdlab.fast.fold import fold_batchnorm
from kdlab.fast.teacher_cache import TeacherCache

__all__ = ["feature_terms", "prepare_teachers"]


def feature_terms(distiller) -> list[str]:
    """The distiller's terms that read more of a teacher than its logits."""
    return [
        name
        for name, term in distiller.terms.items()
        if term.reads_teacher_features or any(layers for layers in term.teacher_layers)
    ]


def prepare_teachers(
    distiller,
    dataset,
    train_loader,
    cfg: TrainConfig,
    cache_dir: Path | None,
    autocast: Callable,
    log: Callable[[str], None],
) -> TeacherCache | None:
    """Apply ``train.fast.fold_teacher`` and ``train.teacher_cache``; returns the cache to hand to ``fit``.

    The teachers are put in the memory format ``fit`` will use and folded first, so the cache holds
    exactly what the online teachers of the same run would output. ``dataset``: an ArrayDataset, or a
    StreamDataset (folding only: a streamed set has no cacheable views).
    """
    from kdlab.compute import use_channels_last

    if not distiller.teachers or not distiller.uses_teachers:
        return None
    if distiller.teacher_train_mode:
        # both fast paths compute an eval-mode teacher: folding bakes in the running statistics, and the cache holds
        # logits that a train-mode teacher (batch statistics) would give differently in every batch
        if cfg.teacher_cache:
            raise ConfigError(
                "train.teacher_cache: a term runs the teachers in train mode (ofd.teacher_mode=train), whose "
                "logits depend on each batch; set train.teacher_cache=false"
            )
        if cfg.fast.fold_teacher:
            log("teachers run in train mode (BatchNorm on batch statistics): train.fast.fold_teacher not applied")
        return None
    device = train_loader.device
    channels_last = use_channels_last(cfg, device)
    if channels_last:
        distiller.to(memory_format=torch.channels_last)
    if cfg.teacher_cache and not isinstance(dataset, ArrayDataset):
        raise ConfigError(STREAM_TEACHER_CACHE)
    if cfg.fast.fold_teacher:
        example = torch.zeros((2, *dataset.image_shape), device=device)
        for i, teacher in enumerate(distiller.teachers):
            folded = fold_batchnorm(teacher, example)
            log(f"teacher {i}: {len(folded)} BatchNorm layers folded into their convolutions")
    if not cfg.teacher_cache:
        return None
    readers = feature_terms(distiller)
    if readers:
        raise ConfigError(
            f"train.teacher_cache: term(s) {', '.join(readers)} read teacher features, and the cache holds "
            "logits only; set train.teacher_cache=false for this method"
        )
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(
        cfg.fast.cache_dtype, torch.bfloat16 if device.type == "cuda" else torch.float32
    )
    storage = cfg.fast.cache_storage
    if storage == "auto":
        storage = "device" if device.type == "cuda" else "disk"
    # on CPU the table is built in training-sized batches, which makes it bit-exact; on CUDA in larger ones
    batch = train_loader.batch_size if device.type == "cpu" else max(train_loader.batch_size, 1024)
    # a table that does not fit raises CacheTooLarge naming the keys to change; no silent fallback to
    # disk, which would add a device-to-host wait per step
    return TeacherCache.build(
        distiller.teachers,
        dataset,
        train_loader.augment,
        device,
        batch,
        dtype,
        storage,
        cache_dir,
        channels_last,
        autocast,
        log,
    )
