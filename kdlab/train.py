"""The training loop: one epoch = shuffled, augmented batches on the device, one optimizer step each.

Metrics accumulate on the device and are read once per epoch (no host sync inside the step on
CUDA). Every epoch ends with a checkpoint written atomically; `resume` continues exactly because
the data order and augmentation of an epoch are a pure function of (seed, epoch).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from kdlab import checkpoint, distributed
from kdlab.config import TrainConfig
from kdlab.distiller import Distiller
from kdlab.errors import CheckpointError, ConfigError, KdlabError, NonFiniteLoss
from kdlab.progress import Progress


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return distributed.local_device(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    if name == "cuda" and not torch.cuda.is_available():
        raise KdlabError("train.device=cuda but no CUDA device is available (use auto or cpu)")
    return distributed.local_device(torch.device(name))


def uses_bf16(cfg: TrainConfig, device: torch.device) -> bool:
    return cfg.amp == "bf16" or (cfg.amp == "auto" and device.type == "cuda")


def autocast_factory(
    cfg: TrainConfig, device: torch.device, cache_enabled: bool = True
) -> Callable[[], contextlib.AbstractContextManager]:
    """``cache_enabled=False`` for a step captured as a CUDA graph (PyTorch's CUDA-graphs notes: autocast
    inside a capture must not keep its cast cache); the results are the same either way."""
    if not uses_bf16(cfg, device):
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=cache_enabled)


@contextlib.contextmanager
def cuda_numerics(cfg: TrainConfig, device: torch.device):
    """cuDNN settings for a training run on CUDA, restored afterwards; nothing on other devices.

    ``amp: off`` means fp32: cuDNN would otherwise run fp32 convolutions in TF32 (10-bit mantissa),
    and "fp32" would hold on the CPU only. Training batches have one shape (``drop_last``), so
    cuDNN's autotuner (``benchmark``) picks each convolution's kernel once; the kernels it picks may
    differ from run to run, which CUDA's atomics already make non-bit-reproducible.
    """
    if device.type != "cuda":
        yield
        return
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = (cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32)
    cudnn.benchmark = True
    if not uses_bf16(cfg, device):
        cudnn.allow_tf32 = matmul.allow_tf32 = False
    try:
        yield
    finally:
        cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32 = saved


def check_device_options(cfg: TrainConfig, device_type: str, world: int, where: str = "train") -> None:
    """Refuse, before anything trains, the speed options that cannot work on this device and world size.

    ``where`` is the key of the train section in the recipe (``train``, ``teachers.0.train``).
    """
    capture = cfg.fast.graph_step and cfg.fast.cuda_graph and device_type == "cuda"
    if capture and world > 1:
        # capturing a DDP step needs NCCL's async error handling off before the process group
        # exists, DDP built on a side stream and 11 eager warm-up steps (PyTorch's CUDA-graphs notes)
        raise ConfigError(
            f"{where}.fast.cuda_graph: capturing the step as a CUDA graph under torchrun ({world} ranks) "
            f"is not supported; set {where}.fast.cuda_graph=false (the graph step then runs eagerly)"
        )
    if capture and cfg.teacher_cache and cfg.fast.cache_storage == "disk":
        raise ConfigError(
            f"{where}.fast.cache_storage: a disk table is gathered on the host, a device-to-host wait "
            f"that a CUDA graph cannot capture; use cache_storage=device (or auto), or "
            f"{where}.fast.cuda_graph=false"
        )


def use_channels_last(cfg: TrainConfig, device: torch.device) -> bool:
    # auto: on for the CPU too, where oneDNN's NHWC convolutions are the faster ones
    # (benchmarks/profile_step.py, docs/BENCHMARKS.md)
    return cfg.channels_last == "on" or (cfg.channels_last == "auto" and device.type in ("cuda", "cpu"))


def lr_at(cfg: TrainConfig, epoch_float: float) -> float:
    """Learning rate at a fractional epoch: warm-up (linear from 0), then the schedule."""
    s = cfg.schedule
    if s.warmup_epochs > 0 and epoch_float < s.warmup_epochs:
        return cfg.lr * epoch_float / s.warmup_epochs
    epoch = int(epoch_float)
    if s.type == "multistep":
        return cfg.lr * s.gamma ** sum(epoch >= m for m in s.milestones)
    if s.type == "step":
        return cfg.lr * s.gamma ** (epoch // s.step_size)
    if s.type == "cosine":
        t = min(1.0, (epoch_float - s.warmup_epochs) / max(cfg.epochs - s.warmup_epochs, 1e-9))
        return s.min_lr + 0.5 * (cfg.lr - s.min_lr) * (1 + math.cos(math.pi * t))
    return cfg.lr


def param_groups(module: nn.Module, cfg: TrainConfig) -> list[dict]:
    params = [p for p in module.parameters() if p.requires_grad]
    if cfg.decay_norm_and_bias:
        return [{"params": params, "weight_decay": cfg.weight_decay}]
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    return [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(module: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    return torch.optim.SGD(
        param_groups(module, cfg),
        lr=cfg.lr,
        momentum=cfg.momentum,
        nesterov=cfg.nesterov and cfg.momentum > 0,
        foreach=True,
    )


@torch.no_grad()
def evaluate(
    model: nn.Module, loader, autocast=contextlib.nullcontext, channels_last: bool = False
) -> dict[str, float]:
    """Top-1, top-5 (in %) and mean cross-entropy of a plain classifier over a loader."""
    was_training = model.training
    model.eval()
    device = loader.device
    sums = torch.zeros(4, device=device, dtype=torch.float64)  # correct1, correct5, loss, count
    for x, y in loader:
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast():
            logits = model(x)
        logits = logits.float()
        k = min(5, logits.shape[1])
        topk = logits.topk(k, dim=1).indices
        hit = topk.eq(y[:, None])
        # new_full fills on the device; torch.tensor(n, device=cuda) would copy from the host and wait
        sums += torch.stack(
            [
                hit[:, 0].sum(),
                hit.any(1).sum(),
                nn.functional.cross_entropy(logits, y, reduction="sum"),
                y.new_full((), y.numel()),
            ]
        ).double()
    model.train(was_training)
    if getattr(loader, "shard", (0, 1))[1] > 1:  # each rank saw its own slice of the test set
        distributed.all_reduce_sum(sums)
    c1, c5, loss, n = sums.tolist()
    n = max(n, 1)
    return {"top1": 100 * c1 / n, "top5": 100 * c5 / n, "loss": loss / n}


@dataclass
class TrainState:
    epoch: int = 0  # epochs finished
    best_top1: float = -1.0
    best_epoch: int = -1
    history: list[dict] = field(default_factory=list)


CPU = torch.device("cpu")  # the default device of the checkpoint functions

CKPT_LAST = "last.safetensors"
CKPT_PREV = "prev.safetensors"
CKPT_BEST = "best.safetensors"  # the student's weights at its best test top-1 epoch (train.keep_best)


def save_checkpoint(
    run_dir: Path,
    distiller: nn.Module,
    opt: torch.optim.Optimizer,
    state: TrainState,
    device: torch.device = CPU,
) -> None:
    tensors = {f"model.{k}": v for k, v in distiller.state_dict().items()}
    opt_state = opt.state_dict()
    for idx, st in opt_state["state"].items():
        for name, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim.{idx}.{name}"] = v
    tensors["rng.torch"] = torch.get_rng_state()
    if device.type == "cuda":  # dropout on CUDA draws from the device's generator: resume repeats it only with this
        tensors["rng.cuda"] = torch.cuda.get_rng_state(device)
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt_state["param_groups"]]
    meta = {"epoch": state.epoch, "best_top1": state.best_top1, "best_epoch": state.best_epoch, "param_groups": groups}
    ckdir = run_dir / "checkpoints"
    last = ckdir / CKPT_LAST
    if last.exists():
        last.replace(ckdir / CKPT_PREV)
    checkpoint.save(last, tensors, meta)


def load_checkpoint(
    run_dir: Path,
    distiller: nn.Module,
    opt: torch.optim.Optimizer,
    log: Callable[[str], None],
    device: torch.device = CPU,
) -> TrainState | None:
    """The newest readable checkpoint: last, else the previous one; None when there is none."""
    ckdir = run_dir / "checkpoints"
    errors = []
    for name in (CKPT_LAST, CKPT_PREV):
        path = ckdir / name
        if not path.exists():
            continue
        try:
            tensors, meta = checkpoint.load(path)
        except CheckpointError as e:
            errors.append(str(e))
            log(f"warning: {e}; trying the previous checkpoint")
            continue
        model_state = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
        checkpoint.load_state_into(distiller, model_state, str(path))
        opt_state = opt.state_dict()
        for idx in opt_state["state"].keys() | {i for g in opt_state["param_groups"] for i in g["params"]}:
            st = {k.split(".", 2)[2]: v for k, v in tensors.items() if k.startswith(f"optim.{idx}.")}
            if st:
                opt_state["state"][idx] = st
        for g, saved in zip(opt_state["param_groups"], meta["param_groups"]):
            g.update(saved)
        opt.load_state_dict(opt_state)
        _match_parameter_layout(opt)
        torch.set_rng_state(tensors["rng.torch"])
        if device.type == "cuda" and "rng.cuda" in tensors:
            torch.cuda.set_rng_state(tensors["rng.cuda"], device)
        return TrainState(epoch=meta["epoch"], best_top1=meta["best_top1"], best_epoch=meta["best_epoch"])
    if errors:
        raise CheckpointError(f"no readable checkpoint in {ckdir}: {errors[-1]}")
    return None


def _match_parameter_layout(opt: torch.optim.Optimizer) -> None:
    """Give every state tensor its parameter's strides: a checkpoint stores NCHW-contiguous tensors, and a
    momentum buffer laid out unlike its channels_last parameter sends the foreach update to its slow
    per-tensor path."""
    for group in opt.param_groups:
        for p in group["params"]:
            for name, value in opt.state.get(p, {}).items():
                if isinstance(value, torch.Tensor) and value.shape == p.shape and value.stride() != p.stride():
                    opt.state[p][name] = torch.empty_like(p, dtype=value.dtype).copy_(value)


def read_history(run_dir: Path, upto_epoch: int) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            break  # a line cut by a kill: everything after it is rewritten
        if row.get("epoch", 0) <= upto_epoch:
            rows.append(row)
    return rows


def fit(
    distiller: Distiller,
    train_loader,
    test_loader,
    cfg: TrainConfig,
    run_dir: Path,
    log: Callable[[str], None],
    resume: bool = False,
    on_epoch_end: Callable[[int], None] | None = None,
    teacher_cache=None,
    graphs=None,
    keeps_checkpoints: bool = True,
) -> TrainState:
    """Train the distiller's student (and side modules) for cfg.epochs, checkpointing every epoch.

    ``teacher_cache`` (kdlab.fast.teacher_cache.TeacherCache): the teachers' logits are looked up by
    each batch's (index, view) instead of running the teachers. ``graphs``: the capture primitives of
    the graph step (:class:`kdlab.fast.graph_step.RerunGraphs` runs the capture logic on the CPU).
    ``keeps_checkpoints``: False when ``run_dir`` is a temporary folder, so that an error names no
    checkpoint that is about to vanish.
    """
    device = train_loader.device
    check_device_options(cfg, device.type, distributed.world_size())
    autocast = autocast_factory(cfg, device)
    channels_last = use_channels_last(cfg, device)
    if channels_last:
        distiller.to(memory_format=torch.channels_last)
    opt = make_optimizer(distiller, cfg, device)
    state = load_checkpoint(run_dir, distiller, opt, log, device) if resume else None
    if state is None:
        state = TrainState()
        if 0 in cfg.keep_epochs and distributed.is_main():
            keep_weights(run_dir, distiller.student, 0)
    state.history = read_history(run_dir, state.epoch)
    if distributed.is_main():
        checkpoint.atomic_write_text(run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in state.history))
    distributed.barrier()  # nobody reads the run directory while rank 0 rewrites it
    if state.epoch:
        log(f"resuming after epoch {state.epoch}")
    writer = _tensorboard(run_dir) if distributed.is_main() else _NullWriter()
    step_fn = distributed.wrap(distiller, device)  # DDP under torchrun; the checkpoint keeps the bare distiller
    if cfg.compile:
        step_fn = torch.compile(step_fn)
    fast_step = None
    if cfg.fast.graph_step:
        from kdlab.fast.graph_step import GraphStep

        fast_step = GraphStep(
            lambda x, y, tl: step_fn(x, y, teacher_logits=tl),
            opt,
            device,
            autocast_factory(cfg, device, cache_enabled=False),
            cfg.grad_clip,
            teacher_cache,
            capture=cfg.fast.cuda_graph and (device.type == "cuda" or graphs is not None),
            graphs=graphs,
        )
    names = distiller.term_names()
    # a term whose value is exactly 0 at every step of an epoch teaches nothing: attention transfer on 1x1 maps
    # (their normalised attention is always 1), a term on identical layers; a zero weight is the user's choice
    watched = torch.tensor(
        [n != "ce" and n in distiller.terms and distiller.terms[n].weight > 0 for n in names], device=device
    )
    warned_zero: set[str] = set()
    steps_per_epoch = (
        len(train_loader) if cfg.max_steps_per_epoch is None else min(len(train_loader), cfg.max_steps_per_epoch)
    )
    if steps_per_epoch == 0:
        raise KdlabError(
            f"train.batch_size={cfg.batch_size} is larger than the training set ({train_loader.num_samples} samples)"
        )
    progress = Progress(total_epochs=cfg.epochs, steps_per_epoch=steps_per_epoch, batch_size=cfg.batch_size, log=log)
    numerics = contextlib.ExitStack()
    numerics.enter_context(cuda_numerics(cfg, device))
    try:
        for epoch in range(state.epoch, cfg.epochs):
            t0 = time.perf_counter()
            distiller.train()
            train_loader.set_epoch(epoch)
            distributed.seed_epoch(train_loader.seed, epoch)
            sums = torch.zeros(len(names) + 2, device=device)  # total, terms..., correct
            first_bad = torch.full((), -1, device=device, dtype=torch.long)
            bad_values = torch.zeros(len(names) + 1, device=device)
            all_zero = watched.clone()
            seen = 0
            progress.start_epoch(epoch)
            with_meta = teacher_cache is not None or distiller.needs_indices
            batches = train_loader.iter_batches(with_meta=True) if with_meta else iter(train_loader)
            for step, (x, y, *meta) in enumerate(
                batches
            ):  # meta: (index, view) for the teacher cache and indexed terms
                if step >= steps_per_epoch:
                    break
                lr = lr_at(cfg, epoch + step / steps_per_epoch)
                for g in opt.param_groups:
                    g["lr"] = lr
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                if fast_step is not None:  # forward, backward and update in one device-side call
                    loss, logits, terms = fast_step(x, y, lr, *meta)
                else:
                    extra = {"teacher_logits": teacher_cache.lookup(*meta)} if teacher_cache is not None else {}
                    if (
                        distiller.needs_progress
                    ):  # a device scalar filled in place: no host copy, no recompile per value
                        extra["progress"] = torch.full((), epoch + step / steps_per_epoch, device=device)
                    if distiller.needs_indices:
                        extra["indices"] = meta[0]
                    with autocast():
                        loss, logits, terms = step_fn(x, y, **extra)
                values = torch.stack([loss.detach()] + [terms[n].detach() for n in names])
                finite = distributed.all_true(torch.isfinite(values).all())  # every rank skips or stops together
                if cfg.nonfinite == "skip" and not bool(finite):
                    log(f"epoch {epoch + 1} step {step}: non-finite loss, step skipped ({_describe(names, values)})")
                    continue
                if fast_step is None:
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    if cfg.grad_clip is not None:
                        nn.utils.clip_grad_norm_(distiller.trainable_parameters(), cfg.grad_clip)
                    opt.step()
                is_first_bad = (~finite) & (first_bad < 0)
                # new_full fills on the device; torch.tensor(step, device=cuda) would copy from the host and wait
                first_bad = torch.where(is_first_bad, first_bad.new_full((), step), first_bad)
                bad_values = torch.where(is_first_bad, values, bad_values)
                correct = (logits.detach().argmax(1) == y).sum().float()
                sums += torch.cat([torch.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0), correct[None]])
                all_zero &= values[1:] == 0
                seen += y.numel()
                progress.step(step)
                if device.type == "cpu" and int(first_bad) >= 0:
                    break
            bad = int(first_bad)
            if bad >= 0:
                last = run_dir / "checkpoints" / CKPT_LAST
                kept = (
                    f"the last good checkpoint (epoch {state.epoch}) is kept in {last}"
                    if keeps_checkpoints and state.epoch and last.exists()
                    else "no epoch had finished, so nothing was checkpointed"
                    if not state.epoch
                    else ""
                )
                raise NonFiniteLoss(
                    f"non-finite loss at epoch {epoch + 1} step {bad}: {_describe(names, bad_values)}; "
                    + (f"{kept}; " if kept else "")
                    + f"try {nonfinite_remedies(cfg)}"
                )
            steps = max(progress.steps_done, 1)
            sums, seen = distributed.reduce_epoch_sums(sums, seen)
            avg = (sums / steps).tolist()
            progress.training_done(time.perf_counter() - t0)  # .tolist() waited for the device; no evaluation yet
            for n, zero in zip(names, all_zero.tolist()):
                if zero and progress.steps_done and n not in warned_zero:
                    warned_zero.add(n)
                    log(
                        f"warning: loss term {n} was exactly 0 at every step of epoch {epoch + 1}, "
                        "so it teaches nothing; "
                        "check its tapped layers (attention transfer on 1x1 maps is always 0)"
                    )
            row = {"epoch": epoch + 1, "lr": lr_at(cfg, epoch + 1 - 1e-9), "train_loss": avg[0]}
            row.update({f"train_{n}": v for n, v in zip(names, avg[1:-1])})
            row["train_top1"] = 100 * sums[-1].item() / max(seen, 1)
            new_best = False
            if test_loader is not None and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs):
                ev = evaluate(distiller.student, test_loader, autocast, channels_last)
                row.update({"test_top1": ev["top1"], "test_top5": ev["top5"], "test_loss": ev["loss"]})
                if (
                    ev["top1"] >= state.best_top1
                ):  # ties: the later epoch, as the Tf-KD code's `val_acc >= best_val_acc`
                    state.best_top1, state.best_epoch = ev["top1"], epoch + 1
                    new_best = True
            row["seconds"] = round(time.perf_counter() - t0, 3)
            state.epoch = epoch + 1
            state.history.append(row)
            if distributed.is_main():
                # the metrics line first, then the checkpoint: a kill in between rewrites the line on resume
                with open(run_dir / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(row) + "\n")
                for k, v in row.items():
                    if k != "epoch" and isinstance(v, (int, float)):
                        writer.add_scalar(k.replace("_", "/", 1), v, epoch + 1)
                writer.flush()
                if new_best and cfg.keep_best:
                    # before the epoch's checkpoint: a kill in between reruns this epoch, which writes it again
                    checkpoint.save(
                        run_dir / "checkpoints" / CKPT_BEST,
                        distiller.student.state_dict(),
                        {"epoch": epoch + 1, "top1": state.best_top1},
                    )
                save_checkpoint(run_dir, distiller, opt, state, device)
                if epoch + 1 in cfg.keep_epochs:
                    keep_weights(run_dir, distiller.student, epoch + 1)
            distributed.barrier()  # the other ranks wait until the epoch is on disk
            progress.end_epoch(row)
            if on_epoch_end:
                on_epoch_end(epoch + 1)
    finally:
        numerics.close()
        progress.close()
        writer.close()
    return state


def nonfinite_remedies(cfg: TrainConfig) -> str:
    """Only what applies to this configuration: a clip already set can be tightened, and fast.graph_step
    cannot skip a step (it updates the weights before the loss is seen)."""
    options = [f"a lower train.lr (now {cfg.lr:g})"]
    options.append(
        "train.grad_clip (e.g. 1.0)" if cfg.grad_clip is None else f"a smaller train.grad_clip (now {cfg.grad_clip:g})"
    )
    if not cfg.fast.graph_step and cfg.nonfinite != "skip":
        options.append("train.nonfinite=skip")
    return ", ".join(options[:-1]) + " or " + options[-1]


def _describe(names: list[str], values: torch.Tensor) -> str:
    vals = values.tolist()
    parts = [f"total={vals[0]:.4g}"] + [f"{n}={v:.4g}" for n, v in zip(names, vals[1:])]
    bad = [n for n, v in zip(["total"] + names, vals) if not math.isfinite(v)]
    return f"term {', '.join(b for b in bad if b != 'total') or 'total'} is non-finite ({', '.join(parts)})"


def keep_weights(run_dir: Path, model: nn.Module, epoch: int) -> None:
    checkpoint.save(run_dir / "checkpoints" / f"epoch_{epoch}.safetensors", model.state_dict(), {"epoch": epoch})


class _NullWriter:
    def add_scalar(self, *a, **k):
        pass

    def flush(self):
        pass

    def close(self):
        pass


def _tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is a dependency; a broken install should not stop training
        return _NullWriter()
    return SummaryWriter(log_dir=str(run_dir / "tb"))
