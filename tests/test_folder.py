"""Your own images: the folder dataset (both layouts, RGB and grayscale, odd sizes, damaged
files, bad folders) and the compare preset (the A/B study on any model and data)."""

from __future__ import annotations

import json
import logging

import pytest
from helpers import write_image_folder

from acnet.data import DatasetNotFoundError
from acnet.data.folder import IMAGENET, index_folder, open_folder
from acnet.errors import InputError
from acnet.experiments import reproduce
from acnet.experiments.compare import SETTINGS, compare_study
from acnet.runs import evaluate_run
from acnet.train import TrainConfig, train
from acnet.train.config import resolve
from acnet.train.rundir import load_config

ODD = ((31, 23), (28, 28), (40, 17))


def _cli(capsys, *args):
    from acnet.cli import main

    try:
        rc = main([str(a) for a in args])
    except SystemExit as exc:  # argparse's own errors (a bad value for a typed option)
        rc = exc.code
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def gray_split(tmp_path_factory):
    """DIR/<class>/ grayscale PNGs of odd sizes, a corrupt file, a text file and a truncated
    PNG among them."""
    root = write_image_folder(tmp_path_factory.mktemp("gray") / "imgs", "split",
                              per_class=24, sizes=ODD)
    (root / "class_0" / "zz_garbage.png").write_bytes(b"not an image at all")
    (root / "class_1" / "notes.txt").write_text("labels are the folder names")
    good = (root / "class_2" / "0001.png").read_bytes()
    (root / "class_2" / "0000_truncated.png").write_bytes(good[: len(good) // 2])
    return root


@pytest.fixture(scope="module")
def rgb_trainval(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("rgb") / "imgs", "train/val",
                              per_class=18, rgb=True, sizes=ODD)


def test_split_layout_is_deterministic_per_class_and_skips_non_images(gray_split, caplog):
    with caplog.at_level(logging.WARNING):
        layout, classes, train, val, skipped = index_folder(gray_split, 0.25)
    assert layout == "split" and classes == ("class_0", "class_1", "class_2")
    assert sorted(p.rsplit("/", 1)[1] for p in skipped) == ["notes.txt", "zz_garbage.png"]
    assert "skipped 2 file(s)" in caplog.text
    # each class: round(0.25 n) held out, disjoint, the same split every time
    for c in range(3):
        n_val = sum(1 for _, y in val if y == c)
        n_train = sum(1 for _, y in train if y == c)
        assert n_val == round(0.25 * (n_val + n_train))
    assert not {p for p, _ in train} & {p for p, _ in val}
    assert index_folder(gray_split, 0.25)[2:4] == (train, val)
    assert index_folder(gray_split, 0.5)[3] != val


def test_open_folder_settles_channels_size_and_statistics(gray_split, rgb_trainval):
    spec = open_folder("folder", str(gray_split), val_fraction=0.25)
    assert spec.channels == 1 and spec.image_size == 23  # median shorter side of 23, 28, 17
    assert len(spec.mean) == 1 and 0.05 < spec.mean[0] < 0.6 and spec.std[0] > 0.05
    rgb = open_folder("folder", str(rgb_trainval))
    assert rgb.layout == "train/val" and rgb.channels == 3 and len(rgb.mean) == 3
    given = open_folder("folder", str(rgb_trainval), image_size=20, mean=[0.5], std=[0.25])
    assert given.image_size == 20 and given.mean == (0.5,) and given.std == (0.25,)
    # ImageNet is a folder dataset with ImageNet's defaults (3 channels, 224, its statistics)
    net = open_folder("imagenet", str(rgb_trainval))
    assert (net.channels, net.image_size, net.mean) == (3, 224, IMAGENET.mean)


@pytest.mark.parametrize("fixture,channels", [("gray_split", 1), ("rgb_trainval", 3)])
def test_one_short_epoch_then_eval_by_class_name(request, tmp_path, fixture, channels, caplog):
    root = request.getfixturevalue(fixture)
    cfg = TrainConfig(model="cifar_quick", dataset="folder", data_dir=str(root), epochs=1,
                      batch_size=8, workers=0, quiet=True, val_fraction=0.25, image_size=24)
    with caplog.at_level(logging.WARNING):
        m = train(cfg, tmp_path / "run")
    if fixture == "gray_split":  # the truncated PNG: decoded late, replaced, named
        assert "0000_truncated.png" in caplog.text
    assert m["deployed_test_acc"] == pytest.approx(m["test_acc"], abs=1e-9)
    saved = load_config(tmp_path / "run")
    assert saved.class_names == ["class_0", "class_1", "class_2"]
    assert (saved.in_channels, saved.num_classes, saved.input_size) == (channels, 3, 24)
    assert saved.mean is not None and len(saved.mean) == channels
    ev = evaluate_run(tmp_path / "run")
    assert set(ev["class_acc"]) == {"class_0", "class_1", "class_2"}
    assert ev["test_acc"] == pytest.approx(m["deployed_test_acc"], abs=1e-9)
    # a resume keeps the normalisation the run measured (given nothing, it asks for nothing)
    assert train(cfg, tmp_path / "run", resume=True)["test_acc"] == m["test_acc"]


def test_grayscale_images_feed_a_torchvision_model_and_rgb_a_grayscale_one(tmp_path,
                                                                          rgb_trainval):
    cfg = TrainConfig(model="tv:resnet18", dataset="folder", data_dir=str(rgb_trainval),
                      epochs=1, batch_size=8, workers=0, quiet=True, image_size=32,
                      train_limit=16, block="base")
    assert train(cfg, tmp_path / "r")["epochs"] == 1
    assert load_config(tmp_path / "r").in_channels == 3


def _expect(root, message):
    with pytest.raises(InputError, match=message) as exc:
        open_folder("folder", str(root))
    return str(exc.value)


def test_bad_folders_say_which_path(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=str(tmp_path / "missing")):
        open_folder("folder", str(tmp_path / "missing"))
    root = write_image_folder(tmp_path / "a", "split", per_class=4, classes=2)
    (root / "class_9").mkdir()
    assert str(root / "class_9") in _expect(root, "holds no readable image")
    one = write_image_folder(tmp_path / "b", "split", per_class=4, classes=1)
    _expect(one, "at least two")
    tv = write_image_folder(tmp_path / "c", "train/val", per_class=6, classes=3)
    for f in (tv / "val" / "class_2").iterdir():
        f.unlink()
    assert "class_2" in _expect(tv, "no images of training class")
    (tv / "val" / "class_2").rmdir()
    (tv / "val" / "class_7").mkdir()
    (tv / "val" / "class_7" / "x.png").write_bytes((tv / "train" / "class_0" / "0001.png")
                                                    .read_bytes())
    assert str(tv / "val" / "class_7") in _expect(tv, "no training folder")
    lone = tmp_path / "d"
    (lone / "train" / "a").mkdir(parents=True)
    _expect(lone, "no val/ folder")
    tiny = write_image_folder(tmp_path / "e", "split", per_class=1, classes=2)
    _expect(tiny, "at least two per class")
    with pytest.raises(InputError, match="val_fraction"):
        index_folder(root, 1.5)
    with pytest.raises(InputError, match="classes"):
        resolve(TrainConfig(dataset="folder", classes=[0, 1]))


@pytest.mark.parametrize("args,message", [
    (["--dataset", "folder"], "--data-dir"),
    (["--dataset", "folder", "--data-dir", "{missing}"], "does not exist"),
    (["--dataset", "folder", "--data-dir", "{root}", "--val-fraction", "1.5"], "--val-fraction"),
    (["--dataset", "folder", "--data-dir", "{root}", "--std", "0.5,0"], "std must be positive"),
    (["--dataset", "folder", "--data-dir", "{root}", "--mean", "0.5,x"], "--mean"),
])
def test_cli_folder_bad_input_is_one_line(tmp_path, capsys, gray_split, args, message):
    args = [a.format(root=gray_split, missing=tmp_path / "nope") for a in args]
    rc, _, err = _cli(capsys, "train", "--model", "cifar_quick", "--epochs", 1, "--quiet",
                      "--out", tmp_path / "o", *args)
    assert rc == 2 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "o").exists()


def test_compare_preset_end_to_end(tmp_path, capsys, gray_split):
    out = tmp_path / "cmp"
    args = ["reproduce", "--preset", "compare", "--model", "cifar_quick", "--dataset", "folder",
            "--data-dir", gray_split, "--epochs", 1, "--seeds", "0,1", "--forms", "sub4",
            "--batch-size", 8, "--val-fraction", 0.25, "--image-size", 20, "--out", out]
    rc, stdout, err = _cli(capsys, *args)
    assert rc == 0, err
    res = json.loads((out / "results.json").read_text())
    costs = res["costs"]["cifar_quick"]
    assert set(costs) == {"base", "sub4"} and costs["base"] == 1.0
    e_eq = max(1, round(costs["sub4"]))  # the baseline given the sub-batch form's time
    names = {r["name"] for rs in res["runs"].values() for r in rs}
    expected = {f"cifar_quick-{f}-s{s}" for f in ("base", "sub4") for s in (0, 1)}
    if e_eq != 1:
        expected |= {f"cifar_quick-base-e{e_eq}-s{s}" for s in (0, 1)}
    assert names == expected and not res["pending"]
    report = (out / "report.md").read_text()
    first = report.splitlines()[3]
    assert first.startswith("**In short:** ") and res["answer"] in first
    assert res["answer"].split(":")[0] in ("Yes", "No", "Only if training time is free",
                                           "Yes at equal epochs, a draw at equal compute")
    for needle in ("Equal epochs (1)", "Equal compute", "Deployment check", "step cost",
                   "class_0", "curves.png", "gain_vs_cost.png"):
        assert needle in report, needle
    assert (out / "curves.png").is_file() and (out / "gain_vs_cost.png").is_file()
    assert res["answer"] in stdout
    cfg = load_config(out / "runs" / "cifar_quick-sub4-s0")
    assert cfg.sub_batch == 0.25 and cfg.image_size == 20 and cfg.mean is not None
    # rerun: resumes (nothing to train); other settings in the same directory: refused
    before = {p: p.stat().st_mtime for p in (out / "runs").glob("*/metrics.json")}
    assert _cli(capsys, *args)[0] == 0
    assert before == {p: p.stat().st_mtime for p in (out / "runs").glob("*/metrics.json")}
    rc, _, err = _cli(capsys, *[a if a != 1 else 2 for a in args])
    assert rc == 2 and "other settings" in err and "epochs: 1, now 2" in err, err
    # a report-only rewrite needs nothing but the directory
    rc, _, err = _cli(capsys, "reproduce", "--preset", "compare", "--out", out,
                      "--report-only")
    assert rc == 0, err
    assert (out / SETTINGS).is_file()


def test_compare_settings_are_checked_before_anything_runs(tmp_path):
    with pytest.raises(InputError, match="needs a model"):
        compare_study({})
    with pytest.raises(InputError, match="unknown form"):
        compare_study({"model": "resnet20", "forms": "acb,fast"})
    with pytest.raises(InputError, match="besides the baseline"):
        compare_study({"model": "resnet20", "forms": "base"})
    with pytest.raises(InputError, match="does not take"):
        compare_study({"model": "resnet20", "sync_bn": True})
    with pytest.raises(InputError, match="lr"):
        compare_study({"model": "resnet20", "lr": -1.0})
    with pytest.raises(InputError, match="compare preset"):
        reproduce("cheap", tmp_path / "x", settings={"model": "resnet20"})
    study = compare_study({"model": "tv:resnet18", "dataset": "synthetic", "epochs": 3,
                           "forms": ["online", "acb"], "init_from": None})
    assert study.forms == ("base", "online", "acb") and study.run_name(
        "tv:resnet18", "acb", 0) == "tv_resnet18-acb-s0"
    assert (study.in_channels, study.image) == (3, 32) and study.equal_compute == "baseline"


def test_resume_takes_the_runs_automatic_settings():
    """Runs of earlier versions stored image_size=224 (the old default) for every dataset; a
    rerun that leaves it to the dataset resumes them, one that names another size is refused."""
    from acnet.train.config import TrainConfig, settings_diff
    old = TrainConfig(model="cifar_quick", dataset="fashion-mnist", image_size=224,
                      mean=[0.3], std=[0.35])
    assert settings_diff(TrainConfig(model="cifar_quick", dataset="fashion-mnist"), old) == {}
    assert settings_diff(TrainConfig(model="cifar_quick", dataset="fashion-mnist",
                                     image_size=64), old) == {"image_size": (64, 224)}


def test_sixteen_bit_and_float_grayscale_keep_their_range(tmp_path):
    """16-bit and float images are scaled to 8 bits, not clipped at 255 (white) or 1 (black)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for kind in ("i16", "f"):
        root = tmp_path / kind
        for c in ("a", "b"):
            (root / c).mkdir(parents=True)
            for i in range(4):
                v = rng.uniform(0.1, 0.9, (8, 8))
                img = (Image.fromarray((v * 65535).astype(np.uint16)) if kind == "i16"
                       else Image.fromarray(v.astype(np.float32), "F"))
                img.save(root / c / f"{i}.{'png' if kind == 'i16' else 'tif'}")
        spec = open_folder("folder", str(root))
        assert spec.channels == 1 and 0.4 < spec.mean[0] < 0.6 and spec.std[0] > 0.1, kind


def test_resume_with_workers_is_bit_exact(tmp_path, gray_split, monkeypatch):
    """Worker seeds come from (seed, epoch): a run stopped after epoch 1 and resumed ends with
    the weights of the run that was not stopped, with DataLoader workers augmenting."""
    import torch

    from acnet.train import engine

    def cfg():
        return TrainConfig(model="cifar_quick", dataset="folder", data_dir=str(gray_split),
                           epochs=2, batch_size=16, workers=2, quiet=True, image_size=16)

    train(cfg(), tmp_path / "a")
    real = engine._epoch

    def stop_at_second(r, net, epoch, tb):
        if epoch == 1:
            raise KeyboardInterrupt
        real(r, net, epoch, tb)

    monkeypatch.setattr(engine, "_epoch", stop_at_second)
    with pytest.raises(KeyboardInterrupt):
        train(cfg(), tmp_path / "b")
    monkeypatch.setattr(engine, "_epoch", real)
    train(cfg(), tmp_path / "b", resume=True)
    a, b = (torch.load(tmp_path / r / "checkpoint.pt", weights_only=False)["model"]
            for r in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_model_that_cannot_take_the_images_is_one_clear_error(tmp_path, gray_split, capsys):
    rc, _, err = _cli(capsys, "train", "--model", "cifar_quick", "--dataset", "folder",
                      "--data-dir", gray_split, "--image-size", 4, "--epochs", 1,
                      "--batch-size", 4, "--workers", 0, "--out", tmp_path / "r")
    assert rc == 2 and "cifar_quick cannot take 1x4x4 images" in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("kw,message", [
    ({"channels": 2}, "channels must be 1 (grayscale), 3 (RGB)"),
    ({"image_size": -3}, "image_size must be a positive integer"),
    ({"mean": 0.5, "std": [0.5]}, "mean must be a list of numbers"),
])
def test_open_folder_refuses_bad_arguments(gray_split, kw, message):
    import re

    with pytest.raises((ValueError, TypeError), match=re.escape(message)):
        open_folder("folder", str(gray_split), **kw)


def test_an_error_in_a_dataloader_worker_keeps_its_message():
    from acnet.cli import _message

    exc = InputError("Caught InputError in DataLoader worker process 0.\nOriginal Traceback "
                     "(most recent call last):\n  File \"x.py\", line 1, in f\nacnet.errors."
                     "InputError: none of the 2 images can be read (the first: a/2.png)")
    assert _message(exc) == "none of the 2 images can be read (the first: a/2.png)"
    assert _message(InputError("one line\nmore")) == "one line"
