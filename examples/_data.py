"""Shared by the examples: Fashion-MNIST when it is installed, else a synthetic stand-in.

Real projects load their own data; this only keeps each example runnable anywhere.
"""

from __future__ import annotations

import torch

from acnet.data import DatasetNotFoundError, load_dataset, synthetic


def images(train: int, test: int) -> tuple[torch.Tensor, ...]:
    """(train_x, train_y, test_x, test_y): float images in [0, 1], 1×28×28, 10 classes."""
    try:
        data = load_dataset("fashion-mnist")
        print("data: Fashion-MNIST")
    except DatasetNotFoundError:
        data = synthetic(train, test, channels=1, size=28, num_classes=10)
        print("data: synthetic (install Debian's dataset-fashion-mnist for the real one)")
    return (data.train_x[:train].float() / 255, data.train_y[:train],
            data.test_x[:test].float() / 255, data.test_y[:test])
