"""The dense-prediction study (`acnet reproduce --preset dense`): semantic segmentation on
synthetic Fashion-MNIST scenes with a torchvision LRASPP (MobileNetV3-Small backbone), baseline
vs ACNet, trained by a plain user-style loop (acnet only converts and deploys), evaluated
deployed. The scenes are synthetic (COCO and Cityscapes are not reachable here); the report
says so.
"""

from __future__ import annotations

import json
import logging
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._env import machine
from .._files import save_json
from ..convert import convert
from ..data import load_dataset
from ..data.scenes import Scenes, scene_splits
from ..deploy import deploy
from ..errors import NonFiniteError, require
from ..train import RunDir
from .detection import DETECTION, DetectionStudy, detection_jobs, detection_section, train_detector
from .presets import SceneStudy, open_scene_run
from .runner import Job, train_jobs
from .stats import compare, markdown_table, pm, signed

log = logging.getLogger(__name__)

__all__ = [
    "DENSE",
    "VARIANTS",
    "DenseStudy",
    "build_segmenter",
    "jobs",
    "miou",
    "run",
    "summary",
    "train_segmenter",
]

RESULTS = "results.json"
CURVES = "curves.png"
SCENES = "scenes.png"
VARIANTS: dict[str, dict[str, Any] | None] = {
    "base": None,  # the segmenter as built
    "acb": {"gamma_init": 1 / 3},  # convert(preserve=False): ACNet trained from scratch
}
LABELS = {"base": "baseline", "acb": "ACNet"}


@dataclass(frozen=True)
class DenseStudy(SceneStudy):
    """The segmentation study's settings (every field lands in each run's config.json)."""

    weight_decay: float = 4e-5
    seeds: tuple[int, ...] = (0, 1, 2)
    data_dir: str | None = None  # where the dataset is (not a setting: resume may move it)


DENSE = DenseStudy()


def build_segmenter(num_classes: int) -> nn.Module:
    """torchvision's LRASPP head on a dilated MobileNetV3-Small (the Large one's recipe)."""
    tv = require("torchvision", "vision", "the dense study")
    from torchvision.models.segmentation.lraspp import _lraspp_mobilenetv3

    return _lraspp_mobilenetv3(tv.models.mobilenet_v3_small(dilated=True), num_classes)


def _inputs(images: Tensor) -> Tensor:
    """uint8 gray scenes → normalized 3-channel float (the segmenter's stem takes RGB)."""
    x = images.float().div_(255).sub_(0.2860).div_(0.3530)
    return x.expand(-1, 3, -1, -1).contiguous(memory_format=torch.channels_last)


def miou(model: nn.Module, scenes: Scenes, batch: int = 100) -> dict[str, Any]:
    """Mean IoU over the classes (background included), pixel accuracy and per-class IoU of
    ``model`` in eval mode on ``scenes``; ``logits`` keeps the outputs for comparisons."""
    k = scenes.num_classes + 1
    conf = torch.zeros(k, k, dtype=torch.long)
    model.eval()
    outs = []
    with torch.no_grad():
        for i in range(0, len(scenes), batch):
            out = model(_inputs(scenes.images[i:i + batch]))["out"]
            if not torch.isfinite(out).all():
                raise NonFiniteError("the segmenter's outputs are not finite")
            outs.append(out)
            pred = out.argmax(1).flatten()
            truth = scenes.masks[i:i + batch].flatten()
            conf += torch.bincount(truth * k + pred, minlength=k * k).view(k, k)
    tp = conf.diag().double()
    union = conf.sum(0).double() + conf.sum(1).double() - tp
    iou = torch.where(union > 0, tp / union.clamp_min(1), torch.nan)
    present = ~torch.isnan(iou)
    return {"miou": float(iou[present].mean()), "pixel_acc": float(tp.sum() / conf.sum()),
            "iou": [None if torch.isnan(v) else float(v) for v in iou],
            "logits": torch.cat(outs)}


def _flip(x: Tensor, y: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """Random horizontal flips of images and masks together."""
    f = torch.rand(len(x), generator=g) < 0.5
    x, y = x.clone(), y.clone()
    x[f], y[f] = x[f].flip(-1), y[f].flip(-1)
    return x, y


def _model(cfg: dict[str, Any], num_classes: int) -> nn.Module:
    model = build_segmenter(num_classes + 1)
    opts = VARIANTS[cfg["variant"]]
    if opts is not None:
        model = convert(model, preserve=False, inplace=True, **opts)
    return model.to(memory_format=torch.channels_last)


def _data(cfg: dict[str, Any]) -> tuple[Scenes, Scenes]:
    data = load_dataset(cfg["dataset"], cfg.get("data_dir"))
    return scene_splits(data, cfg["train_scenes"], cfg["test_scenes"], size=cfg["scene_size"],
                        max_items=cfg["max_items"], seed=cfg["scene_seed"])


def train_segmenter(config: dict[str, Any], path: str, threads: int | None = None) -> str:
    """Train (or resume) one segmentation run into ``path``: checkpoint and metrics line per
    epoch, then deploy and compare; a user's own loop, acnet only converts and deploys."""
    run, cfg = open_scene_run(config, path, threads)
    train, test = _data(cfg)
    torch.manual_seed(cfg["seed"])
    model = _model(cfg, train.num_classes)
    opt = torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=0.9,
                          weight_decay=cfg["weight_decay"])
    steps = len(train) // cfg["batch_size"]
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg["lr"], total_steps=cfg["epochs"] * steps,
                                                pct_start=0.1)
    start, seconds = run.resume_loop(model, opt, sched)
    for epoch in range(start, cfg["epochs"]):
        t0 = time.perf_counter()
        loss = _epoch(model, opt, sched, train, cfg, epoch)
        ev = miou(model, test)
        seconds += time.perf_counter() - t0
        run.end_epoch({"epoch": epoch + 1, "train_loss": loss, "test_miou": ev["miou"],
                        "test_pixel_acc": ev["pixel_acc"], "seconds": seconds}, model, opt, sched)
        log.info("%s epoch %d/%d loss %.4f test mIoU %.4f", run.path.name, epoch + 1, cfg["epochs"],
                 loss, ev["miou"])
    _finish(model, test, run, cfg, seconds)
    return path


def _epoch(model: nn.Module, opt: torch.optim.Optimizer, sched: Any, train: Scenes,
           cfg: dict[str, Any], epoch: int) -> float:
    """One pass over the training scenes (shuffled and flipped by seed and epoch)."""
    g = torch.Generator().manual_seed(cfg["seed"] * 1_000_003 + epoch)
    order = torch.randperm(len(train), generator=g)
    b = cfg["batch_size"]
    model.train()
    total = 0.0
    steps = len(train) // b
    for i in range(steps):
        idx = order[i * b:(i + 1) * b]
        x, y = _flip(train.images[idx], train.masks[idx], g)
        loss = F.cross_entropy(model(_inputs(x))["out"], y)
        if not torch.isfinite(loss):
            raise NonFiniteError(f"training diverged at epoch {epoch + 1} (loss not finite)")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        total += loss.item()
    return total / max(steps, 1)


def _finish(model: nn.Module, test: Scenes, run: RunDir, cfg: dict[str, Any],
            seconds: float) -> None:
    """Deploy, evaluate both forms on the test scenes, write metrics.json."""
    model.eval()
    trained = miou(model, test)
    deployed_model = deploy(model)
    deployed = miou(deployed_model, test)
    diff = float((trained["logits"] - deployed["logits"]).abs().max())
    same = float((trained["logits"].argmax(1) == deployed["logits"].argmax(1)).float().mean())
    params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    run.write_metrics({
        "variant": cfg["variant"], "seed": cfg["seed"], "epochs": cfg["epochs"],
        "test_miou": trained["miou"], "deployed_test_miou": deployed["miou"],
        "deployed_pixel_acc": deployed["pixel_acc"], "deployed_iou": deployed["iou"],
        "max_abs_diff_deploy": diff, "prediction_agreement": same,
        "params_train": params(model), "params_deployed": params(deployed_model),
        "seconds": seconds, "train_scenes": cfg["train_scenes"]})


def jobs(study: DenseStudy, seeds: tuple[int, ...] | None = None) -> list[Job]:
    """Baseline and ACNet for every seed, seed by seed."""
    return [Job(f"seg-{v}-s{s}", study.config(v, s)) for s in seeds or study.seeds
            for v in VARIANTS]


# ------------------------------------------------------------------------ report
def _read(out: Path, study: DenseStudy, seeds: tuple[int, ...]) -> tuple[dict, list[str]]:
    """{variant: {seed: metrics + curve}} of the finished runs, and the pending names."""
    done: dict[str, dict[int, dict[str, Any]]] = {}
    pending = []
    for job in jobs(study, seeds):
        run = RunDir(out / "runs" / job.name)
        entry = run.read_metrics()
        if entry is None:
            pending.append(job.name)
            continue
        entry["curve"] = run.metrics_lines()
        done.setdefault(job.config["variant"], {})[job.config["seed"]] = entry
    return done, pending


def _rise(curves: list[list[dict[str, Any]]], fraction: float = 0.2) -> str:
    """Mean test mIoU rise over the last ``fraction`` of the epochs."""
    if not curves:
        return "—"
    n = min(len(c) for c in curves)
    k = max(1, round(fraction * n))
    if n <= k:
        return "—"
    first = sum(c[n - k - 1]["test_miou"] for c in curves) / len(curves)
    last = sum(c[n - 1]["test_miou"] for c in curves) / len(curves)
    return f"{signed(last - first)} (epoch {n - k} → {n})"


def _figures(done: dict, out: Path, test: Scenes | None) -> list[str]:
    from ..analysis import plots

    lines = []
    panels: dict[str, dict[str, dict[str, Any]]] = {"test mIoU per epoch": {}}
    for v, runs in done.items():
        curves = [r["curve"] for r in runs.values()]
        n = min(len(c) for c in curves)
        vals = torch.tensor([[c[e]["test_miou"] for e in range(n)] for c in curves])
        panels["test mIoU per epoch"][v] = {
            "epochs": list(range(1, n + 1)), "mean": vals.mean(0).tolist(),
            "std": (vals.std(0) if len(curves) > 1 else torch.zeros(n)).tolist()}
    if done:
        plots.training_curves(panels, out / CURVES, labels=LABELS, ylabel="test mIoU")
        lines += [f"![test mIoU per epoch]({CURVES})", "",
                  f"*Test mIoU after each epoch, mean ± std over seeds: "
                  f"{', '.join(LABELS.get(v, v) for v in done)}.*", ""]
    if test is not None:
        plots.scene_samples(test.images[:6], test.masks[:6], out / SCENES)
        lines += [f"![scenes]({SCENES})", "",
                  "Test scenes (top) and their masks (bottom): the task is synthetic.", ""]
    return lines


def _deployment_line(every: list[dict[str, Any]]) -> str:
    """The deployment check over every finished run."""
    if not every:
        return "No finished runs yet."
    agree = min(r["prediction_agreement"] for r in every)
    trained = ", ".join(f"{n:,}" for n in sorted({r["params_train"] for r in every}))
    deployed = ", ".join(f"{n:,}" for n in sorted({r["params_deployed"] for r in every}))
    return (f"Every deployed model against its trained model on the test scenes: max |logit "
            f"difference| {max(r['max_abs_diff_deploy'] for r in every):.2g}; "
            + ("every pixel prediction identical" if agree == 1.0 else
               f"pixel predictions that differ: a fraction {1 - agree:.1g} at most (near-ties)")
            + f". Parameters trained (baseline, ACNet): {trained}; deployed: {deployed}.")


def report(study: DenseStudy, out: Path, seeds: tuple[int, ...], command: str,
           test: Scenes | None = None, detection: DetectionStudy | None = None) -> Path:
    """Write results.json and report.md from the finished runs."""
    done, pending = _read(out, study, seeds)
    total = len(jobs(study, seeds))
    base = {s: r["deployed_test_miou"] for s, r in done.get("base", {}).items()}
    acb = {s: r["deployed_test_miou"] for s, r in done.get("acb", {}).items()}
    c = compare(base, acb)
    rows = [[LABELS[v], len(done.get(v, {})), pm([r["deployed_test_miou"] for r in
                                                  done.get(v, {}).values()]),
             pm([r["deployed_pixel_acc"] for r in done.get(v, {}).values()]),
             _rise([r["curve"] for r in done.get(v, {}).values()])] for v in VARIANTS]
    every = [r for runs in done.values() for r in runs.values()]
    st = study
    lines = [
        "# Dense prediction with ACNet: segmentation on synthetic scenes", "",
        "This study trains a segmentation model with and without ACNet on synthetic scenes and "
        "checks that a frozen-BN detector trains and deploys as an ACNet.", "",
        f"Command: `{command}`", "",
        f"**Synthetic task.** COCO and Cityscapes are not reachable from this machine, so the "
        f"scenes are built from {st.dataset}: {st.scene_size}×{st.scene_size} canvases with 1 "
        f"to {st.max_items} non-overlapping items, each labelled with its class over its "
        f"silhouette (11 classes with the background); {st.train_scenes:,} training scenes from "
        f"the training images and {st.test_scenes:,} test scenes from the test images, fixed by "
        f"seed {st.scene_seed}. Numbers here say how ACNet behaves on a dense task with a "
        f"torchvision segmentation model; they do not predict COCO or Cityscapes gains.", "",
        f"Model: torchvision LRASPP with a dilated MobileNetV3-Small backbone (gray scenes "
        f"repeated to 3 channels), trained from scratch by a plain training loop: SGD momentum "
        f"0.9, one-cycle lr peaking at {st.lr}, weight decay {st.weight_decay}, batch "
        f"{st.batch_size}, {st.epochs} epochs, random horizontal flips. ACNet: "
        f"`acnet.convert(model, preserve=False, gamma_init=1/3)` (every 3×3 and 5×5 conv, "
        f"depthwise included, with its BN), `acnet.deploy` after training. mIoU of the "
        f"deployed models over the 11 classes on the test scenes, mean ± std over seeds.", "",
        f"Status: {len(every)} of {total} runs finished"
        + (f"; pending: {', '.join(pending)}." if pending else "."), "",
        "## Result", "",
        *markdown_table(["model", "seeds", "test mIoU (%)", "pixel accuracy (%)",
                         "mIoU rise over the last 20 % of epochs"], rows), "",
        f"ACNet − baseline: {signed(c.gain)} mIoU points (per seed "
        f"{', '.join(signed(d) for d in c.paired.values()) or '—'}); beyond seed noise: "
        f"{c.verdict} (2 s.e. = {2 * 100 * c.se:.2f})." if c.paired else "No paired seeds yet.",
        "", *_figures(done, out, test),
        "## Deployment check", "", _deployment_line(every), ""]
    det: dict[str, Any] = {}
    if detection is not None and detection.seeds:
        det_lines, det = detection_section(detection, out)
        lines += det_lines
    path = out / "report.md"
    path.write_text("\n".join(lines))
    save_json(out / RESULTS, {
        "study": "dense", "command": command, "settings": asdict(st), "runs": done,
        "pending": pending, "gain": c.gain if c.paired else None, "verdict": c.verdict,
        "detection": det,
        "software": {"python": platform.python_version(), "torch": torch.__version__},
        "machine": machine()})
    return path


def run(out: str | Path, *, workers: int = 1, device: str = "auto", data_dir: str | None = None,
        seeds: tuple[int, ...] | None = None, train_runs: bool = True, command: str = "",
        study: DenseStudy = DENSE, detection: DetectionStudy | None = None) -> Path:
    """Train what is missing (unless ``train_runs`` is False), then write results and report."""
    out = Path(out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    if data_dir is not None:
        study = DenseStudy(**{**asdict(study), "data_dir": data_dir})
    seeds = seeds or study.seeds
    det = DetectionStudy(**{**asdict(DETECTION), "data_dir": study.data_dir}) \
        if detection is None else detection
    if train_runs:
        train_jobs(jobs(study, seeds), out / "runs", workers=workers, trainer=train_segmenter)
        if det.seeds:
            train_jobs(detection_jobs(det), out / "runs", workers=workers,
                       trainer=train_detector)
    try:
        test = _data(study.config("base", 0))[1]
    except Exception as exc:  # the report still describes the runs without the sample figure
        log.warning("no scene figure: %s", exc)
        test = None
    return report(study, out, seeds, command or f"acnet reproduce --preset dense --out {out}",
                  test, det)


def summary(out: str | Path) -> str:
    """One line on the study's state, from its results.json."""
    data = json.loads((Path(out) / RESULTS).read_text())
    gain = data.get("gain")
    return (f"dense study: {sum(len(v) for v in data['runs'].values())} runs finished, "
            f"{len(data['pending'])} pending; ACNet − baseline mIoU "
            f"{'—' if gain is None else signed(gain)} ({data['verdict']}); see "
            f"{Path(out) / 'report.md'}")
