"""The sub-batch training form of the branch-BN ACBlock: branch statistics from part of the batch.

In training mode each branch's BatchNorm normalizes with the mean and variance of its own conv
output over the batch. This form takes those statistics (and their gradient) from the first M
images only, and computes the block's output as ONE conv over the whole batch:

    kernel = Σ_b γ_b/σ_b · embed(W_b),   bias = Σ_b (β_b − γ_b μ_b/σ_b)

with μ_b, σ_b² the mean and (biased) variance of branch b's output on the M images. With M equal
to the batch this is exactly the ACB; the branch convs then run on M/B of the batch only, so a
step costs about 1 + (M/B)·(d²+2d)/d² conv-equivalents instead of (d²+2d)/d². The running
statistics are updated as BatchNorm2d updates them, from the sub-batch (unbiased variance over
its M·H·W values per channel). The batch is shuffled, so the first M images are a random sample;
under DDP each process uses its own first M images.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from .errors import InputError

__all__ = ["sub_batch_size", "sub_batch_weights"]


def sub_batch_size(sub_batch: int | float, n: int) -> int:
    """M of a batch of ``n`` images: ``sub_batch`` images (at most n), or that fraction of n
    (rounded half up, at least 1)."""
    if isinstance(sub_batch, float):
        return min(n, max(1, int(sub_batch * n + 0.5)))
    return min(n, sub_batch)


def _applies(norms: list[Any]) -> bool:
    """Every branch norm is a plain BatchNorm2d normalizing with batch statistics now (a norm in
    eval mode, a SyncBatchNorm or a frozen norm keeps its own semantics: the full branch sum)."""
    return all(type(n) is nn.BatchNorm2d and n.training and n.track_running_stats
               and n.running_mean is not None for n in norms)


def sub_batch_weights(block: Any, x: Tensor) -> tuple[Tensor, Tensor, Tensor] | None:
    """(input, kernel, bias) of the one conv computing an ACBlock's training output with branch
    statistics from the first M images, or None when the form does not apply (M covers the
    batch: the ACB itself; a norm not in training mode). Run the conv on the returned input: it
    is ``x``, split so that the gradient of both uses is summed in one pass."""
    sub = block.sub_batch
    if sub is None or x.dim() != 4:
        return None
    m = sub_batch_size(sub, x.shape[0])
    if m >= x.shape[0]:
        return None
    branches = block.branches()
    norms: list[Any] = [b.norm for b in branches]
    if not _applies(norms):
        return None
    if x.requires_grad:
        x, xs = _Split.apply(x, m)
    else:
        xs = x[:m]
    zs = [block.branch_output(xs, b.conv.weight, b.row, b.col) for b in branches]
    z = zs[0]
    count = z.shape[0] * z.shape[2] * z.shape[3]
    if count < 2:
        raise InputError(f"sub_batch statistics need more than 1 value per channel, got {m} "
                         f"image(s) of {z.shape[2]}x{z.shape[3]} outputs", params=("sub_batch",))
    stats_dtype = torch.promote_types(z.dtype, torch.float32)
    mean, var = _Moments.apply(stats_dtype, *zs)
    _update_running(norms, mean.detach(), var.detach() * (count / (count - 1)))
    gamma, beta = _affine(norms, stats_dtype)
    eps = norms[0].eps
    if any(n.eps != eps for n in norms):
        eps_t = torch.tensor([[n.eps] for n in norms], dtype=stats_dtype, device=var.device)
        inv_std = torch.rsqrt(var + eps_t)
    else:
        inv_std = torch.rsqrt(var + eps)
    scale = inv_std if gamma is None else gamma * inv_std
    shift = -mean * scale if beta is None else torch.addcmul(beta, mean, scale, value=-1)
    weight = branches[0].conv.weight
    kernel = block.merge([b.conv.weight for b in branches], list(scale.to(weight.dtype).unbind(0)))
    return x, kernel, shift.sum(0).to(weight.dtype)


class _Split(torch.autograd.Function):
    """(x, x[:m]) whose backward adds the head's gradient into the whole's in one pass."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, m: int) -> tuple[Tensor, Tensor]:
        return x.view_as(x), x[:m]

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor, grad_head: Tensor) -> tuple[Tensor, None]:
        out = grad.clone(memory_format=torch.preserve_format)
        out[: grad_head.shape[0]] += grad_head
        return out, None


class _Moments(torch.autograd.Function):
    """Per-channel mean and biased variance of each of several (N, C, H, W) tensors, stacked as
    (tensors, C), with their gradient: two fast reductions and one fused backward pass per
    tensor, where ``torch.var_mean`` over (0, 2, 3) is several times slower on CPU."""

    @staticmethod
    def forward(ctx: Any, dtype: torch.dtype, *zs: Tensor) -> tuple[Tensor, Tensor]:
        means, variances, centred = [], [], []
        for z in zs:
            z = z.to(dtype)
            mean = z.mean((0, 2, 3))
            zc = z - mean.view(1, -1, 1, 1)
            means.append(mean)
            variances.append((zc * zc).mean((0, 2, 3)))
            centred.append(zc)
        ctx.save_for_backward(*centred)
        ctx.in_dtypes = [z.dtype for z in zs]
        return torch.stack(means), torch.stack(variances)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_mean: Tensor, grad_var: Tensor) -> tuple[Tensor | None, ...]:
        n = ctx.saved_tensors[0].numel() // ctx.saved_tensors[0].shape[1]  # same for all
        grad_mean, grad_var = grad_mean / n, grad_var * (2 / n)  # every branch in one op each
        grads: list[Tensor | None] = [None]
        for b, (zc, dtype) in enumerate(zip(ctx.saved_tensors, ctx.in_dtypes, strict=True)):
            grads.append(torch.addcmul(grad_mean[b].view(1, -1, 1, 1), zc,
                                       grad_var[b].view(1, -1, 1, 1)).to(dtype))
        return tuple(grads)


def _affine(norms: list[Any], dtype: torch.dtype) -> tuple[Tensor | None, Tensor | None]:
    """Stacked (γ, β), each (branches, C), from one ``stack``, or None for norms without affine
    parameters (a norm without them among norms with them counts as γ 1, β 0)."""
    if all(n.weight is None for n in norms):
        return None, None
    ref = norms[0].running_var
    values = [torch.ones_like(ref) if n.weight is None else n.weight for n in norms]
    values += [torch.zeros_like(ref) if n.bias is None else n.bias for n in norms]
    gamma, beta = torch.stack(values).to(dtype).view(2, len(norms), -1).unbind(0)
    return gamma, beta


@torch.no_grad()
def _update_running(norms: list[Any], mean: Tensor, var: Tensor) -> None:
    """Each norm's running statistics, as BatchNorm2d updates them in training mode."""
    torch._foreach_add_([n.num_batches_tracked for n in norms], 1)
    momenta = [n.momentum for n in norms]
    ref = norms[0].running_mean
    means = list(mean.to(ref.dtype).unbind(0))
    variances = list(var.to(ref.dtype).unbind(0))
    if momenta[0] is not None and len(set(momenta)) == 1:
        torch._foreach_lerp_([n.running_mean for n in norms], means, float(momenta[0]))
        torch._foreach_lerp_([n.running_var for n in norms], variances, float(momenta[0]))
        return
    for n, mu, v in zip(norms, means, variances, strict=True):
        f = 1.0 / float(n.num_batches_tracked) if n.momentum is None else float(n.momentum)
        n.running_mean.lerp_(mu, f)
        n.running_var.lerp_(v, f)
