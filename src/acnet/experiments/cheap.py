"""The cheap-ACB study (`acnet reproduce --preset cheap`): how much of ACNet's gain do its cheaper
training forms keep, at what training cost, and do they beat the baseline at equal compute?

Each model trains as the baseline, as ACNet (a BatchNorm per branch, statistics from every
image), with branch statistics from a quarter and an eighth of each batch (``sub_batch``), and
as the online form (per-branch scales, one BatchNorm), all for the same epochs and seeds. The
cost of each form is its training step time relative to the baseline's, measured by the
benchmark on the same machine at the start of the study (``cost_bench.json``, kept for resumes).
At equal compute every form trains for the baseline's epochs divided by its cost ratio (rounded
to whole epochs; the report names the compute each run actually used) and is compared with the
baseline of the full schedule.
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
from ..bench import bench_training
from ..train import RunDir
from .runner import Job, train_jobs
from .stats import Comparison, compare, markdown_table, pm, signed

log = logging.getLogger(__name__)

__all__ = ["CHEAP", "FORMS", "CheapStudy", "Form", "Planned", "collect", "jobs", "planned",
           "report", "run", "summary"]

RESULTS = "results.json"
COST_BENCH = "cost_bench.json"
FIGURE = "gain_vs_cost.png"
BASE, ACNET = "base", "acb"


@dataclass(frozen=True)
class Form:
    """A training form: its label, its TrainConfig fields and its row in the benchmark."""

    label: str
    options: dict[str, Any]
    bench: str  # key of bench.TRAINING_VARIANTS


FORMS: dict[str, Form] = {
    BASE: Form("baseline (conv-BN)", {"block": "base"}, "base"),
    ACNET: Form("ACNet (a BN per branch)", {"block": "acb"}, "acb"),
    "sub4": Form("sub-batch ACNet, statistics from 1/4 of the batch",
                 {"block": "acb", "sub_batch": 0.25}, "acb_sub4"),
    "sub8": Form("sub-batch ACNet, statistics from 1/8 of the batch",
                 {"block": "acb", "sub_batch": 0.125}, "acb_sub8"),
    "online": Form("online ACNet (branch scales, one BN)",
                   {"block": "acb", "branch_bn": False, "branch_scale": True}, "acb_online"),
}
SHORT_LABELS = {BASE: "baseline", ACNET: "ACNet", "sub4": "sub-batch 1/4",
                "sub8": "sub-batch 1/8", "online": "online"}


@dataclass(frozen=True)
class CheapStudy:
    """The study's settings: models and their epochs (the cpu preset's recipe, a third of its
    main schedule), seeds, and the benchmark that measures each form's cost."""

    dataset: str = "fashion-mnist"
    epochs: dict[str, int] = field(default_factory=lambda: {
        "cifar_quick": 10, "vgg16_quarter": 7, "resnet20": 7})
    seeds: tuple[int, ...] = (0, 1, 2)
    batch_size: int = 128
    train_limit: int | None = None  # None: every training image (tests use fewer)
    test_limit: int | None = None
    bench_repeats: int = 10
    bench_warmup: int = 2

    def run_name(self, model: str, form: str, seed: int, epochs: int | None = None) -> str:
        """``resnet20-sub4-s0`` (the model's epochs) or ``resnet20-sub4-e5-s0`` (other epochs)."""
        tag = "" if epochs is None or epochs == self.epochs[model] else f"-e{epochs}"
        return f"{model}-{form}{tag}-s{seed}"

    def equal_compute_epochs(self, model: str, ratio: float) -> int:
        """The epochs a form whose step costs ``ratio`` baseline steps trains at the baseline's
        compute: the baseline's epochs / ratio, rounded, at least 1."""
        return max(1, round(self.epochs[model] / ratio))


CHEAP = CheapStudy()


def measure_costs(study: CheapStudy, out: Path, threads: int) -> dict[str, dict[str, float]]:
    """model -> form -> training-step time relative to the baseline, measured now with
    ``threads`` torch threads (as each study run trains) and kept in ``out/cost_bench.json``; a
    study that resumes reads the file, so its run matrix does not change."""
    path = out / COST_BENCH
    if path.is_file():
        data = json.loads(path.read_text())
        if set(data.get("ratios", {})) >= set(study.epochs):
            return data["ratios"]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        rows = {m: bench_training(m, torch.device("cpu"), study.batch_size, study.bench_repeats,
                                  study.bench_warmup, in_channels=1, image=28)
                for m in study.epochs}
    finally:
        torch.set_num_threads(before)
    ratios = {m: {slug: r["ratio"][f.bench] for slug, f in FORMS.items()}
              for m, r in rows.items()}
    save_json(path, {"machine": machine(), "threads": threads, "batch": study.batch_size,
                     "repeats": study.bench_repeats, "ratios": ratios,
                     "ms": {m: r["ms"] for m, r in rows.items()}})
    return ratios


@dataclass(frozen=True)
class Planned:
    """One run of the study: its job, model, form, epochs and seed."""

    job: Job
    model: str
    form: str
    epochs: int
    seed: int


def planned(study: CheapStudy, costs: dict[str, dict[str, float]],
            seeds: tuple[int, ...] | None = None) -> list[Planned]:
    """Every run, by priority: per model (in the study's order), every form at equal epochs over
    the seeds, then every cheaper form at equal compute (where that is other epochs)."""
    seeds = seeds or study.seeds
    out: list[Planned] = []
    for model, epochs in study.epochs.items():
        common = {"model": model, "dataset": study.dataset, "quiet": True,
                  "batch_size": study.batch_size, "train_limit": study.train_limit,
                  "test_limit": study.test_limit}
        runs = [(s, slug, epochs) for s in seeds for slug in FORMS]
        runs += [(s, slug, e) for s in seeds for slug in FORMS
                 if (e := study.equal_compute_epochs(model, costs[model][slug])) != epochs]
        for s, slug, e in runs:
            job = Job(study.run_name(model, slug, s, e),
                      {**common, **FORMS[slug].options, "epochs": e, "seed": s})
            out.append(Planned(job, model, slug, e, s))
    return out


def jobs(study: CheapStudy, costs: dict[str, dict[str, float]],
         seeds: tuple[int, ...] | None = None) -> list[Job]:
    """The jobs of ``planned``, in its order."""
    return [p.job for p in planned(study, costs, seeds)]


# ------------------------------------------------------------------------ results
@dataclass
class RunResult:
    """What the report needs of one finished run."""

    name: str
    seed: int
    epochs: int
    test_acc: float  # deployed model
    max_abs_diff_deploy: float
    prediction_agreement: float
    seconds: float


@dataclass
class CheapResults:
    """The finished runs: (model, form, epochs) -> runs over seeds; and the measured costs."""

    study: CheapStudy
    costs: dict[str, dict[str, float]]
    runs: dict[tuple[str, str, int], list[RunResult]]
    pending: list[str]
    command: str

    def accs(self, model: str, form: str, epochs: int | None = None) -> dict[int, float]:
        e = self.study.epochs[model] if epochs is None else epochs
        return {r.seed: r.test_acc for r in self.runs.get((model, form, e), [])}

    def gain(self, model: str, form: str, epochs: int | None = None) -> Comparison:
        """``form`` (at ``epochs``, default the model's) against the baseline's full schedule."""
        return compare(self.accs(model, BASE), self.accs(model, form, epochs))

    def share(self, model: str, form: str) -> float | None:
        """The form's gain as a share of ACNet's, at equal epochs (None without a positive
        ACNet gain or without runs)."""
        acb, f = self.gain(model, ACNET), self.gain(model, form)
        if not acb.paired or not f.paired or not acb.gain > 0:
            return None
        return f.gain / acb.gain


def _result(run: RunDir, seed: int) -> RunResult | None:
    m = run.read_metrics() if run.path.is_dir() else None
    if m is None:
        return None
    return RunResult(run.path.name, seed, m["epochs"], m["deployed_test_acc"],
                     m["max_abs_diff_deploy"], m["prediction_agreement"], m["seconds"])


def collect(study: CheapStudy, out: Path, costs: dict[str, dict[str, float]],
            seeds: tuple[int, ...] | None = None, command: str = "") -> CheapResults:
    """The finished runs of the study in ``out/runs``; the others are pending."""
    runs: dict[tuple[str, str, int], list[RunResult]] = {}
    pending = []
    for p in planned(study, costs, seeds):
        r = _result(RunDir(out / "runs" / p.job.name), p.seed)
        if r is None:
            pending.append(p.job.name)
        else:
            runs.setdefault((p.model, p.form, p.epochs), []).append(r)
    return CheapResults(study, costs, runs, pending, command)


def to_json(res: CheapResults) -> dict[str, Any]:
    """results.json: the settings, the costs, every run's numbers, what is pending."""
    st = res.study
    return {
        "study": "cheap", "command": res.command,
        "settings": {"dataset": st.dataset, "epochs": st.epochs, "seeds": list(st.seeds),
                     "batch_size": st.batch_size,
                     "forms": {k: f.options for k, f in FORMS.items()}},
        "costs": res.costs,
        "runs": {f"{m}/{form}/e{e}": [vars(r) for r in rs]
                 for (m, form, e), rs in sorted(res.runs.items())},
        "pending": res.pending,
        "machine": machine(), "python": platform.python_version(), "torch": torch.__version__,
    }


def _verdict(c: Comparison) -> str:
    return {"yes, better": "better, beyond seed noise", "yes, worse": "worse, beyond seed noise",
            "no": "within seed noise", "n/a": "n/a (fewer than 2 seeds)"}[c.verdict]


def _per_seed(c: Comparison) -> str:
    return ", ".join(signed(d) for d in c.paired.values()) or "—"


def _epochs_table(res: CheapResults, model: str) -> list[str]:
    """Every form at the model's epochs: cost, accuracy, gain, share of ACNet's gain."""
    rows = []
    for slug in FORMS:
        accs = res.accs(model, slug)
        c = res.gain(model, slug)
        share = res.share(model, slug) if slug not in (BASE, ACNET) else None
        rows.append([SHORT_LABELS[slug], f"{res.costs[model][slug]:.2f}x",
                     pm(list(accs.values())),
                     "—" if slug == BASE else f"{signed(c.gain)} ({_per_seed(c)})",
                     "100 %" if slug == ACNET and c.paired and c.gain > 0 else
                     ("—" if share is None else f"{100 * share:.0f} %"),
                     "—" if slug == BASE else _verdict(c)])
    return markdown_table(["form", "step cost", "test acc. (%)", "gain (per seed)",
                           "share of ACNet's gain", "vs baseline"], rows)


def _compute_table(res: CheapResults, model: str) -> list[str]:
    """Every form given the baseline's training compute, against the baseline."""
    e0 = res.study.epochs[model]
    rows = []
    for slug in FORMS:
        if slug == BASE:
            continue
        ratio = res.costs[model][slug]
        e = res.study.equal_compute_epochs(model, ratio)
        c = res.gain(model, slug, e)
        rows.append([SHORT_LABELS[slug], f"{e}", f"{e * ratio / e0:.2f}",
                     pm(list(res.accs(model, slug, e).values())),
                     f"{signed(c.gain)} ({_per_seed(c)})" if c.paired else "—",
                     _verdict(c) if c.paired else "pending"])
    return markdown_table(["form", "epochs", "compute used (baseline = 1)", "test acc. (%)",
                           "gain over the baseline", "vs baseline"], rows)


def _answer(res: CheapResults) -> str:
    """The study's result in plain words (the report's first lines)."""
    parts = []
    for model in res.study.epochs:
        acb = res.gain(model, ACNET)
        if len(acb.paired) < 2:
            continue
        best = None
        for slug in ("sub8", "sub4", "online"):
            share = res.share(model, slug)
            eq = res.gain(model, slug, res.study.equal_compute_epochs(
                model, res.costs[model][slug]))
            if share is not None and eq.paired and (best is None or eq.gain > best[2].gain):
                best = (slug, share, eq)
        text = f"{model}: ACNet {signed(acb.gain)} points at {res.costs[model][ACNET]:.2f}x " \
               f"the step ({_verdict(acb)})"
        if best:
            slug, share, eq = best
            text += (f"; best at equal compute: {SHORT_LABELS[slug]} "
                     f"({res.costs[model][slug]:.2f}x, {100 * share:.0f} % of ACNet's gain at "
                     f"equal epochs, {signed(eq.gain)} at the baseline's compute: "
                     f"{_verdict(eq)})")
        parts.append(text)
    if not parts:
        return "No model has finished baseline and ACNet runs on two seeds yet."
    return "; ".join(parts) + "."


def _figure(res: CheapResults, path: Path) -> bool:
    """Gain over the baseline against step cost, per model (each form a point, its seeds
    dots)."""
    from ..analysis import plots

    panels: dict[str, dict[str, dict[str, Any]]] = {}
    for model in res.study.epochs:
        lines = {}
        for slug in FORMS:
            c = res.gain(model, slug)
            if slug != BASE and c.paired:
                lines[SHORT_LABELS[slug]] = {"x": [res.costs[model][slug]],
                                             "mean": [100 * c.gain],
                                             "seeds": [[100 * d for d in c.paired.values()]]}
        if lines:
            panels[f"{model}, {res.study.epochs[model]} epochs"] = lines
    if not panels:
        return False
    plots.gain_panels(panels, path, xlabel="training step cost (baseline = 1)")
    return True


def report(res: CheapResults, out: Path) -> Path:
    """Write ``out/report.md`` (and the figure) from the results."""
    st = res.study
    n = sum(len(v) for v in res.runs.values())
    lines = [
        "# Cheap ACNet: the gain kept against the training cost", "",
        f"**In short:** {_answer(res)}", "",
        f"Fashion-MNIST (60,000 training images), the cpu preset's recipe (SGD momentum 0.9, "
        f"batch {st.batch_size}, lr 0.1, weight decay 1e-4, cosine, random crop and flip) on "
        f"{', '.join(f'{m} {e} epochs' for m, e in st.epochs.items())}, seeds "
        f"{', '.join(map(str, st.seeds))}; test accuracy of the deployed models. Step cost: "
        f"the training step (forward, backward, SGD) relative to the baseline's, measured by "
        f"`acnet bench`'s training benchmark at batch {st.batch_size} on this machine with "
        f"the threads each run had ({COST_BENCH}). A gain is beyond seed noise when it "
        f"exceeds twice its standard error.", "",
        f"Command: `{res.command}`", "",
        f"{n} runs finished" + (f", {len(res.pending)} pending." if res.pending else "."), ""]
    if _figure(res, out / FIGURE):
        lines += [f"![gain against cost]({FIGURE})", "",
                  "*Gain of each form over the baseline (points; dots: seeds) against its "
                  "training step cost, at equal epochs.*", ""]
    for model in st.epochs:
        lines += [f"## {model}", "", f"Equal epochs ({st.epochs[model]}):", "",
                  *_epochs_table(res, model), "",
                  f"Equal compute (each form trains for {st.epochs[model]} epochs divided by "
                  f"its step cost, rounded; compared with the baseline's {st.epochs[model]} "
                  f"epochs):", "", *_compute_table(res, model), ""]
    diffs = [r.max_abs_diff_deploy for rs in res.runs.values() for r in rs]
    agree = [r.prediction_agreement for rs in res.runs.values() for r in rs]
    if diffs:
        lines += ["## Deployment check", "",
                  f"Every run's deployed model (the stock architecture) against its trained "
                  f"model on the test set: largest output difference {max(diffs):.1e}, "
                  f"predictions identical on {min(agree):.2%} of the images or more.", ""]
    if res.pending:
        lines += ["## Pending runs", "", ", ".join(res.pending), ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def run(out: str | Path, *, workers: int = 1, device: str = "auto", data_dir: str | None = None,
        seeds: tuple[int, ...] | None = None, train_runs: bool = True, command: str = "",
        study: CheapStudy = CHEAP) -> Path:
    """Measure the forms' costs (once), train what is missing (unless ``train_runs`` is False),
    then write results and report."""
    out = Path(out)
    runs_dir = out / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    command = command or f"acnet reproduce --preset cheap --out {out}"
    if not train_runs and not (out / COST_BENCH).is_file():  # nothing started: no costs yet
        save_json(out / RESULTS, {"study": "cheap", "command": command, "runs": {},
                                  "pending": []})
        path = out / "report.md"
        path.write_text("# Cheap ACNet: the gain kept against the training cost\n\nNo finished "
                        "runs yet.\n")
        return path
    threads = max(1, torch.get_num_threads() // workers)
    costs = measure_costs(study, out, threads)
    if train_runs:
        train_jobs(jobs(study, costs, seeds), runs_dir, workers=workers,
                   overrides={"device": device, "data_dir": data_dir})
    res = collect(study, out, costs, seeds, command)
    save_json(out / RESULTS, to_json(res))
    return report(res, out)


def summary(out: str | Path) -> str:
    """The study's plain-words result, from its report."""
    data = json.loads((Path(out) / RESULTS).read_text())
    n = sum(len(v) for v in data["runs"].values())
    return f"cheap study: {n} runs finished, {len(data['pending'])} pending; see " \
           f"{Path(out) / 'report.md'}"
