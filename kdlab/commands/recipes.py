"""`kdlab recipes`: the recipes shipped with kdlab, by the name `kdlab train NAME` takes."""

from __future__ import annotations

NAME = "recipes"
HELP = "list the packaged recipes (kdlab train NAME --out DIR runs one from any folder)"


def add_arguments(p) -> None:
    p.add_argument("family", nargs="?", metavar="FAMILY", help="only this family, e.g. digits or cifar100/fast")
    p.add_argument("--paths", action="store_true", help="also print each recipe's file")


def run(args) -> int:
    import yaml

    from kdlab.errors import KdlabError
    from kdlab.recipe_files import packaged_recipes

    recipes = packaged_recipes()
    if args.family:
        prefix = args.family.strip("/") + "/"
        recipes = {k: v for k, v in recipes.items() if k.startswith(prefix)}
        if not recipes:
            families = sorted(
                {
                    "/".join(k.split("/")[:2]) if k.startswith("cifar100/") else k.split("/")[0]
                    for k in packaged_recipes()
                }
            )
            raise KdlabError(f"no packaged recipes under {args.family!r}; families: {', '.join(families)}")
    width = max(map(len, recipes))
    for name, path in recipes.items():
        try:  # read, not validated: a listing must not fail on one file
            raw = yaml.safe_load(path.read_text())
        except (ValueError, yaml.YAMLError):
            raw = None
        raw = raw if isinstance(raw, dict) else {}
        student = (raw.get("student") or {}).get("name", "?")
        teachers = [t.get("name", "?") for t in raw.get("teachers") or [] if isinstance(t, dict)]
        who = student + (f" <- {', '.join(teachers)}" if teachers else "")
        line = f"{name:<{width}}  {raw.get('method', 'vanilla'):<12} {who}"
        print(line + (f"  {path}" if args.paths else ""))
    if not args.family:
        print("\nbare names are the digits ones: 'kdlab train kd --out runs/kd' trains digits/kd")
    return 0
