"""Kernel magnitude matrix (paper Fig. 6) and random sparsification of kernel positions."""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..block import ACBlock
from ..deploy import deploy
from ..errors import InputError

__all__ = [
    "PATTERNS",
    "dominant_kernel_size",
    "kernel_magnitude",
    "pattern_mask",
    "sparsify",
    "square_convs",
]

PATTERNS = ("skeleton", "corners", "global")


def _deployed(model: nn.Module, fold_bn: bool) -> nn.Module:
    if any(isinstance(m, ACBlock) for m in model.modules()) or fold_bn:
        return deploy(model, fold_bn=fold_bn)
    return copy.deepcopy(model)


def square_convs(model: nn.Module, kernel_size: int) -> list[nn.Conv2d]:
    """The model's Conv2d layers with a ``kernel_size``×``kernel_size`` kernel."""
    return [m for m in model.modules()
            if isinstance(m, nn.Conv2d) and tuple(m.kernel_size) == (kernel_size, kernel_size)]


def dominant_kernel_size(model: nn.Module) -> int:
    """The most common square kernel size (>= 2) among the model's convs and ACBlocks."""
    sizes: dict[int, int] = {}
    for m in model.modules():
        if isinstance(m, ACBlock):
            d = m.kernel_size[0]
        elif isinstance(m, nn.Conv2d) and m.kernel_size[0] == m.kernel_size[1]:
            d = m.kernel_size[0]
        else:
            continue
        if d >= 2:
            sizes[d] = sizes.get(d, 0) + 1
    if not sizes:
        raise InputError("the model has no square conv with a kernel of 2x2 or larger")
    return max(sizes, key=lambda k: (sizes[k], -k))


def kernel_magnitude(model: nn.Module, kernel_size: int = 3) -> torch.Tensor:
    """Average over d×d conv layers of Σ|w| per kernel position, normalized by the layer's max.

    The model is deployed first with BatchNorms folded into the kernels (ACBlocks fused), so
    baseline and ACNet kernels are compared in the same, inference-time form.
    """
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 2:
        raise InputError(f"kernel_size must be an int >= 2, got {kernel_size!r}")
    convs = square_convs(_deployed(model, fold_bn=True), kernel_size)
    if not convs:
        raise InputError(f"the model has no {kernel_size}x{kernel_size} conv")
    mats = []
    for conv in convs:
        mag = conv.weight.detach().double().abs().sum((0, 1))
        mats.append(mag / mag.max().clamp_min(1e-30))
    return torch.stack(mats).mean(0)


def pattern_mask(pattern: str, d: int) -> torch.Tensor:
    """Boolean (d, d) mask of a pattern's positions."""
    mask = torch.zeros(d, d, dtype=torch.bool)
    if pattern == "skeleton":
        mask[d // 2, :] = True
        mask[:, d // 2] = True
    elif pattern == "corners":
        for r in (0, d - 1):
            for c in (0, d - 1):
                mask[r, c] = True
    elif pattern == "global":
        mask[:] = True
    else:
        raise InputError(f"pattern must be one of {PATTERNS}, got {pattern!r}")
    return mask


def sparsify(model: nn.Module, pattern: str, ratio: float, seed: int = 0, *,
             kernel_size: int = 3) -> nn.Module:
    """A deployed copy of ``model`` with the fraction ``ratio`` of the weights at ``pattern``'s
    positions of every d×d kernel set to zero at random (same seed, same zeros)."""
    if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not 0 <= ratio <= 1:
        raise InputError(f"ratio must be in [0, 1], got {ratio!r}")
    mask = pattern_mask(pattern, kernel_size)
    out = _deployed(model, fold_bn=False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for conv in square_convs(out, kernel_size):
            w = conv.weight
            sel = w[:, :, mask]  # (O, I, k) copy of the pattern's weights
            n = sel.numel()
            k = round(ratio * n)
            if k == 0:
                continue
            idx = torch.randperm(n, generator=g)[:k]
            flat = sel.reshape(-1)
            flat[idx] = 0
            w[:, :, mask] = flat.view_as(sel).to(w.dtype)
    return out
