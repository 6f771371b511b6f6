"""Where and in what precision a run computes: the device, bf16 autocast, cuDNN settings, memory layout.

A leaf of the package (it imports only the config types, the distributed helpers and the errors), so
that the training loop, the teacher tools and the commands all read these facts from one place.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from kdlab import distributed
from kdlab.config import TrainConfig
from kdlab.errors import ConfigError, KdlabError


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
