"""A validation split held out of the training set: stratified by class, a pure function of (labels, size, seed).

Epochs are then selected on it rather than on the test set (`data.val_split`). Each class gives its share of the
N held-out images (largest remainder: the rounding goes to the classes with the largest fractional share, ties to
the lower class index), drawn by a CPU generator seeded from the run's seed alone, so the split is the same on
every machine, for the teachers and the student of a run, and on resume.
"""

from __future__ import annotations

import numpy as np
import torch

from kdlab.errors import DataError

__all__ = ["split_seed", "stratified_indices", "hold_out"]

_TAG = 0x76616C  # "val": keeps the split's draws apart from the data order's (seed, epoch) generators


def split_seed(seed: int) -> int:
    words = np.random.SeedSequence([int(seed), _TAG]).generate_state(2, dtype=np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


def stratified_indices(
    labels: torch.Tensor, size: int, seed: int, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, validation indices), both sorted; `size` validation images in all, per class in proportion
    to the class's count, at least one training image left in every class that has one."""
    n = int(labels.numel())
    if size >= n:
        raise DataError(f"data.val_split: {size} validation images asked of a training set of {n}")
    counts = torch.bincount(labels, minlength=num_classes).tolist()
    exact = [size * c / n for c in counts]
    quota = [int(e) for e in exact]
    order = sorted(range(num_classes), key=lambda k: (-(exact[k] - quota[k]), k))
    for k in order[: size - sum(quota)]:
        quota[k] += 1
    short = [k for k in range(num_classes) if counts[k] and quota[k] >= counts[k]]
    if short:
        raise DataError(
            f"data.val_split: {size} validation images would leave class {short[0]} ({counts[short[0]]} images) "
            "with none to train on; hold out fewer"
        )
    g = torch.Generator().manual_seed(split_seed(seed))
    val = []
    for k in range(num_classes):
        members = torch.nonzero(labels == k).flatten()
        val.append(members[torch.randperm(len(members), generator=g)[: quota[k]]])
    val_idx = torch.sort(torch.cat(val)).values
    keep = torch.ones(n, dtype=torch.bool)
    keep[val_idx] = False
    return torch.nonzero(keep).flatten(), val_idx


def hold_out(train, size: int, seed: int):
    """The training set without its validation split, and the split; both keep the training set's statistics.
    ``train``: an :class:`ArrayDataset` or a :class:`~kdlab.data.stream.StreamDataset` (the same rule on its
    labels: the split depends on the labels and the seed, not on how the images are read)."""
    train_idx, val_idx = stratified_indices(train.labels, size, seed, train.num_classes)
    rest, val = train.subset(train_idx), train.subset(val_idx, name=f"{train.name} (validation)")
    rest.skipped = list(train.skipped)
    return rest, val
