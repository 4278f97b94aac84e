"""The run directory: the one place that knows its file names and reads and writes them."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._files import (
    CheckpointError,
    append_json_line,
    atomic_write_bytes,
    json_text,
    load_checkpoint,
    save_checkpoint,
    save_json,
)
from ..errors import InputError
from ..io import save_deployed
from .config import TrainConfig

__all__ = ["RunDir", "RunDirError", "load_config"]

CONFIG = "config.json"
CHECKPOINT = "checkpoint.pt"
METRICS_LINES = "metrics.jsonl"
METRICS = "metrics.json"
DEPLOYED = "deployed.safetensors"
EXPORT = "export.json"
TENSORBOARD = "tb"
CACHES = ("robustness", "sparsity")  # analysis results kept beside a run (``<name>.json``)


class RunDirError(InputError):
    """The output directory cannot be used as asked (exists without resume, unwritable...)."""


def _write_json(path: Path, obj: Any) -> None:
    """Atomically write strict, indented JSON."""
    save_json(path, obj)


def _read_json(path: Path) -> Any:
    """Read JSON; a malformed file is a ValueError naming it."""
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"{path} is not valid JSON ({exc})") from exc


class RunDir:
    """One run on disk, of any kind (``acnet train``, the scene studies' own loops): config,
    checkpoint, metrics, deployed weights, export results, analysis caches."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # paths
    @property
    def config_file(self) -> Path:
        return self.path / CONFIG

    @property
    def checkpoint_file(self) -> Path:
        return self.path / CHECKPOINT

    @property
    def metrics_lines_file(self) -> Path:
        return self.path / METRICS_LINES

    @property
    def metrics_file(self) -> Path:
        return self.path / METRICS

    @property
    def deployed_file(self) -> Path:
        return self.path / DEPLOYED

    @property
    def export_file(self) -> Path:
        return self.path / EXPORT

    @property
    def tensorboard_dir(self) -> Path:
        return self.path / TENSORBOARD

    # state
    @property
    def started(self) -> bool:
        """A run was started here (it has a config or a checkpoint)."""
        return self.config_file.exists() or self.checkpoint_file.exists()

    @property
    def has_checkpoint(self) -> bool:
        return self.checkpoint_file.exists()

    @property
    def finished(self) -> bool:
        return self.metrics_file.is_file()

    def prepare(self) -> None:
        """Create the directory and check that it is writable."""
        if self.path.exists() and not self.path.is_dir():
            raise RunDirError(f"{self.path} exists and is not a directory", params=("out",))
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / ".write-test"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise RunDirError(f"cannot write to output directory {self.path}: "
                              f"{exc.strerror or exc}") from exc

    # config
    def read_settings(self) -> dict[str, Any]:
        """config.json as plain data; a missing file is FileNotFoundError, a malformed one an
        InputError naming it."""
        if not self.config_file.is_file():
            raise FileNotFoundError(f"{self.path} is not an acnet run directory (no {CONFIG})")
        data = _read_json(self.config_file)
        if not isinstance(data, dict):
            raise InputError(f"{self.config_file} is not a valid acnet config (a JSON object)")
        return data

    def read_config(self) -> TrainConfig:
        """config.json as a TrainConfig."""
        data = self.read_settings()
        try:
            return TrainConfig.from_dict(data)
        except TypeError as exc:
            raise InputError(f"{self.config_file} is not a valid acnet config ({exc})") from exc

    def open_settings(self, settings: dict[str, Any], ignore: Iterable[str] = ()) -> None:
        """Create the run with ``settings`` as its config.json; a run already here with other
        settings (the ``ignore`` names aside) is refused."""
        self.prepare()
        if self.config_file.is_file():
            old = self.read_settings()
            diff = sorted(k for k in {*old, *settings} - set(ignore)
                          if old.get(k) != settings.get(k))
            if diff:
                raise RunDirError(f"{self.path} holds a run with other settings "
                                  f"({', '.join(diff)}); use another directory",
                                  params=("out",))
        _write_json(self.config_file, settings)

    def write_config(self, cfg: TrainConfig) -> None:
        """Write config.json."""
        _write_json(self.config_file, json.loads(cfg.to_json()))

    # checkpoint
    def load_checkpoint(self, map_location: Any = "cpu") -> dict[str, Any]:
        """The last checkpoint; an empty, truncated or foreign file is a CheckpointError."""
        f = self.checkpoint_file
        if f.is_file() and f.stat().st_size == 0:
            raise CheckpointError(f"checkpoint {f} is corrupt or truncated (empty file)")
        return load_checkpoint(f, map_location=map_location)

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        """Atomically write checkpoint.pt."""
        save_checkpoint(self.checkpoint_file, state)

    # a training loop of one's own (the scene studies): resume, one checkpoint per epoch
    def resume_loop(self, model: nn.Module, opt: torch.optim.Optimizer,
                    sched: Any = None) -> tuple[int, float]:
        """(epochs done, training seconds so far): model, optimizer, scheduler and RNG restored
        from the checkpoint if there is one; metrics lines past it are dropped."""
        start, seconds = 0, 0.0
        if self.has_checkpoint:
            state = self.load_checkpoint()
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            if sched is not None:
                sched.load_state_dict(state["scheduler"])
            start, seconds = state["epoch"], state["seconds"]
            torch.set_rng_state(state["rng"])
        self.trim_metrics(start)
        return start, seconds

    def end_epoch(self, row: dict[str, Any], model: nn.Module, opt: torch.optim.Optimizer,
                  sched: Any = None) -> None:
        """Append the epoch's metrics line (``row`` has ``epoch`` and ``seconds``), then write
        the checkpoint to resume after it."""
        self.append_metrics(row)
        state = {"model": model.state_dict(), "optimizer": opt.state_dict(),
                 "epoch": row["epoch"], "seconds": row["seconds"], "rng": torch.get_rng_state()}
        if sched is not None:
            state["scheduler"] = sched.state_dict()
        self.save_checkpoint(state)

    # metrics
    def append_metrics(self, row: dict[str, Any]) -> None:
        """One epoch's line in metrics.jsonl (strict JSON)."""
        append_json_line(self.metrics_lines_file, row)

    def metrics_lines(self) -> list[dict[str, Any]]:
        """Every complete line of metrics.jsonl (a torn last line is dropped)."""
        if not self.metrics_lines_file.exists():
            return []
        rows = []
        for ln in self.metrics_lines_file.read_text().splitlines():
            if not ln.strip():
                continue
            try:
                rows.append(json.loads(ln))
            except json.JSONDecodeError:
                break  # a torn last line
        return rows

    def trim_metrics(self, epochs_done: int) -> None:
        """Drop metric lines of epochs after the checkpoint (written before a crash)."""
        if not self.metrics_lines_file.exists():
            return
        keep = [r for r in self.metrics_lines() if r.get("epoch", epochs_done + 1) <= epochs_done]
        atomic_write_bytes(self.metrics_lines_file,
                           "".join(json_text(r, indent=None) + "\n" for r in keep).encode())

    def write_metrics(self, metrics: dict[str, Any]) -> None:
        """Write metrics.json (the run is finished)."""
        _write_json(self.metrics_file, metrics)

    def read_metrics(self) -> dict[str, Any] | None:
        """metrics.json of a finished run, or None."""
        return _read_json(self.metrics_file) if self.finished else None

    # deployed weights
    def save_deployed(self, deployed: nn.Module, cfg: TrainConfig) -> Path:
        """Write deployed.safetensors (a deployed model: no ACBlocks) with the config inside."""
        save_deployed(deployed, self.deployed_file, metadata={"acnet_config": cfg.to_json()})
        return self.deployed_file

    # export results (acnet export)
    def read_export(self) -> dict[str, Any] | None:
        """export.json (results of ``acnet export``), or None."""
        return _read_json(self.export_file) if self.export_file.is_file() else None

    def write_export(self, results: dict[str, Any]) -> None:
        """Write export.json."""
        _write_json(self.export_file, results)

    # analysis caches
    def _cache_file(self, name: str) -> Path:
        """The file of analysis cache ``name``."""
        if name not in CACHES:
            raise InputError(f"unknown run cache {name!r}; choose one of {CACHES}")
        return self.path / f"{name}.json"

    def read_cache(self, name: str) -> Any | None:
        """A cached analysis result of this run, or None."""
        f = self._cache_file(name)
        return _read_json(f) if f.is_file() else None

    def write_cache(self, name: str, obj: Any) -> None:
        """Cache an analysis result beside the run."""
        _write_json(self._cache_file(name), obj)


def load_config(run_dir: str | os.PathLike) -> TrainConfig:
    """Read a run directory's config.json."""
    return RunDir(run_dir).read_config()
