"""convert()/deploy() never return a silently wrong model: the cases found by trying it as a user.

Each test names the item of the hardening issue it covers.
"""

from __future__ import annotations

import copy
import io
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import randomize_bn, rel_err
from torch import nn

import acnet
from acnet import AbsorbedBatchNorm, ACBlock
from acnet.deploy import NormActTail

TOL = 1e-5


def _quiet_convert(model, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return acnet.convert(model, **kw)


# ---------------------------------------------------------------- 1: norm+act layers, fold_bn
@pytest.mark.parametrize("pre_convert", [False, True])
def test_fold_bn_keeps_timm_norm_act_activation(pre_convert):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = randomize_bn(timm.create_model("mobilenetv3_small_050", num_classes=10)).eval()
    x = torch.randn(2, 3, 64, 64)
    src = acnet.convert(model) if pre_convert else model
    for fold in (False, True):
        dep = acnet.deploy(src, fold_bn=fold).eval()
        with torch.no_grad():
            assert rel_err(dep(x), model(x)) <= TOL, (pre_convert, fold)
    folded = acnet.deploy(src, fold_bn=True)
    assert not any(type(m).__name__ == "BatchNormAct2d" for m in folded.modules())
    assert any(isinstance(m, NormActTail) for m in folded.modules())


# ---------------------------------------------------------------- 2: untraceable models
class _PreAct(nn.Module):
    """BN before conv (pre-activation), data-dependent control flow: fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(3)
        self.conv1 = nn.Conv2d(3, 3, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        if x.sum() > 0:
            x = x * 1.0
        y = self.conv1(F.relu(self.bn1(x)))
        return self.conv2(F.relu(self.bn2(x + y)))  # bn2 reads conv1's output plus x


class _SideUse(nn.Module):
    """conv → BN and the conv's output used again; module order alone would pair them."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        if x.mean() > 10:
            return x
        y = self.conv(x)
        return self.head(self.bn(y) + y)


class _Wrapped(nn.Module):
    """An untraceable root around a traceable conv-BN submodule: its graph proves the pair."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4))

    def forward(self, x):
        if x.sum() > 0:
            x = -x
        return self.body(x)


@pytest.mark.parametrize("cls", [_PreAct, _SideUse, _Wrapped])
def test_untraceable_models_are_never_miscompiled(cls):
    torch.manual_seed(0)
    model = randomize_bn(cls()).eval()
    out = _quiet_convert(model).eval()
    x = torch.randn(2, 3, 8, 8).abs()
    with torch.no_grad():
        assert rel_err(out(x), model(x)) <= TOL
        assert rel_err(acnet.deploy(out)(x), model(x)) <= TOL
    assert "could not trace" in " ".join(out.acnet_report.notes)


def test_untraceable_pairings_are_proven_not_guessed():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8).abs()
    pre = _quiet_convert(randomize_bn(_PreAct()), example_inputs=x)
    assert not any(isinstance(m, AbsorbedBatchNorm) for m in pre.modules())  # no conv→BN here
    side = _quiet_convert(randomize_bn(_SideUse()))
    assert "example_inputs" in side.acnet_report.skipped["conv"]
    side = _quiet_convert(randomize_bn(_SideUse()), example_inputs=x)
    assert "elsewhere" in side.acnet_report.skipped["conv"]
    wrapped = _quiet_convert(randomize_bn(_Wrapped()))
    assert isinstance(wrapped.body[1], AbsorbedBatchNorm)
    assert "graph of body" in str(wrapped.acnet_report)


class _VectorIn(nn.Module):
    """Takes a flat vector: no image probe can be guessed, so only example_inputs proves pairs."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(12, 3 * 16)
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, v):
        x = self.fc(v).view(-1, 3, 4, 4)
        if x.sum() > 1e9:
            x = x * 0
        return self.bn(self.conv(x))


def test_unprovable_pairs_are_skipped_and_example_inputs_prove_them():
    torch.manual_seed(0)
    model = randomize_bn(_VectorIn()).eval()
    out = _quiet_convert(model)
    assert "example_inputs" in out.acnet_report.skipped["conv"]
    assert isinstance(out.conv, nn.Conv2d) and isinstance(out.bn, nn.BatchNorm2d)
    v = torch.randn(2, 12)
    given = _quiet_convert(model, example_inputs=v).eval()
    assert isinstance(given.conv, ACBlock) and isinstance(given.bn, AbsorbedBatchNorm)
    with torch.no_grad():
        assert rel_err(given(v), model(v)) <= TOL
    with pytest.raises(ValueError, match="example_inputs"):
        _quiet_convert(model, example_inputs=torch.randn(2, 5))


def test_probe_leaves_modes_and_statistics_alone():
    model = randomize_bn(_SideUse()).train()
    before = copy.deepcopy(model.state_dict())
    _quiet_convert(model, example_inputs=torch.randn(4, 3, 8, 8))
    assert model.training and all(m.training for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


# ---------------------------------------------------------------- 3: frozen state
class _ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, 4, 3, padding=1)
        self.head_bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.head_bn(self.head(F.relu(self.bn(self.conv(x)))))


def test_frozen_batchnorm_keeps_its_mode_and_grad_flags():
    torch.manual_seed(0)
    model = randomize_bn(_ConvBN()).train()
    model.bn.eval()  # frozen statistics, as when fine-tuning detection backbones
    model.bn.weight.requires_grad_(False)
    model.bn.bias.requires_grad_(False)
    out = acnet.convert(model)
    block = out.conv
    assert block.training and not block.square_bn.training
    assert not block.hor_bn.training and not block.ver_bn.training  # statistics stay frozen
    assert not block.square_bn.weight.requires_grad and not block.square_bn.bias.requires_grad
    assert block.hor_conv.weight.requires_grad  # the conv is trainable, so are its new branches
    x = torch.randn(4, 3, 8, 8)
    assert rel_err(out(x), model(x)) <= TOL  # train mode: the frozen BN uses running stats
    dep = acnet.deploy(out)
    assert dep.conv.training and not dep.bn.training
    assert not dep.bn.weight.requires_grad and dep.conv.weight.requires_grad
    assert dep.head_bn.training and dep.head_bn.weight.requires_grad


def test_frozen_conv_is_skipped_unless_selected_and_then_stays_frozen():
    torch.manual_seed(0)
    model = randomize_bn(_ConvBN())
    model.conv.weight.requires_grad_(False)
    out = acnet.convert(model)
    assert "frozen" in out.acnet_report.skipped["conv"]
    assert isinstance(out.head, ACBlock)
    forced = acnet.convert(model, include=lambda n, m: True)
    assert all(not p.requires_grad for p in forced.conv.parameters() if p is not None
               and p is not forced.conv.square_bn.weight and p is not forced.conv.square_bn.bias)
    assert forced.conv.square_bn.weight.requires_grad  # the BN itself was trainable
    dep = acnet.deploy(forced)
    assert not dep.conv.weight.requires_grad


# ---------------------------------------------------------------- 5: copies, pickling
def test_deploy_handles_copies_of_a_converted_subnetwork():
    torch.manual_seed(0)
    unit = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3), nn.ReLU())
    cu = acnet.convert(randomize_bn(unit))
    stack = nn.Sequential(*[copy.deepcopy(cu) for _ in range(3)])
    with torch.no_grad():
        for i, sub in enumerate(stack):  # the copies must stay distinct after deploy
            sub[0].square_bn.bias.add_(i)
    stack.eval()
    dep = acnet.deploy(stack).eval()
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        assert rel_err(dep(x), stack(x)) <= TOL
    assert all(isinstance(sub[1], nn.BatchNorm2d) for sub in dep)


def test_reconverting_a_pickled_and_extended_model():
    torch.manual_seed(0)
    first = acnet.convert(randomize_bn(_ConvBN()))
    buf = io.BytesIO()
    torch.save(first, buf)  # as if saved by another process and loaded here
    loaded = torch.load(io.BytesIO(buf.getvalue()), weights_only=False)
    model = nn.Sequential(loaded, nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4))
    again = acnet.convert(model)
    assert again.acnet_report.converted == ["1"]
    again.eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert rel_err(acnet.deploy(again)(x), again(x)) <= TOL
    slots = [id(m.origin().slot) for m in again.modules() if isinstance(m, ACBlock)]
    assert len(set(slots)) == len(slots)
    pickle.loads(pickle.dumps(again))  # still picklable


# ---------------------------------------------------------------- 6: shared tensors on disk
class _Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 3, 3, padding=1)
        self.b = self.a  # one conv under two names (convert skips it)
        self.c = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.d = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.d.weight = self.c.weight  # tied weights

    def forward(self, x):
        return self.d(self.c(self.b(self.a(x))))


def test_save_deployed_with_shared_and_tied_tensors(tmp_path):
    torch.manual_seed(0)
    converted = acnet.convert(_Shared())
    assert "shared" in converted.acnet_report.skipped["a"]
    assert "tied to d.weight" in converted.acnet_report.skipped["c"]
    assert "tied to c.weight" in converted.acnet_report.skipped["d"]
    model = acnet.deploy(converted).eval()
    path = tmp_path / "shared.safetensors"
    acnet.save_deployed(model, path)
    fresh = _Shared()
    acnet.load_deployed(path, fresh)
    x = torch.randn(1, 3, 5, 5)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), model(x))
    assert set(acnet.load_deployed(path)) == set(model.state_dict())


# ---------------------------------------------------------------- 7: timm self-fusing blocks
@pytest.mark.parametrize("name", ["repvgg_a0", "mobileone_s0"])
def test_timm_reparameterize_model_on_converted_reparam_models(name):
    timm = pytest.importorskip("timm")
    from timm.utils import reparameterize_model

    torch.manual_seed(0)
    model = randomize_bn(timm.create_model(name, num_classes=10)).eval()
    conv = acnet.convert(model).eval()
    skipped = conv.acnet_report.skipped
    assert skipped and all("re-parameterizes itself" in r for n, r in skipped.items()
                           if "re-parameterizes" in r)
    fused = reparameterize_model(conv)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert rel_err(fused(x), model(x)) <= 1e-4
    assert not any(isinstance(m, ACBlock) for m in fused.modules())


# ---------------------------------------------------------------- 11: skip reasons
def test_weight_norm_and_hooked_convs_are_skipped_with_a_reason():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1),
                          nn.Conv2d(4, 4, 3, padding=1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.nn.utils.weight_norm(model[0])  # legacy: a forward pre-hook
    torch.nn.utils.parametrizations.weight_norm(model[1])  # new: a parametrization
    with pytest.raises(ValueError, match="inplace=True"):  # torch cannot deep-copy this state
        acnet.convert(model)
    x = torch.randn(1, 3, 5, 5)
    with torch.no_grad():
        want = model.eval()(x)
    out = acnet.convert(model, inplace=True)
    assert "weight_norm" in out.acnet_report.skipped["0"]
    assert "parametrizations" in out.acnet_report.skipped["1"]
    assert out.acnet_report.converted == ["2"]
    with torch.no_grad():
        assert rel_err(out.eval()(x), want) <= TOL


class _Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(4, track_running_stats=False)
        self.register_buffer("mean", torch.zeros(4))
        self.register_buffer("var", torch.ones(4))

    def forward(self, x):
        x = F.batch_norm(self.conv(x), self.mean, self.var)
        return self.bn2(self.conv2(x))


def test_skip_reasons_are_readable():
    rep = acnet.convert(_Functional()).acnet_report
    assert "functional batch_norm" in rep.skipped["conv"]
    assert "0x" not in rep.skipped["conv"]
    assert "track_running_stats=False" in rep.skipped["conv2"]
    assert "batch statistics" in rep.skipped["conv2"]


def test_batchnorm_with_user_hooks_is_not_absorbed():
    model = _ConvBN()
    seen = []
    model.bn.register_forward_hook(lambda m, a, o: seen.append(o.shape))
    out = acnet.convert(model)
    assert "forward hooks" in out.acnet_report.skipped["conv"]
    out(torch.randn(1, 3, 5, 5))
    assert seen == [torch.Size([1, 8, 5, 5])]  # the user's hook still runs


def test_deploy_restores_the_norm_of_a_block_pickled_by_acnet_0_3():
    """0.3 linked a block to its norm's slot by a pair id (and a bias flag); such pickles
    still deploy to the stock model."""
    torch.manual_seed(0)
    unit = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1, bias=True), nn.BatchNorm2d(3), nn.ReLU())
    cu = acnet.convert(randomize_bn(unit))
    block, slot = cu[0], cu[1]
    state = block.__dict__
    del state["_origin"]
    state["acnet_pair_id"], state["acnet_conv_bias"] = slot.pair_id, True
    old = pickle.loads(pickle.dumps(cu)).eval()
    assert old[0].origin().legacy_pair == slot.pair_id and old[0].origin().slot is None
    dep = acnet.deploy(old).eval()
    assert isinstance(dep[1], nn.BatchNorm2d) and dep[0].bias is not None
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        assert rel_err(dep(x), old(x)) <= TOL


@pytest.mark.parametrize("inplace", [False, True])
def test_unmaterialised_lazy_modules_say_to_run_the_model_first(inplace):
    model = nn.Sequential(nn.LazyConv2d(4, 3, padding=1, bias=False), nn.BatchNorm2d(4))
    with pytest.raises(ValueError, match=r"lazy modules have not run yet \(0\).*run the model "
                                         r"once on an input, then convert it"):
        acnet.convert(model, inplace=inplace)
    model(torch.randn(1, 3, 8, 8))  # materialised: a plain Conv2d now
    assert acnet.convert(model, inplace=inplace).acnet_report.converted == ["0"]


def test_deploy_finds_the_norm_of_a_block_copied_apart_from_its_slot():
    """A model assembled from deep copies of a converted model's parts: the block's link points
    to a copy outside the tree, so deploy falls back to the slot with the block's pair id."""
    torch.manual_seed(0)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False))
            self.norm = nn.BatchNorm2d(4)

        def forward(self, x):
            return self.norm(self.body(x))

    m = acnet.convert(randomize_bn(M()))
    m2 = M()
    m2.body, m2.norm = copy.deepcopy(m.body), copy.deepcopy(m.norm)
    m2.eval()
    dep = acnet.deploy(m2).eval()
    assert isinstance(dep.norm, nn.BatchNorm2d) and not dep.acnet_report.notes
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        assert rel_err(dep(x), m2(x)) <= TOL
    M().load_state_dict(dep.state_dict())
