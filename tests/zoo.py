"""The torchvision-zoo round trip used by tests: convert → equal → train → deploy → stock load."""

from __future__ import annotations

import torch
from helpers import branchwise, calibrate_bn, rel_err, sgd_steps

import acnet

# input sizes that each family needs (the rest run at 64x64)
INPUT = {"inception_v3": 96, "googlenet": 64}
FIXED_224 = ("vit_", "swin_", "maxvit_")


def input_size(name: str) -> int:
    if name.startswith(FIXED_224):
        return 224
    return INPUT.get(name, 64)


def logits(out):
    return out.logits if hasattr(out, "logits") else out


def round_trip(name: str, seed: int = 0, steps: int = 2) -> dict:
    import torchvision

    torch.manual_seed(seed)
    kwargs = {"num_classes": 10}
    if name in ("googlenet", "inception_v3"):
        kwargs.update(aux_logits=False, init_weights=False)
    model = torchvision.models.get_model(name, **kwargs)
    s = input_size(name)
    calibrate_bn(model, lambda: torch.randn(4, 3, s, s), seed)
    model.eval()
    x = torch.randn(2, 3, s, s)
    conv = acnet.convert(model)
    report = conv.acnet_report
    # both in float64: convert copies weights exactly, so only float64 rounding may remain, where
    # float32 rounding through 100+ layers of a random deep net reaches ~1e-3 by itself
    model.double()
    conv.double()
    with torch.no_grad():
        err_convert = rel_err(logits(conv(x.double())), logits(model(x.double())))
    del model  # big models (RegNetY-128GF) must fit in float64 below
    conv.float()  # exact: the float32 values went up to float64 and come back unchanged
    # train a few steps so every branch (zero-initialised asymmetric BNs) carries weight
    target = torch.tensor([1, 7])
    sgd_steps(conv, lambda: torch.randn(2, 3, s, s), steps, lr=1e-3, momentum=0.9,
              loss=lambda out: torch.nn.functional.cross_entropy(logits(out), target))
    # random affine parameters in every BN (asymmetric branches included) and statistics from data
    calibrate_bn(conv, lambda: torch.randn(4, 3, s, s), seed + 1)
    conv.zero_grad(set_to_none=True)  # free gradients before the float64 copies
    # exactness is checked in float64, where a deep random net's fp32 rounding cannot hide a bug
    branchwise(conv).eval().double()  # the ACNet computed branch by branch, as trained
    x = x.double()
    dep = acnet.deploy(conv)
    with torch.no_grad():
        y = logits(conv(x))
        err_deploy = rel_err(logits(dep(x)), y)
    spread = (y - y.mean()).abs().max().item() / y.abs().max().clamp_min(1e-30).item()
    del conv
    stock = torchvision.models.get_model(name, **kwargs).eval().double()
    added = dep.acnet_report.names("bias-added")
    result = {"converted": len(report.converted), "err_convert": err_convert,
              "err_deploy": err_deploy, "bias_added": added, "err_stock": None,
              "params_equal": None, "spread": spread}
    if not added:
        stock.load_state_dict(dep.state_dict(), strict=True)
        with torch.no_grad():
            result["err_stock"] = rel_err(logits(stock(x)), y)
        n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        result["params_equal"] = n(stock) == n(dep)
    return result
