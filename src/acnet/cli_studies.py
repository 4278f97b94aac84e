"""CLI subcommands for the studies and the benchmark: analyze, reproduce, bench (parse, print)."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from .bench import format_table, run_bench, save
from .errors import InputError
from .experiments import PRESET_NAMES, reproduce, summary
from .runs import analyze_kernels, analyze_sparsity

__all__ = [
    "add_analyze",
    "add_bench",
    "add_reproduce",
    "cmd_analyze",
    "cmd_bench",
    "cmd_reproduce",
    "positive_int",
]


def _int_at_least(minimum: int, what: str) -> Callable[[str], int]:
    """An argparse type: an integer >= ``minimum``, described as ``what`` in its errors."""
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {v}")
        return v
    return parse


positive_int = _int_at_least(1, "a positive integer")
non_negative_int = _int_at_least(0, "an integer >= 0")


def _ratios(s: str) -> list[float]:
    """Parse --ratios (comma-separated numbers)."""
    try:
        return [float(v) for v in s.split(",") if v.strip()]
    except ValueError:
        raise InputError(f"--ratios must be comma-separated numbers, got {s!r}") from None


def _seeds(s: str) -> tuple[int, ...]:
    """Parse --seeds (comma-separated integers)."""
    try:
        return tuple(int(v) for v in s.split(",") if v.strip())
    except ValueError:
        raise InputError(f"--seeds must be comma-separated integers, got {s!r}") from None


def _batches(s: str) -> tuple[int, ...]:
    """Parse bench --batch (comma-separated positive integers)."""
    try:
        values = tuple(int(v) for v in s.split(",") if v.strip())
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise InputError(f"--batch must be comma-separated positive integers, got {s!r}")
    return values


def add_analyze(p: argparse.ArgumentParser) -> None:
    """analyze's options."""
    p.add_argument("what", choices=["kernels", "sparsity"])
    p.add_argument("runs", nargs="+", help="run directories")
    p.add_argument("--out", help="figure (PNG) to write")
    p.add_argument("--json", help="kernels: also write the matrices as JSON")
    p.add_argument("--kernel-size", type=int, help="d of the d×d kernels, >= 2 (default: the "
                   "model's most common)")
    p.add_argument("--ratios", default="0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1",
                   help="sparsity: comma-separated fractions")
    p.add_argument("--draws", type=int, default=3, help="sparsity: random masks per ratio")
    p.add_argument("--test-limit", type=int, help="sparsity: first N test images")


def cmd_analyze(a: argparse.Namespace) -> int:
    """Print kernel magnitude matrices or sparsity curves of runs."""
    if a.what == "kernels":
        mats = analyze_kernels(a.runs, a.kernel_size, figure=a.out, json_path=a.json)
        for run, m in mats.items():
            print(f"{run}:")
            for row in m.tolist():
                print("  " + "  ".join(f"{v:.3f}" for v in row))
        if a.out:
            print(f"wrote {a.out}")
        return 0
    results = analyze_sparsity(a.runs, _ratios(a.ratios), a.draws, test_limit=a.test_limit,
                               figure=a.out)
    for run, study in results.items():
        for pattern, cur in study.items():
            print(f"{run} {pattern}: " + " ".join(f"{m * 100:.1f}" for m in cur["mean"]))
    if a.out:
        print(f"wrote {a.out} and its .json")
    return 0


def add_reproduce(p: argparse.ArgumentParser) -> None:
    """reproduce's options."""
    p.add_argument("--preset", required=True, choices=list(PRESET_NAMES))
    p.add_argument("--out", required=True, help="study directory (rerunning resumes)")
    p.add_argument("--seeds", help="comma-separated seeds instead of the preset's")
    p.add_argument("--jobs", type=positive_int, default=1,
                   help="runs trained at once, each in its own process with its share of the "
                        "CPU threads, the main comparison first and within each part the "
                        "longest expected run first (default 1; 2 is faster on a 2-core CPU)")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: write the report of the runs finished so far")
    p.add_argument("--device", default="auto")
    p.add_argument("--data-dir")
    c = p.add_argument_group("compare (--preset compare: your model and data)")
    c.add_argument("--model", help="the model to compare: a built-in, tv:NAME or timm:NAME")
    c.add_argument("--dataset", help="fashion-mnist (default), cifar10, cifar100, folder "
                   "(--data-dir DIR: DIR/train and DIR/val, or DIR/<class>/), imagenet")
    c.add_argument("--epochs", type=positive_int, help="epochs of every form (default 10)")
    c.add_argument("--forms", help="comma-separated forms (default base,acb,sub4; also sub8, "
                   "online); the baseline is always included")
    c.add_argument("--batch-size", type=positive_int, help="default 128")
    c.add_argument("--lr", type=float, help="default: the model's preset")
    c.add_argument("--optimizer", choices=["sgd", "adamw"])
    c.add_argument("--weight-decay", type=float)
    c.add_argument("--image-size", type=positive_int, help="folder datasets: crop side")
    c.add_argument("--val-fraction", type=float, help="folder datasets in DIR/<class>/ "
                   "layout: the share held out for testing (default 0.1)")
    c.add_argument("--init-from", help="fine-tune every form from these weights")
    c.add_argument("--new-head", action="store_true", default=None,
                   help="with --init-from: a fresh classifier")
    c.add_argument("--train-limit", type=positive_int, help="train on N images")
    c.add_argument("--test-limit", type=positive_int, help="test on N images")


COMPARE_ARGS = ("model", "dataset", "epochs", "forms", "batch_size", "lr", "optimizer",
                "weight_decay", "image_size", "val_fraction", "init_from", "new_head",
                "train_limit", "test_limit")


def cmd_reproduce(a: argparse.Namespace) -> int:
    """Run a study; print its main result and deployment check."""
    settings = {k: getattr(a, k) for k in COMPARE_ARGS if getattr(a, k, None) is not None}
    path = reproduce(a.preset, a.out, device=a.device, data_dir=a.data_dir,
                     command=a.command_line, seeds=_seeds(a.seeds) if a.seeds else None,
                     jobs=a.jobs, train_runs=not a.report_only, settings=settings or None)
    print(summary(a.out))
    print(f"\nreport: {path}")
    return 0


def add_bench(p: argparse.ArgumentParser) -> None:
    """bench's options."""
    p.add_argument("--models", default="resnet20,resnet56,cifar_quick",
                   help="comma-separated models to time (default: %(default)s)")
    p.add_argument("--repeats", type=positive_int, default=10,
                   help="timed rounds, every variant once per round (default: %(default)s)")
    p.add_argument("--warmup", type=non_negative_int, default=2,
                   help="untimed rounds first (default: %(default)s)")
    p.add_argument("--batch", default="128", help="training batch size(s), comma-separated")
    p.add_argument("--device", help="cpu, cuda or cpu,cuda (default: all available)")
    p.add_argument("--no-conversion", action="store_true", help="skip the resnet50 timing")
    p.add_argument("--compile", action="store_true",
                   help="also time base, ACB, online ACB and sub-batch 1/4 under "
                        "torch.compile")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false",
                   help="train in NCHW (default: channels_last, as acnet train does)")
    p.add_argument("--out", help="JSON file to write")


def cmd_bench(a: argparse.Namespace) -> int:
    """Run the benchmark suite; print its tables."""
    res = run_bench(models=tuple(m for m in a.models.split(",") if m), repeats=a.repeats,
                    warmup=a.warmup, batch=_batches(a.batch), conversion=not a.no_conversion,
                    devices=tuple(a.device.split(",")) if a.device else None,
                    compile=a.compile, channels_last=a.channels_last)
    res["command"] = a.command_line
    print(format_table(res))
    if a.out:
        save(res, a.out)
        print(f"wrote {a.out}")
    return 0
