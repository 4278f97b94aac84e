"""Markdown tables from measure.py's JSON: fp32 vs INT8 per model and block, mean ± std over
seeds, and the weight/activation statistics.

    .venv/bin/python docs/results/int8/table.py docs/results/int8/results.json
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict


def pm(values: list[float], scale: float = 100.0, digits: int = 2) -> str:
    v = [x * scale for x in values]
    sd = statistics.stdev(v) if len(v) > 1 else 0.0
    return f"{statistics.mean(v):.{digits}f} ± {sd:.{digits}f}"


def setting(r: dict) -> str:
    return (f"{r['method']}, per-{'channel' if r['per_channel'] else 'tensor'}, "
            f"{r['calibration_images']}")


def accuracy_table(results: list[dict]) -> str:
    groups = defaultdict(list)
    for r in results:
        groups[(r["model"], r["block"])].append(r)
    lines = ["| model | block | seeds | INT8 setting (method, weights, images) | fp32 ONNX | "
             "INT8 | INT8 - fp32 | same predictions |", "|---|---|---|---|---|---|---|---|"]
    for (model, block), runs in sorted(groups.items()):
        names = [setting(r) for r in runs[0]["int8"]]
        for name in names:
            rows = [(run["onnx_test_acc"], q) for run in runs for q in run["int8"]
                    if setting(q) == name]
            fp = [a for a, _ in rows]
            q8 = [q["int8_test_acc"] for _, q in rows]
            lines.append(f"| {model} | {block} | {len(rows)} | {name} | {pm(fp)} | {pm(q8)} | "
                         f"{pm([b - a for a, b in zip(fp, q8)])} | "
                         f"{pm([q['int8_agreement'] for _, q in rows])} |")
    return "\n".join(lines)


def stats_table(results: list[dict]) -> str:
    groups = defaultdict(list)
    for r in results:
        groups[(r["model"], r["block"])].append(r)
    keys = ["peak_over_rms", "channel_peak_max_over_median", "weight_int8_rel_err_per_channel",
            "weight_int8_rel_err_per_tensor", "act_max_over_p9999"]
    lines = ["| model | block | " + " | ".join(keys) + " |", "|---" * (len(keys) + 2) + "|"]
    for (model, block), runs in sorted(groups.items()):
        cells = []
        for k in keys:
            per_run = [statistics.mean(r[k]) for r in runs]
            cells.append(pm(per_run, 1.0, 3 if "err" in k else 2))
        lines.append(f"| {model} | {block} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(path: str) -> None:
    results = json.loads(open(path).read())
    print(accuracy_table(results))
    print()
    print(stats_table(results))


if __name__ == "__main__":
    main(sys.argv[1])
