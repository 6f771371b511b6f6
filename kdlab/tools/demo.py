"""`kdlab demo`: every method's digits recipe, one shared teacher, one table.

The student (smallcnn_narrow, 4,370 parameters) is small enough that alone it stays clearly below its
teacher on the digits data, so a method's gain can show; vanilla runs three seeds so that the table
states its own noise, and every other recipe is shown as its delta to vanilla's mean.
"""

from __future__ import annotations

import json
import time
from importlib import resources
from pathlib import Path

from kdlab import pipeline
from kdlab.checkpoint import atomic_write_text
from kdlab.recipe_files import load_recipe
from kdlab.tools.results import mean_std


def recipe_dir(family: str = "digits") -> Path:
    return Path(str(resources.files("kdlab") / "recipes" / family))


def digits_recipes() -> dict[str, Path]:
    return {p.stem: p for p in sorted(recipe_dir("digits").glob("*.yaml"))}


VANILLA = "vanilla"
VANILLA_SEEDS = 3  # the baseline's own spread, against which every delta is read
FLOOR = 90.0  # every recipe's top-1 on the demo (the test holds the demo to it); vanilla is ~96%


def teacher_text(row: dict) -> str:
    return ", ".join(f"{t['top1_last']:.1f}" for t in row.get("teachers", []) if "top1_last" in t) or "-"


def add_deltas(rows: list[dict]) -> dict | None:
    """Each row's top-1 minus vanilla's mean over its seeds, for rows that train vanilla's student (reversed KD
    trains a larger one: no baseline here); returns vanilla's {mean, std, n}."""
    runs = [r for r in rows if r["recipe"] == VANILLA]
    if not runs:
        return None
    values = [r["top1_last"] for r in runs]
    mean, std = mean_std(values)
    base = {"mean": mean, "std": 0.0 if std is None else std, "n": len(values)}
    for r in rows:
        if r["student"] == runs[0]["student"]:
            r["delta_vs_vanilla"] = r["top1_last"] - base["mean"]
    return base


def summary_rows(rows: list[dict], base: dict | None) -> list[dict]:
    """One row per recipe: vanilla's seeds folded into one row with its spread."""
    out, seen = [], False
    for r in rows:
        if r["recipe"] == VANILLA:
            if seen:
                continue
            seen = True
            r = {
                **r,
                "top1_text": f"{base['mean']:.2f} ± {base['std']:.2f} ({base['n']} seeds)",
                "delta_text": "0 (baseline)",
            }
        else:
            r = {
                **r,
                "top1_text": f"{r['top1_last']:.2f}",
                "delta_text": f"{r['delta_vs_vanilla']:+.2f}" if "delta_vs_vanilla" in r else f"n/a ({r['student']})",
            }
        out.append(r)
    return out


COLUMNS = ("recipe", "method", "student", "top-1 last", "Δ vs vanilla", "teacher top-1", "seconds")


def cells(r: dict) -> list[str]:
    return [
        r["recipe"],
        r["method"],
        f"{r['student']} ({r['params']:,})",
        r["top1_text"],
        r["delta_text"],
        teacher_text(r),
        f"{r['seconds']:.1f}",
    ]


def markdown_table(rows: list[dict], base: dict | None) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|---|---|---|---:|---:|---:|---:|"]
    lines += ["| " + " | ".join(cells(r)) + " |" for r in summary_rows(rows, base)]
    if base is not None:
        lines += [
            "",
            f"Δ: the recipe's top-1 (last epoch, test split, one seed) minus vanilla's mean over {base['n']} seeds; "
            f"vanilla's own spread is ±{base['std']:.2f} (sample std), so a Δ within about twice that is noise.",
        ]
    return "\n".join(lines) + "\n"


def print_table(rows: list[dict], base: dict | None, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col in COLUMNS:
        table.add_column(col, justify="left" if col in ("recipe", "method", "student") else "right")
    for r in summary_rows(rows, base):
        table.add_row(*cells(r))
    Console(width=140).print(table)
    if base is not None:
        print(
            f"Δ vs vanilla's mean over {base['n']} seeds (its spread ±{base['std']:.2f}); "
            "teacher: the teacher's test top-1."
        )


def run_demo(out: Path, only: list[str] | None = None, quiet: bool = False, overrides: list[str] = ()) -> list[dict]:
    import os

    import torch

    if "OMP_NUM_THREADS" not in os.environ:
        # 8x8 digits nets gain nothing from intra-op threads, and on a busy 2-core machine two
        # threads per process ran an epoch 5x slower than one (2026-11-24, 2-core CPU)
        torch.set_num_threads(1)
    recipes = digits_recipes()
    if only:
        unknown = sorted(set(only) - set(recipes))
        if unknown:
            from kdlab.errors import ConfigError

            raise ConfigError(f"demo: no digits recipe named {', '.join(unknown)}; available: {', '.join(recipes)}")
        recipes = {k: v for k, v in recipes.items() if k in only}
    if VANILLA in recipes:  # the baseline first: every other row is read against it
        recipes = {VANILLA: recipes[VANILLA], **{k: v for k, v in recipes.items() if k != VANILLA}}
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    t_all = time.perf_counter()
    for name, path in recipes.items():
        for seed in range(VANILLA_SEEDS if name == VANILLA else 1):
            recipe = load_recipe(path, [f"cache_dir={out / 'teachers'}", *overrides], seed=seed if seed else None)
            run_dir = out / name if seed == 0 else out / f"{name}_seed{seed}"
            t0 = time.perf_counter()
            print(f"== {name}{f' seed {seed}' if seed else ''}: {recipe.method} ({path.name})", flush=True)
            resume = pipeline.resumable(run_dir)  # a folder left by a failed first epoch starts afresh
            result = pipeline.run(None if resume else recipe, run_dir, resume=resume, quiet=quiet)
            rows.append(
                {
                    "recipe": name,
                    "run": run_dir.name,
                    **result,
                    "seconds": result.get("wall_seconds", time.perf_counter() - t0),
                }
            )
    total = time.perf_counter() - t_all
    base = add_deltas(rows)
    atomic_write_text(out / "results.json", json.dumps(rows, indent=2) + "\n")
    atomic_write_text(out / "table.md", markdown_table(rows, base) + f"\nTotal wall time: {total:.1f} s\n")
    print_table(rows, base, f"kdlab demo: digits (sklearn), {len(recipes)} recipes, {total:.0f} s")
    try:
        from kdlab.tools.plots import plot_runs

        plot_runs([out / r["run"] for r in rows], out / "curves.png", labels=[r["run"] for r in rows])
        print(f"table: {out / 'table.md'}  plot: {out / 'curves.png'}")
    except ImportError:
        print(f"table: {out / 'table.md'}")
    return rows
