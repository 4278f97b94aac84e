"""The run matrices of `acnet reproduce`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["ABLATION", "ACNET", "BASE", "CORNER", "RunSpec", "STUDY_PRESETS", "StudyPreset",
           "Variant", "runs_of"]


@dataclass
class StudyPreset:
    """A study: which models and seeds, how long, on what data, and which analyses."""

    name: str
    dataset: str
    models: tuple[str, ...]
    seeds: tuple[int, ...]
    ablation_model: str
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig overrides for every run
    per_model: dict[str, dict[str, Any]] = field(default_factory=dict)
    ratios: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
    draws: int = 3
    analysis_test_limit: int | None = None
    description: str = ""
    ablation: bool = True  # False: base and ACNet only (no ablation rows, no robustness)


STUDY_PRESETS: dict[str, StudyPreset] = {
    "quick": StudyPreset(
        "quick", "fashion-mnist", ("cifar_quick",), (0, 1, 2), "cifar_quick",
        train={"epochs": 3, "lr": 0.05, "nesterov": True},
        ratios=(0.0, 0.2, 0.4, 0.6, 0.8, 1.0), draws=2, analysis_test_limit=1000,
        ablation=False,
        description="about 18 minutes on 2 idle CPU cores: Cifar-quick, baseline vs ACNet, on "
                    "the full Fashion-MNIST training set (60,000 images), 3 epochs of SGD "
                    "(Nesterov, lr 0.05, cosine), 3 seeds; the ablation is in the cpu preset"),
    "cpu": StudyPreset(
        "cpu", "fashion-mnist", ("cifar_quick", "resnet20", "densenet40"), (0, 1, 2),
        "cifar_quick",
        train={"lr": 0.05},
        per_model={"cifar_quick": {"epochs": 5, "train_limit": 20000},
                   "resnet20": {"epochs": 4, "train_limit": 12000},
                   "densenet40": {"epochs": 2, "train_limit": 1024, "test_limit": 1000}},
        draws=3, analysis_test_limit=2000,
        description="about an hour on 2 CPU cores: three of the paper's architectures on "
                    "Fashion-MNIST subsets, short cosine schedules, 3 seeds"),
    "paper-cifar10": StudyPreset(
        "paper-cifar10", "cifar10", ("cifar_quick", "vgg16", "resnet56", "wrn16_8",
                                     "densenet40"), (0, 1, 2), "resnet56",
        description="the paper's CIFAR-10 models with the official settings (GPU)"),
    "paper-cifar100": StudyPreset(
        "paper-cifar100", "cifar100", ("cifar_quick", "vgg16", "resnet56", "wrn16_8",
                                       "densenet40"), (0, 1, 2), "resnet56",
        description="the paper's CIFAR-100 models with the official settings (GPU)"),
    "imagenet-resnet18": StudyPreset(
        "imagenet-resnet18", "imagenet", ("tv:resnet18",), (0,), "tv:resnet18",
        train={"epochs": 90, "batch_size": 256, "lr": 0.1, "weight_decay": 1e-4,
               "warmup_epochs": 5, "workers": 8},
        draws=1,
        description="torchvision ResNet-18 on ImageNet, 90 epochs (multi-GPU via torchrun)"),
}

@dataclass(frozen=True)
class Variant:
    """One row of the ablation: its display label and its TrainConfig overrides."""

    label: str
    options: dict[str, Any]


BASE, ACNET, CORNER = "base", "acb", "corner"  # the slugs the report compares

# slug -> variant: the paper's Table 4 rows, the online ACB (branch scales, no branch BN) and
# the corner variant, in report order; the slug names the run directories
ABLATION: dict[str, Variant] = {
    BASE: Variant("base", {"block": "base"}),
    "hor": Variant("+horizontal", {"block": "acb", "vertical": False}),
    "ver": Variant("+vertical", {"block": "acb", "horizontal": False}),
    "nobn": Variant("+both, no branch BN", {"block": "acb", "branch_bn": False}),
    "online": Variant("+both, branch scales, no branch BN (online ACNet)",
                      {"block": "acb", "branch_bn": False, "branch_scale": True}),
    ACNET: Variant("+both, branch BN (ACNet)", {"block": "acb"}),
    CORNER: Variant("corner ACNet", {"block": "acb", "position": "corner"}),
}


@dataclass
class RunSpec:
    """One `acnet train` run of a study."""

    name: str
    model: str
    seed: int
    variant: str  # slug in ABLATION
    config: dict[str, Any]

    @property
    def label(self) -> str:
        return ABLATION[self.variant].label


def runs_of(preset: StudyPreset, seeds: tuple[int, ...] | None = None) -> list[RunSpec]:
    """Every run of the preset: models × {base, acb} × seeds, plus the ablation variants of
    the ablation model (``seeds`` replaces the preset's)."""
    runs: dict[str, RunSpec] = {}
    for model in preset.models:
        ablate = preset.ablation and model == preset.ablation_model
        variants = list(ABLATION) if ablate else [BASE, ACNET]
        for seed in seeds or preset.seeds:
            for slug in variants:
                cfg = {"model": model, "dataset": preset.dataset, "seed": seed, "quiet": True,
                       **preset.train, **preset.per_model.get(model, {}),
                       **ABLATION[slug].options}
                name = f"{model.replace(':', '_')}-{slug}-s{seed}"
                runs[name] = RunSpec(name, model, seed, slug, cfg)
    return list(runs.values())
