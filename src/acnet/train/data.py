"""A run's data: the training loader and the test loader, built separately."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..data import InMemoryLoader, load_dataset
from ..data.datasets import ImageData
from ..data.folder import imagenet_test_loader, imagenet_train_loader
from ..errors import InputError
from .config import TrainConfig

__all__ = ["TEST_BATCH", "Split", "in_memory_data", "test_split", "train_split"]

TEST_BATCH = 512  # in-memory test batches (evaluation only: any size gives the same accuracy)


@dataclass
class Split:
    """One loader and what the model needs to know about its images."""

    loader: Any
    in_channels: int
    num_classes: int
    input_size: int
    images: int


def in_memory_data(cfg: TrainConfig, *, train: bool = True) -> ImageData | None:
    """The run's in-memory dataset, limited as configured (None for streamed ImageNet)."""
    if cfg.dataset == "imagenet":
        return None
    data = load_dataset(cfg.dataset, cfg.data_dir, cfg.download, train=train)
    return data.select_classes(cfg.classes).limit(cfg.train_limit, cfg.test_limit)


def train_split(cfg: TrainConfig, device: torch.device, *, rank: int = 0, world: int = 1,
                data: ImageData | None = None) -> Split:
    """The training loader of one rank (shuffled and augmented per epoch, seeded)."""
    per_rank = cfg.batch_size // world
    if per_rank < 1:
        raise InputError(f"batch_size {cfg.batch_size} is smaller than the {world} ranks",
                         params=("batch_size",))
    if cfg.dataset == "imagenet":
        stream, classes, n = imagenet_train_loader(
            cfg.data_dir, cfg.batch_size, device=device, workers=cfg.workers, rank=rank,
            world=world, seed=cfg.seed, image_size=cfg.image_size, train_limit=cfg.train_limit)
        return Split(stream, 3, classes, cfg.image_size, n)
    data = data or in_memory_data(cfg)
    if data is None:
        raise InputError(f"{cfg.dataset} has no in-memory training data")
    if cfg.batch_size > len(data.train_x):
        raise InputError(f"batch_size {cfg.batch_size} is larger than the "
                         f"{len(data.train_x)} training images", params=("batch_size",))
    loader = InMemoryLoader(data.train_x, data.train_y, per_rank, train=True, seed=cfg.seed,
                            crop_padding=data.crop_padding if cfg.augment else 0,
                            hflip=data.hflip and cfg.augment, rank=rank,
                            world=world, mean=data.mean, std=data.std, device=device)
    return Split(loader, data.shape[0], data.num_classes, data.shape[1], len(data.train_x))


def test_split(cfg: TrainConfig, device: torch.device | str = "cpu", *, transform: str = "none",
               data: ImageData | None = None) -> Split:
    """The test loader (every test image up to ``cfg.test_limit``, in order, ``transform``
    applied); builds no training data."""
    device = torch.device(device)
    if cfg.dataset == "imagenet":
        folder, classes = imagenet_test_loader(cfg.data_dir, cfg.batch_size, device=device,
                                               workers=cfg.workers, image_size=cfg.image_size,
                                               transform=transform)
        return Split(folder, 3, classes, cfg.image_size, folder.images)
    data = data or in_memory_data(cfg, train=False)
    if data is None:
        raise InputError(f"{cfg.dataset} has no in-memory test data")
    loader = InMemoryLoader(data.test_x, data.test_y, TEST_BATCH, transform=transform,
                            mean=data.mean, std=data.std, device=device)
    return Split(loader, data.shape[0], data.num_classes, data.shape[1], len(data.test_x))
