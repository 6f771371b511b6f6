"""Crash consistency: a run SIGKILLed again and again, at seeded epochs of its teacher and of its
student and right as its checkpoint files change, resumes every time and ends bit-identical to a run
that was never killed.

Each attempt is a real `python -m kdlab train` process. Every kill is decided by what the run has
written, never by the clock, so that each phase the test covers is hit whatever the machine's speed
(a loaded 2-core machine is 5-10x slower than a quiet one). The plan names, per kill, a phase
(teacher or student), an epoch k and a mode:
- "write": as soon as this attempt appends the metrics row of an epoch >= k (train.py writes the row,
  then the epoch's checkpoint), kill when the checkpoint's temp file appears or the write is over,
  whichever the poll sees first: the kill falls inside the write, between the rotation of last into
  prev and the new last, or just after;
- "after": once that epoch's checkpoint is complete, wait a seeded fraction (0.1-0.9) of the epoch's
  own duration (its metrics row's "seconds"), so the kill lands inside the next epoch;
- "random": before this attempt writes anything, at a seeded fraction (0.1-0.9) of the time earlier
  attempts took to write their first row (imports, data loading, model building, resuming).
Epochs k leave at least one epoch of the phase after the kill, so each kill lands before the phase
ends. After each kill every checkpoint folder of the run (the student's and the cached teacher's) must
hold a readable checkpoint once it has held one, never an older one than before, and no result.json.
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
SEED = 20261124
# A hang guard, not a timing: one attempt took up to 35 s to start on a loaded machine and a whole
# run about 60 s; 600 s is 10x that.
HANG_S = 600


def _plan(rng: random.Random) -> list[dict]:
    """11 kills in the order they land: 4 on the teacher, then 7 on the student (5 write, 3 after, 3 random).
    "after" epochs stop three short of the phase's end: should the machine speed up (the reference run
    ends beside it), the kill may spill past the next epoch, and still lands before the phase ends."""
    plan = []
    for phase, epochs, modes in (
        ("teacher", TEACHER_EPOCHS, ["write", "write", "after", "random"]),
        ("student", EPOCHS, ["write", "write", "write", "after", "after", "random", "random"]),
    ):
        kills = [
            {"phase": phase, "mode": m, "epoch": rng.randint(1, epochs - (3 if m == "after" else 1))} for m in modes
        ]
        rng.shuffle(kills)
        # random kills land at start-up, so they go where the previous kill left the run
        plan += sorted(kills, key=lambda k: k["epoch"])
    if plan[0]["mode"] == "random":  # the first attempt has no start-up time to draw from
        plan[0] = {"phase": "teacher", "mode": "write", "epoch": 1}
    return plan


def _spawn(args: list[str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as f:
        return subprocess.Popen(
            [sys.executable, "-m", "kdlab", *args], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=f, env=ENV
        )


def _teacher_dirs(out: Path) -> list[Path]:
    return sorted(p for p in (out / "teachers").glob("*") if p.is_dir())


def _run_dirs(out: Path) -> list[Path]:
    return [out, *_teacher_dirs(out)]


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


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns


def _rows(path: Path) -> list[dict]:
    """The complete rows of a metrics file being appended to (a line cut mid-write is left out)."""
    try:
        text = path.read_text()
    except OSError:
        return []
    rows = []
    for line in text.splitlines(keepends=True):
        if not line.endswith("\n"):
            break
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows


def _phase_dir(out: Path, phase: str) -> Path | None:
    if phase == "student":
        return out
    teachers = _teacher_dirs(out)
    return teachers[0] if teachers else None


class _Attempt:
    """What one attempt has written, told apart from what earlier (killed) attempts left: at start-up the
    run rewrites metrics.jsonl atomically (a new inode), so a row counts only once the file is a new one."""

    def __init__(self, out: Path, args: list[str], log: Path):
        self.out = out
        self.stale = {ph: self._metrics_identity(ph) for ph in ("teacher", "student")}  # before the process starts
        self.proc, self.started = _spawn(args, log), time.monotonic()
        self.first_row_s = None  # seconds from the start to this attempt's first new metrics row

    def _metrics_identity(self, phase: str):
        d = _phase_dir(self.out, phase)
        return None if d is None else _identity(d / "metrics.jsonl")

    def new_rows(self, phase: str) -> list[dict]:
        d = _phase_dir(self.out, phase)
        if d is None:
            return []
        ident = _identity(d / "metrics.jsonl")
        if ident is None or ident[0] == (self.stale[phase] or (None,))[0]:
            return []
        return _rows(d / "metrics.jsonl")

    def alive(self) -> bool:
        assert time.monotonic() - self.started < HANG_S, "an attempt hung"
        return self.proc.poll() is None


def _wait_row(att: _Attempt, phase: str, epoch: int, base: int) -> dict | None:
    """The first row this attempt writes for an epoch >= epoch (and past its resume point), or None if the
    process ended first."""
    while att.alive():
        rows = [r for r in att.new_rows(phase) if r["epoch"] > base]
        if rows and att.first_row_s is None:
            att.first_row_s = time.monotonic() - att.started
        rows = [r for r in rows if r["epoch"] >= epoch]
        if rows:
            return rows[0]
        time.sleep(0.002)
    return None


def _wait_checkpoint(att: _Attempt, run_dir: Path, epoch: int, stop_at_temp: bool) -> bool:
    """Poll until the checkpoint of ``epoch`` is complete (last is replaced atomically, so whenever it exists
    it is whole), or, with ``stop_at_temp``, until its temp file appears. False if the process ended first."""
    ckdir, seen = run_dir / "checkpoints", None
    while att.alive():
        if stop_at_temp and any(ckdir.glob(".last.safetensors.tmp*")):
            return True
        ident = _identity(ckdir / "last.safetensors")
        if ident is not None and ident != seen:
            seen = ident
            try:
                if checkpoint.load(ckdir / "last.safetensors")[1]["epoch"] >= epoch:
                    return True
            except (OSError, CheckpointError):  # rotated away under us: look again
                seen = None
        if not stop_at_temp:
            time.sleep(0.001)
    return False


@pytest.mark.slow
def test_sigkill_storm_resumes_to_bit_identical_weights(tmp_path):
    t0 = time.perf_counter()
    rng = random.Random(SEED)
    plan = _plan(rng)
    ref_dir, out = tmp_path / "ref", tmp_path / "killed"
    stderr_log = tmp_path / "stderr.txt"
    reference = _spawn(["train", *TRAIN, "--out", str(ref_dir)], tmp_path / "ref_stderr.txt")

    kills: list[dict] = []
    best_epoch: dict[Path, int] = {}
    startup = None  # the least time from a process start to its first metrics row, as observed
    attempts = 0
    while True:
        attempts += 1
        assert attempts <= len(plan) + 2, f"no end in sight after {attempts} attempts: {kills}"
        kill = dict(plan[len(kills)]) if len(kills) < len(plan) else None
        teacher_done = any((out / "teachers").glob("*/result.json"))
        if kill is not None and kill["phase"] == "teacher" and teacher_done:
            # earlier kills let the teacher finish (a kill on its last epoch's checkpoint may land after it):
            # the kill goes to the student, which has epochs to spare
            kill.update(phase="student", retargeted=True)
        phase_dir = _phase_dir(out, kill["phase"]) if kill else None
        base = (_newest_readable_epoch(phase_dir) or 0) if phase_dir is not None else 0
        resumable = (out / "config.yaml").exists()
        args = ["train", "--resume", str(out), "--quiet"] if resumable else ["train", *TRAIN, "--out", str(out)]
        temps_before = set(_temps(out))  # a killed writer's temp file stays until the next resume cleans it
        att = _Attempt(out, args, stderr_log)
        if kill is None:  # every planned kill done: let it finish
            att.proc.wait(timeout=HANG_S)  # a hang guard
        elif kill["mode"] == "random":
            kill_at = att.started + rng.uniform(0.1, 0.9) * startup
            while att.alive() and time.monotonic() < kill_at:
                time.sleep(0.002)
        else:
            row = _wait_row(att, kill["phase"], kill["epoch"], base)
            if row is not None:
                kill["row_epoch"] = row["epoch"]
                # the phase's own run dir now exists: the teacher's appears only once it trains
                landed = _wait_checkpoint(att, _phase_dir(out, kill["phase"]), row["epoch"], kill["mode"] == "write")
                if landed and kill["mode"] == "after":
                    pause = rng.uniform(0.1, 0.5) * row["seconds"]
                    end = time.monotonic() + pause
                    while att.alive() and time.monotonic() < end:
                        time.sleep(0.002)
        if att.proc.poll() is not None:  # it finished (or failed) before the kill came
            assert att.proc.returncode == 0, stderr_log.read_text()[-2000:]
            assert kill is None, f"the run ended before kill {len(kills) + 1} of {len(plan)} ({kill}) landed: {kills}"
            break
        att.proc.send_signal(signal.SIGKILL)
        att.proc.wait()
        if att.first_row_s is not None:
            startup = att.first_row_s if startup is None else min(startup, att.first_row_s)
        torn = set(_temps(out)) - temps_before
        kill.update(
            after_s=round(time.monotonic() - att.started, 3),
            # what the run had written when it died tells the phase: no clock involved
            teacher_phase=not any((out / "teachers").glob("*/result.json")),
            mid_write=bool(torn),
        )
        kills.append(kill)
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

    assert reference.wait(timeout=HANG_S) == 0, (tmp_path / "ref_stderr.txt").read_text()[-2000:]
    assert len(kills) == len(plan), kills
    # both phases are hit by construction (kills wait for the phase's own rows); checked, not assumed
    assert any(k["teacher_phase"] and k["phase"] == "teacher" and "row_epoch" in k for k in kills), (
        f"no kill landed while the teacher was training: {kills}"
    )
    assert any(not k["teacher_phase"] and k["phase"] == "student" and "row_epoch" in k for k in kills), (
        f"no kill landed while the student was training: {kills}"
    )
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
