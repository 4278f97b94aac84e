"""convert() / deploy() on hand-built models: pairing, skips, preservation, round trips."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import branchwise, randomize_bn, rel_err, sgd_steps, warm_bn
from torch import nn

import acnet
from acnet import AbsorbedBatchNorm, ACBlock

TOL = 1e-5


class Net(nn.Module):
    """conv→BN, conv(bias)→BN with eps, conv alone (pre-activation style), 1x1, non-square."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=True)
        self.bn2 = nn.BatchNorm2d(8, eps=1e-3, momentum=0.05)
        self.conv3 = nn.Conv2d(8, 8, 5, padding=2, dilation=1, groups=8, bias=False)
        self.pw = nn.Conv2d(8, 8, 1)
        self.tall = nn.Conv2d(8, 8, (1, 7), padding=(0, 3))
        self.bn_affine_free = nn.BatchNorm2d(8, affine=False)
        self.conv4 = nn.Conv2d(8, 4, 3, stride=2, padding=1, bias=False)
        self.head = nn.Linear(4, 10)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.conv3(x))
        x = self.tall(self.pw(x))
        x = self.bn_affine_free(x)
        x = self.conv4(x)
        return self.head(x.mean((2, 3)))


def _train(model, steps=3, shape=(4, 3, 12, 12)):
    return sgd_steps(model, lambda: torch.randn(*shape), steps, lr=0.05, momentum=0.9)


def test_report_pairs_and_skips():
    model = acnet.convert(Net())
    rep = model.acnet_report
    assert rep.converted == ["conv1", "conv2", "conv3", "conv4"]
    assert set(rep.skipped) == {"pw", "tall"}
    assert "1x1" in rep.skipped["pw"] and "non-square" in rep.skipped["tall"]
    assert isinstance(model.bn1, AbsorbedBatchNorm) and isinstance(model.bn2, AbsorbedBatchNorm)
    assert isinstance(model.conv3, ACBlock) and model.conv3.groups == 8
    assert isinstance(model.bn_affine_free, nn.BatchNorm2d)  # fed by the skipped non-square conv
    assert "conv1" in str(rep) and "absorbed bn1" in str(rep)
    assert type(model) is Net  # surgery on the user's tree, not a GraphModule


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_preserve_computes_the_original(mode):
    torch.manual_seed(0)
    net = randomize_bn(Net())
    conv = acnet.convert(net)
    x = torch.randn(4, 3, 12, 12)
    if mode == "eval":
        net.eval()
        conv.eval()
        assert rel_err(conv(x), net(x)) <= TOL
    else:
        # train mode is exact for conv→BN pairs; check on a conv-BN-only model
        seq = randomize_bn(nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=True),
                                         nn.BatchNorm2d(6), nn.ReLU(),
                                         nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6)))
        c = acnet.convert(seq)
        seq.train()
        c.train()
        assert rel_err(c(x), seq(x)) <= TOL
        # and the running statistics move identically
        torch.testing.assert_close(c[0].square_bn.running_var, seq[1].running_var)


def test_original_is_untouched_unless_inplace():
    net = Net()
    before = copy.deepcopy(net.state_dict())
    acnet.convert(net)
    assert isinstance(net.conv1, nn.Conv2d)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    same = acnet.convert(net, inplace=True)
    assert same is net and isinstance(net.conv1, ACBlock)


def test_round_trip_restores_original_tree():
    torch.manual_seed(0)
    net = randomize_bn(Net())
    keys = set(net.state_dict())
    ac = _train(acnet.convert(net))
    randomize_bn(ac, 3)
    branchwise(ac).eval()
    dep = acnet.deploy(ac)
    assert set(dep.state_dict()) - keys == {"conv3.bias", "conv4.bias"}  # they had no BN/bias
    assert sorted(dep.acnet_report.names("bias-added")) == ["conv3", "conv4"]
    assert isinstance(dep.bn2, nn.BatchNorm2d) and dep.bn2.eps == 1e-3 and dep.bn2.momentum == 0.05
    assert dep.conv2.bias is not None and dep.conv1.bias is None
    x = torch.randn(3, 3, 12, 12)
    assert rel_err(dep(x), ac(x)) <= TOL
    stock = Net()
    stock.conv3 = nn.Conv2d(8, 8, 5, padding=2, groups=8, bias=True)
    stock.conv4 = nn.Conv2d(8, 4, 3, stride=2, padding=1, bias=True)
    stock.load_state_dict(dep.state_dict(), strict=True)
    assert rel_err(stock.eval()(x), ac(x)) <= TOL


def test_deploy_affine_free_bn_is_restored():
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1, bias=False),
                        nn.BatchNorm2d(5, affine=False, eps=0.01))
    ac = _train(acnet.convert(seq), shape=(4, 3, 8, 8))
    randomize_bn(ac)
    ac.eval()
    dep = acnet.deploy(ac)
    assert dep[1].affine is False and dep[1].eps == 0.01
    stock = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1, bias=False),
                          nn.BatchNorm2d(5, affine=False, eps=0.01))
    stock.load_state_dict(dep.state_dict(), strict=True)
    x = torch.randn(2, 3, 8, 8)
    assert rel_err(stock.eval()(x), ac(x)) <= TOL


def test_fold_bn_gives_minimal_form():
    torch.manual_seed(0)
    net = randomize_bn(Net()).eval()
    ac = acnet.convert(net).eval()
    dep = acnet.deploy(ac, fold_bn=True)
    assert isinstance(dep.bn1, nn.Identity) and dep.conv1.bias is not None
    x = torch.randn(2, 3, 12, 12)
    assert rel_err(dep(x), ac(x)) <= TOL
    # a plain model: fold_bn folds its conv→BN pairs (the baseline's deploy)
    plain = acnet.deploy(net, fold_bn=True)
    assert isinstance(plain.bn1, nn.Identity) and isinstance(plain.bn2, nn.Identity)
    assert rel_err(plain(x), net(x)) <= TOL


def test_preserve_false_passes_options():
    model = acnet.convert(Net(), preserve=False, gamma_init=1 / 3, position="corner",
                          branch_bn=True)
    assert model.conv1.position == "corner"
    torch.testing.assert_close(model.conv1.hor_bn.weight, torch.full((8,), 1 / 3))
    nobn = acnet.convert(Net(), preserve=False, branch_bn=False)
    assert not nobn.conv1.branch_bn


def test_preserve_rejects_training_options():
    with pytest.raises(TypeError, match="gamma_init"):
        acnet.convert(Net(), gamma_init=0.3)
    with pytest.raises(TypeError, match="bogus"):
        acnet.convert(Net(), preserve=False, bogus=1)


def test_preserve_with_branch_bn_false():
    torch.manual_seed(0)
    net = randomize_bn(Net()).eval()
    ac = acnet.convert(net, branch_bn=False).eval()
    x = torch.randn(2, 3, 12, 12)
    assert rel_err(ac(x), net(x)) <= TOL
    _train(ac)
    ac.eval()
    assert ac.conv1.hor_conv.weight.abs().sum() > 0
    assert rel_err(acnet.deploy(ac)(x), ac(x)) <= TOL


def test_include_overrides_default_rules():
    model = acnet.convert(Net(), include=lambda name, m: name != "conv2")
    assert "conv2" not in model.acnet_report.converted
    assert model.acnet_report.skipped["conv2"] == "excluded by include="
    strided = nn.Sequential(nn.Conv2d(3, 4, 3, stride=3), nn.BatchNorm2d(4))
    assert acnet.convert(strided).acnet_report.converted == []
    assert acnet.convert(strided, include=lambda n, m: True).acnet_report.converted == ["0"]


def test_filter_still_works_with_a_deprecation_warning():
    with pytest.warns(DeprecationWarning, match="include="):
        model = acnet.convert(Net(), filter=lambda name, m: name != "conv2")
    assert model.acnet_report.skipped["conv2"] == "excluded by include="
    with pytest.raises(TypeError, match="include= only"), pytest.warns(DeprecationWarning):
        acnet.convert(Net(), filter=lambda n, m: True, include=lambda n, m: True)
    with pytest.raises(TypeError, match="include must be callable"):
        acnet.convert(Net(), include=3)


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.alias = self.conv
        self.bn = nn.BatchNorm2d(4)
        self.twice = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.split = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)
        self.tconv = nn.ConvTranspose2d(4, 4, 3, padding=1)
        self.c1d = nn.Conv1d(4, 4, 3)
        self.c3d = nn.Conv3d(4, 4, 3)
        self.multi = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        x = self.bn(self.conv(x))
        x = self.twice(self.twice(x))
        y = self.split(x)
        x = self.bn2(y) + y
        x = self.tconv(x)
        m = self.multi(x)
        return m * m.sigmoid()


def test_skip_cases_are_never_miscompiled():
    torch.manual_seed(0)
    model = randomize_bn(Shared()).eval()
    out = acnet.convert(model)
    rep = out.acnet_report
    assert "shared" in rep.skipped["conv"]
    assert "called 2 times" in rep.skipped["twice"]
    assert "bn2 and elsewhere" in rep.skipped["split"]
    assert "ConvTranspose2d" in rep.skipped["tconv"]
    assert "Conv1d" in rep.skipped["c1d"] and "Conv3d" in rep.skipped["c3d"]
    assert rep.converted == ["multi"]  # output used twice, no BN: safe to convert
    x = torch.randn(2, 4, 6, 6)
    assert rel_err(out.eval()(x), model(x)) <= TOL


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace this
            x = -x
        return self.bn(self.conv(x))


def test_untraceable_model_pairs_are_proven_by_a_probe_run_on_given_inputs():
    torch.manual_seed(0)
    model = randomize_bn(Untraceable()).eval()
    with pytest.warns(UserWarning, match="could not trace"):
        out = acnet.convert(model)
    assert "example_inputs" in out.acnet_report.skipped["conv"]
    x = torch.randn(2, 3, 6, 6)
    with pytest.warns(UserWarning, match="could not trace"):
        out = acnet.convert(model, example_inputs=x)
    assert isinstance(out.bn, AbsorbedBatchNorm)
    assert "proven on the given inputs" in str(out.acnet_report)
    assert rel_err(out.eval()(x), model(x)) <= TOL


def test_nothing_to_convert_is_fine():
    model = nn.Sequential(nn.Linear(3, 3))
    out = acnet.convert(model)
    assert out.acnet_report.layers == [] and "nothing to do" in str(out.acnet_report)
    assert "nothing to do" in str(acnet.deploy(out).acnet_report)


def test_repeated_conversion_is_idempotent():
    torch.manual_seed(0)
    net = randomize_bn(Net()).eval()
    once = acnet.convert(net)
    twice = acnet.convert(once)
    assert twice.acnet_report.converted == []
    assert not any(isinstance(m, ACBlock) for m in twice.conv1.modules() if m is not twice.conv1)
    x = torch.randn(2, 3, 12, 12)
    dep = acnet.deploy(twice.eval())
    assert rel_err(dep(x), net(x)) <= TOL
    again = acnet.deploy(dep)
    assert again.acnet_report.layers == [] or all(
        r.action == "folded" for r in again.acnet_report.layers)
    assert set(again.state_dict()) == set(dep.state_dict())


def test_compiled_model_is_handled_and_ddp_refused():
    net = Net()
    compiled = torch.compile(net)
    with pytest.warns(UserWarning, match="torch.compile"):
        out = acnet.convert(compiled)
    assert type(out) is Net and isinstance(out.conv1, ACBlock)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dp = nn.DataParallel(net)
    with pytest.raises(TypeError, match="before wrapping"):
        acnet.convert(dp)
    with pytest.raises(TypeError, match="before wrapping"):
        acnet.deploy(dp)
    with pytest.raises(TypeError, match=r"nn\.Module"):
        acnet.convert("resnet18")


def test_ddp_wrapper_refused(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(Net())
        with pytest.raises(TypeError, match="DistributedDataParallel"):
            acnet.convert(ddp)
        # the supported order: convert, then wrap; training runs
        ac = nn.parallel.DistributedDataParallel(acnet.convert(Net(), preserve=False))
        ac(torch.randn(2, 3, 8, 8)).sum().backward()
    finally:
        dist.destroy_process_group()


def test_converted_model_trains_and_every_branch_learns():
    torch.manual_seed(0)
    ac = acnet.convert(randomize_bn(Net()))
    _train(ac, steps=2)
    assert ac.conv1.hor_bn.weight.abs().sum() > 0  # started at 0, got gradient
    assert ac.conv1.ver_bn.weight.abs().sum() > 0


def test_syncbatchnorm_pairs_are_absorbed_and_restored():
    seq = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.SyncBatchNorm(4))
    randomize_bn(seq).eval()
    ac = acnet.convert(seq)
    assert isinstance(ac[1], AbsorbedBatchNorm)
    dep = acnet.deploy(ac.eval())
    assert type(dep[1]) is nn.SyncBatchNorm
    x = torch.randn(2, 3, 6, 6)
    assert rel_err(dep(x), seq(x)) <= TOL


def test_warm_bn_helper_changes_stats():
    b = ACBlock(2, 2, 3, padding=1)
    warm_bn(b, lambda: torch.randn(2, 2, 5, 5) * 3)
    assert not torch.equal(b.square_bn.running_var, torch.ones(2))
