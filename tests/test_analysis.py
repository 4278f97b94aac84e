"""The studies' maths on hand-built kernels (known answers), reproduce end to end, the bench."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

import acnet
from acnet.analysis import kernel_magnitude, pattern_mask, sparsify
from acnet.analysis.cost import count_macs


def _net_with_kernels(*kernels: torch.Tensor) -> nn.Sequential:
    layers = []
    for k in kernels:
        conv = nn.Conv2d(k.shape[1], k.shape[0], k.shape[-1], padding=k.shape[-1] // 2, bias=False)
        with torch.no_grad():
            conv.weight.copy_(k)
        layers.append(conv)
    return nn.Sequential(*layers)


def test_kernel_magnitude_known_answer():
    # layer 1: |w| summed over (out, in) is [[1,2,1],[2,4,2],[1,2,1]] -> /4
    k1 = torch.tensor([[1.0, 2, 1], [2, 4, 2], [1, 2, 1]]).view(1, 1, 3, 3)
    # layer 2: only the centre row, with signs (magnitudes count): [[0,0,0],[3,-3,3],[0,0,0]] -> /3
    k2 = torch.tensor([[0.0, 0, 0], [3, -3, 3], [0, 0, 0]]).view(1, 1, 3, 3)
    m = kernel_magnitude(_net_with_kernels(k1, k2))
    expected = (torch.tensor([[1.0, 2, 1], [2, 4, 2], [1, 2, 1]]) / 4
                + torch.tensor([[0.0, 0, 0], [1, 1, 1], [0, 0, 0]])) / 2
    torch.testing.assert_close(m, expected.double())


def test_kernel_magnitude_sums_filters_and_channels_and_fuses_acblocks():
    k = torch.zeros(2, 3, 3, 3)
    k[0, 0, 0, 0] = -2.0
    k[1, 2, 0, 0] = 2.0
    k[1, 1, 1, 1] = 1.0
    m = kernel_magnitude(_net_with_kernels(k))
    assert m[0, 0] == 1.0 and m[1, 1] == 0.25 and m.sum() == 1.25
    # an ACNet: the asymmetric kernels add onto the skeleton of the fused kernel
    block = acnet.ACBlock(1, 1, 3, padding=1).eval()
    with torch.no_grad():
        block.square_conv.weight.fill_(1.0)
        block.hor_conv.weight.fill_(1.0)
        block.ver_conv.weight.fill_(1.0)
    mag = kernel_magnitude(nn.Sequential(block))
    expected = torch.tensor([[1.0, 2, 1], [2, 3, 2], [1, 2, 1]]) / 3
    torch.testing.assert_close(mag, expected.double(), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="no 5x5 conv"):
        kernel_magnitude(nn.Sequential(block), 5)


def test_pattern_masks():
    assert pattern_mask("skeleton", 3).sum() == 5 and pattern_mask("skeleton", 5).sum() == 9
    assert pattern_mask("corners", 3).tolist() == [[True, False, True], [False] * 3,
                                                    [True, False, True]]
    assert pattern_mask("global", 3).all()
    with pytest.raises(ValueError, match="pattern"):
        pattern_mask("edges", 3)


@pytest.mark.parametrize("pattern", ["skeleton", "corners", "global"])
def test_sparsify_zeroes_exactly_the_fraction_at_the_pattern(pattern):
    torch.manual_seed(0)
    k = torch.randn(8, 4, 3, 3) + 5  # no zeros to start with
    model = _net_with_kernels(k)
    out = sparsify(model, pattern, 0.5, seed=1)
    w = out[0].weight
    mask = pattern_mask(pattern, 3)
    n = 8 * 4 * int(mask.sum())
    assert int((w[:, :, mask] == 0).sum()) == round(0.5 * n)
    assert int((w[:, :, ~mask] == 0).sum()) == 0  # nothing outside the pattern
    assert torch.equal(model[0].weight, k)  # the input model is untouched
    again = sparsify(model, pattern, 0.5, seed=1)
    assert torch.equal(again[0].weight, w)  # same seed, same zeros
    other = sparsify(model, pattern, 0.5, seed=2)
    assert not torch.equal(other[0].weight, w)
    assert int((sparsify(model, pattern, 1.0)[0].weight[:, :, mask] != 0).sum()) == 0
    with pytest.raises(ValueError, match="ratio"):
        sparsify(model, pattern, 1.5)


def test_count_macs():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 4 * 4, 10))
    assert count_macs(model, (1, 3, 4, 4)) == 8 * 16 * 3 * 9 + 128 * 10


def test_reproduce_tiny_end_to_end(tmp_path, monkeypatch):
    from acnet.experiments import presets, reproduce

    tiny = presets.StudyPreset(
        "tiny", "synthetic", ("cifar_quick",), (0, 1), "cifar_quick",
        train={"epochs": 1, "train_limit": 128, "test_limit": 64, "batch_size": 32},
        ratios=(0.0, 0.5, 1.0), draws=2, description="test")
    monkeypatch.setitem(presets.STUDY_PRESETS, "tiny", tiny)
    report = reproduce("tiny", tmp_path, command="acnet reproduce --preset tiny")
    text = report.read_text()
    for section in ("## Main result", "## Ablation", "## Centre vs corner",
                    "## Kernel magnitude", "## Sparsifying", "## Inference cost",
                    "## Training curves", "acnet reproduce --preset tiny"):
        assert section in text
    for png in ("kernel_magnitude.png", "sparsity.png", "training_curves.png"):
        assert (tmp_path / png).stat().st_size > 1000
    res = json.loads((tmp_path / "results.json").read_text())
    assert len(res["runs"]) == 14  # 7 ablation variants (incl. base, ACNet, online) x 2 seeds
    assert "online ACNet" in text  # the online ACB row of the ablation
    assert "(2 s.e. = " in text  # two seeds each: the noise scale of the verdict
    from acnet.experiments import summary

    printed = summary(tmp_path)  # what `acnet reproduce` prints, from results.json
    assert "## Main result" in printed and "| cifar_quick | 1 | 128 |" in printed
    assert "cifar_quick: max |logit difference|" in printed
    assert set(res["sparsity"]) == {"base", "ACNet", "corner ACNet"}
    cost = res["cost"]["cifar_quick"]
    assert cost["params_base"] == cost["params_acnet_deployed"]
    assert cost["macs_base"] == cost["macs_acnet_deployed"]
    assert len(cost["load_avg"]) == 2  # latency with the load it was measured under
    section = text[text.index("## Inference cost"):].splitlines()
    row = next(ln for ln in section if ln.startswith("| cifar_quick |"))
    assert row.count("|") == 8 and "load" in next(ln for ln in section if "| MACs" in ln)
    # rerunning skips finished runs and rewrites the same tables
    mtime = (tmp_path / "runs" / "cifar_quick-acb-s0" / "checkpoint.pt").stat().st_mtime
    reproduce("tiny", tmp_path, command="x")
    assert (tmp_path / "runs" / "cifar_quick-acb-s0" / "checkpoint.pt").stat().st_mtime == mtime


def test_analyze_cli(tmp_path):
    run = tmp_path / "r"
    subprocess.run([sys.executable, "-m", "acnet", "train", "--model", "cifar_quick",
                    "--dataset", "synthetic", "--epochs", "1", "--train-limit", "64",
                    "--test-limit", "32", "--batch-size", "32", "--quiet", "--out", str(run)],
                   check=True, capture_output=True)
    p = subprocess.run([sys.executable, "-m", "acnet", "analyze", "kernels", str(run), "--out",
                        str(tmp_path / "k.png")], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "k.png").exists() and len(p.stdout.splitlines()) >= 6  # 5x5 matrix
    p = subprocess.run([sys.executable, "-m", "acnet", "analyze", "sparsity", str(run),
                        "--ratios", "0,0.5", "--draws", "1", "--out", str(tmp_path / "s.png")],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    data = json.loads((tmp_path / "s.json").read_text())
    assert set(data[str(run)]) == {"skeleton", "corners", "global"}
    p = subprocess.run([sys.executable, "-m", "acnet", "analyze", "sparsity", str(run),
                        "--ratios", "0,2"], capture_output=True, text=True)
    assert p.returncode == 2 and "--ratios" in p.stderr and "Traceback" not in p.stderr


def test_analyze_needs_no_checkpoint(tmp_path):
    """A committed run keeps deployed.safetensors, not checkpoint.pt: both analyses still work
    and give what the checkpoint gives."""
    from acnet.runs import analyze_kernels, analyze_sparsity

    run = tmp_path / "r"
    acnet.train.train(acnet.train.TrainConfig(
        model="cifar_quick", dataset="synthetic", epochs=1, train_limit=64, test_limit=32,
        batch_size=32, quiet=True), run)
    before = analyze_kernels([run])[str(run)]
    sparse = analyze_sparsity([run], [0.0, 1.0], 1)[str(run)]
    (run / "checkpoint.pt").unlink()
    torch.testing.assert_close(analyze_kernels([run])[str(run)], before, rtol=0, atol=1e-6)
    assert analyze_sparsity([run], [0.0, 1.0], 1)[str(run)] == sparse


def test_bench_runs_and_reports_ratios(tmp_path):
    from acnet.bench import format_table, run_bench

    res = run_bench(models=("cifar_quick",), repeats=1, warmup=0, batch=8, conversion=True)
    tr = res["training"][0]
    assert set(tr["ratio"]) == {"base", "acb", "acb_no_branch_bn", "acb_online", "acb_sub4",
                                "acb_sub8", "straightforward_acb"}
    assert tr["ratio"]["base"] == 1.0 and all(v > 0 for v in tr["ms"].values())
    assert {r["batch"] for r in res["inference"]} == {1, 8}
    table = format_table(res)
    assert "straightforward ACB" in table and "convert()" in table
    p = subprocess.run([sys.executable, "-m", "acnet", "bench", "--models", "cifar_quick",
                        "--repeats", "1", "--warmup", "0", "--batch", "4", "--no-conversion",
                        "--out", str(tmp_path / "b.json")], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert json.loads((tmp_path / "b.json").read_text())["training"][0]["model"] == "cifar_quick"


def test_straightforward_reference_matches_acblock():
    """The benchmark's comparison block computes the same function as ACBlock (train mode)."""
    from acnet.bench import StraightforwardACB

    torch.manual_seed(0)
    block = acnet.ACBlock(4, 6, 3, stride=2, padding=1)
    ref = StraightforwardACB(block)
    with torch.no_grad():
        ref.square.weight.copy_(block.square_conv.weight)
        ref.hor.weight.copy_(block.hor_conv.weight)
        ref.ver.weight.copy_(block.ver_conv.weight)
    x = torch.randn(4, 4, 9, 9)
    torch.testing.assert_close(ref(x), block(x), rtol=1e-5, atol=1e-5)


def test_ablation_is_keyed_by_slug_and_seeds_can_be_replaced():
    from acnet.experiments import ABLATION, STUDY_PRESETS, runs_of

    assert ABLATION["online"].options == {"block": "acb", "branch_bn": False,
                                          "branch_scale": True}
    runs = [r for r in runs_of(STUDY_PRESETS["cpu"], seeds=(21, 22)) if r.model == "cifar_quick"]
    assert {r.seed for r in runs} == {21, 22}
    assert "cifar_quick-online-e15-s21" in {r.name for r in runs}
    assert {r.variant for r in runs} == set(ABLATION)
    for r in runs:  # the ablation's label; off the main schedule, with the epochs
        assert r.label == ABLATION[r.variant].label + (
            "" if r.schedule == "main" else f", {r.config['epochs']} epochs")


def test_cpu_study_order_puts_complete_comparisons_first_then_ablation_then_long():
    from acnet.experiments import ACNET, BASE, LONG, MAIN, SHORT, STUDY_PRESETS, runs_of
    from acnet.experiments.presets import tier

    cpu = STUDY_PRESETS["cpu"]
    runs = runs_of(cpu)
    n_main = 2 * len(cpu.models) * len(cpu.seeds)
    assert all(r.variant in (BASE, ACNET) and r.schedule == MAIN for r in runs[:n_main])
    assert [r.model for r in runs[:n_main:2 * len(cpu.seeds)]] == list(cpu.models)
    for r in runs[:n_main]:
        assert r.config["epochs"] == cpu.per_model[r.model]["epochs"]
        assert r.name == f"{r.model}-{r.variant}-s{r.seed}"
    # then baseline and ACNet again on every model's short schedule, all seeds
    short = runs[n_main:2 * n_main]
    assert all(r.schedule == SHORT and r.variant in (BASE, ACNET) for r in short)
    for r in short:
        e = cpu.short[r.model]
        assert r.config["epochs"] == e < cpu.per_model[r.model]["epochs"]
        assert r.name == f"{r.model}-{r.variant}-e{e}-s{r.seed}"
    # the ablation on the ablation model's short schedule (its base and ACNet are shared)
    ablation = [r for r in runs[2 * n_main:] if r.schedule != LONG]
    assert {r.model for r in ablation} == {cpu.ablation_model}
    assert all(r.schedule == cpu.ablation_schedule == SHORT for r in ablation)
    assert all(r.config["epochs"] == cpu.short[cpu.ablation_model] for r in ablation)
    # last, the converged comparison: baseline and ACNet on every seed on twice the main
    # schedule, model by model
    long = [r for r in runs if r.schedule == LONG]
    assert runs[-len(long):] == long and cpu.plateau_comparison
    assert [(r.model, r.seed, r.variant) for r in long] == [
        (m, s, v) for m in cpu.models for s in cpu.seeds for v in (BASE, ACNET)]
    for r in long:
        e = cpu.plateau[r.model]
        assert r.config["epochs"] == e == 2 * cpu.per_model[r.model]["epochs"]
        assert r.config["block"] == ("base" if r.variant == BASE else "acb")
        assert r.name == f"{r.model}-{r.variant}-e{e}-s{r.seed}"
    assert len({r.name for r in runs}) == len(runs)
    assert [tier(r) for r in runs] == sorted(tier(r) for r in runs)
    assert all("train_limit" not in r.config for r in runs)  # the full training set


def test_study_preset_rejects_an_ablation_schedule_it_cannot_run():
    from acnet.experiments import StudyPreset

    with pytest.raises(ValueError, match="ablation_schedule"):
        StudyPreset("x", "synthetic", ("cifar_quick",), (0,), "cifar_quick",
                    ablation_schedule="long")
    with pytest.raises(ValueError, match="short schedule"):
        StudyPreset("x", "synthetic", ("cifar_quick",), (0,), "cifar_quick",
                    ablation_schedule="short", short={"resnet20": 2})


def test_quick_preset_is_base_vs_acnet_on_the_full_training_set():
    from acnet.experiments import STUDY_PRESETS, runs_of

    quick = STUDY_PRESETS["quick"]
    runs = runs_of(quick)
    assert {(r.variant, r.seed) for r in runs} == {(v, s) for v in ("base", "acb")
                                                   for s in (0, 1, 2)}
    assert all("train_limit" not in r.config and "test_limit" not in r.config for r in runs)
    assert [r.seed for r in runs_of(quick, seeds=(7,))] == [7, 7]


def test_report_without_ablation_states_headline_paired_differences_deployment(
        tmp_path, monkeypatch):
    from acnet.experiments import presets, reproduce

    tiny = presets.StudyPreset(
        "tiny-main", "synthetic", ("cifar_quick",), (0, 1), "cifar_quick",
        train={"epochs": 1, "train_limit": 64, "test_limit": 32, "batch_size": 32},
        ratios=(0.0, 1.0), draws=1, ablation=False, description="test")
    monkeypatch.setitem(presets.STUDY_PRESETS, "tiny-main", tiny)
    text = reproduce("tiny-main", tmp_path, seeds=(3, 4)).read_text()
    res = json.loads((tmp_path / "results.json").read_text())
    assert len(res["runs"]) == 4 and res["seeds"] == [3, 4]
    acc = {(r["variant"], r["seed"]): r["deployed_test_acc"] for r in res["runs"].values()}
    diffs = [(acc["acb", s] - acc["base", s]) * 100 for s in (3, 4)]
    assert f"seed 3 {diffs[0]:+.2f}, seed 4 {diffs[1]:+.2f}" in text
    assert "**cifar_quick: ACNet " in text and "beyond seed noise: " in text
    assert "## Deployment check" in text and "cifar_quick: max |logit difference|" in text
    assert "## Ablation" not in text and "## Centre vs corner" not in text
    assert set(res["sparsity"]) == {"base", "ACNet"}


def test_reproduce_with_two_jobs_trains_the_same_runs_and_report_only_trains_nothing(
        tmp_path, monkeypatch):
    from acnet.experiments import presets, reproduce
    from acnet.train import RunDir

    tiny = presets.StudyPreset(
        "tiny-jobs", "synthetic", ("cifar_quick",), (0,), "cifar_quick",
        train={"epochs": 1, "train_limit": 64, "test_limit": 32, "batch_size": 32},
        ratios=(0.0, 1.0), draws=1, ablation=False, description="test")
    monkeypatch.setitem(presets.STUDY_PRESETS, "tiny-jobs", tiny)
    with pytest.raises(ValueError, match="jobs"):
        reproduce("tiny-jobs", tmp_path / "a", jobs=0)
    reproduce("tiny-jobs", tmp_path / "one", jobs=1, analyze=False)
    reproduce("tiny-jobs", tmp_path / "two", jobs=2, analyze=False)
    for name in ("cifar_quick-base-s0", "cifar_quick-acb-s0"):
        one, two = (RunDir(tmp_path / d / "runs" / name) for d in ("one", "two"))
        assert one.finished and two.finished
        # the same run; per-process thread counts may change float rounding, not the result
        assert abs(one.read_metrics()["test_acc"] - two.read_metrics()["test_acc"]) <= 0.07
    empty = tmp_path / "none"
    with pytest.raises(ValueError, match="no finished runs"):
        reproduce("tiny-jobs", empty, train_runs=False)
    assert not (empty / "runs").exists() or not any((empty / "runs").iterdir())


def test_latency_ratio_is_a_ratio_and_restores_modes():
    from acnet.analysis.cost import latency_ratio

    a = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train()
    b = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    b[1].train()  # a mixed-mode model keeps each module's mode
    lat = latency_ratio({"a": a, "b": b}, (1, 3, 8, 8), repeats=2, warmup=0)
    assert lat["ratio"]["a"] == 1.0 and lat["ratio"]["b"] > 0 and lat["ms"]["b"] > 0
    assert a.training and a[0].training and not b.training and b[1].training
