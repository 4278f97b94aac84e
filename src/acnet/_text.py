"""Short, one-line renderings of exceptions for error messages and reports."""

from __future__ import annotations

__all__ = ["first_line"]


def first_line(exc: BaseException, limit: int = 160) -> str:
    """``Type: first line of the message`` (``Type`` alone for an empty one), cut to ``limit``."""
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return text[:limit]
