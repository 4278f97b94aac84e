"""Find which convs feed exactly one BatchNorm, and prove it before convert() relies on it.

The proof: in every mode the model has (all modules training, all in eval, and the mix it is in
now), a torch.fx graph shows the conv's output goes only into that BN; the graph is the whole
model's, or the smallest submodule's that traces and holds the conv, the BN and every reader of
the conv's output (the output does not leave the submodule). For code fx cannot trace, a probe
run counts as proof only on inputs the user gives (``example_inputs``), in every mode: hooks show
the BN reads the conv's output tensor, and a numeric check shows nothing else reads it. What
cannot be proven is reported as a skip, never guessed.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.fx
from torch import Tensor, nn

from ._text import first_line
from .block import ACBlock
from .errors import InputError
from .norms import bn_skip_reason, is_norm

log = logging.getLogger(__name__)

__all__ = ["PROBED", "ConvUse", "Pairing", "find_pairs"]

PROBED = "the given inputs"  # ConvUse.how of a pairing proven by a probe run on example_inputs
_UNTRACED = ("torch.fx could not trace the code that reads its output, so its BatchNorm cannot "
             "be proven; pass example_inputs= to convert() to prove it on inputs you choose")


@dataclass
class ConvUse:
    """How one conv module is used: the BN it alone feeds (if any), or why to leave it alone."""

    bn: str | None = None
    skip: str | None = None
    how: str = "graph"  # "graph", "graph of SUBMODULE" or PROBED


@dataclass
class Pairing:
    """The result of :func:`find_pairs`: one :class:`ConvUse` per conv, and notes for the report."""

    uses: dict[str, ConvUse] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


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
def _modes(model: nn.Module) -> list[tuple[str, list[bool]]]:
    """(label, training flag per module) of every mode to prove pairings in."""
    mods = list(model.modules())
    now = [m.training for m in mods]
    out = [("training mode", [True] * len(mods)), ("eval mode", [False] * len(mods))]
    if any(now) and not all(now):
        out.append(("the model's current mix of modes", now))
    return out


@contextlib.contextmanager
def _in_mode(model: nn.Module, flags: list[bool]) -> Iterator[None]:
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


# ------------------------------------------------------------------------ graphs
def _trace(module: nn.Module) -> torch.fx.Graph | str:
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


def _graph_uses(graph: torch.fx.Graph, root: nn.Module, prefix: str, names: set[str],
                how: str, closed: bool) -> dict[str, ConvUse]:
    """Analyze the convs of ``names`` called in the fx ``graph`` of ``root`` (named ``prefix``).

    ``closed``: the graph is the whole model's, so a conv output reaching ``output`` is the
    model's result. Otherwise a conv whose output leaves the graph is left out (unresolved):
    its readers outside are unknown.
    """
    modules = dict(root.named_modules())
    full = (lambda t: f"{prefix}.{t}") if prefix else (lambda t: t)
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    reads = [n.target for n in graph.nodes if n.op == "get_attr"]
    out: dict[str, ConvUse] = {}
    for node in graph.nodes:
        if node.op != "call_module" or full(node.target) not in names:
            continue
        users = list(node.users)
        if not closed and any(u.op == "output" for u in users):
            continue
        use = out[full(node.target)] = ConvUse(how=how)
        read = next((r for r in reads if r.startswith(f"{node.target}.")), None)
        if read is not None:
            use.skip = (f"forward reads its {read.rsplit('.', 1)[-1]} directly, which a block "
                        f"would not have")
        elif calls[node.target] > 1:
            use.skip = f"module is called {calls[node.target]} times in forward"
        elif len(users) > 1:
            norms = [u.target for u in users
                     if u.op == "call_module" and is_norm(modules[u.target])]
            if norms:
                use.skip = f"its output goes to {full(norms[0])} and elsewhere ({len(users)} uses)"
        elif len(users) == 1:
            _single_user(users[0], modules[node.target], modules, calls, full, use)
        bn_read = use.bn and next((r for r in reads if full(r).startswith(f"{use.bn}.")), None)
        if bn_read:
            use.bn, use.skip = None, (f"forward reads {full(bn_read)} directly, which absorbing "
                                      f"its BatchNorm would remove")
    return out


def _target_name(target: Any) -> str:
    """A readable name for an fx call target (a function, method name or module path)."""
    return getattr(target, "__name__", None) or str(target)


def _single_user(user: torch.fx.Node, conv: nn.Module, modules: dict[str, nn.Module],
                 calls: Counter, full: Callable[[str], str], use: ConvUse) -> None:
    """Fill ``use`` for a conv whose output has exactly one user node."""
    if user.op == "call_module":
        target = str(user.target)
        mod = modules.get(target)
        if mod is None or not is_norm(mod):
            return
        reason = bn_skip_reason(mod, cast(nn.Conv2d, conv))
        if reason is None and calls[target] > 1:
            reason = f"its BatchNorm {full(target)} is called {calls[target]} times"
        if reason is None:
            use.bn = full(target)
        else:
            use.skip = reason
    elif "norm" in _target_name(user.target).lower():
        use.skip = (f"followed by a functional {_target_name(user.target)}, which acnet cannot "
                    f"absorb")


def _ancestors(name: str) -> Iterator[str]:
    """Dotted names of the modules above ``name``, nearest first, the root ("") excluded."""
    parts = name.split(".")[:-1]
    while parts:
        yield ".".join(parts)
        parts.pop()


def _graph_pairs(model: nn.Module, names: set[str]) -> tuple[dict[str, ConvUse], str | None]:
    """Pairings provable from graphs in the model's current mode; why the root did not trace."""
    graph = _trace(model)
    if not isinstance(graph, str):
        return _graph_uses(graph, model, "", names, "graph", closed=True), None
    uses: dict[str, ConvUse] = {}
    graphs: dict[str, torch.fx.Graph | str] = {}
    for name in sorted(names):
        for anc in _ancestors(name):
            if anc not in graphs:
                graphs[anc] = _trace(model.get_submodule(anc))
            sub = graphs[anc]
            if isinstance(sub, str):
                continue
            got = _graph_uses(sub, model.get_submodule(anc), anc, {name}, f"graph of {anc}",
                              closed=False)
            if name in got:
                uses[name] = got[name]
                break
    return uses, graph


def _agree(name: str, per_mode: list[tuple[str, ConvUse]]) -> ConvUse:
    """One ConvUse from those of every mode: a pair only if every mode shows the same one."""
    for label, use in per_mode:
        if use.skip:
            return ConvUse(skip=f"{use.skip} (in {label})" if len(per_mode) > 1 else use.skip,
                           how=use.how)
    bns = {use.bn for _, use in per_mode}
    if len(bns) > 1:
        seen = ", ".join(f"{use.bn or 'no BatchNorm'} in {label}" for label, use in per_mode)
        return ConvUse(skip=f"its output goes to different layers by mode ({seen})",
                       how=per_mode[0][1].how)
    hows = list(dict.fromkeys(use.how for _, use in per_mode))
    return ConvUse(bn=bns.pop(), how=" and ".join(hows))


def find_pairs(model: nn.Module, names: set[str], example_inputs: Any = None) -> Pairing:
    """For each conv named in ``names``: the BN it alone feeds, or a proven reason to skip it."""
    out = Pairing()
    hooks = nn.modules.module
    if hooks._global_forward_hooks or hooks._global_forward_pre_hooks:
        for name in names:
            out.uses[name] = ConvUse(skip="global module forward hooks are registered (they may "
                                          "read any conv's output)")
        return out
    modes = _modes(model)
    found: dict[str, list[tuple[str, ConvUse]]] = {n: [] for n in names}
    failed: str | None = None
    for label, flags in modes:
        with _in_mode(model, flags):
            uses, why = _graph_pairs(model, names)
        failed = failed or why
        for name, use in uses.items():
            found[name].append((label, use))
    if failed:
        out.notes.append(f"torch.fx could not trace {type(model).__name__} ({failed}); pairings "
                         f"were proven from submodule graphs"
                         + (" or a probe run on the given inputs" if example_inputs is not None
                            else ""))
    rest = set()
    for name, per_mode in found.items():
        if len(per_mode) == len(modes):
            out.uses[name] = _agree(name, per_mode)
        else:
            rest.add(name)
    if rest and example_inputs is None:
        for name in rest:
            out.uses[name] = ConvUse(skip=_UNTRACED, how=PROBED)
    elif rest:
        _probe_all_modes(model, rest, example_inputs, modes, out)
    return out


# ------------------------------------------------------------------------ probe runs
def _affine(n: int, seed: int, like: Tensor) -> tuple[Tensor, Tensor]:
    """A fixed random per-channel affine map (scale, shift), far from the identity."""
    g = torch.Generator().manual_seed(seed)
    scale = (torch.rand(n, generator=g) * 1.5 + 0.5) * torch.where(
        torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    shift = torch.randn(n, generator=g)
    shape = (1, n) + (1,) * (like.dim() - 2)
    return (scale.to(like.device, like.dtype).view(shape),
            shift.to(like.device, like.dtype).view(shape))


def _run(model: nn.Module, inputs: tuple, flags: list[bool],
         hooks: dict[nn.Module, tuple[Callable | None, Callable | None]]) -> list[Tensor]:
    """Run ``model`` without grad in the mode ``flags``, with (pre-hook, hook) per module.

    Modes, buffers (BN statistics a training-mode run updates) and the RNG (dropout) are
    restored afterwards, and every run starts from the same RNG state, so probing changes
    nothing and two runs differ only by their hooks.
    """
    handles = []
    buffers = {k: v.clone() for k, v in model.state_dict(keep_vars=True).items()
               if isinstance(v, Tensor) and not isinstance(v, nn.Parameter)}
    devices = sorted({t.device.index for t in buffers.values() if t.device.type == "cuda"})
    try:
        for m, (pre, post) in hooks.items():
            if pre is not None:
                handles.append(m.register_forward_pre_hook(pre))
            if post is not None:
                handles.append(m.register_forward_hook(post))
        with _in_mode(model, flags), torch.random.fork_rng(devices=devices), torch.no_grad():
            torch.manual_seed(0)
            out = model(*inputs)
    finally:
        for h in handles:
            h.remove()
        state = model.state_dict(keep_vars=True)
        with torch.no_grad():
            for k, v in buffers.items():
                state[k].copy_(v)
    return [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, Tensor)]


def _record(model: nn.Module, inputs: tuple, flags: list[bool], names: set[str]
            ) -> tuple[dict, dict]:
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
    _run(model, inputs, flags, hooks)
    return conv_out, norm_in


def _seen_pairs(model: nn.Module, names: set[str], conv_out: dict, norm_in: dict
                ) -> dict[str, ConvUse]:
    """What one probe run shows per conv: the BN that read its output tensor, or a skip."""
    modules = dict(model.named_modules())
    seen: dict[str, ConvUse] = {}
    for name in sorted(names):
        outs = conv_out[name]
        use = seen[name] = ConvUse(how=PROBED)
        if not outs:
            use.skip = "not called on the given inputs, so its BatchNorm cannot be proven"
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
                use.bn = readers[0]
            else:
                use.skip = reason
    return seen


def _moves_nothing(model: nn.Module, inputs: tuple, flags: list[bool],
                   pairs: dict[str, str]) -> bool:
    """True if applying each BN right at its conv's output changes no model output.

    Each BN is replaced by a random affine map T; the model with T in the BN's slot must equal
    the model with T applied to the conv's output and the slot passing through. They differ
    exactly when something else reads the conv's output.
    """
    modules = dict(model.named_modules())
    maps = {}
    for i, (conv, _bn) in enumerate(sorted(pairs.items())):
        ref = next(modules[conv].parameters())
        maps[conv] = _affine(modules[conv].out_channels, i, ref.new_zeros(1, 1, 1, 1))
    at_bn: dict[nn.Module, tuple[Callable | None, Callable | None]] = {
        modules[bn]: (None, lambda _m, a, _o, c=conv: a[0] * maps[c][0] + maps[c][1])
        for conv, bn in pairs.items()}
    at_conv: dict[nn.Module, tuple[Callable | None, Callable | None]] = {
        modules[bn]: (None, lambda _m, a, _o: a[0]) for bn in pairs.values()}
    at_conv.update({modules[conv]: (None, lambda _m, _a, o, c=conv: o * maps[c][0] + maps[c][1])
                    for conv in pairs})
    want, got = _run(model, inputs, flags, at_bn), _run(model, inputs, flags, at_conv)
    scale = max((w.abs().max().item() for w in want if w.numel()), default=0.0)
    return len(want) == len(got) and all(
        w.shape == g.shape and (w - g).abs().max().item() <= 1e-5 * max(scale, 1e-12)
        for w, g in zip(want, got, strict=True) if w.numel())


def _probe_mode(model: nn.Module, names: set[str], inputs: tuple, flags: list[bool]
                ) -> dict[str, ConvUse]:
    """Pairings of ``names`` shown by probe runs on ``inputs`` in one mode."""
    conv_out, norm_in = _record(model, inputs, flags, names)
    seen = _seen_pairs(model, names, conv_out, norm_in)
    del conv_out, norm_in
    found = {c: u.bn for c, u in seen.items() if u.bn}
    if found and not _moves_nothing(model, inputs, flags, found):
        for conv, bn in found.items():
            if not _moves_nothing(model, inputs, flags, {conv: bn}):
                seen[conv] = ConvUse(skip=f"its output goes to {bn} and elsewhere (a probe run "
                                          f"on the given inputs showed the difference)",
                                     how=PROBED)
    return seen


def _probe_all_modes(model: nn.Module, names: set[str], example_inputs: Any,
                     modes: list[tuple[str, list[bool]]], out: Pairing) -> None:
    """Prove the pairings of ``names`` by probe runs on the given inputs, in every mode."""
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    per_mode: dict[str, list[tuple[str, ConvUse]]] = {n: [] for n in names}
    failures: list[tuple[str, Exception]] = []
    for label, flags in modes:
        try:
            seen = _probe_mode(model, names, inputs, flags)
        except Exception as exc:  # the user's model on the user's inputs: report, do not crash
            failures.append((label, exc))
            continue
        for name, use in seen.items():
            per_mode[name].append((label, use))
    if len(failures) == len(modes):
        label, error = failures[0]
        raise InputError(f"the model failed on example_inputs in {label}: "
                         f"{first_line(error, 200)}") from error
    for name, uses in per_mode.items():
        if failures:
            label, error = failures[0]
            out.uses[name] = ConvUse(skip=f"the model failed on example_inputs in {label} "
                                          f"({first_line(error, 120)}), so its BatchNorm cannot "
                                          f"be proven in that mode", how=PROBED)
        else:
            out.uses[name] = _agree(name, uses)
