"""`kdlab table RUN_DIR...`: one row per recipe, mean +- std over its seeds, as Markdown or CSV."""

from __future__ import annotations

NAME = "table"
HELP = "results table of finished runs: one row per recipe (config minus seed), mean ± std over seeds"


def add_arguments(p) -> None:
    p.add_argument(
        "runs",
        nargs="+",
        metavar="RUN_DIR",
        help="run directories, or folders searched for them (a run holds result.json)",
    )
    p.add_argument("--format", dest="fmt", choices=["md", "csv"], default="md", help="Markdown (default) or CSV")
    p.add_argument("--out", metavar="FILE", help="also write the table to FILE")
    p.add_argument(
        "--sort",
        choices=["input", "top1_last", "top1_best", "name"],
        default="input",
        help="row order (default: order of first appearance)",
    )
    p.add_argument(
        "--ignore",
        action="append",
        default=[],
        metavar="KEY",
        help="a config key that does not split recipes, besides seed, cache_dir and note "
        "(repeatable, e.g. --ignore teachers.0.weights)",
    )
    p.add_argument(
        "--all",
        dest="include_sub_runs",
        action="store_true",
        help="also take the teacher caches (teachers/) and earlier generations (generations/) found below",
    )


def run(args) -> int:
    from pathlib import Path

    from kdlab.checkpoint import atomic_write_text
    from kdlab.tools import results

    runs, unfinished = results.find_runs(args.runs, include_sub_runs=args.include_sub_runs)
    rows = results.build_rows(runs, ignore=results.IGNORED_BY_DEFAULT + tuple(args.ignore), sort=args.sort)
    if unfinished:
        results.warn(
            f"skipped {len(unfinished)} unfinished run(s) (no result.json): {', '.join(map(str, unfinished[:5]))}"
            + (" ..." if len(unfinished) > 5 else "")
        )
    for row in rows:
        dup = results.duplicate_seeds(row)
        if dup:
            results.warn(f"{row.label}: seed(s) {', '.join(map(str, dup))} appear more than once; each run counts")
    text = results.render(rows, args.fmt)
    print(text, end="")
    if args.out:
        atomic_write_text(Path(args.out), text)
        results.warn(f"wrote {args.out}")
    return 0
