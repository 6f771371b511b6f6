"""Data-parallel training under torchrun: one process per device, the global batch split among them.

torchrun starts one process per device and gives each WORLD_SIZE, RANK and LOCAL_RANK; :func:`session`
turns that into a process group (NCCL on CUDA with device ``cuda:LOCAL_RANK``, gloo on CPU) with a
finite timeout, so a peer that dies or hangs ends the job with an error instead of a wait forever.
Without those variables every function here is a no-op, so the single-process path is unchanged.

Rank 0 alone writes files and logs; the other ranks wait for it at :func:`barrier`. Everything else
(data order, model initialisation, checkpoint reads) is computed identically on every rank, so no
state has to be sent around except what DDP itself synchronises.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from kdlab.errors import ConfigError, KdlabError

__all__ = [
    "ENV_TIMEOUT",
    "DEFAULT_TIMEOUT_S",
    "launched",
    "session",
    "active",
    "rank",
    "world_size",
    "is_main",
    "barrier",
    "main_first",
    "on_main",
    "all_reduce_sum",
    "all_true",
    "per_rank_batch",
    "local_device",
    "check_device",
    "wrap",
    "seed_epoch",
    "reduce_epoch_sums",
    "average_gradients",
    "PeerLost",
    "gather_batch",
    "sum_over_ranks",
]

ENV_TIMEOUT = "KDLAB_DIST_TIMEOUT"
# Long enough for the slowest legitimate wait (every rank reading a large ImageFolder before the first
# collective, rank 0 writing a checkpoint), short enough that a dead peer frees the machines the same hour.
DEFAULT_TIMEOUT_S = 1800.0

T = TypeVar("T")


class PeerLost(KdlabError):
    """Another rank stopped answering: it died, hung past the timeout, or its node went away."""


def launched() -> bool:
    """True in a process started by torchrun (or anything that sets the same variables)."""
    return all(k in os.environ for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"))


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def timeout_seconds() -> float:
    raw = os.environ.get(ENV_TIMEOUT)
    if raw is None:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ConfigError(f"{ENV_TIMEOUT}={raw!r}: expected a positive number of seconds")
    return value


def _env_int(name: str) -> int:
    try:
        return int(os.environ[name])
    except ValueError:
        raise ConfigError(
            f"environment variable {name}={os.environ[name]!r} is not an integer (set by torchrun)"
        ) from None


def _wants_cuda(device: str) -> bool:
    if device == "cuda" and not torch.cuda.is_available():
        raise KdlabError("train.device=cuda but no CUDA device is available (use auto or cpu)")
    return device == "cuda" or (device == "auto" and torch.cuda.is_available())


def _is_comm_failure(exc: BaseException) -> bool:
    if isinstance(exc, dist.DistError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        k in text for k in ("gloo", "Gloo", "NCCL", "Connection reset", "Connection closed", "timed out", "Timed out")
    )


@contextlib.contextmanager
def session(device: str = "auto", run_dir: str | Path | None = None) -> Iterator[None]:
    """The process group for the duration of a run when launched by torchrun; nothing otherwise.

    ``device`` is the recipe's ``train.device``: CUDA means NCCL and ``cuda:LOCAL_RANK``, CPU means gloo.
    A collective that fails because a peer is gone becomes a :class:`PeerLost` naming the way to resume.
    Ranks other than 0 have their stdout silenced for the rest of the process (only rank 0 reports);
    their stderr stays, so a rank that fails still says why.
    """
    if not launched() or active():
        yield
        return
    world, global_rank, local_rank = _env_int("WORLD_SIZE"), _env_int("RANK"), _env_int("LOCAL_RANK")
    timeout = datetime.timedelta(seconds=timeout_seconds())
    if _wants_cuda(device):
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"LOCAL_RANK {local_rank} but this node has {torch.cuda.device_count()} CUDA device(s): "
                "start at most one process per device (torchrun --nproc_per_node)"
            )
        torch.cuda.set_device(local_rank)
        backend, device_id = "nccl", torch.device("cuda", local_rank)
    else:
        backend, device_id = "gloo", None
    try:
        dist.init_process_group(backend, timeout=timeout, device_id=device_id)
    except Exception as e:
        if not _is_comm_failure(e):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PeerLost(
            f"rank {global_rank} of {world}: could not join the other ranks ({first[:300]}); "
            f"is every node started, and the rendezvous address right?"
        ) from None
    if global_rank != 0:
        sys.stdout = open(os.devnull, "w")
    failed = False
    try:
        yield
    except Exception as e:
        failed = True
        if _is_comm_failure(e):
            where = f"kdlab train --resume {run_dir}" if run_dir is not None else "kdlab train --resume DIR"
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise PeerLost(
                f"rank {global_rank} of {world}: lost contact with another rank ({first[:300]}); the checkpoints of "
                f"the finished epochs are kept: start the same torchrun command with '{where}' to continue"
            ) from None
        raise
    finally:
        # after a failed collective the group may be unusable (NCCL can block in its teardown); the
        # process is about to exit and the OS closes its sockets
        if not failed:
            dist.destroy_process_group()


def barrier() -> None:
    if active():
        dist.barrier()


def broadcast_object(obj: T) -> T:
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def main_first(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only and hand every rank its result, or the KdlabError it raised."""
    if not active():
        return fn()
    payload: tuple = ("ok", None)
    if is_main():
        try:
            payload = ("ok", fn())
        except KdlabError as e:
            payload = ("error", type(e), str(e))
    payload = broadcast_object(payload)
    if payload[0] == "error":
        raise payload[1](payload[2])
    return payload[1]


@contextlib.contextmanager
def on_main(factory: Callable[[], contextlib.AbstractContextManager]) -> Iterator[None]:
    """Enter ``factory()`` (a lock) on rank 0 only; if entering fails, every rank raises the same error."""
    if not active():
        with factory():
            yield
        return
    held: list[contextlib.AbstractContextManager] = []

    def enter() -> None:
        cm = factory()
        cm.__enter__()
        held.append(cm)

    main_first(enter)
    try:
        yield
    finally:
        for cm in held:
            cm.__exit__(None, None, None)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over the ranks, in place; returns it."""
    if active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_true(flag: torch.Tensor) -> torch.Tensor:
    """A boolean scalar that is True only where it is True on every rank (no host sync)."""
    if not active():
        return flag
    value = flag.to(torch.int32).reshape(1)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return value[0].bool()


def per_rank_batch(global_batch: int, world: int | None = None) -> int:
    world = world_size() if world is None else world
    if global_batch % world:
        raise ConfigError(
            f"train.batch_size={global_batch} is the global batch and must divide evenly among the {world} ranks "
            f"(each rank takes batch_size / {world}); choose a multiple of {world}"
        )
    return global_batch // world


def local_device(device: torch.device) -> torch.device:
    """``cuda`` becomes this process's ``cuda:LOCAL_RANK`` in a distributed run."""
    if device.type == "cuda" and active() and launched():
        return torch.device("cuda", _env_int("LOCAL_RANK"))
    return device


def check_device(device: torch.device) -> None:
    """Every run in a distributed job must use the device type its process group was built for."""
    if not active():
        return
    uses_nccl = dist.get_backend() == "nccl"
    if uses_nccl != (device.type == "cuda"):
        raise ConfigError(
            f"this torchrun job communicates with {dist.get_backend()}, but a run in it asks for train.device "
            f"{device.type}; every train section (teachers' included) must use the same device type"
        )


def seed_epoch(seed: int, epoch: int) -> None:
    """Per-rank randomness (dropout) for an epoch, from (seed, epoch, rank) only, so a resume repeats it.

    One process keeps its own stream untouched; the data order never comes from here (it is global).
    """
    if world_size() > 1:
        words = np.random.SeedSequence([int(seed), int(epoch), rank(), 0x6B646C]).generate_state(2, dtype=np.uint32)
        torch.manual_seed(((int(words[0]) << 32) | int(words[1])) & ((1 << 63) - 1))


def reduce_epoch_sums(sums: torch.Tensor, seen: int) -> tuple[torch.Tensor, int]:
    """Per-rank (loss sums..., correct) and sample count -> the global batch's: losses averaged, counts summed.

    Every rank's step loss is a mean over an equal share of the global batch, so their average is the
    global batch's mean.
    """
    if not active():
        return sums, seen
    packed = torch.cat([sums.float(), sums.new_tensor([float(seen)])])
    all_reduce_sum(packed)
    out = packed[:-1].clone()
    out[:-1] /= world_size()
    return out, int(round(packed[-1].item()))


class _SumOverRanks(torch.autograd.Function):
    """y = sum of x over the ranks; each rank's x gets the sum of every rank's dL/dy."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        y = x.clone()
        dist.all_reduce(y, op=dist.ReduceOp.SUM)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


class _GatherRanks(torch.autograd.Function):
    """y = every rank's x (equal shapes) concatenated along dim 0 in rank order."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rows = x.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        # every rank's loss depends on every rank's rows: this rank's rows get the sum over the ranks
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[rank() * ctx.rows : (rank() + 1) * ctx.rows]


def sum_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """Differentiable sum over the ranks (the statistics of the global batch)."""
    return _SumOverRanks.apply(x) if world_size() > 1 else x


def gather_batch(x: torch.Tensor) -> torch.Tensor:
    """Every rank's ``x`` concatenated in rank order, i.e. the global batch; differentiable.

    Every rank computes the loss of the whole global batch; the backward sums each rank's rows'
    gradient over the ranks and DDP then averages, so the update is that of one process.
    """
    return _GatherRanks.apply(x) if world_size() > 1 else x


def average_gradients(params) -> None:
    """Average the gradients over the ranks (auxiliary stages that do not run under DDP)."""
    if not active() or world_size() == 1:
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad.div_(world_size())


# ----------------------------------------------------------------------------------------------
# DDP


def idle_parameters(distiller: nn.Module) -> list[str]:
    """Trainable parameters the main stage never uses: those of terms inactive in it (two-stage FitNet)."""
    terms = getattr(distiller, "terms", {})
    return [
        f"terms.{name}.{pname}"
        for name, term in terms.items()
        if not term.active_in_main
        for pname, p in term.named_parameters()
        if p.requires_grad
    ]


def wrap(distiller: nn.Module, device: torch.device) -> nn.Module:
    """``distiller`` inside DistributedDataParallel when distributed; itself otherwise.

    The teachers stay outside (the Distiller keeps them out of its module tree); the student and
    its side modules are wrapped together, so one gradient all-reduce covers both. Parameters the
    main stage never uses are asked for with find_unused_parameters, which leaves their gradient
    None (no weight decay or momentum for them, as in one process).
    """
    if not active():
        return distiller
    from torch.nn.parallel import DistributedDataParallel

    device_ids = (
        [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    )
    return DistributedDataParallel(
        distiller, device_ids=device_ids, find_unused_parameters=bool(idle_parameters(distiller))
    )
