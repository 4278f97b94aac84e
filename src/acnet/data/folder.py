"""Image folders streamed from disk with DataLoader workers: your own images (``folder``) and
ImageNet (a folder dataset with ImageNet's defaults).

Two layouts: ``DIR/train/<class>/...`` with ``DIR/val/<class>/...``, or ``DIR/<class>/...``
split into training and validation images per class by a fixed seed (``val_fraction`` of each
class held out; the split does not depend on the run's seed, so every run of a comparison is
tested on the same images). Any number of classes, any image size, grayscale or RGB.

Training images: random resized crop to ``image_size`` and a random horizontal flip (the
torchvision reference recipe); evaluation: resize to ``image_size`` · 256/224, centre crop.
Files whose name is not an image's, or whose header no image reader accepts, are skipped with
one warning that counts them; an image that fails to decode later is replaced by the next
readable one of its split (a warning names it), so nothing stops an epoch half way.
"""

from __future__ import annotations

import logging
import os
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError, InputTypeError, require
from .datasets import DatasetNotFoundError, check_data_dir
from .loader import apply_transform

log = logging.getLogger(__name__)

__all__ = [
    "IMAGENET",
    "IMAGE_EXTENSIONS",
    "FolderDefaults",
    "FolderLoader",
    "FolderSpec",
    "ImageFiles",
    "folder_test_loader",
    "folder_train_loader",
    "index_folder",
    "open_folder",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
                    ".pgm", ".pbm")
# grayscale deeper than 8 bits: integers read as 16-bit data (÷65535), floats as [0, 1] values
DEEP_GRAY = {"I;16": 65535.0, "I;16B": 65535.0, "I;16L": 65535.0, "I;16N": 65535.0,
             "I": 65535.0, "F": 1.0}
GRAY_MODES = ("1", "L", "LA", *DEEP_GRAY)
SPLIT_SEED = 0  # the class-wise train/val split and the limited subsets; never the run's seed
PROBE_IMAGES = 200  # images whose mode and size decide channels and the automatic image size
STATS_IMAGES = 1000  # training images whose pixels give the mean and std
MAX_AUTO_SIZE = 224  # the automatic image size: the images' median shorter side, at most this
EVAL_RESIZE = 256 / 224  # evaluation resizes to image_size * this, then centre-crops


@dataclass(frozen=True)
class FolderDefaults:
    """What a folder dataset assumes where the config leaves it open (None: from the images)."""

    name: str
    layouts: tuple[str, ...]  # "train/val" and/or "split"
    probe: bool  # open every file's header while indexing (too slow for ImageNet's 1.3M)
    channels: int | None = None
    image_size: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    default_dir: str | None = None


FOLDER = FolderDefaults("folder", ("train/val", "split"), probe=True)
IMAGENET = FolderDefaults("imagenet", ("train/val",), probe=False, channels=3, image_size=224,
                          mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                          default_dir="data/imagenet")
DEFAULTS = {d.name: d for d in (FOLDER, IMAGENET)}


@dataclass(frozen=True)
class FolderSpec:
    """An indexed folder dataset and how its images become tensors."""

    name: str
    root: Path
    layout: str
    classes: tuple[str, ...]
    train: tuple[tuple[str, int], ...]  # (path, class index)
    val: tuple[tuple[str, int], ...]
    channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    skipped: int = 0


# ------------------------------------------------------------------------------- indexing
def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def _unreadable() -> tuple[type[Exception], ...]:
    """What a file Pillow cannot (or will not: an image over its pixel limit) read raises."""
    from PIL import Image

    return (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def _readable(path: str) -> bool:
    """Whether an image reader accepts the file's header (cheap: nothing is decoded)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.size  # noqa: B018 (the header is parsed on open; size proves it)
        return True
    except _unreadable():
        return False


def _class_dirs(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))


def _files(d: Path, probe: bool, skipped: list[str]) -> list[str]:
    """Image files under ``d`` (recursively, sorted); others are added to ``skipped``."""
    out = []
    for top, dirs, names in os.walk(d, followlinks=True):
        dirs[:] = sorted(x for x in dirs if not x.startswith("."))
        for name in sorted(names):
            path = os.path.join(top, name)
            if name.startswith("."):
                continue
            if _is_image_name(name) and (not probe or _readable(path)):
                out.append(path)
            else:
                skipped.append(path)
    return out


def _scan(d: Path, probe: bool, skipped: list[str]) -> dict[str, list[str]]:
    """{class name: files} of the class folders in ``d``."""
    return {c.name: _files(c, probe, skipped) for c in _class_dirs(d)}


def _bad(message: str) -> InputError:
    return InputError(message, params=("data_dir",))


def _check_classes(where: Path, found: dict[str, list[str]]) -> None:
    if len(found) < 2:
        raise _bad(f"{where} holds {len(found)} class folder(s); a folder dataset needs at "
                   f"least two (one sub-folder of images per class)")
    empty = [where / c for c, files in found.items() if not files]
    if empty:
        raise _bad(f"class folder {empty[0]} holds no readable image"
                   + (f" (nor do {len(empty) - 1} other class folders)" if len(empty) > 1
                      else ""))


def _split(found: dict[str, list[str]], val_fraction: float, where: Path
           ) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """Each class's files split by ``SPLIT_SEED``: round(fraction · n) images, at least one,
    for validation, the rest for training."""
    g = torch.Generator().manual_seed(SPLIT_SEED)
    train, val = [], []
    for i, files in enumerate(found.values()):
        if len(files) < 2:
            raise _bad(f"class folder {where / list(found)[i]} holds {len(files)} image; "
                       f"splitting needs at least two per class (or give train/ and val/)")
        k = min(len(files) - 1, max(1, round(val_fraction * len(files))))
        order = torch.randperm(len(files), generator=g).tolist()
        val += [(files[j], i) for j in sorted(order[:k])]
        train += [(files[j], i) for j in sorted(order[k:])]
    return train, val


def index_folder(root: str | os.PathLike, val_fraction: float = 0.1, *,
                 defaults: FolderDefaults = FOLDER) -> tuple[str, tuple[str, ...],
                                                             list[tuple[str, int]],
                                                             list[tuple[str, int]], list[str]]:
    """(layout, classes, train samples, val samples, skipped files) of a folder dataset."""
    base = Path(root)
    if not base.is_dir():
        raise DatasetNotFoundError(f"data directory {base} does not exist or is not a "
                                   f"directory", params=("data_dir",))
    if not 0 < val_fraction < 1:
        raise InputError(f"val_fraction must be in (0, 1), got {val_fraction}",
                         params=("val_fraction",))
    skipped: list[str] = []
    if (base / "train").is_dir():
        if not (base / "val").is_dir():
            raise _bad(f"{base} has train/ but no val/ folder; add val/<class>/ images, or "
                       f"put the class folders directly in {base} to split them by "
                       f"val_fraction")
        found = _scan(base / "train", defaults.probe, skipped)
        _check_classes(base / "train", found)
        held = _scan(base / "val", defaults.probe, skipped)
        extra = sorted(set(held) - set(found))
        if extra:
            raise _bad(f"{base / 'val' / extra[0]}: a validation class with no training "
                       f"folder in {base / 'train'}")
        missing = [c for c in found if not held.get(c)]
        if missing:
            raise _bad(f"{base / 'val'} has no images of training class(es) "
                       f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}; every "
                       f"class needs validation images")
        index = {c: i for i, c in enumerate(found)}
        train = [(f, i) for c, i in index.items() for f in found[c]]
        val = [(f, index[c]) for c in found for f in held[c]]
        layout = "train/val"
    else:
        if "split" not in defaults.layouts:
            raise DatasetNotFoundError(
                f"{defaults.name} not found: expected {base.resolve()}/train and /val "
                f"ImageFolders (one folder per class); give their parent directory (data_dir)",
                params=("data_dir",))
        found = _scan(base, defaults.probe, skipped)
        _check_classes(base, found)
        train, val = _split(found, val_fraction, base)
        layout = "split"
    if skipped:
        log.warning("%s: skipped %d file(s) that are not readable images (e.g. %s)", base,
                    len(skipped), skipped[0])
    return layout, tuple(found), train, val, skipped


# ------------------------------------------------------------------------------- images
def _load(path: str, mode: str) -> Any:
    from PIL import Image

    with Image.open(path) as img:
        if img.mode in DEEP_GRAY:  # Pillow's convert("L") would clip these at 255
            return _deep_gray_to_l(img, DEEP_GRAY[img.mode]).convert(mode)
        return img.convert(mode)


def _deep_gray_to_l(img: Any, full_scale: float) -> Any:
    """An 8-bit grayscale image of a 16-bit, 32-bit or float one: value / full_scale, clipped to
    [0, 1], times 255."""
    import numpy as np
    from PIL import Image

    a = np.asarray(img, dtype=np.float64) / full_scale
    return Image.fromarray(np.rint(np.clip(a, 0.0, 1.0) * 255).astype(np.uint8), "L")


class ImageFiles(torch.utils.data.Dataset):
    """(image tensor, label) of image files; a file that fails to decode is replaced by the
    next readable one (with a warning), so an epoch never stops half way."""

    def __init__(self, samples: tuple[tuple[str, int], ...] | list[tuple[str, int]],
                 channels: int, transform: Any) -> None:
        self.samples = list(samples)
        self.mode = "L" if channels == 1 else "RGB"
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        n = len(self.samples)
        for k in range(n):
            path, label = self.samples[(i + k) % n]
            try:
                img = _load(path, self.mode)
            except _unreadable() as exc:
                log.warning("skipping unreadable image %s (%s)", path, exc)
                continue
            return self.transform(img), label
        raise InputError(f"none of the {n} images can be read (the first: {self.samples[0][0]})",
                         params=("data_dir",))


class _Then:
    """A picklable transform step: ``apply_transform`` of one image tensor."""

    def __init__(self, transform: str) -> None:
        self.transform = transform

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return apply_transform(x[None], self.transform)[0]


def _transforms() -> Any:
    return require("torchvision.transforms", "vision", "folder datasets")


def _eval_transform(spec_or_size: int, mean: tuple[float, ...] | None,
                    std: tuple[float, ...] | None, transform: str = "none") -> Any:
    t = _transforms()
    steps = [t.Resize(round(spec_or_size * EVAL_RESIZE)), t.CenterCrop(spec_or_size),
             t.ToTensor()]
    if mean is not None and std is not None:
        steps.append(t.Normalize(mean, std))
    if transform != "none":
        steps.append(_Then(transform))
    return t.Compose(steps)


def _train_transform(spec: FolderSpec, augment: bool) -> Any:
    if not augment:
        return _eval_transform(spec.image_size, spec.mean, spec.std)
    t = _transforms()
    return t.Compose([t.RandomResizedCrop(spec.image_size), t.RandomHorizontalFlip(),
                      t.ToTensor(), t.Normalize(spec.mean, spec.std)])


def _sample(samples: list[tuple[str, int]] | tuple[tuple[str, int], ...], k: int
            ) -> list[tuple[str, int]]:
    """Up to ``k`` samples drawn by ``SPLIT_SEED`` (all of them when there are fewer)."""
    if len(samples) <= k:
        return list(samples)
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(SPLIT_SEED))
    return [samples[j] for j in sorted(order[:k].tolist())]


def _probe_images(samples: list[tuple[str, int]]) -> tuple[int, int]:
    """(channels, automatic image size) from a sample of the training images: 1 channel when
    every one is grayscale, and the median shorter side, at most ``MAX_AUTO_SIZE``."""
    from PIL import Image

    modes, sides = set(), []
    for path, _ in _sample(samples, PROBE_IMAGES):
        try:
            with Image.open(path) as img:
                modes.add(img.mode)
                sides.append(min(img.size))
        except _unreadable():
            continue
    if not sides:
        raise InputError("none of the sampled training images can be read", params=("data_dir",))
    channels = 1 if modes <= set(GRAY_MODES) else 3
    return channels, min(MAX_AUTO_SIZE, max(1, int(statistics.median(sides))))


def _pixel_stats(samples: list[tuple[str, int]], channels: int, size: int
                 ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of up to ``STATS_IMAGES`` training images as evaluated
    (resized and centre-cropped), rounded to 4 decimals."""
    images = ImageFiles(_sample(samples, STATS_IMAGES), channels, _eval_transform(size, None, None))
    total = torch.zeros(channels, dtype=torch.float64)
    squares = torch.zeros(channels, dtype=torch.float64)
    count = 0
    for i in range(len(images)):
        x = images[i][0].double()
        total += x.sum((1, 2))
        squares += x.square().sum((1, 2))
        count += x[0].numel()
    mean = total / count
    std = (squares / count - mean.square()).clamp_min(1e-12).sqrt()
    return (tuple(round(v, 4) for v in mean.tolist()),
            tuple(max(round(v, 4), 1e-4) for v in std.tolist()))


def open_folder(name: str, root: str | None, *, val_fraction: float = 0.1,
                image_size: int | None = None, channels: int | None = None,
                mean: tuple[float, ...] | list[float] | None = None,
                std: tuple[float, ...] | list[float] | None = None) -> FolderSpec:
    """Index a folder dataset (``folder`` or ``imagenet``) and settle what the arguments leave
    open: channels and image size from a sample of its images, mean and std from its
    training images (the given values win; ImageNet has its own defaults)."""
    defaults = DEFAULTS.get(name)
    if defaults is None:
        raise InputError(f"{name!r} is not a folder dataset; choose one of "
                         f"{', '.join(DEFAULTS)}", params=("dataset",))
    if channels is not None and (isinstance(channels, bool) or channels not in (1, 3)):
        raise InputError(f"channels must be 1 (grayscale), 3 (RGB) or None (from the images), "
                         f"got {channels!r}", params=("channels",))
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int)
                                   or image_size < 1):
        raise InputError(f"image_size must be a positive integer or None (from the images), got "
                         f"{image_size!r}", params=("image_size",))
    for what, v in (("mean", mean), ("std", std)):
        if v is not None and not isinstance(v, list | tuple):
            raise InputTypeError(f"{what} must be a list of numbers (one per channel, or one for "
                                 f"all), got {v!r}", params=(what,))
    check_data_dir(root, dataset=name)
    if root is None:
        if defaults.default_dir is None:
            raise InputError(f"the {name} dataset needs the directory of your images: give "
                             f"data_dir (DIR/train and DIR/val, or DIR/<class>/ folders)",
                             params=("data_dir",))
        root = defaults.default_dir
    layout, classes, train, val, skipped = index_folder(root, val_fraction, defaults=defaults)
    for what, v in (("mean", mean), ("std", std)):
        if v is not None and (not v or any(not isinstance(x, int | float) for x in v)):
            raise InputError(f"{what} must be a list of numbers (one per channel), got {v!r}",
                             params=(what,))
    if std is not None and min(std) <= 0:
        raise InputError(f"std must be positive, got {list(std)}", params=("std",))
    if channels is None:
        channels = defaults.channels
    size = image_size or defaults.image_size
    if channels is None or size is None:
        probed_channels, probed_size = _probe_images(train)
        channels = channels or probed_channels
        size = size or probed_size
    mean = tuple(mean) if mean is not None else defaults.mean
    std = tuple(std) if std is not None else defaults.std
    if mean is None or std is None:
        stats = _pixel_stats(train, channels, size)
        mean, std = mean or stats[0], std or stats[1]
    for what, v in (("mean", mean), ("std", std)):
        if len(v) not in (1, channels):
            raise InputError(f"{what} has {len(v)} values for {channels}-channel images",
                             params=(what,))
    return FolderSpec(name, Path(root), layout, classes, tuple(train), tuple(val), channels,
                      size, tuple(mean), tuple(std), len(skipped))


# ------------------------------------------------------------------------------- loaders
class FolderLoader:
    """Wrap a DataLoader so it moves batches to the device and reshuffles per epoch."""

    def __init__(self, loader: torch.utils.data.DataLoader, device: torch.device,
                 images: int = 0, seed: int | None = None) -> None:
        self.loader = loader
        self.device = device
        self.images = images  # how many images one pass yields
        self.seed = seed

    def set_epoch(self, epoch: int) -> None:
        """The epoch's order and its workers' random augmentation, from (seed, epoch) alone: a
        resumed run draws what the uninterrupted one drew (workers start anew each epoch)."""
        sampler = self.loader.sampler
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        if self.loader.generator is not None and self.seed is not None:
            self.loader.generator.manual_seed(_epoch_seed(self.seed, epoch) + 1)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for x, y in self.loader:
            yield (x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True))


def _epoch_seed(seed: int, epoch: int) -> int:
    return seed * 1_000_003 + epoch


class _EpochSampler(torch.utils.data.Sampler):
    """A random order seeded by (seed, epoch): an epoch is the same after a resume."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        g = torch.Generator().manual_seed(_epoch_seed(self.seed, self.epoch))
        return iter(torch.randperm(self.n, generator=g).tolist())


def folder_train_loader(spec: FolderSpec, batch_size: int, *, device: torch.device,
                        workers: int = 4, rank: int = 0, world: int = 1, seed: int = 0,
                        train_limit: int | None = None, augment: bool = True) -> FolderLoader:
    """The training images of one rank (shuffled per epoch, augmented), ``train_limit`` of them
    drawn by a fixed seed."""
    samples = _sample(spec.train, train_limit) if train_limit else list(spec.train)
    per_rank = max(1, batch_size // world)
    if len(samples) // world < per_rank:
        raise InputError(f"batch_size {batch_size} is larger than the {len(samples)} training "
                         f"images of {spec.root}", params=("batch_size",))
    data = ImageFiles(samples, spec.channels, _train_transform(spec, augment))
    sampler: torch.utils.data.Sampler = (
        torch.utils.data.distributed.DistributedSampler(data, world, rank, seed=seed)
        if world > 1 else _EpochSampler(len(data), seed))
    # the workers' seeds come from this generator, re-seeded per epoch (set_epoch), never
    # from the global RNG, so an epoch's augmentation does not depend on where a run started
    loader = torch.utils.data.DataLoader(data, per_rank, sampler=sampler, num_workers=workers,
                                         pin_memory=device.type == "cuda", drop_last=True,
                                         generator=torch.Generator().manual_seed(seed))
    return FolderLoader(loader, device, len(samples), seed=seed + 1_000_003 * rank)


def folder_test_loader(spec: FolderSpec, batch_size: int, *, device: torch.device,
                       workers: int = 4, transform: str = "none",
                       test_limit: int | None = None) -> FolderLoader:
    """The validation images in order (resize, centre crop, then ``transform``), ``test_limit``
    of them drawn by a fixed seed."""
    apply_transform(torch.zeros(1, 1, 2, 2), transform)  # validate early
    samples = _sample(spec.val, test_limit) if test_limit else list(spec.val)
    data = ImageFiles(samples, spec.channels,
                      _eval_transform(spec.image_size, spec.mean, spec.std, transform))
    loader = torch.utils.data.DataLoader(data, batch_size, shuffle=False, num_workers=workers,
                                         pin_memory=device.type == "cuda",
                                         generator=torch.Generator().manual_seed(0))
    return FolderLoader(loader, device, len(samples))
