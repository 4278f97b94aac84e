"""Studies on trained runs: accuracy under sparsification and under flips/rotation."""

from __future__ import annotations

import statistics
from typing import Any

from torch import nn

from ..data.loader import TRANSFORMS
from ..errors import InputError
from ..evaluation import evaluate
from .kernels import PATTERNS, dominant_kernel_size, sparsify

__all__ = ["robustness", "sparsity_study"]


def sparsity_study(model: nn.Module, test_loader, ratios: list[float], draws: int = 3,
                   patterns: tuple[str, ...] = PATTERNS, seed: int = 0,
                   kernel_size: int | None = None) -> dict[str, Any]:
    """Accuracy (mean, std over ``draws`` random masks) for each pattern and ratio, zeroing
    weights of the d×d kernels (d: the model's most common square kernel size by default)."""
    if draws < 1:
        raise InputError(f"draws must be >= 1, got {draws}")
    d = kernel_size or dominant_kernel_size(model)
    out: dict[str, Any] = {}
    for pattern in patterns:
        means, stds = [], []
        for ratio in ratios:
            accs = []
            for i in range(draws if ratio > 0 else 1):
                acc, _ = evaluate(sparsify(model, pattern, ratio, seed=seed + i,
                                                kernel_size=d), test_loader)
                accs.append(acc)
            means.append(statistics.fmean(accs))
            stds.append(statistics.stdev(accs) if len(accs) > 1 else 0.0)
        out[pattern] = {"ratios": list(ratios), "mean": means, "std": stds}
    return out


def robustness(model: nn.Module, make_loader) -> dict[str, float]:
    """Accuracy on the test set as is, flipped left-right, up-down and rotated 90 degrees.

    ``make_loader(transform)`` returns a test loader applying that transform.
    """
    return {t: evaluate(model, make_loader(t))[0] for t in TRANSFORMS}
