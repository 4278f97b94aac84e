"""Open a finished (or interrupted) run directory: its config, trained and deployed models."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .convert import deploy
from .io import load_checkpoint, load_deployed, save_deployed
from .train.config import TrainConfig, build_base_model, build_training_model, load_config

__all__ = ["open_run", "load_trained", "load_deployed_model", "deploy_run", "run_metrics"]


def open_run(path: str | Path) -> tuple[TrainConfig, Path]:
    """(config, file or directory) for a run directory or a deployed .safetensors file."""
    path = Path(path)
    if path.is_dir():
        return load_config(path), path
    if path.is_file() and path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        if "acnet_config" not in meta:
            raise ValueError(f"{path} has no acnet config in its metadata; evaluate its run "
                             f"directory instead")
        return TrainConfig.from_dict(json.loads(meta["acnet_config"])), path
    raise FileNotFoundError(f"{path} is neither a run directory nor a .safetensors file")


def load_trained(run_dir: str | Path, device: str = "cpu") -> nn.Module:
    """The model as trained (ACBlocks for acb runs), with the last checkpoint's weights."""
    cfg, path = open_run(run_dir)
    model = build_training_model(cfg)
    state = load_checkpoint(Path(path) / "checkpoint.pt", map_location=device)
    model.load_state_dict(state["model"])
    return model.to(device).eval()


def load_deployed_model(path: str | Path, device: str = "cpu") -> nn.Module:
    """The deployed base architecture with the run's deployed.safetensors (or a given file)."""
    cfg, p = open_run(path)
    file = p if p.is_file() else p / "deployed.safetensors"
    if not file.is_file():
        if p.is_dir() and (p / "checkpoint.pt").is_file():
            return deploy(load_trained(p, device)).eval()
        raise FileNotFoundError(f"no deployed.safetensors or checkpoint.pt in {p}")
    model = build_base_model(cfg)
    load_deployed(file, model, strict=True, device=device)
    return model.to(device).eval()


def deploy_run(run_dir: str | Path) -> tuple[Path, Any, float]:
    """Re-deploy a run from its checkpoint: writes deployed.safetensors; returns the report and
    the max |difference| between trained and deployed outputs on a random batch."""
    cfg, path = open_run(run_dir)
    if not path.is_dir():
        raise ValueError(f"acnet deploy needs a run directory, got {path}")
    trained = load_trained(path)
    deployed = deploy(trained)
    x = torch.randn(8, cfg.in_channels, cfg.input_size or 32, cfg.input_size or 32,
                    generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (deployed(x) - trained(x)).abs().max().item()
    out = path / "deployed.safetensors"
    save_deployed(deployed, out, metadata={"acnet_config": cfg.to_json()})
    return out, deployed.acnet_report, diff


def run_metrics(run_dir: str | Path) -> dict[str, Any] | None:
    """metrics.json of a finished run, or None."""
    p = Path(run_dir) / "metrics.json"
    return json.loads(p.read_text()) if p.is_file() else None
