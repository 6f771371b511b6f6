"""Pure maths of the batch-relation losses: SP, CC, RKD, PKT, LP on features, DIST on predictions.

Each compares a relation *between the samples of a batch* (a Gram matrix, pairwise distances and
angles, conditional similarity distributions, k-nearest-neighbour graphs, correlations) in the
student and in the teacher, so student and teacher widths may differ. Except CC's ``code`` mode
(consecutive samples) and LP's tie-break by index, every value is invariant to a joint permutation
of the batch.

The rules of :mod:`kdlab.losses.functional` hold here too: the maths runs in at least float32 with
autocast switched off, shapes are checked up front (:class:`~kdlab.errors.LayerError` naming both
shapes), bad option values raise :class:`~kdlab.errors.ConfigError`, and everything is vectorised.
The teacher side is not detached unless stated (``rkd`` detaches it, as RepDistiller computes it
under ``no_grad``; ``lp`` detaches its whole teacher side, graph and ``sigma2``); callers run the
teacher under ``torch.no_grad()``.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import Tensor

from kdlab.errors import ConfigError, LayerError
from kdlab.losses.checks import as_float, check_choice, check_positive, float_math, require_tensor, shape_of
from kdlab.losses.functional import NORM_EPS, _zscore

__all__ = ["sp", "cc", "cc_kernel", "rkd", "pkt", "lp", "dist"]

CC_MODES = ("code", "paper")
PKT_MODES = ("code", "paper")
PKT_EPS = 1e-7
DIST_EPS = 1e-8


def _check_nonnegative(name: str, what: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ConfigError(f"{name}: {what} must be a finite number >= 0, got {value!r}")
    return float(value)


def _check_batch(name: str, fs: Tensor, ft: Tensor, min_n: int = 1) -> None:
    """Student and teacher hold the same samples; the feature widths may differ."""
    require_tensor(name, "student features", fs)
    require_tensor(name, "teacher features", ft)
    if fs.dim() < 2 or ft.dim() < 2:
        raise LayerError(f"{name}: expected (N, ...) features, got student {shape_of(fs)} vs teacher {shape_of(ft)}")
    if fs.shape[0] != ft.shape[0]:
        raise LayerError(
            f"{name}: batch sizes differ: student {shape_of(fs)} vs teacher {shape_of(ft)}; "
            "student and teacher must see the same batch"
        )
    if fs.shape[0] < min_n:
        raise LayerError(f"{name}: relates the samples of a batch and needs at least {min_n}, got {fs.shape[0]}")


# --------------------------------------------------------------------------------------------------
# SP


@float_math
def sp(fs: Tensor, ft: Tensor) -> Tensor:
    r"""Similarity-preserving loss (Tung & Mori, ICCV 2019) for one layer pair.

    .. math::
        G = \mathrm{rownorm}(A A^\top),\; A = F.\mathrm{flatten}(1) \in R^{N \times D};\quad
        L = \frac{1}{N^2} \| G_t - G_s \|_F^2

    ``rownorm`` L2-normalises each row of the (N, N) Gram matrix (eps 1e-12). Reduction: the squared
    Frobenius norm over N^2 (paper and RepDistiller alike; RepDistiller's weight 3000 goes with it).
    """
    _check_batch("sp", fs, ft)
    fs, ft = as_float(fs, ft)
    n = fs.shape[0]
    a_s, a_t = fs.flatten(1), ft.flatten(1)
    g_s = F.normalize(a_s @ a_s.t(), dim=1)
    g_t = F.normalize(a_t @ a_t.t(), dim=1)
    return (g_t - g_s).pow(2).sum() / (n * n)


# --------------------------------------------------------------------------------------------------
# CC


def cc_kernel(e: Tensor, gamma: float = 0.4, order: int = 2) -> Tensor:
    r"""The (N, N) correlation matrix of CC's paper: a P-order Taylor series of the Gaussian RBF kernel.

    With ``x = normalize(e)`` (unit rows), ``exp(-gamma ||x_i - x_j||^2) = exp(-2 gamma) exp(2 gamma x_i^T x_j)``,
    and the second exponential is expanded to order P:
    ``k_ij = sum_{p=0..P} exp(-2 gamma) (2 gamma)^p / p! (x_i^T x_j)^p``.
    """
    x = F.normalize(e.flatten(1), dim=1)
    sim = x @ x.t()
    out = torch.zeros_like(sim)
    power = torch.ones_like(sim)
    for p in range(order + 1):
        out = out + math.exp(-2.0 * gamma) * (2.0 * gamma) ** p / math.factorial(p) * power
        power = power * sim
    return out


@float_math
def cc(es: Tensor, et: Tensor, mode: str = "code", gamma: float = 0.4, order: int = 2) -> Tensor:
    r"""Correlation congruence (Peng et al., ICCV 2019) between student and teacher embeddings.

    ``mode="code"`` (RepDistiller's, from code the authors sent): with ``d_n = |e_s[n] - e_t[n]|``,

    .. math:: L = \frac{1}{N-1} \sum_{n=1}^{N-1} \sum_j d_{n,j}\, d_{n+1,j}

    a product of consecutive samples' differences, so it depends on the batch order and needs equal
    widths. ``mode="paper"``: the mean squared difference of the two (N, N) Taylor-RBF correlation
    matrices (:func:`cc_kernel`, ``gamma`` and ``order`` P as in the paper's CIFAR setting, 0.4 and 2),
    invariant to a joint permutation and free of the widths.
    """
    mode = check_choice("cc", "mode", mode, CC_MODES)
    _check_batch("cc", es, et, min_n=2)
    es, et = as_float(es, et)
    if mode == "code":
        if es.flatten(1).shape != et.flatten(1).shape:
            raise LayerError(
                f"cc: mode 'code' compares the embeddings element-wise: student {shape_of(es)} "
                f"vs teacher {shape_of(et)}; "
                "give both the same embed_dim, or use mode 'paper'"
            )
        d = (es.flatten(1) - et.flatten(1)).abs()
        return (d[:-1] * d[1:]).sum(1).mean()
    gamma = check_positive("cc", "gamma", gamma)
    if isinstance(order, bool) or not isinstance(order, int) or order < 0:
        raise ConfigError(f"cc: order must be an integer >= 0, got {order!r}")
    return (cc_kernel(es, gamma, order) - cc_kernel(et, gamma, order)).pow(2).mean()


# --------------------------------------------------------------------------------------------------
# RKD


def _pdist(e: Tensor, eps: float = 1e-12) -> Tensor:
    """Euclidean distances between rows, as RepDistiller: squared norms minus twice the Gram matrix,
    clamped at ``eps`` before the square root, the diagonal 0. Unlike RepDistiller, rows that coincide
    (squared distance <= eps) also get 0, not sqrt(eps), so they stay out of the mean distance."""
    sq = e.pow(2).sum(1)
    d2 = sq.unsqueeze(1) + sq.unsqueeze(0) - 2.0 * (e @ e.t())
    d = torch.where(d2 > eps, d2.clamp(min=eps).sqrt(), torch.zeros_like(d2))
    return d * (1.0 - torch.eye(e.shape[0], dtype=e.dtype, device=e.device))


def _mean_positive(d: Tensor) -> Tensor:
    pos = d > 0
    mean = (d * pos).sum() / pos.sum().clamp_min(1)
    return torch.where(mean > 0, mean, torch.ones_like(mean))  # all-equal samples: leave the zeros as they are


def _angles(e: Tensor) -> Tensor:
    """(N^3,) cosines ``<n(e_j - e_i), n(e_k - e_i)>`` for every (i, j, k), vertex i; degenerate ones are 0."""
    diff = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), dim=2)  # [i, j] = e_j - e_i
    return torch.bmm(diff, diff.transpose(1, 2)).reshape(-1)


@float_math
def rkd(fs: Tensor, ft: Tensor, distance_weight: float = 25.0, angle_weight: float = 50.0) -> Tensor:
    r"""Relational KD (Park et al., CVPR 2019): distance and angle terms, as RepDistiller computes them.

    .. math::
        \psi_D(i,j) = \frac{\|e_i - e_j\|}{\mu},\ \mu = \mathrm{mean}_{\|e_i-e_j\| > 0}\|e_i-e_j\|,\qquad
        \psi_A(i,j,k) = \Big\langle \tfrac{e_j - e_i}{\|e_j - e_i\|}, \tfrac{e_k - e_i}{\|e_k - e_i\|} \Big\rangle

        L = w_D\, \mathrm{mean}_{i,j}\, \ell_\delta(\psi_D^s - \psi_D^t)
            + w_A\, \mathrm{mean}_{i,j,k}\, \ell_\delta(\psi_A^s - \psi_A^t)

    ``l_delta`` is the Huber loss with delta 1 (``smooth_l1``). The means run over all N^2 pairs and
    N^3 triplets, the degenerate ones (value 0 on both sides) included, as in the code; the paper
    writes sums over distinct pairs and triplets. Weights 25 and 50: RepDistiller's. The teacher side
    is detached. Coinciding samples are at distance 0 (RepDistiller: 1e-6, counted in the mean).
    """
    _check_batch("rkd", fs, ft)
    distance_weight = _check_nonnegative("rkd", "distance_weight", distance_weight)
    angle_weight = _check_nonnegative("rkd", "angle_weight", angle_weight)
    fs, ft = as_float(fs, ft)
    s, t = fs.flatten(1), ft.flatten(1).detach()
    loss = s.new_zeros(())
    if distance_weight > 0:
        d_t = _pdist(t)
        d_t = d_t / _mean_positive(d_t)
        d_s = _pdist(s)
        d_s = d_s / _mean_positive(d_s)
        loss = loss + distance_weight * F.smooth_l1_loss(d_s, d_t)
    if angle_weight > 0:
        loss = loss + angle_weight * F.smooth_l1_loss(_angles(s), _angles(t))
    return loss


# --------------------------------------------------------------------------------------------------
# PKT


def _pkt_probs(e: Tensor, diagonal: bool) -> Tensor:
    x = e / (e.norm(dim=1, keepdim=True) + PKT_EPS)
    k = (x @ x.t() + 1.0) / 2.0
    if not diagonal:
        k = k * (1.0 - torch.eye(k.shape[0], dtype=k.dtype, device=k.device))
    return k / k.sum(dim=1, keepdim=True)


@float_math
def pkt(fs: Tensor, ft: Tensor, mode: str = "code") -> Tensor:
    r"""Probabilistic knowledge transfer (Passalis & Tefas, ECCV 2018) with the cosine kernel.

    .. math::
        K(a, b) = \tfrac12\big(\tfrac{a^\top b}{(\|a\| + \epsilon)(\|b\| + \epsilon)} + 1\big),\quad
        p_{j|i} = \frac{K(e_i, e_j)}{\sum_k K(e_i, e_k)},\quad
        L = \mathrm{mean}_{i,j}\; p^t_{j|i} \log\frac{p^t_{j|i} + \epsilon}{p^s_{j|i} + \epsilon}

    with eps 1e-7. ``mode="code"`` (the authors' code, which RepDistiller copies; default): every j
    including j = i, mean over the N^2 entries. ``mode="paper"``: j != i, as the paper's conditional
    distributions; mean over the N(N-1) off-diagonal entries (the paper sums; the mean keeps the code's
    weight 30000 meaningful).
    """
    mode = check_choice("pkt", "mode", mode, PKT_MODES)
    _check_batch("pkt", fs, ft, min_n=2 if mode == "paper" else 1)
    fs, ft = as_float(fs, ft)
    diagonal = mode == "code"
    p_s = _pkt_probs(fs.flatten(1), diagonal)
    p_t = _pkt_probs(ft.flatten(1), diagonal)
    kl = p_t * torch.log((p_t + PKT_EPS) / (p_s + PKT_EPS))
    n = p_s.shape[0]
    if diagonal:
        return kl.mean()
    return kl.sum() / (n * (n - 1))  # the diagonal entries are 0 * log(1) = 0


# --------------------------------------------------------------------------------------------------
# LP


@float_math
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
    require_tensor("lp", "student features", fs)
    require_tensor("lp", "teacher features", ft)
    if fs.dim() < 2 or ft.dim() < 2 or fs.shape[0] != ft.shape[0]:
        raise LayerError(
            "lp: expected features of shape (N, D) with the same N, "
            f"got student {shape_of(fs)} vs teacher {shape_of(ft)}"
        )
    n = fs.shape[0]
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= n - 1:
        raise ConfigError(
            f"lp: k={k!r} neighbours need 1 <= k <= N-1, but the batch has N={n} samples; lower k or use a larger batch"
        )
    k = int(k)
    if sigma2 is not None:
        sigma2 = check_positive("lp", "sigma2", sigma2)
    fs, ft = as_float(fs, ft)
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


# --------------------------------------------------------------------------------------------------
# DIST


def _pearson_rows(a: Tensor, b: Tensor) -> Tensor:
    """Pearson correlation of each row of ``a`` with the same row of ``b`` (cosine of centred rows, eps 1e-8)."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + DIST_EPS)


@float_math
def dist(
    student_logits: Tensor,
    teacher_logits: Tensor,
    T: float = 1.0,
    beta: float = 1.0,
    gamma: float = 1.0,
    standardize: bool = False,
) -> Tensor:
    r"""DIST (Huang et al., NeurIPS 2022): inter- and intra-class Pearson correlation of predictions.

    .. math::
        Y = \mathrm{softmax}(Z / T);\quad
        L = T^2 \Big[\beta\,\big(1 - \mathrm{mean}_n\, \rho(Y^s_{n,:}, Y^t_{n,:})\big)
              + \gamma\,\big(1 - \mathrm{mean}_k\, \rho(Y^s_{:,k}, Y^t_{:,k})\big)\Big]

    ``rho`` is the Pearson correlation (cosine of centred vectors, eps 1e-8 added to the norm product,
    as the official code). The first term relates the classes within each sample (inter-class), the
    second the samples within each class (intra-class). ``standardize`` z-scores both logits per
    sample first (logit standardisation).
    """
    T = check_positive("dist", "temperature T", T)
    beta = _check_nonnegative("dist", "beta", beta)
    gamma = _check_nonnegative("dist", "gamma", gamma)
    require_tensor("dist", "student logits", student_logits)
    require_tensor("dist", "teacher logits", teacher_logits)
    if student_logits.dim() != 2 or student_logits.shape != teacher_logits.shape:
        raise LayerError(
            f"dist: expected logits of one shape (N, K), got student {shape_of(student_logits)} vs teacher "
            f"{shape_of(teacher_logits)}; student and teacher must share the classes"
        )
    zs, zt = as_float(student_logits, teacher_logits)
    if standardize:
        zs, zt = _zscore(zs), _zscore(zt)
    y_s = torch.softmax(zs / T, dim=1)
    y_t = torch.softmax(zt / T, dim=1)
    inter = 1.0 - _pearson_rows(y_s, y_t).mean()
    intra = 1.0 - _pearson_rows(y_s.t(), y_t.t()).mean()
    return (T * T) * (beta * inter + gamma * intra)
