"""convert(): any CNN → ACNet by module surgery; deploy(): back to the original architecture."""

from __future__ import annotations

import copy
import logging
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import fusion
from ._pairing import find_pairs, is_bn_act
from ._text import first_line
from .block import ACBlock

log = logging.getLogger(__name__)

__all__ = ["convert", "deploy", "AbsorbedBatchNorm", "NormActTail", "ConversionReport",
           "LayerReport", "set_submodule"]

_PRESERVE_OPTIONS = {"horizontal", "vertical", "branch_bn", "branch_scale", "position"}
# methods of blocks that re-parameterize themselves (timm's reparameterize_model calls them)
_SELF_FUSING = ("fuse", "reparameterize", "switch_to_deploy")


@dataclass
class LayerReport:
    """What happened to one layer."""

    name: str
    action: str  # converted | skipped | fused | restored-bn | folded | bias-added
    detail: str = ""


@dataclass
class ConversionReport:
    """What convert()/deploy() did, layer by layer; ``print(report)`` gives a table."""

    kind: str
    layers: list[LayerReport] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, name: str, action: str, detail: str = "") -> None:
        self.layers.append(LayerReport(name, action, detail))

    def names(self, action: str) -> list[str]:
        """Names of the layers with this action."""
        return [r.name for r in self.layers if r.action == action]

    @property
    def converted(self) -> list[str]:
        return self.names("converted")

    @property
    def skipped(self) -> dict[str, str]:
        return {r.name: r.detail for r in self.layers if r.action == "skipped"}

    def __str__(self) -> str:
        counts: dict[str, int] = {}
        for r in self.layers:
            counts[r.action] = counts.get(r.action, 0) + 1
        head = f"acnet {self.kind}: " + (
            ", ".join(f"{n} {a}" for a, n in counts.items()) or "nothing to do"
        )
        width = max([len(r.name) for r in self.layers] + [4])
        lines = [head] + [f"  {r.name:<{width}}  {r.action:<11} {r.detail}" for r in self.layers]
        return "\n".join(lines + [f"  note: {n}" for n in self.notes])


class AbsorbedBatchNorm(nn.Module):
    """The slot of a BatchNorm that convert() moved into an ACBlock; deploy() restores it.

    It passes its input through, except for a timm ``BatchNormAct2d``, whose activation (and
    drop) run here, under their original names, while the normalization lives in the block.
    ``pair_id`` links it to its block (a random token: unique across processes and copies).
    """

    def __init__(self, bn: nn.BatchNorm2d, pair_id: str) -> None:
        super().__init__()
        self.pair_id = pair_id
        self.bn_class = type(bn).__name__
        self.num_features = bn.num_features
        self.eps = bn.eps
        template = copy.deepcopy(bn)
        if is_bn_act(bn):
            self.drop = template.drop
            self.act = template.act
        self.__dict__["_template"] = template  # not a submodule: no parameters, no state_dict keys

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if "act" in self._modules:
            return self.act(self.drop(x))
        return x

    def extra_repr(self) -> str:
        return f"{self.bn_class}({self.num_features}, eps={self.eps}) absorbed into an ACBlock"

    def make_bn(self, device: torch.device, dtype: torch.dtype) -> nn.BatchNorm2d:
        """A BN of the original class and settings (eps, momentum, affine), to be filled in."""
        bn = copy.deepcopy(self._template).to(device=device, dtype=dtype)
        if "act" in self._modules:
            bn.drop, bn.act = self.drop, self.act
        return bn


class NormActTail(nn.Module):
    """The drop and activation of a norm+act layer (timm's BatchNormAct2d) whose BN was folded.

    ``deploy(fold_bn=True)`` puts it in the layer's slot, so the activation is never lost.
    """

    def __init__(self, drop: nn.Module, act: nn.Module) -> None:
        super().__init__()
        self.drop = drop
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(x))


def _bn_tail(slot: nn.Module) -> nn.Module:
    """What replaces a norm slot (a BN or an AbsorbedBatchNorm) once the BN is folded into the
    conv before it: its drop + activation (timm's BatchNormAct2d), else Identity."""
    has_act = "act" in slot._modules and "drop" in slot._modules
    return NormActTail(slot.drop, slot.act) if has_act else nn.Identity()


def _unwrap(model: nn.Module, what: str) -> nn.Module:
    """Refuse DDP/DataParallel; look through torch.compile (the result must be compiled again)."""
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        raise TypeError(
            f"{what}() got a {type(model).__name__}: call acnet.{what}(model) on the plain model "
            f"before wrapping it (the wrapper holds references to the old parameters)"
        )
    orig = getattr(model, "_orig_mod", None)
    if isinstance(orig, nn.Module):
        warnings.warn(
            f"{what}() got a torch.compile'd model: working on its original module and returning "
            f"that, uncompiled; call torch.compile on the result", stacklevel=3)
        return orig
    if not isinstance(model, nn.Module):
        raise TypeError(f"{what}() needs a torch.nn.Module, got {type(model).__name__}")
    return model


def _copy(model: nn.Module, what: str) -> nn.Module:
    """A deep copy of ``model``, or a clear error saying to work in place."""
    try:
        return copy.deepcopy(model)
    except Exception as exc:
        raise ValueError(
            f"{what}() could not copy {type(model).__name__} ({first_line(exc, 120)}); pass "
            f"inplace=True to {what} it in place") from exc


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted ``name`` by ``module`` (setattr on its parent)."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _inside_blocks(model: nn.Module) -> set[str]:
    inside = set()
    for name, m in model.named_modules():
        if isinstance(m, ACBlock):
            inside.update(f"{name}.{n}" for n, _ in m.named_modules() if n)
    return inside


def _default_eligible(conv: nn.Conv2d) -> str | None:
    d = conv.kernel_size[0]
    if d < 3:
        return f"{d}x{d} kernel is smaller than 3x3"
    if max(conv.stride) >= d:
        return f"stride {conv.stride} >= kernel {d} (windows do not overlap)"
    if not conv.weight.requires_grad:
        return ("frozen (weight.requires_grad=False): its new branches could not learn; "
                "select it with filter= to convert it with frozen branches")
    return None


def _structural_skip(conv: nn.Module) -> str | None:
    if type(conv) is not nn.Conv2d:
        if torch.nn.utils.parametrize.is_parametrized(conv):
            return "has parametrizations (weight_norm, spectral_norm, ...) that a block would lose"
        if isinstance(conv, nn.Conv2d):
            return f"{type(conv).__name__} subclasses Conv2d with its own forward"
        return f"{type(conv).__name__} is not a Conv2d"
    hooks = list(conv._forward_pre_hooks.values()) + list(conv._forward_hooks.values())
    if hooks:
        kinds = sorted({getattr(h, "__name__", type(h).__name__) for h in hooks})
        return (f"has forward hooks ({', '.join(kinds)}; e.g. a legacy weight_norm) that a block "
                f"would not run")
    kh, kw = conv.kernel_size
    if kh != kw:
        return f"non-square {kh}x{kw} kernel"
    if kh < 2:
        return "1x1 kernel has no asymmetric part"
    return None


def _self_fusing_ancestor(name: str, modules: dict[str, nn.Module]) -> str | None:
    """The nearest module above ``name`` (the root excluded) that re-parameterizes itself."""
    parts = name.split(".")[:-1]
    while parts:
        anc = ".".join(parts)
        if any(callable(getattr(modules[anc], m, None)) for m in _SELF_FUSING):
            return anc
        parts.pop()
    return None


def _freeze_like(module: nn.Module, trainable: bool, training: bool) -> None:
    """Set the training mode and ``requires_grad`` of every parameter of ``module``."""
    module.train(training)
    for p in module.parameters():
        p.requires_grad_(trainable)


def _identity_bn(conv: nn.Conv2d, block: ACBlock) -> nn.BatchNorm2d:
    """A BN whose eval-mode map adds the conv's bias (or nothing): for a conv without a BN."""
    main = block.square_bn if block.branch_bn else block.bn
    w = conv.weight
    bn = nn.BatchNorm2d(conv.out_channels, eps=main.eps, momentum=main.momentum,
                        device=w.device, dtype=w.dtype)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    mean, var, weight, shift, _ = fusion.bn_identity_params(bias.double(), bn.eps, True)
    with torch.no_grad():
        for dst, src in ((bn.running_mean, mean), (bn.running_var, var), (bn.weight, weight),
                         (bn.bias, shift)):
            dst.copy_(src)
    bn.train(conv.training)
    bn.requires_grad_(w.requires_grad)
    return bn


def _square_bn(conv: nn.Conv2d, bn: nn.Module | None, block: ACBlock) -> nn.BatchNorm2d:
    """The square branch's BN: the absorbed BN (conv bias folded in), or an identity BN."""
    if bn is None:
        return _identity_bn(conv, block)
    new = copy.deepcopy(bn) if type(bn) is nn.BatchNorm2d else _as_batchnorm2d(bn)
    if conv.bias is not None:
        with torch.no_grad():
            new.running_mean.sub_(conv.bias.to(new.running_mean.dtype))
    return new


def _new_block(conv: nn.Conv2d, bn: nn.Module | None, preserve: bool,
               options: dict[str, Any]) -> ACBlock:
    """An ACBlock for ``conv`` (and the BN it feeds), with each module's mode and trainability.

    The square branch keeps the conv's and the BN's training mode and ``requires_grad``; the new
    branches are trainable iff the conv is, their convs take the conv's mode and their BNs the
    absorbed BN's mode (frozen statistics stay frozen).
    """
    w = conv.weight
    kw: dict[str, Any] = dict(options)
    if bn is not None:
        kw.setdefault("eps", bn.eps)
        kw.setdefault("momentum", bn.momentum)
        if not preserve:
            kw.setdefault("affine", bn.affine)
    block = ACBlock(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                    conv.padding, conv.dilation, conv.groups, conv.padding_mode,
                    device=w.device, dtype=w.dtype, **kw)
    trainable = w.requires_grad
    bn_training = conv.training if bn is None else bn.training
    block.train(conv.training)
    for name, m in block.named_children():
        _freeze_like(m, trainable, bn_training if name.endswith("bn") else conv.training)
    for p in block.parameters(recurse=False):  # branch scales
        p.requires_grad_(trainable)
    block.acnet_conv_bias = conv.bias is not None
    block.acnet_pair_id = None
    if preserve:
        _preserve(conv, bn, block)
    return block


def _preserve(conv: nn.Conv2d, bn: nn.Module | None, block: ACBlock) -> None:
    """Copy the conv (and BN) into the square branch; zero the new branches' contribution."""
    new_bn = _square_bn(conv, bn, block)
    with torch.no_grad():
        block.square_conv.weight.copy_(conv.weight)
        if block.branch_bn:
            block.square_bn = new_bn
            for name in ("hor_bn", "ver_bn"):
                if name in block._modules:
                    nn.init.zeros_(block._modules[name].weight)
                    nn.init.zeros_(block._modules[name].bias)
        else:
            block.bn = new_bn
            for name in ("hor_conv", "ver_conv"):
                if name in block._modules:
                    nn.init.zeros_(block._modules[name].weight)


def _as_batchnorm2d(bn: nn.Module) -> nn.BatchNorm2d:
    """A plain BatchNorm2d with the statistics, affine parameters and mode of any BN subclass."""
    out = nn.BatchNorm2d(bn.num_features, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                         device=bn.running_mean.device, dtype=bn.running_mean.dtype)
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            src = getattr(bn, name, None)
            if src is not None and getattr(out, name, None) is not None:
                getattr(out, name).copy_(src)
    out.train(bn.training)
    if bn.affine:
        out.weight.requires_grad_(bn.weight.requires_grad)
        out.bias.requires_grad_(bn.bias.requires_grad)
    return out


def _check_options(preserve: bool, options: dict[str, Any]) -> None:
    """Refuse ACBlock options that convert() would otherwise ignore."""
    fresh_only = {"gamma_init", "affine", "eps", "momentum"}
    allowed = _PRESERVE_OPTIONS if preserve else _PRESERVE_OPTIONS | fresh_only
    bad = set(options) - allowed
    if bad:
        hint = " (only with preserve=False)" if not (bad - fresh_only) else ""
        raise TypeError(f"convert() got unsupported ACBlock option(s) {sorted(bad)}{hint}; "
                        f"allowed: {sorted(allowed)}")


def _candidates(model: nn.Module, filter: Callable | None, report: ConversionReport) -> set[str]:
    """Names of the convs to convert; every other conv goes into the report with its reason."""
    inside = _inside_blocks(model)
    names_of: dict[int, list[str]] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        if name not in inside and isinstance(m, nn.modules.conv._ConvNd):
            names_of.setdefault(id(m), []).append(name)
    modules = dict(model.named_modules())
    owners: dict[int, list[str]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(pname)
    out: set[str] = set()
    for names in names_of.values():
        name, conv = names[0], modules[names[0]]
        reason = _structural_skip(conv)
        if reason is None and len(names) > 1:
            reason = f"module is shared (also registered as {', '.join(names[1:])})"
        tied = [p for p in owners.get(id(conv.weight), []) if p != f"{name}.weight"]
        if reason is None and tied:
            reason = f"its weight is tied to {', '.join(tied)}: a block would untie it"
        anc = _self_fusing_ancestor(name, modules) if reason is None else None
        if anc is not None:
            reason = (f"inside {anc} ({type(modules[anc]).__name__}), a block that "
                      f"re-parameterizes itself and reads this conv's weight")
        if reason is None:
            if filter is not None:
                reason = None if filter(name, conv) else "excluded by filter"
            else:
                reason = _default_eligible(conv)
        if reason is None:
            out.add(name)
        else:
            report.add(name, "skipped", reason)
    return out


def convert(
    model: nn.Module,
    *,
    preserve: bool = True,
    inplace: bool = False,
    filter: Callable[[str, nn.Conv2d], bool] | None = None,
    example_inputs: Any = None,
    **acb_options: Any,
) -> nn.Module:
    """Replace every eligible ``nn.Conv2d`` of ``model`` by an :class:`ACBlock`.

    A conv whose output provably goes only into a BatchNorm2d takes that BN into its block (the
    BN's slot becomes :class:`AbsorbedBatchNorm`, an Identity). Pairs come from the torch.fx
    graph; for code fx cannot trace, a probe run on ``example_inputs`` (a tensor or a tuple of
    forward arguments; guessed image batches when None) proves them, and what cannot be proven
    is skipped with the reason. ``preserve=True`` copies the conv and BN so the converted model
    computes what the original did; ``preserve=False`` gives fresh blocks built with
    ``acb_options``. Training modes and ``requires_grad`` are kept. The report is
    ``result.acnet_report``.
    """
    model = _unwrap(model, "convert")
    if filter is not None and not callable(filter):
        raise TypeError(f"filter must be callable(name, module) -> bool, got {filter!r}")
    _check_options(preserve, acb_options)
    if not inplace:
        model = _copy(model, "convert")
    report = ConversionReport("convert")
    candidates = _candidates(model, filter, report)
    pairing = find_pairs(model, candidates, example_inputs) if candidates else None
    if pairing is not None and pairing.notes:
        for note in pairing.notes:
            warnings.warn(note, stacklevel=2)
        report.notes.extend(pairing.notes)
    modules = dict(model.named_modules())
    for name in sorted(candidates, key=list(modules).index):
        use = pairing.uses[name]
        if use.skip:
            report.add(name, "skipped", use.skip)
            continue
        report.add(name, "converted", _replace(model, modules, name, use, preserve, acb_options))
    order = {n: i for i, n in enumerate(modules)}
    report.layers.sort(key=lambda r: order.get(r.name, len(order)))
    model.acnet_report = report
    log.debug("%s", report)
    return model


def _replace(model: nn.Module, modules: dict[str, nn.Module], name: str, use: Any,
             preserve: bool, options: dict[str, Any]) -> str:
    """Put an ACBlock in place of conv ``name`` (absorbing its BN); the report's detail."""
    conv = modules[name]
    bn = modules[use.bn] if use.bn else None
    block = _new_block(conv, bn, preserve, options)
    if bn is None:
        detail = "no BatchNorm after it: the block adds one"
    else:
        block.acnet_pair_id = uuid.uuid4().hex
        set_submodule(model, use.bn, AbsorbedBatchNorm(bn, block.acnet_pair_id))
        detail = f"absorbed {use.bn}" + ("" if use.how == "graph" else f" (proven by {use.how})")
    set_submodule(model, name, block)
    return detail


def _fused_conv(block: ACBlock, kernel: torch.Tensor, bias: torch.Tensor | None) -> nn.Conv2d:
    """The deployed conv of ``block``: its geometry, the given weights, the square conv's mode."""
    conv = block.new_conv(bias=bias is not None)
    with torch.no_grad():
        conv.weight.copy_(kernel)
        if bias is not None:
            conv.bias.copy_(bias)
    square = block.fused_conv if block.is_fused else block.square_conv
    _freeze_like(conv, square.weight.requires_grad, square.training)
    return conv


def _main_bn(block: ACBlock) -> nn.Module | None:
    """The BN whose mode and trainability a restored BN takes (the square branch's)."""
    if block.is_fused:
        return None
    return block.square_bn if block.branch_bn else block.bn


def _nearest_slot(name: str, pid: str | None, slots: dict[str, list[str]]) -> str | None:
    """The AbsorbedBatchNorm slot of ``pid`` that shares the longest name prefix with ``name``.

    Copies of a converted sub-network share pair ids; each block's own slot is the one in its
    copy, i.e. the nearest in the module tree.
    """
    if pid is None or not slots.get(pid):
        return None
    parts = name.split(".")

    def shared(slot: str) -> int:
        n = 0
        for a, b in zip(parts, slot.split(".")):
            if a != b:
                break
            n += 1
        return n

    best = max(slots[pid], key=shared)
    slots[pid].remove(best)
    return best


def _restore_bn(model: nn.Module, block: ACBlock, name: str, slot: str,
                kernel: torch.Tensor, bias: torch.Tensor) -> None:
    """Deployed form with the original tree: fused conv, and a BN in the slot adding ``bias``."""
    absorbed: AbsorbedBatchNorm = model.get_submodule(slot)
    ref = next(block.parameters())
    bn = absorbed.make_bn(ref.device, ref.dtype)
    mean, var, weight, shift, scale = fusion.bn_identity_params(bias, bn.eps, bn.affine)
    with torch.no_grad():
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(var)
        if bn.affine:
            bn.weight.copy_(weight)
            bn.bias.copy_(shift)
    main = _main_bn(block)
    bn.train(block.training if main is None else main.training)
    if bn.affine and main is not None and main.affine:
        bn.weight.requires_grad_(main.weight.requires_grad)
        bn.bias.requires_grad_(main.bias.requires_grad)
    conv_bias = torch.zeros_like(bias) if block.acnet_conv_bias else None
    set_submodule(model, name, _fused_conv(block, kernel * scale.view(-1, 1, 1, 1), conv_bias))
    set_submodule(model, slot, bn)


def deploy(model: nn.Module, *, inplace: bool = False, fold_bn: bool = False) -> nn.Module:
    """Fuse every :class:`ACBlock` into one conv and restore the BatchNorms convert() absorbed.

    The result has the original module tree and state_dict keys. ``fold_bn=True`` gives the
    minimal form instead: every conv→BN pair (converted or not) becomes one conv with bias, and
    a norm+act layer (timm's BatchNormAct2d) keeps its activation. Training modes and
    ``requires_grad`` are kept. The report is ``result.acnet_report``.
    """
    model = _unwrap(model, "deploy")
    if not inplace:
        model = _copy(model, "deploy")
    report = ConversionReport("deploy")
    slots: dict[str, list[str]] = {}
    for name, m in model.named_modules():
        if isinstance(m, AbsorbedBatchNorm):
            slots.setdefault(m.pair_id, []).append(name)
    blocks = [(n, m) for n, m in model.named_modules() if isinstance(m, ACBlock)]
    top = [(n, m) for n, m in blocks if not any(n.startswith(o + ".") for o, _ in blocks)]
    for name, block in top:
        slot = _nearest_slot(name, block.acnet_pair_id, slots)
        report.add(name, *_deploy_block(model, name, block, slot, fold_bn))
    for pid, left in slots.items():
        for slot in left:
            report.notes.append(f"{slot}: an absorbed BatchNorm whose ACBlock is gone "
                                f"(pair {pid[:8]}); left as is")
    if fold_bn:
        _fold_plain_pairs(model, report)
    model.acnet_report = report
    log.debug("%s", report)
    return model


def _deploy_block(model: nn.Module, name: str, block: ACBlock, slot: str | None,
                  fold_bn: bool) -> tuple[str, str]:
    """Replace one block by its deployed form; (action, detail) for the report."""
    kernel, bias = block.fused_weights()
    if slot is not None and not fold_bn:
        _restore_bn(model, block, name, slot, kernel, bias)
        return "fused", f"{slot} restored as {model.get_submodule(slot).__class__.__name__}"
    set_submodule(model, name, _fused_conv(block, kernel, bias))
    if slot is not None:
        set_submodule(model, slot, _bn_tail(model.get_submodule(slot)))
        return "fused", f"{slot} folded into the conv bias"
    if block.acnet_conv_bias:
        return "fused", ""
    return "bias-added", "the original conv had neither bias nor BatchNorm: a bias was added"


def _fold_plain_pairs(model: nn.Module, report: ConversionReport) -> None:
    """Fold every remaining Conv2d → BatchNorm2d pair into one conv with bias."""
    modules = dict(model.named_modules())
    names = {n for n, m in modules.items() if type(m) is nn.Conv2d and not m._forward_hooks
             and not m._forward_pre_hooks and _self_fusing_ancestor(n, modules) is None}
    if not names:
        return
    pairing = find_pairs(model, names)
    for name in sorted(names, key=list(modules).index):
        use = pairing.uses.get(name)
        if use is None or use.bn is None or use.skip:
            continue
        conv, bn = modules[name], modules[use.bn]
        k, b = fusion.fold_bn(conv.weight.detach().double(),
                              None if conv.bias is None else conv.bias.detach(),
                              bn.running_mean, bn.running_var, bn.eps,
                              None if bn.weight is None else bn.weight.detach(),
                              None if bn.bias is None else bn.bias.detach())
        new = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                        conv.padding, conv.dilation, conv.groups, bias=True,
                        padding_mode=conv.padding_mode, device=conv.weight.device,
                        dtype=conv.weight.dtype)
        with torch.no_grad():
            new.weight.copy_(k)
            new.bias.copy_(b)
        _freeze_like(new, conv.weight.requires_grad, conv.training)
        set_submodule(model, name, new)
        set_submodule(model, use.bn, _bn_tail(bn))
        report.add(name, "folded", f"{use.bn} folded into the conv")
