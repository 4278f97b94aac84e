"""The run directory of the scene studies' own training loops (segmentation, detection):
settings checked against a run already there, resume from the last epoch's checkpoint, one
metrics line and one checkpoint per epoch."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import InputError
from ..io import append_json_line, atomic_write_bytes, load_checkpoint, save_checkpoint, save_json

__all__ = ["end_epoch", "open_run", "resume"]

CHECKPOINT = "checkpoint.pt"
METRICS_LINES = "metrics.jsonl"


def open_run(config: dict[str, Any], path: str | Path,
             threads: int | None = None) -> tuple[Path, dict[str, Any]]:
    """(run directory, its settings): ``config`` without the device, written to config.json;
    a run already there with other settings (``data_dir`` aside) is refused."""
    if threads:
        torch.set_num_threads(threads)
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    cfg = {k: v for k, v in config.items() if k != "device"}
    cfg_file = out / "config.json"
    if cfg_file.is_file():
        old = json.loads(cfg_file.read_text())
        diff = sorted(k for k in {*old, *cfg} - {"data_dir"} if old.get(k) != cfg.get(k))
        if diff:
            raise InputError(f"{out} holds a run with other settings ({', '.join(diff)}); use "
                             f"another directory")
    save_json(cfg_file, cfg)
    return out, cfg


def resume(out: Path, model: nn.Module, opt: torch.optim.Optimizer,
           sched: Any = None) -> tuple[int, float]:
    """(epochs done, training seconds so far): model, optimizer, scheduler and RNG restored from
    the checkpoint if there is one; metrics lines past it (a crash between the two writes) are
    dropped."""
    start, seconds = 0, 0.0
    ckpt = out / CHECKPOINT
    if ckpt.is_file():
        state = load_checkpoint(ckpt)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        if sched is not None:
            sched.load_state_dict(state["scheduler"])
        start, seconds = state["epoch"], state["seconds"]
        torch.set_rng_state(state["rng"])
    lines = out / METRICS_LINES
    kept = lines.read_text().splitlines()[:start] if lines.is_file() else []
    atomic_write_bytes(lines, "".join(ln + "\n" for ln in kept).encode())
    return start, seconds


def end_epoch(out: Path, row: dict[str, Any], model: nn.Module, opt: torch.optim.Optimizer,
              sched: Any = None) -> None:
    """Append the epoch's metrics line (``row`` has ``epoch`` and ``seconds``), then write the
    checkpoint to resume after it."""
    append_json_line(out / METRICS_LINES, row)
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": row["epoch"],
             "seconds": row["seconds"], "rng": torch.get_rng_state()}
    if sched is not None:
        state["scheduler"] = sched.state_dict()
    save_checkpoint(out / CHECKPOINT, state)
