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
then the step is captured once and replayed with the inputs copied into static buffers. The CUDA
primitives (side stream, capture) come from a ``graphs`` object: :class:`CudaGraphs` on a GPU,
:class:`RerunGraphs` on the CPU, whose "replay" re-runs the captured function and copies its results
into the static outputs, so the capture/replay bookkeeping is tested without a GPU. What the
bookkeeping guarantees, on both:

* a call whose inputs differ in shape or dtype from the captured ones (a short last batch from a
  user's DataLoader) runs eagerly: copying it into the static buffers would fail, or, for a batch
  of one, broadcast one image over the whole static batch;
* every call returns tensors of its own, as the eager step does: the static outputs are rewritten
  by the next replay, so they are cloned (a few device-side copies, no sync);
* autocast is entered with ``cache_enabled=False`` (the form PyTorch's CUDA-graphs notes require
  for autocast inside a capture; the cache only helps reused fp32 weights, which a step does not).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn

from kdlab.errors import ConfigError

__all__ = ["GraphStep", "CudaGraphs", "RerunGraphs"]

Forward = Callable[..., tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]]


class CudaGraphs:  # pragma: no cover - needs a GPU
    """The CUDA side of the capture: a warm-up side stream and ``torch.cuda.graph``, as in PyTorch's
    CUDA-graphs notes."""

    def __init__(self):
        self._side = None

    @contextlib.contextmanager
    def side_stream(self):
        # the notes' warm-up recipe: eager iterations on a side stream before capturing
        if self._side is None:
            self._side = torch.cuda.Stream()
        self._side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self._side):
            yield
        torch.cuda.current_stream().wait_stream(self._side)

    def capture(self, fn: Callable, state=()):
        """``(graph, fn's outputs)``; the outputs are the static tensors every ``graph.replay()`` rewrites."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fn()
        return graph, out


class RerunGraphs:
    """A CPU stand-in for :class:`CudaGraphs` with the same contract, for tests and ``gpu_check --dry-run``.

    A CUDA capture records kernels without running them, so ``capture`` runs ``fn`` once for its
    outputs and then puts back what that run changed in place (the ``modules``' parameters and
    buffers, the ``state`` the caller names, such as momentum buffers, and the CPU RNG), leaving the
    training state as a capture would. ``replay`` runs ``fn`` again and copies its results into the
    tensors ``capture`` returned, as a replay rewrites the static outputs in place.
    """

    def __init__(self, modules=()):
        self.modules = list(modules)
        self.captures = 0
        self.replays = 0

    def side_stream(self):
        return contextlib.nullcontext()

    def capture(self, fn: Callable, state=()):
        tensors = [t for m in self.modules for t in m.state_dict(keep_vars=True).values()] + list(state)
        saved = [t.detach().clone() for t in tensors]
        rng = torch.get_rng_state()
        out = fn()
        with torch.no_grad():
            for t, s in zip(tensors, saved):
                t.copy_(s)
        torch.set_rng_state(rng)
        self.captures += 1
        return _Replay(self, fn, out), out


class _Replay:
    def __init__(self, owner: RerunGraphs, fn: Callable, out):
        self.owner, self.fn, self.out = owner, fn, out

    def replay(self) -> None:
        _copy_into(self.out, self.fn())
        self.owner.replays += 1


def _copy_into(static, new) -> None:
    if isinstance(static, torch.Tensor):
        static.copy_(new)
    elif isinstance(static, dict):
        for k in static:
            _copy_into(static[k], new[k])
    else:
        for s, n in zip(static, new):
            _copy_into(s, n)


def _clone(out):
    if isinstance(out, torch.Tensor):
        return out.clone()
    if isinstance(out, dict):
        return {k: _clone(v) for k, v in out.items()}
    return type(out)(_clone(v) for v in out)


def _signature(tensors) -> tuple:
    # host-side metadata only: reading a shape never waits for the device
    return tuple(None if t is None else (tuple(t.shape), t.dtype) for t in tensors)


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
        graphs=None,
    ):
        self.forward = forward
        self.device = torch.device(device)
        self.autocast = autocast
        self.grad_clip = grad_clip
        self.teacher_cache = teacher_cache
        self.capture = self.device.type == "cuda" if capture is None else capture
        if self.capture and graphs is None:
            if self.device.type != "cuda":
                raise ConfigError("graph capture needs a CUDA device")
            graphs = CudaGraphs()
        self.graphs = graphs
        if self.capture and teacher_cache is not None and getattr(teacher_cache, "storage", "device") != "device":
            # a memory-mapped table is gathered on the host: index.to("cpu") waits for the device,
            # which a capture forbids
            raise ConfigError(
                "train.fast.cache_storage: a CUDA graph needs the teacher cache in device memory "
                "(cache_storage=device), or set train.fast.cuda_graph=false"
            )
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
                    optimizer.state[p].setdefault(
                        "momentum_buffer", torch.zeros_like(p, memory_format=torch.preserve_format)
                    )
            self.groups.append((params, group))
        self.optimizer = optimizer
        self.params = [p for params, _ in self.groups for p in params]
        self._calls = 0
        self._graph = None
        self._shape = None  # the signature of the inputs the graph is (or will be) captured for
        self._static_in: tuple = ()
        self._static_out = None
        self.eager_calls = 0  # calls that ran eagerly because their inputs did not fit the graph

    # ------------------------------------------------------------------ the step itself

    @torch.no_grad()
    def _sgd(self) -> None:
        for params, group in self.groups:
            # a side module unused this step keeps its weights, as in SGD
            live = [p for p in params if p.grad is not None]
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
        # inside the captured function: the capture then allocates the gradients from the graph's pool,
        # and every replay (and a CPU re-run) writes them afresh instead of accumulating
        self._zero_grad()
        teacher_logits = self.teacher_cache.lookup(index, view) if self.teacher_cache is not None else None
        with self.autocast():
            loss, logits, terms = self.forward(x, y, teacher_logits)
        loss.backward()
        if self.grad_clip is not None:
            nn.utils.clip_grad_norm_(self.params, self.grad_clip, foreach=True)
        self._sgd()
        return loss.detach(), logits.detach(), {k: v.detach() for k, v in terms.items()}

    def _state(self) -> list[torch.Tensor]:
        """What the step changes in place besides the modules: the weights and the optimizer's state."""
        return self.params + [
            t for p in self.params for t in self.optimizer.state[p].values() if isinstance(t, torch.Tensor)
        ]

    def _zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def __call__(self, x, y, lr: float, index=None, view=None):
        self.lr.fill_(lr)  # a kernel argument, not a copy from host memory: no sync
        if not self.capture:
            return self._step(x, y, index, view)
        return self._captured(x, y, index, view)

    # ------------------------------------------------------------------ capture and replay

    def _captured(self, x, y, index, view):
        inputs = (x, y, index, view)
        signature = _signature(inputs)
        if self._shape is None:
            self._shape = signature
        if signature != self._shape:
            return self._eager(*inputs)
        if self._calls < self.warmup:
            self._calls += 1
            with self.graphs.side_stream():
                return self._step(*inputs)
        if self._graph is None:
            self._static_in = tuple(t.clone() if t is not None else None for t in inputs)
            self._graph, self._static_out = self.graphs.capture(lambda: self._step(*self._static_in), self._state())
        for static, new in zip(self._static_in, inputs):
            if static is not None:
                static.copy_(new, non_blocking=True)
        self._graph.replay()
        return _clone(self._static_out)

    def _eager(self, x, y, index, view):
        self.eager_calls += 1
        # after a capture: the graph's gradient tensors, kept alive for its replays
        kept = [p.grad for p in self.params]
        try:
            return self._step(x, y, index, view)
        finally:
            for p, g in zip(self.params, kept):
                p.grad = g
