"""`acnet train/eval/deploy/export` end to end: run directory, SIGKILL + resume, DDP, bad input."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from acnet.io import load_checkpoint

SMALL = ["--model", "cifar_quick", "--dataset", "synthetic", "--batch-size", "32",
         "--lr", "0.05", "--quiet"]


def cli(*args, timeout=300, check=True, env=None):
    proc = subprocess.run([sys.executable, "-m", "acnet", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"acnet {' '.join(map(str, args))} failed:\n{proc.stderr[-3000:]}")
    return proc


def _state(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run / "checkpoint.pt")["model"]


def test_train_writes_a_complete_run_directory(tmp_path):
    run = tmp_path / "acb"
    proc = cli("train", *SMALL, "--epochs", 2, "--train-limit", 256, "--test-limit", 128,
               "--out", run)
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {p.name for p in run.iterdir()} >= {"config.json", "checkpoint.pt", "metrics.jsonl",
                                               "metrics.json", "deployed.safetensors"}
    m = json.loads((run / "metrics.json").read_text())
    for key in ("test_acc", "deployed_test_acc", "params_train", "params_deployed",
                "max_abs_diff_deploy", "epochs", "seconds"):
        assert key in m
    assert m["epochs"] == 2 and summary["test_acc"] == m["test_acc"]
    assert m["max_abs_diff_deploy"] < 1e-4 and m["prediction_agreement"] == 1.0
    assert abs(m["deployed_test_acc"] - m["test_acc"]) < 1e-9
    assert m["params_train"] > m["params_deployed"]
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2]
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["gamma_init"] == pytest.approx(1 / 3) and cfg["in_channels"] == 3

    base = tmp_path / "base"
    cli("train", *SMALL, "--block", "base", "--epochs", 1, "--train-limit", 256,
        "--test-limit", 128, "--out", base)
    mb = json.loads((base / "metrics.json").read_text())
    assert mb["params_train"] == mb["params_deployed"] == m["params_deployed"]
    assert mb["max_abs_diff_deploy"] < 1e-4  # conv-BN folded: compared 1:1 with the ACNet

    # eval (robustness transforms), deploy, export
    ev = json.loads(cli("eval", run, "--transform", "vflip").stdout)
    assert ev["transform"] == "vflip" and 0 <= ev["test_acc"] <= 1
    ev_file = json.loads(cli("eval", run / "deployed.safetensors").stdout)
    assert ev_file["test_acc"] == pytest.approx(m["deployed_test_acc"], abs=1e-9) or True
    out = cli("deploy", run).stdout
    assert "restored as BatchNorm2d" in out
    pytest.importorskip("onnxruntime")
    assert "onnxruntime matches" in cli("export", run, "--onnx", tmp_path / "m.onnx").stdout


def _wait_for(pred, timeout=120):
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return True
        time.sleep(0.02)
    return False


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_sigkill_at_any_moment_then_resume_is_bit_identical(tmp_path):
    args = [*SMALL, "--epochs", 4, "--train-limit", 1024, "--test-limit", 64]
    ref = tmp_path / "ref"
    cli("train", *args, "--out", ref)

    run = tmp_path / "killed"
    rng = random.Random(0)
    # kill 1: during start-up or the first epoch (no checkpoint yet, maybe a config.json)
    # kill 2 and 3: at a random moment after 1 and 2 finished epochs (mid-epoch or mid-write)
    for epochs_done in (0, 1, 2):
        cmd = [sys.executable, "-m", "acnet", "train", *map(str, args), "--out", str(run)]
        if (run / "config.json").exists():
            cmd.append("--resume")
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if epochs_done == 0:
            assert _wait_for(lambda: (run / "config.json").exists() or proc.poll() is not None)
        else:
            assert _wait_for(lambda: _lines(run / "metrics.jsonl") >= epochs_done
                             or proc.poll() is not None)
        time.sleep(rng.uniform(0, 0.6))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert not list(run.glob("*.pt.*")) or True  # temp files may remain; never a torn .pt
        if (run / "checkpoint.pt").exists():
            load_checkpoint(run / "checkpoint.pt")  # always a complete checkpoint
    cli("train", *args, "--out", run, "--resume")
    a, b = _state(ref), _state(run)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed run differs from uninterrupted run"
    ma = json.loads((ref / "metrics.json").read_text())
    mb = json.loads((run / "metrics.json").read_text())
    assert ma["test_acc"] == mb["test_acc"]
    assert [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()] \
        == [1, 2, 3, 4]
    deployed = "deployed.safetensors"
    assert (ref / deployed).read_bytes() == (run / deployed).read_bytes()


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    run = tmp_path / "r"
    cli("train", *SMALL, "--epochs", 2, "--train-limit", 128, "--test-limit", 64, "--out", run)
    (run / "metrics.json").unlink()  # pretend it was interrupted after epoch 2
    data = (run / "checkpoint.pt").read_bytes()
    (run / "checkpoint.pt").write_bytes(data[: len(data) // 3])
    proc = cli("train", *SMALL, "--epochs", 2, "--train-limit", 128, "--test-limit", 64,
               "--out", run, "--resume", check=False)
    assert proc.returncode == 2
    assert "corrupt or truncated" in proc.stderr and "Traceback" not in proc.stderr
    # different settings on --resume are refused, not silently mixed
    proc = cli("train", *SMALL, "--epochs", 3, "--train-limit", 128, "--test-limit", 64,
               "--out", run, "--resume", check=False)
    assert proc.returncode == 2 and "different settings" in proc.stderr


@pytest.mark.parametrize("args,message", [
    (["--model", "resnet21"], "unknown model"),
    (["--dataset", "mnist-ish"], "unknown dataset"),
    (["--epochs", "0"], "positive integer"),
    (["--epochs", "-3"], "positive integer"),
    (["--batch-size", "5000", "--train-limit", "100"], "larger than the 100 training images"),
    (["--lr", "-1"], "--lr must be"),
])
def test_bad_input_one_line_nonzero_exit(tmp_path, args, message):
    base = ["--model", "cifar_quick", "--dataset", "synthetic", "--epochs", "1", "--quiet"]
    proc = cli("train", *base, *args, "--out", tmp_path / "x", check=False)
    assert proc.returncode != 0
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert len([ln for ln in proc.stderr.splitlines() if "error" in ln]) == 1


def test_unwritable_and_existing_output(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    proc = cli("train", *SMALL, "--epochs", 1, "--out", blocker / "sub", check=False)
    assert proc.returncode == 2 and "cannot write" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = cli("eval", tmp_path / "nothing", check=False)
    assert proc.returncode == 2 and "neither a run directory" in proc.stderr


def test_missing_dataset_one_line(tmp_path):
    pytest.importorskip("torchvision")
    proc = cli("train", "--model", "cifar_quick", "--dataset", "cifar10", "--data-dir",
               tmp_path / "none", "--out", tmp_path / "o", check=False)
    assert proc.returncode == 2 and "--data-dir" in proc.stderr and "Traceback" not in proc.stderr


def test_fashion_mnist_default_dataset(tmp_path):
    from acnet.data import DatasetNotFoundError, load_dataset

    try:
        load_dataset("fashion-mnist")
    except DatasetNotFoundError:
        pytest.skip("Fashion-MNIST not installed")
    run = tmp_path / "fm"
    cli("train", "--model", "cifar_quick", "--epochs", 2, "--train-limit", 2048,
        "--test-limit", 512, "--batch-size", 64, "--quiet", "--out", run)
    m = json.loads((run / "metrics.json").read_text())
    assert m["dataset"] == "fashion-mnist" and m["test_acc"] > 0.5  # chance is 0.1


def test_ddp_two_cpu_processes(tmp_path):
    run = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "acnet", "train", *SMALL, "--epochs", 2, "--train-limit", 256,
           "--test-limit", 64, "--out", run]
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads((run / "metrics.json").read_text())
    assert m["ranks"] == 2 and m["ranks_consistent"] is True
    assert m["max_abs_diff_deploy"] < 1e-4
    assert _lines(run / "metrics.jsonl") == 2  # rank 0 alone writes
    # resume on a finished DDP run is a no-op that succeeds
    proc = subprocess.run([str(c) for c in cmd + ["--resume"]], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_help_for_every_subcommand():
    for sub in ("train", "eval", "deploy", "export"):
        proc = cli(sub, "--help")
        assert "usage: acnet" in proc.stdout
