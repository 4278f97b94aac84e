"""Progress of one epoch (a tqdm bar on a terminal) and of a whole study (a bar and log lines
with the runs finished, each running run's epoch and the time left)."""

from __future__ import annotations

import logging
import sys
import threading
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from .rundir import RunDir

__all__ = ["Progress", "StudyProgress"]

log = logging.getLogger("acnet.progress")


class Progress:
    """``with Progress(total, desc) as p: p.update(n_images, loss=..., acc=...)``: a tqdm bar
    per epoch on a terminal, nothing per batch otherwise (epoch lines go to logging)."""

    def __init__(self, total: int, desc: str, enabled: bool = True, stream: Any = None) -> None:
        stream = stream or sys.stderr
        self.enabled = enabled and hasattr(stream, "isatty") and stream.isatty()
        self.bar = tqdm(total=total, desc=desc, file=stream, leave=False, unit="batch",
                        disable=not self.enabled, dynamic_ncols=True)
        self.images = 0
        self.start = time.perf_counter()

    def __enter__(self) -> Progress:
        return self

    def update(self, n_images: int, **stats: float) -> None:
        self.images += n_images
        if self.enabled:
            self.bar.set_postfix({k: f"{v:.4f}" for k, v in stats.items()}, refresh=False)
            self.bar.update(1)

    def __exit__(self, *exc: Any) -> None:
        self.bar.close()

    @property
    def images_per_second(self) -> float:
        return self.images / max(time.perf_counter() - self.start, 1e-9)


def _lines(path: Path) -> int:
    """Complete lines of a run's metrics.jsonl (its finished epochs)."""
    try:
        return path.read_bytes().count(b"\n")
    except OSError:
        return 0


class StudyProgress:
    """Watch a study's run directories from a background thread while it trains.

    ``runs`` maps run name to its epochs. Every ``interval`` seconds the finished epochs are
    counted from each run's metrics.jsonl: a tqdm bar on a terminal (epochs of the whole study,
    with tqdm's estimate of the time left), and on every change one log line: runs finished,
    the running runs' epochs, and the time left at the rate measured since the start.
    """

    def __init__(self, runs_dir: Path, runs: dict[str, int], *, interval: float = 2.0,
                 stream: Any = None) -> None:
        self.runs_dir, self.runs, self.interval = runs_dir, runs, interval
        stream = stream or sys.stderr
        self.total = sum(runs.values())
        self.bar = tqdm(total=self.total, desc="study", unit="epoch", file=stream,
                        disable=not (hasattr(stream, "isatty") and stream.isatty()),
                        dynamic_ncols=True)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._start_done = self._done()[0]
        self._t0 = time.perf_counter()
        self._last = -1

    def _done(self) -> tuple[int, list[str], int]:
        """(epochs finished, 'name e/E' of the running runs, runs finished)."""
        done, running, finished = 0, [], 0
        for name, epochs in self.runs.items():
            d = RunDir(self.runs_dir / name)
            n = min(_lines(d.metrics_lines_file), epochs)
            if d.finished:
                n, finished = epochs, finished + 1
            elif d.config_file.is_file():
                running.append(f"{name} {n}/{epochs}")
            done += n
        return done, running, finished

    def line(self) -> str:
        """The progress as one line of text."""
        done, running, finished = self._done()
        rate = (done - self._start_done) / max(time.perf_counter() - self._t0, 1e-9)
        left = (self.total - done) / rate if rate > 0 else None
        eta = "unknown" if left is None else f"about {left / 60:.0f} min"
        return (f"study: {finished}/{len(self.runs)} runs finished, {done}/{self.total} epochs"
                f"{'; running ' + ', '.join(running) if running else ''}; left: {eta}")

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            self.poll()

    def poll(self, force: bool = False) -> None:
        """Update the bar; log a line when the finished epochs changed (or ``force``)."""
        done, _, _ = self._done()
        self.bar.update(done - self.bar.n)
        if done != self._last or force:
            self._last = done
            log.info("%s", self.line())

    def __enter__(self) -> StudyProgress:
        self.bar.update(self._start_done)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.poll(force=True)
        self.bar.close()
