"""Dense prediction (issue 33): frozen norms absorbed and restored, detectors and segmenters
convert, train a step and deploy back exactly; biases deploy used to add move into the BNs."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import randomize_bn, rel_err
from torch import nn

import acnet
from acnet import AbsorbedBatchNorm, ACBlock

TOL = 1e-5


def _convert(model, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return acnet.convert(model, **kw)


def _randomize_frozen(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random statistics and affine buffers for frozen norms (randomize_bn covers BNs)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if type(m).__name__.startswith("FrozenBatchNorm"):
            n = m.weight.numel()
            m.weight.copy_(torch.rand(n, generator=g) * 1.5 + 0.25)
            m.bias.copy_(torch.randn(n, generator=g) * 0.5)
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.2)
    return model


def _perturb(model: nn.Module) -> nn.Module:
    """Make the ACBlocks' new branches contribute (as training would)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for b in model.modules():
            if isinstance(b, ACBlock):
                for name in ("hor_conv", "ver_conv"):
                    if name in b._modules:
                        b._modules[name].weight.normal_(0, 0.05)
                for name in ("hor_scale", "ver_scale"):
                    if name in b._parameters:
                        b._parameters[name].fill_(0.5)
    return model


# ---------------------------------------------------------------- frozen norms
def test_frozen_norm_block_is_online_and_exact_in_both_modes():
    from torchvision.ops import FrozenBatchNorm2d

    torch.manual_seed(0)
    model = _randomize_frozen(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), FrozenBatchNorm2d(8),
                                            nn.ReLU()))
    c = _convert(model)
    block = c[0]
    assert isinstance(block, ACBlock) and block.branch_scale and not block.branch_bn
    assert type(block.bn).__name__ == "FrozenBatchNorm2d" and isinstance(c[1], AbsorbedBatchNorm)
    assert "frozen" in c.acnet_report.layers[0].detail
    x = torch.randn(2, 3, 8, 8)
    for train in (True, False):
        assert rel_err(c.train(train)(x), model.train(train)(x)) <= TOL
    _perturb(c)
    dep = acnet.deploy(c.eval())
    assert type(dep[1]) is FrozenBatchNorm2d
    stock = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), FrozenBatchNorm2d(8), nn.ReLU())
    stock.load_state_dict(dep.state_dict())
    assert rel_err(stock(x), c(x)) <= TOL
    # frozen: batch statistics never enter, so one conv in training mode too
    assert not any(p.requires_grad for p in block.bn.buffers())


@pytest.mark.parametrize("small", [False, True])
def test_frozen_bn_faster_rcnn_converts_trains_and_deploys(small):
    pytest.importorskip("torchvision")
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops import FrozenBatchNorm2d

    def make():
        torch.manual_seed(0)
        backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None,
                                       norm_layer=FrozenBatchNorm2d, trainable_layers=3)
        return FasterRCNN(backbone, num_classes=4, min_size=96, max_size=96)

    model = _randomize_frozen(make()).eval()
    conv = _convert(model, branch_init="small" if small else "zero")
    rep = conv.acnet_report
    backbone_converted = [n for n in rep.converted if n.startswith("backbone.body")]
    assert len(backbone_converted) >= 12, str(rep)  # layer2-4: every trainable 3x3 conv
    images = [torch.rand(3, 96, 96), torch.rand(3, 80, 96)]
    with torch.no_grad():
        want = model(images)
        got = conv(images)
    for w, g in zip(want, got, strict=True):  # the converted detector computes the same
        assert w["boxes"].shape == g["boxes"].shape
        if len(w["boxes"]):
            assert rel_err(g["boxes"], w["boxes"]) <= 1e-4
    targets = [{"boxes": torch.tensor([[10.0, 10.0, 50.0, 60.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[5.0, 20.0, 30.0, 70.0]]), "labels": torch.tensor([2])}]
    conv.train()
    opt = torch.optim.SGD([p for p in conv.parameters() if p.requires_grad], lr=0.01,
                          momentum=0.9)
    for _ in range(2):
        loss = sum(conv(images, targets).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    conv.eval()
    dep = acnet.deploy(conv)
    assert all(type(m).__name__ != "ACBlock" for m in dep.modules())
    stock = make()
    stock.load_state_dict(dep.state_dict())  # strict
    stock.eval()
    with torch.no_grad():
        a, b = conv(images), stock(images)
    for x, y in zip(a, b, strict=True):
        assert x["boxes"].shape == y["boxes"].shape
        assert torch.equal(x["labels"], y["labels"])
        if len(x["boxes"]):
            assert (x["boxes"] - y["boxes"]).abs().max() <= 1e-3
            assert (x["scores"] - y["scores"]).abs().max() <= 1e-4


@pytest.mark.parametrize("name", ["resnet10t", "efficientnet_b0"])
def test_timm_frozen_norms_are_absorbed_and_restored(name):
    timm = pytest.importorskip("timm")
    from timm.layers import freeze_batch_norm_2d

    torch.manual_seed(0)
    model = freeze_batch_norm_2d(randomize_bn(timm.create_model(name, num_classes=5))).eval()
    kinds = {type(m).__name__ for m in model.modules()}
    assert kinds & {"FrozenBatchNorm2d", "FrozenBatchNormAct2d"}
    conv = _convert(model)
    assert conv.acnet_report.converted
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert rel_err(conv(x), model(x)) <= 1e-4
    dep = acnet.deploy(_perturb(conv).eval())
    stock = freeze_batch_norm_2d(timm.create_model(name, num_classes=5)).eval()
    stock.load_state_dict(dep.state_dict())
    assert {type(m).__name__ for m in stock.modules()} == kinds
    with torch.no_grad():
        assert rel_err(stock(x), conv(x)) <= 1e-4


def test_segmenter_converts_trains_and_deploys():
    pytest.importorskip("torchvision")
    from torchvision.models.segmentation import lraspp_mobilenet_v3_large

    torch.manual_seed(0)
    model = randomize_bn(lraspp_mobilenet_v3_large(weights=None, weights_backbone=None,
                                                   num_classes=4)).eval()
    conv = _convert(model, preserve=False)
    x = torch.randn(2, 3, 64, 64)
    conv.train()
    opt = torch.optim.SGD(conv.parameters(), lr=0.01)
    out = conv(x)["out"]
    F.cross_entropy(out, torch.randint(0, 4, (2, 64, 64))).backward()
    opt.step()
    conv.eval()
    dep = acnet.deploy(conv)
    stock = lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=4)
    stock.load_state_dict(dep.state_dict())
    with torch.no_grad():
        assert rel_err(stock.eval()(x)["out"], conv(x)["out"]) <= 1e-4


# ---------------------------------------------------------------- biases deploy used to add
class _Separable(nn.Module):
    """Depthwise 3x3 (no bias, no BN) → pointwise 1x1 → BN: timm's and smp's separable conv."""

    def __init__(self):
        super().__init__()
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.pw = nn.Conv2d(8, 6, 1, bias=False)
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x):
        return F.relu(self.bn(self.pw(self.dw(x))))


class _Dense(nn.Module):
    """DenseNet's pattern: a pre-activation conv concatenated, then a BN; plus a residual sum
    and a max pool on the way."""

    def __init__(self):
        super().__init__()
        self.bn0 = nn.BatchNorm2d(8)
        self.conv = nn.Conv2d(8, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(12)
        self.conv2 = nn.Conv2d(12, 12, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(12)

    def forward(self, x):
        y = self.conv(F.relu(self.bn0(x)))
        z = torch.cat([x, y], 1)
        r = self.conv2(F.relu(self.bn1(z)))
        return self.bn2(F.max_pool2d(r + z, 2))


class _Sums(nn.Module):
    """Sums in which the conv's output counts twice or is scaled (found by trying it)."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        if self.how == "twice":
            return self.bn(y + y)
        if self.how == "alpha":
            return self.bn(torch.add(x, y, alpha=3))
        if self.how == "sub_alpha":
            return self.bn(torch.sub(x, y, alpha=2))
        return self.bn(x - y + y + y)


@pytest.mark.parametrize("how", ["twice", "alpha", "sub_alpha", "chain"])
def test_a_bias_moves_through_sums_counted_as_they_stand(how):
    torch.manual_seed(0)
    conv = _convert(_Sums(how).eval())
    with torch.no_grad():
        conv.conv.square_bn.running_mean.fill_(0.5)
    dep = acnet.deploy(conv.eval())
    assert dep.acnet_report.names("bias-moved") == ["conv"]
    stock = _Sums(how)
    stock.load_state_dict(dep.state_dict())
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        assert rel_err(stock.eval()(x), conv(x)) <= TOL


class _Unplaceable(nn.Module):
    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.next = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        if self.how == "relu":
            return self.bn(F.relu(y))
        if self.how == "padded_conv":
            return self.bn(self.next(y))
        return y  # the model's output


@pytest.mark.parametrize("cls", [_Separable, _Dense])
def test_biases_move_into_the_next_batchnorm_so_the_stock_class_loads(cls):
    torch.manual_seed(0)
    model = randomize_bn(cls()).eval()
    conv = _perturb(_convert(model))
    with torch.no_grad():
        for b in conv.modules():
            if isinstance(b, ACBlock):
                for bn in b.batch_norms():
                    bn.bias.add_(0.3)  # a bias the deployed conv must carry somewhere
    conv.eval()
    dep = acnet.deploy(conv)
    moved = dep.acnet_report.names("bias-moved")
    assert moved and not dep.acnet_report.names("bias-added")
    stock = cls()
    stock.load_state_dict(dep.state_dict())
    x = torch.randn(2, 8, 8, 8)
    with torch.no_grad():
        assert rel_err(stock.eval()(x), conv(x)) <= TOL
        assert rel_err(dep(x), conv(x)) <= TOL


@pytest.mark.parametrize("how,reason", [("relu", "relu"), ("padded_conv", "zero padding"),
                                        ("output", "output")])
def test_biases_that_cannot_move_stay_with_the_reason(how, reason):
    torch.manual_seed(0)
    model = randomize_bn(_Unplaceable(how)).eval()
    conv = _convert(model, include=lambda n, m: n == "conv")
    with torch.no_grad():
        conv.conv.square_bn.bias.add_(0.3)
    dep = acnet.deploy(conv.eval())
    detail = dict((r.name, r.detail) for r in dep.acnet_report.layers)["conv"]
    assert dep.acnet_report.names("bias-added") == ["conv"] and reason in detail
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        assert rel_err(dep(x), conv(x)) <= TOL


def _deploys_to_the_stock_class(make) -> nn.Module:
    """Convert, train-perturb and deploy ``make()``; a fresh ``make()`` loads the result strictly
    and computes what the trained ACNet does. Returns the deployed model (for its report)."""
    torch.manual_seed(0)
    model = randomize_bn(make()).eval()
    conv = _perturb(_convert(model)).eval()
    dep = acnet.deploy(conv)
    stock = make()
    stock.load_state_dict(copy.deepcopy(dep.state_dict()))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert rel_err(stock.eval()(x), conv(x)) <= 1e-4
    return dep


@pytest.mark.parametrize("name", ["ese_vovnet19b_dw", "mixnet_s"])
def test_timm_models_that_used_to_gain_biases_now_load_strictly(name):
    timm = pytest.importorskip("timm")
    dep = _deploys_to_the_stock_class(lambda: timm.create_model(name, num_classes=5))
    assert not dep.acnet_report.names("bias-added")


def test_smp_deeplabv3plus_loads_strictly_after_deploy():
    smp = pytest.importorskip("segmentation_models_pytorch")
    dep = _deploys_to_the_stock_class(lambda: smp.DeepLabV3Plus(
        encoder_name="resnet18", encoder_weights=None, classes=3))
    assert "decoder.aspp.0.convs.1.0.0" in dep.acnet_report.names("bias-moved")


def test_densenet_deploys_to_the_stock_class():
    tv = pytest.importorskip("torchvision")
    dep = _deploys_to_the_stock_class(lambda: tv.models.densenet121(num_classes=5))
    assert len(dep.acnet_report.names("bias-moved")) == 58


def test_scene_runs_refuse_other_settings_and_resume_after_the_last_checkpoint(tmp_path):
    from acnet.errors import InputError
    from acnet.experiments.presets import open_scene_run

    cfg = {"seed": 0, "lr": 0.1, "device": "cpu", "data_dir": "a"}
    run, saved = open_scene_run(cfg, tmp_path / "run")
    out = run.path
    assert "device" not in saved
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    sched.step()
    run.end_epoch({"epoch": 1, "seconds": 2.0}, model, opt, sched)
    with open(out / "metrics.jsonl", "a") as f:  # a line written, then killed before its checkpoint
        f.write('{"epoch": 2, "seconds": 3.0}\n')
    open_scene_run({**cfg, "data_dir": "b"}, out)  # the data may move
    with pytest.raises(InputError, match="other settings \\(lr\\)"):
        open_scene_run({**cfg, "lr": 0.2}, out)
    fresh = nn.Linear(3, 2)
    opt2 = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, 1)
    assert run.resume_loop(fresh, opt2, sched2) == (1, 2.0)
    assert torch.equal(fresh.weight, model.weight)
    assert sched2.last_epoch == 1 and opt2.state_dict()["state"]
    assert (out / "metrics.jsonl").read_text().count("\n") == 1
