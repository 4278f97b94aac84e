"""The training engine: one run directory, resumable bit for bit, DDP-aware, deploys at the end."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..convert import deploy
from ..io import CheckpointError, load_checkpoint, save_checkpoint, save_deployed, save_json
from . import distributed as D
from .config import RUNTIME_FIELDS, TrainConfig, build_training_model, load_config, resolve
from .progress import Progress

log = logging.getLogger(__name__)

__all__ = ["train", "evaluate", "RunDirError", "count_params"]


class RunDirError(ValueError):
    """The output directory cannot be used as asked (exists without --resume, unwritable...)."""


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@dataclass
class _Data:
    train: Any
    test: Any
    in_channels: int
    num_classes: int
    train_size: int
    input_size: int


def load_data(cfg: TrainConfig, info: D.DistInfo, transform: str = "none") -> _Data:
    from ..data import InMemoryLoader, load_dataset

    per_rank = cfg.batch_size // info.world
    if per_rank < 1:
        raise ValueError(f"--batch-size {cfg.batch_size} is smaller than the {info.world} ranks")
    if cfg.dataset == "imagenet":
        from ..data.folder import imagenet_loaders

        tl, vl, classes = imagenet_loaders(cfg.data_dir, cfg.batch_size, device=info.device,
                                           workers=cfg.workers, rank=info.rank, world=info.world,
                                           seed=cfg.seed, image_size=cfg.image_size,
                                           train_limit=cfg.train_limit, transform=transform)
        return _Data(tl, vl, 3, classes, len(tl) * cfg.batch_size, cfg.image_size)
    data = load_dataset(cfg.dataset, cfg.data_dir, cfg.download).limit(cfg.train_limit,
                                                                       cfg.test_limit)
    if cfg.batch_size > len(data.train_x):
        raise ValueError(f"--batch-size {cfg.batch_size} is larger than the "
                         f"{len(data.train_x)} training images")
    common = {"mean": data.mean, "std": data.std, "device": info.device}
    train = InMemoryLoader(data.train_x, data.train_y, per_rank, train=True, seed=cfg.seed,
                           crop_padding=data.crop_padding, hflip=data.hflip, rank=info.rank,
                           world=info.world, **common)
    test = InMemoryLoader(data.test_x, data.test_y, 512, transform=transform, **common)
    return _Data(train, test, data.shape[0], data.num_classes, len(data.train_x), data.shape[1])


def _autocast(cfg: TrainConfig, device: torch.device):
    if cfg.amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(model: nn.Module, loader, *, amp: bool = False, keep_logits: bool = False
             ) -> tuple[float, torch.Tensor | None]:
    """Top-1 accuracy on ``loader`` (and the concatenated logits, if asked)."""
    was = model.training
    model.eval()
    correct = total = 0
    outs = []
    for x, y in loader:
        ctx = (torch.autocast("cuda", dtype=torch.bfloat16) if amp and x.is_cuda
               else contextlib.nullcontext())
        with ctx:
            logits = model(x)
        logits = logits.float()
        correct += (logits.argmax(1) == y).sum().item()
        total += y.numel()
        if keep_logits:
            outs.append(logits.cpu())
    model.train(was)
    return correct / max(total, 1), (torch.cat(outs) if keep_logits else None)


def _schedule(cfg: TrainConfig, steps_per_epoch: int):
    total = cfg.epochs * steps_per_epoch
    warm = cfg.warmup_epochs * steps_per_epoch

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, total - warm)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _prepare_dir(out: Path, cfg: TrainConfig, resume: bool, info: D.DistInfo) -> bool:
    """Check/create the run directory; returns True when there is a checkpoint to resume."""
    ck = out / "checkpoint.pt"
    started = (out / "config.json").exists() or ck.exists()
    if started and not resume:
        raise RunDirError(f"{out} already holds a run; pass --resume to continue it or choose "
                          f"another --out")
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--out {out} exists and is not a directory")
    if info.main:
        try:
            out.mkdir(parents=True, exist_ok=True)
            probe = out / ".write-test"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise RunDirError(f"cannot write to output directory {out}: "
                              f"{exc.strerror or exc}") from exc
    if resume and (out / "config.json").exists():
        saved = load_config(out)
        mine, theirs = json.loads(cfg.to_json()), json.loads(saved.to_json())
        diff = sorted(k for k in mine if k not in RUNTIME_FIELDS
                      and k not in ("in_channels", "num_classes", "input_size")
                      and mine[k] != theirs.get(k))
        if diff:
            raise RunDirError(f"--resume with different settings than {out}/config.json: "
                              + ", ".join(f"{k}={mine[k]!r} (run has {theirs.get(k)!r})"
                                          for k in diff))
    return resume and ck.exists()


def _rng_state(device: torch.device) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _tensorboard(out: Path, info: D.DistInfo):
    if not info.main:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard not installed: optional
        return None
    return SummaryWriter(str(out / "tb"))


def train(cfg: TrainConfig, out: str | os.PathLike, *, resume: bool = False) -> dict[str, Any]:
    """Train per ``cfg`` into run directory ``out``; returns the final metrics (metrics.json)."""
    cfg = resolve(cfg)
    out = Path(out)
    if resume and (out / "metrics.json").is_file():
        log.info("%s is finished; nothing to resume", out)
        return json.loads((out / "metrics.json").read_text())
    info = D.setup(cfg.device)
    try:
        return _train(cfg, out, resume, info)
    finally:
        D.teardown(info)


def _train(cfg: TrainConfig, out: Path, resume: bool, info: D.DistInfo) -> dict[str, Any]:
    has_ck = _prepare_dir(out, cfg, resume, info)
    device = info.device
    torch.manual_seed(cfg.seed)
    data = load_data(cfg, info)
    cfg.in_channels, cfg.num_classes = data.in_channels, data.num_classes
    cfg.input_size = data.input_size
    model = build_training_model(cfg).to(device)
    if device.type == "cuda" and cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.sync_bn and info.enabled:
        if device.type == "cpu":
            raise ValueError("--sync-bn needs GPUs (PyTorch's SyncBatchNorm does not run on CPU); "
                             "without it BN statistics are averaged across ranks before "
                             "evaluation and deployment")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    params_train = count_params(model)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                          nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(cfg, len(data.train)))
    start_epoch, seconds = 0, 0.0
    if has_ck:
        state = load_checkpoint(out / "checkpoint.pt", map_location=device)
        try:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            start_epoch, seconds = int(state["epoch"]), float(state.get("seconds", 0.0))
            _set_rng_state(state["rng"], device)
        except (KeyError, RuntimeError, ValueError) as exc:
            raise CheckpointError(f"{out}/checkpoint.pt does not match this run ({exc})") from exc
        log.info("resuming %s after epoch %d", out, start_epoch)
    else:
        torch.manual_seed(cfg.seed + info.rank)
    if info.main:
        save_json(out / "config.json", json.loads(cfg.to_json()))
        _trim_metrics(out / "metrics.jsonl", start_epoch)
    net = model
    if info.enabled:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    tb = _tensorboard(out, info)
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        data.train.set_epoch(epoch)
        loss_avg, acc_avg, ips = _train_epoch(net, opt, sched, data.train, cfg, device, epoch,
                                              info)
        D.average_bn_stats(model, info)
        test_acc, _ = evaluate(model, data.test, amp=cfg.amp)
        seconds += time.perf_counter() - t0
        row = {"epoch": epoch + 1, "train_loss": loss_avg, "train_acc": acc_avg,
               "test_acc": test_acc, "lr": opt.param_groups[0]["lr"], "images_per_s": ips,
               "seconds": seconds}
        if info.main:
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            save_checkpoint(out / "checkpoint.pt", {
                "model": model.state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "epoch": epoch + 1, "seconds": seconds,
                "rng": _rng_state(device), "config": cfg.to_json()})
            if tb is not None:
                for k, v in row.items():
                    if k != "epoch":
                        tb.add_scalar(k, v, epoch + 1)
            log.info("%s epoch %d/%d  loss %.4f  train %.4f  test %.4f  %.0f img/s",
                     cfg.model, epoch + 1, cfg.epochs, loss_avg, acc_avg, test_acc, ips)
        D.barrier(info)
    if tb is not None:
        tb.close()
    metrics = _finish(model, data, cfg, out, info, params_train, seconds)
    return metrics


def _trim_metrics(path: Path, epochs_done: int) -> None:
    """Drop metric lines of epochs after the checkpoint (written before a crash)."""
    if not path.exists():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    keep = []
    for ln in lines:
        try:
            if json.loads(ln)["epoch"] <= epochs_done:
                keep.append(ln)
        except (json.JSONDecodeError, KeyError):
            break  # a torn last line
    path.write_text("".join(ln + "\n" for ln in keep))


def _train_epoch(net, opt, sched, loader, cfg, device, epoch, info):
    net.train()
    total_loss = torch.zeros((), device=device)
    correct = torch.zeros((), device=device)
    seen = 0
    desc = f"epoch {epoch + 1}/{cfg.epochs}"
    with Progress(len(loader), desc, enabled=info.main and not cfg.quiet) as bar:
        for x, y in loader:
            if device.type == "cuda" and cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with _autocast(cfg, device):
                logits = net(x)
                loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            n = y.numel()
            total_loss += loss.detach() * n
            correct += (logits.detach().argmax(1) == y).sum()
            seen += n
            if bar.enabled:
                bar.update(n, loss=total_loss.item() / seen, acc=correct.item() / seen)
            else:
                bar.images += n
    if not math.isfinite(total_loss.item()):
        raise FloatingPointError(f"training diverged at epoch {epoch + 1} (loss is not finite); "
                                 f"lower --lr")
    return total_loss.item() / max(seen, 1), correct.item() / max(seen, 1), bar.images_per_second


def _finish(model, data, cfg, out, info, params_train, seconds) -> dict[str, Any]:
    """Deploy, evaluate the deployed model, check it agrees with the trained one, save it."""
    agree = D.ranks_agree(model, info)
    metrics: dict[str, Any] = {}
    if info.main:
        model.eval()
        test_acc, logits = evaluate(model, data.test, amp=False, keep_logits=True)
        folded = deploy(model, fold_bn=True)  # minimal form, for base and ACNet alike
        dep_acc, dep_logits = evaluate(folded, data.test, amp=False, keep_logits=True)
        deployed = deploy(model)  # the original architecture (a stock model loads it)
        diff = (dep_logits - logits).abs().max().item()
        agreement = (dep_logits.argmax(1) == logits.argmax(1)).float().mean().item()
        save_deployed(deployed, out / "deployed.safetensors",
                      metadata={"acnet_config": cfg.to_json()})
        metrics = {
            "test_acc": test_acc, "deployed_test_acc": dep_acc,
            "params_train": params_train, "params_deployed": count_params(deployed),
            "params_folded": count_params(folded), "max_abs_diff_deploy": diff,
            "prediction_agreement": agreement, "epochs": cfg.epochs, "seconds": seconds,
            "ranks": info.world, "ranks_consistent": agree, "model": cfg.model,
            "block": cfg.block, "dataset": cfg.dataset, "seed": cfg.seed,
            "train_images": data.train_size,
        }
        save_json(out / "metrics.json", metrics)
        log.info("%s/%s: test acc %.4f, deployed %.4f (max |diff| %.2e, %.2f%% same "
                 "predictions), params %d trained -> %d deployed", cfg.model, cfg.block, test_acc,
                 dep_acc, diff, 100 * agreement, params_train, metrics["params_deployed"])
    D.barrier(info)
    return metrics
