"""Your own training loop with a torchvision model: convert, train, deploy, load into the stock
class, save. No acnet trainer involved: acnet only changes the model and changes it back.

    python examples/own_training_loop.py      (about a minute on 2 CPU cores)
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _data import images

import acnet


def main() -> None:
    torch.manual_seed(0)
    train_x, train_y, test_x, test_y = images(2048, 1000)
    prep = lambda x: F.pad(x, (2, 2, 2, 2)).expand(-1, 3, -1, -1)  # noqa: E731 28→32, gray→RGB

    model = torchvision.models.resnet18(num_classes=10)
    model = acnet.convert(model, preserve=False, gamma_init=1 / 3)  # every 3x3/7x7 conv + BN
    print(str(model.acnet_report).splitlines()[0])

    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    model.train()
    for epoch in range(2):
        perm = torch.randperm(len(train_x))
        for i in range(0, len(perm) - 127, 128):
            idx = perm[i:i + 128]
            loss = F.cross_entropy(model(prep(train_x[idx])), train_y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        print(f"epoch {epoch + 1}: loss {loss.item():.3f}")

    model.eval()
    deployed = acnet.deploy(model)  # plain convs and BatchNorms again
    stock = torchvision.models.resnet18(num_classes=10)
    stock.load_state_dict(deployed.state_dict())  # strict: the original architecture
    stock.eval()
    with torch.no_grad():
        trained, shipped = model(prep(test_x)), stock(prep(test_x))
    acc = (shipped.argmax(1) == test_y).float().mean().item()
    diff = (trained - shipped).abs().max().item()
    print(f"test accuracy {acc:.3f}; stock resnet18 vs trained ACNet: max |diff| {diff:.2e}")
    assert diff < 1e-3, diff
    assert sum(p.numel() for p in stock.parameters()) == sum(
        p.numel() for p in torchvision.models.resnet18(num_classes=10).parameters())

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "resnet18-acnet.safetensors"
        acnet.save_deployed(deployed, path)
        again = acnet.load_deployed(path, torchvision.models.resnet18(num_classes=10)).eval()
        with torch.no_grad():
            assert torch.equal(again(prep(test_x[:8])), stock(prep(test_x[:8])))
        print(f"saved and reloaded {path.name} ({path.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
