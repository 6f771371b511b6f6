"""OFD's teacher_mode: the teacher in train mode (BatchNorm on batch statistics), as the official OFD code and
mdistiller run it, and the fast paths that assume an eval-mode teacher turned off for it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kdlab import models
from kdlab.config import LossConfig, TrainConfig
from kdlab.distiller import Distiller
from kdlab.errors import ConfigError
from kdlab.fast.teachers import prepare_teachers


def pair():
    torch.manual_seed(0)
    return models.create("smallcnn", num_classes=10, in_chans=1), models.create(
        "smallcnn_wide", num_classes=10, in_chans=1
    )


def running(model: nn.Module) -> list[torch.Tensor]:
    return [b.clone() for n, b in model.named_buffers() if n.endswith(("running_mean", "running_var"))]


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_teacher_mode_sets_batchnorm_statistics(mode):
    student, teacher = pair()
    d = Distiller(student, [teacher], LossConfig(ce=1.0, terms={"ofd": {"teacher_mode": mode}}))
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    before = running(teacher)
    d.build(x, y)  # the probe never moves the teacher's running statistics
    assert all(torch.equal(a, b) for a, b in zip(before, running(teacher)))
    d.train()
    assert teacher.training is (mode == "train") and student.training
    assert not any(p.requires_grad for p in teacher.parameters())
    out = d.outputs(x, y)
    # the teacher's map: a batch-statistics forward (train) or a running-statistics one (eval), computed apart
    ref = models.create("smallcnn_wide", num_classes=10, in_chans=1)
    ref.load_state_dict({k: v for k, v in zip(teacher.state_dict(), [*before_state(teacher, before)])})
    ref.train(mode == "train")
    with torch.no_grad():
        expected = ref(x)
    torch.testing.assert_close(out.teacher_logits[0], expected)
    moved = not all(torch.equal(a, b) for a, b in zip(before, running(teacher)))
    assert moved is (mode == "train")
    d.eval()
    assert not teacher.training


def before_state(teacher: nn.Module, before: list[torch.Tensor]):
    """The teacher's state as it was before the forward: its running statistics put back."""
    it = iter(before)
    for name, value in teacher.state_dict().items():
        yield next(it) if name.endswith(("running_mean", "running_var")) else value.clone()


def test_train_mode_teacher_is_not_folded_and_not_cached():
    student, teacher = pair()
    d = Distiller(student, [teacher], LossConfig(ce=1.0, terms={"ofd": {"teacher_mode": "train"}}))
    d.build(torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,)))
    said = []

    class Loader:
        device = torch.device("cpu")
        batch_size = 4

    ds = type("DS", (), {"images": torch.zeros(4, 1, 8, 8, dtype=torch.uint8)})()
    assert prepare_teachers(d, ds, Loader(), TrainConfig(), None, None, said.append) is None
    assert any(isinstance(m, nn.BatchNorm2d) for m in teacher.modules())  # nothing folded
    assert "fold_teacher not applied" in said[0]
    with pytest.raises(ConfigError, match="teacher_cache.*train mode"):
        prepare_teachers(d, ds, Loader(), TrainConfig(teacher_cache=True), None, None, said.append)
