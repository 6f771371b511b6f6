"""kdlab export: the plain student as safetensors or ONNX, from a run's final weights or a checkpoint,
evaluating like the run, carrying its preprocessing, and bad requests refused with one line.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from helpers import digits_runs, ok, tiny_run

from kdlab import checkpoint, models
from kdlab.cli import main

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "recipes" / "digits"
VANILLA = str(DIGITS / "vanilla.yaml")
QUICK = ["--set", "train.epochs=2", "--set", "train.max_steps_per_epoch=2", "--quiet"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """runs/{vanilla,kd}-s{0,1}: two recipes, two seeds each; kd trains its teacher into runs/kd-s*/teachers."""
    return digits_runs(tmp_path_factory.mktemp("runs"))


def plain(name="smallcnn_narrow"):  # the digits recipes' student
    return models.create(name, num_classes=10, in_chans=1)


def test_export_safetensors_is_the_plain_student_and_evaluates_like_the_run(runs, tmp_path, capsys):
    out = tmp_path / "student.safetensors"
    assert main(["export", str(runs / "kd-s0"), "--out", str(out)]) == 0
    capsys.readouterr()
    tensors, meta = checkpoint.load(out)
    reference = plain()
    assert set(tensors) == set(reference.state_dict())
    assert sum(t.numel() for k, t in tensors.items() if k in dict(reference.named_parameters())) == sum(
        p.numel() for p in reference.parameters()
    )
    assert meta["model"] == "smallcnn_narrow" and meta["num_classes"] == 10 and meta["in_chans"] == 1
    assert main(["eval", str(out)]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["top1"] == pytest.approx(json.loads((runs / "kd-s0" / "result.json").read_text())["top1_last"])


def test_export_from_a_checkpoint_drops_side_modules(tmp_path, capsys):
    run = tmp_path / "fitnet"
    tiny_run(run, "fitnet.yaml", 0, "loss.terms.fitnet.stages=single")
    ckpt = checkpoint.load(run / "checkpoints" / "last.safetensors")[0]
    assert any(k.startswith("model.terms.fitnet.regressors") for k in ckpt)  # the side module is there to drop
    out = tmp_path / "fitnet.safetensors"
    assert main(["export", str(run), "--checkpoint", "last", "--out", str(out)]) == 0
    exported = checkpoint.load(out)[0]
    final = checkpoint.load(run / "student.safetensors")[0]
    assert set(exported) == set(plain().state_dict()) == set(final)
    assert all(torch.equal(exported[k], final[k]) for k in final)  # the last checkpoint holds the final weights
    printed = capsys.readouterr().out
    assert json.loads(printed.splitlines()[0])["params"] == sum(p.numel() for p in plain().parameters())


def test_export_refuses_bad_requests_with_one_line(runs, tmp_path, capsys):
    for args, words in (
        (["--out", str(tmp_path / "x.bin")], "--format"),
        (["--out", str(tmp_path / "x.safetensors"), "--checkpoint", "epoch_99"], "no such file"),
        (["--out", str(runs / "kd-s0" / "student.safetensors")], "being exported"),
    ):
        assert main(["export", str(runs / "kd-s0"), *args]) == 2
        err = capsys.readouterr().err
        assert words in err and len(err.splitlines()) == 1, err


@pytest.mark.skipif(importlib.util.find_spec("onnx") is not None, reason="onnx is installed")
def test_export_onnx_without_onnx_says_what_to_install(runs, tmp_path, capsys):
    assert main(["export", str(runs / "kd-s0"), "--out", str(tmp_path / "s.onnx")]) == 2
    assert "pip install onnx" in capsys.readouterr().err
    assert not (tmp_path / "s.onnx").exists()


def test_export_onnx_gives_the_pytorch_outputs(runs, tmp_path, capsys):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    out = tmp_path / "s.onnx"
    assert main(["export", str(runs / "kd-s0"), "--out", str(out)]) == 0
    state, meta = checkpoint.load(runs / "kd-s0" / "student.safetensors")
    model = plain(meta["model"])  # the digits recipes' student, whichever it is
    model.load_state_dict(state)
    model.eval()
    x = torch.randn(7, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"images": x.numpy()})[0]
    with torch.no_grad():
        want = model(x).numpy()
    assert got.shape == want.shape and abs(got - want).max() <= 1e-4


# ----------------------------------------------------------------------------------------------
# Exports carry the preprocessing


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "run"
    assert main(["train", VANILLA, "--out", str(out), *QUICK]) == 0
    return out


def test_safetensors_export_carries_mean_std_and_classes(finished_run, tmp_path, capsys):
    from kdlab.data import load_dataset

    ok(capsys, ["export", str(finished_run), "--out", str(tmp_path / "s.safetensors")])
    meta = checkpoint.load(tmp_path / "s.safetensors")[1]
    train = load_dataset("digits", split="train")
    assert meta["mean"] == pytest.approx(list(train.mean)) and meta["std"] == pytest.approx(list(train.std))
    assert meta["class_names"] == [str(k) for k in range(10)] and meta["image_size"] == 8


def test_export_of_a_checkpoint_reads_the_preprocessing_off_the_data(finished_run, tmp_path, capsys):
    ok(capsys, ["export", str(finished_run), "--checkpoint", "last", "--out", str(tmp_path / "c.safetensors")])
    assert len(checkpoint.load(tmp_path / "c.safetensors")[1]["mean"]) == 1


def test_onnx_export_carries_the_preprocessing(finished_run, tmp_path, capsys):
    onnx = pytest.importorskip("onnx")
    ok(capsys, ["export", str(finished_run), "--out", str(tmp_path / "s.onnx")])
    props = {p.key: p.value for p in onnx.load(str(tmp_path / "s.onnx")).metadata_props}
    meta = checkpoint.load(finished_run / "student.safetensors")[1]
    assert json.loads(props["mean"]) == pytest.approx(meta["mean"]) and json.loads(props["std"]) == pytest.approx(
        meta["std"]
    )
    assert json.loads(props["input_size"]) == [1, 8, 8] and json.loads(props["class_names"])[3] == "3"
    assert props["model"] == meta["model"] and "255" in props["normalization"]
