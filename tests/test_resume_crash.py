"""Crash consistency: a run SIGKILLed again and again, at seeded random moments and right as its
checkpoint files change, resumes every time and ends bit-identical to a run that was never killed.

Each attempt is a real `python -m kdlab train` process. A kill lands in one of three ways:
- "write": as soon as a checkpoint file (or its temp file) appears or changes (after letting 0-3 such
  changes pass, so that kills spread over teacher and student), plus 0-4 ms, so the
  kill falls inside the write, between the rotation of last into prev and the new last, or just after;
- "after": 20-400 ms after such a change, somewhere in the next epoch;
- "random": at a seeded fraction (0.1-1) of the time an attempt took to reach its first checkpoint
  change (imports, data loading, model building, resuming, the first steps).
After each kill every checkpoint folder of the run (the student's and the cached teacher's) must hold
a readable checkpoint once it has held one, never an older one than before, and no result.json.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kdlab import checkpoint
from kdlab.errors import CheckpointError

ROOT = Path(__file__).resolve().parents[1]
# Checkpoint events: 6 of the teacher, then 14 of the student. Each write/after kill consumes 1-2 of
# them and a random kill at most 1, so the 11 planned kills (at most 8*2 + 3 = 19 events) all land
# before the run ends, the first lands on the teacher, and the 8 write/after kills (at least 8
# events) reach past the teacher's 6 into the student.
TEACHER_EPOCHS, EPOCHS, STEPS = 6, 14, 10
TRAIN = [
    "recipes/digits/kd.yaml",
    "--set",
    f"train.epochs={EPOCHS}",
    "--set",
    f"train.max_steps_per_epoch={STEPS}",
    "--set",
    "teachers.0.name=smallcnn",
    "--set",
    f"teachers.0.train.epochs={TEACHER_EPOCHS}",
    "--quiet",
]
# one thread per process: the killed run and the reference share two cores, and the same thread
# count in both keeps their float reductions in the same order
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
SCHEDULE = ["write"] * 5 + ["after"] * 3 + ["random"] * 3  # shuffled by the seed below
SEED = 20261124


def _spawn(args: list[str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as f:
        return subprocess.Popen(
            [sys.executable, "-m", "kdlab", *args], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=f, env=ENV
        )


def _run_dirs(out: Path) -> list[Path]:
    return [out, *sorted(p for p in (out / "teachers").glob("*") if p.is_dir())]


def _watched(out: Path) -> dict[str, tuple[int, int]]:
    """Every weights file of the run and every temp file of one being written: name -> (mtime, size)."""
    seen = {}
    for run_dir in _run_dirs(out):
        for folder in (run_dir, run_dir / "checkpoints"):
            try:
                entries = list(os.scandir(folder))
            except OSError:
                continue
            for e in entries:
                if ".safetensors" in e.name:
                    try:
                        st = e.stat()
                    except OSError:
                        continue
                    seen[e.path] = (st.st_mtime_ns, st.st_size)
    return seen


def _temps(out: Path) -> list[Path]:
    return [p for p in out.rglob(".*.tmp*")]


def _newest_readable_epoch(run_dir: Path) -> int | None:
    """The epoch of the checkpoint a resume would use; last must load whenever it exists (atomic writes)."""
    ckdir = run_dir / "checkpoints"
    last, prev = ckdir / "last.safetensors", ckdir / "prev.safetensors"
    if last.exists():
        return checkpoint.load(last)[1]["epoch"]  # raises CheckpointError if a kill tore it
    if prev.exists():
        return checkpoint.load(prev)[1]["epoch"]
    return None


@pytest.mark.slow
def test_sigkill_storm_resumes_to_bit_identical_weights(tmp_path):
    t0 = time.perf_counter()
    rng = random.Random(SEED)
    schedule = SCHEDULE[:]
    rng.shuffle(schedule)
    ref_dir, out = tmp_path / "ref", tmp_path / "killed"
    stderr_log = tmp_path / "stderr.txt"
    reference = _spawn(["train", *TRAIN, "--out", str(ref_dir)], tmp_path / "ref_stderr.txt")

    kills: list[dict] = []
    best_epoch: dict[Path, int] = {}
    attempts = 0
    startup = 4.0  # seconds from a process start to its first checkpoint change, updated as observed
    while True:
        attempts += 1
        assert attempts <= len(schedule) + 6, f"no end in sight after {attempts} attempts: {kills}"
        resumable = (out / "config.yaml").exists()
        args = ["train", "--resume", str(out), "--quiet"] if resumable else ["train", *TRAIN, "--out", str(out)]
        mode = schedule[len(kills)] if len(kills) < len(schedule) else None
        started = time.monotonic()
        temps_before = set(_temps(out))  # a killed writer's temp file stays until the next resume cleans it
        proc = _spawn(args, stderr_log)
        before = _watched(out)
        # a random kill lands before this attempt's first checkpoint would (as timed on earlier attempts),
        # so it costs at most one epoch and the planned kills outlast the run whatever the machine's speed
        kill_at = started + rng.uniform(0.1, 1.0) * startup if mode == "random" else None
        if mode is None:  # every planned kill done: let it finish
            proc.wait(timeout=300)
        let_pass = rng.randint(0, 1)  # checkpoint changes let through first: kills spread over teacher and student
        first_change = True
        while proc.poll() is None and mode is not None:
            now = time.monotonic()
            if kill_at is None:
                current = _watched(out)
                if current != before:
                    if first_change:
                        startup, first_change = now - started, False
                    before = current
                    if let_pass:
                        let_pass -= 1
                    else:
                        kill_at = now + (rng.uniform(0, 0.004) if mode == "write" else rng.uniform(0.02, 0.4))
            if kill_at is not None and now >= kill_at:
                break
            # a hang detector: process start-up alone took 35 s on a loaded machine
            assert now - started < 300, "an attempt hung"
            time.sleep(0.001 if kill_at is not None else 0.002)
        if proc.poll() is not None:  # it finished (or failed) before the kill came
            assert proc.returncode == 0, stderr_log.read_text()[-2000:]
            break
        teacher_done = any((out / "teachers").glob("*/result.json"))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        torn = set(_temps(out)) - temps_before
        kills.append(
            {
                "mode": mode,
                "after_s": round(time.monotonic() - started, 3),
                "teacher_phase": not teacher_done,
                "mid_write": bool(torn),
            }
        )
        assert not (out / "result.json").exists()
        for run_dir in _run_dirs(out):
            try:
                epoch = _newest_readable_epoch(run_dir)
            except CheckpointError as e:
                pytest.fail(f"kill {len(kills)} ({kills[-1]}) left an unreadable checkpoint: {e}")
            if run_dir in best_epoch:  # once there was a checkpoint there is always one, never older
                assert epoch is not None and epoch >= best_epoch[run_dir], (run_dir, epoch, best_epoch[run_dir])
            if epoch is not None:
                best_epoch[run_dir] = epoch

    assert reference.wait(timeout=300) == 0, (tmp_path / "ref_stderr.txt").read_text()[-2000:]
    assert len(kills) >= 10, kills
    assert any(k["teacher_phase"] for k in kills), "no kill landed while the teacher was training"
    assert not all(k["teacher_phase"] for k in kills), "no kill landed while the student was training"
    # how many kills tore a write (left a temp file) depends on timing: reported below, not asserted

    for ref_run, run in zip(_run_dirs(ref_dir), _run_dirs(out)):
        a, b = checkpoint.load(ref_run / "student.safetensors")[0], checkpoint.load(run / "student.safetensors")[0]
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), f"{run.name}: weights differ from the uninterrupted run"
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        ref_rows = [json.loads(line) for line in (ref_run / "metrics.jsonl").read_text().splitlines()]
        assert [r["epoch"] for r in rows] == [r["epoch"] for r in ref_rows] == list(range(1, len(ref_rows) + 1))
        assert len(ref_rows) in (TEACHER_EPOCHS, EPOCHS)
    assert not _temps(out), "temp files of killed writers were left behind"
    ref, got = (json.loads((d / "result.json").read_text()) for d in (ref_dir, out))
    assert got["top1_last"] == ref["top1_last"] and got["top1_best"] == ref["top1_best"]
    print(
        f"\ncrash storm: {len(kills)} SIGKILLs survived "
        f"({sum(k['mid_write'] for k in kills)} inside a checkpoint write, "
        f"{sum(k['teacher_phase'] for k in kills)} during teacher training), {attempts} processes, "
        f"final weights bit-identical; {time.perf_counter() - t0:.1f} s"
    )
    for i, k in enumerate(kills, 1):
        print(f"  kill {i:2d}: {k}")
