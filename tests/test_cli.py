"""The command line: listings, eval, and bad input refused with one line and exit code 2."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import refused, sets

from kdlab import models
from kdlab.cli import main
from kdlab.methods import METHODS
from kdlab.recipe_files import load_recipe

ROOT = Path(__file__).resolve().parents[1]
KD = str(ROOT / "recipes" / "digits" / "kd.yaml")
QUICK = ["--set", "train.epochs=1", "--set", "train.max_steps_per_epoch=2", "--quiet"]
QUICK2 = ["--set", "train.epochs=2", "--set", "train.max_steps_per_epoch=2", "--quiet"]  # two epochs
DIGITS = ROOT / "recipes" / "digits"


def test_models_lists_every_registered_name(capsys):
    assert main(["models"]) == 0
    assert capsys.readouterr().out.split() == models.names()


def test_methods_lists_every_method_of_the_papers(capsys):
    assert main(["methods"]) == 0
    first_column = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert first_column == list(METHODS)
    for name in (
        "vanilla",
        "kd",
        "ensemble_kd",
        "fitnet",
        "at",
        "nst",
        "lp",
        "ft",
        "pfeed",
        "sfeed",
        "ban",
        "tfkd_self",
        "tfkd_reg",
        "lsr",
    ):
        assert name in first_column


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["train.lr=-0.1"], "train.lr"),
        (["train.epochs=0"], "train.epochs"),
        (["train.batch_size=abc"], "train.batch_size"),
        (["train.device=tpu"], "train.device"),
        (["train.nope=1"], "train.nope"),
        (["student.name=resnet9000"], "student.name"),
        (["data.name=mnist"], "data.name"),
        (["loss.terms.kd.T=-1"], "loss.terms"),
        (["loss.terms.kd.T=.inf"], "loss.terms.kd.T"),
        (["loss.terms.kd.weight=.nan"], "loss.terms.kd.weight"),
        (["loss.terms.kd.weight=true"], "loss.terms.kd.weight"),
        (["train.channels_last=sideways"], "train.channels_last"),
        (["loss.terms.kd.temperature=2"], "temperature"),
        (["loss.terms.magic={}"], "magic"),
        (["seed=x"], "seed"),
    ],
)
def test_bad_recipe_values_exit_2_with_one_line_naming_the_key(tmp_path, capsys, overrides, key):
    args = ["train", KD, "--out", str(tmp_path / "run")]
    for o in overrides:
        args += ["--set", o]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and key in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_bad_yaml_and_missing_recipe(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("student: [unclosed\n")
    assert main(["train", str(bad), "--out", str(tmp_path / "r")]) == 2
    assert "invalid YAML" in capsys.readouterr().err
    assert main(["train", str(tmp_path / "none.yaml"), "--out", str(tmp_path / "r")]) == 2
    assert "not found" in capsys.readouterr().err


def test_method_without_its_term_is_refused(tmp_path, capsys):
    assert main(["train", KD, "--out", str(tmp_path / "r"), "--set", "method=nst"]) == 2
    assert "nst" in capsys.readouterr().err


def test_wrong_layer_name_is_named_before_training(tmp_path, capsys):
    at = str(ROOT / "recipes" / "digits" / "at.yaml")
    assert (
        main(["train", at, "--out", str(tmp_path / "r"), *QUICK, "--set", "loss.terms.at.student_layers=[stage7]"]) == 2
    )
    err = capsys.readouterr().err
    assert "stage7" in err and "Valid" in err
    assert not (tmp_path / "r" / "result.json").exists()


def test_train_then_eval_a_run_directory_and_its_weights(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", KD, "--out", str(out), *QUICK]) == 0
    trained = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(["eval", str(out)]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["top1"] == pytest.approx(trained["top1_last"])
    assert main(["eval", str(out / "student.safetensors"), "--data", "digits"]) == 0
    assert json.loads(capsys.readouterr().out)["top1"] == pytest.approx(trained["top1_last"])
    # a second train into the same directory is refused and loses nothing
    assert main(["train", KD, "--out", str(out), *QUICK]) == 2
    assert "finished" in capsys.readouterr().err


def test_resume_of_a_non_run_directory(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path)]) == 2
    assert "config.yaml" in capsys.readouterr().err


def test_console_script_module_entry_runs():
    proc = subprocess.run([sys.executable, "-m", "kdlab", "train", "--set", "x=1"], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "raw, expected", [("on", "on"), ("off", "off"), ("auto", "auto"), ("true", "on"), ("no", "off")]
)
def test_channels_last_takes_yaml_on_off(raw, expected):
    # YAML reads a bare on/off/true/no as a boolean
    assert load_recipe(Path(KD), [f"train.channels_last={raw}"]).train.channels_last == expected


# ----------------------------------------------------------------------------------------------
# Every bad value is one line and exit code 2, before anything trains


@pytest.mark.parametrize("seed", ["99999999999999999999", "-1"])
def test_out_of_range_seed_is_one_line_and_nothing_trains(tmp_path, capsys, seed):
    out = tmp_path / "run"
    refused(capsys, ["train", KD, "--out", str(out), "--seed", seed, *QUICK2], "seed")
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
        ["train", KD, "--out", str(out), *QUICK2, *sets("train.batch_size=5000", "teachers.0.train={batch_size: 64}")],
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
            *QUICK2,
            *sets(f"teachers.1.weights={tmp_path / 'nowhere.safetensors'}"),
        ],
        "nowhere.safetensors",
    )
    assert not (out / "teachers").exists()


def test_a_reader_that_closes_the_pipe_early_gets_no_error_line():
    """`kdlab recipes | head -1`: when the reader has gone, the listing stops without an error message. The
    pipe's read end is closed before kdlab starts, so that every run hits the closed pipe (with `head` it
    depends on who is faster)."""
    import os
    import subprocess
    import sys

    read_end, write_end = os.pipe()
    os.close(read_end)
    try:  # timeout: a hang guard only (the command takes about 2 s quiet)
        proc = subprocess.run(
            [sys.executable, "-m", "kdlab", "recipes"], stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=600
        )
    finally:
        os.close(write_end)
    assert proc.stderr == "" and proc.returncode == 1, (proc.returncode, proc.stderr)
