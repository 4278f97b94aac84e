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
from ..data.datasets import STREAMED
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
DATA_FIELDS = {"in_channels", "num_classes", "input_size", "class_names"}
# None means "from the images" (folder datasets) or "the dataset's default": a resume takes the
# run's values, so None there differs from nothing (runs of earlier versions stored
# image_size=224, the old default, for every dataset)
AUTO_FIELDS = {"mean", "std", "image_size"}
# fields of earlier versions' config.json, dropped when read (``extra`` was never used)
DEPRECATED_FIELDS = {"extra"}


@dataclass
class TrainConfig:
    """Everything that defines a training run; ``None`` fields are filled from the presets.

    Each field is also an ``acnet train`` flag (``batch_size`` is ``--batch-size``).

    Attributes:
        model: a built-in (``cifar_quick``, ``vgg16``, ``vgg16_quarter``, ``resnet20/56/110``,
            ``wrn16_8``, ``densenet40``), ``tv:NAME`` or ``timm:NAME``.
        dataset: ``fashion-mnist``, ``cifar10``, ``cifar100``, ``synthetic``, ``folder`` (your
            images in ``data_dir``) or ``imagenet``.
        block: ``acb`` (train as ACNet, deploy the original architecture) or ``base``.
        epochs: epochs (None: the model's preset: 150 for cifar_quick, 400 for the other
            CIFAR models, 90 for ``tv:``/``timm:``).
        batch_size: images per step, over all processes.
        optimizer: ``sgd`` or ``adamw``.
        lr: peak learning rate of the cosine schedule (None: the preset's).
        momentum: SGD momentum.
        nesterov: Nesterov momentum.
        weight_decay: weight decay (None: the preset's).
        warmup_epochs: linear warm-up epochs before the cosine schedule.
        label_smoothing: cross-entropy label smoothing in [0, 1).
        augment: random crop and flip of training images (folders: random resized crop).
        seed: seed of initialisation, shuffling and augmentation.
        train_limit: train on N images (the first N; of a folder, N drawn by a fixed seed).
        test_limit: test on N images.
        classes: train and test on these classes of an in-memory dataset, relabelled 0..k-1.
        init_from: start from trained weights: a run directory, a deployed .safetensors or a
            state_dict file of the same architecture.
        new_head: with ``init_from``: re-initialise the classifier even if its shape fits.
        branch_init: with ``init_from`` and ``acb``: ``zero`` or ``small`` new branches.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        amp: bf16 autocast on CUDA.
        channels_last: train in the channels_last memory format.
        compile: train and evaluate under ``torch.compile``.
        horizontal: ACBlock option: the 1×d branch.
        vertical: ACBlock option: the d×1 branch.
        branch_bn: ACBlock option: a BatchNorm per branch.
        branch_scale: ACBlock option: the online form's branch scales.
        position: ACBlock option: ``center`` or ``corner``.
        gamma_init: ACBlock option: initial BatchNorm scale (None: 1/3 with branch BN).
        sub_batch: ACBlock option: branch statistics from the first N images or that
            fraction of each batch.
        sync_bn: SyncBatchNorm under DDP.
        data_dir: where the dataset is (default: the usual places).
        download: download the dataset if missing.
        workers: DataLoader workers of folder datasets.
        image_size: folder datasets: the side of the square crops (None: imagenet 224;
            folder the images' median shorter side, at most 224).
        val_fraction: folder datasets in ``DIR/<class>/`` layout: the share of each class held
            out for testing, by a fixed seed.
        mean: per-channel normalisation mean (None: from the training images of a folder,
            the dataset's own otherwise).
        std: per-channel normalisation std (as ``mean``).
        quiet: no progress bar.
        in_channels: filled from the data at run time.
        num_classes: filled from the data at run time.
        input_size: filled from the data at run time.
        class_names: filled from a folder dataset's class folders at run time.
    """

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
    # folder datasets: the side images are cropped to (None: imagenet 224; folder: the images'
    # median shorter side, at most 224)
    image_size: int | None = None
    # folder datasets in DIR/<class>/ layout: the share of each class held out for testing
    val_fraction: float = 0.1
    # per-channel normalisation of folder datasets (None: from the training images; ImageNet's
    # for imagenet) and of in-memory ones (None: the dataset's)
    mean: list[float] | None = None
    std: list[float] | None = None
    quiet: bool = False
    # filled from the dataset at run time, so the model can be rebuilt from config.json alone
    in_channels: int | None = None
    num_classes: int | None = None
    input_size: int | None = None
    class_names: list[str] | None = None

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
        return self.in_channels, self.num_classes, self.input_size or self.image_size or 224

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
        if cfg.dataset in STREAMED:
            raise InputError(f"classes selects classes of the in-memory datasets, not of "
                             f"{cfg.dataset}: point data_dir at a folder with only the class "
                             f"folders you want", params=("classes",))
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


def _check_data(cfg: TrainConfig) -> None:
    """The image-folder settings: crop size, held-out share, normalisation."""
    _positive_int(cfg, "image_size", optional=True)
    f = cfg.val_fraction
    if isinstance(f, bool) or not isinstance(f, int | float) or not 0 < f < 1:
        raise InputError(f"val_fraction must be a number in (0, 1), got {f!r}",
                         params=("val_fraction",))
    for name in ("mean", "std"):
        v = getattr(cfg, name)
        if v is None:
            continue
        if not isinstance(v, list | tuple) or not v or not all(
                isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)
                for x in v):
            raise InputError(f"{name} must be a list of numbers, one per image channel (or "
                             f"one for all), got {v!r}", params=(name,))
    if cfg.std is not None and min(cfg.std) <= 0:
        raise InputError(f"std must be positive, got {cfg.std}", params=("std",))
    if (cfg.mean is None) != (cfg.std is None) and cfg.dataset not in STREAMED:
        raise InputError("give mean and std together", params=("mean", "std"))


def _check(cfg: TrainConfig) -> None:
    """Validate a resolved config; InputError naming the bad parameter."""
    for name in ("epochs", "batch_size"):
        _positive_int(cfg, name)
    for name in ("train_limit", "test_limit"):
        _positive_int(cfg, name, optional=True)
    _check_data(cfg)
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
    for key in ("classes", "mean", "std"):
        if isinstance(values[key], tuple):
            values[key] = list(values[key])
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
            if k not in RUNTIME_FIELDS | DATA_FIELDS and a[k] != b.get(k)
            and not (k in AUTO_FIELDS and a[k] is None)}


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
