"""Inference cost: parameters, multiply-accumulates, and interleaved timing as ratios."""

from __future__ import annotations

import contextlib
import statistics
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from ..errors import InputError
from ..evaluation import count_params

__all__ = ["count_kernels", "count_macs", "count_params", "eval_mode", "latency_ratio",
           "time_interleaved"]


@contextlib.contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Every module in eval mode inside; each module's own train/eval mode restored after."""
    saved = [(m, m.training) for model in models for m in model.modules()]
    for model in models:
        model.eval()
    try:
        yield
    finally:
        for m, mode in saved:
            m.training = mode


# dispatched ops that launch no kernel: tensor allocation, dtype arithmetic, autograd detaching
_NO_KERNEL = frozenset({"empty", "empty_like", "empty_strided", "new_empty", "detach",
                        "promote_types", "lift_fresh", "alias", "_unsafe_view"})


def count_kernels(fn: Callable[[], object]) -> Counter[str]:
    """The compute ops ``fn()`` dispatches, by ATen name: every op that reads or writes tensor
    data (views, allocations and dtype arithmetic left out), forward and any backward ``fn`` runs.

    The count is what an eager GPU launches per call (about one kernel per op; a few ops launch
    two), the same on every device, so a CPU measures it.
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    counts: Counter[str] = Counter()

    class _Count(TorchDispatchMode):
        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (),
                               kwargs: Any = None) -> Any:
            name = func.overloadpacket.__name__
            if not func.is_view and name not in _NO_KERNEL:
                counts[name] += 1
            return func(*args, **(kwargs or {}))

    with _Count():
        fn()
    return counts


def count_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one forward pass (Conv2d and Linear layers), via forward hooks."""
    total = 0

    def conv_hook(m: nn.Conv2d, inp, out):
        nonlocal total
        kh, kw = m.kernel_size
        total += out.numel() // out.shape[0] * (m.in_channels // m.groups) * kh * kw

    def linear_hook(m: nn.Linear, inp, out):
        nonlocal total
        total += out.numel() // out.shape[0] * m.in_features

    hooks = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(linear_hook))
    try:
        with eval_mode(model), torch.no_grad():
            model(torch.zeros(1, *input_shape[1:]))
    finally:
        for h in hooks:
            h.remove()
    return total


def _sync_for(device: torch.device) -> Callable[[], None]:
    """A device synchronization (CUDA) or nothing."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def time_interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int,
                     device: torch.device | str = "cpu") -> dict[str, float]:
    """Median seconds per call of each function, interleaved (each repeat runs every function
    once, in turn) after ``warmup`` rounds; synchronized around each call on CUDA."""
    if repeats < 1 or warmup < 0:
        raise InputError(f"repeats must be >= 1 and warmup >= 0, got {repeats} and {warmup}")
    sync = _sync_for(torch.device(device))
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


def latency_ratio(models: dict[str, nn.Module], input_shape: tuple[int, ...], *,
                  repeats: int = 30, warmup: int = 3, device: torch.device | str = "cpu",
                  baseline: str | None = None) -> dict[str, dict[str, float]]:
    """Eval-mode, no-grad latency of each model on one random input of ``input_shape``,
    interleaved: ``{"ms": {name: median ms}, "ratio": {name: ms / baseline's ms}}``.

    ``baseline`` defaults to the first model; every module's train/eval mode is restored.
    """
    if not models:
        raise InputError("latency_ratio needs at least one model")
    baseline = baseline or next(iter(models))
    if baseline not in models:
        raise InputError(f"baseline {baseline!r} is not one of {list(models)}")
    x = torch.randn(*input_shape, device=device)

    def call(m: nn.Module) -> Callable[[], object]:
        return lambda: m(x)

    with eval_mode(*models.values()), torch.no_grad():
        med = time_interleaved({k: call(m) for k, m in models.items()}, repeats, warmup, device)
    return {"ms": {k: v * 1e3 for k, v in med.items()},
            "ratio": {k: v / med[baseline] for k, v in med.items()}}
