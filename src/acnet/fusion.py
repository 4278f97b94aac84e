"""Pure tensor maths of ACNet fusion: fold a BatchNorm into a kernel, embed a kernel into d×d.

Everything here is a function of tensors only (no modules), so it can be tested alone against
brute force and reused by the block, the converter and the analysis code.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .errors import InputError

__all__ = [
    "bn_identity_params",
    "bn_scale_shift",
    "branch_offsets",
    "embed_kernel",
    "fold_bn",
    "merge_kernels",
    "tap_indices",
]


def fold_bn(
    kernel: Tensor,
    bias: Tensor | None,
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
    weight: Tensor | None = None,
    bn_bias: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Fold an eval-mode BatchNorm into the conv before it: returns (kernel', bias').

    ``bn(conv(x, kernel) + bias) == conv(x, kernel') + bias'`` with the BN's running statistics.
    ``weight``/``bn_bias`` of None mean a BN with ``affine=False`` (scale 1, shift 0); a ``bias``
    of None means a conv without bias. Computed in the dtype of ``kernel``.
    """
    dtype = kernel.dtype
    scale, shift = bn_scale_shift(running_mean.to(dtype), running_var.to(dtype), eps,
                                  None if weight is None else weight.to(dtype),
                                  None if bn_bias is None else bn_bias.to(dtype))
    new_kernel = kernel * scale.reshape(-1, *([1] * (kernel.dim() - 1)))
    new_bias = shift if bias is None else torch.addcmul(shift, bias.to(dtype), scale)
    return new_kernel, new_bias


def embed_kernel(kernel: Tensor, size: int, row: int, col: int) -> Tensor:
    """Place a (O, I, kh, kw) kernel into a zero (O, I, size, size) kernel at (row, col).

    A 1×d kernel at (r0, 0) becomes row r0 of a d×d kernel; a d×1 kernel at (0, c0) column c0.
    """
    kh, kw = kernel.shape[-2:]
    if row < 0 or col < 0 or row + kh > size or col + kw > size:
        raise InputError(
            f"a {kh}x{kw} kernel at ({row}, {col}) does not fit in a {size}x{size} kernel"
        )
    out = kernel.new_zeros(*kernel.shape[:-2], size, size)
    out[..., row : row + kh, col : col + kw] = kernel
    return out


def tap_indices(size: int, placements: list[tuple[int, int, int, int]]) -> Tensor:
    """Where each branch's taps land in a flattened size×size kernel, for ``merge_kernels``.

    ``placements`` holds (kh, kw, row, col) of each branch to add onto a full size×size
    kernel; all must have the same number of taps (1×d and d×1 both have d). Returns a
    (branches, taps) long tensor: row b lists the flat window positions of branch b's taps.
    """
    out = []
    for kh, kw, row, col in placements:
        if row < 0 or col < 0 or row + kh > size or col + kw > size:
            raise InputError(
                f"a {kh}x{kw} kernel at ({row}, {col}) does not fit in a {size}x{size} kernel"
            )
        out.append([(row + i) * size + col + j for i in range(kh) for j in range(kw)])
    if len({len(taps) for taps in out}) > 1:
        raise InputError(f"branches must have the same number of taps, got {placements}")
    if not out:
        return torch.zeros(0, 0, dtype=torch.long)
    return torch.tensor(out, dtype=torch.long)


def _flat_taps(kernel: Tensor, nhwc: bool) -> Tensor:
    """(O, taps, I) of a channels_last kernel (a view), else (O, I, taps)."""
    return kernel.permute(0, 2, 3, 1).flatten(1, 2) if nhwc else kernel.flatten(2)


def merge_kernels(
    kernels: list[Tensor], taps: Tensor, scales: list[Tensor] | None = None
) -> Tensor:
    """Σ_b scales[b] ⊙ embed(kernels[b]) as one (O, I, d, d) kernel, in a handful of ops.

    ``kernels[0]`` is the full d×d kernel, ``kernels[b]`` (b ≥ 1) lands on the flat window
    positions ``taps[b - 1]`` (from ``tap_indices``); ``scales`` holds one (O,) factor per
    branch (None: all 1). One ``index_add`` per extra branch (each position once: exact and
    deterministic), so the graph stays small forward and backward. The result has the strides
    of ``kernels[0]``: a channels_last model gets a channels_last kernel, even with one input
    channel, where the layout cannot be told from the shape and a conv would fall back to NCHW;
    a channels_last kernel is merged in that layout (taps as dim 1), so no copy is made.
    """
    first = kernels[0]
    o, i, h, w = first.shape
    stride = first.stride()
    # a channels_last kernel (whose layout is not also the contiguous one) merges in its layout
    nhwc = (stride[0] == h * w * i and stride[1] == 1 and stride[2] == w * i and stride[3] == i
            and not (h * w == 1 and i == 1))
    dim = 1 if nhwc else 2
    out = _flat_taps(first, nhwc)
    if scales is not None:
        out = out * scales[0].view(-1, 1, 1)
    for b in range(1, len(kernels)):
        k = _flat_taps(kernels[b], nhwc)
        if scales is not None:
            k = k * scales[b].view(-1, 1, 1)
        out = out.index_add(dim, taps[b - 1], k)
    # back to (O, I, d, d) with the strides of kernels[0]: no copy in either layout
    out = out.view(o, h, w, i).permute(0, 3, 1, 2) if nhwc else out.reshape(first.shape)
    if out.stride() != first.stride():  # any other layout: copied into it
        out = torch.empty_like(first, dtype=out.dtype).copy_(out)
    return out


def bn_scale_shift(
    running_mean: Tensor,
    running_var: Tensor,
    eps: float | Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(scale, shift) of eval-mode BatchNorms: ``bn(y) == y * scale + shift`` per channel.

    Works on stacked statistics too: every argument may carry leading branch dimensions
    (``eps`` then a float or a tensor broadcasting against them).
    """
    scale = torch.rsqrt(running_var + eps)
    if weight is not None:
        scale = scale * weight
    shift = -running_mean * scale if bias is None else torch.addcmul(bias, running_mean, scale,
                                                                     value=-1)
    return scale, shift


def branch_offsets(kernel_size: int, position: str) -> tuple[int, int]:
    """Row of the 1×d kernel and column of the d×1 kernel inside the d×d window.

    ``"center"``: the centre row/column (d//2, which for even d is the lower/right of the two
    middle lines); ``"corner"``: the last row/column (paper Fig. 6c).
    """
    if position == "center":
        return kernel_size // 2, kernel_size // 2
    if position == "corner":
        return kernel_size - 1, kernel_size - 1
    raise InputError(f"position must be 'center' or 'corner', got {position!r}")


def bn_identity_params(
    bias: Tensor, eps: float, affine: bool
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None, Tensor]:
    """BN parameters that make an eval-mode BatchNorm compute ``x * s + bias`` with s = 1.

    Returns (running_mean, running_var, weight, bn_bias, kernel_scale): with ``affine`` the BN
    carries the bias; without, the shift goes into the running mean, and the conv kernel before
    the BN must be multiplied by ``kernel_scale`` (= sqrt(1 + eps)) to undo the BN's 1/sqrt(1+eps).
    """
    one = torch.ones_like(bias)
    root = torch.sqrt(one + eps)
    if affine:
        return torch.zeros_like(bias), one, root, bias.clone(), torch.ones_like(bias)
    return -bias * root, one, None, None, root
