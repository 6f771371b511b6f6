"""`kdlab demo`: every method on the embedded digits data, one table (kdlab.tools.demo)."""

from __future__ import annotations

from kdlab.commands import add_quiet

NAME = "demo"
HELP = "train every method on the embedded digits data and print a table"
ORDER = 2


def add_arguments(p) -> None:
    p.add_argument(
        "--out", default="runs/demo", help="output folder; rerun the same command to continue an interrupted demo"
    )
    p.add_argument("--only", nargs="*", help="only these methods")
    add_quiet(p, "no per-epoch lines")


def run(args) -> int:
    import shlex
    from pathlib import Path

    from kdlab.tools.demo import run_demo

    again = (
        ["kdlab", "demo", "--out", args.out]
        + (["--only", *args.only] if args.only else [])
        + (["--quiet"] if args.quiet else [])
    )
    args.resume_hint = lambda: (
        f"rerun '{shlex.join(again)}' to continue (finished recipes are kept, the interrupted "
        "one resumes from its last finished epoch)"
    )
    run_demo(Path(args.out), only=args.only, quiet=args.quiet)
    return 0
