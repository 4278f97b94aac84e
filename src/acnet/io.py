"""Weights on disk: atomic checkpoints (weights_only loads), safetensors for deployed models."""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, TypeVar, overload

import torch
from torch import nn

from ._text import first_line
from .block import ACBlock
from .errors import ACNetError, InputError, NonFiniteError

__all__ = [
    "CheckpointError",
    "append_json_line",
    "atomic_write_bytes",
    "json_text",
    "load_checkpoint",
    "load_deployed",
    "save_checkpoint",
    "save_deployed",
    "save_json",
]


M = TypeVar("M", bound=nn.Module)
_UMASK = os.umask(0o022)  # read the process umask (set it back at once)
os.umask(_UMASK)
_ALIASES = "acnet_aliases"  # safetensors metadata: names that repeat another tensor


class CheckpointError(ACNetError, RuntimeError):
    """A checkpoint file that is missing, truncated or not what acnet wrote."""


def _atomic_write(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # as open() would make it (mkstemp makes 0600)
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


def json_text(obj: Any, *, indent: int | None = 2) -> str:
    """Strict JSON (sorted keys): NaN or infinity is an error, never written."""
    try:
        return json.dumps(obj, indent=indent, sort_keys=True, allow_nan=False)
    except ValueError as exc:
        raise NonFiniteError(f"refusing to write a non-finite number to JSON ({exc})") from exc


def save_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically write ``obj`` as strict, indented JSON: the one JSON writer of acnet."""
    atomic_write_bytes(path, (json_text(obj) + "\n").encode())


def append_json_line(path: str | os.PathLike, obj: Any) -> None:
    """Append ``obj`` as one strict JSON line (a torn last line is what readers skip)."""
    with open(path, "a") as f:
        f.write(json_text(obj, indent=None) + "\n")


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Atomically save a training checkpoint (tensors, numbers, strings, lists, dicts only)."""
    _atomic_write(Path(path), lambda f: torch.save(state, f))


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; a bad file raises ``CheckpointError``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"checkpoint {path} is corrupt or truncated ({first_line(exc)})") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, not a dict")
    return state


def _unshare(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors safetensors can store, and aliases {name: name it repeats} for shared ones.

    A module registered under two names, or tied weights, give one tensor several names: it is
    stored once. Tensors that only partly overlap another one's memory are copied.
    """
    kept: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, t in state.items():
        t = t.detach()
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape),
               tuple(t.stride()), t.dtype, t.device)
        if t.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        kept[name] = t
    users = Counter(t.untyped_storage().data_ptr() for t in kept.values() if t.numel())
    return {n: (t.clone() if t.numel() and users[t.untyped_storage().data_ptr()] > 1 else t)
            .contiguous() for n, t in kept.items()}, aliases


def save_deployed(model: nn.Module, path: str | os.PathLike,
                  metadata: dict[str, str] | None = None) -> None:
    """Atomically save a deployed model's state_dict as safetensors (shared tensors once).

    The model must be deployed already (``acnet.deploy``): this only writes, it never changes
    what is saved.
    """
    from safetensors.torch import save as st_save

    if any(isinstance(m, ACBlock) for m in model.modules()):
        raise InputError("save_deployed() got a model with ACBlocks: deploy it first "
                         "(acnet.deploy(model)), then save")
    metadata = dict(metadata or {})
    if _ALIASES in metadata:
        raise InputError(f"metadata key {_ALIASES!r} is reserved by acnet")
    state, aliases = _unshare(model.state_dict())
    if aliases:
        metadata[_ALIASES] = json.dumps(aliases, sort_keys=True)
    atomic_write_bytes(path, st_save(state, metadata=metadata or None))


@overload
def load_deployed(path: str | os.PathLike, model: None = None, *, strict: bool = True,
                  device: str = "cpu") -> dict[str, torch.Tensor]: ...


@overload
def load_deployed(path: str | os.PathLike, model: M, *, strict: bool = True,
                  device: str = "cpu") -> M: ...


def load_deployed(path: str | os.PathLike, model: nn.Module | None = None, *,
                  strict: bool = True, device: str = "cpu") -> dict[str, torch.Tensor] | nn.Module:
    """Read a safetensors file: the state_dict, or ``model`` with it loaded (strict by default)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no deployed weights at {path}")
    try:
        state = load_file(str(path), device=device)
        with safe_open(str(path), "pt") as f:
            aliases = json.loads((f.metadata() or {}).get(_ALIASES, "{}"))
    except Exception as exc:
        raise CheckpointError(f"{path} is not a valid safetensors file ({first_line(exc)})"
                              ) from exc
    if not isinstance(aliases, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and v in state for k, v in aliases.items()):
        raise CheckpointError(f"{path}: its {_ALIASES!r} metadata is damaged (expected names of "
                              f"stored tensors)")
    for name, target in aliases.items():
        state[name] = state[target]
    if model is None:
        return state
    model.load_state_dict(state, strict=strict)
    return model
