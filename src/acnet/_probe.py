"""Probe runs: proof of a conv→BN pairing for code torch.fx cannot trace, on inputs the user
gives, in every mode. Hooks show the BN reads the conv's output tensor; a numeric check (a random
affine map moved from the BN's slot to the conv's output must change no model output) shows
nothing else does. Modes, statistics and the RNG are restored after every run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ._fx import in_mode
from ._text import first_line
from ._uses import PROBED, ConvUse, Pairing, agree
from .errors import InputError
from .norms import bn_skip_reason, is_norm

__all__ = ["probe_all_modes"]


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
        with in_mode(model, flags), torch.random.fork_rng(devices=devices), torch.no_grad():
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


def probe_all_modes(model: nn.Module, names: set[str], example_inputs: Any,
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
            out.uses[name] = agree(name, uses)
