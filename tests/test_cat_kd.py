"""CAT-KD (Guo et al., CVPR 2023) against float64 loops written from the official code (GzyAftermath/CAT-KD:
mdistiller/distillers/CAT_KD.py ``CAT_loss``; the CAM networks of tools/train.py ``if_test``): class maps from each
network's classifier as a 1x1 conv (the teacher's bias dropped), average-pooled to r x r, optionally L2-normalised
per class map, and compared by the mean squared error."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import ROOT, ok, refused, sets

from kdlab import models
from kdlab.config import LossConfig
from kdlab.distiller import Distiller
from kdlab.errors import ConfigError, LayerError
from kdlab.losses.cat_kd import cat_loss


def windows(size: int, out: int) -> list[tuple[int, int]]:
    return [(math.floor(i * size / out), math.ceil((i + 1) * size / out)) for i in range(out)]


def ref_pool(grid, out):
    res = []
    for a, b in windows(len(grid), out):
        row = []
        for c, d in windows(len(grid[0]), out):
            cells = [grid[i][j] for i in range(a, b) for j in range(c, d)]
            row.append(sum(cells) / len(cells))
        res.append(row)
    return res


def ref_cat(cs, ct, r, normalize) -> float:
    total, count = 0.0, 0
    for n in range(len(cs)):
        for k in range(len(cs[n])):
            a, b = ref_pool(cs[n][k], r), ref_pool(ct[n][k], r)
            if normalize:
                na = max(math.sqrt(sum(v * v for row in a for v in row)), 1e-12)
                nb = max(math.sqrt(sum(v * v for row in b for v in row)), 1e-12)
                a = [[v / na for v in row] for row in a]
                b = [[v / nb for v in row] for row in b]
            for i in range(r):
                for j in range(r):
                    total += (a[i][j] - b[i][j]) ** 2
                    count += 1
    return total / count


@pytest.mark.parametrize("hs, ht, r, normalize", [(4, 8, 2, False), (4, 4, 4, True), (6, 5, 2, True), (3, 8, 1, False)])
def test_cat_loss_matches_the_official_equation(hs, ht, r, normalize):
    g = torch.Generator().manual_seed(hs * 10 + ht)
    cs = torch.randn(3, 4, hs, hs, generator=g, dtype=torch.float64)
    ct = torch.randn(3, 4, ht, ht, generator=g, dtype=torch.float64)
    got = cat_loss(cs, ct, r, normalize)
    assert got.item() == pytest.approx(ref_cat(cs.tolist(), ct.tolist(), r, normalize), rel=1e-10)


def make(options=None, student_bias=False, seed=0, teacher_is_student=False):
    torch.manual_seed(seed)
    student = models.create("smallcnn_narrow", num_classes=10, in_chans=1, classifier_bias=student_bias)
    teacher = student if teacher_is_student else models.create("smallcnn_wide", num_classes=10, in_chans=1)
    with torch.no_grad():
        if teacher.fc.bias is not None:
            teacher.fc.bias.uniform_(-2, 2)  # a bias large enough to matter
    d = Distiller(student, [teacher], LossConfig(ce=1.0, terms={"cat_kd": {"weight": 1.0, **(options or {})}}))
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    d.build(x, y)
    return d, x, y


def per_pixel_maps(fmap, fc, bias):
    n, c, h, w = fmap.shape
    out = [[[[0.0] * w for _ in range(h)] for _ in range(fc.out_features)] for _ in range(n)]
    weight = fc.weight.double().tolist()
    for i in range(n):
        for k in range(fc.out_features):
            for a in range(h):
                for b in range(w):
                    v = sum(weight[k][ch] * fmap[i, ch, a, b].item() for ch in range(c))
                    out[i][k][a][b] = v + (fc.bias[k].item() if bias else 0.0)
    return out


@pytest.mark.parametrize("options", [{}, {"normalize": True, "resolution": 1}, {"teacher_bias": True}])
def test_the_term_compares_the_cams_of_both_networks_own_classifiers(options):
    d, x, y = make(options)
    d.eval()
    with torch.no_grad():
        out = d.outputs(x, y)
        fs, ft = out.feats["pre_pool"].double(), out.teacher_feats[0]["pre_pool"].double()
        cs = per_pixel_maps(fs, d.student.fc, False)
        ct = per_pixel_maps(ft, d.teachers[0].fc, options.get("teacher_bias", False))
        # the bias-free student is a CAM network: its logits are its pooled class maps
        pooled = torch.tensor(cs, dtype=torch.float64).mean((2, 3))
        assert torch.allclose(pooled, out.logits.double(), atol=1e-5)
        value = d.terms["cat_kd"](out)
    ref = ref_cat(cs, ct, options.get("resolution", 2), options.get("normalize", False))
    assert value.item() == pytest.approx(ref, rel=1e-4)


def test_the_teacher_bias_is_dropped_by_default_and_gradients_reach_the_student_only():
    d, x, y = make()
    d_bias, _, _ = make({"teacher_bias": True})
    d.train()
    loss, _, values = d(x, y)
    loss.backward()
    assert d.student.fc.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in d.teachers[0].parameters())
    assert not [k for k in d.state_dict() if k.startswith("terms.")]
    d.eval()
    d_bias.eval()
    with torch.no_grad():
        assert d(x, y)[2]["cat_kd"].item() != pytest.approx(d_bias(x, y)[2]["cat_kd"].item(), rel=1e-3)


def test_a_student_with_a_classifier_bias_is_refused_unless_told_what_to_do():
    with pytest.raises(ConfigError, match="classifier_bias: false"):
        make(student_bias=True)
    drop, x, y = make({"student_bias": "drop"}, student_bias=True)
    keep, _, _ = make({"student_bias": "keep"}, student_bias=True)
    with torch.no_grad():
        keep.student.fc.bias.fill_(1.0)
        drop.student.fc.bias.fill_(1.0)
        drop.eval()
        keep.eval()
        assert drop(x, y)[2]["cat_kd"].item() != pytest.approx(keep(x, y)[2]["cat_kd"].item(), rel=1e-3)
    same, x2, y2 = make({"student_bias": "keep", "teacher_bias": True}, student_bias=True, teacher_is_student=True)
    same.eval()
    with torch.no_grad():
        assert same(x2, y2)[2]["cat_kd"].item() == pytest.approx(0.0, abs=1e-10)


def test_bad_inputs_and_options_are_refused():
    cs = torch.randn(2, 3, 4, 4)
    with pytest.raises(LayerError, match="class map shapes differ"):
        cat_loss(cs, torch.randn(2, 4, 4, 4))
    with pytest.raises(LayerError, match=r"\(N, K, H, W\)"):
        cat_loss(cs[:, :, 0], cs[:, :, 0])
    with pytest.raises(ConfigError, match="resolution"):
        cat_loss(cs, cs, 0)
    with pytest.raises(ConfigError, match="one map per network"):
        make({"student_layers": ["stage2", "stage3"], "teacher_layers": ["stage2", "stage3"]})
    with pytest.raises(LayerError, match="loss.terms.cat_kd.teacher_classifier"):
        make({"teacher_classifier": "stage3"})
    for bad in ({"resolution": 0}, {"normalize": "maybe"}, {"student_bias": "maybe"}, {"IF_BINARIZE": True}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            LossConfig(terms={"cat_kd": bad})


def test_train_on_digits_from_the_command_line(tmp_path, capsys):
    recipe = str(ROOT / "recipes" / "digits" / "cat_kd.yaml")
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
    assert math.isfinite(rows[-1]["train_cat_kd"])
    refused(
        capsys,
        ["train", recipe, "--out", str(tmp_path / "bad"), *sets("student.kwargs.classifier_bias=true")],
        "classifier_bias",
    )
