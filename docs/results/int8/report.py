"""Write this folder's README.md, the INT8 report, from measure.py's results.json and cause.py's
cause.json: the conclusion first, the default setting's accuracy, the calibration settings, the
weight and activation statistics, the commands; every setting's row in a collapsed block.

    python docs/results/int8/report.py docs/results/int8/results.json docs/results/int8/cause.json
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

DEFAULT = ("minmax", True, 512)  # acnet export --int8's setting
BLOCKS = {"acb": "ACNet", "base": "baseline", "online": "online ACNet"}
MODELS = {"cifar_quick": "Cifar-quick", "resnet20": "ResNet-20"}
STATS = {  # measure.py key: column name
    "peak_over_rms": "kernel peak / rms",
    "channel_peak_max_over_median": "largest / median channel peak",
    "weight_int8_rel_err_per_channel": "weight rounding error, per channel (%)",
    "weight_int8_rel_err_per_tensor": "weight rounding error, per tensor (%)",
    "act_max_over_p9999": "activation max / 99.99th percentile",
}


def mean_sd(values: list[float], scale: float = 100.0, digits: int = 2) -> str:
    v = [x * scale for x in values]
    sd = statistics.stdev(v) if len(v) > 1 else 0.0
    return f"{statistics.mean(v):.{digits}f} ± {sd:.{digits}f}" if len(v) > 1 else \
        f"{v[0]:.{digits}f}"


def key(q: dict) -> tuple:
    return q["method"], q["per_channel"], q["calibration_images"]


def setting_name(k: tuple) -> str:
    method, per_channel, images = k
    return f"{method}, per-{'channel' if per_channel else 'tensor'} weights, {images} images"


def table(headers: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers),
            *("| " + " | ".join(r) + " |" for r in rows)]


def groups(results: list[dict]) -> dict[tuple[str, str], list[dict]]:
    out: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in results:
        out[(r["model"], r["block"])].append(r)
    return dict(sorted(out.items(), key=lambda kv: (kv[0][0], list(BLOCKS).index(kv[0][1]))))


def at(runs: list[dict], k: tuple) -> tuple[list[float], list[float], list[float]]:
    """(fp32, INT8, agreement) of the runs that measured setting ``k``."""
    rows = [(r["onnx_test_acc"], q) for r in runs for q in r["int8"] if key(q) == k]
    return ([a for a, _ in rows], [q["int8_test_acc"] for _, q in rows],
            [q["int8_agreement"] for _, q in rows])


def change(runs: list[dict], k: tuple) -> list[float]:
    fp, q8, _ = at(runs, k)
    return [b - a for a, b in zip(fp, q8, strict=True)]


def answer(g: dict[tuple[str, str], list[dict]]) -> str:
    cq = {b: g[("cifar_quick", b)] for b in BLOCKS if ("cifar_quick", b) in g}
    d = {b: change(runs, DEFAULT) for b, runs in cq.items()}
    q8 = {b: at(runs, DEFAULT)[1] for b, runs in cq.items()}
    worst = min(statistics.mean(v) for v in d.values())
    return (f"INT8 costs ACNet no more accuracy than the baseline. With `acnet export --int8`'s "
            f"setting (static INT8, MinMax calibration on 512 training images, per-channel "
            f"weights), Cifar-quick's accuracy changes by {mean_sd(d['acb'])} points as ACNet, "
            f"{mean_sd(d['base'])} as the baseline and {mean_sd(d['online'])} as online ACNet "
            f"({len(cq['acb'])} seeds), so ACNet's INT8 accuracy ({mean_sd(q8['acb'])} %) stays "
            f"above the baseline's ({mean_sd(q8['base'])} %); no model loses more than "
            f"{abs(worst) * 100:.2f} points on average, and the calibration method, weight "
            f"granularity and number of calibration images change it by about a tenth of a "
            f"point (entropy calibration excepted).")


def main(results_path: str, cause_path: str) -> None:
    results = json.loads(Path(results_path).read_text())
    cause = json.loads(Path(cause_path).read_text())
    g = groups(results)
    lines = ["# INT8 deployment of ACNet", "", f"**In short:** {answer(g)}", "",
             "Each deployed model (the stock architecture) was exported to ONNX and quantized to "
             "static INT8 by onnxruntime (`quantize_static`, QDQ, INT8 weights and activations, "
             "after `quant_pre_process`), and both were evaluated with onnxruntime on the full "
             "Fashion-MNIST test set (10,000 images); calibration images are drawn from the "
             "run's training set with seed 0. The models are short-trained: Cifar-quick 3 epochs "
             "on 20,000 training images (3 seeds), ResNet-20 4 epochs on 12,000 (seed 0 only).",
             "", "## Accuracy with the default setting", ""]
    rows = []
    for (model, block), runs in g.items():
        fp, q8, agree = at(runs, DEFAULT)
        rows.append([MODELS.get(model, model), BLOCKS[block], str(len(fp)), mean_sd(fp),
                     mean_sd(q8), mean_sd([b - a for a, b in zip(fp, q8, strict=True)]),
                     mean_sd(agree)])
    lines += table(["model", "trained as", "seeds", "fp32 ONNX (%)", "INT8 (%)",
                    "change (points)", "same predictions (%)"], rows)
    settings = list(dict.fromkeys(key(q) for r in results for q in r["int8"]))
    lines += ["", "## Calibration settings", "",
              "The change in accuracy under INT8 (points) of Cifar-quick, per calibration "
              "setting:", ""]
    rows = []
    for k in settings:
        cells = [mean_sd(change(g[("cifar_quick", b)], k)) if change(g[("cifar_quick", b)], k)
                 else "—" for b in BLOCKS]
        rows.append([setting_name(k) + (" (default)" if k == DEFAULT else ""), *cells])
    lines += table(["setting", *BLOCKS.values()], rows)
    lines += ["", "Entropy calibration ran on seed 0 only. onnxruntime's default entropy "
              "histogram (128 bins, as many as the quantized values) silently degenerates to "
              "MinMax; acnet uses 2048 bins.", "",
              "## Why: weights and activations of the deployed models", "",
              "Per conv, the mean over layers; then mean ± std over seeds.", ""]
    rows = []
    for (model, block), runs in g.items():
        cells = []
        for k in STATS:
            per_run = [statistics.mean(r[k]) for r in runs]
            pct = "err" in k
            cells.append(mean_sd(per_run, 100.0 if pct else 1.0, 2))
        rows.append([MODELS.get(model, model), BLOCKS[block], *cells])
    lines += table(["model", "trained as", *STATS.values()], rows)
    errs = {cause[r]["block"]: cause[r]["logits"][0]["logit_rel_err"] for r in cause}
    lines += ["", f"INT8 logits against fp32 (seed 0, default setting, test set): relative L2 "
              f"error {errs['acb']:.1%} for ACNet, {errs['base']:.1%} for the baseline, "
              f"{errs['online']:.1%} for online ACNet (`cause.json`).", "",
              "## Findings", "",
              "- **The suspected cause exists but does not hurt.** ACNet's deployed kernels are "
              "more peaked (the centre tap has twice the share of |w|; higher peak/rms and "
              "per-channel rounding error, above), yet its INT8 logit error is the smallest: "
              "the activations, quantized per tensor, dominate the error, and ACNet's "
              "first-block activations have a smaller range.",
              "- Where a model loses more (baseline, online ACNet), leaving its most sensitive "
              "conv in float (`quantize_onnx(..., nodes_to_exclude=[name])`) recovered nearly "
              "all of it at seed 0 (`results.json`, `float_layer`).",
              "- An earlier report of a gap (−1.05 points on one seed, 2,000 test images) is "
              "within the noise of such a measurement: INT8 flips 3–5 % of these short-trained "
              "models' predictions, in both directions.",
              "- Not measured: DenseNet-40, ResNet-20 seeds 1–2, and the full-data recipe.", "",
              "## Commands", "", "```bash",
              "docs/results/int8/train.sh    # the training runs, into runs/int8",
              "python docs/results/int8/measure.py runs/int8 docs/results/int8/results.json",
              "python docs/results/int8/cause.py docs/results/int8/cause.json runs/int8/cq-*-s0",
              "python docs/results/int8/report.py docs/results/int8/results.json "
              "docs/results/int8/cause.json",
              "acnet export runs/int8/cq-acb-s0 --onnx cq.onnx --int8   # one model, the shipped "
              "command", "```", "",
              '<details markdown="1"><summary>Every model, training form and setting</summary>',
              ""]
    rows = []
    for (model, block), runs in g.items():
        for k in settings:
            fp, q8, agree = at(runs, k)
            if fp:
                rows.append([MODELS.get(model, model), BLOCKS[block], setting_name(k),
                             str(len(fp)), mean_sd(q8),
                             mean_sd([b - a for a, b in zip(fp, q8, strict=True)]),
                             mean_sd(agree)])
    lines += table(["model", "trained as", "setting", "seeds", "INT8 (%)", "change (points)",
                    "same predictions (%)"], rows)
    lines += ["", "</details>", ""]
    out = Path(results_path).with_name("README.md")
    out.write_text("\n".join(lines))
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
