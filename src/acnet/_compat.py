"""Workarounds for known bugs of the torch releases acnet supports, each with its evidence."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["eager_ceil_mode_avg_pools"]


def eager_ceil_mode_avg_pools(model: nn.Module) -> None:
    """Keep ``avg_pool2d`` out of compiled graphs when ``model`` has a ceil_mode AvgPool2d.

    Inductor (torch 2.14, CPU) lowers avg_pool2d's backward with ceil_mode=True wrongly (its
    forward is right): Cifar-quick's gradients came out up to ~50% off. A graph break runs
    those pools in eager mode, exactly; it is process-wide and costs only the break.
    """
    if any(isinstance(m, nn.AvgPool2d) and m.ceil_mode for m in model.modules()):
        torch._dynamo.disallow_in_graph(F.avg_pool2d)
