"""Batch-norm folding for an inference-only teacher: each conv -> BN pair becomes one convolution.

An eval-mode BN after a convolution is a per-output-channel affine map, so
``bn(conv(x)) = conv'(x)`` with ``W' = W * s`` and ``b' = (b - mean) * s + beta``,
``s = gamma / sqrt(var + eps)``. Folding removes a full read and write of every such activation map.

The BN module is replaced by ``nn.Identity`` under the same name, so module names, ``feature_info``
aliases and taps by name keep working and see the same values (within float rounding).

Pairs are found on one probe forward, through the autograd graph it records from the outputs and
from every tapped (hooked) module's output: a BN is folded only when its input is the output of a
``Conv2d`` that nothing else reads. A conv output that is also concatenated (DenseNet's stem) or
added to a shortcut stays unfolded, as does any pair where a module runs more than once per forward
or carries hooks itself (a tap on the conv's own output would otherwise see BN-scaled values).
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import nn

from kdlab.errors import ConfigError

__all__ = ["fold_batchnorm", "foldable_pairs"]


def _consumers(roots: list[torch.Tensor]) -> Counter:
    """How many graph edges lead into each autograd node reachable from ``roots``."""
    count: Counter = Counter()
    seen: set = set()
    stack = [t.grad_fn for t in roots if t.grad_fn is not None]
    for node in stack:
        count[node] += 1
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        for nxt, _ in node.next_functions:
            if nxt is not None:
                count[nxt] += 1
                stack.append(nxt)
    return count


def _tensors(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for item in out for t in _tensors(item)]
    return []


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks)


def _default_example(model: nn.Module) -> torch.Tensor:
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if first is None:
        raise ConfigError("fold_batchnorm: the model has no Conv2d; pass an example input")
    p = first.weight
    return torch.zeros(2, first.in_channels, 32, 32, device=p.device, dtype=p.dtype)


def foldable_pairs(model: nn.Module, example: torch.Tensor | None = None) -> list[tuple[str, str]]:
    """``(conv name, bn name)`` pairs that :func:`fold_batchnorm` would fold, found on one probe forward."""
    if model.training:
        raise ConfigError("fold_batchnorm: call model.eval() first (BN folding uses the running statistics)")
    names = {m: n for n, m in model.named_modules()}
    calls: Counter = Counter()
    conv_out: dict[nn.Module, object] = {}
    bn_in: dict[nn.Module, object] = {}

    def on_conv(module, _inputs, output):
        calls[module] += 1
        conv_out[module] = output.grad_fn

    def on_bn(module, inputs, _output):
        calls[module] += 1
        bn_in[module] = inputs[0].grad_fn

    tapped: list[torch.Tensor] = []
    handles = []
    for m in model.modules():
        if _has_hooks(m):  # a tap: what it reads counts as an output, even off the path to the logits
            handles.append(m.register_forward_hook(lambda _m, _i, out: tapped.extend(_tensors(out))))
        elif type(m) is nn.Conv2d:
            handles.append(m.register_forward_hook(on_conv))
        elif type(m) is nn.BatchNorm2d and m.track_running_stats and m.running_mean is not None:
            handles.append(m.register_forward_hook(on_bn))
    x = (_default_example(model) if example is None else example).detach().clone().requires_grad_(True)
    try:
        with torch.enable_grad():
            roots = _tensors(model(x)) + tapped
    finally:
        for h in handles:
            h.remove()
    uses = _consumers(roots)
    producer = {node: conv for conv, node in conv_out.items() if node is not None}
    pairs = []
    for bn, node in bn_in.items():
        conv = producer.get(node)
        if conv is None or calls[conv] != 1 or calls[bn] != 1 or uses[node] != 1:
            continue
        if conv.out_channels != bn.num_features:
            continue
        pairs.append((names[conv], names[bn]))
    return sorted(pairs)


@torch.no_grad()
def _fold_into(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    # float64 arithmetic, one rounding at the end: the folded conv stays as close as the format allows
    w = conv.weight.double()
    mean, var = bn.running_mean.double(), bn.running_var.double()
    gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(mean)
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(mean)
    scale = gamma / torch.sqrt(var + bn.eps)
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(mean)
    conv.weight.copy_(w * scale.view(-1, *([1] * (w.dim() - 1))))
    new_bias = (bias - mean) * scale + beta
    if conv.bias is None:
        conv.bias = nn.Parameter(new_bias.to(conv.weight.dtype), requires_grad=conv.weight.requires_grad)
    else:
        conv.bias.copy_(new_bias)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, module)


def fold_batchnorm(model: nn.Module, example: torch.Tensor | None = None) -> list[str]:
    """Fold every foldable conv -> BN pair of an eval-mode ``model`` in place; returns the folded BN names.

    ``example``: a probe input batch (default: two zero 32x32 images with the first conv's channels).
    The model must stay in eval mode afterwards: its folded BNs no longer normalise batches.
    """
    pairs = foldable_pairs(model, example)
    for conv_name, bn_name in pairs:
        _fold_into(model.get_submodule(conv_name), model.get_submodule(bn_name))
        _set_submodule(model, bn_name, nn.Identity())
    return [bn for _, bn in pairs]
