"""What a study's results say: means over seeds, the main comparison (per schedule), the
deployment check, the plateau check, INT8 rows and which runs are still pending."""

from __future__ import annotations

import math
import statistics
from typing import Any

from .presets import ACNET, BASE, CORNER, LONG, MAIN, SHORT

__all__ = [
    "RESULTS",
    "STUDY_GROUPS",
    "accuracies",
    "curve_rise",
    "deployment_check",
    "int8_rows",
    "main_result",
    "mean_std",
    "paired_differences",
    "pending_runs",
    "plateau_check",
    "schedule_of",
]

RESULTS = "results.json"  # beside report.md in the study directory
# kernel magnitude and sparsity: these variants of the ablation model, under these titles
STUDY_GROUPS = {"base": BASE, "ACNet": ACNET, "corner ACNet": CORNER}
PLATEAU_FRACTION = 0.2  # the plateau check: rise of the test accuracy over this last share


def mean_std(xs: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value, NaN for none)."""
    if not xs:
        return float("nan"), float("nan")
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def schedule_of(run: dict[str, Any]) -> str:
    """A run's schedule (MAIN, SHORT or LONG; results written before schedules existed: MAIN)."""
    return run.get("schedule", MAIN)


def _rows(res: dict[str, Any], model: str, variant: str, schedule: str = MAIN
          ) -> list[dict[str, Any]]:
    """Every finished run of ``model`` in ``variant`` on ``schedule``, by seed."""
    return sorted((r for r in res["runs"].values() if r["model"] == model
                   and r["variant"] == variant and schedule_of(r) == schedule),
                  key=lambda r: r["seed"])


def accuracies(res: dict[str, Any], model: str, variant: str,
               key: str = "deployed_test_acc", schedule: str = MAIN) -> list[float]:
    """``key`` of every seed's run of ``model`` in ablation ``variant`` (a slug) on
    ``schedule``."""
    return [r[key] for r in _rows(res, model, variant, schedule)]


def main_result(res: dict[str, Any], model: str, schedule: str = MAIN) -> dict[str, Any]:
    """Baseline vs ACNet on one model and schedule: accuracies, gain, and whether it beats seed
    noise (the gain exceeds twice the standard error of the difference of the two means)."""
    b, a = accuracies(res, model, BASE, schedule=schedule), \
        accuracies(res, model, ACNET, schedule=schedule)
    (mb, sb), (ma, sa) = mean_std(b), mean_std(a)
    se = math.sqrt(sa ** 2 / max(len(a), 1) + sb ** 2 / max(len(b), 1)) if a and b else math.nan
    gain = ma - mb
    if len(a) < 2 or len(b) < 2:
        verdict = "n/a"
    elif abs(gain) > 2 * se:
        verdict = "yes, better" if gain > 0 else "yes, worse"
    else:
        verdict = "no"
    runs = _rows(res, model, BASE, schedule) + _rows(res, model, ACNET, schedule)
    return {"base": b, "acnet": a, "gain": gain, "se": se, "verdict": verdict,
            "paired": paired_differences(res, model, schedule),
            "epochs": runs[0]["epochs"] if runs else None,
            "train_images": runs[0]["train_images"] if runs else None}


def paired_differences(res: dict[str, Any], model: str, schedule: str = MAIN
                       ) -> dict[int, float]:
    """ACNet minus baseline accuracy for each seed that has both runs on ``schedule``."""
    by_seed: dict[int, dict[str, float]] = {}
    for r in res["runs"].values():
        if r["model"] == model and r["variant"] in (BASE, ACNET) and schedule_of(r) == schedule:
            by_seed.setdefault(r["seed"], {})[r["variant"]] = r["deployed_test_acc"]
    return {s: v[ACNET] - v[BASE] for s, v in sorted(by_seed.items()) if len(v) == 2}


def deployment_check(res: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per model: worst deploy difference, agreement, params (None while runs are pending)."""
    out = {}
    for model in dict.fromkeys(r["model"] for r in res["runs"].values()):
        rows = [r for r in res["runs"].values() if r["model"] == model]
        base = next((r for r in rows if r["variant"] == BASE), None)
        acb = next((r for r in rows if r["variant"] == ACNET), None)
        out[model] = {"max_abs_diff": max(r["max_abs_diff_deploy"] for r in rows),
                      "agreement": min(r["prediction_agreement"] for r in rows),
                      "runs": len(rows),
                      "params_base": base["params_train"] if base else None,
                      "params_acnet": acb["params_train"] if acb else None,
                      "params_deployed": acb["params_deployed"] if acb else None}
    return out


def pending_runs(res: dict[str, Any], model: str | None = None,
                 variants: tuple[str, ...] | None = None, schedule: str | None = None
                 ) -> list[str]:
    """Names of the study's runs not finished yet, optionally of one model, variants and
    schedule."""
    return [p["name"] for p in res.get("pending", [])
            if (model is None or p["model"] == model)
            and (variants is None or p["variant"] in variants)
            and (schedule is None or schedule_of(p) == schedule)]


def _mean_curve(curves: list[list[dict[str, Any]]]) -> dict[int, float]:
    """Mean test accuracy per epoch over runs (epochs every run has)."""
    per_run = [{int(r["epoch"]): r["test_acc"] for r in c} for c in curves if c]
    if not per_run:
        return {}
    common = set.intersection(*(set(c) for c in per_run))
    return {e: statistics.fmean(c[e] for c in per_run) for e in sorted(common)}


def curve_rise(curves: list[list[dict[str, Any]]], fraction: float = PLATEAU_FRACTION
               ) -> dict[str, Any] | None:
    """Rise of the mean test accuracy over epochs E - k to E, k = max(1, round(fraction E))."""
    mean = _mean_curve(curves)
    if not mean:
        return None
    last = max(mean)
    start = last - max(1, round(fraction * last))
    if start not in mean:
        return None
    return {"from_epoch": start, "to_epoch": last, "from_acc": mean[start],
            "to_acc": mean[last], "rise": mean[last] - mean[start], "runs": len(curves)}


def plateau_check(res: dict[str, Any], model: str) -> dict[str, Any]:
    """The study's baseline vs the one on the long schedule, their late rises, and the baseline
    on the short schedule (where the study has one). Noise: with one long run, 2 s √(1 + 1/n)
    (s, n: the study's baselines); with several, twice the standard error of the difference of
    the two means."""
    base = _rows(res, model, BASE)
    short = _rows(res, model, BASE, SHORT)
    out: dict[str, Any] = {"base": [r["deployed_test_acc"] for r in base],
                           "epochs": base[0]["epochs"] if base else None,
                           "rise_base": curve_rise([r["curve"] for r in base]),
                           "short": [r["deployed_test_acc"] for r in short],
                           "short_epochs": short[0]["epochs"] if short else None}
    long = _rows(res, model, BASE, LONG)
    if not long:
        return out
    accs = [r["deployed_test_acc"] for r in long]
    (m, s), (ml, sl) = mean_std(out["base"]), mean_std(accs)
    if len(long) > 1:
        noise = 2 * math.sqrt(s ** 2 / len(base) + sl ** 2 / len(long)) if len(base) > 1 \
            else None
    else:
        noise = 2 * s * math.sqrt(1 + 1 / len(base)) if len(base) > 1 else None
    delta = ml - m if base else None
    verdict = "n/a" if noise is None or delta is None else (
        "outside seed noise" if abs(delta) > noise else "within seed noise")
    by_seed = {r["seed"]: r["deployed_test_acc"] for r in base}
    paired = {r["seed"]: r["deployed_test_acc"] - by_seed[r["seed"]] for r in long
              if r["seed"] in by_seed}
    out.update(long=ml, long_runs=accs, long_epochs=long[0]["epochs"], seed=long[0]["seed"],
               seeds=[r["seed"] for r in long], same_seed=by_seed.get(long[0]["seed"]),
               vs_mean=delta, noise=noise, verdict=verdict, paired=paired,
               vs_same_seed=paired.get(long[0]["seed"]),
               rise_long=curve_rise([r["curve"] for r in long]))
    return out


def int8_rows(res: dict[str, Any], variants: tuple[str, ...]) -> list[dict[str, Any]]:
    """Per model, schedule and variant: fp32 ONNX and INT8 accuracy, change, agreement, per
    seed."""
    rows = []
    for model in dict.fromkeys(r["model"] for r in res["runs"].values()):
        for schedule, v in ((sch, v) for sch in (MAIN, SHORT, LONG) for v in variants):
            found = [r for r in _rows(res, model, v, schedule) if r.get("int8")]
            runs = [r["int8"] for r in found]
            if runs:
                rows.append({"model": model, "variant": v, "schedule": schedule,
                             "epochs": found[0]["epochs"],
                             "fp32": [x["onnx_test_acc"] for x in runs],
                             "int8": [x["int8_test_acc"] for x in runs],
                             "change": [x["int8_test_acc"] - x["onnx_test_acc"] for x in runs],
                             "agreement": [x["int8_agreement"] for x in runs]})
    return rows
