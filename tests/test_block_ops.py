"""ACBlock's cost and deployability: op counts, the eval-mode kernel cache, export, TorchScript."""

from __future__ import annotations

import collections
import copy
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import randomize_bn, rel_err, sgd_steps, warm_bn
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import acnet
from acnet import ACBlock
from acnet.alignment import embedded_conv
from test_block import _conv_ok, geometries

FP32_TOL = 1e-5
FORMS = {
    "branch_bn": {},
    "merged": {"branch_bn": False},
    "online": {"branch_bn": False, "branch_scale": True},
}


class _OpCounter(TorchDispatchMode):
    """Counts the aten ops that run (views excluded: they launch no kernel)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def count_ops(module: nn.Module, train: bool, grad: bool) -> int:
    """Ops of one forward (and backward of ``out.sum()`` when ``grad``), after one warm-up."""
    module.train(train)
    x = torch.randn(2, 4, 8, 8)
    with torch.set_grad_enabled(grad):
        module(x)
    for p in module.parameters():
        p.grad = None
    with _OpCounter() as counter, torch.set_grad_enabled(grad):
        out = module(x)
        if grad:
            out.sum().backward()
    return sum(counter.ops.values())


def _conv_bn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6))


# Counted on the code before this change (same counter): branch-BN block, train step 22 ops,
# eval forward+backward 64, eval forward without grad 33; conv-BN train step 8.
TODAY_BRANCH_BN = {(True, True): 22, (False, True): 64, (False, False): 33}


@pytest.mark.parametrize("train,grad", list(TODAY_BRANCH_BN))
def test_branch_bn_op_count_not_above_today(train, grad):
    assert count_ops(ACBlock(4, 6, 3, padding=1), train, grad) <= TODAY_BRANCH_BN[train, grad]


@pytest.mark.parametrize("form,extra", [("merged", 4), ("online", 16)])
def test_merged_and_online_training_step_near_conv_bn(form, extra):
    """One conv per step: the merged kernel costs a few small ops more than a plain conv-BN."""
    base = count_ops(_conv_bn(), True, True)
    assert count_ops(ACBlock(4, 6, 3, padding=1, **FORMS[form]), True, True) <= base + extra


# Eval forward without autograd, counted on this code: fold the norms (a few small ops on the
# kernels and statistics, nothing cached) and run ONE convolution.
EVAL_OPS = {"branch_bn": 15, "merged": 8, "online": 11}


@pytest.mark.parametrize("form", list(FORMS))
def test_eval_is_one_conv_after_a_small_fold(form):
    block = ACBlock(4, 6, 3, padding=1, **FORMS[form]).eval()
    x = torch.randn(2, 4, 8, 8)
    with _OpCounter() as counter, torch.no_grad():
        block(x)
    assert counter.ops["aten.convolution"] == 1
    assert sum(counter.ops.values()) <= EVAL_OPS[form]


def _eval_block(form: str) -> ACBlock:
    torch.manual_seed(0)
    block = ACBlock(4, 6, 3, padding=1, **FORMS[form])
    make = lambda: torch.randn(4, 4, 9, 9)  # noqa: E731
    return warm_bn(randomize_bn(sgd_steps(block, make)), make).eval()


def _branchwise(block: ACBlock, x: torch.Tensor) -> torch.Tensor:
    """The block's eval function without the fast path (its definition)."""
    ref = copy.deepcopy(block)
    ref.fast_eval = False
    with torch.no_grad():
        return ref(x)


def _step(block: ACBlock, opt: torch.optim.Optimizer, x: torch.Tensor) -> None:
    """One optimizer step on a loss of the eval-mode output (frozen-BN fine-tuning)."""
    opt.zero_grad()
    block(x).square().mean().backward()
    opt.step()


def _change(block: ACBlock, form: str, change: str, x: torch.Tensor) -> None:
    """Change the block's weights, statistics or settings the way users do."""
    params = list(block.parameters())
    with torch.no_grad():
        if change == "inplace_weight":
            block.hor_conv.weight.mul_(3)
        elif change == "bn_buffer":
            block.batch_norms()[0].running_var.mul_(4)
        elif change == "ema_data":  # mean teacher / MoCo / timm ModelEmaV2 on .data
            for p in params:
                p.data.mul_(0.5).add_(torch.randn_like(p.data), alpha=0.5)
        elif change == "foreach_data":
            torch._foreach_mul_([p.data for p in params], 0.5)
        elif change == "vector_to_parameters":  # then edit the vector the params now view
            vec = torch.nn.utils.parameters_to_vector(params)
            torch.nn.utils.vector_to_parameters(vec, params)
            block(x)  # validated once with the parameters as views of the vector
            vec.mul_(-1.5)
        elif change == "bn_eps":
            for bn in block.batch_norms():
                bn.eps = 0.5
        elif change == "new_module":
            name = "square_bn" if form == "branch_bn" else "bn"
            setattr(block, name, randomize_bn(nn.BatchNorm2d(6), seed=5).eval())
        elif change == "scale":
            block.ver_scale.fill_(-2)
    if change == "load_state_dict":
        block.load_state_dict(_eval_block(form).state_dict() | {
            "square_conv.weight": torch.randn_like(block.square_conv.weight)})
    elif change == "optimizer_in_eval":
        _step(block, torch.optim.SGD(params, lr=0.5), x)
    elif change.startswith("fused_"):  # fused optimizers bump no version counter
        kind = {"fused_sgd": torch.optim.SGD, "fused_adam": torch.optim.Adam,
                "fused_adamw": torch.optim.AdamW}[change]
        _step(block, kind(params, lr=0.5, fused=True), x)
    elif change == "foreach_adam":
        _step(block, torch.optim.Adam(params, lr=0.5, foreach=True), x)
    elif change == "train_step":
        sgd_steps(block, lambda: torch.randn(4, 4, 9, 9)).eval()


CHANGES = ["inplace_weight", "bn_buffer", "ema_data", "foreach_data", "vector_to_parameters",
           "bn_eps", "load_state_dict", "new_module", "scale", "optimizer_in_eval", "fused_sgd",
           "fused_adam", "fused_adamw", "foreach_adam", "train_step"]


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("change", CHANGES)
def test_eval_follows_every_change(form, change):
    """However weights, statistics or settings change, eval mode computes from the current ones:
    no fused kernel is kept between calls (hardening II, item 1)."""
    if change == "scale" and form != "online":
        pytest.skip("only the online block has scales")
    block = _eval_block(form)
    x = torch.randn(2, 4, 9, 9)
    with torch.no_grad():
        first = block(x)
        assert block(x).equal(first)
    _change(block, form, change, x)
    with torch.no_grad():
        after = block(x)
    assert not after.equal(first)
    assert rel_err(after, _branchwise(block, x)) <= FP32_TOL
    assert rel_err(after, block.fuse()(x)) <= FP32_TOL


def test_ema_copy_of_a_converted_model_follows_its_updates():
    """The issue's case: a torchvision model's EMA copy validated after .data updates."""
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = acnet.convert(tv.models.resnet18(num_classes=10), preserve=False)
    ema = copy.deepcopy(model).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ema(x)  # the first validation
        for p, q in zip(ema.parameters(), model.parameters(), strict=True):
            p.data.mul_(0.9).add_(q.data + torch.randn_like(q) * 0.05, alpha=0.1)
        for b, c in zip(ema.buffers(), model.buffers(), strict=True):
            if b.is_floating_point():
                b.data.mul_(0.5).add_(c.data.abs() + 0.1, alpha=0.5)
        assert rel_err(ema(x), acnet.deploy(ema)(x)) <= 1e-4


@pytest.mark.parametrize("plain", ["square_bn", "hor_bn"])
def test_mixed_affine_branch_bns_fold_exactly(plain):
    """convert(preserve=True) may put a BN without affine parameters next to affine ones."""
    block = _eval_block("branch_bn")
    setattr(block, plain, randomize_bn(nn.BatchNorm2d(6, affine=False, eps=1e-3), seed=3).eval())
    x = torch.randn(2, 4, 9, 9)
    ref = _branchwise(block, x)
    with torch.no_grad():
        assert rel_err(block(x), ref) <= FP32_TOL
        assert rel_err(block.fuse()(x), ref) <= FP32_TOL


def test_eval_follows_dtype_and_device_changes():
    block = _eval_block("branch_bn")
    x = torch.randn(2, 4, 9, 9)
    with torch.no_grad():
        block(x)
        out = block.double()(x.double())
    assert out.dtype == torch.float64
    assert rel_err(out, _branchwise(block, x.double())) <= 1e-12
    with torch.no_grad():
        out = block.to("meta")(x.double().to("meta"))
    assert out.device.type == "meta"


@pytest.mark.parametrize("form", list(FORMS))
def test_eval_with_grad_is_differentiable(form):
    block = _eval_block(form).double()
    block.zero_grad()  # sgd_steps leaves its last gradients
    ref = copy.deepcopy(block)
    ref.fast_eval = False
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64)
    with torch.no_grad():
        block(x)
    block(x).square().sum().backward()
    ref(x).square().sum().backward()
    for p, q in zip(block.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-10)


def test_eval_under_inference_mode_and_input_gradients():
    block = _eval_block("branch_bn").requires_grad_(False)
    x = torch.randn(2, 4, 9, 9)
    with torch.inference_mode():
        y = block(x)
    xg = x.clone().requires_grad_()
    out = block(xg)
    out.sum().backward()
    assert xg.grad is not None
    torch.testing.assert_close(out.detach(), y)
    with torch.inference_mode():  # a block made of inference tensors
        inf_block = randomize_bn(ACBlock(4, 6, 3, padding=1, **FORMS["online"])).eval()
        assert rel_err(inf_block(x), _branchwise(inf_block, x)) <= FP32_TOL


def test_state_dict_and_pickle_round_trip():
    block = _eval_block("branch_bn")
    x = torch.randn(2, 4, 9, 9)
    with torch.no_grad():
        block(x)
    assert set(block.state_dict()) == set(ACBlock(4, 6, 3, padding=1).state_dict())
    again = pickle.loads(pickle.dumps(block))
    with torch.no_grad():
        assert again(x).equal(block(x))


def test_unpickles_a_block_pickled_by_earlier_versions():
    """Earlier versions had no scales and no taps buffer, or kept a kernel cache."""
    block = _eval_block("merged")
    state = block.__getstate__()
    for name in ("branch_scale", "fused_conv"):
        state.pop(name)
    state["_buffers"] = {}
    state["_fused_cache"] = ("stale", torch.zeros(1))
    old = ACBlock.__new__(ACBlock)
    old.__setstate__(state)
    x = torch.randn(2, 4, 9, 9)
    assert "_fused_cache" not in old.__dict__
    with torch.no_grad():
        assert rel_err(old(x), block(x)) <= FP32_TOL
        assert rel_err(old.train()(x), block.train()(x)) <= FP32_TOL


# --- torch.export (dynamic H/W) and TorchScript -------------------------------------------
def _small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 4, 5, padding=2, padding_mode="reflect", bias=False), nn.BatchNorm2d(4),
    )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(geometries(), st.integers(0, 2**16))
def test_shape_generic_branch_conv_matches_the_planned_one(geom, seed):
    """The path taken for symbolic sizes (embedded d×d kernel) == the size-planned fast path."""
    kw, hw = geom
    assume(_conv_ok(kw, hw) is not None)
    torch.manual_seed(seed)
    block = ACBlock(**kw)
    x = torch.randn(2, kw["in_channels"], *hw, dtype=torch.float64)
    top, bottom, left, right = pads = block._pads
    padded = x
    if block.padding_mode != "zeros" and any(pads):
        padded, pads = F.pad(x, (left, right, top, bottom), mode=block.padding_mode), (0,) * 4
    for branch in block.branches():
        w = branch.conv.weight.double()
        planned = block.branch_output(x, w, branch.row, branch.col)
        generic = embedded_conv(padded, w, None, branch.row, branch.col, block.kernel_size[0],
                                block.stride, block.dilation, block.groups, pads)
        assert generic.shape == planned.shape
        torch.testing.assert_close(generic, planned, rtol=0, atol=1e-12)


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("stock", [True, False])
def test_torch_export_dynamic_hw(train, stock):
    torch.manual_seed(0)
    model = _small_cnn()
    if not stock:
        model = acnet.convert(model, preserve=False)
        assert any(isinstance(m, ACBlock) for m in model.modules())
    warm_bn(randomize_bn(model), lambda: torch.randn(4, 3, 16, 16))
    model.train(train)
    h = torch.export.Dim("h", min=8, max=64)
    w = torch.export.Dim("w", min=8, max=64)
    exported = torch.export.export(copy.deepcopy(model), (torch.randn(2, 3, 16, 16),),
                                   dynamic_shapes=({2: h, 3: w},))
    for size in [(13, 21), (8, 9), (32, 32)]:
        x = torch.randn(2, 3, *size)
        ref = copy.deepcopy(model)(x)
        assert rel_err(exported.module()(x), ref) <= FP32_TOL


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("geometry", [
    {"kernel_size": 3, "padding": 1},
    {"kernel_size": 4, "padding": "same", "padding_mode": "reflect", "horizontal": False},
    {"kernel_size": 3, "padding": 0, "stride": 2, "dilation": 2, "position": "corner"},
])
def test_torch_jit_script(form, geometry):
    torch.manual_seed(0)
    block = randomize_bn(ACBlock(3, 4, **geometry, **FORMS[form]))
    x = torch.randn(2, 3, 11, 11)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated
        scripted = torch.jit.script(copy.deepcopy(block))
    for train in (True, False):
        block.train(train)
        scripted.train(train)
        assert rel_err(scripted(x), block(x)) <= FP32_TOL
    block.reparameterize()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        fused = torch.jit.script(block)
    assert rel_err(fused(x), block(x)) == 0


# --- structure: branches(), constructor options, convert's attributes -----------------------
@pytest.mark.parametrize("form", list(FORMS))
def test_branches_pair_each_conv_with_its_norm(form):
    block = ACBlock(4, 6, 3, padding=1, position="corner", **FORMS[form])
    got = [(b.conv, b.norm, b.row, b.col) for b in block.branches()]
    if form == "branch_bn":
        norms = [block.square_bn, block.hor_bn, block.ver_bn]
    elif form == "online":
        norms = [block.square_scale, block.hor_scale, block.ver_scale]
    else:
        norms = [None] * 3
    assert got == [(block.square_conv, norms[0], 0, 0), (block.hor_conv, norms[1], 2, 0),
                   (block.ver_conv, norms[2], 0, 2)]
    block.reparameterize()
    assert block.branches() == []


def test_fast_eval_is_a_keyword_option_shown_in_repr():
    block = ACBlock(2, 3, 3, fast_eval=False)
    assert block.fast_eval is False and "fast_eval=False" in repr(block)
    assert "fast_eval=True" in repr(ACBlock(2, 3, 3))
    with pytest.raises(TypeError, match="fast_eval"):
        ACBlock(2, 3, 3, fast_eval="yes")


def test_convert_attributes_are_declared_with_defaults():
    block = ACBlock(2, 3, 3)
    assert block.origin() == acnet.block.Origin(conv_bias=True, slot=None)


@pytest.mark.parametrize("bias", [True, False])
def test_new_conv_has_the_block_geometry(bias):
    block = ACBlock(4, 8, 5, stride=2, padding=(1, 2), dilation=(2, 1), groups=2,
                    padding_mode="reflect", dtype=torch.float64)
    conv = block.new_conv(bias=bias)
    assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
            conv.dilation, conv.groups, conv.padding_mode) == (
        4, 8, (5, 5), (2, 2), (1, 2), (2, 1), 2, "reflect")
    assert (conv.bias is not None) == bias and conv.weight.dtype == torch.float64
