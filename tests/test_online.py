"""Online ACB (branch_bn=False, branch_scale=True): scales, one conv, exact fusion."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import randomize_bn, rel_err, sgd_steps, warm_bn
from torch import nn

from acnet import ACBlock
from acnet.fusion import embed_kernel

FP32_TOL = 1e-5


def _online(**kw) -> ACBlock:
    return ACBlock(4, 6, 3, padding=1, branch_bn=False, branch_scale=True, **kw)


def test_scales_are_parameters_of_present_branches():
    block = _online()
    assert [n for n, _ in block.named_parameters() if "scale" in n] == [
        "square_scale", "hor_scale", "ver_scale"]
    for name in ("square_scale", "hor_scale", "ver_scale"):
        assert getattr(block, name).shape == (6,)
        assert torch.equal(getattr(block, name), torch.ones(6))
    assert [n for n, _ in block.named_children()] == ["square_conv", "hor_conv", "ver_conv", "bn"]
    only_hor = ACBlock(4, 6, 3, branch_bn=False, branch_scale=True, vertical=False)
    assert hasattr(only_hor, "hor_scale") and not hasattr(only_hor, "ver_scale")
    assert "branch_scale=True" in repr(block)


def test_gamma_init_goes_to_the_scales_and_bn_keeps_weight_one():
    block = _online(gamma_init=1 / 3)
    for name in ("square_scale", "hor_scale", "ver_scale"):
        torch.testing.assert_close(getattr(block, name), torch.full((6,), 1 / 3))
    assert torch.equal(block.bn.weight, torch.ones(6))
    # the scales carry gamma_init, so a BN without affine parameters is fine
    assert _online(gamma_init=0.5, affine=False).bn.weight is None


def test_branch_scale_with_branch_bn_is_an_error():
    with pytest.raises(ValueError, match="branch_scale=True needs branch_bn=False"):
        ACBlock(4, 6, 3, branch_scale=True)
    with pytest.raises(TypeError, match="branch_scale"):
        ACBlock(4, 6, 3, branch_bn=False, branch_scale=1)


def test_forward_is_one_conv_with_the_scaled_merged_kernel(monkeypatch):
    torch.manual_seed(0)
    block = _online()
    with torch.no_grad():
        for name in ("square_scale", "hor_scale", "ver_scale"):
            getattr(block, name).uniform_(-2, 2)
    x = torch.randn(2, 4, 8, 8)
    k = (block.square_conv.weight * block.square_scale.view(-1, 1, 1, 1)
         + embed_kernel(block.hor_conv.weight * block.hor_scale.view(-1, 1, 1, 1), 3, 1, 0)
         + embed_kernel(block.ver_conv.weight * block.ver_scale.view(-1, 1, 1, 1), 3, 0, 1))
    ref = copy.deepcopy(block.bn)(F.conv2d(x, k, padding=1))
    calls = []
    real = F.conv2d
    monkeypatch.setattr(F, "conv2d", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    out = block(x)
    assert len(calls) == 1
    assert rel_err(out, ref) <= FP32_TOL
    out.square().mean().backward()
    names = ("square_conv.weight", "hor_conv.weight", "ver_conv.weight", "square_scale",
             "hor_scale", "ver_scale")
    grads = {n: block.get_parameter(n).grad.clone() for n in names}
    block.zero_grad()
    k = (block.square_conv.weight * block.square_scale.view(-1, 1, 1, 1)
         + embed_kernel(block.hor_conv.weight * block.hor_scale.view(-1, 1, 1, 1), 3, 1, 0)
         + embed_kernel(block.ver_conv.weight * block.ver_scale.view(-1, 1, 1, 1), 3, 0, 1))
    copy.deepcopy(block.bn)(F.conv2d(x, k, padding=1)).square().mean().backward()
    for n in names:
        want = block.get_parameter(n).grad
        assert want.abs().sum() > 0
        torch.testing.assert_close(grads[n], want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("in_channels", [1, 4])
def test_channels_last_block_stays_channels_last(in_channels):
    """A channels_last model's merged kernel is channels_last: with one input channel the layout
    cannot be read from the shape, and an NCHW kernel sent the whole network back to NCHW."""
    torch.manual_seed(0)
    block = ACBlock(in_channels, 6, 3, padding=1, branch_bn=False, branch_scale=True)
    plain = copy.deepcopy(block)
    block = block.to(memory_format=torch.channels_last)
    assert block.merged_kernel().stride() == block.square_conv.weight.stride()
    x = torch.randn(2, in_channels, 8, 8)
    out = block(x.contiguous(memory_format=torch.channels_last))
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    assert rel_err(out, plain(x)) <= FP32_TOL
    assert plain.merged_kernel().is_contiguous()


@pytest.mark.parametrize("d,position", [(3, "center"), (4, "corner"), (5, "center")])
def test_fusion_exact_in_float64(d, position):
    torch.manual_seed(d)
    block = ACBlock(3, 4, d, padding=d // 2, position=position, branch_bn=False,
                    branch_scale=True, gamma_init=0.7).double()
    make = lambda: torch.randn(4, 3, 11, 11, dtype=torch.float64)  # noqa: E731
    sgd_steps(block, make)
    warm_bn(randomize_bn(block), make)
    block.eval().fast_eval = False
    x = make()
    assert rel_err(block.fuse()(x), block(x)) <= 1e-12
    again = copy.deepcopy(block)
    again.reparameterize()
    again.reparameterize()
    assert [n for n, _ in again.named_parameters()] == ["fused_conv.weight", "fused_conv.bias"]
    assert rel_err(again(x), block(x)) <= 1e-12


def test_state_dict_round_trip():
    torch.manual_seed(0)
    block = sgd_steps(_online(), lambda: torch.randn(4, 4, 10, 10)).eval()
    other = _online().eval()
    other.load_state_dict(block.state_dict())
    x = torch.randn(2, 4, 9, 9)
    torch.testing.assert_close(other(x), block(x))


def test_preserve_style_start_computes_the_original_conv_bn():
    """What convert(preserve=True) does: square = the conv, hor/ver kernels 0, scales 1."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1, bias=False)
    bn = randomize_bn(nn.BatchNorm2d(6))
    block = _online()
    with torch.no_grad():
        block.square_conv.weight.copy_(conv.weight)
        block.hor_conv.weight.zero_()
        block.ver_conv.weight.zero_()
    block.bn = copy.deepcopy(bn)
    x = torch.randn(2, 4, 9, 9)
    torch.testing.assert_close(block.eval()(x), bn.eval()(conv(x)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(block.train()(x), bn.train()(conv(x)), rtol=1e-5, atol=1e-5)
