"""Pure tensor maths of ACNet fusion: fold a BatchNorm into a kernel, embed a kernel into d×d.

Everything here is a function of tensors only (no modules), so it can be tested alone against
brute force and reused by the block, the converter and the analysis code.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["fold_bn", "embed_kernel", "branch_offsets", "bn_identity_params"]


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
    mean = running_mean.to(dtype)
    inv_std = torch.rsqrt(running_var.to(dtype) + eps)
    scale = inv_std if weight is None else weight.to(dtype) * inv_std
    shift = torch.zeros_like(mean) if bn_bias is None else bn_bias.to(dtype)
    conv_bias = torch.zeros_like(mean) if bias is None else bias.to(dtype)
    new_kernel = kernel * scale.reshape(-1, *([1] * (kernel.dim() - 1)))
    new_bias = (conv_bias - mean) * scale + shift
    return new_kernel, new_bias


def embed_kernel(kernel: Tensor, size: int, row: int, col: int) -> Tensor:
    """Place a (O, I, kh, kw) kernel into a zero (O, I, size, size) kernel at (row, col).

    A 1×d kernel at (r0, 0) becomes row r0 of a d×d kernel; a d×1 kernel at (0, c0) column c0.
    """
    kh, kw = kernel.shape[-2:]
    if row < 0 or col < 0 or row + kh > size or col + kw > size:
        raise ValueError(
            f"a {kh}x{kw} kernel at ({row}, {col}) does not fit in a {size}x{size} kernel"
        )
    out = kernel.new_zeros(*kernel.shape[:-2], size, size)
    out[..., row : row + kh, col : col + kw] = kernel
    return out


def branch_offsets(kernel_size: int, position: str) -> tuple[int, int]:
    """Row of the 1×d kernel and column of the d×1 kernel inside the d×d window.

    ``"center"``: the centre row/column (d//2, which for even d is the lower/right of the two
    middle lines); ``"corner"``: the last row/column (paper Fig. 6c).
    """
    if position == "center":
        return kernel_size // 2, kernel_size // 2
    if position == "corner":
        return kernel_size - 1, kernel_size - 1
    raise ValueError(f"position must be 'center' or 'corner', got {position!r}")


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
