"""Non-finite losses: a NaN or Inf term stops the run with one line naming the epoch, step, term and
value (or, with train.nonfinite=skip, the step is skipped), the remedies offered are only those that
apply, and a pre-stage whose loss diverges stops inside its stage; train.grad_clip bounds a step.
"""

from __future__ import annotations

import json
import math
import uuid
from pathlib import Path

import pytest
import torch
from helpers import ok, refused, sets, weights
from pydantic import ConfigDict

from kdlab import checkpoint
from kdlab.config import TrainConfig
from kdlab.losses import TERMS, Term, TermOptions

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "recipes" / "digits"
VANILLA = str(ROOT / "recipes" / "digits" / "vanilla.yaml")
QUICK = ["--set", "train.epochs=3", "--set", "train.max_steps_per_epoch=2", "--quiet"]
QUICK2 = ["--set", "train.epochs=2", "--set", "train.max_steps_per_epoch=2", "--quiet"]  # two epochs
TINY = ["--set", "train.epochs=1", "--set", "train.max_steps_per_epoch=1", "--quiet"]

# ----------------------------------------------------------------------------------------------
# A NaN / Inf loss term stops the run, or its step is skipped


class _Poison(Term):
    """Test-only term: 0 on every training call but one, where it returns `value` (NaN, Inf)."""

    needs_teacher = False

    class Options(TermOptions):
        # real terms refuse NaN/inf options; this one exists to inject them
        model_config = ConfigDict(allow_inf_nan=True)
        at_call: int = 0
        value: float = math.nan

    def __init__(self, opts, student, teachers):
        super().__init__(opts, student, teachers)
        self.calls = 0

    def forward(self, out):
        zero = out.logits.float().sum() * 0.0
        if self.training:
            self.calls += 1
            if self.calls - 1 == self.opts.at_call:
                return zero + self.opts.value
        return zero


@pytest.fixture
def poison(monkeypatch):
    name = f"poison_{uuid.uuid4().hex[:8]}"
    cls = type("Poison", (_Poison,), {"name": name})
    monkeypatch.setitem(TERMS, name, cls)
    yield name
    assert name in TERMS  # monkeypatch removes it after the test


@pytest.mark.parametrize("value, call, epoch, step", [(".nan", 4, 3, 0), (".inf", 3, 2, 1), ("-.inf", 0, 1, 0)])
def test_nonfinite_term_stops_with_epoch_step_term_and_value(poison, tmp_path, capsys, value, call, epoch, step):
    out = tmp_path / "run"
    line = refused(
        capsys,
        [
            "train",
            VANILLA,
            "--out",
            str(out),
            *QUICK,
            *sets(f"loss.terms.{poison}={{at_call: {call}, value: {value}}}"),
        ],
        f"epoch {epoch} step {step}",
        f"term {poison}",
        f"{poison}={value.replace('.', '')}",
    )
    last = out / "checkpoints" / "last.safetensors"
    if epoch == 1:  # no checkpoint to name: the message must not point at one
        assert not last.exists() and "nothing was checkpointed" in line and "last good checkpoint" not in line
    else:
        assert f"last good checkpoint (epoch {epoch - 1}) is kept in {last}" in line
        assert checkpoint.load(last)[1]["epoch"] == epoch - 1  # the previous epoch's, untouched
    assert not (out / "result.json").exists()


def test_nonfinite_skip_skips_the_step_and_finishes(poison, tmp_path, capsys):
    out = tmp_path / "run"
    ok(
        capsys,
        [
            "train",
            VANILLA,
            "--out",
            str(out),
            *QUICK,
            *sets(f"loss.terms.{poison}={{at_call: 4}}", "train.nonfinite=skip"),
        ],
    )
    log = (out / "log.txt").read_text()
    assert "epoch 3 step 0: non-finite loss, step skipped" in log and f"{poison}=nan" in log
    assert all(torch.isfinite(t).all() for t in weights(out / "student.safetensors").values())
    assert json.loads((out / "result.json").read_text())["epochs"] == 3


class _NaN(Term):
    needs_teacher = False

    class Options(TermOptions):
        model_config = ConfigDict(allow_inf_nan=True)

    def forward(self, out):
        return out.logits.float().sum() * math.nan


@pytest.fixture
def nan_term(monkeypatch):
    name = f"nan_{uuid.uuid4().hex[:8]}"
    monkeypatch.setitem(TERMS, name, type("NaNTerm", (_NaN,), {"name": name}))
    return name


def test_nan_at_the_first_step_names_no_missing_file_and_the_rerun_works(tmp_path, capsys, nan_term):
    out = tmp_path / "run"
    line = refused(
        capsys,
        ["train", VANILLA, "--out", str(out), *QUICK2, *sets(f"loss.terms.{nan_term}={{}}")],
        "epoch 1 step 0",
        "nothing was checkpointed",
        "train.grad_clip",
        "same --out",
    )
    assert "last good checkpoint" not in line and "checkpoints" not in line
    ok(capsys, ["train", VANILLA, "--out", str(out), *QUICK2])
    assert (out / "result.json").exists()


def test_nan_remedies_are_only_those_that_apply():
    from kdlab.train import nonfinite_remedies

    plain = nonfinite_remedies(TrainConfig())
    assert "train.grad_clip (e.g." in plain and "train.nonfinite=skip" in plain and "lower train.lr (now 0.05)" in plain
    clipped = nonfinite_remedies(TrainConfig(grad_clip=2.0))
    assert "a smaller train.grad_clip (now 2)" in clipped
    graph = nonfinite_remedies(TrainConfig.model_validate({"fast": {"graph_step": True}}))
    assert "nonfinite=skip" not in graph  # graph_step refuses skip


# ----------------------------------------------------------------------------------------------
# A pre-stage whose loss turns non-finite stops at once


def test_diverging_paraphraser_stops_in_its_stage_and_saves_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    line = refused(
        capsys,
        [
            "train",
            str(DIGITS / "ft.yaml"),
            "--out",
            str(out),
            *QUICK2,
            *sets("loss.terms.ft.paraphraser_lr=1e30", "loss.terms.ft.paraphraser_epochs=3"),
        ],
        "non-finite loss in stage ft_paraphraser0 at epoch 1",
        "loss.terms.ft.paraphraser_lr",
    )
    assert "epoch 1 step" in line
    assert not (out / "stages" / "ft_paraphraser0.safetensors").exists()
    log = (out / "log.txt").read_text()
    assert "stage ft_paraphraser0: epoch" not in log  # stopped within its first epoch


# ----------------------------------------------------------------------------------------------
# Gradient clipping


@pytest.mark.parametrize("clip", [0.5, None])
def test_grad_clip_bounds_the_step(tmp_path, capsys, clip):
    """One plain SGD step (no momentum, no decay) on a loss scaled by 1e6: |dtheta| = lr * clip exactly."""
    out, lr = tmp_path / "run", 0.1
    extra = [
        "loss.ce=1e6",
        f"train.lr={lr}",
        "train.momentum=0",
        "train.weight_decay=0",
        "train.schedule.type=constant",
        "train.keep_epochs=[0]",
    ] + ([f"train.grad_clip={clip}"] if clip else [])
    ok(capsys, ["train", VANILLA, "--out", str(out), *TINY, *sets(*extra)])
    before, after = weights(out / "checkpoints" / "epoch_0.safetensors"), weights(out / "student.safetensors")
    from kdlab import models

    params = [n for n, _ in models.create("smallcnn", num_classes=10, in_chans=1).named_parameters()]
    step = math.sqrt(sum(float((after[n].double() - before[n].double()).pow(2).sum()) for n in params))
    if clip:
        assert step == pytest.approx(lr * clip, rel=1e-3)
    else:
        assert step > 100 * lr * 0.5  # control: unclipped, the same step is huge
