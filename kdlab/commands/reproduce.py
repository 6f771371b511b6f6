"""`kdlab reproduce TABLE`: run a table of recipes x seeds and compare with the published numbers."""

from __future__ import annotations

from kdlab.commands import add_data_root, add_overrides, add_quiet

NAME = "reproduce"
HELP = "run a reproduction table (recipes x seeds, shared cached teachers) and compare with its published numbers"


MAX_SEEDS = 1000
MAX_JOBS = 1024


def add_arguments(p) -> None:
    p.add_argument(
        "table",
        metavar="TABLE",
        help="a table file (recipes/tables/bench240.yaml) or a packaged table by name (bench240, cpu_short)",
    )
    p.add_argument("--seeds", type=int, help="number of seeds (0..N-1); default: the table's 'seeds'")
    p.add_argument("--out", help="output folder (default: runs/reproduce/<table name>); rerun to continue")
    p.add_argument("--only", nargs="+", metavar="CELL", help="run only these cells (the report still lists every cell)")
    add_data_root(p, "data.root for every cell (default: the recipes' own, else $KDLAB_CIFAR100)")
    add_overrides(p, "override a recipe key in every cell, after the table's own overrides (repeatable)")
    p.add_argument(
        "--cache-dir",
        help="where teachers are trained and cached (default: OUT/teachers); "
        "tables sharing a teacher protocol can share one",
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        metavar="N",
        help="run independent runs in N worker processes (teachers first, each trained once; "
        "on CPU one thread each, with several GPUs one GPU each)",
    )
    add_quiet(p, "only the per-run progress lines, no per-epoch lines")


def run(args) -> int:
    from pathlib import Path

    from kdlab.errors import KdlabError
    from kdlab.tools.reproduce import find_table
    from kdlab.tools.reproduce_run import run_table

    # an upper bound too: a mistyped huge count would plan (or start) that many runs, not fail
    if args.seeds is not None and args.seeds < 1:
        raise KdlabError("--seeds must be at least 1")
    if args.seeds is not None and args.seeds > MAX_SEEDS:
        raise KdlabError(f"--seeds must be at most {MAX_SEEDS}")
    if args.jobs < 1:
        raise KdlabError("--jobs must be at least 1")
    if args.jobs > MAX_JOBS:
        raise KdlabError(f"--jobs must be at most {MAX_JOBS}")
    table = find_table(args.table)
    out = Path(args.out) if args.out else Path("runs") / "reproduce" / table.stem
    try:
        run_table(
            table,
            out,
            seeds=args.seeds,
            only=args.only,
            sets=args.overrides,
            data_root=args.data_root,
            quiet=args.quiet,
            cache_dir=args.cache_dir,
            jobs=args.jobs,
            say=lambda line: print(line, flush=True),
        )
    except KeyboardInterrupt:  # finished runs are kept; the interrupted one resumes from its last checkpoint
        import sys

        sys.stderr.write(f"kdlab: interrupted; continue with the same command (finished runs in {out} are kept)\n")
        return 130
    return 0
