"""`kdlab methods`: the registered methods, one line each."""

from __future__ import annotations

NAME = "methods"
HELP = "list the registered methods"
ORDER = 4


def add_arguments(p) -> None:
    pass


def run(_args) -> int:
    from kdlab.methods import METHODS

    width = max(map(len, METHODS))
    for m in METHODS.values():
        print(f"{m.name:<{width}}  {m.summary}")
    return 0
