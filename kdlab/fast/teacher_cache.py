"""An exact teacher-output cache: the teacher's logits for every augmentation view, computed once.

With crop/flip augmentation a training image has exactly ``2 * (2p + 1)**2`` views (162 for the
CIFAR recipe, p = 4; see :mod:`kdlab.data.augment`), so a frozen teacher has a finite table of
outputs ``(N images, V views, K classes)``. It is computed once per (teacher weights, data, numeric
settings) and then read instead of running the teacher: a lookup by ``(dataset index, view index)``,
the pair ``DeviceLoader.iter_batches(with_meta=True)`` yields with every batch.

Size: ``N x V x K`` values per teacher, 1.5 GiB in bf16 for CIFAR-100 (50k x 162 x 100). It is
estimated before anything is computed and checked against free device memory (``device`` storage)
or free disk space; a ``disk`` table is computed straight into its memory-mapped file, never held
whole in device or host memory. Under torchrun rank 0 computes and writes the tables and the other
ranks read its files.

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
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kdlab import distributed
from kdlab.data.arrays import ArrayDataset
from kdlab.data.augment import AugmentSpec, Views, num_views, uncacheable_views, view_from_index
from kdlab.errors import ConfigError

__all__ = ["TeacherCache", "LogitTable", "CacheTooLarge", "cache_key", "build_table", "check_cacheable", "table_bytes"]

GiB = 2**30
# a device table leaves this share of the free device memory to training itself (weights, activations)
DEVICE_SHARE = 0.75


class CacheTooLarge(ConfigError):
    """The tables do not fit where they were asked to live (device memory or disk)."""


_NUMPY_STORAGE = {torch.float32: np.float32, torch.bfloat16: np.uint16}  # bf16 travels as its raw 16 bits


def check_cacheable(augment: AugmentSpec | None) -> None:
    problem = uncacheable_views(augment.rotation) if augment is not None else None
    if problem:
        raise ConfigError(f"teacher cache: {problem}")


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
    h.update(
        json.dumps(
            {"mean": dataset.mean, "std": dataset.std, "augment": aug, "torch": torch.__version__, **settings},
            sort_keys=True,
        ).encode()
    )
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
    up with repeated images whose outputs are dropped). ``out`` may live elsewhere (host memory, a
    memory-mapped file): it is written one block of ``batch_size`` images x every view at a time, so a
    memory-mapped file is written sequentially.
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
    all_views = [
        Views(
            *(torch.full((batch_size,), k, dtype=torch.int64, device=device) for k in view_from_index(v, pad)), no_angle
        )
        for v in range(views)
    ]
    chunks = range(0, n, batch_size)
    # a table elsewhere (a memory-mapped file while computing on CUDA) gets one copy per block of
    # images, not one device-to-host wait per forward
    staging = out.device != device
    for c_i, start in enumerate(chunks):
        idx = torch.arange(start, start + batch_size, device=device) % n
        count = min(batch_size, n - start)
        block = images.index_select(0, idx)
        dest = (
            torch.empty((count, views, out.shape[2]), dtype=out.dtype, device=device)
            if staging
            else out[start : start + count]
        )
        for v, view in enumerate(all_views):
            x = spec.apply(block, view)
            x.div_(255.0).sub_(m).div_(s)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast():
                logits = teacher(x)
            dest[:, v] = logits[:count].to(dtype=out.dtype)
        if staging:
            out[start : start + count] = dest.to(out.device)
        if progress is not None:
            progress(c_i + 1, len(chunks))


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
    except ValueError:  # damaged JSON or bytes that are not UTF-8: rebuilt
        return None
    itemsize = torch.empty((), dtype=dtype).element_size()
    if (
        tuple(meta.get("shape", ())) != shape
        or meta.get("dtype") != str(dtype)
        or data.stat().st_size != int(np.prod(shape)) * itemsize
    ):
        return None
    arr = np.memmap(data, dtype=_NUMPY_STORAGE[dtype], mode="c", shape=shape)  # copy-on-write: never written back
    table = torch.from_numpy(arr)
    if dtype == torch.bfloat16:
        table = table.view(torch.bfloat16)
    if storage == "device":
        table = table.to(device)
    return table


def _host_view(t: torch.Tensor) -> np.ndarray:
    t = t.detach().to("cpu").contiguous()
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()


def _write(root: Path, key: str, table: torch.Tensor, info: dict, rows: int = 1024) -> Path:
    """The table to ``<key>.logits`` in blocks of ``rows`` images: one block at a time in host memory."""
    root.mkdir(parents=True, exist_ok=True)
    data, _ = _paths(root, key)
    tmp = data.with_suffix(f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        for start in range(0, table.shape[0], rows):
            f.write(memoryview(_host_view(table[start : start + rows])).cast("B"))
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(data)
    _write_sidecar(root, key, tuple(table.shape), table.dtype, info)
    return data


def _write_sidecar(root: Path, key: str, shape: tuple, dtype: torch.dtype, info: dict) -> None:
    _, meta_path = _paths(root, key)
    meta_tmp = meta_path.with_suffix(f".tmp{os.getpid()}")
    meta_tmp.write_text(json.dumps({"shape": list(shape), "dtype": str(dtype), **info}, indent=2) + "\n")
    meta_tmp.replace(meta_path)  # the sidecar last: it marks the table complete


def _new_memmap(root: Path, key: str, shape: tuple, dtype: torch.dtype) -> tuple[torch.Tensor, np.memmap, Path]:
    """A writable memory-mapped file for a table computed straight to disk, under a temporary name."""
    root.mkdir(parents=True, exist_ok=True)
    data, _ = _paths(root, key)
    tmp = data.with_suffix(f".tmp{os.getpid()}")
    arr = np.memmap(tmp, dtype=_NUMPY_STORAGE[dtype], mode="w+", shape=shape)
    table = torch.from_numpy(arr)
    return (table.view(torch.bfloat16) if dtype == torch.bfloat16 else table), arr, tmp


def table_bytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()


def free_bytes(where: str, device: torch.device, cache_dir: Path | None) -> int | None:
    """Free device memory (``where='device'``) or free space on the cache's disk (``'disk'``); None if unknown."""
    if where == "disk":
        folder = Path(cache_dir)
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        return shutil.disk_usage(folder).free
    if device.type == "cuda":  # pragma: no cover - needs a GPU
        return torch.cuda.mem_get_info(device)[0]
    try:  # the CPU's "device memory" is the host's available memory
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _check_fits(need_memory: int, need_disk: int, device: torch.device, cache_dir: Path | None) -> None:
    if need_memory:
        free = free_bytes("device", device, cache_dir)
        if free is not None and need_memory > DEVICE_SHARE * free:
            raise CacheTooLarge(
                f"train.fast.cache_storage: the teacher logit tables need {need_memory / GiB:.2f} GiB of {device.type} "
                f"memory and {free / GiB:.2f} GiB are free (at most {DEVICE_SHARE:.0%} is used for them); set "
                "train.fast.cache_storage=disk (with train.fast.cuda_graph=false on CUDA), "
                "train.fast.cache_dtype=bfloat16, or train.teacher_cache=false"
            )
    if need_disk:
        free = free_bytes("disk", device, cache_dir)
        if free is not None and need_disk > free:
            raise CacheTooLarge(
                f"train.teacher_cache: the teacher logit tables need {need_disk / GiB:.2f} GiB on disk in "
                f"{cache_dir} and {free / GiB:.2f} GiB are free; free some space, point cache_dir elsewhere, "
                "or set train.teacher_cache=false"
            )


class TeacherCache:
    """The logit tables of a run's teachers; ``lookup(index, view)`` gives what the teachers would output.

    ``storage``: ``device`` keeps the tables in the device's memory (needed to capture the lookup in a
    CUDA graph); ``disk`` memory-maps them (CPU gather, then a copy to the device).
    """

    def __init__(self, tables: list[LogitTable], device: torch.device, storage: str = "device"):
        self.tables = tables
        self.device = torch.device(device)
        self.storage = storage

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
    ) -> TeacherCache:
        """Compute (or read back from ``cache_dir``) every teacher's table for ``dataset`` under ``augment``.

        The size is checked first (:class:`CacheTooLarge` when it does not fit). Under torchrun with a
        ``cache_dir``, rank 0 computes and writes the tables while the other ranks wait, then they read
        its files: one build per job, not one per rank.
        """
        check_cacheable(augment)
        if dtype not in _NUMPY_STORAGE:
            raise ConfigError(f"teacher cache: dtype {dtype} is not supported (float32 or bfloat16)")
        if storage not in ("device", "disk"):
            raise ConfigError(f"teacher cache: storage must be 'device' or 'disk', got {storage!r}")
        if storage == "disk" and cache_dir is None:
            raise ConfigError("teacher cache: storage 'disk' needs a cache directory")
        device = torch.device(device)
        args = (
            teachers,
            dataset,
            augment,
            device,
            batch_size,
            dtype,
            storage,
            Path(cache_dir) if cache_dir is not None else None,
            channels_last,
            autocast,
            log,
        )
        built: list[list[LogitTable]] = []
        if distributed.world_size() > 1 and cache_dir is not None:
            # rank 0 computes and writes; an error there is raised on every rank
            distributed.main_first(lambda: built.append(_tables(*args)))
        if not built:
            built.append(_tables(*args))  # one process, or the other ranks reading rank 0's files
        return cls(built[0], device, storage)


def _tables(
    teachers, dataset, augment, device, batch_size, dtype, storage, cache_dir, channels_last, autocast, log
) -> list[LogitTable]:
    pad = augment.crop_pad if augment is not None else 0
    settings = {
        "batch_size": batch_size,
        "dtype": str(dtype),
        "channels_last": channels_last,
        "autocast": autocast not in (None, contextlib.nullcontext),
        "device": device.type,
    }
    plans = []
    for teacher in teachers:
        key = cache_key(teacher, dataset, augment, settings)
        probe = next(p for p in teacher.parameters())
        shape = (len(dataset), num_views(pad), _num_outputs(teacher, dataset, probe))
        stored = cache_dir is not None and _open(cache_dir, key, shape, dtype, "disk", device) is not None
        plans.append((key, shape, stored))
    size = sum(table_bytes(shape, dtype) for _, shape, _ in plans)
    log(
        f"teacher cache: {len(plans)} table(s) of {plans[0][1][0]} images x {plans[0][1][1]} views, "
        f"{size / GiB:.2f} GiB in {str(dtype).removeprefix('torch.')} ({storage} storage)"
    )
    _check_fits(
        size if storage == "device" else 0,
        sum(table_bytes(shape, dtype) for _, shape, stored in plans if not stored) if cache_dir is not None else 0,
        device,
        cache_dir,
    )
    images = None
    tables = []
    for i, (teacher, (key, shape, stored)) in enumerate(zip(teachers, plans)):
        path = _paths(cache_dir, key)[0] if cache_dir is not None else None
        if stored:
            table = _open(cache_dir, key, shape, dtype, storage, device)
            if table is not None:  # None: another process replaced it in between; computed again below
                log(f"teacher cache: teacher {i} logits read from {path}")
                tables.append(LogitTable(table, key, path))
                continue
        if images is None:
            images = dataset.images.to(device)
        log(f"teacher cache: computing teacher {i}'s logits for {shape[0]} images x {shape[1]} views")
        info = {"teacher": type(teacher).__name__, "data": dataset.name, "views": shape[1], **settings}
        if storage == "disk":  # straight into the file: the table is never whole in device or host memory
            table, arr, tmp = _new_memmap(cache_dir, key, shape, dtype)
            build_table(teacher, images, dataset.mean, dataset.std, augment, table, batch_size, channels_last, autocast)
            arr.flush()
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            del table, arr
            tmp.replace(path)
            _write_sidecar(cache_dir, key, shape, dtype, info)
            table = _open(cache_dir, key, shape, dtype, storage, device)
        else:
            table = torch.empty(shape, dtype=dtype, device=device)
            build_table(teacher, images, dataset.mean, dataset.std, augment, table, batch_size, channels_last, autocast)
            if cache_dir is not None:
                _write(cache_dir, key, table, info)
        tables.append(LogitTable(table, key, path))
    return tables


@torch.no_grad()
def _num_outputs(teacher: nn.Module, dataset: ArrayDataset, probe: torch.Tensor) -> int:
    x = torch.zeros((2, *dataset.images.shape[1:]), device=probe.device, dtype=probe.dtype)
    out = teacher(x)
    if out.dim() != 2:
        raise ConfigError(f"teacher cache: the teacher returns shape {tuple(out.shape)}, not (N, classes) logits")
    return int(out.shape[1])
