"""Batch normalisation over the global batch under torchrun (``train.sync_bn``), the same code on every device."""

from __future__ import annotations

import torch
from torch import nn

from kdlab.distributed import sum_over_ranks, world_size

__all__ = ["GlobalBatchNorm", "convert_sync_batchnorm"]


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch normalisation over the global batch (all ranks) on any device, gloo and NCCL alike.

    torch's SyncBatchNorm only runs on accelerators, and its forward waits for the device once per
    layer (it drops empty ranks with a boolean mask); this one gets the same statistics (two passes:
    the mean, then the mean squared deviation) through :func:`sum_over_ranks`, whose backward sums
    each statistic's gradient over the ranks, with no host sync: the code the CPU tests run is the
    code that runs on CUDA. Without a
    process group of more than one rank it is exactly ``BatchNorm``. Same parameters and buffers as
    ``BatchNorm``, so its state dict loads into the plain model.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and world_size() > 1):
            return super().forward(x)
        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        xf = x.float()
        count = xf.new_full((1,), float(x.numel() // x.shape[1]))  # a fill on the device, not a host-to-device copy
        first = sum_over_ranks(torch.cat([xf.sum(dims), count]))  # (C + 1,)
        n = first[-1]
        mean = first[:-1] / n
        centred = xf - mean.view(shape)
        var = sum_over_ranks((centred * centred).sum(dims)) / n  # biased: what normalises the batch
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.to(self.running_mean.dtype), alpha=m)
                unbiased = var * (n / (n - 1).clamp(min=1))
                self.running_var.mul_(1 - m).add_(unbiased.to(self.running_var.dtype), alpha=m)
        return y.to(x.dtype)


def _to_global_bn(module: nn.Module) -> nn.Module:
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(
        module, (GlobalBatchNorm, nn.SyncBatchNorm)
    ):
        bn = GlobalBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
        )
        if module.affine:
            bn.weight, bn.bias = module.weight, module.bias  # the same Parameter objects
        if module.track_running_stats:
            bn.running_mean, bn.running_var = module.running_mean, module.running_var
            bn.num_batches_tracked = module.num_batches_tracked
        bn.train(module.training)
        return bn
    for name, child in module.named_children():
        module.add_module(name, _to_global_bn(child))
    return module


def convert_sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm of ``model`` normalises with global-batch statistics (``train.sync_bn``).

    Parameters and buffers are kept (same objects, same state-dict keys). Every device uses
    :class:`GlobalBatchNorm`, so the path the CPU tests check is the one CUDA runs (``device`` is
    kept for callers).
    """
    return _to_global_bn(model)
