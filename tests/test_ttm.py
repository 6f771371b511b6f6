"""TTM and WTTM (Zheng & Yang, ICLR 2024) against float64 loops written from the official `TTM.forward` and
`WTTM.forward` (zkxufo/TTM, distiller_zoo/ttm.py and wttm.py): the teacher's softmax raised to the power gamma and
renormalised, KL to the student's untempered softmax summed over classes, batch mean, WTTM's per-sample weight the
normaliser."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import ROOT, ok, refused, sets

from kdlab.config import LossConfig
from kdlab.errors import ConfigError, LayerError
from kdlab.losses.ttm import ttm


def softmax_row(row: list[float]) -> list[float]:
    m = max(row)
    e = [math.exp(v - m) for v in row]
    return [v / sum(e) for v in e]


def ref_ttm(zs, zt, gamma, weighted) -> float:
    total = 0.0
    for n in range(len(zs)):
        ps = softmax_row(zs[n])
        powered = [p**gamma for p in softmax_row(zt[n])]  # the official torch.pow(softmax(y_t), l)
        norm = sum(powered)
        kl = 0.0
        for k in range(len(zs[n])):
            q = powered[k] / norm
            if q > 0:
                kl += q * (math.log(q) - math.log(ps[k]))
        total += (norm if weighted else 1.0) * kl
    return total / len(zs)


def logits(n=6, k=8, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    zs = (torch.randn(n, k, generator=g, dtype=torch.float64) * scale).requires_grad_()
    zt = (torch.randn(n, k, generator=g, dtype=torch.float64) * scale).requires_grad_()
    return zs, zt


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("gamma", [0.1, 0.2, 0.5, 1.0, 2.0])
def test_value_matches_the_official_equations(gamma, weighted):
    zs, zt = logits(seed=int(gamma * 10))
    got = ttm(zs, zt, gamma=gamma, weighted=weighted)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(ref_ttm(zs.tolist(), zt.tolist(), gamma, weighted), rel=1e-11)


def test_gamma_one_is_kd_at_temperature_one_without_the_weight():
    zs, zt = logits(seed=4)
    from kdlab.losses.functional import kd

    plain, weighted = ttm(zs, zt, gamma=1.0), ttm(zs, zt, gamma=1.0, weighted=True)
    assert plain.item() == pytest.approx(kd(zs, zt, T=1.0).item(), rel=1e-12)
    assert weighted.item() == pytest.approx(plain.item(), rel=1e-12)  # sum_k p_k = 1


@pytest.mark.parametrize("weighted", [False, True])
def test_student_gradient_matches_finite_differences(weighted):
    zs, zt = logits(n=3, k=5, seed=9)
    ttm(zs, zt, gamma=0.3, weighted=weighted).backward()
    S, Tt, eps = zs.detach().tolist(), zt.detach().tolist(), 1e-6
    for n in range(3):
        for k in range(5):
            hi, lo = [r[:] for r in S], [r[:] for r in S]
            hi[n][k] += eps
            lo[n][k] -= eps
            fd = (ref_ttm(hi, Tt, 0.3, weighted) - ref_ttm(lo, Tt, 0.3, weighted)) / (2 * eps)
            assert zs.grad[n, k].item() == pytest.approx(fd, rel=1e-5, abs=1e-9)
    # the student at temperature 1: for TTM, d/dz_s = (softmax(z_s) - q) / N exactly
    if not weighted:
        q = torch.softmax(0.3 * torch.log_softmax(zt.detach(), 1), 1)
        torch.testing.assert_close(zs.grad, (torch.softmax(zs.detach(), 1) - q) / 3)


def test_a_teacher_sure_of_one_class_is_finite_and_weighs_about_one():
    zs, zt = logits(n=4, k=6, seed=2)
    with torch.no_grad():
        zt[:, 0] = 80.0  # softmax(z_t)[:, 0] = 1 to float64 precision; the rest still positive
    for weighted in (False, True):
        value = ttm(zs, zt, gamma=0.1, weighted=weighted)
        assert value.item() == pytest.approx(ref_ttm(zs.tolist(), zt.tolist(), 0.1, weighted), rel=1e-10)
    # the WTTM weight sum_k p^gamma -> 1 as the teacher grows sure; an uncertain teacher weighs up to K^(1-gamma)
    sure = ttm(zs, zt, gamma=0.1, weighted=True) / ttm(zs, zt, gamma=0.1)
    flat = torch.zeros(4, 6, dtype=torch.float64)
    assert sure.item() == pytest.approx(1.0, abs=1e-2)
    assert (ttm(zs, flat, gamma=0.1, weighted=True) / ttm(zs, flat, gamma=0.1)).item() == pytest.approx(6**0.9)


def test_low_precision_inputs_run_in_float32():
    zs, zt = logits(seed=7)
    full = ttm(zs.detach().float(), zt.detach().float(), weighted=True)
    half = ttm(zs.detach().bfloat16(), zt.detach().bfloat16(), weighted=True)
    assert half.dtype == torch.float32 and half.item() == pytest.approx(full.item(), rel=5e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ttm(zs.detach().float(), zt.detach().float()).dtype == torch.float32


def test_bad_inputs_and_options_are_refused():
    zs, zt = logits()
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ConfigError, match="gamma"):
            ttm(zs, zt, gamma=bad)
    with pytest.raises(LayerError, match="shapes differ"):
        ttm(zs, zt[:, :5])
    with pytest.raises(LayerError, match=r"\(N, K\)"):
        ttm(zs[None], zt[None])
    for term in ("ttm", "wttm"):
        for bad in ({"gamma": 0}, {"weight": -1}, {"T": 4}):
            with pytest.raises(ValueError, match=next(iter(bad))):
                LossConfig(terms={term: bad})


@pytest.mark.parametrize("method", ["ttm", "wttm"])
def test_train_on_digits_from_the_command_line(method, tmp_path, capsys):
    recipe = str(ROOT / "recipes" / "digits" / f"{method}.yaml")
    quick = sets("train.epochs=1", "train.max_steps_per_epoch=3")
    ok(capsys, ["train", recipe, "--out", str(tmp_path / "run"), "--quiet", *quick])
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert math.isfinite(rows[-1][f"train_{method}"])
    bad = sets(f"loss.terms.{method}.teacher=2")
    refused(capsys, ["train", recipe, "--out", str(tmp_path / "bad"), *bad], f"loss.terms.{method}.teacher")
