"""Working with run directories: open, load, evaluate, deploy, export and analyze them."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from . import quantize
from ._files import CheckpointError, save_json
from ._text import first_line
from .analysis import kernel_magnitude, plots, sparsity_study
from .analysis.kernels import dominant_kernel_size
from .data import DATASETS, DatasetNotFoundError, ImageData
from .data.datasets import STREAMED
from .deploy import deploy
from .errors import InputError, NonFiniteError
from .evaluation import accuracy_by_class, evaluate
from .export import export_onnx
from .io import load_deployed
from .train.config import TrainConfig, build_base_model, build_training_model
from .train.data import Split, in_memory_data, test_split
from .train.init_from import add_conv_biases
from .train.rundir import RunDir

__all__ = [
    "analyze_kernels",
    "analyze_sparsity",
    "deploy_run",
    "evaluate_run",
    "export_int8_run",
    "export_run",
    "load_deployed_model",
    "load_trained",
    "open_run",
    "run_test_split",
]


def open_run(path: str | os.PathLike) -> tuple[TrainConfig, Path]:
    """(config, file or directory) for a run directory or a deployed .safetensors file."""
    path = Path(path)
    if path.is_dir():
        return RunDir(path).read_config(), path
    if path.is_file() and path.suffix == ".safetensors":
        return _file_config(path), path
    raise FileNotFoundError(f"{path} is neither a run directory nor a .safetensors file")


def _file_config(path: Path) -> TrainConfig:
    """The training config stored in a deployed .safetensors file's metadata, checked."""
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:  # safetensors raises its own errors for damaged headers
        raise CheckpointError(f"{path} is not a valid safetensors file ({first_line(exc)})"
                              ) from exc
    if "acnet_config" not in meta:
        raise InputError(f"{path} has no acnet config in its metadata; evaluate its run "
                         f"directory instead")
    try:
        raw = json.loads(meta["acnet_config"])
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: the acnet config in its metadata is not valid JSON "
                         f"({exc})") from exc
    if not isinstance(raw, dict):
        raise InputError(f"{path}: the acnet config in its metadata is not a JSON object")
    try:
        cfg = TrainConfig.from_dict(raw)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{path}: the acnet config in its metadata is not valid "
                         f"({first_line(exc)})") from exc
    missing = [k for k in ("model", "in_channels", "num_classes") if raw.get(k) is None]
    if missing:
        raise InputError(f"{path}: the acnet config in its metadata lacks "
                         f"{', '.join(missing)}; it was not written by acnet train")
    return cfg


def _load_strict(model: nn.Module, state: dict[str, torch.Tensor], source: Path) -> nn.Module:
    """``load_state_dict(strict=True)`` of finite weights; a mismatch is one clear
    CheckpointError, NaN or infinite weights a NonFiniteError."""
    bad = sum(int((~torch.isfinite(t)).sum()) for t in state.values()
              if isinstance(t, torch.Tensor) and t.is_floating_point())
    if bad:
        total = sum(t.numel() for t in state.values()
                    if isinstance(t, torch.Tensor) and t.is_floating_point())
        raise NonFiniteError(f"{source}: {bad} of {total} weights are not finite (NaN or "
                             f"infinity); the model cannot be evaluated")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())[:200]
        raise CheckpointError(f"{source} does not match the model its config describes "
                              f"({detail})") from exc
    return model


def load_trained(run_dir: str | os.PathLike, device: str = "cpu") -> nn.Module:
    """The model as trained (ACBlocks for acb runs), with the last checkpoint's weights."""
    cfg, path = open_run(run_dir)
    run = RunDir(path)
    state = run.load_checkpoint(map_location=device)
    if "model" not in state:
        raise CheckpointError(f"{run.checkpoint_file} holds no model weights")
    model = _load_strict(build_training_model(cfg), state["model"], run.checkpoint_file)
    return model.to(device).eval()


def load_deployed_model(path: str | os.PathLike, device: str = "cpu") -> nn.Module:
    """The deployed base architecture with the run's deployed.safetensors (or a given file);
    deployed from the checkpoint when the run has no deployed file yet."""
    cfg, p = open_run(path)
    file = p if p.is_file() else RunDir(p).deployed_file
    if not file.is_file():
        if p.is_dir() and RunDir(p).has_checkpoint:
            return deploy(load_trained(p, device)).eval()
        raise FileNotFoundError(f"no deployed weights or checkpoint in {p}")
    state = load_deployed(file, device=device)
    model = build_base_model(cfg)
    add_conv_biases(model, state)
    return _load_strict(model, state, file).to(device).eval()


def deploy_run(run_dir: str | os.PathLike) -> tuple[Path, Any, float]:
    """Re-deploy a run from its checkpoint: writes deployed.safetensors; returns the report and
    the max |difference| between trained and deployed outputs on a random batch."""
    if not Path(run_dir).is_dir():
        raise InputError(f"{run_dir} is not a run directory (deploy rewrites a run's "
                         f"deployed.safetensors from its checkpoint)")
    cfg, path = open_run(run_dir)
    trained = load_trained(path)
    deployed = deploy(trained)
    channels, _, size = cfg.data_shape
    x = torch.randn(8, channels, size, size,
                    generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (deployed(x) - trained(x)).abs().max().item()
    out = RunDir(path).save_deployed(deployed, cfg)
    return out, deployed.acnet_report, diff


def run_test_split(cfg: TrainConfig, *, transform: str = "none", test_limit: int | None = None,
                   device: str = "cpu") -> Split:
    """The test loader of a run's dataset: its own test limit unless ``test_limit`` is given."""
    if test_limit is not None:
        cfg = dataclasses.replace(cfg, test_limit=test_limit)
    return test_split(cfg, device, transform=transform)


def evaluate_run(path: str | os.PathLike, *, dataset: str | None = None,
                 transform: str = "none", data_dir: str | None = None,
                 test_limit: int | None = None, device: str = "cpu") -> dict[str, Any]:
    """Accuracy of a run's deployed model on its test set (the run's own test limit by
    default), optionally on another dataset of the same shape and under a transform."""
    cfg, _ = open_run(path)
    if dataset is not None and dataset not in DATASETS:
        raise InputError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    cfg = dataclasses.replace(cfg, dataset=dataset or cfg.dataset,
                              data_dir=data_dir or cfg.data_dir)
    split = run_test_split(cfg, transform=transform, test_limit=test_limit, device=device)
    if split.in_channels != cfg.in_channels or split.num_classes != cfg.num_classes:
        raise InputError(f"{path} was trained on {cfg.in_channels}-channel images with "
                         f"{cfg.num_classes} classes; {cfg.dataset} has {split.in_channels} and "
                         f"{split.num_classes}")
    model = load_deployed_model(path, device=device)
    out = {"run": str(path), "dataset": cfg.dataset, "transform": transform}
    if cfg.class_names:  # the classes by name (folder datasets keep their folders' names)
        acc, per = accuracy_by_class(model, split.loader, len(cfg.class_names))
        return {**out, "test_acc": acc, "test_images": split.images,
                "class_acc": dict(zip(cfg.class_names, per, strict=True))}
    acc, _ = evaluate(model, split.loader)
    return {**out, "test_acc": acc, "test_images": split.images}


def _check_output_file(path: str | os.PathLike, param: str) -> Path:
    """An output file name, not a directory."""
    p = Path(path)
    if p.is_dir() or str(path).endswith((os.sep, "/")):
        raise InputError(f"{param} {path} is a directory; give a file name, e.g. "
                         f"{p / 'model.onnx'}", params=(param,))
    return p


def export_run(path: str | os.PathLike, onnx_path: str | os.PathLike) -> dict[str, Any]:
    """Export a run's deployed model to ONNX, checked with onnxruntime; returns the file and
    the relative max error of onnxruntime against PyTorch."""
    out = _check_output_file(onnx_path, "onnx_path")
    cfg, _ = open_run(path)
    channels, _, size = cfg.data_shape
    err = export_onnx(load_deployed_model(path), out, (1, channels, size, size))
    return {"onnx": str(out), "relative_error": err}


def analyze_kernels(runs: list[str | os.PathLike], kernel_size: int | None = None, *,
                    figure: str | Path | None = None,
                    json_path: str | os.PathLike | None = None) -> dict[str, torch.Tensor]:
    """Kernel magnitude matrix of each run (keyed by the run's path as given); optionally
    plotted (titled by directory name) and saved as JSON."""
    if kernel_size is not None and (isinstance(kernel_size, bool) or kernel_size < 2):
        raise InputError(f"kernel_size must be an integer >= 2, got {kernel_size!r}",
                         params=("kernel_size",))
    for run in runs:
        open_run(run)  # a clear error for a path that is not a run, before any work
    mats = {}
    for run in runs:
        model = load_deployed_model(run)  # the fused kernels; no checkpoint needed
        mats[str(run)] = kernel_magnitude(model, kernel_size or dominant_kernel_size(model))
    if figure:
        plots.heatmaps({Path(k).name: m for k, m in mats.items()}, figure,
                       "average normalized kernel magnitude")
    if json_path:
        save_json(json_path, {Path(k).name: v.tolist() for k, v in mats.items()})
    return mats


def analyze_sparsity(runs: list[str | os.PathLike], ratios: list[float], draws: int = 3, *,
                     test_limit: int | None = None,
                     figure: str | Path | None = None) -> dict[str, Any]:
    """Accuracy after zeroing kernel weights, per run and pattern; with ``figure``, the plot and
    ``figure``'s .json beside it."""
    if not ratios or any(not 0 <= r <= 1 for r in ratios):
        raise InputError(f"ratios must be numbers in [0, 1], got {ratios!r}",
                         params=("ratios",))
    if draws < 1:
        raise InputError(f"draws must be >= 1, got {draws}", params=("draws",))
    for run in runs:
        open_run(run)
    results = {}
    for run in runs:
        cfg, _ = open_run(run)
        loader = run_test_split(cfg, test_limit=test_limit).loader
        results[str(run)] = sparsity_study(load_deployed_model(run), loader, ratios, draws)
    if figure:
        curves = {f"{Path(run).name}: {pattern}": cur
                  for run, study in results.items() for pattern, cur in study.items()}
        plots.sparsity_curves(curves, figure, "accuracy after zeroing kernel weights")
        save_json(Path(figure).with_suffix(".json"), results)
    return results


def _run_data(cfg: TrainConfig, run: Path) -> ImageData:
    """The run's in-memory dataset, training and test split limited as it was trained."""

    if cfg.dataset in STREAMED:
        raise InputError(f"INT8 export of a {cfg.dataset} run needs your calibration loader: "
                         f"call acnet.quantize.quantize_model(model, path, loader) in Python")
    try:
        data = in_memory_data(cfg)
    except FileNotFoundError as exc:
        raise DatasetNotFoundError(f"INT8 export of {run} calibrates and evaluates on its "
                                   f"{cfg.dataset} images: {exc}") from exc
    if data is None:
        raise InputError(f"{run} streams its data; INT8 export calibrates on in-memory data")
    return data


def export_int8_run(run_dir: str | os.PathLike, onnx_path: str | os.PathLike, *,
                    calibration_images: int = 512, seed: int = 0, method: str = "minmax",
                    per_channel: bool = True, write: bool = True) -> dict[str, Any]:
    """``acnet export RUN --onnx FILE --int8``: fp32 and INT8 ONNX of the run's deployed model
    (calibrated on ``calibration_images`` training images drawn by ``seed``), both evaluated
    on its test set; the results go to ``RUN/export.json`` (when ``write``)."""

    quantize.check_method(method)
    cfg, run = open_run(run_dir)
    if not run.is_dir():
        raise InputError(f"INT8 export needs a run directory (for its data), got {run}")
    data = _run_data(cfg, run)
    calib = quantize.sample_calibration_images(data, calibration_images, seed)
    exported = export_run(run, onnx_path)
    fp32 = Path(exported["onnx"])
    int8 = quantize.quantize_onnx(fp32, quantize.int8_path(fp32), calib, method=method,
                                  per_channel=per_channel)
    test = test_split(cfg, data=data).loader
    ref, got = quantize.evaluate_onnx(fp32, test), quantize.evaluate_onnx(int8, test)
    result = {**exported, "int8_onnx": str(int8), "onnx_test_acc": ref.accuracy,
              "int8_test_acc": got.accuracy,
              "int8_agreement": float((ref.predictions == got.predictions).mean()),
              "calibration_images": calibration_images, "calibration_seed": seed,
              "calibration_method": method, "per_channel": per_channel,
              "test_images": len(got.predictions)}
    if write:
        RunDir(run).write_export(result)
    return result
