"""A detector with a frozen-BatchNorm backbone, the detection habit: convert (the frozen norms
are absorbed; the new branches need no batch statistics), train your own loop for a minute on
synthetic scenes, deploy, and check the stock detector gives the same detections.

    python examples/detection.py      (about a minute on 2 CPU cores)

Real detectors load a pretrained backbone (which is why its BatchNorms are frozen); here the
backbone's BatchNorm statistics are calibrated on a few scenes and then frozen, as a stand-in.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.ops import FrozenBatchNorm2d, box_iou

sys.path.insert(0, str(Path(__file__).resolve().parent))
import acnet
from acnet.data import DatasetNotFoundError, load_dataset, synthetic
from acnet.data.scenes import scene_splits

SECONDS = 60  # training budget


def frozen(module: nn.Module) -> nn.Module:
    """Every BatchNorm2d replaced by a FrozenBatchNorm2d with its statistics."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            f = FrozenBatchNorm2d(child.num_features, child.eps)
            for key in ("weight", "bias", "running_mean", "running_var"):
                getattr(f, key).copy_(getattr(child, key).detach())
            setattr(module, name, f)
        else:
            frozen(child)
    return module


def detector(norm: type[nn.Module]) -> FasterRCNN:
    backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None, norm_layer=norm,
                                   trainable_layers=5)
    anchors = AnchorGenerator(((16,), (24,), (32,), (48,), (64,)), ((0.5, 1.0, 2.0),) * 5)
    # small scenes, few objects: a light box head and few proposals keep a CPU step short
    return FasterRCNN(backbone, min_size=64, max_size=64, rpn_anchor_generator=anchors,
                      box_head=TwoMLPHead(256 * 7 * 7, 256),
                      box_predictor=FastRCNNPredictor(256, 11), rpn_pre_nms_top_n_train=300,
                      rpn_post_nms_top_n_train=100, rpn_pre_nms_top_n_test=100,
                      rpn_post_nms_top_n_test=50, rpn_batch_size_per_image=64,
                      box_batch_size_per_image=64, box_detections_per_img=10)


def images(x: torch.Tensor) -> list[torch.Tensor]:
    return list((x.float() / 255).expand(-1, 3, -1, -1))


def main() -> None:
    torch.manual_seed(0)
    try:
        data = load_dataset("fashion-mnist")
    except DatasetNotFoundError:
        data = synthetic(2000, 500, channels=1, size=28, num_classes=10)
    train, test = scene_splits(data, 2000, 50, size=64, max_items=3)

    model = detector(nn.BatchNorm2d)
    model.backbone.train()
    with torch.no_grad():  # the stand-in for pretraining: BN statistics from a few scenes
        for i in range(0, 256, 64):
            model.backbone(torch.stack(images(train.images[i:i + 64])))
    frozen(model)
    model = acnet.convert(model)  # frozen norms absorbed: the online form, nothing changes yet
    print(str(model.acnet_report).splitlines()[0])

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-4)
    model.train()
    t0, step = time.perf_counter(), 0
    while time.perf_counter() - t0 < SECONDS:
        idx = torch.randint(0, len(train), (4,))
        targets = [{"boxes": train.boxes[i], "labels": train.labels[i]} for i in idx.tolist()]
        loss = sum(model(images(train.images[idx]), targets).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
    print(f"{step} steps of 4 scenes in {SECONDS} s, last loss {loss.item():.3f}")

    model.eval()
    deployed = acnet.deploy(model)
    stock = detector(FrozenBatchNorm2d)
    stock.load_state_dict(deployed.state_dict())  # strict: the stock frozen-BN detector
    stock.eval()
    for m in (model, stock):  # compare every detection, however unsure, not only confident ones
        m.roi_heads.score_thresh = 0.0
    with torch.no_grad():
        got, want = stock(images(test.images)), model(images(test.images))
    compared = sum(len(a["boxes"]) for a in want)
    same = compared > 0 and all(
        torch.equal(a["labels"], b["labels"]) and a["boxes"].shape == b["boxes"].shape
        and torch.allclose(a["boxes"], b["boxes"], atol=1e-3)
        and torch.allclose(a["scores"], b["scores"], atol=1e-4)
        for a, b in zip(got, want, strict=True))
    found = total = 0
    for det, boxes, labels in zip(got, test.boxes, test.labels, strict=True):
        keep = det["scores"] > 0.5
        iou = box_iou(boxes, det["boxes"][keep]) if keep.any() else torch.zeros(len(boxes), 0)
        hit = (iou > 0.5) & (labels[:, None] == det["labels"][keep][None, :])
        found += int(hit.any(1).sum())
        total += len(boxes)
    print(f"stock detector gives the trained ACNet's {compared} detections (boxes, labels, "
          f"scores): {same}; objects found (IoU > 0.5, right class, score > 0.5): {found} of "
          f"{total} (a minute of training is a demonstration, not a detector)")
    assert same


if __name__ == "__main__":
    main()
