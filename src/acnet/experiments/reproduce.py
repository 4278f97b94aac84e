"""`acnet reproduce`: run a study's matrix (resumable), analyze the runs, write the report."""

from __future__ import annotations

import json
import logging
import platform
from pathlib import Path
from typing import Any

import torch

from .._env import load_average, machine
from .._files import save_json
from ..analysis import kernel_magnitude, robustness, sparsity_study
from ..analysis.cost import count_macs, count_params, latency_ratio
from ..analysis.kernels import dominant_kernel_size
from ..bench import bench_training
from ..deploy import deploy
from ..errors import InputError
from ..runs import load_deployed_model, run_test_split
from ..train import RunDir, TrainConfig, build_base_model
from ..train.config import resolve, settings_diff
from . import cheap, compare, dense, finetune
from .presets import (
    ABLATION,
    ACNET,
    BASE,
    LONG,
    MAIN,
    ONLINE,
    SHORT,
    STUDY_PRESETS,
    RunSpec,
    StudyPreset,
    legacy_name,
    runs_of,
    tier,
)
from .report import deployment_lines, main_table, progress_lines, write_report
from .results import RESULTS, STUDY_GROUPS, mean_std, plateau_check, schedule_of
from .runner import Job, train_jobs

log = logging.getLogger(__name__)

__all__ = [
    "OTHER_STUDIES",
    "PRESET_NAMES",
    "RESULTS",
    "analyze_runs",
    "reproduce",
    "summary",
    "write_report",
]

# studies with their own run matrix and report (the module has run() and summary())
OTHER_STUDIES = {"finetune": finetune, "dense": dense, "cheap": cheap, "compare": compare}
PRESET_NAMES = (*STUDY_PRESETS, *OTHER_STUDIES)

COST_BENCH = "cost_bench.json"  # the training-step benchmark of each model, in the study dir
BENCH_REPEATS = 10  # interleaved repeats of that benchmark (whatever the preset)
BENCH_WARMUP = 2
INT8_VARIANTS = (BASE, ACNET, ONLINE)  # runs whose deployed model is also measured in INT8
INT8_KEYS = ("onnx_test_acc", "int8_test_acc", "int8_agreement")
INT8_CALIBRATION = 512  # calibration images (training set, seed 0), as `acnet export --int8`
INT8_ONNX = "int8-check.onnx"  # written inside the run dir while measuring, then deleted


def _training_command(out: Path, command: str | None) -> str | None:
    """The command a report-only rewrite quotes: the one the existing results.json recorded
    (the command that trained the runs), else ``command``."""
    try:
        kept = json.loads((out / RESULTS).read_text()).get("command")
    except (OSError, ValueError, AttributeError):
        return command
    return kept if isinstance(kept, str) and kept else command


def reproduce(preset_name: str, out: str | Path, *, device: str = "auto",
              data_dir: str | None = None, analyze: bool = True, command: str | None = None,
              seeds: tuple[int, ...] | None = None, jobs: int = 1, train_runs: bool = True,
              settings: dict[str, Any] | None = None) -> Path:
    """Run (or resume) every run of the preset under ``out/runs``, then write ``out/report.md``.

    ``command``: the command line to quote in the report (default: an equivalent one).
    ``seeds``: other seeds than the preset's. ``jobs``: runs trained at once, in separate
    processes splitting the CPU threads (on 2 CPU cores 2 jobs train about 1.1-1.3× faster), by
    the study's priority and then the longest expected run first (`longest_first`).
    ``train_runs=False``: train nothing; report on the runs finished so far (a study in
    progress). ``settings``: the ``compare`` preset's model, dataset, epochs, forms and recipe
    (see `acnet.experiments.compare.compare_study`); no other preset takes any.

    Args:
        preset_name: ``quick``, ``cpu``, ``paper-cifar10``..., ``cheap``, ``finetune``,
            ``dense`` or ``compare``.
        out: the study directory (rerunning resumes).
        device: ``auto``, ``cpu`` or ``cuda``.
        data_dir: where the dataset is.
        analyze: also run the analyses (kernel magnitude, sparsity...) where the preset has them.
        command: the command line the report quotes.
        seeds: other seeds than the preset's.
        jobs: runs trained at once.
        train_runs: False: train nothing, write the report of the finished runs.
        settings: the compare preset's settings (``model`` required; ``dataset``, ``epochs``,
            ``batch_size``, ``forms`` and recipe fields such as ``lr``, ``init_from``,
            ``image_size``, ``val_fraction``).

    Returns:
        The path of the study's ``report.md``.
    """
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise InputError(f"jobs must be a positive integer, got {jobs!r}", params=("jobs",))
    _check_study_dir(Path(out), preset_name)
    if not train_runs:
        command = _training_command(Path(out), command)
    if settings and preset_name != "compare":
        raise InputError(f"{', '.join(sorted(settings))} apply to the compare preset; preset "
                         f"{preset_name!r} has its own settings", params=tuple(sorted(settings)))
    if preset_name == "compare":
        return compare.run(out, workers=jobs, device=device, data_dir=data_dir, seeds=seeds,
                           train_runs=train_runs, command=command or "", settings=settings)
    if preset_name in OTHER_STUDIES:
        return OTHER_STUDIES[preset_name].run(out, workers=jobs, device=device,
                                              data_dir=data_dir, seeds=seeds,
                                              train_runs=train_runs, command=command or "")
    if preset_name not in STUDY_PRESETS:
        raise InputError(f"unknown preset {preset_name!r}; choose one of "
                         f"{', '.join(PRESET_NAMES)}", params=("preset",))
    preset = STUDY_PRESETS[preset_name]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    planned = runs = runs_of(preset, seeds)
    _rename_legacy(runs, out)
    if train_runs:
        _train_all(runs, out, device, data_dir, jobs)
    else:
        runs = [s for s in runs if _run(out, s).finished]
        if not runs:
            raise InputError(f"no finished runs of preset {preset_name!r} in {out / 'runs'}")
    if analyze:
        results = analyze_runs(preset, out, runs, planned)
        results["command"] = command or f"acnet reproduce --preset {preset_name} --out {out}"
        results["seeds"] = list(dict.fromkeys(s.seed for s in runs))
        save_json(out / RESULTS, results)
        write_report(preset, out, results)
    return out / "report.md"


def _check_study_dir(out: Path, preset_name: str) -> None:
    """Refuse a directory that holds a training run or another study's results."""
    if RunDir(out).config_file.is_file():
        raise InputError(f"{out} is a training run directory, not a study directory; choose "
                         f"another out directory", params=("out",))
    results = out / RESULTS
    if results.is_file():
        try:
            data = json.loads(results.read_text())
        except (OSError, json.JSONDecodeError):
            return  # rewritten below
        other = data.get("study") or data.get("preset")
        if other and other != preset_name:
            raise InputError(f"{out} holds the {other!r} study, not {preset_name!r}; choose "
                             f"another out directory", params=("out", "preset"))


def _rename_legacy(runs: list[RunSpec], out: Path) -> None:
    """Move a study's run directories from their former names to today's (the plateau
    baseline ``m-long-s0`` is now the long schedule's ``m-base-e<epochs>-s0``), where the run
    has the settings of today's (else it stays, with a warning)."""
    for spec in runs:
        old = legacy_name(spec)
        if old is None:
            continue
        src, dst = out / "runs" / old, out / "runs" / spec.name
        if not src.is_dir() or dst.exists():
            continue
        try:
            diff = settings_diff(resolve(TrainConfig(**spec.config)), RunDir(src).read_config())
        except (FileNotFoundError, ValueError) as exc:  # no or no valid config.json
            diff = {RunDir(src).config_file.name: ("readable", str(exc))}
        if diff:
            log.warning("not renaming %s to %s: other settings (%s)", src, dst.name,
                        ", ".join(f"{k}: {b!r}, now {a!r}" for k, (a, b) in diff.items()))
            continue
        log.info("renaming run %s to %s", src, dst.name)
        src.rename(dst)


def _train_all(runs: list[RunSpec], out: Path, device: str, data_dir: str | None,
               jobs: int = 1) -> None:
    """Train every run that is not finished (resuming interrupted ones), ``jobs`` at a time,
    by the study's priority (`longest_first`) when several train at once."""
    todo = [(s, s.config) for s in runs if not _run(out, s).finished]
    order = longest_first(todo, runs, out) if jobs > 1 else todo
    done = [s for s in runs if _run(out, s).finished]
    train_jobs([Job(s.name, s.config) for s, _ in order] + [Job(s.name, s.config) for s in done],
               out / "runs", workers=jobs, overrides={"device": device, "data_dir": data_dir})


def longest_first(todo: list[tuple[RunSpec, dict[str, Any]]], runs: list[RunSpec], out: Path
                  ) -> list[tuple[RunSpec, dict[str, Any]]]:
    """The pending runs by the study's priority (`tier`: the main comparison, then the short
    schedules and ablation, then the long schedules, model by model in the study's order and
    seed by seed, so that a study spanning sessions completes one model's comparison, paired by
    seed, before the next), and within each, longest expected training first (stable), so that
    with several jobs the study does not end on one long run while the other workers idle, and
    a study stopped part-way has its most important runs.

    Expected time: the run's remaining epochs times the mean seconds per epoch of the study's
    finished runs of the same model and variant, else of the same model, else of all finished
    runs; with nothing finished, the epochs alone.
    """
    per_epoch: dict[tuple[str, str], list[float]] = {}
    for spec in runs:
        m = _run(out, spec).read_metrics()
        if m and m.get("seconds") and m.get("epochs"):
            per_epoch.setdefault((spec.model, spec.variant), []).append(m["seconds"] / m["epochs"])
    rank = {m: i for i, m in enumerate(dict.fromkeys(s.model for s in runs))}

    def mean(xs: list[float]) -> float | None:
        return sum(xs) / len(xs) if xs else None

    everything = mean([x for xs in per_epoch.values() for x in xs]) or 1.0

    def expected(item: tuple[RunSpec, dict[str, Any]]) -> float:
        spec, config = item
        rate = (mean(per_epoch.get((spec.model, spec.variant), []))
                or mean([x for (mod, _), xs in per_epoch.items() if mod == spec.model for x in xs])
                or everything)
        done = len(_run(out, spec).metrics_lines())
        return max(int(config.get("epochs", 1)) - done, 0) * rate

    def key(item: tuple[RunSpec, dict[str, Any]]) -> tuple[int, int, int, float]:
        spec = item[0]
        if spec.schedule == LONG:
            return tier(spec), rank.get(spec.model, 0), spec.seed, -expected(item)
        return tier(spec), 0, 0, -expected(item)

    return sorted(todo, key=key)


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
        entry = {"model": spec.model, "variant": spec.variant, "schedule": spec.schedule,
                 "label": spec.label, "seed": spec.seed, **(run.read_metrics() or {}),
                 "curve": run.metrics_lines()}
        if (preset.ablation and spec.model == preset.ablation_model
                and spec.variant in ABLATION and spec.schedule == preset.ablation_schedule):
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
    """Kernel magnitude and sparsity per study group (the ablation model on the ablation's
    schedule), from deployed.safetensors (BN folded)."""
    res: dict[str, Any] = {"kernel_magnitude": {}, "sparsity": {}, "sparsity_seed": {}}
    for title, slug in STUDY_GROUPS.items():
        specs = [s for s in runs if s.model == preset.ablation_model and s.variant == slug
                 and s.schedule == preset.ablation_schedule]
        models = [load_deployed_model(_run(out, s).path) for s in specs]
        mats = [kernel_magnitude(m, dominant_kernel_size(m)) for m in models]
        if mats and len({m.shape[0] for m in mats}) == 1:
            res["kernel_magnitude"][title] = torch.stack(mats).mean(0).tolist()
        if specs:
            res["sparsity"][title] = _sparsity(preset, _run(out, specs[0]), models[0])
            res["sparsity_seed"][title] = specs[0].seed
    sizes = {len(v) for v in res["kernel_magnitude"].values()}
    res["kernel_size"] = sizes.pop() if len(sizes) == 1 else None
    return res


def _cost(model_name: str, out: Path, runs: list[RunSpec], entries: dict[str, Any]
          ) -> dict[str, Any] | None:
    """Params, MACs and latency of base vs deployed ACNet; None until both have a run."""
    base_spec, acb_spec = (next((s for s in runs if s.model == model_name and s.variant == v
                                 and s.schedule == MAIN), None) for v in (BASE, ACNET))
    if base_spec is None or acb_spec is None:
        return None
    cfg = _run(out, base_spec).read_config()
    channels, _, size = cfg.data_shape
    shape = (1, channels, size, size)
    base = deploy(build_base_model(cfg).eval(), fold_bn=True)
    acb = deploy(load_deployed_model(_run(out, acb_spec).path), fold_bn=True)
    load0 = load_average()
    lat = latency_ratio({"base": base, "acnet": acb}, shape)
    load = [load0, load_average()]

    def seconds(variant: str) -> float:
        return mean_std([r["seconds"] for r in entries.values() if r["model"] == model_name
                         and r["variant"] == variant and r["schedule"] == MAIN])[0]

    return {"params_base": count_params(base), "params_acnet_deployed": count_params(acb),
            "params_acnet_training": entries[acb_spec.name]["params_train"],
            "macs_base": count_macs(base, shape), "macs_acnet_deployed": count_macs(acb, shape),
            "latency_ms_base": lat["ms"]["base"], "latency_ms_acnet": lat["ms"]["acnet"],
            "latency_ratio_acnet": lat["ratio"]["acnet"], "load_avg": load,
            "train_seconds_base": seconds(BASE), "train_seconds_acnet": seconds(ACNET)}


def _training_cost(preset: StudyPreset, out: Path, runs: list[RunSpec]) -> dict[str, Any]:
    """Per model: `acnet bench`'s training-step timing, cached in ``out/cost_bench.json``."""
    path = out / COST_BENCH
    cache = json.loads(path.read_text()) if path.is_file() else {}
    for model in preset.models:
        spec = next((s for s in runs if s.model == model), None)
        if spec is None or model in cache:
            continue
        cfg = _run(out, spec).read_config()
        log.info("training-step benchmark: %s", model)
        r = bench_training(model, torch.device("cpu"), batch=cfg.batch_size,
                           repeats=BENCH_REPEATS, warmup=BENCH_WARMUP,
                           image=cfg.data_shape[2], in_channels=cfg.data_shape[0])
        cache[model] = {**r, "repeats": BENCH_REPEATS, "warmup": BENCH_WARMUP,
                        "threads": torch.get_num_threads()}
        save_json(path, cache)
    return {m: cache[m] for m in preset.models if m in cache}


def _int8_of(run: RunDir, calibration_images: int) -> dict[str, Any]:
    """fp32 vs INT8 ONNX accuracy of a run, cached in export.json (the .onnx files deleted)."""
    cached = run.read_export()
    if cached and all(k in cached for k in INT8_KEYS):
        return cached
    from ..quantize import int8_path
    from ..runs import export_int8_run

    onnx = run.path / INT8_ONNX
    try:
        result = export_int8_run(run.path, onnx, calibration_images=calibration_images,
                                 write=False)
    finally:
        for f in (onnx, int8_path(onnx)):
            f.unlink(missing_ok=True)
    result.update(onnx=onnx.name, int8_onnx=int8_path(onnx).name,
                  onnx_files="deleted after measuring")
    run.write_export({**(cached or {}), **result})
    return result


def _int8(out: Path, runs: list[RunSpec], entries: dict[str, Any]) -> dict[str, Any]:
    """INT8 accuracy of every finished base, ACNet and online run (into its entry)."""
    for spec in runs:
        if spec.variant not in INT8_VARIANTS:
            continue
        try:
            x = _int8_of(_run(out, spec),
                         min(INT8_CALIBRATION, entries[spec.name]["train_images"]))
        except ImportError as exc:
            return {"available": False, "error": str(exc)}
        entries[spec.name]["int8"] = {k: x[k] for k in (*INT8_KEYS, "test_images",
                                                        "calibration_images",
                                                        "calibration_method", "per_channel")}
    return {"available": True, "error": None}


def analyze_runs(preset: StudyPreset, out: Path, runs: list[RunSpec],
                 planned: list[RunSpec] | None = None) -> dict[str, Any]:
    """Accuracy tables, robustness, kernel magnitudes, sparsity curves, plateau check, INT8,
    inference and training cost of the finished ``runs``; ``planned``: the study's whole run
    matrix (those not in ``runs`` are reported as pending)."""
    entries = _run_entries(preset, out, runs)
    done = {s.name for s in runs}
    res: dict[str, Any] = {
        "preset": preset.name, "dataset": preset.dataset, "seeds": list(preset.seeds),
        "runs": entries, "planned": len(planned or runs),
        "pending": [{"name": s.name, "model": s.model, "variant": s.variant, "seed": s.seed,
                     "schedule": s.schedule}
                    for s in planned or [] if s.name not in done],  # in the study's order
        **_kernels_and_sparsity(preset, out, runs)}
    res["cost"] = {m: c for m in preset.models if (c := _cost(m, out, runs, entries))}
    res["training_cost"] = _training_cost(preset, out, runs)
    if preset.int8:
        res["int8_status"] = _int8(out, runs, entries)
    res["plateau"] = {m: plateau_check(res, m) for m in preset.models}
    res["software"] = {"python": platform.python_version(), "torch": torch.__version__,
                       "platform": platform.platform()}
    res["machine"] = machine()
    return res


def summary(study_dir: str | Path) -> str:
    """The progress, main table (and the short and long schedules' ones, where the study has
    them) and deployment check of a study, as text."""
    res = json.loads((Path(study_dir) / RESULTS).read_text())
    if res.get("study") in OTHER_STUDIES:
        return OTHER_STUDIES[res["study"]].summary(study_dir)
    preset = STUDY_PRESETS.get(res["preset"])
    models = preset.models if preset else tuple(dict.fromkeys(
        r["model"] for r in res["runs"].values()))
    lines = [*progress_lines(res), "## Main result", "", *main_table(res, models), ""]
    for schedule, title in ((LONG, "Long schedules"), (SHORT, "Short schedules")):
        on = {r["model"] for r in [*res["runs"].values(), *res.get("pending", [])]
              if schedule_of(r) == schedule and r["variant"] == ACNET}
        if any(m in on for m in models):
            lines += [f"{title}:", "", *main_table(res, tuple(m for m in models if m in on),
                                                   schedule), ""]
    lines += ["Deployment check (every run: trained model vs its deployed, BN-folded form on the "
              "test set):", *deployment_lines(res, "  ")]
    return "\n".join(lines)
