"""A timm model: convert, train with your own loop, deploy, strict-load into a fresh timm model;
timm's own `reparameterize_model` works on the ACNet too.

    python examples/timm_model.py      (under a minute on 2 CPU cores)
"""

from __future__ import annotations

import sys
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from timm.utils import reparameterize_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _data import images

import acnet

NAME = "resnet10t"


def main() -> None:
    torch.manual_seed(0)
    train_x, train_y, test_x, test_y = images(2048, 1000)
    model = timm.create_model(NAME, num_classes=10, in_chans=1)
    model = acnet.convert(model, preserve=False, gamma_init=1 / 3)
    print(str(model.acnet_report).splitlines()[0])

    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    model.train()
    for epoch in range(2):
        perm = torch.randperm(len(train_x))
        for i in range(0, len(perm) - 63, 64):
            idx = perm[i:i + 64]
            loss = F.cross_entropy(model(train_x[idx]), train_y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        print(f"epoch {epoch + 1}: loss {loss.item():.3f}")

    model.eval()
    stock = timm.create_model(NAME, num_classes=10, in_chans=1)
    stock.load_state_dict(acnet.deploy(model).state_dict())  # strict
    fused = reparameterize_model(model)  # timm's helper fuses ACBlocks like its own blocks
    stock.eval()
    with torch.no_grad():
        a, b, c = model(test_x), stock(test_x), fused(test_x)
    print(f"test accuracy {(b.argmax(1) == test_y).float().mean():.3f}; stock {NAME} vs "
          f"trained ACNet: max |diff| {(a - b).abs().max():.2e}; reparameterize_model: "
          f"{(a - c).abs().max():.2e}")
    assert (a - b).abs().max() < 1e-3 and (a - c).abs().max() < 1e-3


if __name__ == "__main__":
    main()
