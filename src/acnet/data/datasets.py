"""Datasets as in-memory uint8 tensors (Fashion-MNIST, CIFAR, synthetic); image folders are
streamed (folder.py)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ACNetError, InputError, require
from .idx import read_idx

log = logging.getLogger(__name__)

__all__ = [
    "DATASETS",
    "FMNIST_DIRS",
    "STREAMED",
    "DatasetNotFoundError",
    "ImageData",
    "check_data_dir",
    "load_dataset",
]

DATASETS = ("fashion-mnist", "cifar10", "cifar100", "imagenet", "synthetic", "folder")
STREAMED = ("imagenet", "folder")  # image folders read from disk while training (folder.py)
FMNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)


class DatasetNotFoundError(ACNetError, FileNotFoundError):
    """A dataset that is not on disk; the message says where acnet looked and how to get it."""


@dataclass
class ImageData:
    """A train/test split held in memory: images uint8 (N, C, H, W), labels int64 (N,)."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_padding: int = 4
    hflip: bool = True

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.train_x.shape[1:])  # type: ignore[return-value]

    def limit(self, train: int | None = None, test: int | None = None) -> ImageData:
        """The first ``train`` / ``test`` images (None keeps all)."""
        for what, n in (("train", train), ("test", test)):
            if n is not None and n < 1:
                raise InputError(f"{what}_limit must be >= 1, got {n}",
                                 params=(f"{what}_limit",))
        return ImageData(self.name, self.train_x[:train], self.train_y[:train],
                         self.test_x[:test], self.test_y[:test], self.num_classes, self.mean,
                         self.std, self.crop_padding, self.hflip)


    def select_classes(self, classes: list[int] | tuple[int, ...] | None) -> ImageData:
        """Only the images of ``classes``, relabelled 0..k-1 in the order given (None: all)."""
        if classes is None:
            return self
        bad = [c for c in classes if not 0 <= c < self.num_classes]
        if bad or len(set(classes)) != len(classes) or len(classes) < 2:
            raise InputError(f"classes must be at least 2 distinct class indices of {self.name} "
                             f"(0 to {self.num_classes - 1}), got {list(classes)}",
                             params=("classes",))
        lut = torch.full((self.num_classes,), -1, dtype=torch.long)
        lut[torch.tensor(list(classes))] = torch.arange(len(classes))

        def pick(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            keep = lut[y] >= 0
            return x[keep], lut[y[keep]]

        tx, ty = pick(self.train_x, self.train_y)
        vx, vy = pick(self.test_x, self.test_y)
        return ImageData(self.name, tx, ty, vx, vy, len(classes), self.mean, self.std,
                         self.crop_padding, self.hflip)


def _stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    xf = x.float().div_(255)
    return (tuple(xf.mean((0, 2, 3)).tolist()), tuple(xf.std((0, 2, 3)).tolist()))


_HINTS = {
    "fashion-mnist": "install Debian's package dataset-fashion-mnist, or give the directory "
                     "of its IDX files (data_dir), or download it (download=True)",
    "cifar10": "give the directory holding the extracted CIFAR python archive (data_dir), or "
               "download it (download=True)",
    "imagenet": "give a directory with train/ and val/ ImageFolders (data_dir)",
    "folder": "give the directory of your images (DIR/train and DIR/val, or DIR/<class>/ "
              "folders)",
}
_HINTS["cifar100"] = _HINTS["cifar10"]


def check_data_dir(data_dir: str | None, download: bool = False, dataset: str = "") -> None:
    """A ``data_dir`` that does not exist is an error for every dataset (unless downloading
    into it): never a silent fallback to the default location."""
    if data_dir and not download and not Path(data_dir).is_dir():
        hint = _HINTS.get(dataset, "pass an existing directory")
        raise DatasetNotFoundError(f"data directory {data_dir} does not exist or is not a "
                                   f"directory; {hint}", params=("data_dir",))


def _find_fmnist(data_dir: str | None) -> Path | None:
    """Where the IDX files are: only ``data_dir`` when given, else the usual places."""
    if data_dir:
        dirs = [data_dir]
    else:
        dirs = [os.environ["ACNET_FMNIST_DIR"]] if os.environ.get("ACNET_FMNIST_DIR") else []
        dirs += list(FMNIST_DIRS)
    for d in dirs:
        for sub in ("", "FashionMNIST/raw", "fashion-mnist"):
            p = Path(d, sub)
            if any((p / f"train-images-idx3-ubyte{ext}").is_file() for ext in (".gz", "")):
                return p
    return None


def _idx_file(d: Path, stem: str) -> Path:
    gz = d / f"{stem}.gz"
    return gz if gz.is_file() else d / stem


def load_fashion_mnist(data_dir: str | None = None, download: bool = False, *,
                       train: bool = True) -> ImageData:
    """Fashion-MNIST from the IDX files (Debian's dataset-fashion-mnist, ``data_dir``, download).

    ``train=False`` reads only the test files (the training split is left empty).
    """
    d = _find_fmnist(data_dir)
    if d is None and download:
        import torchvision

        root = data_dir or "data"
        torchvision.datasets.FashionMNIST(root, train=True, download=True)
        torchvision.datasets.FashionMNIST(root, train=False, download=True)
        d = _find_fmnist(root)
    if d is None:
        looked = data_dir or ", ".join(FMNIST_DIRS)
        raise DatasetNotFoundError(
            f"Fashion-MNIST not found (looked in {looked}); install Debian's package "
            f"dataset-fashion-mnist, give its directory (data_dir), or download it "
            f"(download=True)", params=("data_dir",))
    vx = read_idx(_idx_file(d, "t10k-images-idx3-ubyte")).unsqueeze(1)
    if train:
        tx = read_idx(_idx_file(d, "train-images-idx3-ubyte")).unsqueeze(1)
        ty = read_idx(_idx_file(d, "train-labels-idx1-ubyte")).long()
    else:
        tx, ty = vx[:0], torch.zeros(0, dtype=torch.long)
    vy = read_idx(_idx_file(d, "t10k-labels-idx1-ubyte")).long()
    return ImageData("fashion-mnist", tx, ty, vx, vy, 10, (0.2860,), (0.3530,), 2, True)


def load_cifar(name: str, data_dir: str | None = None, download: bool = False) -> ImageData:
    """CIFAR-10/100 through torchvision's reader (the python pickles it downloads)."""
    torchvision = require("torchvision", "vision", "CIFAR")
    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    root = data_dir or "data"
    try:
        train = cls(root, train=True, download=download)
        test = cls(root, train=False, download=download)
    except RuntimeError as exc:
        raise DatasetNotFoundError(
            f"{name} not found in {Path(root).resolve()} ({exc}); give the directory holding "
            f"the extracted CIFAR python archive (data_dir), or download it (download=True) "
            f"when online", params=("data_dir",)) from exc

    def tensors(ds):
        return (torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(),
                torch.tensor(ds.targets, dtype=torch.long))

    tx, ty = tensors(train)
    vx, vy = tensors(test)
    mean, std = _stats(tx)
    return ImageData(name, tx, ty, vx, vy, 10 if name == "cifar10" else 100, mean, std, 4, True)


def synthetic(num_train: int = 2048, num_test: int = 512, *, channels: int = 3, size: int = 32,
              num_classes: int = 10, seed: int = 0) -> ImageData:
    """A learnable synthetic set: per-class smooth templates plus noise, uint8."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(num_classes, channels, 4, 4, generator=g)
    templates = torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear",
                                                align_corners=False)

    def make(n):
        y = torch.randint(0, num_classes, (n,), generator=g)
        x = templates[y] * 0.6 + torch.rand(n, channels, size, size, generator=g) * 0.4
        return (x * 255).round().clamp(0, 255).to(torch.uint8), y

    tx, ty = make(num_train)
    vx, vy = make(num_test)
    mean, std = _stats(tx)
    return ImageData("synthetic", tx, ty, vx, vy, num_classes, mean, std, 2, True)


def load_dataset(name: str, data_dir: str | None = None, download: bool = False, *,
                 train: bool = True) -> ImageData:
    """Load a small dataset into memory by name (``imagenet`` and ``folder`` are streamed: see
    folder.py).

    ``train=False`` may skip reading the training split where its statistics are not needed
    (Fashion-MNIST); a ``data_dir`` that does not exist is an error for every dataset.
    """
    if name not in DATASETS:
        raise InputError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    check_data_dir(data_dir, download, name)
    if name == "fashion-mnist":
        return load_fashion_mnist(data_dir, download, train=train)
    if name in ("cifar10", "cifar100"):
        return load_cifar(name, data_dir, download)
    if name == "synthetic":
        return synthetic()
    if name in STREAMED:
        raise InputError(f"{name} is streamed from an image folder: use acnet.data.folder")
    raise InputError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
