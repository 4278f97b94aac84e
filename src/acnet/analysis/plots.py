"""Matplotlib figures for the studies (imported only when plotting).

Every figure colours a variant the same way (``VARIANT_COLOURS``, keyed by the study's
variant slugs), draws mean ± std bands, and keeps the legend outside the data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import require
from .kernels import PATTERNS

__all__ = ["LONG_TAG", "SHORT_TAG", "VARIANT_COLOURS", "VARIANT_STYLES", "gain_panels", "heatmaps",
           "scene_samples",
           "sparsity_curves", "sparsity_panels", "training_curves"]

# one colour per variant slug, in every figure (colour-blind-safe: the Okabe-Ito palette, then
# two of Paul Tol's for the sub-batch forms; grey for anything else)
VARIANT_COLOURS: dict[str, str] = {
    "base": "#000000", "acb": "#D55E00", "hor": "#56B4E9", "ver": "#009E73",
    "nobn": "#CC79A7", "online": "#0072B2", "corner": "#E69F00",
    "sub4": "#882255", "sub8": "#44AA99"}
SHORT_TAG = "@short"  # a slug with this suffix: the variant on a shorter schedule, dotted
LONG_TAG = "@long"  # a slug with this suffix: the variant on a longer schedule, dashed
ZOOM_QUANTILE = 0.05  # share of band edges a zoomed panel may leave off at each end
VARIANT_STYLES: dict[str, str] = {SHORT_TAG: ":", LONG_TAG: "--"}  # by suffix; else solid
_OTHER = "#999999"


def _style(slug: str) -> tuple[str, str]:
    """Colour and line style of a variant slug (``slug@short``: its colour, dotted;
    ``slug@long``: its colour, dashed)."""
    for tag, style in VARIANT_STYLES.items():
        if slug.endswith(tag):
            return VARIANT_COLOURS.get(slug[:-len(tag)], _OTHER), style
    return VARIANT_COLOURS.get(slug, _OTHER), "-"


def _plt():
    require("matplotlib", "plot", "plots").use("Agg")
    return require("matplotlib.pyplot", "plot", "plots")


def _save(plt, fig, path: str | Path, title: str) -> None:
    """Title, save and close a figure."""
    if title:
        fig.suptitle(title, fontsize=11)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def heatmaps(mats: dict[str, torch.Tensor], path: str | Path, title: str = "") -> None:
    """Kernel magnitude heatmaps: one shared 0-1 colour scale and bar, values in the cells."""
    plt = _plt()
    n = len(mats)
    fig, axes = plt.subplots(1, n, figsize=(3.0 * n + 0.8, 3.3), squeeze=False,
                             constrained_layout=True)
    image = None
    for ax, (name, m) in zip(axes[0], mats.items(), strict=True):
        m = m.float()
        image = ax.imshow(m.numpy(), cmap="viridis", vmin=0, vmax=1)
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center",
                        color="white" if m[i, j] < 0.6 else "black", fontsize=8)
        ax.set_title(name, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    if image is not None:
        fig.colorbar(image, ax=list(axes[0]), shrink=0.85, label="normalized Σ|w|")
    _save(plt, fig, path, title)


def _band(ax, x: list[float], mean: list[float], std: list[float], colour: str,
          style: str = "-", label: str | None = None) -> None:
    """A mean line with a ± std band."""
    m, s = torch.tensor(mean, dtype=torch.float64), torch.tensor(std, dtype=torch.float64)
    ax.plot(x, m, style, color=colour, lw=1.5, marker="o", ms=2.5, label=label)
    if bool((s > 0).any()):
        ax.fill_between(x, m - s, m + s, color=colour, alpha=0.18, lw=0)


def _legend_below(fig, axes, ncol: int = 4) -> None:
    """One legend for the whole figure, below the panels (each label once)."""
    seen: dict[str, Any] = {}
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels(), strict=True):
            seen.setdefault(label, h)
    if seen:
        fig.legend(list(seen.values()), list(seen), loc="upper center", ncol=min(ncol, len(seen)),
                   fontsize=8, frameon=False, bbox_to_anchor=(0.5, 0))


def _grid(plt, n: int, width: float = 3.6, height: float = 3.0, cols: int = 3,
          sharey: bool = False):
    """A figure with ``n`` panels in rows of at most ``cols``; the unused axes removed."""
    cols = min(cols, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows),
                             squeeze=False, layout="constrained", sharey=sharey)
    flat = list(axes.ravel())
    for ax in flat[n:]:
        ax.remove()
    return fig, flat[:n]


def training_curves(panels: dict[str, dict[str, dict[str, Any]]], path: str | Path,
                    title: str = "", labels: dict[str, str] | None = None,
                    ylabel: str = "test accuracy") -> None:
    """A metric in [0, 1] per epoch (accuracy by default; ``ylabel`` names another, e.g. mIoU),
    one panel per key, ``panels[panel][slug] = {epochs, mean, std}``."""
    plt = _plt()
    fig, axes = _grid(plt, max(len(panels), 1))
    for ax, (name, lines) in zip(axes, panels.items(), strict=True):
        for slug, c in lines.items():
            _band(ax, c["epochs"], c["mean"], c["std"], *_style(slug),
                  (labels or {}).get(slug, slug))
        _zoom(ax, lines.values())
        _accuracy_panel(ax, name, "epoch", ylabel)
    _legend_below(fig, axes)
    _save(plt, fig, path, title)


def _zoom(ax, curves) -> None:
    """On long schedules, a y range for the plateau: without the first fifth of the epochs (at
    least the first epoch), from the 5th percentile of the remaining lower band edges to the
    95th of the upper ones (at least to the highest mean, at most 100 %), so that one seed
    diverging for an epoch runs off the panel instead of flattening every curve."""
    curves = list(curves)
    if not curves or max(max(c["epochs"]) for c in curves) < 5:
        return
    first = max(2, round(0.2 * max(max(c["epochs"]) for c in curves)) + 1)
    points = [(m, s) for c in curves
              for m, s, e in zip(c["mean"], c["std"], c["epochs"], strict=True) if e >= first]
    if not points:
        return
    lows = sorted(m - s for m, s in points)
    highs = sorted(m + s for m, s in points)
    cut = int(ZOOM_QUANTILE * (len(points) - 1))
    means = [m for m, _ in points]
    low = lows[cut]
    high = min(max(highs[len(highs) - 1 - cut], max(means)), 1.0)
    if high > low:
        pad = 0.1 * (high - low)
        ax.set_ylim(low - pad, high + pad)


def _accuracy_panel(ax, title: str, xlabel: str, ylabel: str = "test accuracy") -> None:
    """A small-multiple panel's title, axis labels, % ticks and grid."""
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    _percent(ax)
    ax.grid(alpha=0.3)


def _percent(ax) -> None:
    """Accuracy axis in %."""
    from matplotlib.ticker import PercentFormatter

    ax.yaxis.set_major_formatter(PercentFormatter(1.0))


def sparsity_panels(studies: dict[str, dict[str, dict[str, Any]]], path: str | Path,
                    title: str = "", colours: dict[str, str] | None = None) -> None:
    """Accuracy vs fraction zeroed, one panel per pattern: ``studies[group][pattern]``."""
    plt = _plt()
    found = {p for study in studies.values() for p in study}
    patterns = [p for p in PATTERNS if p in found] + sorted(found - set(PATTERNS))
    fig, axes = _grid(plt, max(len(patterns), 1), width=3.4, height=3.0, sharey=True)
    for ax, pattern in zip(axes, patterns, strict=True):
        for group, study in studies.items():
            if pattern in study:
                c = study[pattern]
                _band(ax, c["ratios"], c["mean"], c["std"], (colours or {}).get(group, _OTHER),
                      label=group)
        _accuracy_panel(ax, pattern, "fraction of weights zeroed")
    _legend_below(fig, axes)
    _save(plt, fig, path, title)


def sparsity_curves(curves: dict[str, dict[str, Any]], path: str | Path, title: str = "") -> None:
    """Accuracy vs sparsity ratio in one panel; ``curves[label] = {ratios, mean, std}``."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4), layout="constrained")
    for i, (label, c) in enumerate(curves.items()):
        _band(ax, c["ratios"], c["mean"], c["std"], f"C{i % 10}", label=label)
    ax.set_xlabel("fraction of weights zeroed")
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1), frameon=False)
    _save(plt, fig, path, title)


def gain_panels(panels: dict[str, dict[str, dict[str, Any]]], path: str | Path,
                title: str = "", xlabel: str = "", colours: dict[str, str] | None = None,
                ylabel: str = "gain over the baseline (points)") -> None:
    """Per panel, per variant: the mean gain over the baseline at each x (a line) and each
    seed's paired gain (dots); ``panels[panel][label] = {x, mean, seeds: [[...] per x]}``.
    The x axis is logarithmic when x spans more than a factor of 10."""
    plt = _plt()
    fig, axes = _grid(plt, max(len(panels), 1), width=4.2, height=3.2, sharey=True)
    for ax, (name, lines) in zip(axes, panels.items(), strict=True):
        xs_all = [x for c in lines.values() for x in c["x"]]
        for i, (label, c) in enumerate(lines.items()):
            colour = (colours or {}).get(label, f"C{i % 10}")
            ax.plot(c["x"], c["mean"], "-", color=colour, lw=1.5, marker="o", ms=3, label=label)
            for x, seeds in zip(c["x"], c["seeds"], strict=True):
                ax.plot([x] * len(seeds), seeds, ".", color=colour, ms=4, alpha=0.6)
        ax.axhline(0, color="#000000", lw=0.8)
        if xs_all and max(xs_all) > 10 * min(xs_all) > 0:
            ax.set_xscale("log")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    _legend_below(fig, axes, ncol=2)
    _save(plt, fig, path, title)


def scene_samples(images: torch.Tensor, masks: torch.Tensor, path: str | Path,
                  title: str = "") -> None:
    """Scenes (top row, gray) above their class masks (bottom row, one colour per class)."""
    plt = _plt()
    n = len(images)
    fig, axes = plt.subplots(2, n, figsize=(1.6 * n, 3.4), squeeze=False, layout="constrained")
    for i in range(n):
        axes[0][i].imshow(images[i, 0].numpy(), cmap="gray", vmin=0, vmax=255)
        axes[1][i].imshow(masks[i].numpy(), cmap="tab20", vmin=0, vmax=19,
                          interpolation="nearest")
        for ax in (axes[0][i], axes[1][i]):
            ax.set_xticks([])
            ax.set_yticks([])
    _save(plt, fig, path, title)
