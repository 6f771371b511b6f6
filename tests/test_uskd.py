"""USKD (Yang et al., ICCV 2023, the teacher-free variant) against a float64 loop written from the official
`USKDLoss.forward` (yzd-v/cls_KD, mmcls/models/dis_losses/uskd.py): the customised target label, the weak head's
label-smoothed CE, and the Zipf non-target labels ranked by the weak head's and the student's normalised scores."""

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
from kdlab.losses.uskd import uskd, uskd_parts, zipf_labels


def log_softmax_row(row):
    m = max(row)
    lse = m + math.log(sum(math.exp(v - m) for v in row))
    return [v - lse for v in row]


def ref_parts(zs, zw, y, rank_source="log_prob", frozen_target=None):
    """(L_target, L_non, L_weak) with explicit loops; ``frozen_target`` holds the detached target labels fixed."""
    n_samples, k = len(zs), len(zs[0])
    log_p = [log_softmax_row(r) for r in zs]
    p_y2 = [math.exp(log_p[n][y[n]]) ** 2 for n in range(n_samples)]
    mean_p_y2 = sum(p_y2) / n_samples
    soft = frozen_target or [p_y2[n] + 1 - mean_p_y2 for n in range(n_samples)]
    l_target = l_non = l_weak = 0.0
    for n in range(n_samples):
        l_target -= soft[n] * log_p[n][y[n]]
        log_w = log_softmax_row(zw[n])
        for c in range(k):
            l_weak -= (0.9 * (c == y[n]) + 0.1 / k) * log_w[c]
        w = [math.exp(v) for v in log_w]
        s = log_p[n] if rank_source == "log_prob" else [math.exp(v) for v in log_p[n]]
        score = [w[c] / (1 - w[y[n]] + 1e-6) + s[c] / (1 - s[y[n]] + 1e-6) for c in range(k)]
        order = sorted(range(k), key=lambda c: (-score[c], c))  # rank 1 = largest
        zipf = {c: 1.0 / (pos + 1) for pos, c in enumerate(order)}
        others = [c for c in range(k) if c != y[n]]
        total = sum(zipf[c] for c in others)
        log_q = log_softmax_row([zs[n][c] for c in others])
        l_non -= sum(zipf[c] / total * lq for c, lq in zip(others, log_q))
    return l_target / n_samples, l_non / n_samples, l_weak / n_samples


def logits(n=6, k=7, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    zs = (torch.randn(n, k, generator=g, dtype=torch.float64) * scale).requires_grad_()
    zw = (torch.randn(n, k, generator=g, dtype=torch.float64) * scale).requires_grad_()
    y = torch.randint(0, k, (n,), generator=g)
    return zs, zw, y


@pytest.mark.parametrize("rank_source", ["log_prob", "prob"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_parts_match_the_official_equations(rank_source, seed):
    zs, zw, y = logits(seed=seed)
    got = uskd_parts(zs, zw, y, rank_source)
    ref = ref_parts(zs.tolist(), zw.tolist(), y.tolist(), rank_source)
    for g, r in zip(got, ref):
        assert g.dtype == torch.float64 and g.item() == pytest.approx(r, rel=1e-12)
    total = uskd(zs, zw, y, alpha=0.7, beta=0.2, mu=0.05, rank_source=rank_source)
    assert total.item() == pytest.approx(0.7 * ref[0] + 0.2 * ref[1] + 0.05 * ref[2], rel=1e-12)


def test_the_two_rank_sources_give_different_labels():
    zs, zw, y = logits(n=32, k=10, seed=4)
    with torch.no_grad():
        w, log_p = torch.softmax(zw, 1), torch.log_softmax(zs, 1)
        wy = w.gather(1, y[:, None])

        def labels(s):
            return zipf_labels(w / (1 - wy + 1e-6) + s / (1 - s.gather(1, y[:, None]) + 1e-6), y)

        assert not torch.equal(labels(log_p), labels(log_p.exp()))


def test_zipf_labels_rank_over_all_classes_then_drop_the_target():
    score = torch.tensor([[0.1, 0.9, 0.5, 0.3]], dtype=torch.float64)
    # ranks: class 1 -> 1, class 2 -> 2, class 3 -> 3, class 0 -> 4; target 1 dropped; 1/2, 1/3, 1/4 renormalised
    got = zipf_labels(score, torch.tensor([1]))
    expect = torch.tensor([[1 / 4, 1 / 2, 1 / 3]], dtype=torch.float64)
    torch.testing.assert_close(got, expect / expect.sum())


def test_gradients_detach_the_target_label_and_the_ranks():
    zs, zw, y = logits(n=4, k=5, seed=6)
    alpha, beta, mu = 0.5, 0.3, 0.2
    uskd(zs, zw, y, alpha, beta, mu).backward()
    S, W, labels = zs.detach().tolist(), zw.detach().tolist(), y.tolist()
    p_y2 = [math.exp(log_softmax_row(S[n])[labels[n]]) ** 2 for n in range(4)]
    frozen = [p + 1 - sum(p_y2) / 4 for p in p_y2]

    def total(a, frozen_target):
        t, n, w = ref_parts(a, W, labels, frozen_target=frozen_target)
        return alpha * t + beta * n + mu * w

    eps, differs = 1e-6, False
    for n in range(4):
        for k in range(5):
            hi, lo = [r[:] for r in S], [r[:] for r in S]
            hi[n][k] += eps
            lo[n][k] -= eps
            fd = (total(hi, frozen) - total(lo, frozen)) / (2 * eps)
            assert zs.grad[n, k].item() == pytest.approx(fd, rel=1e-5, abs=1e-9)
            undetached = (total(hi, None) - total(lo, None)) / (2 * eps)
            differs |= abs(undetached - fd) > 1e-6
    assert differs  # had the target label kept its gradient, the check above would fail
    # the weak head learns from its smoothed CE only: the ranks it feeds carry no gradient
    u = torch.full((4, 5), 0.1 / 5, dtype=torch.float64)
    u[torch.arange(4), y] += 0.9
    torch.testing.assert_close(zw.grad, mu * (torch.softmax(zw.detach(), 1) - u) / 4)


def test_the_target_label_is_one_for_a_batch_of_one_and_a_sure_student_is_finite():
    zs, zw, y = logits(n=1, k=5, seed=8)
    t, _, _ = uskd_parts(zs, zw, y)
    assert t.item() == pytest.approx(-torch.log_softmax(zs.detach(), 1)[0, y[0]].item(), rel=1e-12)
    zs, zw, y = logits(n=5, k=6, seed=9)
    with torch.no_grad():
        zs[torch.arange(5), y] = 50.0  # p_y = 1 to float64 precision: 1 - p_y + 1e-6 is the eps alone
        zw[torch.arange(5), y] = 50.0
    for source in ("log_prob", "prob"):
        got = uskd_parts(zs, zw, y, source)
        ref = ref_parts(zs.tolist(), zw.tolist(), y.tolist(), source)
        for g, r in zip(got, ref):
            assert math.isfinite(g.item()) and g.item() == pytest.approx(r, rel=1e-9, abs=1e-12)


def test_low_precision_inputs_run_in_float32():
    zs, zw, y = logits(seed=3)
    full = uskd(zs.detach().float(), zw.detach().float(), y)
    half = uskd(zs.detach().bfloat16(), zw.detach().bfloat16(), y)
    assert half.dtype == torch.float32 and half.item() == pytest.approx(full.item(), rel=5e-2)


def test_bad_inputs_and_options_are_refused():
    zs, zw, y = logits()
    with pytest.raises(ConfigError, match="rank_source"):
        uskd_parts(zs, zw, y, "rank")
    with pytest.raises(ConfigError, match="mu"):
        uskd(zs, zw, y, mu=-1.0)
    with pytest.raises(LayerError, match="shapes differ"):
        uskd_parts(zs, zw[:, :5], y)
    with pytest.raises(DataError, match="out of range"):
        uskd_parts(zs, zw, torch.full_like(y, 9))
    for bad in ({"rank_source": "rank"}, {"alpha": -1}, {"channel": 256}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            LossConfig(terms={"uskd": bad})
    student = models.create("smallcnn", num_classes=10, in_chans=1)
    with pytest.raises(ConfigError, match="one layer feeds the weak head"):
        Distiller(student, [], LossConfig(terms={"uskd": {"student_layers": ["stage1", "stage2"]}}))


def test_the_weak_head_sits_on_the_second_to_last_stage_and_stays_out_of_the_student():
    student = models.create("smallcnn_narrow", num_classes=10, in_chans=1)
    d = Distiller(student, [], LossConfig(ce=1.0, terms={"uskd": {}}))
    term = d.terms["uskd"]
    assert term.student_layers == ["stage2"]
    assert Distiller(models.create("resnet18", num_classes=100), [], LossConfig(terms={"uskd": {}})).terms[
        "uskd"
    ].student_layers == ["stage3"]
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    d.build(x, y)
    out = d.outputs(x, y)
    assert term.head.in_features == out.feats["stage2"].shape[1] and term.head.out_features == 10
    torch.testing.assert_close(term.pooled(out), out.feats["stage2"].mean((2, 3)))
    assert not any(k.startswith("terms") for k in d.student.state_dict())


def test_train_on_digits_from_the_command_line(tmp_path, capsys):
    recipe = str(ROOT / "recipes" / "digits" / "uskd.yaml")
    quick = sets("train.epochs=1", "train.max_steps_per_epoch=3")
    ok(capsys, ["train", recipe, "--out", str(tmp_path / "run"), "--quiet", *quick])
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert math.isfinite(rows[-1]["train_uskd"])
    bad = sets("loss.terms.uskd.rank_source=rank")
    refused(capsys, ["train", recipe, "--out", str(tmp_path / "bad"), *bad], "rank_source")
