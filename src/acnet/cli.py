"""The ``acnet`` command line: parses arguments, calls the Python API, prints the results."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import shlex
import sys
from collections.abc import Callable, Sequence
from typing import NamedTuple, NoReturn

from . import __version__
from .cli_studies import (
    add_analyze,
    add_bench,
    add_reproduce,
    cmd_analyze,
    cmd_bench,
    cmd_reproduce,
    positive_int,
)
from .data import DATASETS, TRANSFORMS
from .errors import ACNetError, InputError
from .options import BRANCH_INITS, TRAIN_OPTIONS, ACBOptions
from .runs import deploy_run, evaluate_run, export_int8_run, export_run
from .train import TrainConfig, train
from .train.config import OPTIMIZERS

log = logging.getLogger("acnet")

# what acnet raises for bad input, files or environment, and what the OS raises for bad paths:
# one line and exit code 2; anything else is a bug and keeps its traceback
USER_ERRORS = (ACNetError, FileNotFoundError, FileExistsError, PermissionError,
               IsADirectoryError, NotADirectoryError)

DEFAULTS = TrainConfig()  # the one place train's defaults live; --help quotes them
ACB_FIELDS = {f.name: f for f in dataclasses.fields(ACBOptions)}


def _default(name: str) -> str:
    """Help text quoting TrainConfig's default for ``name``."""
    return f"default {getattr(DEFAULTS, name)}"


def add_train(p: argparse.ArgumentParser) -> None:
    """train's options; their dest names are TrainConfig fields, absent unless given."""
    p.add_argument("--model", help="cifar_quick, vgg16, resnet20/56/110, wrn16_8, densenet40, "
                   f"tv:NAME, timm:NAME ({_default('model')})")
    p.add_argument("--dataset", help=f"{', '.join(DATASETS)} ({_default('dataset')})")
    p.add_argument("--block", choices=["acb", "base"], help=_default("block"))
    p.add_argument("--epochs", type=positive_int,
                   help="default: the model's preset, the official recipe's: 150 for "
                        "cifar_quick, 400 for the other CIFAR models, 90 for tv:/timm: models")
    p.add_argument("--batch-size", type=positive_int, help=_default("batch_size"))
    p.add_argument("--lr", type=float, help="default: the model's preset")
    p.add_argument("--momentum", type=float, help=_default("momentum"))
    p.add_argument("--nesterov", action="store_true")
    p.add_argument("--weight-decay", type=float, help="default: the model's preset")
    p.add_argument("--warmup-epochs", type=int, help=_default("warmup_epochs"))
    p.add_argument("--label-smoothing", type=float, help=_default("label_smoothing"))
    p.add_argument("--gamma-init", type=float, help="initial BN scale in ACBlocks (acb only; "
                   "default 1/3 with branch BN)")
    p.add_argument("--seed", type=int, help=_default("seed"))
    p.add_argument("--train-limit", type=positive_int, help="train on the first N images")
    p.add_argument("--test-limit", type=positive_int, help="evaluate on the first N test images")
    p.add_argument("--optimizer", choices=list(OPTIMIZERS), help=f"{_default('optimizer')}; "
                   f"adamw's default lr is 1e-3 and weight decay 0.05")
    p.add_argument("--classes", type=_class_list, help="train and test on these classes only, "
                   "relabelled 0..k-1 in the order given (e.g. 5,6,7,8,9)")
    p.add_argument("--out", required=True, help="run directory to create (or resume)")
    p.add_argument("--resume", action="store_true", default=False,
                   help="continue the run in --out")
    p.add_argument("--device", help=f"auto, cpu or cuda ({_default('device')})")
    p.add_argument("--no-amp", dest="amp", action="store_false", help="no bf16 autocast on CUDA")
    p.add_argument("--no-augment", dest="augment", action="store_false",
                   help="no random crop or flip of training images (in-memory datasets)")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false",
                   help="train in NCHW memory format (channels_last is faster on CPU and GPU)")
    p.add_argument("--compile", action="store_true", help="train and evaluate under "
                   "torch.compile (checkpoints, deploy and export use the plain model)")
    p.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm under DDP")
    p.add_argument("--data-dir", help="where the dataset is (default: the usual places)")
    p.add_argument("--download", action="store_true", help="download the dataset if missing")
    p.add_argument("--workers", type=int, help=f"DataLoader workers of folder and imagenet "
                   f"({_default('workers')})")
    d = p.add_argument_group("image folders (--dataset folder or imagenet)")
    d.add_argument("--image-size", type=positive_int, help="side of the square crops (default: "
                   "imagenet 224; folder the images' median shorter side, at most 224)")
    d.add_argument("--val-fraction", type=_fraction, help="DIR/<class>/ layout: the share of "
                   f"each class held out for testing, by a fixed seed ({_default('val_fraction')})")
    d.add_argument("--mean", type=_numbers, help="per-channel normalisation mean, e.g. "
                   "0.5,0.5,0.5 (default: from the training images; imagenet's for imagenet)")
    d.add_argument("--std", type=_numbers, help="per-channel normalisation std (default: as "
                   "--mean)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    f = p.add_argument_group("fine-tuning")
    f.add_argument("--init-from", metavar="SRC", help="start from trained weights: a run "
                   "directory, a deployed .safetensors, or a state_dict file (.pt/.pth/"
                   ".bin/.ckpt/.safetensors) of the same architecture; with --block acb the "
                   "ACNet starts as exactly that model")
    f.add_argument("--new-head", action="store_true", help="re-initialise the classifier even "
                   "when its shape fits (transfer to other classes)")
    f.add_argument("--branch-init", choices=list(BRANCH_INITS), help="how the new ACB branches "
                   "start: zero (they add nothing) or small (random, the square kernel "
                   f"compensating: DyRep) ({_default('branch_init')})")
    g = p.add_argument_group("ablation")
    for name in TRAIN_OPTIONS:
        if name == "gamma_init":
            continue
        field = ACB_FIELDS[name]
        text = field.metadata["help"]
        if field.default is True:
            g.add_argument(f"--no-{name.replace('_', '-')}", dest=name, action="store_false",
                           help=field.metadata["without"])
        elif field.default is False:
            g.add_argument(f"--{name.replace('_', '-')}", dest=name, action="store_true",
                           help=text)
        elif name == "sub_batch":
            g.add_argument("--sub-batch", type=_sub_batch_arg, metavar="N|F",
                           help=f"{text} ({_default(name)})")
        else:
            g.add_argument(f"--{name.replace('_', '-')}", help=f"{text} ({_default(name)})")


def _sub_batch_arg(s: str) -> int | float:
    """argparse type of --sub-batch: a number of images (32) or a fraction of the batch (0.25)."""
    try:
        return int(s)
    except ValueError:
        pass
    try:
        return float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of images (e.g. 32) or a fraction "
                                         f"of the batch (e.g. 0.25), got {s!r}") from None


def _fraction(s: str) -> float:
    """argparse type of --val-fraction: a number in (0, 1)."""
    try:
        v = float(s)
    except ValueError:
        v = float("nan")
    if not 0 < v < 1:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {s!r}")
    return v


def _numbers(s: str) -> list[float]:
    """argparse type of --mean/--std: comma-separated numbers."""
    try:
        return [float(v) for v in s.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}"
                                         ) from None


def _class_list(s: str) -> list[int]:
    """argparse type of --classes: comma-separated class indices."""
    try:
        return [int(v) for v in s.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated class indices, got {s!r}"
                                         ) from None


def flag_of(param: str) -> str:
    """The command-line option that sets the parameter ``param``."""
    field = ACB_FIELDS.get(param)
    off = field is not None and field.default is True
    off = off or param in ("augment", "amp", "channels_last")
    if param in _FLAG_NAMES:
        return _FLAG_NAMES[param]
    return f"--{'no-' if off else ''}{param.replace('_', '-')}"


_FLAG_NAMES = {"onnx_path": "--onnx", "devices": "--device"}  # flag is not the name


def config_from_args(a: argparse.Namespace) -> TrainConfig:
    """The TrainConfig of the options given on the command line (the rest: its defaults)."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in vars(a).items() if k in fields})


def cmd_train(a: argparse.Namespace) -> int:
    """Train (or resume) a run; print its final metrics as JSON."""
    m = train(config_from_args(a), a.out, resume=a.resume)
    if m:
        print(json.dumps({k: m[k] for k in ("init_test_acc", "test_acc", "deployed_test_acc",
                                            "params_train", "params_deployed",
                                            "max_abs_diff_deploy") if k in m}))
    return 0


def add_eval(p: argparse.ArgumentParser) -> None:
    """eval's options."""
    p.add_argument("run", help="run directory or deployed .safetensors file")
    p.add_argument("--dataset", help="default: the dataset it was trained on")
    p.add_argument("--transform", choices=list(TRANSFORMS), default="none")
    p.add_argument("--data-dir")
    p.add_argument("--test-limit", type=positive_int,
                   help="first N test images (default: the run's own --test-limit)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])


def cmd_eval(a: argparse.Namespace) -> int:
    """Print a run's test accuracy as JSON."""
    print(json.dumps(evaluate_run(a.run, dataset=a.dataset, transform=a.transform,
                                  data_dir=a.data_dir, test_limit=a.test_limit,
                                  device=a.device)))
    return 0


def add_deploy(p: argparse.ArgumentParser) -> None:
    """deploy's options."""
    p.add_argument("run", help="run directory")


def cmd_deploy(a: argparse.Namespace) -> int:
    """Re-deploy a run from its checkpoint; print the report."""
    out, report, diff = deploy_run(a.run)
    print(report)
    print(f"wrote {out} (max |trained - deployed| on a random batch: {diff:.3g})")
    return 0


def add_export(p: argparse.ArgumentParser) -> None:
    """export's options."""
    p.add_argument("run", help="run directory or deployed .safetensors file")
    p.add_argument("--onnx", required=True, help="output .onnx file")
    p.add_argument("--int8", action="store_true",
                   help="also write FILE.int8.onnx (static INT8, onnxruntime), evaluate both on "
                        "the test set, results in RUN/export.json")
    p.add_argument("--calibration-images", type=positive_int,
                   help="seeded training images that calibrate --int8 (default 512)")


def cmd_export(a: argparse.Namespace) -> int:
    """Export a run to ONNX; print the file and the measured error."""
    if a.int8:
        return _export_int8(a)
    if a.calibration_images is not None:
        raise InputError("--calibration-images needs --int8")
    result = export_run(a.run, a.onnx)
    print(f"wrote {result['onnx']}: onnxruntime matches PyTorch (relative max error "
          f"{result['relative_error']:.2g})")
    return 0


def _export_int8(a: argparse.Namespace) -> int:
    """export --int8: fp32 and INT8 files, both evaluated; print the accuracies."""
    r = export_int8_run(a.run, a.onnx, calibration_images=a.calibration_images or 512)
    print(f"wrote {r['onnx']} and {r['int8_onnx']} ({r['calibration_images']} calibration "
          f"images, {r['calibration_method']})")
    print(f"test accuracy on {r['test_images']} images: fp32 {r['onnx_test_acc']:.4f}, "
          f"INT8 {r['int8_test_acc']:.4f}, identical predictions {r['int8_agreement']:.2%}")
    return 0


class Command(NamedTuple):
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# every subcommand, registered here and only here
COMMANDS: dict[str, Command] = {
    "train": Command("train a baseline or an ACNet, deploy it at the end", add_train, cmd_train),
    "eval": Command("evaluate a run's deployed model (robustness transforms)", add_eval,
                    cmd_eval),
    "deploy": Command("fuse a run's ACBlocks: write deployed.safetensors", add_deploy,
                      cmd_deploy),
    "export": Command("export a run's deployed model to ONNX (checked)", add_export, cmd_export),
    "analyze": Command("kernel magnitude matrices or sparsity curves of runs", add_analyze,
                       cmd_analyze),
    "reproduce": Command("run a study's matrix and write its report", add_reproduce,
                         cmd_reproduce),
    "bench": Command("training cost of each ACB form and deployed inference, as ratios; "
                     "compute ops per block", add_bench,
                     cmd_bench),
}


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (and a pointer to --help) instead of the usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``acnet`` parser with every subcommand of ``COMMANDS``."""
    parser = _Parser(
        prog="acnet", description="ACNet: train CNNs with Asymmetric Convolution Blocks, "
                                  "deploy the original architecture.")
    parser.add_argument("--version", action="version", version=f"acnet {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, cmd in COMMANDS.items():
        # train: options not given stay absent, so TrainConfig's defaults apply
        default = argparse.SUPPRESS if name == "train" else None
        cmd.add_arguments(sub.add_parser(name, help=cmd.help, description=cmd.help,
                                         argument_default=default))
    return parser


def _parse(argv: list[str]) -> argparse.Namespace:
    """Parse ``argv``; an unknown option is reported by its subcommand's parser."""
    parser = build_parser()
    a, extra = parser.parse_known_args(argv)
    if extra:
        sub = next(act for act in parser._actions if isinstance(act, argparse._SubParsersAction))
        sub.choices[a.command].error(f"unrecognized arguments: {' '.join(extra)}")
    return a


def _given(flag: str, argv: list[str]) -> bool:
    """Whether ``flag`` (or its --no- twin) is on the command line."""
    bare = flag.removeprefix("--no-").removeprefix("--")
    return any(arg.split("=", 1)[0] in (f"--{bare}", f"--no-{bare}") for arg in argv)


def _message(exc: BaseException) -> str:
    """The first line of an error; for one re-raised from a DataLoader worker ("Caught X in
    DataLoader worker process N", then the worker's traceback), the worker's own message."""
    lines = str(exc).strip().splitlines()
    if not lines:
        return type(exc).__name__
    if "in DataLoader worker process" in lines[0]:
        found = re.match(r"[\w.]+: (.+)$", lines[-1].strip())
        if found:
            return found.group(1)
    return lines[0]


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``acnet`` command; ``argv`` defaults to this process's command line."""
    argv = list(sys.argv[1:] if argv is None else argv)
    a = _parse(argv)
    a.command_line = "acnet " + shlex.join(argv)
    level = logging.DEBUG if a.verbose else logging.INFO
    if int(os.environ.get("RANK", "0")) != 0:
        level = logging.WARNING
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr)
    try:
        return COMMANDS[a.command].run(a)
    except KeyboardInterrupt:
        print("acnet: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as exc:
        if a.verbose:
            raise
        msg = _message(exc)
        params = getattr(exc, "params", ())
        if params:
            given = [f"set by {f}" if _given(f, argv) else f"{f}'s default"
                     for f in map(flag_of, params)]
            msg += f" ({', '.join(given)})"
        print(f"acnet {a.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
