"""An exact teacher-output cache: the teacher's logits for every augmentation view, computed once.

With crop/flip augmentation a training image has exactly ``2 * (2p + 1)**2`` views (162 for the
CIFAR recipe, p = 4; see :mod:`kdlab.data.augment`), so a frozen teacher has a finite table of
outputs ``(N images, V views, K classes)``. It is computed once per (teacher weights, data, numeric
settings) and then read instead of running the teacher: a lookup by ``(dataset index, view index)``,
the pair ``DeviceLoader.iter_batches(with_meta=True)`` yields with every batch.

Exactness: each view is computed in full batches of the training batch size, with the loader's
own crop/flip and normalisation, the same memory format and autocast, so on the CPU (fp32 storage)
a lookup equals the online teacher output bit for bit (convolution kernels there do not depend on
where a sample sits in a batch). On CUDA the table is built in larger batches and kept in bf16: it
then agrees with the online output to bf16 rounding, not bit for bit.

Rotation (the Tf-KD protocol) draws a continuous angle per sample: views cannot be enumerated, and
the cache refuses such an augmentation. The table lives in a raw file ``<key>.logits`` with a JSON
sidecar under the cache directory, keyed by a hash of everything the logits depend on; it is read
into device memory or memory-mapped from disk.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from kdlab.data.arrays import ArrayDataset
from kdlab.data.augment import AugmentSpec, Views, num_views, view_from_index
from kdlab.errors import ConfigError

__all__ = ["TeacherCache", "LogitTable", "cache_key", "build_table", "check_cacheable"]

_NUMPY_STORAGE = {torch.float32: np.float32, torch.bfloat16: np.uint16}  # bf16 travels as its raw 16 bits


def check_cacheable(augment: AugmentSpec | None) -> None:
    if augment is not None and augment.rotation:
        raise ConfigError(
            f"teacher cache: augmentation rotation={augment.rotation:g} draws a continuous angle per sample, so the "
            "views cannot be enumerated and cached; set train.teacher_cache=false (or data.augment.rotation=0)"
        )


def _hash_tensor(h, t: torch.Tensor) -> None:
    t = t.detach().to("cpu").contiguous()
    h.update(f"{tuple(t.shape)}{t.dtype}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def cache_key(teacher: nn.Module, dataset: ArrayDataset, augment: AugmentSpec | None, settings: dict) -> str:
    """Hash of the teacher (architecture and weights), the images, the views and the numeric settings."""
    h = hashlib.sha256()
    h.update(repr(teacher).encode())
    for name, value in teacher.state_dict().items():
        h.update(name.encode())
        _hash_tensor(h, value)
    _hash_tensor(h, dataset.images)
    aug = (augment.crop_pad, augment.flip) if augment is not None else (0, False)
    h.update(json.dumps({"mean": dataset.mean, "std": dataset.std, "augment": aug, "torch": torch.__version__,
                         **settings}, sort_keys=True).encode())
    return h.hexdigest()[:20]


@torch.no_grad()
def build_table(
    teacher: nn.Module,
    images: torch.Tensor,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    augment: AugmentSpec | None,
    out: torch.Tensor,
    batch_size: int,
    channels_last: bool = False,
    autocast: Callable = None,
    progress: Callable[[int, int], None] | None = None,
) -> None:
    """Fill ``out`` (N, V, K) with ``teacher``'s logits of every view of every image (uint8, on its device).

    The crop/flip and normalisation are the loader's own (``AugmentSpec.apply`` then
    ``/255 - mean / std``); every forward has exactly ``batch_size`` samples (the last chunk is filled
    up with repeated images whose outputs are dropped).
    """
    check_cacheable(augment)
    autocast = autocast or contextlib.nullcontext
    n, c = images.shape[:2]
    device = images.device
    pad = augment.crop_pad if augment is not None else 0
    views = num_views(pad)
    m = torch.tensor(mean, dtype=torch.float32, device=device).view(1, c, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=device).view(1, c, 1, 1)
    spec = augment if augment is not None else AugmentSpec()
    no_angle = torch.zeros(batch_size, dtype=torch.float32, device=device)
    for v in range(views):
        dx, dy, flip = (torch.full((batch_size,), k, dtype=torch.int64, device=device) for k in view_from_index(v, pad))
        view = Views(dx, dy, flip, no_angle)
        for start in range(0, n, batch_size):
            idx = torch.arange(start, start + batch_size, device=device) % n
            count = min(batch_size, n - start)
            x = spec.apply(images.index_select(0, idx), view)
            x.div_(255.0).sub_(m).div_(s)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast():
                logits = teacher(x)
            out[start : start + count, v] = logits[:count].to(device=out.device, dtype=out.dtype)
        if progress is not None:
            progress(v + 1, views)


@dataclass
class LogitTable:
    """One teacher's (N, V, K) table and where it came from."""

    logits: torch.Tensor
    key: str
    path: Path | None

    def lookup(self, index: torch.Tensor, view: torch.Tensor, device: torch.device) -> torch.Tensor:
        """float32 (B, K) logits of dataset samples ``index`` under views ``view``, on ``device``."""
        if self.logits.device != index.device:  # a memory-mapped table: gather on its side
            index, view = index.to(self.logits.device), view.to(self.logits.device)
        return self.logits[index, view].to(device=device, dtype=torch.float32, non_blocking=True)


def _paths(root: Path, key: str) -> tuple[Path, Path]:
    return root / f"{key}.logits", root / f"{key}.json"


def _open(root: Path, key: str, shape: tuple[int, int, int], dtype: torch.dtype, storage: str, device: torch.device):
    data, meta_path = _paths(root, key)
    if not meta_path.exists() or not data.exists():
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError:
        return None
    itemsize = torch.empty((), dtype=dtype).element_size()
    if tuple(meta.get("shape", ())) != shape or meta.get("dtype") != str(dtype) or data.stat().st_size != int(np.prod(shape)) * itemsize:
        return None
    arr = np.memmap(data, dtype=_NUMPY_STORAGE[dtype], mode="c", shape=shape)  # copy-on-write: never written back
    table = torch.from_numpy(arr)
    if dtype == torch.bfloat16:
        table = table.view(torch.bfloat16)
    if storage == "device":
        table = table.to(device)
    return table


def _write(root: Path, key: str, table: torch.Tensor, info: dict) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    data, meta_path = _paths(root, key)
    tmp = data.with_suffix(f".tmp{os.getpid()}")
    raw = table.detach().to("cpu").contiguous()
    if raw.dtype == torch.bfloat16:
        raw = raw.view(torch.int16)
    with open(tmp, "wb") as f:
        f.write(raw.numpy().tobytes())
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(data)
    meta_tmp = meta_path.with_suffix(f".tmp{os.getpid()}")
    meta_tmp.write_text(json.dumps({"shape": list(table.shape), "dtype": str(table.dtype), **info}, indent=2) + "\n")
    meta_tmp.replace(meta_path)  # the sidecar last: it marks the table complete
    return data


class TeacherCache:
    """The logit tables of a run's teachers; ``lookup(index, view)`` gives what the teachers would output.

    ``storage``: ``device`` keeps the tables in the device's memory (needed to capture the lookup in a
    CUDA graph); ``disk`` memory-maps them (CPU gather, then a copy to the device).
    """

    def __init__(self, tables: list[LogitTable], device: torch.device):
        self.tables = tables
        self.device = torch.device(device)

    def lookup(self, index: torch.Tensor, view: torch.Tensor) -> list[torch.Tensor]:
        return [t.lookup(index, view, self.device) for t in self.tables]

    @classmethod
    def build(
        cls,
        teachers: list[nn.Module],
        dataset: ArrayDataset,
        augment: AugmentSpec | None,
        device: torch.device,
        batch_size: int,
        dtype: torch.dtype = torch.float32,
        storage: str = "device",
        cache_dir: Path | None = None,
        channels_last: bool = False,
        autocast: Callable | None = None,
        log: Callable[[str], None] = lambda _m: None,
    ) -> "TeacherCache":
        """Compute (or read back from ``cache_dir``) every teacher's table for ``dataset`` under ``augment``."""
        check_cacheable(augment)
        if dtype not in _NUMPY_STORAGE:
            raise ConfigError(f"teacher cache: dtype {dtype} is not supported (float32 or bfloat16)")
        if storage not in ("device", "disk"):
            raise ConfigError(f"teacher cache: storage must be 'device' or 'disk', got {storage!r}")
        if storage == "disk" and cache_dir is None:
            raise ConfigError("teacher cache: storage 'disk' needs a cache directory")
        device = torch.device(device)
        pad = augment.crop_pad if augment is not None else 0
        settings = {"batch_size": batch_size, "dtype": str(dtype), "channels_last": channels_last,
                    "autocast": autocast not in (None, contextlib.nullcontext), "device": device.type}
        images = None
        tables = []
        for i, teacher in enumerate(teachers):
            key = cache_key(teacher, dataset, augment, settings)
            probe = next(p for p in teacher.parameters())
            num_classes = _num_outputs(teacher, dataset, probe)
            shape = (len(dataset), num_views(pad), num_classes)
            table = _open(Path(cache_dir), key, shape, dtype, storage, device) if cache_dir is not None else None
            if table is not None:
                log(f"teacher cache: teacher {i} logits read from {_paths(Path(cache_dir), key)[0]}")
                tables.append(LogitTable(table, key, _paths(Path(cache_dir), key)[0]))
                continue
            if images is None:
                images = dataset.images.to(device)
            log(f"teacher cache: computing teacher {i}'s logits for {shape[0]} images x {shape[1]} views")
            table = torch.empty(shape, dtype=dtype, device=device)
            build_table(teacher, images, dataset.mean, dataset.std, augment, table, batch_size, channels_last, autocast)
            path = None
            if cache_dir is not None:
                path = _write(Path(cache_dir), key, table, {"teacher": type(teacher).__name__, "data": dataset.name,
                                                            "views": shape[1], **settings})
                if storage == "disk":
                    del table
                    table = _open(Path(cache_dir), key, shape, dtype, storage, device)
            tables.append(LogitTable(table, key, path))
        return cls(tables, device)


@torch.no_grad()
def _num_outputs(teacher: nn.Module, dataset: ArrayDataset, probe: torch.Tensor) -> int:
    x = torch.zeros((2, *dataset.images.shape[1:]), device=probe.device, dtype=probe.dtype)
    out = teacher(x)
    if out.dim() != 2:
        raise ConfigError(f"teacher cache: the teacher returns shape {tuple(out.shape)}, not (N, classes) logits")
    return int(out.shape[1])
