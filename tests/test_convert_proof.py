"""What counts as proof of a conv→BN pairing, aliased modules, TorchScript (hardening II, 2–5).

Every model here was converted wrongly, or crashed, before this round's changes.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import randomize_bn, rel_err, warm_bn
from torch import nn

import acnet
from acnet import AbsorbedBatchNorm, ACBlock

TOL = 1e-5


def _convert(model, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return acnet.convert(model, **kw)


def _same_in_both_modes(original: nn.Module, converted: nn.Module, x: torch.Tensor) -> None:
    """The converted model computes what the original does, in training and in eval mode."""
    for train in (True, False):
        a, b = copy.deepcopy(original).train(train), copy.deepcopy(converted).train(train)
        with torch.no_grad():
            assert rel_err(b(x), a(x)) <= TOL, f"training={train}"


# ---------------------------------------------------------------- 2: modes
class _AuxInTraining(nn.Module):
    """Deep supervision: in training mode only, a loss term reads the raw conv output."""

    def __init__(self, traceable: bool):
        super().__init__()
        self.traceable = traceable
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        if not self.traceable and x.sum() > 1e9:
            x = x * 0
        y = self.conv(x)
        out = self.head(F.relu(self.bn(y)))
        if self.training:
            out = out + y.mean(dim=1, keepdim=True)  # the auxiliary term
        return out


@pytest.mark.parametrize("traceable", [True, False])
def test_a_pair_that_holds_in_eval_mode_only_is_not_absorbed(traceable):
    torch.manual_seed(0)
    model = randomize_bn(_AuxInTraining(traceable))
    x = torch.randn(4, 3, 8, 8)
    kw = {} if traceable else {"example_inputs": x}
    out = _convert(model, **kw)
    assert isinstance(out.conv, nn.Conv2d) and isinstance(out.bn, nn.BatchNorm2d)
    assert "training mode" in out.acnet_report.skipped["conv"]
    _same_in_both_modes(model, out, x)


class _Traced(nn.Module):
    """Traceable, eval-only branch: the conv output also feeds a head in eval mode."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        z = self.bn(y)
        return z if self.training else z + y


def test_graphs_are_checked_in_every_mode():
    torch.manual_seed(0)
    model = randomize_bn(_Traced())
    out = _convert(model.train())
    assert "eval mode" in out.acnet_report.skipped["conv"]
    _same_in_both_modes(model, out, torch.randn(4, 3, 8, 8))


# ---------------------------------------------------------------- 3: no guessed inputs
class _SizeDependent(nn.Module):
    """fx cannot trace it, and it reads the raw conv output only for large inputs."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        z = self.bn(y)
        if x.shape[-1] > 100 and x.sum() != 0:
            z = z + y
        return z


def test_untraceable_pairs_are_never_proven_on_guessed_inputs():
    torch.manual_seed(0)
    model = randomize_bn(_SizeDependent()).eval()
    out = _convert(model)
    assert "example_inputs" in out.acnet_report.skipped["conv"]
    assert isinstance(out.conv, nn.Conv2d)
    note = " ".join(out.acnet_report.notes)
    assert "skipped (pass example_inputs" in note and "were proven" not in note
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert rel_err(out(x), model(x)) <= TOL
    big = torch.randn(2, 3, 128, 128)
    out = _convert(model, example_inputs=big)
    assert "elsewhere" in out.acnet_report.skipped["conv"]
    small = torch.randn(2, 3, 32, 32)
    proven = _convert(model, example_inputs=small)
    assert "proven on the given inputs" in proven.acnet_report.layers[0].detail
    _same_in_both_modes(model, proven, small)


def test_probe_in_training_mode_restores_statistics_rng_and_modes():
    model = randomize_bn(nn.Sequential(_SizeDependent(), nn.Dropout(0.5)))
    model[0].eval()
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(4, 3, 128, 128)
    rng = torch.get_rng_state()
    out = _convert(model, example_inputs=x)  # skipped (read elsewhere): no block drew weights
    assert "elsewhere" in out.acnet_report.skipped["0.conv"]
    assert torch.equal(torch.get_rng_state(), rng)
    assert model.training and not model[0].training and not model[0].bn.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_a_model_that_fails_in_one_mode_skips_with_the_reason():
    class NeedsTargetsInTraining(_SizeDependent):
        def forward(self, x):
            if self.training:
                raise ValueError("targets should be passed in training mode")
            return super().forward(x)

    out = _convert(randomize_bn(NeedsTargetsInTraining()), example_inputs=torch.randn(2, 3, 8, 8))
    assert "failed on example_inputs in training mode" in out.acnet_report.skipped["conv"]


class _Stash(nn.Module):
    """Stores the raw conv output as an attribute that the parent reads: it escapes the graph."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        self.raw = y
        return self.bn(y)


class _ReadsStash(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = _Stash()

    def forward(self, x):
        if x.sum() > 1e9:
            x = -x
        z = self.body(x)
        return z + self.body.raw


def test_a_traced_value_stored_on_a_module_is_not_trusted():
    torch.manual_seed(0)
    model = randomize_bn(_ReadsStash()).eval()
    out = _convert(model)
    assert isinstance(out.body.conv, nn.Conv2d)
    assert not any(isinstance(v, torch.fx.Proxy) for m in model.modules()
                   for v in vars(m).values())
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert rel_err(out(x), model(x)) <= TOL


# ---------------------------------------------------------------- 4: aliased BatchNorm
class _AliasedBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.post = self.bn  # registered under two names
        self.head = nn.Conv2d(4, 2, 3, padding=1)

    def forward(self, x):
        return self.head(F.relu(self.bn(self.conv(x))))


def test_a_batchnorm_registered_under_two_names_stays_one_module():
    torch.manual_seed(0)
    model = warm_bn(randomize_bn(_AliasedBN()), lambda: torch.randn(4, 3, 8, 8)).eval()
    out = _convert(model)
    assert isinstance(out.bn, AbsorbedBatchNorm) and out.post is out.bn
    with torch.no_grad():
        out.conv.hor_bn.weight.fill_(0.3)  # make the deployed BN differ from the original
    dep = acnet.deploy(out.eval())
    assert dep.post is dep.bn and isinstance(dep.bn, nn.BatchNorm2d)
    stock = _AliasedBN()
    stock.load_state_dict(dep.state_dict())
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert rel_err(stock.eval()(x), out(x)) <= TOL
        assert rel_err(dep(x), out(x)) <= TOL
    folded = acnet.deploy(out, fold_bn=True)
    assert isinstance(folded.bn, nn.Identity) and folded.post is folded.bn


def test_an_aliased_block_is_deployed_in_every_slot():
    model = _convert(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()))
    model.alias = model[0]
    dep = acnet.deploy(model)
    assert isinstance(dep[0], nn.Conv2d) and dep.alias is dep[0]


# ---------------------------------------------------------------- 5: TorchScript
def _script(model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated
        return torch.jit.script(model)


@pytest.mark.parametrize("options", [{}, {"branch_bn": False, "branch_scale": True}])
def test_converted_models_script(options):
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)),
              tv.models.resnet18(num_classes=10)]
    x = torch.randn(2, 3, 32, 32)
    for model in models:
        converted = _convert(randomize_bn(model), preserve=False, **options)
        scripted = _script(copy.deepcopy(converted))
        for train in (True, False):
            converted.train(train)
            scripted.train(train)
            with torch.no_grad():
                assert rel_err(scripted(x), converted(x)) <= TOL


def test_untraceable_code_with_given_inputs_still_converts_everything_provable():
    class Gate(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4))
            self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            x = self.a(x)
            if x.mean() > 1e9:
                x = x * 0
            return self.bn(self.conv(x))

    torch.manual_seed(0)
    model = randomize_bn(Gate())
    x = torch.randn(4, 3, 8, 8)
    out = _convert(model, example_inputs=x)
    assert isinstance(out.a[0], ACBlock) and isinstance(out.conv, ACBlock)
    report = {r.name: r.detail for r in out.acnet_report.layers}
    assert "graph of a" in report["a.0"] and "given inputs" in report["conv"]
    _same_in_both_modes(model, out, x)


# ---------------------------------------------------------------- found by trying it as a user
def test_each_norm_follows_its_own_mode_not_the_blocks():
    """A conv in eval mode before a BN in training mode (and the AdaBN habit: model.eval(),
    then every BN .train()): the block must normalize with batch statistics."""
    torch.manual_seed(0)
    m = randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8))).train()
    m[0].eval()
    c = _convert(m)
    x = torch.randn(4, 3, 8, 8)
    a, b = copy.deepcopy(m), copy.deepcopy(c)
    assert rel_err(b(x), a(x)) <= TOL
    moved = b[0].square_bn.running_mean + m[0].bias.detach()  # convert folds the conv bias in
    assert torch.allclose(moved, a[1].running_mean, atol=1e-6)
    orig = randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)))
    ada = _convert(orig)
    for model in (orig, ada):  # test-time adaptation: eval mode, BatchNorms on batch statistics
        model.eval()
        for mod in model.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.train()
    with torch.no_grad():
        assert rel_err(ada(x), orig(x)) <= TOL


def test_frozen_norms_in_a_training_model_take_the_one_conv_path():
    torch.manual_seed(0)
    block = randomize_bn(ACBlock(3, 4, 3, padding=1)).train()
    for bn in block.batch_norms():
        bn.eval()
    x = torch.randn(2, 3, 8, 8)
    ref = copy.deepcopy(block)
    ref.fast_eval = False
    assert rel_err(block(x), ref(x)) <= TOL
    block(x).sum().backward()
    ref(x).sum().backward()
    for p, q in zip(block.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5)


class _TiedBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.b2.weight, self.b2.bias = self.b1.weight, self.b1.bias  # shared affine parameters

    def forward(self, x):
        return self.b2(self.c2(torch.relu(self.b1(self.c1(x)))))


def test_batchnorm_parameters_shared_between_layers_are_not_split():
    torch.manual_seed(0)
    model = randomize_bn(_TiedBN())
    c = _convert(model)
    assert "shares a tensor with" in c.acnet_report.skipped["c1"]
    x = torch.randn(4, 3, 8, 8)
    for m in (model, c):
        torch.manual_seed(0)
        opt = torch.optim.SGD(m.parameters(), lr=0.5)
        for _ in range(3):
            opt.zero_grad()
            m(x).pow(2).mean().backward()
            opt.step()
    with torch.no_grad():
        assert rel_err(c.eval()(x), model.eval()(x)) <= 1e-4
        stock = _TiedBN()
        stock.load_state_dict(acnet.deploy(c).state_dict())
        assert rel_err(stock.eval()(x), c(x)) <= 1e-4


def test_bare_conv_and_bare_block_convert_and_deploy():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    block = _convert(conv)
    assert isinstance(block, ACBlock) and block.acnet_report.converted == ["(root)"]
    with torch.no_grad():
        block.hor_bn.weight.fill_(0.5)
    back = acnet.deploy(block.eval())
    assert type(back) is nn.Conv2d and back.acnet_report.names("fused") == ["(root)"]
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert rel_err(back(x), block(x)) <= TOL


class _KeepsRaw(nn.Module):
    """Keeps the raw conv output in a list, a dict, or through a hooked wrapper."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.wrap = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False))
        self.bn = nn.BatchNorm2d(4)
        self.feats: list = []
        self.cache: dict = {}
        self.seen: list = []
        if how == "hook":
            self.wrap.register_forward_hook(lambda _m, _a, o: self.seen.append(o))

    def forward(self, x):
        y = self.wrap(x)
        if self.how == "list":
            self.feats.append(y)
        elif self.how == "dict":
            self.cache["pre_bn"] = y
        return self.bn(y)


@pytest.mark.parametrize("how", ["list", "dict", "hook"])
def test_raw_conv_outputs_kept_by_user_code_are_never_changed(how):
    torch.manual_seed(0)
    model = randomize_bn(_KeepsRaw(how)).eval()
    out = _convert(model)
    assert isinstance(out.bn, nn.BatchNorm2d), str(out.acnet_report)
    assert model.feats == [] and model.cache == {}  # tracing left nothing behind


class _ReadsWeights(nn.Module):
    def __init__(self, what: str):
        super().__init__()
        self.what = what
        self.c, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)

    def forward(self, x):
        y = self.b(self.c(x))
        if self.what == "bn":
            return y * self.b.weight.abs().mean()
        return y + F.conv2d(x, self.c.weight, padding=1)


@pytest.mark.parametrize("what", ["bn", "conv"])
def test_forward_reading_weights_directly_is_skipped(what):
    torch.manual_seed(0)
    model = randomize_bn(_ReadsWeights(what)).eval()
    out = _convert(model)
    assert "directly" in out.acnet_report.skipped["c"]
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert rel_err(out(x), model(x)) <= TOL


def test_global_forward_hooks_block_every_pairing():
    handle = nn.modules.module.register_module_forward_hook(lambda _m, _a, o: None)
    try:
        out = _convert(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)))
    finally:
        handle.remove()
    assert "global module forward hooks" in out.acnet_report.skipped["0"]


@pytest.mark.parametrize("call,match", [
    (lambda m: acnet.convert(m, inplace="False"), "inplace must be a bool"),
    (lambda m: acnet.deploy(m, fold_bn="no"), "fold_bn must be a bool"),
    (lambda m: acnet.deploy(m, inplace=1), "inplace must be a bool"),
    (lambda m: ACBlock(3, 4, 3, padding=(1, 1, 1)), "pair of ints"),
    (lambda m: ACBlock(3, 4, (3, 3, 3)), "pair of ints"),
    (lambda m: ACBlock(3, 4, 3, dtype=torch.long), "floating-point"),
    (lambda m: acnet.convert(m, preserve=False, eps=float("inf")), "eps"),
])
def test_bad_flags_and_arguments_are_clear_errors(call, match):
    with pytest.raises((TypeError, ValueError), match=match):
        call(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))


def test_deploy_keeps_settings_changed_after_convert_and_syncbn_stays_sync():
    c = _convert(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)))
    c[0].square_bn.momentum, c[0].square_bn.eps = 0.01, 1e-3
    dep = acnet.deploy(c)
    assert (dep[1].momentum, dep[1].eps) == (0.01, 1e-3)
    s = _convert(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.SyncBatchNorm(4)))
    assert all(type(bn) is nn.SyncBatchNorm for bn in s[0].batch_norms())
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert rel_err(acnet.deploy(s.eval())(x), s(x)) <= TOL


def test_channels_last_models_deploy_channels_last_kernels():
    c = _convert(nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)))
    c = c.to(memory_format=torch.channels_last)
    dep = acnet.deploy(c.eval())
    assert dep[0].weight.is_contiguous(memory_format=torch.channels_last)
