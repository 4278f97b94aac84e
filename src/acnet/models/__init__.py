"""Model registry: the paper's CIFAR nets, plus ``tv:NAME`` (torchvision) and ``timm:NAME``."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ..errors import InputError, require
from . import cifar

__all__ = ["MODELS", "build_model", "check_model_name", "model_names"]

MODELS: dict[str, Callable[..., nn.Module]] = {
    "cifar_quick": cifar.cifar_quick,
    "vgg16": cifar.vgg16,
    "vgg16_quarter": cifar.vgg16_quarter,
    "resnet20": cifar.resnet20,
    "resnet56": cifar.resnet56,
    "resnet110": cifar.resnet110,
    "wrn16_8": cifar.wrn16_8,
    "densenet40": cifar.densenet40,
}


def model_names() -> list[str]:
    """The built-in names (``tv:NAME`` and ``timm:NAME`` are resolved on demand)."""
    return sorted(MODELS)


def _first_conv_to(model: nn.Module, in_channels: int) -> nn.Module:
    """Rebuild the model's first conv for ``in_channels`` inputs (e.g. 1 for Fashion-MNIST)."""
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            if m.in_channels == in_channels:
                return model
            if m.groups != 1:
                raise InputError(f"cannot adapt grouped first conv {name} to {in_channels} inputs")
            pair = lambda t: (t[0], t[1])  # noqa: E731 nn.Conv2d keeps 2-tuples
            padding = m.padding if isinstance(m.padding, str) else pair(m.padding)
            new = nn.Conv2d(in_channels, m.out_channels, pair(m.kernel_size), pair(m.stride),
                            padding, pair(m.dilation), 1, m.bias is not None, m.padding_mode)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, new)
            return model
    return model


def _torchvision():
    """torchvision, or an error naming the extra."""
    return require("torchvision", "vision", "tv: models")


def _timm():
    """timm, or an error naming the extra."""
    return require("timm", "timm", "timm: models")


def check_model_name(name: str) -> None:
    """Raise ValueError for a name ``build_model`` cannot build (without building it)."""
    if not isinstance(name, str) or not name:
        raise InputError(f"model name must be a non-empty string, got {name!r}")
    if name in MODELS:
        return
    if name.startswith("tv:"):
        torchvision = _torchvision()
        available = torchvision.models.list_models(module=torchvision.models)
        if name[3:] not in available:
            raise InputError(f"unknown torchvision classification model {name[3:]!r}; "
                             f"e.g. {', '.join(available[:6])}, ...")
    elif name.startswith("timm:"):
        if not _timm().is_model(name[5:]):
            raise InputError(f"unknown timm model {name[5:]!r}")
    else:
        raise InputError(f"unknown model {name!r}; choose one of {', '.join(model_names())}, "
                         f"tv:NAME (torchvision) or timm:NAME")


def build_model(name: str, *, in_channels: int = 3, num_classes: int = 10) -> nn.Module:
    """Build a model by name; raises ValueError for an unknown one."""
    check_model_name(name)
    if name in MODELS:
        return MODELS[name](in_channels=in_channels, num_classes=num_classes)
    if name.startswith("tv:"):
        tv_name = name[3:]
        kwargs = {"num_classes": num_classes, "weights": None}
        if tv_name in ("googlenet", "inception_v3"):
            kwargs.update(aux_logits=False, init_weights=True)
        model = _torchvision().models.get_model(tv_name, **kwargs)
        return _first_conv_to(model, in_channels)
    return _timm().create_model(name[5:], pretrained=False, num_classes=num_classes,
                                in_chans=in_channels)
