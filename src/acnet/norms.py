"""The normalization layers acnet knows: which it can absorb, their eval-mode affine maps, and
the frozen norm an ACBlock uses after a frozen-BN conv.

A BatchNorm in eval mode, and a frozen BatchNorm always, is a per-channel affine map
``y * scale + shift``: that is what folds into a kernel. torchvision's ``FrozenBatchNorm2d`` and
timm's ``FrozenBatchNorm2d`` / ``FrozenBatchNormAct2d`` keep weight, bias and statistics as
buffers; they are recognized by class name so neither library is imported here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .errors import InputError
from .fusion import bn_scale_shift

__all__ = [
    "FrozenBatchNorm2d",
    "as_batchnorm2d",
    "as_frozen",
    "batch_stats_now",
    "bn_skip_reason",
    "has_act",
    "is_bn_act",
    "is_frozen_norm",
    "is_norm",
    "num_features",
    "scale_shift",
    "uses_batch_stats",
]

_FROZEN = ("FrozenBatchNorm2d", "FrozenBatchNormAct2d")
# a BatchNorm2d, SyncBatchNorm, timm's BatchNormAct2d, or a frozen norm of any library: the
# functions below read their statistics by name (duck typing), so they take Any
Norm = Any
_STATS = ("weight", "bias", "running_mean", "running_var")
_STATS_AND_AFFINE = ("running_mean", "running_var", "weight", "bias")  # _stacked order


class FrozenBatchNorm2d(nn.Module):
    """A BatchNorm2d with fixed statistics and affine parameters (buffers, no batch statistics).

    The norm of an ACBlock that absorbed a frozen norm (torchvision's or timm's): it computes
    what they compute, in training mode too, so the block's new branches train with any batch.
    """

    if TYPE_CHECKING:  # buffers (class annotations would be TorchScript types)
        weight: Tensor
        bias: Tensor
        running_mean: Tensor
        running_var: Tensor

    def __init__(self, num_features: int, eps: float = 1e-5, *,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None
                 ) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        for name, fill in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0),
                           ("running_var", 1.0)):
            self.register_buffer(name, torch.full((num_features,), fill, device=device,
                                                  dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        scale, shift = bn_scale_shift(self.running_mean, self.running_var, self.eps,
                                      self.weight, self.bias)
        return x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


def is_frozen_norm(m: Norm) -> bool:
    """torchvision's or timm's frozen BatchNorm (or acnet's): fixed statistics, no batch ones."""
    return (type(m).__name__ in _FROZEN and not isinstance(m, nn.modules.batchnorm._NormBase)
            and all(isinstance(getattr(m, n, None), Tensor) for n in _STATS)
            and isinstance(getattr(m, "eps", None), (int, float)))


def num_features(norm: Norm) -> int:
    """Channels of a norm (frozen norms have no ``num_features`` attribute)."""
    return norm.running_var.numel()


def is_norm(m: nn.Module) -> bool:
    """A normalization layer: torch's, or one named like it (e.g. LayerNorm2d, GroupNormAct)."""
    if isinstance(m, nn.modules.batchnorm._NormBase):
        return True
    name = type(m).__name__
    return name.endswith(("Norm", "Norm2d", "NormAct2d", "NormAct")) and not any(
        isinstance(c, nn.Conv2d) for c in m.modules())


def is_bn_act(bn: Norm) -> bool:
    """timm's BatchNormAct2d: a BatchNorm2d followed by its own ``drop`` and ``act`` modules."""
    return (type(bn).__name__ == "BatchNormAct2d" and isinstance(bn, nn.BatchNorm2d)
            and has_act(bn))


def has_act(m: Norm) -> bool:
    """A norm+act layer (timm's BatchNormAct2d, FrozenBatchNormAct2d): ``drop`` and ``act``."""
    return isinstance(getattr(m, "act", None), nn.Module) and isinstance(
        getattr(m, "drop", None), nn.Module)


def bn_skip_reason(bn: Norm, conv: nn.Conv2d) -> str | None:
    """Why ``bn`` cannot be absorbed into an ACBlock after ``conv`` (None: it can)."""
    kind = type(bn).__name__
    frozen = is_frozen_norm(bn)
    if not (type(bn) in (nn.BatchNorm2d, nn.SyncBatchNorm) or is_bn_act(bn) or frozen):
        return (f"followed by {kind}, which acnet cannot absorb (only BatchNorm2d, "
                f"SyncBatchNorm, timm's BatchNormAct2d and frozen BatchNorms fold into a kernel)")
    if frozen and type(bn).__name__ == "FrozenBatchNormAct2d" and not has_act(bn):
        return f"followed by {kind} without its act/drop modules"
    if bn._forward_hooks or bn._forward_pre_hooks:
        return f"followed by {kind} with forward hooks, which absorbing it would silently drop"
    if not frozen and (not bn.track_running_stats or bn.running_mean is None):
        return (f"followed by {kind} with track_running_stats=False: it normalizes with batch "
                f"statistics in eval mode too, so it is not a fixed affine map to fold")
    if num_features(bn) != conv.out_channels:
        return (f"followed by {kind}({num_features(bn)}) but the conv has {conv.out_channels} "
                f"output channels")
    return None


def uses_batch_stats(norm: Norm) -> bool:
    """True if ``norm`` normalizes with batch statistics even in eval mode (no running ones)."""
    return not is_frozen_norm(norm) and (not norm.track_running_stats
                                         or norm.running_var is None)


def batch_stats_now(norm: Norm) -> bool:
    """True if ``norm`` normalizes with batch statistics in its current mode (a BatchNorm in
    training mode, or one without running statistics); a frozen norm never does."""
    return not is_frozen_norm(norm) and (norm.training or uses_batch_stats(norm))


def _check_running_stats(norm: Norm) -> None:
    if uses_batch_stats(norm):
        raise InputError("cannot fold a BatchNorm2d with track_running_stats=False: it has no "
                         "running statistics")


def scale_shift(norms: list[Norm], dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Stacked (scale, shift), each (len(norms), C), of eval-mode norms (y·scale_b + shift_b).

    Differentiable in the affine parameters; a norm without them counts as weight 1, bias 0.
    """
    for n in norms:
        _check_running_stats(n)
    first = norms[0]
    eps: float | Tensor = first.eps
    if len({n.eps for n in norms}) > 1:
        eps = torch.tensor([[n.eps] for n in norms], dtype=dtype,
                           device=first.running_var.device)
    mean, var, weight, bias = _stacked(norms, dtype)
    return bn_scale_shift(mean, var, eps, weight, bias)


def _stacked(norms: list[Norm], dtype: torch.dtype
             ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """Running mean and variance, weight and bias of several norms, each (B, C) in ``dtype``
    (None: no norm has that parameter), from one ``stack``: one kernel for all of them."""
    names = [n for n in _STATS_AND_AFFINE if any(getattr(m, n, None) is not None for m in norms)]
    if len(norms) == 1:  # views, no kernel, unless the dtype changes
        parts = [getattr(norms[0], n).to(dtype).unsqueeze(0) for n in names]
    else:
        ref = norms[0].running_var
        values = [v if (v := getattr(m, n, None)) is not None
                  else torch.full_like(ref, 1.0 if n == "weight" else 0.0)
                  for n in names for m in norms]
        parts = list(torch.stack(values).to(dtype).view(len(names), len(norms), -1).unbind(0))
    got = dict(zip(names, parts, strict=True))
    if "running_mean" not in got or "running_var" not in got:  # refused before: never here
        raise InputError("cannot fold norms without running statistics")
    return got["running_mean"], got["running_var"], got.get("weight"), got.get("bias")


def as_batchnorm2d(bn: Norm) -> nn.BatchNorm2d:
    """A plain BatchNorm2d with the statistics, affine parameters and mode of any BN subclass."""
    out = nn.BatchNorm2d(bn.num_features, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                         device=bn.running_mean.device, dtype=bn.running_mean.dtype)
    with torch.no_grad():
        for name in (*_STATS, "num_batches_tracked"):
            src = getattr(bn, name, None)
            if src is not None and getattr(out, name, None) is not None:
                getattr(out, name).copy_(src)
    out.train(bn.training)
    if bn.affine:
        out.weight.requires_grad_(bn.weight.requires_grad)
        out.bias.requires_grad_(bn.bias.requires_grad)
    return out


def as_frozen(norm: Norm) -> FrozenBatchNorm2d:
    """acnet's FrozenBatchNorm2d computing the norm part of a frozen norm (any library's)."""
    ref = norm.running_var
    out = FrozenBatchNorm2d(ref.numel(), float(norm.eps), device=ref.device, dtype=ref.dtype)
    with torch.no_grad():
        for name in _STATS:
            getattr(out, name).copy_(getattr(norm, name))
    out.train(norm.training)
    return out
