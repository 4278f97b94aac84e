"""Carry a deployed conv's bias into the BatchNorms downstream, where that is exact.

A square conv with neither bias nor BatchNorm after it gets a bias when its block is fused, and
the stock class then refuses the state_dict. When every path from that conv's output to the
next BatchNorms is affine in a way that maps a per-channel constant to a per-channel constant
(a concatenation, a sum, an identity, dropout, pooling without zero padding, a conv without
zero padding such as a 1×1 pointwise conv), the constant can move into those BatchNorms'
running means: ``bn(y + c) == bn'(y)`` with ``running_mean' = running_mean - c``, exact in eval
mode (in training mode a BN removes constants anyway). This module proves it on the model's
fx graph (eval mode) and moves it; anything else keeps the bias, with the reason.
"""

from __future__ import annotations

import operator
from typing import Any, cast

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn

from ._fx import ancestors, in_mode, trace
from ._surgery import ConversionReport
from .norms import is_frozen_norm, is_norm, uses_batch_stats

__all__ = ["carry_biases"]

_PASS_MODULES = (nn.Identity, nn.Dropout, nn.Dropout2d, nn.MaxPool2d, nn.AdaptiveAvgPool2d,
                 nn.AdaptiveMaxPool2d, nn.Upsample, nn.UpsamplingBilinear2d,
                 nn.UpsamplingNearest2d)
_PASS_FUNCTIONS = (F.dropout, F.dropout2d, F.interpolate, F.max_pool2d, F.adaptive_avg_pool2d,
                   F.adaptive_max_pool2d, torch.clone)
_PASS_METHODS = ("contiguous", "clone")


class _Unprovable(Exception):
    """The constant reaches something that does not keep it a per-channel constant."""


class _Escapes(_Unprovable):
    """The constant leaves the traced submodule: a larger graph may still prove it."""


def _channels(node: Any, modules: dict[str, nn.Module], seen: dict[Any, int | None]
              ) -> int | None:
    """Channels of a node's output, from the modules that make it (None: unknown)."""
    if not isinstance(node, torch.fx.Node):
        return None
    if node in seen:
        return seen[node]
    out: int | None = None
    if node.op == "call_module":
        m: Any = modules[str(node.target)]
        if isinstance(m, nn.Conv2d):
            out = m.out_channels
        elif is_norm(m) and getattr(m, "running_var", None) is not None:
            out = m.running_var.numel()
        elif node.args:
            out = _channels(node.args[0], modules, seen)
    elif node.op == "call_function" and node.target is torch.cat and _cat_dim(node) == 1:
        parts = [_channels(a, modules, seen) for a in _listed(node)]
        out = None if any(p is None for p in parts) else sum(p or 0 for p in parts)
    elif node.op in ("call_function", "call_method") and node.args:
        out = _channels(node.args[0], modules, seen)
    seen[node] = out
    return out


def _cat_dim(node: torch.fx.Node) -> int:
    """The dim of a torch.cat node."""
    return cast(int, node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0))


def _listed(node: torch.fx.Node) -> list[Any]:
    """The tensors a torch.cat node concatenates (its first argument)."""
    return list(cast(list, node.args[0]))


def _conv_map(conv: nn.Conv2d, c: Tensor) -> Tensor:
    """What a conv makes of a per-channel constant input (no zero padding: every window full)."""
    pad = conv.padding
    if pad == "same":
        padded = any((k - 1) * d > 0
                     for k, d in zip(conv.kernel_size, conv.dilation, strict=True))
    else:
        padded = pad != "valid" and any(pad)
    if padded and conv.padding_mode == "zeros":
        raise _Unprovable(f"a conv with zero padding ({pad})")
    w = conv.weight.detach().double().sum((2, 3))  # (out, in / groups)
    g = conv.groups
    per = c.view(g, -1)  # (groups, in / groups)
    return torch.einsum("goi,gi->go", w.view(g, -1, w.shape[1]), per).reshape(-1)


def _step(node: torch.fx.Node, consts: dict[torch.fx.Node, Tensor],
          modules: dict[str, nn.Module], chans: dict[Any, int | None]) -> Tensor | None:
    """The constant in ``node``'s output given its inputs' constants (None: no constant)."""
    ins = [a for a in node.all_input_nodes if a in consts]
    if not ins:
        return None
    c = consts[ins[0]]
    if node.op == "call_module":
        m = modules[str(node.target)]
        if isinstance(m, _PASS_MODULES):
            return c
        if isinstance(m, nn.AvgPool2d) and (not any(_pair(m.padding))
                                            or not m.count_include_pad):
            return c
        if isinstance(m, nn.Conv2d):
            return _conv_map(m, c)
        raise _Unprovable(f"{node.target} ({type(m).__name__})")
    if node.op == "call_function":
        if node.target in (operator.add, torch.add, operator.iadd, operator.sub, torch.sub):
            return _sum(node, consts, c)
        if node.target is torch.cat and _cat_dim(node) == 1:
            return _cat(node, consts, modules, chans, c)
        if node.target in _PASS_FUNCTIONS and node.args and node.args[0] in consts:
            return c
    if node.op == "call_method" and node.target in _PASS_METHODS:
        return c
    raise _Unprovable(f"{node.op} {getattr(node.target, '__name__', node.target)}")


def _sum(node: torch.fx.Node, consts: dict[torch.fx.Node, Tensor], like: Tensor) -> Tensor:
    """The constant of ``a + alpha·b`` or ``a − alpha·b``: each operand counted where it stands
    (``y + y`` carries 2c)."""
    if len(node.args) != 2 or set(node.kwargs) - {"alpha"}:
        raise _Unprovable(f"{getattr(node.target, '__name__', node.target)} with other arguments")
    alpha = node.kwargs.get("alpha", 1)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise _Unprovable("a sum with a traced alpha")
    sign = -1.0 if node.target in (operator.sub, torch.sub) else 1.0

    def const(v: Any) -> Tensor:
        return consts[v] if isinstance(v, torch.fx.Node) and v in consts else \
            torch.zeros_like(like)

    a, b = node.args
    return const(a) + sign * alpha * const(b)


def _pair(v: Any) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _cat(node: torch.fx.Node, consts: dict, modules: dict, chans: dict, like: Tensor) -> Tensor:
    """The constant of a channel concatenation: each input's at its offset, zeros elsewhere."""
    inputs = _listed(node)
    sizes = [_channels(a, modules, chans) for a in inputs]
    if sizes.count(None) == 1:  # one unknown (e.g. the graph's input): what the reader takes
        total = _reader_channels(node, modules)
        if total is not None:
            sizes[sizes.index(None)] = total - sum(n for n in sizes if n is not None)
    known = [n for n in sizes if n is not None]
    if len(known) < len(sizes) or min(known) < 0:
        raise _Escapes("a concatenation whose input channels this graph does not show")
    return torch.cat([consts[a] if a in consts else like.new_zeros(n)
                      for a, n in zip(inputs, known, strict=True)])


def _reader_channels(node: torch.fx.Node, modules: dict[str, nn.Module]) -> int | None:
    """Channels a node's output must have, from a conv or norm module that reads it."""
    for u in node.users:
        m: Any = modules.get(str(u.target)) if u.op == "call_module" else None
        if isinstance(m, nn.Conv2d):
            return m.in_channels
        if m is not None and is_norm(m) and getattr(m, "running_var", None) is not None:
            return m.running_var.numel()
    return None


def _propagate(graph: torch.fx.Graph, root: nn.Module, target: str, bias: Tensor,
               closed: bool) -> dict[str, Tensor]:
    """{norm name in ``root``: constant in its input} for the bias of conv ``target``."""
    modules = dict(root.named_modules())
    calls: dict[str, int] = {}
    for n in graph.nodes:
        if n.op == "call_module":
            calls[n.target] = calls.get(n.target, 0) + 1
    start = [n for n in graph.nodes if n.op == "call_module" and n.target == target]
    if len(start) != 1:
        raise _Unprovable(f"the conv is called {len(start)} times")
    consts: dict[torch.fx.Node, Tensor] = {start[0]: bias}
    ends: dict[str, Tensor] = {}
    chans: dict[Any, int | None] = {}
    nodes = list(graph.nodes)
    for node in nodes[nodes.index(start[0]) + 1:]:
        if not any(a in consts for a in node.all_input_nodes):
            continue
        if node.op == "output":
            raise _Unprovable("the model's output") if closed else _Escapes("its block's output")
        if node.op == "call_module" and is_norm(modules[node.target]):
            norm = modules[node.target]
            if not (isinstance(norm, nn.modules.batchnorm._BatchNorm) or is_frozen_norm(norm)):
                raise _Unprovable(f"{node.target} ({type(norm).__name__})")
            if calls[node.target] > 1 or node.args[0] not in consts or len(
                    node.all_input_nodes) > 1:
                raise _Unprovable(f"{node.target}, called more than once or on more inputs")
            ends[node.target] = consts[node.args[0]]
            continue
        c = _step(node, consts, modules, chans)
        if c is not None:
            consts[node] = c
    return ends


def _prove(model: nn.Module, name: str, bias: Tensor, graphs: dict[str, Any]
           ) -> dict[str, Tensor]:
    """{norm name: constant} for conv ``name``, from the nearest graph that holds every path
    (``graphs``: traced graphs by module name, filled as needed)."""
    reason = "torch.fx could not trace the model around it"
    for anc in [*ancestors(name), ""]:  # the nearest graph first, the model's last
        root = model.get_submodule(anc) if anc else model
        if anc not in graphs:
            graphs[anc] = trace(root)
        graph = graphs[anc]
        if isinstance(graph, str):
            continue
        local = name[len(anc) + 1:] if anc else name
        try:
            ends = _propagate(graph, root, local, bias, closed=not anc)
        except _Escapes as exc:
            reason = f"its output reaches {exc}, and no larger graph traces"
            continue
        except _Unprovable as exc:
            raise _Unprovable(f"its output reaches {exc}") from exc
        return {f"{anc}.{k}" if anc else k: v for k, v in ends.items()}
    raise _Unprovable(reason)


def carry_biases(model: nn.Module, names: list[str], report: ConversionReport) -> None:
    """For each deployed conv in ``names`` whose bias the original did not have: move the bias
    into the downstream BatchNorms when exact, and say so in ``report`` (``bias-moved``); else
    leave it (``bias-added``, with the reason)."""
    modules = dict(model.named_modules())
    graphs: dict[str, Any] = {}
    with in_mode(model, [False] * len(list(model.modules()))):
        for name in names:
            conv = modules[name]
            bias = conv.bias.detach().double()
            try:
                ends = _prove(model, name, bias, graphs)
            except _Unprovable as exc:
                report.add(name, "bias-added", f"the original conv had neither bias nor "
                                               f"BatchNorm: a bias was added ({exc})")
                continue
            with torch.no_grad():
                for bn, c in ends.items():
                    norm = modules[bn]
                    if not uses_batch_stats(norm):
                        norm.running_mean.sub_(c.to(norm.running_mean.dtype))
                conv.register_parameter("bias", None)
            report.add(name, "bias-moved", f"its bias moved into {', '.join(ends)} (exact in "
                                           f"eval mode)")
