"""The optimizer and the learning-rate schedule of a run (SGD or DOT, warm-up, step / multistep / cosine), and the
optimizer groups loss terms declare for their own parameters."""

from __future__ import annotations

import math

import torch
from torch import nn

from kdlab.config import TrainConfig
from kdlab.dot import DistillationOrientedSGD
from kdlab.errors import ConfigError


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
    """The student's groups (with its side modules), then one group per `ParamGroup` a term declares.

    A term's group keeps ``lr_scale`` in its dict, which `set_lr` applies at every step.
    """
    own = term_groups(module, cfg)
    claimed = {id(p) for g in own for p in g["params"]}
    params = [p for p in module.parameters() if p.requires_grad and id(p) not in claimed]
    if cfg.decay_norm_and_bias:
        return [{"params": params, "weight_decay": cfg.weight_decay}] + own
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    return [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}] + own


def term_groups(module: nn.Module, cfg: TrainConfig) -> list[dict]:
    """The optimizer groups the module's loss terms declare (`Term.param_groups`), if it has terms."""
    terms = getattr(module, "terms", None)
    out: list[dict] = []
    seen: set[int] = set()
    for term_name, term in terms.items() if isinstance(terms, nn.ModuleDict) else ():
        for g in term.param_groups():
            params = [p for p in g.params if p.requires_grad]
            if any(id(p) in seen for p in params):
                raise ConfigError(f"loss.terms.{term_name}: parameter group {g.name!r} repeats a parameter")
            seen.update(id(p) for p in params)
            wd = cfg.weight_decay if g.weight_decay is None else g.weight_decay
            out.append({"params": params, "weight_decay": wd, "lr_scale": g.lr_scale, "name": f"{term_name}.{g.name}"})
    return out


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    """The step's learning rate into every group, times the group's ``lr_scale`` where a term declared one."""
    for g in opt.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)


def make_optimizer(module: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    if cfg.optimizer == "dot":
        return DistillationOrientedSGD(
            param_groups(module, cfg),
            lr=cfg.lr,
            momentum_task=cfg.momentum - cfg.dot_delta,
            momentum_distill=cfg.momentum + cfg.dot_delta,
        )
    return torch.optim.SGD(
        param_groups(module, cfg),
        lr=cfg.lr,
        momentum=cfg.momentum,
        nesterov=cfg.nesterov and cfg.momentum > 0,
        foreach=True,
    )
