"""A run's data: the training loader and the test loader, built separately."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..data import InMemoryLoader, load_dataset
from ..data.datasets import STREAMED, ImageData
from ..data.folder import FolderSpec, folder_test_loader, folder_train_loader, open_folder
from ..errors import InputError
from .config import TrainConfig

__all__ = ["TEST_BATCH", "Split", "fill_data_fields", "in_memory_data", "open_data", "test_split",
           "train_split"]

TEST_BATCH = 512  # in-memory test batches (evaluation only: any size gives the same accuracy)


@dataclass
class Split:
    """One loader and what the model needs to know about its images."""

    loader: Any
    in_channels: int
    num_classes: int
    input_size: int
    images: int
    class_names: tuple[str, ...] | None = None


def in_memory_data(cfg: TrainConfig, *, train: bool = True) -> ImageData | None:
    """The run's in-memory dataset, limited as configured (None for streamed folders)."""
    if cfg.dataset in STREAMED:
        return None
    data = load_dataset(cfg.dataset, cfg.data_dir, cfg.download, train=train)
    data = data.select_classes(cfg.classes).limit(cfg.train_limit, cfg.test_limit)
    if cfg.mean is not None and cfg.std is not None:
        channels = data.shape[0]
        for name, v in (("mean", cfg.mean), ("std", cfg.std)):
            if len(v) not in (1, channels):
                raise InputError(f"{name} has {len(v)} values for {channels}-channel images",
                                 params=(name,))
        data.mean, data.std = tuple(cfg.mean), tuple(cfg.std)
    return data


def folder_data(cfg: TrainConfig) -> FolderSpec:
    """The run's image folder, indexed, with what the config leaves open settled (a finished
    run's config has its channels, size, mean and std, so evaluating it reads no pixels)."""
    return open_folder(cfg.dataset, cfg.data_dir, val_fraction=cfg.val_fraction,
                       image_size=cfg.image_size or cfg.input_size, channels=cfg.in_channels,
                       mean=cfg.mean, std=cfg.std)


def open_data(cfg: TrainConfig, *, train: bool = True) -> ImageData | FolderSpec:
    """The run's dataset: in memory, or an indexed image folder."""
    if cfg.dataset in STREAMED:
        return folder_data(cfg)
    data = in_memory_data(cfg, train=train)
    assert data is not None
    return data


def fill_data_fields(cfg: TrainConfig, split: Split, data: ImageData | FolderSpec) -> None:
    """Write what the data decided into ``cfg`` so the run can be rebuilt and evaluated from
    its config.json alone: shape, classes and (for folders) the size and normalisation."""
    cfg.in_channels, cfg.num_classes, cfg.input_size = (split.in_channels, split.num_classes,
                                                        split.input_size)
    cfg.class_names = list(split.class_names) if split.class_names else None
    if isinstance(data, FolderSpec):
        cfg.mean, cfg.std = list(data.mean), list(data.std)


def train_split(cfg: TrainConfig, device: torch.device, *, rank: int = 0, world: int = 1,
                data: ImageData | FolderSpec | None = None) -> Split:
    """The training loader of one rank (shuffled and augmented per epoch, seeded)."""
    per_rank = cfg.batch_size // world
    if per_rank < 1:
        raise InputError(f"batch_size {cfg.batch_size} is smaller than the {world} ranks",
                         params=("batch_size",))
    data = data or open_data(cfg)
    if isinstance(data, FolderSpec):
        stream = folder_train_loader(data, cfg.batch_size, device=device, workers=cfg.workers,
                                     rank=rank, world=world, seed=cfg.seed,
                                     train_limit=cfg.train_limit, augment=cfg.augment)
        return Split(stream, data.channels, len(data.classes), data.image_size, stream.images,
                     data.classes)
    if cfg.batch_size > len(data.train_x):
        raise InputError(f"batch_size {cfg.batch_size} is larger than the "
                         f"{len(data.train_x)} training images", params=("batch_size",))
    loader = InMemoryLoader(data.train_x, data.train_y, per_rank, train=True, seed=cfg.seed,
                            crop_padding=data.crop_padding if cfg.augment else 0,
                            hflip=data.hflip and cfg.augment, rank=rank,
                            world=world, mean=data.mean, std=data.std, device=device)
    return Split(loader, data.shape[0], data.num_classes, data.shape[1], len(data.train_x))


def test_split(cfg: TrainConfig, device: torch.device | str = "cpu", *, transform: str = "none",
               data: ImageData | FolderSpec | None = None) -> Split:
    """The test loader (every test image up to ``cfg.test_limit``, in order, ``transform``
    applied); builds no training data."""
    device = torch.device(device)
    data = data or open_data(cfg, train=False)
    if isinstance(data, FolderSpec):
        stream = folder_test_loader(data, cfg.batch_size, device=device, workers=cfg.workers,
                                    transform=transform, test_limit=cfg.test_limit)
        return Split(stream, data.channels, len(data.classes), data.image_size, stream.images,
                     data.classes)
    loader = InMemoryLoader(data.test_x, data.test_y, TEST_BATCH, transform=transform,
                            mean=data.mean, std=data.std, device=device)
    return Split(loader, data.shape[0], data.num_classes, data.shape[1], len(data.test_x))
