"""Static INT8 quantization of deployed models with onnxruntime, and its accuracy on a test set.

The flow is ``export_onnx`` (fp32) → ``quant_pre_process`` (shape inference, graph clean-up) →
``quantize_static`` (QDQ format, per-channel symmetric INT8 weights, INT8 activations whose
ranges come from calibration images) → evaluation of both files with onnxruntime.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .data.loader import normalize
from .errors import InputError, InputTypeError, require
from .export import export_onnx

log = logging.getLogger(__name__)

__all__ = ["CALIBRATION_METHODS", "DEFAULT_METHOD", "OnnxEvaluation", "calibration_array",
           "check_method", "evaluate_onnx", "int8_path", "quantize_model", "quantize_onnx",
           "sample_calibration_images"]

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
DEFAULT_METHOD = "minmax"
_CALIB_BATCH = 32  # images per calibration batch
_CALIB_CHUNK = 8  # batches whose activations the calibrator holds at once (memory bound)
_ENTROPY_BINS = 2048  # histogram bins of the entropy (KL) threshold search, as TensorRT


def _require_ort():
    require("onnx", "export", "INT8 export")
    return (require("onnxruntime", "export", "INT8 export"),
            require("onnxruntime.quantization", "export", "INT8 export"))


def int8_path(onnx_path: str | os.PathLike) -> Path:
    """``FILE.onnx`` → ``FILE.int8.onnx`` (any other name gets ``.int8.onnx`` appended)."""
    p = Path(onnx_path)
    stem = p.name[:-5] if p.name.endswith(".onnx") else p.name
    return p.with_name(stem + ".int8.onnx")


def calibration_array(data: Any, num_images: int | None = None) -> np.ndarray:
    """Calibration images as one float32 (N, C, H, W) array: from a tensor/array, or an
    iterable of batches (tensors, or ``(images, labels)`` pairs, as a DataLoader yields)."""
    if num_images is not None and (isinstance(num_images, bool) or not isinstance(num_images, int)
                                   or num_images < 1):
        raise InputError(f"num_images must be a positive integer or None, got {num_images!r}")
    if isinstance(data, (torch.Tensor, np.ndarray)):
        batches: Iterable[Any] = [data]
    elif isinstance(data, Iterable):
        batches = data
    else:
        raise InputTypeError(f"calibration data must be a tensor, an array or an iterable of "
                             f"batches, got {type(data).__name__}")
    parts, seen = [], 0
    for batch in batches:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        x = x.detach().cpu().float().numpy() if isinstance(x, torch.Tensor) else np.asarray(
            x, dtype=np.float32)
        if x.ndim != 4:
            raise InputError(f"calibration batches must be (N, C, H, W), got shape {x.shape}")
        parts.append(x[: None if num_images is None else num_images - seen])
        seen += len(parts[-1])
        if num_images is not None and seen >= num_images:
            break
    if seen == 0:
        raise InputError("no calibration images: the calibration data is empty")
    if num_images is not None and seen < num_images:
        raise InputError(f"asked for {num_images} calibration images, the data holds only {seen}")
    return np.ascontiguousarray(np.concatenate(parts).astype(np.float32, copy=False))


def _reader(images: np.ndarray, input_name: str):
    """An onnxruntime CalibrationDataReader over ``images`` in fixed-size batches."""
    _, q = _require_ort()
    base: Any = q.CalibrationDataReader  # a class of the optional onnxruntime

    class _Reader(base):
        def __init__(self) -> None:
            self.pending = (images[i:i + _CALIB_BATCH] for i in range(0, len(images), _CALIB_BATCH))

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.pending, None)
            return None if batch is None else {input_name: batch}

    return _Reader()


def _calibrate(model_path: Path, images: np.ndarray, input_name: str, method: str,
               percentile: float, cache: Path) -> None:
    """Activation ranges from ``images``, in chunks (bounded memory), saved as an onnxruntime
    calibration cache. Entropy gets 2048 histogram bins: onnxruntime's default (128, as many
    as the quantized bins) leaves one candidate threshold, the full range, i.e. MinMax."""
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

    choices: dict[str, dict[str, Any]] = {
        "entropy": {"num_bins": _ENTROPY_BINS, "num_quantized_bins": 128},
        "percentile": {"num_bins": 2048, "percentile": percentile}, "minmax": {}}
    options = choices[method]
    calibrator = create_calibrator(model_path, None, augmented_model_path=str(
        cache.with_name("augmented.onnx")), calibrate_method=check_method(method),
        extra_options=options)
    step = _CALIB_BATCH * _CALIB_CHUNK
    with contextlib.redirect_stdout(io.StringIO()) as chatter:
        for start in range(0, len(images), step):
            calibrator.collect_data(_reader(images[start:start + step], input_name))
        save_tensors_data(calibrator.compute_data(), cache)
    log.debug("onnxruntime calibration: %s", chatter.getvalue().strip())


def check_method(method: str) -> Any:
    _, q = _require_ort()
    if method not in CALIBRATION_METHODS:
        raise InputError(f"calibration method must be one of {', '.join(CALIBRATION_METHODS)}, "
                         f"got {method!r}")
    return {"minmax": q.CalibrationMethod.MinMax, "entropy": q.CalibrationMethod.Entropy,
            "percentile": q.CalibrationMethod.Percentile}[method]


def quantize_onnx(fp32_path: str | os.PathLike, out_path: str | os.PathLike, calibration: Any, *,
                  num_images: int | None = None, method: str = DEFAULT_METHOD,
                  per_channel: bool = True, percentile: float = 99.999,
                  nodes_to_exclude: Sequence[str] | None = None,
                  extra_options: dict[str, Any] | None = None) -> Path:
    """Quantize an fp32 ONNX classifier to static INT8 (QDQ) with onnxruntime; returns the path.

    ``calibration``: images as the model expects them (normalized), see
    ``calibration_array``. ``method``: ``minmax``, ``entropy`` or ``percentile`` (activation
    ranges); ``per_channel``: one weight scale per output channel (else per tensor);
    ``nodes_to_exclude``: ONNX node names left in float (mixed precision).
    """
    import onnx

    calib = check_method(method)
    _, q = _require_ort()
    if not 0 < percentile <= 100:
        raise InputError(f"percentile must be in (0, 100], got {percentile}")
    images = calibration_array(calibration, num_images)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="acnet-int8-") as tmp:
        pre = Path(tmp) / "preprocessed.onnx"
        q.quant_pre_process(str(fp32_path), str(pre))
        graph = onnx.load(str(pre)).graph
        weights = {t.name for t in graph.initializer}
        input_name = next(i.name for i in graph.input if i.name not in weights)
        cache = Path(tmp) / "calibration.json"
        _calibrate(pre, images, input_name, method, percentile, cache)
        q.quantize_static(str(pre), str(out_path), None, quant_format=q.QuantFormat.QDQ,
                          per_channel=per_channel, activation_type=q.QuantType.QInt8,
                          weight_type=q.QuantType.QInt8, calibrate_method=calib,
                          nodes_to_exclude=list(nodes_to_exclude or []),
                          extra_options=extra_options, calibration_cache_path=cache)
    log.info("wrote %s (%s calibration, %d images, per-%s weights)", out_path, method,
             len(images), "channel" if per_channel else "tensor")
    return out_path


def quantize_model(model: nn.Module, onnx_path: str | os.PathLike, calibration: Any, *,
                   num_images: int | None = None, **options: Any) -> tuple[Path, Path]:
    """Export ``model`` (deployed or with ACBlocks) to fp32 ONNX at ``onnx_path`` and quantize
    it to ``FILE.int8.onnx``; returns both paths. ``options`` go to ``quantize_onnx``."""

    images = calibration_array(calibration, num_images)
    export_onnx(model, onnx_path, (1, *images.shape[1:]))
    out = quantize_onnx(onnx_path, int8_path(onnx_path), images, **options)
    return Path(onnx_path), out


@dataclass
class OnnxEvaluation:
    """Top-1 accuracy of an ONNX classifier and its predicted classes (int64, one per image)."""

    accuracy: float
    predictions: np.ndarray


def evaluate_onnx(path: str | os.PathLike, loader: Iterable[Any], *,
                  threads: int | None = None) -> OnnxEvaluation:
    """Run the ONNX file with onnxruntime (CPU) over ``(images, labels)`` batches."""
    ort, _ = _require_ort()
    opts = ort.SessionOptions()
    if threads is not None:
        opts.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    preds, correct, total = [], 0, 0
    for x, y in loader:
        x = x.detach().cpu().float().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
        y = y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
        p = session.run(None, {name: x.astype(np.float32, copy=False)})[0].argmax(1)
        preds.append(p.astype(np.int64))
        correct += int((p == y).sum())
        total += len(y)
    if total == 0:
        raise InputError("the evaluation loader yielded no images")
    return OnnxEvaluation(correct / total, np.concatenate(preds))


def sample_calibration_images(data: Any, num_images: int, seed: int = 0) -> torch.Tensor:
    """``num_images`` training images of an in-memory dataset, drawn without replacement by
    ``seed``, normalized as the model sees them (no augmentation)."""

    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
        raise InputError(f"calibration_images must be a positive integer, got {num_images!r}",
                         params=("calibration_images",))
    if num_images > len(data.train_x):
        raise InputError(f"calibration_images={num_images} is more than the run's "
                         f"{len(data.train_x)} training images", params=("calibration_images",))
    idx = torch.randperm(len(data.train_x), generator=torch.Generator().manual_seed(seed))
    mean = torch.tensor(data.mean).view(1, -1, 1, 1)
    std = torch.tensor(data.std).view(1, -1, 1, 1)
    return normalize(data.train_x[idx[:num_images]], mean, std)
