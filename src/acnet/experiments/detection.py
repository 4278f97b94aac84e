"""The detection part of the dense study: a frozen-BatchNorm Faster R-CNN (torchvision,
ResNet-18-FPN) on the synthetic scenes, plain vs ACNet, trained by a plain loop, mAP of the
deployed detectors (torchmetrics' COCO-style mean average precision).

Detectors load a pretrained backbone, which is why their BatchNorms are frozen; with no
pretrained weights reachable, the backbone's BatchNorm statistics are calibrated on training
scenes and then frozen, as a stand-in. A CPU budget: one seed, a few epochs, small scenes.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .._text import markdown_table
from ..convert import convert
from ..data import load_dataset
from ..data.scenes import Scenes, scene_splits
from ..deploy import deploy
from ..errors import NonFiniteError, require
from ..train import RunDir
from .presets import SceneStudy, open_scene_run
from .runner import Job

log = logging.getLogger(__name__)

__all__ = [
    "DETECTION",
    "DetectionStudy",
    "build_detector",
    "detection_jobs",
    "detection_map",
    "detection_section",
    "train_detector",
]


@dataclass(frozen=True)
class DetectionStudy(SceneStudy):
    """The detection runs' settings (every field lands in each run's config.json)."""

    train_scenes: int = 2000
    test_scenes: int = 300
    epochs: int = 4
    batch_size: int = 4
    lr: float = 0.01
    seeds: tuple[int, ...] = (0,)
    data_dir: str | None = None


DETECTION = DetectionStudy()


def build_detector(num_classes: int, frozen: bool = True) -> Any:
    """Faster R-CNN, ResNet-18-FPN with FrozenBatchNorm2d (or BatchNorm2d), sized for small
    scenes: anchors of 16-64 px, a light box head, few proposals."""
    require("torchvision", "vision", "the detection study")
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.ops import FrozenBatchNorm2d

    backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None,
                                   norm_layer=FrozenBatchNorm2d if frozen else nn.BatchNorm2d,
                                   trainable_layers=5)
    anchors = AnchorGenerator(((16,), (24,), (32,), (48,), (64,)), ((0.5, 1.0, 2.0),) * 5)
    return FasterRCNN(backbone, min_size=64, max_size=64, rpn_anchor_generator=anchors,
                      box_head=TwoMLPHead(256 * 7 * 7, 256),
                      box_predictor=FastRCNNPredictor(256, num_classes + 1),
                      rpn_pre_nms_top_n_train=300, rpn_post_nms_top_n_train=100,
                      rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=50,
                      rpn_batch_size_per_image=64, box_batch_size_per_image=64,
                      box_detections_per_img=10)


def _images(x: Tensor) -> list[Tensor]:
    return list((x.float() / 255).expand(-1, 3, -1, -1))


def _pretrained_stand_in(num_classes: int, train: Scenes) -> Any:
    """A detector whose backbone BatchNorm statistics come from training scenes, then frozen
    into torchvision's FrozenBatchNorm2d (what loading pretrained weights would give)."""
    calibrated = build_detector(num_classes, frozen=False)
    calibrated.backbone.train()
    with torch.no_grad():
        for i in range(0, min(256, len(train)), 64):
            calibrated.backbone(torch.stack(_images(train.images[i:i + 64])))
    model = build_detector(num_classes, frozen=True)
    state = {k: v for k, v in calibrated.state_dict().items()
             if not k.endswith("num_batches_tracked")}
    model.load_state_dict(state)
    return model


def detection_map(model: nn.Module, scenes: Scenes, batch: int = 50) -> dict[str, Any]:
    """COCO-style mAP (IoU 0.5:0.95), mAP@0.5 and the detections of ``model`` on ``scenes``."""
    metrics = require("torchmetrics.detection", "dense", "detection mAP")
    m = metrics.MeanAveragePrecision(iou_type="bbox")
    model.eval()
    outs = []
    with torch.no_grad():
        for i in range(0, len(scenes), batch):
            dets = model(_images(scenes.images[i:i + batch]))
            outs += dets
            m.update(dets, [{"boxes": b, "labels": lab} for b, lab in
                            zip(scenes.boxes[i:i + batch], scenes.labels[i:i + batch],
                                strict=True)])
    r = m.compute()
    return {"map": float(r["map"]), "map_50": float(r["map_50"]), "detections": outs}


def _data(cfg: dict[str, Any]) -> tuple[Scenes, Scenes]:
    data = load_dataset(cfg["dataset"], cfg.get("data_dir"))
    return scene_splits(data, cfg["train_scenes"], cfg["test_scenes"], size=cfg["scene_size"],
                        max_items=cfg["max_items"], seed=cfg["scene_seed"])


def train_detector(config: dict[str, Any], path: str, threads: int | None = None) -> str:
    """Train (or resume) one detection run into ``path``, then deploy and compare."""
    run, cfg = open_scene_run(config, path, threads)
    train, test = _data(cfg)
    torch.manual_seed(cfg["seed"])
    model = _pretrained_stand_in(train.num_classes, train)
    if cfg["variant"] == "acb":
        with warnings.catch_warnings():  # the detector's top level does not trace: expected
            warnings.simplefilter("ignore", UserWarning)
            model = convert(model, inplace=True)  # frozen norms absorbed: the online form
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=cfg["lr"], momentum=0.9, weight_decay=1e-4)
    start, seconds = run.resume_loop(model, opt)
    for epoch in range(start, cfg["epochs"]):
        t0 = time.perf_counter()
        loss = _epoch(model, opt, train, cfg, epoch)
        seconds += time.perf_counter() - t0
        run.end_epoch({"epoch": epoch + 1, "train_loss": loss, "seconds": seconds}, model, opt)
        log.info("%s epoch %d/%d loss %.4f", run.path.name, epoch + 1, cfg["epochs"], loss)
    _finish(model, test, run, cfg, seconds)
    return path


def _epoch(model: nn.Module, opt: torch.optim.Optimizer, train: Scenes, cfg: dict[str, Any],
           epoch: int) -> float:
    g = torch.Generator().manual_seed(cfg["seed"] * 1_000_003 + epoch)
    order = torch.randperm(len(train), generator=g).tolist()
    b = cfg["batch_size"]
    model.train()
    total, steps = 0.0, len(order) // b
    for i in range(steps):
        idx = order[i * b:(i + 1) * b]
        targets = [{"boxes": train.boxes[j], "labels": train.labels[j]} for j in idx]
        loss = sum(model(_images(train.images[idx]), targets).values())
        if not torch.isfinite(loss):
            raise NonFiniteError(f"detector training diverged at epoch {epoch + 1}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += loss.item()
    return total / max(steps, 1)


def _finish(model: Any, test: Scenes, run: RunDir, cfg: dict[str, Any],
            seconds: float) -> None:
    """Deploy into the stock frozen-BN detector (strict load), mAP of both, compare."""
    model.eval()
    stock = build_detector(test.num_classes, frozen=True)
    stock.load_state_dict(deploy(model).state_dict())
    for m in (model, stock):  # compare every detection, however unsure
        m.roi_heads.score_thresh = 0.0
    trained, deployed = detection_map(model, test), detection_map(stock, test)
    pairs = list(zip(trained["detections"], deployed["detections"], strict=True))
    report = model.__dict__.get("acnet_report")
    same = all(a["boxes"].shape == b["boxes"].shape and torch.equal(a["labels"], b["labels"])
               for a, b in pairs)
    diff = max((float((a["boxes"] - b["boxes"]).abs().max()) for a, b in pairs
                if len(a["boxes"]) and a["boxes"].shape == b["boxes"].shape), default=0.0)
    run.write_metrics({
        "variant": cfg["variant"], "seed": cfg["seed"], "epochs": cfg["epochs"],
        "test_map": trained["map"], "deployed_test_map": deployed["map"],
        "deployed_test_map_50": deployed["map_50"], "same_detections": same,
        "max_box_diff_deploy": diff,
        "detections": sum(len(a["boxes"]) for a, _ in pairs),
        "converted": len(report.converted) if report is not None else 0,
        "seconds": seconds, "train_scenes": cfg["train_scenes"]})


def detection_jobs(study: DetectionStudy) -> list[Job]:
    """Plain and ACNet detectors for every seed."""
    return [Job(f"det-{v}-s{s}", study.config(v, s)) for s in study.seeds for v in ("base", "acb")]


def detection_section(study: DetectionStudy, out: Path) -> tuple[list[str], dict[str, Any]]:
    """The report's detection section and its results, from the finished detection runs."""
    done: dict[str, dict[int, dict[str, Any]]] = {}
    pending = []
    for job in detection_jobs(study):
        metrics = RunDir(out / "runs" / job.name).read_metrics()
        if metrics is not None:
            done.setdefault(job.config["variant"], {})[job.config["seed"]] = metrics
        else:
            pending.append(job.name)
    st = study
    lines = ["## Detection: a frozen-BN Faster R-CNN", "",
             f"torchvision Faster R-CNN, ResNet-18-FPN with FrozenBatchNorm2d (statistics "
             f"calibrated on training scenes, then frozen: the stand-in for a pretrained "
             f"backbone), trained {st.epochs} epochs on {st.train_scenes:,} scenes (batch "
             f"{st.batch_size}, SGD lr {st.lr}), every backbone layer trainable; ACNet: "
             f"`acnet.convert(detector)`, the frozen norms absorbed (online form). A CPU "
             f"budget: {len(st.seeds)} seed(s), so this shows the training path working with "
             f"its numbers, not a gain beyond seed noise. COCO-style mAP (torchmetrics) of the "
             f"deployed detectors on {st.test_scenes:,} test scenes.", ""]
    rows = []
    for v, label in (("base", "baseline"), ("acb", "ACNet")):
        for seed, m in sorted(done.get(v, {}).items()):
            rows.append([label, seed, m["epochs"], f"{100 * m['deployed_test_map']:.2f}",
                         f"{100 * m['deployed_test_map_50']:.2f}",
                         "yes" if m["same_detections"] else "NO",
                         f"{m['max_box_diff_deploy']:.2g}", m["converted"]])
    if rows:
        lines += [*markdown_table(["detector", "seed", "epochs", "mAP (%)", "mAP@0.5 (%)",
                                   "stock detector, same detections", "max box diff",
                                   "convs converted"], rows), ""]
    if pending:
        lines += [f"pending: runs {', '.join(pending)}", ""]
    return lines, {"runs": done, "pending": pending, "settings": asdict(st)}
