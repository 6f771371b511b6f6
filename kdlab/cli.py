"""`kdlab ...`: the command line. User errors print one line and exit with code 2, never a traceback."""

from __future__ import annotations

import argparse
import os
import signal
import sys

from kdlab.commands import DATA_ROOT
from kdlab.errors import KdlabError, MissingDataRoot

EXIT_USAGE = 2


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, a scheduler's time limit) raised as Ctrl-C is, so that the same clean-up runs: the
    progress bar gives the terminal its cursor back, half-written files are removed, and the last epoch's
    checkpoint stays the one a resume starts from."""


def _raise_terminated(signum, frame):
    raise Terminated


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own usage errors: one line, code 2
        sys.stderr.write(f"kdlab: error: {message}\n")
        raise SystemExit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="kdlab", description="Knowledge distillation of image classifiers.")
    from kdlab import __version__

    p.add_argument("--version", action="version", version=f"kdlab {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    for module in command_modules():
        module.add_arguments(sub.add_parser(module.NAME, help=module.HELP, description=module.HELP))
    return p


def command_modules() -> list:
    import importlib
    import pkgutil

    from kdlab import commands

    found = [importlib.import_module(f"kdlab.commands.{m.name}") for m in pkgutil.iter_modules(commands.__path__)]
    return sorted(found, key=lambda m: (getattr(m, "ORDER", 100), m.NAME))  # the core commands first


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    # argparse's own exits: a usage error (2, its line already printed), --help or --version (0)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    handlers = {m.NAME: m.run for m in command_modules()}
    try:
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread: signals cannot be handled there
        previous = None
    try:
        return handlers[args.command](args)
    except MissingDataRoot as e:  # the data layer names Python's root=; here the user passes an option
        how = f"{DATA_ROOT} PATH" if hasattr(args, "data_root") else "data.root in the recipe"
        sys.stderr.write(f"kdlab: error: {e.passing(how)}\n")
        return EXIT_USAGE
    except KdlabError as e:
        sys.stderr.write(f"kdlab: error: {e}\n")
        return EXIT_USAGE
    except UnicodeDecodeError as e:  # the readers name their file; this is the net under one that does not
        sys.stderr.write(f"kdlab: error: a file is not UTF-8 text ({e.reason}, byte {e.start})\n")
        return EXIT_USAGE
    except KeyboardInterrupt as e:
        how = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted"
        hint = getattr(args, "resume_hint", None)
        after_echo = "\n" if sys.stderr.isatty() else ""  # a terminal shows ^C where the message would start
        sys.stderr.write(f"{after_echo}kdlab: {how}" + (f"; {hint()}" if hint else "") + "\n")
        return 143 if isinstance(e, Terminated) else 130
    except BrokenPipeError:
        # the reader went away (`kdlab recipes | head`): what it wanted was printed; Python would otherwise
        # report the pipe again when it flushes stdout at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    # a disk that fills up mid-run, a folder removed under it: the checkpoints keep every finished epoch
    except OSError as e:
        where = f"could not access {e.filename}: " if e.filename else ""
        sys.stderr.write(f"kdlab: error: {where}{e.strerror or e}\n")
        return EXIT_USAGE
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    raise SystemExit(main())
