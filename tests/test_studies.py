"""The study machinery shared by the new studies: the runner, comparisons, tables, and the
fine-tuning study end to end on a tiny synthetic version."""

from __future__ import annotations

import json
import math

import pytest

from acnet.experiments import finetune
from acnet.experiments.runner import Job, train_jobs
from acnet.experiments.stats import compare, markdown_table, pm, signed

TINY = {"model": "cifar_quick", "dataset": "synthetic", "epochs": 1, "train_limit": 64,
        "test_limit": 32, "batch_size": 32, "quiet": True}


def test_comparison_numbers():
    c = compare({0: 0.90, 1: 0.91, 2: 0.92}, {0: 0.92, 1: 0.93, 2: 0.95})
    assert c.gain == pytest.approx(0.0233333, abs=1e-6)
    assert c.paired == pytest.approx({0: 0.02, 1: 0.02, 2: 0.03})
    assert c.ahead == 3
    se = math.sqrt(0.01527525 ** 2 / 3 + 0.01 ** 2 / 3)
    assert c.se == pytest.approx(se, rel=1e-5)
    assert c.verdict == "yes, better"
    assert compare({0: 0.9, 1: 0.8}, {0: 0.85, 1: 0.86}).verdict == "no"
    assert compare({0: 0.9}, {0: 0.95}).verdict == "n/a"
    assert compare({0: 0.9, 1: 0.91}, {0: 0.5, 1: 0.51}).verdict == "yes, worse"


def test_formatting_helpers():
    assert pm([0.5, 0.7]) == "60.00 ± 14.14"
    assert pm([]) == "—"
    assert signed(-0.0123) == "−1.23" and signed(0.01) == "+1.00"
    assert markdown_table(["a", "b|c"], [[1, "x"]]) == ["| a | b\\|c |", "|---|---|", "| 1 | x |"]


def test_runner_orders_by_dependency_and_resumes(tmp_path):
    runs = tmp_path / "runs"
    jobs = [Job("child", {**TINY, "init_from": str(runs / "parent"), "block": "acb"},
                after=("parent",)),
            Job("parent", {**TINY, "block": "base"})]
    with pytest.raises(ValueError, match="lr must be"):  # the first failure stops the study
        train_jobs([*jobs[:1], Job("parent", {**TINY, "lr": -1.0})], runs, workers=2)
    cycle = [Job("a", dict(TINY), after=("b",)), Job("b", dict(TINY), after=("a",))]
    with pytest.raises(ValueError, match="wait for runs"):
        train_jobs(cycle, runs, workers=2)
    assert train_jobs([jobs[1]], runs) == 1
    assert train_jobs(jobs, runs) == 1  # the parent is finished; only the child trains
    assert train_jobs(jobs, runs) == 0
    child = json.loads((runs / "child" / "metrics.json").read_text())
    parent = json.loads((runs / "parent" / "metrics.json").read_text())
    assert child["init_test_acc"] == parent["deployed_test_acc"]
    with pytest.raises(ValueError, match="does not have"):
        train_jobs([Job("orphan", dict(TINY), after=("nobody",))], runs)


def test_finetune_study_end_to_end(tmp_path):
    study = finetune.FinetuneStudy(dataset="synthetic", source_epochs=1,
                                   sizes={128: 1, 256: 2}, seeds=(0, 1), finetune_batch=32)
    path = finetune.run(tmp_path, study=study, command="acnet reproduce --preset finetune")
    text = path.read_text()
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["pending"] == [] and len(data["runs"]) == 2 * len(finetune.VARIANTS)
    assert (tmp_path / "gains.png").is_file()
    res = finetune.collect(study, tmp_path)
    for size in (128, 256):
        base = res.accs(size, finetune.BASELINE)
        for slug in finetune.VARIANTS:
            if slug == finetune.BASELINE:
                continue
            c = res.comparison(size, slug)
            assert c.paired == {s: res.accs(size, slug)[s] - base[s] for s in (0, 1)}
            assert f"| {finetune.VARIANTS[slug].label} |" in text
    assert all(r.init_test_acc is not None for rs in res.runs.values() for r in rs)
    assert "## What holds and what does not" in text and "Deployment check" in text
    jobs = finetune.jobs(study, tmp_path / "runs")
    ft = [j for j in jobs if j.name.startswith("ft-")]
    assert all(j.config["new_head"] and j.after for j in ft)
    assert {j.config["init_from"].rsplit("/", 1)[-1] for j in ft} == {
        "source-base-s0", "source-base-s1", "source-acb-s0", "source-acb-s1"}


def test_reproduce_report_only_on_a_new_study_says_what_is_pending(tmp_path, capsys):
    from acnet.cli import main

    rc = main(["reproduce", "--preset", "finetune", "--out", str(tmp_path), "--report-only"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    text = (tmp_path / "report.md").read_text()
    assert "Status: 0 of 42 runs finished" in text and "pending" in out


def test_scenes_have_exact_masks_boxes_and_labels():
    from acnet.data import synthetic
    from acnet.data.scenes import make_scenes, scene_splits

    data = synthetic(200, 100, channels=1, size=28, num_classes=10)
    train, test = scene_splits(data, 40, 20, size=64, max_items=3, seed=3)
    again, _ = scene_splits(data, 40, 20, size=64, max_items=3, seed=3)
    assert (train.images == again.images).all() and (train.masks == again.masks).all()
    assert train.images.shape == (40, 1, 64, 64) and test.masks.shape == (20, 64, 64)
    for i in range(len(train)):
        boxes, labels = train.boxes[i], train.labels[i]
        assert 1 <= len(labels) <= 3 and len(boxes) == len(labels)
        for (x0, y0, x1, y1), lab in zip(boxes.long().tolist(), labels.tolist(), strict=True):
            inside = train.masks[i, y0:y1, x0:x1]
            assert (inside == lab).any()  # the item's silhouette is in its box
            rows = (inside == lab).any(1)
            cols = (inside == lab).any(0)
            assert rows[0] and rows[-1] and cols[0] and cols[-1]  # the box is tight
        labelled = set(train.masks[i].unique().tolist()) - {0}
        assert labelled == set(labels.tolist())
        assert ((train.masks[i] > 0) == (train.images[i, 0] > 25)).all()
    with pytest.raises(ValueError, match="uint8"):
        make_scenes(data.train_x.float(), data.train_y, 4)
    with pytest.raises(ValueError, match="size"):
        make_scenes(data.train_x, data.train_y, 4, size=20)


def test_dense_study_end_to_end(tmp_path, monkeypatch):
    from acnet.data import synthetic
    from acnet.experiments import dense, detection

    fake = lambda *a, **k: synthetic(300, 100, channels=1, size=28, num_classes=10)  # noqa: E731
    monkeypatch.setattr(dense, "load_dataset", fake)
    monkeypatch.setattr(detection, "load_dataset", fake)
    study = dense.DenseStudy(dataset="synthetic", train_scenes=64, test_scenes=16, epochs=2,
                             seeds=(0, 1))
    det = detection.DetectionStudy(dataset="synthetic", train_scenes=8, test_scenes=4,
                                   epochs=1, batch_size=4)
    path = dense.run(tmp_path, study=study, detection=det,
                     command="acnet reproduce --preset dense")
    text = path.read_text()
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["pending"] == [] and set(data["runs"]) == {"base", "acb"}
    assert "**Synthetic task.**" in text and "| ACNet | 2 |" in text
    for runs in data["runs"].values():
        for r in runs.values():
            assert r["max_abs_diff_deploy"] < 1e-3 and len(r["curve"]) == 2
            assert r["params_deployed"] == data["runs"]["base"]["0"]["params_train"]
    assert (tmp_path / "curves.png").is_file() and (tmp_path / "scenes.png").is_file()
    dets = data["detection"]["runs"]
    assert set(dets) == {"base", "acb"} and data["detection"]["pending"] == []
    for runs in dets.values():
        assert runs["0"]["same_detections"] is True and runs["0"]["detections"] > 0
    assert dets["acb"]["0"]["converted"] > 0 and "## Detection" in text
    # resuming a finished study trains nothing; a killed run resumes from its checkpoint
    run = tmp_path / "runs" / "seg-acb-s1"
    (run / "metrics.json").unlink()
    lines = (run / "metrics.jsonl").read_text().splitlines()
    dense.run(tmp_path, study=study, detection=det)
    assert (run / "metrics.jsonl").read_text().splitlines() == lines


def test_study_progress_reports_runs_epochs_and_time_left(tmp_path):
    import io

    from acnet.train.progress import StudyProgress

    runs = tmp_path / "runs"
    for name, lines, finished in (("a", 3, True), ("b", 1, False), ("c", 0, False)):
        (runs / name).mkdir(parents=True)
        if name != "c":
            (runs / name / "config.json").write_text("{}")
            (runs / name / "metrics.jsonl").write_text('{"epoch": 1}\n' * lines)
        if finished:
            (runs / name / "metrics.json").write_text("{}")
    p = StudyProgress(runs, {"a": 3, "b": 4, "c": 4}, stream=io.StringIO())
    line = p.line()
    assert "1/3 runs finished, 4/11 epochs" in line and "running b 1/4" in line
    assert "left: unknown" in line  # nothing trained since it started watching
    (runs / "b" / "metrics.jsonl").write_text('{"epoch": 1}\n' * 2)
    assert "5/11 epochs" in p.line() and "min" in p.line()


def test_runner_writes_a_progress_log(tmp_path):
    runs = tmp_path / "runs"
    train_jobs([Job("one", dict(TINY))], runs, progress_interval=0.05)
    text = (tmp_path / "progress.log").read_text()
    assert "1/1 runs finished, 1/1 epochs" in text


def test_report_only_refuses_another_studys_directory_and_a_run_directory(tmp_path, capsys):
    from acnet.cli import main

    (tmp_path / "results.json").write_text('{"study": "dense"}')
    rc = main(["reproduce", "--preset", "finetune", "--out", str(tmp_path), "--report-only"])
    assert rc == 2 and "holds the 'dense' study" in capsys.readouterr().err
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    rc = main(["reproduce", "--preset", "dense", "--out", str(run), "--report-only"])
    assert rc == 2 and "training run directory" in capsys.readouterr().err


def test_empty_study_reports_say_nothing_is_finished(tmp_path, capsys):
    from acnet.cli import main

    for preset in ("finetune", "dense", "cheap"):
        out = tmp_path / preset
        assert main(["reproduce", "--preset", preset, "--out", str(out), "--report-only"]) == 0
        text = (out / "report.md").read_text()
        assert "No finished runs yet." in text and "nan" not in text
    capsys.readouterr()


def test_report_only_quotes_the_command_that_trained_the_runs(tmp_path, capsys):
    from acnet.cli import main

    out = tmp_path / "ft"
    assert main(["reproduce", "--preset", "finetune", "--out", str(out), "--report-only"]) == 0
    first = "acnet reproduce --preset finetune --out " + str(out) + " --report-only"
    assert json.loads((out / "results.json").read_text())["command"] == first
    data = json.loads((out / "results.json").read_text())
    data["command"] = "acnet reproduce --preset finetune --out elsewhere --jobs 2"
    (out / "results.json").write_text(json.dumps(data))
    assert main(["reproduce", "--preset", "finetune", "--out", str(out), "--report-only"]) == 0
    assert "Command: `acnet reproduce --preset finetune --out elsewhere --jobs 2`" in (
        out / "report.md").read_text()
    capsys.readouterr()
