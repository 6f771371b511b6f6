"""A training step with no host synchronisation, capturable as a CUDA graph; on the CPU the same function runs eagerly.

One call does the teacher forward (or a teacher-cache lookup), the student forward and backward,
optional gradient clipping and an SGD update. What makes it capturable:

* static shapes: the loader's ``drop_last`` batches all have the training batch size;
* the learning rate lives in a 0-dim device tensor, refilled before each call, so a schedule needs
  no re-capture (a Python float would be frozen into the graph);
* the SGD update is written with foreach ops on that tensor (``torch.optim.SGD`` turns a tensor lr
  into a Python number with ``.item()``, a sync), reading and writing the optimizer's own
  ``momentum_buffer`` state so checkpoints and resume are unchanged;
* nothing reads a value back to the host: the loss, logits and terms come back as device tensors.

Numerics equal ``torch.optim.SGD`` (dampening 0): zero-initialised momentum buffers give
``0 * m + g = g`` on the first step exactly as SGD's clone does, and the update ``p - lr * d`` is
rounded twice where SGD's ``p + (-lr) * d`` may be fused, a difference of at most one unit in the
last place per step.

On CUDA the first ``warmup`` calls run eagerly on a side stream (they are real training steps),
then the step is captured once and replayed with the inputs copied into static buffers.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import nn

from kdlab.errors import ConfigError

__all__ = ["GraphStep"]

Forward = Callable[..., tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]]


class GraphStep:
    """``step(x, y, lr, index=None, view=None) -> (loss, logits, {term: value})``, all detached device tensors.

    ``forward(x, y, teacher_logits)`` is the distiller's forward (``teacher_logits`` None unless a
    ``teacher_cache`` is given, which is then looked up with the batch's ``index`` and ``view``).
    """

    def __init__(
        self,
        forward: Forward,
        optimizer: torch.optim.Optimizer,
        device: torch.device,
        autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
        grad_clip: float | None = None,
        teacher_cache=None,
        capture: bool | None = None,
        warmup: int = 3,
    ):
        self.forward = forward
        self.device = torch.device(device)
        self.autocast = autocast
        self.grad_clip = grad_clip
        self.teacher_cache = teacher_cache
        self.capture = self.device.type == "cuda" if capture is None else capture
        if self.capture and self.device.type != "cuda":
            raise ConfigError("graph capture needs a CUDA device")
        self.warmup = warmup
        self.lr = torch.zeros((), dtype=torch.float32, device=self.device)
        self.groups = []
        for group in optimizer.param_groups:
            if group.get("dampening", 0) != 0 or group.get("maximize", False):
                raise ConfigError("the graph step implements SGD without dampening or maximize")
            params = [p for p in group["params"] if p.requires_grad]
            if group["momentum"]:
                for p in params:
                    # zeros behave like SGD's first-step clone of the gradient, and exist before any capture
                    optimizer.state[p].setdefault("momentum_buffer", torch.zeros_like(p, memory_format=torch.preserve_format))
            self.groups.append((params, group))
        self.optimizer = optimizer
        self.params = [p for params, _ in self.groups for p in params]
        self._calls = 0
        self._graph = None
        self._static_in: tuple = ()
        self._static_out = None

    # ------------------------------------------------------------------ the step itself

    @torch.no_grad()
    def _sgd(self) -> None:
        for params, group in self.groups:
            live = [p for p in params if p.grad is not None]  # a side module unused this step keeps its weights, as in SGD
            if not live:
                continue
            grads = [p.grad for p in live]
            wd, momentum = group["weight_decay"], group["momentum"]
            if wd:
                grads = torch._foreach_add(grads, live, alpha=wd)
            if momentum:
                bufs = [self.optimizer.state[p]["momentum_buffer"] for p in live]
                torch._foreach_mul_(bufs, momentum)
                torch._foreach_add_(bufs, grads)
                grads = torch._foreach_add(grads, bufs, alpha=momentum) if group["nesterov"] else bufs
            torch._foreach_sub_(live, torch._foreach_mul(grads, self.lr))

    def _step(self, x, y, index, view):
        teacher_logits = self.teacher_cache.lookup(index, view) if self.teacher_cache is not None else None
        with self.autocast():
            loss, logits, terms = self.forward(x, y, teacher_logits)
        loss.backward()
        if self.grad_clip is not None:
            nn.utils.clip_grad_norm_(self.params, self.grad_clip, foreach=True)
        self._sgd()
        return loss.detach(), logits.detach(), {k: v.detach() for k, v in terms.items()}

    def _zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def __call__(self, x, y, lr: float, index=None, view=None):
        self.lr.fill_(lr)  # a kernel argument, not a copy from host memory: no sync
        if not self.capture:
            self._zero_grad()
            return self._step(x, y, index, view)
        return self._cuda(x, y, index, view)

    # ------------------------------------------------------------------ CUDA graph (thin)

    def _cuda(self, x, y, index, view):  # pragma: no cover - needs a GPU
        if self._calls < self.warmup:
            self._calls += 1
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._zero_grad()
                out = self._step(x, y, index, view)
            torch.cuda.current_stream().wait_stream(side)
            return out
        if self._graph is None:
            self._static_in = tuple(t.clone() if t is not None else None for t in (x, y, index, view))
            self._zero_grad()  # gradients are then allocated from the graph's pool and rewritten by each replay
            self._graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self._graph):
                self._static_out = self._step(*self._static_in)
        for static, new in zip(self._static_in, (x, y, index, view)):
            if static is not None:
                static.copy_(new, non_blocking=True)
        self._graph.replay()
        return self._static_out
