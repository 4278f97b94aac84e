"""The torch.fx toolkit under the pairing proof, the probe and bias carrying: trace a module
(without trusting a graph whose forward stored traced values), run it in a given mode, and name
a module's ancestors. Nothing here decides anything about pairs."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import torch
import torch.fx
from torch import nn

from ._text import first_line
from .block import ACBlock
from .norms import is_norm

__all__ = ["ancestors", "in_mode", "modes_of", "trace"]


class _Tracer(torch.fx.Tracer):
    """Traces through user modules, except norms, ACBlocks and modules with forward hooks: a
    hooked module stays one call, so a conv inside it whose output its hooks may read is never
    paired from outside (its own graph, traced separately, pairs what stays inside)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        hooked = bool(m._forward_hooks or m._forward_pre_hooks) and bool(qualname)
        return (isinstance(m, ACBlock) or is_norm(m) or hooked
                or super().is_leaf_module(m, qualname))


def _has_proxy(value: Any, depth: int = 0) -> bool:
    """True if ``value`` is an fx Proxy or a container holding one (a traced value stored)."""
    if isinstance(value, torch.fx.Proxy):
        return True
    if depth > 3:
        return False
    if isinstance(value, dict):
        return any(_has_proxy(v, depth + 1) for v in value.values())
    if isinstance(value, (list, tuple, set)):
        return any(_has_proxy(v, depth + 1) for v in value)
    return False


def _snapshot(module: nn.Module) -> list[tuple[nn.Module, dict[str, Any], dict[str, Any]]]:
    """Each module's attributes, with shallow copies of its containers, to undo tracing."""
    out = []
    for m in module.modules():
        attrs = dict(m.__dict__)
        copies = {k: copy.copy(v) for k, v in attrs.items() if isinstance(v, (list, dict, set))}
        out.append((m, attrs, copies))
    return out


def _restore(saved: list[tuple[nn.Module, dict[str, Any], dict[str, Any]]]) -> bool:
    """Undo what forward stored while tracing; True if it stored a traced value somewhere."""
    leaked = False
    for m, before, copies in saved:
        for k in list(m.__dict__):
            v = m.__dict__[k]
            if not _has_proxy(v):
                continue
            leaked = True
            if k not in before:
                del m.__dict__[k]
            elif k in copies and before[k] is v:  # a container mutated in place
                old = copies[k]
                if isinstance(v, list):
                    v[:] = old
                else:
                    v.clear()
                    v.update(old)
            else:
                m.__dict__[k] = before[k]
    return leaked


# ------------------------------------------------------------------------ modes
def modes_of(model: nn.Module) -> list[tuple[str, list[bool]]]:
    """(label, training flag per module) of every mode to prove pairings in."""
    mods = list(model.modules())
    now = [m.training for m in mods]
    out = [("training mode", [True] * len(mods)), ("eval mode", [False] * len(mods))]
    if any(now) and not all(now):
        out.append(("the model's current mix of modes", now))
    return out


@contextlib.contextmanager
def in_mode(model: nn.Module, flags: list[bool]) -> Iterator[None]:
    """Set each module's ``training`` flag; restore them afterwards."""
    mods = list(model.modules())
    before = [m.training for m in mods]
    try:
        for m, f in zip(mods, flags, strict=True):
            m.training = f
        yield
    finally:
        for m, f in zip(mods, before, strict=True):
            m.training = f


def trace(module: nn.Module) -> torch.fx.Graph | str:
    """The module's fx graph, or a one-line reason why it cannot be trusted or traced.

    Attributes that forward stores on modules while tracing are put back; a traced value
    stored that way would escape the graph, so such a graph is not trusted.
    """
    saved = _snapshot(module)
    graph: torch.fx.Graph | str
    try:
        graph = _Tracer().trace(module)
    except Exception as exc:  # any tracing failure means: prove pairings another way
        graph = first_line(exc, 200)
    if _restore(saved) and not isinstance(graph, str):
        return "forward stores a traced value on a module (an attribute, list or dict)"
    return graph


def ancestors(name: str) -> Iterator[str]:
    """Dotted names of the modules above ``name``, nearest first, the root ("") excluded."""
    parts = name.split(".")[:-1]
    while parts:
        yield ".".join(parts)
        parts.pop()
