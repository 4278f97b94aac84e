"""What a study's results say: means over seeds, the main comparison, the deployment check."""

from __future__ import annotations

import math
import statistics
from typing import Any

from .presets import ACNET, BASE

__all__ = ["RESULTS", "mean_std", "accuracies", "main_result", "paired_differences",
           "deployment_check"]

RESULTS = "results.json"  # beside report.md in the study directory


def mean_std(xs: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value, NaN for none)."""
    if not xs:
        return float("nan"), float("nan")
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def accuracies(res: dict[str, Any], model: str, variant: str,
               key: str = "deployed_test_acc") -> list[float]:
    """``key`` of every seed's run of ``model`` in ablation ``variant`` (a slug)."""
    return [r[key] for r in res["runs"].values()
            if r["model"] == model and r["variant"] == variant]


def main_result(res: dict[str, Any], model: str) -> dict[str, Any]:
    """Baseline vs ACNet on one model: accuracies, gain, and whether it beats seed noise
    (the gain exceeds twice the standard error of the difference of the two means)."""
    b, a = accuracies(res, model, BASE), accuracies(res, model, ACNET)
    (mb, sb), (ma, sa) = mean_std(b), mean_std(a)
    se = math.sqrt(sa ** 2 / max(len(a), 1) + sb ** 2 / max(len(b), 1))
    gain = ma - mb
    if len(a) < 2 or len(b) < 2:
        verdict = "n/a"
    elif abs(gain) > 2 * se:
        verdict = "yes, better" if gain > 0 else "yes, worse"
    else:
        verdict = "no"
    return {"base": b, "acnet": a, "gain": gain, "se": se, "verdict": verdict,
            "paired": paired_differences(res, model)}


def paired_differences(res: dict[str, Any], model: str) -> dict[int, float]:
    """ACNet minus baseline accuracy for each seed that has both runs."""
    by_seed: dict[int, dict[str, float]] = {}
    for r in res["runs"].values():
        if r["model"] == model and r["variant"] in (BASE, ACNET):
            by_seed.setdefault(r["seed"], {})[r["variant"]] = r["deployed_test_acc"]
    return {s: v[ACNET] - v[BASE] for s, v in sorted(by_seed.items()) if len(v) == 2}


def deployment_check(res: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per model: worst trained-vs-deployed logit difference, prediction agreement, params."""
    out = {}
    for model in dict.fromkeys(r["model"] for r in res["runs"].values()):
        rows = [r for r in res["runs"].values() if r["model"] == model]
        base = next(r for r in rows if r["variant"] == BASE)
        acb = next(r for r in rows if r["variant"] == ACNET)
        out[model] = {"max_abs_diff": max(r["max_abs_diff_deploy"] for r in rows),
                      "agreement": min(r["prediction_agreement"] for r in rows),
                      "params_base": base["params_train"], "params_acnet": acb["params_train"],
                      "params_deployed": acb["params_deployed"]}
    return out
