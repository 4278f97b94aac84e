"""Export a trained ACNet to ONNX and to static INT8, calibrated on your own images, and score
both with onnxruntime.

    python examples/export_int8.py      (under a minute on 2 CPU cores)
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _data import images

import acnet
from acnet.models import build_model
from acnet.quantize import evaluate_onnx, quantize_model


def main() -> None:
    torch.manual_seed(0)
    train_x, train_y, test_x, test_y = images(8192, 2000)
    model = acnet.convert(build_model("cifar_quick", in_channels=1, num_classes=10),
                          preserve=False, gamma_init=1 / 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    model.train()
    for _ in range(2):
        perm = torch.randperm(len(train_x))
        for i in range(0, len(perm) - 127, 128):
            idx = perm[i:i + 128]
            loss = F.cross_entropy(model(train_x[idx]), train_y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    deployed = acnet.deploy(model.eval())

    calibration = train_x[torch.randperm(len(train_x))[:256]]  # your own, representative images
    batches = [(test_x[i:i + 500], test_y[i:i + 500]) for i in range(0, len(test_x), 500)]
    with tempfile.TemporaryDirectory() as tmp:
        fp32, int8 = quantize_model(deployed, Path(tmp) / "model.onnx", calibration)
        a, b = evaluate_onnx(fp32, batches), evaluate_onnx(int8, batches)
        sizes = fp32.stat().st_size / 1e3, int8.stat().st_size / 1e3
    agree = (a.predictions == b.predictions).mean()
    print(f"onnxruntime on {len(test_x)} test images: fp32 {a.accuracy:.3f} ({sizes[0]:.0f} kB), "
          f"INT8 {b.accuracy:.3f} ({sizes[1]:.0f} kB), identical predictions {agree:.1%}")
    assert abs(a.accuracy - b.accuracy) < 0.05


if __name__ == "__main__":
    main()
