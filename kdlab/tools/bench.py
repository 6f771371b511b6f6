"""Training-speed benchmark: images/s of the teacher forward, the student step and the distillation step.

Every (teacher, student) pair and task is measured in each mode, one after another in the same
process, on the same initial weights and data:

``reference``   a loop the way common public KD code is written: fp32, NCHW, eager; per-image
                pad + random crop + flip in a torch ``DataLoader`` with worker processes; the teacher
                in eval mode under ``no_grad``; ``loss.item()`` every step.
``minimal``     a hand-written loop with exactly kdlab's default settings (device-resident data with
                batched augmentation, the default memory format and autocast, no per-step sync):
                the yardstick for kdlab's own overhead.
``kdlab``       kdlab's default path: ``Distiller`` + ``DeviceLoader`` + the step of ``kdlab.train.fit``
                (``fit`` itself runs; a wrapper around its loader reads the clock).
``kdlab-fast``  every speed option: BN folded into the teachers, channels_last, bf16 autocast and a
                CUDA graph of the whole step on CUDA (the same step runs eagerly on CPU), optional
                ``torch.compile``, and the exact teacher cache for logit-only methods when enabled.

The data are synthetic CIFAR-shaped uint8 images (3x32x32, 100 classes, CIFAR-100 statistics), so
the benchmark runs offline; speed does not depend on pixel values. The clock starts after
``warmup`` steps and stops after ``steps`` more, with a device synchronisation at both ends only.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as nnf
from torch import nn

from kdlab import __version__, models
from kdlab.config import FastConfig, LossConfig, TrainConfig
from kdlab.data import ArrayDataset, DeviceLoader, default_augment
from kdlab.data.cifar import CIFAR100_MEAN, CIFAR100_STD
from kdlab.distiller import Distiller
from kdlab.errors import ConfigError
from kdlab.losses import feature_functional as kdff
from kdlab.losses import functional as kdf
from kdlab.losses.heads import translator

MODES = ("reference", "minimal", "kdlab", "kdlab-fast")
DEFAULT_PAIRS = "resnet56:resnet20,resnet32x4:resnet8x4"
DEFAULT_METHODS = "kd,nst,pfeed2"
DATA_NOTE = "synthetic CIFAR-shaped uint8 images (3x32x32, 100 classes, CIFAR-100 mean/std), standard crop(pad 4)+flip"
LR, MOMENTUM, WEIGHT_DECAY = 0.05, 0.9, 5e-4


@dataclass(frozen=True)
class BenchMethod:
    """A distillation method as the benchmark runs it: how many teachers, the loss, and whether it reads
    the teachers' logits only (then the teacher cache may serve them)."""

    teachers: int
    loss: LossConfig
    logit_only: bool


# The published weights of each method (RepDistiller's KD, NST with its polynomial kernel, pFEED beta 500).
METHODS = {
    "kd": BenchMethod(1, LossConfig(ce=0.1, terms={"kd": {"weight": 0.9, "T": 4.0}}), True),
    "nst": BenchMethod(1, LossConfig(ce=1.0, terms={"nst": {"weight": 50.0, "kernel": "poly"}}), False),
    "pfeed2": BenchMethod(2, LossConfig(ce=1.0, terms={"feed": {"weight": 500.0}}), False),
    # mdistiller's DKD (beta 8) and RepDistiller's CRD (16,384 negatives from a bank over the training set)
    "dkd": BenchMethod(
        1,
        LossConfig(ce=1.0, terms={"dkd": {"weight": 1.0, "alpha": 1.0, "beta": 8.0, "T": 4.0, "warmup_epochs": 20}}),
        True,
    ),
    "crd": BenchMethod(1, LossConfig(ce=1.0, terms={"crd": {"weight": 0.8}}), False),
}
CRD_K, CRD_T, CRD_M, CRD_DIM = 16384, 0.07, 0.5, 128
CRD_MIN_IMAGES = 50_000  # a CIFAR-sized bank, so that the negatives cost what they cost on CIFAR-100
STUDENT_ONLY = BenchMethod(0, LossConfig(ce=1.0), False)


# ------------------------------------------------------------------------------------------ data


def synthetic_dataset(n: int, seed: int = 0) -> ArrayDataset:
    g = torch.Generator().manual_seed(seed)
    return ArrayDataset(
        images=torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8),
        labels=torch.randint(0, 100, (n,), generator=g),
        num_classes=100,
        mean=CIFAR100_MEAN,
        std=CIFAR100_STD,
        class_names=[str(i) for i in range(100)],
        name="synthetic",
    )


class PerImageAugmented(torch.utils.data.Dataset):
    """One image at a time, in a worker: zero-pad, random crop, random flip, normalise (torchvision-style)."""

    def __init__(self, data: ArrayDataset, pad: int = 4):
        self.images, self.labels, self.pad = data.images, data.labels, pad
        self.mean = torch.tensor(data.mean).view(-1, 1, 1)
        self.std = torch.tensor(data.std).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        img = self.images[i]
        _, h, w = img.shape
        p = self.pad
        padded = nnf.pad(img, (p, p, p, p))
        top, left = (int(v) for v in torch.randint(0, 2 * p + 1, (2,)))
        crop = padded[:, top : top + h, left : left + w]
        if torch.rand(()) < 0.5:
            crop = crop.flip(2)
        return (crop.float() / 255 - self.mean) / self.std, self.labels[i], i


# ------------------------------------------------------------------------------------------ clock and memory


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Window:
    """Marks the clock when batch ``warmup`` and batch ``warmup + steps`` are requested (both after a sync)."""

    def __init__(self, warmup: int, steps: int, device: torch.device):
        self.warmup, self.steps, self.device = warmup, steps, device
        self.t0 = self.t1 = None

    def mark(self, k: int) -> None:
        if k in (self.warmup, self.warmup + self.steps):
            _sync(self.device)
            now = time.perf_counter()
            if k == self.warmup:
                self.t0 = now
            else:
                self.t1 = now

    def wrap(self, batches: Iterable):
        it = iter(batches)
        k = 0
        while True:
            self.mark(k)
            if k == self.warmup + self.steps:
                return
            try:
                item = next(it)
            except StopIteration:
                return
            yield item
            k += 1

    @property
    def seconds(self) -> float:
        if self.t0 is None or self.t1 is None:
            raise RuntimeError("the timed loop ended before its window closed")
        return self.t1 - self.t0


class TimedLoader:
    """A DeviceLoader whose batches pass through a Window, so ``fit`` itself can be timed."""

    def __init__(self, loader: DeviceLoader, window: Window):
        self._loader, self._window = loader, window

    def __getattr__(self, name):
        return getattr(self._loader, name)

    def __len__(self) -> int:
        return len(self._loader)

    def __iter__(self):
        return self._window.wrap(iter(self._loader))

    def iter_batches(self, **kwargs):
        return self._window.wrap(self._loader.iter_batches(**kwargs))


class PeakMemory:
    """Peak memory over a block: CUDA allocator peak, or the process's peak RSS (VmHWM, reset via clear_refs).

    On CUDA ``reserved_mib`` is the caching allocator's peak reservation as well: a CUDA graph's private
    memory pool is reserved, not allocated, so it shows there only.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "cuda_max_allocated" if device.type == "cuda" else "rss_peak"
        self.mib: float | None = None
        self.reserved_mib: float | None = None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                self.kind = "rss_peak_since_start"  # no reset possible: the lifetime peak
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.mib = torch.cuda.max_memory_allocated(self.device) / 2**20
            self.reserved_mib = torch.cuda.max_memory_reserved(self.device) / 2**20
            return False
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    self.mib = int(line.split()[1]) / 1024
        except OSError:
            self.mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return False


# ------------------------------------------------------------------------------------------ hand-written loops


class HandFeatureHooks:
    """Forward hooks keeping the outputs of named modules, as hand-written KD code does it."""

    def __init__(self, model: nn.Module, names: list[str]):
        self.out: dict[str, torch.Tensor] = {}
        modules = dict(model.named_modules())
        self.names = names
        for n in names:
            modules[n].register_forward_hook(lambda _m, _i, o, n=n: self.out.__setitem__(n, o))

    def take(self) -> list[torch.Tensor]:
        return [self.out[n] for n in self.names]


def _stage_names(model: nn.Module, method: str) -> list[str]:
    stages = [e["module"] for e in model.feature_info]
    if method == "crd":
        return [model.embedding_module]
    return {"nst": stages, "pfeed2": stages[-1:]}.get(method, [])


def _matched(fs: torch.Tensor, ft: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if fs.shape[-2:] == ft.shape[-2:]:
        return fs, ft
    if fs.shape[-1] > ft.shape[-1]:
        return nnf.adaptive_avg_pool2d(fs, ft.shape[-2:]), ft
    return fs, nnf.adaptive_avg_pool2d(ft, fs.shape[-2:])


class HandCRD:
    """CRD for the hand-written loops: two linear embeddings, two banks, NCE; the maths of kdlab.losses.crd."""

    def __init__(self, models_: Models, labels: torch.Tensor, device: torch.device):
        def width(m: nn.Module) -> int:
            return m.fc.in_features if hasattr(m, "fc") else m.feature_info[-1]["channels"]

        self.embed_s = nn.Linear(width(models_.student), CRD_DIM).to(device)
        self.embed_t = nn.Linear(width(models_.teachers[0]), CRD_DIM).to(device)
        stdv = 1.0 / (CRD_DIM / 3) ** 0.5
        self.banks = [torch.rand(len(labels), CRD_DIM, device=device).mul_(2 * stdv).add_(-stdv) for _ in range(2)]
        self.labels, self.z = labels.to(device), None
        self.sampler: torch.Generator | None = None  # None: the global random stream

    def parameters(self):
        return [*self.embed_s.parameters(), *self.embed_t.parameters()]

    def loss(self, s_feat: torch.Tensor, t_feat: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        from kdlab.losses.crd import contrast_scores, nce_loss, sample_contrast

        f_s = nnf.normalize(self.embed_s(s_feat.flatten(1).float()), dim=1)
        f_t = nnf.normalize(self.embed_t(t_feat.flatten(1).float()), dim=1)
        with torch.no_grad():
            sample = sample_contrast(idx, self.labels, CRD_K, generator=self.sampler)
        out_s = contrast_scores(f_s, self.banks[1], sample, CRD_T)
        out_t = contrast_scores(f_t, self.banks[0], sample, CRD_T)
        if self.z is None:
            self.z = (out_s.detach().mean() * len(self.labels), out_t.detach().mean() * len(self.labels))
        n = len(self.labels)
        loss = nce_loss(out_s / self.z[0], n) + nce_loss(out_t / self.z[1], n)
        with torch.no_grad():
            for bank, f in zip(self.banks, (f_s, f_t)):
                bank.index_copy_(0, idx, nnf.normalize(bank[idx] * CRD_M + f.detach() * (1 - CRD_M), dim=1))
        return loss


def hand_loss(
    method: str,
    s_logits,
    y,
    s_feats,
    t_logits,
    t_feats,
    translators,
    crd: HandCRD | None = None,
    idx: torch.Tensor | None = None,
) -> torch.Tensor:
    ce = nnf.cross_entropy(s_logits.float(), y)
    if method == "student":
        return ce
    if method == "kd":
        return 0.1 * ce + 0.9 * kdf.kd(s_logits, t_logits[0], T=4.0)
    if method == "nst":
        return ce + 50.0 * sum(kdff.nst(*_matched(fs, ft), kernel="poly") for fs, ft in zip(s_feats, t_feats[0]))
    if method == "pfeed2":
        return ce + 500.0 * sum(kdf.factor(tr(s_feats[-1]), ft[-1]) for tr, ft in zip(translators, t_feats))
    if method == "dkd":  # past its warm-up: the full term
        from kdlab.losses.dkd import dkd

        return ce + dkd(s_logits, t_logits[0], y, alpha=1.0, beta=8.0, T=4.0)
    if method == "crd":
        return ce + 0.8 * crd.loss(s_feats[0], t_feats[0][0], idx)
    raise ConfigError(f"unknown bench method {method!r}")


@dataclass
class Models:
    teachers: list[nn.Module]
    student: nn.Module

    def fresh(self, n_teachers: int) -> Models:
        return Models([copy.deepcopy(t) for t in self.teachers[:n_teachers]], copy.deepcopy(self.student))


def _translators(models_: Models, method: str, device: torch.device) -> list[nn.Module]:
    if method != "pfeed2":
        return []
    cs = models_.student.feature_info[-1]["channels"]
    return [translator(cs, t.feature_info[-1]["channels"]).to(device) for t in models_.teachers]


def hand_loop(
    method: str,
    models_: Models,
    batches: Iterable,
    device: torch.device,
    channels_last: bool,
    autocast: Callable,
    sync_every_step: bool,
    fold_teachers: bool = False,
    labels: torch.Tensor | None = None,
) -> None:
    from kdlab.fast.fold import fold_batchnorm

    student, teachers = models_.student.to(device).train(), [t.to(device).eval() for t in models_.teachers]
    translators = _translators(models_, method, device)
    if channels_last:
        for m in [student, *teachers, *translators]:
            m.to(memory_format=torch.channels_last)
    for t in teachers if fold_teachers else []:
        fold_batchnorm(t)  # its default probe: two zero 32x32 images on the teacher's device
    s_hooks = HandFeatureHooks(student, _stage_names(student, method))
    t_hooks = [HandFeatureHooks(t, _stage_names(t, method)) for t in teachers]
    crd = HandCRD(models_, labels, device) if method == "crd" else None
    params = [p for m in [student, *translators] for p in m.parameters()] + (crd.parameters() if crd else [])
    opt = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    running = torch.zeros((), device=device)
    for x, y, *meta in batches:  # meta: the samples' indices (and views), which CRD reads
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        idx = meta[0].to(device) if meta else None
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast():
            with torch.no_grad():
                t_logits = [t(x) for t in teachers]
                t_feats = [h.take() for h in t_hooks]
            s_logits = student(x)
            loss = hand_loss(method, s_logits, y, s_hooks.take(), t_logits, t_feats, translators, crd, idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if sync_every_step:
            running += loss.item()  # what most public training scripts do for their running average
        else:
            running += loss.detach()


# ------------------------------------------------------------------------------------------ the modes


@dataclass
class Setting:
    device: torch.device
    batch_size: int
    steps: int
    warmup: int
    workers: int
    compile: bool
    teacher_cache: bool
    data: ArrayDataset
    tmp: Path
    log: Callable[[str], None] = print


@dataclass
class Measure:
    seconds: float
    images: int
    peak_mib: float | None
    memory_kind: str
    options: str
    setup_seconds: float = 0.0
    extra: dict = field(default_factory=dict)
    reserved_mib: float | None = None

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds


def _default_cfg(s: Setting, **update) -> TrainConfig:
    return TrainConfig(
        epochs=1,
        batch_size=s.batch_size,
        lr=LR,
        momentum=MOMENTUM,
        weight_decay=WEIGHT_DECAY,
        max_steps_per_epoch=s.warmup + s.steps,
        device=s.device.type,
        **update,
    )


def _fast_cfg(s: Setting, method: BenchMethod) -> TrainConfig:
    from kdlab.losses import TERMS

    # terms that read the progress or the indices run in the eager step (the graph step refuses them)
    eager = any(TERMS[t].needs_progress or TERMS[t].needs_indices for t in method.loss.terms)
    return _default_cfg(
        s,
        amp="bf16" if s.device.type == "cuda" else "off",
        channels_last="on",
        compile=s.compile,
        teacher_cache=s.teacher_cache and method.logit_only,
        fast=FastConfig(graph_step=not eager, cuda_graph=not eager, fold_teacher=True),
    )


def _options(cfg: TrainConfig, device: torch.device, teachers: bool = True) -> str:
    from kdlab.compute import use_channels_last

    amp = cfg.amp == "bf16" or (cfg.amp == "auto" and device.type == "cuda")
    parts = ["bf16" if amp else "fp32", "channels_last" if use_channels_last(cfg, device) else "NCHW"]
    if cfg.fast.fold_teacher and teachers:
        parts.append("teacher BN folded")
    if cfg.fast.graph_step:
        parts.append("CUDA graph" if device.type == "cuda" and cfg.fast.cuda_graph else "graph step (eager)")
    if cfg.compile:
        parts.append("compile")
    if cfg.teacher_cache:
        parts.append("teacher cache")
    return ", ".join(parts)


def _teacher_input(s: Setting) -> torch.Tensor:
    x = s.data.images[: s.batch_size].to(s.device).float().div_(255)
    mean = torch.tensor(s.data.mean, device=s.device).view(1, -1, 1, 1)
    std = torch.tensor(s.data.std, device=s.device).view(1, -1, 1, 1)
    return (x - mean) / std


def measure_teacher(mode: str, models_: Models, s: Setting) -> Measure:
    """Forward passes of one teacher on a fixed batch."""
    from kdlab.compute import autocast_factory, use_channels_last
    from kdlab.fast.fold import fold_batchnorm

    teacher = models_.teachers[0].to(s.device).eval().requires_grad_(False)
    x = _teacher_input(s)
    window = Window(s.warmup, s.steps, s.device)
    with PeakMemory(s.device) as mem:
        if mode == "reference":
            options, run = "fp32, NCHW, no_grad", lambda: teacher(x)
            grad_mode = torch.no_grad
        elif mode in ("minimal", "kdlab"):
            cfg = _default_cfg(s)
            cl, autocast = use_channels_last(cfg, s.device), autocast_factory(cfg, s.device)
            if cl:
                teacher.to(memory_format=torch.channels_last)
                x = x.contiguous(memory_format=torch.channels_last)
            if cfg.fast.fold_teacher:
                fold_batchnorm(teacher, x[:2])
            if mode == "kdlab":  # through the Distiller's teacher path
                distiller = Distiller(nn.Linear(1, 1), [teacher], METHODS["kd"].loss)
                y = torch.zeros(len(x), dtype=torch.int64, device=s.device)
                run = lambda: distiller.outputs(x, y, student=False)  # noqa: E731
            else:
                run = lambda: teacher(x)  # noqa: E731
            options = _options(cfg, s.device) + ", no_grad"
            grad_mode = lambda: _chain(torch.no_grad(), autocast())  # noqa: E731
        else:
            cfg = _fast_cfg(s, METHODS["kd"])
            autocast = autocast_factory(cfg, s.device)
            teacher.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
            fold_batchnorm(teacher, x[:2])
            options = (
                _options(
                    cfg.model_copy(
                        update={"teacher_cache": False, "compile": False, "fast": FastConfig(fold_teacher=True)}
                    ),
                    s.device,
                )
                + ", inference_mode"
            )
            if s.device.type == "cuda":
                options += ", CUDA graph"
            grad_mode = lambda: _chain(torch.inference_mode(), autocast())  # noqa: E731
            run = lambda: teacher(x)  # noqa: E731
            if s.device.type == "cuda":
                run = _cuda_graphed(run, grad_mode)
        for _ in window.wrap(range(s.warmup + s.steps)):
            with grad_mode():
                run()
    return Measure(window.seconds, s.steps * s.batch_size, mem.mib, mem.kind, options, reserved_mib=mem.reserved_mib)


@contextlib.contextmanager
def _chain(*managers):
    with contextlib.ExitStack() as stack:
        for m in managers:
            stack.enter_context(m)
        yield


def _cuda_graphed(run: Callable, grad_mode: Callable) -> Callable:  # pragma: no cover - needs a GPU
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), grad_mode():
        for _ in range(3):
            run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), grad_mode():
        run()
    return graph.replay


def measure_training(mode: str, task: str, method: BenchMethod, models_: Models, s: Setting) -> Measure:
    """Training steps of the student alone (task 'student') or with a method's teachers, in one mode."""
    from kdlab.compute import autocast_factory, use_channels_last

    fresh = models_.fresh(method.teachers)
    window = Window(s.warmup, s.steps, s.device)
    setup, extra = 0.0, {}
    with PeakMemory(s.device) as mem:
        if mode == "reference":
            loader = torch.utils.data.DataLoader(
                PerImageAugmented(s.data),
                batch_size=s.batch_size,
                shuffle=True,
                drop_last=True,
                num_workers=s.workers,
                pin_memory=s.device.type == "cuda",
            )
            hand_loop(
                task,
                fresh,
                window.wrap(loader),
                s.device,
                False,
                contextlib.nullcontext,
                sync_every_step=True,
                labels=s.data.labels,
            )
            options = f"fp32, NCHW, DataLoader({s.workers} workers, per-image crop/flip), .item() per step"
        elif mode == "minimal":
            cfg = _default_cfg(s)
            loader = DeviceLoader(
                s.data, s.batch_size, train=True, augment=default_augment("cifar100"), device=s.device
            )
            batches = loader.iter_batches(with_meta=True) if task == "crd" else loader
            hand_loop(
                task,
                fresh,
                window.wrap(batches),
                s.device,
                use_channels_last(cfg, s.device),
                autocast_factory(cfg, s.device),
                sync_every_step=False,
                fold_teachers=cfg.fast.fold_teacher,
                labels=s.data.labels,
            )
            options = _options(cfg, s.device, bool(method.teachers)) + ", hand-written loop"
        else:
            cfg = _default_cfg(s) if mode == "kdlab" else _fast_cfg(s, method)
            setup, extra = _fit(fresh, method, cfg, window, s)
            options = _options(cfg, s.device, bool(method.teachers))
    return Measure(window.seconds, s.steps * s.batch_size, mem.mib, mem.kind, options, setup, extra, mem.reserved_mib)


def _fit(fresh: Models, method: BenchMethod, cfg: TrainConfig, window: Window, s: Setting) -> tuple[float, dict]:
    from kdlab.compute import autocast_factory
    from kdlab.fast.teachers import prepare_teachers
    from kdlab.train import fit

    distiller = Distiller(fresh.student, fresh.teachers, method.loss).to(s.device)
    probe = _teacher_input(s)[:8]
    distiller.build(probe, torch.zeros(len(probe), dtype=torch.int64, device=s.device))
    distiller.attach_training_set(s.data.labels.to(s.device))
    loader = DeviceLoader(s.data, s.batch_size, train=True, augment=default_augment("cifar100"), device=s.device)
    t0 = time.perf_counter()
    cache = None
    extra = {}
    if fresh.teachers and (cfg.teacher_cache or cfg.fast.fold_teacher):
        cache = prepare_teachers(
            distiller, s.data, loader, cfg, s.tmp / "logits", autocast_factory(cfg, s.device), lambda _m: None
        )
        if cache is not None:
            extra["cache_views"] = int(cache.tables[0].logits.shape[1])
    setup = time.perf_counter() - t0
    with tempfile.TemporaryDirectory(dir=s.tmp) as run_dir:
        fit(distiller, TimedLoader(loader, window), None, cfg, Path(run_dir), lambda _m: None, teacher_cache=cache)
    return setup, extra


# ------------------------------------------------------------------------------------------ driver


def parse_pairs(text: str) -> list[tuple[str, str]]:
    pairs = []
    for item in (p.strip() for p in text.split(",") if p.strip()):
        if item.count(":") != 1:
            raise ConfigError(f"--pairs: {item!r} is not TEACHER:STUDENT")
        teacher, student = item.split(":")
        for name in (teacher, student):
            if name not in models.names():
                models.create(name)  # raises ConfigError naming the close matches
        pairs.append((teacher, student))
    if not pairs:
        raise ConfigError("--pairs: no pair given")
    return pairs


def parse_list(text: str, valid: Iterable[str], what: str) -> list[str]:
    items = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in items if m not in valid]
    if bad or not items:
        raise ConfigError(f"--{what}: unknown {', '.join(bad) or '(none given)'}; valid: {', '.join(valid)}")
    return items


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{os.cpu_count()}-core CPU ({platform.machine()})"


def run_bench(
    pairs: list[tuple[str, str]],
    methods: list[str],
    modes: list[str],
    device: torch.device,
    batch_size: int = 64,
    steps: int = 10,
    warmup: int | None = None,
    repeats: int = 1,
    workers: int | None = None,
    compile: bool = False,
    teacher_cache: bool | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Measure every (pair, task, mode); returns the JSON-ready report."""
    if steps < 1 or batch_size < 1 or repeats < 1:
        raise ConfigError("bench: --steps, --batch-size and --repeats must be >= 1")
    warmup = (5 if device.type == "cuda" else 2) if warmup is None else warmup
    if warmup < 0:
        raise ConfigError("bench: --warmup must be >= 0")
    workers = (2 if device.type == "cpu" else min(8, os.cpu_count() or 1)) if workers is None else workers
    teacher_cache = device.type == "cuda" if teacher_cache is None else teacher_cache
    torch.manual_seed(0)
    load_before = os.getloadavg()
    t_start = time.perf_counter()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="kdlab-bench-") as tmp:
        setting = Setting(
            device,
            batch_size,
            steps,
            warmup,
            workers,
            compile,
            teacher_cache,
            synthetic_dataset(max(batch_size * (warmup + steps + 1), CRD_MIN_IMAGES if "crd" in methods else 0)),
            Path(tmp),
            log,
        )
        for teacher_name, student_name in pairs:
            n_teachers = max([1] + [METHODS[m].teachers for m in methods])
            torch.manual_seed(0)
            base = Models(
                [models.create(teacher_name, 100) for _ in range(n_teachers)], models.create(student_name, 100)
            )
            tasks = ["teacher", "student", *methods]
            for task in tasks:
                samples: dict[str, list[Measure]] = {m: [] for m in modes}
                for _ in range(repeats):
                    for mode in modes:
                        fresh = base.fresh(n_teachers)
                        if task == "teacher":
                            result = measure_teacher(mode, fresh, setting)
                        else:
                            method = STUDENT_ONLY if task == "student" else METHODS[task]
                            result = measure_training(mode, task, method, fresh, setting)
                        samples[mode].append(result)
                        log(f"  {teacher_name}:{student_name} {task:<8} {mode:<10} {result.images_per_s:9.1f} img/s")
                reference = (
                    statistics.median(r.images_per_s for r in samples["reference"]) if "reference" in samples else None
                )
                for mode in modes:
                    runs = samples[mode]
                    ips = statistics.median(r.images_per_s for r in runs)
                    peaks = [r.peak_mib for r in runs if r.peak_mib is not None]
                    reserved = [r.reserved_mib for r in runs if r.reserved_mib is not None]
                    rows.append(
                        {
                            "pair": f"{teacher_name}:{student_name}",
                            "teacher": teacher_name,
                            "student": student_name,
                            "task": task,
                            "mode": mode,
                            "images_per_s": round(ips, 2),
                            "images_per_s_runs": [round(r.images_per_s, 2) for r in runs],
                            "ratio_to_reference": round(ips / reference, 3) if reference else None,
                            "peak_memory_mib": round(max(peaks), 1) if peaks else None,
                            "memory_kind": runs[0].memory_kind,
                            "peak_reserved_mib": round(max(reserved), 1) if reserved else None,
                            "options": runs[0].options,
                            "setup_seconds": round(max(r.setup_seconds for r in runs), 2),
                            **runs[0].extra,
                        }
                    )
    return {
        "benchmark": "kdlab bench",
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join(["kdlab", "bench", *sys.argv[2:]]) if sys.argv[1:2] == ["bench"] else " ".join(sys.argv),
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "kdlab": __version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_before": [round(v, 2) for v in load_before],
        "load_average_after": [round(v, 2) for v in os.getloadavg()],
        "batch_size": batch_size,
        "steps": steps,
        "warmup": warmup,
        "repeats": repeats,
        "workers": workers,
        "data": DATA_NOTE,
        "modes": modes,
        "methods": methods,
        "pairs": [f"{t}:{s}" for t, s in pairs],
        "seconds": round(time.perf_counter() - t_start, 1),
        "results": rows,
        "summary": summarise(rows),
    }


def summarise(rows: list[dict]) -> dict:
    """Per (pair, task): kdlab and kdlab-fast against reference, and kdlab's overhead over the minimal loop."""
    by = {}
    for r in rows:
        by.setdefault(f"{r['pair']}/{r['task']}", {})[r["mode"]] = r["images_per_s"]
    out = {}
    for key, ips in by.items():
        entry = {}
        if "reference" in ips:
            for mode in ("minimal", "kdlab", "kdlab-fast"):
                if mode in ips:
                    entry[f"{mode}_vs_reference"] = round(ips[mode] / ips["reference"], 3)
        if "minimal" in ips and "kdlab" in ips:
            entry["kdlab_overhead_vs_minimal_pct"] = round(100 * (ips["minimal"] / ips["kdlab"] - 1), 2)
        out[key] = entry
    return out


def print_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    load = report["load_average_before"]
    table = Table(
        title=f"kdlab bench on {report['device']}: batch {report['batch_size']}, {report['steps']} timed steps "
        f"(+{report['warmup']} warm-up) x {report['repeats']}; load average {load[0]:.2f} before, "
        f"{report['load_average_after'][0]:.2f} after"
    )
    spread = report["repeats"] > 1  # on a shared or virtual machine the repeats can differ by 20% or more
    columns = [("pair", "left"), ("task", "left"), ("mode", "left"), ("images/s", "right")]
    columns += [("min-max", "right")] if spread else []
    reserved = any(r.get("peak_reserved_mib") is not None for r in report["results"])
    columns += [("x reference", "right"), ("peak MiB", "right")] + ([("reserved MiB", "right")] if reserved else [])
    for col, justify in columns:
        table.add_column(col, justify=justify)
    last = None
    options: dict[str, str] = {}
    for r in report["results"]:
        key = (r["pair"], r["task"])
        if last is not None and key != last:
            table.add_section()
        first = key != last
        last = key
        if r["task"] != "teacher":  # the last training task of a mode describes it best (its teachers included)
            options[r["mode"]] = r["options"]
        ratio = f"{r['ratio_to_reference']:.2f}" if r["ratio_to_reference"] is not None else "-"
        mem = f"{r['peak_memory_mib']:.0f}" if r["peak_memory_mib"] is not None else "-"
        runs = r["images_per_s_runs"]
        cells = [r["pair"] if first else "", r["task"] if first else "", r["mode"], f"{r['images_per_s']:.1f}"]
        cells += [f"{min(runs):.0f}-{max(runs):.0f}"] if spread else []
        cells += [ratio, mem]
        if reserved:
            cells.append(f"{r['peak_reserved_mib']:.0f}" if r.get("peak_reserved_mib") is not None else "-")
        table.add_row(*cells)
    console = Console()
    if not console.is_terminal:  # a log or a pipe: rich would assume 80 columns and cut the pair names
        console = Console(width=120)
    console.print(table)
    for mode, text in options.items():
        console.print(f"  {mode}: {text}")
    memory = (
        "CUDA max_memory_allocated, and max_memory_reserved (a CUDA graph's pool included)"
        if report["device_type"] == "cuda"
        else "peak RSS of this process (DataLoader workers not counted)"
    )
    console.print(f"  data: {report['data']}; memory: {memory}")
