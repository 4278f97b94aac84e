"""Find which convs feed exactly one BatchNorm: from the torch.fx graph, or by module order."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

import torch.fx
from torch import nn

from .block import ACBlock

log = logging.getLogger(__name__)

__all__ = ["ConvUse", "analyze_convs", "is_norm", "is_bn_act", "absorbable_bn"]


def is_norm(m: nn.Module) -> bool:
    """A normalization layer: torch's, or one named like it (e.g. FrozenBatchNorm2d)."""
    if isinstance(m, nn.modules.batchnorm._NormBase):
        return True
    name = type(m).__name__
    return name.endswith(("Norm", "Norm2d", "NormAct2d")) and not any(
        isinstance(c, nn.Conv2d) for c in m.modules()
    )


def is_bn_act(bn: nn.Module) -> bool:
    """timm's BatchNormAct2d: a BatchNorm2d followed by its own ``drop`` and ``act`` modules."""
    return (type(bn).__name__ == "BatchNormAct2d" and isinstance(bn, nn.BatchNorm2d)
            and isinstance(getattr(bn, "act", None), nn.Module)
            and isinstance(getattr(bn, "drop", None), nn.Module))


def absorbable_bn(bn: nn.Module, conv: nn.Conv2d) -> bool:
    """A BN acnet can absorb after ``conv``: BatchNorm2d, SyncBatchNorm or timm's BatchNormAct2d,
    tracking running statistics, with the conv's channel count."""
    return (
        (type(bn) in (nn.BatchNorm2d, nn.SyncBatchNorm) or is_bn_act(bn))
        and bn.track_running_stats
        and bn.running_mean is not None
        and bn.num_features == conv.out_channels
    )


@dataclass
class ConvUse:
    """How one conv module is used: the BN it feeds alone (if any), or why it must be left alone."""

    bn: str | None = None
    skip: str | None = None
    how: str = "graph"  # "graph" (torch.fx) or "order" (module order fallback)


class _Tracer(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, ACBlock) or is_norm(m) or super().is_leaf_module(m, qualname)


@dataclass
class _Analysis:
    uses: dict[str, ConvUse] = field(default_factory=dict)
    traced: bool = True
    trace_error: str = ""


def _trace(model: nn.Module) -> torch.fx.Graph:
    """The model's fx graph; :class:`_TraceFailed` (with a one-line reason) if it cannot trace."""
    try:
        return _Tracer().trace(model)
    except Exception as exc:  # any tracing failure means: fall back to module order
        log.debug("torch.fx could not trace %s: %s", type(model).__name__, exc)
        raise _TraceFailed(f"{type(exc).__name__}: {exc}".splitlines()[0][:200]) from exc


class _TraceFailed(Exception):
    pass


def _by_order(model: nn.Module, names: set[str], uses: dict[str, ConvUse]) -> None:
    """Pair each conv with the BatchNorm2d that follows it directly inside the same parent."""
    for parent_name, parent in model.named_modules():
        if isinstance(parent, ACBlock):
            continue
        children = list(parent.named_children())
        for i, (child_name, child) in enumerate(children):
            full = f"{parent_name}.{child_name}" if parent_name else child_name
            if full not in names or full in uses:
                continue
            use = ConvUse(how="order")
            if i + 1 < len(children):
                nxt_name, nxt = children[i + 1]
                nxt_full = f"{parent_name}.{nxt_name}" if parent_name else nxt_name
                if absorbable_bn(nxt, child):
                    use.bn = nxt_full
                elif is_norm(nxt):
                    use.skip = f"followed by {type(nxt).__name__}, which acnet cannot absorb"
            uses[full] = use


def analyze_convs(model: nn.Module, names: set[str]) -> _Analysis:
    """For each conv named in ``names``: the BN it alone feeds, or a reason to skip it."""
    out = _Analysis()
    try:
        graph = _trace(model)
    except _TraceFailed as exc:
        out.traced = False
        out.trace_error = str(exc)
        _by_order(model, names, out.uses)
        return out
    modules = dict(model.named_modules())
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    for node in graph.nodes:
        if node.op != "call_module" or node.target not in names:
            continue
        conv = modules[node.target]
        use = ConvUse()
        out.uses[node.target] = use
        users = list(node.users)
        if calls[node.target] > 1:
            use.skip = f"module is called {calls[node.target]} times in forward"
            continue
        if len(users) > 1:
            norms = [u.target for u in users
                     if u.op == "call_module" and is_norm(modules[u.target])]
            if norms:
                use.skip = f"its output goes to {norms[0]} and elsewhere ({len(users)} uses)"
            continue
        if len(users) == 1:
            user = users[0]
            if user.op == "call_module":
                mod = modules.get(user.target)
                if mod is not None and absorbable_bn(mod, conv) and calls[user.target] == 1:
                    use.bn = user.target
                elif mod is not None and is_norm(mod):
                    use.skip = f"followed by {type(mod).__name__}, which acnet cannot absorb"
            elif "norm" in str(user.target).lower():
                use.skip = f"followed by a functional {user.target}"
    missing = names - set(out.uses)
    if missing:  # not called in the traced mode (e.g. auxiliary heads): use module order
        _by_order(model, missing, out.uses)
    return out
