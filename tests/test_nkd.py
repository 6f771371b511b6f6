"""NKD (Yang et al., ICCV 2023) against a float64 loop written from the official `NKDLoss.forward`
(yzd-v/cls_KD, mmcls/models/dis_losses/nkd.py): the target part at temperature 1 with the teacher's target
probability detached, the non-target part a gamma * T^2 cross-entropy over the K-1 other classes."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import ROOT, ok, refused, sets

from kdlab.config import LossConfig
from kdlab.errors import ConfigError, DataError, LayerError
from kdlab.losses.nkd import nkd


def log_softmax_row(row: list[float]) -> list[float]:
    m = max(row)
    lse = m + math.log(sum(math.exp(v - m) for v in row))
    return [v - lse for v in row]


def ref_nkd(zs, zt, y, T, gamma, drop_target=True) -> float:
    n_samples = len(zs)
    target = non = 0.0
    for n in range(n_samples):
        ls, lt = log_softmax_row(zs[n]), log_softmax_row(zt[n])
        target += math.exp(lt[y[n]]) * ls[y[n]]
        others = [k for k in range(len(zs[n])) if not (drop_target and k == y[n])]
        qs = log_softmax_row([zs[n][k] / T for k in others])
        qt = log_softmax_row([zt[n][k] / T for k in others])
        non += sum(math.exp(b) * a for a, b in zip(qs, qt))
    return -target / n_samples - gamma * T * T * non / n_samples


def logits(n=6, k=7, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    zs = (torch.randn(n, k, generator=g, dtype=torch.float64) * scale).requires_grad_()
    zt = (torch.randn(n, k, generator=g, dtype=torch.float64) * scale).requires_grad_()
    y = torch.randint(0, k, (n,), generator=g)
    return zs, zt, y


@pytest.mark.parametrize("T, gamma, drop", [(1.0, 1.5, True), (3.0, 3.5, True), (0.5, 2.0, True), (3.0, 3.5, False)])
def test_value_matches_the_official_equations(T, gamma, drop):
    zs, zt, y = logits(seed=int(T * 10))
    got = nkd(zs, zt, y, T=T, gamma=gamma, drop_target=drop)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(ref_nkd(zs.tolist(), zt.tolist(), y.tolist(), T, gamma, drop), rel=1e-12)


def test_gradients_match_finite_differences_and_the_teacher_target_probability_is_detached():
    zs, zt, y = logits(n=4, k=5, seed=3)
    nkd(zs, zt, y, T=2.0, gamma=1.5).backward()
    eps = 1e-6
    S, Tt, labels = zs.detach().tolist(), zt.detach().tolist(), y.tolist()

    def at(which, n, k, delta):
        a, b = [r[:] for r in S], [r[:] for r in Tt]
        (a if which == "s" else b)[n][k] += delta
        return ref_nkd(a, b, labels, 2.0, 1.5)

    def non_only(b):  # the reference without its (detached) target part: the gradient the teacher sees
        return ref_nkd(S, b, labels, 2.0, 1.5) - ref_nkd(S, b, labels, 2.0, 0.0)

    for n in range(4):
        for k in range(5):
            fd = (at("s", n, k, eps) - at("s", n, k, -eps)) / (2 * eps)
            assert zs.grad[n, k].item() == pytest.approx(fd, rel=1e-5, abs=1e-9)
            b_hi, b_lo = [r[:] for r in Tt], [r[:] for r in Tt]
            b_hi[n][k] += eps
            b_lo[n][k] -= eps
            fd_t = (non_only(b_hi) - non_only(b_lo)) / (2 * eps)
            assert zt.grad[n, k].item() == pytest.approx(fd_t, rel=1e-5, abs=1e-9)
        # the target column of the teacher reaches the loss only through the detached probability
        assert zt.grad[n, labels[n]].item() == 0.0
    # had the target probability not been detached, the teacher's target logit would get a gradient
    assert any(abs(at("t", n, labels[n], eps) - at("t", n, labels[n], -eps)) > 1e-9 for n in range(4))


def test_a_teacher_sure_of_the_target_leaves_a_finite_normalised_non_target_part():
    zs, zt, y = logits(n=3, k=6, seed=5)
    with torch.no_grad():
        zt[torch.arange(3), y] = 60.0  # teacher target probability 1 to float64 precision
    value = nkd(zs, zt, y, T=3.0, gamma=3.5)
    value.backward()
    ref = ref_nkd(zs.tolist(), zt.tolist(), y.tolist(), 3.0, 3.5)
    assert math.isfinite(value.item()) and value.item() == pytest.approx(ref, rel=1e-12)
    assert torch.isfinite(zs.grad).all()
    # the non-target part does not shrink with the teacher's confidence (KD's would be ~0 here)
    non = ref - ref_nkd(zs.tolist(), zt.tolist(), y.tolist(), 3.0, 0.0)
    assert abs(non) > 1.0


def test_low_precision_inputs_run_in_float32():
    zs, zt, y = logits(seed=7)
    full = nkd(zs.detach().float(), zt.detach().float(), y)
    half = nkd(zs.detach().bfloat16(), zt.detach().bfloat16(), y)
    assert half.dtype == torch.float32
    assert half.item() == pytest.approx(full.item(), rel=5e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert nkd(zs.detach().float(), zt.detach().float(), y).dtype == torch.float32


def test_bad_inputs_and_options_are_refused():
    zs, zt, y = logits()
    with pytest.raises(ConfigError, match="temperature T"):
        nkd(zs, zt, y, T=0.0)
    with pytest.raises(ConfigError, match="gamma"):
        nkd(zs, zt, y, gamma=-1.0)
    with pytest.raises(LayerError, match="shapes differ"):
        nkd(zs, zt[:, :5], y)
    with pytest.raises(DataError, match="out of range"):
        nkd(zs, zt, torch.full_like(y, 7))
    with pytest.raises(LayerError, match="at least 2 classes"):
        nkd(zs[:, :1], zt[:, :1], torch.zeros_like(y))
    for bad in ({"T": 0}, {"gamma": -0.5}, {"temp": 3.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            LossConfig(terms={"nkd": bad})


def test_train_on_digits_from_the_command_line(tmp_path, capsys):
    recipe = str(ROOT / "recipes" / "digits" / "nkd.yaml")
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
    assert math.isfinite(rows[-1]["train_nkd"])
    refused(
        capsys,
        ["train", recipe, "--out", str(tmp_path / "bad"), *sets("loss.terms.nkd.teacher=1")],
        "loss.terms.nkd.teacher",
    )
