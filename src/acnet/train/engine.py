"""The training engine: one run directory, resumable bit for bit, DDP-aware, deploys at the end."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from .._compat import eager_ceil_mode_avg_pools
from .._files import CheckpointError
from ..deploy import deploy
from ..errors import InputError, NonFiniteError
from ..evaluation import compare_models, count_params, evaluate
from . import distributed as dist_utils
from .config import (
    AUTO_FIELDS,
    TrainConfig,
    build_base_model,
    build_training_model,
    resolve,
    settings_diff,
)
from .data import Split, fill_data_fields, open_data, test_split, train_split
from .init_from import load_source, read_source
from .progress import Progress
from .rundir import RunDir, RunDirError

log = logging.getLogger(__name__)

__all__ = ["DIVERGED_LOSS", "RunDirError", "train"]

# A mean training loss above this is divergence even when finite: a classifier that outputs
# uniform probabilities has a cross-entropy of ln(classes), about 7 for 1000 classes.
DIVERGED_LOSS = 1e4


@dataclass
class _Run:
    """What one training run holds while it trains."""

    cfg: TrainConfig
    run: RunDir
    info: dist_utils.DistInfo
    train: Split
    test: Split
    model: nn.Module
    opt: torch.optim.Optimizer
    sched: Any
    params_train: int
    start_epoch: int = 0
    seconds: float = 0.0
    eval_net: nn.Module | None = None  # what evaluates each epoch (compiled with --compile)
    init_test_acc: float | None = None  # test accuracy before the first step


def _check_out(run: RunDir, cfg: TrainConfig, resume: bool) -> None:
    """Refuse to overwrite a run, to resume nothing, or to resume with other settings."""
    if run.started and not resume:
        raise RunDirError(f"{run.path} already holds a run; resume it or choose another "
                          f"output directory", params=("resume", "out"))
    if not resume:
        return
    if not run.started:
        raise RunDirError(f"resume: {run.path} holds no acnet run to resume (no config.json); "
                          f"start one without resume", params=("resume",))
    diff = settings_diff(cfg, run.read_config())
    if diff:
        raise RunDirError(f"resume with different settings than {run.config_file}: "
                          + ", ".join(f"{k}={a!r} (run has {b!r})" for k, (a, b) in diff.items()),
                          params=("resume",))


def train(cfg: TrainConfig, out: str | os.PathLike, *, resume: bool = False) -> dict[str, Any]:
    """Train per ``cfg`` into run directory ``out``; returns the final metrics (metrics.json).

    Args:
        cfg: the run's settings (``None`` fields are filled from the presets).
        out: the run directory to create, or to continue with ``resume``.
        resume: continue the run in ``out`` from its last checkpoint (same settings).

    Returns:
        The final metrics: test accuracy of the trained and the deployed model, their largest
        output difference, parameter counts, time.

    Raises:
        ValueError: a bad setting (the message names it), or ``out`` already holds a run
            (``resume`` not given) or another run's settings.
    """
    cfg = resolve(cfg)
    run = RunDir(out)
    _check_out(run, cfg, resume)
    if resume:  # what the run took from its images (folder normalisation) is kept as it was
        saved = run.read_config()
        for name in AUTO_FIELDS:
            if getattr(cfg, name) is None:
                setattr(cfg, name, getattr(saved, name))
    done = run.read_metrics()
    if done is not None:
        log.info("%s is finished; nothing to resume", run.path)
        return done
    info = dist_utils.setup(cfg.device)
    try:
        return _train(cfg, run, resume, info)
    finally:
        dist_utils.teardown(info)


def _schedule(cfg: TrainConfig, steps_per_epoch: int):
    """The learning-rate factor per step: linear warm-up, then cosine to zero."""
    total = cfg.schedule[0] * steps_per_epoch
    warm = cfg.warmup_epochs * steps_per_epoch

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, total - warm)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _rng_state(device: torch.device) -> dict[str, Any]:
    """The RNG states a bit-exact resume needs."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Restore ``_rng_state``'s states."""
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _tensorboard(run: RunDir, info: dist_utils.DistInfo):
    """A TensorBoard writer on rank 0 when tensorboard is installed, else None."""
    if not info.main:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard not installed: optional
        return None
    return SummaryWriter(str(run.tensorboard_dir))


def _build_model(cfg: TrainConfig, info: dist_utils.DistInfo, fresh: bool) -> nn.Module:
    """The training model on its device (channels_last unless disabled, SyncBatchNorm if
    asked); a fresh start from trained weights loads them (a resumed run loads its checkpoint
    instead, so the source may be gone by then)."""
    base = build_base_model(cfg)
    if cfg.init_from is not None and fresh:
        _warn_kept_head(cfg, info)
        state = read_source(cfg.init_from)
        for note in load_source(base, state, num_classes=cfg.data_shape[1],
                                new_head=cfg.new_head, src=cfg.init_from):
            if info.main:
                log.info("%s", note)
    model = build_training_model(cfg, base).to(info.device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.sync_bn and info.enabled:
        if info.device.type == "cpu":
            raise InputError("sync_bn needs GPUs (PyTorch's SyncBatchNorm does not run on CPU); "
                             "without it BN statistics are averaged across ranks before "
                             "evaluation and deployment", params=("sync_bn",))
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def _warn_kept_head(cfg: TrainConfig, info: dist_utils.DistInfo) -> None:
    """Say so when a run-directory source was trained on other classes and its classifier will
    be kept because the class count fits."""
    src = RunDir(str(cfg.init_from))
    if cfg.new_head or not info.main or not src.config_file.is_file():
        return
    theirs = src.read_config()
    if theirs.classes != cfg.classes and theirs.num_classes == cfg.data_shape[1]:
        log.warning("init_from: the source was trained on classes %s, this run on %s; its "
                    "classifier fits and is kept (new_head=True re-initialises it)",
                    theirs.classes or "all", cfg.classes or "all")


def _optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """SGD (momentum, optionally Nesterov) or AdamW, with the run's lr and weight decay."""
    _, lr, weight_decay = cfg.schedule
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=cfg.momentum,
                           nesterov=cfg.nesterov, weight_decay=weight_decay)


def _setup(cfg: TrainConfig, run: RunDir, info: dist_utils.DistInfo, fresh: bool) -> _Run:
    """Data, model, optimizer and schedule (seeded); ``fresh``: not resumed from a checkpoint.

    The run directory is created once data and model are ready, so bad input leaves none.
    """
    torch.manual_seed(cfg.seed)
    data = open_data(cfg)
    tr = train_split(cfg, info.device, rank=info.rank, world=info.world, data=data)
    te = test_split(cfg, info.device, data=data)
    fill_data_fields(cfg, tr, data)
    model = _build_model(cfg, info, fresh)
    _check_input_size(model, cfg, info.device)
    if info.main:
        run.prepare()
    opt = _optimizer(cfg, model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(cfg, len(tr.loader)))
    return _Run(cfg, run, info, tr, te, model, opt, sched, count_params(model))


def _check_input_size(model: nn.Module, cfg: TrainConfig, device: torch.device) -> None:
    """One image of the run's shape through the model (eval mode, no grad): a network that
    shrinks it to nothing is one clear error before anything is written, not a crash."""
    from ..analysis.cost import eval_mode

    c, _, size = cfg.data_shape
    try:
        with torch.no_grad(), eval_mode(model):
            model(torch.zeros(1, c, size, size, device=device))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{cfg.model} cannot take {c}x{size}x{size} images ({first}); give "
                         f"larger images (--image-size for an image folder)",
                         params=("image_size",)) from exc


def _restore(r: _Run) -> None:
    """Load the checkpoint into model, optimizer, schedule and RNG."""
    state = r.run.load_checkpoint(map_location=r.info.device)
    try:
        r.model.load_state_dict(state["model"])
        r.opt.load_state_dict(state["optimizer"])
        r.sched.load_state_dict(state["scheduler"])
        r.start_epoch, r.seconds = int(state["epoch"]), float(state.get("seconds", 0.0))
        _set_rng_state(state["rng"], r.info.device)
        r.init_test_acc = state.get("init_test_acc")
    except (KeyError, RuntimeError, ValueError) as exc:
        raise CheckpointError(f"{r.run.checkpoint_file} does not match this run ({exc})") from exc
    log.info("resuming %s after epoch %d", r.run.path, r.start_epoch)


def _train(cfg: TrainConfig, run: RunDir, resume: bool, info: dist_utils.DistInfo
           ) -> dict[str, Any]:
    """Set up (or restore), train the remaining epochs, deploy."""
    fresh = not (resume and run.has_checkpoint)
    r = _setup(cfg, run, info, fresh)
    if not fresh:
        _restore(r)
    else:
        torch.manual_seed(cfg.seed + info.rank)
        r.init_test_acc, _ = evaluate(r.model, r.test.loader, amp=cfg.amp)
    if info.main:
        run.write_config(cfg)
        run.trim_metrics(r.start_epoch)
    net = r.model
    if info.enabled:
        net = nn.parallel.DistributedDataParallel(
            r.model, device_ids=[info.device.index] if info.device.type == "cuda" else None)
    net, r.eval_net = _compiled(cfg, net, r.model)
    tb = _tensorboard(run, info)
    try:
        for epoch in range(r.start_epoch, cfg.schedule[0]):
            _epoch(r, net, epoch, tb)
    finally:
        if tb is not None:
            tb.close()
    return _finish(r)


def _compiled(cfg: TrainConfig, net: nn.Module, model: nn.Module
              ) -> tuple[nn.Module, nn.Module]:
    """(training net, evaluation net): under ``torch.compile`` with --compile, else as given.

    The uncompiled ``model`` stays what checkpoints, deploys and measures. Static shapes and a
    fresh Dynamo cache make the kernels depend only on this run (a resumed run gets the same),
    and keep the recompile limit per run when a study trains many models in one process.
    """
    if not cfg.compile:
        return net, model
    torch._dynamo.reset()
    eager_ceil_mode_avg_pools(model)
    compiled = cast(nn.Module, torch.compile(net, dynamic=False))
    evaluator = compiled if net is model else cast(nn.Module, torch.compile(model, dynamic=False))
    return compiled, evaluator


def _diverged(r: _Run, epoch: int, why: str) -> NonFiniteError:
    """The one-line error of a diverged run, and what to do next."""
    return NonFiniteError(f"training diverged at epoch {epoch + 1} ({why}); lower the "
                          f"learning rate (lr) and start again in a new output directory, or "
                          f"delete {r.run.path}", params=("lr",))


def _check_diverged(r: _Run, loss: float, epoch: int) -> None:
    """Stop on a non-finite or exploding loss, or non-finite weights (on every rank alike)."""
    why = ""
    if not math.isfinite(loss):
        why = "loss is not finite"
    elif loss > DIVERGED_LOSS:
        why = f"mean training loss {loss:.3g} > {DIVERGED_LOSS:g}"
    elif not all(torch.isfinite(t).all() for t in r.model.state_dict().values()
                 if t.is_floating_point()):
        why = "weights are not finite"
    if dist_utils.any_rank(bool(why), r.info):
        raise _diverged(r, epoch, why or "on another rank")


def _epoch(r: _Run, net: nn.Module, epoch: int, tb) -> None:
    """Train one epoch, evaluate, write the metrics line and the checkpoint (rank 0)."""
    cfg, info = r.cfg, r.info
    t0 = time.perf_counter()
    r.train.loader.set_epoch(epoch)
    loss, acc, ips = _train_epoch(net, r, epoch)
    _check_diverged(r, loss, epoch)
    dist_utils.average_bn_stats(r.model, info)
    try:
        test_acc, _ = evaluate(r.eval_net or r.model, r.test.loader, amp=cfg.amp,
                               check_finite=True)
    except FloatingPointError as exc:
        raise _diverged(r, epoch, "test outputs are not finite") from exc
    r.seconds += time.perf_counter() - t0
    row = {"epoch": epoch + 1, "train_loss": loss, "train_acc": acc, "test_acc": test_acc,
           "lr": r.opt.param_groups[0]["lr"], "images_per_s": ips, "seconds": r.seconds}
    if info.main:
        r.run.append_metrics(row)
        r.run.save_checkpoint({
            "model": r.model.state_dict(), "optimizer": r.opt.state_dict(),
            "scheduler": r.sched.state_dict(), "epoch": epoch + 1, "seconds": r.seconds,
            "rng": _rng_state(info.device), "config": cfg.to_json(),
            "init_test_acc": r.init_test_acc})
        if tb is not None:
            for k, v in row.items():
                if k != "epoch":
                    tb.add_scalar(k, v, epoch + 1)
        log.info("%s epoch %d/%d  loss %.4f  train %.4f  test %.4f  %.0f img/s",
                 cfg.model, epoch + 1, cfg.epochs, loss, acc, test_acc, ips)
    dist_utils.barrier(info)


def _autocast(cfg: TrainConfig, device: torch.device):
    """bf16 autocast on CUDA when --amp (the default), else nothing."""
    if cfg.amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _train_epoch(net: nn.Module, r: _Run, epoch: int) -> tuple[float, float, float]:
    """One pass over the training data; (mean loss, accuracy, images per second)."""
    cfg, device = r.cfg, r.info.device
    net.train()
    total_loss = torch.zeros((), device=device)
    correct = torch.zeros((), device=device)
    seen = 0
    desc = f"epoch {epoch + 1}/{cfg.epochs}"
    with Progress(len(r.train.loader), desc, enabled=r.info.main and not cfg.quiet) as bar:
        for x, y in r.train.loader:
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with _autocast(cfg, device):
                logits = net(x)
                loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
            r.opt.zero_grad(set_to_none=True)
            loss.backward()
            r.opt.step()
            r.sched.step()
            n = y.numel()
            total_loss += loss.detach() * n
            correct += (logits.detach().argmax(1) == y).sum()
            seen += n
            if bar.enabled:
                bar.update(n, loss=total_loss.item() / seen, acc=correct.item() / seen)
            else:
                bar.images += n
    return total_loss.item() / max(seen, 1), correct.item() / max(seen, 1), bar.images_per_second


def _finish(r: _Run) -> dict[str, Any]:
    """Deploy, check the deployed model against the trained one (exact float32), save both."""
    cfg, info = r.cfg, r.info
    agree = dist_utils.ranks_agree(r.model, info)
    metrics: dict[str, Any] = {}
    if info.main:
        r.model.eval()
        folded = deploy(r.model, fold_bn=True)  # minimal form, for base and ACNet alike
        try:
            check = compare_models(r.model, folded, r.test.loader, device=info.device)
        except FloatingPointError as exc:
            raise _diverged(r, cfg.schedule[0] - 1, "test outputs are not finite") from exc
        deployed = deploy(r.model)  # the original architecture (a stock model loads it)
        r.run.save_deployed(deployed, cfg)
        metrics = {
            **check, "params_train": r.params_train,
            "params_deployed": count_params(deployed), "params_folded": count_params(folded),
            "epochs": cfg.epochs, "seconds": r.seconds, "ranks": info.world,
            "ranks_consistent": agree, "model": cfg.model, "block": cfg.block,
            "dataset": cfg.dataset, "seed": cfg.seed, "train_images": r.train.images,
            "init_test_acc": r.init_test_acc,
        }
        r.run.write_metrics(metrics)
        log.info("%s/%s: test acc %.4f, deployed %.4f (max |diff| %.2e, %.2f%% same "
                 "predictions), params %d trained -> %d deployed", cfg.model, cfg.block,
                 check["test_acc"], check["deployed_test_acc"], check["max_abs_diff_deploy"],
                 100 * check["prediction_agreement"], r.params_train, metrics["params_deployed"])
    dist_utils.barrier(info)
    return metrics
