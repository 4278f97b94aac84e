"""ONNX export of a deployed model, checked with onnx.checker and onnxruntime."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torch import nn

from .block import ACBlock
from .deploy import deploy
from .errors import ACNetError, InputError, require

__all__ = ["ExportMismatchError", "export_onnx"]


class ExportMismatchError(ACNetError, RuntimeError):
    """onnxruntime's output differs from PyTorch's beyond the tolerance."""


def _require():
    return (require("onnx", "export", "ONNX export"),
            require("onnxruntime", "export", "ONNX export"))


def export_onnx(model: nn.Module, path: str | os.PathLike, input_shape: tuple[int, ...], *,
                opset: int = 17, rtol: float = 1e-4, dynamic_batch: bool = True,
                seed: int = 0) -> float:
    """Deploy ``model`` (if it has ACBlocks), export it to ONNX, check it, compare onnxruntime.

    Args:
        model: a model (deployed, or an ACNet, which is deployed first).
        path: the ``.onnx`` file to write.
        input_shape: (N, C, H, W) of the example input.
        opset: ONNX opset version.
        rtol: the largest relative error of onnxruntime against PyTorch accepted.
        dynamic_batch: a dynamic batch dimension in the exported graph.
        seed: seed of the random check input.

    Returns:
        The measured relative max error of onnxruntime against PyTorch on a random input.

    Raises:
        ExportMismatchError: the error exceeds ``rtol``.
        ValueError: a bad ``input_shape`` or ``path``.
    """
    onnx, ort = _require()
    if not (isinstance(input_shape, (tuple, list)) and len(input_shape) == 4
            and all(isinstance(v, int) and v > 0 for v in input_shape)):
        raise InputError(f"input_shape must be (N, C, H, W) of positive ints, got {input_shape!r}")
    if Path(path).is_dir():
        raise InputError(f"ONNX path {path} is a directory; give a file name such as "
                         f"{Path(path) / 'model.onnx'}")
    if any(isinstance(m, ACBlock) for m in model.modules()):
        model = deploy(model)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        path, expected, x = _export(model, Path(path), input_shape, opset, dynamic_batch, seed)
    finally:
        for m, mode in modes:  # the caller's model keeps its train/eval mode
            m.training = mode
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"input": x.detach().cpu().float().numpy()})[0])
    exp = expected.detach().cpu().float()
    err = ((got - exp).abs().max() / exp.abs().max().clamp_min(1e-12)).item()
    if not err <= rtol:
        raise ExportMismatchError(
            f"onnxruntime differs from PyTorch: relative max error {err:.3g} > {rtol:g} ({path})")
    return err


def _export(model: nn.Module, path: Path, input_shape: tuple[int, ...], opset: int,
            dynamic_batch: bool, seed: int) -> tuple[Path, torch.Tensor, torch.Tensor]:
    """torch.onnx.export of an eval-mode model; (path, PyTorch's output, the input)."""
    ref = next(model.parameters(), torch.empty(0))
    x = torch.randn(*input_shape, generator=torch.Generator().manual_seed(seed)).to(
        device=ref.device, dtype=ref.dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    dynamic_axes = {"input": {0: "batch"}, "output": {0: "batch"}} if dynamic_batch else None
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export")
        expected = model(x)
        torch.onnx.export(model, (x,), str(path), input_names=["input"], output_names=["output"],
                          opset_version=opset, dynamic_axes=dynamic_axes, dynamo=False)
    return path, expected, x
