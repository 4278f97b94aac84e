"""The ``acnet`` command line: a thin layer over the Python API."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence

from . import __version__
from .io import CheckpointError

log = logging.getLogger("acnet")

USER_ERRORS = (ValueError, TypeError, FileNotFoundError, FileExistsError, PermissionError,
               ImportError, FloatingPointError, CheckpointError)


def _positive(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a baseline or an ACNet, deploy it at the end",
                       description="Train --model on --dataset into --out (a run directory).")
    p.add_argument("--model", default="resnet20",
                   help="cifar_quick, vgg16, resnet20/56/110, wrn16_8, densenet40, tv:NAME, "
                        "timm:NAME (default resnet20)")
    p.add_argument("--dataset", default="fashion-mnist",
                   help="fashion-mnist (default), cifar10, cifar100, imagenet, synthetic")
    p.add_argument("--block", choices=["acb", "base"], default="acb")
    p.add_argument("--epochs", type=_positive, help="default: the model's preset")
    p.add_argument("--batch-size", type=_positive, default=128)
    p.add_argument("--lr", type=float, help="default: the model's preset")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--nesterov", action="store_true")
    p.add_argument("--weight-decay", type=float, help="default: the model's preset")
    p.add_argument("--warmup-epochs", type=int, default=0)
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--gamma-init", type=float, help="initial BN scale in ACBs (default 1/3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-limit", type=_positive, help="train on the first N images")
    p.add_argument("--test-limit", type=_positive, help="evaluate on the first N test images")
    p.add_argument("--out", required=True, help="run directory to create (or resume)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--no-amp", action="store_true", help="no bf16 autocast on CUDA")
    p.add_argument("--no-channels-last", action="store_true")
    p.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm under DDP")
    p.add_argument("--data-dir", help="where the dataset is (default: the usual places)")
    p.add_argument("--download", action="store_true", help="download the dataset if missing")
    p.add_argument("--workers", type=int, default=4, help="DataLoader workers (imagenet)")
    p.add_argument("--image-size", type=_positive, default=224, help="imagenet crop size")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    g = p.add_argument_group("ablation")
    g.add_argument("--no-horizontal", action="store_true", help="no 1xd branch")
    g.add_argument("--no-vertical", action="store_true", help="no dx1 branch")
    g.add_argument("--no-branch-bn", action="store_true", help="one BN after the summed kernels")
    g.add_argument("--position", choices=["center", "corner"], default="center")


def _config_from(a):
    from .train import TrainConfig

    return TrainConfig(
        model=a.model, dataset=a.dataset, block=a.block, epochs=a.epochs,
        batch_size=a.batch_size, lr=a.lr, momentum=a.momentum, nesterov=a.nesterov,
        weight_decay=a.weight_decay, warmup_epochs=a.warmup_epochs,
        label_smoothing=a.label_smoothing, seed=a.seed, train_limit=a.train_limit,
        test_limit=a.test_limit, device=a.device, amp=not a.no_amp,
        channels_last=not a.no_channels_last, horizontal=not a.no_horizontal,
        vertical=not a.no_vertical, branch_bn=not a.no_branch_bn, position=a.position,
        gamma_init=a.gamma_init, sync_bn=a.sync_bn, data_dir=a.data_dir, download=a.download,
        workers=a.workers, image_size=a.image_size, quiet=a.quiet)


def cmd_train(a) -> int:
    from .train import train

    cfg = _config_from(a)
    from .models import build_model  # fail fast on an unknown model, before touching --out

    if not (a.model.startswith(("tv:", "timm:"))):
        build_model(a.model, in_channels=1, num_classes=2)
    m = train(cfg, a.out, resume=a.resume)
    if m:
        print(json.dumps({k: m[k] for k in ("test_acc", "deployed_test_acc", "params_train",
                                            "params_deployed", "max_abs_diff_deploy")}))
    return 0


def cmd_eval(a) -> int:
    import torch

    from .data import DATASETS
    from .runs import load_deployed_model, open_run
    from .train import evaluate
    from .train.distributed import DistInfo
    from .train.engine import load_data

    cfg, _ = open_run(a.run)
    if a.dataset:
        if a.dataset not in DATASETS:
            raise ValueError(f"unknown dataset {a.dataset!r}; choose one of {', '.join(DATASETS)}")
        cfg.dataset = a.dataset
    if a.data_dir:
        cfg.data_dir = a.data_dir
    cfg.test_limit = a.test_limit
    cfg.train_limit = None
    cfg.batch_size = 1
    device = torch.device("cuda" if a.device == "cuda" else "cpu")
    data = load_data(cfg, DistInfo(device=device), transform=a.transform)
    if data.in_channels != cfg.in_channels or data.num_classes != cfg.num_classes:
        raise ValueError(f"{a.run} was trained on {cfg.in_channels}-channel images with "
                         f"{cfg.num_classes} classes; {cfg.dataset} has {data.in_channels} and "
                         f"{data.num_classes}")
    model = load_deployed_model(a.run, device=str(device))
    acc, _ = evaluate(model, data.test)
    print(json.dumps({"run": str(a.run), "dataset": cfg.dataset, "transform": a.transform,
                      "test_acc": acc}))
    return 0


def cmd_deploy(a) -> int:
    from .runs import deploy_run

    out, report, diff = deploy_run(a.run)
    print(report)
    print(f"wrote {out} (max |trained - deployed| on a random batch: {diff:.3g})")
    return 0


def cmd_export(a) -> int:
    from .export import export_onnx
    from .runs import load_deployed_model, open_run

    cfg, _ = open_run(a.run)
    model = load_deployed_model(a.run)
    size = cfg.input_size or 32
    err = export_onnx(model, a.onnx, (1, cfg.in_channels, size, size))
    print(f"wrote {a.onnx}: onnxruntime matches PyTorch (relative max error {err:.2g})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="acnet", description="ACNet: train CNNs with Asymmetric Convolution Blocks, "
                                  "deploy the original architecture.")
    parser.add_argument("--version", action="version", version=f"acnet {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train(sub)
    p = sub.add_parser("eval", help="evaluate a run's deployed model (robustness transforms)")
    p.add_argument("run", help="run directory or deployed .safetensors file")
    p.add_argument("--dataset", help="default: the dataset it was trained on")
    p.add_argument("--transform", choices=["none", "hflip", "vflip", "rot90"], default="none")
    p.add_argument("--data-dir")
    p.add_argument("--test-limit", type=_positive)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p = sub.add_parser("deploy", help="fuse a run's ACBlocks: write deployed.safetensors")
    p.add_argument("run", help="run directory")
    p = sub.add_parser("export", help="export a run's deployed model to ONNX (checked)")
    p.add_argument("run", help="run directory or deployed .safetensors file")
    p.add_argument("--onnx", required=True, help="output .onnx file")
    from .cli_studies import add_study_commands

    add_study_commands(sub)
    return parser


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "deploy": cmd_deploy, "export": cmd_export}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    level = logging.DEBUG if a.verbose else logging.INFO
    if rank != 0:
        level = logging.WARNING
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr)
    from .cli_studies import STUDY_COMMANDS

    handler = {**COMMANDS, **STUDY_COMMANDS}[a.command]
    try:
        return handler(a)
    except KeyboardInterrupt:
        print("acnet: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as exc:
        if a.verbose:
            raise
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"acnet {a.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
