"""Pure-maths core of the distillation losses (KD, Tf-KD, LSR, AT, FT/FEED, FitNet), each citing its paper.

Every function here is a plain function of tensors (no ``nn.Module``, no config object) that returns a
scalar tensor. Common rules, shared by :mod:`kdlab.losses.relational` and
:mod:`kdlab.losses.feature_functional` through :mod:`kdlab.losses.checks`:

* **Precision.** The maths always runs in at least float32: float16/bfloat16 inputs are cast up with
  ``.float()``, mixed inputs are promoted (float32 + float64 -> float64), and autocast is switched off
  inside the function, so ``torch.autocast(..., dtype=torch.bfloat16)`` never lowers the precision of
  the reductions. The result therefore has dtype float32 for half/bfloat16/float32 inputs and float64
  for float64 inputs.
* **Gradients.** All functions are differentiable w.r.t. the student inputs. The teacher side is not
  detached unless stated; callers run the teacher under ``torch.no_grad()``.
* **Shapes.** Shapes are checked up front; a mismatch raises :class:`kdlab.errors.LayerError` naming
  both shapes. Invalid option values (unknown mode/kind, ``T <= 0``, ``a`` outside [0, 1]...) raise
  :class:`kdlab.errors.ConfigError`.
* **Normalisation.** ``normalize`` below means L2 normalisation ``v / max(||v||_2, 1e-12)``, i.e.
  ``F.normalize`` with its default eps, so all-zero vectors map to zero instead of NaN.
* **Efficiency.** Everything is vectorised over the batch; there is no Python loop over samples,
  channels or positions.
"""

from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F
from torch import Tensor

from kdlab.errors import ConfigError, LayerError
from kdlab.losses.checks import (
    as_float,
    check_choice,
    check_labels,
    check_logits_targets,
    check_maps,
    check_positive,
    check_same_shape,
    check_unit_interval,
    float_math,
    kl_bm,
    require_tensor,
    shape_of,
)

__all__ = [
    "kd",
    "at",
    "factor",
    "hint",
    "tfkd_reg_target",
    "tfkd_reg",
    "lsr",
    "recon_error",
]

NORM_EPS = 1e-12
"""The L2-normalisation eps (``F.normalize``'s default): ``v / max(||v||, NORM_EPS)``."""

TFKD_MODES = ("code", "paper")
LSR_SPREADS = ("all", "others")
RECON_KINDS = ("l1", "l2")


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
        raise LayerError(f"logit standardisation needs at least 2 classes, got logits of shape {shape_of(z)}")
    return (z - z.mean(dim=-1, keepdim=True)) / (ZSCORE_EPS + z.std(dim=-1, keepdim=True))


@float_math
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
    # a tensor T is a learned temperature (CTKD): its gradient must flow, so it is not turned into a float
    T = T if isinstance(T, Tensor) else check_positive("kd", "temperature T", T)
    check_same_shape("kd", student_logits, teacher_logits, "logit", "student and teacher must share the classes")
    if student_logits.dim() != 2:
        raise LayerError(f"kd: expected logits of shape (N, K), got student {shape_of(student_logits)}")
    zs, zt = as_float(student_logits, teacher_logits)
    if standardize:
        zs, zt = _zscore(zs), _zscore(zt)
    log_ps = F.log_softmax(zs / T, dim=1)
    log_pt = F.log_softmax(zt / T, dim=1)
    return (T * T) * kl_bm(log_pt, log_ps)


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
    a = check_unit_interval("tfkd_reg_target", "a (true-class probability)", a)
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 2:
        raise ConfigError(f"tfkd_reg_target: num_classes must be an integer >= 2, got {num_classes!r}")
    require_tensor("tfkd_reg_target", "targets", targets)
    if targets.dim() != 1:
        raise LayerError(f"tfkd_reg_target: expected targets of shape (N,), got {shape_of(targets)}")
    check_labels("tfkd_reg_target", targets, int(num_classes))
    dtype = dtype or torch.get_default_dtype()
    K = int(num_classes)
    out = torch.full((targets.shape[0], K), (1.0 - a) / (K - 1), dtype=dtype, device=targets.device)
    out.scatter_(1, targets.long().unsqueeze(1), a)
    return out


@float_math
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
    mode = check_choice("tfkd_reg", "mode", mode, TFKD_MODES)
    T = check_positive("tfkd_reg", "temperature T", T)
    check_logits_targets("tfkd_reg", student_logits, targets)
    (z,) = as_float(student_logits)
    p_d = tfkd_reg_target(targets, z.shape[1], a, dtype=z.dtype)
    log_teacher = F.log_softmax(p_d / T, dim=1)
    if mode == "code":
        return kl_bm(log_teacher, F.log_softmax(z, dim=1))
    return (T * T) * kl_bm(log_teacher, F.log_softmax(z / T, dim=1))


@float_math
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
    spread = check_choice("lsr", "spread", spread, LSR_SPREADS)
    eps = check_unit_interval("lsr", "eps", eps)
    check_logits_targets("lsr", student_logits, targets)
    (z,) = as_float(student_logits)
    K = z.shape[1]
    if spread == "others" and K < 2:
        raise LayerError(f"lsr: spread='others' needs at least 2 classes, got logits {shape_of(student_logits)}")
    off, on = (eps / K, 1.0 - eps + eps / K) if spread == "all" else (eps / (K - 1), 1.0 - eps)
    q = torch.full_like(z, off).scatter_(1, targets.long().unsqueeze(1), on)
    return -(q * F.log_softmax(z, dim=1)).sum() / z.shape[0]


# --------------------------------------------------------------------------------------------------
# feature losses
# --------------------------------------------------------------------------------------------------


@float_math
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
    p = check_positive("at", "exponent p", p)
    check_maps("at", fs, ft)
    fs, ft = as_float(fs, ft)
    return (attention_map(fs, p) - attention_map(ft, p)).pow(2).mean()


@float_math
def attention_map(f: Tensor, p: float = 2) -> Tensor:
    r"""The AT attention map of one feature map: ``normalize(flatten_HW(mean_c |f_c|^p))``, shape (N, H*W).

    Per-sample L2 normalisation with eps 1e-12; also FT's attention-style factor (RepDistiller's variant).
    """
    p = check_positive("attention_map", "exponent p", p)
    (f,) = as_float(f)
    a = f.pow(2) if p == 2 else f.abs().pow(p)
    return F.normalize(a.mean(dim=1).flatten(1), dim=1, eps=NORM_EPS)


@float_math
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
    check_same_shape("factor", a, b, "factor", "the translator must output the teacher factor's shape")
    if a.dim() < 2:
        raise LayerError(f"factor: expected (N, ...) tensors with at least 2 dims, got {shape_of(a)}")
    a, b = as_float(a, b)
    pa = F.normalize(a.flatten(1), dim=1, eps=NORM_EPS)
    pb = F.normalize(b.flatten(1), dim=1, eps=NORM_EPS)
    return (pa - pb).abs().mean()


@float_math
def hint(fs: Tensor, ft: Tensor) -> Tensor:
    r"""FitNet hint loss (Romero et al., ICLR 2015; RepDistiller single-stage form).

    .. math:: L = \frac{1}{|F|}\sum (f_s - f_t)^2

    Mean squared error over all elements (``nn.MSELoss()``; the paper's ``1/2 ||.||^2`` sum differs by
    a constant factor that belongs in the weight, 100 in the recipes).

    Args:
        fs: regressor output on the student's guided layer.
        ft: teacher hint map, exactly the same shape.
    """
    check_same_shape("hint", fs, ft, "hint", "the regressor must output the teacher hint's shape")
    fs, ft = as_float(fs, ft)
    return (fs - ft).pow(2).mean()


@float_math
def recon_error(x: Tensor, x_hat: Tensor, kind: str = "l1") -> Tensor:
    r"""Reconstruction error of the FT paraphraser / FEED autoencoder (Kim et al. 2018; Park & Kwak 2019).

    * ``kind="l1"``: ``mean |x - x_hat|`` (the official FT code, ``nn.L1Loss``);
    * ``kind="l2"``: ``mean (x - x_hat)^2`` (the paper's squared L2 / RepDistiller's MSE).

    Reduction: mean over all elements.

    Args:
        x: the original feature map.
        x_hat: its reconstruction, exactly the same shape.
    """
    kind = check_choice("recon_error", "kind", kind, RECON_KINDS)
    require_tensor("recon_error", "x", x)
    require_tensor("recon_error", "x_hat", x_hat)
    if x.shape != x_hat.shape:
        raise LayerError(
            f"recon_error: shapes differ: input {shape_of(x)} vs reconstruction {shape_of(x_hat)}; "
            "the autoencoder must reproduce its input's shape"
        )
    x, x_hat = as_float(x, x_hat)
    diff = x - x_hat
    return diff.abs().mean() if kind == "l1" else diff.pow(2).mean()
