"""CLI subcommands for the studies and the benchmark (analyze, reproduce, bench)."""

from __future__ import annotations

STUDY_COMMANDS: dict = {}


def add_study_commands(sub) -> None:
    """Register analyze / reproduce / bench (filled in by their modules)."""
