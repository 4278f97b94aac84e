"""The deployment-cost sections of a study report: INT8, inference cost, training cost; and the
cell helpers every section shares."""

from __future__ import annotations

import statistics
from typing import Any

from .figures import LABELS
from .presets import ACNET, BASE, MAIN, ONLINE, StudyPreset
from .results import int8_rows, mean_std, pending_runs

__all__ = ["_pending", "_pm", "inference_cost_section", "int8_section", "training_cost_section"]


def _pm(xs: list[float], pct: bool = True) -> str:
    """``mean ± std`` (in % by default), the bare value for one run (no spread to show), or
    n/a."""
    m, s = mean_std(xs)
    if m != m:  # NaN: no values
        return "n/a"
    k = 100 if pct else 1
    return f"{m * k:.2f}" if len(xs) == 1 else f"{m * k:.2f} ± {s * k:.2f}"


def _pending(names: list[str]) -> str:
    """The one line a section without (all) its data shows."""
    return f"pending: runs {', '.join(names)}" if names else "pending: no finished runs"


def int8_section(preset: StudyPreset, res: dict[str, Any]) -> list[str]:
    """Section: fp32 vs static INT8 (onnxruntime) of the deployed base, ACNet, online runs."""
    if not preset.int8:
        return []
    lines = ["## INT8 deployment", ""]
    status = res.get("int8_status", {})
    if not status.get("available", False):
        return [*lines, f"Not measured: {status.get('error') or 'no INT8 results'}.", ""]
    rows = int8_rows(res, (BASE, ACNET, ONLINE))
    first = next((r["int8"] for r in res["runs"].values() if r.get("int8")), None)
    if first:
        lines += [f"Each run's deployed model exported to ONNX (fp32) and quantized to static "
                  f"INT8 by onnxruntime (QDQ, {first['calibration_method']} calibration on "
                  f"{first['calibration_images']} training images, per-"
                  f"{'channel' if first['per_channel'] else 'tensor'} weights), both evaluated "
                  f"on {first['test_images']:,} test images; mean ± std over seeds.", "",
                  "| model | variant | epochs | seeds | fp32 ONNX | INT8 | change | identical "
                  "predictions |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {LABELS[r['variant']]} | {r['epochs']} | "
                     f"{len(r['fp32'])} | "
                     f"{_pm(r['fp32'])} | {_pm(r['int8'])} | {_pm(r['change'])} | "
                     f"{_pm(r['agreement'])} |")
    missing = pending_runs(res, variants=(BASE, ACNET, ONLINE))
    return lines + [""] + ([_pending(missing), ""] if missing else [])


def inference_cost_section(preset: StudyPreset, res: dict[str, Any]) -> list[str]:
    """Section: params, MACs and latency of the deployed models."""
    lines = ["## Inference cost", "",
             "Deployed with conv-BN folded, batch 1, median CPU latency interleaved in one "
             "process, measured when the report is written. \"Same as the baseline\" checks "
             "that the deployed ACNet has the baseline's parameters and multiply-accumulates; "
             "the 1-minute load average before / after the timing (last column) shows whether "
             "other work (a study still training) shared the CPU.", "",
             "| model | params | MACs | deployed ACNet: same as the baseline? "
             "| params while training ACNet | latency ms: baseline / ACNet | load |",
             "|---|---|---|---|---|---|---|"]
    missing = []
    for model in preset.models:
        c = res["cost"].get(model)
        if c is None:
            missing += pending_runs(res, model, (BASE, ACNET), MAIN)
            continue
        same = (c["params_acnet_deployed"] == c["params_base"]
                and c["macs_acnet_deployed"] == c["macs_base"])
        lines.append(f"| {model} | {c['params_base']:,} | {c['macs_base']:,} | "
                     f"{'yes' if same else 'NO: ' + str(c['params_acnet_deployed'])} | "
                     f"{c['params_acnet_training']:,} | {c['latency_ms_base']:.3f} / "
                     f"{c['latency_ms_acnet']:.3f} | {_load_cell(c)} |")
    if not res["cost"]:
        return [*lines[:2], _pending(missing), ""]
    return lines + [""] + ([_pending(missing), ""] if missing else [])


def _load_cell(r: dict[str, Any]) -> str:
    """The 1-minute load averages before/after a benchmark."""
    return " / ".join("?" if v is None else f"{v:.1f}" for v in r.get("load_avg", [None, None]))


def _wall_clock(res: dict[str, Any], model: str) -> str:
    """Mean wall-clock seconds per epoch, baseline / ACNet / online, as they happened (every
    schedule)."""
    cells = []
    for v in (BASE, ACNET, ONLINE):
        s = [r["seconds"] / r["epochs"] for r in res["runs"].values()
             if r["model"] == model and r["variant"] == v and r.get("epochs")]
        cells.append(f"{statistics.fmean(s):.0f}" if s else "–")
    return " / ".join(cells)


def training_cost_section(preset: StudyPreset, res: dict[str, Any]) -> list[str]:
    """Section: training-step cost by the benchmark's method; wall-clock only as context."""
    bench = res.get("training_cost", {})
    lines = ["## Training cost", ""]
    if not bench:
        return [*lines, _pending(pending_runs(res)), ""]
    r0 = next(iter(bench.values()))
    lines += [f"Median time of one training step (forward, backward, SGD; batch as trained, "
              f"channels-last) on the CPU, every variant built from the same model and timed "
              f"in turn in one process ({r0['repeats']} interleaved repeats after "
              f"{r0['warmup']} warm-up, torch threads: {r0['threads']}): `acnet bench`'s "
              f"method. The "
              f"ratios to the conv-BN baseline are the cost; the 1-minute load average before "
              f"/ after shows whether other work shared the machine (remeasure by deleting "
              f"`cost_bench.json`).", "",
              "| model | batch | baseline ms/step | ACNet | online ACNet | no branch BN | load |",
              "|---|---|---|---|---|---|---|"]
    for model, r in bench.items():
        q = r["ratio"]
        lines.append(f"| {model} | {r['batch']} | {r['ms']['base']:.1f} | {q['acb']:.2f}× | "
                     f"{q.get('acb_online', float('nan')):.2f}× | "
                     f"{q.get('acb_no_branch_bn', float('nan')):.2f}× | {_load_cell(r)} |")
    lines += ["", "For context, not cost: the runs' own training time per epoch as it happened "
              "(mean over runs, while other runs or work may have shared the CPU):", "",
              "| model | baseline s/epoch | ACNet s/epoch | online ACNet s/epoch |",
              "|---|---|---|---|"]
    for model in bench:
        lines.append(f"| {model} | " + " | ".join(_wall_clock(res, model).split(" / ")) + " |")
    return [*lines, ""]
