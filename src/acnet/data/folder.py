"""ImageNet-style ImageFolder (train/ and val/) streamed with DataLoader workers."""

from __future__ import annotations

from pathlib import Path

import torch

from .datasets import DatasetNotFoundError

__all__ = ["FolderLoader", "imagenet_loaders"]

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class FolderLoader:
    """Wrap a DataLoader so it moves batches to the device and reshuffles per epoch."""

    def __init__(self, loader: torch.utils.data.DataLoader, device: torch.device) -> None:
        self.loader = loader
        self.device = device

    def set_epoch(self, epoch: int) -> None:
        sampler = self.loader.sampler
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for x, y in self.loader:
            yield (x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True))


def imagenet_loaders(root: str | None, batch_size: int, *, device: torch.device, workers: int = 8,
                     rank: int = 0, world: int = 1, seed: int = 0, image_size: int = 224,
                     train_limit: int | None = None, transform: str = "none"):
    """(train, val, num_classes) loaders over ``root/train`` and ``root/val`` ImageFolders."""
    try:
        from torchvision import datasets
        from torchvision import transforms as T
    except ImportError as exc:
        raise ImportError("imagenet needs torchvision: pip install 'acnet[vision]'") from exc
    from .loader import apply_transform

    base = Path(root or "data/imagenet")
    if not (base / "train").is_dir() or not (base / "val").is_dir():
        raise DatasetNotFoundError(
            f"ImageNet not found: expected {base.resolve()}/train and /val ImageFolders "
            f"(one folder per class); pass --data-dir DIR")
    norm = T.Normalize(MEAN, STD)
    train_tf = T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.ToTensor(),
                          norm])
    val_tf = T.Compose([T.Resize(int(image_size * 256 / 224)), T.CenterCrop(image_size),
                        T.ToTensor(), norm,
                        T.Lambda(lambda x: apply_transform(x[None], transform)[0])])
    train = datasets.ImageFolder(str(base / "train"), train_tf)
    val = datasets.ImageFolder(str(base / "val"), val_tf)
    if train_limit:
        train = torch.utils.data.Subset(train, range(min(train_limit, len(train))))
    sampler = (torch.utils.data.distributed.DistributedSampler(train, world, rank, seed=seed)
               if world > 1 else torch.utils.data.RandomSampler(
                   train, generator=torch.Generator().manual_seed(seed)))
    per_rank = max(1, batch_size // world)
    tl = torch.utils.data.DataLoader(train, per_rank, sampler=sampler, num_workers=workers,
                                     pin_memory=device.type == "cuda", drop_last=True,
                                     persistent_workers=workers > 0)
    vl = torch.utils.data.DataLoader(val, per_rank, shuffle=False, num_workers=workers,
                                     pin_memory=device.type == "cuda")
    return FolderLoader(tl, device), FolderLoader(vl, device), len(val.classes)
