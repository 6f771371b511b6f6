"""kdlab reproduce: a whole small table end to end on tiny CIFAR-100-format files, stopped and continued."""

import json
import math
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import wait_until
from test_stats import quantile_by_integration

from kdlab import cli
from kdlab.errors import ConfigError
from kdlab.tools.reproduce import load_table, plan

ROOT = Path(__file__).resolve().parents[1]
TABLES = sorted((ROOT / "recipes" / "tables").glob("*.yaml"))
SEEDS = 2


def write_cifar100(parent: Path, n_train=96, n_test=40) -> Path:
    """The official python layout: pickled dicts with bytes keys, data (N, 3072) uint8 in R, G, B planes."""
    root = parent / "cifar-100-python"
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        fine = [int(v) for v in rng.integers(0, 100, n)]
        obj = {
            b"filenames": [f"{split}_{i:05d}.png".encode() for i in range(n)],
            b"batch_label": f"{split} batch 1 of 1".encode(),
            b"fine_labels": fine,
            b"coarse_labels": [v // 5 for v in fine],
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        }
        (root / split).write_bytes(pickle.dumps(obj, protocol=3))
    meta = {
        b"fine_label_names": [f"class{i:02d}".encode() for i in range(100)],
        b"coarse_label_names": [f"super{i:02d}".encode() for i in range(20)],
    }
    (root / "meta").write_bytes(pickle.dumps(meta, protocol=3))
    return root


RECIPE = {
    "method": "kd",
    "data": {"name": "cifar100"},
    "student": {"name": "resnet8"},
    "teachers": [{"name": "resnet14"}],
    "loss": {"ce": 0.1, "terms": {"kd": {"weight": 0.9, "T": 4}}},
    "train": {"epochs": 1, "batch_size": 16, "lr": 0.05, "schedule": {"type": "constant"}},
}


def write_table(folder: Path) -> Path:
    (folder / "recipes").mkdir(parents=True)
    (folder / "recipes" / "kd.yaml").write_text(yaml.safe_dump(RECIPE))
    table = {
        "title": "tiny table",
        "source": "made up for the test",
        "metric": "last",
        "tolerance": 2.0,
        "overrides": {"train.max_steps_per_epoch": 2},
        "cells": [
            {
                "name": "vanilla",
                "recipe": "recipes/kd.yaml",
                "published": 99.0,
                "tolerance": 1.0,
                "overrides": {"method": "vanilla", "teachers": [], "loss": {"ce": 1.0}},
            },
            {
                "name": "kd",
                "recipe": "recipes/kd.yaml",
                "published": 1.5,
                "teacher_published": [50.0],
                "compare_to": ["vanilla"],
            },
            {
                "name": "at",
                "recipe": "recipes/kd.yaml",
                "metric": "best",
                "published": 0.5,
                "compare_to": ["vanilla", "kd"],
                "overrides": {"method": "at", "loss": {"ce": 1.0, "terms": {"at": {"weight": 1000}}}},
            },
        ],
    }
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(table, sort_keys=False))
    return path


def naive_mean_std(xs):
    m = sum(xs) / len(xs)
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


@pytest.fixture
def one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread is faster than two."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_table_runs_is_stopped_and_continues(tmp_path, capsys, one_thread):
    data = write_cifar100(tmp_path / "data")
    table = write_table(tmp_path / "t")
    out = tmp_path / "out"
    args = [
        "reproduce",
        str(table),
        "--seeds",
        str(SEEDS),
        "--out",
        str(out),
        "--data-root",
        str(data),
        "--quiet",
        "--set",
        "train.batch_size=8",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "kdlab", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    first = out / "cells" / "kd" / "seed0" / "result.json"
    # the kill is decided by what the table wrote (its first finished cell), not by the clock
    try:
        wait_until(first.exists, proc, "the first finished cell", poll=0.05)
    except AssertionError as e:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(f"{e}: {proc.communicate()[0].decode()[-2000:]}") from None
    os.killpg(proc.pid, signal.SIGKILL)  # a hard stop mid-table: no handler gets to tidy up
    proc.wait()

    runs = {(c, s): out / "cells" / c / f"seed{s}" for c in ("vanilla", "kd", "at") for s in range(SEEDS)}
    finished = {k: (d / "result.json").stat().st_mtime_ns for k, d in runs.items() if (d / "result.json").exists()}
    started = [k for k, d in runs.items() if (d / "config.yaml").exists() and k not in finished]
    assert ("vanilla", 0) in finished and ("kd", 0) in finished
    assert len(finished) < len(runs), "the table finished before it could be stopped"

    assert cli.main(args) == 0
    said = capsys.readouterr().out
    for (cell, seed), mtime in finished.items():
        assert (runs[cell, seed] / "result.json").stat().st_mtime_ns == mtime, f"{cell} seed {seed} was retrained"
        assert f"{cell} seed {seed}: finished earlier" in said
    for cell, seed in started:
        assert f"{cell} seed {seed}: resuming" in said
    results = {k: json.loads((d / "result.json").read_text()) for k, d in runs.items()}

    # one cached teacher per seed, shared by the kd and at cells of that seed
    teacher_dirs = sorted(p for p in (out / "teachers").iterdir() if p.is_dir())
    assert len(teacher_dirs) == SEEDS
    for s in range(SEEDS):
        assert results["kd", s]["teachers"][0]["source"] == results["at", s]["teachers"][0]["source"]
    assert results["kd", 0]["teachers"][0]["source"] != results["kd", 1]["teachers"][0]["source"]

    summary = json.loads((out / "results.json").read_text())
    rows = {r["cell"]: r for r in summary["cells"]}
    for cell, published, metric, tol in (
        ("vanilla", 99.0, "last", 1.0),
        ("kd", 1.5, "last", 2.0),
        ("at", 0.5, "best", 2.0),
    ):
        row = rows[cell]
        last = [results[cell, s]["top1_last"] for s in range(SEEDS)]
        best = [results[cell, s]["top1_best"] for s in range(SEEDS)]
        assert row["n"] == SEEDS
        for got, want in zip(
            (row["last_mean"], row["last_std"], row["best_mean"], row["best_std"]),
            naive_mean_std(last) + naive_mean_std(best),
        ):
            assert got == pytest.approx(want)
        ours = naive_mean_std(last if metric == "last" else best)[0]
        assert row["published"] == published and row["metric"] == metric
        assert row["delta"] == pytest.approx(ours - published)
        assert row["within_tolerance"] == (abs(ours - published) <= tol)
    assert rows["vanilla"]["within_tolerance"] is False  # 99 % is out of reach of two steps
    assert rows["at"]["compare_to"]["kd"] == pytest.approx(
        naive_mean_std([results["at", s]["top1_best"] for s in range(SEEDS)])[0]
        - naive_mean_std([results["kd", s]["top1_best"] for s in range(SEEDS)])[0]
    )
    # the interval of the difference: Welch's, by hand from its formulas
    a = [results["at", s]["top1_best"] for s in range(SEEDS)]
    b = [results["kd", s]["top1_best"] for s in range(SEEDS)]
    va, vb = naive_mean_std(a)[1] ** 2 / SEEDS, naive_mean_std(b)[1] ** 2 / SEEDS
    diff = rows["at"]["compare_to"]["kd"]
    d = rows["at"]["compare_stats"]["kd"]
    if va + vb > 0:
        df = (va + vb) ** 2 / (va**2 / (SEEDS - 1) + vb**2 / (SEEDS - 1))
        half = quantile_by_integration(0.975, df) * math.sqrt(va + vb)
        assert d["df"] == pytest.approx(df)
        assert (d["lo"], d["hi"]) == pytest.approx((diff - half, diff + half), abs=1e-5)
        assert d["within_noise"] == (diff - half <= 0 <= diff + half)
    # each metric's t-interval over the seeds (two: t(0.975, 1) = tan(0.475 pi))
    for metric in ("last", "best", "selected"):
        st = rows["kd"]["stats"][metric]
        values = [results["kd", s]["top1_last" if metric == "last" else "top1_best"] for s in range(SEEDS)]
        m, sd = naive_mean_std(values)
        half = math.tan(0.475 * math.pi) * sd / math.sqrt(SEEDS)
        assert st["n"] == SEEDS and (st["lo"], st["hi"]) == pytest.approx((m - half, m + half))
    assert rows["kd"]["selected_on"] == "test"  # no validation split: the best epoch, said so
    # the cost: the students' measured epochs, the teachers' own training, the passes of one step
    seconds = [
        sum(json.loads(x)["seconds"] for x in (runs["kd", s] / "metrics.jsonl").read_text().splitlines())
        for s in range(SEEDS)
    ]
    assert rows["kd"]["cost"]["student_seconds"] == pytest.approx(sum(seconds) / SEEDS)
    assert rows["kd"]["cost"]["teacher_seconds"] > 0
    assert rows["kd"]["cost"]["passes_per_step"] == {
        "student_forward": 1,
        "student_backward": 1,
        "teacher_forward": 1,
        "teacher_cached": False,
    }
    assert rows["vanilla"]["cost"]["passes_per_step"]["teacher_forward"] == 0
    teacher = rows["kd"]["teachers"][0]
    assert teacher["published"] == 50.0
    assert teacher["mean"] == pytest.approx(
        naive_mean_std([results["kd", s]["teachers"][0]["top1_last"] for s in range(SEEDS)])[0]
    )

    md = (out / "results.md").read_text()
    assert "student time" in md and "passes/step" in md and "1F+1B, teacher 1F" in md
    assert "| kd | last | 2 |" in md and "99.00" in md and f"{rows['kd']['delta']:+.2f}" in md
    assert (out / "deltas.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_changed_table_is_refused_for_an_existing_run(tmp_path):
    table = write_table(tmp_path / "t")
    out = tmp_path / "out"
    jobs = plan(load_table(table), table, out, 1, ["kd"], [], None)
    jobs[0].run_dir.mkdir(parents=True)
    (jobs[0].run_dir / "config.yaml").write_text(yaml.safe_dump(jobs[0].recipe.model_dump(mode="json")))
    plan(load_table(table), table, out, 1, ["kd"], [], "/elsewhere")  # a moved data set is not a change
    with pytest.raises(ConfigError, match="different recipe"):
        plan(load_table(table), table, out, 1, ["kd"], ["loss.terms.kd.T=8"], None)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: t["cells"][1].update(compare_to=["nope"]), "compare_to names 'nope'"),
        (lambda t: t["cells"].append(dict(t["cells"][0])), "duplicate cell name"),
        (lambda t: t["cells"][0].update(colour="red"), "cells.0.colour: unknown key"),
        (lambda t: t["cells"][0].update(recipe="missing.yaml"), "recipe 'missing.yaml' not found"),
        (lambda t: t["cells"][0]["overrides"].update({"train.lr": -1}), "train.lr"),
        (lambda t: t.update(tolerance=float("inf")), "tolerance"),  # YAML .inf
        (lambda t: t["cells"][0].update(tolerance=float("inf")), "cells.0.tolerance"),
        (lambda t: t.update(seeds=True), "seeds"),  # YAML yes
        (lambda t: t["cells"][1].update(seeds=True), "cells.1.seeds"),
    ],
)
def test_bad_table_is_one_clear_line(tmp_path, capsys, edit, message):
    path = write_table(tmp_path / "t")
    table = yaml.safe_load(path.read_text())
    edit(table)
    path.write_text(yaml.safe_dump(table))
    assert cli.main(["reproduce", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kdlab: error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "out" / "cells").exists()


def test_table_refuses_an_infinite_tolerance_and_yes_as_a_number(tmp_path):
    """The table is validated by kdlab.strict.Strict, as recipes are: no inf/NaN, no boolean where a number goes."""
    for text in ("tolerance: .inf", "seeds: yes"):
        path = tmp_path / "t.yaml"
        path.write_text(f"title: t\n{text}\ncells: [{{name: a, recipe: kd.yaml}}]\n")
        with pytest.raises(ConfigError, match=text.split(":")[0]):
            load_table(path)


@pytest.mark.parametrize("path", TABLES, ids=lambda p: p.stem)
def test_shipped_table_plans(path, tmp_path):
    table = load_table(path)
    jobs = plan(table, path, tmp_path, 1, None, [], None)
    assert len(jobs) == len(table.cells)
    if table.published_numbers:
        # a cell whose setting no readable source reports (imagenet.yaml) carries no number: it is compared with
        # other cells of the run instead, and its source says so
        assert any(c.published is not None for c in table.cells)
        for c in table.cells:
            assert c.published is not None or (c.compare_to and c.source == "unverified"), c.name
    else:
        assert all(c.published is None for c in table.cells)
        assert all(c.compare_to for c in table.cells if not c.name.split("/")[-1].startswith("vanilla"))


def test_a_packaged_table_is_found_by_name_and_an_unknown_name_lists_them(tmp_path):
    from kdlab.tools.reproduce import RECIPES_ROOT, find_table

    assert find_table("cpu_short") == RECIPES_ROOT / "tables" / "cpu_short.yaml"
    assert load_table(find_table("bench240")).cells
    given = tmp_path / "mine.yaml"
    assert find_table(given) == given  # a path is taken as it is, even before it exists
    with pytest.raises(ConfigError, match=r"no packaged table of that name; packaged tables: .*cpu_short"):
        find_table("cpu_shrot")


def test_a_second_reproduce_into_the_same_out_is_refused_at_its_start(tmp_path, capsys):
    """Two runners on one folder each took cells the other was training and reported them failed; the second
    one is now refused with one line before it plans, resumes or writes anything, and the first is untouched."""
    table = write_table(tmp_path / "t")
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from kdlab.lock import RunLock; RunLock(sys.argv[1]).acquire(); "
            "print('held', flush=True); sys.stdin.read()",
            str(out),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        assert cli.main(["reproduce", str(table), "--out", str(out), "--data-root", str(tmp_path / "nowhere")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "in use by another kdlab reproduce" in err and f"pid {holder.pid}" in err
        assert sorted(p.name for p in out.iterdir()) == [".lock"]
    finally:
        holder.communicate("", timeout=600)  # a hang guard only; the holder exits as soon as its stdin closes
