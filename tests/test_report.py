"""The study report on finished, partial and committed (checkpoint-free) studies: plateau
check, INT8, training cost by the benchmark's method, small-multiple figures."""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from acnet.experiments import presets
from acnet.experiments.results import deployment_check, plateau_check

rep = importlib.import_module("acnet.experiments.reproduce")  # the module, not the function

TINY = presets.StudyPreset(
    "tiny-report", "synthetic", ("cifar_quick",), (0, 1), "cifar_quick",
    train={"epochs": 2, "train_limit": 64, "test_limit": 32, "batch_size": 32},
    ratios=(0.0, 1.0), draws=1, plateau={"cifar_quick": 3}, int8=True, description="test")


def _fake_bench(calls: list):
    """A stand-in for acnet.bench.bench_training that records its arguments."""
    def bench(model, device, batch, repeats, warmup, image=32, compile=False, *,
              in_channels=3, channels_last=True):
        calls.append({"model": model, "batch": batch, "repeats": repeats, "image": image,
                      "in_channels": in_channels})
        ratio = {"base": 1.0, "acb": 1.8, "acb_no_branch_bn": 1.1, "acb_online": 1.2,
                 "straightforward_acb": 2.5}
        return {"model": model, "batch": batch, "channels_last": channels_last,
                "ms": {k: 10.0 * v for k, v in ratio.items()}, "ratio": ratio,
                "load_avg": [0.5, 0.75]}
    return bench


def _report(out) -> tuple[str, dict]:
    text = rep.reproduce(TINY.name, out, train_runs=False).read_text()
    return text, json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny finished study (15 runs: the ablation x 2 seeds + one longer baseline),
    trained once, not analyzed."""
    out = tmp_path_factory.mktemp("study")
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(presets.STUDY_PRESETS, TINY.name, TINY)
        rep.reproduce(TINY.name, out, analyze=False)
    return out


@pytest.fixture(scope="module")
def analyzed(trained, tmp_path_factory):
    """The tiny study analyzed once (report-only, the benchmark faked): (dir, bench calls)."""
    out = tmp_path_factory.mktemp("analyzed") / "study"
    shutil.copytree(trained, out)
    calls: list = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(presets.STUDY_PRESETS, TINY.name, TINY)
        mp.setattr(rep, "bench_training", _fake_bench(calls))
        _report(out)
    return out, calls


def _copy(src, tmp_path, monkeypatch) -> tuple:
    """A copy of a study, the preset registered, the benchmark faked: (dir, bench calls)."""
    out = tmp_path / "study"
    shutil.copytree(src, out)
    monkeypatch.setitem(presets.STUDY_PRESETS, TINY.name, TINY)
    calls: list = []
    monkeypatch.setattr(rep, "bench_training", _fake_bench(calls))
    return out, calls


@pytest.fixture()
def study(analyzed, tmp_path, monkeypatch):
    """A copy of the analyzed study, its caches (export.json, cost_bench.json...) kept."""
    return _copy(analyzed[0], tmp_path, monkeypatch)


def test_complete_study_report_plateau_int8_cost_and_figures(analyzed, study, monkeypatch):
    out, calls = study
    text = (out / "report.md").read_text()
    res = json.loads((out / "results.json").read_text())
    assert "in progress" not in text and "pending" not in text
    # plateau: the numbers are the runs' metrics
    runs = res["runs"]
    base = [runs[f"cifar_quick-base-s{s}"]["deployed_test_acc"] for s in (0, 1)]
    long = runs["cifar_quick-base-e3-s0"]
    p = res["plateau"]["cifar_quick"]
    assert p["long"] == long["deployed_test_acc"] and p["long_epochs"] == 3 == long["epochs"]
    assert p["vs_mean"] == pytest.approx(long["deployed_test_acc"] - sum(base) / 2, abs=1e-12)
    assert p["vs_same_seed"] == pytest.approx(long["deployed_test_acc"] - base[0], abs=1e-12)
    curves = [runs[f"cifar_quick-base-s{s}"]["curve"] for s in (0, 1)]
    rise = (sum(c[1]["test_acc"] for c in curves) - sum(c[0]["test_acc"] for c in curves)) / 2
    assert p["rise_base"]["rise"] == pytest.approx(rise, abs=1e-12)
    assert (p["rise_base"]["from_epoch"], p["rise_base"]["to_epoch"]) == (1, 2)
    assert (p["rise_long"]["from_epoch"], p["rise_long"]["to_epoch"]) == (2, 3)
    assert "## Has the schedule converged?" in text
    assert f"{p['vs_mean'] * 100:+.2f} points against the 2-seed mean" in text
    assert p["verdict"] in text
    # INT8: base, ACNet and online runs, cached in export.json, no ONNX file left behind
    assert "## INT8 deployment" in text
    for v in ("base", "acb", "online"):
        for s in (0, 1):
            run = out / "runs" / f"cifar_quick-{v}-s{s}"
            export = json.loads((run / "export.json").read_text())
            assert runs[run.name]["int8"]["int8_test_acc"] == export["int8_test_acc"]
            assert 0 <= export["int8_agreement"] <= 1 and not list(run.glob("*.onnx"))
    assert "| cifar_quick | online ACNet | 2 | 2 |" in text  # epochs, seeds
    assert not (out / "runs" / "cifar_quick-hor-s0" / "export.json").exists()
    # training cost by the benchmark's method, at the study's input and batch, cached
    assert analyzed[1] == [{"model": "cifar_quick", "batch": 32,
                            "repeats": rep.BENCH_REPEATS, "image": 32, "in_channels": 3}]
    assert "## Training cost" in text and "| cifar_quick | 32 | 10.0 | 1.80× | 1.20× |" in text
    assert "0.5 / 0.8" in text  # the load averages before / after
    for png in ("kernel_magnitude.png", "sparsity.png", "training_curves.png"):
        assert (out / png).stat().st_size > 5000
    # a rerun reuses export.json and cost_bench.json: nothing measured again

    def boom(*a, **k):
        raise AssertionError("INT8 measured again")

    monkeypatch.setattr("acnet.runs.export_int8_run", boom)
    again, _ = _report(out)
    assert calls == [] and "## INT8 deployment" in again
    assert again.split("## INT8")[1].split("## Inference")[0] == \
        text.split("## INT8")[1].split("## Inference")[0]


def test_partial_study_says_what_is_pending(study):
    out, _ = study
    gone = ["cifar_quick-acb-s0", "cifar_quick-acb-s1", "cifar_quick-corner-s0",
            "cifar_quick-corner-s1", "cifar_quick-hor-s1", "cifar_quick-base-e3-s0"]
    for name in gone:
        (out / "runs" / name / "metrics.json").unlink()
    text, res = _report(out)
    order = [s.name for s in presets.runs_of(TINY) if s.name in gone]  # the study's order
    assert "**Study in progress: 9 of 15 runs finished.** Pending: " + ", ".join(order) in text
    assert [p["name"] for p in res["pending"]] == order
    assert "**cifar_quick**: pending: runs cifar_quick-acb-s0, cifar_quick-acb-s1." in text
    assert "| +horizontal | 1 |" in text  # a variant with one seed
    assert ("## Centre vs corner ACB (cifar_quick, 2 epochs)\n\npending: runs "
            "cifar_quick-acb-s0, cifar_quick-acb-s1, cifar_quick-corner-s0, "
            "cifar_quick-corner-s1\n") in text
    assert "pending: runs cifar_quick-base-e3-s0" in text
    assert set(res["kernel_magnitude"]) == {"base"} and res["cost"] == {}
    assert "(worst of 9 runs)" in text  # the deployment check without ACNet runs
    assert "## Training curves" in text and (out / "training_curves.png").exists()
    printed = rep.summary(out)
    assert "Study in progress: 9 of 15 runs finished.** Pending: " + ", ".join(order) in printed
    assert "pending: runs" in printed


def test_deployment_check_with_a_missing_variant():
    row = {"model": "m", "variant": "base", "seed": 0, "max_abs_diff_deploy": 1e-6,
           "prediction_agreement": 1.0, "params_train": 10, "params_deployed": 10}
    c = deployment_check({"runs": {"m-base-s0": row}})["m"]
    assert c["params_base"] == 10 and c["params_acnet"] is None and c["runs"] == 1
    p = plateau_check({"runs": {"m-base-s0": {**row, "deployed_test_acc": 0.5, "epochs": 1,
                                             "curve": [{"epoch": 1, "test_acc": 0.5}]}}}, "m")
    assert p["rise_base"] is None and "long" not in p


def test_results_without_schedules_are_the_main_schedule_and_summary_shows_the_short(tmp_path):
    """results.json written before schedules existed: every run (and pending run) is MAIN;
    `summary` prints the short schedules' table beside the main one."""
    from acnet.experiments.results import main_result, pending_runs

    def run(variant: str, seed: int, acc: float, epochs: int, **extra) -> dict:
        return {"model": "m", "variant": variant, "seed": seed, "deployed_test_acc": acc,
                "epochs": epochs, "train_images": 64, "max_abs_diff_deploy": 1e-6,
                "prediction_agreement": 1.0, "params_train": 10, "params_deployed": 10, **extra}

    old = {"runs": {"m-base-s0": run("base", 0, 0.5, 3), "m-acb-s0": run("acb", 0, 0.6, 3)},
           "pending": [{"name": "m-base-s1", "model": "m", "variant": "base", "seed": 1}]}
    r = main_result(old, "m")
    assert r["base"] == [0.5] and r["acnet"] == [0.6] and r["epochs"] == 3
    assert main_result(old, "m", presets.SHORT)["base"] == []
    assert pending_runs(old, schedule=presets.MAIN) == ["m-base-s1"]
    assert pending_runs(old, schedule=presets.SHORT) == []
    new = {"preset": "no-such-preset", "runs": {
        **old["runs"], "m-base-e2-s0": run("base", 0, 0.4, 2, schedule="short"),
        "m-acb-e2-s0": run("acb", 0, 0.45, 2, schedule="short")}, "pending": []}
    (tmp_path / "results.json").write_text(json.dumps(new))
    printed = rep.summary(tmp_path)
    main, short = printed.split("Short schedules:")
    assert "| m | 3 | 64 | 50.00 | 60.00 | +10.00 (+10.00) |" in main
    assert "| m | 2 | 64 | 40.00 | 45.00 | +5.00 (+5.00) |" in short
    (tmp_path / "results.json").write_text(json.dumps({**old, "preset": "no-such-preset"}))
    assert "Short schedules" not in rep.summary(tmp_path)


def test_committed_study_without_checkpoints_analyzes_the_same(study):
    out, _ = study
    res = json.loads((out / "results.json").read_text())
    for f in [*out.glob("runs/*/checkpoint.pt"), *out.glob("runs/*/sparsity.json"),
              *out.glob("runs/*/robustness.json")]:
        f.unlink()
    text, again = _report(out)
    assert "## Kernel magnitude" in text and "## Sparsifying" in text
    for k, m in res["kernel_magnitude"].items():
        torch.testing.assert_close(torch.tensor(again["kernel_magnitude"][k]), torch.tensor(m),
                                   atol=1e-6, rtol=0)
    for k, study_ in res["sparsity"].items():
        for pattern, c in study_.items():
            assert again["sparsity"][k][pattern]["mean"] == pytest.approx(c["mean"], abs=1e-9)
    cost = again["cost"]["cifar_quick"]
    assert cost["params_acnet_training"] == again["runs"]["cifar_quick-acb-s0"]["params_train"]
    assert cost["params_acnet_training"] > cost["params_acnet_deployed"] == cost["params_base"]


def test_kernel_magnitude_of_trained_and_deployed_acnet_agree(trained):
    from acnet.analysis import kernel_magnitude
    from acnet.runs import load_deployed_model, load_trained

    for name in ("cifar_quick-acb-s0", "cifar_quick-online-s1", "cifar_quick-base-s0"):
        run = trained / "runs" / name
        torch.testing.assert_close(kernel_magnitude(load_deployed_model(run), 5),
                                   kernel_magnitude(load_trained(run), 5), atol=1e-6, rtol=0)


def test_int8_section_without_onnxruntime(study, monkeypatch):
    out, _ = study
    for f in out.glob("runs/*/export.json"):
        f.unlink()

    def missing(run, images):
        raise ImportError("INT8 export needs onnx and onnxruntime")
    monkeypatch.setattr(rep, "_int8_of", missing)
    text, res = _report(out)
    assert "## INT8 deployment\n\nNot measured: INT8 export needs onnx" in text
    assert res["int8_status"]["available"] is False


def test_training_curves_one_panel_per_model_and_fixed_colours(tmp_path, monkeypatch):
    from acnet.analysis import plots

    figs = []
    monkeypatch.setattr(plots, "_save", lambda plt, fig, path, title: figs.append(fig))
    band = {"epochs": [1, 2, 3], "mean": [0.5, 0.7, 0.75], "std": [0.01, 0.02, 0.01]}
    panels = {"a": {"base": band, "acb": band, "acb" + plots.LONG_TAG: band},
              "b": {"base": band, "acb": band},
              "a: one branch": {"hor": band, "ver": band, "acb": band}}
    plots.training_curves(panels, tmp_path / "t.png", "x", {"base": "baseline"})
    axes = figs[0].axes
    assert [ax.get_title() for ax in axes] == list(panels)
    colours = {ln.get_label(): ln.get_color() for ax in axes for ln in ax.get_lines()}
    assert colours["baseline"] == plots.VARIANT_COLOURS["base"]
    assert colours["hor"] == plots.VARIANT_COLOURS["hor"]
    dashed = next(ln for ln in axes[0].get_lines() if ln.get_label() == "acb" + plots.LONG_TAG)
    assert dashed.get_color() == plots.VARIANT_COLOURS["acb"] and dashed.get_linestyle() == "--"
    assert len(figs[0].legends) == 1  # one legend, outside the panels
    # a variant on the short schedule: its colour, dotted; the y range leaves out the first
    # fifth of a long schedule (epoch 2's dip) so the plateau shows
    long_band = {"epochs": list(range(1, 11)), "std": [0.0] * 10,
                 "mean": [0.5, 0.3, 0.8, 0.85, 0.88, 0.9, 0.91, 0.915, 0.92, 0.92]}
    plots.training_curves({"m": {"acb": long_band, "acb" + plots.SHORT_TAG: band}},
                          tmp_path / "u.png")
    ax = figs[1].axes[0]
    short = next(ln for ln in ax.get_lines() if ln.get_label() == "acb" + plots.SHORT_TAG)
    assert short.get_color() == plots.VARIANT_COLOURS["acb"] and short.get_linestyle() == ":"
    low, high = ax.get_ylim()
    assert 0.7 < low < 0.8 and 0.92 < high < 0.95
    figs.pop()
    # one seed diverging for one epoch late in a long schedule (a wide band at epoch 30) runs
    # off the panel instead of flattening the plateau, and so does one wide band at the end;
    # the highest mean stays in view
    epochs = list(range(1, 41))
    rise = [0.5 + 0.44 * min(e, 8) / 8 for e in epochs]  # flat from epoch 8
    dip = {"epochs": epochs,
           "mean": [0.80 if e == 30 else a for e, a in zip(epochs, rise, strict=True)],
           "std": [0.15 if e == 30 else 0.002 for e in epochs]}
    flat = {"epochs": epochs, "mean": rise, "std": [0.002] * 39 + [0.2]}
    plots.training_curves({"m": {"acb": dip, "base": flat}}, tmp_path / "v.png")
    low, high = figs[1].axes[0].get_ylim()
    assert 0.92 < low < 0.94 and 0.942 < high < 0.95
    figs.pop()
    cur = {"ratios": [0, 1], "mean": [0.9, 0.1], "std": [0, 0.01]}
    study = {"corners": cur, "global": cur, "skeleton": cur}  # as results.json sorts them
    plots.sparsity_panels({"base": study, "ACNet": study}, tmp_path / "s.png", "x",
                          {"base": plots.VARIANT_COLOURS["base"]})
    axes = figs[1].axes
    assert [ax.get_title() for ax in axes] == ["skeleton", "corners", "global"]
    assert axes[0].get_ylim() == axes[2].get_ylim() and len(axes[0].get_lines()) == 2


def test_real_training_step_benchmark_is_cached(trained, tmp_path, monkeypatch):
    out = tmp_path / "study"
    shutil.copytree(trained, out)
    monkeypatch.setattr(rep, "BENCH_REPEATS", 1)
    monkeypatch.setattr(rep, "BENCH_WARMUP", 0)
    specs = [s for s in presets.runs_of(TINY) if s.variant == "base"]
    cost = rep._training_cost(TINY, out, specs)["cifar_quick"]
    assert cost["ratio"]["base"] == 1.0 and cost["ratio"]["acb"] > 0 and cost["batch"] == 32
    assert json.loads((out / rep.COST_BENCH).read_text())["cifar_quick"]["repeats"] == 1


def _row(variant: str, seed: int, acc: float, epochs: int, curve: list[float],
         schedule: str = "main") -> dict:
    return {"model": "m", "variant": variant, "seed": seed, "deployed_test_acc": acc,
            "epochs": epochs, "schedule": schedule,
            "curve": [{"epoch": i + 1, "test_acc": a} for i, a in enumerate(curve)]}


@pytest.mark.parametrize("long, late, words", [
    (0.930, 0.000, "outside seed noise (±0.23): the 5-epoch schedule had NOT converged"),
    (0.9005, 0.000, "within seed noise (±0.23): the 5-epoch schedule had converged"),
    (0.9005, 0.010, "still rose +1.00 over epochs 4-5: not clearly converged"),
    (0.880, 0.000, "lower: longer training did worse"),
])
def test_plateau_verdict_in_plain_words(long, late, words):
    from acnet.experiments.report import _plateau_words

    runs = {f"b{s}": _row("base", s, a, 5, [0.8, 0.85, 0.88, a - late, a])
            for s, a in enumerate((0.899, 0.900, 0.901))}
    runs["l"] = _row("base", 0, long, 10, [0.8] * 9 + [long], "long")
    p = plateau_check({"runs": runs}, "m")
    noise = 2 * 0.001 * (1 + 1 / 3) ** 0.5
    assert p["noise"] == pytest.approx(noise, rel=1e-9) and p["same_seed"] == 0.899
    assert p["rise_base"]["rise"] == pytest.approx(late, abs=1e-12)
    assert (p["rise_long"]["from_epoch"], p["rise_long"]["to_epoch"]) == (8, 10)
    text = _plateau_words("m", p)
    assert words in text and f"{(long - 0.9) * 100:+.2f} points against the 3-seed mean" in text


def test_longest_first_orders_pending_runs_by_measured_time(tmp_path):
    """--jobs N trains the longest expected run first: remaining epochs x the seconds per epoch
    the study measured for that model and variant (a longer baseline counts as the baseline)."""
    runs = presets.runs_of(TINY, None)
    by = {s.name: s for s in runs}
    out = tmp_path

    def finish(name, seconds):
        d = out / "runs" / name
        d.mkdir(parents=True)
        (d / "metrics.json").write_text(json.dumps({"seconds": seconds, "epochs": 2}))

    finish("cifar_quick-base-s0", 16.0)   # 8 s/epoch
    finish("cifar_quick-acb-s0", 40.0)    # 20 s/epoch
    part = out / "runs" / "cifar_quick-acb-s1"  # 1 of 2 epochs done: 20 s left
    part.mkdir(parents=True)
    (part / "config.json").write_text("{}")
    (part / "metrics.jsonl").write_text(json.dumps({"epoch": 1}) + "\n")
    todo = [(by[n], by[n].config) for n in
            ("cifar_quick-base-s1", "cifar_quick-acb-s1", "cifar_quick-base-e3-s0",
             "cifar_quick-hor-s0")]
    order = [s.name for s, _ in rep.longest_first(todo, runs, out)]
    # the study's priority first (main comparison, ablation, plateau check), then within it
    # the expected time: acb-s1 1 x 20 = 20 before base-s1 2 x 8 = 16
    assert order == ["cifar_quick-acb-s1", "cifar_quick-base-s1", "cifar_quick-hor-s0",
                     "cifar_quick-base-e3-s0"]
    assert [presets.tier(by[n]) for n in order] == [0, 0, 1, 2]
    # nothing measured yet: the epochs alone decide, ties keep the preset's order
    fresh = tmp_path / "fresh"
    order = [s.name for s, _ in rep.longest_first(todo, runs, fresh)]
    assert order == ["cifar_quick-base-s1", "cifar_quick-acb-s1", "cifar_quick-hor-s0",
                     "cifar_quick-base-e3-s0"]
    # within a tier the longest goes first, whatever the preset's order
    longer = [(by[n], {**by[n].config, "epochs": e}) for n, e in
              (("cifar_quick-base-s1", 2), ("cifar_quick-acb-s1", 5))]
    assert [s.name for s, _ in rep.longest_first(longer, runs, out)] == [
        "cifar_quick-acb-s1", "cifar_quick-base-s1"]


# a study with a short schedule too, and the ablation on it (the cpu preset's layout), 1 seed
HALF = presets.StudyPreset(
    "tiny-half", "synthetic", ("cifar_quick",), (0,), "cifar_quick",
    train={"epochs": 3, "train_limit": 64, "test_limit": 32, "batch_size": 32},
    short={"cifar_quick": 2}, ablation_schedule="short", plateau={"cifar_quick": 4},
    plateau_comparison=True, int8=True, ratios=(0.0, 1.0), draws=1, description="test")


def test_short_schedule_comparison_and_ablation_on_it(tmp_path, monkeypatch):
    """Baseline and ACNet on the main and the short schedule, the ablation (robustness, corner,
    kernels) on the short one only, the plateau table with the short baseline."""
    monkeypatch.setitem(presets.STUDY_PRESETS, HALF.name, HALF)
    monkeypatch.setattr(rep, "bench_training", _fake_bench([]))
    text = rep.reproduce(HALF.name, tmp_path).read_text()
    res = json.loads((tmp_path / "results.json").read_text())
    runs = res["runs"]
    assert {n: (r["schedule"], r["epochs"]) for n, r in runs.items()} == {
        "cifar_quick-base-s0": ("main", 3), "cifar_quick-acb-s0": ("main", 3),
        "cifar_quick-base-e2-s0": ("short", 2), "cifar_quick-acb-e2-s0": ("short", 2),
        **{f"cifar_quick-{v}-e2-s0": ("short", 2)
           for v in ("hor", "ver", "nobn", "online", "corner")},
        "cifar_quick-base-e4-s0": ("long", 4), "cifar_quick-acb-e4-s0": ("long", 4)}
    # robustness only on the ablation's schedule; its ACNet row is the short ACNet run
    assert {n for n, r in runs.items() if "robustness" in r} == {
        n for n, r in runs.items() if r["schedule"] == "short"}
    assert "## Ablation (cifar_quick, 2 epochs)" in text
    acb_short = runs["cifar_quick-acb-e2-s0"]
    row = " | ".join(f"{acb_short['robustness'][t] * 100:.2f}"
                     for t in ("none", "hflip", "vflip", "rot90"))
    assert f"| +both, branch BN (ACNet) | 1 | {row} |" in text
    assert (f"## Centre vs corner ACB (cifar_quick, 2 epochs)\n\nACNet with the asymmetric "
            f"kernels on the centre row/column: {acb_short['deployed_test_acc'] * 100:.2f}"
            in text)
    # main table on the main schedule, the long and short tables on theirs
    for tag, epochs, head in (("", 3, "## Main result"),
                              ("-e4", 4, "### The same comparison on the long schedules"),
                              ("-e2", 2, "### The same comparison on the short schedules")):
        b, a = (runs[f"cifar_quick-{v}{tag}-s0"]["deployed_test_acc"] * 100
                for v in ("base", "acb"))
        section = text[text.index(head):]
        assert (f"| cifar_quick | {epochs} | 64 | {b:.2f} | {a:.2f} | {a - b:+.2f} "
                f"({a - b:+.2f}) | n/a (one seed: no spread yet)" in section)
    assert (f"**cifar_quick, 4 epochs: ACNet "
            f"{runs['cifar_quick-acb-e4-s0']['deployed_test_acc'] * 100:.2f} vs baseline" in text)
    # INT8 on every schedule; the summary prints the long and short tables
    assert {(r["model"], r["schedule"], r["variant"]) for r in res["runs"].values()
            if "int8" in r} >= {("cifar_quick", "long", v) for v in ("base", "acb")}
    assert "| cifar_quick | ACNet | 4 | 1 |" in text
    printed = rep.summary(tmp_path)
    assert "Long schedules:" in printed and "Short schedules:" in printed
    # plateau: the short baseline, and what the main schedule added to it
    p = res["plateau"]["cifar_quick"]
    base, base_short = runs["cifar_quick-base-s0"], runs["cifar_quick-base-e2-s0"]
    assert p["short"] == [base_short["deployed_test_acc"]] and p["short_epochs"] == 2
    added = (base["deployed_test_acc"] - base_short["deployed_test_acc"]) * 100
    assert (f"| cifar_quick | {base_short['deployed_test_acc'] * 100:.2f} (2); 3 epochs "
            f"add {added:+.2f} |" in text)
    # the kernel and sparsity studies used the short runs (base, ACNet, corner of the ablation)
    assert set(res["sparsity"]) == {"base", "ACNet", "corner ACNet"}
    with_sparsity = {d.name for d in (tmp_path / "runs").iterdir()
                     if (d / "sparsity.json").is_file()}
    assert with_sparsity == {"cifar_quick-base-e2-s0", "cifar_quick-acb-e2-s0",
                             "cifar_quick-corner-e2-s0"}
    assert res["sparsity"]["ACNet"] == json.loads(
        (tmp_path / "runs" / "cifar_quick-acb-e2-s0" / "sparsity.json").read_text())
    assert (tmp_path / "kernel_magnitude.png").exists() and (tmp_path / "sparsity.png").exists()


def test_plateau_with_every_seed_on_the_long_schedule():
    """Several long baselines: their mean against the study's, noise = twice the standard
    error of the difference of the two means, the per-seed differences."""
    from acnet.experiments.report import _plateau_words

    runs = {f"b{s}": _row("base", s, a, 5, [0.8, 0.85, 0.88, a, a])
            for s, a in enumerate((0.899, 0.900, 0.901))}
    runs |= {f"l{s}": _row("base", s, a, 10, [0.8] * 9 + [a], "long")
             for s, a in enumerate((0.910, 0.912, 0.914))}
    runs["a0"] = _row("acb", 0, 0.95, 10, [0.9] * 10, "long")  # not a baseline: not counted
    p = plateau_check({"runs": runs}, "m")
    assert p["long"] == pytest.approx(0.912) and p["long_runs"] == [0.910, 0.912, 0.914]
    assert p["vs_mean"] == pytest.approx(0.012)
    assert p["noise"] == pytest.approx(2 * (0.001 ** 2 / 3 + 0.002 ** 2 / 3) ** 0.5)
    assert p["paired"] == pytest.approx({0: 0.011, 1: 0.012, 2: 0.013})
    assert p["verdict"] == "outside seed noise"
    text = _plateau_words("m", p)
    assert ("10 instead of 5 epochs changes the 3-seed baseline mean by +1.20 points against "
            "the 3-seed mean (same seed: seed 0 +1.10, seed 1 +1.20, seed 2 +1.30)") in text
    assert "the 5-epoch schedule had NOT converged" in text


def test_former_plateau_run_names_are_renamed_and_reported(study):
    """A study from before the long schedule: its plateau baseline ``m-long-s0`` becomes the
    long schedule's ``m-base-e<epochs>-s0``, and is reported, not trained again."""
    out, _ = study
    new = out / "runs" / "cifar_quick-base-e3-s0"
    old = new.rename(out / "runs" / "cifar_quick-long-s0")
    text, res = _report(out)
    assert new.is_dir() and not old.exists()
    assert "pending" not in text and res["plateau"]["cifar_quick"]["long_epochs"] == 3


def test_former_plateau_run_with_other_settings_stays(tmp_path, caplog):
    """A former plateau run whose settings differ from today's long schedule (other epochs), or
    without a config, is not renamed; an existing new name is never overwritten."""
    from acnet.train import RunDir, TrainConfig
    from acnet.train.config import resolve

    spec = next(s for s in presets.runs_of(HALF) if s.name == "cifar_quick-base-e4-s0")
    old = tmp_path / "runs" / "cifar_quick-long-s0"
    RunDir(old).write_config(resolve(TrainConfig(**{**spec.config, "epochs": 6})))
    rep._rename_legacy([spec], tmp_path)
    assert old.is_dir() and not (tmp_path / "runs" / spec.name).exists()
    assert "other settings (epochs: 6, now 4)" in caplog.text
    (old / "config.json").unlink()
    rep._rename_legacy([spec], tmp_path)
    assert old.is_dir() and not (tmp_path / "runs" / spec.name).exists()
    RunDir(old).write_config(resolve(TrainConfig(**spec.config)))
    (tmp_path / "runs" / spec.name).mkdir()
    rep._rename_legacy([spec], tmp_path)
    assert old.is_dir()  # the new name exists: nothing moved over it
    (tmp_path / "runs" / spec.name).rmdir()
    rep._rename_legacy([spec], tmp_path)
    assert not old.exists() and (tmp_path / "runs" / spec.name / "config.json").is_file()


def test_two_schedules_of_the_same_epochs_are_refused():
    same = presets.StudyPreset("same", "synthetic", ("cifar_quick",), (0,), "cifar_quick",
                               train={"epochs": 3}, short={"cifar_quick": 2},
                               plateau={"cifar_quick": 2}, ablation=False)
    with pytest.raises(ValueError, match="share the directory 'cifar_quick-base-e2-s0'"):
        presets.runs_of(same)


def test_a_comparison_with_runs_missing_says_so():
    """Both variants have runs but not every seed: the table and the headline name the
    pending runs next to the partial result."""
    from acnet.experiments.report import _headline, main_table

    runs = {f"m-{v}-s{s}": {**_row(v, s, 0.9 + 0.01 * s, 5, [0.9]), "train_images": 64}
            for v, s in (("base", 0), ("base", 1), ("acb", 0))}
    res = {"runs": runs, "pending": [{"name": "m-acb-s1", "model": "m", "variant": "acb",
                                      "seed": 1, "schedule": "main"}]}
    assert main_table(res, ("m",))[-1].endswith("; pending: runs m-acb-s1 |")
    assert "Not complete yet: pending: runs m-acb-s1." in _headline(res, "m")


def test_long_schedules_are_trained_model_by_model(tmp_path):
    """In the long tier a study spanning sessions finishes one model's comparison before the
    next (the study's model order), even when a later model's runs are longer."""
    two = presets.StudyPreset(
        "two", "synthetic", ("cifar_quick", "resnet20"), (0, 1), "cifar_quick",
        train={"epochs": 2}, plateau={"cifar_quick": 4, "resnet20": 8}, plateau_comparison=True,
        ablation=False)
    runs = presets.runs_of(two)
    todo = [(s, s.config) for s in runs if s.schedule == "long"][::-1]
    todo += [(s, s.config) for s in runs if s.schedule == "main"]
    order = [s for s, _ in rep.longest_first(todo, runs, tmp_path)]
    assert [(s.schedule, s.model) for s in order] == (
        [("main", m) for m in ("cifar_quick",) * 4 + ("resnet20",) * 4]
        + [("long", "cifar_quick")] * 4 + [("long", "resnet20")] * 4)
    # and seed by seed: a stopped study has paired seeds, not all ACNet runs and one baseline
    assert [s.seed for s in order if s.schedule == "long"] == [0, 0, 1, 1] * 2


def test_golden_report_from_the_committed_quick_study(tmp_path):
    """The committed quick study's results.json renders to exactly the golden report: the
    prose lives here once; the other tests check the numbers."""
    root = Path(__file__).resolve().parents[1]
    res = json.loads((root / "docs/results/quick/results.json").read_text())
    from acnet.experiments.report import write_report

    path = write_report(presets.STUDY_PRESETS["quick"], tmp_path, res)
    assert path.read_text() == (root / "tests/golden/quick_report.md").read_text()


def test_every_form_of_the_cheap_and_compare_studies_has_a_colour_of_its_own():
    """The cheap study's curves once drew sub-batch 1/4 and 1/8 in the same grey."""
    from acnet.analysis import plots
    from acnet.experiments import cheap

    colours = plots.VARIANT_COLOURS
    assert len(set(colours.values())) == len(colours)  # one colour per slug
    assert set(cheap.FORMS) <= set(colours)
