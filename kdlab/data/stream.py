"""Streaming an image folder from disk: decoded in DataLoader workers, batch by batch, never held whole.

For folders too large to decode into memory (ImageNet: 1.28 million JPEGs), ``data.loader: stream`` reads
the files as training goes. :func:`open_stream` gives the split's :class:`StreamDataset` (its
:mod:`file index <kdlab.data.folder_index>`: paths, labels, image dimensions; nothing decoded), and
:class:`StreamLoader` iterates it with the contract of :class:`~kdlab.data.loader.DeviceLoader`, so
``kdlab.train.fit`` takes either.

Transforms (the ImageNet recipe of torchvision's reference scripts, written with PIL, bilinear):

* train: ``RandomResizedCrop(image_size)`` with scale (0.08, 1) and ratio (3/4, 4/3), then a horizontal
  flip with probability 1/2. The crop box follows ``RandomResizedCrop.get_params`` of torchvision
  (``torchvision/transforms/transforms.py``): up to 10 tries of an area fraction uniform in the scale
  range and a log-uniform aspect ratio, the box's sides rounded to the nearest integer, its position
  uniform over the positions where it fits; after 10 misses, a central crop of the whole image clamped to
  the ratio range. The crop is then resized to image_size x image_size.
* eval: the shorter side resized to ``round(image_size * 256 / 224)`` (the other side scaled and truncated,
  as torchvision's ``Resize(int)``), then the central image_size x image_size (``CenterCrop``).

Workers return uint8 batches (B, 3, S, S); the cast to float and the normalisation run in the main process
on the training device. The normalisation is ImageNet's standard mean (0.485, 0.456, 0.406) and std
(0.229, 0.224, 0.225), not statistics measured on the folder (which would mean decoding all of it).

Determinism. Everything random is drawn in the main process; a worker gets ``(rows, crop boxes, flips)``
for a whole batch and only decodes, so the batches do not depend on the number of workers nor on which
worker decodes which batch. The epoch's permutation is ``torch.randperm(N)`` of a CPU generator seeded with
:func:`~kdlab.data.loader.epoch_seed` ``(seed, epoch)``, the same permutation as the DeviceLoader's. The
crop and flip of epoch position ``p`` come from row ``p % 1024`` of a (1024, 41) float64 uniform table
drawn by a generator seeded with ``epoch_seed(epoch_seed(seed, epoch), 1 + p // 1024)``: 10 tries x
(area, log-ratio, row, column) and the flip. Drawing it in blocks keeps the main process's memory
independent of N (one table for all 1.28 million positions would be 420 MB), and makes each position's
draws a pure function of (seed, epoch, position), so ``iter_batches(start=k)`` computes batch k directly
and yields what the uninterrupted epoch yields from there, and sharded ranks see the views that one
process would.

Sharding follows DeviceLoader's rule (see :mod:`kdlab.data.loader`). Memory: at most
``workers x prefetch`` batches are in flight (one batch in the main process with 0 workers), whatever N.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator

import numpy as np
import torch

from kdlab.errors import ConfigError, DataError

from .folder_index import FolderIndex, folder_index
from .imagefolder import SIXTEEN_BIT_MODES
from .loader import _check_int, epoch_seed, shard_plan

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "StreamDataset",
    "StreamLoader",
    "choose_loader",
    "eval_resize",
    "eval_view",
    "memory_threshold",
    "open_rgb",
    "open_stream",
    "resized_crop_boxes",
    "train_view",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SCALE = (0.08, 1.0)
RATIO = (3.0 / 4.0, 4.0 / 3.0)
TRIES = 10
DRAWS = 4 * TRIES + 1  # per try: area, log-ratio, row, column; then the flip
BLOCK = 1024  # positions per block of draws


def eval_resize(image_size: int) -> int:
    """The shorter side before the central crop: 256 at image_size 224."""
    return int(round(image_size * 256 / 224))


def resized_crop_boxes(widths, heights, draws, scale=SCALE, ratio=RATIO) -> np.ndarray:
    """``(top, left, height, width)`` int64 (n, 4) of the random-resized crop of images of ``widths`` x
    ``heights``, from uniforms ``draws`` (n, >= 40) in [0, 1): try t uses columns 4t..4t+3 (area fraction,
    log aspect ratio, row, column)."""
    big_w = np.asarray(widths, dtype=np.float64)[:, None]
    big_h = np.asarray(heights, dtype=np.float64)[:, None]
    u = np.asarray(draws, dtype=np.float64)[:, : 4 * TRIES].reshape(-1, TRIES, 4)
    target = big_w * big_h * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = np.exp(lo + (hi - lo) * u[..., 1])
    w = np.rint(np.sqrt(target * aspect))  # round half to even, as Python's round
    h = np.rint(np.sqrt(target / aspect))
    ok = (w > 0) & (w <= big_w) & (h > 0) & (h <= big_h)
    n = u.shape[0]
    first = ok.argmax(axis=1)
    pick = np.arange(n), first
    w, h = w[pick], h[pick]
    big_w, big_h = big_w[:, 0], big_h[:, 0]
    top = np.floor(u[pick][:, 2] * (big_h - h + 1))
    left = np.floor(u[pick][:, 3] * (big_w - w + 1))
    # after 10 misses: the whole image, clamped to the ratio range, centred
    in_ratio = big_w / big_h
    fw = np.where(in_ratio < min(ratio), big_w, np.where(in_ratio > max(ratio), np.rint(big_h * max(ratio)), big_w))
    fh = np.where(in_ratio < min(ratio), np.rint(big_w / min(ratio)), big_h)
    miss = ~ok.any(axis=1)
    w, h = np.where(miss, fw, w), np.where(miss, fh, h)
    top = np.where(miss, (big_h - h) // 2, top)
    left = np.where(miss, (big_w - w) // 2, left)
    return np.stack([top, left, h, w], axis=1).astype(np.int64)


def open_rgb(path):
    """The file as an 8-bit RGB PIL image; 16-bit greyscale scaled by 1/257 (as the in-memory reader)."""
    from PIL import Image

    with Image.open(path) as im:
        if im.mode in SIXTEEN_BIT_MODES:
            grey = np.clip(np.rint(np.asarray(im, dtype=np.float32) / 257.0), 0, 255).astype(np.uint8)
            return Image.fromarray(grey, mode="L").convert("RGB")
        return im.convert("RGB")


def _chw(img) -> np.ndarray:
    return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)


def train_view(img, box, flip: bool, size: int) -> np.ndarray:
    """uint8 (3, size, size): the crop ``box`` = (top, left, height, width) resized, mirrored if ``flip``."""
    from PIL import Image

    top, left, h, w = (int(v) for v in box)
    out = img.crop((left, top, left + w, top + h)).resize((size, size), Image.BILINEAR)
    arr = _chw(out)
    return np.ascontiguousarray(arr[:, :, ::-1]) if flip else arr


def eval_view(img, size: int) -> np.ndarray:
    """uint8 (3, size, size): shorter side resized to :func:`eval_resize`, then the central crop."""
    from PIL import Image

    short_target = eval_resize(size)
    w, h = img.size
    if w <= h:
        new = (short_target, int(short_target * h / w))
    else:
        new = (int(short_target * w / h), short_target)
    if new != (w, h):
        img = img.resize(new, Image.BILINEAR)
    w, h = img.size
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return _chw(img.crop((left, top, left + size, top + size)))


class StreamDataset:
    """One split of an image folder, read from disk on demand: ``paths`` (relative to ``split_dir``),
    int64 ``labels``, the images' ``widths`` / ``heights``; ``mean`` / ``std`` ImageNet's. The fields an
    :class:`~kdlab.data.arrays.ArrayDataset` has for its users (name, num_classes, class_names, labels,
    source, skipped, image_shape, subset), without the images."""

    def __init__(
        self,
        split_dir,
        paths: list[str],
        labels: torch.Tensor,
        widths: np.ndarray,
        heights: np.ndarray,
        class_names: list[str],
        image_size: int,
        name: str = "imagefolder",
        skipped: list[str] | None = None,
        index_path=None,
    ) -> None:
        self.split_dir = str(split_dir)
        self.paths = list(paths)
        self.labels = labels
        self.widths = np.asarray(widths, dtype=np.int64)
        self.heights = np.asarray(heights, dtype=np.int64)
        self.class_names = list(class_names)
        self.num_classes = len(self.class_names)
        self.image_size = _check_int("image_size", image_size, 1)
        self.name = name
        self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD
        self.source = self.split_dir
        self.skipped = list(skipped or [])
        self.index_path = index_path

    @classmethod
    def from_index(cls, index: FolderIndex, image_size: int) -> StreamDataset:
        return cls(
            index.split_dir,
            index.paths,
            index.labels,
            index.widths,
            index.heights,
            index.classes,
            image_size,
            skipped=index.skipped,
            index_path=index.cache_path,
        )

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (3, self.image_size, self.image_size)

    def subset(self, index, name: str | None = None) -> StreamDataset:
        rows = torch.arange(len(self))[index] if isinstance(index, slice) else torch.as_tensor(index)
        rows = rows.to(torch.int64)
        sel = rows.numpy()
        return StreamDataset(
            self.split_dir,
            [self.paths[i] for i in sel.tolist()],
            self.labels[rows],
            self.widths[sel],
            self.heights[sel],
            self.class_names,
            self.image_size,
            name=name or self.name,
            index_path=self.index_path,
        )

    def first_images(self, n: int) -> torch.Tensor:
        """uint8 (n, 3, S, S): the first ``n`` images through the eval transform, decoded here."""
        return _Decoder(self)[(np.arange(min(n, len(self))), None, None)][0]


def open_stream(root, split: str, image_size: int, skip_unreadable: bool = False, notice=None) -> StreamDataset:
    """The split's StreamDataset, from the folder's (cached) file index."""
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ConfigError(f"imagefolder image_size must be a positive int, got {image_size!r}")
    return StreamDataset.from_index(folder_index(root, split, skip_unreadable, notice), image_size)


def memory_threshold() -> int:
    """Bytes of decoded images above which ``data.loader: auto`` streams: a quarter of the physical memory
    (8 GiB when it cannot be read)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def choose_loader(mode: str, name: str, root, image_size: int, skip_unreadable: bool = False, notice=None) -> str:
    """``memory`` or ``stream`` for ``data.loader`` = ``mode``; auto streams an image folder whose decoded
    train + test splits (n x 3 x image_size^2 bytes, counted from the file index) exceed
    :func:`memory_threshold`."""
    if mode not in ("auto", "memory", "stream"):
        raise ConfigError(f"data.loader must be auto, memory or stream, got {mode!r}")
    if name != "imagefolder":
        if mode == "stream":
            raise ConfigError(f"data.loader=stream reads image folders only; {name} is held in memory (memory or auto)")
        return "memory"
    if mode != "auto":
        return mode
    n = sum(len(folder_index(root, split, skip_unreadable, notice)) for split in ("train", "test"))
    return "stream" if n * 3 * image_size * image_size > memory_threshold() else "memory"


class _Decoder(torch.utils.data.Dataset):
    """Decodes one batch per item: the key is ``(rows, boxes, flips)``, boxes None for the eval transform.
    Returns ``(uint8 images (B, 3, S, S), rows, error)``: a file that cannot be decoded is reported by name
    in ``error`` (the main process raises it), not raised in the worker, so the message stays one line."""

    def __init__(self, ds: StreamDataset) -> None:
        self.split_dir, self.paths, self.size = ds.split_dir, ds.paths, ds.image_size
        self.widths, self.heights = ds.widths, ds.heights

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key):
        rows, boxes, flips = key
        out = np.zeros((len(rows), 3, self.size, self.size), dtype=np.uint8)
        error = ""
        for k, r in enumerate(rows.tolist()):
            path = os.path.join(self.split_dir, self.paths[r])
            try:
                img = open_rgb(path)
            except Exception as exc:  # PIL raises OSError, UnidentifiedImageError, ValueError, ...
                error = f"{path}: unreadable image ({type(exc).__name__}: {exc})"
                break
            if img.size != (self.widths[r], self.heights[r]):
                error = (
                    f"{path}: {img.size[0]}x{img.size[1]} pixels, the file index says "
                    f"{self.widths[r]}x{self.heights[r]}: the file changed after the index was built; "
                    "delete the folder's .kdlab-index-*.json"
                )
                break
            out[k] = eval_view(img, self.size) if boxes is None else train_view(img, boxes[k], flips[k], self.size)
        return torch.from_numpy(out), torch.from_numpy(np.asarray(rows, dtype=np.int64)), error


class _Plan:
    """The epoch's batch keys from batch ``start`` on, computed lazily (the DataLoader's sampler)."""

    def __init__(self, loader: StreamLoader, start: int) -> None:
        self.loader, self.start = loader, start

    def __len__(self) -> int:
        return max(0, len(self.loader) - self.start)

    def __iter__(self):
        return self.loader._keys(self.start)


class StreamLoader:
    """Iterate ``(x, y)`` batches of a :class:`StreamDataset`, decoded by ``workers`` DataLoader processes
    (0: in this process) with ``prefetch`` batches each in flight; the contract of
    :class:`~kdlab.data.loader.DeviceLoader` (attributes, ``set_epoch``, ``iter_batches(start, with_meta)``,
    the sharding rule). ``x`` float32 (B, 3, S, S) normalised, ``y`` int64, on ``device``. Train mode:
    random-resized crops (and flips unless ``flip=False``); eval mode: the resize and central crop. With
    ``with_meta`` the view index is 0: a random-resized crop has no finite set of views."""

    def __init__(
        self,
        dataset: StreamDataset,
        batch_size: int,
        train: bool,
        device: str | torch.device = "cpu",
        seed: int = 0,
        drop_last: bool | None = None,
        shard: tuple[int, int] = (0, 1),
        flip: bool = True,
        workers: int = 0,
        prefetch: int = 2,
    ) -> None:
        if not isinstance(dataset, StreamDataset):
            raise ConfigError(f"StreamLoader needs a StreamDataset, got {type(dataset).__name__}")
        self.batch_size = _check_int("batch_size", batch_size, 1)
        self.train = bool(train)
        self.augment = None  # no AugmentSpec: the teacher-logit cache cannot enumerate these views
        self.flip = bool(flip)
        self.workers = _check_int("data.workers", workers, 0)
        self.prefetch = _check_int("data.prefetch", prefetch, 1)
        self.seed = _check_int("seed", seed, 0)
        self.drop_last = self.train if drop_last is None else bool(drop_last)
        self.shard, self._start, self.num_samples, self._num_batches = shard_plan(
            dataset.name, len(dataset), self.batch_size, self.train, self.drop_last, shard
        )
        self.device = torch.device(device)
        self.dataset = dataset
        self.name = dataset.name
        self.num_classes = dataset.num_classes
        self.class_names = list(dataset.class_names)
        self.mean, self.std = dataset.mean, dataset.std
        self.dataset_size = len(dataset)
        self._decoder = _Decoder(dataset)
        self._mean = torch.tensor(self.mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(self.std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.epoch = 0

    def __len__(self) -> int:
        return self._num_batches

    def set_epoch(self, epoch: int) -> None:
        self.epoch = _check_int("epoch", epoch, 0)

    def _positions(self, b: int) -> torch.Tensor:
        """This rank's epoch positions of batch ``b``."""
        bs = self.batch_size
        lo, hi = b * bs, min((b + 1) * bs, self.num_samples)
        rank, world = self.shard
        if self.train and world > 1:  # this rank's B positions of global batch b of B * world
            return b * bs * world + rank * bs + torch.arange(bs)
        return torch.arange(self._start + lo, self._start + hi)

    def _draws(self, positions: np.ndarray, blocks: dict) -> np.ndarray:
        base = epoch_seed(self.seed, self.epoch)
        out = np.empty((len(positions), DRAWS), dtype=np.float64)
        for c in np.unique(positions // BLOCK).tolist():
            if c not in blocks:
                if len(blocks) > 2:  # positions rise through the epoch: older blocks are not read again
                    blocks.clear()
                g = torch.Generator().manual_seed(epoch_seed(base, 1 + c))
                blocks[c] = torch.rand((BLOCK, DRAWS), dtype=torch.float64, generator=g).numpy()
            sel = positions // BLOCK == c
            out[sel] = blocks[c][positions[sel] % BLOCK]
        return out

    def _keys(self, start: int) -> Iterator[tuple]:
        if not self.train:
            for b in range(start, self._num_batches):
                yield self._positions(b).numpy(), None, None
            return
        g = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        perm = torch.randperm(self.dataset_size, generator=g).numpy()
        blocks: dict = {}
        for b in range(start, self._num_batches):
            positions = self._positions(b).numpy()
            rows = perm[positions]
            draws = self._draws(positions, blocks)
            ds = self.dataset
            boxes = resized_crop_boxes(ds.widths[rows], ds.heights[rows], draws)
            flips = draws[:, -1] < 0.5 if self.flip else np.zeros(len(rows), dtype=bool)
            yield rows, boxes, flips

    def epoch_plan(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """This rank's dataset indices of the current epoch, in order, their crop boxes (top, left, height,
        width) and flips (None in eval mode); on the CPU, computed without decoding anything."""
        keys = list(self._keys(0))
        rows = torch.from_numpy(np.concatenate([k[0] for k in keys]))
        if not self.train:
            return rows, None, None
        return (
            rows,
            torch.from_numpy(np.concatenate([k[1] for k in keys])),
            torch.from_numpy(np.concatenate([k[2] for k in keys])),
        )

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.iter_batches()

    def iter_batches(self, start: int = 0, with_meta: bool = False) -> Iterator[tuple[torch.Tensor, ...]]:
        """Batches ``start, start + 1, ...`` of the current epoch; with ``with_meta`` each item is
        ``(x, y, index, view)``, the view index 0."""
        start = _check_int("start", start, 0)
        cuda = self.device.type == "cuda"
        options = {"num_workers": self.workers, "pin_memory": cuda}
        if self.workers:
            options["prefetch_factor"] = self.prefetch
        batches = torch.utils.data.DataLoader(self._decoder, batch_size=None, sampler=_Plan(self, start), **options)
        labels = self.dataset.labels
        for images, rows, error in batches:
            if error:
                raise DataError(error)
            x = images.to(self.device, non_blocking=cuda).to(torch.float32)
            x.div_(255.0).sub_(self._mean).div_(self._std)
            y = labels[rows].to(self.device, non_blocking=cuda)
            if with_meta:
                yield x, y, rows.to(self.device), torch.zeros(len(rows), dtype=torch.int64, device=self.device)
            else:
                yield x, y
