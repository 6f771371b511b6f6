"""Results tables, plots, export, the Python API and the demo, on tiny runs made here on the digits data."""

import csv
import importlib.util
import io
import json
import math
import runpy
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from kdlab import checkpoint, models, pipeline
from kdlab.cli import main
from kdlab.config import load_recipe
from kdlab.data import load_dataset
from kdlab.errors import ConfigError, DataError, LayerError

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes" / "digits"
TINY = ["train.epochs=2", "train.max_steps_per_epoch=2"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def tiny_run(out: Path, recipe: str, seed: int = 0, *extra: str) -> dict:
    return pipeline.run(load_recipe(RECIPES / recipe, [*TINY, *extra], seed=seed), out, quiet=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """runs/{vanilla,kd}-s{0,1}: two recipes, two seeds each; kd trains its teacher into runs/kd-s*/teachers."""
    base = tmp_path_factory.mktemp("runs")
    for name in ("vanilla", "kd"):
        for seed in (0, 1):
            tiny_run(base / f"{name}-s{seed}", f"{name}.yaml", seed)
    return base


def results_of(base: Path, prefix: str) -> list[dict]:
    return [json.loads((d / "result.json").read_text()) for d in sorted(base.glob(f"{prefix}-s*"))]


def naive_mean_std(values):
    m = sum(values) / len(values)
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


# ----------------------------------------------------------------------------------------------
# kdlab table


def md_rows(text: str) -> list[list[str]]:
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[1:]]


def test_table_groups_seeds_of_a_recipe_into_mean_and_std(runs, capsys):
    assert main(["table", str(runs)]) == 0
    out = capsys.readouterr().out
    rows = {r[0]: r for r in md_rows(out)}
    assert set(rows) == {
        "vanilla smallcnn_narrow",
        "kd smallcnn_narrow <- smallcnn_wide",
    }  # teacher caches below are skipped
    params = sum(p.numel() for p in models.create("smallcnn_narrow", num_classes=10, in_chans=1).parameters())
    for label, prefix in (("vanilla smallcnn_narrow", "vanilla"), ("kd smallcnn_narrow <- smallcnn_wide", "kd")):
        res = results_of(runs, prefix)
        seeds, last, best, par, teacher, epochs = rows[label][1:7]
        assert seeds == "2" and epochs == "2" and par == f"{params:,}"
        m, s = naive_mean_std([r["top1_last"] for r in res])
        assert last == f"{m:.2f} ± {s:.2f}"
        m, s = naive_mean_std([r["top1_best"] for r in res])
        assert best == f"{m:.2f} ± {s:.2f}"
        if prefix == "kd":
            m, s = naive_mean_std([r["teachers"][0]["top1_last"] for r in res])
            assert teacher == f"{m:.2f} ± {s:.2f}"
        else:
            assert teacher == "-"


def test_table_csv_and_out_file(runs, tmp_path, capsys):
    out = tmp_path / "t.csv"
    assert main(["table", str(runs / "kd-s0"), str(runs / "kd-s1"), "--format", "csv", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert out.read_text() == printed
    (row,) = list(csv.DictReader(io.StringIO(printed)))
    res = results_of(runs, "kd")
    assert int(row["n"]) == 2 and sorted(row["seeds"].split(";")) == ["0", "1"]
    m, s = naive_mean_std([r["top1_last"] for r in res])
    assert float(row["top1_last_mean"]) == pytest.approx(m) and float(row["top1_last_std"]) == pytest.approx(s)
    assert int(row["params"]) == res[0]["params"]


def test_table_all_takes_teacher_caches_and_labels_split_recipes_by_what_differs(runs, tmp_path, capsys):
    assert main(["table", str(runs), "--all"]) == 0
    labels = [r[0] for r in md_rows(capsys.readouterr().out)]
    assert any(label.startswith("teacher smallcnn_wide") for label in labels)

    tiny_run(tmp_path / "kd-T8", "kd.yaml", 0, "loss.terms.kd.T=8")
    assert main(["table", str(runs / "kd-s0"), str(tmp_path / "kd-T8")]) == 0
    labels = [r[0] for r in md_rows(capsys.readouterr().out)]
    assert labels == [
        "kd smallcnn_narrow <- smallcnn_wide (loss.terms.kd.T=4)",
        "kd smallcnn_narrow <- smallcnn_wide (loss.terms.kd.T=8)",
    ]
    assert main(["table", str(runs / "kd-s0"), str(tmp_path / "kd-T8"), "--ignore", "loss.terms.kd.T"]) == 0
    (row,) = md_rows(capsys.readouterr().out)
    assert row[0] == "kd smallcnn_narrow <- smallcnn_wide" and row[1] == "2"


def test_table_without_runs_or_with_a_bad_path_is_one_line_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    unfinished = tmp_path / "empty" / "half"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text("method: vanilla\n")
    assert main(["table", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kdlab: error: no finished run") and "1 unfinished" in err and len(err.splitlines()) == 1
    assert main(["table", str(tmp_path / "nope")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_table_notes_unfinished_runs_and_still_prints(runs, tmp_path, capsys):
    half = runs / "zz-unfinished"
    half.mkdir(exist_ok=True)
    (half / "config.yaml").write_text("method: vanilla\n")
    try:
        assert main(["table", str(runs)]) == 0
        captured = capsys.readouterr()
        assert "skipped 1 unfinished" in captured.err and "zz-unfinished" in captured.err
        assert len(md_rows(captured.out)) == 2
    finally:
        (half / "config.yaml").unlink()
        half.rmdir()


# ----------------------------------------------------------------------------------------------
# kdlab plot


def test_plot_writes_a_small_png_per_run_and_per_recipe(runs, tmp_path, capsys):
    for extra, name in (([], "curves.png"), (["--mean"], "mean.png")):
        out = tmp_path / name
        assert main(["plot", str(runs), "--out", str(out), *extra]) == 0
        data = out.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) < 200_000
    assert main(["plot", str(runs / "kd-s0"), "--out", str(tmp_path / "x.png"), "--labels", "a", "b"]) == 2
    assert "--labels" in capsys.readouterr().err


def test_plot_recon_needs_recon_json_then_draws_bars(runs, tmp_path, capsys):
    out = tmp_path / "recon.png"
    assert main(["plot", "--recon", str(runs / "kd-s0"), str(runs / "vanilla-s0"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "no recon.json" in err and "kdlab analyze recon" in err and len(err.splitlines()) == 1
    assert not out.exists()
    written = []
    try:
        for name, value in (("kd-s0", 0.25), ("kd-s1", 0.35), ("vanilla-s0", 0.5)):
            path = runs / name / "recon.json"
            path.write_text(
                json.dumps({"recon_error": value, "loss": "l1", "layer": "stage3", "rate": 0.5, "epochs": 10})
            )
            written.append(path)
        assert (
            main(
                [
                    "plot",
                    "--recon",
                    str(runs / "kd-s0"),
                    str(runs / "kd-s1"),
                    str(runs / "vanilla-s0"),
                    "--out",
                    str(out),
                ]
            )
            == 0
        )
        assert out.read_bytes().startswith(PNG_MAGIC)
        # the table shows the recon column too: the mean over the recipe's seeds
        assert main(["table", str(runs / "kd-s0"), str(runs / "kd-s1")]) == 0
        assert md_rows(capsys.readouterr().out)[0][-1] == "0.3000 ± 0.0707"
        written[-1].write_text(
            json.dumps({"recon_error": 0.5, "loss": "l2", "layer": "stage3", "rate": 0.5, "epochs": 10})
        )
        assert main(["plot", "--recon", str(runs / "kd-s0"), str(runs / "vanilla-s0"), "--out", str(out)]) == 2
        assert "different settings" in capsys.readouterr().err
    finally:
        for path in written:
            path.unlink()


# ----------------------------------------------------------------------------------------------
# kdlab export


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
# Bring your own model: kdlab.api


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


def test_api_model_with_timm_style_feature_info_is_tapped_by_module_name(digits):
    """timm's models carry feature_info entries without kdlab's 'name': they must not break the taps."""
    from kdlab.api import Distill

    train, _ = digits
    teacher, student = Tiny(8), Tiny(4)
    for m in (teacher, student):
        m.feature_info = [dict(num_chs=8, reduction=1, module="block1"), dict(num_chs=16, reduction=2, module="block2")]
    d = Distill(student, teacher, terms={"nst": {"student_layers": ["block2"], "teacher_layers": ["block2"]}})
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


def test_example_byom_runs(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["byom.py", "--epochs", "1", "--max-steps", "2"])
    runpy.run_path(str(ROOT / "examples" / "byom.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "student with KD + AT" in out and "student parameters" in out


def test_example_timm_runs(monkeypatch, capsys):
    timm_or_skip()
    monkeypatch.setattr(sys, "argv", ["timm_kd.py", "--epochs", "1", "--max-steps", "1"])
    runpy.run_path(str(ROOT / "examples" / "timm_kd.py"), run_name="__main__")
    assert "test top-1" in capsys.readouterr().out
