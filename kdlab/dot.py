"""DOT, the distillation-oriented trainer (Zhao, Cui, Song, Liang, "DOT: A Distillation-Oriented Trainer",
ICCV 2023, arXiv 2307.08436): momentum SGD with one momentum buffer for the task (cross-entropy) gradient and one
for the distillation gradient, the distillation one with the larger momentum.

As coded in the official repository `megvii-research/mdistiller` (`mdistiller/engine/dot.py`,
``DistillationOrientedTrainer``; the step in `mdistiller/engine/trainer.py`, class ``DOT``): per step the
distillation loss is back-propagated first and its gradients are set aside (``step_kd``), then the task loss, and
``step`` updates every parameter twice, first with its task buffer, then with its distillation buffer:

- task: ``d = g_task + wd * p``; ``buf = clone(d)`` at the first step, else ``buf = m_task * buf + d`` for a
  parameter that also has a distillation gradient and ``buf = (m_task + m_kd) / 2 * buf + d`` for one that has
  not; ``p -= lr * buf``;
- distillation: ``buf_kd = clone(g_kd)`` at the first step (no weight decay), else ``buf_kd = m_kd * buf_kd + g_kd``
  for a parameter that also has a task gradient and ``buf_kd = (m_task + m_kd) / 2 * buf_kd + g_kd + wd * p`` for
  one that has not; ``p -= lr * buf_kd``.

So weight decay rides on the task gradient, and a parameter reached by one loss alone moves as momentum SGD at the
mean momentum (with CE alone DOT is plain momentum SGD). No dampening, no Nesterov. The official class takes one
parameter group; here each group keeps its own ``lr`` and ``weight_decay`` (kdlab's no-decay group, a term's own
group). Both buffers are optimizer state, saved and restored with ``state_dict`` like SGD's.
"""

from __future__ import annotations

import torch
from torch import Tensor


class DistillationOrientedSGD(torch.optim.Optimizer):
    """``stash_distillation_grads()`` after the distillation loss's backward, then the task loss's backward, then
    ``step()``. Zero the gradients with ``set_to_none=True`` between the two: the stash holds the gradient tensors
    themselves, which an in-place zeroing would wipe."""

    def __init__(self, params, lr: float, momentum_task: float, momentum_distill: float, weight_decay: float = 0.0):
        for name, value in (("momentum_task", momentum_task), ("momentum_distill", momentum_distill)):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"DOT: {name} must lie in [0, 1), got {value}")
        defaults = dict(
            lr=lr, momentum_task=momentum_task, momentum_distill=momentum_distill, weight_decay=weight_decay
        )
        super().__init__(params, defaults)
        self._distill_grads: dict[int, Tensor] = {}

    @torch.no_grad()
    def stash_distillation_grads(self) -> None:
        """Set aside every parameter's current gradient as its distillation gradient (DOT's ``step_kd``)."""
        self._distill_grads = {
            id(p): p.grad for group in self.param_groups for p in group["params"] if p.grad is not None
        }

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        stash, self._distill_grads = self._distill_grads, {}
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            m_task, m_kd = group["momentum_task"], group["momentum_distill"]
            m_mean = (m_task + m_kd) / 2.0
            for p in group["params"]:
                g_task, g_kd = p.grad, stash.get(id(p))
                state = self.state[p]
                if g_task is not None:
                    d = g_task.add(p, alpha=wd) if wd != 0 else g_task
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = torch.clone(d).detach()
                    else:
                        buf.mul_(m_task if g_kd is not None else m_mean).add_(d)
                    p.add_(buf, alpha=-lr)
                if g_kd is not None:
                    buf = state.get("distill_momentum_buffer")
                    if buf is None:
                        buf = state["distill_momentum_buffer"] = torch.clone(g_kd).detach()
                    elif g_task is not None:
                        buf.mul_(m_kd).add_(g_kd)
                    else:
                        buf.mul_(m_mean).add_(g_kd.add(p, alpha=wd) if wd != 0 else g_kd)
                    p.add_(buf, alpha=-lr)
        return loss
