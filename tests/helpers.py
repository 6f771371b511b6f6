"""Helpers shared by several test files: the command line run in-process, checkpointed runs stopped
part-way, a subprocess's output read with a deadline, and tiny finished digits runs.

Test files import it as `helpers` (pytest puts tests/ on sys.path).
"""

from __future__ import annotations

import os
import select
import shutil
import time
from pathlib import Path

import pytest
import torch

from kdlab import checkpoint, pipeline
from kdlab.cli import main
from kdlab.progress import Progress
from kdlab.recipe_files import load_recipe

ROOT = Path(__file__).resolve().parents[1]
VANILLA = str(ROOT / "recipes" / "digits" / "vanilla.yaml")
QUICK = ["--set", "train.epochs=3", "--set", "train.max_steps_per_epoch=2", "--quiet"]  # stopped_runs
RECIPES = ROOT / "recipes" / "digits"
TINY = ["train.epochs=2", "train.max_steps_per_epoch=2"]  # tiny_run
# a `python -m kdlab` subprocess imports this kdlab, on one thread
ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    "OMP_NUM_THREADS": "1",
}

# ----------------------------------------------------------------------------------------------
# The command line, in-process


def sets(*items: str) -> list[str]:
    return [a for item in items for a in ("--set", item)]


def refused(capsys, args: list[str], *names: str) -> str:
    """Run the CLI in-process; it must exit 2 with one stderr line naming each of `names`.

    Every refusal is checked the same way: exit code 2, exactly one line on stderr that names the
    problem (the file, the term, the directory), and no traceback.
    """
    rc = main(args)
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kdlab: error: "), err
    assert "Traceback" not in err
    for name in names:
        assert str(name) in lines[0], (name, lines[0])
    return lines[0]


def ok(capsys, args: list[str]) -> str:
    rc = main(args)
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    return captured.out


# ----------------------------------------------------------------------------------------------
# Checkpointed runs: a reference and the same run stopped after epoch 2


def weights(path: Path) -> dict[str, torch.Tensor]:
    return checkpoint.load(path)[0]


def interrupt_after_epoch(monkeypatch, epoch: int) -> None:
    """Ctrl-C right after `epoch` is on disk (the CLI then exits 130, as at a terminal)."""
    real = Progress.end_epoch

    def end_epoch(self, row):
        real(self, row)
        if row["epoch"] == epoch:
            raise KeyboardInterrupt

    monkeypatch.setattr(Progress, "end_epoch", end_epoch)


def stopped_runs(base: Path) -> Path:
    """In `base`: a finished 3-epoch vanilla run (the reference) and the same run stopped after epoch 2."""
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
# Waiting on a subprocess: for an event, with a deadline that only guards a hang

# A hang guard, never a timing: a test waits for what a run writes, and this limit only stops a test that
# would otherwise wait forever. What takes seconds on a quiet machine takes 5-10x as long on a loaded
# 2-core one (start-up alone took 35 s there), so the limit is far above that.
HANG_S = 600


def wait_until(done, proc, what: str, timeout: float = HANG_S, poll: float = 0.01) -> None:
    """Poll ``done()`` until it holds; fail naming ``what`` if ``proc`` ends first or after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not done():
        assert proc.poll() is None, f"the process ended (exit {proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"hang guard: no {what} after {timeout:.0f} s"
        time.sleep(poll)


def read_until(fd: int, proc, needle: bytes, seconds: float = HANG_S) -> bytes:
    got = b""
    deadline = time.monotonic() + seconds
    while needle not in got:
        if time.monotonic() >= deadline:
            assert proc.poll() is not None, got[-2000:]
            break
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # the child closed the terminal
                break
            got += chunk
        elif proc.poll() is not None:
            break
    return got


# ----------------------------------------------------------------------------------------------
# Tiny finished digits runs (two epochs of two steps)


def tiny_run(out: Path, recipe: str, seed: int = 0, *extra: str) -> dict:
    return pipeline.run(load_recipe(RECIPES / recipe, [*TINY, *extra], seed=seed), out, quiet=True)


def digits_runs(base: Path) -> Path:
    """In `base`: {vanilla,kd}-s{0,1}, two recipes, two seeds each; kd trains its teacher into kd-s*/teachers."""
    for name in ("vanilla", "kd"):
        for seed in (0, 1):
            tiny_run(base / f"{name}-s{seed}", f"{name}.yaml", seed)
    return base


def md_rows(text: str) -> list[list[str]]:
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[1:]]


def become_torchrun_rank(rank: int, world: int, port: int) -> None:
    """Inside a spawned worker: the environment torchrun would give rank ``rank`` of ``world`` on this host
    (a 60 s collective timeout, so a test with a dead peer fails instead of hanging), one torch thread."""
    from kdlab import distributed

    os.environ.update(
        WORLD_SIZE=str(world),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        **{distributed.ENV_TIMEOUT: "60"},
    )
    torch.set_num_threads(1)
