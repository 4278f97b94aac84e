"""Model weights on disk: safetensors for deployed models (shared tensors stored once), and the
training checkpoints (atomic, loaded with ``weights_only=True``) of ``acnet._files``."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import TypeVar, overload

import torch
from torch import nn

from ._files import (  # the file helpers stay importable from here, as in acnet 0.3
    CheckpointError,
    append_json_line,  # noqa: F401
    atomic_write_bytes,
    json_text,  # noqa: F401
    load_checkpoint,
    save_checkpoint,
    save_json,  # noqa: F401
)
from ._text import first_line
from .block import ACBlock
from .errors import InputError

__all__ = ["CheckpointError", "load_checkpoint", "load_deployed", "save_checkpoint",
           "save_deployed"]
M = TypeVar("M", bound=nn.Module)
_ALIASES = "acnet_aliases"  # safetensors metadata: names that repeat another tensor


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

    Args:
        model: a deployed model (no ``ACBlock`` left).
        path: the ``.safetensors`` file to write (atomically: a crash leaves the old file).
        metadata: string metadata to store with the tensors.
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
    """Read a safetensors file: the state_dict, or ``model`` with it loaded (strict by default).

    Args:
        path: a file written by ``save_deployed`` (or any safetensors state_dict).
        model: load the weights into this model and return it; None: return the state_dict.
        strict: as ``nn.Module.load_state_dict``.
        device: where the tensors are loaded.

    Raises:
        FileNotFoundError: no file at ``path``.
        acnet.io.CheckpointError: the file is not a valid safetensors file.
    """
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
