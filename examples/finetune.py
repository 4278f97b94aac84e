"""Fine-tuning a trained model with ACBs: load its checkpoint into the stock model, convert it
with its function preserved, fine-tune on new classes with a new head, ship the stock
architecture again.

    python examples/finetune.py      (under a minute on 2 CPU cores)

The same from the command line: acnet train --init-from RUN_OR_FILE --classes 5,6,7,8,9
--new-head --block acb.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _data import images

import acnet
from acnet.models import build_model


def fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x))
        for i in range(0, len(perm) - 63, 64):
            idx = perm[i:i + 64]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def main() -> None:
    torch.manual_seed(0)
    train_x, train_y, test_x, test_y = images(6000, 2000)
    old, new = train_y < 5, train_y >= 5
    old_t, new_t = test_y < 5, test_y >= 5

    # 1. somebody's trained model (classes 0-4), saved as a plain state_dict
    source = build_model("cifar_quick", in_channels=1, num_classes=5)
    fit(source, train_x[old], train_y[old], epochs=2, lr=0.05)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "source.pt"
        torch.save(source.state_dict(), ckpt)
        print(f"source: {accuracy(source, test_x[old_t], test_y[old_t]):.3f} on classes 0-4")

        # 2. load it into the stock model and convert: the ACNet computes exactly the same
        model = build_model("cifar_quick", in_channels=1, num_classes=5)
        model.load_state_dict(torch.load(ckpt, weights_only=True))
    acb = acnet.convert(model, branch_init="small").eval()  # preserve=True is the default
    with torch.no_grad():
        same = (acb(test_x[:256]) - model.eval()(test_x[:256])).abs().max().item()
    print(f"converted with the function preserved: max |diff| {same:.2e}")
    assert same < 1e-4

    # 3. a new head for the new classes, then fine-tune (labels 5-9 become 0-4)
    acb[-1] = nn.Linear(acb[-1].in_features, 5)  # cifar_quick is a Sequential
    fit(acb, train_x[new][:1500], train_y[new][:1500] - 5, epochs=3, lr=0.01)
    deployed = acnet.deploy(acb.eval())
    stock = build_model("cifar_quick", in_channels=1, num_classes=5)
    stock.load_state_dict(deployed.state_dict())  # strict: the plain architecture
    print(f"fine-tuned on 1,500 images of classes 5-9: "
          f"{accuracy(stock, test_x[new_t], test_y[new_t] - 5):.3f} (stock model, deployed)")


if __name__ == "__main__":
    main()
