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
