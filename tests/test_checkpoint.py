"""Checkpoints end to end: every corruption and every bit flip of a checkpoint is detected and named,
`--resume` falls back to the previous checkpoint and ends bit-identical to an uninterrupted run, and a
full disk or Ctrl-C while a checkpoint (or the metrics line) is written loses nothing.

The kill-and-resume storm is in test_resume_crash.py.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import ok, refused, stopped_copy, stopped_runs, weights

from kdlab import checkpoint
from kdlab.cli import main
from kdlab.errors import CheckpointError

ROOT = Path(__file__).resolve().parents[1]
VANILLA = str(ROOT / "recipes" / "digits" / "vanilla.yaml")
QUICK = ["--set", "train.epochs=3", "--set", "train.max_steps_per_epoch=2", "--quiet"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A finished 3-epoch vanilla run (the reference) and the same run stopped after epoch 2."""
    return stopped_runs(tmp_path_factory.mktemp("runs"))


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------------------------
# Integrity: truncation and bit flips are detected, and --resume falls back to prev


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
# A full disk while a checkpoint is written


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
