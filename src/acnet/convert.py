"""convert(): any CNN → ACNet by module surgery; deploy(): back to the original architecture."""

from __future__ import annotations

import copy
import itertools
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ._graph import absorbable_bn, analyze_convs, is_bn_act
from .block import ACBlock
from .fusion import bn_identity_params, fold_bn

log = logging.getLogger(__name__)

__all__ = ["convert", "deploy", "AbsorbedBatchNorm", "ConversionReport", "LayerReport"]

_PRESERVE_OPTIONS = {"horizontal", "vertical", "branch_bn", "position"}
_pair_ids = itertools.count(1)


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
    """

    def __init__(self, bn: nn.BatchNorm2d, pair_id: int) -> None:
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


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
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
    return None


def _structural_skip(conv: nn.Module) -> str | None:
    if type(conv) is not nn.Conv2d:
        if isinstance(conv, nn.Conv2d):
            return f"{type(conv).__name__} subclasses Conv2d with its own forward"
        return f"{type(conv).__name__} is not a Conv2d"
    kh, kw = conv.kernel_size
    if kh != kw:
        return f"non-square {kh}x{kw} kernel"
    if kh < 2:
        return "1x1 kernel has no asymmetric part"
    return None


def _new_block(conv: nn.Conv2d, bn: nn.BatchNorm2d | None, preserve: bool,
               options: dict[str, Any]) -> ACBlock:
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
    block.train(conv.training)
    if not preserve:
        return block
    with torch.no_grad():
        block.square_conv.weight.copy_(conv.weight)
        main_bn = block.square_bn if block.branch_bn else block.bn
        if bn is not None:
            new_bn = copy.deepcopy(bn) if type(bn) is nn.BatchNorm2d else _as_batchnorm2d(bn)
            if conv.bias is not None:
                new_bn.running_mean.sub_(conv.bias.to(new_bn.running_mean.dtype))
        else:
            new_bn = nn.BatchNorm2d(conv.out_channels, eps=main_bn.eps, momentum=main_bn.momentum,
                                    device=w.device, dtype=w.dtype)
            bias = conv.bias if conv.bias is not None else torch.zeros_like(new_bn.running_mean)
            mean, var, weight, shift, _ = bn_identity_params(bias.double(), new_bn.eps, True)
            new_bn.running_mean.copy_(mean)
            new_bn.running_var.copy_(var)
            new_bn.weight.copy_(weight)
            new_bn.bias.copy_(shift)
        new_bn.train(conv.training)
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
    return block


def _as_batchnorm2d(bn: nn.Module) -> nn.BatchNorm2d:
    """A plain BatchNorm2d with the statistics and affine parameters of any BN subclass."""
    out = nn.BatchNorm2d(bn.num_features, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                         device=bn.running_mean.device, dtype=bn.running_mean.dtype)
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            src = getattr(bn, name, None)
            if src is not None and getattr(out, name, None) is not None:
                getattr(out, name).copy_(src)
    out.train(bn.training)
    return out


def convert(
    model: nn.Module,
    *,
    preserve: bool = True,
    inplace: bool = False,
    filter: Callable[[str, nn.Conv2d], bool] | None = None,
    **acb_options: Any,
) -> nn.Module:
    """Replace every eligible ``nn.Conv2d`` of ``model`` by an :class:`ACBlock`.

    A conv whose output goes only into a BatchNorm2d takes that BN into its block (the BN's slot
    becomes :class:`AbsorbedBatchNorm`, an Identity). ``preserve=True`` copies the conv and BN so
    the converted model computes what the original did; ``preserve=False`` gives fresh blocks
    built with ``acb_options``. The report is ``result.acnet_report``.
    """
    model = _unwrap(model, "convert")
    if filter is not None and not callable(filter):
        raise TypeError(f"filter must be callable(name, module) -> bool, got {filter!r}")
    allowed = _PRESERVE_OPTIONS if preserve else _PRESERVE_OPTIONS | {
        "gamma_init", "affine", "eps", "momentum"}
    bad = set(acb_options) - allowed
    if bad:
        hint = " (only with preserve=False)" if not (bad - {"gamma_init", "affine", "eps",
                                                             "momentum"}) else ""
        raise TypeError(f"convert() got unsupported ACBlock option(s) {sorted(bad)}{hint}; "
                        f"allowed: {sorted(allowed)}")
    if not inplace:
        model = copy.deepcopy(model)
    report = ConversionReport("convert")
    inside = _inside_blocks(model)
    names_of: dict[int, list[str]] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        if name in inside or not isinstance(m, nn.modules.conv._ConvNd):
            continue
        names_of.setdefault(id(m), []).append(name)
    modules = dict(model.named_modules())
    candidates: set[str] = set()
    for names in names_of.values():
        name = names[0]
        conv = modules[name]
        reason = _structural_skip(conv)
        if reason is None and len(names) > 1:
            reason = f"module is shared (also registered as {', '.join(names[1:])})"
        if reason is None:
            if filter is not None:
                reason = None if filter(name, conv) else "excluded by filter"
            else:
                reason = _default_eligible(conv)
        if reason is None:
            candidates.add(name)
        else:
            report.add(name, "skipped", reason)

    analysis = analyze_convs(model, candidates) if candidates else None
    if analysis is not None and not analysis.traced:
        msg = (f"torch.fx could not trace {type(model).__name__} ({analysis.trace_error}); "
               f"paired convs with BatchNorms by module order inside each parent")
        warnings.warn(msg, stacklevel=2)
        report.notes.append(msg)
    for name in sorted(candidates, key=list(modules).index):
        use = analysis.uses[name]
        if use.skip:
            report.add(name, "skipped", use.skip)
            continue
        conv = modules[name]
        bn = modules[use.bn] if use.bn else None
        block = _new_block(conv, bn, preserve, acb_options)
        block.acnet_conv_bias = conv.bias is not None
        block.acnet_pair_id = None
        if bn is not None:
            pid = next(_pair_ids)
            block.acnet_pair_id = pid
            _set(model, use.bn, AbsorbedBatchNorm(bn, pid))
            detail = f"absorbed {use.bn}" + (" (by module order)" if use.how == "order" else "")
        else:
            detail = "no BatchNorm after it: the block adds one"
        _set(model, name, block)
        report.add(name, "converted", detail)
    order = {n: i for i, n in enumerate(modules)}
    report.layers.sort(key=lambda r: order.get(r.name, len(order)))
    model.acnet_report = report
    log.debug("%s", report)
    return model


def _fused_conv(block: ACBlock, kernel: torch.Tensor, bias: torch.Tensor | None) -> nn.Conv2d:
    ref = next(block.parameters())
    conv = nn.Conv2d(block.in_channels, block.out_channels, block.kernel_size, block.stride,
                     block.padding, block.dilation, block.groups, bias=bias is not None,
                     padding_mode=block.padding_mode, device=ref.device, dtype=ref.dtype)
    with torch.no_grad():
        conv.weight.copy_(kernel)
        if bias is not None:
            conv.bias.copy_(bias)
    conv.train(block.training)
    return conv


def deploy(model: nn.Module, *, inplace: bool = False, fold_bn: bool = False) -> nn.Module:
    """Fuse every :class:`ACBlock` into one conv and restore the BatchNorms convert() absorbed.

    The result has the original module tree and state_dict keys. ``fold_bn=True`` gives the
    minimal form instead: every conv→BN pair (converted or not) becomes one conv with bias.
    The report is ``result.acnet_report``.
    """
    model = _unwrap(model, "deploy")
    if not inplace:
        model = copy.deepcopy(model)
    report = ConversionReport("deploy")
    slots = {m.pair_id: name for name, m in model.named_modules()
             if isinstance(m, AbsorbedBatchNorm)}
    blocks = [(n, m) for n, m in model.named_modules() if isinstance(m, ACBlock)]
    top = [(n, m) for n, m in blocks if not any(n.startswith(o + ".") for o, _ in blocks)]
    for name, block in top:
        kernel, bias = block.fused_weights()
        pid = getattr(block, "acnet_pair_id", None)
        had_bias = getattr(block, "acnet_conv_bias", True)
        slot = slots.get(pid) if pid is not None else None
        if slot is not None and not fold_bn:
            absorbed: AbsorbedBatchNorm = model.get_submodule(slot)
            ref = next(block.parameters())
            bn = absorbed.make_bn(ref.device, ref.dtype)
            mean, var, weight, shift, scale = bn_identity_params(bias, bn.eps, bn.affine)
            with torch.no_grad():
                bn.running_mean.copy_(mean)
                bn.running_var.copy_(var)
                if bn.affine:
                    bn.weight.copy_(weight)
                    bn.bias.copy_(shift)
            bn.train(block.training)
            kernel = kernel * scale.view(-1, 1, 1, 1)
            conv_bias = torch.zeros_like(bias) if had_bias else None
            _set(model, name, _fused_conv(block, kernel, conv_bias))
            _set(model, slot, bn)
            report.add(name, "fused", f"{slot} restored as {absorbed.bn_class}")
        else:
            _set(model, name, _fused_conv(block, kernel, bias))
            if slot is not None:
                _set(model, slot, nn.Identity())
                report.add(name, "fused", f"{slot} folded into the conv bias")
            elif had_bias:
                report.add(name, "fused", "")
            else:
                report.add(name, "bias-added",
                           "the original conv had neither bias nor BatchNorm: a bias was added")
    if fold_bn:
        _fold_plain_pairs(model, report)
    model.acnet_report = report
    log.debug("%s", report)
    return model


def _fold_plain_pairs(model: nn.Module, report: ConversionReport) -> None:
    """Fold every remaining Conv2d → BatchNorm2d pair into one conv with bias."""
    modules = dict(model.named_modules())
    names = {n for n, m in modules.items() if type(m) is nn.Conv2d}
    if not names:
        return
    analysis = analyze_convs(model, names)
    for name in sorted(names, key=list(modules).index):
        use = analysis.uses.get(name)
        if use is None or use.bn is None or use.skip:
            continue
        conv, bn = modules[name], modules[use.bn]
        if not absorbable_bn(bn, conv):
            continue
        k, b = fold_bn(conv.weight.detach().double(),
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
        new.train(conv.training)
        _set(model, name, new)
        _set(model, use.bn, nn.Identity())
        report.add(name, "folded", f"{use.bn} folded into the conv")
