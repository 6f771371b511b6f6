"""Recipes as files: reading YAML, finding packaged recipes by name, ``--set`` overrides, validation into
a :class:`kdlab.config.Recipe` with one-line errors, and writing a recipe back out."""

from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from kdlab.config import Recipe, format_validation_error
from kdlab.errors import ConfigError
from kdlab.text_files import read_text


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
    key, raw = item.split("=", 1)
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"--set {item!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`--set a.b.c=V` on the raw mapping; the schema then says whether the key exists."""
    out = copy.deepcopy(raw)
    for item in overrides:
        path, value = parse_override(item)
        node: Any = out
        for i, part in enumerate(path):
            where = ".".join(path[: i + 1])
            if isinstance(node, list):  # teachers.0.name: an index into a list
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"--set {item}: {where}: no such list index (the list has {len(node)} entries)")
                part = int(part)
            elif not isinstance(node, dict):
                raise ConfigError(f"--set {item}: {'.'.join(path[:i])} is not a section")
            if i == len(path) - 1:
                node[part] = value
            else:
                if isinstance(node, dict) and node.get(part) is None:
                    node[part] = {}
                node = node[part]
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"recipe not found: {p}")
    try:
        data = yaml.safe_load(read_text(p, ConfigError))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{p}:{where} invalid YAML ({getattr(e, 'problem', e)})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: a recipe must be a mapping of keys, got {type(data).__name__}")
    return data


def packaged_recipes_root() -> Path:
    from importlib import resources

    return Path(str(resources.files("kdlab") / "recipes"))


def packaged_recipes() -> dict[str, Path]:
    """Every recipe shipped with kdlab by name (`digits/kd`, `cifar100/fast/kd`); the reproduction tables
    under `tables/` are not recipes (`kdlab reproduce` reads them)."""
    root = packaged_recipes_root()
    found = sorted(p for p in root.rglob("*.yaml") if p.relative_to(root).parts[0] != "tables")
    return {p.relative_to(root).with_suffix("").as_posix(): p for p in found}


def find_recipe(name: str | Path) -> Path:
    """A recipe file as given, else a packaged recipe: `digits/kd`, `digits/kd.yaml`, or a bare `kd`, which
    means the digits one (the family that runs offline on any machine)."""
    path = Path(name)
    if path.is_file():
        return path
    if path.is_dir():
        raise ConfigError(f"{path} is a folder; give a recipe file in it (kdlab recipes lists the packaged ones)")
    key = path.as_posix().removesuffix(".yaml").removesuffix(".yml")
    recipes = packaged_recipes()
    for candidate in (key, f"digits/{key}"):
        if candidate in recipes and not path.is_absolute():
            return recipes[candidate]
    bare = [k.removeprefix("digits/") for k in recipes if k.startswith("digits/")]
    close = difflib.get_close_matches(key, bare + list(recipes), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; kdlab recipes lists the packaged ones"
    raise ConfigError(f"recipe not found: {name} (neither a file nor a packaged recipe){hint}")


def validate(raw: dict[str, Any], source: str = "recipe") -> Recipe:
    try:
        return Recipe.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"{source}: {format_validation_error(e)}") from None


def load_recipe(
    path: str | Path, overrides: list[str] = (), seed: int | None = None, data_root: str | None = None
) -> Recipe:
    """The recipe file with ``overrides`` (KEY=VALUE) applied, then ``seed`` and ``data_root`` (``data.root``, taken
    as a path as given: an override's value would be parsed as YAML), then validated."""
    raw = read_yaml(path)
    if not raw:  # nothing but blanks and comments: "student: Field required" would not say that
        raise ConfigError(f"{path}: the recipe is empty (it needs at least a student; `kdlab recipes` lists examples)")
    raw = apply_overrides(raw, list(overrides))
    if seed is not None:
        raw["seed"] = seed
    if data_root is not None:
        data = raw.get("data")
        raw["data"] = {**(data if isinstance(data, dict) else {}), "root": data_root}
    return validate(raw, source=str(path))


def dump(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
