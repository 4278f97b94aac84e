"""The paper's analyses: kernel magnitude matrix, skeleton sparsification, robustness."""

from .kernels import PATTERNS, kernel_magnitude, pattern_mask, sparsify
from .study import robustness, sparsity_study

__all__ = ["PATTERNS", "kernel_magnitude", "pattern_mask", "robustness", "sparsify",
           "sparsity_study"]
