"""Branch alignment: how each ACB branch reads its input so it lines up with the square conv.

Pure functions of integers, tested against brute force. The principle: pad the input as the square
conv pads it, then run each branch as a conv on the rows and columns its taps read, so every branch
yields exactly the square conv's output size and alignment (no extra rows reach a branch's BN).
The conv's own zero padding is used wherever it is equivalent (the fast path).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "axis_plan",
    "branch_conv",
    "branch_plan",
    "cached_branch_plan",
    "embedded_conv",
    "input_pads",
]


def input_pads(padding: str | tuple[int, ...], d: int, dilation: tuple[int, ...]
               ) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) input padding of a d×d conv with nn.Conv2d's ``padding``.

    ``"same"`` pads the extra row/column of an even window at the bottom/right, as nn.Conv2d.
    """
    if isinstance(padding, str):
        if padding == "valid":
            return 0, 0, 0, 0
        th, tw = dilation[0] * (d - 1), dilation[1] * (d - 1)  # "same"
        return th // 2, th - th // 2, tw // 2, tw - tw // 2
    ph, pw = padding
    return ph, ph, pw, pw


def axis_plan(
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
    if a == b:  # only padding is read: no conv padding on an empty input
        return a, b, 0, lead, trail
    reach = dilation * (k - 1) + 1
    if trail <= lead and a - lead == start:
        if (length - a + 2 * lead - reach) // stride + 1 == n:
            return a, length, lead, 0, 0
        if (b - a + 2 * lead - reach) // stride + 1 == n:
            return a, b, lead, 0, 0
    sym = min(lead, trail)
    return a, b, sym, lead - sym, trail - sym


def branch_plan(
    d: int, stride: tuple[int, int], dilation: tuple[int, int], pads: tuple[int, int, int, int],
    h: int, w: int, kh: int, kw: int, row: int, col: int,
) -> tuple[int, int, int, int, int, int, int, int, int, int]:
    """Both axis plans (rows, then columns) of a (kh, kw) kernel at (row, col) on h×w."""
    top, bottom, left, right = pads
    sh, sw = stride
    dh, dw = dilation
    nh = (h + top + bottom - dh * (d - 1) - 1) // sh + 1
    nw = (w + left + right - dw * (d - 1) - 1) // sw + 1
    if nh < 1 or nw < 1:
        raise ValueError(
            "input of size " + str(h) + "x" + str(w) + " with padding " + str(pads)
            + " (top, bottom, left, right) is too small for kernel " + str(d)
            + " with dilation " + str(dilation))
    ah, bh, ph, eh0, eh1 = axis_plan(h, top, nh, sh, dh, kh, dh * row)
    aw, bw, pw, ew0, ew1 = axis_plan(w, left, nw, sw, dw, kw, dw * col)
    return ah, bh, ph, eh0, eh1, aw, bw, pw, ew0, ew1


# branch_plan remembered: plain Python costs a few µs per branch and step
cached_branch_plan = functools.lru_cache(maxsize=4096)(branch_plan)


@torch.jit.unused
def _remembered(d: int, stride: tuple[int, int], dilation: tuple[int, int],
                pads: tuple[int, int, int, int], h: int, w: int, kh: int, kw: int, row: int,
                col: int) -> tuple[int, int, int, int, int, int, int, int, int, int]:
    return cached_branch_plan(d, stride, dilation, pads, h, w, kh, kw, row, col)


def branch_conv(x: Tensor, weight: Tensor, bias: Tensor | None, row: int, col: int, d: int,
                stride: tuple[int, int], dilation: tuple[int, int], groups: int,
                pads: tuple[int, int, int, int], padding_mode: str) -> Tensor:
    """Run a (kh, kw) kernel whose taps sit at (row, col) of a d×d conv's window.

    The result has exactly the square conv's output size and alignment: the input is padded
    as the square conv pads it (any padding_mode), then cropped to the rows and columns the
    branch reads, so no extra output rows or columns reach a branch's BatchNorm.
    """
    top, bottom, left, right = pads
    if padding_mode != "zeros" and top + bottom + left + right > 0:
        x = F.pad(x, [left, right, top, bottom], mode=padding_mode)
        top, bottom, left, right = 0, 0, 0, 0
    h, w = x.shape[-2], x.shape[-1]
    if not isinstance(h, int) or not isinstance(w, int):
        # symbolic sizes (torch.export / dynamic shapes): no size-dependent plan
        return embedded_conv(x, weight, bias, row, col, d, stride, dilation, groups,
                             (top, bottom, left, right))
    kh, kw = weight.shape[-2], weight.shape[-1]
    if torch.jit.is_scripting() or torch.compiler.is_compiling():
        plan = branch_plan(d, stride, dilation, (top, bottom, left, right), h, w, kh, kw, row,
                           col)
    else:
        plan = _remembered(d, stride, dilation, (top, bottom, left, right), h, w, kh, kw, row,
                           col)
    ah, bh, ph, eh0, eh1, aw, bw, pw, ew0, ew1 = plan
    if ah != 0 or aw != 0 or bh != h or bw != w:
        x = x[..., ah:bh, aw:bw]
    if ah == bh or aw == bw:  # the branch reads only padding (tiny inputs)
        x = x.new_zeros([x.shape[0], x.shape[1], bh - ah + eh0 + eh1, bw - aw + ew0 + ew1])
    elif eh0 + eh1 + ew0 + ew1 > 0:
        x = F.pad(x, [ew0, ew1, eh0, eh1])
    return F.conv2d(x, weight, bias, stride, (ph, pw), dilation, groups)


def embedded_conv(x: Tensor, weight: Tensor, bias: Tensor | None, row: int, col: int, d: int,
                  stride: tuple[int, int], dilation: tuple[int, int], groups: int,
                  pads: tuple[int, int, int, int]) -> Tensor:
    """The branch as the square conv would run it, its kernel embedded in d×d (any size)."""
    kh, kw = weight.shape[-2], weight.shape[-1]
    if kh != d or kw != d:
        weight = F.pad(weight, [col, d - col - kw, row, d - row - kh])
    top, bottom, left, right = pads
    if top != bottom or left != right:
        x = F.pad(x, [left, right, top, bottom])
        top, left = 0, 0
    return F.conv2d(x, weight, bias, stride, (top, left), dilation, groups)
