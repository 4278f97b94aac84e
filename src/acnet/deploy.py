"""deploy(): every ACBlock back to one conv, every absorbed norm back in its slot."""

from __future__ import annotations

import logging
from typing import cast

import torch
from torch import Tensor, nn

from . import fusion, norms
from ._bias import carry_biases
from ._pairing import find_pairs
from ._surgery import (
    ConversionReport,
    attach_report,
    copy_model,
    freeze_like,
    replace_module,
    report_of,
    self_fusing_ancestor,
    unwrap,
)
from .block import ACBlock
from .convert import AbsorbedBatchNorm
from .errors import InputTypeError
from .norms import Norm

log = logging.getLogger(__name__)

__all__ = ["NormActTail", "deploy"]


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


def _bn_tail(slot: Norm) -> nn.Module:
    """What replaces a norm slot (a norm or an AbsorbedBatchNorm) once the norm is folded into
    the conv before it: its drop + activation (norm+act layers), else Identity."""
    act = slot.has_act if isinstance(slot, AbsorbedBatchNorm) else norms.has_act(slot)
    return NormActTail(slot.drop, slot.act) if act else nn.Identity()


def _fused_conv(block: ACBlock, kernel: torch.Tensor, bias: torch.Tensor | None) -> nn.Conv2d:
    """The deployed conv of ``block``: its geometry, the given weights, the square conv's mode."""
    conv = block.new_conv(bias=bias is not None)
    with torch.no_grad():
        conv.weight.copy_(kernel)
        if bias is not None:
            cast(Tensor, conv.bias).copy_(bias)
    square = block.fused_conv if block.fused_conv is not None else block.square_conv
    freeze_like(conv, square.weight.requires_grad, square.training)
    if square.weight.is_contiguous(memory_format=torch.channels_last) and not \
            square.weight.is_contiguous():
        conv.to(memory_format=torch.channels_last)
    return conv


def _main_bn(block: ACBlock) -> nn.Module | None:
    """The norm whose mode and trainability a restored norm takes (the square branch's)."""
    if block.is_fused:
        return None
    return block.square_bn if block.branch_bn else block.bn


def _legacy_slot(name: str, pid: str | None, slots: dict[str, list[str]]) -> str | None:
    """For a block pickled by acnet 0.3 (linked by a pair id): the AbsorbedBatchNorm slot of
    ``pid`` that shares the longest name prefix with ``name`` (copies of a converted
    sub-network share pair ids; each block's own slot is the nearest in the module tree)."""
    if pid is None or not slots.get(pid):
        return None
    parts = name.split(".")

    def shared(slot: str) -> int:
        n = 0
        for a, b in zip(parts, slot.split("."), strict=False):
            if a != b:
                break
            n += 1
        return n

    best = max(slots[pid], key=shared)
    slots[pid].remove(best)
    return best


def _restore_bn(model: nn.Module, block: ACBlock, slot: str, kernel: torch.Tensor,
                bias: torch.Tensor) -> tuple[nn.Conv2d, Norm]:
    """Deployed form with the original tree: (fused conv, a norm of the original class for the
    slot, set to add ``bias``)."""
    absorbed = cast(AbsorbedBatchNorm, model.get_submodule(slot))
    ref = next(block.parameters())
    bn = absorbed.make_bn(ref.device, ref.dtype)
    main: Norm = _main_bn(block)
    if isinstance(bn, nn.modules.batchnorm._BatchNorm) and isinstance(
            main, nn.modules.batchnorm._BatchNorm):  # settings changed since convert
        bn.eps, bn.momentum = main.eps, main.momentum
    affine = getattr(bn, "affine", True)
    mean, var, weight, shift, scale = fusion.bn_identity_params(bias, bn.eps, affine)
    with torch.no_grad():
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(var)
        counted = getattr(main, "num_batches_tracked", None)
        if counted is not None and getattr(bn, "num_batches_tracked", None) is not None:
            bn.num_batches_tracked.copy_(counted)  # the trained BN's count, not convert time's
        if affine:
            bn.weight.copy_(weight)
            bn.bias.copy_(shift)
    bn.train(block.training if main is None else main.training)
    trainable = (isinstance(getattr(bn, "weight", None), nn.Parameter) and main is not None
                 and isinstance(getattr(main, "weight", None), nn.Parameter))
    if trainable:
        bn.weight.requires_grad_(main.weight.requires_grad)
        bn.bias.requires_grad_(main.bias.requires_grad)
    conv_bias = torch.zeros_like(bias) if block.origin().conv_bias else None
    return _fused_conv(block, kernel * scale.view(-1, 1, 1, 1), conv_bias), bn


def _deploy_block(model: nn.Module, block: ACBlock, slot: str | None, fold_bn: bool
                  ) -> tuple[str, str]:
    """Replace one block (in every slot that holds it) by its deployed form; (action, detail)."""
    kernel, bias = block.fused_weights()
    if slot is not None and not fold_bn:
        absorbed = model.get_submodule(slot)
        conv, bn = _restore_bn(model, block, slot, kernel, bias)
        replace_module(model, block, conv)
        replace_module(model, absorbed, bn)
        return "fused", f"{slot} restored as {type(bn).__name__}"
    replace_module(model, block, _fused_conv(block, kernel, bias))
    if slot is not None:
        absorbed = model.get_submodule(slot)
        replace_module(model, absorbed, _bn_tail(absorbed))
        return "fused", f"{slot} folded into the conv bias"
    if block.origin().conv_bias:
        return "fused", ""
    return "bias-added", "the original conv had neither bias nor BatchNorm: a bias was added"


def deploy(model: nn.Module, *, inplace: bool = False, fold_bn: bool = False) -> nn.Module:
    """Fuse every ``ACBlock`` into one conv and restore the norms convert() absorbed.

    The result has the original module tree, classes (frozen norms included) and state_dict
    keys. ``fold_bn=True`` gives the minimal form instead: every conv→BN pair (converted or
    not) becomes one conv with bias, and a norm+act layer (timm's BatchNormAct2d) keeps its
    activation. Training modes and ``requires_grad`` are kept. The report is
    ``result.acnet_report``.

    Args:
        model: a model converted by ``convert`` (or holding ``ACBlock`` modules).
        inplace: change ``model`` itself instead of a copy.
        fold_bn: also fold every conv→BN pair into one conv with bias.

    Returns:
        The deployed model: the original architecture, loadable strictly into a fresh instance
        of the original class.
    """
    model = unwrap(model, "deploy")
    for name, flag in (("inplace", inplace), ("fold_bn", fold_bn)):
        if not isinstance(flag, bool):
            raise InputTypeError(f"{name} must be a bool, got {flag!r}")
    if not inplace:
        model = copy_model(model, "deploy")
    if isinstance(model, ACBlock):  # a bare block: its fused conv replaces the root itself
        holder = _deploy_tree(nn.Sequential(model), fold_bn)
        out, report = holder.get_submodule("0"), report_of(holder)
        for r in report.layers:
            r.name = "(root)" if r.name == "0" else r.name
        attach_report(out, report)
        return out
    return _deploy_tree(model, fold_bn)


def _deploy_tree(model: nn.Module, fold_bn: bool) -> nn.Module:
    """deploy() on a model whose root is not itself replaced."""
    report = ConversionReport("deploy")
    free = {id(m): (n, m) for n, m in model.named_modules() if isinstance(m, AbsorbedBatchNorm)}
    blocks = [(n, m) for n, m in model.named_modules() if isinstance(m, ACBlock)]
    top = [(n, m) for n, m in blocks if not any(n.startswith(o + ".") for o, _ in blocks)]
    legacy: dict[str, list[str]] = {}
    for n, m in free.values():
        legacy.setdefault(m.pair_id, []).append(n)
    biased = []
    for name, block in top:
        origin = block.origin()
        linked = free.pop(id(origin.slot), None) if origin.slot is not None else None
        slot: str | None
        if linked:
            slot = linked[0]
            legacy[linked[1].pair_id].remove(linked[0])
        else:  # a 0.3 pickle, or a block copied apart from its slot: the nearest slot by id
            slot = _legacy_slot(name, origin.legacy_pair or getattr(origin.slot, "pair_id", None),
                                legacy)
            if slot is not None:
                free.pop(id(model.get_submodule(slot)), None)
        action, detail = _deploy_block(model, block, slot, fold_bn)
        if action == "bias-added" and not fold_bn:
            biased.append(name)  # decided below, once every block is a conv again
        else:
            report.add(name, action, detail)
    if biased:
        carry_biases(model, biased, report)
    for slot, m in free.values():
        report.notes.append(f"{slot}: an absorbed BatchNorm whose ACBlock is gone "
                            f"(pair {m.pair_id[:8]}); left as is")
    if fold_bn:
        _fold_plain_pairs(model, report)
    attach_report(model, report)
    log.debug("%s", report)
    return model


def _fold_plain_pairs(model: nn.Module, report: ConversionReport) -> None:
    """Fold every remaining Conv2d → norm pair into one conv with bias."""
    modules = dict(model.named_modules())
    names = {n for n, m in modules.items() if type(m) is nn.Conv2d and not m._forward_hooks
             and not m._forward_pre_hooks and self_fusing_ancestor(n, modules) is None}
    if not names:
        return
    pairing = find_pairs(model, names)
    for name in sorted(names, key=list(modules).index):
        use = pairing.uses.get(name)
        if use is None or use.bn is None or use.skip:
            continue
        conv, bn = modules[name], modules[use.bn]
        with torch.no_grad():
            k, b = fusion.fold_bn(conv.weight.double(), conv.bias, bn.running_mean,
                                  bn.running_var, bn.eps, getattr(bn, "weight", None),
                                  getattr(bn, "bias", None))
        new = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                        conv.padding, conv.dilation, conv.groups, bias=True,
                        padding_mode=conv.padding_mode, device=conv.weight.device,
                        dtype=conv.weight.dtype)
        with torch.no_grad():
            new.weight.copy_(k)
            cast(Tensor, new.bias).copy_(b)
        freeze_like(new, conv.weight.requires_grad, conv.training)
        replace_module(model, conv, new)
        replace_module(model, bn, _bn_tail(bn))
        report.add(name, "folded", f"{use.bn} folded into the conv")
