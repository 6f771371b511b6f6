"""Pure maths of the feature-map losses NST, VID, FSP, AB and OFD.

The rules of :mod:`kdlab.losses.functional` hold: the maths runs in at least float32 with autocast
switched off, shapes are checked up front (:class:`~kdlab.errors.LayerError` naming both shapes),
and nothing loops over samples, channels or positions. The teacher side is not detached unless
stated (``nst`` detaches its data-driven ``sigma2``). The side modules these methods train (VID's
regressor and variances, AB's and OFD's connectors) live in the term modules; the functions here
take their outputs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from kdlab.errors import LayerError
from kdlab.losses.checks import as_float, check_choice, check_maps, check_positive, float_math, require_tensor, shape_of
from kdlab.losses.functional import NORM_EPS

__all__ = ["nst", "vid", "fsp_matrix", "fsp", "ab", "ofd_margin", "ofd"]

NST_KERNELS = ("linear", "poly", "gaussian")


def _check_pair(name: str, a: Tensor, b: Tensor, what: str, fix: str) -> None:
    require_tensor(name, "student input", a)
    require_tensor(name, "teacher input", b)
    if a.shape != b.shape:
        raise LayerError(f"{name}: {what} shapes differ: student {shape_of(a)} vs teacher {shape_of(b)}; {fix}")
    if a.dim() < 2:
        raise LayerError(f"{name}: expected (N, C, ...) maps, got {shape_of(a)}")


def _channel_view(v: Tensor, like: Tensor) -> Tensor:
    """A per-channel vector (C,) shaped to broadcast over (N, C, *spatial)."""
    return v.reshape(1, -1, *([1] * (like.dim() - 2)))


# --------------------------------------------------------------------------------------------------
# VID


@float_math
def vid(pred_mean: Tensor, target: Tensor, log_scale: Tensor, eps: float = 1e-5) -> Tensor:
    r"""Variational information distillation (Ahn et al., CVPR 2019): Gaussian negative log-likelihood.

    .. math::
        \sigma_c^2 = \log(1 + e^{\alpha_c}) + \epsilon,\qquad
        L = \mathrm{mean}_{n,c,h,w}\ \tfrac12\Big(\frac{(\mu_{nchw} - t_{nchw})^2}{\sigma_c^2} + \log \sigma_c^2\Big)

    ``pred_mean`` is the regressor's output on the student map, ``target`` the teacher map,
    ``log_scale`` the learned per-channel alpha. Reduction: mean over every element (RepDistiller and
    the official code); the paper's likelihood sums, which only rescales the weight.
    """
    _check_pair("vid", pred_mean, target, "map", "the regressor must output the teacher's channels and size")
    require_tensor("vid", "log_scale", log_scale)
    if log_scale.dim() != 1 or log_scale.shape[0] != target.shape[1]:
        raise LayerError(
            f"vid: log_scale must hold one value per channel ({target.shape[1]},), got {shape_of(log_scale)}"
        )
    eps = check_positive("vid", "eps", eps)
    mu, t, alpha = as_float(pred_mean, target, log_scale)
    var = _channel_view(F.softplus(alpha) + eps, mu)
    return (0.5 * ((mu - t).pow(2) / var + var.log())).mean()


# --------------------------------------------------------------------------------------------------
# FSP


def _pool_pair(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Average-pool the larger of two maps to the other's spatial size (RepDistiller's FSP does this
    between consecutive layers of one network)."""
    if a.shape[-2:] == b.shape[-2:]:
        return a, b
    if a.shape[-2] * a.shape[-1] > b.shape[-2] * b.shape[-1]:
        return F.adaptive_avg_pool2d(a, b.shape[-2:]), b
    return a, F.adaptive_avg_pool2d(b, a.shape[-2:])


def fsp_matrix(bottom: Tensor, top: Tensor) -> Tensor:
    r"""The (N, C1, C2) flow-of-solution-procedure matrix of two maps of one network.

    ``G[n, i, j] = mean_{h,w} bottom[n, i, h, w] * top[n, j, h, w]``, the larger map first average-pooled
    to the smaller one's size.
    """
    if bottom.dim() != 4 or top.dim() != 4 or bottom.shape[0] != top.shape[0]:
        raise LayerError(
            f"fsp: expected two (N, C, H, W) maps of one batch, got {shape_of(bottom)} and {shape_of(top)}"
        )
    bottom, top = _pool_pair(bottom, top)
    return torch.einsum("nihw,njhw->nij", bottom, top) / (bottom.shape[-2] * bottom.shape[-1])


@float_math
def fsp(student_maps: list[Tensor], teacher_maps: list[Tensor]) -> Tensor:
    r"""FSP loss (Yim et al., CVPR 2017) over consecutive pairs of the given layers.

    .. math:: L = \sum_{l} \mathrm{mean}_{n,i,j}\, \big(G^s_l[n,i,j] - G^t_l[n,i,j]\big)^2,
              \quad G_l = \mathrm{fsp\_matrix}(F_l, F_{l+1})

    Reduction: mean over N * C1 * C2 per pair, summed over pairs (RepDistiller); the paper writes the
    squared L2 norm averaged over samples with equal pair weights. Channel counts must match between
    student and teacher at every layer; spatial sizes need not.
    """
    if len(student_maps) != len(teacher_maps) or len(student_maps) < 2:
        raise LayerError(
            f"fsp: needs the same number (>= 2) of student and teacher layers, "
            f"got {len(student_maps)} and {len(teacher_maps)}"
        )
    maps = as_float(*student_maps, *teacher_maps)
    s_maps, t_maps = maps[: len(student_maps)], maps[len(student_maps) :]
    total = maps[0].new_zeros(())
    for i in range(len(s_maps) - 1):
        g_s = fsp_matrix(s_maps[i], s_maps[i + 1])
        g_t = fsp_matrix(t_maps[i], t_maps[i + 1])
        if g_s.shape != g_t.shape:
            raise LayerError(
                f"fsp: layer pair {i}: student FSP matrix {shape_of(g_s)} "
                f"(maps {shape_of(s_maps[i])}, {shape_of(s_maps[i + 1])}) vs "
                f"teacher {shape_of(g_t)} (maps {shape_of(t_maps[i])}, {shape_of(t_maps[i + 1])}); "
                "FSP needs equal channel counts at every tapped layer (student_layers / teacher_layers options)"
            )
        total = total + (g_s - g_t).pow(2).mean()
    return total


# --------------------------------------------------------------------------------------------------
# AB


@float_math
def ab(fs: Tensor, ft: Tensor, margin: float = 1.0) -> Tensor:
    r"""Activation-boundary loss (Heo et al., AAAI 2019), the paper's "alternative" squared-hinge form.

    .. math::
        L = \frac1N \sum_{n,c,h,w} \Big[(s + \mu)^2\, 1[s > -\mu,\ t \le 0] + (s - \mu)^2\, 1[s \le \mu,\ t > 0]\Big]

    ``s``: the student's pre-ReLU map after the connector, ``t``: the teacher's pre-ReLU map, ``mu``:
    the margin (1). A neuron is penalised when it is on the wrong side of the teacher's activation
    boundary, or within the margin of it. Reduction: sum over C, H, W, mean over N (official code).
    """
    _check_pair("ab", fs, ft, "pre-ReLU map", "the connector must output the teacher's channels and size")
    m = check_positive("ab", "margin", margin)
    s, t = as_float(fs, ft)
    loss = (s + m).pow(2) * ((s > -m) & (t <= 0)) + (s - m).pow(2) * ((s <= m) & (t > 0))
    return loss.sum() / s.shape[0]


# --------------------------------------------------------------------------------------------------
# OFD


def ofd_margin(bn_weight: Tensor, bn_bias: Tensor) -> Tensor:
    r"""OFD's per-channel margin: the mean of a pre-ReLU response given that it is negative.

    The teacher's BN before the ReLU gives each channel ``N(m, s^2)`` with ``m = beta``, ``s = |gamma|``:

    .. math:: \mathrm{margin} = E[x \mid x < 0] = m - s\,\frac{\phi(m/s)}{\Phi(-m/s)}

    and ``-3 s`` where ``Phi(-m/s) <= 0.001`` (the official code's guard). Computed in float64,
    returned as float32 of shape (C,).
    """
    s = bn_weight.detach().double().abs().clamp_min(1e-12)
    m = bn_bias.detach().double()
    z = -m / s
    cdf = 0.5 * torch.erfc(-z / math.sqrt(2.0))  # Phi(-m/s)
    pdf = torch.exp(-0.5 * (m / s) ** 2) / math.sqrt(2.0 * math.pi)  # phi(m/s)
    margin = torch.where(cdf > 1e-3, m - s * pdf / cdf.clamp_min(1e-300), -3.0 * s)
    return margin.float()


@float_math
def ofd(fs: Tensor, ft: Tensor, margin: Tensor) -> Tensor:
    r"""Overhaul of feature distillation (Heo et al., ICCV 2019): partial L2 to the teacher's pre-ReLU map.

    .. math::
        \tilde t = \max(t, \mathrm{margin}_c),\quad
        L = \frac1N \sum_{n,c,h,w} (s - \tilde t)^2\, 1[\, s > \tilde t \ \lor\ \tilde t > 0\,]

    ``s``: the connector's output on the student's pre-ReLU map, ``t``: the teacher's pre-ReLU map,
    ``margin``: (C,) from :func:`ofd_margin`. Where the teacher is negative, only a student above the
    teacher (or above the margin) is pulled down; where it is positive, the full L2 applies.
    Reduction: sum over C, H, W, mean over N (official code and mdistiller).
    """
    _check_pair("ofd", fs, ft, "pre-ReLU map", "the connector must output the teacher's channels; pool the teacher map")
    require_tensor("ofd", "margin", margin)
    if margin.dim() != 1 or margin.shape[0] != ft.shape[1]:
        raise LayerError(f"ofd: margin must hold one value per channel ({ft.shape[1]},), got {shape_of(margin)}")
    s, t, mg = as_float(fs, ft, margin)
    target = torch.maximum(t, _channel_view(mg, t))
    mask = (s > target) | (target > 0)
    return ((s - target).pow(2) * mask).sum() / s.shape[0]


# --------------------------------------------------------------------------------------------------
# NST


@float_math
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
    kernel = check_choice("nst", "kernel", kernel, NST_KERNELS)
    if sigma2 is not None:
        sigma2 = check_positive("nst", "sigma2", sigma2)
    check_maps("nst", fs, ft)
    fs, ft = as_float(fs, ft)
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
