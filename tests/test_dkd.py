"""DKD against a float64 loop written from the paper's equations, its warm-up, and its place in the contract."""

import math

import pytest
import torch

from kdlab.errors import LayerError
from kdlab.losses.dkd import dkd, warmup_factor


def softmax(row, T):
    m = max(v / T for v in row)
    e = [math.exp(v / T - m) for v in row]
    return [v / sum(e) for v in e]


def kl(p, q):
    return sum(a * (math.log(a) - math.log(b)) for a, b in zip(p, q) if a > 0)


def ref_dkd(zs, zt, y, alpha, beta, T):
    """TCKD on [p_y, 1 - p_y], NCKD on the softmax of the non-target logits alone; T^2-scaled batch means."""
    tckd = nckd = 0.0
    for s, t, c in zip(zs.tolist(), zt.tolist(), y.tolist()):
        ps, pt = softmax(s, T), softmax(t, T)
        tckd += kl([pt[c], 1 - pt[c]], [ps[c], 1 - ps[c]])
        others = [k for k in range(len(s)) if k != c]
        nckd += kl(softmax([t[k] for k in others], T), softmax([s[k] for k in others], T))
    n = len(y)
    return T * T * (alpha * tckd / n + beta * nckd / n)


@pytest.mark.parametrize("alpha, beta, T", [(1.0, 8.0, 4.0), (0.5, 2.0, 1.0), (2.0, 0.0, 7.5)])
def test_dkd_matches_the_equations(alpha, beta, T):
    g = torch.Generator().manual_seed(1)
    zs, zt = (
        3 * torch.randn(6, 5, generator=g, dtype=torch.float64),
        3 * torch.randn(6, 5, generator=g, dtype=torch.float64),
    )
    y = torch.tensor([0, 4, 2, 2, 1, 3])
    assert dkd(zs, zt, y, alpha, beta, T).item() == pytest.approx(
        ref_dkd(zs, zt, y, alpha, beta, T), rel=1e-10, abs=1e-13
    )


def test_dkd_with_alpha_beta_one_is_not_kd_but_both_vanish_at_equality():
    zs = torch.randn(4, 6, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3])
    assert dkd(zs, zs.clone(), y).abs().item() < 1e-12


def test_dkd_gradcheck():
    zs = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    zt = torch.randn(3, 4, dtype=torch.float64)
    y = torch.tensor([1, 0, 3])
    assert torch.autograd.gradcheck(lambda s: dkd(s, zt, y, 1.0, 8.0, 4.0), (zs,))


def test_warmup_is_mdistillers_one_based_epoch_ramp():
    assert warmup_factor(0.0, 20) == pytest.approx(1 / 20)  # all of the first epoch
    assert warmup_factor(0.99, 20) == pytest.approx(1 / 20)
    assert warmup_factor(1.0, 20) == pytest.approx(2 / 20)
    assert warmup_factor(19.5, 20) == 1.0 and warmup_factor(200.0, 20) == 1.0
    assert warmup_factor(torch.tensor(3.25), 20).item() == pytest.approx(4 / 20)
    assert warmup_factor(5.0, 0) == 1.0


def test_term_scales_by_the_warmup_and_needs_the_progress():
    from kdlab import models
    from kdlab.config import LossConfig
    from kdlab.distiller import Distiller

    torch.manual_seed(0)
    student, teacher = (
        models.create("smallcnn", num_classes=10, in_chans=1),
        models.create("smallcnn_wide", num_classes=10, in_chans=1),
    )
    d = Distiller(student, [teacher], LossConfig(ce=0.0, terms={"dkd": {"warmup_epochs": 4}}))
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    d.build(x, y)
    d.eval()
    with torch.no_grad():
        full = dkd(d.student(x), teacher(x), y).item()
        assert d(x, y, progress=1.5)[2]["dkd"].item() == pytest.approx(full * 2 / 4, rel=1e-5)
        assert d(x, y, progress=torch.tensor(7.0))[2]["dkd"].item() == pytest.approx(full, rel=1e-5)
        with pytest.raises(LayerError, match="progress"):
            d(x, y)


def test_fit_gives_terms_the_progress_and_each_samples_index(tmp_path):
    """What the trainer passes: epochs completed at each step, and indices that name the batch's samples."""
    from kdlab import models
    from kdlab.config import LossConfig, TrainConfig
    from kdlab.data import DeviceLoader, load_dataset
    from kdlab.distiller import Distiller
    from kdlab.losses.base import TERMS, Term
    from kdlab.train import fit

    seen = []

    class Probe(Term):
        name = "probe_progress"
        needs_teacher = False
        needs_progress = True
        needs_indices = True

        def forward(self, out):
            seen.append((float(out.progress), out.indices.clone(), out.targets.clone()))
            return out.logits.sum() * 0.0

    TERMS[Probe.name] = Probe
    try:
        train = load_dataset("digits", split="train")
        student = models.create("smallcnn", num_classes=10, in_chans=1)
        d = Distiller(student, [], LossConfig(ce=1.0, terms={"probe_progress": {}}))
        loader = DeviceLoader(train, 16, train=True, seed=0)
        x, y = next(iter(loader))
        d.build(x[:4], y[:4])
        cfg = TrainConfig(epochs=2, batch_size=16, max_steps_per_epoch=3, lr=0.01, eval_every=100)
        fit(d, loader, None, cfg, tmp_path, lambda msg: None)
    finally:
        del TERMS[Probe.name]
    assert [p for p, _, _ in seen] == pytest.approx([0, 1 / 3, 2 / 3, 1, 4 / 3, 5 / 3])
    for _, idx, y in seen:
        assert idx.dtype == torch.int64 and len(set(idx.tolist())) == len(idx)
        assert torch.equal(train.labels[idx], y)
