"""Synthetic dense-prediction scenes: Fashion-MNIST items pasted on a blank canvas, with exact
per-pixel masks, boxes and labels (a stand-in for COCO/Cityscapes, which this machine cannot
reach; it is synthetic and the study says so).

Each scene holds 1 to ``max_items`` items that do not overlap, so every mask and box is exact:
the mask is the item's pixels above ``threshold`` (its silhouette), the box the silhouette's
extent, the label the item's class + 1 (0 is the background). Training scenes use the training
images and test scenes the test images; a seed fixes everything.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import InputError
from .datasets import ImageData

__all__ = ["Scenes", "make_scenes", "scene_splits"]


@dataclass
class Scenes:
    """N scenes: images uint8 (N, 1, S, S), masks int64 (N, S, S) with 0 = background and
    class + 1 elsewhere, and per scene its boxes (K, 4: x0, y0, x1, y1, exclusive ends) and
    labels (K,: class + 1)."""

    images: Tensor
    masks: Tensor
    boxes: list[Tensor]
    labels: list[Tensor]
    num_classes: int  # object classes, without the background

    def __len__(self) -> int:
        return len(self.images)


def _place(size: int, item: int, taken: list[tuple[int, int]], g: torch.Generator,
           tries: int = 50) -> tuple[int, int] | None:
    """A top-left corner for an item×item patch that overlaps no taken one, or None."""
    for _ in range(tries):
        y, x = torch.randint(0, size - item + 1, (2,), generator=g).tolist()
        if all(abs(y - ty) >= item or abs(x - tx) >= item for ty, tx in taken):
            return y, x
    return None


def make_scenes(images: Tensor, labels: Tensor, n: int, *, size: int = 64, max_items: int = 3,
                threshold: int = 25, num_classes: int = 10, seed: int = 0) -> Scenes:
    """``n`` scenes of ``size``×``size`` from uint8 item images (M, 1, h, w) and their labels."""
    if images.dim() != 4 or images.shape[1] != 1 or images.dtype != torch.uint8:
        raise InputError(f"items must be uint8 (M, 1, h, w), got {tuple(images.shape)} "
                         f"{images.dtype}")
    item = images.shape[-1]
    if size < item or n < 1 or max_items < 1:
        raise InputError(f"need size >= the item size {item}, n >= 1 and max_items >= 1, got "
                         f"size={size}, n={n}, max_items={max_items}")
    g = torch.Generator().manual_seed(seed)
    canvas = torch.zeros(n, 1, size, size, dtype=torch.uint8)
    masks = torch.zeros(n, size, size, dtype=torch.long)
    boxes, labs = [], []
    for i in range(n):
        k = int(torch.randint(1, max_items + 1, (1,), generator=g))
        taken: list[tuple[int, int]] = []
        b, lab = [], []
        for _ in range(k):
            pos = _place(size, item, taken, g)
            if pos is None:
                break
            taken.append(pos)
            j = int(torch.randint(0, len(images), (1,), generator=g))
            img, cls = images[j, 0], int(labels[j])
            sil = img > threshold
            if not sil.any():
                continue
            y, x = pos
            canvas[i, 0, y:y + item, x:x + item] = img
            masks[i, y:y + item, x:x + item][sil] = cls + 1
            rows, cols = sil.any(1).nonzero().flatten(), sil.any(0).nonzero().flatten()
            b.append([x + int(cols[0]), y + int(rows[0]), x + int(cols[-1]) + 1,
                      y + int(rows[-1]) + 1])
            lab.append(cls + 1)
        boxes.append(torch.tensor(b, dtype=torch.float32).reshape(-1, 4))
        labs.append(torch.tensor(lab, dtype=torch.long))
    return Scenes(canvas, masks, boxes, labs, num_classes)


def scene_splits(data: ImageData, train: int, test: int, *, size: int = 64,
                 max_items: int = 3, seed: int = 0) -> tuple[Scenes, Scenes]:
    """Training scenes from the training images and test scenes from the test images."""
    if data.shape[0] != 1:
        raise InputError(f"scenes are built from one-channel items, got {data.shape[0]} "
                         f"channels ({data.name})")
    return (make_scenes(data.train_x, data.train_y, train, size=size, max_items=max_items,
                        num_classes=data.num_classes, seed=seed),
            make_scenes(data.test_x, data.test_y, test, size=size, max_items=max_items,
                        num_classes=data.num_classes, seed=seed + 1))
