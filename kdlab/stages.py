"""Short auxiliary training stages that run before the main one (FitNet hints, FT paraphrasers).

The loss terms declare them as data (`kdlab.losses.base.PreStage`); this module trains them, so that no
term drives a training loop.

Each stage's result is saved under `<run>/stages/` and a rerun loads it instead of training again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from kdlab import checkpoint, distributed
from kdlab.errors import NonFiniteLoss
from kdlab.losses.base import PreStage


@dataclass
class StageContext:
    student: nn.Module
    teachers: list[nn.Module]
    train_loader: object  # kdlab.data.DeviceLoader
    device: torch.device
    run_dir: Path
    autocast: Callable[[], object]
    log: Callable[[str], None]
    forward: Callable  # (x, y) -> kdlab.losses.base.Outputs: the student with grad, the teachers without
    max_steps: int | None = None
    momentum: float = 0.9
    weight_decay: float = 5e-4


def run_stages(ctx: StageContext, terms) -> None:
    """Every pre-stage the loss terms declare, in the terms' order."""
    for term in terms:
        for stage in term.pre_stages(ctx.student, ctx.forward):
            run_stage(ctx, stage)


def run_stage(ctx: StageContext, stage: PreStage) -> None:
    """Train the stage's parameters on its loss for its epochs, or load the saved result of an earlier run.

    A non-finite loss stops the stage as it stops the main loop (at once on CPU, at the end of the stage's
    epoch on CUDA, where checking each step would wait for the device), and nothing of it is saved, so a
    rerun does not load a broken module.
    """
    if stage.trainable_only_here:
        for module in stage.modules.values():
            module.requires_grad_(True)
    try:
        _train_or_load(ctx, stage)
    finally:
        if stage.trainable_only_here:
            for module in stage.modules.values():
                module.requires_grad_(False)


def _train_or_load(ctx: StageContext, stage: PreStage) -> None:
    path = ctx.run_dir / "stages" / f"{stage.name}.safetensors"
    if path.exists():
        state, _ = checkpoint.load(path)
        for key, module in stage.modules.items():
            module.load_state_dict({k[len(key) + 1 :]: v for k, v in state.items() if k.startswith(key + ".")})
        ctx.log(f"stage {stage.name}: loaded {path}")
        return
    params = [p for p in stage.params() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=stage.lr, momentum=ctx.momentum, weight_decay=ctx.weight_decay)
    loader = ctx.train_loader
    for epoch in range(stage.epochs):
        loader.set_epoch(10_000 + epoch)  # its own augmentation stream, disjoint from the main epochs
        total = torch.zeros((), device=ctx.device)
        first_bad = torch.full((), -1, device=ctx.device, dtype=torch.long)
        bad_value = torch.zeros((), device=ctx.device)
        steps = 0
        for step, (x, y) in enumerate(loader):
            if ctx.max_steps is not None and step >= ctx.max_steps:
                break
            with ctx.autocast():
                loss = stage.loss(x, y)
            value = loss.detach().float()
            finite = distributed.all_true(torch.isfinite(value))  # every rank stops together
            is_first_bad = (~finite) & (first_bad < 0)
            first_bad = torch.where(is_first_bad, first_bad.new_full((), step), first_bad)
            bad_value = torch.where(is_first_bad, value, bad_value)
            if ctx.device.type == "cpu" and int(first_bad) >= 0:
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            distributed.average_gradients(params)  # under torchrun: the stage sees the global batch too
            opt.step()
            total += value
            steps += 1
        if int(first_bad) >= 0:
            lower = (
                f"a lower {stage.lr_option} (now {stage.lr:g})"
                if stage.lr_option
                else f"a lower learning rate (now {stage.lr:g})"
            )
            raise NonFiniteLoss(
                f"non-finite loss in stage {stage.name} at epoch {epoch + 1} step {int(first_bad)}: "
                f"loss={float(bad_value):.4g}; nothing of the stage was saved; try {lower}, or check "
                "that the network it reads is finite"
            )
        ctx.log(f"stage {stage.name}: epoch {epoch + 1}/{stage.epochs} loss {total.item() / max(steps, 1):.4f}")
    state = {f"{key}.{k}": v for key, module in stage.modules.items() for k, v in module.state_dict().items()}
    if distributed.is_main():
        checkpoint.save(path, state, {"stage": stage.name, "epochs": stage.epochs})
    distributed.barrier()
