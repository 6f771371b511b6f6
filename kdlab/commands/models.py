"""`kdlab models`: the registered model names."""

from __future__ import annotations

NAME = "models"
HELP = "list the registered models"
ORDER = 3


def add_arguments(p) -> None:
    pass


def run(_args) -> int:
    from kdlab import models

    for name in models.names():
        print(name)
    return 0
