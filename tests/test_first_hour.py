"""What a new user meets in the first hour: output folders, bad values, interruptions, shared teachers,
progress without a terminal, pictures, odd image files, exported models and failing pre-stages.

Each test is named after what the user sees; the numbers in the section titles are the items of
the issue that asked for them ("A user's first hour").
"""

from __future__ import annotations

import json
import math
import os
import pty
import select
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import tomllib
import torch
import yaml
from pydantic import ConfigDict
from torch import nn

from kdlab import checkpoint, pipeline
from kdlab.cli import main
from kdlab.config import TrainConfig, dump, load_recipe
from kdlab.losses import TERMS, Term, TermOptions
from kdlab.teachers import teacher_run_dir

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "recipes" / "digits"
KD = str(DIGITS / "kd.yaml")
VANILLA = str(DIGITS / "vanilla.yaml")
QUICK = ["--set", "train.epochs=2", "--set", "train.max_steps_per_epoch=2", "--quiet"]
ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    "OMP_NUM_THREADS": "1",
}


def sets(*items: str) -> list[str]:
    return [a for item in items for a in ("--set", item)]


def refused(capsys, args: list[str], *names: str) -> str:
    rc = main(args)
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kdlab: error: ") and "Traceback" not in err, err
    for name in names:
        assert str(name) in lines[0], (name, lines[0])
    return lines[0]


def ok(capsys, args: list[str]) -> str:
    rc = main(args)
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    return captured.out


# ----------------------------------------------------------------------------------------------
# 1. An output folder that is not a kdlab run is never written into


def test_out_folder_holding_other_files_is_refused_and_left_as_it_was(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "student.safetensors").write_bytes(b"the user's own weights")
    (mine / "metrics.jsonl").write_text('{"user": 1}\n')
    refused(capsys, ["train", KD, "--out", str(mine), *QUICK], mine, "not a kdlab run")
    assert sorted(p.name for p in mine.iterdir()) == ["metrics.jsonl", "student.safetensors"]
    assert (mine / "student.safetensors").read_bytes() == b"the user's own weights"
    assert (mine / "metrics.jsonl").read_text() == '{"user": 1}\n'


def test_config_yaml_that_is_not_a_recipe_is_refused(tmp_path, capsys):
    out = tmp_path / "other"
    out.mkdir()
    (out / "config.yaml").write_text("lr: 3\n")
    refused(capsys, ["train", KD, "--out", str(out), *QUICK], out, "not a kdlab recipe")
    assert (out / "config.yaml").read_text() == "lr: 3\n"


# ----------------------------------------------------------------------------------------------
# 2, 3. Every bad value is one line and exit code 2, before anything trains


@pytest.mark.parametrize("seed", ["99999999999999999999", "-1"])
def test_out_of_range_seed_is_one_line_and_nothing_trains(tmp_path, capsys, seed):
    out = tmp_path / "run"
    refused(capsys, ["train", KD, "--out", str(out), "--seed", seed, *QUICK], "seed")
    assert not out.exists()  # not even the teacher of kd.yaml


@pytest.mark.parametrize(
    "argv",
    [
        ["bench", "--workers", "-1"],
        ["bench", "--steps", "99999999999999999999"],
        ["analyze", "recon", "run", "--rate", "nan"],
        ["analyze", "recon", "run", "--lr", "inf"],
        ["export", "run", "--out", "s.onnx", "--image-size", "0"],
    ],
)
def test_bad_numbers_of_every_command_are_one_line(capsys, argv):
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("kdlab: error: argument --"), err


@pytest.mark.parametrize("option, value", [("--seeds", "99999999999999999999"), ("--jobs", "99999999999999999999")])
def test_huge_reproduce_counts_are_one_line(tmp_path, capsys, option, value):
    refused(capsys, ["reproduce", "t.yaml", option, value, "--out", str(tmp_path / "out")], f"{option} must be at most")
    assert not (tmp_path / "out").exists()


def test_student_protocol_is_checked_before_the_teacher_trains(tmp_path, capsys):
    """The teacher's own batch fits the data; the student's does not: refused before the teacher trains."""
    out = tmp_path / "run"
    refused(
        capsys,
        ["train", KD, "--out", str(out), *QUICK, *sets("train.batch_size=5000", "teachers.0.train={batch_size: 64}")],
        "batch",
    )
    assert not (out / "teachers").exists()


def test_missing_weights_of_a_second_teacher_are_named_before_the_first_trains(tmp_path, capsys):
    out = tmp_path / "run"
    refused(
        capsys,
        [
            "train",
            str(DIGITS / "ensemble_kd.yaml"),
            "--out",
            str(out),
            *QUICK,
            *sets(f"teachers.1.weights={tmp_path / 'nowhere.safetensors'}"),
        ],
        "nowhere.safetensors",
    )
    assert not (out / "teachers").exists()


# ----------------------------------------------------------------------------------------------
# 4. A failed first attempt does not block the corrected rerun


def test_rerun_after_an_error_uses_the_same_folder(tmp_path, capsys):
    out = tmp_path / "run"
    refused(
        capsys,
        ["train", KD, "--out", str(out), *QUICK, *sets(f"teachers.0.weights={tmp_path / 'typo.safetensors'}")],
        "typo.safetensors",
    )
    assert (out / "config.yaml").exists()  # the attempt left its folder
    ok(capsys, ["train", KD, "--out", str(out), *QUICK])  # corrected: same --out, no deletion needed
    assert (out / "result.json").exists()
    assert yaml.safe_load((out / "config.yaml").read_text())["teachers"][0]["weights"] is None


def test_a_run_with_a_checkpoint_is_still_only_resumed(tmp_path, capsys):
    out = tmp_path / "run"
    ok(capsys, ["train", VANILLA, "--out", str(out), *QUICK])
    (out / "result.json").unlink()
    (out / "student.safetensors").unlink()  # as if killed after its checkpoints
    refused(capsys, ["train", VANILLA, "--out", str(out), *QUICK], "already holds a run", f"--resume {out}")


def test_fresh_start_with_another_recipe_drops_the_old_stages(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    old = load_recipe(DIGITS / "ft.yaml", ["loss.terms.ft.rate=0.25"])
    (out / "config.yaml").write_text(dump(old))
    (out / "stages").mkdir()
    (out / "stages" / "ft_paraphraser0.safetensors").write_bytes(b"a paraphraser of the old recipe")
    ok(
        capsys,
        ["train", str(DIGITS / "ft.yaml"), "--out", str(out), *QUICK, *sets("loss.terms.ft.paraphraser_epochs=1")],
    )
    checkpoint.load(out / "stages" / "ft_paraphraser0.safetensors")  # trained anew, not the old bytes


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
        ["train", VANILLA, "--out", str(out), *QUICK, *sets(f"loss.terms.{nan_term}={{}}")],
        "epoch 1 step 0",
        "nothing was checkpointed",
        "train.grad_clip",
        "same --out",
    )
    assert "last good checkpoint" not in line and "checkpoints" not in line
    ok(capsys, ["train", VANILLA, "--out", str(out), *QUICK])
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
# 5. SIGTERM is handled as Ctrl-C; the advice names the real folder and fits the command


def _read_until(fd: int, proc, needle: bytes, seconds: float) -> bytes:
    got = b""
    deadline = time.monotonic() + seconds
    while needle not in got:
        if time.monotonic() >= deadline:
            assert proc.poll() is not None, got[-2000:]
            break
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # the child closed the terminal
                break
            got += chunk
        elif proc.poll() is not None:
            break
    return got


def test_sigterm_mid_epoch_restores_the_cursor_and_prints_the_resume_command(tmp_path):
    out = tmp_path / "my run"
    master, slave = pty.openpty()  # a terminal: the live progress bar hides the cursor while it draws
    proc = subprocess.Popen(
        [sys.executable, "-m", "kdlab", "train", VANILLA, "--out", str(out), "--set", "train.epochs=300"],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env={**ENV, "TERM": "xterm", "COLUMNS": "100"},
    )
    os.close(slave)
    try:
        got = _read_until(master, proc, b"epoch 1 |", 120)  # an epoch is checkpointed; the second is under way
        os.kill(proc.pid, signal.SIGTERM)
        got += _read_until(master, proc, b"--resume", 60)
        assert proc.wait(timeout=60) == 143
        got += _read_until(master, proc, b"\x00never", 2)  # the rest, up to the closed terminal
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    text = got.decode(errors="replace")
    assert "\x1b[?25l" in text and text.rfind("\x1b[?25h") > text.rfind("\x1b[?25l"), "cursor left hidden"
    assert "terminated (SIGTERM)" in text and f"kdlab train --resume '{out}'" in text
    assert checkpoint.load(out / "checkpoints" / "last.safetensors")[1]["epoch"] >= 1


def test_ctrl_c_advice_names_the_run_folder(tmp_path, capsys, monkeypatch):
    def interrupted(*a, **k):
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / "config.yaml").write_text("x")
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "run", interrupted)
    assert main(["train", KD, "--out", str(tmp_path / "run")]) == 130
    err = capsys.readouterr().err
    assert f"kdlab train --resume {tmp_path / 'run'}" in err and "DIR" not in err


def test_ctrl_c_of_the_demo_says_to_rerun_the_demo(tmp_path, capsys, monkeypatch):
    import kdlab.tools.demo

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(kdlab.tools.demo, "run_demo", interrupted)
    assert main(["demo", "--out", str(tmp_path / "d"), "--only", "kd"]) == 130
    err = capsys.readouterr().err
    assert f"kdlab demo --out {tmp_path / 'd'} --only kd" in err and "--resume" not in err


# ----------------------------------------------------------------------------------------------
# 7. The bring-your-own-model example shows distillation helping; a term that is always 0 warns


@pytest.mark.slow
def test_example_byom_shows_distillation_helping(capsys):
    import runpy

    scores = runpy.run_path(str(ROOT / "examples" / "byom.py"), run_name="byom")["main"]([])
    # measured 78.6 -> 88.3 (seed 0); the example's docstring states it
    assert scores["student with KD + AT"] > scores["student alone"] + 5, scores


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
# 8. timm and ONNX installs keep the user's torch


def test_test_extras_hold_onnx_and_nothing_that_replaces_torch():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["test"]
    names = {e.split(">")[0].split("=")[0].split("<")[0].strip() for e in extras}
    assert {"onnx", "onnxruntime"} <= names
    assert not names & {"timm", "torchvision", "torch"}  # each pulls (or is) a torch build of its own
    api = (ROOT / "docs" / "api.md").read_text()
    assert "pip freeze" in api and "-c keep-torch.txt" in api


# ----------------------------------------------------------------------------------------------
# 9. timm's feature_info names the default layers


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


# ----------------------------------------------------------------------------------------------
# 10. Packaged recipes by name, from any folder


def test_packaged_recipe_by_name_from_another_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ok(capsys, ["train", "kd", "--out", "a", *QUICK])
    ok(capsys, ["train", "digits/vanilla", "--out", "b", *QUICK])
    assert yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())["method"] == "kd"
    assert (tmp_path / "b" / "result.json").exists()
    refused(capsys, ["train", "kdd", "--out", "c"], "recipe not found: kdd", "did you mean kd")


def test_recipes_lists_the_packaged_recipes(capsys):
    out = ok(capsys, ["recipes"])
    names = [line.split()[0] for line in out.splitlines() if line.strip() and not line.startswith("bare")]
    assert (
        "digits/kd" in names
        and "cifar100/fast/resnet56_resnet20_kd_b512" in names
        and not any(n.startswith("tables/") for n in names)
    )
    listed = ok(capsys, ["recipes", "digits"]).split("\n")
    assert all(line.startswith("digits/") for line in listed if line) and any(
        line.startswith("digits/kd ") for line in listed
    )


# ----------------------------------------------------------------------------------------------
# 11. A second run waits for a teacher that another process is training, then uses it


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
            line = _read_until(proc.stdout.fileno(), proc, b"\n", 60).decode()
            assert "waiting for it to finish" in line and str(teacher_dir) in line and f"pid {os.getpid()}" in line
            time.sleep(1)
            assert proc.poll() is None  # still waiting
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert json.loads((tmp_path / "b" / "result.json").read_text())["teachers"][0]["source"] == str(teacher_dir)


# ----------------------------------------------------------------------------------------------
# 12. The teachers' protocol is printed at the start


def test_the_resolved_teacher_protocol_is_printed(tmp_path, capsys):
    out = ok(
        capsys,
        ["train", KD, "--out", str(tmp_path / "r"), "--set", "train.epochs=2", "--set", "train.max_steps_per_epoch=2"],
    )
    line = next(ln for ln in out.splitlines() if ln.startswith("teacher 0:"))
    assert "smallcnn_wide, trained here: 2 epochs, 2 steps/epoch" in line and "seed 1" in line and "cached in" in line


def test_getting_started_documents_the_teacher_cache():
    text = (ROOT / "docs" / "getting-started.md").read_text()
    assert "KDLAB_CACHE" in text and "--set train.epochs" in text


# ----------------------------------------------------------------------------------------------
# 14. Progress without a terminal; the epoch line's img/s is training alone


def test_progress_lines_without_a_terminal(monkeypatch):
    from kdlab import progress

    monkeypatch.setenv("KDLAB_PROGRESS_SECONDS", "0.01")
    lines: list[str] = []
    p = progress.Progress(total_epochs=3, steps_per_epoch=20, batch_size=8, log=lines.append)
    p.start_epoch(0)
    for step in range(20):
        time.sleep(0.02)
        p.step(step)
    plain = [ln for ln in lines if ln.startswith("epoch 1/3 step ")]
    assert len(plain) >= 5 and "img/s" in plain[-1] and "ETA epoch" in plain[-1] and "run " in plain[-1]
    p.training_done(1.0)
    p.end_epoch({"epoch": 1, "lr": 0.1, "train_loss": 1.0, "seconds": 10.0})
    assert lines[-1].endswith("| 160 img/s training")  # 20 steps x 8 images in 1 s of training, not 10 s


def test_progress_interval_defaults_to_half_a_minute(monkeypatch):
    from kdlab import progress

    monkeypatch.delenv("KDLAB_PROGRESS_SECONDS", raising=False)
    assert progress.plain_interval() == 30.0
    monkeypatch.setenv("KDLAB_PROGRESS_SECONDS", "nonsense")
    assert progress.plain_interval() == 30.0


# ----------------------------------------------------------------------------------------------
# 15. Pictures: 20 distinguishable lines, unclipped titles, the weighted CE said so


def _captured_figures(monkeypatch) -> list:
    from kdlab.tools import plots

    figures = []
    real = plots._save

    def keep(fig, out):
        figures.append(fig)
        return real(fig, out)

    monkeypatch.setattr(plots, "_save", keep)
    return figures


def test_curves_of_twenty_runs_are_distinguishable_and_labelled(tmp_path, monkeypatch):
    from kdlab.tools import plots

    runs = []
    for i in range(20):
        d = tmp_path / f"r{i}"
        d.mkdir()
        rows = [
            {"epoch": e, "train_loss": 1.0 / e + i, "train_ce": 0.5 / e, "test_top1": 10.0 * e + i} for e in (1, 2, 3)
        ]
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        runs.append(d)
    figures = _captured_figures(monkeypatch)
    plots.plot_runs(runs, tmp_path / "curves.png")
    ax = figures[0].axes[0]
    styles = {(line.get_color(), line.get_linestyle()) for line in ax.get_lines()}
    assert len(ax.get_lines()) == 20 and len(styles) == 20
    titles = [a.get_title() for a in figures[0].axes if a.get_title()]
    assert "train ce (weighted)" in titles and any(t.startswith("train loss") for t in titles)


def test_recon_plot_title_is_inside_the_figure(tmp_path, monkeypatch):
    from kdlab.tools import plots

    figures = _captured_figures(monkeypatch)
    title = "test reconstruction error (l1, layer stage3:pre, k=0.5, 10 epochs) of every recipe in this table"
    plots.plot_recon([("kd", [0.1, 0.2]), ("ft", [0.3])], tmp_path / "recon.png", title=title)
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = figures[0]
    canvas = FigureCanvasAgg(fig)  # the figure was closed after saving; draw it again at its saved size
    canvas.draw()
    box = fig.axes[0].title.get_window_extent(canvas.get_renderer())
    assert box.x0 >= 0 and box.x1 <= fig.bbox.width and box.y1 <= fig.bbox.height


# ----------------------------------------------------------------------------------------------
# 16. The CLI reference has no unexpanded help placeholders


def test_cli_reference_expands_help_defaults():
    from kdlab.tools import docgen

    text = docgen.cli_markdown()
    assert "%(" not in text and "TEACHER:STUDENT,... (default: resnet56:resnet20,resnet32x4:resnet8x4)" in text


# ----------------------------------------------------------------------------------------------
# 17. ImageFolder: unreadable files skipped and counted on request; 16-bit PNGs scaled


def _folder(root: Path, broken: int = 0) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for cls in ("a", "b"):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(d / f"{i}.png")
    for i in range(broken):
        (root / "train" / "a" / f"broken{i}.png").write_bytes(b"not a png")
    return root


def test_unreadable_images_are_skipped_and_counted_when_asked(tmp_path, capsys):
    from kdlab.data import load_dataset
    from kdlab.errors import DataError

    root = _folder(tmp_path / "imgs", broken=2)
    with pytest.raises(DataError, match="broken0.png: unreadable.*skip_unreadable"):
        load_dataset("imagefolder", root, split="train", image_size=8)
    ds = load_dataset("imagefolder", root, split="train", image_size=8, skip_unreadable=True)
    assert len(ds.labels) == 6 and len(ds.skipped) == 2 and "broken0.png" in ds.skipped[0]
    ok(
        capsys,
        [
            "train",
            VANILLA,
            "--out",
            str(tmp_path / "run"),
            "--set",
            "train.epochs=1",
            "--set",
            "train.batch_size=2",
            *sets("data.name=imagefolder", f"data.root={root}", "data.image_size=8", "data.skip_unreadable=true"),
        ],
    )
    assert "2 unreadable file(s) left out of train" in (tmp_path / "run" / "log.txt").read_text()


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    from PIL import Image

    from kdlab.data.imagefolder import _read_image

    values = (np.arange(64, dtype=np.uint32).reshape(8, 8) * 1000).astype(np.uint16)  # 0 .. 63000
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")
    arr = _read_image(path, 8)
    assert arr.shape == (3, 8, 8) and (arr[0] == arr[1]).all() and (arr[0] == arr[2]).all()
    assert np.abs(arr[0].astype(float) - values / 257.0).max() <= 0.5  # 63000 -> 245, not 255 from 256 up
    assert arr.reshape(-1).tolist().count(255) == 0


# ----------------------------------------------------------------------------------------------
# 18. Exports carry the preprocessing


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


# ----------------------------------------------------------------------------------------------
# 19. A pre-stage whose loss turns non-finite stops at once


def test_diverging_paraphraser_stops_in_its_stage_and_saves_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    line = refused(
        capsys,
        [
            "train",
            str(DIGITS / "ft.yaml"),
            "--out",
            str(out),
            *QUICK,
            *sets("loss.terms.ft.paraphraser_lr=1e30", "loss.terms.ft.paraphraser_epochs=3"),
        ],
        "non-finite loss in stage ft_paraphraser0 at epoch 1",
        "loss.terms.ft.paraphraser_lr",
    )
    assert "epoch 1 step" in line
    assert not (out / "stages" / "ft_paraphraser0.safetensors").exists()
    log = (out / "log.txt").read_text()
    assert "stage ft_paraphraser0: epoch" not in log  # stopped within its first epoch
