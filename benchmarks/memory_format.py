"""Training step in NCHW vs channels_last (NHWC) on this machine, interleaved in one process.

Usage: .venv/bin/python benchmarks/memory_format.py [--repeats 15] [--out FILE.json]
Fashion-MNIST shapes (batch 128, 1x28x28), the study's models, baseline / ACNet / online ACNet;
prints a markdown table of median milliseconds per step and the NHWC speed-up per variant.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.nn.functional as F

from acnet import convert
from acnet._env import machine
from acnet.analysis.cost import time_interleaved
from acnet.models import build_model

VARIANTS = {"base": None, "acb": {}, "online": {"branch_bn": False, "branch_scale": True}}


def step_fn(model: torch.nn.Module, fmt: torch.memory_format, batch: int):
    """One SGD step of ``model`` in memory format ``fmt`` as a closure."""
    model = model.to(memory_format=fmt).train()
    x = torch.randn(batch, 1, 28, 28).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (batch,))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def measure(name: str, batch: int, repeats: int) -> dict[str, float]:
    """Median ms per step of every variant in both formats (one interleaved timing)."""
    fns = {}
    for variant, opts in VARIANTS.items():
        for fmt_name, fmt in (("nchw", torch.contiguous_format), ("nhwc", torch.channels_last)):
            torch.manual_seed(0)
            m = build_model(name, in_channels=1, num_classes=10)
            if opts is not None:
                m = convert(m, preserve=False, inplace=True, **opts)
            fns[f"{variant}/{fmt_name}"] = step_fn(m, fmt, batch)
    return {k: v * 1e3 for k, v in time_interleaved(fns, repeats, 3).items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="cifar_quick,vgg16_quarter,resnet20")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--out")
    a = p.parse_args()
    res = {"machine": machine(), "threads": torch.get_num_threads(), "batch": a.batch,
           "repeats": a.repeats, "load_avg_before": os.getloadavg()[0], "ms": {}}
    print("| model | variant | NCHW ms | NHWC ms | NHWC speed-up |\n|---|---|---|---|---|")
    for name in a.models.split(","):
        ms = res["ms"][name] = measure(name, a.batch, a.repeats)
        for v in VARIANTS:
            nchw, nhwc = ms[f"{v}/nchw"], ms[f"{v}/nhwc"]
            print(f"| {name} | {v} | {nchw:.1f} | {nhwc:.1f} | {nchw / nhwc:.2f}x |", flush=True)
    res["load_avg_after"] = os.getloadavg()[0]
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
