"""Inference cost: parameters, multiply-accumulates and measured latency."""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

__all__ = ["count_macs", "latency_ratio"]


def count_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one forward pass (Conv2d and Linear layers), via forward hooks."""
    total = 0

    def conv_hook(m: nn.Conv2d, inp, out):
        nonlocal total
        kh, kw = m.kernel_size
        total += out.numel() // out.shape[0] * (m.in_channels // m.groups) * kh * kw

    def linear_hook(m: nn.Linear, inp, out):
        nonlocal total
        total += out.numel() // out.shape[0] * m.in_features

    hooks = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(linear_hook))
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_shape[1:]))
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    return total


def latency_ratio(models: dict[str, nn.Module], input_shape: tuple[int, ...], repeats: int = 30,
                  warmup: int = 3) -> dict[str, float]:
    """Median eval latency (ms) per model, interleaved in one process."""
    x = torch.randn(*input_shape)
    for m in models.values():
        m.eval()
    times: dict[str, list[float]] = {k: [] for k in models}
    with torch.no_grad():
        for _ in range(warmup):
            for m in models.values():
                m(x)
        for _ in range(repeats):
            for k, m in models.items():
                t = time.perf_counter()
                m(x)
                times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}
