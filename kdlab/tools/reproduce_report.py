"""The comparison of a reproduction table: per cell, ours (n, mean +- std and a 95% t-interval over seeds, for the
last, the best and the selected epoch) against the published number or against other cells of the same run (a
difference with its Welch interval, "within noise" when it covers zero), and what each cell cost; written as
results.json, results.md and a bar chart of the deltas (deltas.png)."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import yaml

from kdlab.checkpoint import atomic_write_text
from kdlab.student import read_result
from kdlab.tools import cost, stats
from kdlab.tools.reproduce import Invocation, Table, run_dir_of
from kdlab.tools.results import CONFIG, mean_std, selected_values, teacher_accuracy


def relative_to(path: str, base: Path) -> str:
    """A path inside the output folder is stored relative to it, so the folder can be moved or committed."""
    if not path:
        return path
    try:
        return str(Path(path).resolve().relative_to(base.resolve()))
    except ValueError:
        return path


def cell_summary(table: Table, cell, out: Path, seeds: int) -> dict:
    metric = table.metric_of(cell)
    by_seed = {s: read_result(run_dir_of(out, cell, s)) for s in range(seeds)}
    results = [r for r in by_seed.values() if r is not None]
    last_mean, last_std = mean_std([r["top1_last"] for r in results])
    best_mean, best_std = mean_std([r["top1_best"] for r in results])
    ours = last_mean if metric == "last" else best_mean
    dirs = [run_dir_of(out, cell, s) for s, r in by_seed.items() if r is not None]
    selected, selected_on = selected_values(results)
    student_seconds = [cost.training_seconds(d) for d in dirs]
    teacher_seconds = [cost.teacher_seconds(r, d) for r, d in zip(results, dirs)]
    row = {
        "cell": cell.name,
        "recipe": cell.recipe,
        "metric": metric,
        "n": len(results),
        "seeds": [s for s, r in by_seed.items() if r is not None],
        # per metric, each finished seed's top-1 (in `seeds` order): what the comparisons are computed from
        "values": {
            "last": [r["top1_last"] for r in results],
            "best": [r["top1_best"] for r in results],
            "selected": selected,
        },
        "last_mean": last_mean,
        "last_std": last_std,
        "best_mean": best_mean,
        "best_std": best_std,
        # per metric: n, mean, std and the 95% t-interval over seeds (lo, hi; None below two seeds)
        "stats": {
            "last": stats.summary([r["top1_last"] for r in results]),
            "best": stats.summary([r["top1_best"] for r in results]),
            # the test top-1 at the best validation epoch; without data.val_split the best epoch (selected_on test)
            "selected": stats.summary(selected),
        },
        "selected_on": selected_on,
        "cost": {
            "student_seconds": cost.mean_seconds(student_seconds),
            "teacher_seconds": cost.cell_teacher_cost(teacher_seconds),
            "passes_per_step": cost.passes_per_step(cell_config(out, cell, by_seed)),
        },
        "published": cell.published,
        "tolerance": table.tolerance_of(cell),
        "source": cell.source or table.source or None,
        "delta": None,
        "within_tolerance": None,
        "compare_to": {},
        "compare_stats": {},
        "teachers": [],
        "wall_seconds": round(sum(r.get("wall_seconds", 0.0) for r in results), 1),
        "device": sorted({r.get("device", "?") for r in results}),
    }
    if cell.published is not None and ours is not None:
        row["delta"] = ours - cell.published
        row["within_tolerance"] = abs(row["delta"]) <= row["tolerance"]
    if any("bane_top1" in r for r in results):
        row["bane_mean"], row["bane_std"] = mean_std([r["bane_top1"] for r in results if "bane_top1" in r])
    n_teachers = max([len(r.get("teachers", [])) for r in results] + [len(cell.teacher_published)])
    for t in range(n_teachers):
        infos = [r["teachers"][t] for r in results if len(r.get("teachers", [])) > t]
        accs = [a for a in (teacher_accuracy(i, metric) for i in infos) if a is not None]
        acc, acc_std = mean_std(accs)
        pub = cell.teacher_published[t] if t < len(cell.teacher_published) else None
        row["teachers"].append(
            {
                "name": infos[0]["name"] if infos else None,
                "epoch": infos[0].get("epoch") if infos else None,
                "mean": acc,
                "std": acc_std,
                "n": len(accs),
                "published": pub,
                "delta": acc - pub if acc is not None and pub is not None else None,
                "runs": sorted({relative_to(i.get("source", ""), out) for i in infos}),
            }
        )
    return row


def cell_config(out: Path, cell, by_seed: dict) -> dict | None:
    """The first finished seed's config.yaml: what the cell trains, for its passes per step."""
    for s, r in by_seed.items():
        path = run_dir_of(out, cell, s) / CONFIG
        if r is not None and path.exists():
            try:  # a damaged file must not stop the report
                config = yaml.safe_load(path.read_text())
            except (OSError, ValueError, yaml.YAMLError):
                return None
            return config if isinstance(config, dict) else None
    return None


def add_comparisons(table: Table, rows: dict[str, dict]) -> None:
    """compare_to: the difference of the means on the cell's metric; compare_stats: that difference with its 95%
    interval (Welch; a one-seed side read against the other's noise), `within_noise` when it covers zero."""
    for cell in table.cells:
        row = rows[cell.name]
        metric = row["metric"]
        ours = row[f"{metric}_mean"]
        for ref in cell.compare_to:
            theirs = rows[ref][f"{metric}_mean"]
            row["compare_to"][ref] = ours - theirs if ours is not None and theirs is not None else None
            row["compare_stats"][ref] = stats.difference(row["values"][metric], rows[ref]["values"][metric])


def summarize(table: Table, inv: Invocation, failures: dict[str, str]) -> dict:
    out = Path(inv.out)
    rows = {c.name: cell_summary(table, c, out, table.seeds_of(c, inv.seeds)) for c in table.cells}
    add_comparisons(table, rows)
    devices = sorted({d for r in rows.values() for d in r["device"]})
    return {
        "title": table.title,
        "table": str(inv.table),
        "source": table.source,
        "published_numbers": table.published_numbers,
        "description": table.description,
        "seeds_requested": inv.seeds or table.seeds,
        "command_line": inv.recorded(),
        "written": time.strftime("%Y-%m-%d %H:%M:%S"),
        "host": platform.node(),
        "devices": devices,
        "failures": failures,
        "wall_seconds_students": round(sum(r["wall_seconds"] for r in rows.values()), 1),
        "cells": list(rows.values()),
    }


def _fmt(mean: float | None, std: float | None, n: int) -> str:
    if mean is None:
        return "—"
    return f"{mean:.2f} ± {std:.2f}" if n > 1 else f"{mean:.2f}"


def _signed(x: float | None) -> str:
    return "—" if x is None else f"{x:+.2f}"


def _teacher_text(t: dict) -> str:
    at_epoch = f"@epoch{t['epoch']}" if t["epoch"] is not None else ""
    published = "—" if t["published"] is None else f"{t['published']:.2f}"
    return f"{t['name'] or '?'}{at_epoch} {_fmt(t['mean'], t['std'], t['n'])} / {published}"


def render_markdown(summary: dict) -> str:
    lines = [f"# {summary['title']}", ""]
    if summary["description"]:
        lines += [summary["description"].strip(), ""]
    if summary["published_numbers"]:
        lines += [
            f"Published numbers: {summary['source'] or 'see each cell'}. Δ = ours (the cell's metric) − published.",
            "",
        ]
    else:
        lines += [
            "No published numbers exist for this table: each cell is compared with other cells of this same run "
            "(Δ vs the named cells, on the cell's metric).",
            "",
        ]
    lines += [
        f"Seeds requested: {summary['seeds_requested']}; devices: {', '.join(summary['devices']) or '—'}; "
        f"written {summary['written']}.",
        "",
    ]
    given = summary.get("command_line") or {}
    if given.get("set") or given.get("seeds") or given.get("only"):
        shown = [f"--set {x}" for x in given.get("set") or []]
        shown += [f"--seeds {given['seeds']}"] if given.get("seeds") else []
        shown += [f"--only {' '.join(given['only'])}"] if given.get("only") else []
        lines += [
            "Given on the command line (applied to every cell, after the table's own settings): "
            + ", ".join(f"`{x}`" for x in shown),
            "",
        ]
    head = (
        "| cell | metric | n | last | best | selected | published | Δ | within tol. | compared with | "
        "teacher ours / published | student time | teacher time | passes/step |"
    )
    lines += [head, "|---" * (head.count("|") - 1) + "|"]
    for r in summary["cells"]:
        within = (
            "—" if r["within_tolerance"] is None else ("yes" if r["within_tolerance"] else f"no (±{r['tolerance']:g})")
        )
        compared = (
            "; ".join(
                f"{k} {stats.fmt_difference(r['compare_stats'][k]) if k in r.get('compare_stats', {}) else _signed(v)}"
                for k, v in r["compare_to"].items()
            )
            or "—"
        )
        teachers = "; ".join(_teacher_text(t) for t in r["teachers"]) or "—"
        published = "—" if r["published"] is None else f"{r['published']:.2f}"
        bane = f" (BANE {r['bane_mean']:.2f})" if r.get("bane_mean") is not None else ""
        st, spent = r.get("stats") or {}, r.get("cost") or {}
        last = stats.fmt_summary(st["last"]) if st else _fmt(r["last_mean"], r["last_std"], r["n"])
        best = stats.fmt_summary(st["best"]) if st else _fmt(r["best_mean"], r["best_std"], r["n"])
        selected = f"{stats.fmt_summary(st['selected'])} (on {r['selected_on']})" if st else "—"
        lines.append(
            f"| {r['cell']} | {r['metric']} | {r['n']} | {last}{bane} | {best} | {selected} | {published} | "
            f"{_signed(r['delta'])} | {within} | {compared} | {teachers} | "
            f"{cost.fmt_seconds(spent.get('student_seconds'))} | {cost.fmt_seconds(spent.get('teacher_seconds'))} | "
            f"{cost.fmt_passes(spent.get('passes_per_step'))} |"
        )
    lines += [
        "",
        "Top-1 in % on the test split: mean ± sample std [95% t-interval of the mean] over seeds, (1 seed) for a "
        "single run. selected: the test top-1 at the best validation epoch (on val, data.val_split), or the best "
        "epoch when there is no validation split (on test). compared with: the difference of the means on the "
        "cell's metric [its 95% Welch interval], within noise when the interval covers zero; a one-seed cell is read "
        f"against the other cell's seed noise ({stats.ONE_SEED}). Student time: measured training time, mean over "
        "seeds; teacher time: the teachers' own training, or given weights; passes/step: the student's forwards "
        "(F) and backwards (B) per batch and the teachers' forwards.",
    ]
    if summary["failures"]:
        lines += ["", "Failed runs (rerun the same command to retry them):", ""]
        lines += [f"- {k}: {v}" for k, v in summary["failures"].items()]
    return "\n".join(lines) + "\n"


def chart_values(summary: dict) -> tuple[list[str], list[float], str]:
    """Deltas vs published where the table has published numbers, else vs each cell's first compare_to cell."""
    labels, values = [], []
    for r in summary["cells"]:
        if summary["published_numbers"]:
            if r["delta"] is not None:
                labels.append(r["cell"])
                values.append(r["delta"])
        elif r["compare_to"]:
            ref, delta = next(iter(r["compare_to"].items()))
            if delta is not None:
                labels.append(f"{r['cell']} − {ref}")
                values.append(delta)
    what = (
        "ours − published (top-1 points)"
        if summary["published_numbers"]
        else "Δ vs the first compare_to cell (top-1 points)"
    )
    return labels, values, what


def write_chart(summary: dict, path: Path) -> bool:
    labels, values, what = chart_values(summary)
    if not values:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 0.35 * len(values) + 1.2), dpi=100)
    ax.barh(range(len(values)), values, color=["tab:green" if v >= 0 else "tab:red" for v in values])
    ax.set_yticks(range(len(values)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlabel(what)
    ax.set_title(summary["title"], fontsize=10)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return True


def write_report(table: Table, inv: Invocation, failures: dict[str, str]) -> dict:
    out = Path(inv.out)
    summary = summarize(table, inv, failures)
    summary["chart"] = write_chart(summary, out / "deltas.png")
    atomic_write_text(out / "results.json", json.dumps(summary, indent=2) + "\n")
    atomic_write_text(out / "results.md", render_markdown(summary))
    return summary
