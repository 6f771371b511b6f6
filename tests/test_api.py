"""kdlab.api.Distill on a user's own models: layers named by module, a dataset or a torch DataLoader, bad
input refused naming the problem, timm models and their feature_info, a term that is exactly 0 warns;
and the examples built on it (examples/byom.py, examples/timm_kd.py) run.
"""

from __future__ import annotations

import math
import runpy
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from kdlab.data import load_dataset
from kdlab.errors import ConfigError, DataError, LayerError

ROOT = Path(__file__).resolve().parents[1]


class Tiny(nn.Module):
    """A user's network: no kdlab attributes, layers found by module name only."""

    def __init__(self, width: int):
        super().__init__()
        self.block1 = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.block2 = nn.Sequential(
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU()
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, 10))

    def forward(self, x):
        return self.head(self.block2(self.block1(x)))


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", split="train"), load_dataset("digits", split="test")


def naive_top1(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, mean, std) -> float:
    """Top-1 in % with an explicit per-channel normalisation and one sample at a time."""
    model.eval()
    correct = 0
    with torch.no_grad():
        for img, label in zip(images, labels):
            x = img.double() / 255.0
            for c in range(x.shape[0]):
                x[c] = (x[c] - mean[c]) / std[c]
            correct += int(model(x[None].float()).argmax(1).item() == label.item())
    return 100.0 * correct / len(labels)


def test_api_distils_a_user_model_with_layers_named_by_module(digits):
    from kdlab.api import Distill

    train, test = digits
    torch.manual_seed(0)
    teacher, student = Tiny(16), Tiny(4)
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in student.state_dict().items()}
    d = Distill(
        student,
        [teacher],
        ce=0.1,
        terms={
            "kd": {"weight": 0.9, "T": 4},
            "at": {"student_layers": ["block1", "block2"], "teacher_layers": ["block1", "block2"]},
            "fitnet": {"stages": "single", "student_layers": ["block2"], "teacher_layers": ["block2"]},
        },
    )
    history = d.fit(
        (train.images, train.labels), epochs=2, lr=0.05, test_data=(test.images, test.labels), max_steps_per_epoch=3
    )
    assert [h["epoch"] for h in history] == [1, 2]
    for key in ("train_ce", "train_kd", "train_at", "train_fitnet", "test_top1"):
        assert all(key in h and math.isfinite(h[key]) for h in history), key
    assert d.student is student and set(student.state_dict()) == set(student_before)  # nothing attached
    assert any(not torch.equal(student.state_dict()[k], v) for k, v in student_before.items())
    assert all(torch.equal(teacher.state_dict()[k], v) for k, v in teacher_before.items())  # frozen, BN stats too
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    # a pair is normalised with its own training set's statistics; the test pair with the same ones
    from kdlab.data import channel_stats

    mean, std = channel_stats(train.images)
    want = naive_top1(student, test.images, test.labels, mean, std)
    assert d.evaluate((test.images, test.labels))["top1"] == pytest.approx(want)
    assert history[-1]["test_top1"] == pytest.approx(want)


def test_api_learns_from_a_dataset_and_takes_a_torch_dataloader(digits, tmp_path):
    from kdlab.api import Distill

    train, test = digits
    torch.manual_seed(0)
    d = Distill(Tiny(8))
    d.fit(train, epochs=3, lr=0.1, test_data=test, run_dir=tmp_path / "run")
    assert d.evaluate(test)["top1"] > 20  # chance is 10 (28.3 when written, deterministic on CPU)
    assert (tmp_path / "run" / "metrics.jsonl").exists() and (
        tmp_path / "run" / "checkpoints" / "last.safetensors"
    ).exists()

    class Sampler(torch.utils.data.Sampler):
        def __init__(self, n):
            self.n, self.epochs = n, []

        def set_epoch(self, epoch):
            self.epochs.append(epoch)

        def __iter__(self):
            return iter(range(self.n))

        def __len__(self):
            return self.n

    x = (train.images[:96].float() / 255 - 0.5) / 0.25
    ds = torch.utils.data.TensorDataset(x, train.labels[:96])
    sampler = Sampler(96)
    loader = torch.utils.data.DataLoader(ds, batch_size=32, sampler=sampler)
    student = Tiny(4)
    history = Distill(student, d.student, terms={"kd": {"T": 2}}).fit(loader, epochs=2, test_data=loader)
    assert (
        sampler.epochs[:2] == [0, 1] and len(history) == 2 and "test_top1" in history[-1] and "train_kd" in history[-1]
    )
    assert "test_top1" not in Distill(Tiny(4)).fit(loader, epochs=1)[-1]  # no test data: no evaluation


def test_api_refuses_bad_input_naming_the_problem(digits):
    from kdlab.api import Distill

    train, _ = digits
    with pytest.raises(ConfigError, match="unknown loss term 'kdd'"):
        Distill(Tiny(4), [Tiny(8)], terms={"kdd": {}})
    with pytest.raises(ConfigError, match="T"):
        Distill(Tiny(4), [Tiny(8)], terms={"kd": {"T": -1}})
    with pytest.raises(LayerError, match="block3.*did you mean block"):
        Distill(Tiny(4), [Tiny(8)], terms={"at": {"student_layers": ["block3"], "teacher_layers": ["block1"]}})
    with pytest.raises(LayerError, match="no feature_info"):
        Distill(Tiny(4), [Tiny(8)], terms={"at": {}})  # a user model has no stage aliases: name the layers
    with pytest.raises(DataError, match="uint8"):
        Distill(Tiny(4)).fit((train.images.float(), train.labels))
    with pytest.raises(DataError, match="student outputs 10 classes"):
        Distill(Tiny(4)).fit((train.images, train.labels + 5), max_steps_per_epoch=1)
    with pytest.raises(ConfigError, match="epochs"):
        Distill(Tiny(4)).fit(train, epochs=0)


# ----------------------------------------------------------------------------------------------
# A term that is exactly 0 all epoch warns once


class _OneByOne(nn.Module):
    """Its tapped map `squeeze` is 1x1: its normalised attention map is 1 whatever the input."""

    def __init__(self, width: int):
        super().__init__()
        self.conv = nn.Conv2d(1, width, 3, padding=1)
        self.squeeze = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.ReLU())
        self.fc = nn.Linear(width, 10)

    def forward(self, x):
        return self.fc(self.squeeze(self.conv(x)).flatten(1))


def test_a_term_that_is_exactly_zero_all_epoch_warns_once():
    from kdlab.api import Distill
    from kdlab.data import load_dataset

    train = load_dataset("digits", split="train")
    torch.manual_seed(0)
    d = Distill(
        _OneByOne(4), _OneByOne(8), terms={"at": {"student_layers": ["squeeze"], "teacher_layers": ["squeeze"]}}
    )
    with pytest.warns(UserWarning, match="loss term at was exactly 0") as caught:
        d.fit(train, epochs=2, max_steps_per_epoch=2)
    assert len([w for w in caught if "exactly 0" in str(w.message)]) == 1


def test_a_term_with_a_value_does_not_warn(recwarn):
    from kdlab.api import Distill
    from kdlab.data import load_dataset

    train = load_dataset("digits", split="train")
    Distill(_OneByOne(4), _OneByOne(8), terms={"at": {"student_layers": ["conv"], "teacher_layers": ["conv"]}}).fit(
        train, epochs=1, max_steps_per_epoch=2
    )
    assert not [w for w in recwarn if "exactly 0" in str(w.message)]


# ----------------------------------------------------------------------------------------------
# timm: feature_info names the default layers


def test_api_model_with_timm_style_feature_info_is_tapped_by_module_name(digits):
    """timm's models carry feature_info entries without kdlab's 'name': they must not break the taps."""
    from kdlab.api import Distill

    train, _ = digits
    teacher, student = Tiny(8), Tiny(4)
    for m in (teacher, student):
        m.feature_info = [dict(num_chs=8, reduction=1, module="block1"), dict(num_chs=16, reduction=2, module="block2")]
    d = Distill(student, teacher, terms={"nst": {"student_layers": ["block2"], "teacher_layers": ["block2"]}})
    assert "train_nst" in d.fit(train, epochs=1, max_steps_per_epoch=1)[-1]


class _TimmLike(nn.Module):
    """timm's layout: feature_info entries with 'module', 'num_chs' and 'reduction', no 'name'."""

    def __init__(self, width: int):
        super().__init__()
        self.layer1 = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.layer2 = nn.Sequential(
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU()
        )
        self.fc = nn.Linear(2 * width, 10)
        self.feature_info = [
            dict(num_chs=width, reduction=1, module="layer1"),
            dict(num_chs=2 * width, reduction=2, module="layer2"),
        ]

    def forward(self, x):
        return self.fc(self.layer2(self.layer1(x)).mean((2, 3)))


def test_terms_take_their_default_layers_from_timm_feature_info():
    from kdlab.api import Distill
    from kdlab.data import load_dataset

    train = load_dataset("digits", split="train")
    d = Distill(_TimmLike(4), _TimmLike(8), terms={"nst": {}, "feed": {}})
    assert d.distiller.terms["nst"].student_layers == ["layer1", "layer2"]
    assert d.distiller.terms["feed"].teacher_layers == [["layer2"]]
    assert "train_nst" in d.fit(train, epochs=1, max_steps_per_epoch=1)[-1]


def timm_or_skip():
    """timm, or a skip: absent, or present but unusable (PyPI's torchvision next to a CPU torch fails to
    load with a RuntimeError, not an ImportError; docs/api.md)."""
    try:
        import timm
    except Exception as e:
        pytest.skip(f"timm cannot be imported here ({type(e).__name__}: {str(e)[:80]})")
    return timm


def test_api_with_timm_models():
    timm = timm_or_skip()
    from kdlab.api import Distill

    train = load_dataset("digits", split="train")
    teacher = timm.create_model("resnet18", pretrained=False, num_classes=10, in_chans=1)
    student = timm.create_model("resnet10t", pretrained=False, num_classes=10, in_chans=1)
    # no layers named: nst takes every map timm's feature_info lists
    d = Distill(student, teacher, ce=0.1, terms={"kd": {"weight": 0.9}, "nst": {}})
    assert d.distiller.terms["nst"].student_layers == [f["module"] for f in student.feature_info]
    history = d.fit(train, epochs=1, max_steps_per_epoch=1, batch_size=16)
    assert "train_nst" in history[-1] and math.isfinite(history[-1]["train_loss"])


# ----------------------------------------------------------------------------------------------
# The examples


def test_example_byom_runs(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["byom.py", "--epochs", "1", "--max-steps", "2"])
    runpy.run_path(str(ROOT / "examples" / "byom.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "student with KD + AT" in out and "student parameters" in out


@pytest.mark.slow
def test_example_byom_shows_distillation_helping(capsys):
    import runpy

    scores = runpy.run_path(str(ROOT / "examples" / "byom.py"), run_name="byom")["main"]([])
    # measured 78.6 -> 88.3 (seed 0); the example's docstring states it
    assert scores["student with KD + AT"] > scores["student alone"] + 5, scores


def test_example_timm_runs(monkeypatch, capsys):
    timm_or_skip()
    monkeypatch.setattr(sys, "argv", ["timm_kd.py", "--epochs", "1", "--max-steps", "1"])
    runpy.run_path(str(ROOT / "examples" / "timm_kd.py"), run_name="__main__")
    assert "test top-1" in capsys.readouterr().out
