"""ACBlock: a square conv-BN strengthened by 1×d and d×1 branches, fusable into one conv."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .fusion import branch_offsets, embed_kernel, fold_bn

__all__ = ["ACBlock", "PADDING_MODES"]

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def _int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _pair(name: str, value: Any, minimum: int) -> tuple[int, int]:
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{name} must be an int or a pair, got {value!r}")
        return _int(name, value[0], minimum), _int(name, value[1], minimum)
    v = _int(name, value, minimum)
    return v, v


def _square_kernel(value: Any) -> int:
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"kernel_size must be an int or a pair, got {value!r}")
        h, w = _int("kernel_size", value[0], 1), _int("kernel_size", value[1], 1)
        if h != w:
            raise ValueError(f"ACBlock needs a square kernel, got kernel_size={tuple(value)}")
        value = h
    d = _int("kernel_size", value, 1)
    if d < 2:
        raise ValueError(
            f"kernel_size must be >= 2 (a 1x1 kernel has no asymmetric part), got {d}"
        )
    return d


def _axis_plan(
    length: int, pad_before: int, n: int, stride: int, dilation: int, k: int, offset: int
) -> tuple[int, int, int, int, int]:
    """How to feed one axis of a branch so it yields exactly ``n`` outputs aligned with the square.

    The branch's first tap sits ``offset`` rows after the square window's first tap, in the
    square conv's padded coordinates. Returns (crop_start, crop_end, conv_padding, extra_before,
    extra_after): crop the input to [start, end), zero-pad it by the extras, then convolve with
    symmetric padding ``conv_padding``. The conv's own padding is used whenever it is equivalent.
    """
    span = (n - 1) * stride + dilation * (k - 1) + 1
    start = offset - pad_before
    end = start + span
    a = min(max(start, 0), length)
    b = min(max(end, 0), length)
    lead = max(0, min(end, 0) - start)  # zeros needed before the input
    trail = max(0, end - max(start, length))  # zeros needed after it

    def count(stop: int, pad: int) -> int:
        return (stop - a + 2 * pad - dilation * (k - 1) - 1) // stride + 1

    if a == b:  # only padding is read: no conv padding on an empty input
        return a, b, 0, lead, trail
    if trail <= lead and a - lead == start:
        if count(length, lead) == n:
            return a, length, lead, 0, 0
        if count(b, lead) == n:
            return a, b, lead, 0, 0
    sym = min(lead, trail)
    return a, b, sym, lead - sym, trail - sym


class ACBlock(nn.Module):
    """Asymmetric Convolution Block (Ding et al., ICCV 2019).

    A drop-in for ``nn.Sequential(nn.Conv2d(..., bias=False), nn.BatchNorm2d(out_channels))``
    with a square d×d kernel: during training it adds a 1×d and a d×1 branch, each with its own
    BatchNorm, summed with the square branch. ``fuse()`` returns one ``nn.Conv2d`` computing the
    same eval-mode function; ``reparameterize()`` switches the block to it in place.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        padding_mode: str = "zeros",
        *,
        horizontal: bool = True,
        vertical: bool = True,
        branch_bn: bool = True,
        affine: bool = True,
        position: str = "center",
        gamma_init: float | None = None,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        in_channels = _int("in_channels", in_channels, 1)
        out_channels = _int("out_channels", out_channels, 1)
        d = _square_kernel(kernel_size)
        stride = _pair("stride", stride, 1)
        dilation = _pair("dilation", dilation, 1)
        groups = _int("groups", groups, 1)
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"groups={groups} must divide in_channels={in_channels} and "
                f"out_channels={out_channels}"
            )
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
        r0, c0 = branch_offsets(d, position)
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise ValueError(f"padding string must be 'same' or 'valid', got {padding!r}")
            if padding == "same" and stride != (1, 1):
                raise ValueError(f"padding='same' needs stride 1, got stride={stride}")
            if padding == "valid":
                pads = (0, 0, 0, 0)
            else:
                th, tw = dilation[0] * (d - 1), dilation[1] * (d - 1)
                pads = (th // 2, th - th // 2, tw // 2, tw - tw // 2)
        else:
            ph, pw = _pair("padding", padding, 0)
            padding = (ph, pw)
            pads = (ph, ph, pw, pw)
        for name, flag in (("horizontal", horizontal), ("vertical", vertical),
                           ("branch_bn", branch_bn), ("affine", affine)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {flag!r}")
        if gamma_init is not None:
            if isinstance(gamma_init, bool) or not isinstance(gamma_init, (int, float)):
                raise TypeError(f"gamma_init must be a float or None, got {gamma_init!r}")
            if not math.isfinite(gamma_init):
                raise ValueError(f"gamma_init must be finite, got {gamma_init}")
            if not affine:
                raise ValueError("gamma_init needs affine=True (a BN without affine has no scale)")
        if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps > 0:
            raise ValueError(f"eps must be a positive float, got {eps!r}")
        if momentum is not None and not (isinstance(momentum, (int, float)) and 0 <= momentum <= 1):
            raise ValueError(f"momentum must be None or in [0, 1], got {momentum!r}")

        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = (d, d)
        self.stride = stride
        self.padding = padding
        self.dilation = dilation
        self.groups = groups
        self.padding_mode = padding_mode
        self.horizontal = horizontal
        self.vertical = vertical
        self.branch_bn = branch_bn
        self.position = position
        self.offsets = (r0, c0)
        self._pads = pads  # top, bottom, left, right
        # eval mode runs one conv with the fused kernel (same function, ~1/3 of the work);
        # False runs the three branches, e.g. to check the fusion against them
        self.fast_eval = True

        fk = {"device": device, "dtype": dtype}
        bn_kw = {"eps": float(eps), "momentum": momentum, "affine": affine, **fk}
        conv_kw = {"stride": stride, "dilation": dilation, "groups": groups, "bias": False, **fk}
        self.square_conv = nn.Conv2d(in_channels, out_channels, d, padding=padding,
                                     padding_mode=padding_mode, **conv_kw)
        if branch_bn:
            self.square_bn = nn.BatchNorm2d(out_channels, **bn_kw)
        if horizontal:
            self.hor_conv = nn.Conv2d(in_channels, out_channels, (1, d), **conv_kw)
            if branch_bn:
                self.hor_bn = nn.BatchNorm2d(out_channels, **bn_kw)
        if vertical:
            self.ver_conv = nn.Conv2d(in_channels, out_channels, (d, 1), **conv_kw)
            if branch_bn:
                self.ver_bn = nn.BatchNorm2d(out_channels, **bn_kw)
        if not branch_bn:
            self.bn = nn.BatchNorm2d(out_channels, **bn_kw)
        if gamma_init is not None:
            for bn in self.batch_norms():
                nn.init.constant_(bn.weight, float(gamma_init))

    # ------------------------------------------------------------------ structure
    @property
    def is_fused(self) -> bool:
        """True after ``reparameterize()``: the block then holds only ``fused_conv``."""
        return "fused_conv" in self._modules

    def batch_norms(self) -> list[nn.BatchNorm2d]:
        """The block's BatchNorm layers (none once fused)."""
        names = ("square_bn", "hor_bn", "ver_bn", "bn")
        return [self._modules[n] for n in names if n in self._modules]

    def _branches(self) -> list[tuple[nn.Conv2d, int, int]]:
        """(conv, row, col) of each present branch: where its kernel sits in the d×d window."""
        r0, c0 = self.offsets
        out = [(self.square_conv, 0, 0)]
        if self.horizontal:
            out.append((self.hor_conv, r0, 0))
        if self.vertical:
            out.append((self.ver_conv, 0, c0))
        return out

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
             f"stride={self.stride}, padding={self.padding}")
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode!r}"
        if not self.is_fused:
            s += (f", horizontal={self.horizontal}, vertical={self.vertical}, "
                  f"branch_bn={self.branch_bn}, position={self.position!r}")
        return s

    # ------------------------------------------------------------------ forward
    def _conv(self, x: Tensor, weight: Tensor, row: int, col: int) -> Tensor:
        """Run a (kh, kw) kernel whose taps sit at (row, col) of the d×d window.

        The result has exactly the square conv's output size and alignment: the input is padded
        as the square conv pads it (any padding_mode), then cropped to the rows and columns
        this branch reads, so no extra output rows or columns reach the branch's BatchNorm.
        """
        d = self.kernel_size[0]
        kh, kw = weight.shape[-2:]
        top, bottom, left, right = self._pads
        if self.padding_mode != "zeros" and any(self._pads):
            x = F.pad(x, (left, right, top, bottom), mode=self.padding_mode)
            top = bottom = left = right = 0
        h, w = x.shape[-2:]
        sh, sw = self.stride
        dh, dw = self.dilation
        nh = (h + top + bottom - dh * (d - 1) - 1) // sh + 1
        nw = (w + left + right - dw * (d - 1) - 1) // sw + 1
        if nh < 1 or nw < 1:
            raise ValueError(
                f"input of size {h}x{w} is too small for kernel {d} with dilation "
                f"{self.dilation} and padding {self.padding}"
            )
        ah, bh, ph, eh0, eh1 = _axis_plan(h, top, nh, sh, dh, kh, dh * row)
        aw, bw, pw, ew0, ew1 = _axis_plan(w, left, nw, sw, dw, kw, dw * col)
        if ah or aw or bh != h or bw != w:
            x = x[..., ah:bh, aw:bw]
        if ah == bh or aw == bw:  # the branch reads only padding (tiny inputs)
            x = x.new_zeros(*x.shape[:-2], bh - ah + eh0 + eh1, bw - aw + ew0 + ew1)
        elif eh0 or eh1 or ew0 or ew1:
            x = F.pad(x, (ew0, ew1, eh0, eh1))
        return F.conv2d(x, weight, None, self.stride, (ph, pw), self.dilation, self.groups)

    def merged_kernel(self) -> Tensor:
        """The sum of the branch kernels in d×d form (differentiable); used when branch_bn=False."""
        d = self.kernel_size[0]
        kernel = self.square_conv.weight
        for conv, row, col in self._branches()[1:]:
            kh, kw = conv.weight.shape[-2:]
            kernel = kernel + F.pad(conv.weight, (col, d - col - kw, row, d - row - kh))
        return kernel

    def forward(self, x: Tensor) -> Tensor:
        if self.is_fused:
            return self.fused_conv(x)
        if not self.branch_bn:
            return self.bn(self._conv(x, self.merged_kernel(), 0, 0))
        if (not self.training and self.fast_eval
                and all(bn.track_running_stats for bn in self.batch_norms())):
            # eval mode: the BNs are affine maps, so the block is one conv (differentiable)
            kernel, bias = self._eval_kernel()
            return self._conv(x, kernel, 0, 0) + bias.view(1, -1, 1, 1)
        out = self.square_bn(self._conv(x, self.square_conv.weight, 0, 0))
        r0, c0 = self.offsets
        # in-place sums: a BN's output is not saved for its backward, so this is autograd-safe
        if self.horizontal:
            out = out.add_(self.hor_bn(self._conv(x, self.hor_conv.weight, r0, 0)))
        if self.vertical:
            out = out.add_(self.ver_bn(self._conv(x, self.ver_conv.weight, 0, c0)))
        return out

    def _eval_kernel(self) -> tuple[Tensor, Tensor]:
        """Fused (kernel, bias) in the parameters' dtype, differentiable (eval-mode forward)."""
        d = self.kernel_size[0]
        bns = [self.square_bn] + ([self.hor_bn] if self.horizontal else []) + (
            [self.ver_bn] if self.vertical else [])
        kernel = bias = None
        for (conv, row, col), bn in zip(self._branches(), bns):
            k, b = fold_bn(conv.weight, None, bn.running_mean, bn.running_var, bn.eps,
                           bn.weight, bn.bias)
            kh, kw = k.shape[-2:]
            k = F.pad(k, (col, d - col - kw, row, d - row - kh))
            kernel = k if kernel is None else kernel + k
            bias = b if bias is None else bias + b
        return kernel, bias

    # ------------------------------------------------------------------ fusion
    def fused_weights(self) -> tuple[Tensor, Tensor]:
        """(kernel, bias) of the equivalent conv, in float64, from the BN running statistics."""
        if self.is_fused:
            conv = self.fused_conv
            return conv.weight.detach().double(), conv.bias.detach().double()
        d = self.kernel_size[0]
        with torch.no_grad():
            if not self.branch_bn:
                kernel = self.merged_kernel().double()
                return _fold_module(kernel, self.bn)
            kernel = bias = None
            bns = [self.square_bn]
            if self.horizontal:
                bns.append(self.hor_bn)
            if self.vertical:
                bns.append(self.ver_bn)
            for (conv, row, col), bn in zip(self._branches(), bns):
                k, b = _fold_module(conv.weight.double(), bn)
                k = embed_kernel(k, d, row, col)
                kernel = k if kernel is None else kernel + k
                bias = b if bias is None else bias + b
        return kernel, bias

    def fuse(self) -> nn.Conv2d:
        """A new ``nn.Conv2d`` (with bias) computing this block's eval-mode function."""
        ref = self.fused_conv.weight if self.is_fused else self.square_conv.weight
        kernel, bias = self.fused_weights()
        conv = nn.Conv2d(
            self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
            self.dilation, self.groups, bias=True, padding_mode=self.padding_mode,
            device=ref.device, dtype=ref.dtype,
        )
        with torch.no_grad():
            conv.weight.copy_(kernel)
            conv.bias.copy_(bias)
        return conv

    def reparameterize(self) -> None:
        """Switch to the fused conv in place; safe to call more than once."""
        if self.is_fused:
            return
        fused = self.fuse()
        fused.train(self.training)
        for name in ("square_conv", "square_bn", "hor_conv", "hor_bn", "ver_conv", "ver_bn", "bn"):
            self._modules.pop(name, None)
        self.fused_conv = fused


def _fold_module(kernel: Tensor, bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """Fold an ``nn.BatchNorm2d``'s running statistics into ``kernel`` (float64)."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("cannot fuse a BatchNorm2d with track_running_stats=False")
    return fold_bn(kernel, None, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)
