"""Teachers: the reference implementations' checkpoints load, a given teacher is evaluated before the student
trains, and `checkpoint: best` teaches with the weights of the epoch of highest test top-1."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import ENV, HANG_S, ok, read_until
from torch import nn

from kdlab import checkpoint, models, pipeline
from kdlab.config import teacher_train_config
from kdlab.errors import CheckpointError
from kdlab.recipe_files import load_recipe, validate
from kdlab.student import Log, load_data
from kdlab.teachers import (
    load_model_weights,
    prepare_teacher,
    teacher_key,
    teacher_run_dir,
    teacher_seed,
    trained_teachers,
)
from kdlab.train import evaluate

DIGITS = Path(__file__).resolve().parents[1] / "kdlab" / "recipes" / "digits"
KD = str(Path(__file__).resolve().parents[1] / "recipes" / "digits" / "kd.yaml")
QUICK = ["--set", "train.epochs=2", "--set", "train.max_steps_per_epoch=2", "--quiet"]


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------------------------- reference layout
# How the reference implementations name the parameters of the same networks (RepDistiller models/*.py; mdistiller
# ships copies of them), written from their module definitions, independently of kdlab.models.reference_keys.


def _vgg_reference(key: str) -> str:
    # models/vgg.py: block{b} = Sequential(conv, BN, ReLU, conv, BN, ReLU, ..., conv, BN) (the last ReLU dropped)
    m = re.match(r"^block(\d)\.(conv|bn)(\d)\.(.+)$", key)
    if m:
        b, kind, k, rest = m.groups()
        return f"block{b}.{3 * (int(k) - 1) + (0 if kind == 'conv' else 1)}.{rest}"
    return key.replace("fc.", "classifier.", 1) if key.startswith("fc.") else key


def _wrn_reference(key: str) -> str:
    # models/wrn.py: block{g} = NetworkBlock(layer=Sequential(BasicBlock...)), convShortcut, final bn1
    key = re.sub(r"^group(\d)\.(\d+)\.shortcut\.", r"block\1.layer.\2.convShortcut.", key)
    key = re.sub(r"^group(\d)\.(\d+)\.", r"block\1.layer.\2.", key)
    return re.sub(r"^bn\.", "bn1.", key)


def _resnetv2_reference(key: str) -> str:
    # models/resnetv2.py (kuangliu): shortcut instead of downsample, linear instead of fc
    return re.sub(r"^fc\.", "linear.", key.replace(".downsample.", ".shortcut."))


def _shufflev2_reference(key: str) -> str:
    # models/ShuffleNetv2.py: conv1/bn1 stem; DownBlock conv1..bn2 (left), conv3..bn5 (right); BasicBlock conv1..bn3
    right = {"conv1": "conv3", "bn1": "bn3", "conv2": "conv4", "bn2": "bn4", "conv3": "conv5", "bn3": "bn5"}
    m = re.match(r"^layer(\d)\.(\d+)\.(left|right)\.(conv\d|bn\d)\.(.+)$", key)
    if m:
        layer, unit, side, name, rest = m.groups()
        if unit != "0":
            return f"layer{layer}.{unit}.{name}.{rest}"
        return f"layer{layer}.0.{name if side == 'left' else right[name]}.{rest}"
    for ours, ref in (
        ("stem.conv1.", "conv1."),
        ("stem.bn1.", "bn1."),
        ("conv_last.conv1.", "conv2."),
        ("conv_last.bn1.", "bn2."),
        ("fc.", "linear."),
    ):
        if key.startswith(ours):
            return ref + key[len(ours) :]
    return key


REFERENCE = {  # model -> (renaming, keys the reference's state dict is known to hold)
    "resnet56": (
        lambda k: k,
        {"conv1.weight", "layer2.0.downsample.0.weight", "layer3.8.bn2.running_var", "fc.weight"},
    ),
    "resnet32x4": (lambda k: k, {"layer1.0.downsample.1.weight", "layer3.4.conv2.weight", "fc.bias"}),
    "vgg13": (
        _vgg_reference,
        {
            "block0.0.weight",
            "block0.1.running_mean",
            "block0.3.weight",
            "block0.4.bias",
            "block4.4.num_batches_tracked",
            "classifier.weight",
        },
    ),
    "wrn_40_2": (
        _wrn_reference,
        {
            "conv1.weight",
            "block1.layer.0.convShortcut.weight",
            "block3.layer.5.conv2.weight",
            "bn1.running_mean",
            "fc.weight",
        },
    ),
    "resnet50": (_resnetv2_reference, {"layer1.0.shortcut.0.weight", "layer4.2.bn3.weight", "linear.weight"}),
    "shufflev1": (
        lambda k: re.sub(r"^fc\.", "linear.", k),
        {"layer1.0.conv1.weight", "layer3.3.bn3.running_var", "linear.weight"},
    ),
    "shufflev2": (
        _shufflev2_reference,
        {
            "conv1.weight",
            "layer1.0.conv5.weight",
            "layer1.0.bn4.running_mean",
            "layer2.7.conv3.weight",
            "conv2.weight",
            "bn2.bias",
            "linear.weight",
        },
    ),
}


def reference_state(name: str, model: nn.Module) -> dict[str, torch.Tensor]:
    rename, known = REFERENCE[name]
    state = {rename(k): v.clone() for k, v in model.state_dict().items()}
    assert known <= set(state), sorted(known - set(state))
    return state


def trained_like(name: str, seed: int = 0) -> nn.Module:
    """A zoo model with non-trivial BatchNorm statistics, so a mix-up of BN entries would show."""
    torch.manual_seed(seed)
    model = models.create(name, num_classes=100)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
                m.num_batches_tracked.fill_(12345)
    return model.eval()


@pytest.mark.parametrize("name", sorted(REFERENCE))
@pytest.mark.parametrize("layout", ["repdistiller_ckpt", "repdistiller_last", "dataparallel_state_dict"])
def test_reference_teacher_checkpoint_loads(name, layout, tmp_path):
    source = trained_like(name)
    state = reference_state(name, source)
    path = tmp_path / "ckpt_epoch_240.pth"
    if layout == "repdistiller_ckpt":  # train_teacher.py's regular save, the file its fetch script downloads
        torch.save(
            {
                "epoch": 240,
                "model": state,
                "accuracy": torch.tensor([72.34]),
                "optimizer": {"state": {}, "param_groups": []},
            },
            path,
        )
    elif layout == "repdistiller_last":  # its *_last.pth also stores the argparse options
        torch.save(
            {
                "opt": argparse.Namespace(model=name, learning_rate=0.05, lr_decay_epochs=[150, 180, 210]),
                "model": state,
            },
            path,
        )
    else:  # Tf-KD's utils.save_checkpoint of an nn.DataParallel model
        torch.save({"epoch": 200, "state_dict": {f"module.{k}": v for k, v in state.items()}, "optim_dict": {}}, path)
    target = models.create(name, num_classes=100)
    load_model_weights(target, path, "teacher 0")
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(target.eval()(x), source(x))


def test_reference_file_of_another_architecture_names_the_first_key_that_does_not_fit(tmp_path):
    path = tmp_path / "vgg13.pth"
    torch.save({"model": reference_state("vgg13", trained_like("vgg13"))}, path)
    with pytest.raises(CheckpointError) as err:
        load_model_weights(models.create("vgg8", num_classes=100), path, "teacher 0")
    msg = str(err.value)
    assert "\n" not in msg and "'block0.3.weight'" in msg and "VGG" in msg  # vgg13's second conv of block 0
    path = tmp_path / "resnet56.pth"
    torch.save({"model": reference_state("resnet56", trained_like("resnet56"))}, path)
    with pytest.raises(
        CheckpointError,
        match=r"key 'conv1.weight' does not fit ResNet: shape \(16, 3, 3, 3\) in the file, \(32, 3, 3, 3\)",
    ):
        load_model_weights(models.create("resnet32x4", num_classes=100), path, "teacher 0")


def test_reference_checkpoint_with_code_is_refused(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    path = tmp_path / "ckpt_epoch_240.pth"
    torch.save({"epoch": 240, "model": {"conv1.weight": Payload()}}, path)
    with pytest.raises(CheckpointError, match="refused, it holds Python objects.*will not load it"):
        load_model_weights(models.create("resnet56", num_classes=100), path, "teacher 0")
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------- given teachers


def test_a_teacher_given_by_weights_is_evaluated_before_the_student_trains(tmp_path, capsys):
    teacher_run = tmp_path / "teacher"
    pipeline.run(
        load_recipe(
            DIGITS / "vanilla.yaml", ["student.name=smallcnn_wide", "train.epochs=1", "train.max_steps_per_epoch=5"]
        ),
        teacher_run,
        quiet=True,
    )
    # the same teacher in RepDistiller's file layout
    state, _ = checkpoint.load(teacher_run / "student.safetensors")
    torch.save({"epoch": 1, "model": state}, tmp_path / "teacher.pth")
    recipe = load_recipe(
        DIGITS / "kd.yaml",
        [
            "train.epochs=1",
            "train.max_steps_per_epoch=2",
            f"teachers=[{{name: smallcnn_wide, weights: {tmp_path / 'teacher.pth'}}}]",
        ],
    )
    capsys.readouterr()
    result = pipeline.run(recipe, tmp_path / "kd", quiet=False)
    printed = capsys.readouterr().out
    line = next(ln for ln in printed.splitlines() if ln.startswith("teacher 0 (smallcnn_wide"))
    top1 = result["teachers"][0]["top1"]
    assert f"test top-1 {top1:.2f}" in line
    log = (tmp_path / "kd" / "log.txt").read_text()
    assert log.index("test top-1") < log.index("epoch 1")  # before the student's first epoch
    # it is the test top-1 of exactly these weights
    data = load_data(recipe)
    model = models.create("smallcnn_wide", num_classes=10, in_chans=1)
    model.load_state_dict(state)
    assert top1 == pytest.approx(evaluate(model, data.test_loader(torch.device("cpu"), 0))["top1"])
    assert json.loads((tmp_path / "kd" / "result.json").read_text())["teachers"][0]["top1"] == top1


# ----------------------------------------------------------------------------------------------- best checkpoint


def scripted_evaluate(monkeypatch, top1s: list[float]):
    """kdlab.train.evaluate returning `top1s` for its first calls (fit's per-epoch evaluations), real values after."""
    import kdlab.train as train

    real = train.evaluate
    calls = iter(top1s)

    def fake(model, loader, *args, **kwargs):
        ev = real(model, loader, *args, **kwargs)
        return {**ev, "top1": next(calls, ev["top1"])}

    monkeypatch.setattr(train, "evaluate", fake)


def test_best_teacher_is_the_epoch_with_the_highest_test_top1(tmp_path, monkeypatch):
    scripted_evaluate(
        monkeypatch, [30.0, 60.0, 45.0, 60.0, 50.0]
    )  # ties go to the later epoch, as the Tf-KD code's `>=`
    recipe = load_recipe(
        DIGITS / "kd.yaml",
        [
            "train.epochs=5",
            "train.max_steps_per_epoch=2",
            "teachers=[{name: smallcnn_wide, checkpoint: best, train: {keep_epochs: [1, 2, 3, 4, 5]}}]",
        ],
    )
    data = load_data(recipe)
    teacher, info = prepare_teacher(recipe, 0, recipe.teachers[0], data, tmp_path, Log(quiet=True))
    folder = Path(info["source"])
    assert (info["checkpoint"], info["best_epoch"], info["top1"]) == ("best", 4, 60.0)
    assert json.loads((folder / "result.json").read_text())["best_epoch"] == 4
    kept = {e: checkpoint.load(folder / "checkpoints" / f"epoch_{e}.safetensors")[0] for e in (2, 4, 5)}
    state = teacher.state_dict()
    assert all(torch.equal(state[k], v) for k, v in kept[4].items())
    assert not all(torch.equal(state[k], v) for k, v in kept[5].items())  # not the last epoch
    assert not all(torch.equal(state[k], v) for k, v in kept[2].items())  # nor the earlier tie


def test_last_teacher_keeps_its_cache_key_and_best_gets_its_own(tmp_path):
    recipe = validate(
        {
            "method": "kd",
            "data": {"name": "digits"},
            "student": {"name": "smallcnn"},
            "teachers": [{"name": "smallcnn_wide"}],
            "loss": {"ce": 0.1, "terms": {"kd": {}}},
        }
    )
    last, best = recipe.teachers[0], recipe.teachers[0].model_copy(update={"checkpoint": "best"})
    # the folder kdlab gave this teacher before `checkpoint` and `keep_best` existed: cached `last` teachers are reused
    assert teacher_run_dir(recipe, 0, last, tmp_path).name == "smallcnn_wide-8822803e3691"
    assert teacher_run_dir(recipe, 0, best, tmp_path) != teacher_run_dir(recipe, 0, last, tmp_path)


def test_self_training_teacher_is_generation_zeros_best_epoch(tmp_path, monkeypatch):
    scripted_evaluate(monkeypatch, [20.0, 70.0, 40.0])  # generation 0's three epochs
    loaded = []
    real_load = load_model_weights
    monkeypatch.setattr(
        pipeline, "load_model_weights", lambda m, p, what: (loaded.append((what, Path(p))), real_load(m, p, what))
    )
    recipe = load_recipe(
        DIGITS / "tfkd_self.yaml",
        [
            "train.epochs=3",
            "train.max_steps_per_epoch=2",
            f"cache_dir={tmp_path / 'cache'}",
            "generation_checkpoint=best",
        ],
    )
    result = pipeline.run(recipe, tmp_path / "self", quiet=True)
    (teacher,) = result["teachers"]
    assert (teacher["checkpoint"], teacher["top1"]) == ("best", 70.0)
    what, path = next(item for item in loaded if item[0] == "generation 0")
    assert path.name == "best.safetensors" and checkpoint.load(path)[1]["epoch"] == 2


def test_best_checkpoint_needs_a_teacher_trained_here():
    with pytest.raises(Exception, match="checkpoint: best .* cannot be combined with 'epoch'"):
        load_recipe(DIGITS / "dekd.yaml", ["teachers.0.checkpoint=best"])
    with pytest.raises(Exception, match="generation_checkpoint applies to sequential methods"):
        load_recipe(DIGITS / "kd.yaml", ["generation_checkpoint=best"])


@pytest.mark.parametrize(
    "name, sets, key",
    [
        ("cifar100/fast/resnet56_resnet20_kd_b512.yaml", [], "9542e85e8423"),
        (
            "cifar100/fast/resnet56_resnet20_kd_b512.yaml",
            ["train.epochs=3", "train.fast.graph_step=true", "train.teacher_cache=true", "seed=7"],
            "673a9eaaa047",
        ),
        ("digits/tfkd_self.yaml", [], "ec6a85b2ee10"),
    ],
)
def test_teacher_key_is_pinned(name, sets, key, tmp_path):
    """Cached teachers are found again by their key: the values kdlab computed before the pipeline moved out
    of runner.py."""
    recipe = load_recipe(DIGITS.parent / name, sets)
    ((index, teacher),) = trained_teachers(recipe)
    assert (
        teacher_key(recipe, teacher, teacher_train_config(recipe, teacher), teacher_seed(recipe, index, teacher)) == key
    )
    assert teacher_run_dir(recipe, index, teacher, tmp_path).name == f"{teacher.name}-{key}"


# ----------------------------------------------------------------------------------------------- shared teachers
# A second run waits for a teacher that another process is training, then uses it; the resolved
# protocol of each teacher is printed at the start.


def test_second_run_waits_for_a_shared_teacher_with_a_message_even_when_quiet(tmp_path, capsys):
    from kdlab.lock import RunLock

    cache = tmp_path / "cache"
    first = ["--set", f"cache_dir={cache}", *QUICK]
    ok(capsys, ["train", KD, "--out", str(tmp_path / "a"), *first])
    recipe = load_recipe(KD, [f"cache_dir={cache}", "train.epochs=2", "train.max_steps_per_epoch=2"])
    teacher_dir = teacher_run_dir(recipe, 0, recipe.teachers[0], tmp_path / "b")
    assert (teacher_dir / "result.json").exists()
    with RunLock(teacher_dir):  # as if another run were training it right now
        proc = subprocess.Popen(
            [sys.executable, "-m", "kdlab", "train", KD, "--out", str(tmp_path / "b"), *first],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=ENV,
        )
        try:
            line = read_until(proc.stdout.fileno(), proc, b"\n").decode()  # HANG_S: only a hang guard
            assert "waiting for it to finish" in line and str(teacher_dir) in line and f"pid {os.getpid()}" in line
            # still waiting a second later: a slower machine only makes this likelier, never a false failure
            time.sleep(1)
            assert proc.poll() is None
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    out, err = proc.communicate(timeout=HANG_S)
    assert proc.returncode == 0, err
    assert json.loads((tmp_path / "b" / "result.json").read_text())["teachers"][0]["source"] == str(teacher_dir)


def test_the_resolved_teacher_protocol_is_printed(tmp_path, capsys):
    out = ok(
        capsys,
        ["train", KD, "--out", str(tmp_path / "r"), "--set", "train.epochs=2", "--set", "train.max_steps_per_epoch=2"],
    )
    line = next(ln for ln in out.splitlines() if ln.startswith("teacher 0:"))
    assert "smallcnn_wide, trained here: 2 epochs, 2 steps/epoch" in line and "seed 1" in line and "cached in" in line
