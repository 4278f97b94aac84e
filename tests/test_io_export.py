"""safetensors, weights_only checkpoints, and the ONNX round trip."""

from __future__ import annotations

import pytest
import torch
from helpers import randomize_bn, rel_err, sgd_steps
from torch import nn

import acnet
from acnet.io import CheckpointError


class Custom:
    """An arbitrary pickled object, which weights_only loading must refuse."""


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


def _trained_acnet():
    ac = sgd_steps(acnet.convert(_model()), lambda: torch.randn(4, 3, 10, 10), lr=0.05)
    return randomize_bn(ac).eval()


def test_save_and_load_deployed(tmp_path):
    ac = _trained_acnet()
    path = tmp_path / "model.safetensors"
    with pytest.raises(ValueError, match="deploy it first"):
        acnet.save_deployed(ac, path)  # io only saves: the caller deploys
    acnet.save_deployed(acnet.deploy(ac), path, metadata={"arch": "toy"})
    stock = acnet.load_deployed(path, _model()).eval()
    x = torch.randn(2, 3, 10, 10)
    assert rel_err(stock(x), ac(x)) <= 1e-5
    state = acnet.load_deployed(path)
    assert set(state) == set(_model().state_dict())
    with pytest.raises(FileNotFoundError):
        acnet.load_deployed(tmp_path / "missing.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError):
        acnet.load_deployed(tmp_path / "bad.safetensors")


def test_checkpoint_weights_only_and_corruption(tmp_path):
    path = tmp_path / "ck.pt"
    acnet.io.save_checkpoint(path, {"model": _model().state_dict(), "epoch": 3})
    assert acnet.io.load_checkpoint(path)["epoch"] == 3
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        acnet.io.load_checkpoint(path)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        acnet.io.load_checkpoint(tmp_path / "none.pt")

    torch.save({"obj": Custom()}, path)  # a pickled object: refused by weights_only
    with pytest.raises(CheckpointError):
        acnet.io.load_checkpoint(path)
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temp files


def test_onnx_round_trip(tmp_path):
    pytest.importorskip("onnxruntime")
    ac = _trained_acnet()
    err = acnet.export_onnx(ac, tmp_path / "m.onnx", (2, 3, 10, 10))
    assert err <= 1e-4
    import onnx

    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    assert sum(n.op_type == "Conv" for n in graph.node) == 2  # the deployed, original structure


def test_onnx_mismatch_fails_loudly(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    from acnet import export

    with pytest.raises(export.ExportMismatchError):
        acnet.export_onnx(_trained_acnet(), tmp_path / "m.onnx", (1, 3, 10, 10), rtol=-1.0)
    with pytest.raises(ValueError, match="input_shape"):
        acnet.export_onnx(_model(), tmp_path / "m.onnx", (3, 10, 10))
    with pytest.raises(ValueError, match="is a directory"):
        acnet.export_onnx(_model(), tmp_path, (1, 3, 10, 10))
    assert acnet.ExportMismatchError is export.ExportMismatchError


def test_export_onnx_keeps_the_callers_training_mode(tmp_path):
    pytest.importorskip("onnxruntime")
    model = _model().train()
    model[1].eval()  # a frozen BN inside a training model stays frozen
    acnet.export_onnx(model, tmp_path / "m.onnx", (1, 3, 10, 10))
    assert model.training and model[0].training and not model[1].training
