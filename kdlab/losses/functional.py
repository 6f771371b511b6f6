"""Pure-maths core of the distillation losses (KD, Tf-KD, LSR, AT, NST, LP, FT/FEED, FitNet), each citing its paper.

Every function here is a plain function of tensors (no ``nn.Module``, no config object) that returns a
scalar tensor. Common rules:

* **Precision.** The maths always runs in at least float32: float16/bfloat16 inputs are cast up with
  ``.float()``, mixed inputs are promoted (float32 + float64 -> float64), and autocast is switched off
  inside the function, so ``torch.autocast(..., dtype=torch.bfloat16)`` never lowers the precision of
  the reductions. The result therefore has dtype float32 for half/bfloat16/float32 inputs and float64
  for float64 inputs.
* **Gradients.** All functions are differentiable w.r.t. the student inputs. The teacher side is not
  detached unless stated (``lp`` detaches the whole teacher side; ``nst``/``lp`` detach the data-driven
  ``sigma2``); callers run the teacher under ``torch.no_grad()``.
* **Shapes.** Shapes are checked up front; a mismatch raises :class:`kdlab.errors.LayerError` naming
  both shapes. Invalid option values (unknown kernel/mode, ``T <= 0``, ``k`` out of range...) raise
  :class:`kdlab.errors.ConfigError`.
* **Normalisation.** ``normalize`` below means L2 normalisation ``v / max(||v||_2, 1e-12)``, i.e.
  ``F.normalize`` with its default eps, so all-zero vectors map to zero instead of NaN.
* **Efficiency.** Everything is vectorised over the batch (``bmm``/``matmul``/``cdist``); there is no
  Python loop over samples, channels or positions.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor

from kdlab.errors import ConfigError, DataError, LayerError

__all__ = [
    "kd",
    "at",
    "nst",
    "lp",
    "factor",
    "hint",
    "tfkd_reg_target",
    "tfkd_reg",
    "lsr",
    "recon_error",
]

NORM_EPS = 1e-12
"""The L2-normalisation eps (``F.normalize``'s default): ``v / max(||v||, NORM_EPS)``."""

NST_KERNELS = ("linear", "poly", "gaussian")
TFKD_MODES = ("code", "paper")
LSR_SPREADS = ("all", "others")
RECON_KINDS = ("l1", "l2")

_Fn = TypeVar("_Fn", bound=Callable[..., Tensor])


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def _float_math(fn: _Fn) -> _Fn:
    """Run ``fn`` with autocast disabled on the device of its first tensor argument."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        device_type = "cpu"
        for value in (*args, *kwargs.values()):
            if isinstance(value, Tensor):
                device_type = value.device.type
                break
        if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
            with torch.autocast(device_type=device_type, enabled=False):
                return fn(*args, **kwargs)
        return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _as_float(*tensors: Tensor) -> tuple[Tensor, ...]:
    """Cast floating tensors to one common dtype of at least float32 (half/bf16 -> float32)."""
    dtype = torch.float32
    for t in tensors:
        if t.is_floating_point():
            dtype = torch.promote_types(dtype, t.dtype)
        else:
            raise LayerError(f"expected a floating-point tensor, got dtype {t.dtype} with shape {_shape(t)}")
    return tuple(t if t.dtype == dtype else t.to(dtype) for t in tensors)


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _require_tensor(name: str, what: str, x: object) -> None:
    if not isinstance(x, Tensor):
        raise LayerError(f"{name}: {what} must be a tensor, got {type(x).__name__}")


def _check_same_shape(name: str, student: Tensor, teacher: Tensor, what: str, fix: str) -> None:
    _require_tensor(name, "student input", student)
    _require_tensor(name, "teacher input", teacher)
    if student.shape != teacher.shape:
        raise LayerError(f"{name}: {what} shapes differ: student {_shape(student)} vs teacher {_shape(teacher)}; {fix}")


def _check_maps(name: str, fs: Tensor, ft: Tensor) -> None:
    """(N, C, *spatial) maps with equal N and equal spatial sizes; channel counts may differ."""
    _require_tensor(name, "student feature map", fs)
    _require_tensor(name, "teacher feature map", ft)
    if fs.dim() < 3 or ft.dim() < 3:
        raise LayerError(
            f"{name}: expected feature maps of shape (N, C, H, W) (at least 3 dims), "
            f"got student {_shape(fs)} vs teacher {_shape(ft)}"
        )
    if fs.shape[0] != ft.shape[0]:
        raise LayerError(
            f"{name}: batch sizes differ: student {_shape(fs)} vs teacher {_shape(ft)}; "
            "student and teacher must see the same batch"
        )
    if fs.shape[2:] != ft.shape[2:]:
        raise LayerError(
            f"{name}: spatial sizes differ: student {_shape(fs)[1:]} vs teacher {_shape(ft)[1:]}; "
            "pool the larger map (option pool: true)"
        )


def _check_positive(name: str, what: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{name}: {what} must be a finite number > 0, got {value!r}")
    return float(value)


def _check_unit_interval(name: str, what: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value <= 1.0:
        raise ConfigError(f"{name}: {what} must be a number in [0, 1], got {value!r}")
    return float(value)


def _check_choice(name: str, what: str, value: object, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ConfigError(f"{name}: unknown {what} {value!r}; expected one of {', '.join(map(repr, choices))}")
    return value  # type: ignore[return-value]


def _check_logits_targets(name: str, logits: Tensor, targets: Tensor) -> None:
    _require_tensor(name, "student logits", logits)
    _require_tensor(name, "targets", targets)
    if logits.dim() != 2:
        raise LayerError(f"{name}: expected student logits of shape (N, K), got {_shape(logits)}")
    if targets.dim() != 1 or targets.shape[0] != logits.shape[0]:
        raise LayerError(
            f"{name}: expected targets of shape (N,) matching the logits' batch, "
            f"got logits {_shape(logits)} vs targets {_shape(targets)}"
        )
    _check_labels(name, targets, logits.shape[1])


def _check_labels(name: str, targets: Tensor, num_classes: int) -> None:
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise LayerError(f"{name}: targets must be integer class indices, got dtype {targets.dtype}")
    # Range check only on CPU: on an accelerator it would force a host sync every step (the
    # backend's own index assertion still fires there).
    if targets.device.type == "cpu" and targets.numel() > 0:
        lo, hi = int(targets.min()), int(targets.max())
        if lo < 0 or hi >= num_classes:
            raise DataError(
                f"{name}: class index out of range: labels span [{lo}, {hi}] but there are {num_classes} classes"
            )


def _kl_bm(log_p: Tensor, log_q: Tensor) -> Tensor:
    """``KL_bm(p || q) = (1/N) sum_n sum_k p_nk (log p_nk - log q_nk)`` from log-probabilities.

    Terms with ``p_nk = 0`` contribute 0 (``xlogy`` convention), as in ``F.kl_div``.
    """
    p = log_p.exp()
    return (p * torch.where(p > 0, log_p - log_q, torch.zeros_like(p))).sum() / log_p.shape[0]


# --------------------------------------------------------------------------------------------------
# logit losses
# --------------------------------------------------------------------------------------------------


ZSCORE_EPS = 1e-7
"""Logit standardisation's eps, added to the standard deviation as in its official code."""


def _zscore(z: Tensor) -> Tensor:
    """Logit standardisation (Sun et al., CVPR 2024): each row minus its mean, over ``eps + std``.

    ``std`` is the unbiased (K - 1) standard deviation of ``torch.std``, as in the official code; the
    paper's population sigma is smaller by sqrt((K - 1) / K), which only rescales the temperature.
    """
    if z.shape[-1] < 2:
        raise LayerError(f"logit standardisation needs at least 2 classes, got logits of shape {_shape(z)}")
    return (z - z.mean(dim=-1, keepdim=True)) / (ZSCORE_EPS + z.std(dim=-1, keepdim=True))


@_float_math
def kd(student_logits: Tensor, teacher_logits: Tensor, T: float = 4.0, standardize: bool = False) -> Tensor:
    r"""Hinton KD loss (Hinton, Vinyals, Dean 2015): the temperature-scaled, batch-mean KL divergence.

    .. math::
        L = T^2 \cdot \frac{1}{N}\sum_n \sum_k p^t_{nk}\,(\log p^t_{nk} - \log p^s_{nk}),
        \quad p^t = \mathrm{softmax}(z_t/T),\; p^s = \mathrm{softmax}(z_s/T)

    Reduction: sum over classes, mean over the batch (``reduction='batchmean'``), then the ``T^2``
    factor that keeps the soft-target gradient scale independent of ``T`` (Hinton; RepDistiller,
    AT code). Note the Tf-KD repo's ``nn.KLDivLoss()`` default divides by ``N*K`` instead (``KL_mean``
    = this / K); that factor belongs in the weight, not here. Both sides use ``log_softmax``.

    With ``standardize=True`` both logits are first z-scored per sample (logit standardisation, Sun
    et al., CVPR 2024: ``(z - mean_k z) / (1e-7 + std_k z)``), so that ``T`` acts on logits of unit
    spread and the student need not match the teacher's logit range.

    Args:
        student_logits: (N, K).
        teacher_logits: (N, K), same shape.
        T: temperature > 0.
        standardize: z-score both logits per sample before the temperature.
    """
    T = _check_positive("kd", "temperature T", T)
    _check_same_shape("kd", student_logits, teacher_logits, "logit", "student and teacher must share the classes")
    if student_logits.dim() != 2:
        raise LayerError(f"kd: expected logits of shape (N, K), got student {_shape(student_logits)}")
    zs, zt = _as_float(student_logits, teacher_logits)
    if standardize:
        zs, zt = _zscore(zs), _zscore(zt)
    log_ps = F.log_softmax(zs / T, dim=1)
    log_pt = F.log_softmax(zt / T, dim=1)
    return (T * T) * _kl_bm(log_pt, log_ps)


def tfkd_reg_target(targets: Tensor, num_classes: int, a: float = 0.99, *, dtype: torch.dtype | None = None) -> Tensor:
    r"""Tf-KD_reg's manually designed distribution (Yuan et al., CVPR 2020, Eq. 9), shape (N, K).

    .. math:: p^d_{nk} = a \text{ if } k = y_n \text{ else } (1-a)/(K-1)

    Each row sums to 1. ``a = 0.99`` is the official code's hard-coded ``correct_prob``.

    Args:
        targets: (N,) integer labels in ``[0, num_classes)``.
        num_classes: K >= 2.
        a: probability of the true class, in [0, 1].
        dtype: floating dtype of the result (default: ``torch.get_default_dtype()``).
    """
    a = _check_unit_interval("tfkd_reg_target", "a (true-class probability)", a)
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 2:
        raise ConfigError(f"tfkd_reg_target: num_classes must be an integer >= 2, got {num_classes!r}")
    _require_tensor("tfkd_reg_target", "targets", targets)
    if targets.dim() != 1:
        raise LayerError(f"tfkd_reg_target: expected targets of shape (N,), got {_shape(targets)}")
    _check_labels("tfkd_reg_target", targets, int(num_classes))
    dtype = dtype or torch.get_default_dtype()
    K = int(num_classes)
    out = torch.full((targets.shape[0], K), (1.0 - a) / (K - 1), dtype=dtype, device=targets.device)
    out.scatter_(1, targets.long().unsqueeze(1), a)
    return out


@_float_math
def tfkd_reg(student_logits: Tensor, targets: Tensor, a: float = 0.99, T: float = 20.0, mode: str = "code") -> Tensor:
    r"""Tf-KD_reg's regularisation term (Yuan et al., CVPR 2020; official code's form), without the CE term
    and the weights.

    ``p_d = tfkd_reg_target(targets, K, a)`` is the manual **probability** distribution. In both modes
    the virtual teacher is ``softmax(p_d / T)``: the softmax of the *probabilities* divided by ``T``
    (the official code's form; for K=100, a=0.99, T=20 it is almost uniform, so the term is close to
    LSR). The other reading of the paper, ``softmax(log p_d / T)`` (temperature on log-probabilities,
    a much sharper teacher), is a different method and is *not* implemented.

    * ``mode="code"`` (official code, CIFAR-100): the student is **not** tempered and there is no
      ``T^2``:

      .. math:: L = \mathrm{KL_{bm}}(\mathrm{softmax}(p_d/T) \,\|\, \mathrm{softmax}(z))

    * ``mode="paper"`` (paper Eq. 9 read literally, both sides tempered, with Hinton's ``T^2``
      scaling as for KD; the paper omits ``T^2`` in the equation but the KD code uses it):

      .. math:: L = T^2 \cdot \mathrm{KL_{bm}}(\mathrm{softmax}(p_d/T) \,\|\, \mathrm{softmax}(z/T))

    Reduction: batch mean (sum over classes, divided by N). The official code uses
    ``nn.KLDivLoss()``'s default reduction, which divides by ``N*K``: its value is this one divided
    by K, a factor the module layer folds into the weight (``alpha * multiplier / K``).

    Args:
        student_logits: (N, K) with K >= 2.
        targets: (N,) integer labels.
        a: true-class probability of the manual distribution.
        T: temperature > 0 (the code's ``reg_temperature``).
        mode: ``"code"`` or ``"paper"``.
    """
    mode = _check_choice("tfkd_reg", "mode", mode, TFKD_MODES)
    T = _check_positive("tfkd_reg", "temperature T", T)
    _check_logits_targets("tfkd_reg", student_logits, targets)
    (z,) = _as_float(student_logits)
    p_d = tfkd_reg_target(targets, z.shape[1], a, dtype=z.dtype)
    log_teacher = F.log_softmax(p_d / T, dim=1)
    if mode == "code":
        return _kl_bm(log_teacher, F.log_softmax(z, dim=1))
    return (T * T) * _kl_bm(log_teacher, F.log_softmax(z / T, dim=1))


@_float_math
def lsr(student_logits: Tensor, targets: Tensor, eps: float = 0.1, spread: str = "all") -> Tensor:
    r"""Label-smoothing cross-entropy (Szegedy et al., CVPR 2016; Yuan et al., CVPR 2020), batch mean.

    .. math:: L = -\frac{1}{N}\sum_n \sum_k q_{nk} \log \mathrm{softmax}(z_n)_k

    * ``spread="all"`` (Szegedy): ``q = (1-eps)*onehot(y) + eps/K``; equals
      ``F.cross_entropy(z, y, label_smoothing=eps)``.
    * ``spread="others"`` (the Tf-KD repo's LSR): ``q = 1-eps`` on the true class and ``eps/(K-1)``
      on each other class.

    Args:
        student_logits: (N, K) with K >= 2.
        targets: (N,) integer labels.
        eps: smoothing mass in [0, 1].
        spread: ``"all"`` or ``"others"``.
    """
    spread = _check_choice("lsr", "spread", spread, LSR_SPREADS)
    eps = _check_unit_interval("lsr", "eps", eps)
    _check_logits_targets("lsr", student_logits, targets)
    (z,) = _as_float(student_logits)
    K = z.shape[1]
    if spread == "others" and K < 2:
        raise LayerError(f"lsr: spread='others' needs at least 2 classes, got logits {_shape(student_logits)}")
    off, on = (eps / K, 1.0 - eps + eps / K) if spread == "all" else (eps / (K - 1), 1.0 - eps)
    q = torch.full_like(z, off).scatter_(1, targets.long().unsqueeze(1), on)
    return -(q * F.log_softmax(z, dim=1)).sum() / z.shape[0]


# --------------------------------------------------------------------------------------------------
# feature losses
# --------------------------------------------------------------------------------------------------


@_float_math
def at(fs: Tensor, ft: Tensor, p: float = 2) -> Tensor:
    r"""Attention-transfer loss for one pair of maps (Zagoruyko & Komodakis, ICLR 2017; official AT code form).

    .. math::
        q = \mathrm{normalize}\big(\mathrm{flatten}_{HW}(\tfrac{1}{C}\sum_c |f_c|^p)\big), \qquad
        L = \frac{1}{N\cdot HW}\sum_{n, hw} (q^s_{n,hw} - q^t_{n,hw})^2

    ``normalize`` is the per-sample L2 norm with eps 1e-12 (an all-zero attention map stays zero).
    Reduction: mean over samples and positions; no 1/2 factor (the code's ``(at(x)-at(y)).pow(2).mean()``,
    which implements the paper's "divide by elements x batch" rule; weight 1000 in the recipes).
    The channel mean equals the paper's channel sum after normalisation.

    Args:
        fs: student map (N, C_s, *spatial), e.g. (N, C_s, H, W).
        ft: teacher map (N, C_t, *spatial): same N and spatial sizes; channels may differ.
        p: exponent of the attention map (2 in the paper and code).
    """
    p = _check_positive("at", "exponent p", p)
    _check_maps("at", fs, ft)
    fs, ft = _as_float(fs, ft)
    return (attention_map(fs, p) - attention_map(ft, p)).pow(2).mean()


@_float_math
def attention_map(f: Tensor, p: float = 2) -> Tensor:
    r"""The AT attention map of one feature map: ``normalize(flatten_HW(mean_c |f_c|^p))``, shape (N, H*W).

    Per-sample L2 normalisation with eps 1e-12; also FT's attention-style factor (RepDistiller's variant).
    """
    p = _check_positive("attention_map", "exponent p", p)
    (f,) = _as_float(f)
    a = f.pow(2) if p == 2 else f.abs().pow(p)
    return F.normalize(a.mean(dim=1).flatten(1), dim=1, eps=NORM_EPS)


@_float_math
def nst(
    fs: Tensor,
    ft: Tensor,
    kernel: str = "poly",
    sigma2: float | None = None,
    teacher_term: bool = True,
) -> Tensor:
    r"""Neuron-selectivity-transfer loss: the MMD^2 between channel-map sets (Huang & Wang, arXiv 1707.01219).

    Per sample, each channel's flattened H*W vector is L2-normalised over its positions (eps 1e-12;
    an all-zero channel stays the zero vector): ``s_j`` (j < C_s) and ``t_i`` (i < C_t). Then

    .. math::
        \mathrm{MMD}^2 = \frac{1}{C_t^2}\sum_{i,i'} k(t_i,t_{i'}) + \frac{1}{C_s^2}\sum_{j,j'} k(s_j,s_{j'})
                         - \frac{2}{C_s C_t}\sum_{i,j} k(s_j,t_i)

    over all pairs, diagonal included. Reduction: mean over samples (the ``lambda/2`` or 50 of the
    papers/recipes is the caller's weight).

    Kernels:

    * ``"linear"``: ``k(x,y) = x.y``; computed as ``||mean_j s_j - mean_i t_i||^2``.
    * ``"poly"``: ``k(x,y) = (x.y)^2`` (d=2, c=0 as in the official code); computed through the
      ``C x C`` Gram matrices (``bmm``) or, when cheaper (H*W small vs C, e.g. 2048x7x7), through the
      equivalent spatial form ``||G_t/C_t - G_s/C_s||_F^2`` with ``G = F^T F`` (HW x HW).
    * ``"gaussian"``: ``k(x,y) = exp(-||x-y||^2 / (2 sigma2))``. ``sigma2=None`` sets it, per sample
      and jointly for the three terms, to the **detached** mean of ``||a-b||^2`` over all ordered
      pairs ``a != b`` (by index) of the union of that sample's student and teacher vectors (if that
      mean is 0, 1 is used). Being detached, it is a constant for the gradient.

    ``teacher_term=True`` (default; RepDistiller's form) keeps the teacher-teacher term, so the value
    is a true MMD^2 >= 0 (the per-sample value is clamped at 0 against rounding). ``teacher_term=False``
    drops that term (the official MXNet code's form): the student gradient is the same, but the value
    is no longer an MMD and **may be negative**.

    Args:
        fs: student map (N, C_s, *spatial).
        ft: teacher map (N, C_t, *spatial): same N and spatial sizes; channels may differ.
        kernel: ``"linear"``, ``"poly"`` or ``"gaussian"``.
        sigma2: Gaussian bandwidth (> 0) or ``None`` for the data-driven rule above; only used by
            the Gaussian kernel.
        teacher_term: keep the constant teacher-teacher term.
    """
    kernel = _check_choice("nst", "kernel", kernel, NST_KERNELS)
    if sigma2 is not None:
        sigma2 = _check_positive("nst", "sigma2", sigma2)
    _check_maps("nst", fs, ft)
    fs, ft = _as_float(fs, ft)
    s = F.normalize(fs.flatten(2), dim=2, eps=NORM_EPS)  # (N, C_s, P)
    t = F.normalize(ft.flatten(2), dim=2, eps=NORM_EPS)  # (N, C_t, P)
    cs, ct, npos = s.shape[1], t.shape[1], s.shape[2]

    if kernel == "linear":
        ms, mt = s.mean(dim=1), t.mean(dim=1)  # (N, P)
        if teacher_term:
            mmd = (ms - mt).pow(2).sum(dim=1)
        else:
            mmd = ms.pow(2).sum(dim=1) - 2.0 * (ms * mt).sum(dim=1)
    elif kernel == "poly":
        channel_cost = (cs * cs + ct * ct + cs * ct) * npos
        spatial_cost = (cs + ct) * npos * npos + 3 * npos * npos
        if spatial_cost < channel_cost:
            gs = torch.bmm(s.transpose(1, 2), s) / cs  # (N, P, P)
            gt = torch.bmm(t.transpose(1, 2), t) / ct
            if teacher_term:
                mmd = (gs - gt).pow(2).sum(dim=(1, 2))
            else:
                mmd = gs.pow(2).sum(dim=(1, 2)) - 2.0 * (gs * gt).sum(dim=(1, 2))
        else:
            kss = torch.bmm(s, s.transpose(1, 2)).pow(2).mean(dim=(1, 2))
            kst = torch.bmm(s, t.transpose(1, 2)).pow(2).mean(dim=(1, 2))
            mmd = kss - 2.0 * kst
            if teacher_term:
                mmd = mmd + torch.bmm(t, t.transpose(1, 2)).pow(2).mean(dim=(1, 2))
    else:  # gaussian
        ns = s.pow(2).sum(dim=2)  # (N, C_s): 1, or 0 for an all-zero channel
        nt = t.pow(2).sum(dim=2)
        if sigma2 is None:
            with torch.no_grad():
                # sum_{a,b} ||a-b||^2 over the union U = 2 |U| sum ||a||^2 - 2 ||sum a||^2 (diagonal is 0)
                m = cs + ct
                total = 2.0 * m * (ns.sum(1) + nt.sum(1)) - 2.0 * (s.sum(1) + t.sum(1)).pow(2).sum(1)
                sig = (total / (m * (m - 1))).clamp_min(0.0)
                sig = torch.where(sig > 0, sig, torch.ones_like(sig)).view(-1, 1, 1)
        else:
            sig = sigma2

        def gram(x: Tensor, nx: Tensor, y: Tensor, ny: Tensor, same: bool) -> Tensor:
            d = (nx.unsqueeze(2) + ny.unsqueeze(1) - 2.0 * torch.bmm(x, y.transpose(1, 2))).clamp_min(0.0)
            if same:  # ||a - a||^2 is exactly 0
                eye = torch.eye(d.shape[1], dtype=torch.bool, device=d.device)
                d = d.masked_fill(eye, 0.0)
            return torch.exp(-d / (2.0 * sig)).mean(dim=(1, 2))

        mmd = gram(s, ns, s, ns, True) - 2.0 * gram(s, ns, t, nt, False)
        if teacher_term:
            mmd = mmd + gram(t, nt, t, nt, True)

    if teacher_term:
        mmd = mmd.clamp_min(0.0)
    return mmd.mean()


@_float_math
def lp(fs: Tensor, ft: Tensor, k: int = 5, sigma2: float | None = None, normalize: bool = False) -> Tensor:
    r"""Locality-preserving loss of LP / feature embedding (Chen et al., IEEE TNNLS 2021, arXiv 1812.06597).

    Rows are flattened to ``s_i`` (N, D_s) and ``t_i`` (N, D_t) (dimensions may differ). With
    ``D_t(i,j) = ||t_i - t_j||^2``:

    * ``N_k(i)``: the k nearest ``j != i`` by ``D_t``; ties go to the **lower index** (stable sort of
      each row with the diagonal set to +inf). Neighbourhoods are not symmetrised.
    * ``alpha_ij = exp(-D_t(i,j) / sigma2)`` for ``j in N_k(i)``, else 0. ``sigma2=None`` uses the
      detached mean of ``D_t`` over the N*k kNN pairs (1 if that mean is 0), which avoids the
      underflow of a fixed sigma^2 = 2 (the third-party implementation's) on unnormalised features.

    .. math:: L = \frac{1}{N k}\sum_i \sum_{j\in N_k(i)} \alpha_{ij}\,\|s_i - s_j\|^2

    Reduction: divided by N*k (the third-party implementation's ``gamma/(k m)`` without gamma).
    The whole teacher side (graph, alpha, sigma2) carries no gradient; the student distances are
    computed without ``.item()`` (the third-party implementation's ``.item()`` detaches them), so the
    gradient reaches the student.

    Args:
        fs: student features (N, ...), flattened to (N, D_s).
        ft: teacher features (N, ...), flattened to (N, D_t).
        k: number of neighbours, ``1 <= k <= N-1`` (a batch smaller than k+1 is an error; drop or
            merge the last incomplete batch).
        sigma2: kernel width (> 0) or ``None`` for the rule above.
        normalize: L2-normalise each student and teacher row (eps 1e-12) before any distance
            (scale-free: the raw loss falls when the student shrinks its features; docs/methods/lp.md).
    """
    _require_tensor("lp", "student features", fs)
    _require_tensor("lp", "teacher features", ft)
    if fs.dim() < 2 or ft.dim() < 2 or fs.shape[0] != ft.shape[0]:
        raise LayerError(
            f"lp: expected features of shape (N, D) with the same N, got student {_shape(fs)} vs teacher {_shape(ft)}"
        )
    n = fs.shape[0]
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= n - 1:
        raise ConfigError(
            f"lp: k={k!r} neighbours need 1 <= k <= N-1, but the batch has N={n} samples; lower k or use a larger batch"
        )
    k = int(k)
    if sigma2 is not None:
        sigma2 = _check_positive("lp", "sigma2", sigma2)
    fs, ft = _as_float(fs, ft)
    s = fs.flatten(1)
    with torch.no_grad():
        t = ft.detach().flatten(1)
        if normalize:
            t = F.normalize(t, dim=1, eps=NORM_EPS)
        # direct (not matmul-based) distances: identical rows give bitwise-identical distances, so
        # exact ties are resolved by index, not by rounding noise
        d_t = torch.cdist(t, t, compute_mode="donot_use_mm_for_euclid_dist").pow(2)
        d_t.fill_diagonal_(float("inf"))
        idx = torch.sort(d_t, dim=1, stable=True).indices[:, :k]  # (N, k)
        d_knn = d_t.gather(1, idx)
        if sigma2 is None:
            sig = d_knn.mean()
            sig = torch.where(sig > 0, sig, torch.ones_like(sig))
        else:
            sig = sigma2
        alpha = torch.exp(-d_knn / sig)  # (N, k)
    if normalize:
        s = F.normalize(s, dim=1, eps=NORM_EPS)
    d_s = (s.unsqueeze(1) - s[idx]).pow(2).sum(dim=2)  # (N, k): ||s_i - s_j||^2, j in N_k(i)
    return (alpha * d_s).sum() / (n * k)


@_float_math
def factor(a: Tensor, b: Tensor) -> Tensor:
    r"""Factor-transfer / FEED distance (Kim, Park, Kwak, NeurIPS 2018; Park & Kwak 2019; official FT code).

    .. math::
        \phi(v) = \mathrm{normalize}(\mathrm{flatten}(v)), \qquad
        L = \frac{1}{N\cdot D}\sum_{n,i} |\phi(a)_{n,i} - \phi(b)_{n,i}|

    ``normalize`` is one L2 norm over all C*H*W entries of each sample (eps 1e-12), then the L1
    distance averaged over N*C*H*W elements (``nn.L1Loss``), the reduction beta=500 is tied to.
    This is the official form, not RepDistiller's attention-like variant.

    Args:
        a: student side (translator output), (N, ...).
        b: teacher side (paraphraser factor or teacher map), exactly the same shape.
    """
    _check_same_shape("factor", a, b, "factor", "the translator must output the teacher factor's shape")
    if a.dim() < 2:
        raise LayerError(f"factor: expected (N, ...) tensors with at least 2 dims, got {_shape(a)}")
    a, b = _as_float(a, b)
    pa = F.normalize(a.flatten(1), dim=1, eps=NORM_EPS)
    pb = F.normalize(b.flatten(1), dim=1, eps=NORM_EPS)
    return (pa - pb).abs().mean()


@_float_math
def hint(fs: Tensor, ft: Tensor) -> Tensor:
    r"""FitNet hint loss (Romero et al., ICLR 2015; RepDistiller single-stage form).

    .. math:: L = \frac{1}{|F|}\sum (f_s - f_t)^2

    Mean squared error over all elements (``nn.MSELoss()``; the paper's ``1/2 ||.||^2`` sum differs by
    a constant factor that belongs in the weight, 100 in the recipes).

    Args:
        fs: regressor output on the student's guided layer.
        ft: teacher hint map, exactly the same shape.
    """
    _check_same_shape("hint", fs, ft, "hint", "the regressor must output the teacher hint's shape")
    fs, ft = _as_float(fs, ft)
    return (fs - ft).pow(2).mean()


@_float_math
def recon_error(x: Tensor, x_hat: Tensor, kind: str = "l1") -> Tensor:
    r"""Reconstruction error of the FT paraphraser / FEED autoencoder (Kim et al. 2018; Park & Kwak 2019).

    * ``kind="l1"``: ``mean |x - x_hat|`` (the official FT code, ``nn.L1Loss``);
    * ``kind="l2"``: ``mean (x - x_hat)^2`` (the paper's squared L2 / RepDistiller's MSE).

    Reduction: mean over all elements.

    Args:
        x: the original feature map.
        x_hat: its reconstruction, exactly the same shape.
    """
    kind = _check_choice("recon_error", "kind", kind, RECON_KINDS)
    _require_tensor("recon_error", "x", x)
    _require_tensor("recon_error", "x_hat", x_hat)
    if x.shape != x_hat.shape:
        raise LayerError(
            f"recon_error: shapes differ: input {_shape(x)} vs reconstruction {_shape(x_hat)}; "
            "the autoencoder must reproduce its input's shape"
        )
    x, x_hat = _as_float(x, x_hat)
    diff = x - x_hat
    return diff.abs().mean() if kind == "l1" else diff.pow(2).mean()
