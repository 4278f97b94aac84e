"""Matplotlib figures for the studies (imported only when plotting)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

__all__ = ["heatmaps", "sparsity_curves", "training_curves"]


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("plots need matplotlib: pip install 'acnet[plot]'") from exc
    return plt


def heatmaps(mats: dict[str, torch.Tensor], path: str | Path, title: str = "") -> None:
    """Annotated kernel magnitude heatmaps side by side."""
    plt = _plt()
    n = len(mats)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.2), squeeze=False)
    for ax, (name, m) in zip(axes[0], mats.items()):
        m = m.float()
        ax.imshow(m.numpy(), cmap="viridis", vmin=0, vmax=1)
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                ax.text(j, i, f"{m[i, j]:.3f}", ha="center", va="center",
                        color="white" if m[i, j] < 0.6 else "black", fontsize=9)
        ax.set_title(name, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def sparsity_curves(curves: dict[str, dict[str, Any]], path: str | Path, title: str = "") -> None:
    """Accuracy vs sparsity ratio; ``curves[label] = {"ratios", "mean", "std"}``."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, c in curves.items():
        mean, std = torch.tensor(c["mean"]), torch.tensor(c["std"])
        ax.plot(c["ratios"], mean, marker="o", ms=3, label=label)
        ax.fill_between(c["ratios"], mean - std, mean + std, alpha=0.2)
    _accuracy_axes(plt, fig, ax, "fraction of weights zeroed", title, path, legend_size=8)


def training_curves(runs: dict[str, list[dict[str, Any]]], path: str | Path,
                    title: str = "") -> None:
    """Test accuracy per epoch for each run (metrics.jsonl rows)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, rows in runs.items():
        ax.plot([r["epoch"] for r in rows], [r["test_acc"] for r in rows], label=label, lw=1)
    _accuracy_axes(plt, fig, ax, "epoch", title, path, legend_size=7)


def _accuracy_axes(plt, fig, ax, xlabel: str, title: str, path: str | Path,
                   legend_size: int) -> None:
    """Label an accuracy plot, save it and close the figure."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
