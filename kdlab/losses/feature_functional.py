"""Pure maths of the feature-map losses VID, FSP, AB and OFD.

The rules of :mod:`kdlab.losses.functional` hold: the maths runs in at least float32 with autocast
switched off, shapes are checked up front (:class:`~kdlab.errors.LayerError` naming both shapes),
and nothing loops over samples, channels or positions. The side modules these methods train (VID's
regressor and variances, AB's and OFD's connectors) live in the term modules; the functions here
take their outputs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from kdlab.errors import LayerError
from kdlab.losses.functional import _as_float, _check_positive, _float_math, _require_tensor, _shape

__all__ = ["vid", "fsp_matrix", "fsp", "ab", "ofd_margin", "ofd"]


def _check_pair(name: str, a: Tensor, b: Tensor, what: str, fix: str) -> None:
    _require_tensor(name, "student input", a)
    _require_tensor(name, "teacher input", b)
    if a.shape != b.shape:
        raise LayerError(f"{name}: {what} shapes differ: student {_shape(a)} vs teacher {_shape(b)}; {fix}")
    if a.dim() < 2:
        raise LayerError(f"{name}: expected (N, C, ...) maps, got {_shape(a)}")


def _channel_view(v: Tensor, like: Tensor) -> Tensor:
    """A per-channel vector (C,) shaped to broadcast over (N, C, *spatial)."""
    return v.reshape(1, -1, *([1] * (like.dim() - 2)))


# --------------------------------------------------------------------------------------------------
# VID


@_float_math
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
    _require_tensor("vid", "log_scale", log_scale)
    if log_scale.dim() != 1 or log_scale.shape[0] != target.shape[1]:
        raise LayerError(
            f"vid: log_scale must hold one value per channel ({target.shape[1]},), got {_shape(log_scale)}"
        )
    eps = _check_positive("vid", "eps", eps)
    mu, t, alpha = _as_float(pred_mean, target, log_scale)
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
        raise LayerError(f"fsp: expected two (N, C, H, W) maps of one batch, got {_shape(bottom)} and {_shape(top)}")
    bottom, top = _pool_pair(bottom, top)
    return torch.einsum("nihw,njhw->nij", bottom, top) / (bottom.shape[-2] * bottom.shape[-1])


@_float_math
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
    maps = _as_float(*student_maps, *teacher_maps)
    s_maps, t_maps = maps[: len(student_maps)], maps[len(student_maps) :]
    total = maps[0].new_zeros(())
    for i in range(len(s_maps) - 1):
        g_s = fsp_matrix(s_maps[i], s_maps[i + 1])
        g_t = fsp_matrix(t_maps[i], t_maps[i + 1])
        if g_s.shape != g_t.shape:
            raise LayerError(
                f"fsp: layer pair {i}: student FSP matrix {_shape(g_s)} "
                f"(maps {_shape(s_maps[i])}, {_shape(s_maps[i + 1])}) vs "
                f"teacher {_shape(g_t)} (maps {_shape(t_maps[i])}, {_shape(t_maps[i + 1])}); "
                "FSP needs equal channel counts at every tapped layer (student_layers / teacher_layers options)"
            )
        total = total + (g_s - g_t).pow(2).mean()
    return total


# --------------------------------------------------------------------------------------------------
# AB


@_float_math
def ab(fs: Tensor, ft: Tensor, margin: float = 1.0) -> Tensor:
    r"""Activation-boundary loss (Heo et al., AAAI 2019), the paper's "alternative" squared-hinge form.

    .. math::
        L = \frac1N \sum_{n,c,h,w} \Big[(s + \mu)^2\, 1[s > -\mu,\ t \le 0] + (s - \mu)^2\, 1[s \le \mu,\ t > 0]\Big]

    ``s``: the student's pre-ReLU map after the connector, ``t``: the teacher's pre-ReLU map, ``mu``:
    the margin (1). A neuron is penalised when it is on the wrong side of the teacher's activation
    boundary, or within the margin of it. Reduction: sum over C, H, W, mean over N (official code).
    """
    _check_pair("ab", fs, ft, "pre-ReLU map", "the connector must output the teacher's channels and size")
    m = _check_positive("ab", "margin", margin)
    s, t = _as_float(fs, ft)
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


@_float_math
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
    _require_tensor("ofd", "margin", margin)
    if margin.dim() != 1 or margin.shape[0] != ft.shape[1]:
        raise LayerError(f"ofd: margin must hold one value per channel ({ft.shape[1]},), got {_shape(margin)}")
    s, t, mg = _as_float(fs, ft, margin)
    target = torch.maximum(t, _channel_view(mg, t))
    mask = (s > target) | (target > 0)
    return ((s - target).pow(2) * mask).sum() / s.shape[0]
