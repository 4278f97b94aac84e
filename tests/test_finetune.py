"""Starting from a trained model (`acnet train --init-from`): every source kind and ACB form
starts as exactly the source's function; class subsets; a new head; bad sources (issue 32)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from acnet.cli import main
from acnet.data import synthetic
from acnet.train.init_from import find_classifier, load_source

BASE = ["--model", "cifar_quick", "--dataset", "synthetic", "--batch-size", "32", "--lr", "0.01",
        "--quiet", "--epochs", "1", "--train-limit", "64", "--test-limit", "64"]
FORMS = {"branch_bn": [], "merged": ["--no-branch-bn"],
         "online": ["--no-branch-bn", "--branch-scale"], "hor_only": ["--no-vertical"]}


def train(capsys, out: Path, *args) -> dict:
    rc = main(["train", *BASE, *map(str, args), "--out", str(out)])
    _, err = capsys.readouterr()
    assert rc == 0, err
    return json.loads((out / "metrics.json").read_text())


def fails(capsys, *args) -> str:
    rc = main(["train", *BASE, *map(str, args)])
    _, err = capsys.readouterr()
    assert rc == 2 and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    return err


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> tuple[Path, dict]:
    """A trained base run (3 epochs on 256 images, so its function is not the initial one)."""
    out = tmp_path_factory.mktemp("src") / "run"
    args = list(BASE)
    args[args.index("--train-limit") + 1] = "256"
    args[args.index("--epochs") + 1] = "3"
    assert main(["train", *args, "--block", "base", "--out", str(out)]) == 0
    return out, json.loads((out / "metrics.json").read_text())


def _source_files(run: Path, tmp: Path) -> dict[str, Path]:
    """The source as a run dir, a deployed .safetensors, and state_dict files as people save
    them (plain, under 'state_dict', with DDP's 'module.' prefix, safetensors without acnet
    metadata)."""
    state = load_file(str(run / "deployed.safetensors"))
    torch.save(state, tmp / "plain.pt")
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3},
               tmp / "wrapped.pth")
    save_file(state, str(tmp / "bare.safetensors"))
    return {"run": run, "deployed": run / "deployed.safetensors", "plain": tmp / "plain.pt",
            "wrapped": tmp / "wrapped.pth", "bare": tmp / "bare.safetensors"}


@pytest.mark.parametrize("kind", ["run", "deployed", "plain", "wrapped", "bare"])
def test_every_source_kind_starts_as_the_source(source, tmp_path, capsys, kind):
    run, m = source
    src = _source_files(run, tmp_path)[kind]
    got = train(capsys, tmp_path / "ft", "--block", "base", "--init-from", src)
    assert got["init_test_acc"] == m["deployed_test_acc"]


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("init", ["zero", "small"])
def test_every_acb_form_starts_as_the_source(source, tmp_path, capsys, form, init):
    run, m = source
    got = train(capsys, tmp_path / "ft", "--block", "acb", *FORMS[form], "--init-from", run,
                "--branch-init", init)
    assert got["init_test_acc"] == m["deployed_test_acc"]
    assert got["params_deployed"] == m["params_deployed"]
    cfg = json.loads((tmp_path / "ft" / "config.json").read_text())
    assert cfg["init_from"] == str(run) and cfg["branch_init"] == init


def test_a_subset_of_classes_with_a_new_head(source, tmp_path, capsys, caplog):
    run, _ = source
    with caplog.at_level("INFO"):
        got = train(capsys, tmp_path / "ft", "--init-from", run, "--classes", "7,2,5")
    assert "classifier classifier" in caplog.text or "re-initialised" in caplog.text
    cfg = json.loads((tmp_path / "ft" / "config.json").read_text())
    assert cfg["classes"] == [7, 2, 5] and cfg["num_classes"] == 3
    assert got["test_acc"] >= 0
    with caplog.at_level("INFO"):
        train(capsys, tmp_path / "same", "--block", "base", "--init-from", run, "--new-head")
    assert "as asked (new_head)" in caplog.text


def test_select_classes_relabels_in_the_given_order():
    data = synthetic(64, 64, num_classes=6).select_classes([4, 1])
    assert data.num_classes == 2 and set(data.train_y.tolist()) <= {0, 1}
    full = synthetic(64, 64, num_classes=6)
    assert (data.train_y == 0).sum() == (full.train_y == 4).sum()
    assert (data.test_y == 1).sum() == (full.test_y == 1).sum()
    for bad in ([6], [1, 1], []):
        with pytest.raises(ValueError, match="at least 2 distinct class indices"):
            full.select_classes(bad)


def test_find_classifier_and_load_source_report_the_head():
    from acnet.models import build_model

    src = build_model("resnet20", in_channels=1, num_classes=10)
    dst = build_model("resnet20", in_channels=1, num_classes=4)
    assert find_classifier(dst, 4) == "fc"
    notes = load_source(dst, src.state_dict(), num_classes=4)
    assert notes and "10 outputs, this run 4 classes" in notes[0]
    assert torch.equal(dst.stem[0].weight, src.stem[0].weight)


def test_bad_sources_are_one_line(source, tmp_path, capsys):
    run, _ = source
    out = ["--out", tmp_path / "x"]
    assert "no such file" in fails(capsys, "--init-from", tmp_path / "none", *out)
    other = tmp_path / "r20"
    assert main(["train", *BASE, "--model", "resnet20", "--block", "base",
                 "--out", str(other)]) == 0
    capsys.readouterr()
    err = fails(capsys, "--init-from", other, *out)
    assert "does not hold this model's weights" in err and "missing" in err
    (tmp_path / "x.json").write_text("{}")
    assert "expected a run directory" in fails(capsys, "--init-from", tmp_path / "x.json", *out)
    torch.save({"epoch": 3, "note": "no tensors"}, tmp_path / "empty.pt")
    assert "holds no state_dict" in fails(capsys, "--init-from", tmp_path / "empty.pt", *out)
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    assert "not a readable torch file" in fails(capsys, "--init-from", tmp_path / "junk.pt",
                                                *out)
    acb = tmp_path / "acb"
    assert main(["train", *BASE, "--out", str(acb)]) == 0
    capsys.readouterr()
    assert "acnet training checkpoint" in fails(capsys, "--init-from", acb / "checkpoint.pt",
                                                *out)
    train(capsys, tmp_path / "ok", "--init-from", run / "checkpoint.pt")  # a base run's: plain
    assert "(set by --init-from)" in fails(capsys, "--init-from", tmp_path / "none", *out)
    assert not (tmp_path / "x").exists()


def test_options_that_need_init_from_are_refused(tmp_path, capsys):
    out = ["--out", tmp_path / "x"]
    assert "needs init_from" in fails(capsys, "--new-head", *out)
    assert "needs init_from" in fails(capsys, "--branch-init", "small", *out)
    err = fails(capsys, "--init-from", tmp_path, "--gamma-init", "0.5", *out)
    assert "trained BatchNorms" in err


def test_resume_export_and_int8_without_the_source(source, tmp_path, capsys):
    run, m = source
    src = tmp_path / "copy"
    shutil.copytree(run, src)
    ft = tmp_path / "ft"
    args = ["--block", "acb", "--init-from", src, "--epochs", 2, "--optimizer", "adamw"]
    rc = main(["train", *BASE, *map(str, args), "--out", str(ft)])
    assert rc == 0
    full = json.loads((ft / "metrics.json").read_text())
    # a killed run resumed after the source was deleted: the checkpoint carries everything
    (ft / "metrics.json").unlink()
    ckpt = torch.load(ft / "checkpoint.pt", weights_only=True)
    shutil.rmtree(src)
    ckpt_path = ft / "checkpoint.pt"
    assert ckpt["init_test_acc"] == m["deployed_test_acc"]
    rc = main(["train", *BASE, *map(str, args), "--out", str(ft), "--resume"])
    assert rc == 0 and ckpt_path.is_file()
    again = json.loads((ft / "metrics.json").read_text())
    assert again["init_test_acc"] == full["init_test_acc"]
    capsys.readouterr()
    pytest.importorskip("onnxruntime")
    rc = main(["export", str(ft), "--onnx", str(tmp_path / "m.onnx"), "--int8",
               "--calibration-images", "32"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "INT8" in out


def test_ddp_fine_tuning(source, tmp_path):
    run, m = source
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "acnet", "train", *BASE, "--init-from", str(run), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads((out / "metrics.json").read_text())
    assert got["ranks"] == 2 and got["ranks_consistent"] is True
    assert got["init_test_acc"] == m["deployed_test_acc"]


def test_a_kept_head_of_other_classes_is_said(tmp_path, capsys, caplog):
    src = tmp_path / "src"
    train(capsys, src, "--block", "base", "--classes", "5,6,7")
    with caplog.at_level("WARNING"):
        train(capsys, tmp_path / "ft", "--init-from", src, "--classes", "0,1,2")
    assert "new_head=True re-initialises it" in caplog.text
