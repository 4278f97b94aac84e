"""The paper's models, the datasets and the in-memory loader."""

from __future__ import annotations

import gzip
import struct

import pytest
import torch
from helpers import sgd_steps

import acnet
from acnet.data import DatasetNotFoundError, InMemoryLoader, apply_transform, load_dataset
from acnet.data.idx import read_idx
from acnet.models import build_model, model_names


@pytest.mark.parametrize("name", model_names())
def test_every_model_builds_converts_and_trains_a_step(name):
    torch.manual_seed(0)
    base = build_model(name, in_channels=1, num_classes=10)
    model = acnet.convert(base, preserve=False, gamma_init=1 / 3)
    assert model.acnet_report.converted
    x, y = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    losses = []

    def loss(out):
        losses.append(torch.nn.functional.cross_entropy(out, y))
        return losses[-1]

    sgd_steps(model, lambda: x, steps=1, lr=0.01, loss=loss)
    assert torch.isfinite(losses[0])
    model.eval()
    dep = acnet.deploy(model)
    assert sum(p.numel() for p in dep.parameters()) == sum(p.numel() for p in base.parameters())
    with torch.no_grad():
        assert (dep(x) - model(x)).abs().max() <= 1e-4 * model(x).abs().max()


def test_tv_and_timm_names():
    pytest.importorskip("torchvision")
    m = build_model("tv:resnet18", in_channels=1, num_classes=7)
    assert m.conv1.in_channels == 1 and m.fc.out_features == 7
    with pytest.raises(ValueError, match="unknown torchvision"):
        build_model("tv:nonexistent")
    pytest.importorskip("timm")
    t = build_model("timm:resnet10t", in_channels=1, num_classes=5)
    assert t(torch.randn(2, 1, 32, 32)).shape == (2, 5)
    with pytest.raises(ValueError, match="unknown model"):
        build_model("resnet21")


def _write_idx(path, arr, code=0x08):
    header = struct.pack(">BBBB", 0, 0, code, arr.dim()) + struct.pack(f">{arr.dim()}I",
                                                                        *arr.shape)
    data = header + arr.numpy().tobytes()
    if str(path).endswith(".gz"):
        data = gzip.compress(data)
    path.write_bytes(data)


def test_idx_reader_and_data_dir(tmp_path):
    imgs = torch.randint(0, 256, (20, 28, 28), dtype=torch.uint8)
    labels = torch.randint(0, 10, (20,), dtype=torch.uint8)
    for split, n in (("train", 20), ("t10k", 10)):
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", imgs[:n])
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte", labels[:n])
    assert torch.equal(read_idx(tmp_path / "train-images-idx3-ubyte.gz"), imgs)
    data = load_dataset("fashion-mnist", str(tmp_path))
    assert data.train_x.shape == (20, 1, 28, 28) and data.test_y.shape == (10,)
    bad = tmp_path / "bad-idx"
    bad.write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x09abc")
    with pytest.raises(ValueError, match="truncated"):
        read_idx(bad)
    (tmp_path / "junk").write_bytes(b"PK\x03\x04")
    with pytest.raises(ValueError, match="not an IDX"):
        read_idx(tmp_path / "junk")


def test_missing_dataset_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setattr("acnet.data.datasets.FMNIST_DIRS", (str(tmp_path / "nowhere"),))
    with pytest.raises(DatasetNotFoundError, match="Debian's package dataset-fashion-mnist"):
        load_dataset("fashion-mnist", str(tmp_path / "empty"))
    pytest.importorskip("torchvision")
    with pytest.raises(DatasetNotFoundError, match="data_dir") as err:
        load_dataset("cifar10", str(tmp_path / "empty"))
    assert err.value.params == ("data_dir",) and "--" not in str(err.value)
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("mnist-ish")


def test_real_fashion_mnist_when_installed():
    try:
        data = load_dataset("fashion-mnist")
    except DatasetNotFoundError:
        pytest.skip("Fashion-MNIST not installed (the CI installs it as root)")
    assert data.train_x.shape == (60000, 1, 28, 28) and data.test_x.shape == (10000, 1, 28, 28)
    assert data.train_x.dtype == torch.uint8 and int(data.train_y.max()) == 9


def test_loader_is_deterministic_sharded_and_augmented():
    data = load_dataset("synthetic").limit(256, 64)
    kw = dict(mean=data.mean, std=data.std, train=True, seed=3, crop_padding=2, hflip=True)
    a = InMemoryLoader(data.train_x, data.train_y, 32, **kw)
    b = InMemoryLoader(data.train_x, data.train_y, 32, **kw)
    a.set_epoch(1)
    b.set_epoch(1)
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    b.set_epoch(2)
    assert not torch.equal(next(iter(a))[0], next(iter(b))[0])
    r0 = InMemoryLoader(data.train_x, data.train_y, 16, rank=0, world=2, **kw)
    r1 = InMemoryLoader(data.train_x, data.train_y, 16, rank=1, world=2, **kw)
    assert len(r0) == len(r1) == 8
    # disjoint shards: no sample index seen by both ranks (check through the un-augmented order)
    plain = dict(kw, crop_padding=0, hflip=False)
    s0 = InMemoryLoader(torch.arange(256).view(256, 1, 1, 1).to(torch.uint8).repeat(1, 1, 1, 1),
                        torch.arange(256), 16, rank=0, world=2, **{**plain, "mean": (0,),
                                                                 "std": (1 / 255,)})
    s1 = InMemoryLoader(torch.zeros(256, 1, 1, 1, dtype=torch.uint8), torch.arange(256), 16,
                        rank=1, world=2, **{**plain, "mean": (0,), "std": (1,)})
    seen0 = torch.cat([y for _, y in s0])
    seen1 = torch.cat([y for _, y in s1])
    assert len(set(seen0.tolist()) & set(seen1.tolist())) == 0
    assert len(seen0) + len(seen1) == 256


def test_transforms():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    assert torch.equal(apply_transform(x, "hflip")[0, 0, 0], torch.tensor([3.0, 2, 1, 0]))
    assert torch.equal(apply_transform(x, "vflip")[0, 0, :, 0], torch.tensor([12.0, 8, 4, 0]))
    assert apply_transform(x, "rot90")[0, 0, 0, 0] == 3
    with pytest.raises(ValueError, match="transform"):
        apply_transform(x, "shear")


def test_vgg16_quarter_is_vgg16_at_a_quarter_of_the_width():
    full, quarter = build_model("vgg16"), build_model("vgg16_quarter")
    widths = [[m.out_channels for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
              for net in (full, quarter)]
    assert len(widths[1]) == 13 and widths[1] == [w // 4 for w in widths[0]]
    assert widths[1][0] == 16 and max(widths[1]) == 128


def test_no_augment_trains_on_the_images_as_they_are():
    from acnet.data.loader import normalize
    from acnet.train import TrainConfig
    from acnet.train.config import resolve
    from acnet.train.data import train_split

    def first_batch(augment: bool):
        cfg = resolve(TrainConfig(model="cifar_quick", dataset="synthetic", train_limit=64,
                                  batch_size=64, augment=augment))
        x, y = next(iter(train_split(cfg, torch.device("cpu")).loader))
        return x, y, train_split(cfg, torch.device("cpu")).loader

    x, y, loader = first_batch(False)
    data = load_dataset("synthetic").limit(64, 8)
    # the same images, only shuffled: each batch image equals its normalized source image
    src = normalize(data.train_x, loader.mean, loader.std)
    order = torch.cdist(x.flatten(1), src.flatten(1)).argmin(1)
    assert torch.equal(x, src[order]) and torch.equal(y, data.train_y[order])
    xa, ya, _ = first_batch(True)
    assert torch.equal(ya, y) and not torch.equal(xa, x)  # same order, augmented pixels
    # streamed folders take augment=False too (evaluation's resize and centre crop)
    assert not resolve(TrainConfig(dataset="imagenet", augment=False)).augment
