"""Untrusted files: kdlab never unpickles. Pickled checkpoints, teacher weights (.pt, .pth.tar,
safetensors, a run directory), a poisoned teacher cache and YAML with Python tags are all refused with
one line naming the file, and the payloads are shown to be live first. CIFAR's own pickles go through
a restricted unpickler: test_data.py.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
import yaml
from helpers import ok, refused, sets, stopped_copy, stopped_runs

ROOT = Path(__file__).resolve().parents[1]
VANILLA = str(ROOT / "recipes" / "digits" / "vanilla.yaml")
KD = str(ROOT / "recipes" / "digits" / "kd.yaml")
TINY = ["--set", "train.epochs=1", "--set", "train.max_steps_per_epoch=1", "--quiet"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A finished 3-epoch vanilla run (the reference) and the same run stopped after epoch 2."""
    return stopped_runs(tmp_path_factory.mktemp("runs"))


class OpenForWriting:
    """Unpickling this calls open(marker, 'w'): the marker file appears iff the pickle ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


class ShellTouch:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def evil(tmp_path):
    """Malicious files (raw pickles and a torch.save zip) and the marker they would create."""
    marker = tmp_path / "PWNED"
    d = tmp_path / "evil"
    d.mkdir()
    files = {
        "pickle": pickle.dumps(OpenForWriting(marker)),
        "pickle_os_system": pickle.dumps({"state_dict": ShellTouch(marker)}, protocol=2),
    }
    torch.save({"state_dict": OpenForWriting(marker)}, d / "evil.pt")
    files["torch_zip"] = (d / "evil.pt").read_bytes()
    assert not marker.exists()
    return marker, d, files


def test_control_the_payloads_are_live(evil, tmp_path):
    """Without kdlab's guards each payload does run: the refusal tests below can fail."""
    marker, d, files = evil
    for name in ("pickle", "pickle_os_system"):
        pickle.loads(files[name])
        assert marker.exists(), name
        marker.unlink()
    torch.load(d / "evil.pt", weights_only=False)
    assert marker.exists()
    marker.unlink()
    (d / "evil.yaml").write_text(f"x: !!python/object/apply:os.system ['touch {marker}']\n")
    yaml.unsafe_load((d / "evil.yaml").read_text())
    assert marker.exists()
    marker.unlink()


def test_pickled_checkpoints_are_refused_on_resume(runs, evil, tmp_path, capsys):
    marker, _, files = evil
    for kind in ("pickle", "pickle_os_system", "torch_zip"):
        run = stopped_copy(runs, tmp_path / f"run_{kind}")
        for name in ("last", "prev"):
            (run / "checkpoints" / f"{name}.safetensors").write_bytes(files[kind])
        line = refused(capsys, ["train", "--resume", str(run)], run / "checkpoints")
        assert "never unpickles" in line
        assert not marker.exists() and not (run / "result.json").exists()


@pytest.mark.parametrize("form", ["pt", "pth_tar", "safetensors", "run_dir", "run_dir_os_system"])
def test_pickled_teacher_weights_are_refused(evil, tmp_path, capsys, form):
    marker, d, files = evil
    if form == "pt":
        target = named = d / "evil.pt"
    elif form == "pth_tar":
        target = named = d / "evil.pth.tar"
        target.write_bytes(files["pickle"])
    elif form == "safetensors":
        target = named = d / "evil.safetensors"
        target.write_bytes(files["pickle"])
    else:
        target = d / "run"
        target.mkdir()
        (target / "student.safetensors").write_bytes(
            files["pickle_os_system" if form.endswith("os_system") else "torch_zip"]
        )
        (target / "result.json").write_text("{}")
        named = target / "student.safetensors"
    out = tmp_path / "out"
    line = refused(capsys, ["train", KD, "--out", str(out), *TINY, *sets(f"teachers.0.weights={target}")], named)
    assert "refused" in line or "never unpickles" in line
    assert not marker.exists() and not (out / "result.json").exists()
    if form.startswith("run_dir"):  # and kdlab eval on that directory
        refused(capsys, ["eval", str(target)], named)
        assert not marker.exists()


def test_poisoned_teacher_cache_is_refused(evil, tmp_path, capsys):
    marker, _, files = evil
    cache = tmp_path / "cache"
    ok(capsys, ["train", KD, "--out", str(tmp_path / "first"), *TINY, *sets(f"cache_dir={cache}")])
    [cached] = list(cache.glob("*/student.safetensors"))
    cached.write_bytes(files["pickle"])
    refused(capsys, ["train", KD, "--out", str(tmp_path / "second"), *TINY, *sets(f"cache_dir={cache}")], cached)
    assert not marker.exists() and not (tmp_path / "second" / "result.json").exists()


def test_yaml_with_python_tags_is_refused(runs, evil, tmp_path, capsys):
    marker, d, _ = evil
    tag = f"!!python/object/apply:os.system ['touch {marker}']"
    recipe = tmp_path / "evil_recipe.yaml"
    recipe.write_text(Path(VANILLA).read_text() + f"note: {tag}\n")
    refused(capsys, ["train", str(recipe), "--out", str(tmp_path / "r")], recipe, "invalid YAML")
    run = stopped_copy(runs, tmp_path / "run")
    (run / "config.yaml").write_text((run / "config.yaml").read_text() + f"note: {tag}\n")
    refused(capsys, ["train", "--resume", str(run)], run / "config.yaml", "invalid YAML")
    assert not marker.exists()
