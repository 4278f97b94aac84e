"""Files at the bottom of acnet: atomic writes (never a partial file), strict JSON (never a NaN),
JSON lines, and training checkpoints loaded with ``weights_only=True``. Nothing here knows about
models; ``acnet.io`` writes model weights with these."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from ._text import first_line
from .errors import ACNetError, NonFiniteError

__all__ = [
    "CheckpointError",
    "append_json_line",
    "atomic_write_bytes",
    "json_text",
    "load_checkpoint",
    "save_checkpoint",
    "save_json",
]

_UMASK = os.umask(0o022)  # read the process umask (set it back at once)
os.umask(_UMASK)


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
