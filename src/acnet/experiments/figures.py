"""The figures of a study report, drawn in one place from the results (sections only refer
to the files): training curves, kernel magnitude heatmaps, sparsity panels."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..analysis import plots
from .presets import ACNET, BASE, CORNER, LONG, MAIN, ONLINE, SHORT, StudyPreset
from .results import STUDY_GROUPS, mean_std, schedule_of

__all__ = [
    "CURVES",
    "KERNELS",
    "LABELS",
    "SCHEDULE_TAGS",
    "SPARSITY",
    "curve_labels",
    "curve_panels",
    "draw_figures",
]

CURVES, KERNELS, SPARSITY = "training_curves.png", "kernel_magnitude.png", "sparsity.png"
# short names of the variants in figures and the compact tables
LABELS = {BASE: "baseline", ACNET: "ACNet", "hor": "+horizontal only", "ver": "+vertical only",
          "nobn": "no branch BN", ONLINE: "online ACNet", CORNER: "corner ACNet"}
SCHEDULE_TAGS = {SHORT: plots.SHORT_TAG, LONG: plots.LONG_TAG}  # curve keys: slug + tag
# the ablation model's extra panels of the training-curve figure (ACNet drawn in each)
ABLATION_PANELS = {"one branch": ("hor", "ver", ACNET),
                   "other forms": ("nobn", ONLINE, CORNER, ACNET)}


def curve_labels() -> dict[str, str]:
    """Legend labels of the training-curve figure (variants, short- and long-schedule lines)."""
    return {**LABELS, **{s + tag: f"{LABELS[s]}, {sch} schedule" for sch, tag in
                         SCHEDULE_TAGS.items() for s in (BASE, ACNET)}}


def _band(curves: list[list[dict[str, Any]]]) -> dict[str, Any] | None:
    """Mean and std of test accuracy per epoch over runs (epochs all of them have)."""
    per_run = [{int(r["epoch"]): r["test_acc"] for r in c} for c in curves if c]
    if not per_run:
        return None
    epochs = sorted(set.intersection(*(set(c) for c in per_run)))
    stats = [mean_std([c[e] for c in per_run]) for e in epochs]
    return {"epochs": epochs, "mean": [m for m, _ in stats], "std": [s for _, s in stats]}


def curve_panels(preset: StudyPreset, res: dict[str, Any], ablation_runs: str
                 ) -> dict[str, dict[str, Any]]:
    """Figure panels: one per model (baseline and ACNet on the main, dotted the short and
    dashed the long schedule), then the ablation model's variants in small groups."""
    def lines(model: str, slugs: tuple[str, ...], schedule: str = MAIN, tag: str = ""
              ) -> dict[str, Any]:
        """The mean ± std band of each variant that has runs (keys: slug + tag)."""
        out = {}
        for slug in slugs:
            band = _band([r["curve"] for r in res["runs"].values() if r["model"] == model
                          and r["variant"] == slug and schedule_of(r) == schedule])
            if band:
                out[slug + tag] = band
        return out

    panels = {model: {**lines(model, (BASE, ACNET)),
                      **{k: v for sch, tag in SCHEDULE_TAGS.items()
                         for k, v in lines(model, (BASE, ACNET), sch, tag).items()}}
              for model in preset.models}
    if preset.ablation:
        sch = preset.ablation_schedule
        for title, slugs in ABLATION_PANELS.items():
            extra = lines(preset.ablation_model, slugs, sch)
            if set(extra) - {ACNET}:
                panels[f"{ablation_runs}: {title}"] = extra
    return {k: v for k, v in panels.items() if v}


def draw_figures(preset: StudyPreset, res: dict[str, Any], out: Path, ablation_runs: str
                 ) -> None:
    """Every figure the results have data for, next to report.md."""
    if res["kernel_magnitude"]:
        mats = {k: torch.tensor(v) for k, v in res["kernel_magnitude"].items()}
        plots.heatmaps(mats, out / KERNELS,
                       f"{ablation_runs}: average normalized kernel magnitude")
    if res["sparsity"]:
        colours = {t: plots.VARIANT_COLOURS[s] for t, s in STUDY_GROUPS.items()}
        plots.sparsity_panels(res["sparsity"], out / SPARSITY,
                              f"{ablation_runs}: accuracy after zeroing kernel weights at "
                              f"random", colours)
    panels = curve_panels(preset, res, ablation_runs)
    if panels:
        plots.training_curves(panels, out / CURVES,
                              "test accuracy per epoch (mean ± std over seeds)", curve_labels())
