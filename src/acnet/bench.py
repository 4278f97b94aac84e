"""Benchmark suite: ACB training cost vs the baseline, inference of the deployed model, conversion.

Timings are interleaved in one process (each repeat runs every variant once, in turn) and
reported as medians after warm-up; ratios to the baseline are the headline numbers.
"""

from __future__ import annotations

import copy
import json
import logging
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .block import ACBlock
from .convert import convert, deploy
from .models import build_model

log = logging.getLogger(__name__)

__all__ = ["StraightforwardACB", "run_bench", "format_table"]


class StraightforwardACB(nn.Module):
    """The official repo's ACB, kept as the comparison: three padded convs, three BNs, summed.

    Only for the geometry the paper's models use (odd d, padding d//2, centre position).
    """

    def __init__(self, block: ACBlock) -> None:
        super().__init__()
        d = block.kernel_size[0]
        p = d // 2
        kw = {"stride": block.stride, "groups": block.groups, "bias": False}
        c_in, c_out = block.in_channels, block.out_channels
        self.square = nn.Conv2d(c_in, c_out, d, padding=p, **kw)
        self.hor = nn.Conv2d(c_in, c_out, (1, d), padding=(0, p), **kw)
        self.ver = nn.Conv2d(c_in, c_out, (d, 1), padding=(p, 0), **kw)
        self.bn_s, self.bn_h, self.bn_v = (nn.BatchNorm2d(c_out) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn_s(self.square(x)) + self.bn_h(self.hor(x)) + self.bn_v(self.ver(x))


def _straightforward(model: nn.Module) -> nn.Module:
    model = copy.deepcopy(model)
    for name, m in list(model.named_modules()):
        if isinstance(m, ACBlock):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, StraightforwardACB(m))
    return model


def _interleaved(fns: dict[str, Callable[[], None]], repeats: int, warmup: int,
                 sync: Callable[[], None]) -> dict[str, float]:
    for _ in range(warmup):
        for f in fns.values():
            f()
    sync()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            sync()
            t = time.perf_counter()
            f()
            sync()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def _sync_for(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def bench_training(model_name: str, device: torch.device, batch: int, repeats: int, warmup: int,
                   image: int = 32) -> dict[str, Any]:
    """Median training-step time (forward, backward, SGD) of each variant, and ratios."""
    torch.manual_seed(0)
    base = build_model(model_name, in_channels=3, num_classes=10)
    variants = {
        "base": base,
        "acb": convert(base, preserve=False),
        "acb_no_branch_bn": convert(base, preserve=False, branch_bn=False),
    }
    variants["straightforward_acb"] = _straightforward(variants["acb"])
    x = torch.randn(batch, 3, image, image, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    fns, peak = {}, {}
    for name, m in variants.items():
        m = m.to(device).train()
        opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)

        def step(m=m, opt=opt):
            loss = F.cross_entropy(m(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        fns[name] = step
        if device.type == "cuda":
            step()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(device)
            step()
            torch.cuda.synchronize()
            peak[name] = torch.cuda.max_memory_allocated(device) / 2**20
    med = _interleaved(fns, repeats, warmup, _sync_for(device))
    out = {"model": model_name, "batch": batch, "ms": {k: v * 1e3 for k, v in med.items()},
           "ratio": {k: v / med["base"] for k, v in med.items()}}
    if peak:
        out["peak_mib"] = peak
    return out


def bench_inference(model_name: str, device: torch.device, batch: int, repeats: int,
                    warmup: int) -> dict[str, Any]:
    """Eval latency: baseline (conv-BN folded) vs ACNet deployed (fold_bn) vs unfused ACNet."""
    torch.manual_seed(0)
    base = build_model(model_name, in_channels=3, num_classes=10).eval()
    acb = convert(base, preserve=False).eval()
    variants = {"base": deploy(base, fold_bn=True), "acnet_deployed": deploy(acb, fold_bn=True),
                "acnet_unfused": acb}
    x = torch.randn(batch, 3, 32, 32, device=device)
    fns = {}
    for name, m in variants.items():
        m = m.to(device).eval()

        def run(m=m):
            with torch.no_grad():
                m(x)

        fns[name] = run
    med = _interleaved(fns, repeats, warmup, _sync_for(device))
    return {"model": model_name, "batch": batch, "ms": {k: v * 1e3 for k, v in med.items()},
            "ratio": {k: v / med["base"] for k, v in med.items()}}


def bench_conversion(repeats: int = 3) -> dict[str, Any] | None:
    """convert() and deploy() wall time on torchvision's ResNet-50."""
    try:
        import torchvision
    except ImportError:
        return None
    model = torchvision.models.resnet50().eval()
    conv_t, dep_t = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        ac = convert(model)
        conv_t.append(time.perf_counter() - t)
        t = time.perf_counter()
        deploy(ac.eval())
        dep_t.append(time.perf_counter() - t)
    return {"model": "tv:resnet50", "convert_s": statistics.median(conv_t),
            "deploy_s": statistics.median(dep_t)}


def machine() -> dict[str, Any]:
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def run_bench(*, models: tuple[str, ...] = ("resnet20", "resnet56", "cifar_quick"),
              devices: tuple[str, ...] | None = None, batch: int = 128, repeats: int = 10,
              warmup: int = 2, conversion: bool = True) -> dict[str, Any]:
    """Run the suite; returns a JSON-able dict (see :func:`format_table`)."""
    if repeats < 1 or batch < 1:
        raise ValueError(f"repeats and batch must be >= 1, got {repeats} and {batch}")
    devs = devices or (("cpu", "cuda") if torch.cuda.is_available() else ("cpu",))
    result: dict[str, Any] = {"machine": machine(), "repeats": repeats, "warmup": warmup,
                              "training": [], "inference": []}
    for dev in devs:
        device = torch.device(dev)
        for m in models:
            log.info("training step: %s on %s", m, dev)
            r = bench_training(m, device, batch, repeats, warmup)
            r["device"] = dev
            result["training"].append(r)
        for b in (1, batch):
            log.info("inference: %s batch %d on %s", models[0], b, dev)
            r = bench_inference(models[0], device, b, max(repeats, 10) * (5 if b == 1 else 1),
                                warmup)
            r["device"] = dev
            result["inference"].append(r)
    if conversion:
        result["conversion"] = bench_conversion()
    return result


def format_table(res: dict[str, Any]) -> str:
    """Markdown tables of a :func:`run_bench` result."""
    lines = [f"Machine: {res['machine']}; medians of {res['repeats']} interleaved repeats.", "",
             "Training step (forward + backward + SGD), ratio to the conv-BN baseline:", "",
             "| device | model | batch | base ms | ACB | ACB no branch BN | straightforward ACB |",
             "|---|---|---|---|---|---|---|"]
    for r in res["training"]:
        q = r["ratio"]
        lines.append(f"| {r['device']} | {r['model']} | {r['batch']} | {r['ms']['base']:.1f} | "
                     f"{q['acb']:.2f}x | {q['acb_no_branch_bn']:.2f}x | "
                     f"{q['straightforward_acb']:.2f}x |")
    lines += ["", "Inference (eval, no grad), ratio to the baseline with conv-BN folded:", "",
              "| device | model | batch | base ms | ACNet deployed | ACNet unfused |",
              "|---|---|---|---|---|---|"]
    for r in res["inference"]:
        q = r["ratio"]
        lines.append(f"| {r['device']} | {r['model']} | {r['batch']} | {r['ms']['base']:.2f} | "
                     f"{q['acnet_deployed']:.3f}x | {q['acnet_unfused']:.2f}x |")
    if any("peak_mib" in r for r in res["training"]):
        lines += ["", "| device | model | peak MiB base | ACB | straightforward |",
                  "|---|---|---|---|---|"]
        for r in res["training"]:
            if "peak_mib" in r:
                p = r["peak_mib"]
                lines.append(f"| {r['device']} | {r['model']} | {p['base']:.0f} | {p['acb']:.0f} | "
                             f"{p['straightforward_acb']:.0f} |")
    c = res.get("conversion")
    if c:
        lines += ["", f"convert() {c['model']}: {c['convert_s']:.2f} s; deploy(): "
                      f"{c['deploy_s']:.2f} s"]
    return "\n".join(lines)


def save(res: dict[str, Any], path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(res, indent=2) + "\n")
