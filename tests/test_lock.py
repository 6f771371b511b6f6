"""One writer per run directory (kdlab.lock): a second writer is refused naming the owner's pid, the lock
of a killed owner, of a dead pid or of a pid reused by an unrelated process is taken over, and another
host's lock is never broken.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from pathlib import Path

from helpers import ok, refused, wait_until

ROOT = Path(__file__).resolve().parents[1]
VANILLA = str(ROOT / "recipes" / "digits" / "vanilla.yaml")
QUICK = ["--set", "train.epochs=3", "--set", "train.max_steps_per_epoch=2", "--quiet"]
TINY = ["--set", "train.epochs=1", "--set", "train.max_steps_per_epoch=1", "--quiet"]


def _wait_for(paths: list[Path], proc: subprocess.Popen) -> None:
    wait_until(lambda: all(p.exists() for p in paths), proc, f"{[p.name for p in paths]}", poll=0.005)


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
    # alive for the whole test however slow the machine (killed below): its pid must stay taken
    unrelated = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
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
