"""Shared test helpers: randomized BatchNorm statistics so fusion is tested on real numbers."""

from __future__ import annotations

import torch
from torch import nn


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm random affine parameters and non-trivial running statistics."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                if m.affine:
                    m.weight.copy_(torch.rand(n, generator=g) * 1.5 + 0.25)
                    m.bias.copy_(torch.randn(n, generator=g) * 0.5)
                if m.track_running_stats:
                    m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
                    m.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.2)
    return model


def warm_bn(model: nn.Module, make_input, steps: int = 3) -> nn.Module:
    """Train-mode passes so the running statistics come from data (and momentum is exercised)."""
    was = model.training
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            model(make_input())
    model.train(was)
    return model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max absolute difference relative to the larger output magnitude."""
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()
