"""ReviewKD: the hierarchical context loss against a float64 loop, the fusion's wiring, and the warm-up."""

import pytest
import torch

from kdlab import models
from kdlab.config import LossConfig
from kdlab.distiller import Distiller
from kdlab.losses.reviewkd import hcl


def pooled(x, level):
    """Adaptive average pooling to level x level for sizes divisible by level, written out."""
    n, c, h, w = x.shape
    out = torch.zeros(n, c, level, level, dtype=x.dtype)
    sh, sw = h // level, w // level
    for i in range(level):
        for j in range(level):
            out[:, :, i, j] = x[:, :, i * sh : (i + 1) * sh, j * sw : (j + 1) * sw].mean(dim=(2, 3))
    return out


def mse(a, b):
    return sum((x - y) ** 2 for x, y in zip(a.flatten().tolist(), b.flatten().tolist())) / a.numel()


def ref_hcl(pairs):
    total = 0.0
    for fs, ft in pairs:
        loss, weight, norm = mse(fs, ft), 1.0, 1.0
        for level in (4, 2, 1):
            if level >= fs.shape[2]:
                continue
            weight /= 2
            loss += weight * mse(pooled(fs, level), pooled(ft, level))
            norm += weight
        total += loss / norm
    return total


def test_hcl_matches_the_equation():
    g = torch.Generator().manual_seed(0)
    sizes = [(2, 3, 8, 8), (2, 4, 4, 4), (2, 5, 2, 2), (2, 6, 1, 1)]
    pairs = [
        (torch.randn(s, generator=g, dtype=torch.float64), torch.randn(s, generator=g, dtype=torch.float64))
        for s in sizes
    ]
    got = hcl([a for a, _ in pairs], [b for _, b in pairs])
    assert got.item() == pytest.approx(ref_hcl(pairs), rel=1e-6)


def make(warmup=4.0):
    torch.manual_seed(0)
    student, teacher = models.create("resnet8", num_classes=10), models.create("resnet20", num_classes=10)
    d = Distiller(student, [teacher], LossConfig(ce=0.0, terms={"reviewkd": {"warmup_epochs": warmup}}))
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    d.build(x, y)
    return d, x, y


def test_fuses_every_stage_and_the_embedding_onto_the_teachers_pre_activations():
    d, x, y = make()
    term = d.terms["reviewkd"]
    assert term.student_layers == ["stage1", "stage2", "stage3", "embedding"]
    assert term.teacher_layers == [["stage1:pre", "stage2:pre", "stage3:pre", "embedding"]]
    assert [a.att is not None for a in term.abfs] == [False, True, True, True]  # the deepest has nothing to fuse
    out = d.outputs(x, y, progress=10.0)
    s = [term.as_map(out.feats[k]) for k in term.student_layers][::-1]
    fused, deeper = [], None
    for xs, abf, size in zip(s, term.abfs, term.out_sizes):
        yy, deeper = abf(xs, deeper, size)
        fused.insert(0, yy)
    teacher = [term.as_map(out.teacher_feats[0][k]) for k in term.teacher_layers[0]]
    assert [f.shape for f in fused] == [t.shape for t in teacher]


def test_warmup_scales_the_term_and_needs_progress():
    from kdlab.errors import LayerError

    d, x, y = make(warmup=4.0)
    d.eval()
    with torch.no_grad():
        half = d(x, y, progress=1.0)[2]["reviewkd"].item()
        full = d(x, y, progress=9.0)[2]["reviewkd"].item()
        assert half == pytest.approx(full * 2 / 4, rel=1e-5)
        with pytest.raises(LayerError, match="progress"):
            d(x, y)
