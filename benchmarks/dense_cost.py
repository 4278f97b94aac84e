"""Training-step cost of dense-prediction models with ACBs, as ratios to the plain model.

A frozen-BatchNorm Faster R-CNN (torchvision, ResNet-18-FPN, the detection habit) plain vs
converted (the frozen norms absorbed: the online form), and a segmenter (torchvision LRASPP,
MobileNetV3-Large) plain vs ACNet (branch BN) vs online ACNet. One training step = forward with
the loss, backward, SGD step. Variants built from the same model, timed in turn in one process
(interleaved), medians of the repeats.

    python benchmarks/dense_cost.py --out benchmarks/dense_cost.json
"""

from __future__ import annotations

import argparse
import copy
import json
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.models.segmentation import lraspp_mobilenet_v3_large
from torchvision.ops import FrozenBatchNorm2d

import acnet
from acnet._env import load_average, machine
from acnet.analysis.cost import time_interleaved


def _step(model: torch.nn.Module, loss_of) -> callable:
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3,
                          momentum=0.9)
    model.train()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_of(model).backward()
        opt.step()
    return step


def detector(size: int, batch: int, repeats: int, warmup: int) -> dict:
    torch.manual_seed(0)
    backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None,
                                   norm_layer=FrozenBatchNorm2d, trainable_layers=3)
    plain = FasterRCNN(backbone, num_classes=11, min_size=size, max_size=size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = acnet.convert(copy.deepcopy(plain))
    images = [torch.rand(3, size, size) for _ in range(batch)]
    targets = [{"boxes": torch.tensor([[10.0, 20.0, 90.0, 120.0], [150.0, 40.0, 260.0, 200.0]]),
                "labels": torch.tensor([1, 5])} for _ in range(batch)]

    def loss(m):
        torch.manual_seed(1)  # the same proposal sampling for every variant
        return sum(m(images, targets).values())
    fns = {"plain": _step(plain, loss), "acnet": _step(converted, loss)}
    load = load_average()
    med = time_interleaved(fns, repeats, warmup)
    return {"model": f"Faster R-CNN ResNet-18-FPN, FrozenBatchNorm2d, {size}x{size}",
            "batch": batch, "converted": len(converted.acnet_report.converted),
            "ms": {k: v * 1e3 for k, v in med.items()},
            "ratio": {k: v / med["plain"] for k, v in med.items()},
            "load_avg": [load, load_average()]}


def segmenter(size: int, batch: int, repeats: int, warmup: int) -> dict:
    torch.manual_seed(0)
    plain = lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=11)
    acb = acnet.convert(copy.deepcopy(plain), preserve=False, gamma_init=1 / 3)
    online = acnet.convert(copy.deepcopy(plain), preserve=False, branch_bn=False,
                           branch_scale=True)
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 11, (batch, size, size))

    def loss(m):
        return F.cross_entropy(m(x)["out"], y)
    fns = {k: _step(m.to(memory_format=torch.channels_last), loss)
           for k, m in (("plain", plain), ("acnet", acb), ("online", online))}
    load = load_average()
    med = time_interleaved(fns, repeats, warmup)
    return {"model": f"LRASPP MobileNetV3-Large, {size}x{size}, channels_last", "batch": batch,
            "converted": len(acb.acnet_report.converted),
            "ms": {k: v * 1e3 for k, v in med.items()},
            "ratio": {k: v / med["plain"] for k, v in med.items()},
            "load_avg": [load, load_average()]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", default="benchmarks/dense_cost.json")
    a = p.parse_args()
    res = {"machine": machine(), "threads": torch.get_num_threads(), "repeats": a.repeats,
           "warmup": a.warmup,
           "command": f"python benchmarks/dense_cost.py --repeats {a.repeats} --warmup "
                      f"{a.warmup} --out {a.out}",
           "detector": detector(320, 2, a.repeats, a.warmup),
           "segmenter": segmenter(256, 8, a.repeats, a.warmup)}
    Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
    for key in ("detector", "segmenter"):
        r = res[key]
        print(f"{r['model']}, batch {r['batch']} ({r['converted']} convs converted): "
              + ", ".join(f"{k} {r['ms'][k]:.0f} ms ({r['ratio'][k]:.2f}x)" for k in r["ms"])
              + f"; load {r['load_avg']}")


if __name__ == "__main__":
    main()
