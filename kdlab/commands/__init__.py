"""Subcommands beyond the core ones, one module each, found by `kdlab.cli` at start-up.

A module here defines `NAME` (the subcommand), `HELP` (one line), `add_arguments(parser)` and
`run(args) -> int`; it imports its heavy dependencies inside `run`, so `kdlab --help` stays fast.
"""
