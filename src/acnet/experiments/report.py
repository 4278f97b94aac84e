"""report.md of a study: one function per section, each returning its markdown lines."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..analysis import plots
from ..analysis.kernels import pattern_mask
from ..data.loader import TRANSFORMS
from .presets import ABLATION, ACNET, CORNER, StudyPreset
from .results import accuracies, deployment_check, main_result, mean_std

__all__ = ["write_report", "main_table"]

TRANSFORM_TITLES = {"none": "normal", "hflip": "horizontal flip", "vflip": "vertical flip",
                    "rot90": "rotate 90°"}


def _pm(xs: list[float], pct: bool = True) -> str:
    """``mean ± std`` (in % by default), or n/a."""
    m, s = mean_std(xs)
    if m != m:  # NaN: no values
        return "n/a"
    k = 100 if pct else 1
    return f"{m * k:.2f} ± {s * k:.2f}"


def _header(preset: StudyPreset, res: dict[str, Any]) -> list[str]:
    """Title, command, data, machine."""
    m, sw = res["machine"], res["software"]
    return [f"# ACNet study: preset `{preset.name}`", "", f"{preset.description}.", "",
            f"Command: `{res.get('command', '')}`", "",
            f"Dataset: {preset.dataset}; seeds: {', '.join(map(str, res['seeds']))}; "
            f"machine: {m.get('gpu') or m['cpu']} ({m['threads']} threads); Python "
            f"{sw['python']}, PyTorch {sw['torch']}.", "",
            "All accuracies are top-1 on the test set in %, mean ± sample std over seeds, of "
            "the **deployed** model (ACBlocks fused into plain convs).", ""]


def main_table(res: dict[str, Any], models: tuple[str, ...]) -> list[str]:
    """Baseline vs ACNet per model, with the seed-noise verdict."""
    lines = ["| model | epochs | train images | baseline | ACNet | gain | beyond seed noise? |",
             "|---|---|---|---|---|---|---|"]
    for model in models:
        r = main_result(res, model)
        run = next(x for x in res["runs"].values() if x["model"] == model)
        lines.append(f"| {model} | {run['epochs']} | {run['train_images']} | {_pm(r['base'])} | "
                     f"{_pm(r['acnet'])} | {r['gain'] * 100:+.2f} | {r['verdict']} "
                     f"(2 s.e. = {2 * r['se'] * 100:.2f}) |")
    return lines


def _headline(model: str, r: dict[str, Any]) -> list[str]:
    """One model's result in words: means, gain, verdict, and the per-seed paired differences."""
    lines = [f"**{model}: ACNet {_pm(r['acnet'])} vs baseline {_pm(r['base'])} "
             f"({len(r['base'])} seeds): {r['gain'] * 100:+.2f} points; beyond seed noise: "
             f"{r['verdict']}.**", ""]
    diffs = r["paired"]
    if diffs:
        wins = sum(d > 0 for d in diffs.values())
        m, sd = mean_std(list(diffs.values()))
        lines += ["ACNet minus baseline, same seed: " + ", ".join(
            f"seed {s} {d * 100:+.2f}" for s, d in diffs.items())
            + f" (mean {m * 100:+.2f} ± {sd * 100:.2f}; ACNet ahead on {wins} of {len(diffs)} "
            f"seeds).", ""]
    return lines


def _main(preset: StudyPreset, res: dict[str, Any]) -> list[str]:
    """Section: baseline vs ACNet per model, with the per-seed paired differences."""
    lines = ["## Main result", ""]
    for model in preset.models:
        lines += _headline(model, main_result(res, model))
    return [*lines, *main_table(res, preset.models), "",
            "\"Beyond seed noise\" means the difference exceeds twice the standard error of the "
            "difference of the two means.", ""]


def _deployment(res: dict[str, Any]) -> list[str]:
    """Section: every run's trained model vs its deployed (fused, BN-folded) form."""
    lines = ["## Deployment check", "",
             "Every run's trained model vs its deployed form on the test set:", ""]
    for model, c in deployment_check(res).items():
        lines.append(f"- {model}: max |logit difference| {c['max_abs_diff']:.2g}, identical "
                     f"predictions {c['agreement'] * 100:.2f}%; parameters: base "
                     f"{c['params_base']:,}, ACNet training {c['params_acnet']:,} -> deployed "
                     f"{c['params_deployed']:,}")
    return lines + [""]


def _ablation(preset: StudyPreset, res: dict[str, Any]) -> list[str]:
    """Section: every ablation variant under each test transform."""
    am = preset.ablation_model
    lines = [f"## Ablation ({am}), with robustness to flips and rotation", "",
             "| variant | " + " | ".join(TRANSFORM_TITLES[t] for t in TRANSFORMS) + " |",
             "|---|" + "---|" * len(TRANSFORMS)]
    for slug, variant in ABLATION.items():
        rows = [r for r in res["runs"].values() if r["model"] == am and r["variant"] == slug]
        if rows:
            cells = [_pm([r["robustness"][t] for r in rows if "robustness" in r])
                     for t in TRANSFORMS]
            lines.append(f"| {variant.label} | " + " | ".join(cells) + " |")
    return lines + [""]


def _corner(preset: StudyPreset, res: dict[str, Any]) -> list[str]:
    """Section: centre vs corner position of the asymmetric kernels."""
    am = preset.ablation_model
    return ["## Centre vs corner ACB", "",
            f"ACNet with the asymmetric kernels on the centre row/column: "
            f"{_pm(accuracies(res, am, ACNET))}; on the last row/column (corner, paper Fig. "
            f"6c): {_pm(accuracies(res, am, CORNER))}.", ""]


def _pattern_mean(m: torch.Tensor, pattern: str) -> float:
    """Mean of a magnitude matrix over a pattern's positions."""
    return m[pattern_mask(pattern, m.shape[0])].mean().item()


def _kernels(preset: StudyPreset, res: dict[str, Any], out: Path) -> list[str]:
    """Section: kernel magnitude matrices (and their figure)."""
    if not res["kernel_magnitude"]:
        return []
    mats = {k: torch.tensor(v) for k, v in res["kernel_magnitude"].items()}
    plots.heatmaps(mats, out / "kernel_magnitude.png",
                   f"{preset.ablation_model}: average normalized kernel magnitude")
    lines = ["## Kernel magnitude matrix", "",
             "Σ|w| per kernel position of every BN-folded d×d kernel, normalized per layer "
             "and averaged (paper Fig. 6), averaged over seeds.", "",
             "![kernel magnitude](kernel_magnitude.png)", ""]
    for k, m in mats.items():
        d = m.shape[0]
        lines.append(f"- {k}: centre {m[d // 2, d // 2].item():.3f}, skeleton mean "
                     f"{_pattern_mean(m, 'skeleton'):.3f}, corner mean "
                     f"{_pattern_mean(m, 'corners'):.3f}")
    return lines + [""]


def _test_images(preset: StudyPreset) -> str:
    """Which test images the analyses score."""
    n = preset.analysis_test_limit
    return f"accuracy on the first {n:,} test images" if n else "accuracy on the full test set"


def _sparsity(preset: StudyPreset, res: dict[str, Any], out: Path) -> list[str]:
    """Section: accuracy after sparsifying skeleton, corners, all (and the figure)."""
    if not res["sparsity"]:
        return []
    curves = {f"{title}: {pattern}": cur for title, study in res["sparsity"].items()
              for pattern, cur in study.items()}
    plots.sparsity_curves(curves, out / "sparsity.png",
                          f"{preset.ablation_model}: accuracy after zeroing kernel weights at "
                          f"random")
    ratios = next(iter(curves.values()))["ratios"]
    lines = ["## Sparsifying the skeleton vs the corners", "",
             f"Fraction of the weights at the pattern's positions set to zero at random "
             f"(mean ± std over {preset.draws} draws; seed-{res['seeds'][0]} runs; "
             f"{_test_images(preset)}).", "",
             "![sparsity](sparsity.png)", "",
             "| model | pattern | " + " | ".join(f"{r:g}" for r in ratios) + " |",
             "|---|---|" + "---|" * len(ratios)]
    for title, study in res["sparsity"].items():
        for pattern, cur in study.items():
            lines.append(f"| {title} | {pattern} | "
                         + " | ".join(f"{m * 100:.1f}" for m in cur["mean"]) + " |")
    return lines + [""]


def _cost(res: dict[str, Any]) -> list[str]:
    """Section: params, MACs, latency and training time."""
    lines = ["## Inference cost", "",
             "Deployed with conv-BN folded, batch 1, median CPU latency interleaved in one "
             "process.", "",
             "| model | params base | params ACNet deployed | params ACNet training | MACs base "
             "| MACs ACNet deployed | latency base ms | latency ACNet ms | train s base | "
             "train s ACNet |", "|---|---|---|---|---|---|---|---|---|---|"]
    for model, c in res["cost"].items():
        lines.append(f"| {model} | {c['params_base']:,} | {c['params_acnet_deployed']:,} | "
                     f"{c['params_acnet_training']:,} | {c['macs_base']:,} | "
                     f"{c['macs_acnet_deployed']:,} | {c['latency_ms_base']:.3f} | "
                     f"{c['latency_ms_acnet']:.3f} | {c['train_seconds_base']:.0f} | "
                     f"{c['train_seconds_acnet']:.0f} |")
    return lines + ["", "Params and MACs are counted on the deployed models; \"train s\" is each "
                    "run's wall-clock (mean over seeds) as it happened, possibly sharing the "
                    "machine with other work: `acnet bench` measures the training cost properly, "
                    "interleaved."]


def _curves(res: dict[str, Any], out: Path) -> list[str]:
    """Section: training curves of the first seed (figure)."""
    first = min(res["seeds"])
    curves = {f"{r['model']} {r['label']}": r["curve"] for r in res["runs"].values()
              if r["seed"] == first}
    plots.training_curves(curves, out / "training_curves.png",
                          f"test accuracy per epoch (seed {first})")
    return ["", "## Training curves", "", "![training curves](training_curves.png)", "",
            "Numbers behind every table: `results.json`; per-run directories: `runs/`."]


def write_report(preset: StudyPreset, out: Path, res: dict[str, Any]) -> Path:
    """report.md with the tables and the PNG figures beside it."""
    out = Path(out)
    ablation = [*_ablation(preset, res), *_corner(preset, res)] if preset.ablation else []
    lines = [*_header(preset, res), *_main(preset, res), *_deployment(res), *ablation,
             *_kernels(preset, res, out), *_sparsity(preset, res, out),
             *_cost(res), *_curves(res, out)]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
