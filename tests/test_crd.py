"""CRD: the NCE loss and the scores against float64 loops from the paper's equations, the memory bank's update,
negative sampling, the fixed normalisers, and a killed run that resumes bit-identical with its bank."""

import json
import math
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import HANG_S, wait_until

from kdlab import models
from kdlab.config import LossConfig
from kdlab.distiller import Distiller
from kdlab.losses.crd import contrast_scores, nce_loss

ROOT = Path(__file__).resolve().parents[1]


def ref_nce(scores, n_data):
    """-(1/N) sum_n [log s0/(s0 + K/n) + sum_k log (K/n)/(s_k + K/n)], with RepDistiller's 1e-7."""
    rows = scores.tolist()
    k = len(rows[0]) - 1
    pn = k / n_data
    total = 0.0
    for row in rows:
        total += math.log(row[0] / (row[0] + pn + 1e-7)) + sum(math.log(pn / (s + pn + 1e-7)) for s in row[1:])
    return -total / len(rows)


def test_nce_loss_matches_the_equation():
    scores = torch.rand(5, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 3
    assert nce_loss(scores, 200).item() == pytest.approx(ref_nce(scores, 200), rel=1e-12)
    assert torch.autograd.gradcheck(lambda s: nce_loss(s, 200), (scores.clone().requires_grad_(),))


def test_scores_are_exp_dot_over_t_with_the_indexed_bank_rows():
    g = torch.Generator().manual_seed(1)
    v, bank = torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(10, 4, generator=g, dtype=torch.float64)
    idx = torch.tensor([[0, 5, 7], [1, 1, 9], [2, 3, 4]])
    got = contrast_scores(v, bank, idx, 0.07)
    for n in range(3):
        for j in range(3):
            want = math.exp(sum(bank[idx[n, j], d].item() * v[n, d].item() for d in range(4)) / 0.07)
            assert got[n, j].item() == pytest.approx(want, rel=1e-12)


def make(mode="exact", nce_k=12, n_data=40):
    torch.manual_seed(0)
    student = models.create("smallcnn", num_classes=4, in_chans=1)
    teacher = models.create("smallcnn_wide", num_classes=4, in_chans=1)
    d = Distiller(student, [teacher], LossConfig(ce=0.0, terms={"crd": {"nce_k": nce_k, "feat_dim": 8, "mode": mode}}))
    x, y = torch.randn(8, 1, 8, 8), torch.arange(8) % 4
    d.build(x, y)
    labels = torch.arange(n_data) % 4
    d.attach_training_set(labels)
    return d, labels


@pytest.mark.parametrize("mode", ["exact", "relax"])
def test_negatives_come_from_other_classes_without_replacement(mode):
    d, labels = make(mode)
    crd = d.terms["crd"]
    indices = torch.tensor([0, 5, 10, 39])
    sample = crd.sample(indices)
    assert sample.shape == (4, 1 + 12)
    for row, i in zip(sample.tolist(), indices.tolist()):
        pos, negs = row[0], row[1:]
        assert (pos == i) if mode == "exact" else (labels[pos] == labels[i])
        assert len(set(negs)) == len(negs) and all(labels[n] != labels[i] for n in negs)


def test_bank_update_and_fixed_normalisers():
    d, labels = make()
    crd = d.terms["crd"]
    old_s, old_t = crd.memory_s.clone(), crd.memory_t.clone()
    x, y, idx = torch.randn(8, 1, 8, 8), labels[torch.arange(8) * 5 % 40], torch.arange(8) * 5 % 40
    d.train()
    out = d.outputs(x, y, indices=idx)
    f_s = torch.nn.functional.normalize(crd.embed_s(out.feats["embedding"].flatten(1)), dim=1).detach()
    f_t = torch.nn.functional.normalize(crd.embed_t(out.teacher_feats[0]["embedding"].flatten(1)), dim=1).detach()
    crd(out)
    for bank, old, f in ((crd.memory_s, old_s, f_s), (crd.memory_t, old_t, f_t)):
        for row, i in enumerate(idx.tolist()):
            mixed = [0.5 * a + 0.5 * b for a, b in zip(old[i].tolist(), f[row].tolist())]
            norm = math.sqrt(sum(v * v for v in mixed))
            assert bank[i].tolist() == pytest.approx([v / norm for v in mixed], rel=1e-5, abs=1e-6)
        untouched = sorted(set(range(40)) - set(idx.tolist()))
        assert torch.equal(bank[untouched], old[untouched])
    z = (crd.z_s.item(), crd.z_t.item())
    assert z[0] > 0 and z[1] > 0
    crd(d.outputs(torch.randn(8, 1, 8, 8), y, indices=idx))
    assert (crd.z_s.item(), crd.z_t.item()) == z  # fixed by the first batch
    state = d.state_dict()
    assert {"terms.crd.memory_s", "terms.crd.memory_t", "terms.crd.z_s", "terms.crd.z_t"} <= set(state)


def test_crd_without_indices_or_bank_is_a_clear_error():
    from kdlab.errors import ConfigError, LayerError

    d, _ = make()
    with pytest.raises(LayerError, match="index"):
        d(torch.randn(8, 1, 8, 8), torch.arange(8) % 4)
    with pytest.raises(ConfigError, match="nce_k"):
        make(nce_k=31)  # 40 samples, 10 per class: 30 negatives at most


def _kdlab(*args):
    return subprocess.Popen(
        [sys.executable, "-m", "kdlab", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
    )


def test_killed_crd_run_resumes_bit_identical_with_its_bank(tmp_path):
    from kdlab import checkpoint

    args = [
        "train",
        "recipes/digits/crd.yaml",
        "--set",
        "train.epochs=4",
        "--set",
        "train.max_steps_per_epoch=5",
        "--set",
        "loss.terms.crd.nce_k=256",
        "--set",
        f"cache_dir={tmp_path / 'cache'}",
        "--quiet",
    ]
    ref = _kdlab(*args, "--out", str(tmp_path / "ref"))
    assert ref.wait(timeout=HANG_S) == 0, ref.stdout.read().decode()
    run = tmp_path / "killed"
    proc = _kdlab(*args, "--out", str(run))
    metrics = run / "metrics.jsonl"
    # the kill is decided by what the run wrote: the second epoch's row (its checkpoint is being written)
    wait_until(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 2, proc, "epoch 2's row")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = _kdlab("train", "--resume", str(run), "--quiet")
    assert resumed.wait(timeout=HANG_S) == 0, resumed.stdout.read().decode()
    a, b = checkpoint.load(tmp_path / "ref" / "student.safetensors")[0], checkpoint.load(run / "student.safetensors")[0]
    assert all(torch.equal(a[k], b[k]) for k in a)
    banks = [checkpoint.load(p / "checkpoints" / "last.safetensors")[0] for p in (tmp_path / "ref", run)]
    for key in ("model.terms.crd.memory_s", "model.terms.crd.memory_t", "model.terms.crd.z_s"):
        assert torch.equal(banks[0][key], banks[1][key]), key
    assert json.loads((run / "result.json").read_text())["epochs"] == 4
