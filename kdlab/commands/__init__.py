"""Every subcommand, one module each, found by `kdlab.cli` at start-up.

A module here defines `NAME` (the subcommand), `HELP` (one line), `add_arguments(parser)` and
`run(args) -> int`, and optionally `ORDER` (its place in `kdlab --help`; default: after the core
commands); it imports its heavy dependencies inside `run`, so `kdlab --help` stays fast.
"""

import argparse
import math

# a count past int32 is a typo, and handing one to torch ends in an overflow traceback, not a message
INT_MAX = 2**31 - 1


def int_range(lo: int, hi: int = INT_MAX):
    """An argparse `type`: an integer in lo..hi, else argparse's one-line error (exit code 2)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"{value} is outside {lo}..{hi}")
        return value

    parse.__name__ = "int"  # argparse names the type in some messages
    return parse


def positive_float(text: str) -> float:
    """An argparse `type`: a finite number above 0 (float() also takes 'nan' and 'inf')."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number above 0")
    return value


# The options several commands take, declared once so that their spelling, metavar and meaning agree.
DATA_ROOT = "--data-root"


def add_data_root(p: argparse.ArgumentParser, help: str) -> None:
    """``--data-root PATH``: where the data set lives, overriding a recipe's ``data.root``."""
    p.add_argument(DATA_ROOT, dest="data_root", metavar="PATH", help=help)


def add_overrides(p: argparse.ArgumentParser, help: str) -> None:
    """``--set KEY=VALUE`` (repeatable): a recipe key overridden, collected in ``args.overrides``."""
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help)


def add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="(default: %(default)s)")


def add_quiet(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--quiet", action="store_true", help=help)
