"""Training a study's runs: resumable, several at a time in fresh processes, in priority order,
each starting once the runs it depends on (e.g. its source model) have finished."""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError
from ..train import RunDir, TrainConfig, train
from ..train.progress import StudyProgress

log = logging.getLogger(__name__)

__all__ = ["PROGRESS_LOG", "Job", "train_jobs", "train_one"]

PROGRESS_LOG = "progress.log"  # beside the study's runs/: its progress lines, appended


@contextlib.contextmanager
def _progress_log(path: Path) -> Iterator[None]:
    """Copy the study's progress lines (and the runner's) into ``path`` while it trains."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    loggers = [logging.getLogger("acnet.progress"), log]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        if lg.getEffectiveLevel() > logging.INFO:
            lg.setLevel(logging.INFO)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.removeHandler(handler)
            lg.setLevel(level)
        handler.close()


@dataclass
class Job:
    """One run to train: its directory name, its TrainConfig fields, and the runs it needs."""

    name: str
    config: dict[str, Any]
    after: tuple[str, ...] = field(default_factory=tuple)


def train_one(config: dict[str, Any], path: str, threads: int | None) -> str:
    """Train (or resume) one run; in a worker process, with ``threads`` torch threads."""
    if threads:
        torch.set_num_threads(threads)
    run = RunDir(path)
    train(TrainConfig(**config), run.path, resume=run.started)
    return path


def train_jobs(jobs: list[Job], runs_dir: Path, *, workers: int = 1,
               overrides: dict[str, Any] | None = None,
               trainer: Callable[[dict[str, Any], str, int | None], str] = train_one,
               progress_interval: float = 5.0) -> int:
    """Train every unfinished job under ``runs_dir`` (interrupted ones resume), ``workers`` at a
    time, in the order given, each once its ``after`` runs are finished; returns how many ran.

    ``overrides`` (device, data_dir...) go into every config; ``trainer(config, path,
    threads)`` trains one run (default: ``acnet train``; a module-level function, so worker
    processes can import it). The first failure stops the study: finished runs stay finished,
    interrupted ones resume next time. Progress (runs finished, each running run's epoch, the
    time left) goes to a bar on a terminal and to the ``acnet.progress`` log every
    ``progress_interval`` seconds when it changed.
    """
    names = {j.name for j in jobs}
    todo = [j for j in jobs if not RunDir(runs_dir / j.name).finished]
    for j in todo:
        missing = [a for a in j.after if a not in names]
        if missing:
            raise InputError(f"run {j.name} needs {missing}, which the study does not have")
    log.info("%d of %d runs to train%s", len(todo), len(jobs),
             f", {workers} at a time" if workers > 1 and todo else "")
    t0 = time.perf_counter()
    config = {j.name: {**j.config, **(overrides or {})} for j in todo}
    epochs = {j.name: int(j.config.get("epochs") or 1) for j in jobs}
    with _progress_log(runs_dir.parent / PROGRESS_LOG), \
            StudyProgress(runs_dir, epochs, interval=progress_interval):
        if workers == 1:
            for i, j in enumerate(todo, 1):
                log.info("[%d/%d] %s", i, len(todo), j.name)
                trainer(config[j.name], str(runs_dir / j.name), None)
        elif todo:
            _parallel(todo, config, runs_dir, workers, trainer)
    log.info("%d runs trained in %.0f s", len(todo), time.perf_counter() - t0)
    return len(todo)


def _parallel(todo: list[Job], config: dict[str, dict[str, Any]], runs_dir: Path,
              workers: int, trainer: Callable[[dict[str, Any], str, int | None], str]) -> None:
    """Fresh worker processes sharing the CPU threads; a job starts when its inputs exist."""
    threads = max(1, torch.get_num_threads() // workers)
    ctx = multiprocessing.get_context("spawn")
    waiting = list(todo)
    running: dict[Future, str] = {}
    done = 0
    # a fresh process per run: no state (threads, allocator, imported code) carries over
    # (Python 3.10 has no max_tasks_per_child: its workers are reused between runs)
    fresh: dict[str, Any] = {"max_tasks_per_child": 1} if sys.version_info >= (3, 11) else {}
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, **fresh) as pool:
        try:
            while waiting or running:
                ready = [j for j in waiting
                         if all(RunDir(runs_dir / a).finished for a in j.after)]
                for j in ready[:workers - len(running)]:
                    waiting.remove(j)
                    running[pool.submit(trainer, config[j.name], str(runs_dir / j.name),
                                        threads)] = j.name
                if not running:
                    raise InputError(f"runs {[j.name for j in waiting]} wait for runs that did "
                                     f"not finish")
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for fut in finished:
                    fut.result()
                    done += 1
                    log.info("[%d/%d] %s finished", done, len(todo), running.pop(fut))
        except BaseException:
            for f in running:
                f.cancel()
            raise
