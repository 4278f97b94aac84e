"""`acnet reproduce`: run a study's matrix (resumable), analyze the runs, write the report."""

from __future__ import annotations

import json
import logging
import math
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ..io import save_json
from ..train import TrainConfig, train
from .presets import ABLATION, STUDY_PRESETS, RunSpec, StudyPreset, runs_of

log = logging.getLogger(__name__)

__all__ = ["reproduce", "analyze_runs", "write_report"]


def _mean_std(xs: list[float]) -> tuple[float, float]:
    if not xs:
        return float("nan"), float("nan")
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def _pm(xs: list[float], pct: bool = True) -> str:
    m, s = _mean_std(xs)
    if math.isnan(m):
        return "n/a"
    k = 100 if pct else 1
    return f"{m * k:.2f} ± {s * k:.2f}"


def reproduce(preset_name: str, out: str | Path, *, device: str = "auto",
              data_dir: str | None = None, analyze: bool = True,
              command: str | None = None) -> Path:
    """Run (or resume) every run of the preset under ``out/runs``, then write ``out/report.md``."""
    if preset_name not in STUDY_PRESETS:
        raise ValueError(f"unknown preset {preset_name!r}; choose one of "
                         f"{', '.join(STUDY_PRESETS)}")
    preset = STUDY_PRESETS[preset_name]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs = runs_of(preset)
    t0 = time.perf_counter()
    for i, spec in enumerate(runs, 1):
        cfg = TrainConfig(**{**spec.config, "device": device, "data_dir": data_dir})
        run_dir = out / "runs" / spec.name
        done = (run_dir / "metrics.json").is_file()
        log.info("[%d/%d] %s%s", i, len(runs), spec.name, " (done)" if done else "")
        train(cfg, run_dir, resume=True)
    log.info("all %d runs finished in %.0f s", len(runs), time.perf_counter() - t0)
    if analyze:
        results = analyze_runs(preset, out, runs)
        results["command"] = command or " ".join(["acnet"] + sys.argv[1:])
        save_json(out / "results.json", results)
        write_report(preset, out, results)
    return out / "report.md"


def _test_loader(run_dir: Path, transform: str, limit: int | None):
    from ..train.config import load_config
    from ..train.distributed import DistInfo
    from ..train.engine import load_data

    cfg = load_config(run_dir)
    cfg.test_limit = limit or cfg.test_limit
    cfg.train_limit = min(cfg.train_limit or 10**9, cfg.batch_size)
    return load_data(cfg, DistInfo(), transform=transform).test


def analyze_runs(preset: StudyPreset, out: Path, runs: list[RunSpec]) -> dict[str, Any]:
    """Accuracy tables, robustness, kernel magnitudes, sparsity curves, inference cost."""
    from ..analysis import kernel_magnitude, sparsity_study
    from ..analysis.cost import count_macs, latency_ratio
    from ..analysis.kernels import dominant_kernel_size
    from ..convert import deploy
    from ..runs import load_deployed_model, load_trained
    from ..train.config import build_base_model, load_config
    from ..train.engine import evaluate

    res: dict[str, Any] = {"preset": preset.name, "dataset": preset.dataset,
                           "seeds": list(preset.seeds), "runs": {}}
    for spec in runs:
        d = out / "runs" / spec.name
        m = json.loads((d / "metrics.json").read_text())
        entry = {"model": spec.model, "label": spec.label, "seed": spec.seed, **m,
                 "curve": [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]}
        if spec.model == preset.ablation_model:
            cache = d / "robustness.json"
            if cache.is_file():
                entry["robustness"] = json.loads(cache.read_text())
            else:
                model = load_deployed_model(d)
                rob = {t: evaluate(model, _test_loader(d, t, None))[0]
                       for t in ("none", "hflip", "vflip", "rot90")}
                save_json(cache, rob)
                entry["robustness"] = rob
        res["runs"][spec.name] = entry

    # kernel magnitude and sparsity: the ablation model's base, ACNet and corner runs
    am = preset.ablation_model
    groups = {"base": "base", "ACNet": "+both, branch BN (ACNet)", "corner ACNet": "corner ACNet"}
    res["kernel_magnitude"], res["sparsity"] = {}, {}
    for title, label in groups.items():
        names = [s.name for s in runs if s.model == am and s.label == label]
        trained = [load_trained(out / "runs" / n) for n in names]
        mats = [kernel_magnitude(t, dominant_kernel_size(t)) for t in trained]
        ks = {m.shape[0] for m in mats}
        if mats and len(ks) == 1:
            res["kernel_magnitude"][title] = torch.stack(mats).mean(0).tolist()
        first = out / "runs" / names[0]
        cache = first / "sparsity.json"
        if cache.is_file():
            res["sparsity"][title] = json.loads(cache.read_text())
        else:
            k = trained[0]
            loader = _test_loader(first, "none", preset.analysis_test_limit)
            study = sparsity_study(k, loader, list(preset.ratios), preset.draws)
            save_json(cache, study)
            res["sparsity"][title] = study
    kernel_sizes = {len(v) for v in res["kernel_magnitude"].values()}
    res["kernel_size"] = kernel_sizes.pop() if len(kernel_sizes) == 1 else None

    # inference cost per model: base vs deployed ACNet (same architecture by construction)
    res["cost"] = {}
    for model_name in preset.models:
        base_run = next(s for s in runs if s.model == model_name and s.label == "base")
        acb_run = next(s for s in runs if s.model == model_name
                       and s.label == "+both, branch BN (ACNet)")
        cfg = load_config(out / "runs" / base_run.name)
        shape = (1, cfg.in_channels, cfg.input_size, cfg.input_size)
        base = deploy(build_base_model(cfg).eval(), fold_bn=True)
        acb_trained = load_trained(out / "runs" / acb_run.name)
        acb = deploy(acb_trained, fold_bn=True)
        lat = latency_ratio({"base": base, "acnet": acb}, shape)
        res["cost"][model_name] = {
            "params_base": sum(p.numel() for p in base.parameters()),
            "params_acnet_deployed": sum(p.numel() for p in acb.parameters()),
            "params_acnet_training": sum(p.numel() for p in acb_trained.parameters()),
            "macs_base": count_macs(base, shape), "macs_acnet_deployed": count_macs(acb, shape),
            "latency_ms_base": lat["base"], "latency_ms_acnet": lat["acnet"],
            "train_seconds_base": _mean_std([r["seconds"] for r in res["runs"].values()
                                             if r["model"] == model_name
                                             and r["label"] == "base"])[0],
            "train_seconds_acnet": _mean_std([r["seconds"] for r in res["runs"].values()
                                              if r["model"] == model_name and r["label"]
                                              == "+both, branch BN (ACNet)"])[0],
        }
    res["software"] = {"python": platform.python_version(), "torch": torch.__version__,
                       "platform": platform.platform()}
    from ..bench import machine

    res["machine"] = machine()
    return res


def _accs(res, model, label, key="test_acc"):
    return [r[key] for r in res["runs"].values() if r["model"] == model and r["label"] == label]


def write_report(preset: StudyPreset, out: Path, res: dict[str, Any]) -> Path:
    """report.md with the tables and the PNG figures beside it."""
    from ..analysis import plots

    lines = [f"# ACNet study: preset `{preset.name}`", "",
             f"{preset.description}.", "",
             f"Command: `{res.get('command', '')}`", "",
             f"Dataset: {preset.dataset}; seeds: {', '.join(map(str, preset.seeds))}; "
             f"machine: {res['machine'].get('gpu') or res['machine']['cpu']} "
             f"({res['machine']['threads']} threads); Python {res['software']['python']}, "
             f"PyTorch {res['software']['torch']}.", "",
             "All accuracies are top-1 on the test set in %, mean ± sample std over seeds, of "
             "the **deployed** model (ACBlocks fused into plain convs).", "",
             "## Main result", "",
             "| model | epochs | train images | baseline | ACNet | gain | beyond seed noise? |",
             "|---|---|---|---|---|---|---|"]
    for model in preset.models:
        b = _accs(res, model, "base", "deployed_test_acc")
        a = _accs(res, model, "+both, branch BN (ACNet)", "deployed_test_acc")
        gain = _mean_std(a)[0] - _mean_std(b)[0]
        se = math.sqrt((_mean_std(a)[1] ** 2 / max(len(a), 1))
                       + (_mean_std(b)[1] ** 2 / max(len(b), 1)))
        if len(a) < 2 or len(b) < 2:
            verdict = "n/a"
        elif abs(gain) > 2 * se:
            verdict = "yes, better" if gain > 0 else "yes, worse"
        else:
            verdict = "no"
        run = next(r for r in res["runs"].values() if r["model"] == model)
        lines.append(f"| {model} | {run['epochs']} | {run['train_images']} | {_pm(b)} | "
                     f"{_pm(a)} | {gain * 100:+.2f} | {verdict} (2 s.e. = {2 * se * 100:.2f}) |")
    lines += ["", "\"Beyond seed noise\" means the difference exceeds twice the standard error "
              "of the difference of the two means.", "",
              f"## Ablation ({preset.ablation_model}), with robustness to flips and rotation", "",
              "| variant | normal | horizontal flip | vertical flip | rotate 90° |",
              "|---|---|---|---|---|"]
    am = preset.ablation_model
    for label in ABLATION:
        rows = [r for r in res["runs"].values() if r["model"] == am and r["label"] == label]
        if not rows:
            continue
        cells = [_pm([r["robustness"][t] for r in rows if "robustness" in r])
                 for t in ("none", "hflip", "vflip", "rot90")]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    c = _accs(res, am, "corner ACNet", "deployed_test_acc")
    a = _accs(res, am, "+both, branch BN (ACNet)", "deployed_test_acc")
    lines += ["", "## Centre vs corner ACB", "",
              f"ACNet with the asymmetric kernels on the centre row/column: {_pm(a)}; on the "
              f"last row/column (corner, paper Fig. 6c): {_pm(c)}.", ""]
    # kernel magnitude
    if res["kernel_magnitude"]:
        mats = {k: torch.tensor(v) for k, v in res["kernel_magnitude"].items()}
        plots.heatmaps(mats, out / "kernel_magnitude.png",
                       f"{am}: average normalized kernel magnitude")
        lines += ["## Kernel magnitude matrix", "",
                  "Σ|w| per kernel position of every BN-folded d×d kernel, normalized per layer "
                  "and averaged (paper Fig. 6), averaged over seeds.", "",
                  "![kernel magnitude](kernel_magnitude.png)", ""]
        for k, m in mats.items():
            d = m.shape[0]
            centre = m[d // 2, d // 2].item()
            skel = (m[d // 2, :].sum() + m[:, d // 2].sum() - m[d // 2, d // 2]).item()
            skel /= 2 * d - 1
            corners = (m[0, 0] + m[0, -1] + m[-1, 0] + m[-1, -1]).item() / 4
            lines.append(f"- {k}: centre {centre:.3f}, skeleton mean {skel:.3f}, corner mean "
                         f"{corners:.3f}")
        lines.append("")
    # sparsity
    if res["sparsity"]:
        curves = {}
        for title, study in res["sparsity"].items():
            for pattern, cur in study.items():
                curves[f"{title}: {pattern}"] = cur
        plots.sparsity_curves(curves, out / "sparsity.png",
                              f"{am}: accuracy after zeroing kernel weights at random")
        lines += ["## Sparsifying the skeleton vs the corners", "",
                  f"Fraction of the weights at the pattern's positions set to zero at random "
                  f"(mean ± std over {preset.draws} draws; seed-0 runs).", "",
                  "![sparsity](sparsity.png)", "",
                  "| model | pattern | " + " | ".join(
                      f"{r:g}" for r in next(iter(curves.values()))["ratios"]) + " |",
                  "|---|---|" + "---|" * len(next(iter(curves.values()))["ratios"])]
        for title, study in res["sparsity"].items():
            for pattern, cur in study.items():
                lines.append(f"| {title} | {pattern} | " + " | ".join(
                    f"{m * 100:.1f}" for m in cur["mean"]) + " |")
        lines.append("")
    # cost
    lines += ["## Inference cost", "",
              "Deployed with conv-BN folded, batch 1, median CPU latency interleaved in one "
              "process.", "",
              "| model | params base | params ACNet deployed | params ACNet training | MACs base "
              "| MACs ACNet deployed | latency base ms | latency ACNet ms | train s base | "
              "train s ACNet |", "|---|---|---|---|---|---|---|---|---|---|"]
    for model, cst in res["cost"].items():
        lines.append(f"| {model} | {cst['params_base']:,} | {cst['params_acnet_deployed']:,} | "
                     f"{cst['params_acnet_training']:,} | {cst['macs_base']:,} | "
                     f"{cst['macs_acnet_deployed']:,} | {cst['latency_ms_base']:.3f} | "
                     f"{cst['latency_ms_acnet']:.3f} | {cst['train_seconds_base']:.0f} | "
                     f"{cst['train_seconds_acnet']:.0f} |")
    lines += ["", "Params and MACs are counted on the deployed models; \"train s\" is each run's "
              "wall-clock (mean over seeds) as it happened, possibly sharing the machine with "
              "other work: `acnet bench` measures the training cost properly, interleaved."]
    # training curves
    curves = {}
    for r in res["runs"].values():
        if r["seed"] == preset.seeds[0]:
            curves[f"{r['model']} {r['label']}"] = r["curve"]
    plots.training_curves(curves, out / "training_curves.png", "test accuracy per epoch (seed "
                          f"{preset.seeds[0]})")
    lines += ["", "## Training curves", "", "![training curves](training_curves.png)", "",
              "Numbers behind every table: `results.json`; per-run directories: `runs/`."]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
