"""Short, one-line renderings of exceptions for error messages and reports."""

from __future__ import annotations

import re
from collections.abc import Sequence

__all__ = ["first_line", "markdown_table"]


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def first_line(exc: BaseException, limit: int = 160) -> str:
    """``Type: first line of the message`` (``Type`` alone for an empty one), terminal colour
    codes removed, cut at a word before ``limit`` characters."""
    lines = _ANSI.sub("", str(exc)).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0].strip()}" if lines else type(exc).__name__
    if len(text) <= limit:
        return text
    cut = text[:limit - 1]
    return (cut.rsplit(" ", 1)[0] if " " in cut else cut) + "…"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    """A GitHub markdown table as lines (``|`` in cells escaped)."""
    def cell(v: object) -> str:
        return str(v).replace("|", "\\|")

    out = ["| " + " | ".join(cell(h) for h in headers) + " |",
           "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return out
