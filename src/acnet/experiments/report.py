"""report.md of a study: one function per section, each returning its markdown lines.

A study takes several sessions, so every section works on the runs finished so far and names
the runs it still waits for ("pending: runs ...") instead of failing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .._text import markdown_table
from ..analysis.kernels import pattern_mask
from ..data.loader import TRANSFORMS
from ..train.config import MODEL_DEFAULTS
from .figures import LABELS, SCHEDULE_TAGS, curve_panels, draw_figures
from .presets import (
    ABLATION,
    ACNET,
    BASE,
    CORNER,
    LONG,
    MAIN,
    SHORT,
    StudyPreset,
    schedule_epochs,
)
from .report_cost import (
    _pending,
    _pm,
    inference_cost_section,
    int8_section,
    training_cost_section,
)
from .results import (
    PLATEAU_FRACTION,
    STUDY_GROUPS,
    accuracies,
    deployment_check,
    main_result,
    mean_std,
    pending_runs,
    schedule_of,
)

__all__ = ["deployment_lines", "main_table", "progress_lines", "write_report"]

TRANSFORM_TITLES = {"none": "normal", "hflip": "horizontal flip", "vflip": "vertical flip",
                    "rot90": "rotate 90°"}
def _epochs(preset: StudyPreset, model: str, schedule: str = MAIN) -> Any:
    """The epochs of ``model``'s runs on ``schedule`` in the preset (else the model's
    default, as TrainConfig resolves it)."""
    if schedule in (SHORT, LONG):
        return schedule_epochs(preset, schedule)[model]
    cfg = {**MODEL_DEFAULTS.get(model, {}), **preset.train, **preset.per_model.get(model, {})}
    return cfg.get("epochs", "default")


def _ablation_runs(preset: StudyPreset) -> str:
    """'cifar_quick, 15 epochs': the ablation model and its schedule, for titles."""
    am = preset.ablation_model
    return f"{am}, {_epochs(preset, am, preset.ablation_schedule)} epochs"


def progress_lines(res: dict[str, Any]) -> list[str]:
    """'Study in progress: K of N runs finished' and the pending runs; nothing when complete."""
    pending = pending_runs(res)
    if not pending:
        return []
    done = len(res["runs"])
    return [f"**Study in progress: {done} of {res.get('planned', done + len(pending))} runs "
            f"finished.** Pending: {', '.join(pending)}.", ""]


def _header(preset: StudyPreset, res: dict[str, Any]) -> list[str]:
    """Title, progress, command, data, machine."""
    m, sw = res["machine"], res["software"]
    return [f"# ACNet study: preset `{preset.name}`", "", *progress_lines(res),
            f"{preset.description}.", "", f"Command: `{res.get('command', '')}`", "",
            f"Dataset: {preset.dataset}; seeds: {', '.join(map(str, res['seeds']))}; "
            f"machine: {m.get('gpu') or m['cpu']} ({m['threads']} threads); Python "
            f"{sw['python']}, PyTorch {sw['torch']}.", "",
            "All accuracies are top-1 on the test set in %, mean ± sample std over seeds, of "
            "the **deployed** model (ACBlocks fused into plain convs).", ""]


def main_table(res: dict[str, Any], models: tuple[str, ...], schedule: str = MAIN) -> list[str]:
    """Baseline vs ACNet per model on ``schedule``, with the per-seed differences and the
    seed-noise verdict (or the pending runs)."""
    lines = ["| model | epochs | train images | baseline | ACNet | gain (per seed) | beyond seed "
             "noise? |", "|---|---|---|---|---|---|---|"]
    for model in models:
        r = main_result(res, model, schedule)
        size = f"{r['epochs']} | {r['train_images']}" if r["epochs"] else "– | –"
        pending = pending_runs(res, model, (BASE, ACNET), schedule)
        if r["base"] and r["acnet"]:
            seeds = ", ".join(f"{d * 100:+.2f}" for d in r["paired"].values())
            seeds = f" ({seeds})" if seeds else ""  # no seed with both runs yet: none
            noise = (f"2 s.e. = {2 * r['se'] * 100:.2f}" if min(len(r["base"]), len(r["acnet"])) > 1
                     else "one seed: no spread yet")
            tail = f"{r['gain'] * 100:+.2f}{seeds} | {r['verdict']} ({noise})"
            if pending:
                tail += f"; {_pending(pending)}"
        else:
            if not pending and not r["epochs"]:
                continue  # no such schedule for this model
            tail = f"– | {_pending(pending)}"
        lines.append(f"| {model} | {size} | {_pm(r['base'])} | {_pm(r['acnet'])} | {tail} |")
    return lines


def _headline(res: dict[str, Any], model: str, schedule: str = MAIN, epochs: Any = None
              ) -> list[str]:
    """One model's result in words: means, gain, verdict, the per-seed paired differences and
    the runs still pending (on ``schedule``; other schedules than the main one name their
    ``epochs``)."""
    r = main_result(res, model, schedule)
    epochs = r["epochs"] or epochs
    name = model if schedule == MAIN or not epochs else f"{model}, {epochs} epochs"
    pending = pending_runs(res, model, (BASE, ACNET), schedule)
    if not (r["base"] and r["acnet"]):
        return [f"**{name}**: {_pending(pending)}.", ""]
    lines = [f"**{name}: ACNet {_pm(r['acnet'])} vs baseline {_pm(r['base'])} "
             f"({len(r['acnet'])} and {len(r['base'])} seeds): {r['gain'] * 100:+.2f} points; "
             f"beyond seed noise: {r['verdict']}.**", ""]
    diffs = r["paired"]
    if diffs:
        wins = sum(d > 0 for d in diffs.values())
        m, sd = mean_std(list(diffs.values()))
        lines += ["ACNet minus baseline, same seed: " + ", ".join(
            f"seed {s} {d * 100:+.2f}" for s, d in diffs.items())
            + f" (mean {m * 100:+.2f}" + (f" ± {sd * 100:.2f}" if len(diffs) > 1 else "")
            + f"; ACNet ahead on {wins} of {len(diffs)} seeds).", ""]
    if pending:
        lines += [f"Not complete yet: {_pending(pending)}.", ""]
    return lines


def _main(preset: StudyPreset, res: dict[str, Any]) -> list[str]:
    """Section: baseline vs ACNet per model, with the per-seed paired differences."""
    lines = ["## Main result", ""]
    for model in preset.models:
        lines += _headline(res, model)
    lines += [*main_table(res, preset.models), "",
              "\"Beyond seed noise\" means the difference exceeds twice the standard error of "
              "the difference of the two means; the per-seed gains are ACNet minus baseline "
              "with the same seed.", ""]
    compared = tuple(m for m in preset.models if m in preset.plateau)
    if preset.plateau_comparison and compared:
        lines += ["### The same comparison on the long schedules", "",
                  "Baseline and ACNet trained again with every seed on the long schedule (same "
                  "recipe, cosine over more epochs): how the gain moves when both are trained "
                  "longer. Whether the study's schedule, and the long one, had converged: "
                  "section \"Has the schedule converged?\" below.", ""]
        for model in compared:
            lines += _headline(res, model, LONG, _epochs(preset, model, LONG))
        lines += [*main_table(res, compared, LONG), ""]
    if preset.short:
        lines += ["### The same comparison on the short schedules", "",
                  "Baseline and ACNet trained again with every seed on about half the epochs "
                  "(same recipe, cosine over the shorter schedule): how the gain moves as the "
                  "models train longer.", "",
                  *main_table(res, tuple(m for m in preset.models if m in preset.short), SHORT),
                  ""]
    return lines


def deployment_lines(res: dict[str, Any], prefix: str = "- ") -> list[str]:
    """One line per model: trained vs deployed outputs, and the parameter counts."""
    lines = []
    for model, c in deployment_check(res).items():
        params = ", ".join(f"{k} {c[key]:,}" for k, key in (
            ("base", "params_base"), ("ACNet training", "params_acnet"),
            ("ACNet deployed", "params_deployed")) if c[key] is not None)
        lines.append(f"{prefix}{model}: max |logit difference| {c['max_abs_diff']:.2g}, "
                     f"identical predictions {c['agreement'] * 100:.2f}% (worst of "
                     f"{c['runs']} run{'s' * (c['runs'] != 1)}); parameters: {params}")
    return lines


def _deployment(res: dict[str, Any]) -> list[str]:
    """Section: every run's trained model vs its deployed (fused, BN-folded) form."""
    return ["## Deployment check", "",
            "Every finished run's trained model vs its deployed form on the test set:", "",
            *deployment_lines(res), ""]


def _ablation(preset: StudyPreset, res: dict[str, Any]) -> list[str]:
    """Section: every ablation variant under each test transform."""
    am = preset.ablation_model
    lines = [f"## Ablation ({am}, {_epochs(preset, am, preset.ablation_schedule)} epochs), with "
             f"robustness to flips and rotation", ""]
    table = []
    for slug, variant in ABLATION.items():
        runs = [r for r in res["runs"].values() if r["model"] == am and r["variant"] == slug
                and schedule_of(r) == preset.ablation_schedule and "robustness" in r]
        if runs:
            table.append([variant.label, len(runs),
                          *(_pm([r["robustness"][t] for r in runs]) for t in TRANSFORMS)])
    if table:
        lines += [*markdown_table(["variant", "seeds",
                                   *(TRANSFORM_TITLES[t] for t in TRANSFORMS)], table), ""]
    missing = pending_runs(res, am, tuple(ABLATION), preset.ablation_schedule)
    return lines + ([_pending(missing), ""] if missing else [""])


def _corner(preset: StudyPreset, res: dict[str, Any]) -> list[str]:
    """Section: centre vs corner position of the asymmetric kernels."""
    am = preset.ablation_model
    sch = preset.ablation_schedule
    centre = accuracies(res, am, ACNET, schedule=sch)
    corner = accuracies(res, am, CORNER, schedule=sch)
    lines = [f"## Centre vs corner ACB ({am}, {_epochs(preset, am, sch)} epochs)", ""]
    if centre and corner:
        lines.append(f"ACNet with the asymmetric kernels on the centre row/column: "
                     f"{_pm(centre)} ({len(centre)} seeds); on the last row/column (corner, "
                     f"paper Fig. 6c): {_pm(corner)} ({len(corner)} seeds).")
    missing = pending_runs(res, am, (ACNET, CORNER), sch)
    return lines + ([_pending(missing)] if missing else []) + [""]


def _pattern_mean(m: torch.Tensor, pattern: str) -> float:
    """Mean of a magnitude matrix over a pattern's positions."""
    return m[pattern_mask(pattern, m.shape[0])].mean().item()


def _group_pending(preset: StudyPreset, res: dict[str, Any], present: dict[str, Any]
                   ) -> list[str]:
    """Pending runs of the kernel/sparsity study groups that have no data yet."""
    slugs = tuple(s for t, s in STUDY_GROUPS.items() if t not in present)
    return pending_runs(res, preset.ablation_model, slugs, preset.ablation_schedule) if slugs \
        else []


def _kernels(preset: StudyPreset, res: dict[str, Any]) -> list[str]:
    """Section: kernel magnitude matrices (and their figure)."""
    lines = ["## Kernel magnitude matrix", ""]
    missing = _group_pending(preset, res, res["kernel_magnitude"])
    if not res["kernel_magnitude"]:
        return [*lines, _pending(missing), ""] if missing else []
    mats = {k: torch.tensor(v) for k, v in res["kernel_magnitude"].items()}
    lines += ["Σ|w| per kernel position of every BN-folded d×d kernel of the deployed model, "
              "normalized per layer and averaged (paper Fig. 6), averaged over seeds.", "",
              "![kernel magnitude](kernel_magnitude.png)", ""]
    for k, m in sorted(mats.items(), key=lambda km: km[0] != "base"):  # the baseline first
        d = m.shape[0]
        lines.append(f"- {k}: centre {m[d // 2, d // 2].item():.3f}, skeleton mean "
                     f"{_pattern_mean(m, 'skeleton'):.3f}, corner mean "
                     f"{_pattern_mean(m, 'corners'):.3f}")
    return lines + (["", _pending(missing)] if missing else []) + [""]


def _test_images(preset: StudyPreset) -> str:
    """Which test images the analyses score."""
    n = preset.analysis_test_limit
    return f"accuracy on the first {n:,} test images" if n else "accuracy on the full test set"


SPARSITY_COLUMNS = 6  # fractions shown in the report's table (the figure has every one)


def _sparsity(preset: StudyPreset, res: dict[str, Any]) -> list[str]:
    """Section: accuracy after sparsifying skeleton, corners, all (and the figure)."""
    lines = ["## Sparsifying the skeleton vs the corners", ""]
    missing = _group_pending(preset, res, res["sparsity"])
    if not res["sparsity"]:
        return [*lines, _pending(missing), ""] if missing else []
    ratios = next(iter(next(iter(res["sparsity"].values())).values()))["ratios"]
    seeds = res.get("sparsity_seed", {})
    lines += [f"Fraction of the weights at the pattern's positions set to zero at random "
              f"(mean ± std over {preset.draws} draws; one run per group: "
              + ", ".join(f"{t} seed {s}" for t, s in seeds.items())
              + f"; {_test_images(preset)}).", "", "![sparsity](sparsity.png)", ""]
    shown = [i for i, r in enumerate(ratios) if i % 2 == 0 or i == len(ratios) - 1] \
        if len(ratios) > SPARSITY_COLUMNS else list(range(len(ratios)))
    if len(shown) < len(ratios):
        lines += ["Accuracy (%) at every other fraction zeroed; every fraction is in "
                  "`results.json` (`sparsity`):", ""]
    lines += ["| model | pattern | " + " | ".join(f"{ratios[i]:g}" for i in shown) + " |",
              "|---|---|" + "---|" * len(shown)]
    for title, study in res["sparsity"].items():
        for pattern, cur in study.items():
            lines.append(f"| {title} | {pattern} | "
                         + " | ".join(f"{cur['mean'][i] * 100:.1f}" for i in shown) + " |")
    return lines + [""] + ([_pending(missing), ""] if missing else [])


def _rise_cell(r: dict[str, Any] | None) -> str:
    """'+0.12 (epochs 12 → 15)' or n/a."""
    if not r:
        return "n/a (too few epochs)"
    return f"{r['rise'] * 100:+.2f} (epoch {r['from_epoch']} → {r['to_epoch']})"


def _convergence(p: dict[str, Any]) -> str:
    """Whether the study's schedule had converged, from the longer run and the late rise."""
    delta, noise, rise = p["vs_mean"], p["noise"], p["rise_base"]
    if noise is None:
        return "too few seeds to judge seed noise"
    band = f"±{noise * 100:.2f}"
    if abs(delta) > noise:
        return (f"outside seed noise ({band}): the {p['epochs']}-epoch schedule had NOT "
                f"converged" if delta > 0 else f"outside seed noise ({band}), lower: longer "
                f"training did worse, the {p['epochs']}-epoch schedule had converged")
    if rise and rise["rise"] > noise:
        return (f"within seed noise ({band}), but the baseline's mean test accuracy still rose "
                f"{rise['rise'] * 100:+.2f} over epochs {rise['from_epoch']}-"
                f"{rise['to_epoch']}: not clearly converged")
    return f"within seed noise ({band}): the {p['epochs']}-epoch schedule had converged"


def _plateau_words(model: str, p: dict[str, Any]) -> str:
    """The plateau check of one model in one plain sentence."""
    same = "" if not p["paired"] else " (same seed: " + ", ".join(
        f"seed {k} {v * 100:+.2f}" for k, v in p["paired"].items()) + ")"
    n_long = len(p["long_runs"])
    long = "the baseline" if n_long == 1 else f"the {n_long}-seed baseline mean"
    return (f"{model}: {p['long_epochs']} instead of {p['epochs']} epochs changes {long} by "
            f"{p['vs_mean'] * 100:+.2f} points against the {len(p['base'])}-seed mean{same}, "
            f"{_convergence(p)}.")


def _short_cell(p: dict[str, Any]) -> str:
    """The baseline on the short schedule, and how much the study's schedule added to it."""
    if not p.get("short"):
        return "–"
    cell = f"{_pm(p['short'])} ({p['short_epochs']})"
    if p.get("base"):
        gain = mean_std(p["base"])[0] - mean_std(p["short"])[0]
        cell += f"; {p['epochs']} epochs add {gain * 100:+.2f}"
    return cell


def _plateau(preset: StudyPreset, res: dict[str, Any]) -> list[str]:
    """Section: has the schedule converged? Longer baseline vs the study's, and late rises."""
    plateau = res.get("plateau", {})
    pct = round(PLATEAU_FRACTION * 100)
    who = "every seed" if preset.plateau_comparison else "first seed"
    lines = ["## Has the schedule converged?", "",
             f"The baseline on the short schedule and on the study's (mean over seeds), the "
             f"rise of its mean test accuracy over the last {pct} % of the epochs (training "
             f"curves), and the baseline on the long schedule ({who}).", ""]
    headers = ["model", "baseline, short schedule (epochs)", "baseline (epochs)",
               "rise, last epochs", "baseline, long schedule (epochs)",
               "long − study's, mean (same seed)", "rise, last epochs (long)"]
    table: list[list[str]] = []
    words = []
    for model in preset.models:
        p = plateau.get(model, {})
        if not p.get("base"):
            continue
        cells = [_short_cell(p), f"{_pm(p['base'])} ({p['epochs']})", _rise_cell(p["rise_base"])]
        missing = pending_runs(res, model, (BASE,), LONG)
        if "long" in p:
            seeds = "" if len(p["long_runs"]) == 1 else f", {len(p['long_runs'])} seeds"
            same = ", ".join(f"{v * 100:+.2f}" for v in p["paired"].values())
            cells += [f"{_pm(p['long_runs'])} ({p['long_epochs']}{seeds})"
                      + (f"; {_pending(missing)}" if missing else ""),
                      f"{p['vs_mean'] * 100:+.2f}" + (f" ({same})" if same else ""),
                      _rise_cell(p["rise_long"])]
            words.append(_plateau_words(model, p))
        else:
            cells += [_pending(missing) if model in preset.plateau else "not planned", "–",
                      "–"]
        table.append([model, *cells])
    if not table:
        return [*lines, _pending(pending_runs(res, variants=(BASE,), schedule=MAIN)), ""]
    return [*lines, *markdown_table(headers, table), "", *(f"- {w}" for w in words),
            *([""] if words else [])]


def _curves(preset: StudyPreset, res: dict[str, Any]) -> list[str]:
    """Section: training curves, mean ± std over seeds (figure)."""
    lines = ["## Training curves", ""]
    panels = curve_panels(preset, res, _ablation_runs(preset))
    if panels:
        lines += [_curves_caption(preset, panels), "", "![training curves](training_curves.png)",
                  ""]
    return [*lines, "The numbers behind every table are in `results.json`, next to this "
                    "report."]


def _curves_caption(preset: StudyPreset, panels: dict[str, dict[str, Any]]) -> str:
    """What the training-curve figure shows, read from its panels (only lines it draws)."""
    models = [p for p in panels if p in preset.models]
    keys = {k for p in models for k in panels[p]}
    what = [LABELS[s] for s in (BASE, ACNET) if s in keys]
    text = (f"Test accuracy after each epoch, mean ± std over seeds: "
            f"{' and '.join(what)} on the study's schedule, one panel per model "
            f"({', '.join(models)})")
    for tag, style, name in ((SCHEDULE_TAGS[SHORT], "dotted", "short"),
                             (SCHEDULE_TAGS[LONG], "dashed", "long")):
        on = [LABELS[s] for s in (BASE, ACNET) if s + tag in keys]
        if on:
            text += f"; {style}: {' and '.join(on)} on the {name} schedule"
    extra = [p for p in panels if p not in models]
    if extra:
        text += (f"; then {len(extra)} panel{'s' if len(extra) > 1 else ''} of the ablation "
                 f"variants ({_ablation_runs(preset)}), with ACNet for reference")
    return text + "."


def write_report(preset: StudyPreset, out: Path, res: dict[str, Any]) -> Path:
    """report.md with the tables and the PNG figures beside it."""
    out = Path(out)
    draw_figures(preset, res, out, _ablation_runs(preset))
    ablation = [*_ablation(preset, res), *_corner(preset, res)] if preset.ablation else []
    lines = [*_header(preset, res), *_main(preset, res), *_deployment(res),
             *_plateau(preset, res), *ablation, *_kernels(preset, res),
             *_sparsity(preset, res), *int8_section(preset, res),
             *inference_cost_section(preset, res), *training_cost_section(preset, res),
             *_curves(preset, res)]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
