"""The training loop: one epoch = shuffled, augmented batches on the device, one optimizer step each.

Metrics accumulate on the device and are read once per epoch (no host sync inside the step on
CUDA). Every epoch ends with a checkpoint written atomically; `resume` continues exactly because
the data order and augmentation of an epoch are a pure function of (seed, epoch).

`fit` reads as the loop itself: `_start` (optimizer, resume, logging), `_make_step` (one step callable,
eager or graph), `_train_epoch`, the non-finite guard, and `_end_epoch` (metrics, evaluation, TensorBoard,
checkpoint).
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
from kdlab.compute import autocast_factory, check_device_options, cuda_numerics, use_channels_last
from kdlab.config import TrainConfig
from kdlab.distiller import Distiller
from kdlab.dot import DistillationOrientedSGD
from kdlab.errors import ConfigError, KdlabError, NonFiniteLoss
from kdlab.optim import lr_at, make_optimizer, set_lr
from kdlab.progress import Progress
from kdlab.train_state import (
    CKPT_BEST,
    CKPT_LAST,
    TrainState,
    keep_weights,
    load_checkpoint,
    read_history,
    save_checkpoint,
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
    val_loader=None,
) -> TrainState:
    """Train the distiller's student (and side modules) for cfg.epochs, checkpointing every epoch.

    ``teacher_cache`` (kdlab.fast.teacher_cache.TeacherCache): the teachers' logits are looked up by
    each batch's (index, view) instead of running the teachers. ``graphs``: the capture primitives of
    the graph step (:class:`kdlab.fast.graph_step.RerunGraphs` runs the capture logic on the CPU).
    ``keeps_checkpoints``: False when ``run_dir`` is a temporary folder, so that an error names no
    checkpoint that is about to vanish. ``val_loader``: a validation split (data.val_split) evaluated whenever the
    test set is; train.keep_best then keeps the epoch with the best validation top-1.
    """
    check_device_options(cfg, train_loader.device.type, distributed.world_size())
    steps_per_epoch = (
        len(train_loader) if cfg.max_steps_per_epoch is None else min(len(train_loader), cfg.max_steps_per_epoch)
    )
    if steps_per_epoch == 0:
        raise KdlabError(
            f"train.batch_size={cfg.batch_size} is larger than the training set ({train_loader.num_samples} samples)"
        )
    run = _start(distiller, train_loader.device, test_loader, cfg, run_dir, log, resume, keeps_checkpoints)
    run.val_loader = val_loader
    run.progress = Progress(
        total_epochs=cfg.epochs, steps_per_epoch=steps_per_epoch, batch_size=cfg.batch_size, log=log
    )
    train_step = _make_step(run, teacher_cache, graphs)
    # meta: (index, view) of each sample, for the teacher cache and for terms that read sample indices
    with_meta = teacher_cache is not None or distiller.needs_indices
    numerics = contextlib.ExitStack()
    numerics.enter_context(cuda_numerics(cfg, run.device))
    try:
        for epoch in range(run.state.epoch, cfg.epochs):
            t0 = time.perf_counter()
            sums = _train_epoch(run, train_loader, epoch, steps_per_epoch, train_step, with_meta)
            _raise_if_nonfinite(run, epoch, sums)
            _end_epoch(run, epoch, sums, t0)
            if on_epoch_end:
                on_epoch_end(epoch + 1)
    finally:
        numerics.close()
        run.progress.close()
        run.writer.close()
    return run.state


@dataclass
class _Run:
    """What every epoch of one `fit` call shares."""

    distiller: Distiller
    opt: torch.optim.Optimizer
    cfg: TrainConfig
    run_dir: Path
    log: Callable[[str], None]
    device: torch.device
    test_loader: object
    autocast: Callable[[], contextlib.AbstractContextManager]
    channels_last: bool
    state: TrainState
    writer: object
    names: list[str]
    keeps_checkpoints: bool
    watched: torch.Tensor  # per term: does an epoch of exact zeros deserve a warning (see _EpochSums)
    progress: Progress | None = None
    warned_zero: set[str] = field(default_factory=set)
    val_loader: object = None


def _start(distiller, device, test_loader, cfg, run_dir, log, resume, keeps_checkpoints) -> _Run:
    """The optimizer, the state to continue from (a checkpoint under ``resume``), the metrics file rewritten
    to match it, and the TensorBoard writer."""
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
    names, terms = distiller.term_names(), distiller.terms
    return _Run(
        distiller,
        opt,
        cfg,
        run_dir,
        log,
        device,
        test_loader,
        autocast,
        channels_last,
        state,
        writer,
        names,
        keeps_checkpoints,
        # a term whose value is exactly 0 at every step of an epoch teaches nothing: attention transfer on 1x1
        # maps (their normalised attention is always 1), a term on identical layers; a zero weight is the user's
        # choice
        torch.tensor([n != "ce" and n in terms and terms[n].weight > 0 for n in names], device=device),
    )


@dataclass
class _StepResult:
    values: torch.Tensor  # total loss, then each term, detached
    logits: torch.Tensor
    finite: torch.Tensor  # a device bool, the same on every rank
    skipped: bool = False


def _make_step(run: _Run, teacher_cache, graphs) -> Callable[..., _StepResult]:
    """One callable for a training step, `step(x, y, lr, meta, at) -> _StepResult`: forward, backward and
    update, either eagerly or as kdlab.fast's graph step (forward, backward and update in one device-side
    call). ``meta``: (index, view) of the batch's samples; ``at``: the fractional epoch."""
    distiller, opt, cfg, device = run.distiller, run.opt, run.cfg, run.device
    step_fn = distributed.wrap(distiller, device)  # DDP under torchrun; the checkpoint keeps the bare distiller
    if cfg.compile:
        step_fn = torch.compile(step_fn)
    graph_step = None
    if cfg.fast.graph_step:
        from kdlab.fast.graph_step import GraphStep

        if any("lr_scale" in g for g in opt.param_groups):  # its update applies one lr to every parameter
            raise ConfigError("train.fast.graph_step: a loss term trains its own parameter group; set it to false")

        graph_step = GraphStep(
            lambda x, y, tl: step_fn(x, y, teacher_logits=tl),
            opt,
            device,
            autocast_factory(cfg, device, cache_enabled=False),
            cfg.grad_clip,
            teacher_cache,
            capture=cfg.fast.cuda_graph and (device.type == "cuda" or graphs is not None),
            graphs=graphs,
        )

    def step(x, y, lr, meta, at) -> _StepResult:
        if run.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if graph_step is not None:
            loss, logits, terms = graph_step(x, y, lr, *meta)
        else:
            extra = {"teacher_logits": teacher_cache.lookup(*meta)} if teacher_cache is not None else {}
            if distiller.needs_progress:  # a device scalar filled in place: no host copy, no recompile per value
                extra["progress"] = torch.full((), at, device=device)
            if distiller.needs_indices:
                extra["indices"] = meta[0]
            with run.autocast():
                loss, logits, terms = step_fn(x, y, **extra)
        values = torch.stack([loss.detach()] + [terms[n].detach() for n in run.names])
        finite = distributed.all_true(torch.isfinite(values).all())  # every rank skips or stops together
        if cfg.nonfinite == "skip" and not bool(finite):
            return _StepResult(values, logits, finite, skipped=True)
        if graph_step is None and isinstance(opt, DistillationOrientedSGD):
            _dot_backward(opt, terms)
        elif graph_step is None:
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip is not None:
                nn.utils.clip_grad_norm_(distiller.trainable_parameters(), cfg.grad_clip)
            opt.step()
        return _StepResult(values, logits, finite)

    return step


def _dot_backward(opt: DistillationOrientedSGD, terms: dict[str, torch.Tensor]) -> None:
    """DOT's two passes: the distillation terms' gradient first, set aside, then the cross-entropy's, then the
    update with one momentum buffer each (`kdlab.dot`). Either part may be absent (a generation 0 trains on CE)."""
    task = terms.get("ce")
    distill = [v for name, v in terms.items() if name != "ce"]
    opt.zero_grad(set_to_none=True)
    if distill:
        torch.stack(distill).sum().backward(retain_graph=task is not None)
        opt.stash_distillation_grads()
        opt.zero_grad(set_to_none=True)  # not in place: the stash holds these gradient tensors
    if task is not None:
        task.backward()
    opt.step()


class _EpochSums:
    """An epoch's running sums on the device (read once, at its end) and its first non-finite step."""

    def __init__(self, run: _Run):
        n, device = len(run.names), run.device
        self.sums = torch.zeros(n + 2, device=device)  # total, terms..., correct
        self.first_bad = torch.full((), -1, device=device, dtype=torch.long)
        self.bad_values = torch.zeros(n + 1, device=device)
        self.all_zero = run.watched.clone()
        self.seen = 0

    def add(self, step: int, out: _StepResult, y: torch.Tensor) -> None:
        is_first_bad = (~out.finite) & (self.first_bad < 0)
        # new_full fills on the device; torch.tensor(step, device=cuda) would copy from the host and wait
        self.first_bad = torch.where(is_first_bad, self.first_bad.new_full((), step), self.first_bad)
        self.bad_values = torch.where(is_first_bad, out.values, self.bad_values)
        correct = (out.logits.detach().argmax(1) == y).sum().float()
        self.sums += torch.cat([torch.nan_to_num(out.values, nan=0.0, posinf=0.0, neginf=0.0), correct[None]])
        self.all_zero &= out.values[1:] == 0
        self.seen += y.numel()


def _train_epoch(run: _Run, train_loader, epoch: int, steps_per_epoch: int, train_step, with_meta: bool) -> _EpochSums:
    run.distiller.train()
    train_loader.set_epoch(epoch)
    distributed.seed_epoch(train_loader.seed, epoch)
    sums = _EpochSums(run)
    run.progress.start_epoch(epoch)
    batches = train_loader.iter_batches(with_meta=True) if with_meta else iter(train_loader)
    for step, (x, y, *meta) in enumerate(batches):
        if step >= steps_per_epoch:
            break
        at = epoch + step / steps_per_epoch
        lr = lr_at(run.cfg, at)
        set_lr(run.opt, lr)
        out = train_step(x, y, lr, meta, at)
        if out.skipped:
            run.log(
                f"epoch {epoch + 1} step {step}: non-finite loss, step skipped ({_describe(run.names, out.values)})"
            )
            continue
        sums.add(step, out, y)
        run.progress.step(step)
        if run.device.type == "cpu" and int(sums.first_bad) >= 0:  # on CUDA the check waits for the epoch's end
            break
    return sums


def _raise_if_nonfinite(run: _Run, epoch: int, sums: _EpochSums) -> None:
    bad = int(sums.first_bad)
    if bad < 0:
        return
    state, last = run.state, run.run_dir / "checkpoints" / CKPT_LAST
    kept = (
        f"the last good checkpoint (epoch {state.epoch}) is kept in {last}"
        if run.keeps_checkpoints and state.epoch and last.exists()
        else "no epoch had finished, so nothing was checkpointed"
        if not state.epoch
        else ""
    )
    raise NonFiniteLoss(
        f"non-finite loss at epoch {epoch + 1} step {bad}: {_describe(run.names, sums.bad_values)}; "
        + (f"{kept}; " if kept else "")
        + f"try {nonfinite_remedies(run.cfg)}"
    )


def _end_epoch(run: _Run, epoch: int, sums: _EpochSums, t0: float) -> None:
    """The epoch's metrics row (training averages, the test evaluation when due), then TensorBoard, the best
    weights and the checkpoint, in the order that a kill at any point resumes correctly."""
    cfg, state, progress, names = run.cfg, run.state, run.progress, run.names
    steps = max(progress.steps_done, 1)
    totals, seen = distributed.reduce_epoch_sums(sums.sums, sums.seen)
    avg = (totals / steps).tolist()
    progress.training_done(time.perf_counter() - t0)  # .tolist() waited for the device; no evaluation yet
    for n, zero in zip(names, sums.all_zero.tolist()):
        if zero and progress.steps_done and n not in run.warned_zero:
            run.warned_zero.add(n)
            run.log(
                f"warning: loss term {n} was exactly 0 at every step of epoch {epoch + 1}, so it teaches nothing; "
                "check its tapped layers (attention transfer on 1x1 maps is always 0)"
            )
    row = {"epoch": epoch + 1, "lr": lr_at(cfg, epoch + 1 - 1e-9), "train_loss": avg[0]}
    row.update({f"train_{n}": v for n, v in zip(names, avg[1:-1])})
    row["train_top1"] = 100 * totals[-1].item() / max(seen, 1)
    new_best = False
    if run.test_loader is not None and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs):
        ev = evaluate(run.distiller.student, run.test_loader, run.autocast, run.channels_last)
        row.update({"test_top1": ev["top1"], "test_top5": ev["top5"], "test_loss": ev["loss"]})
        if ev["top1"] >= state.best_top1:  # ties: the later epoch, as the Tf-KD code's `val_acc >= best_val_acc`
            state.best_top1, state.best_epoch = ev["top1"], epoch + 1
            new_best = True
        if run.val_loader is not None:
            val = evaluate(run.distiller.student, run.val_loader, run.autocast, run.channels_last)
            row.update({"val_top1": val["top1"], "val_top5": val["top5"], "val_loss": val["loss"]})
            # the kept best epoch is then chosen on the validation split (same tie rule), from the history, which
            # a resume restores
            best_val = max((r["val_top1"] for r in state.history if "val_top1" in r), default=-1.0)
            new_best = val["top1"] >= best_val
    row["seconds"] = round(time.perf_counter() - t0, 3)
    state.epoch = epoch + 1
    state.history.append(row)
    if distributed.is_main():
        # the metrics line first, then the checkpoint: a kill in between rewrites the line on resume
        with open(run.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        for k, v in row.items():
            if k != "epoch" and isinstance(v, (int, float)):
                run.writer.add_scalar(k.replace("_", "/", 1), v, epoch + 1)
        run.writer.flush()
        student = run.distiller.student
        if new_best and cfg.keep_best:
            # before the epoch's checkpoint: a kill in between reruns this epoch, which writes it again
            checkpoint.save(
                run.run_dir / "checkpoints" / CKPT_BEST,
                student.state_dict(),
                {
                    "epoch": epoch + 1,
                    "top1": row["test_top1"],
                    "selected_on": "val" if run.val_loader is not None else "test",
                },
            )
        save_checkpoint(run.run_dir, run.distiller, run.opt, state, run.device)
        if epoch + 1 in cfg.keep_epochs:
            keep_weights(run.run_dir, student, epoch + 1)
    distributed.barrier()  # the other ranks wait until the epoch is on disk
    progress.end_epoch(row)


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
