"""Reproduction tables: many recipes (cells) x seeds, run into one output folder, compared with published numbers.

A table file (YAML, schema `Table`) lists cells: a recipe, per-cell overrides, the published
top-1 and which metric the source reports (last or best epoch), the published teacher accuracies,
a tolerance and the source. Cells without a published number name other cells to compare with
(`compare_to`). Layout of the output folder:

    OUT/teachers/<model>-<hash>/     teachers, cached by content hash and shared by every cell
                                     (--cache-dir: one cache shared by several tables)
    OUT/cells/<cell>/seed<k>/        one run directory per cell and seed
    OUT/results.json, results.md, deltas.png

Every invocation continues where the last stopped: a run with result.json is skipped, a run with
only config.yaml is resumed from its checkpoint, and a run whose stored recipe no longer matches
the table is refused before anything trains (a finished result is never overwritten).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from kdlab.config import Recipe, format_validation_error
from kdlab.errors import ConfigError
from kdlab.recipe_files import apply_overrides, read_yaml, validate
from kdlab.strict import Strict

RECIPES_ROOT = Path(__file__).resolve().parents[1] / "recipes"
CELL_NAME = re.compile(r"^[A-Za-z0-9_.+-]+(/[A-Za-z0-9_.+-]+)*$")
# keys that say where things are, not what is trained: a moved data set or output folder still resumes
LOCATION_KEYS = (("data", "root"), ("cache_dir",), ("note",))


class Cell(Strict):
    name: str = Field(description="unique; letters, digits, _ . + - and / (folders)")
    recipe: str = Field(description="recipe path, relative to the table file or to kdlab/recipes")
    overrides: dict[str, Any] = Field(
        default_factory=dict, description="dotted key -> value, applied after the table's"
    )
    published: float | None = Field(default=None, ge=0, le=100, description="published top-1 %")
    metric: Literal["last", "best"] | None = Field(
        default=None, description="which epoch the source reports; default: the table's"
    )
    teacher_published: list[float | None] = Field(
        default_factory=list, description="published top-1 of each teacher, in order"
    )
    tolerance: float | None = Field(
        default=None, gt=0, description="|ours - published| allowed, in points; default: the table's"
    )
    source: str | None = None
    compare_to: list[str] = Field(default_factory=list, description="cells of this table to print deltas against")
    seeds: int | None = Field(default=None, ge=1, description="number of seeds of this cell; default: the table's")
    note: str = ""

    @field_validator("name")
    @classmethod
    def _name_is_a_path(cls, v: str) -> str:
        if not CELL_NAME.match(v) or any(p in (".", "..") for p in v.split("/")):
            raise ValueError(f"cell name {v!r}: use letters, digits, _ . + - and / only")
        return v


class Table(Strict):
    title: str
    description: str = ""
    source: str = Field(default="", description="where the published numbers come from")
    published_numbers: bool = Field(default=True, description="false: the cells are compared with each other only")
    metric: Literal["last", "best"] = "last"
    tolerance: float = Field(default=1.0, gt=0)
    seeds: int = Field(default=1, ge=1, description="default number of seeds (0..N-1); --seeds overrides")
    overrides: dict[str, Any] = Field(default_factory=dict, description="dotted key -> value, applied to every cell")
    cells: list[Cell] = Field(min_length=1)

    @model_validator(mode="after")
    def _consistent(self):
        names = [c.name for c in self.cells]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"duplicate cell name(s): {', '.join(dup)}")
        for c in self.cells:
            for ref in c.compare_to:
                if ref not in names:
                    raise ValueError(f"cell {c.name}: compare_to names {ref!r}, which is not a cell of this table")
                if ref == c.name:
                    raise ValueError(f"cell {c.name}: compare_to names the cell itself")
            if not self.published_numbers and c.published is not None:
                raise ValueError(f"cell {c.name}: the table says published_numbers: false but the cell has 'published'")
        return self

    def cell(self, name: str) -> Cell:
        return next(c for c in self.cells if c.name == name)

    def metric_of(self, cell: Cell) -> str:
        return cell.metric or self.metric

    def tolerance_of(self, cell: Cell) -> float:
        return cell.tolerance or self.tolerance

    def seeds_of(self, cell: Cell, requested: int | None = None) -> int:
        """--seeds (`requested`) wins over the cell's own count, which wins over the table's."""
        return requested or cell.seeds or self.seeds


def find_table(name: str | Path) -> Path:
    """A table file by path, or by the name of a table packaged with kdlab (``cpu_short``, ``bench240``)."""
    path = Path(name)
    if path.exists() or path.suffix or len(path.parts) > 1:
        return path
    packaged = RECIPES_ROOT / "tables" / f"{name}.yaml"
    if packaged.is_file():
        return packaged
    known = ", ".join(sorted(p.stem for p in (RECIPES_ROOT / "tables").glob("*.yaml")))
    raise ConfigError(f"no table file {name!r} and no packaged table of that name; packaged tables: {known}")


def load_table(path: str | Path) -> Table:
    path = Path(path)
    raw = read_yaml(path)
    if not raw:
        raise ConfigError(f"{path}: the table is empty (it needs a title and cells; see recipes/tables/)")
    try:
        return Table.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"{path}: {format_validation_error(e)}") from None


def resolve_recipe_path(table_path: Path, recipe: str) -> Path:
    for base in (table_path.parent, RECIPES_ROOT):
        candidate = (base / recipe).resolve()
        if candidate.is_file():
            return candidate
    raise ConfigError(f"{table_path}: recipe {recipe!r} not found next to the table nor under {RECIPES_ROOT}")


def as_set_items(overrides: dict[str, Any]) -> list[str]:
    """`{a.b: v}` -> `a.b=<v as JSON>`, the --set syntax (JSON is read back exactly by YAML)."""
    return [f"{key}={json.dumps(value)}" for key, value in overrides.items()]


# ----------------------------------------------------------------------------------------------
# Planning: every (cell, seed) becomes a validated recipe and a run directory


class Job:
    def __init__(self, cell: Cell, seed: int, recipe: Recipe, run_dir: Path):
        self.cell, self.seed, self.recipe, self.run_dir = cell, seed, recipe, run_dir

    @property
    def label(self) -> str:
        return f"{self.cell.name} seed {self.seed}"


def run_dir_of(out: Path, cell: Cell, seed: int) -> Path:
    return out / "cells" / cell.name / f"seed{seed}"


def build_recipe(
    table: Table,
    table_path: Path,
    cell: Cell,
    seed: int,
    out: Path,
    sets: list[str],
    data_root: str | None,
    cache_dir: Path | None = None,
) -> Recipe:
    from kdlab.methods import check_recipe

    path = resolve_recipe_path(table_path, cell.recipe)
    where = f"{table_path}: cell {cell.name}"
    try:
        raw = apply_overrides(
            read_yaml(path), as_set_items(table.overrides) + as_set_items(cell.overrides) + list(sets)
        )
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    raw["seed"] = seed
    raw["cache_dir"] = str(Path(cache_dir or out / "teachers").resolve())
    if data_root is not None:
        raw.setdefault("data", {})["root"] = data_root
    recipe = validate(raw, source=f"{where} ({path.name})")
    try:
        check_recipe(recipe)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    return recipe


def _without_locations(dumped: dict) -> dict:
    out = json.loads(json.dumps(dumped))
    for path in LOCATION_KEYS:
        node = out
        for key in path[:-1]:
            node = node.get(key, {})
        node.pop(path[-1], None)
    return out


def check_unchanged(job: Job) -> None:
    """A run started earlier must have been started with the recipe the table gives now."""
    config = job.run_dir / "config.yaml"
    if not config.exists():
        return
    stored = validate(read_yaml(config), source=str(config))
    if _without_locations(stored.model_dump(mode="json")) != _without_locations(job.recipe.model_dump(mode="json")):
        raise ConfigError(
            f"{job.label}: {job.run_dir} was started with a different recipe than the table now gives; "
            "move that folder away or use another --out (nothing was changed)"
        )


def plan(
    table: Table,
    table_path: Path,
    out: Path,
    seeds: int | None,
    only: list[str] | None,
    sets: list[str],
    data_root: str | None,
    cache_dir: Path | None = None,
) -> list[Job]:
    names = [c.name for c in table.cells]
    for name in only or []:
        if name not in names:
            raise ConfigError(f"--only {name}: no such cell; cells: {', '.join(names)}")
    cells = [c for c in table.cells if not only or c.name in only]
    jobs = []
    for seed in range(max(table.seeds_of(c, seeds) for c in cells)):  # seed-major: a complete first-seed table first
        for cell in cells:
            if seed < table.seeds_of(cell, seeds):
                recipe = build_recipe(table, table_path, cell, seed, out, sets, data_root, cache_dir)
                jobs.append(Job(cell, seed, recipe, run_dir_of(out, cell, seed)))
    for job in jobs:
        check_unchanged(job)
    return jobs


# ----------------------------------------------------------------------------------------------
# Running


@dataclass
class Invocation:
    """What `kdlab reproduce` was asked: recorded in results.json so that a report says how it was made."""

    table: str
    out: str
    seeds: int | None = None
    only: list[str] | None = None
    sets: list[str] = field(default_factory=list)
    data_root: str | None = None
    cache_dir: str | None = None
    jobs: int = 1
    quiet: bool = False

    def plan(self, table: Table) -> list[Job]:
        return plan(
            table,
            Path(self.table),
            Path(self.out),
            self.seeds,
            self.only,
            list(self.sets),
            self.data_root,
            Path(self.cache_dir) if self.cache_dir else None,
        )

    def recorded(self) -> dict:
        """The options that change what was trained or reported (not where things are or how many workers)."""
        return {"seeds": self.seeds, "only": self.only, "set": list(self.sets)}


def run_job(job: Job, quiet: bool) -> dict:
    """Train one (cell, seed), resuming it when an earlier invocation started it."""
    from kdlab import pipeline

    resume = (job.run_dir / "config.yaml").exists()
    return pipeline.run(None if resume else job.recipe, job.run_dir, resume=resume, quiet=quiet)
