"""Finished runs gathered into recipe groups: n, mean +- std and a 95% t-interval over seeds, and what the
runs cost, as a Markdown or CSV table.

A *recipe* is a run's resolved `config.yaml` without the keys that do not change what is trained
(`seed`, where teachers are cached, the free-text note): runs whose remaining configuration is
identical are seeds of one recipe and become one row.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import statistics
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from kdlab.errors import KdlabError
from kdlab.tools import cost, stats

RESULT = "result.json"
RECON = "recon.json"
CONFIG = "config.yaml"
# a run directory's own sub-runs: its trained teachers and its earlier generations
SUB_RUN_DIRS = ("teachers", "generations")
# folders inside a run directory that never hold runs: not worth walking
NEVER_RUNS = ("checkpoints", "tb", "stages")
IGNORED_BY_DEFAULT = ("seed", "cache_dir", "note", "teacher_of")


@dataclass
class Run:
    path: Path
    result: dict
    config: dict | None
    recon: dict | None = None

    @property
    def seed(self):
        return self.result.get("seed", (self.config or {}).get("seed"))


@dataclass
class Group:
    key: str
    label: str
    runs: list[Run] = field(default_factory=list)


def _read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):  # ValueError: damaged JSON or bytes that are not UTF-8
        return None
    return value if isinstance(value, dict) else None


def _read_config(path: Path) -> dict | None:
    try:
        value = yaml.safe_load(path.read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return None
    return value if isinstance(value, dict) else None


def load_run(path: Path) -> Run:
    path = Path(path)
    result = _read_json(path / RESULT)
    if result is None or "top1_last" not in result:
        raise KdlabError(f"{path}: no readable {RESULT} with top1_last (unfinished run, or not a kdlab run directory)")
    config = _read_config(path / CONFIG) if (path / CONFIG).exists() else None
    recon = _read_json(path / RECON) if (path / RECON).exists() else None
    return Run(path, result, config, recon)


def find_runs(paths: list[str | Path], include_sub_runs: bool = False) -> tuple[list[Run], list[Path]]:
    """Finished runs at or below `paths` (a run is a folder with result.json), and the unfinished ones seen.

    Below a given path, the teacher caches and earlier generations of a run (`teachers/`,
    `generations/`) are skipped unless `include_sub_runs`; a path given explicitly is always taken.
    """
    found: list[Path] = []
    unfinished: list[Path] = []
    for given in map(Path, paths):
        if not given.exists():
            raise KdlabError(f"{given}: no such file or directory")
        if not given.is_dir():
            raise KdlabError(f"{given}: not a directory (give run directories or a folder holding them)")
        if (given / RESULT).exists():
            found.append(given)
            if not include_sub_runs:
                continue
        elif (given / CONFIG).exists():
            unfinished.append(given)
        for root, dirs, files in os.walk(given):
            here = Path(root)
            skip = set(NEVER_RUNS) | (set() if include_sub_runs else set(SUB_RUN_DIRS))
            dirs[:] = sorted(d for d in dirs if d not in skip and not d.startswith("."))
            if here == given:
                continue
            if RESULT in files:
                found.append(here)
            elif CONFIG in files:
                unfinished.append(here)
    unique = list(dict.fromkeys(p.resolve() for p in found))
    if not unique:
        where = ", ".join(map(str, paths))
        hint = (
            f" ({len(unfinished)} unfinished run(s) found: {', '.join(map(str, unfinished[:3]))})" if unfinished else ""
        )
        raise KdlabError(f"no finished run (a folder with {RESULT}) at or below {where}{hint}")
    by_resolved = {p.resolve(): p for p in found}
    return [load_run(by_resolved[p]) for p in unique], unfinished


# ----------------------------------------------------------------------------------------------
# Recipes


def flatten(value, prefix: str = "") -> dict[str, object]:
    """{'a': {'b': 1}, 'l': [{'x': 2}]} -> {'a.b': 1, 'l.0.x': 2}."""
    if isinstance(value, dict):
        out: dict[str, object] = {}
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out or {prefix[:-1]: {}}
    if isinstance(value, list) and value and any(isinstance(v, (dict, list)) for v in value):
        out = {}
        for i, v in enumerate(value):
            out.update(flatten(v, f"{prefix}{i}."))
        return out
    return {prefix[:-1]: value}


def _identity(run: Run, ignore: tuple[str, ...]) -> dict[str, object]:
    """The run's recipe as flat keys, without the ignored ones (a key or any key below it)."""
    if run.config is not None:
        flat = flatten(run.config)
    else:  # an earlier generation has no config.yaml of its own: what its result says
        r = run.result
        flat = {k: r.get(k) for k in ("method", "student", "data", "epochs", "generation")}
        flat["teachers"] = [t.get("name") for t in r.get("teachers", [])]
    return {k: v for k, v in flat.items() if not any(k == i or k.startswith(i + ".") for i in ignore)}


def recipe_key(run: Run, ignore: tuple[str, ...] = IGNORED_BY_DEFAULT) -> str:
    payload = json.dumps(_identity(run, ignore), sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:10]


def _teacher_names(run: Run) -> list[str]:
    cfg = run.config or {}
    if "teachers" in cfg and isinstance(cfg["teachers"], list):
        names = []
        for t in cfg["teachers"]:
            name = t.get("name", "?")
            if t.get("epoch") is not None:
                name += f"@epoch{t['epoch']}"
            names.append(name)
        return names
    if cfg.get("generations") or "teacher_of" in cfg:
        return []
    return [t.get("name", "?") for t in run.result.get("teachers", [])]


def recipe_label(run: Run) -> str:
    """'kd smallcnn <- smallcnn_wide', 'pfeed smallcnn <- 2x smallcnn_wide', 'sfeed smallcnn, 2 generations'."""
    cfg = run.config or {}
    method = run.result.get("method") or cfg.get("method", "?")
    student = run.result.get("student") or (cfg.get("student") or {}).get("name") or cfg.get("model", "?")
    if "teacher_of" in cfg:
        return f"teacher {student}"
    label = f"{method} {student}"
    names = _teacher_names(run)
    if names:
        counts = Counter(names)
        label += " <- " + " + ".join(n if counts[n] == 1 else f"{counts[n]}x {n}" for n in dict.fromkeys(names))
    generations = cfg.get("generations")
    if generations:
        label += f", {generations} generation{'s' if generations > 1 else ''}"
    elif run.config is None and "generation" in run.result:
        label += f", generation {run.result['generation']}"
    return label


def group_runs(runs: list[Run], ignore: tuple[str, ...] = IGNORED_BY_DEFAULT) -> list[Group]:
    """Runs of one recipe together, in order of first appearance; labels made unique by what differs."""
    groups: dict[str, Group] = {}
    for run in runs:
        key = recipe_key(run, ignore)
        if key not in groups:
            groups[key] = Group(key, recipe_label(run))
        groups[key].runs.append(run)
    by_label: dict[str, list[Group]] = {}
    for g in groups.values():
        by_label.setdefault(g.label, []).append(g)
    for same in by_label.values():
        if len(same) < 2:
            continue
        flats = [_identity(g.runs[0], ignore) for g in same]
        keys = sorted({k for f in flats for k in f})
        differing = [k for k in keys if len({json.dumps(f.get(k), default=str) for f in flats}) > 1]
        shown = sorted(differing, key=lambda k: (k.count("."), k))[:3]
        for g, f in zip(same, flats):
            parts = [f"{k}={_short(f.get(k))}" for k in shown]
            g.label += " (" + ", ".join(parts) + (", ..." if len(differing) > 3 else "") + ")"
    return list(groups.values())


def _short(value) -> str:
    text = json.dumps(value, default=str) if isinstance(value, (dict, list)) else str(value)
    return text if len(text) <= 24 else text[:21] + "..."


# ----------------------------------------------------------------------------------------------
# Statistics and rendering


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n-1); no std for a single value, neither for none. The one
    definition for `kdlab table` and `kdlab reproduce`'s report."""
    if not values:
        return None, None
    m = statistics.fmean(values)
    return m, (statistics.stdev(values) if len(values) > 1 else None)


def fmt(mean: float | None, std: float | None, digits: int = 2) -> str:
    if mean is None:
        return "-"
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def teacher_accuracy(t: dict, metric: str | None = None) -> float | None:
    """A teacher's test top-1 as it taught: at its chosen epoch (defective KD); else, given a table's `metric`
    ("last" or "best"), that epoch's; else of the weights that taught (`top1`: the last or best epoch's, or
    given weights evaluated before training); else after training."""
    if "top1_at_epoch" in t:
        value = t["top1_at_epoch"]
    elif metric is not None:
        value = t.get(f"top1_{metric}", t.get("top1_last"))
    else:
        value = t.get("top1", t.get("top1_last"))
    return float(value) if isinstance(value, (int, float)) else None


@dataclass
class Row:
    label: str
    key: str
    n: int
    seeds: list
    top1_last: tuple[float, float | None]
    top1_best: tuple[float, float | None]
    params: str
    teachers: list[tuple[float, float | None]]
    epochs: str
    bane: tuple[float, float | None] | None
    recon: tuple[float, float | None] | None
    runs: list[str]
    # n, mean, std and the 95% t-interval over seeds (kdlab.tools.stats.summary) of each way to pick the epoch
    last: dict = field(default_factory=dict)
    best: dict = field(default_factory=dict)
    selected: dict = field(default_factory=dict)
    selected_on: str = "test"  # the split that chose the selected epoch: val, test, or mixed
    seconds: float | None = None  # mean over seeds of the student's measured training time
    teacher_seconds: float | str | None = None  # mean over seeds of the teachers' training time, or "given weights"
    passes: dict | None = None  # forward/backward passes per step (kdlab.tools.cost.passes_per_step)


def _same_or_range(values: list) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    lo, hi = min(values), max(values)
    as_text = (lambda v: f"{v:,}") if all(isinstance(v, int) for v in values) else str
    return as_text(lo) if lo == hi else f"{as_text(lo)}-{as_text(hi)}"


def summarise(group: Group) -> Row:
    runs = group.runs
    n_teachers = max((len(r.result.get("teachers", [])) for r in runs), default=0)
    teachers = []
    for i in range(n_teachers):
        accs = [teacher_accuracy(r.result["teachers"][i]) for r in runs if i < len(r.result.get("teachers", []))]
        teachers.append(mean_std([a for a in accs if a is not None]))
    bane = [r.result["bane_top1"] for r in runs if "bane_top1" in r.result]
    recon = [r.recon["recon_error"] for r in runs if r.recon and "recon_error" in r.recon]
    last = [r.result["top1_last"] for r in runs]
    best = [r.result.get("top1_best", r.result["top1_last"]) for r in runs]
    selected, selected_on = selection(runs)
    return Row(
        label=group.label,
        key=group.key,
        n=len(runs),
        seeds=[r.seed for r in runs],
        top1_last=mean_std([r.result["top1_last"] for r in runs]),
        top1_best=mean_std([r.result.get("top1_best", r.result["top1_last"]) for r in runs]),
        params=_same_or_range([r.result.get("params") for r in runs]),
        teachers=teachers,
        epochs=_same_or_range([r.result.get("epochs") for r in runs]),
        bane=mean_std(bane) if bane else None,
        recon=mean_std(recon) if recon else None,
        runs=[str(r.path) for r in runs],
        last=stats.summary(last),
        best=stats.summary(best),
        selected=stats.summary(selected),
        selected_on=selected_on,
        seconds=cost.mean_seconds([cost.training_seconds(r.path) for r in runs]),
        teacher_seconds=cost.cell_teacher_cost([cost.teacher_seconds(r.result, r.path) for r in runs]),
        passes=cost.passes_per_step(runs[0].config),
    )


def selection(runs: list[Run]) -> tuple[list[float], str | None]:
    return selected_values([r.result for r in runs])


def selected_values(results: list[dict]) -> tuple[list[float], str | None]:
    """Each result.json's top-1 at its selected epoch and the split that selected it (`top1_selected`,
    `selected_on`: val, test, or mixed when the runs differ; None without runs); a result without them (before
    data.val_split existed) selected on the test set: its best epoch."""
    values = [r.get("top1_selected", r.get("top1_best", r["top1_last"])) for r in results]
    splits = {r.get("selected_on", "test") for r in results}
    return values, (splits.pop() if len(splits) == 1 else ("mixed" if splits else None))


def duplicate_seeds(row: Row) -> list:
    return sorted((s for s, c in Counter(row.seeds).items() if c > 1), key=str)


SORT_KEYS = {
    "input": None,
    "top1_last": lambda r: -r.top1_last[0],
    "top1_best": lambda r: -r.top1_best[0],
    "name": lambda r: r.label,
}


def build_rows(runs: list[Run], ignore: tuple[str, ...] = IGNORED_BY_DEFAULT, sort: str = "input") -> list[Row]:
    rows = [summarise(g) for g in group_runs(runs, ignore)]
    if SORT_KEYS[sort] is not None:
        rows.sort(key=SORT_KEYS[sort])
    return rows


def _teacher_cell(row: Row, digits: int = 2) -> str:
    return ", ".join(fmt(m, s, digits) for m, s in row.teachers) or "-"


def _selected_cell(r: Row) -> str:
    return f"{stats.fmt_summary(r.selected)} (on {r.selected_on})"


def markdown(rows: list[Row]) -> str:
    bane = any(r.bane for r in rows)
    recon = any(r.recon for r in rows)
    head = ["recipe", "seeds", "top-1 last", "top-1 best", "top-1 selected", "params", "teacher top-1", "epochs"]
    head += ["student time", "teacher time", "passes/step"]
    head += ["BANE top-1"] * bane + ["recon error"] * recon
    lines = [
        "| " + " | ".join(head) + " |",
        "|" + "|".join("---" if i == 0 else "---:" for i in range(len(head))) + "|",
    ]
    for r in rows:
        cells = [
            r.label.replace("|", "\\|"),
            str(r.n),
            stats.fmt_summary(r.last),
            stats.fmt_summary(r.best),
            _selected_cell(r),
            r.params,
            _teacher_cell(r),
            r.epochs,
            cost.fmt_seconds(r.seconds),
            cost.fmt_seconds(r.teacher_seconds),
            cost.fmt_passes(r.passes),
        ]
        if bane:
            cells.append(fmt(*r.bane) if r.bane else "-")
        if recon:
            cells.append(fmt(*r.recon, digits=4) if r.recon else "-")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        "Top-1 in % on the test split: mean ± sample std [95% t-interval of the mean] over seeds; a single run is "
        "labelled (1 seed). last: after the final epoch; best: the best epoch on the test set (optimistic); "
        "selected: the test top-1 at the epoch with the best validation top-1 (on val, data.val_split), or the "
        "best epoch when there is no validation split (on test). Student time: its measured training time (mean "
        "over seeds); teacher time: the teachers' own training time, or given weights; passes/step: the "
        "student's forwards (F) and backwards (B) per batch and the teachers' forwards."
    )
    return "\n".join(lines) + "\n"


def to_csv(rows: list[Row]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(
        [
            "recipe",
            "key",
            "n",
            "seeds",
            "top1_last_mean",
            "top1_last_std",
            "top1_best_mean",
            "top1_best_std",
            "top1_last_lo",
            "top1_last_hi",
            "top1_best_lo",
            "top1_best_hi",
            "top1_selected_mean",
            "top1_selected_std",
            "top1_selected_lo",
            "top1_selected_hi",
            "selected_on",
            "student_seconds",
            "teacher_seconds",
            "student_forward",
            "student_backward",
            "teacher_forward",
            "params",
            "teacher_top1_mean",
            "teacher_top1_std",
            "epochs",
            "bane_top1_mean",
            "recon_error_mean",
            "runs",
        ]
    )

    def num(v):
        return "" if v is None or (isinstance(v, float) and math.isnan(v)) else repr(float(v))

    for r in rows:
        w.writerow(
            [
                r.label,
                r.key,
                r.n,
                ";".join(map(str, r.seeds)),
                num(r.top1_last[0]),
                num(r.top1_last[1]),
                num(r.top1_best[0]),
                num(r.top1_best[1]),
                num(r.last["lo"]),
                num(r.last["hi"]),
                num(r.best["lo"]),
                num(r.best["hi"]),
                num(r.selected["mean"]),
                num(r.selected["std"]),
                num(r.selected["lo"]),
                num(r.selected["hi"]),
                r.selected_on,
                num(r.seconds),
                r.teacher_seconds if isinstance(r.teacher_seconds, str) else num(r.teacher_seconds),
                *(("", "", "") if r.passes is None else (r.passes["student_forward"], r.passes["student_backward"])),
                *(
                    ()
                    if r.passes is None
                    else ("cached" if r.passes["teacher_cached"] else r.passes["teacher_forward"],)
                ),
                r.params.replace(",", ""),
                ";".join(num(m) for m, _ in r.teachers),
                ";".join(num(s) for _, s in r.teachers),
                r.epochs,
                num(r.bane[0]) if r.bane else "",
                num(r.recon[0]) if r.recon else "",
                ";".join(r.runs),
            ]
        )
    return buf.getvalue()


def render(rows: list[Row], fmt_name: str) -> str:
    if fmt_name == "md":
        return markdown(rows)
    if fmt_name == "csv":
        return to_csv(rows)
    raise KdlabError(f"unknown table format {fmt_name!r}; use md or csv")


def warn(msg: str) -> None:
    sys.stderr.write(f"kdlab: {msg}\n")
