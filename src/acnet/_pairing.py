"""Find which convs feed exactly one BatchNorm, and prove it before convert() relies on it.

A pairing is proven from a torch.fx graph (of the whole model, or of the smallest submodule that
traces and calls the conv) or, for code that fx cannot trace, from a probe run: hooks show the BN
reads the conv's output tensor, and a numeric check shows nothing else reads it. What cannot be
proven is reported as a skip, never guessed.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch import Tensor, nn

from ._text import first_line
from .block import ACBlock

log = logging.getLogger(__name__)

__all__ = ["ConvUse", "Pairing", "find_pairs", "is_norm", "is_bn_act", "absorbable_bn",
           "bn_skip_reason"]


def is_norm(m: nn.Module) -> bool:
    """A normalization layer: torch's, or one named like it (e.g. FrozenBatchNorm2d)."""
    if isinstance(m, nn.modules.batchnorm._NormBase):
        return True
    name = type(m).__name__
    return name.endswith(("Norm", "Norm2d", "NormAct2d", "NormAct")) and not any(
        isinstance(c, nn.Conv2d) for c in m.modules()
    )


def is_bn_act(bn: nn.Module) -> bool:
    """timm's BatchNormAct2d: a BatchNorm2d followed by its own ``drop`` and ``act`` modules."""
    return (type(bn).__name__ == "BatchNormAct2d" and isinstance(bn, nn.BatchNorm2d)
            and isinstance(getattr(bn, "act", None), nn.Module)
            and isinstance(getattr(bn, "drop", None), nn.Module))


def bn_skip_reason(bn: nn.Module, conv: nn.Conv2d) -> str | None:
    """Why ``bn`` cannot be absorbed into an ACBlock after ``conv`` (None: it can)."""
    kind = type(bn).__name__
    if not (type(bn) in (nn.BatchNorm2d, nn.SyncBatchNorm) or is_bn_act(bn)):
        return f"followed by {kind}, which acnet cannot absorb (only BatchNorm2d, SyncBatchNorm " \
               f"and timm's BatchNormAct2d fold into a kernel)"
    if bn._forward_hooks or bn._forward_pre_hooks:
        return f"followed by {kind} with forward hooks, which absorbing it would silently drop"
    if not bn.track_running_stats or bn.running_mean is None:
        return (f"followed by {kind} with track_running_stats=False: it normalizes with batch "
                f"statistics in eval mode too, so it is not a fixed affine map to fold")
    if bn.num_features != conv.out_channels:
        return f"followed by {kind}({bn.num_features}) but the conv has {conv.out_channels} " \
               f"output channels"
    return None


def absorbable_bn(bn: nn.Module, conv: nn.Conv2d) -> bool:
    """A BN acnet can absorb after ``conv`` (see :func:`bn_skip_reason`)."""
    return bn_skip_reason(bn, conv) is None


@dataclass
class ConvUse:
    """How one conv module is used: the BN it alone feeds (if any), or why to leave it alone."""

    bn: str | None = None
    skip: str | None = None
    how: str = "graph"  # "graph", "graph of SUBMODULE" or "probe"


@dataclass
class Pairing:
    """The result of :func:`find_pairs`: one :class:`ConvUse` per conv, and notes for the report."""

    uses: dict[str, ConvUse] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


class _Tracer(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, ACBlock) or is_norm(m) or super().is_leaf_module(m, qualname)


def _trace(module: nn.Module) -> torch.fx.Graph | str:
    """The module's fx graph, or a one-line reason why it cannot be traced."""
    try:
        return _Tracer().trace(module)
    except Exception as exc:  # any tracing failure means: prove pairings another way
        return first_line(exc, 200)


def _target_name(target: Any) -> str:
    """A readable name for an fx call target (a function, method name or module path)."""
    return getattr(target, "__name__", None) or str(target)


def _graph_uses(graph: torch.fx.Graph, root: nn.Module, prefix: str, names: set[str],
                how: str) -> dict[str, ConvUse]:
    """Analyze the convs of ``names`` called in the fx ``graph`` of ``root`` (named ``prefix``)."""
    modules = dict(root.named_modules())
    full = (lambda t: f"{prefix}.{t}") if prefix else (lambda t: t)  # noqa: E731
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    out: dict[str, ConvUse] = {}
    for node in graph.nodes:
        if node.op != "call_module" or full(node.target) not in names:
            continue
        use = out[full(node.target)] = ConvUse(how=how)
        users = list(node.users)
        if calls[node.target] > 1:
            use.skip = f"module is called {calls[node.target]} times in forward"
        elif len(users) > 1:
            norms = [u.target for u in users
                     if u.op == "call_module" and is_norm(modules[u.target])]
            if norms:
                use.skip = f"its output goes to {full(norms[0])} and elsewhere ({len(users)} uses)"
        elif len(users) == 1:
            _single_user(users[0], modules[node.target], modules, calls, full, use)
    return out


def _single_user(user: torch.fx.Node, conv: nn.Module, modules: dict[str, nn.Module],
                 calls: Counter, full: Callable[[str], str], use: ConvUse) -> None:
    """Fill ``use`` for a conv whose output has exactly one user node."""
    if user.op == "call_module":
        mod = modules.get(user.target)
        if mod is None or not is_norm(mod):
            return
        reason = bn_skip_reason(mod, conv)
        if reason is None and calls[user.target] > 1:
            reason = f"its BatchNorm {full(user.target)} is called {calls[user.target]} times"
        if reason is None:
            use.bn = full(user.target)
        else:
            use.skip = reason
    elif "norm" in _target_name(user.target).lower():
        use.skip = f"followed by a functional {_target_name(user.target)}, which acnet cannot " \
                   f"absorb"


def _ancestors(name: str) -> Iterator[str]:
    """Dotted names of the modules above ``name``, nearest first, the root ("") excluded."""
    parts = name.split(".")[:-1]
    while parts:
        yield ".".join(parts)
        parts.pop()


def _by_submodule_graphs(model: nn.Module, names: set[str], out: Pairing) -> None:
    """Resolve convs from the graph of the nearest submodule that traces and calls them."""
    graphs: dict[str, torch.fx.Graph | str] = {}
    for name in sorted(names - set(out.uses)):
        for anc in _ancestors(name):
            if anc not in graphs:
                graphs[anc] = _trace(model.get_submodule(anc))
            graph = graphs[anc]
            if isinstance(graph, str):
                continue
            got = _graph_uses(graph, model.get_submodule(anc), anc, {name}, f"graph of {anc}")
            if name in got:
                out.uses[name] = got[name]
                break


def find_pairs(model: nn.Module, names: set[str], example_inputs: Any = None) -> Pairing:
    """For each conv named in ``names``: the BN it alone feeds, or a proven reason to skip it."""
    out = Pairing()
    graph = _trace(model)
    if isinstance(graph, str):
        out.notes.append(f"torch.fx could not trace {type(model).__name__} ({graph}); pairings "
                         f"were proven from submodule graphs or a probe run")
    else:
        out.uses.update(_graph_uses(graph, model, "", names, "graph"))
    if names - set(out.uses):
        _by_submodule_graphs(model, names, out)
    rest = names - set(out.uses)
    if rest:
        _probe_pairs(model, rest, example_inputs, out)
    return out


def _affine(n: int, seed: int, like: Tensor) -> tuple[Tensor, Tensor]:
    """A fixed random per-channel affine map (scale, shift), far from the identity."""
    g = torch.Generator().manual_seed(seed)
    scale = (torch.rand(n, generator=g) * 1.5 + 0.5) * torch.where(
        torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    shift = torch.randn(n, generator=g)
    shape = (1, n) + (1,) * (like.dim() - 2)
    return (scale.to(like.device, like.dtype).view(shape),
            shift.to(like.device, like.dtype).view(shape))


def _run(model: nn.Module, inputs: tuple, hooks: dict[nn.Module, tuple[Callable, Callable]]
         ) -> list[Tensor]:
    """Run ``model`` in eval mode without grad, with (pre-hook, hook) per module; the outputs.

    The training flags of every module are restored afterwards, so probing changes nothing.
    """
    modes = [(m, m.training) for m in model.modules()]
    handles = []
    try:
        for m, (pre, post) in hooks.items():
            if pre is not None:
                handles.append(m.register_forward_pre_hook(pre))
            if post is not None:
                handles.append(m.register_forward_hook(post))
        model.eval()
        with torch.no_grad():
            out = model(*inputs)
    finally:
        for h in handles:
            h.remove()
        for m, was in modes:
            m.training = was
    return [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, Tensor)]


def _record(model: nn.Module, inputs: tuple, names: set[str]) -> tuple[dict, dict]:
    """Run the probe with hooks: conv name -> its outputs, norm name -> its inputs."""
    conv_out: dict[str, list[Tensor]] = {n: [] for n in names}
    norm_in: dict[str, list[Any]] = {}
    hooks: dict[nn.Module, tuple[Callable | None, Callable | None]] = {}
    for name, m in model.named_modules():
        if name in names:
            hooks[m] = (None, lambda _m, _a, o, n=name: conv_out[n].append(o))
        elif is_norm(m):
            norm_in[name] = []
            hooks[m] = (lambda _m, a, n=name: norm_in[n].append(a[0] if a else None), None)
    _run(model, inputs, hooks)
    return conv_out, norm_in


def _guess_inputs(model: nn.Module) -> Iterator[tuple]:
    """Plausible image batches for a model whose input shape nobody gave: (2, C, s, s)."""
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    ref = next(model.parameters(), None)
    if first is None or ref is None:
        return
    g = torch.Generator().manual_seed(0)
    for size in (64, 224, 32):
        x = torch.randn(2, first.in_channels, size, size, generator=g)
        yield (x.to(device=ref.device, dtype=ref.dtype),)


def _probe_run(model: nn.Module, names: set[str], example_inputs: Any
               ) -> tuple[tuple, dict, dict] | str:
    """(inputs, conv outputs, norm inputs) of a probe run, or why no probe could run."""
    if example_inputs is not None:
        inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
        try:
            return (inputs, *_record(model, inputs, names))
        except Exception as exc:
            raise ValueError(f"the model failed on example_inputs: {first_line(exc, 200)}"
                             ) from exc
    for inputs in _guess_inputs(model):
        try:
            return (inputs, *_record(model, inputs, names))
        except Exception as exc:
            log.debug("probe input %s failed: %s", tuple(inputs[0].shape), exc)
    return ("torch.fx could not trace the code around it and no probe input ran; pass "
            "example_inputs= to convert() to prove its BatchNorm")


def _candidates(model: nn.Module, names: set[str], conv_out: dict, norm_in: dict,
                out: Pairing) -> dict[str, str]:
    """Pairs seen in the probe run (the BN read the conv's output tensor); the rest decided."""
    modules = dict(model.named_modules())
    found: dict[str, str] = {}
    for name in sorted(names):
        outs = conv_out[name]
        use = out.uses[name] = ConvUse(how="probe")
        if not outs:
            use.skip = "not called on the probe input, so its BatchNorm cannot be proven"
            continue
        if len(outs) > 1:
            use.skip = f"module is called {len(outs)} times in forward"
            continue
        readers = [n for n, ins in norm_in.items() if any(t is outs[0] for t in ins)]
        if len(readers) > 1:
            use.skip = f"its output goes to {len(readers)} norm layers ({', '.join(readers)})"
        elif readers:
            reason = bn_skip_reason(modules[readers[0]], modules[name])
            if reason is None and len(norm_in[readers[0]]) > 1:
                reason = f"its BatchNorm {readers[0]} is called {len(norm_in[readers[0]])} times"
            if reason is None:
                found[name] = readers[0]
            else:
                use.skip = reason
    return found


def _moves_nothing(model: nn.Module, inputs: tuple, pairs: dict[str, str]) -> bool:
    """True if applying each BN right at its conv's output changes no model output.

    Each BN is replaced by a random affine map T; the model with T in the BN's slot must equal
    the model with T applied to the conv's output and the slot passing through. They differ
    exactly when something else reads the conv's output.
    """
    modules = dict(model.named_modules())
    maps = {}
    for i, (conv, bn) in enumerate(sorted(pairs.items())):
        ref = next(modules[conv].parameters())
        maps[conv] = _affine(modules[conv].out_channels, i, ref.new_zeros(1, 1, 1, 1))
    at_bn = {modules[bn]: (None, lambda _m, a, _o, c=conv: a[0] * maps[c][0] + maps[c][1])
             for conv, bn in pairs.items()}
    at_conv = {modules[bn]: (None, lambda _m, a, _o: a[0]) for bn in pairs.values()}
    at_conv.update({modules[conv]: (None, lambda _m, _a, o, c=conv: o * maps[c][0] + maps[c][1])
                    for conv in pairs})
    want, got = _run(model, inputs, at_bn), _run(model, inputs, at_conv)
    scale = max((w.abs().max().item() for w in want if w.numel()), default=0.0)
    return len(want) == len(got) and all(
        w.shape == g.shape and (w - g).abs().max().item() <= 1e-5 * max(scale, 1e-12)
        for w, g in zip(want, got) if w.numel())


def _probe_pairs(model: nn.Module, names: set[str], example_inputs: Any, out: Pairing) -> None:
    """Prove the pairings of ``names`` by running the model on a probe input."""
    run = _probe_run(model, names, example_inputs)
    if isinstance(run, str):
        for name in names:
            out.uses[name] = ConvUse(skip=run, how="probe")
        return
    inputs, conv_out, norm_in = run
    found = _candidates(model, names, conv_out, norm_in, out)
    del conv_out, norm_in
    if found and not _moves_nothing(model, inputs, found):
        for conv, bn in list(found.items()):
            if not _moves_nothing(model, inputs, {conv: bn}):
                out.uses[conv].skip = (f"its output goes to {bn} and elsewhere (a probe run "
                                       f"showed the difference)")
                del found[conv]
    for conv, bn in found.items():
        out.uses[conv].bn = bn
