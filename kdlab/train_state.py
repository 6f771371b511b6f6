"""What a run keeps on disk between epochs: the checkpoint (weights, optimizer, RNG), the metrics history
and the kept weights of chosen epochs. A killed run resumes from here bit for bit."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from kdlab import checkpoint
from kdlab.errors import CheckpointError


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
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            break  # a line cut by a kill: everything after it is rewritten
        if row.get("epoch", 0) <= upto_epoch:
            rows.append(row)
    return rows


def keep_weights(run_dir: Path, model: nn.Module, epoch: int) -> None:
    checkpoint.save(run_dir / "checkpoints" / f"epoch_{epoch}.safetensors", model.state_dict(), {"epoch": epoch})
