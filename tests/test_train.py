"""End to end on the embedded digits data: run directory layout, determinism, kill and resume, learning."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import HANG_S, wait_until

from kdlab import checkpoint, models, pipeline
from kdlab.recipe_files import load_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes" / "digits"


def quick(recipe: str, *extra: str, epochs: int = 2, steps: int = 3):
    return load_recipe(RECIPES / recipe, [f"train.epochs={epochs}", f"train.max_steps_per_epoch={steps}", *extra])


def student_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return checkpoint.load(run_dir / "student.safetensors")[0]


def test_run_directory_holds_everything(tmp_path):
    out = tmp_path / "kd"
    result = pipeline.run(quick("kd.yaml"), out, quiet=True)
    assert (out / "config.yaml").exists()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    for key in ("lr", "train_loss", "train_ce", "train_kd", "test_top1", "test_top5", "seconds"):
        assert key in rows[-1], key
    assert rows[-1]["train_loss"] == pytest.approx(rows[-1]["train_ce"] + rows[-1]["train_kd"], rel=1e-5)
    assert list((out / "tb").glob("events.out.tfevents.*"))
    assert (out / "checkpoints" / "last.safetensors").exists()
    saved = json.loads((out / "result.json").read_text())
    for key in ("top1_last", "top1_best", "top5_last", "epochs", "seed", "params"):
        assert key in saved
    assert saved == result
    assert saved["top1_last"] == rows[-1]["test_top1"]
    assert saved["top1_best"] == max(r["test_top1"] for r in rows)
    plain = models.create("smallcnn_narrow", num_classes=10, in_chans=1)  # the digits recipes' student
    assert saved["params"] == sum(p.numel() for p in plain.parameters())
    weights = student_weights(out)
    assert set(weights) == set(plain.state_dict())  # the plain model's state dict, nothing else
    plain.load_state_dict(weights)
    # the teacher was trained once into the cache inside the run directory
    assert len(list((out / "teachers").glob("smallcnn_wide-*/result.json"))) == 1


def test_same_seed_gives_bit_identical_weights_and_other_seed_differs(tmp_path):
    pipeline.run(quick("vanilla.yaml"), tmp_path / "a", quiet=True)
    pipeline.run(quick("vanilla.yaml"), tmp_path / "b", quiet=True)
    pipeline.run(quick("vanilla.yaml", "seed=1"), tmp_path / "c", quiet=True)
    a, b, c = (student_weights(tmp_path / n) for n in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_teacher_is_reused_from_the_cache(tmp_path):
    cache = tmp_path / "cache"
    pipeline.run(quick("kd.yaml", f"cache_dir={cache}"), tmp_path / "kd", quiet=True)
    stamp = {p: p.stat().st_mtime_ns for p in cache.rglob("student.safetensors")}
    pipeline.run(quick("at.yaml", f"cache_dir={cache}"), tmp_path / "at", quiet=True)
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("student.safetensors")} == stamp


def test_refuses_to_overwrite_a_finished_run(tmp_path):
    from kdlab.errors import ConfigError

    pipeline.run(quick("vanilla.yaml", epochs=1, steps=1), tmp_path / "r", quiet=True)
    before = (tmp_path / "r" / "result.json").read_text()
    with pytest.raises(ConfigError, match="finished run"):
        pipeline.run(quick("vanilla.yaml", epochs=1, steps=1), tmp_path / "r", quiet=True)
    assert (tmp_path / "r" / "result.json").read_text() == before


def test_learns_well_above_chance(tmp_path):
    # the digits student (smallcnn_narrow, 4,370 parameters) reached 56% after 4 epochs, 96% after 12
    result = pipeline.run(load_recipe(RECIPES / "vanilla.yaml", ["train.epochs=6"]), tmp_path / "v", quiet=True)
    assert result["top1_last"] > 60.0  # chance is 10%


def _kdlab(*args, **kw):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "kdlab", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, **kw
    )


def _epochs_done(run_dir: Path) -> int:
    path = run_dir / "checkpoints" / "last.safetensors"
    try:
        return checkpoint.load(path)[1]["epoch"]
    except Exception:
        return 0


@pytest.mark.parametrize("extra", [[], ["--set", "data.val_split=150"]], ids=["no-val", "val-split"])
def test_killed_run_resumes_to_the_same_weights(tmp_path, extra):
    args = ["recipes/digits/kd.yaml", "--set", "train.epochs=4", "--set", "train.max_steps_per_epoch=6", "--quiet"]
    args += extra
    ref = _kdlab("train", *args, "--out", str(tmp_path / "ref"), cwd=ROOT)
    assert ref.wait(timeout=HANG_S) == 0, ref.stdout.read().decode()

    run_dir = tmp_path / "killed"
    proc = _kdlab("train", *args, "--out", str(run_dir), cwd=ROOT)
    wait_until(lambda: _epochs_done(run_dir) >= 2, proc, "the checkpoint of epoch 2")  # the kill is decided by it
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "result.json").exists()

    resumed = _kdlab("train", "--resume", str(run_dir), "--quiet", cwd=ROOT)
    out = resumed.communicate(timeout=HANG_S)[0].decode()
    assert resumed.returncode == 0, out
    a, b = student_weights(tmp_path / "ref"), student_weights(run_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    ref_rows = [json.loads(line) for line in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    for r in (*rows, *ref_rows):
        r.pop("seconds")
    assert rows == ref_rows  # the validation columns too
    assert ("val_top1" in rows[-1]) == bool(extra)
    done = [json.loads((d / "result.json").read_text()) for d in (tmp_path / "ref", run_dir)]
    keys = ("top1_last", "top1_best", "top1_selected", "selected_epoch", "selected_on")
    assert [{k: r[k] for k in keys} for r in done] == [{k: done[0][k] for k in keys}] * 2


def test_sequential_methods_share_generation_zero(tmp_path):
    cache = tmp_path / "cache"
    ban = pipeline.run(quick("ban.yaml", f"cache_dir={cache}", epochs=1, steps=2), tmp_path / "ban", quiet=True)
    sfeed = pipeline.run(quick("sfeed.yaml", f"cache_dir={cache}", epochs=1, steps=2), tmp_path / "sfeed", quiet=True)
    gen0 = list(cache.glob("smallcnn_narrow-*/result.json"))
    assert len(gen0) == 1  # one vanilla generation 0, trained once
    assert ban["generations"][0] == sfeed["generations"][0]
    assert [g["generation"] for g in ban["generations"]] == [0, 1, 2]
    assert (tmp_path / "ban" / "generations" / "gen1" / "student.safetensors").exists()


def test_generation_can_start_from_the_previous_one(tmp_path):
    cache = tmp_path / "cache"
    r = quick("sfeed.yaml", f"cache_dir={cache}", "generations=1", "generation_init=previous", epochs=1, steps=1)
    pipeline.run(r, tmp_path / "prev", quiet=True)
    fresh = quick("sfeed.yaml", f"cache_dir={cache}", "generations=1", epochs=1, steps=1)
    pipeline.run(fresh, tmp_path / "fresh", quiet=True)
    gen0 = checkpoint.load(next(cache.glob("smallcnn_narrow-*/student.safetensors")))[0]
    prev, new = student_weights(tmp_path / "prev"), student_weights(tmp_path / "fresh")
    # one SGD step from generation 0 stays close to it; a fresh init does not
    key = "stage3.conv.weight"
    assert (prev[key] - gen0[key]).abs().max() < (new[key] - gen0[key]).abs().max()
