"""convert(): any CNN → ACNet by module surgery on the user's own module tree."""

from __future__ import annotations

import copy
import logging
import uuid
import warnings
from collections.abc import Callable
from typing import Any, ClassVar, cast

import torch
from torch import nn

from . import fusion, norms
from ._pairing import find_pairs
from ._surgery import (
    ConversionReport,
    LayerReport,
    attach_report,
    copy_model,
    freeze_like,
    replace_module,
    report_of,
    self_fusing_ancestor,
    set_submodule,
    unwrap,
)
from ._uses import PROBED, ConvUse, Pairing
from .block import ACBlock
from .errors import InputError, InputTypeError
from .norms import Norm
from .options import BRANCH_INITS, check_convert_options

log = logging.getLogger(__name__)

__all__ = [
    "SMALL_INIT",
    "AbsorbedBatchNorm",
    "ConversionReport",
    "LayerReport",
    "convert",
    "set_submodule",
]

SMALL_INIT = 0.01  # branch_init="small": the new branches' scale (DyRep's last-BN gamma)


class AbsorbedBatchNorm(nn.Module):
    """The slot of a BatchNorm that convert() moved into an ACBlock; deploy() restores it.

    It passes its input through, except for a norm+act layer (timm's BatchNormAct2d,
    FrozenBatchNormAct2d), whose drop and activation run here, under their original names,
    while the normalization lives in the block. The block links to it (``ACBlock.origin()``);
    ``pair_id`` is a random token naming the pair in reports (and linking blocks pickled by
    acnet 0.3).
    """

    __jit_ignored_attributes__: ClassVar[list[str]] = ["_template"]

    def __init__(self, bn: Norm, pair_id: str) -> None:
        super().__init__()
        self.pair_id = pair_id
        self.bn_class = type(bn).__name__
        self.num_features = norms.num_features(bn)
        self.eps = float(bn.eps)
        self.has_act = norms.has_act(bn)
        template = copy.deepcopy(bn)
        self.drop = template.drop if self.has_act else nn.Identity()
        self.act = template.act if self.has_act else nn.Identity()
        self.__dict__["_template"] = template  # not a submodule: no parameters, no state_dict keys

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(x))

    def extra_repr(self) -> str:
        return f"{self.bn_class}({self.num_features}, eps={self.eps}) absorbed into an ACBlock"

    def make_bn(self, device: torch.device, dtype: torch.dtype) -> Norm:
        """A norm of the original class and settings (eps, momentum, affine), to be filled in."""
        bn: Norm = copy.deepcopy(self._template).to(device=device, dtype=dtype)
        if self.has_act:
            bn.drop, bn.act = self.drop, self.act
        return bn


# ------------------------------------------------------------------------ which convs
def _inside_blocks(model: nn.Module) -> set[str]:
    inside: set[str] = set()
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
                "select it with include= to convert it with frozen branches")
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


def _candidates(model: nn.Module, include: Callable | None, report: ConversionReport
                ) -> set[str]:
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
        anc = self_fusing_ancestor(name, modules) if reason is None else None
        if anc is not None:
            reason = (f"inside {anc} ({type(modules[anc]).__name__}), a block that "
                      f"re-parameterizes itself and reads this conv's weight")
        if reason is None:
            if include is not None:
                reason = None if include(name, conv) else "excluded by include="
            else:
                reason = _default_eligible(conv)
        if reason is None:
            out.add(name)
        else:
            report.add(name, "skipped", reason)
    return out


# ------------------------------------------------------------------------ building blocks
def _identity_bn(conv: nn.Conv2d, eps: float, momentum: float | None) -> nn.BatchNorm2d:
    """A BN whose eval-mode map adds the conv's bias (or nothing): for a conv without a BN."""
    w = conv.weight
    bn = nn.BatchNorm2d(conv.out_channels, eps=eps, momentum=momentum, device=w.device,
                        dtype=w.dtype)
    bias = conv.bias if conv.bias is not None else torch.zeros(conv.out_channels, device=w.device,
                                                               dtype=w.dtype)
    mean, var, weight, shift, _ = fusion.bn_identity_params(bias.double(), bn.eps, True)
    with torch.no_grad():
        for name, src in (("running_mean", mean), ("running_var", var), ("weight", weight),
                          ("bias", shift)):
            getattr(bn, name).copy_(src)
    bn.train(conv.training)
    bn.requires_grad_(w.requires_grad)
    return bn


def _main_norm(conv: nn.Conv2d, bn: Norm | None, block: ACBlock) -> Norm:
    """The square branch's norm (``bn`` of the merged forms): the absorbed norm (conv bias
    folded into its running mean), an acnet FrozenBatchNorm2d for a frozen one, or an
    identity BN for a conv without one."""
    if bn is None:
        main: Norm = block.square_bn if block.branch_bn else block.bn
        return _identity_bn(conv, main.eps, main.momentum)
    new: Norm
    if norms.is_frozen_norm(bn):
        new = norms.as_frozen(bn)
    elif type(bn) in (nn.BatchNorm2d, nn.SyncBatchNorm):
        new = copy.deepcopy(bn)
    else:
        new = norms.as_batchnorm2d(bn)
    if conv.bias is not None:
        with torch.no_grad():
            new.running_mean.sub_(conv.bias.to(new.running_mean.dtype))
    return new


def _two(t: tuple[int, ...]) -> tuple[int, int]:
    """A conv's (height, width) pair as a pair."""
    return t[0], t[1]


def _new_block(conv: nn.Conv2d, bn: Norm | None, preserve: bool, branch_init: str,
               options: dict[str, Any]) -> ACBlock:
    """An ACBlock for ``conv`` (and the norm it feeds), with each module's mode and trainability.

    The square branch keeps the conv's and the BN's training mode and ``requires_grad``; the new
    branches are trainable iff the conv is, their convs take the conv's mode and their BNs the
    absorbed BN's mode (frozen statistics stay frozen). A frozen norm makes the block the
    online form with that norm after the merged kernel.
    """
    w = conv.weight
    kw: dict[str, Any] = dict(options)
    frozen = bn is not None and norms.is_frozen_norm(bn)
    if frozen:
        kw.update(branch_bn=False, branch_scale=True)
        kw.pop("affine", None)
        kw.pop("sub_batch", None)  # the online form has no branch statistics
    elif bn is not None:
        kw.setdefault("eps", bn.eps)
        kw.setdefault("momentum", bn.momentum)
        if not preserve:
            kw.setdefault("affine", bn.affine)
    padding = conv.padding if isinstance(conv.padding, str) else _two(conv.padding)
    block = ACBlock(conv.in_channels, conv.out_channels, conv.kernel_size[0], _two(conv.stride),
                    padding, _two(conv.dilation), conv.groups, conv.padding_mode,
                    device=w.device, dtype=w.dtype, **kw)
    trainable = w.requires_grad
    bn_training = conv.training if bn is None else bn.training
    block.train(conv.training)
    for name, m in block.named_children():
        freeze_like(m, trainable, bn_training if name.endswith("bn") else conv.training)
    for p in block.parameters(recurse=False):  # branch scales
        p.requires_grad_(trainable)
    block.set_origin(conv_bias=conv.bias is not None, slot=None)
    if type(bn) is nn.SyncBatchNorm:  # the branches sync their statistics like the original
        nn.SyncBatchNorm.convert_sync_batchnorm(block, bn.process_group)
        if block.sub_batch is not None:
            warnings.warn("sub_batch has no effect on a block whose norms are SyncBatchNorm: "
                          "they take their statistics over every image of every process (the "
                          "full ACB)", stacklevel=4)
    if preserve:
        _preserve(conv, bn, block, branch_init)
    elif frozen:
        block.bn = norms.as_frozen(bn)
    return block


def _preserve(conv: nn.Conv2d, bn: Norm | None, block: ACBlock, branch_init: str) -> None:
    """Copy the conv (and norm) into the square branch; start the new branches as chosen."""
    main = _main_norm(conv, bn, block)
    with torch.no_grad():
        block.square_conv.weight.copy_(conv.weight)
        if block.branch_bn:
            block.square_bn = main
        else:
            block.bn = main
        new = block.branches()[1:]
        for b in new:
            norm: Any = b.norm  # the branch's BatchNorm, its scale, or None
            if branch_init == "zero" and block.branch_bn:
                nn.init.zeros_(norm.weight)
                nn.init.zeros_(norm.bias)
            elif branch_init == "zero":
                nn.init.zeros_(b.conv.weight)
            elif block.branch_bn:
                nn.init.constant_(norm.weight, SMALL_INIT)
                nn.init.zeros_(norm.bias)
            elif block.branch_scale:
                nn.init.constant_(norm, SMALL_INIT)
            else:
                b.conv.weight.mul_(SMALL_INIT)
        if branch_init == "small" and new:
            _compensate(block)


def _compensate(block: ACBlock) -> None:
    """Subtract the new branches' eval-mode kernel from the square kernel, so the block keeps
    computing the original function (DyRep's way to add branches to a trained conv).

    Output channels whose square branch is scaled by zero cannot compensate: there the new
    branches are zeroed instead.
    """
    dtype = torch.float64
    branches = block.branches()
    scale = block.branch_scales(dtype).detach()
    dead = scale[0] == 0
    if dead.any():
        for b in branches[1:]:
            b.conv.weight[dead] = 0
    kernels = [b.conv.weight.detach().to(dtype) for b in branches]
    extra = block.merge([torch.zeros_like(kernels[0]), *kernels[1:]], list(scale.unbind(0)))
    ratio = torch.where(dead, torch.zeros_like(scale[0]), 1 / scale[0])
    block.square_conv.weight.sub_((extra * ratio.view(-1, 1, 1, 1))
                                  .to(block.square_conv.weight.dtype))


# ------------------------------------------------------------------------ convert
def _choose(include: Callable | None, filter: Callable | None) -> Callable | None:
    """The conv selector from ``include=`` or the deprecated ``filter=``."""
    if filter is not None:
        warnings.warn("convert(filter=...) is deprecated; use include=", DeprecationWarning,
                      stacklevel=3)
        if include is not None:
            raise InputTypeError("convert() got both include= and filter=; pass include= only")
        include = filter
    if include is not None and not callable(include):
        raise InputTypeError(f"include must be callable(name, module) -> bool, got {include!r}")
    return include


def convert(
    model: nn.Module,
    *,
    preserve: bool = True,
    inplace: bool = False,
    include: Callable[[str, nn.Conv2d], bool] | None = None,
    example_inputs: Any = None,
    branch_init: str = "zero",
    filter: Callable[[str, nn.Conv2d], bool] | None = None,
    **acb_options: Any,
) -> nn.Module:
    """Replace every eligible ``nn.Conv2d`` of ``model`` by an ``ACBlock``.

    Eligible: a square kernel of at least 3 with stride below it, trainable, not shared or
    tied, not inside a block that re-parameterizes itself; ``include(name, conv) -> bool``
    chooses instead. A conv whose output provably goes only into a BatchNorm (plain, sync,
    timm's BatchNormAct2d, or a frozen one) takes that norm into its block and the norm's slot
    becomes ``AbsorbedBatchNorm``. Proof comes from torch.fx graphs in training and eval
    mode; for code fx cannot trace, from probe runs on ``example_inputs`` (a tensor or a tuple
    of forward arguments), reported as "proven on the given inputs". What cannot be proven is
    skipped with the reason, in ``result.acnet_report``.

    ``preserve=True`` copies the conv and norm into the square branch, so the converted model
    computes what the original did (eval mode, and training mode for conv→BN pairs); the new
    branches start at zero (``branch_init="zero"``) or small and random with the square kernel
    compensating (``"small"``, DyRep-style; eval mode exact). ``preserve=False`` gives fresh
    blocks. ``acb_options`` are ACBlock options (``ACBOptions``). A frozen norm
    makes its block the online form (branch scales, the frozen norm after the merged kernel):
    no batch statistics, so tiny detection batches train it. Training modes and
    ``requires_grad`` are kept. ``filter=`` is the deprecated name of ``include=``.

    Args:
        model: any ``nn.Module`` (torchvision, timm, your own; a bare ``nn.Conv2d`` too).
        preserve: keep the function: copy each conv and its norm into the square branch
            (True), or build fresh blocks for training from scratch (False).
        inplace: convert ``model`` itself instead of a copy.
        include: ``include(name, conv) -> bool`` chooses the convs to convert (default: every
            eligible one).
        example_inputs: a tensor or tuple of forward arguments for models torch.fx cannot
            trace: conv→norm pairs are then proven by probe runs on them.
        branch_init: with ``preserve=True``, how the new branches start: ``"zero"`` or
            ``"small"``.
        filter: deprecated name of ``include``.
        **acb_options: ``ACBOptions`` fields (``horizontal``, ``vertical``, ``branch_bn``,
            ``branch_scale``, ``position``, ``gamma_init``, ``sub_batch``, ``affine``, ``eps``,
            ``momentum``).

    Returns:
        The converted model; ``result.acnet_report`` lists each conv converted or skipped.

    Raises:
        ValueError: an unknown option or value (``acnet.errors.InputError``).
        TypeError: an option of the wrong type.
    """
    model = unwrap(model, "convert")
    include = _choose(include, filter)
    for name, flag in (("preserve", preserve), ("inplace", inplace)):
        if not isinstance(flag, bool):
            raise InputTypeError(f"{name} must be a bool, got {flag!r}")
    if branch_init not in BRANCH_INITS:
        raise InputError(f"branch_init must be one of {BRANCH_INITS}, got {branch_init!r}")
    if branch_init != "zero" and not preserve:
        raise InputError(f"branch_init={branch_init!r} needs preserve=True (fresh blocks start "
                         f"from their own initialization)")
    check_convert_options(preserve, acb_options)
    if not inplace:
        model = copy_model(model, "convert")
    if type(model) is nn.Conv2d:  # a bare conv: the block replaces the root itself
        holder = _convert_tree(nn.Sequential(model), preserve, include, example_inputs,
                               branch_init, acb_options)
        out, report = holder.get_submodule("0"), report_of(holder)
        for r in report.layers:
            r.name = "(root)" if r.name == "0" else r.name
        attach_report(out, report)
        return out
    return _convert_tree(model, preserve, include, example_inputs, branch_init, acb_options)


def _tied_norm(name: str, bn: Norm, model: nn.Module) -> str | None:
    """Why the norm at ``name`` cannot move into a block: a parameter or buffer of it that
    another module shares (absorbing would untie them)."""
    aliases = [n for n, m in model.named_modules(remove_duplicate=False) if m is bn]
    mine = {id(t) for t in [*bn.parameters(), *bn.buffers()]}
    for kind in ("named_parameters", "named_buffers"):
        for other, t in getattr(model, kind)(remove_duplicate=False):
            if id(t) in mine and not any(other.startswith(f"{a}.") for a in aliases):
                return f"its BatchNorm {name} shares a tensor with {other}: a block would untie it"
    return None


def _convert_tree(model: nn.Module, preserve: bool, include: Callable | None,
                  example_inputs: Any, branch_init: str, acb_options: dict[str, Any]
                  ) -> nn.Module:
    """convert() on a model whose root is not itself replaced."""
    report = ConversionReport("convert")
    candidates = _candidates(model, include, report)
    pairing = find_pairs(model, candidates, example_inputs) if candidates else Pairing()
    if pairing.notes:
        for note in pairing.notes:
            warnings.warn(note, stacklevel=3)
        report.notes.extend(pairing.notes)
    modules = dict(model.named_modules())
    for name in sorted(candidates, key=list(modules).index):
        use = pairing.uses[name]
        if use.bn and not use.skip:
            use.skip = _tied_norm(use.bn, modules[use.bn], model)
        if use.skip:
            report.add(name, "skipped", use.skip)
            continue
        detail = _replace(model, modules, name, use, preserve, branch_init, acb_options)
        report.add(name, "converted", detail)
    order = {n: i for i, n in enumerate(modules)}
    report.layers.sort(key=lambda r: order.get(r.name, len(order)))
    attach_report(model, report)
    log.debug("%s", report)
    return model


def _replace(model: nn.Module, modules: dict[str, nn.Module], name: str, use: ConvUse,
             preserve: bool, branch_init: str, options: dict[str, Any]) -> str:
    """Put an ACBlock in place of conv ``name`` (absorbing its norm); the report's detail."""
    conv = cast(nn.Conv2d, modules[name])
    bn = modules[use.bn] if use.bn else None
    block = _new_block(conv, bn, preserve, branch_init, options)
    if bn is None:
        detail = "no BatchNorm after it: the block adds one"
    else:
        slot = AbsorbedBatchNorm(bn, uuid.uuid4().hex)
        block.set_origin(conv_bias=block.origin().conv_bias, slot=slot)
        slots = replace_module(model, bn, slot)
        detail = f"absorbed {use.bn}"
        if len(slots) > 1:
            detail += f" (also registered as {', '.join(s for s in slots if s != use.bn)})"
        if norms.is_frozen_norm(bn):
            detail += " (frozen: online form, the frozen norm after the merged kernel)"
        if use.how == PROBED:
            detail += f" (proven on {PROBED})"
        elif use.how != "graph":
            detail += f" (proven by {use.how})"
    set_submodule(model, name, block)
    return detail
