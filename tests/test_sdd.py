"""SDD (Wei, Luo, Luo, CVPR 2024) against float64 loops written from the official code
(shicaiwei123/SDD-CVPR2024: mdistiller/distillers/KD.py ``sdd_kd_loss``, mdistiller/distillers/SDD_DKD.py
``multi_dkd``): per region and sample, KD (or DKD) between the region logits, weight 2 where the teacher's
correctness on the region differs from its correctness on the whole image, the sum divided by R*N."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import ROOT, ok, refused, sets

from kdlab import models
from kdlab.config import LossConfig
from kdlab.distiller import Distiller
from kdlab.errors import ConfigError, DataError, LayerError
from kdlab.losses.base import Outputs
from kdlab.losses.sdd import sdd_dkd, sdd_kd


def softmax(row: list[float]) -> list[float]:
    m = max(row)
    e = [math.exp(v - m) for v in row]
    s = sum(e)
    return [v / s for v in e]


def kl(p: list[float], q: list[float]) -> float:
    return sum(a * (math.log(a) - math.log(b)) for a, b in zip(p, q) if a > 0)


def weight(zt, y, n, r, complementary) -> float:
    """The official masks: global right & local wrong, or global wrong & local right -> complementary."""
    k = len(zt[n])
    local = max(range(k), key=lambda c: zt[n][c][r]) == y[n]
    glob = max(range(k), key=lambda c: zt[n][c][0]) == y[n]
    return complementary if local != glob else 1.0


def column(z, n, r) -> list[float]:
    return [z[n][c][r] for c in range(len(z[n]))]


def ref_sdd_kd(zs, zt, y, T, complementary=2.0) -> float:
    n_, r_ = len(zs), len(zs[0][0])
    total = 0.0
    for r in range(r_):
        for n in range(n_):
            ps = softmax([v / T for v in column(zs, n, r)])
            pt = softmax([v / T for v in column(zt, n, r)])
            total += weight(zt, y, n, r, complementary) * T * T * kl(pt, ps)
    return total / (r_ * n_)


def ref_dkd_row(s: list[float], t: list[float], y: int, alpha, beta, T) -> float:
    ps, pt = softmax([v / T for v in s]), softmax([v / T for v in t])
    bs, bt = [ps[y], 1 - ps[y]], [pt[y], 1 - pt[y]]
    others = [c for c in range(len(s)) if c != y]
    ns = softmax([s[c] / T for c in others])
    nt = softmax([t[c] / T for c in others])
    return T * T * (alpha * kl(bt, bs) + beta * kl(nt, ns))


def ref_sdd_dkd(zs, zt, y, alpha, beta, T, complementary=2.0) -> float:
    n_, r_ = len(zs), len(zs[0][0])
    total = 0.0
    for r in range(r_):
        for n in range(n_):
            row = ref_dkd_row(column(zs, n, r), column(zt, n, r), y[n], alpha, beta, T)
            total += weight(zt, y, n, r, complementary) * row
    return total / (r_ * n_)


def regions(n=6, k=5, r=5, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    zs = (torch.randn(n, k, r, generator=g, dtype=torch.float64) * scale).requires_grad_()
    zt = torch.randn(n, k, r, generator=g, dtype=torch.float64) * scale
    y = zt[:, :, 0].argmax(1)
    y[: n // 2] = torch.randint(0, k, (n // 2,), generator=g)  # some globally wrong teachers too
    return zs, zt, y


def both_weights_occur(zt, y) -> bool:
    ws = {weight(zt.tolist(), y.tolist(), n, r, 2.0) for n in range(zt.shape[0]) for r in range(zt.shape[2])}
    return ws == {1.0, 2.0}


@pytest.mark.parametrize("seed, T, complementary", [(0, 4.0, 2.0), (1, 1.0, 2.0), (2, 4.0, 3.5)])
def test_sd_kd_matches_the_official_loop(seed, T, complementary):
    zs, zt, y = regions(seed=seed)
    assert both_weights_occur(zt, y)
    got = sdd_kd(zs, zt, y, T=T, complementary=complementary)
    assert got.item() == pytest.approx(ref_sdd_kd(zs.tolist(), zt.tolist(), y.tolist(), T, complementary), rel=1e-10)


@pytest.mark.parametrize("seed, alpha, beta, T", [(0, 1.0, 8.0, 4.0), (3, 0.5, 2.0, 2.0)])
def test_sd_dkd_matches_the_official_loop(seed, alpha, beta, T):
    zs, zt, y = regions(seed=seed)
    assert both_weights_occur(zt, y)
    got = sdd_dkd(zs, zt, y, alpha=alpha, beta=beta, T=T)
    assert got.item() == pytest.approx(ref_sdd_dkd(zs.tolist(), zt.tolist(), y.tolist(), alpha, beta, T), rel=1e-9)


def test_one_region_is_plain_kd_and_an_underflowing_teacher_stays_finite():
    zs, zt, y = regions(r=1)
    ref = (
        sum(
            16 * kl(softmax([v / 4 for v in t]), softmax([v / 4 for v in s]))
            for s, t in zip(zs[:, :, 0].tolist(), zt[:, :, 0].tolist())
        )
        / 6
    )
    assert sdd_kd(zs, zt, y).item() == pytest.approx(ref, rel=1e-10)
    # float32 teacher probabilities that underflow to 0: the official code zeroes the NaN they give
    zs32, zt32 = zs.detach().float(), zt.float().clone()
    zt32[:, 0, :] = 2000.0
    got = sdd_kd(zs32, zt32, y, T=1.0)
    assert torch.isfinite(got)
    assert got.item() == pytest.approx(
        ref_sdd_kd(zs32.double().tolist(), zt32.double().tolist(), y.tolist(), 1.0), rel=1e-4
    )


def test_gradients_reach_the_student_regions_only_and_match_finite_differences():
    zs, zt, y = regions(n=3, k=4, r=5)
    zt = zt.clone().requires_grad_()
    sdd_kd(zs, zt, y).backward()
    eps = 1e-6
    for idx in [(0, 1, 0), (2, 3, 4), (1, 0, 2)]:
        plus, minus = zs.detach().clone(), zs.detach().clone()
        plus[idx] += eps
        minus[idx] -= eps
        fd = (
            ref_sdd_kd(plus.tolist(), zt.tolist(), y.tolist(), 4.0)
            - ref_sdd_kd(minus.tolist(), zt.tolist(), y.tolist(), 4.0)
        ) / (2 * eps)
        assert zs.grad[idx].item() == pytest.approx(fd, rel=1e-5, abs=1e-9)
    # the weights come from the teacher's argmax, which has no gradient; the teacher's own side is not detached
    # by the loss (the Distiller runs the teacher under no_grad, as the official code does)
    assert zt.grad is not None


def make(term="sdd", options=None, seed=0, teacher_is_student=False):
    torch.manual_seed(seed)
    student = models.create("smallcnn_narrow", num_classes=10, in_chans=1)
    teacher = student if teacher_is_student else models.create("smallcnn_wide", num_classes=10, in_chans=1)
    d = Distiller(student, [teacher], LossConfig(ce=0.0, terms={term: {"weight": 1.0, **(options or {})}}))
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    d.build(x, y)
    return d, x, y


def test_the_term_distils_the_region_logits_of_both_networks_own_classifiers():
    d, x, y = make(options={"levels": [1, 2]})
    d.eval()
    with torch.no_grad():
        out = d.outputs(x, y)
        fs, ft = out.feats["pre_pool"], out.teacher_feats[0]["pre_pool"]
        # the 2x2 maps of the digits nets: the 4x4 grid repeats each cell, so the regions are the pixels
        s_fc, t_fc = d.student.fc, d.teachers[0].fc
        zs = torch.cat(
            [s_fc(fs.mean((2, 3)))[:, :, None]]
            + [s_fc(fs[:, :, i, j])[:, :, None] for i in range(2) for j in range(2)],
            2,
        )
        zt = torch.cat(
            [t_fc(ft.mean((2, 3)))[:, :, None]]
            + [t_fc(ft[:, :, i, j])[:, :, None] for i in range(2) for j in range(2)],
            2,
        )
        assert torch.allclose(zs[:, :, 0], out.logits, atol=1e-5)
        value = d.terms["sdd"](out)
    assert value.item() == pytest.approx(
        ref_sdd_kd(zs.double().tolist(), zt.double().tolist(), y.tolist(), 4.0), rel=1e-4
    )


def test_the_student_classifier_trains_through_the_regions_and_stays_in_the_student():
    d, x, y = make()
    d.train()
    loss, _, _ = d(x, y)
    loss.backward()
    assert d.student.fc.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in d.teachers[0].parameters())
    assert not [k for k in d.state_dict() if k.startswith("terms.")]  # the classifiers are not copied into the term


def test_sd_dkd_warm_up_and_zero_when_student_is_teacher():
    d, x, y = make("sdd_dkd", {"warmup_epochs": 20})
    d.eval()
    with torch.no_grad():
        out = d.outputs(x, y)
        full = d.terms["sdd_dkd"].opts.model_copy(update={"warmup_epochs": 0})
        term = d.terms["sdd_dkd"]
        ramped = term(Outputs(**{**out.__dict__, "progress": 0.5}))
        term.opts = full
        whole = term(out)
    assert ramped.item() == pytest.approx(whole.item() / 20, rel=1e-6)
    d2, x2, y2 = make("sdd_dkd", {"warmup_epochs": 20})
    with pytest.raises(LayerError, match="progress"):
        d2.terms["sdd_dkd"](d2.outputs(x2, y2))
    d3, x3, y3 = make("sdd", teacher_is_student=True)
    d3.eval()
    with torch.no_grad():
        assert d3(x3, y3)[2]["sdd"].item() == pytest.approx(0.0, abs=1e-6)


def test_bad_inputs_and_options_are_refused():
    zs, zt, y = regions()
    with pytest.raises(ConfigError, match="temperature T"):
        sdd_kd(zs, zt, y, T=0.0)
    with pytest.raises(LayerError, match="region logit shapes differ"):
        sdd_kd(zs, zt[:, :, :1], y)
    with pytest.raises(LayerError, match=r"\(N, K, R\)"):
        sdd_kd(zs[:, :, 0], zt[:, :, 0], y)
    with pytest.raises(DataError, match="out of range"):
        sdd_kd(zs, zt, torch.full_like(y, 9))
    for bad in ([2, 4], [1, 4, 2], [1, 3], [], [1, 1]):
        with pytest.raises(ConfigError, match="levels"):
            make(options={"levels": bad})
    with pytest.raises(ConfigError, match="one map per network"):
        make(options={"student_layers": ["stage2", "stage3"], "teacher_layers": ["stage2", "stage3"]})
    with pytest.raises(ConfigError, match="loss.terms.sdd.teacher"):
        make(options={"teacher": 1})
    with pytest.raises(LayerError, match="loss.terms.sdd.student_classifier"):
        make(options={"student_classifier": "stage3"})
    for bad in ({"T": 0}, {"complementary": 0}, {"levels": "1,2"}, {"M": [1, 2]}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            LossConfig(terms={"sdd": bad})


@pytest.mark.parametrize("method", ["sdd", "sdd_dkd"])
def test_train_on_digits_from_the_command_line(method, tmp_path, capsys):
    recipe = str(ROOT / "recipes" / "digits" / f"{method}.yaml")
    ok(
        capsys,
        [
            "train",
            recipe,
            "--out",
            str(tmp_path / "run"),
            "--quiet",
            *sets("train.epochs=1", "train.max_steps_per_epoch=3"),
        ],
    )
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert math.isfinite(rows[-1][f"train_{method}"])
    refused(
        capsys,
        ["train", recipe, "--out", str(tmp_path / "bad"), *sets(f"loss.terms.{method}.levels=[2,4]")],
        f"loss.terms.{method}.levels",
    )
