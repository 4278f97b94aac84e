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
            assert _wait_for(lambda p=proc: (run / "config.json").exists() or p.poll() is not None)
        else:
            assert _wait_for(lambda p=proc, n=epochs_done: _lines(run / "metrics.jsonl") >= n
                             or p.poll() is not None)
        time.sleep(rng.uniform(0, 0.6))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
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
    (["--lr", "-1"], "lr must be a positive number, got -1.0 (set by --lr)"),
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
    proc = subprocess.run([str(c) for c in [*cmd, "--resume"]], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_help_for_every_subcommand():
    for sub in ("train", "eval", "deploy", "export"):
        proc = cli(sub, "--help")
        assert "usage: acnet" in proc.stdout


# --- hardening (issue 9) and the run directory owner (issue 10), in process for speed ---

TINY = [*SMALL, "--epochs", "1", "--train-limit", "64", "--test-limit", "32"]


def run_main(capsys, *args):
    """``acnet ARGS`` in this process: (exit code, stdout, stderr)."""
    from acnet.cli import main

    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def _one_error_line(err: str, message: str) -> None:
    assert message in err and "Traceback" not in err, err
    assert len([ln for ln in err.splitlines() if "error" in ln]) == 1, err


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A finished tiny acb run (train once, share between the read-only tests)."""
    run = tmp_path_factory.mktemp("runs") / "tiny"
    cli("train", *TINY, "--out", run)
    return run


def test_diverging_run_stops_with_one_line_and_no_nan_json(tmp_path, capsys):
    run = tmp_path / "div"  # lr 50: the loss reaches ~1e14 while staying finite
    rc, _, err = run_main(capsys, "train", *SMALL, "--epochs", 2, "--train-limit", 128,
                          "--test-limit", 64, "--lr", 50, "--out", run)
    assert rc == 2
    _one_error_line(err, "training diverged")
    assert not (run / "metrics.json").exists()
    for line in (run / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in metrics.jsonl"))
    from acnet.train import RunDir

    with pytest.raises(FloatingPointError, match="non-finite"):
        RunDir(tmp_path / "nan").write_metrics({"test_acc": float("nan")})


def test_densenet_run_with_added_conv_biases_evaluates_and_exports(tmp_path, capsys):
    pytest.importorskip("torchvision")
    run = tmp_path / "dn"
    rc, _, err = run_main(capsys, "train", "--model", "tv:densenet121", "--dataset", "synthetic",
                          "--batch-size", 16, "--epochs", 1, "--train-limit", 16,
                          "--test-limit", 16, "--quiet", "--out", run)
    assert rc == 0, err
    m = json.loads((run / "metrics.json").read_text())
    rc, out, err = run_main(capsys, "eval", run)
    assert rc == 0, err
    assert json.loads(out)["test_acc"] == pytest.approx(m["deployed_test_acc"], abs=1e-9)
    pytest.importorskip("onnxruntime")
    rc, out, err = run_main(capsys, "export", run, "--onnx", tmp_path / "dn.onnx")
    assert rc == 0 and "onnxruntime matches" in out, err


def test_empty_checkpoint_on_resume_is_one_line(tmp_path, capsys):
    run = tmp_path / "r"
    assert run_main(capsys, "train", *TINY, "--out", run)[0] == 0
    (run / "metrics.json").unlink()
    (run / "checkpoint.pt").write_bytes(b"")
    rc, _, err = run_main(capsys, "train", *TINY, "--out", run, "--resume")
    assert rc == 2
    _one_error_line(err, "corrupt or truncated")


def test_export_to_a_directory_and_mismatched_checkpoint_are_one_line(tiny_run, tmp_path,
                                                                      capsys):
    rc, _, err = run_main(capsys, "export", tiny_run, "--onnx", f"{tmp_path}/")
    assert rc == 2
    _one_error_line(err, "is a directory")
    # a run whose checkpoint does not match its config (here: another model)
    bad = tmp_path / "bad"
    bad.mkdir()
    cfg = json.loads((tiny_run / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "model": "resnet20"}))
    (bad / "checkpoint.pt").write_bytes((tiny_run / "checkpoint.pt").read_bytes())
    rc, _, err = run_main(capsys, "eval", bad)
    assert rc == 2
    _one_error_line(err, "does not match")
    (bad / "deployed.safetensors").write_bytes((tiny_run / "deployed.safetensors").read_bytes())
    rc, _, err = run_main(capsys, "eval", bad)
    assert rc == 2
    _one_error_line(err, "does not match")


def test_resume_refuses_a_missing_run_and_compares_a_finished_one(tiny_run, tmp_path, capsys):
    rc, _, err = run_main(capsys, "train", *TINY, "--out", tmp_path / "typo", "--resume")
    assert rc == 2 and not (tmp_path / "typo").exists()
    _one_error_line(err, "no acnet run to resume")
    rc, _, err = run_main(capsys, "train", *TINY, "--lr", "0.07", "--out", tiny_run, "--resume")
    assert rc == 2
    _one_error_line(err, "different settings")
    assert "lr=0.07" in err
    rc, out, err = run_main(capsys, "train", *TINY, "--out", tiny_run, "--resume")
    assert rc == 0, err  # same settings: nothing to do, the metrics again
    assert json.loads(out)["test_acc"] == json.loads((tiny_run / "metrics.json").read_text())[
        "test_acc"]


@pytest.mark.parametrize("dataset", ["synthetic", "fashion-mnist", "cifar10", "imagenet"])
def test_missing_data_dir_is_an_error_for_every_dataset(tmp_path, capsys, dataset):
    rc, _, err = run_main(capsys, "train", "--model", "cifar_quick", "--dataset", dataset,
                          "--data-dir", tmp_path / "missing", "--epochs", 1, "--quiet",
                          "--out", tmp_path / "o")
    assert rc == 2
    _one_error_line(err, "--data-dir")


def test_eval_uses_the_runs_test_limit(tiny_run, capsys):
    m = json.loads((tiny_run / "metrics.json").read_text())
    rc, out, err = run_main(capsys, "eval", tiny_run)
    assert rc == 0, err
    ev = json.loads(out)
    assert ev["test_images"] == 32  # the run's --test-limit, not the whole test set
    assert ev["test_acc"] == pytest.approx(m["deployed_test_acc"], abs=1e-9)
    rc, out, _ = run_main(capsys, "eval", tiny_run, "--test-limit", 8)
    assert rc == 0 and json.loads(out)["test_images"] == 8


@pytest.mark.parametrize("args,message", [
    (["--block", "base", "--gamma-init", "0.5"], "--gamma-init"),
    (["--branch-scale"], "--no-branch-bn"),
    (["--block", "base", "--no-branch-bn", "--branch-scale"], "block='acb'"),
])
def test_options_that_do_not_apply_are_refused(tmp_path, capsys, args, message):
    rc, _, err = run_main(capsys, "train", *TINY, *args, "--out", tmp_path / "x")
    assert rc == 2 and not (tmp_path / "x").exists()
    _one_error_line(err, message)


def test_analyze_kernels_rejects_kernel_size_below_2(tiny_run, capsys):
    for k in ("0", "1"):
        rc, _, err = run_main(capsys, "analyze", "kernels", tiny_run, "--kernel-size", k)
        assert rc == 2
        _one_error_line(err, "--kernel-size")


def test_online_acb_trains_from_the_cli(tmp_path, capsys):
    run = tmp_path / "online"
    rc, _, err = run_main(capsys, "train", *TINY, "--no-branch-bn", "--branch-scale",
                          "--out", run)
    assert rc == 0, err
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["branch_scale"] is True and cfg["branch_bn"] is False
    keys = load_checkpoint(run / "checkpoint.pt")["model"].keys()
    assert any(k.endswith("square_scale") for k in keys)
    m = json.loads((run / "metrics.json").read_text())
    assert m["max_abs_diff_deploy"] < 1e-4 and m["params_deployed"] < m["params_train"]


def test_deployment_check_is_float32_even_under_autocast():
    """metrics.json's max_abs_diff_deploy compares the models in float32, whatever the caller's
    autocast (on CUDA: bf16 autocast and TF32 are off for the check)."""
    import acnet
    from acnet.evaluation import compare_models

    torch.manual_seed(0)
    model = acnet.convert(torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1, bias=False), torch.nn.BatchNorm2d(16),
        torch.nn.ReLU(), torch.nn.Conv2d(16, 16, 3, padding=1, bias=False),
        torch.nn.BatchNorm2d(16), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        torch.nn.Linear(16, 10)), preserve=False).eval()
    loader = [(torch.randn(32, 3, 16, 16), torch.randint(0, 10, (32,)))]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        check = compare_models(model, acnet.deploy(model, fold_bn=True), loader)
    assert check["max_abs_diff_deploy"] < 1e-5 and check["prediction_agreement"] == 1.0


def test_rundir_owns_the_files(tmp_path):
    from acnet.train import RunDir, TrainConfig

    run = RunDir(tmp_path / "r")
    assert not run.started and not run.finished and run.read_metrics() is None
    run.prepare()
    run.write_config(TrainConfig(model="cifar_quick", in_channels=1, num_classes=10))
    assert run.started and run.read_config().model == "cifar_quick"
    for epoch in (1, 2, 3):
        run.append_metrics({"epoch": epoch, "test_acc": 0.5})
    with open(run.metrics_lines_file, "a") as f:
        f.write('{"epoch": 4, "te')  # torn by a kill
    run.trim_metrics(2)
    assert [r["epoch"] for r in run.metrics_lines()] == [1, 2]
    assert run.read_export() is None
    run.write_export({"onnx_test_acc": 0.9})
    assert run.read_export() == {"onnx_test_acc": 0.9}
    run.write_cache("robustness", {"none": 1.0})
    assert run.read_cache("robustness") == {"none": 1.0} and run.read_cache("sparsity") is None
    with pytest.raises(ValueError, match="unknown run cache"):
        run.read_cache("other")


def test_every_registered_subcommand_has_help(capsys):
    from acnet.cli import COMMANDS, main

    assert set(COMMANDS) == {"train", "eval", "deploy", "export", "analyze", "reproduce", "bench"}
    for name in COMMANDS:
        with pytest.raises(SystemExit) as exc:
            main([name, "--help"])
        assert exc.value.code == 0 and f"usage: acnet {name}" in capsys.readouterr().out


def _compile_calls(monkeypatch, backend: str | None) -> list:
    """Record torch.compile's calls (and run them with ``backend`` instead of inductor)."""
    calls, real = [], torch.compile

    def recording(model, **kwargs):
        calls.append((model, kwargs))
        return real(model, **kwargs, **({"backend": backend} if backend else {}))

    monkeypatch.setattr(torch, "compile", recording)
    return calls


def _interrupted_after_first_epoch(monkeypatch):
    """Make the engine stop like a kill after epoch 1's checkpoint (KeyboardInterrupt)."""
    from acnet.train import engine

    real = engine._epoch

    def epoch(r, net, e, tb):
        if e == 1:
            raise KeyboardInterrupt
        real(r, net, e, tb)

    monkeypatch.setattr(engine, "_epoch", epoch)


def test_compile_trains_and_resumes_bit_exact(tmp_path, capsys, monkeypatch):
    """--compile: the compiled net trains and evaluates, the plain module is checkpointed; an
    interrupted compiled run resumes to the uninterrupted one bit for bit. Dynamo's eager
    backend here (no C++ compile: fast); the inductor version is the slow test below."""
    args = [*SMALL, "--epochs", 2, "--train-limit", 64, "--test-limit", 32, "--compile"]
    calls = _compile_calls(monkeypatch, "eager")
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert run_main(capsys, "train", *args, "--out", ref)[0] == 0
    assert len(calls) == 1 and calls[0][1] == {"dynamic": False}
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 2  # train and eval graphs
    with monkeypatch.context() as m:
        _interrupted_after_first_epoch(m)
        assert run_main(capsys, "train", *args, "--out", run)[0] == 130
    assert _lines(run / "metrics.jsonl") == 1 and not (run / "metrics.json").exists()
    assert run_main(capsys, "train", *args, "--out", run, "--resume")[0] == 0
    a, b = _state(ref), _state(run)
    assert not any(k.startswith("_orig_mod") for k in a), "checkpoint of the compiled wrapper"
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ma, mb = (json.loads((r / "metrics.json").read_text()) for r in (ref, run))
    assert ma["test_acc"] == mb["test_acc"] and ma["max_abs_diff_deploy"] < 1e-4
    assert json.loads((ref / "config.json").read_text())["compile"] is True
    # compile is not a runtime field: resuming without it is refused, naming it
    rc, _, err = run_main(capsys, "train", *args[:-1], "--out", ref, "--resume")
    assert rc == 2
    _one_error_line(err, "compile=False (run has True)")


@pytest.mark.slow
def test_compile_sigkill_resume_is_bit_exact_with_inductor(tmp_path):
    """The real thing: inductor-compiled cifar_quick ACB, SIGKILL after epoch 1, resume; final
    state, metrics and deployed file equal the uninterrupted compiled run's, bit for bit."""
    args = [*SMALL, "--epochs", 2, "--train-limit", 128, "--test-limit", 64, "--compile"]
    ref, run = tmp_path / "ref", tmp_path / "run"
    cli("train", *args, "--out", ref, timeout=900)
    cmd = [sys.executable, "-m", "acnet", "train", *map(str, args), "--out", str(run)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert _wait_for(lambda: (run / "checkpoint.pt").exists() or proc.poll() is not None,
                     timeout=900)  # written atomically after epoch 1
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    cli("train", *args, "--out", run, "--resume", timeout=900)
    a, b = _state(ref), _state(run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ma, mb = (json.loads((r / "metrics.json").read_text()) for r in (ref, run))
    assert ma["test_acc"] == mb["test_acc"]
    assert ma["max_abs_diff_deploy"] == mb["max_abs_diff_deploy"] < 1e-4
    deployed = "deployed.safetensors"
    assert (ref / deployed).read_bytes() == (run / deployed).read_bytes()


def test_compiled_training_gradients_match_eager_with_ceil_mode_avg_pool():
    """Inductor's avg_pool2d backward with ceil_mode=True is wrong (torch 2.14, CPU): the
    engine's compiled net must still give eager's gradients (float64, 1e-10) on Cifar-quick's
    pooling pattern."""
    from torch import nn

    from acnet.train import TrainConfig
    from acnet.train.engine import _compiled

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.MaxPool2d(3, 2, ceil_mode=True),
                          nn.Conv2d(4, 4, 3, padding=1), nn.AvgPool2d(3, 2, ceil_mode=True),
                          nn.Flatten(), nn.Linear(4 * 4 * 4, 3)).double()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    eager = torch.autograd.grad(model(x).square().sum(), list(model.parameters()))
    net, eval_net = _compiled(TrainConfig(compile=True), model, model)
    assert net is eval_net and net is not model
    compiled = torch.autograd.grad(net(x).square().sum(), list(model.parameters()))
    for a, b in zip(eager, compiled, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)
