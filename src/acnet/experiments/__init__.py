"""Reproducing the paper's studies: presets (run matrices), the runner and the report."""

from .presets import (
    ABLATION,
    ACNET,
    BASE,
    LONG,
    MAIN,
    ONLINE,
    SHORT,
    STUDY_PRESETS,
    StudyPreset,
    runs_of,
)
from .report import write_report
from .reproduce import analyze_runs, reproduce, summary

__all__ = ["ABLATION", "ACNET", "BASE", "LONG", "MAIN", "ONLINE", "SHORT", "STUDY_PRESETS",
           "StudyPreset", "analyze_runs", "reproduce", "runs_of", "summary", "write_report"]
