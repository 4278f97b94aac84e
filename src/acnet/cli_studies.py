"""CLI subcommands for the studies and the benchmark: analyze, reproduce, bench."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _ratios(s: str) -> list[float]:
    try:
        vals = [float(v) for v in s.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--ratios must be comma-separated numbers, got {s!r}") from None
    if not vals or any(not 0 <= v <= 1 for v in vals):
        raise ValueError(f"--ratios must be numbers in [0, 1], got {s!r}")
    return vals


def cmd_analyze(a) -> int:
    import torch

    from .analysis import kernel_magnitude, plots, sparsity_study
    from .analysis.kernels import dominant_kernel_size
    from .experiments.reproduce import _test_loader
    from .runs import load_trained, open_run

    for run in a.runs:
        open_run(run)  # clear error for a path that is not a run
    if a.what == "kernels":
        mats = {}
        for run in a.runs:
            trained = load_trained(run)
            m = kernel_magnitude(trained, a.kernel_size or dominant_kernel_size(trained))
            mats[Path(run).name] = m
            print(f"{run}:")
            for row in m.tolist():
                print("  " + "  ".join(f"{v:.3f}" for v in row))
        if a.out:
            plots.heatmaps(mats, a.out, "average normalized kernel magnitude")
            print(f"wrote {a.out}")
        if a.json:
            Path(a.json).write_text(json.dumps({k: v.tolist() for k, v in mats.items()},
                                               indent=2))
        return 0
    ratios = _ratios(a.ratios)
    if a.draws < 1:
        raise ValueError(f"--draws must be >= 1, got {a.draws}")
    curves, results = {}, {}
    for run in a.runs:
        study = sparsity_study(load_trained(run), _test_loader(Path(run), "none", a.test_limit),
                               ratios, a.draws)
        results[str(run)] = study
        for pattern, cur in study.items():
            curves[f"{Path(run).name}: {pattern}"] = cur
            print(f"{run} {pattern}: " + " ".join(f"{m * 100:.1f}" for m in cur["mean"]))
    if a.out:
        plots.sparsity_curves(curves, a.out, "accuracy after zeroing kernel weights")
        json_path = Path(a.out).with_suffix(".json")
        json_path.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {a.out} and {json_path}")
    del torch
    return 0


def cmd_reproduce(a) -> int:
    from .experiments import reproduce

    cmd = " ".join(["acnet"] + sys.argv[1:]) if sys.argv and "acnet" in sys.argv[0] else None
    path = reproduce(a.preset, a.out, device=a.device, data_dir=a.data_dir, command=cmd)
    text = path.read_text()
    main = text.split("## Main result", 1)[1].split("##", 1)[0] if "## Main result" in text else ""
    print("## Main result" + main.rstrip())
    res = json.loads((path.parent / "results.json").read_text())
    print("\nDeployment check (every run: trained model vs its deployed, BN-folded form on the "
          "test set):")
    for model in dict.fromkeys(r["model"] for r in res["runs"].values()):
        rows = [r for r in res["runs"].values() if r["model"] == model]
        acb = [r for r in rows if r["block"] == "acb"]
        base = [r for r in rows if r["block"] == "base"]
        worst = max(r["max_abs_diff_deploy"] for r in rows)
        agree = min(r["prediction_agreement"] for r in rows)
        print(f"  {model}: max |logit difference| {worst:.2g}, identical predictions "
              f"{agree * 100:.2f}%; parameters: base {base[0]['params_train']:,}, ACNet "
              f"training {acb[0]['params_train']:,} -> deployed {acb[0]['params_deployed']:,}")
    print(f"\nreport: {path}")
    return 0


def cmd_bench(a) -> int:
    from .bench import format_table, run_bench, save

    models = tuple(m for m in a.models.split(",") if m)
    res = run_bench(models=models, repeats=a.repeats, warmup=a.warmup, batch=a.batch,
                    conversion=not a.no_conversion,
                    devices=tuple(a.device.split(",")) if a.device else None)
    print(format_table(res))
    if a.out:
        save(res, a.out)
        print(f"wrote {a.out}")
    return 0


STUDY_COMMANDS = {"analyze": cmd_analyze, "reproduce": cmd_reproduce, "bench": cmd_bench}


def add_study_commands(sub) -> None:
    """Register analyze / reproduce / bench on the main parser."""
    from .experiments.presets import STUDY_PRESETS

    p = sub.add_parser("analyze", help="kernel magnitude matrices or sparsity curves of runs")
    p.add_argument("what", choices=["kernels", "sparsity"])
    p.add_argument("runs", nargs="+", help="run directories")
    p.add_argument("--out", help="figure (PNG) to write")
    p.add_argument("--json", help="kernels: also write the matrices as JSON")
    p.add_argument("--kernel-size", type=int, help="d of the d×d kernels (default: the "
                   "model's most common)")
    p.add_argument("--ratios", default="0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1",
                   help="sparsity: comma-separated fractions")
    p.add_argument("--draws", type=int, default=3, help="sparsity: random masks per ratio")
    p.add_argument("--test-limit", type=int, help="sparsity: first N test images")
    p = sub.add_parser("reproduce", help="run a study's matrix and write its report")
    p.add_argument("--preset", required=True, choices=sorted(STUDY_PRESETS))
    p.add_argument("--out", required=True, help="study directory (rerunning resumes)")
    p.add_argument("--device", default="auto")
    p.add_argument("--data-dir")
    p = sub.add_parser("bench", help="ACB training cost and deployed inference, as ratios")
    p.add_argument("--models", default="resnet20,resnet56,cifar_quick")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--device", help="cpu, cuda or cpu,cuda (default: all available)")
    p.add_argument("--no-conversion", action="store_true", help="skip the resnet50 timing")
    p.add_argument("--out", help="JSON file to write")
