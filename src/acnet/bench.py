"""Benchmark suite: ACB training cost vs the baseline, inference of the deployed model, conversion.

Timings are interleaved in one process (each repeat runs every variant once, in turn) and
reported as medians after warm-up; ratios to the baseline are the headline numbers.
"""

from __future__ import annotations

import copy
import logging
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ._compat import eager_ceil_mode_avg_pools
from ._env import load_average, machine
from ._files import save_json
from ._text import markdown_table
from .analysis.cost import count_kernels, latency_ratio, time_interleaved
from .block import ACBlock
from .convert import convert
from .deploy import deploy
from .errors import InputError
from .models import build_model, check_model_name

log = logging.getLogger(__name__)

__all__ = ["TRAINING_VARIANTS", "StraightforwardACB", "format_table", "ops_per_block",
           "run_bench"]


class StraightforwardACB(nn.Module):
    """The official repo's ACB, kept as the comparison: three padded convs, three BNs, summed.

    Only for the geometry the paper's models use (odd d, padding d//2, centre position).
    """

    def __init__(self, block: ACBlock) -> None:
        super().__init__()
        d = block.kernel_size[0]
        p = d // 2
        s, g = block.stride, block.groups
        c_in, c_out = block.in_channels, block.out_channels
        self.square = nn.Conv2d(c_in, c_out, d, s, padding=p, groups=g, bias=False)
        self.hor = nn.Conv2d(c_in, c_out, (1, d), s, padding=(0, p), groups=g, bias=False)
        self.ver = nn.Conv2d(c_in, c_out, (d, 1), s, padding=(p, 0), groups=g, bias=False)
        self.bn_s, self.bn_h, self.bn_v = (nn.BatchNorm2d(c_out) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn_s(self.square(x)) + self.bn_h(self.hor(x)) + self.bn_v(self.ver(x))


def _straightforward(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every ACBlock replaced by its ``StraightforwardACB``."""
    model = copy.deepcopy(model)
    for name, m in list(model.named_modules()):
        if isinstance(m, ACBlock):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, StraightforwardACB(m))
    return model


# the eager training variants, as ACBlock options (None: the conv-BN baseline)
TRAINING_VARIANTS: dict[str, dict[str, Any] | None] = {
    "base": None,
    "acb": {},
    "acb_no_branch_bn": {"branch_bn": False},
    "acb_online": {"branch_bn": False, "branch_scale": True},
    "acb_sub4": {"sub_batch": 0.25},
    "acb_sub8": {"sub_batch": 0.125},
}
# also timed under torch.compile with compile
COMPILED_VARIANTS = ("base", "acb", "acb_online", "acb_sub4")


def _training_models(model_name: str, compile: bool, in_channels: int = 3
                     ) -> dict[str, nn.Module]:
    """Every variant of the training benchmark, built from one seeded base model."""
    torch.manual_seed(0)
    base = build_model(model_name, in_channels=in_channels, num_classes=10)
    models = {k: copy.deepcopy(base) if opts is None else convert(base, preserve=False, **opts)
              for k, opts in TRAINING_VARIANTS.items()}
    models["straightforward_acb"] = _straightforward(models["acb"])
    if compile:
        for k in COMPILED_VARIANTS:
            models[f"{k}_compiled"] = copy.deepcopy(models[k])
    return models


def _step_fn(m: nn.Module, x: torch.Tensor, y: torch.Tensor, compiled: bool):
    """One SGD training step of ``m`` (under torch.compile when ``compiled``) as a closure."""
    opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
    if compiled:
        eager_ceil_mode_avg_pools(m)  # as `acnet train --compile` runs it (exact gradients)
    net = torch.compile(m, dynamic=False) if compiled else m

    def step() -> None:
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def _first_call_s(fn, device: torch.device) -> float:
    """Seconds of one call, synchronized (for a compiled step: mostly its compilation)."""
    t = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t


def _peak_mib(fn, device: torch.device) -> float:
    """Peak CUDA memory (MiB) of one call after a warm-up call."""
    fn()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


def bench_training(model_name: str, device: torch.device, batch: int, repeats: int, warmup: int,
                   image: int = 32, compile: bool = False, *, in_channels: int = 3,
                   channels_last: bool = True) -> dict[str, Any]:
    """Median training-step time (forward, backward, SGD) of each variant, interleaved, and its
    ratio to the conv-BN baseline (eager); with ``compile`` also the torch.compile'd variants
    and their compile time (the first step's seconds). ``channels_last``: model and batch in
    that memory format, as `acnet train` runs them by default."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(batch, in_channels, image, image, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (batch,), device=device)
    load0 = load_average()
    fns: dict[str, Any] = {}
    peak: dict[str, float] = {}
    first: dict[str, float] = {}
    for name, m in _training_models(model_name, compile, in_channels).items():
        m = m.to(device).to(memory_format=fmt).train()
        fns[name] = _step_fn(m, x, y, name.endswith("_compiled"))
        if name.endswith("_compiled"):
            first[name] = _first_call_s(fns[name], device)
        if device.type == "cuda":
            peak[name] = _peak_mib(fns[name], device)
    med = time_interleaved(fns, repeats, warmup, device)
    out: dict[str, Any] = {"model": model_name, "batch": batch, "channels_last": channels_last,
           "ms": {k: v * 1e3 for k, v in med.items()},
           "ratio": {k: v / med["base"] for k, v in med.items()},
           "load_avg": [load0, load_average()]}
    if first:
        out["compile_s"] = first
    if peak:
        out["peak_mib"] = peak
    return out


def ops_per_block(device: torch.device | str = "cpu", *, channels: int = 16, batch: int = 32,
                  image: int = 16) -> dict[str, dict[str, int]]:
    """Compute ops one 3×3 conv-BN block dispatches in each training variant: a training step's
    forward and backward (``train``) and an eval-mode forward (``eval``; unfused: the fold of
    the branches is computed per call, as it must be while the weights change). An eager GPU
    launches about one kernel per op, so on small maps (launch-bound) cost follows this count;
    it is the same on every device. Views and allocations are not counted."""
    device = torch.device(device)
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False),
                          nn.BatchNorm2d(channels))
    variants = {k: plain if opts is None else convert(plain, preserve=False, **opts)
                for k, opts in TRAINING_VARIANTS.items()}
    variants["straightforward_acb"] = _straightforward(variants["acb"])
    x = torch.randn(batch, channels, image, image, device=device
                    ).contiguous(memory_format=torch.channels_last)
    out: dict[str, dict[str, int]] = {}
    for name, m in variants.items():
        m = copy.deepcopy(m).to(device).to(memory_format=torch.channels_last).train()
        inp = x.clone().requires_grad_()
        m(inp)  # first call: anything built once is built before counting

        def step(m: nn.Module = m, inp: torch.Tensor = inp) -> None:
            m(inp).sum().backward()

        def infer(m: nn.Module = m) -> None:
            with torch.no_grad():
                m(x)

        train = count_kernels(step)
        m.eval()
        ev = count_kernels(infer)
        # the loss's own sum and its gradient seed are not the block's
        out[name] = {"train": sum(train.values()) - 2, "eval": sum(ev.values())}
    return out


def bench_inference(model_name: str, device: torch.device, batch: int, repeats: int,
                    warmup: int) -> dict[str, Any]:
    """Eval latency: baseline (conv-BN folded) vs ACNet deployed (fold_bn) vs unfused ACNet."""
    torch.manual_seed(0)
    base = build_model(model_name, in_channels=3, num_classes=10).eval()
    acb = convert(base, preserve=False).eval()
    online = convert(base, preserve=False, **(TRAINING_VARIANTS["acb_online"] or {})).eval()
    variants = {"base": deploy(base, fold_bn=True), "acnet_deployed": deploy(acb, fold_bn=True),
                "acnet_unfused": acb, "online_unfused": online}
    load0 = load_average()
    lat = latency_ratio({k: m.to(device) for k, m in variants.items()}, (batch, 3, 32, 32),
                        repeats=repeats, warmup=warmup, device=device, baseline="base")
    ms = lat["ms"]
    return {"model": model_name, "batch": batch, **lat,
            "unfused_vs_deployed": ms["acnet_unfused"] / ms["acnet_deployed"],
            "load_avg": [load0, load_average()]}


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


def run_bench(*, models: tuple[str, ...] = ("resnet20", "resnet56", "cifar_quick"),
              devices: tuple[str, ...] | None = None, batch: int | tuple[int, ...] = 128,
              repeats: int = 10, warmup: int = 2, conversion: bool = True,
              compile: bool = False, channels_last: bool = True) -> dict[str, Any]:
    """Run the suite (training at each ``batch``, inference at 1 and each batch); returns a
    JSON-able dict (see ``format_table``). ``compile`` adds the torch.compile variants;
    ``channels_last`` trains in that memory format (as `acnet train` does by default)."""
    batches = (batch,) if isinstance(batch, int) else tuple(batch)
    if repeats < 1 or not batches or min(batches) < 1:
        raise InputError(f"repeats and batch must be >= 1, got {repeats} and {batch}")
    devs = devices or (("cpu", "cuda") if torch.cuda.is_available() else ("cpu",))
    for dev in devs:
        if dev != "cpu" and dev != "cuda" and not dev.startswith("cuda:"):
            raise InputError(f"device must be cpu, cuda or cuda:N, got {dev!r}",
                             params=("devices",))
        if dev.startswith("cuda") and not torch.cuda.is_available():
            raise InputError(f"device {dev} was requested but no CUDA device is available",
                             params=("devices",))
        try:
            index = torch.device(dev).index
        except RuntimeError:
            index = -1
        if index is not None and not 0 <= index < torch.cuda.device_count():
            raise InputError(f"device {dev}: this machine has {torch.cuda.device_count()} CUDA "
                             f"device(s), numbered from 0", params=("devices",))
    if not models:
        raise InputError("models is empty: name at least one model to time", params=("models",))
    for m in models:
        check_model_name(m)
    result: dict[str, Any] = {"machine": machine(), "repeats": repeats, "warmup": warmup,
                              "training": [], "inference": []}
    for dev in devs:
        device = torch.device(dev)
        for m in models:
            for b in batches:
                log.info("training step: %s batch %d on %s", m, b, dev)
                r = bench_training(m, device, b, repeats, warmup, compile=compile,
                                   channels_last=channels_last)
                result["training"].append({**r, "device": dev})
        for b in sorted({1, *batches}):
            log.info("inference: %s batch %d on %s", models[0], b, dev)
            r = bench_inference(models[0], device, b, max(repeats, 10) * (5 if b == 1 else 1),
                                warmup)
            result["inference"].append({**r, "device": dev})
    result["ops_per_block"] = {dev: ops_per_block(dev) for dev in devs}
    if conversion:
        result["conversion"] = bench_conversion()
    return result


def _load_cell(r: dict[str, Any]) -> str:
    """The load averages before/after a row's timing, for the tables."""
    return "/".join("?" if v is None else f"{v:.1f}" for v in r.get("load_avg", [None, None]))


def _training_table(res: dict[str, Any]) -> list[str]:
    """Eager training-step ratios."""
    rows = [[r["device"], r["model"], r["batch"],
             "NHWC" if r.get("channels_last") else "NCHW",  # results before the field: NCHW
             f"{r['ms']['base']:.1f}", *(f"{r['ratio'].get(k, float('nan')):.2f}x" for k in
                                        ("acb", "acb_no_branch_bn", "acb_online",
                                         "acb_sub4", "acb_sub8", "straightforward_acb")),
             _load_cell(r)]
            for r in res["training"]]
    return ["Training step (forward + backward + SGD), ratio to the conv-BN baseline:", "",
            *markdown_table(["device", "model", "batch", "memory", "base ms", "ACB",
                             "ACB no branch BN", "online ACB", "sub-batch 1/4", "sub-batch 1/8",
                             "straightforward ACB", "load"], rows)]


def _compiled_table(res: dict[str, Any]) -> list[str]:
    """torch.compile'd training steps: ratio to the eager baseline, and compile seconds."""
    rows = [[r["device"], r["model"], r["batch"],
             *(f"{r['ratio'].get(f'{k}_compiled', float('nan')):.2f}x"
               for k in COMPILED_VARIANTS),
             " / ".join(f"{r['compile_s'].get(f'{k}_compiled', float('nan')):.0f}"
                        for k in COMPILED_VARIANTS),
             _load_cell(r)] for r in res["training"] if "compile_s" in r]
    if not rows:
        return []
    return ["", "Training step under torch.compile, ratio to the EAGER conv-BN baseline "
                "(compile: seconds of the first step):", "",
            *markdown_table(["device", "model", "batch", "base", "ACB", "online ACB",
                             "sub-batch 1/4", "compile s base / ACB / online / sub-batch 1/4",
                             "load"], rows)]


def _inference_table(res: dict[str, Any]) -> list[str]:
    """Eval-mode latency ratios (deployed and unfused)."""
    rows = [[r["device"], r["model"], r["batch"], f"{r['ms']['base']:.2f}",
             f"{r['ratio']['acnet_deployed']:.3f}x", f"{r['ratio']['acnet_unfused']:.2f}x",
             f"{r.get('unfused_vs_deployed', float('nan')):.2f}x",
             f"{r['ratio'].get('online_unfused', float('nan')):.2f}x", _load_cell(r)]
            for r in res["inference"]]
    return ["", "Inference (eval, no grad), ratio to the baseline with conv-BN folded:", "",
            *markdown_table(["device", "model", "batch", "base ms", "ACNet deployed",
                             "ACNet unfused", "unfused / deployed", "online ACB unfused",
                             "load"], rows)]


def _memory_table(res: dict[str, Any]) -> list[str]:
    """Peak CUDA memory of each training variant (MiB)."""
    rows = [r for r in res["training"] if "peak_mib" in r]
    if not rows:
        return []
    names = list(rows[0]["peak_mib"])
    return ["", "Peak CUDA memory of a training step (MiB):", "",
            *markdown_table(["device", "model", "batch", *names],
                            [[r["device"], r["model"], r["batch"],
                              *(f"{r['peak_mib'][k]:.0f}" for k in names)] for r in rows])]


def _ops_table(res: dict[str, Any]) -> list[str]:
    """Compute ops per 3×3 block (forward + backward of a training step; eval forward)."""
    by_device = res.get("ops_per_block")
    if not by_device:
        return []
    names = {"base": "conv-BN (baseline)", "acb": "ACB", "acb_no_branch_bn": "ACB no branch BN",
             "acb_online": "online ACB", "acb_sub4": "sub-batch 1/4", "acb_sub8": "sub-batch 1/8",
             "straightforward_acb": "straightforward ACB"}
    rows = [[dev, names.get(k, k), v["train"], v["eval"]]
            for dev, ops in by_device.items() for k, v in ops.items()]
    return ["", "Compute ops per 3×3 block (views and allocations not counted; an eager GPU "
                "launches about one kernel each): a training step's forward and backward, and "
                "an unfused eval forward:", "",
            *markdown_table(["device", "form", "training forward + backward", "eval forward"],
                            rows)]


def format_table(res: dict[str, Any]) -> str:
    """Markdown tables of a ``run_bench`` result (load: 1-minute load average before/after
    each row's timing)."""
    lines = [f"Machine: {res['machine']}; medians of {res['repeats']} interleaved repeats.", "",
             *_training_table(res), *_compiled_table(res), *_inference_table(res),
             *_memory_table(res), *_ops_table(res)]
    c = res.get("conversion")
    if c:
        lines += ["", f"convert() {c['model']}: {c['convert_s']:.2f} s; deploy(): "
                      f"{c['deploy_s']:.2f} s"]
    return "\n".join(lines)


def save(res: dict[str, Any], path: str | Path) -> None:
    """Write a ``run_bench`` result as indented JSON (atomic, no NaN)."""
    save_json(path, res)
