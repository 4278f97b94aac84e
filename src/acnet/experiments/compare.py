"""`acnet reproduce --preset compare`: does ACNet pay on YOUR model and YOUR images?

The A/B study on anything acnet can train: the baseline and each chosen form (ACNet, its
cheaper sub-batch and online forms) with the same recipe and seeds, the cost of each form's
training step measured on this machine for this model and image size, and the baseline trained
for as long as each form took (equal compute). It is the cheap study's runner and report with
the user's model, data and recipe; rerunning it resumes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .._files import save_json
from ..data.datasets import STREAMED
from ..data.folder import FolderSpec
from ..errors import InputError
from ..train import TrainConfig
from ..train.config import resolve
from ..train.data import open_data
from . import cheap
from .cheap import BASE, FORMS, CheapStudy

__all__ = ["DEFAULT_EPOCHS", "DEFAULT_FORMS", "SETTINGS", "compare_study", "run", "summary"]

DEFAULT_FORMS = ("base", "acb", "sub4")
DEFAULT_EPOCHS = 10
SETTINGS = "compare.json"  # the comparison's settings: a rerun with other ones is refused
BENCH_REPEATS = 5
# TrainConfig fields a comparison may set (the forms set the block options themselves)
RECIPE_FIELDS = ("lr", "optimizer", "momentum", "nesterov", "weight_decay", "warmup_epochs",
                 "label_smoothing", "augment", "train_limit", "test_limit", "init_from",
                 "new_head", "branch_init", "image_size", "val_fraction", "mean", "std",
                 "amp", "channels_last", "classes")
SHOWN_LATER = {"mean", "std", "workers"}  # not quoted in the report's recipe line


def _forms(forms: Any) -> tuple[str, ...]:
    """The forms to compare, the baseline first (added when missing)."""
    if isinstance(forms, str):
        forms = [f.strip() for f in forms.split(",") if f.strip()]
    forms = tuple(forms)
    bad = [f for f in forms if f not in FORMS]
    if bad:
        raise InputError(f"unknown form(s) {', '.join(map(repr, bad))}; choose from "
                         f"{', '.join(FORMS)}", params=("forms",))
    out = (BASE, *dict.fromkeys(f for f in forms if f != BASE))
    if len(out) < 2:
        raise InputError(f"forms must name at least one form besides the baseline (e.g. "
                         f"{','.join(DEFAULT_FORMS)}), got {','.join(forms)}", params=("forms",))
    return out


def _loader_workers(workers: int) -> int:
    """DataLoader workers of each run of a streamed dataset: the CPUs left per run."""
    return max(0, min(4, (os.cpu_count() or 1) // workers - 1))


def compare_study(settings: dict[str, Any], *, data_dir: str | None = None, workers: int = 1
                  ) -> CheapStudy:
    """The study of ``settings`` (model, dataset, epochs, batch_size, seeds, forms and recipe
    fields), checked: every run's config is resolved now, and the data is opened once (a
    folder's mean and std go into every run, so no run measures them again)."""
    settings = dict(settings)
    model = settings.pop("model", None)
    if not model:
        raise InputError("the compare preset needs a model (--model), e.g. resnet20, "
                         "tv:resnet18 or timm:resnet18", params=("model",))
    dataset = settings.pop("dataset", None) or "fashion-mnist"
    epochs = settings.pop("epochs", None) or DEFAULT_EPOCHS
    batch_size = settings.pop("batch_size", None) or 128
    forms = _forms(settings.pop("forms", None) or DEFAULT_FORMS)
    seeds = tuple(settings.pop("seeds", None) or (0, 1, 2))
    unknown = sorted(set(settings) - set(RECIPE_FIELDS))
    if unknown:
        raise InputError(f"the compare preset does not take {', '.join(unknown)}; it takes "
                         f"{', '.join(RECIPE_FIELDS)}", params=tuple(unknown))
    options = {k: v for k, v in settings.items() if v is not None}
    limits = {k: options.pop(k, None) for k in ("train_limit", "test_limit")}
    base = TrainConfig(model=model, dataset=dataset, epochs=epochs, batch_size=batch_size,
                       data_dir=data_dir, workers=0, **limits, **options)
    for slug in forms:
        resolve(TrainConfig(**{**vars(base), **FORMS[slug].options}))
    data = open_data(resolve(TrainConfig(**{**vars(base), "block": "base"})))
    if isinstance(data, FolderSpec):
        channels, size = data.channels, data.image_size
        options.update(image_size=size, mean=list(data.mean), std=list(data.std))
    else:
        channels, size = data.shape[0], data.shape[1]
    if dataset in STREAMED:
        options["workers"] = _loader_workers(workers)
    if data_dir:
        options["data_dir"] = data_dir
    return CheapStudy(dataset=dataset, epochs={model: epochs}, seeds=seeds,
                      batch_size=batch_size, train_limit=limits["train_limit"],
                      test_limit=limits["test_limit"], bench_repeats=BENCH_REPEATS,
                      bench_warmup=1, forms=forms, equal_compute="baseline", options=options,
                      name="compare", in_channels=channels, image=size)


def _record(study: CheapStudy, data_dir: str | None) -> dict[str, Any]:
    """What makes a comparison the same one when it is rerun (not the seeds: more may come)."""
    return json.loads(json.dumps({
        "model": next(iter(study.epochs)), "dataset": study.dataset, "data_dir": data_dir,
        "epochs": next(iter(study.epochs.values())), "batch_size": study.batch_size,
        "forms": list(study.forms), "train_limit": study.train_limit,
        "test_limit": study.test_limit, "input": [study.in_channels, study.image],
        "seeds": list(study.seeds),
        "options": {k: v for k, v in study.options.items()
                    if k not in ("workers", "data_dir")}}))


def _from_record(rec: dict[str, Any], seeds: tuple[int, ...] | None) -> CheapStudy:
    """The study a kept record describes."""
    options = {**rec["options"], **({"data_dir": rec["data_dir"]} if rec.get("data_dir") else {})}
    return CheapStudy(dataset=rec["dataset"], epochs={rec["model"]: rec["epochs"]},
                      seeds=tuple(seeds or rec.get("seeds") or (0, 1, 2)),
                      batch_size=rec["batch_size"], train_limit=rec["train_limit"],
                      test_limit=rec["test_limit"], forms=tuple(rec["forms"]),
                      equal_compute="baseline", options=options, name="compare",
                      in_channels=rec["input"][0], image=rec["input"][1])


def _check_same(out: Path, record: dict[str, Any]) -> None:
    """Refuse to mix two comparisons' runs in one directory."""
    path = out / SETTINGS
    if not path.is_file():
        return
    try:
        kept = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if record.get("data_dir") is None or kept.get("data_dir") is None:
        kept["data_dir"] = record.get("data_dir")
    diff = {k: (kept.get(k), v) for k, v in record.items() if kept.get(k) != v and k != "seeds"}
    if diff:
        raise InputError(f"{out} holds a comparison with other settings ("
                         + "; ".join(f"{k}: {a!r}, now {b!r}" for k, (a, b) in diff.items())
                         + "); rerun with its settings, or choose another out directory",
                         params=("out",))


def run(out: str | Path, *, workers: int = 1, device: str = "auto", data_dir: str | None = None,
        seeds: tuple[int, ...] | None = None, train_runs: bool = True, command: str = "",
        settings: dict[str, Any] | None = None) -> Path:
    """Train what is missing of the comparison, then write its results and report.

    ``settings``: model, dataset, epochs, batch_size, forms and recipe fields (`RECIPE_FIELDS`);
    a report-only rewrite (``train_runs=False``) may leave them out and reads the kept ones.
    """
    out = Path(out)
    settings = dict(settings or {})
    if seeds:
        settings["seeds"] = seeds
    kept = out / SETTINGS
    if not train_runs and not settings.get("model") and kept.is_file():
        # a report-only rewrite of a comparison: its kept settings, no data opened
        study = _from_record(json.loads(kept.read_text()), seeds)
        return cheap.run(out, workers=workers, device=device, train_runs=False,
                         command=command, study=study)
    study = compare_study(settings, data_dir=data_dir, workers=workers)
    record = _record(study, data_dir)
    _check_same(out, record)
    out.mkdir(parents=True, exist_ok=True)
    save_json(kept, record)
    return cheap.run(out, workers=workers, device=device, data_dir=data_dir,
                     train_runs=train_runs, command=command, study=study)


summary = cheap.summary
