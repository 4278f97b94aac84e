"""Write Fashion-MNIST as a folder of PNG images, one sub-folder per class: the layout of your
own images that `--dataset folder` reads (DIR/<class>/..., split by --val-fraction; or
DIR/train/<class>/ with DIR/val/<class>/).

    python examples/image_folder.py --out fmnist-folder --per-class 1100
    acnet reproduce --preset compare --model tv:resnet18 --dataset folder \
        --data-dir fmnist-folder --image-size 32 --epochs 3 --out compare

With no arguments it writes 100 images per class into ./fmnist-folder.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image

from acnet.data import DatasetNotFoundError, load_dataset, synthetic

CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker",
           "bag", "ankle-boot")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="fmnist-folder", help="folder to write (default %(default)s)")
    p.add_argument("--per-class", type=int, default=100, help="images per class (default "
                   "%(default)s; Fashion-MNIST has 6,000 training images per class)")
    a = p.parse_args()
    try:
        data = load_dataset("fashion-mnist")
        print("data: Fashion-MNIST")
    except DatasetNotFoundError:
        data = synthetic(10 * a.per_class * 2, 10, channels=1, size=28, num_classes=10)
        print("data: synthetic (install Debian's dataset-fashion-mnist for the real one)")
    out = Path(a.out)
    written = [0] * 10
    for img, label in zip(data.train_x, data.train_y.tolist(), strict=True):
        if written[label] >= a.per_class:
            continue
        folder = out / CLASSES[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img[0].numpy(), "L").save(folder / f"{written[label]:05d}.png")
        written[label] += 1
        if min(written) >= a.per_class:
            break
    print(f"wrote {sum(written)} PNG images in {len(CLASSES)} class folders under {out}")


if __name__ == "__main__":
    main()
