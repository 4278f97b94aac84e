"""Batches from in-memory uint8 tensors, augmented with batched tensor ops on the device.

Shuffling and augmentation draw from a generator seeded by (seed, epoch), so an epoch is the
same whether a run was interrupted or not, and every rank of a DDP job agrees on the order.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from ..errors import InputError

__all__ = ["TRANSFORMS", "InMemoryLoader", "apply_transform", "augment", "normalize"]

TRANSFORMS = ("none", "hflip", "vflip", "rot90")


def normalize(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """uint8 (N, C, H, W) → float, standardized per channel."""
    return (x.float().div_(255) - mean) / std


def augment(x: Tensor, padding: int, hflip: bool, g: torch.Generator) -> Tensor:
    """Random crop with zero padding and random horizontal flip, for the whole batch at once."""
    n, c, h, w = x.shape
    if padding > 0:
        xp = torch.nn.functional.pad(x, (padding, padding, padding, padding))
        dy = torch.randint(0, 2 * padding + 1, (n,), generator=g, device=g.device).to(x.device)
        dx = torch.randint(0, 2 * padding + 1, (n,), generator=g, device=g.device).to(x.device)
        rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
        batch = torch.arange(n, device=x.device)[:, None, None, None]
        chan = torch.arange(c, device=x.device)[None, :, None, None]
        x = xp[batch, chan, rows, cols]
    if hflip:
        flip = (torch.rand(n, generator=g, device=g.device) < 0.5).to(x.device)
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    return x


def apply_transform(x: Tensor, transform: str) -> Tensor:
    """The paper's robustness transforms of a test batch."""
    if transform == "none":
        return x
    if transform == "hflip":
        return x.flip(3)
    if transform == "vflip":
        return x.flip(2)
    if transform == "rot90":
        return torch.rot90(x, 1, (2, 3))
    raise InputError(f"transform must be one of {TRANSFORMS}, got {transform!r}")


class InMemoryLoader:
    """Iterate (images, labels) batches of one rank's shard; images already normalized floats."""

    def __init__(self, images: Tensor, labels: Tensor, batch_size: int, *, mean, std,
                 device: torch.device | str = "cpu", train: bool = False, seed: int = 0,
                 crop_padding: int = 0, hflip: bool = False, rank: int = 0, world: int = 1,
                 drop_last: bool | None = None, transform: str = "none") -> None:
        if batch_size < 1:
            raise InputError(f"batch size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.images = images.to(self.device)
        self.labels = labels.to(self.device)
        self.batch_size = batch_size
        self.train = train
        self.seed = seed
        self.crop_padding = crop_padding
        self.hflip = hflip
        self.rank, self.world = rank, world
        self.drop_last = train if drop_last is None else drop_last
        self.transform = transform
        apply_transform(images[:1], transform)  # validate early
        self.mean = torch.tensor(mean, device=self.device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, -1, 1, 1)
        self.epoch = 0
        n = len(self.images) // world if world > 1 else len(self.images)
        if self.drop_last and n < batch_size:
            raise InputError(f"batch size {batch_size * world} is larger than the {len(images)} "
                             f"training images")
        self.shard_size = n

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n = self.shard_size
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _generator(self) -> torch.Generator:
        gen_device = self.device if self.device.type == "cuda" else torch.device("cpu")
        g = torch.Generator(device=gen_device)
        g.manual_seed(self.seed * 1_000_003 + self.epoch)
        return g

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        total = len(self.images)
        if self.train:
            g = self._generator()
            order = torch.randperm(total, generator=g, device=g.device).to(self.device)
        else:
            g = None
            order = torch.arange(total, device=self.device)
        if self.world > 1:  # every rank sees the same permutation; take a disjoint shard
            order = order[: self.shard_size * self.world][self.rank :: self.world]
        for i in range(len(self)):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size]
            x = self.images[idx]
            if self.train and g is not None:
                x = augment(x, self.crop_padding, self.hflip, g)
            x = apply_transform(x, self.transform)
            yield normalize(x, self.mean, self.std), self.labels[idx]
