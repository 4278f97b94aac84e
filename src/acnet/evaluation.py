"""Evaluating a model on a loader: accuracy, logits, the exact float32 deployment check."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from .errors import InputError, NonFiniteError

__all__ = ["compare_models", "count_params", "evaluate", "exact_float32"]


def count_params(model: nn.Module) -> int:
    """Number of parameters (every element of every parameter tensor)."""
    return sum(p.numel() for p in model.parameters())


@contextlib.contextmanager
def exact_float32(device: torch.device | str = "cpu") -> Iterator[None]:
    """No autocast and no TF32 inside: float32 models compute in float32, on any device."""
    device = torch.device(device)
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.autocast(device.type, enabled=False))
        if device.type == "cuda":
            for owner in (torch.backends.cudnn, torch.backends.cuda.matmul):
                stack.callback(setattr, owner, "allow_tf32", getattr(owner, "allow_tf32"))  # noqa: B009
                setattr(owner, "allow_tf32", False)  # noqa: B010 (a module, typed loosely)
        yield


def _autocast(amp: bool, x: torch.Tensor):
    """bf16 autocast for CUDA inputs when ``amp``, else nothing."""
    if amp and x.is_cuda:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable[Any], *, amp: bool = False,
             keep_logits: bool = False, check_finite: bool = False
             ) -> tuple[float, torch.Tensor | None]:
    """Top-1 accuracy on ``loader`` (and the concatenated logits, if asked).

    ``amp``: bf16 autocast on CUDA. ``check_finite``: raise NonFiniteError when an output
    is NaN or infinite. The model's train/eval mode is restored afterwards.
    """
    was = model.training
    model.eval()
    correct = total = 0
    outs = []
    try:
        for x, y in loader:
            with _autocast(amp, x):
                logits = model(x)
            logits = logits.float()
            if check_finite and not torch.isfinite(logits).all():
                raise NonFiniteError("the model's outputs are not finite (NaN or infinity)")
            correct += (logits.argmax(1) == y).sum().item()
            total += y.numel()
            if keep_logits:
                outs.append(logits.cpu())
    finally:
        model.train(was)
    return correct / max(total, 1), (torch.cat(outs) if keep_logits else None)


@torch.no_grad()
def accuracy_by_class(model: nn.Module, loader: Iterable[Any], num_classes: int
                      ) -> tuple[float, list[float | None]]:
    """Top-1 accuracy overall and per class (None for a class with no test image)."""
    was = model.training
    model.eval()
    correct = torch.zeros(num_classes, dtype=torch.long)
    total = torch.zeros(num_classes, dtype=torch.long)
    try:
        for x, y in loader:
            hit = (model(x).argmax(1) == y).long().cpu()
            y = y.cpu()
            total += torch.bincount(y, minlength=num_classes)[:num_classes]
            correct += torch.bincount(y, weights=hit, minlength=num_classes)[:num_classes].long()
    finally:
        model.train(was)
    per = [c / t if t else None for c, t in zip(correct.tolist(), total.tolist(), strict=True)]
    return correct.sum().item() / max(total.sum().item(), 1), per


def compare_models(trained: nn.Module, deployed: nn.Module, loader: Iterable[Any], *,
                   device: torch.device | str = "cpu") -> dict[str, float]:
    """Accuracy of both models and how far apart they are, in exact float32 (no autocast/TF32).

    Returns ``test_acc``, ``deployed_test_acc``, ``max_abs_diff_deploy`` (max |logit
    difference|) and ``prediction_agreement`` (share of identical top-1 predictions).
    """
    with exact_float32(device):
        acc, kept = evaluate(trained, loader, keep_logits=True, check_finite=True)
        dep_acc, dep_kept = evaluate(deployed, loader, keep_logits=True, check_finite=True)
    if kept is None or dep_kept is None:
        raise InputError("the loader yielded no batches")
    logits, dep_logits = kept, dep_kept
    return {"test_acc": acc, "deployed_test_acc": dep_acc,
            "max_abs_diff_deploy": (dep_logits - logits).abs().max().item(),
            "prediction_agreement":
                (dep_logits.argmax(1) == logits.argmax(1)).float().mean().item()}
