"""Comparing two variants over seeds, and writing markdown tables: shared by every study."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .._text import markdown_table

__all__ = ["Comparison", "compare", "markdown_table", "mean_std", "pm", "signed"]


def mean_std(xs: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value, NaN for none)."""
    if not xs:
        return float("nan"), float("nan")
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


@dataclass(frozen=True)
class Comparison:
    """A variant against a reference over seeds: the gain of the means, the per-seed paired
    differences, and whether the gain beats seed noise (|gain| > 2 standard errors of the
    difference of the two means)."""

    reference: dict[int, float]
    variant: dict[int, float]

    @property
    def gain(self) -> float:
        return mean_std(list(self.variant.values()))[0] - mean_std(
            list(self.reference.values()))[0]

    @property
    def se(self) -> float:
        a, b = list(self.variant.values()), list(self.reference.values())
        if not a or not b:
            return math.nan
        return math.sqrt(mean_std(a)[1] ** 2 / len(a) + mean_std(b)[1] ** 2 / len(b))

    @property
    def paired(self) -> dict[int, float]:
        """variant − reference for each seed that has both."""
        return {s: self.variant[s] - self.reference[s] for s in sorted(self.variant)
                if s in self.reference}

    @property
    def verdict(self) -> str:
        """'yes, better', 'yes, worse', 'no', or 'n/a' (fewer than 2 seeds on a side)."""
        if len(self.variant) < 2 or len(self.reference) < 2:
            return "n/a"
        if abs(self.gain) > 2 * self.se:
            return "yes, better" if self.gain > 0 else "yes, worse"
        return "no"

    @property
    def ahead(self) -> int:
        """Seeds on which the variant is ahead."""
        return sum(d > 0 for d in self.paired.values())


def compare(reference: Mapping[int, float], variant: Mapping[int, float]) -> Comparison:
    """A ``Comparison`` of two {seed: value} maps."""
    return Comparison(dict(reference), dict(variant))


def pm(xs: Sequence[float], scale: float = 100.0, digits: int = 2) -> str:
    """'mean ± std' of ``xs`` times ``scale`` ('—' for none)."""
    if not xs:
        return "—"
    m, s = mean_std(list(xs))
    return f"{m * scale:.{digits}f} ± {s * scale:.{digits}f}"


def signed(x: float, scale: float = 100.0, digits: int = 2) -> str:
    """``x`` times ``scale`` with its sign (a typographic minus)."""
    if math.isnan(x):
        return "—"
    return f"{x * scale:+.{digits}f}".replace("-", "−")
