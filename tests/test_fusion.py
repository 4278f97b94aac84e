"""The fusion maths alone, against brute force."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from acnet.fusion import (
    bn_identity_params,
    bn_scale_shift,
    branch_offsets,
    embed_kernel,
    fold_bn,
    merge_kernels,
    tap_indices,
)


def _random_bn(affine: bool) -> nn.BatchNorm2d:
    """An eval-mode float64 BatchNorm2d(5, eps=1e-3) with random statistics (and affine)."""
    bn = nn.BatchNorm2d(5, affine=affine, eps=1e-3).double().eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.1, 3)
        if affine:
            bn.weight.uniform_(-2, 2)
            bn.bias.uniform_(-1, 1)
    return bn


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("conv_bias", [True, False])
def test_fold_bn_matches_conv_then_bn(affine, conv_bias):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, padding=1, bias=conv_bias).double()
    bn = _random_bn(affine)
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64)
    k, b = fold_bn(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps,
                   bn.weight, bn.bias)
    torch.testing.assert_close(F.conv2d(x, k, b, padding=1), bn(conv(x)), rtol=0, atol=1e-12)


def test_fold_bn_keeps_dtype():
    k = torch.randn(4, 2, 3, 3, dtype=torch.float32)
    out_k, out_b = fold_bn(k, None, torch.zeros(4), torch.ones(4), 1e-5)
    assert out_k.dtype == torch.float32 and out_b.dtype == torch.float32


@pytest.mark.parametrize("d", [2, 3, 4, 5])
def test_embed_matches_offset_conv(d):
    """A 1×d kernel on row r of a d×d window == the embedded d×d kernel (brute force)."""
    torch.manual_seed(d)
    x = torch.randn(1, 2, 9, 10, dtype=torch.float64)
    for r in range(d):
        hor = torch.randn(3, 2, 1, d, dtype=torch.float64)
        full = embed_kernel(hor, d, r, 0)
        rest = torch.ones(d, d, dtype=torch.bool)
        rest[r] = False
        assert full[:, :, r].equal(hor[:, :, 0]) and not full[:, :, rest].any()
        out_h = x.shape[2] - d + 1
        ref = F.conv2d(x[:, :, r : r + out_h], hor)
        torch.testing.assert_close(F.conv2d(x, full), ref, rtol=0, atol=1e-12)
        ver = torch.randn(3, 2, d, 1, dtype=torch.float64)
        full = embed_kernel(ver, d, 0, r)
        out_w = x.shape[3] - d + 1
        ref = F.conv2d(x[:, :, :, r : r + out_w], ver)
        torch.testing.assert_close(F.conv2d(x, full), ref, rtol=0, atol=1e-12)


def test_embed_rejects_out_of_range():
    with pytest.raises(ValueError, match="does not fit"):
        embed_kernel(torch.zeros(1, 1, 1, 3), 3, 3, 0)


def test_branch_offsets():
    assert branch_offsets(3, "center") == (1, 1)
    assert branch_offsets(5, "corner") == (4, 4)
    assert branch_offsets(4, "center") == (2, 2)
    with pytest.raises(ValueError, match="'middle'"):
        branch_offsets(3, "middle")


@pytest.mark.parametrize("affine", [True, False])
def test_bn_identity_params_adds_bias(affine):
    bias = torch.randn(6, dtype=torch.float64)
    eps = 1e-3
    mean, var, w, b, scale = bn_identity_params(bias, eps, affine)
    bn = nn.BatchNorm2d(6, eps=eps, affine=affine).double().eval()
    with torch.no_grad():
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(var)
        if affine:
            bn.weight.copy_(w)
            bn.bias.copy_(b)
    x = torch.randn(2, 6, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(bn(x * scale.view(1, -1, 1, 1)), x + bias.view(1, -1, 1, 1))


@pytest.mark.parametrize("d", [2, 3, 5])
@pytest.mark.parametrize("scaled", [False, True])
def test_merge_kernels_matches_embedded_sum(d, scaled):
    """One fold: Σ scale_b · embed(W_b) through index_add equals the brute-force sum."""
    torch.manual_seed(d)
    r0, c0 = branch_offsets(d, "center")
    kernels = [torch.randn(4, 3, d, d, dtype=torch.float64),
               torch.randn(4, 3, 1, d, dtype=torch.float64),
               torch.randn(4, 3, d, 1, dtype=torch.float64)]
    places = [(0, 0), (r0, 0), (0, c0)]
    scales = [torch.randn(4, dtype=torch.float64) for _ in kernels] if scaled else None
    taps = tap_indices(d, [(*k.shape[-2:], r, c)
                           for k, (r, c) in zip(kernels[1:], places[1:], strict=True)])
    got = merge_kernels(kernels, taps, scales)
    ref = sum(embed_kernel(k * (1 if scales is None else s.view(-1, 1, 1, 1)), d, r, c)
              for k, s, (r, c) in zip(kernels, scales or [None] * 3, places, strict=True))
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)


def test_tap_indices_rejects_out_of_range():
    with pytest.raises(ValueError, match="does not fit"):
        tap_indices(3, [(1, 3, 3, 0)])


@pytest.mark.parametrize("affine", [True, False])
def test_bn_scale_shift_matches_eval_bn(affine):
    torch.manual_seed(0)
    bns = [_random_bn(affine) for _ in range(2)]
    stack = lambda name: torch.stack([getattr(bn, name) for bn in bns])  # noqa: E731
    scale, shift = bn_scale_shift(stack("running_mean"), stack("running_var"), 1e-3,
                                  stack("weight") if affine else None,
                                  stack("bias") if affine else None)
    y = torch.randn(2, 5, 3, 3, dtype=torch.float64)
    for i, bn in enumerate(bns):
        torch.testing.assert_close(y * scale[i].view(1, -1, 1, 1) + shift[i].view(1, -1, 1, 1),
                                   bn(y), rtol=0, atol=1e-12)
