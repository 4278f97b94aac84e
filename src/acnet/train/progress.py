"""A per-epoch progress bar on a TTY; nothing per batch otherwise (epoch lines go to logging)."""

from __future__ import annotations

import sys
import time

__all__ = ["Progress"]


class Progress:
    """``with Progress(total, desc) as p: p.update(loss=..., acc=..., n=batch)``."""

    def __init__(self, total: int, desc: str, enabled: bool = True, stream=None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.total, self.desc = total, desc
        self.done = 0
        self.images = 0
        self.start = time.perf_counter()
        self.last = 0.0

    def __enter__(self) -> Progress:
        return self

    def update(self, n_images: int, **stats: float) -> None:
        self.done += 1
        self.images += n_images
        now = time.perf_counter()
        if not self.enabled or (now - self.last < 0.2 and self.done < self.total):
            return
        self.last = now
        width = 24
        filled = int(width * self.done / max(1, self.total))
        rate = self.images / max(now - self.start, 1e-9)
        parts = " ".join(f"{k} {v:.4f}" if k == "loss" else f"{k} {v:.3f}"
                         for k, v in stats.items())
        self.stream.write(f"\r{self.desc} [{'#' * filled}{'.' * (width - filled)}] "
                          f"{self.done}/{self.total} {parts} {rate:.0f} img/s")
        self.stream.flush()

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self.stream.write("\r\033[K")
            self.stream.flush()

    @property
    def images_per_second(self) -> float:
        return self.images / max(time.perf_counter() - self.start, 1e-9)
