"""Weights on disk: atomic checkpoints (weights_only loads), safetensors for deployed models."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["atomic_write_bytes", "save_checkpoint", "load_checkpoint", "save_deployed",
           "load_deployed", "save_json", "CheckpointError"]


class CheckpointError(RuntimeError):
    """A checkpoint file that is missing, truncated or not what acnet wrote."""


def _atomic_write(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file, fsync and os.replace: never a partial file."""
    _atomic_write(Path(path), lambda f: f.write(data))


def save_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Atomically save a training checkpoint (tensors, numbers, strings, lists, dicts only)."""
    _atomic_write(Path(path), lambda f: torch.save(state, f))


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; a bad file raises :class:`CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"checkpoint {path} is corrupt or truncated ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:160]})") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, not a dict")
    return state


def save_deployed(model: nn.Module, path: str | os.PathLike,
                  metadata: dict[str, str] | None = None) -> None:
    """Save a model's state_dict as safetensors (deploying it first if it still has ACBlocks)."""
    from safetensors.torch import save as st_save

    from .block import ACBlock
    from .convert import deploy

    if any(isinstance(m, ACBlock) for m in model.modules()):
        model = deploy(model)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    data = st_save(state, metadata=metadata)
    atomic_write_bytes(path, data)


def load_deployed(path: str | os.PathLike, model: nn.Module | None = None, *,
                  strict: bool = True, device: str = "cpu") -> dict[str, torch.Tensor] | nn.Module:
    """Read a safetensors file: the state_dict, or ``model`` with it loaded (strict by default)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no deployed weights at {path}")
    try:
        state = load_file(str(path), device=device)
    except Exception as exc:
        raise CheckpointError(f"{path} is not a valid safetensors file ({exc})") from exc
    if model is None:
        return state
    model.load_state_dict(state, strict=strict)
    return model
