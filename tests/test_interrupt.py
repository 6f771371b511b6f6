"""Ctrl-C and SIGTERM: SIGTERM is handled as Ctrl-C, a terminal's hidden cursor is restored, and the advice
printed names the real run folder and the command that continues it (`--resume`, or the demo's own).
"""

from __future__ import annotations

import os
import pty
import signal
import subprocess
import sys
from pathlib import Path

from helpers import ENV, HANG_S, read_until

from kdlab import checkpoint, pipeline
from kdlab.cli import main

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "recipes" / "digits"
KD = str(DIGITS / "kd.yaml")
VANILLA = str(DIGITS / "vanilla.yaml")


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
        # the signal is decided by what the run printed: an epoch is checkpointed, the second is under way
        # (read_until's deadline, HANG_S, only guards a hang)
        got = read_until(master, proc, b"epoch 1 |")
        os.kill(proc.pid, signal.SIGTERM)
        got += read_until(master, proc, b"--resume")
        assert proc.wait(timeout=HANG_S) == 143
        got += read_until(master, proc, b"\x00never", 2)  # the rest, up to the closed terminal
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
