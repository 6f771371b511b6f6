"""kdlab reproduce --jobs 2: worker processes give what one process gives, share each teacher, and resume
a killed cell."""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from helpers import HANG_S, wait_until
from test_reproduce import RECIPE, write_cifar100

from kdlab.checkpoint import load_weights
from kdlab.tools.reproduce import load_table, plan
from kdlab.tools.reproduce_run import tasks_of

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def write_table(folder: Path, epochs: int = 1) -> Path:
    """kd and at share one teacher; ensemble needs a second; vanilla needs none and runs two seeds."""
    (folder / "recipes").mkdir(parents=True)
    (folder / "recipes" / "kd.yaml").write_text(yaml.safe_dump(RECIPE))
    teacher = {"name": "resnet14", "seed": 7}
    table = {
        "title": "tiny parallel table",
        "published_numbers": False,
        "overrides": {"train.max_steps_per_epoch": 3, "train.batch_size": 8, "train.epochs": epochs},
        "cells": [
            {
                "name": "vanilla",
                "recipe": "recipes/kd.yaml",
                "seeds": 2,
                "overrides": {"method": "vanilla", "teachers": [], "loss": {"ce": 1.0}},
            },
            {
                "name": "kd",
                "recipe": "recipes/kd.yaml",
                "compare_to": ["vanilla"],
                "overrides": {"teachers": [teacher]},
            },
            {
                "name": "at",
                "recipe": "recipes/kd.yaml",
                "compare_to": ["vanilla"],
                "overrides": {
                    "method": "at",
                    "teachers": [teacher],
                    "loss": {"ce": 1.0, "terms": {"at": {"weight": 1000}}},
                },
            },
            {
                "name": "ensemble",
                "recipe": "recipes/kd.yaml",
                "compare_to": ["vanilla"],
                "overrides": {
                    "method": "ensemble_kd",
                    "teachers": [teacher, {"name": "resnet8", "seed": 8}],
                    "loss": {"ce": 0.1, "terms": {"ensemble_kd": {"weight": 0.9, "T": 4}}},
                },
            },
        ],
    }
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(table, sort_keys=False))
    return path


RUNS = [("vanilla", 0), ("vanilla", 1), ("kd", 0), ("at", 0), ("ensemble", 0)]


def reproduce(table: Path, data: Path, out: Path, jobs: int, **popen) -> subprocess.Popen:
    args = [
        sys.executable,
        "-m",
        "kdlab",
        "reproduce",
        str(table),
        "--out",
        str(out),
        "--data-root",
        str(data),
        "--quiet",
        "--jobs",
        str(jobs),
    ]
    return subprocess.Popen(args, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def finish(proc: subprocess.Popen, timeout: float = HANG_S) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return out


def weights(out: Path, cell: str, seed: int) -> dict:
    return load_weights(out / "cells" / cell / f"seed{seed}" / "student.safetensors")


def assert_same_runs(a: Path, b: Path) -> None:
    for cell, seed in RUNS:
        ra = json.loads((a / "cells" / cell / f"seed{seed}" / "result.json").read_text())
        rb = json.loads((b / "cells" / cell / f"seed{seed}" / "result.json").read_text())
        assert (ra["top1_last"], ra["top1_best"]) == (rb["top1_last"], rb["top1_best"]), (cell, seed)
        wa, wb = weights(a, cell, seed), weights(b, cell, seed)
        assert wa.keys() == wb.keys()
        for key in wa:
            assert torch.equal(wa[key], wb[key]), f"{cell} seed {seed}: {key} differs"


def test_tasks_put_each_teacher_first_and_once(tmp_path):
    table = write_table(tmp_path / "t")
    tasks = tasks_of(plan(load_table(table), table, tmp_path / "out", None, None, [], None))
    teachers = [t for t in tasks if t.teacher_index is not None]
    cells = [t for t in tasks if t.teacher_index is None]
    assert tasks == teachers + cells
    assert len(teachers) == 2 and len({t.folder for t in teachers}) == 2
    assert [(t.cell, t.seed) for t in cells] == [("vanilla", 0), ("kd", 0), ("at", 0), ("ensemble", 0), ("vanilla", 1)]
    needs = {t.cell: t.needs for t in cells}
    assert needs["vanilla"] == set() and needs["kd"] == needs["at"] and len(needs["ensemble"]) == 2
    assert needs["kd"] < needs["ensemble"] and needs["ensemble"] == {t.folder for t in teachers}


def test_two_workers_give_what_one_process_gives(tmp_path):
    data = write_cifar100(tmp_path / "data")
    table = write_table(tmp_path / "t")
    one, two = tmp_path / "one", tmp_path / "two"
    finish(reproduce(table, data, one, jobs=1))
    said = finish(reproduce(table, data, two, jobs=2))
    assert_same_runs(one, two)

    teacher_dirs = sorted(p for p in (two / "teachers").iterdir() if p.is_dir())
    assert len(teacher_dirs) == 2
    assert sum(said.count(f"started teacher {d.name}") for d in teacher_dirs) == 2  # each trained by one worker
    for d in teacher_dirs:  # trained once: one line per epoch in its metrics
        assert len((d / "metrics.jsonl").read_text().splitlines()) == 1
    sources = {
        c: json.loads((two / "cells" / c / "seed0" / "result.json").read_text())["teachers"][0]["source"]
        for c in ("kd", "at", "ensemble")
    }
    assert len(set(sources.values())) == 1
    summary = json.loads((two / "results.json").read_text())
    rows = {r["cell"]: r for r in summary["cells"]}
    assert rows["vanilla"]["n"] == 2 and rows["kd"]["n"] == 1
    assert all(not Path(run).is_absolute() for r in rows.values() for t in r["teachers"] for run in t["runs"])
    assert summary["command_line"] == {"seeds": None, "only": None, "set": []}


def test_a_killed_worker_fails_its_cell_only_and_the_rerun_resumes_it(tmp_path):
    data = write_cifar100(tmp_path / "data")
    table = write_table(tmp_path / "t", epochs=3)
    reference, out = tmp_path / "reference", tmp_path / "out"
    finish(reproduce(table, data, reference, jobs=1))

    proc = reproduce(table, data, out, jobs=2, start_new_session=True)
    victim = out / "cells" / "kd" / "seed0"
    lines, pid = [], None
    # the kill is decided by what the table printed and wrote: the kd worker's start, then its first checkpoint
    # (readline blocks until a line or the end; the line comes within seconds unless the table hangs)
    while True:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        m = re.match(r"started kd seed 0 \(worker \d, pid (\d+)\)", line)
        pid = int(m.group(1)) if m else pid
        if pid is not None:
            break
    assert pid is not None, "".join(lines)
    wait_until((victim / "checkpoints").exists, proc, "the kd worker's first checkpoint", poll=0.05)
    os.kill(pid, signal.SIGKILL)  # this worker only: no handler gets to tidy up
    rest, _ = proc.communicate(timeout=HANG_S)
    said = "".join(lines) + rest
    assert proc.returncode == 2, said
    assert "FAILED kd seed 0" in said and "killed by signal 9" in said
    assert not (victim / "result.json").exists()
    for cell, seed in RUNS:
        if (cell, seed) != ("kd", 0):
            assert (out / "cells" / cell / f"seed{seed}" / "result.json").exists(), f"{cell} seed {seed} did not finish"

    said = finish(reproduce(table, data, out, jobs=2))
    assert "resuming kd seed 0" in said and "6 finished earlier" in said
    assert_same_runs(reference, out)


def test_bad_jobs_value_is_one_line(tmp_path, capsys):
    from kdlab import cli

    table = write_table(tmp_path / "t")
    assert cli.main(["reproduce", str(table), "--jobs", "0", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err == "kdlab: error: --jobs must be at least 1\n"
