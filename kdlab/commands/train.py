"""`kdlab train RECIPE --out DIR` / `kdlab train --resume DIR`: one recipe into a run directory (kdlab.pipeline)."""

from __future__ import annotations

from kdlab.commands import add_data_root, add_overrides, add_quiet

NAME = "train"
HELP = "train a recipe into a run directory, or resume one"
ORDER = 0  # the core commands first in `kdlab --help`


def add_arguments(p) -> None:
    p.add_argument(
        "recipe",
        nargs="?",
        help="recipe YAML file, or a packaged recipe by name: kd, digits/kd, imagenet/resnet34_resnet18/kd "
        "(kdlab recipes lists them)",
    )
    p.add_argument("--out", help="run directory to create")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint")
    p.add_argument("--seed", type=int, help="override the recipe's seed")
    add_data_root(p, "data.root: where the data set is (default: the recipe's own, else $KDLAB_CIFAR100 for CIFAR-100)")
    add_overrides(p, "override a recipe key, e.g. --set train.epochs=2 (repeatable)")
    add_quiet(p, "no per-epoch lines on stdout (log.txt still written)")


def run(args) -> int:
    import json
    from pathlib import Path

    from kdlab import pipeline
    from kdlab.errors import KdlabError, NonFiniteLoss
    from kdlab.recipe_files import find_recipe, load_recipe

    out = Path(args.resume or args.out or ".")
    args.resume_hint = lambda: resume_hint(out)
    try:
        if args.resume:
            if args.recipe or args.overrides or args.seed is not None or args.data_root is not None:
                raise KdlabError(
                    "--resume DIR continues a run as it was configured; drop the recipe, --set, --seed and --data-root"
                )
            result = pipeline.run(None, out, resume=True, quiet=args.quiet)
        else:
            if not args.recipe or not args.out:
                raise KdlabError("train needs RECIPE.yaml and --out DIR (or --resume DIR)")
            recipe = load_recipe(find_recipe(args.recipe), args.overrides, args.seed, args.data_root)
            result = pipeline.run(recipe, out, quiet=args.quiet)
    except NonFiniteLoss as e:  # how a remedy is applied depends on what the run left behind
        if pipeline.has_progress(out):
            how = f"--resume keeps the run's recipe, so apply it in a new run (another --out than {out})"
        else:
            how = f"nothing to resume, so rerun with --set and the same --out {out}"
        raise NonFiniteLoss(f"{e}; {how}") from None
    print(json.dumps({k: result[k] for k in ("top1_last", "top1_best", "top5_last", "epochs", "seed", "params")}))
    return 0


def resume_hint(out) -> str:
    import shlex

    if not (out / "config.yaml").exists():
        return "nothing was started yet; run the same command again"
    return (
        f"continue with 'kdlab train --resume {shlex.quote(str(out))}' (from the last finished epoch; "
        "finished teachers are kept)"
    )
