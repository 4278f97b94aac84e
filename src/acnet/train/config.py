"""Training configuration: a plain dataclass, per-model presets, JSON round trip."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..convert import convert
from ..errors import InputError
from ..models import build_model, check_model_name
from ..options import BRANCH_INITS, PRESERVE_OPTIONS, TRAIN_OPTIONS, ACBOptions, check_sub_batch

log = logging.getLogger(__name__)

__all__ = [
    "MODEL_DEFAULTS",
    "OPTIMIZERS",
    "RUNTIME_FIELDS",
    "TrainConfig",
    "acb_options",
    "build_base_model",
    "build_training_model",
    "resolve",
    "settings_diff",
]

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
OPTIMIZERS = ("sgd", "adamw")
ADAMW_DEFAULTS = {"lr": 1e-3, "weight_decay": 0.05}  # the presets' lr is SGD's

# fields that may differ between a run and its --resume (they do not change the result on CPU)
RUNTIME_FIELDS = {"device", "quiet", "workers", "data_dir", "download"}
# `compile` is not one: inductor's fused kernels round differently from eager (resnet20, one
# step: gradients 1e-3 apart in relative terms), so a run resumed with the other setting would
# reproduce neither run; --resume refuses the switch instead of mixing them silently
# filled from the dataset at run time
DATA_FIELDS = {"in_channels", "num_classes", "input_size"}
# fields of earlier versions' config.json, dropped when read (``extra`` was never used)
DEPRECATED_FIELDS = {"extra"}


@dataclass
class TrainConfig:
    """Everything that defines a training run; ``None`` fields are filled from the presets."""

    model: str = "resnet20"
    dataset: str = "fashion-mnist"
    block: str = "acb"
    epochs: int | None = None
    batch_size: int = 128
    optimizer: str = "sgd"
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
    classes: list[int] | None = None  # train and test on these classes, relabelled 0..k-1
    # start from these weights (run dir, deployed .safetensors, or a state_dict file of the
    # same architecture); with block "acb" the ACNet starts as exactly that function
    init_from: str | None = None
    new_head: bool = False  # with init_from: re-initialise the classifier even if it fits
    branch_init: str = "zero"  # with init_from and block "acb": how the new branches start
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
    # branch BN statistics from the first N images of each batch (int) or that fraction (float)
    sub_batch: int | float | None = None
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

    @property
    def schedule(self) -> tuple[int, float, float]:
        """(epochs, lr, weight_decay) of a resolved config (``resolve`` fills them)."""
        if self.epochs is None or self.lr is None or self.weight_decay is None:
            raise InputError("the config is not resolved: call acnet.train.config.resolve()")
        return self.epochs, self.lr, self.weight_decay

    @property
    def data_shape(self) -> tuple[int, int, int]:
        """(in_channels, num_classes, input_size) the run's dataset filled in."""
        if self.in_channels is None or self.num_classes is None:
            raise InputError("config lacks in_channels/num_classes (not a finished acnet run "
                             "config)")
        return self.in_channels, self.num_classes, self.input_size or self.image_size

    def to_json(self) -> str:
        """Indented JSON with sorted keys."""
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """From a dict (e.g. config.json); unknown fields are an error, deprecated ones dropped."""
        names = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k not in DEPRECATED_FIELDS or k in names}
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
        raise InputError(f"{name} must be a positive integer, got {v!r}", params=(name,))


def _check_choices(cfg: TrainConfig) -> None:
    """Model name, block, position, optimizer and device are known; ACB-only options need acb."""
    check_model_name(cfg.model)
    for name, choices in (("block", ("acb", "base")), ("position", ("center", "corner")),
                          ("optimizer", OPTIMIZERS), ("branch_init", BRANCH_INITS)):
        if getattr(cfg, name) not in choices:
            raise InputError(f"{name} must be one of {', '.join(choices)}, got "
                             f"{getattr(cfg, name)!r}", params=(name,))
    if cfg.device not in ("auto", "cpu", "cuda") and not cfg.device.startswith("cuda:"):
        raise InputError(f"device must be auto, cpu or cuda, got {cfg.device!r}",
                         params=("device",))
    if cfg.block == "base" and cfg.gamma_init is not None:
        raise InputError(f"gamma_init={cfg.gamma_init} sets the BN scale of ACBlocks: it needs "
                         f"block='acb', got block='base'", params=("gamma_init", "block"))
    if not cfg.augment and cfg.dataset == "imagenet":
        raise InputError("augment=False applies to the in-memory datasets; imagenet's training "
                         "transforms are fixed (random resized crop and flip)",
                         params=("augment",))
    if cfg.branch_scale and (cfg.branch_bn or cfg.block != "acb"):
        raise InputError("branch_scale (online ACB) needs block='acb' and branch_bn=False",
                         params=("branch_scale", "block", "branch_bn"))
    if cfg.sub_batch is not None:
        check_sub_batch(cfg.sub_batch)
        if not cfg.branch_bn:
            raise InputError(f"sub_batch={cfg.sub_batch!r} sets where the branch BatchNorms take "
                             f"their statistics: it needs branch_bn=True",
                             params=("sub_batch", "branch_bn"))
        if cfg.sync_bn:
            raise InputError("sub_batch statistics are each process's own; with sync_bn the "
                             "branch norms would take statistics over every image of every "
                             "process instead (the full ACB), so the two do not combine",
                             params=("sub_batch", "sync_bn"))
    if cfg.block == "base":
        defaults = ACBOptions()
        changed = [n for n in PRESERVE_OPTIONS if getattr(cfg, n) != getattr(defaults, n)]
        if changed:
            raise InputError(f"{', '.join(f'{n}={getattr(cfg, n)!r}' for n in changed)}: "
                             f"ACBlock options, which need block='acb', got block='base'",
                             params=(*changed, "block"))


def _check_finetune(cfg: TrainConfig) -> None:
    """The options of starting from trained weights, and of class subsets."""
    if cfg.classes is not None:
        if cfg.dataset == "imagenet":
            raise InputError("classes selects classes of the in-memory datasets, not imagenet",
                             params=("classes",))
        if not isinstance(cfg.classes, list) or not cfg.classes or not all(
                isinstance(c, int) and not isinstance(c, bool) for c in cfg.classes):
            raise InputError(f"classes must be a non-empty list of class indices, got "
                             f"{cfg.classes!r}", params=("classes",))
    if cfg.init_from is None:
        for name, default in (("new_head", False), ("branch_init", "zero")):
            if getattr(cfg, name) != default:
                raise InputError(f"{name}={getattr(cfg, name)!r} applies to a run that starts "
                                 f"from trained weights: it needs init_from",
                                 params=(name, "init_from"))
        return
    if not isinstance(cfg.init_from, str) or not cfg.init_from:
        raise InputError(f"init_from must be a path, got {cfg.init_from!r}",
                         params=("init_from",))
    if cfg.gamma_init is not None:
        raise InputError("gamma_init sets the BN scale of fresh ACBlocks; with init_from the "
                         "blocks start from the trained BatchNorms",
                         params=("gamma_init", "init_from"))
    if cfg.branch_init != "zero" and cfg.block != "acb":
        raise InputError(f"branch_init={cfg.branch_init!r} sets how ACB branches start: it "
                         f"needs block='acb'", params=("branch_init", "block"))


def _check(cfg: TrainConfig) -> None:
    """Validate a resolved config; InputError naming the bad parameter."""
    for name in ("epochs", "batch_size"):
        _positive_int(cfg, name)
    for name in ("train_limit", "test_limit"):
        _positive_int(cfg, name, optional=True)
    _check_choices(cfg)
    _check_finetune(cfg)
    epochs, lr, weight_decay = cfg.schedule
    if not (lr > 0 and math.isfinite(lr)):
        raise InputError(f"lr must be a positive number, got {lr}", params=("lr",))
    if not weight_decay >= 0:
        raise InputError(f"weight_decay must be >= 0, got {weight_decay}",
                         params=("weight_decay",))
    if not 0 <= cfg.label_smoothing < 1:
        raise InputError(f"label_smoothing must be in [0, 1), got {cfg.label_smoothing}",
                         params=("label_smoothing",))
    if cfg.warmup_epochs < 0 or (cfg.warmup_epochs and cfg.warmup_epochs >= epochs):
        raise InputError(f"warmup_epochs must be in [0, epochs), got {cfg.warmup_epochs}",
                         params=("warmup_epochs",))


def resolve(cfg: TrainConfig) -> TrainConfig:
    """Fill preset values and validate; returns a new config."""
    preset = dict(MODEL_DEFAULTS.get(cfg.model, _DEFAULT))
    if cfg.optimizer == "adamw":
        preset.update(ADAMW_DEFAULTS)
    values = dataclasses.asdict(cfg)
    for key in ("epochs", "lr", "weight_decay"):
        if values[key] is None:
            values[key] = preset[key]
    if values["classes"] is not None:
        values["classes"] = list(values["classes"])
    fresh = cfg.init_from is None
    if values["gamma_init"] is None and cfg.block == "acb" and cfg.branch_bn and fresh:
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
    in_channels, num_classes, _ = cfg.data_shape
    return build_model(cfg.model, in_channels=in_channels, num_classes=num_classes)


def acb_options(cfg: TrainConfig) -> dict[str, Any]:
    """The ACBlock options of an acb run: ``convert(preserve=False, **options)`` from scratch,
    the preserve-compatible ones when the run starts from trained weights."""
    names = TRAIN_OPTIONS if cfg.init_from is None else PRESERVE_OPTIONS
    opts = {name: getattr(cfg, name) for name in names}
    return {k: v for k, v in opts.items() if not (k == "gamma_init" and v is None)}


def build_training_model(cfg: TrainConfig, base: nn.Module | None = None) -> nn.Module:
    """The model as trained: the base model (``base``, or a fresh one), converted to ACNet for
    ``block='acb'``. A run that starts from trained weights converts them with the function
    preserved (the structure does not depend on the weights, so a fresh base rebuilds it)."""
    model = build_base_model(cfg) if base is None else base
    if cfg.block == "acb":
        preserve = cfg.init_from is not None
        model = convert(model, preserve=preserve, inplace=True,
                        branch_init=cfg.branch_init if preserve else "zero", **acb_options(cfg))
    return model
