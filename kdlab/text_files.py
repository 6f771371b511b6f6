"""A user's text file (a recipe, a table, a run's JSON) read as UTF-8, or one line naming the file and the
first byte that is not UTF-8: Python's own UnicodeDecodeError names neither the file nor a remedy."""

from __future__ import annotations

from pathlib import Path

from kdlab.errors import KdlabError


def decode(data: bytes, source: str | Path, error: type[KdlabError] = KdlabError) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise error(
            f"{source}: not UTF-8 text (byte 0x{data[e.start]:02x} on line {line}); save the file as UTF-8"
        ) from None


def read_text(path: str | Path, error: type[KdlabError] = KdlabError) -> str:
    """The file's text; `error` for bytes that are not UTF-8 (OSError passes through: callers name it)."""
    return decode(Path(path).read_bytes(), path, error)
