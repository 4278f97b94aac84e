"""ImageNet-style ImageFolder (train/ and val/) streamed with DataLoader workers."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import require
from .datasets import DatasetNotFoundError, check_data_dir
from .loader import apply_transform

__all__ = ["FolderLoader", "imagenet_test_loader", "imagenet_train_loader"]

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class FolderLoader:
    """Wrap a DataLoader so it moves batches to the device and reshuffles per epoch."""

    def __init__(self, loader: torch.utils.data.DataLoader, device: torch.device,
                 images: int = 0) -> None:
        self.loader = loader
        self.device = device
        self.images = images  # how many images one pass yields

    def set_epoch(self, epoch: int) -> None:
        sampler = self.loader.sampler
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for x, y in self.loader:
            yield (x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True))


def _torchvision():
    """torchvision's datasets and transforms, or an error naming the extra."""
    return (require("torchvision.datasets", "vision", "imagenet"),
            require("torchvision.transforms", "vision", "imagenet"))


def _split_dir(root: str | None, split: str) -> Path:
    """``root/split``, checked: a missing data_dir or split folder is a clear error."""
    check_data_dir(root, dataset="imagenet")
    base = Path(root or "data/imagenet")
    if not (base / split).is_dir():
        raise DatasetNotFoundError(
            f"ImageNet not found: expected {base.resolve()}/train and /val ImageFolders "
            f"(one folder per class); give their parent directory (data_dir)",
            params=("data_dir",))
    return base / split


def imagenet_train_loader(root: str | None, batch_size: int, *, device: torch.device,
                          workers: int = 8, rank: int = 0, world: int = 1, seed: int = 0,
                          image_size: int = 224, train_limit: int | None = None
                          ) -> tuple[FolderLoader, int, int]:
    """(loader, num_classes, images) over ``root/train``, sharded over ``world`` ranks."""
    datasets, transforms = _torchvision()
    tf = transforms.Compose([transforms.RandomResizedCrop(image_size),
                             transforms.RandomHorizontalFlip(), transforms.ToTensor(),
                             transforms.Normalize(MEAN, STD)])
    folder = datasets.ImageFolder(str(_split_dir(root, "train")), tf)
    train = folder
    if train_limit:
        train = torch.utils.data.Subset(folder, range(min(train_limit, len(folder))))
    sampler = (torch.utils.data.distributed.DistributedSampler(train, world, rank, seed=seed)
               if world > 1 else torch.utils.data.RandomSampler(
                   train, generator=torch.Generator().manual_seed(seed)))
    loader = torch.utils.data.DataLoader(train, max(1, batch_size // world), sampler=sampler,
                                         num_workers=workers, pin_memory=device.type == "cuda",
                                         drop_last=True, persistent_workers=workers > 0)
    return FolderLoader(loader, device), len(folder.classes), len(train)


def imagenet_test_loader(root: str | None, batch_size: int, *, device: torch.device,
                         workers: int = 8, image_size: int = 224, transform: str = "none"
                         ) -> tuple[FolderLoader, int]:
    """(loader, num_classes) over ``root/val`` (resize, centre crop, then ``transform``)."""
    datasets, transforms = _torchvision()
    apply_transform(torch.zeros(1, 1, 2, 2), transform)  # validate early
    tf = transforms.Compose([
        transforms.Resize(int(image_size * 256 / 224)), transforms.CenterCrop(image_size),
        transforms.ToTensor(), transforms.Normalize(MEAN, STD),
        transforms.Lambda(lambda x: apply_transform(x[None], transform)[0])])
    val = datasets.ImageFolder(str(_split_dir(root, "val")), tf)
    loader = torch.utils.data.DataLoader(val, batch_size, shuffle=False, num_workers=workers,
                                         pin_memory=device.type == "cuda")
    return FolderLoader(loader, device, len(val)), len(val.classes)
