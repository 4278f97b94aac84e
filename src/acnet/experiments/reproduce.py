"""`acnet reproduce`: run a study's matrix (resumable), analyze the runs, write the report."""

from __future__ import annotations

import json
import logging
import platform
import time
from pathlib import Path
from typing import Any

import torch

from ..analysis import kernel_magnitude, robustness, sparsity_study
from ..analysis.cost import count_macs, count_params, latency_ratio
from ..analysis.kernels import dominant_kernel_size
from ..bench import machine
from ..convert import deploy
from ..io import save_json
from ..runs import load_deployed_model, load_trained, run_test_split
from ..train import RunDir, TrainConfig, build_base_model, train
from .presets import ACNET, BASE, CORNER, STUDY_PRESETS, RunSpec, StudyPreset, runs_of
from .report import main_table, write_report
from .results import RESULTS, deployment_check, mean_std

log = logging.getLogger(__name__)

__all__ = ["reproduce", "analyze_runs", "write_report", "summary", "RESULTS"]

# kernel magnitude and sparsity: these variants of the ablation model, under these titles
STUDY_GROUPS = {"base": BASE, "ACNet": ACNET, "corner ACNet": CORNER}


def reproduce(preset_name: str, out: str | Path, *, device: str = "auto",
              data_dir: str | None = None, analyze: bool = True, command: str | None = None,
              seeds: tuple[int, ...] | None = None) -> Path:
    """Run (or resume) every run of the preset under ``out/runs``, then write ``out/report.md``.

    ``command``: the command line to quote in the report (default: an equivalent one).
    ``seeds``: other seeds than the preset's.
    """
    if preset_name not in STUDY_PRESETS:
        raise ValueError(f"unknown preset {preset_name!r}; choose one of "
                         f"{', '.join(STUDY_PRESETS)}")
    preset = STUDY_PRESETS[preset_name]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs = runs_of(preset, seeds)
    _train_all(runs, out, device, data_dir)
    if analyze:
        results = analyze_runs(preset, out, runs)
        results["command"] = command or f"acnet reproduce --preset {preset_name} --out {out}"
        results["seeds"] = list(dict.fromkeys(s.seed for s in runs))
        save_json(out / RESULTS, results)
        write_report(preset, out, results)
    return out / "report.md"


def _train_all(runs: list[RunSpec], out: Path, device: str, data_dir: str | None) -> None:
    """Train every run that is not finished (resuming interrupted ones)."""
    t0 = time.perf_counter()
    for i, spec in enumerate(runs, 1):
        cfg = TrainConfig(**{**spec.config, "device": device, "data_dir": data_dir})
        run = RunDir(out / "runs" / spec.name)
        log.info("[%d/%d] %s%s", i, len(runs), spec.name, " (done)" if run.finished else "")
        train(cfg, run.path, resume=run.started)
    log.info("all %d runs finished in %.0f s", len(runs), time.perf_counter() - t0)


def _run(out: Path, spec: RunSpec) -> RunDir:
    """The run directory of ``spec`` in study ``out``."""
    return RunDir(out / "runs" / spec.name)


def _robustness(run: RunDir) -> dict[str, float]:
    """Accuracy of the deployed model under each test transform (cached in the run)."""
    cached = run.read_cache("robustness")
    if cached is None:
        cfg = run.read_config()
        cached = robustness(load_deployed_model(run.path),
                            lambda t: run_test_split(cfg, transform=t).loader)
        run.write_cache("robustness", cached)
    return cached


def _run_entries(preset: StudyPreset, out: Path, runs: list[RunSpec]) -> dict[str, Any]:
    """Per run: its metrics, its training curve, and (ablation model) its robustness."""
    entries = {}
    for spec in runs:
        run = _run(out, spec)
        entry = {"model": spec.model, "variant": spec.variant, "label": spec.label,
                 "seed": spec.seed, **run.read_metrics(), "curve": run.metrics_lines()}
        if preset.ablation and spec.model == preset.ablation_model:
            entry["robustness"] = _robustness(run)
        entries[spec.name] = entry
    return entries


def _sparsity(preset: StudyPreset, run: RunDir, model: torch.nn.Module) -> dict[str, Any]:
    """The sparsity study of one run (cached in the run)."""
    cached = run.read_cache("sparsity")
    if cached is None:
        loader = run_test_split(run.read_config(), test_limit=preset.analysis_test_limit).loader
        cached = sparsity_study(model, loader, list(preset.ratios), preset.draws)
        run.write_cache("sparsity", cached)
    return cached


def _kernels_and_sparsity(preset: StudyPreset, out: Path, runs: list[RunSpec]
                          ) -> dict[str, Any]:
    """Kernel magnitude (mean over seeds) and sparsity curves (first seed) per study group."""
    res: dict[str, Any] = {"kernel_magnitude": {}, "sparsity": {}}
    for title, slug in STUDY_GROUPS.items():
        specs = [s for s in runs if s.model == preset.ablation_model and s.variant == slug]
        trained = [load_trained(_run(out, s).path) for s in specs]
        mats = [kernel_magnitude(t, dominant_kernel_size(t)) for t in trained]
        if mats and len({m.shape[0] for m in mats}) == 1:
            res["kernel_magnitude"][title] = torch.stack(mats).mean(0).tolist()
        if specs:
            res["sparsity"][title] = _sparsity(preset, _run(out, specs[0]), trained[0])
    sizes = {len(v) for v in res["kernel_magnitude"].values()}
    res["kernel_size"] = sizes.pop() if len(sizes) == 1 else None
    return res


def _cost(model_name: str, out: Path, runs: list[RunSpec], entries: dict[str, Any]
          ) -> dict[str, Any]:
    """Params, MACs and interleaved latency of base vs deployed ACNet, and training time."""
    base_spec, acb_spec = (next(s for s in runs if s.model == model_name and s.variant == v)
                           for v in (BASE, ACNET))
    cfg = _run(out, base_spec).read_config()
    shape = (1, cfg.in_channels, cfg.input_size, cfg.input_size)
    base = deploy(build_base_model(cfg).eval(), fold_bn=True)
    acb_trained = load_trained(_run(out, acb_spec).path)
    acb = deploy(acb_trained, fold_bn=True)
    lat = latency_ratio({"base": base, "acnet": acb}, shape)

    def seconds(variant: str) -> float:
        return mean_std([r["seconds"] for r in entries.values()
                         if r["model"] == model_name and r["variant"] == variant])[0]

    return {"params_base": count_params(base), "params_acnet_deployed": count_params(acb),
            "params_acnet_training": count_params(acb_trained),
            "macs_base": count_macs(base, shape), "macs_acnet_deployed": count_macs(acb, shape),
            "latency_ms_base": lat["ms"]["base"], "latency_ms_acnet": lat["ms"]["acnet"],
            "latency_ratio_acnet": lat["ratio"]["acnet"],
            "train_seconds_base": seconds(BASE), "train_seconds_acnet": seconds(ACNET)}


def analyze_runs(preset: StudyPreset, out: Path, runs: list[RunSpec]) -> dict[str, Any]:
    """Accuracy tables, robustness, kernel magnitudes, sparsity curves, inference cost."""
    entries = _run_entries(preset, out, runs)
    res: dict[str, Any] = {"preset": preset.name, "dataset": preset.dataset,
                           "seeds": list(preset.seeds), "runs": entries,
                           **_kernels_and_sparsity(preset, out, runs)}
    res["cost"] = {m: _cost(m, out, runs, entries) for m in preset.models}
    res["software"] = {"python": platform.python_version(), "torch": torch.__version__,
                       "platform": platform.platform()}
    res["machine"] = machine()
    return res


def summary(study_dir: str | Path) -> str:
    """The main table and the deployment check of a finished study, as text."""
    res = json.loads((Path(study_dir) / RESULTS).read_text())
    preset = STUDY_PRESETS.get(res["preset"])
    models = preset.models if preset else tuple(dict.fromkeys(
        r["model"] for r in res["runs"].values()))
    lines = ["## Main result", "", *main_table(res, models), "",
             "Deployment check (every run: trained model vs its deployed, BN-folded form on the "
             "test set):"]
    for model, c in deployment_check(res).items():
        lines.append(f"  {model}: max |logit difference| {c['max_abs_diff']:.2g}, identical "
                     f"predictions {c['agreement'] * 100:.2f}%; parameters: base "
                     f"{c['params_base']:,}, ACNet training {c['params_acnet']:,} -> deployed "
                     f"{c['params_deployed']:,}")
    return "\n".join(lines)

