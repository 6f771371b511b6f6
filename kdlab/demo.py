"""`kdlab demo`: every method's digits recipe, one shared teacher, one table."""

from __future__ import annotations

import json
import time
from importlib import resources
from pathlib import Path

from kdlab import runner
from kdlab.checkpoint import atomic_write_text
from kdlab.config import load_recipe


def recipe_dir(family: str = "digits") -> Path:
    return Path(str(resources.files("kdlab") / "recipes" / family))


def digits_recipes() -> dict[str, Path]:
    return {p.stem: p for p in sorted(recipe_dir("digits").glob("*.yaml"))}


def markdown_table(rows: list[dict]) -> str:
    lines = ["| recipe | method | top-1 last | top-1 best | params | teacher top-1 | seconds |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        teacher = ", ".join(f"{t['top1_last']:.2f}" for t in r.get("teachers", []) if "top1_last" in t) or "-"
        lines.append(f"| {r['recipe']} | {r['method']} | {r['top1_last']:.2f} | {r['top1_best']:.2f} | {r['params']:,} | {teacher} | {r['seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def print_table(rows: list[dict], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col in ("recipe", "method", "top-1 last", "top-1 best", "params", "seconds"):
        table.add_column(col, justify="left" if col in ("recipe", "method") else "right")
    for r in rows:
        table.add_row(r["recipe"], r["method"], f"{r['top1_last']:.2f}", f"{r['top1_best']:.2f}", f"{r['params']:,}", f"{r['seconds']:.1f}")
    Console(width=120).print(table)


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
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    t_all = time.perf_counter()
    for name, path in recipes.items():
        recipe = load_recipe(path, [f"cache_dir={out / 'teachers'}", *overrides])
        run_dir = out / name
        t0 = time.perf_counter()
        print(f"== {name}: {recipe.method} ({path.name})", flush=True)
        resume = (run_dir / "config.yaml").exists()
        result = runner.run(None if resume else recipe, run_dir, resume=resume, quiet=quiet)
        rows.append({"recipe": name, **result, "seconds": result.get("wall_seconds", time.perf_counter() - t0)})
    total = time.perf_counter() - t_all
    atomic_write_text(out / "results.json", json.dumps(rows, indent=2) + "\n")
    atomic_write_text(out / "table.md", markdown_table(rows) + f"\nTotal wall time: {total:.1f} s\n")
    print_table(rows, f"kdlab demo: digits (sklearn), {len(rows)} recipes, {total:.0f} s")
    try:
        from kdlab.plots import plot_runs

        plot_runs([out / r["recipe"] for r in rows], out / "curves.png", labels=[r["recipe"] for r in rows])
        print(f"table: {out / 'table.md'}  plot: {out / 'curves.png'}")
    except ImportError:
        print(f"table: {out / 'table.md'}")
    return rows
