"""The fine-tuning study (`acnet reproduce --preset finetune`): does training with ACBs help when
starting from a trained model, and does an ACNet-trained model transfer better?

A source model is trained on some classes of a dataset (plainly, and as an ACNet deployed back
to the plain architecture), then fine-tuned on the other classes at several training-set sizes:
plainly, as an ACNet (each branch start), and, from the ACNet-trained source, plainly. Every
variant trains the same epochs; seeds pair a fine-tune with its own source; models are
evaluated deployed.
"""

from __future__ import annotations

import json
import logging
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .._env import machine
from .._files import save_json
from ..train import RunDir
from .results import curve_rise
from .runner import Job, train_jobs
from .stats import Comparison, compare, markdown_table, pm, signed

log = logging.getLogger(__name__)

__all__ = [
    "FINETUNE",
    "SOURCES",
    "VARIANTS",
    "FinetuneStudy",
    "collect",
    "jobs",
    "report",
    "run",
    "summary",
]

RESULTS = "results.json"
FIGURE = "gains.png"


@dataclass(frozen=True)
class Variant:
    """A fine-tuning variant: its label, the source it starts from, its TrainConfig fields."""

    label: str
    source: str  # a key of SOURCES
    options: dict[str, Any]


# how each source is trained (TrainConfig fields beyond the study's)
SOURCES: dict[str, dict[str, Any]] = {"base": {"block": "base"}, "acb": {"block": "acb"}}
BASELINE = "plain"
VARIANTS: dict[str, Variant] = {
    BASELINE: Variant("plain fine-tuning (baseline)", "base", {"block": "base"}),
    "acb-zero": Variant("ACNet fine-tuning, new branches at zero", "base",
                        {"block": "acb", "branch_init": "zero"}),
    "acb-small": Variant("ACNet fine-tuning, new branches small and random (DyRep-like)",
                         "base", {"block": "acb", "branch_init": "small"}),
    "acnet-source": Variant("plain fine-tuning of the ACNet-trained source (deployed)", "acb",
                            {"block": "base"}),
}


@dataclass(frozen=True)
class FinetuneStudy:
    """The study's settings: model, data split, schedules and seeds."""

    model: str = "cifar_quick"
    dataset: str = "fashion-mnist"
    source_classes: tuple[int, ...] = (0, 1, 2, 3, 4)
    target_classes: tuple[int, ...] = (5, 6, 7, 8, 9)
    source_epochs: int = 30
    # target training images -> epochs: a fixed number of images seen would starve the large
    # set; these give every size a schedule the baseline plateaus on (checked in the report)
    sizes: dict[int, int] = field(default_factory=lambda: {500: 40, 5000: 15, 30000: 10})
    finetune_lr: float = 0.01
    finetune_batch: int = 64  # 500 images still give 7 steps per epoch
    seeds: tuple[int, ...] = (0, 1, 2)

    def source_name(self, kind: str, seed: int) -> str:
        return f"source-{kind}-s{seed}"

    def run_name(self, size: int, variant: str, seed: int) -> str:
        return f"ft-n{size}-{variant}-s{seed}"


FINETUNE = FinetuneStudy()


def jobs(study: FinetuneStudy, runs_dir: Path, seeds: tuple[int, ...] | None = None
         ) -> list[Job]:
    """Every run of the study, by priority: the sources, then per size (largest first, the
    most expensive) each seed's variants."""
    seeds = seeds or study.seeds
    common = {"model": study.model, "dataset": study.dataset, "quiet": True}
    out = [Job(study.source_name(kind, s),
               {**common, **opts, "classes": list(study.source_classes),
                "epochs": study.source_epochs, "seed": s})
           for s in seeds for kind, opts in SOURCES.items()]
    for size, epochs in sorted(study.sizes.items(), reverse=True):
        for s in seeds:
            for slug, v in VARIANTS.items():
                src = study.source_name(v.source, s)
                out.append(Job(study.run_name(size, slug, s), {
                    **common, **v.options, "classes": list(study.target_classes),
                    "train_limit": size, "epochs": epochs, "lr": study.finetune_lr,
                    "batch_size": study.finetune_batch,
                    "seed": s, "init_from": str(runs_dir / src), "new_head": True},
                    after=(src,)))
    return out


# ------------------------------------------------------------------------ results
@dataclass
class RunResult:
    """What the report needs of one finished run."""

    name: str
    seed: int
    test_acc: float  # deployed model
    max_abs_diff_deploy: float
    prediction_agreement: float
    init_test_acc: float | None
    epochs: int
    train_images: int
    seconds: float
    curve: list[float]


@dataclass
class FinetuneResults:
    """Every finished run of the study, keyed by (size, variant) and source kind."""

    study: FinetuneStudy
    sources: dict[str, list[RunResult]]
    runs: dict[tuple[int, str], list[RunResult]]
    pending: list[str]
    command: str

    def accs(self, size: int, variant: str) -> dict[int, float]:
        return {r.seed: r.test_acc for r in self.runs.get((size, variant), [])}

    def comparison(self, size: int, variant: str) -> Comparison:
        return compare(self.accs(size, BASELINE), self.accs(size, variant))

    def all_runs(self) -> list[RunResult]:
        return [r for rs in (*self.sources.values(), *self.runs.values()) for r in rs]


def _result(run: RunDir, seed: int) -> RunResult | None:
    m = run.read_metrics() if run.path.is_dir() else None
    if m is None:
        return None
    return RunResult(run.path.name, seed, m["deployed_test_acc"], m["max_abs_diff_deploy"],
                     m["prediction_agreement"], m.get("init_test_acc"), m["epochs"],
                     m["train_images"], m["seconds"],
                     [row["test_acc"] for row in run.metrics_lines()])


def collect(study: FinetuneStudy, out: Path, seeds: tuple[int, ...] | None = None,
            command: str = "") -> FinetuneResults:
    """The finished runs of the study in ``out/runs``; the others are pending."""
    seeds = seeds or study.seeds
    runs_dir = out / "runs"
    pending = []
    sources: dict[str, list[RunResult]] = {}
    for kind in SOURCES:
        for s in seeds:
            r = _result(RunDir(runs_dir / study.source_name(kind, s)), s)
            if r is None:
                pending.append(study.source_name(kind, s))
            else:
                sources.setdefault(kind, []).append(r)
    runs: dict[tuple[int, str], list[RunResult]] = {}
    for size in study.sizes:
        for slug in VARIANTS:
            for s in seeds:
                r = _result(RunDir(runs_dir / study.run_name(size, slug, s)), s)
                if r is None:
                    pending.append(study.run_name(size, slug, s))
                else:
                    runs.setdefault((size, slug), []).append(r)
    return FinetuneResults(study, sources, runs, pending, command)


def to_json(res: FinetuneResults) -> dict[str, Any]:
    """results.json: the settings, every run's numbers, what is pending, the machine."""
    st = res.study
    return {
        "study": "finetune", "command": res.command,
        "settings": {"model": st.model, "dataset": st.dataset,
                     "source_classes": list(st.source_classes),
                     "target_classes": list(st.target_classes),
                     "source_epochs": st.source_epochs,
                     "sizes": {str(k): v for k, v in st.sizes.items()},
                     "finetune_lr": st.finetune_lr, "finetune_batch": st.finetune_batch,
                     "seeds": list(st.seeds)},
        "variants": {k: {"label": v.label, "source": v.source, "options": v.options}
                     for k, v in VARIANTS.items()},
        "sources": {k: [r.__dict__ for r in rs] for k, rs in res.sources.items()},
        "runs": {f"n{size}/{slug}": [r.__dict__ for r in rs]
                 for (size, slug), rs in sorted(res.runs.items())},
        "pending": res.pending,
        "software": {"python": platform.python_version(), "torch": torch.__version__},
        "machine": machine(),
    }


# ------------------------------------------------------------------------ report
def _verdict_words(c: Comparison) -> str:
    if c.verdict == "n/a":
        return "too few seeds to tell"
    if c.verdict == "no":
        return f"within seed noise ({signed(c.gain)}, ahead on {c.ahead} of {len(c.paired)})"
    return (f"{'better' if c.gain > 0 else 'worse'} beyond seed noise ({signed(c.gain)}, ahead "
            f"on {c.ahead} of {len(c.paired)})")


def _sources_table(res: FinetuneResults) -> list[str]:
    rows = []
    for kind, label in (("base", "plain"), ("acb", "ACNet, deployed")):
        rs = res.sources.get(kind, [])
        rows.append([label, len(rs), pm([r.test_acc for r in rs]),
                     ", ".join(f"{100 * r.test_acc:.2f}" for r in rs) or "—"])
    base = {r.seed: r.test_acc for r in res.sources.get("base", [])}
    acb = {r.seed: r.test_acc for r in res.sources.get("acb", [])}
    c = compare(base, acb)
    lines = markdown_table(["source", "seeds", "test accuracy (%)", "per seed"], rows)
    verdict = (f"ACNet source vs plain source: {_verdict_words(c)} (2 s.e. = "
               f"{2 * 100 * c.se:.2f}).") if c.paired else ""
    return [*lines, "", verdict]


def _size_table(res: FinetuneResults, size: int) -> list[str]:
    rows = []
    for slug, v in VARIANTS.items():
        accs = res.accs(size, slug)
        if slug == BASELINE:
            rows.append([v.label, pm(list(accs.values())), "—", "—", "—"])
            continue
        c = res.comparison(size, slug)
        if not c.paired:
            rows.append([v.label, pm(list(accs.values())), "—", "—", "—"])
            continue
        rows.append([v.label, pm(list(accs.values())), signed(c.gain),
                     ", ".join(signed(d) for d in c.paired.values()),
                     f"{c.verdict} (2 s.e. = {2 * 100 * c.se:.2f})"])
    return markdown_table(["variant", "test accuracy (%)", "gain", "per seed",
                           "beyond seed noise?"], rows)


def _plateau(res: FinetuneResults) -> list[str]:
    rows = []
    for size, epochs in sorted(res.study.sizes.items()):
        curves = [[{"epoch": i + 1, "test_acc": a} for i, a in enumerate(r.curve)]
                  for r in res.runs.get((size, BASELINE), [])]
        rise = curve_rise(curves) if curves else None
        rows.append([f"{size:,}", epochs, "—" if rise is None else
                     f"{signed(rise['rise'])} (epoch {rise['from_epoch']} → {rise['to_epoch']})"])
    return markdown_table(["target images", "epochs", "baseline's mean test accuracy over the "
                           "last 20 % of epochs"], rows)


def _summary_words(res: FinetuneResults) -> list[str]:
    """What holds and what does not, in plain words, from the verdicts."""
    lines: list[str] = []
    for slug, v in VARIANTS.items():
        if slug == BASELINE:
            continue
        parts = []
        for size in sorted(res.study.sizes):
            c = res.comparison(size, slug)
            if c.paired:
                parts.append(f"{size:,} images: {_verdict_words(c)}")
        if parts:
            lines.append(f"- **{v.label}** vs plain fine-tuning: " + "; ".join(parts) + ".")
    if not lines:
        return ["No comparison has both of its runs finished yet."]
    return [_in_short(res), "", *lines]


def _in_short(res: FinetuneResults) -> str:
    """One sentence over every comparison's verdict."""
    found = [(size, slug, res.comparison(size, slug)) for size in sorted(res.study.sizes)
             for slug in VARIANTS if slug != BASELINE]
    found = [f for f in found if f[2].paired]
    better = [f"{VARIANTS[slug].label} at {size:,} images" for size, slug, c in found
              if c.verdict == "yes, better"]
    worse = [f"{VARIANTS[slug].label} at {size:,} images" for size, slug, c in found
             if c.verdict == "yes, worse"]
    gains = [c.gain for _, _, c in found]
    text = ("In short: " + (f"better than plain fine-tuning beyond seed noise: "
                            f"{'; '.join(better)}." if better else
                            f"no variant beat plain fine-tuning beyond seed noise at any size "
                            f"(gains from {signed(min(gains))} to {signed(max(gains))} "
                            f"points)."))
    if worse:
        text += f" Worse beyond seed noise: {'; '.join(worse)}."
    return text


def _figure(res: FinetuneResults, path: Path) -> bool:
    from ..analysis import plots

    lines = {}
    for slug, v in VARIANTS.items():
        if slug == BASELINE:
            continue
        pts = [(size, res.comparison(size, slug)) for size in sorted(res.study.sizes)]
        pts = [(size, c) for size, c in pts if c.paired]
        if pts:
            lines[v.label] = {"x": [s for s, _ in pts],
                              "mean": [100 * c.gain for _, c in pts],
                              "seeds": [[100 * d for d in c.paired.values()] for _, c in pts]}
    if not lines:
        return False
    plots.gain_panels({"test accuracy gain over plain fine-tuning": lines}, path,
                      xlabel="target training images")
    return True


def report(res: FinetuneResults, out: Path) -> Path:
    """Write ``out/report.md`` (and the gains figure) from the results."""
    st = res.study
    done = len(res.all_runs())
    total = done + len(res.pending)
    sizes = ", ".join(f"{n:,} images ({e} epochs)" for n, e in sorted(st.sizes.items()))
    lines = [
        "# Fine-tuning with ACNet", "",
        f"Command: `{res.command}`", "",
        f"This study fine-tunes {st.model} on {st.dataset}. Sources: trained on classes "
        f"{', '.join(map(str, st.source_classes))} for {st.source_epochs} epochs with the "
        f"preset's recipe, plainly and as an ACNet (deployed back to the plain architecture). "
        f"Fine-tuning: classes {', '.join(map(str, st.target_classes))} (relabelled), a new "
        f"classifier, SGD lr {st.finetune_lr} with cosine decay, batch {st.finetune_batch}, on "
        f"the first {sizes} of the "
        f"target classes' training images; every variant trains the same epochs. "
        f"{len(st.seeds)} seeds; seed s fine-tunes the sources of seed s. Accuracies are of the "
        f"deployed models on the whole test set of the target classes, mean ± std over seeds; "
        f"'beyond seed noise' means the gain exceeds twice the standard error of the difference "
        f"of the two means.", "",
        f"Status: {done} of {total} runs finished"
        + (f"; pending: {', '.join(res.pending)}." if res.pending else "."), "",
        "## What holds and what does not", "", *_summary_words(res), "",
        "## Sources", "", *_sources_table(res), ""]
    for size in sorted(st.sizes):
        lines += [f"## {size:,} target images, {st.sizes[size]} epochs", "",
                  *_size_table(res, size), ""]
    if _figure(res, out / FIGURE):
        lines += [f"![gains]({FIGURE})", "",
                  "Lines: mean gain over plain fine-tuning; dots: each seed's paired gain.", ""]
    every = res.all_runs()
    check = "No finished runs yet."
    if every:
        worst = max(r.max_abs_diff_deploy for r in every)
        agree = min(r.prediction_agreement for r in every)
        check = (f"Every finished run's deployed model against the trained one on the test "
                 f"set: max |logit difference| {worst:.2g}, identical predictions in "
                 f"{agree:.2%} or more.")
    lines += ["## Plateau check", "", *_plateau(res), "", "## Deployment check", "", check, ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def run(out: str | Path, *, workers: int = 1, device: str = "auto", data_dir: str | None = None,
        seeds: tuple[int, ...] | None = None, train_runs: bool = True, command: str = "",
        study: FinetuneStudy = FINETUNE) -> Path:
    """Train what is missing (unless ``train_runs`` is False), then write results and report."""
    out = Path(out)
    runs_dir = out / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    if train_runs:
        train_jobs(jobs(study, runs_dir, seeds), runs_dir, workers=workers,
                   overrides={"device": device, "data_dir": data_dir})
    res = collect(study, out, seeds, command or f"acnet reproduce --preset finetune --out {out}")
    save_json(out / RESULTS, to_json(res))
    return report(res, out)


def summary(out: str | Path) -> str:
    """The study's plain-words result, from its results.json."""
    data = json.loads((Path(out) / RESULTS).read_text())
    return f"finetune study: {sum(len(v) for v in data['runs'].values())} fine-tuning runs " \
           f"finished, {len(data['pending'])} pending; see {Path(out) / 'report.md'}"
