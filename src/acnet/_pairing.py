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

import logging
from collections import Counter
from collections.abc import Callable
from typing import Any, cast

import torch
import torch.fx
from torch import nn

from ._fx import ancestors, in_mode, modes_of, trace
from ._probe import probe_all_modes
from ._uses import PROBED, ConvUse, Pairing, agree
from .norms import bn_skip_reason, is_norm

log = logging.getLogger(__name__)

__all__ = ["PROBED", "ConvUse", "Pairing", "find_pairs"]

_UNTRACED = ("torch.fx could not trace the code that reads its output, so its BatchNorm cannot "
             "be proven; pass example_inputs= to convert() to prove it on inputs you choose")


# ------------------------------------------------------------------------ graphs
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


def _graph_pairs(model: nn.Module, names: set[str]) -> tuple[dict[str, ConvUse], str | None]:
    """Pairings provable from graphs in the model's current mode; why the root did not trace."""
    graph = trace(model)
    if not isinstance(graph, str):
        return _graph_uses(graph, model, "", names, "graph", closed=True), None
    uses: dict[str, ConvUse] = {}
    graphs: dict[str, torch.fx.Graph | str] = {}
    for name in sorted(names):
        for anc in ancestors(name):
            if anc not in graphs:
                graphs[anc] = trace(model.get_submodule(anc))
            sub = graphs[anc]
            if isinstance(sub, str):
                continue
            got = _graph_uses(sub, model.get_submodule(anc), anc, {name}, f"graph of {anc}",
                              closed=False)
            if name in got:
                uses[name] = got[name]
                break
    return uses, graph


def find_pairs(model: nn.Module, names: set[str], example_inputs: Any = None) -> Pairing:
    """For each conv named in ``names``: the BN it alone feeds, or a proven reason to skip it."""
    out = Pairing()
    hooks = nn.modules.module
    if hooks._global_forward_hooks or hooks._global_forward_pre_hooks:
        for name in names:
            out.uses[name] = ConvUse(skip="global module forward hooks are registered (they may "
                                          "read any conv's output)")
        return out
    modes = modes_of(model)
    found: dict[str, list[tuple[str, ConvUse]]] = {n: [] for n in names}
    failed: str | None = None
    for label, flags in modes:
        with in_mode(model, flags):
            uses, why = _graph_pairs(model, names)
        failed = failed or why
        for name, use in uses.items():
            found[name].append((label, use))
    if failed:
        out.notes.append(f"torch.fx could not trace {type(model).__name__} ({failed}); pairings "
                         f"are proven from the graphs of traceable submodules"
                         + (", else by a probe run on the given inputs"
                            if example_inputs is not None else
                            "; convs outside them are skipped (pass example_inputs to probe "
                            "them)"))
    rest = set()
    for name, per_mode in found.items():
        if len(per_mode) == len(modes):
            out.uses[name] = agree(name, per_mode)
        else:
            rest.add(name)
    if rest and example_inputs is None:
        for name in rest:
            out.uses[name] = ConvUse(skip=_UNTRACED, how=PROBED)
    elif rest:
        probe_all_modes(model, rest, example_inputs, modes, out)
    return out
