"""Reliability and security end to end, through the CLI: corrupt and untrusted files, NaN/Inf losses,
broken data, a full disk, and two runs fighting over one directory.

Every refusal is checked the same way: exit code 2, exactly one line on stderr that names the
problem (the file, the term, the directory), no traceback, and no result.json left behind.
The kill-and-resume storm is in test_reliability_crash.py, the fuzzed recipes in test_reliability_fuzz.py.
"""

from __future__ import annotations

import errno
import io
import json
import math
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from pydantic import ConfigDict

from kdlab import checkpoint
from kdlab.cli import main
from kdlab.errors import CheckpointError
from kdlab.losses import TERMS, Term, TermOptions
from kdlab.progress import Progress

ROOT = Path(__file__).resolve().parents[1]
VANILLA = str(ROOT / "recipes" / "digits" / "vanilla.yaml")
KD = str(ROOT / "recipes" / "digits" / "kd.yaml")
QUICK = ["--set", "train.epochs=3", "--set", "train.max_steps_per_epoch=2", "--quiet"]
TINY = ["--set", "train.epochs=1", "--set", "train.max_steps_per_epoch=1", "--quiet"]


def sets(*items: str) -> list[str]:
    return [a for item in items for a in ("--set", item)]


def refused(capsys, args: list[str], *names: str) -> str:
    """Run the CLI in-process; it must exit 2 with one stderr line naming each of `names`."""
    rc = main(args)
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kdlab: error: "), err
    assert "Traceback" not in err
    for name in names:
        assert str(name) in lines[0], (name, lines[0])
    return lines[0]


def ok(capsys, args: list[str]) -> None:
    rc = main(args)
    captured = capsys.readouterr()
    assert rc == 0, captured.err


def weights(path: Path) -> dict[str, torch.Tensor]:
    return checkpoint.load(path)[0]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def interrupt_after_epoch(monkeypatch, epoch: int) -> None:
    """Ctrl-C right after `epoch` is on disk (the CLI then exits 130, as at a terminal)."""
    real = Progress.end_epoch

    def end_epoch(self, row):
        real(self, row)
        if row["epoch"] == epoch:
            raise KeyboardInterrupt

    monkeypatch.setattr(Progress, "end_epoch", end_epoch)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A finished 3-epoch vanilla run (the reference) and the same run stopped after epoch 2."""
    base = tmp_path_factory.mktemp("runs")
    assert main(["train", VANILLA, "--out", str(base / "reference"), *QUICK]) == 0
    with pytest.MonkeyPatch.context() as mp:
        interrupt_after_epoch(mp, 2)
        assert main(["train", VANILLA, "--out", str(base / "stopped"), *QUICK]) == 130
    ck = base / "stopped" / "checkpoints"
    assert checkpoint.load(ck / "last.safetensors")[1]["epoch"] == 2
    assert checkpoint.load(ck / "prev.safetensors")[1]["epoch"] == 1
    assert not (base / "stopped" / "result.json").exists()
    return base


def stopped_copy(runs: Path, dest: Path) -> Path:
    shutil.copytree(runs / "stopped", dest)
    return dest


# ----------------------------------------------------------------------------------------------
# 2. Integrity: truncation and bit flips are detected, and --resume falls back to prev


def corruptions(raw: bytes) -> dict[str, bytes]:
    header_end = 8 + int.from_bytes(raw[:8], "little")
    meta_at = raw.index(b'"epoch')  # inside the kdlab metadata JSON (header)
    data_at = header_end + (len(raw) - header_end) // 2

    def flip(at: int, bit: int = 0) -> bytes:
        b = bytearray(raw)
        b[at] ^= 1 << bit
        return bytes(b)

    return {
        "empty": b"",
        "7 bytes": raw[:7],
        "header cut": raw[: header_end // 2],
        "half": raw[: len(raw) // 2],
        "last byte missing": raw[:-1],
        "bit flip in tensor data": flip(data_at, 3),
        "bit flip in last byte": flip(len(raw) - 1, 7),
        "bit flip in header length": flip(2, 1),
        "bit flip in epoch metadata": flip(meta_at + len('"epoch": '), 0),
        "bit flip in tensor name": flip(raw.index(b"model.student") + 7, 1),
        "zeroed": bytes(len(raw)),
        "appended junk": raw + b"\0" * 16,
    }


def test_every_corruption_of_a_checkpoint_is_named(runs, tmp_path):
    raw = (runs / "stopped" / "checkpoints" / "last.safetensors").read_bytes()
    tried = 0
    for what, data in corruptions(raw).items():
        path = tmp_path / f"{what.replace(' ', '_')}.safetensors"
        path.write_bytes(data)
        with pytest.raises(CheckpointError) as info:
            checkpoint.load(path)
        assert str(path) in str(info.value), (what, info.value)
        assert "\n" not in str(info.value)
        tried += 1
    print(f"\ncorrupt checkpoints detected: {tried}")


def test_every_single_bit_flip_of_a_small_checkpoint_is_detected(tmp_path):
    """Exhaustive: each of the file's bits flipped in turn, metadata (epoch, lr) and header included."""
    path = tmp_path / "tiny.safetensors"
    checkpoint.save(
        path,
        {"w": torch.arange(6.0).reshape(2, 3), "rng.torch": torch.arange(5, dtype=torch.uint8)},
        {"epoch": 7, "param_groups": [{"lr": 0.05, "momentum": 0.9}]},
    )
    raw = path.read_bytes()
    assert checkpoint.load(path)[1]["epoch"] == 7
    bad = tmp_path / "flipped.safetensors"
    missed = []
    for at in range(len(raw)):
        for bit in range(8):
            b = bytearray(raw)
            b[at] ^= 1 << bit
            bad.write_bytes(bytes(b))
            try:
                checkpoint.load(bad)
            except CheckpointError:
                continue
            missed.append((at, bit, raw[at : at + 1]))
    assert not missed, f"{len(missed)} undetected flips, e.g. {missed[:5]}"
    print(f"\nsingle-bit flips detected: {len(raw) * 8} of {len(raw) * 8}")


def test_external_safetensors_without_kdlab_metadata_still_load(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "from_elsewhere.safetensors"
    save_file({"w": torch.ones(3)}, str(path))
    assert torch.equal(checkpoint.load(path)[0]["w"], torch.ones(3))


@pytest.mark.parametrize("damage", ["half", "bit flip in tensor data", "bit flip in epoch metadata"])
def test_resume_falls_back_to_prev_and_matches_an_uninterrupted_run(runs, tmp_path, capsys, damage):
    run = stopped_copy(runs, tmp_path / "run")
    last = run / "checkpoints" / "last.safetensors"
    last.write_bytes(corruptions(last.read_bytes())[damage])
    ok(capsys, ["train", "--resume", str(run), "--quiet"])
    log = (run / "log.txt").read_text()
    assert f"warning: {last}" in log and "trying the previous checkpoint" in log and "resuming after epoch 1" in log
    # epoch 2 was trained again from prev, and came out the same as the first time
    assert_same_weights(weights(runs / "reference" / "student.safetensors"), weights(run / "student.safetensors"))
    assert [json.loads(r)["epoch"] for r in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_resume_with_every_checkpoint_corrupt_is_refused(runs, tmp_path, capsys):
    run = stopped_copy(runs, tmp_path / "run")
    for name in ("last", "prev"):
        path = run / "checkpoints" / f"{name}.safetensors"
        path.write_bytes(path.read_bytes()[:100])
    refused(capsys, ["train", "--resume", str(run)], run / "checkpoints", "truncated")
    assert not (run / "result.json").exists()


# ----------------------------------------------------------------------------------------------
# 3. Untrusted files: pickles are never unpickled


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


# ----------------------------------------------------------------------------------------------
# 5. Numerical faults: NaN / Inf in a loss term


class _Poison(Term):
    """Test-only term: 0 on every training call but one, where it returns `value` (NaN, Inf)."""

    needs_teacher = False

    class Options(TermOptions):
        model_config = ConfigDict(
            allow_inf_nan=True
        )  # real terms refuse NaN/inf options; this one exists to inject them
        at_call: int = 0
        value: float = math.nan

    def __init__(self, opts, student, teachers):
        super().__init__(opts, student, teachers)
        self.calls = 0

    def forward(self, out):
        zero = out.logits.float().sum() * 0.0
        if self.training:
            self.calls += 1
            if self.calls - 1 == self.opts.at_call:
                return zero + self.opts.value
        return zero


@pytest.fixture
def poison(monkeypatch):
    name = f"poison_{uuid.uuid4().hex[:8]}"
    cls = type("Poison", (_Poison,), {"name": name})
    monkeypatch.setitem(TERMS, name, cls)
    yield name
    assert name in TERMS  # monkeypatch removes it after the test


@pytest.mark.parametrize("value, call, epoch, step", [(".nan", 4, 3, 0), (".inf", 3, 2, 1), ("-.inf", 0, 1, 0)])
def test_nonfinite_term_stops_with_epoch_step_term_and_value(poison, tmp_path, capsys, value, call, epoch, step):
    out = tmp_path / "run"
    line = refused(
        capsys,
        [
            "train",
            VANILLA,
            "--out",
            str(out),
            *QUICK,
            *sets(f"loss.terms.{poison}={{at_call: {call}, value: {value}}}"),
        ],
        f"epoch {epoch} step {step}",
        f"term {poison}",
        f"{poison}={value.replace('.', '')}",
    )
    last = out / "checkpoints" / "last.safetensors"
    if epoch == 1:  # no checkpoint to name: the message must not point at one
        assert not last.exists() and "nothing was checkpointed" in line and "last good checkpoint" not in line
    else:
        assert f"last good checkpoint (epoch {epoch - 1}) is kept in {last}" in line
        assert checkpoint.load(last)[1]["epoch"] == epoch - 1  # the previous epoch's, untouched
    assert not (out / "result.json").exists()


def test_nonfinite_skip_skips_the_step_and_finishes(poison, tmp_path, capsys):
    out = tmp_path / "run"
    ok(
        capsys,
        [
            "train",
            VANILLA,
            "--out",
            str(out),
            *QUICK,
            *sets(f"loss.terms.{poison}={{at_call: 4}}", "train.nonfinite=skip"),
        ],
    )
    log = (out / "log.txt").read_text()
    assert "epoch 3 step 0: non-finite loss, step skipped" in log and f"{poison}=nan" in log
    assert all(torch.isfinite(t).all() for t in weights(out / "student.safetensors").values())
    assert json.loads((out / "result.json").read_text())["epochs"] == 3


@pytest.mark.parametrize("clip", [0.5, None])
def test_grad_clip_bounds_the_step(tmp_path, capsys, clip):
    """One plain SGD step (no momentum, no decay) on a loss scaled by 1e6: |dtheta| = lr * clip exactly."""
    out, lr = tmp_path / "run", 0.1
    extra = [
        "loss.ce=1e6",
        f"train.lr={lr}",
        "train.momentum=0",
        "train.weight_decay=0",
        "train.schedule.type=constant",
        "train.keep_epochs=[0]",
    ] + ([f"train.grad_clip={clip}"] if clip else [])
    ok(capsys, ["train", VANILLA, "--out", str(out), *TINY, *sets(*extra)])
    before, after = weights(out / "checkpoints" / "epoch_0.safetensors"), weights(out / "student.safetensors")
    from kdlab import models

    params = [n for n, _ in models.create("smallcnn", num_classes=10, in_chans=1).named_parameters()]
    step = math.sqrt(sum(float((after[n].double() - before[n].double()).pow(2).sum()) for n in params))
    if clip:
        assert step == pytest.approx(lr * clip, rel=1e-3)
    else:
        assert step > 100 * lr * 0.5  # control: unclipped, the same step is huge


# ----------------------------------------------------------------------------------------------
# 6. Data faults at the command line


def _cifar100_objects(n_train=40, n_test=20):
    rng = np.random.default_rng(0)
    objs = {}
    for split, n in (("train", n_train), ("test", n_test)):
        fine = [int(v) for v in rng.integers(0, 100, n)]
        objs[split] = {
            b"fine_labels": fine,
            b"coarse_labels": [v // 5 for v in fine],
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"batch_label": b"x",
        }
    objs["meta"] = {
        b"fine_label_names": [f"c{i}".encode() for i in range(100)],
        b"coarse_label_names": [f"s{i}".encode() for i in range(20)],
    }
    return objs


def _cifar_folder(parent: Path, objs: dict) -> Path:
    folder = parent / "cifar-100-python"
    folder.mkdir(parents=True)
    for name, obj in objs.items():
        (folder / name).write_bytes(pickle.dumps(obj, protocol=3))
    return folder


def _cifar_tar(path: Path, objs: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tf:
        for name, obj in objs.items():
            data = pickle.dumps(obj, protocol=3)
            info = tarfile.TarInfo(f"cifar-100-python/{name}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def test_cifar_faults_are_named_at_the_cli(tmp_path, capsys):
    def train_on(root, *names):
        out = tmp_path / f"out_{uuid.uuid4().hex[:6]}"
        refused(
            capsys,
            [
                "train",
                VANILLA,
                "--out",
                str(out),
                *TINY,
                *sets("data.name=cifar100", f"data.root={root}", "train.batch_size=16"),
            ],
            *names,
        )
        assert not (out / "result.json").exists()

    good = _cifar100_objects()
    assert (
        main(
            [
                "train",
                VANILLA,
                "--out",
                str(tmp_path / "control"),
                *TINY,
                *sets(
                    "data.name=cifar100", f"data.root={_cifar_folder(tmp_path / 'good', good)}", "train.batch_size=16"
                ),
            ]
        )
        == 0
    )  # control
    capsys.readouterr()
    tar = _cifar_tar(tmp_path / "cut" / "cifar-100-python.tar.gz", good)
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])
    train_on(tar, tar)
    shapes = _cifar100_objects()
    shapes["train"][b"data"] = shapes["train"][b"data"][:, :3000]
    train_on(_cifar_folder(tmp_path / "shape", shapes), tmp_path / "shape" / "cifar-100-python" / "train", "3072")
    labels = _cifar100_objects()
    labels["test"][b"fine_labels"][3] = 100
    train_on(_cifar_folder(tmp_path / "labels", labels), tmp_path / "labels" / "cifar-100-python" / "test", "label 100")
    train_on(tmp_path / "nowhere", tmp_path / "nowhere")


def test_empty_class_folder_is_named_at_the_cli(tmp_path, capsys):
    from PIL import Image

    root = tmp_path / "images"
    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            (root / split / cls).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(root / split / cls / f"{i}.png")
    (root / "train" / "emu").mkdir()
    out = tmp_path / "out"
    refused(
        capsys,
        [
            "train",
            VANILLA,
            "--out",
            str(out),
            *TINY,
            *sets("data.name=imagefolder", f"data.root={root}", "data.image_size=8", "train.batch_size=2"),
        ],
        root / "train" / "emu",
    )
    assert not (out / "result.json").exists()


# ----------------------------------------------------------------------------------------------
# 7. A full disk while a checkpoint is written


def _fail_checkpoint_write(monkeypatch, nth: int, exc: BaseException) -> list[Path]:
    """The nth write of checkpoints/last.safetensors gets half its bytes on disk, then `exc`."""
    real_open, seen = open, []

    class HalfWriter:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            self.f.write(data[: len(data) // 2])
            raise exc

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return self.f.__exit__(*a)

    def fake_open(path, mode="r", *a, **k):
        f = real_open(path, mode, *a, **k)
        if "w" in mode and Path(path).name.startswith(".last.safetensors.tmp"):
            seen.append(Path(path))
            if len(seen) == nth:
                return HalfWriter(f)
        return f

    monkeypatch.setattr(checkpoint, "open", fake_open, raising=False)  # shadows the builtin in that module only
    return seen


def test_disk_full_during_a_checkpoint_write(runs, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    seen = _fail_checkpoint_write(monkeypatch, 3, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    refused(
        capsys,
        ["train", VANILLA, "--out", str(out), *QUICK],
        out / "checkpoints" / "last.safetensors",
        "No space left on device",
    )
    assert len(seen) == 3 and not seen[-1].exists()
    ckdir = out / "checkpoints"
    assert not [p.name for p in ckdir.iterdir() if ".tmp" in p.name]  # no stray temp file
    newest = ckdir / "last.safetensors" if (ckdir / "last.safetensors").exists() else ckdir / "prev.safetensors"
    assert checkpoint.load(newest)[1]["epoch"] == 2  # epoch 2 is intact
    assert not (out / "result.json").exists()
    monkeypatch.undo()
    ok(capsys, ["train", "--resume", str(out), "--quiet"])  # space freed: it finishes, losing nothing
    assert_same_weights(weights(runs / "reference" / "student.safetensors"), weights(out / "student.safetensors"))


def test_disk_full_while_appending_the_metrics_line(runs, tmp_path, capsys, monkeypatch):
    import kdlab.train as train_module

    out = tmp_path / "run"
    real_open = open
    appends = []

    class FullDisk:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return self.f.__exit__(*a)

        def write(self, data):
            self.f.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(out / "metrics.jsonl"))

    def fake_open(path, mode="r", *a, **k):
        f = real_open(path, mode, *a, **k)
        if "a" in mode and Path(path).name == "metrics.jsonl":
            appends.append(path)
            if len(appends) == 2:
                return FullDisk(f)
        return f

    monkeypatch.setattr(train_module, "open", fake_open, raising=False)  # shadows the builtin in kdlab.train only
    refused(capsys, ["train", VANILLA, "--out", str(out), *QUICK], "metrics.jsonl", "No space left on device")
    assert len(appends) == 2 and not (out / "result.json").exists()
    assert checkpoint.load(out / "checkpoints" / "last.safetensors")[1]["epoch"] == 1  # epoch 1 is intact
    monkeypatch.undo()
    ok(capsys, ["train", "--resume", str(out), "--quiet"])  # space freed: the cut line is rewritten, nothing is lost
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert_same_weights(weights(runs / "reference" / "student.safetensors"), weights(out / "student.safetensors"))


def test_ctrl_c_during_a_checkpoint_write_leaves_no_temp_file(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    _fail_checkpoint_write(monkeypatch, 2, KeyboardInterrupt())
    assert main(["train", VANILLA, "--out", str(out), *QUICK]) == 130
    capsys.readouterr()
    assert not list((out / "checkpoints").glob(".*tmp*"))
    assert checkpoint.load(out / "checkpoints" / "prev.safetensors")[1]["epoch"] == 1


def test_temp_files_of_dead_writers_are_cleaned_on_resume(runs, tmp_path, capsys):
    run = stopped_copy(runs, tmp_path / "run")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    torn = run / "checkpoints" / f".last.safetensors.tmp{dead.pid}"
    torn.write_bytes(b"half a checkpoint")
    ok(capsys, ["train", "--resume", str(run), "--quiet"])
    assert not torn.exists()


# ----------------------------------------------------------------------------------------------
# 8. One writer per run directory


def _wait_for(paths: list[Path], proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not all(p.exists() for p in paths):
        assert proc.poll() is None, "the first run ended before it could be observed"
        assert time.monotonic() < deadline
        time.sleep(0.005)


def test_second_writer_is_refused_and_a_killed_owner_is_taken_over(tmp_path, capsys):
    out = tmp_path / "run"
    first = subprocess.Popen(
        [sys.executable, "-m", "kdlab", "train", VANILLA, "--out", str(out), *QUICK],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        _wait_for([out / ".lock", out / "config.yaml"], first)
        first.send_signal(signal.SIGSTOP)  # alive but frozen: it holds the directory as long as we like
        assert (out / ".lock").read_text().split()[1] == str(first.pid)
        refused(capsys, ["train", VANILLA, "--out", str(out), *QUICK], out, "in use", f"pid {first.pid}")
        refused(capsys, ["train", "--resume", str(out)], out, "in use")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert (out / ".lock").read_text().split()[1] == str(first.pid)  # left behind by the killed run
    ok(capsys, ["train", "--resume", str(out), "--quiet"])
    assert (out / "result.json").exists() and not (out / ".lock").exists()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_lock_of_a_dead_pid_is_taken_over(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").write_text(f"{socket.gethostname()} {_dead_pid()}")
    ok(capsys, ["train", VANILLA, "--out", str(out), *TINY])
    assert (out / "result.json").exists() and not (out / ".lock").exists()


def test_lock_naming_a_reused_pid_is_taken_over(tmp_path, capsys):
    """After a crash its pid may belong to an unrelated process: nobody holds the lock, so it is stale."""
    out = tmp_path / "run"
    out.mkdir()
    unrelated = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / ".lock").write_text(f"{socket.gethostname()} {unrelated.pid}")
        ok(capsys, ["train", VANILLA, "--out", str(out), *TINY])
    finally:
        unrelated.kill()
        unrelated.wait()
    assert (out / "result.json").exists()


def test_lock_of_another_host_is_not_broken(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").write_text("some-other-host 4242")
    refused(capsys, ["train", VANILLA, "--out", str(out), *TINY], out, "some-other-host", out / ".lock")


def test_unusable_output_directory_is_one_line(tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    refused(capsys, ["train", VANILLA, "--out", str(a_file / "run"), *TINY], a_file / "run")
    refused(capsys, ["train", VANILLA, "--out", str(a_file), *TINY], a_file)
    refused(capsys, ["train", VANILLA, "--out", "/proc/kdlab-cannot-be-here", *TINY], "/proc/kdlab-cannot-be-here")
