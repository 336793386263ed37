"""Files written whole: a reader (another rank, the next run, a user's tool) sees the old
content or the new, never a part. Standard library only: every layer writes through it."""

from __future__ import annotations

import os
from pathlib import Path


def write_text_atomically(path: str | Path, text: str, *, encoding: str = "utf-8",
                          suffix: str = ".partial") -> Path:
    """Write ``text`` to ``path + suffix`` and rename it over ``path``. The partial file is
    removed when the write fails (a full disk); the error is raised as it is."""
    path = Path(path)
    partial = path.with_name(path.name + suffix)
    try:
        partial.write_text(text, encoding=encoding)
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return path


def jsonl_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) of each non-blank line of a JSON-lines file's text. Lines end at
    "\\n" only (a "\\r" before it is dropped): ``str.splitlines`` also ends them at U+2028,
    U+2029, U+0085 and \\x0b, \\x0c, \\x1c-\\x1e, and JSON written with ``ensure_ascii=False``
    keeps the first three raw inside its strings."""
    lines = (line.removesuffix("\r") for line in text.split("\n"))
    return [(number, line) for number, line in enumerate(lines, start=1) if line.strip()]


def first_line(error: BaseException) -> str:
    """An exception's first line of text (its type's name where it has none): the reason a
    one-line message gives."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def joined_lines(error: BaseException) -> str:
    """An exception's lines joined into one (every hint kept; its type's name where it has no
    text): the reason a one-line message gives for a library's multi-line error."""
    return " ".join(line.strip() for line in str(error).splitlines() if line.strip()) \
        or type(error).__name__
