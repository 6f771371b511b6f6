"""MGD (Yang et al., ECCV 2022) against float64 loops written from the official classification loss
(yzd-v/MGD, cls/mmcls/distillation/losses/mgd.py): align conv1x1 only when the channels differ, a per-sample
channel mask (0 with probability lambda), conv3x3 -> ReLU -> conv3x3, squared error summed and divided by N."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import ROOT, ok, refused, sets
from torch import nn

from kdlab import distributed
from kdlab.config import LossConfig
from kdlab.distiller import Distiller
from kdlab.losses.base import Outputs
from kdlab.losses.mgd import MGD, MGDOptions, channel_mask


def conv_loop(x, weight, bias, pad):
    """Cross-correlation of one sample x[c][h][w] (stride 1, zero padding), as nn.Conv2d computes it."""
    c_out, c_in, kh, kw = len(weight), len(weight[0]), len(weight[0][0]), len(weight[0][0][0])
    h, w = len(x[0]), len(x[0][0])
    out = []
    for o in range(c_out):
        plane = []
        for i in range(h + 2 * pad - kh + 1):
            row = []
            for j in range(w + 2 * pad - kw + 1):
                acc = bias[o]
                for c in range(c_in):
                    for a in range(kh):
                        for b in range(kw):
                            ii, jj = i + a - pad, j + b - pad
                            if 0 <= ii < h and 0 <= jj < w:
                                acc += weight[o][c][a][b] * x[c][ii][jj]
                row.append(acc)
            plane.append(row)
        out.append(plane)
    return out


def ref_mgd(fs, ft, mask, align, gen1, gen2) -> float:
    """sum over n, c, h, w of (G(align(F_s) * M) - F_t)^2, divided by N; align/gen given as (weight, bias) lists."""
    total = 0.0
    for n in range(len(fs)):
        s = conv_loop(fs[n], *align, pad=0) if align is not None else fs[n]
        s = [[[v * mask[n][c] for v in row] for row in s[c]] for c in range(len(s))]
        g = conv_loop(s, *gen1, pad=1)
        g = [[[max(v, 0.0) for v in row] for row in plane] for plane in g]
        g = conv_loop(g, *gen2, pad=1)
        for c, plane in enumerate(g):
            for i, row in enumerate(plane):
                for j, v in enumerate(row):
                    total += (v - ft[n][c][i][j]) ** 2
    return total / len(fs)


def wb(conv: nn.Conv2d):
    return conv.weight.detach().double().tolist(), conv.bias.detach().double().tolist()


class Tapped(nn.Module):
    """A model with one stage whose output the term taps."""

    def __init__(self, c):
        super().__init__()
        self.stage = nn.Conv2d(1, c, 1)
        self.fc = nn.Linear(c, 3)

    def forward(self, x):
        return self.fc(self.stage(x).mean((2, 3)))


def term(c_s=3, c_t=4, ratio=0.5, n=3, hw=4, seed=0):
    torch.manual_seed(seed)
    opts = MGDOptions(mask_ratio=ratio, student_layers=["stage"], teacher_layers=["stage"])
    t = MGD(opts, Tapped(c_s), [Tapped(c_t)])
    g = torch.Generator().manual_seed(seed + 1)
    fs = torch.randn(n, c_s, hw, hw, generator=g, dtype=torch.float64)
    ft = torch.randn(n, c_t, hw, hw, generator=g, dtype=torch.float64)
    out = Outputs(
        logits=torch.zeros(n, 3),
        targets=torch.zeros(n, dtype=torch.long),
        feats={"stage": fs},
        teacher_feats=[{"stage": ft}],
    )
    t.build(out)
    t.double()
    return t, out, fs, ft


@pytest.mark.parametrize("c_s, c_t, ratio", [(3, 4, 0.5), (4, 4, 0.15), (2, 3, 0.0)])
def test_value_matches_the_official_equations(c_s, c_t, ratio):
    t, out, fs, ft = term(c_s, c_t, ratio, seed=c_s * 10 + c_t)
    state = t.get_extra_state()
    got = t(out)
    assert got.dtype == torch.float64
    # the masks the term drew, from the same stream state
    t.set_extra_state(state)
    mask = channel_mask(fs.shape[0], c_t, ratio, t.sampler)[:, :, 0, 0].double().tolist()
    align = wb(t.align) if c_s != c_t else None
    want = ref_mgd(fs.tolist(), ft.tolist(), mask, align, wb(t.generation[0]), wb(t.generation[2]))
    assert got.item() == pytest.approx(want, rel=1e-10)


def test_align_is_a_conv1x1_only_when_the_channel_counts_differ():
    assert isinstance(term(4, 4)[0].align, nn.Identity)
    align = term(3, 5)[0].align
    assert isinstance(align, nn.Conv2d) and align.kernel_size == (1, 1) and align.bias is not None
    assert (align.in_channels, align.out_channels) == (3, 5)


def test_the_mask_zeroes_whole_channels_per_sample_at_the_given_rate():
    g = torch.Generator().manual_seed(0)
    m = channel_mask(400, 50, 0.15, g)
    assert m.shape == (400, 50, 1, 1) and set(m.unique().tolist()) <= {0.0, 1.0}
    rate = 1 - m.mean().item()
    assert abs(rate - 0.15) < 4 * math.sqrt(0.15 * 0.85 / m.numel())  # 4 standard errors
    assert channel_mask(5, 5, 0.0, g).min() == 1  # ratio 0 masks nothing


def test_the_teacher_map_gets_no_gradient_and_the_student_map_does():
    t, out, fs, ft = term()
    fs.requires_grad_(), ft.requires_grad_()
    t(out).backward()
    assert fs.grad is not None and fs.grad.abs().sum() > 0
    assert ft.grad is None


def test_a_restored_stream_draws_the_same_masks_and_a_fresh_one_does_not():
    t, out, *_ = term(ratio=0.5, n=8)
    state = t.get_extra_state()
    first, second = t(out).item(), t(out).item()
    assert first != second  # new masks every step
    t.set_extra_state(state)  # what a resumed run does with its checkpoint
    assert [t(out).item(), t(out).item()] == [first, second]


def test_ranks_mask_their_rows_of_the_global_batch(monkeypatch):
    """Two ranks of 3 samples each draw what one process of 6 samples draws, rows split by rank."""
    t, *_ = term(c_s=4, c_t=4)
    t.generation = nn.Identity()  # the loss then reads the masked map itself: sum((mask * F_s)^2) / N
    state = t.get_extra_state()
    full = channel_mask(6, 4, 0.5, t.sampler)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    # a distinct value per (sample, channel): the loss then tells which rows of the masks were used
    fs = torch.arange(1.0, 13.0, dtype=torch.float64).view(3, 4, 1, 1).expand(3, 4, 2, 2).contiguous()
    out = Outputs(
        logits=torch.zeros(3, 3),
        targets=torch.zeros(3, dtype=torch.long),
        feats={"stage": fs},
        teacher_feats=[{"stage": torch.zeros_like(fs)}],
    )
    for rank in (0, 1):
        t.set_extra_state(state)
        monkeypatch.setattr(distributed, "rank", lambda r=rank: r)
        want = (full[rank * 3 : (rank + 1) * 3, :, 0, 0].double() * fs[:, :, 0, 0] ** 2).sum().item() * 4 / 3
        assert t(out).item() == pytest.approx(want)


def test_spatial_sizes_that_differ_are_refused_at_build():
    torch.manual_seed(0)
    d = Distiller(
        Tapped(3), [Tapped(3)], LossConfig(terms={"mgd": {"student_layers": ["stage"], "teacher_layers": ["stage"]}})
    )
    d.terms["mgd"].layer_pairs = lambda out: iter([(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 2, 2))])
    with pytest.raises(Exception, match="spatial sizes differ"):
        d.terms["mgd"].build(None)


def test_train_on_digits_from_the_command_line_and_the_graph_step_is_refused(tmp_path, capsys):
    recipe = str(ROOT / "recipes" / "digits" / "mgd.yaml")
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
    assert math.isfinite(rows[-1]["train_mgd"])
    refused(
        capsys,
        ["train", recipe, "--out", str(tmp_path / "graph"), *sets("train.fast.graph_step=true")],
        "graph_step",
        "mgd",
    )
    refused(
        capsys, ["train", recipe, "--out", str(tmp_path / "bad"), *sets("loss.terms.mgd.mask_ratio=1")], "mask_ratio"
    )
