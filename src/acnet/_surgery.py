"""Module surgery shared by convert() and deploy(): the report, copies, replacing submodules."""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from typing import Any, cast

from torch import nn

from ._text import first_line
from .errors import InputError, InputTypeError

__all__ = [
    "SELF_FUSING",
    "ConversionReport",
    "LayerReport",
    "attach_report",
    "copy_model",
    "freeze_like",
    "replace_module",
    "report_of",
    "self_fusing_ancestor",
    "set_submodule",
    "unwrap",
]

# methods of blocks that re-parameterize themselves (timm's reparameterize_model calls them)
SELF_FUSING = ("fuse", "reparameterize", "switch_to_deploy")


@dataclass
class LayerReport:
    """What happened to one layer."""

    name: str
    action: str  # converted | skipped | fused | restored-bn | folded | bias-added | bias-moved
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
            ", ".join(f"{n} {a}" for a, n in counts.items()) or "nothing to do")
        width = max([len(r.name) for r in self.layers] + [4])
        lines = [head] + [f"  {r.name:<{width}}  {r.action:<11} {r.detail}" for r in self.layers]
        return "\n".join(lines + [f"  note: {n}" for n in self.notes])


def attach_report(model: nn.Module, report: ConversionReport) -> None:
    """Give ``model`` its ``acnet_report`` (a plain attribute: no state_dict entry)."""
    model.__dict__["acnet_report"] = report


def report_of(model: nn.Module) -> ConversionReport:
    """The ``acnet_report`` convert() or deploy() attached to ``model``."""
    return cast(ConversionReport, model.__dict__["acnet_report"])


def unwrap(model: nn.Module, what: str) -> nn.Module:
    """Refuse DDP/DataParallel and unmaterialised lazy modules; look through torch.compile
    (the result must be compiled again)."""
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        raise InputTypeError(
            f"{what}() got a {type(model).__name__}: call acnet.{what}(model) on the plain model "
            f"before wrapping it (the wrapper holds references to the old parameters)")
    orig = getattr(model, "_orig_mod", None)
    if isinstance(orig, nn.Module):
        warnings.warn(
            f"{what}() got a torch.compile'd model: working on its original module and returning "
            f"that, uncompiled; call torch.compile on the result", stacklevel=3)
        return orig
    if not isinstance(model, nn.Module):
        raise InputTypeError(f"{what}() needs a torch.nn.Module, got {type(model).__name__}")
    lazy = [n or "(root)" for n, m in model.named_modules()
            if isinstance(m, nn.modules.lazy.LazyModuleMixin)
            and cast(Any, m).has_uninitialized_params()]
    if lazy:
        raise InputError(
            f"{what}() got a model whose lazy modules have not run yet ({', '.join(lazy[:3])}"
            f"{', ...' if len(lazy) > 3 else ''}): their parameters do not exist until the first "
            f"forward pass; run the model once on an input, then {what} it")
    return model


def copy_model(model: nn.Module, what: str) -> nn.Module:
    """A deep copy of ``model``, or a clear error saying to work in place."""
    try:
        return copy.deepcopy(model)
    except Exception as exc:
        raise InputError(
            f"{what}() could not copy {type(model).__name__} ({first_line(exc, 120)}); pass "
            f"inplace=True to {what} it in place") from exc


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted ``name`` by ``module`` (setattr on its parent)."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def replace_module(model: nn.Module, old: nn.Module, new: nn.Module) -> list[str]:
    """Put ``new`` in every slot that holds ``old`` (a module registered under several names
    stays one module); returns the names replaced."""
    done = []
    for name, parent in list(model.named_modules()):
        for child, m in list(parent._modules.items()):
            if m is old:
                setattr(parent, child, new)
                done.append(f"{name}.{child}" if name else child)
    return done


def freeze_like(module: nn.Module, trainable: bool, training: bool) -> None:
    """Set the training mode and ``requires_grad`` of every parameter of ``module``."""
    module.train(training)
    for p in module.parameters():
        p.requires_grad_(trainable)


def self_fusing_ancestor(name: str, modules: dict[str, nn.Module]) -> str | None:
    """The nearest module above ``name`` (the root excluded) that re-parameterizes itself."""
    parts = name.split(".")[:-1]
    while parts:
        anc = ".".join(parts)
        if any(callable(getattr(modules[anc], m, None)) for m in SELF_FUSING):
            return anc
        parts.pop()
    return None
