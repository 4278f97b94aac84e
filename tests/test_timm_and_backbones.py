"""timm models and a segmentation backbone: convert, train, deploy; timm's own reparameterize."""

from __future__ import annotations

import pytest
import torch
from helpers import branchwise, randomize_bn, rel_err, sgd_steps

import acnet
from acnet import ACBlock


def _train_steps(model, x, steps=2, out_key=None):
    pick = (lambda out: out[out_key]) if out_key else (lambda out: out)
    sgd_steps(model, lambda: x, steps, lr=1e-3, momentum=0.9,
              loss=lambda out: pick(out).square().mean())


@pytest.mark.parametrize("name", ["resnet10t", "efficientnet_b0", "dla34", "mobilenetv3_small_050"])
def test_timm_models(name):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = randomize_bn(timm.create_model(name, pretrained=False, num_classes=10)).eval()
    x = torch.randn(2, 3, 64, 64)
    ac = acnet.convert(model)
    assert len(ac.acnet_report.converted) > 5
    assert rel_err(ac.eval()(x), model(x)) <= 1e-4
    _train_steps(ac, torch.randn(2, 3, 64, 64))
    randomize_bn(ac, 1)
    branchwise(ac).eval().double()
    x = x.double()
    dep = acnet.deploy(ac)
    rep = timm.utils.reparameterize_model(ac)
    assert not any(isinstance(m, ACBlock) for m in rep.modules())
    y = ac(x)
    assert rel_err(dep(x), y) <= 1e-10
    assert rel_err(rep(x), y) <= 1e-10  # timm's reparameterize agrees with acnet.deploy
    stock = timm.create_model(name, pretrained=False, num_classes=10).double().eval()
    stock.load_state_dict(dep.state_dict(), strict=True)
    assert rel_err(stock(x), y) <= 1e-10


def test_timm_bn_act_keeps_its_activation():
    timm = pytest.importorskip("timm")
    from timm.layers import BatchNormAct2d

    seq = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1, bias=False),
                              BatchNormAct2d(4, act_layer=torch.nn.ReLU))
    randomize_bn(seq).eval()
    ac = acnet.convert(seq)
    assert isinstance(ac[1], acnet.AbsorbedBatchNorm) and isinstance(ac[1].act, torch.nn.ReLU)
    x = torch.randn(2, 3, 6, 6)
    assert rel_err(ac.eval()(x), seq(x)) <= 1e-6
    dep = acnet.deploy(ac)
    assert type(dep[1]) is BatchNormAct2d
    assert rel_err(dep(x), seq(x)) <= 1e-6
    del timm


@pytest.mark.parametrize("builder", ["fcn_resnet50", "deeplabv3_mobilenet_v3_large"])
def test_segmentation_backbone(builder):
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = tv.models.get_model(builder, weights=None, weights_backbone=None, num_classes=3,
                                aux_loss=False)
    randomize_bn(model).eval()
    x = torch.randn(2, 3, 64, 64)
    ac = acnet.convert(model)
    assert any(n.startswith("backbone.") for n in ac.acnet_report.converted)
    assert rel_err(ac.eval()(x)["out"], model(x)["out"]) <= 1e-4
    _train_steps(ac, torch.randn(2, 3, 64, 64), out_key="out")
    randomize_bn(ac, 1)
    branchwise(ac).eval().double()
    dep = acnet.deploy(ac)
    x = x.double()
    y = ac(x)["out"]
    assert rel_err(dep(x)["out"], y) <= 1e-10
    stock = tv.models.get_model(builder, weights=None, weights_backbone=None, num_classes=3,
                                aux_loss=False).double().eval()
    stock.load_state_dict(dep.state_dict(), strict=True)
    assert rel_err(stock(x)["out"], y) <= 1e-10
