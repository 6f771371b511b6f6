"""Learning-rate schedules and weight-decay groups against values worked out by hand."""

import math

import pytest

from kdlab.config import TrainConfig
from kdlab.models import create
from kdlab.optim import lr_at, param_groups


def cfg(**kw):
    return TrainConfig.model_validate(kw)


def test_multistep_published_240_epoch_protocol():
    c = cfg(lr=0.05, epochs=240, schedule={"type": "multistep", "milestones": [150, 180, 210], "gamma": 0.1})
    for epoch, expected in [
        (0, 0.05),
        (149.99, 0.05),
        (150, 0.005),
        (179.5, 0.005),
        (180, 0.0005),
        (210, 0.00005),
        (239.9, 0.00005),
    ]:
        assert lr_at(c, epoch) == pytest.approx(expected)


def test_teacher_free_protocol_warmup_then_x02_steps():
    c = cfg(
        lr=0.1,
        epochs=200,
        schedule={"type": "multistep", "milestones": [60, 120, 160], "gamma": 0.2, "warmup_epochs": 1},
    )
    assert lr_at(c, 0.0) == 0.0
    assert lr_at(c, 0.25) == pytest.approx(0.025)  # linear, per iteration, from 0
    assert lr_at(c, 1.0) == pytest.approx(0.1)
    assert lr_at(c, 60) == pytest.approx(0.02)
    assert lr_at(c, 125) == pytest.approx(0.004)
    assert lr_at(c, 199) == pytest.approx(0.0008)


def test_step_and_cosine():
    c = cfg(lr=0.1, epochs=90, schedule={"type": "step", "step_size": 30, "gamma": 0.1})
    assert [round(lr_at(c, e), 6) for e in (0, 29, 30, 60, 89)] == [0.1, 0.1, 0.01, 0.001, 0.001]
    c = cfg(lr=0.2, epochs=10, schedule={"type": "cosine", "min_lr": 0.0})
    for e in (0, 2.5, 5, 10):
        assert lr_at(c, e) == pytest.approx(0.1 * (1 + math.cos(math.pi * e / 10)))


def test_decay_groups_exclude_norm_and_bias_when_asked():
    model = create("resnet8", num_classes=10)
    decayed = param_groups(model, cfg(weight_decay=5e-4))
    assert len(decayed) == 1 and decayed[0]["weight_decay"] == 5e-4
    split = param_groups(model, cfg(weight_decay=5e-4, decay_norm_and_bias=False))
    assert split[0]["weight_decay"] == 5e-4 and split[1]["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in split[0]["params"]) and all(p.ndim == 1 for p in split[1]["params"])
    assert sum(p.numel() for g in split for p in g["params"]) == sum(p.numel() for p in model.parameters())
