"""INT8 export with onnxruntime static quantization: files, operators, accuracy, errors."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from acnet import convert, deploy  # noqa: E402
from acnet.quantize import (  # noqa: E402
    calibration_array,
    evaluate_onnx,
    int8_path,
    quantize_model,
    quantize_onnx,
)
from acnet.runs import export_int8_run  # noqa: E402

QUANT_OPS = {"QuantizeLinear", "DequantizeLinear", "QLinearConv"}


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """Cifar-quick ACNet trained 3 epochs on the synthetic set (~20 s on one core)."""
    from acnet.train import TrainConfig, train

    out = tmp_path_factory.mktemp("int8") / "run"
    cfg = TrainConfig(model="cifar_quick", dataset="synthetic", block="acb", epochs=3, lr=0.1,
                      nesterov=True, quiet=True)
    metrics = train(cfg, out)
    assert metrics["deployed_test_acc"] > 0.5  # learnt something: agreement is not trivial
    return out


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    return path, export_int8_run(trained_run, path, calibration_images=128, seed=1)


def _ops(path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path)).graph.node}


def _tiny(acb: bool = False) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                          nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, bias=False),
                          nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 4))
    if acb:
        model = convert(model, preserve=False)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 3, 12, 12))
    return model.eval()


def test_export_int8_run_writes_both_files_and_agrees(trained_run, exported):
    path, result = exported
    int8 = int8_path(path)
    assert path.is_file() and int8.is_file()
    assert int8.name == "model.int8.onnx"
    assert QUANT_OPS & _ops(int8), "the INT8 file holds no quantized operators"
    assert not QUANT_OPS & _ops(path), "the fp32 file must stay float"
    assert result["int8_agreement"] >= 0.95
    metrics = json.loads((trained_run / "metrics.json").read_text())
    # the fp32 ONNX file is the deployed model: same accuracy up to float rounding (1 image)
    assert abs(result["onnx_test_acc"] - metrics["deployed_test_acc"]) <= 1 / 512 + 1e-9
    assert abs(result["int8_test_acc"] - result["onnx_test_acc"]) <= 0.05
    saved = json.loads((trained_run / "export.json").read_text())
    for key in ("onnx_test_acc", "int8_test_acc", "int8_agreement"):
        assert saved[key] == pytest.approx(result[key])
    assert saved["calibration_images"] == 128 and saved["test_images"] == 512


def test_int8_weights_are_int8_per_channel(exported):
    from onnx import numpy_helper

    path, _ = exported
    graph = onnx.load(str(int8_path(path))).graph
    init = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    conv_weights = [init[n.input[0]] for n in graph.node if n.op_type == "DequantizeLinear"
                    and n.input[0] in init and init[n.input[0]].ndim == 4]
    assert len(conv_weights) == 3  # cifar_quick's three convs
    scales = [init[n.input[1]] for n in graph.node if n.op_type == "DequantizeLinear"
              and n.input[0] in init and init[n.input[0]].ndim == 4]
    assert all(w.dtype == np.int8 for w in conv_weights)
    assert all(s.shape == (w.shape[0],) for s, w in zip(scales, conv_weights, strict=True))


@pytest.mark.parametrize("acb", [False, True])
def test_quantize_model_any_calibration_source(tmp_path, acb):
    model = _tiny(acb)
    images = torch.randn(96, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(images, torch.zeros(96, dtype=torch.long)), batch_size=40)
    fp32, int8 = quantize_model(model, tmp_path / "tiny.onnx", loader, num_images=64,
                                per_channel=False)
    assert QUANT_OPS & _ops(int8)
    labels = (deploy(model) if acb else model)(images).argmax(1)
    ref = evaluate_onnx(fp32, [(images, labels)])
    got = evaluate_onnx(int8, [(images[:50], labels[:50]), (images[50:], labels[50:])],
                        threads=1)
    assert ref.accuracy == 1.0  # the fp32 file computes the model
    assert got.predictions.shape == (96,) and got.predictions.dtype == np.int64
    assert (got.predictions == ref.predictions).mean() >= 0.9


def test_entropy_calibration_is_not_minmax(tmp_path, monkeypatch):
    """onnxruntime's default entropy histogram (128 bins) can only pick the full range; ours
    must search thresholds, so some activation range is tighter than MinMax's."""
    from onnx import numpy_helper

    monkeypatch.setattr("acnet.quantize._ENTROPY_BINS", 512)  # a shorter search, same logic
    fp32, _ = quantize_model(_tiny(), tmp_path / "t.onnx", torch.randn(64, 3, 12, 12))
    calib = torch.randn(64, 3, 12, 12, generator=torch.Generator().manual_seed(1))

    def act_scales(method):
        out = quantize_onnx(fp32, tmp_path / f"{method}.onnx", calib, method=method)
        graph = onnx.load(str(out)).graph
        init = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        return np.array([float(init[n.input[1]]) for n in graph.node
                         if n.op_type == "QuantizeLinear" and init[n.input[1]].size == 1])

    minmax, entropy = act_scales("minmax"), act_scales("entropy")
    assert minmax.shape == entropy.shape
    assert (entropy <= minmax * (1 + 1e-6)).all() and (entropy < minmax * 0.99).any()


def test_calibration_array_sources_and_limits():
    x = torch.arange(2 * 5 * 4, dtype=torch.float32).view(5, 2, 2, 2)
    assert calibration_array(x).shape == (5, 2, 2, 2)
    assert calibration_array(x.numpy(), 3).shape == (3, 2, 2, 2)
    batches = [(x[:2], torch.zeros(2)), (x[2:], torch.zeros(3))]
    got = calibration_array(batches, 4)
    assert got.dtype == np.float32 and np.array_equal(got, x[:4].numpy())
    with pytest.raises(ValueError, match="only 5"):
        calibration_array(batches, 6)
    with pytest.raises(ValueError, match="empty"):
        calibration_array([])
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        calibration_array(torch.zeros(3, 4))
    with pytest.raises(TypeError, match="int"):
        calibration_array(7)
    for bad in (0, -3, True, 2.5):
        with pytest.raises(ValueError, match="num_images"):
            calibration_array(x, bad)


def test_int8_path():
    assert int8_path("a/b.onnx").as_posix() == "a/b.int8.onnx"
    assert int8_path("model").as_posix() == "model.int8.onnx"


@pytest.mark.parametrize("n", [0, -1, True, 10**6])
def test_bad_calibration_images(trained_run, tmp_path, n):
    with pytest.raises(ValueError, match="calibration_images"):
        export_int8_run(trained_run, tmp_path / "m.onnx", calibration_images=n, write=False)
    assert not (tmp_path / "m.onnx").exists()


def test_bad_method(trained_run, tmp_path):
    with pytest.raises(ValueError, match="kl"):
        export_int8_run(trained_run, tmp_path / "m.onnx", method="kl")


def test_run_without_data(trained_run, tmp_path):
    cfg = json.loads((trained_run / "config.json").read_text())
    run = tmp_path / "run"
    run.mkdir()
    for f in ("deployed.safetensors", "metrics.json"):
        (run / f).write_bytes((trained_run / f).read_bytes())
    cfg.update(dataset="fashion-mnist", data_dir=str(tmp_path / "missing"))
    (run / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FileNotFoundError, match="missing"):
        export_int8_run(run, tmp_path / "m.onnx")
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        export_int8_run(tmp_path, tmp_path / "m.onnx")
    with pytest.raises(ValueError, match="run directory"):
        export_int8_run(trained_run / "deployed.safetensors", tmp_path / "m.onnx")


def test_missing_onnxruntime(trained_run, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ImportError, match=r"acnet\[export\]"):
        export_int8_run(trained_run, tmp_path / "m.onnx")
    with pytest.raises(ImportError, match=r"acnet\[export\]"):
        quantize_onnx(tmp_path / "m.onnx", tmp_path / "q.onnx", torch.zeros(1, 1, 4, 4))


def test_cli_export_int8(trained_run, tmp_path, capsys):
    from acnet.cli import main

    out = tmp_path / "cli.onnx"
    assert main(["export", str(trained_run), "--onnx", str(out), "--int8",
                 "--calibration-images", "64"]) == 0
    printed = capsys.readouterr().out
    assert "INT8" in printed and "identical predictions" in printed
    assert out.is_file() and int8_path(out).is_file()
    saved = json.loads((trained_run / "export.json").read_text())
    assert saved["calibration_images"] == 64 and saved["int8_onnx"] == str(int8_path(out))
    assert main(["export", str(trained_run), "--onnx", str(tmp_path / "x.onnx"),
                 "--calibration-images", "64"]) == 2
    assert "needs --int8" in capsys.readouterr().err
