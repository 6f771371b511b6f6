"""A batch iterator that keeps the whole data set on the device and augments batches there.

The order and the augmentation of an epoch are a pure function of ``(seed, epoch)``: a CPU
``torch.Generator`` seeded from the pair draws, in this order, the permutation of all N samples
and then the views (dx, dy, flip, angle) of the N positions of that permutation; the draws are then
moved to the device. CPU and CUDA runs therefore see the same batches, and resuming at any epoch
(or, with ``iter_batches(start=k)``, at any batch) reproduces the uninterrupted run exactly.

Sharding ``shard=(rank, world_size)`` (data-parallel training; ``batch_size`` is then the per-rank
batch B): in train mode step i of rank r takes positions ``[i*G + r*B, i*G + (r+1)*B)`` of the
epoch's permutation, ``G = B * world_size``, so the ranks' step-i batches together are exactly the
step-i batch of one process with batch G (the same samples, the same views), and DDP at global batch
G matches one process at batch G. Every rank takes ``N // G`` steps (the tail is dropped; sharded
training needs ``drop_last``). In eval mode the samples, in order, are split into contiguous slices
whose sizes differ by at most one (every sample evaluated exactly once; the ranks may then differ by
one batch).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator

import numpy as np
import torch

from kdlab.errors import ConfigError

from .arrays import ArrayDataset
from .augment import AugmentSpec, Views, view_index

__all__ = ["DeviceLoader", "epoch_seed"]


def epoch_seed(seed: int, epoch: int) -> int:
    """A well-mixed 63-bit generator seed derived from (seed, epoch) only."""
    words = np.random.SeedSequence([int(seed), int(epoch)]).generate_state(2, dtype=np.uint32)
    return ((int(words[0]) << 32) | int(words[1])) & ((1 << 63) - 1)


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def shard_plan(
    name: str, n: int, batch_size: int, train: bool, drop_last: bool, shard
) -> tuple[tuple[int, int], int, int, int]:
    """The sharding rule of the module docstring, shared by every loader: ``((rank, world), start, num_samples,
    num_batches)`` of this rank, with the refusals (a bad shard, a sharded training loader without drop_last,
    no batch at all) as one-line errors."""
    try:
        rank, world = (int(v) for v in shard)
    except (TypeError, ValueError):
        raise ConfigError(f"shard must be (rank, world_size), got {shard!r}") from None
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"shard must satisfy 0 <= rank < world_size, got {shard!r}")
    if train and world > 1:
        if not drop_last:
            raise ConfigError(
                "a sharded training loader drops the last partial global batch (drop_last=True), "
                "so that every rank takes the same number of steps"
            )
        global_batch = batch_size * world
        start, num_batches = 0, n // global_batch
        num_samples = num_batches * batch_size
        if num_batches == 0:
            raise ConfigError(
                f"{name}: {n} samples make no global batch of {global_batch} ({world} ranks x {batch_size})"
            )
    else:
        if train:
            start, num_samples = 0, n
        else:
            base, extra = divmod(n, world)
            start, num_samples = rank * base + min(rank, extra), base + (rank < extra)
        num_batches = num_samples // batch_size if drop_last else math.ceil(num_samples / batch_size)
    if train and num_batches == 0:
        raise ConfigError(
            f"{name}: {num_samples} samples per epoch make no batch of {batch_size}"
            + (" with drop_last" if drop_last else "")
        )
    return (rank, world), start, num_samples, num_batches


class DeviceLoader:
    """Iterate ``(x, y)`` batches of an :class:`ArrayDataset` held as uint8 on ``device``.

    ``x`` is float32 (B, C, H, W), normalised with the data set's mean/std, ``y`` int64 (B,), both
    on ``device``. Train mode: shuffled, augmented with ``augment`` (None = no augmentation),
    ``drop_last`` True by default. Eval mode (``train=False``): in order, never augmented,
    ``drop_last`` False by default. Call :meth:`set_epoch` before each epoch.
    """

    def __init__(
        self,
        dataset: ArrayDataset,
        batch_size: int,
        train: bool,
        augment: AugmentSpec | None = None,
        device: str | torch.device = "cpu",
        seed: int = 0,
        drop_last: bool | None = None,
        shard: tuple[int, int] = (0, 1),
    ) -> None:
        if not isinstance(dataset, ArrayDataset):
            raise ConfigError(f"DeviceLoader needs an ArrayDataset, got {type(dataset).__name__}")
        self.batch_size = _check_int("batch_size", batch_size, 1)
        self.train = bool(train)
        if augment is not None and not isinstance(augment, AugmentSpec):
            raise ConfigError(f"augment must be an AugmentSpec or None, got {type(augment).__name__}")
        if self.train and augment is not None and not augment.is_identity:
            self.augment: AugmentSpec | None = dataclasses.replace(augment)  # a snapshot
        else:
            self.augment = None
        self.seed = _check_int("seed", seed, 0)
        self.drop_last = self.train if drop_last is None else bool(drop_last)
        self.shard, self._start, self.num_samples, self._num_batches = shard_plan(
            dataset.name, len(dataset), self.batch_size, self.train, self.drop_last, shard
        )
        self.device = torch.device(device)
        self.name = dataset.name
        self.num_classes = dataset.num_classes
        self.class_names = list(dataset.class_names)
        self.mean, self.std = dataset.mean, dataset.std
        self.dataset_size = len(dataset)

        self.images = dataset.images.to(self.device)
        self.labels = dataset.labels.to(self.device)
        c = dataset.images.shape[1]
        self._mean = torch.tensor(dataset.mean, dtype=torch.float32, device=self.device).view(1, c, 1, 1)
        self._std = torch.tensor(dataset.std, dtype=torch.float32, device=self.device).view(1, c, 1, 1)
        self.epoch = 0

    def __len__(self) -> int:
        return self._num_batches

    def set_epoch(self, epoch: int) -> None:
        self.epoch = _check_int("epoch", epoch, 0)

    def epoch_plan(self) -> tuple[torch.Tensor, Views | None]:
        """This rank's dataset indices for the current epoch and their views (None if unaugmented).

        Both on the loader's device; indices in iteration order (``num_samples`` of them).
        """
        n = self.dataset_size
        lo, hi = self._start, self._start + self.num_samples
        if not self.train:
            return torch.arange(lo, hi, device=self.device), None
        g = torch.Generator(device="cpu")
        g.manual_seed(epoch_seed(self.seed, self.epoch))
        perm = torch.randperm(n, generator=g)
        rank, world = self.shard
        if world > 1:  # this rank's B positions of each global batch of B * world
            bs = self.batch_size
            steps = torch.arange(self._num_batches)[:, None] * (bs * world)
            positions = (steps + rank * bs + torch.arange(bs)[None, :]).reshape(-1)
        else:
            positions = slice(lo, hi)
        # views are drawn for all N positions whatever the sharding: a sample's view is the same at any world size
        views = self.augment.sample(n, g).select(positions) if self.augment is not None else None
        order = perm[positions].to(self.device)
        return order, (views.to(self.device) if views is not None else None)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.iter_batches()

    def iter_batches(self, start: int = 0, with_meta: bool = False) -> Iterator[tuple[torch.Tensor, ...]]:
        """Batches ``start, start + 1, ...`` of the current epoch.

        With ``with_meta`` each item is ``(x, y, index, view)``: the dataset indices (int64) and the
        crop/flip view index of each sample (see :func:`kdlab.data.augment.view_index`; 0 when not
        augmented; rotation is not part of it).
        """
        start = _check_int("start", start, 0)
        order, views = self.epoch_plan()
        bs, m = self.batch_size, self.num_samples
        pad = self.augment.crop_pad if self.augment is not None else 0
        for b in range(start, self._num_batches):
            lo, hi = b * bs, min((b + 1) * bs, m)
            if self.train:
                idx = order[lo:hi]
                imgs = self.images.index_select(0, idx)
                y = self.labels.index_select(0, idx)
            else:
                imgs = self.images[self._start + lo : self._start + hi]
                y = self.labels[self._start + lo : self._start + hi]
                idx = order[lo:hi]
            if views is not None:
                v = views.select(slice(lo, hi))
                x = self.augment.apply(imgs, v)
            else:
                v = None
                x = imgs.to(torch.float32)
            x.div_(255.0).sub_(self._mean).div_(self._std)
            if with_meta:
                if v is not None:
                    vi = view_index(v.dx, v.dy, v.flip, pad)
                else:
                    vi = torch.zeros(hi - lo, dtype=torch.int64, device=self.device)
                yield x, y, idx, vi
            else:
                yield x, y
