"""The output folder (`--out`): a folder that is not a kdlab run, or cannot be one, is refused and left as
it was; the folder of a failed attempt takes the corrected rerun; a folder holding a run is only
resumed; a fresh start there drops the old recipe's stages.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from helpers import ok, refused, sets

from kdlab import checkpoint
from kdlab.recipe_files import dump, load_recipe

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "recipes" / "digits"
KD = str(DIGITS / "kd.yaml")
VANILLA = str(DIGITS / "vanilla.yaml")
QUICK = ["--set", "train.epochs=2", "--set", "train.max_steps_per_epoch=2", "--quiet"]
TINY = ["--set", "train.epochs=1", "--set", "train.max_steps_per_epoch=1", "--quiet"]

# ----------------------------------------------------------------------------------------------
# A folder that is not a kdlab run is never written into


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


def test_unusable_output_directory_is_one_line(tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    refused(capsys, ["train", VANILLA, "--out", str(a_file / "run"), *TINY], a_file / "run")
    refused(capsys, ["train", VANILLA, "--out", str(a_file), *TINY], a_file)
    refused(capsys, ["train", VANILLA, "--out", "/proc/kdlab-cannot-be-here", *TINY], "/proc/kdlab-cannot-be-here")


# ----------------------------------------------------------------------------------------------
# A failed first attempt does not block the corrected rerun; a run is only resumed


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
