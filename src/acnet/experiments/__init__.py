"""Reproducing the paper's studies: presets (run matrices), the runner and the report."""

from .presets import STUDY_PRESETS, runs_of
from .reproduce import reproduce

__all__ = ["STUDY_PRESETS", "reproduce", "runs_of"]
