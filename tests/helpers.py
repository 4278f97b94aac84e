"""Shared test helpers (import them: ``from helpers import ...``): BatchNorm statistics that make
fusion tests meaningful, relative error, a few SGD steps."""

from __future__ import annotations

import torch
from torch import nn

from acnet import ACBlock


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm random affine parameters and non-trivial running statistics."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                if m.affine:
                    m.weight.copy_(torch.rand(n, generator=g) * 1.5 + 0.25)
                    m.bias.copy_(torch.randn(n, generator=g) * 0.5)
                if m.track_running_stats:
                    m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
                    m.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.2)
    return model


def warm_bn(model: nn.Module, make_input, steps: int = 3) -> nn.Module:
    """Train-mode passes so the running statistics come from data (and momentum is exercised)."""
    was = model.training
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            model(make_input())
    model.train(was)
    return model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max absolute difference relative to the larger output magnitude."""
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def calibrate_bn(model: nn.Module, make_input, seed: int = 0, batches: int = 2) -> nn.Module:
    """Random moderate affine parameters, then running statistics measured on data.

    Unlike :func:`randomize_bn`, activations stay normalized in very deep nets, so the outputs
    are not degenerate (saturated or constant) and every branch contributes.
    """
    g = torch.Generator().manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = []
    with torch.no_grad():
        for m in bns:
            if m.affine:
                m.weight.copy_(torch.rand(m.num_features, generator=g) * 0.5 + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            if m.track_running_stats:
                m.reset_running_stats()
            saved.append(m.momentum)
            m.momentum = None  # cumulative average over the calibration batches
    was = model.training
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            model(make_input())
    for m, mom in zip(bns, saved, strict=True):
        m.momentum = mom
    model.train(was)
    return model


def branchwise(model: nn.Module) -> nn.Module:
    """Make every ACBlock of ``model`` evaluate its branches one by one (no fused fast path)."""
    for m in model.modules():
        if isinstance(m, ACBlock):
            m.fast_eval = False
    return model


def sgd_steps(model: nn.Module, make_input, steps: int = 3, lr: float = 0.1, *,
              momentum: float = 0.0, loss=None) -> nn.Module:
    """A few SGD steps so every branch's weights move; returns the model (in train mode).

    ``loss(output)`` defaults to the mean squared output (no labels needed).
    """
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    for _ in range(steps):
        out = model(make_input())
        value = loss(out) if loss is not None else out.square().mean()
        opt.zero_grad()
        value.backward()
        opt.step()
    return model


def write_image_folder(root, layout: str = "split", *, per_class: int = 12, classes: int = 3,
                       rgb: bool = False, sizes: tuple[tuple[int, int], ...] = ((28, 28),),
                       start: int = 0):
    """Real Fashion-MNIST images as PNG files: ``root/<class>/`` (layout "split") or
    ``root/train/<class>/`` and ``root/val/<class>/`` (layout "train/val", a third of
    ``per_class`` for val); RGB (each image tinted per class) or grayscale; image i resized to
    ``sizes[i % len(sizes)]`` (width, height)."""
    from pathlib import Path

    from PIL import Image

    from acnet.data import load_dataset

    data = load_dataset("fashion-mnist")
    root = Path(root)

    def write(where, x, y, count):
        seen: dict[int, int] = {}
        for img, label in zip(x[start:], y[start:], strict=True):
            c = int(label)
            if c >= classes or seen.get(c, 0) >= count:
                continue
            k = seen[c] = seen.get(c, 0) + 1
            im = Image.fromarray(img[0].numpy(), "L").resize(sizes[k % len(sizes)])
            if rgb:
                im = Image.merge("RGB", (im, im.point(lambda v, c=c: v * (c + 1) // classes),
                                         im.point(lambda v: 255 - v)))
            d = where / f"class_{c}"
            d.mkdir(parents=True, exist_ok=True)
            im.save(d / f"{k:04d}.png")
            if all(seen.get(i, 0) >= count for i in range(classes)):
                break

    if layout == "split":
        write(root, data.train_x, data.train_y, per_class)
    else:
        write(root / "train", data.train_x, data.train_y, per_class)
        write(root / "val", data.test_x, data.test_y, max(1, per_class // 3))
    return root
