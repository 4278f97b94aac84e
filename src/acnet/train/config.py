"""Training configuration: a plain dataclass, per-model presets, JSON round trip."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..convert import convert
from ..errors import InputError
from ..models import build_model, check_model_name

__all__ = ["TrainConfig", "MODEL_DEFAULTS", "RUNTIME_FIELDS", "resolve", "build_training_model",
           "build_base_model", "settings_diff"]

# The official ACNet repo's CIFAR settings: batch 128, cosine, lr 0.1 (0.2 for ResNet-56),
# weight decay 1e-4 (5e-4 for WRN-16-8), gamma_init 1/3 for the ACB branches.
MODEL_DEFAULTS: dict[str, dict[str, Any]] = {
    "cifar_quick": {"epochs": 150, "lr": 0.1, "weight_decay": 1e-4},
    "vgg16": {"epochs": 400, "lr": 0.1, "weight_decay": 1e-4},
    "vgg16_quarter": {"epochs": 400, "lr": 0.1, "weight_decay": 1e-4},
    "resnet20": {"epochs": 400, "lr": 0.1, "weight_decay": 1e-4},
    "resnet56": {"epochs": 400, "lr": 0.2, "weight_decay": 1e-4},
    "resnet110": {"epochs": 400, "lr": 0.1, "weight_decay": 1e-4},
    "wrn16_8": {"epochs": 400, "lr": 0.1, "weight_decay": 5e-4},
    "densenet40": {"epochs": 400, "lr": 0.1, "weight_decay": 1e-4},
}
_DEFAULT = {"epochs": 90, "lr": 0.1, "weight_decay": 1e-4}

# fields that may differ between a run and its --resume (they do not change the result on CPU)
RUNTIME_FIELDS = {"device", "quiet", "workers", "data_dir", "download"}
# `compile` is not one: inductor's fused kernels round differently from eager (resnet20, one
# step: gradients 1e-3 apart in relative terms), so a run resumed with the other setting would
# reproduce neither run; --resume refuses the switch instead of mixing them silently
# filled from the dataset at run time
DATA_FIELDS = {"in_channels", "num_classes", "input_size"}


@dataclass
class TrainConfig:
    """Everything that defines a training run; ``None`` fields are filled from the presets."""

    model: str = "resnet20"
    dataset: str = "fashion-mnist"
    block: str = "acb"
    epochs: int | None = None
    batch_size: int = 128
    lr: float | None = None
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float | None = None
    warmup_epochs: int = 0
    label_smoothing: float = 0.0
    augment: bool = True  # random crop (zero padding 4) and horizontal flip of training images
    seed: int = 0
    train_limit: int | None = None
    test_limit: int | None = None
    device: str = "auto"
    amp: bool = True
    channels_last: bool = True
    compile: bool = False
    horizontal: bool = True
    vertical: bool = True
    branch_bn: bool = True
    branch_scale: bool = False
    position: str = "center"
    gamma_init: float | None = None
    sync_bn: bool = False
    data_dir: str | None = None
    download: bool = False
    workers: int = 4
    image_size: int = 224
    quiet: bool = False
    # filled from the dataset at run time, so the model can be rebuilt from config.json alone
    in_channels: int | None = None
    num_classes: int | None = None
    input_size: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        """Indented JSON with sorted keys."""
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """From a dict (e.g. config.json); unknown fields are a ValueError."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise InputError(f"unknown config field(s) {sorted(unknown)}")
        return cls(**d)


def _positive_int(cfg: TrainConfig, name: str, optional: bool = False) -> None:
    """``cfg.name`` is an int >= 1 (or None when optional)."""
    v = getattr(cfg, name)
    if optional and v is None:
        return
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise InputError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")


def _check_choices(cfg: TrainConfig) -> None:
    """Model name, block, position and device are known; ACB-only options need acb."""
    check_model_name(cfg.model)
    if cfg.block not in ("acb", "base"):
        raise InputError(f"--block must be 'acb' or 'base', got {cfg.block!r}")
    if cfg.position not in ("center", "corner"):
        raise InputError(f"--position must be 'center' or 'corner', got {cfg.position!r}")
    if cfg.device not in ("auto", "cpu", "cuda") and not cfg.device.startswith("cuda:"):
        raise InputError(f"--device must be auto, cpu or cuda, got {cfg.device!r}")
    if cfg.block == "base" and cfg.gamma_init is not None:
        raise InputError(f"--gamma-init {cfg.gamma_init} sets the BN scale of ACBlocks: it needs "
                         f"--block acb, got --block base")
    if not cfg.augment and cfg.dataset == "imagenet":
        raise InputError("--no-augment applies to the in-memory datasets; imagenet's training "
                         "transforms are fixed (random resized crop and flip)")
    if cfg.branch_scale and (cfg.branch_bn or cfg.block != "acb"):
        raise InputError("--branch-scale (online ACB) needs --block acb and --no-branch-bn")


def _check(cfg: TrainConfig) -> None:
    """Validate a resolved config; ValueError naming the bad option."""
    for name in ("epochs", "batch_size"):
        _positive_int(cfg, name)
    for name in ("train_limit", "test_limit"):
        _positive_int(cfg, name, optional=True)
    _check_choices(cfg)
    if not (cfg.lr > 0 and math.isfinite(cfg.lr)):
        raise InputError(f"--lr must be a positive number, got {cfg.lr}")
    if not cfg.weight_decay >= 0:
        raise InputError(f"--weight-decay must be >= 0, got {cfg.weight_decay}")
    if not 0 <= cfg.label_smoothing < 1:
        raise InputError(f"--label-smoothing must be in [0, 1), got {cfg.label_smoothing}")
    if cfg.warmup_epochs < 0 or (cfg.warmup_epochs and cfg.warmup_epochs >= cfg.epochs):
        raise InputError(f"--warmup-epochs must be in [0, epochs), got {cfg.warmup_epochs}")


def resolve(cfg: TrainConfig) -> TrainConfig:
    """Fill preset values and validate; returns a new config."""
    preset = MODEL_DEFAULTS.get(cfg.model, _DEFAULT)
    values = dataclasses.asdict(cfg)
    for key in ("epochs", "lr", "weight_decay"):
        if values[key] is None:
            values[key] = preset[key]
    if values["gamma_init"] is None and cfg.block == "acb" and cfg.branch_bn:
        values["gamma_init"] = 1 / 3
    out = TrainConfig.from_dict(values)
    _check(out)
    return out


def settings_diff(mine: TrainConfig, theirs: TrainConfig) -> dict[str, tuple[Any, Any]]:
    """{field: (mine, theirs)} for the settings that change a run's result (runtime fields such
    as the device and the data location are not compared)."""
    a, b = dataclasses.asdict(mine), dataclasses.asdict(theirs)
    return {k: (a[k], b.get(k)) for k in a
            if k not in RUNTIME_FIELDS | DATA_FIELDS and a[k] != b.get(k)}


def build_base_model(cfg: TrainConfig) -> nn.Module:
    """The deployable architecture (the model as built, before any ACB conversion)."""
    if cfg.in_channels is None or cfg.num_classes is None:
        raise InputError("config lacks in_channels/num_classes (not a finished acnet run config)")
    return build_model(cfg.model, in_channels=cfg.in_channels, num_classes=cfg.num_classes)


def acb_options(cfg: TrainConfig) -> dict[str, Any]:
    """The ACBlock options of ``convert(preserve=False, **options)`` for an acb run."""
    opts: dict[str, Any] = {"horizontal": cfg.horizontal, "vertical": cfg.vertical,
                            "branch_bn": cfg.branch_bn, "position": cfg.position}
    if cfg.branch_scale:
        opts["branch_scale"] = True
    if cfg.gamma_init is not None:
        opts["gamma_init"] = cfg.gamma_init
    return opts


def build_training_model(cfg: TrainConfig) -> nn.Module:
    """The model as trained: the base model, converted to ACNet for ``block='acb'``."""
    model = build_base_model(cfg)
    if cfg.block == "acb":
        model = convert(model, preserve=False, inplace=True, **acb_options(cfg))
    return model
