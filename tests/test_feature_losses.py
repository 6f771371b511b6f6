"""VID, FSP, AB and OFD: the maths against naive float64 references, and the terms' own parts
(layer weights, connectors, OFD's margins from the teacher's BatchNorm, the initialisation stages).

Every reference works on Python floats with explicit loops over samples, channels and positions,
written from the papers' equations; none calls the code under test.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from kdlab import models
from kdlab.config import LossConfig
from kdlab.distiller import Distiller
from kdlab.errors import LayerError
from kdlab.losses import feature_functional as FF
from kdlab.losses.ofd import bn_before


def rand(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


def close(value, ref: float, rtol: float = 1e-9, atol: float = 1e-12) -> None:
    assert math.isclose(float(value), ref, rel_tol=rtol, abs_tol=atol), f"{float(value)!r} != reference {ref!r}"


def cells(x: torch.Tensor):
    """(n, c, position, value) over every element of an (N, C, H, W) map."""
    n_, c_, h_, w_ = x.shape
    v = x.tolist()
    for n in range(n_):
        for c in range(c_):
            for h in range(h_):
                for w in range(w_):
                    yield n, c, (h, w), v[n][c][h][w]


# --------------------------------------------------------------------------------------------------
# references


def ref_vid(mu, t, alpha, eps) -> float:
    """Ahn et al.: -log p(t | s) = sum log sigma_c + (t - mu)^2 / (2 sigma_c^2) (+ const), sigma_c^2 =
    log(1 + exp(alpha_c)) + eps; averaged over elements as the reference code does (the log of sigma^2
    halved is log sigma)."""
    tv = t.tolist()
    a = alpha.tolist()
    total, count = 0.0, 0
    for n, c, (h, w), m in cells(mu):
        var = math.log(1.0 + math.exp(a[c])) + eps
        total += math.log(math.sqrt(var)) + (tv[n][c][h][w] - m) ** 2 / (2.0 * var)
        count += 1
    return total / count


def block_mean(x: torch.Tensor, size: tuple[int, int]) -> list:
    """Average pooling over equal blocks (what adaptive pooling does when the sizes divide)."""
    n_, c_, h_, w_ = x.shape
    bh, bw = h_ // size[0], w_ // size[1]
    v = x.tolist()
    return [
        [
            [
                [
                    sum(v[n][c][i * bh + a][j * bw + b] for a in range(bh) for b in range(bw)) / (bh * bw)
                    for j in range(size[1])
                ]
                for i in range(size[0])
            ]
            for c in range(c_)
        ]
        for n in range(n_)
    ]


def ref_fsp_matrix(f1: torch.Tensor, f2: torch.Tensor) -> list:
    """Yim et al.: G_ij = sum_{h,w} F1_{h,w,i} F2_{h,w,j} / (h w), the larger map pooled to the smaller's size."""
    if f1.shape[-1] > f2.shape[-1]:
        a, b = block_mean(f1, tuple(f2.shape[-2:])), f2.tolist()
    elif f2.shape[-1] > f1.shape[-1]:
        a, b = f1.tolist(), block_mean(f2, tuple(f1.shape[-2:]))
    else:
        a, b = f1.tolist(), f2.tolist()
    hh, ww = len(a[0][0]), len(a[0][0][0])
    return [
        [
            [
                sum(a[n][i][h][w] * b[n][j][h][w] for h in range(hh) for w in range(ww)) / (hh * ww)
                for j in range(len(b[0]))
            ]
            for i in range(len(a[0]))
        ]
        for n in range(len(a))
    ]


def ref_fsp(s_maps, t_maps) -> float:
    """Sum over consecutive pairs of the mean over (n, i, j) of (G_s - G_t)^2 (RepDistiller's reduction)."""
    total = 0.0
    for k in range(len(s_maps) - 1):
        gs, gt = ref_fsp_matrix(s_maps[k], s_maps[k + 1]), ref_fsp_matrix(t_maps[k], t_maps[k + 1])
        acc, count = 0.0, 0
        for n in range(len(gs)):
            for i in range(len(gs[0])):
                for j in range(len(gs[0][0])):
                    acc += (gs[n][i][j] - gt[n][i][j]) ** 2
                    count += 1
        total += acc / count
    return total


def ref_ab(s, t, m) -> float:
    """Heo et al. (AAAI): per neuron, (mu - s)^2 pushed down when the teacher is active (t > 0) and
    s <= mu, (mu + s)^2 when inactive (t <= 0) and s > -mu; summed, divided by the batch."""
    tv = t.tolist()
    total = 0.0
    for n, c, (h, w), sv in cells(s):
        if tv[n][c][h][w] > 0:
            total += (m - sv) ** 2 if sv <= m else 0.0
        else:
            total += (m + sv) ** 2 if sv > -m else 0.0
    return total / s.shape[0]


def phi_cdf(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def ref_margin(gamma: float, beta: float) -> float:
    """Heo et al. (ICCV): margin = E[x | x < 0] for x ~ N(beta, gamma^2), here by numerical integration of
    the truncated density (not the closed form), with the official -3 sigma when P(x < 0) <= 0.001."""
    s, m = abs(gamma), beta
    if phi_cdf(-m / s) <= 1e-3:
        return -3.0 * s
    lo, steps = m - 12.0 * s, 200000
    hi = min(0.0, m + 12.0 * s)
    dx = (hi - lo) / steps
    num = den = 0.0
    for k in range(steps + 1):
        x = lo + k * dx
        wgt = 0.5 if k in (0, steps) else 1.0
        p = math.exp(-0.5 * ((x - m) / s) ** 2)
        num += wgt * x * p
        den += wgt * p
    return num / den


def ref_ofd(s, t, margin) -> float:
    """Heo et al. (ICCV): teacher transform T = max(t, m_c); partial L2 d_p = sum over neurons of 0 where
    S <= T <= 0, else (T - S)^2; divided by the batch (official code)."""
    tv = t.tolist()
    mg = margin.tolist()
    total = 0.0
    for n, c, (h, w), sv in cells(s):
        tt = max(tv[n][c][h][w], mg[c])
        if sv <= tt and tt <= 0:
            continue
        total += (tt - sv) ** 2
    return total / s.shape[0]


# --------------------------------------------------------------------------------------------------
# values


@pytest.mark.parametrize("eps", [1e-5, 0.1])
def test_vid_matches_reference(eps):
    mu, t = rand(3, 4, 2, 3, seed=1), rand(3, 4, 2, 3, seed=2)
    alpha = rand(4, seed=3, scale=2.0)
    close(FF.vid(mu, t, alpha, eps=eps), ref_vid(mu, t, alpha, eps))


def test_vid_init_var_and_optimum():
    # softplus(alpha) + eps = var: at the optimum sigma^2 equals the mean squared error of each channel
    mu, t = rand(4, 2, 3, 3, seed=4), rand(4, 2, 3, 3, seed=5)
    mse = ((mu - t) ** 2).mean(dim=(0, 2, 3))
    alpha = torch.log(torch.expm1(mse - 1e-5))
    value = FF.vid(mu, t, alpha)
    close(value, float(0.5 * (1 + mse.log()).mean()), rtol=1e-10)
    for shift in (-0.3, 0.3):
        assert float(FF.vid(mu, t, alpha + shift)) > float(value)


FSP_CASES = {
    "same_size": lambda: (
        [rand(2, 3, 4, 4, seed=10), rand(2, 2, 4, 4, seed=11), rand(2, 3, 4, 4, seed=12)],
        [rand(2, 3, 4, 4, seed=13), rand(2, 2, 4, 4, seed=14), rand(2, 3, 4, 4, seed=15)],
    ),
    "pooled": lambda: (
        [rand(2, 2, 4, 4, seed=16), rand(2, 3, 2, 2, seed=17), rand(2, 2, 1, 1, seed=18)],
        [rand(2, 2, 8, 8, seed=19), rand(2, 3, 4, 4, seed=20), rand(2, 2, 2, 2, seed=21)],
    ),
}


@pytest.mark.parametrize("case", list(FSP_CASES))
def test_fsp_matches_reference(case):
    s, t = FSP_CASES[case]()
    close(FF.fsp(s, t), ref_fsp(s, t))
    close(FF.fsp(t, [x.clone() for x in t]), 0.0, atol=1e-15)


def test_fsp_matrix_matches_reference():
    a, b = rand(2, 3, 4, 4, seed=22), rand(2, 5, 2, 2, seed=23)
    g = FF.fsp_matrix(a, b)
    ref = ref_fsp_matrix(a, b)
    assert g.shape == (2, 3, 5)
    for n in range(2):
        for i in range(3):
            for j in range(5):
                close(g[n, i, j], ref[n][i][j])


@pytest.mark.parametrize("margin", [1.0, 0.5, 2.0])
def test_ab_matches_reference(margin):
    s, t = rand(3, 4, 3, 3, seed=30, scale=1.5), rand(3, 4, 3, 3, seed=31)
    t[0, 0, 0, 0] = 0.0  # t = 0 counts as inactive
    s[1, 1, 1, 1] = margin  # s exactly at the margin counts as "not yet active enough"
    close(FF.ab(s, t, margin=margin), ref_ab(s, t, margin))


@pytest.mark.parametrize("gamma, beta", [(1.0, 0.0), (0.5, 1.0), (2.0, -1.0), (0.3, 0.9), (0.2, 5.0), (-1.5, 0.4)])
def test_ofd_margin_is_the_mean_negative_response(gamma, beta):
    m = FF.ofd_margin(torch.tensor([gamma]), torch.tensor([beta]))
    assert m.dtype == torch.float32 and m.shape == (1,)
    close(m[0], ref_margin(gamma, beta), rtol=1e-5, atol=1e-6)


def test_ofd_matches_reference():
    s, t = rand(3, 4, 2, 3, seed=40, scale=1.5), rand(3, 4, 2, 3, seed=41, scale=1.5)
    margin = torch.tensor([-0.8, -0.2, -1.5, -0.05], dtype=torch.float64)
    t[0, 1, 0, 0] = -5.0  # below its margin: only a student above the margin is pulled down
    s[0, 1, 0, 0] = -0.1
    t[1, 2, 1, 1] = -0.5  # between the margin and 0, student below: no loss
    s[1, 2, 1, 1] = -1.0
    close(FF.ofd(s, t, margin), ref_ofd(s, t, margin))
    close(FF.ofd(t, t.clone(), margin), 0.0)


# --------------------------------------------------------------------------------------------------
# gradients


def _req(*xs):
    return tuple(x.clone().requires_grad_() for x in xs)


def test_gradcheck_vid():
    mu, t, a = _req(rand(2, 3, 2, 2, seed=50), rand(2, 3, 2, 2, seed=51), rand(3, seed=52))
    assert torch.autograd.gradcheck(lambda x, y, z: FF.vid(x, y, z), (mu, t, a))


def test_gradcheck_fsp():
    s = _req(rand(2, 2, 4, 4, seed=53), rand(2, 3, 2, 2, seed=54))
    t = [rand(2, 2, 4, 4, seed=55), rand(2, 3, 2, 2, seed=56)]
    assert torch.autograd.gradcheck(lambda a, b: FF.fsp([a, b], t), s)


def test_gradcheck_ab_and_ofd():
    # values kept away from the kinks (the margin, 0, the teacher) where the losses are not differentiable
    s = rand(2, 3, 2, 2, seed=57, scale=0.2) + torch.tensor([2.0, -2.0, 0.3], dtype=torch.float64).view(1, 3, 1, 1)
    t = rand(2, 3, 2, 2, seed=58)
    (x,) = _req(s)
    assert torch.autograd.gradcheck(lambda v: FF.ab(v, t), (x,))
    margin = torch.tensor([-0.5, -0.5, -0.5], dtype=torch.float64)
    (x,) = _req(s)
    assert torch.autograd.gradcheck(lambda v: FF.ofd(v, t, margin), (x,))


# --------------------------------------------------------------------------------------------------
# precision and errors


def test_bf16_autocast_keeps_float32_maths():
    x = rand(2, 3, 4, 4, seed=60).bfloat16()
    y = rand(2, 3, 4, 4, seed=61).bfloat16()
    z = rand(2, 2, 2, 2, seed=62).bfloat16()
    fns = [
        lambda: FF.vid(x, y, torch.zeros(3)),
        lambda: FF.fsp([x, z], [y, z]),
        lambda: FF.ab(x, y),
        lambda: FF.ofd(x, y, torch.full((3,), -0.5)),
    ]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = [f() for f in fns]
    x, y, z = x.float(), y.float(), z.float()
    plain = [f() for f in fns]
    for a, p in zip(auto, plain):
        assert a.dtype == torch.float32 and torch.isfinite(a)
        close(a, float(p), rtol=1e-6)


def test_errors_name_both_shapes():
    x = torch.randn
    with pytest.raises(LayerError, match=r"vid:.*\(2, 3, 4, 4\).*\(2, 5, 4, 4\)"):
        FF.vid(x(2, 3, 4, 4), x(2, 5, 4, 4), torch.zeros(3))
    with pytest.raises(LayerError, match="one value per channel"):
        FF.ofd(x(2, 3, 4, 4), x(2, 3, 4, 4), torch.zeros(4))
    with pytest.raises(LayerError, match=r"fsp: layer pair 0.*equal channel counts"):
        FF.fsp([x(2, 3, 4, 4), x(2, 4, 4, 4)], [x(2, 6, 4, 4), x(2, 4, 4, 4)])
    with pytest.raises(LayerError, match=r"ab:.*\(2, 3, 4, 4\).*\(2, 3, 2, 2\)"):
        FF.ab(x(2, 3, 4, 4), x(2, 3, 2, 2))


# --------------------------------------------------------------------------------------------------
# the terms' own parts


def digits_pair(teacher: str = "smallcnn_wide"):
    torch.manual_seed(0)
    return models.create("smallcnn", num_classes=10, in_chans=1), models.create(teacher, num_classes=10, in_chans=1)


def randomise_bn(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data = torch.rand(m.num_features, generator=g) + 0.5
            m.bias.data = torch.randn(m.num_features, generator=g)
            m.running_mean = torch.randn(m.num_features, generator=g) * 0.1
            m.running_var = torch.rand(m.num_features, generator=g) + 0.5


@pytest.mark.parametrize(
    "name, layer, expected",
    [
        ("resnet20", "stage2:pre", "layer2.2.bn2"),  # basic block: bn2, before the shortcut add
        ("resnet8x4", "stage3:pre", "layer3.0.bn2"),  # one block per stage: the downsample branch is skipped
        ("resnet50", "stage4:pre", "layer4.2.bn3"),  # bottleneck: bn3
        ("vgg8", "stage1:pre", "block1.bn1"),  # VGG's block 0 is the stem: stage1 is block 1
        ("vgg13", "stage4:pre", "block4.bn2"),
        ("wrn_16_2", "stage3:pre", "bn"),  # pre-activation WRN: the tapped module is the BN itself
        ("smallcnn", "stage1:pre", "stage1.bn"),
    ],
)
def test_ofd_finds_the_batchnorm_before_the_relu(name, layer, expected):
    model = models.create(name, num_classes=10)
    assert bn_before(model, layer) is dict(model.named_modules())[expected]


def test_ofd_refuses_a_folded_teacher_and_a_layer_without_batchnorm():
    from kdlab.fast.fold import fold_batchnorm

    model = models.create("resnet20", num_classes=10).eval()
    fold_batchnorm(model, torch.zeros(2, 3, 32, 32))
    with pytest.raises(LayerError, match="not folded"):
        bn_before(model, "stage2:pre")
    with pytest.raises(LayerError, match="cannot find the BatchNorm"):
        bn_before(models.create("resnet20", num_classes=10), "layer1.0.conv1")


def test_ofd_term_margins_come_from_the_teacher_and_layers_weigh_by_depth():
    student, teacher = digits_pair()
    randomise_bn(teacher, seed=1)
    d = Distiller(student, [teacher], LossConfig(ce=0.0, terms={"ofd": {}}))
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 10, (6,))
    d.build(x, y)
    term = d.terms["ofd"]
    assert term.student_layers == ["stage1:pre", "stage2:pre", "stage3:pre"]
    for i, spec in enumerate(term.teacher_layers[0]):
        bn = dict(teacher.named_modules())[spec.split(":")[0] + ".bn"]
        torch.testing.assert_close(getattr(term, f"margin{i}"), FF.ofd_margin(bn.weight, bn.bias))
    assert "terms.ofd.margin0" in d.state_dict()
    d.eval()
    with torch.no_grad():
        out = d.outputs(x, y)
        expected = sum(
            ref_ofd(conn(out.feats[s]).double(), out.teacher_feats[0][t].double(), getattr(term, f"margin{i}").double())
            / 2 ** (2 - i)
            for i, (conn, s, t) in enumerate(zip(term.connectors, term.student_layers, term.teacher_layers[0]))
        )
        close(term(out), expected, rtol=1e-5)


def test_ab_term_weighs_layers_by_depth_with_identity_connectors():
    student, teacher = digits_pair("smallcnn")
    d = Distiller(student, [teacher], LossConfig(ce=0.0, terms={"ab": {"stages": "single"}}))
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 10, (6,))
    d.build(x, y)
    term = d.terms["ab"]
    assert all(isinstance(c, nn.Identity) for c in term.connectors)  # same widths and sizes
    d.eval()
    with torch.no_grad():
        out = d.outputs(x, y)
        expected = (
            3
            / 1000
            * sum(
                2.0 ** (i - 2) * ref_ab(out.feats[s].double(), out.teacher_feats[0][t].double(), 1.0)
                for i, (s, t) in enumerate(zip(term.student_layers, term.teacher_layers[0]))
            )
        )
        close(term(out), expected, rtol=1e-5)
    wide = Distiller(
        student, [models.create("smallcnn_wide", num_classes=10, in_chans=1)], LossConfig(terms={"ab": {}})
    )
    wide.build(x, y)
    assert all(isinstance(c[0], nn.Conv2d) and len(c) == 2 for c in wide.terms["ab"].connectors)  # conv + BN, no ReLU


def test_fsp_refuses_different_channel_counts_before_training():
    student, teacher = digits_pair("smallcnn_wide")
    d = Distiller(student, [teacher], LossConfig(terms={"fsp": {}}))
    with pytest.raises(LayerError, match="equal channel counts"):
        d.build(torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,)))


class Batches:
    """The loader interface a stage uses: set_epoch and iteration over (x, y)."""

    def __init__(self, x, y, batch):
        self.x, self.y, self.batch = x, y, batch

    def set_epoch(self, epoch):
        pass

    def __iter__(self):
        for i in range(0, len(self.y), self.batch):
            yield self.x[i : i + self.batch], self.y[i : i + self.batch]


@pytest.mark.parametrize("term, teacher", [("ab", "smallcnn_wide"), ("fsp", "smallcnn")])
def test_init_stage_lowers_its_loss_is_saved_and_reloaded(term, teacher, tmp_path: Path):
    from kdlab.stages import StageContext, run_stages

    student, t_model = digits_pair(teacher)
    d = Distiller(student, [t_model], LossConfig(terms={term: {"init_epochs": 4, "init_lr": 0.05}}))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 1, 8, 8, generator=g), torch.randint(0, 10, (64,), generator=g)
    d.build(x[:8], y[:8])
    assert d.term_names() == ["ce"]  # two-stage: the term is not part of the main loss

    def stage_context(net, distiller):  # the same run directory: the second context finds the first's stage
        return StageContext(
            student=net,
            teachers=distiller.teachers,
            train_loader=Batches(x, y, 16),
            device=torch.device("cpu"),
            run_dir=tmp_path,
            autocast=contextlib.nullcontext,
            log=lambda msg: None,
            forward=distiller.outputs,
        )

    ctx = stage_context(student, d)

    def loss():  # in train mode, as the stage sees it (the teacher stays in eval mode)
        d.train()
        with torch.no_grad():
            return float(d.terms[term](d.outputs(x, y)))

    before = loss()
    fc = student.fc.weight.detach().clone()
    d.train()
    run_stages(ctx, [d.terms[term]])
    trained = {k: v.clone() for k, v in student.state_dict().items()}
    after = loss()
    assert after < 0.9 * before
    assert torch.equal(student.fc.weight, fc)  # the classifier is not part of the stage
    assert (tmp_path / "stages" / f"{term}_init.safetensors").exists()
    # a rerun in the same run directory loads the stage instead of training it again
    fresh, t2 = digits_pair(teacher)
    d2 = Distiller(fresh, [t2], LossConfig(terms={term: {"init_epochs": 4}}))
    d2.build(x[:8], y[:8])
    ctx2 = stage_context(fresh, d2)
    run_stages(ctx2, [d2.terms[term]])
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in trained.items())
