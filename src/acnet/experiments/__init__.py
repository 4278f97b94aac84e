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
from .reproduce import OTHER_STUDIES, PRESET_NAMES, analyze_runs, reproduce, summary

__all__ = ["ABLATION", "ACNET", "BASE", "LONG", "MAIN", "ONLINE", "OTHER_STUDIES", "PRESET_NAMES",
           "SHORT", "STUDY_PRESETS", "StudyPreset", "analyze_runs", "reproduce", "runs_of",
           "summary", "write_report"]
