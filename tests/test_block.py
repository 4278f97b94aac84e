"""ACBlock: geometry, train-mode definition, exact fusion, options, errors."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import randomize_bn, rel_err, sgd_steps, warm_bn
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

from acnet import ACBlock
from acnet.fusion import embed_kernel

FP32_TOL = 1e-5


def reference(block: ACBlock, x: torch.Tensor) -> torch.Tensor:
    """The block's definition: each branch is the square conv (same nn.Conv2d geometry) with its
    kernel embedded at its offset, followed by its own BN (copies, in the block's mode)."""
    d = block.kernel_size[0]
    conv = nn.Conv2d(block.in_channels, block.out_channels, d, block.stride, block.padding,
                     block.dilation, block.groups, bias=False, padding_mode=block.padding_mode)
    conv = conv.to(x.dtype)

    def run(kernel, bn):
        with torch.no_grad():
            conv.weight.copy_(kernel)
        return bn(conv(x))

    r0, c0 = block.offsets
    if not block.branch_bn:
        one = torch.ones(block.out_channels, dtype=x.dtype)
        scale = lambda name: getattr(block, name, one).view(-1, 1, 1, 1)  # noqa: E731
        k = block.square_conv.weight * scale("square_scale")
        if block.horizontal:
            k = k + embed_kernel(block.hor_conv.weight * scale("hor_scale"), d, r0, 0)
        if block.vertical:
            k = k + embed_kernel(block.ver_conv.weight * scale("ver_scale"), d, 0, c0)
        return run(k, copy.deepcopy(block.bn))
    out = run(block.square_conv.weight, copy.deepcopy(block.square_bn))
    if block.horizontal:
        out = out + run(embed_kernel(block.hor_conv.weight, d, r0, 0), copy.deepcopy(block.hor_bn))
    if block.vertical:
        out = out + run(embed_kernel(block.ver_conv.weight, d, 0, c0), copy.deepcopy(block.ver_bn))
    return out


def randomize_scales(block: ACBlock, seed: int = 0) -> ACBlock:
    """Random branch scales of an online block (branch_scale=True), so they are tested too."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in ("square_scale", "hor_scale", "ver_scale"):
            if hasattr(block, name):
                getattr(block, name).copy_(torch.randn(block.out_channels, generator=g))
    return block


@st.composite
def geometries(draw):
    d = draw(st.integers(2, 5))
    stride = draw(st.one_of(st.integers(1, 3), st.tuples(st.integers(1, 3), st.integers(1, 3))))
    dilation = draw(st.one_of(st.integers(1, 3), st.tuples(st.integers(1, 2), st.integers(1, 3))))
    kinds = ["int", "pair", "valid"] + (["same"] if stride in (1, (1, 1)) else [])
    kind = draw(st.sampled_from(kinds))
    if kind == "int":
        padding = draw(st.integers(0, 5))
    elif kind == "pair":
        padding = draw(st.tuples(st.integers(0, 5), st.integers(0, 5)))
    else:
        padding = kind
    mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    g = draw(st.sampled_from(["1", "2", "dw"]))
    if g == "dw":
        cin = cout = groups = draw(st.integers(1, 4))
    else:
        groups = int(g)
        cin = groups * draw(st.integers(1, 3))
        cout = groups * draw(st.integers(1, 3))
    h = draw(st.integers(1, 13))
    w = draw(st.integers(1, 13))
    opts = {
        "horizontal": draw(st.booleans()),
        "vertical": draw(st.booleans()),
        "branch_bn": draw(st.booleans()),
        "affine": draw(st.booleans()),
        "position": draw(st.sampled_from(["center", "corner"])),
    }
    opts["branch_scale"] = not opts["branch_bn"] and draw(st.booleans())
    return dict(in_channels=cin, out_channels=cout, kernel_size=d, stride=stride,
                padding=padding, dilation=dilation, groups=groups, padding_mode=mode,
                **opts), (h, w)


def _conv_ok(kw, hw):
    """Whether nn.Conv2d itself accepts this geometry on this input (so the block must too)."""
    conv = nn.Conv2d(kw["in_channels"], kw["out_channels"], kw["kernel_size"], kw["stride"],
                     kw["padding"], kw["dilation"], kw["groups"], bias=False,
                     padding_mode=kw["padding_mode"])
    try:
        return conv(torch.zeros(2, kw["in_channels"], *hw)).shape
    except RuntimeError:
        return None


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(geometries(), st.integers(0, 2**16))
def test_geometry_train_definition_and_fusion(geom, seed):
    kw, hw = geom
    shape = _conv_ok(kw, hw)
    assume(shape is not None and shape[-1] * shape[-2] * 2 > 1)  # BN needs >1 value per channel
    torch.manual_seed(seed)
    block = ACBlock(**kw)
    randomize_bn(block, seed)
    randomize_scales(block, seed)
    make = lambda: torch.randn(2, kw["in_channels"], *hw) * 2 + 0.5  # noqa: E731
    x = make()

    # train mode: output equals the definition, and the running statistics move the same way
    block.train()
    ref_block = copy.deepcopy(block)
    out = block(x)
    assert out.shape == shape
    ref = reference(ref_block, x)
    assert rel_err(out, ref) <= FP32_TOL
    warm_bn(block, make, steps=2)

    # eval mode: the fused conv is the block
    block.eval()
    fused = block.fuse()
    assert isinstance(fused, nn.Conv2d) and fused.bias is not None
    y = block(x)  # eval fast path: one conv with the fused kernel
    block.fast_eval = False
    y_branches = block(x)  # the three branches and their BNs, one by one
    assert rel_err(fused(x), y_branches) <= FP32_TOL
    assert rel_err(y, y_branches) <= FP32_TOL
    assert rel_err(y_branches, reference(block, x)) <= FP32_TOL
    block.fast_eval = True
    with torch.no_grad():  # the cached fused kernel (no gradient needed)
        assert rel_err(block(x), y_branches) <= FP32_TOL


@pytest.mark.parametrize("d", [2, 3, 4, 5, 7])
@pytest.mark.parametrize("position", ["center", "corner"])
def test_fusion_exact_in_float64(d, position):
    torch.manual_seed(d)
    block = ACBlock(3, 4, d, padding=d // 2, position=position).double()
    warm_bn(randomize_bn(block), lambda: torch.randn(4, 3, 11, 11, dtype=torch.float64))
    block.eval().fast_eval = False
    x = torch.randn(2, 3, 11, 11, dtype=torch.float64)
    assert rel_err(block.fuse()(x), block(x)) <= 1e-12


def _trained_block(**kw) -> ACBlock:
    torch.manual_seed(0)
    block = sgd_steps(ACBlock(4, 6, 3, **kw), lambda: torch.randn(4, 4, 10, 10))
    return randomize_bn(block) if kw.get("affine", True) else block


# --- the official code's three failures, as named tests ---------------------------------------
def test_official_failure_dilation_is_fused_exactly():
    """The official fusion ignores dilation for the asymmetric branches' alignment."""
    block = _trained_block(padding=2, dilation=2).eval()
    x = torch.randn(2, 4, 13, 13)
    assert rel_err(block.fuse()(x), block(x)) <= FP32_TOL


def test_official_failure_affine_false_fuses():
    """The official code crashes fusing BNs without affine parameters."""
    block = _trained_block(padding=1, affine=False).eval()
    assert block.square_bn.weight is None
    x = torch.randn(2, 4, 9, 9)
    assert rel_err(block.fuse()(x), block(x)) <= FP32_TOL


def test_official_failure_reparameterize_twice():
    """The official switch-to-deploy raises when called again; ours is idempotent."""
    block = _trained_block(padding=1).eval()
    x = torch.randn(2, 4, 9, 9)
    before = block(x)
    block.reparameterize()
    names = {n for n, _ in block.named_children()}
    assert names == {"fused_conv"}
    block.reparameterize()
    assert {n for n, _ in block.named_children()} == names
    assert rel_err(block(x), before) <= FP32_TOL
    assert rel_err(block.fuse()(x), before) <= FP32_TOL


def test_official_failure_small_padding_crops_instead():
    """padding < d//2 is handled without the official code's input cropping layer."""
    block = _trained_block(padding=0).eval()
    x = torch.randn(2, 4, 9, 9)
    assert block(x).shape == (2, 6, 7, 7)
    assert rel_err(block.fuse()(x), block(x)) <= FP32_TOL


def test_child_names_follow_official_repo():
    block = ACBlock(2, 3, 3, padding=1)
    names = [n for n, _ in block.named_children()]
    assert names == ["square_conv", "square_bn", "hor_conv", "hor_bn", "ver_conv", "ver_bn"]
    assert block.hor_conv.weight.shape == (3, 2, 1, 3)
    assert block.ver_conv.weight.shape == (3, 2, 3, 1)


def test_both_branches_off_is_plain_conv_bn():
    torch.manual_seed(0)
    block = ACBlock(3, 5, 3, padding=1, horizontal=False, vertical=False)
    assert [n for n, _ in block.named_children()] == ["square_conv", "square_bn"]
    conv = nn.Conv2d(3, 5, 3, padding=1, bias=False)
    conv.weight = block.square_conv.weight
    x = torch.randn(4, 3, 8, 8)
    torch.testing.assert_close(block(x), block.square_bn(conv(x)))


def test_branch_bn_false_runs_one_conv(monkeypatch):
    block = ACBlock(3, 5, 3, padding=1, branch_bn=False)
    assert [n for n, _ in block.named_children()] == ["square_conv", "hor_conv", "ver_conv", "bn"]
    calls = []
    real = F.conv2d
    monkeypatch.setattr(F, "conv2d", lambda *a, **k: calls.append(1) or real(*a, **k))
    block(torch.randn(2, 3, 8, 8))
    assert len(calls) == 1
    # gradients of every branch kernel equal those of the definition (float64, autograd)
    block = block.double()
    ref = copy.deepcopy(block)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    block(x).square().sum().backward()
    k = (ref.square_conv.weight + embed_kernel(ref.hor_conv.weight, 3, 1, 0)
         + embed_kernel(ref.ver_conv.weight, 3, 0, 1))
    ref.bn(F.conv2d(x, k, padding=1)).square().sum().backward()
    for name in ("square_conv.weight", "hor_conv.weight", "ver_conv.weight"):
        got, want = block.get_parameter(name).grad, ref.get_parameter(name).grad
        assert want.abs().sum() > 0
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_gamma_init():
    block = ACBlock(3, 5, 3, gamma_init=1 / 3)
    for bn in block.batch_norms():
        torch.testing.assert_close(bn.weight, torch.full((5,), 1 / 3))
    assert torch.equal(ACBlock(3, 5, 3).square_bn.weight, torch.ones(5))


def test_corner_position_puts_kernels_on_last_row_and_column():
    block = _trained_block(padding=1, position="corner").eval()
    kernel, _ = block.fused_weights()
    centre_only = _trained_block(padding=1, horizontal=False, vertical=False).eval()
    assert block.offsets == (2, 2)
    x = torch.randn(2, 4, 9, 9)
    assert rel_err(block.fuse()(x), block(x)) <= FP32_TOL
    assert kernel.shape == centre_only.fused_weights()[0].shape


def test_state_dict_round_trip():
    block = _trained_block(padding=1).eval()
    other = ACBlock(4, 6, 3, padding=1).eval()
    other.load_state_dict(block.state_dict())
    x = torch.randn(2, 4, 9, 9)
    torch.testing.assert_close(other(x), block(x))
    fused = copy.deepcopy(block)
    fused.reparameterize()
    again = ACBlock(4, 6, 3, padding=1)
    again.reparameterize()
    again.load_state_dict(fused.state_dict())
    torch.testing.assert_close(again.eval()(x), fused(x))


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
def test_low_precision_fusion(dtype, tol):
    block = _trained_block(padding=1).eval()
    x = torch.randn(2, 4, 9, 9)
    ref = block.double()(x.double())
    low = block.to(dtype)
    fused = low.fuse()
    assert fused.weight.dtype == dtype
    # the fused conv in low precision is as close to the exact function as the unfused block is
    err_fused = rel_err(fused.float()(x), ref)
    assert err_fused <= tol
    assert low(x.to(dtype)).dtype == dtype


def test_fuse_keeps_device_and_dtype():
    block = ACBlock(2, 3, 3, dtype=torch.float64)
    fused = block.fuse()
    assert fused.weight.dtype == torch.float64
    assert fused.weight.device == block.square_conv.weight.device


def test_torch_compile_matches():
    block = _trained_block(padding=1).eval()
    compiled = torch.compile(block, backend="aot_eager")
    x = torch.randn(2, 4, 9, 9)
    torch.testing.assert_close(compiled(x), block(x), rtol=1e-5, atol=1e-5)
    block.train()
    torch.testing.assert_close(compiled(x), copy.deepcopy(block)(x), rtol=1e-5, atol=1e-5)


def test_timm_reparameterize_model():
    timm_utils = pytest.importorskip("timm.utils")
    torch.manual_seed(0)
    model = nn.Sequential(ACBlock(3, 8, 3, padding=1), nn.ReLU(),
                          nn.Sequential(ACBlock(8, 8, 5, padding=2, groups=8)), nn.ReLU())
    warm_bn(randomize_bn(model), lambda: torch.randn(4, 3, 10, 10))
    model.eval()
    fused = timm_utils.reparameterize_model(model)
    assert not any(isinstance(m, ACBlock) for m in fused.modules())
    assert any(isinstance(m, ACBlock) for m in model.modules())  # not inplace
    x = torch.randn(2, 3, 10, 10)
    assert rel_err(fused(x), model(x)) <= FP32_TOL


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(kernel_size=1), ValueError, "kernel_size must be >= 2"),
        (dict(kernel_size=(3, 5)), ValueError, "square kernel"),
        (dict(kernel_size=3.0), TypeError, "kernel_size must be an int"),
        (dict(kernel_size=3, position="edge"), ValueError, "'edge'"),
        (dict(kernel_size=3, padding_mode="mirror"), ValueError, "'mirror'"),
        (dict(kernel_size=3, groups=4), ValueError, "groups=4"),
        (dict(kernel_size=3, padding=-1), ValueError, "padding must be >= 0"),
        (dict(kernel_size=3, padding="full"), ValueError, "'full'"),
        (dict(kernel_size=3, padding="same", stride=2), ValueError, "stride"),
        (dict(kernel_size=3, stride=0), ValueError, "stride"),
        (dict(kernel_size=3, eps=0), ValueError, "eps"),
        (dict(kernel_size=3, gamma_init="a"), TypeError, "gamma_init"),
        (dict(kernel_size=3, gamma_init=0.5, affine=False), ValueError, "affine"),
    ],
)
def test_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        ACBlock(6, 6, **kwargs)


@pytest.mark.parametrize("cin,cout", [(0, 4), (4, 0)])
def test_zero_channels(cin, cout):
    with pytest.raises(ValueError, match="channels must be >= 1"):
        ACBlock(cin, cout, 3)


def test_input_too_small_is_a_clear_error():
    with pytest.raises(ValueError, match="too small"):
        ACBlock(1, 1, 5)(torch.randn(1, 1, 3, 3))


def test_axis_plan_exhaustive():
    """Every small 1-D geometry: the plan reads exactly the taps the padded definition reads."""
    from acnet.alignment import axis_plan as _axis_plan

    torch.manual_seed(0)
    checked = 0
    for length in range(1, 8):
        x = torch.randn(1, 1, length, dtype=torch.float64)
        for pb in range(4):
            for pa in range(4):
                xp = F.pad(x, (pb, pa))
                for s in (1, 2, 3):
                    for dil in (1, 2, 3):
                        for d in (2, 3, 4):
                            n = (length + pb + pa - dil * (d - 1) - 1) // s + 1
                            if n < 1:
                                continue
                            for k, off in [(d, 0)] + [(1, dil * r) for r in range(d)]:
                                w = torch.randn(1, 1, k, dtype=torch.float64)
                                ref = torch.stack([
                                    sum(w[0, 0, j] * xp[0, 0, off + i * s + j * dil]
                                        for j in range(k)) for i in range(n)])
                                a, b, p, e0, e1 = _axis_plan(length, pb, n, s, dil, k, off)
                                xc = x[..., a:b]
                                xc = F.pad(xc, (e0, e1)) if b > a else x.new_zeros(1, 1, e0 + e1)
                                got = F.conv1d(xc, w, None, s, p, dil)
                                torch.testing.assert_close(got[0, 0], ref, rtol=0, atol=1e-12)
                                checked += 1
    assert checked > 5000


def test_torchscript_twins_follow_the_branch_table():
    """TorchScript cannot loop over attribute names, so ``_kernels`` and ``_branch_sum`` spell
    the branches out: they must name every branch of the table, and agree with branches()."""
    import inspect

    from acnet.block import BRANCHES

    for method in (ACBlock._kernels, ACBlock._branch_sum):
        src = inspect.getsource(method)
        for kind in BRANCHES:
            assert f"{kind.name}_" in src, (method.__name__, kind.name)
    for opts in ({}, {"horizontal": False}, {"vertical": False}, {"branch_bn": False},
                 {"branch_bn": False, "branch_scale": True, "position": "corner"}):
        block = ACBlock(3, 4, 3, padding=1, **opts)
        assert [k.data_ptr() for k in block._kernels()] == [
            b.conv.weight.data_ptr() for b in block.branches()]
        assert [b.name for b in block.branches()] == [
            k.name for k in BRANCHES if k.option is None or opts.get(k.option, True)]
