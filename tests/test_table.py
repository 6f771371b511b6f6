"""kdlab table on tiny digits runs made here: seeds of a recipe grouped into mean ± std, CSV and --out,
teacher caches with --all, split recipes labelled by what differs, unfinished runs and bad paths.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import pytest
from helpers import digits_runs, md_rows, tiny_run

from kdlab import models
from kdlab.cli import main


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """runs/{vanilla,kd}-s{0,1}: two recipes, two seeds each; kd trains its teacher into runs/kd-s*/teachers."""
    return digits_runs(tmp_path_factory.mktemp("runs"))


def results_of(base: Path, prefix: str) -> list[dict]:
    return [json.loads((d / "result.json").read_text()) for d in dirs_of(base, prefix)]


def dirs_of(base: Path, prefix: str) -> list[Path]:
    return sorted(base.glob(f"{prefix}-s*"))


def seconds_of(run_dir: Path) -> float:
    return sum(json.loads(x)["seconds"] for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines())


def naive_mean_std(values):
    m = sum(values) / len(values)
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def test_table_groups_seeds_of_a_recipe_into_mean_and_std(runs, capsys):
    assert main(["table", str(runs)]) == 0
    out = capsys.readouterr().out
    rows = {r[0]: r for r in md_rows(out)}
    assert set(rows) == {
        "vanilla smallcnn_narrow",
        "kd smallcnn_narrow <- smallcnn_wide",
    }  # teacher caches below are skipped
    params = sum(p.numel() for p in models.create("smallcnn_narrow", num_classes=10, in_chans=1).parameters())
    for label, prefix in (("vanilla smallcnn_narrow", "vanilla"), ("kd smallcnn_narrow <- smallcnn_wide", "kd")):
        res = results_of(runs, prefix)
        seeds, last, best, selected, par, teacher, epochs, student_time, teacher_time, passes = rows[label][1:11]
        assert seeds == "2" and epochs == "2" and par == f"{params:,}"
        # two seeds: the 95% t-interval is mean +- t(0.975, 1) s / sqrt(2), t(0.975, 1) = tan(0.475 pi)
        half = math.tan(0.475 * math.pi) / math.sqrt(2)
        m, s = naive_mean_std([r["top1_last"] for r in res])
        assert last == f"{m:.2f} ± {s:.2f} [{m - half * s:.2f}, {m + half * s:.2f}]"
        m, s = naive_mean_std([r["top1_best"] for r in res])
        assert best == f"{m:.2f} ± {s:.2f} [{m - half * s:.2f}, {m + half * s:.2f}]"
        assert selected == best + " (on test)"  # no validation split: the best epoch, labelled so
        seconds = [seconds_of(d) for d in dirs_of(runs, prefix)]
        assert student_time == f"{sum(seconds) / len(seconds):.0f} s"
        assert passes == ("1F+1B, teacher 1F" if prefix == "kd" else "1F+1B")
        if prefix == "kd":  # each seed's teacher, trained here: its own folder's measured epochs
            t_seconds = [seconds_of(r["teachers"][0]["source"]) for r in res]
            assert teacher_time == f"{sum(t_seconds) / len(t_seconds):.0f} s"
        else:
            assert teacher_time == "-"
        if prefix == "kd":
            m, s = naive_mean_std([r["teachers"][0]["top1_last"] for r in res])
            assert teacher == f"{m:.2f} ± {s:.2f}"
        else:
            assert teacher == "-"


def test_table_csv_and_out_file(runs, tmp_path, capsys):
    out = tmp_path / "t.csv"
    assert main(["table", str(runs / "kd-s0"), str(runs / "kd-s1"), "--format", "csv", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert out.read_text() == printed
    (row,) = list(csv.DictReader(io.StringIO(printed)))
    res = results_of(runs, "kd")
    assert int(row["n"]) == 2 and sorted(row["seeds"].split(";")) == ["0", "1"]
    m, s = naive_mean_std([r["top1_last"] for r in res])
    assert float(row["top1_last_mean"]) == pytest.approx(m) and float(row["top1_last_std"]) == pytest.approx(s)
    assert int(row["params"]) == res[0]["params"]


def test_table_all_takes_teacher_caches_and_labels_split_recipes_by_what_differs(runs, tmp_path, capsys):
    assert main(["table", str(runs), "--all"]) == 0
    labels = [r[0] for r in md_rows(capsys.readouterr().out)]
    assert any(label.startswith("teacher smallcnn_wide") for label in labels)

    tiny_run(tmp_path / "kd-T8", "kd.yaml", 0, "loss.terms.kd.T=8")
    assert main(["table", str(runs / "kd-s0"), str(tmp_path / "kd-T8")]) == 0
    labels = [r[0] for r in md_rows(capsys.readouterr().out)]
    assert labels == [
        "kd smallcnn_narrow <- smallcnn_wide (loss.terms.kd.T=4)",
        "kd smallcnn_narrow <- smallcnn_wide (loss.terms.kd.T=8)",
    ]
    assert main(["table", str(runs / "kd-s0"), str(tmp_path / "kd-T8"), "--ignore", "loss.terms.kd.T"]) == 0
    (row,) = md_rows(capsys.readouterr().out)
    assert row[0] == "kd smallcnn_narrow <- smallcnn_wide" and row[1] == "2"


def test_table_without_runs_or_with_a_bad_path_is_one_line_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    unfinished = tmp_path / "empty" / "half"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text("method: vanilla\n")
    assert main(["table", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kdlab: error: no finished run") and "1 unfinished" in err and len(err.splitlines()) == 1
    assert main(["table", str(tmp_path / "nope")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_table_notes_unfinished_runs_and_still_prints(runs, tmp_path, capsys):
    half = runs / "zz-unfinished"
    half.mkdir(exist_ok=True)
    (half / "config.yaml").write_text("method: vanilla\n")
    try:
        assert main(["table", str(runs)]) == 0
        captured = capsys.readouterr()
        assert "skipped 1 unfinished" in captured.err and "zz-unfinished" in captured.err
        assert len(md_rows(captured.out)) == 2
    finally:
        (half / "config.yaml").unlink()
        half.rmdir()


def test_table_labels_a_one_seed_cell_and_writes_the_new_csv_columns(runs, capsys):
    assert main(["table", str(runs / "vanilla-s0")]) == 0
    (row,) = md_rows(capsys.readouterr().out)
    res = json.loads((runs / "vanilla-s0" / "result.json").read_text())
    assert row[2] == f"{res['top1_last']:.2f} (1 seed)" and row[4] == f"{res['top1_best']:.2f} (1 seed) (on test)"
    assert main(["table", str(runs / "kd-s0"), str(runs / "kd-s1"), "--format", "csv"]) == 0
    (csv_row,) = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    lo, hi = float(csv_row["top1_last_lo"]), float(csv_row["top1_last_hi"])
    assert lo <= float(csv_row["top1_last_mean"]) <= hi and csv_row["selected_on"] == "test"
    assert (
        csv_row["student_forward"] == "1" and csv_row["student_backward"] == "1" and csv_row["teacher_forward"] == "1"
    )
    assert float(csv_row["teacher_seconds"]) > 0
