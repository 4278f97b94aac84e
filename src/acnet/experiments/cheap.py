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

import dataclasses
import json
import logging
import platform
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .._env import machine
from .._files import save_json
from ..bench import bench_training
from ..train import RunDir
from .runner import Job, train_jobs
from .stats import Comparison, compare, markdown_table, mean_std, pm, signed

log = logging.getLogger(__name__)

__all__ = ["CHEAP", "FORMS", "CheapStudy", "Form", "Planned", "collect", "jobs", "planned",
           "report", "run", "summary"]

RESULTS = "results.json"
COST_BENCH = "cost_bench.json"
FIGURE = "gain_vs_cost.png"
CURVES = "curves.png"
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
    forms: tuple[str, ...] = tuple(FORMS)  # the baseline first
    # "form": each form trains the baseline's epochs / its cost (DESIGN); "baseline": the
    # baseline trains each form's epochs x its cost (the baseline given the form's time)
    equal_compute: str = "form"
    options: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields of every run
    name: str = "cheap"
    in_channels: int = 1  # the benchmark's input: the dataset's images
    image: int = 28

    def run_name(self, model: str, form: str, seed: int, epochs: int | None = None) -> str:
        """``resnet20-sub4-s0`` (the model's epochs) or ``resnet20-sub4-e5-s0`` (other epochs);
        ``tv:resnet18`` is ``tv_resnet18`` in a directory name."""
        tag = "" if epochs is None or epochs == self.epochs[model] else f"-e{epochs}"
        return f"{re.sub(r'[^A-Za-z0-9_.-]', '_', model)}-{form}{tag}-s{seed}"

    def equal_compute_epochs(self, model: str, ratio: float) -> int:
        """The epochs of the equal-compute run of a form whose step costs ``ratio`` baseline
        steps: the form's at the baseline's compute (epochs / ratio), or the baseline's at the
        form's (epochs x ratio), rounded, at least 1."""
        e = self.epochs[model]
        return max(1, round(e * ratio if self.equal_compute == "baseline" else e / ratio))

    def compute_run(self, model: str, form: str, ratio: float) -> tuple[str, int]:
        """(form, epochs) of the run ``form`` is compared with at equal compute."""
        e = self.equal_compute_epochs(model, ratio)
        return (BASE, e) if self.equal_compute == "baseline" else (form, e)


CHEAP = CheapStudy()


def measure_costs(study: CheapStudy, out: Path, threads: int, device: str = "cpu"
                  ) -> dict[str, dict[str, float]]:
    """model -> form -> training-step time relative to the baseline, measured now on
    ``device`` with ``threads`` torch threads (as each study run trains) at the study's batch
    and image size, and kept in ``out/cost_bench.json``; a study that resumes reads the file,
    so its run matrix does not change."""
    path = out / COST_BENCH
    if path.is_file():
        data = json.loads(path.read_text())
        ratios = data.get("ratios", {})
        if set(ratios) >= set(study.epochs) and all(
                set(ratios[m]) >= set(study.forms) for m in study.epochs):
            return ratios
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       "cpu" if device == "auto" else device)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        rows = {m: bench_training(m, dev, study.batch_size, study.bench_repeats,
                                  study.bench_warmup, in_channels=study.in_channels,
                                  image=study.image)
                for m in study.epochs}
    finally:
        torch.set_num_threads(before)
    ratios = {m: {slug: r["ratio"][FORMS[slug].bench] for slug in study.forms}
              for m, r in rows.items()}
    save_json(path, {"machine": machine(), "device": str(dev), "threads": threads,
                     "batch": study.batch_size, "input": [study.in_channels, study.image,
                                                          study.image],
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
        common = {**study.options, "model": model, "dataset": study.dataset, "quiet": True,
                  "batch_size": study.batch_size, "train_limit": study.train_limit,
                  "test_limit": study.test_limit}
        runs = [(s, slug, epochs) for s in seeds for slug in study.forms]
        extra = [study.compute_run(model, slug, costs[model][slug]) for slug in study.forms
                 if slug != BASE]
        runs += [(s, slug, e) for s in seeds for slug, e in dict.fromkeys(extra)
                 if e != epochs]
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
        """The form's gain as a share of ACNet's, at equal epochs (None without runs, or when
        ACNet's own gain is not beyond seed noise: a share of noise means nothing)."""
        acb, f = self.gain(model, ACNET), self.gain(model, form)
        if not f.paired or acb.verdict != "yes, better":
            return None
        return f.gain / acb.gain

    def compute_gain(self, model: str, form: str) -> tuple[Comparison, int]:
        """``form`` against the baseline at equal compute, and the epochs of the run that
        equalises it (the form's, or the baseline's in a study that lengthens the baseline)."""
        slug, e = self.study.compute_run(model, form, self.costs[model][form])
        if slug == BASE:
            return compare(self.accs(model, BASE, e), self.accs(model, form)), e
        return self.gain(model, form, e), e

    def curves(self, model: str, form: str, out: Path) -> dict[str, Any] | None:
        """Test accuracy per epoch of ``form`` at the model's epochs: mean and std over its
        finished runs (None without any)."""
        rows = [RunDir(out / "runs" / r.name).metrics_lines()
                for r in self.runs.get((model, form, self.study.epochs[model]), [])]
        per_run = [{int(x["epoch"]): x["test_acc"] for x in rs if "test_acc" in x}
                   for rs in rows if rs]
        if not per_run:
            return None
        epochs = sorted(set.intersection(*(set(c) for c in per_run)))
        stats = [mean_std([c[e] for c in per_run]) for e in epochs]
        return {"epochs": epochs, "mean": [m for m, _ in stats], "std": [v for _, v in stats]}


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


def to_json(res: CheapResults, bench_machine: dict[str, Any]) -> dict[str, Any]:
    """results.json: the settings, the costs and the machine that measured them, every run's
    numbers, what is pending."""
    st = res.study
    return {
        "study": st.name, "command": res.command,
        "settings": {"dataset": st.dataset, "epochs": st.epochs, "seeds": list(st.seeds),
                     "batch_size": st.batch_size, "equal_compute": st.equal_compute,
                     "options": st.options,
                     "forms": {k: FORMS[k].options for k in st.forms}},
        "costs": res.costs,
        "runs": {f"{m}/{form}/e{e}": [vars(r) for r in rs]
                 for (m, form, e), rs in sorted(res.runs.items())},
        "pending": res.pending,
        "machine": bench_machine, "python": platform.python_version(), "torch": torch.__version__,
    }


def _verdict(c: Comparison) -> str:
    return {"yes, better": "better, beyond seed noise", "yes, worse": "worse, beyond seed noise",
            "no": "within seed noise", "n/a": "n/a (fewer than 2 seeds)"}[c.verdict]


def _acc(xs: list[float]) -> str:
    """Test accuracy in percent: mean ± std over seeds, or the one seed's value, said so."""
    return f"{100 * xs[0]:.2f} (one seed)" if len(xs) == 1 else pm(xs)


def _per_seed(c: Comparison) -> str:
    return ", ".join(signed(d) for d in c.paired.values()) or "—"


def _epochs_table(res: CheapResults, model: str) -> list[str]:
    """Every form at the model's epochs: cost, accuracy, gain, share of ACNet's gain."""
    rows = []
    for slug in res.study.forms:
        accs = res.accs(model, slug)
        c = res.gain(model, slug)
        share = res.share(model, slug) if slug not in (BASE, ACNET) else None
        rows.append([SHORT_LABELS[slug], f"{res.costs[model][slug]:.2f}x",
                     _acc(list(accs.values())),
                     "—" if slug == BASE else f"{signed(c.gain)} ({_per_seed(c)})",
                     "100 %" if slug == ACNET and c.verdict == "yes, better" else
                     ("—" if share is None else f"{100 * share:.0f} %"),
                     "—" if slug == BASE else _verdict(c)])
    headers = ["form", "step cost", "test acc. (%)", "gain (per seed)", "share of ACNet's gain",
               "vs baseline"]
    if ACNET not in res.study.forms:
        headers, rows = headers[:4] + headers[5:], [r[:4] + r[5:] for r in rows]
    lines = markdown_table(headers, rows)
    acb = res.gain(model, ACNET)
    if ACNET in res.study.forms and len(acb.paired) >= 2 and acb.verdict != "yes, better":
        lines += ["", "ACNet's own gain is not beyond seed noise here, so no share of it is "
                  "given (a share of noise means nothing)."]
    return lines


def _compute_table(res: CheapResults, model: str) -> list[str]:
    """Every form against the baseline at equal training compute."""
    e0 = res.study.epochs[model]
    lengthen = res.study.equal_compute == "baseline"
    rows = []
    for slug in res.study.forms:
        if slug == BASE:
            continue
        ratio = res.costs[model][slug]
        c, e = res.compute_gain(model, slug)
        accs = res.accs(model, BASE, e) if lengthen else res.accs(model, slug, e)
        gain = f"{signed(c.gain)} ({_per_seed(c)})" if c.paired else "—"
        verdict = _verdict(c) if c.paired else "pending"
        if lengthen:
            rows.append([SHORT_LABELS[slug], f"{ratio:.2f}x", f"{e}", f"{e / (e0 * ratio):.2f}",
                         _acc(list(accs.values())), gain, verdict])
        else:
            rows.append([SHORT_LABELS[slug], f"{e}", f"{e * ratio / e0:.2f}",
                         _acc(list(accs.values())), gain, verdict])
    if lengthen:
        return markdown_table(["form", "its step cost", "baseline epochs at its compute",
                               "baseline's compute (the form's = 1)",
                               "baseline test acc. (%)", "form's gain over it", "form vs it"],
                              rows)
    return markdown_table(["form", "epochs", "compute used (baseline = 1)", "test acc. (%)",
                           "gain over the baseline", "vs baseline"], rows)


def _best_at_compute(res: CheapResults, model: str, forms: tuple[str, ...]
                     ) -> tuple[str, Comparison, int] | None:
    """The form with the largest gain over the baseline at equal compute (finished runs)."""
    best = None
    for slug in forms:
        c, e = res.compute_gain(model, slug)
        if c.paired and (best is None or c.gain > best[1].gain):
            best = (slug, c, e)
    return best


def _answer_cheap(res: CheapResults) -> str:
    """The cheap study's result in plain words (the report's first lines)."""
    parts = []
    for model in res.study.epochs:
        acb = res.gain(model, ACNET)
        if len(acb.paired) < 2:
            continue
        text = f"{model}: ACNet {signed(acb.gain)} points at {res.costs[model][ACNET]:.2f}x " \
               f"the step ({_verdict(acb)})"
        cheaper = tuple(f for f in res.study.forms if f not in (BASE, ACNET))
        best = _best_at_compute(res, model, cheaper)
        if best:
            slug, eq, _ = best
            share = res.share(model, slug)
            kept = "" if share is None else \
                f", {100 * share:.0f} % of ACNet's gain at equal epochs"
            what = (f"{SHORT_LABELS[slug]} at {res.costs[model][slug]:.2f}x the step{kept}; "
                    f"{signed(eq.gain)} at the baseline's compute, {_verdict(eq)}")
            text += (f"; best at equal compute: {what}" if eq.verdict == "yes, better" else
                     f"; at the baseline's compute no cheaper form beats it beyond seed noise "
                     f"(closest: {what})")
        parts.append(text)
    if not parts:
        return "No model has finished baseline and ACNet runs on two seeds yet."
    return "; ".join(parts) + "."


def _answer_compare(res: CheapResults) -> str:
    """The comparison's verdict in one sentence: does a form beat the baseline at equal epochs,
    and does it still when the baseline gets the same training time?"""
    model = next(iter(res.study.epochs))
    forms = tuple(f for f in res.study.forms if f != BASE)
    done = [f for f in forms if len(res.gain(model, f).paired) >= 2]
    if not done:
        return "No answer yet: the baseline and a form need finished runs on two seeds."
    gains = {f: res.gain(model, f) for f in done}
    better = [f for f in done if gains[f].verdict == "yes, better"]
    if not better:
        best = max(done, key=lambda f: gains[f].gain)
        return (f"No: on this model and data no form beats the baseline beyond seed noise at "
                f"equal epochs (best: {SHORT_LABELS[best]} {signed(gains[best].gain)} points, "
                f"{_verdict(gains[best])}), so train the plain model.")
    top = max(better, key=lambda f: gains[f].gain)
    eq, e = res.compute_gain(model, top)
    cost = res.costs[model][top]
    head = (f"{SHORT_LABELS[top]} beats the baseline by {signed(gains[top].gain)} points at "
            f"equal epochs (beyond seed noise) at {cost:.2f}x its training step")
    if not eq.paired:
        return f"Yes at equal epochs: {head}; the equal-compute runs are still pending."
    if eq.verdict == "yes, better":
        return (f"Yes: {head}, and it is still better ({signed(eq.gain)}) than the baseline "
                f"trained for the same time ({e} epochs).")
    if eq.verdict == "yes, worse":
        return (f"Only if training time is free: {head}, but the baseline trained for the same "
                f"time ({e} epochs) is better ({signed(-eq.gain)} points, beyond seed noise).")
    return (f"Yes at equal epochs, a draw at equal compute: {head}; against the baseline "
            f"trained for the same time ({e} epochs) it is {signed(eq.gain)} points, "
            f"within seed noise.")


def _figures(res: CheapResults, out: Path) -> list[str]:
    """The gain-against-cost figure and the training curves; their report lines."""
    from ..analysis import plots

    lines: list[str] = []
    panels: dict[str, dict[str, dict[str, Any]]] = {}
    for model in res.study.epochs:
        points = {}
        for slug in res.study.forms:
            c = res.gain(model, slug)
            if slug != BASE and c.paired:
                points[SHORT_LABELS[slug]] = {"x": [res.costs[model][slug]],
                                              "mean": [100 * c.gain],
                                              "seeds": [[100 * d for d in c.paired.values()]]}
        if points:
            panels[f"{model}, {res.study.epochs[model]} epochs"] = points
    if panels:
        plots.gain_panels(panels, out / FIGURE, xlabel="training step cost (baseline = 1)",
                          colours={SHORT_LABELS[s]: plots.VARIANT_COLOURS[s]
                                   for s in res.study.forms})
        lines += [f"![gain against cost]({FIGURE})", "",
                  "*Gain of each form over the baseline at equal epochs (points: mean over "
                  "seeds; dots: each seed) against its training step cost.*", ""]
    curves = {}
    for model in res.study.epochs:
        bands = {slug: b for slug in res.study.forms
                 if (b := res.curves(model, slug, out)) is not None}
        if bands:
            curves[f"{model}, {res.study.epochs[model]} epochs"] = bands
    if curves:
        plots.training_curves(curves, out / CURVES, labels=SHORT_LABELS)
        lines += [f"![test accuracy per epoch]({CURVES})", "",
                  "*Test accuracy after each epoch at equal epochs (line: mean over seeds; "
                  "band: ± one standard deviation).*", ""]
    return lines


def _intro(res: CheapResults, out: Path) -> list[str]:
    """What was trained, and how cost and noise are measured."""
    st = res.study
    cost = (f"Step cost: the training step (forward, backward, SGD) relative to the "
            f"baseline's, measured by `acnet bench`'s training benchmark at batch "
            f"{st.batch_size} on this machine with the threads each run had ({COST_BENCH}). "
            f"A gain is beyond seed noise when it exceeds twice its standard error.")
    if st.name == "cheap":
        return [f"Fashion-MNIST (60,000 training images), the cpu preset's recipe (SGD "
                f"momentum 0.9, batch {st.batch_size}, lr 0.1, weight decay 1e-4, cosine, "
                f"random crop and flip) on "
                f"{', '.join(f'{m} {e} epochs' for m, e in st.epochs.items())}, seeds "
                f"{', '.join(map(str, st.seeds))}; test accuracy of the deployed models. "
                f"{cost}"]
    model, epochs = next(iter(st.epochs.items()))
    opts = ", ".join(f"{k}={v}" for k, v in st.options.items()
                     if k not in ("mean", "std", "workers", "image_size", "data_dir"))
    return [f"{model} on {_data_words(res, out)} for {epochs} epochs, batch {st.batch_size}"
            + (f" ({opts})" if opts else "") + f", seeds {', '.join(map(str, st.seeds))}; "
            f"every form trains with the same recipe and seeds; test accuracy of the "
            f"deployed models (the stock architecture). {cost}"]


def _data_name(res: CheapResults) -> str:
    """``fashion-mnist``, or ``the images in DIRNAME/`` for a user's image folder."""
    data_dir = res.study.options.get("data_dir")
    return f"the images in {Path(data_dir).name}/" if data_dir else res.study.dataset


def _data_words(res: CheapResults, out: Path) -> str:
    """The dataset as its finished runs saw it: name, classes, images, image shape."""
    name = _data_name(res)
    for rs in res.runs.values():
        run = RunDir(out / "runs" / rs[0].name)
        try:
            cfg, m = run.read_config(), run.read_metrics() or {}
        except (OSError, ValueError):
            continue
        c, k, size = cfg.data_shape
        names = f": {', '.join(cfg.class_names[:12])}" + (
            ", ..." if len(cfg.class_names) > 12 else "") if cfg.class_names else ""
        train = f"{m['train_images']:,} training images, " if m.get("train_images") else ""
        return (f"{name} ({train}{k} classes{names}; {c}-channel {size}×{size} "
                f"inputs)")
    return name


def report(res: CheapResults, out: Path) -> Path:
    """Write ``out/report.md`` (and the figures) from the results."""
    st = res.study
    n = sum(len(v) for v in res.runs.values())
    title = ("Cheap ACNet: the gain kept against the training cost" if st.name == "cheap" else
             f"Does ACNet pay on {next(iter(st.epochs))} with {_data_name(res)}?")
    # the answer between snippet markers: the docs quote it from here (pymdownx.snippets)
    lines = [f"# {title}", "", "<!-- --8<-- [start:answer] -->", f"**In short:** {answer(res)}",
             "<!-- --8<-- [end:answer] -->", "", *_intro(res, out), "",
             f"Command: `{res.command}`", "",
             f"{n} runs finished" + (f", {len(res.pending)} pending." if res.pending else "."),
             "", *_figures(res, out)]
    for model in st.epochs:
        e0 = st.epochs[model]
        how = (f"the baseline trains for {e0} epochs times each form's step cost, rounded; "
               f"each form's {e0}-epoch runs are compared with it" if st.equal_compute ==
               "baseline" else f"each form trains for {e0} epochs divided by its step cost, "
               f"rounded; compared with the baseline's {e0} epochs")
        lines += [f"## {model}", "", f"Equal epochs ({e0}):", "", *_epochs_table(res, model),
                  "", f"Equal compute ({how}):", "", *_compute_table(res, model), ""]
    diffs = [r.max_abs_diff_deploy for rs in res.runs.values() for r in rs]
    agree = [r.prediction_agreement for rs in res.runs.values() for r in rs]
    if diffs:
        lines += ["## Deployment check", "",
                  f"Every run's deployed model (the stock architecture) against its trained "
                  f"model on the test set: largest output difference {max(diffs):.1e}, "
                  f"predictions identical on {min(agree):.2%} of the test images in the run "
                  f"that agreed least.", ""]
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
    if seeds:
        study = dataclasses.replace(study, seeds=tuple(seeds))
    runs_dir = out / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    command = command or f"acnet reproduce --preset {study.name} --out {out}"
    if not train_runs and not (out / COST_BENCH).is_file():  # nothing started: no costs yet
        save_json(out / RESULTS, {"study": study.name, "command": command, "runs": {},
                                  "pending": [], "answer": "No finished runs yet."})
        path = out / "report.md"
        path.write_text(f"# {study.name} study\n\nNo finished runs yet. The study has not "
                        "started: run it without --report-only.\n")
        return path
    threads = max(1, torch.get_num_threads() // workers)
    costs = measure_costs(study, out, threads, device)
    if train_runs:
        train_jobs(jobs(study, costs), runs_dir, workers=workers,
                   overrides={"device": device, "data_dir": data_dir})
    res = collect(study, out, costs, command=command)
    path = report(res, out)
    save_json(out / RESULTS, {**to_json(res, _bench_machine(out)), "answer": answer(res)})
    return path


def _bench_machine(out: Path) -> dict[str, Any]:
    """The machine that measured the costs (cost_bench.json), which a report-only rewrite on
    another machine must not replace; this one where the file does not name it."""
    try:
        kept = json.loads((out / COST_BENCH).read_text()).get("machine")
    except (OSError, ValueError, AttributeError):
        kept = None
    return kept if isinstance(kept, dict) else machine()


def answer(res: CheapResults) -> str:
    """The study's result in plain words."""
    return _answer_cheap(res) if res.study.name == "cheap" else _answer_compare(res)


def summary(out: str | Path) -> str:
    """The study's plain-words result, from its results."""
    data = json.loads((Path(out) / RESULTS).read_text())
    n = sum(len(v) for v in data["runs"].values())
    return (f"{data.get('study', 'cheap')} study: {n} runs finished, {len(data['pending'])} "
            f"pending.\n{data.get('answer', '')}\nSee {Path(out) / 'report.md'}")
