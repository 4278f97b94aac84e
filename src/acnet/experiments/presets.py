"""The run matrices of `acnet reproduce`, and the settings shared by the scene studies."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError
from ..train import RunDir

__all__ = [
    "ABLATION",
    "ACNET",
    "BASE",
    "CORNER",
    "LONG",
    "MAIN",
    "ONLINE",
    "SHORT",
    "STUDY_PRESETS",
    "RunSpec",
    "SceneStudy",
    "StudyPreset",
    "Variant",
    "legacy_name",
    "open_scene_run",
    "runs_of",
    "schedule_epochs",
    "tier",
]


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
    # model -> epochs of the long schedule (LONG): one baseline (first seed) trained longer shows
    # whether the study's schedule had converged (the report compares the two); with
    # `plateau_comparison`, baseline and ACNet on every seed (the longer, better-trained
    # comparison)
    plateau: dict[str, int] = field(default_factory=dict)
    plateau_comparison: bool = False
    # model -> epochs of a shorter schedule on which baseline and ACNet are also compared (all
    # seeds): how the gain and the baseline move with the schedule
    short: dict[str, int] = field(default_factory=dict)
    # the schedule of the ablation (MAIN, or SHORT: the ablation model's short schedule)
    ablation_schedule: str = "main"

    def __post_init__(self) -> None:
        if self.ablation_schedule not in ("main", "short"):
            raise InputError(f"ablation_schedule must be 'main' or 'short', got "
                             f"{self.ablation_schedule!r}")
        if self.ablation_schedule == "short" and self.ablation_model not in self.short:
            raise InputError(f"ablation_schedule 'short' needs a short schedule for the "
                             f"ablation model {self.ablation_model!r}")
    int8: bool = False  # INT8 (onnxruntime) accuracy of the base, ACNet and online runs


STUDY_PRESETS: dict[str, StudyPreset] = {
    "quick": StudyPreset(
        "quick", "fashion-mnist", ("cifar_quick",), (0, 1, 2), "cifar_quick",
        train={"epochs": 3, "lr": 0.05, "nesterov": True, "augment": False},
        ratios=(0.0, 0.2, 0.4, 0.6, 0.8, 1.0), draws=2, analysis_test_limit=1000,
        ablation=False,
        description="This quick study trains Cifar-quick as the baseline and as ACNet on the "
                    "full Fashion-MNIST training set (60,000 images) for 3 epochs of SGD "
                    "(Nesterov, lr 0.05, cosine, batch 128), no augmentation, 3 seeds; it "
                    "takes about 14 minutes on 2 idle CPU cores with set-up (11 min 15 s of "
                    "training, `--jobs 2`); the ablation is in the cpu preset"),
    "cpu": StudyPreset(
        "cpu", "fashion-mnist", ("cifar_quick", "vgg16_quarter", "resnet20"), (0, 1, 2),
        "cifar_quick",
        per_model={"cifar_quick": {"epochs": 30}, "vgg16_quarter": {"epochs": 20},
                   "resnet20": {"epochs": 20}},
        short={"cifar_quick": 15, "vgg16_quarter": 10, "resnet20": 10},
        plateau={"cifar_quick": 60, "vgg16_quarter": 40, "resnet20": 40},
        plateau_comparison=True, ablation_schedule="short", draws=3, analysis_test_limit=2000,
        int8=True,
        description="This study trains three of the paper's CIFAR architectures "
                    "(Cifar-quick, VGG-16 at a "
                    "quarter of its width, ResNet-20) trained on the full Fashion-MNIST training "
                    "set (60,000 images) with the official recipe (SGD momentum 0.9, batch 128, "
                    "lr 0.1, weight decay 1e-4, cosine) on 20-30 epochs instead of 150-400, 3 "
                    "seeds, and compared again on half and on twice those schedules (60/40/40 "
                    "epochs: the better-trained comparison, since the baseline trained twice "
                    "as long beat the 30/20/20-epoch one beyond seed noise); the "
                    "ablation, robustness, kernel and sparsity studies on Cifar-quick's half "
                    "schedule (15 epochs); INT8. About 35 hours on 2 CPU cores (`--jobs 2`), "
                    "resumable: the study's priority trains the main comparison first, then the "
                    "short schedules and ablation, then the long schedules model by model"),
    "paper-cifar10": StudyPreset(
        "paper-cifar10", "cifar10", ("cifar_quick", "vgg16", "resnet56", "wrn16_8",
                                     "densenet40"), (0, 1, 2), "resnet56",
        description="This study trains the paper's CIFAR-10 models with the official "
                    "settings (GPU)"),
    "paper-cifar100": StudyPreset(
        "paper-cifar100", "cifar100", ("cifar_quick", "vgg16", "resnet56", "wrn16_8",
                                       "densenet40"), (0, 1, 2), "resnet56",
        description="This study trains the paper's CIFAR-100 models with the official "
                    "settings (GPU)"),
    "imagenet-resnet18": StudyPreset(
        "imagenet-resnet18", "imagenet", ("tv:resnet18",), (0,), "tv:resnet18",
        train={"epochs": 90, "batch_size": 256, "lr": 0.1, "weight_decay": 1e-4,
               "warmup_epochs": 5, "workers": 8},
        draws=1,
        description="This study trains torchvision's ResNet-18 on ImageNet for 90 epochs "
                    "(multi-GPU via torchrun)"),
}

@dataclass(frozen=True)
class Variant:
    """One row of the ablation: its display label and its TrainConfig overrides."""

    label: str
    options: dict[str, Any]


BASE, ACNET, CORNER, ONLINE = "base", "acb", "corner", "online"  # slugs the report compares
# schedules: the preset's epochs, its shorter `short` ones, and its longer `plateau` ones
MAIN, SHORT, LONG = "main", "short", "long"

# slug -> variant: the paper's Table 4 rows, the online ACB (branch scales, no branch BN) and
# the corner variant, in report order; the slug names the run directories
ABLATION: dict[str, Variant] = {
    BASE: Variant("base", {"block": "base"}),
    "hor": Variant("+horizontal", {"block": "acb", "vertical": False}),
    "ver": Variant("+vertical", {"block": "acb", "horizontal": False}),
    "nobn": Variant("+both, no branch BN", {"block": "acb", "branch_bn": False}),
    ONLINE: Variant("+both, branch scales, no branch BN (online ACNet)",
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
    schedule: str = MAIN  # MAIN, SHORT or LONG

    @property
    def label(self) -> str:
        if self.schedule == MAIN:
            return ABLATION[self.variant].label
        return f"{ABLATION[self.variant].label}, {self.config['epochs']} epochs"


def schedule_epochs(preset: StudyPreset, schedule: str) -> dict[str, int]:
    """model -> epochs of the preset's SHORT or LONG schedule (MAIN: the models' own)."""
    return {SHORT: preset.short, LONG: preset.plateau}[schedule]


def _spec(preset: StudyPreset, model: str, seed: int, slug: str, schedule: str = MAIN
          ) -> RunSpec:
    """The run of ``model`` in variant ``slug`` with ``seed`` on ``schedule``; a run on the short
    or long schedule has its epochs in its name (``resnet20-acb-e10-s0``)."""
    cfg = {"model": model, "dataset": preset.dataset, "seed": seed, "quiet": True,
           **preset.train, **preset.per_model.get(model, {}), **ABLATION[slug].options}
    tag = ""
    if schedule in (SHORT, LONG):
        cfg["epochs"] = schedule_epochs(preset, schedule)[model]
        tag = f"-e{cfg['epochs']}"
    return RunSpec(f"{model.replace(':', '_')}-{slug}{tag}-s{seed}", model, seed, slug, cfg,
                   schedule)


def runs_of(preset: StudyPreset, seeds: tuple[int, ...] | None = None) -> list[RunSpec]:
    """Every run of the preset (``seeds`` replaces the preset's), most important first, so a
    study stopped part-way has complete comparisons: each model's baseline and ACNet over
    all seeds, then the same on the short schedules, then the other ablation variants of the
    ablation model, then the long schedules model by model (baseline and ACNet on every seed
    with `plateau_comparison`, else one baseline, first seed: the plateau check)."""
    seeds = seeds or preset.seeds
    specs = [_spec(preset, m, s, v) for m in preset.models for s in seeds for v in (BASE, ACNET)]
    specs += [_spec(preset, m, s, v, SHORT) for m in preset.models if m in preset.short
              for s in seeds for v in (BASE, ACNET)]
    if preset.ablation and preset.ablation_model in preset.models:
        specs += [_spec(preset, preset.ablation_model, s, v, preset.ablation_schedule)
                  for s in seeds for v in ABLATION if v not in (BASE, ACNET)]
    for m in (m for m in preset.models if m in preset.plateau):
        if preset.plateau_comparison:
            specs += [_spec(preset, m, s, v, LONG) for s in seeds for v in (BASE, ACNET)]
        else:
            specs.append(_spec(preset, m, seeds[0], BASE, LONG))
    unique: dict[str, RunSpec] = {}
    for s in specs:  # the ablation's base and ACNet are the same runs as the comparison's
        seen = unique.setdefault(s.name, s)
        if (seen.schedule, seen.config) != (s.schedule, s.config):
            raise InputError(f"preset {preset.name!r}: two different runs would share the "
                             f"directory {s.name!r} (a {seen.schedule} and a {s.schedule} "
                             f"schedule of the same epochs); give the schedules different "
                             f"epochs")
    return list(unique.values())


def legacy_name(spec: RunSpec) -> str | None:
    """The name a long-schedule baseline had before the long schedule was one
    (``resnet20-long-s0``), else None."""
    if spec.schedule == LONG and spec.variant == BASE:
        return f"{spec.model.replace(':', '_')}-long-s{spec.seed}"
    return None


def tier(spec: RunSpec) -> int:
    """The run's place in a study's priority (`runs_of`'s order): 0 the main comparison, 1 the
    short schedules and the ablation, 2 the long schedules."""
    if spec.schedule == LONG:
        return 2
    return 0 if spec.schedule == MAIN and spec.variant in (BASE, ACNET) else 1


@dataclass(frozen=True)
class SceneStudy:
    """Settings shared by the dense studies on synthetic scenes (segmentation, detection);
    each subclass sets its own defaults and adds its fields. Every field but ``seeds`` lands in
    each run's config.json."""

    dataset: str = "fashion-mnist"
    scene_size: int = 64
    max_items: int = 3
    train_scenes: int = 6000
    test_scenes: int = 1000
    scene_seed: int = 0
    epochs: int = 30
    batch_size: int = 32
    lr: float = 0.05

    def config(self, variant: str, seed: int) -> dict[str, Any]:
        """One run's settings: the study's fields, the variant and the seed."""
        cfg = asdict(self)
        cfg.pop("seeds", None)
        return {**cfg, "variant": variant, "seed": seed}


def open_scene_run(config: dict[str, Any], path: str | Path, threads: int | None = None
                   ) -> tuple[RunDir, dict[str, Any]]:
    """(the run, its settings) of a scene-study run: ``config`` without the device, written to
    config.json; a run already there with other settings (``data_dir`` aside) is refused."""
    if threads:
        torch.set_num_threads(threads)
    run = RunDir(path)
    cfg = {k: v for k, v in config.items() if k != "device"}
    run.open_settings(cfg, ignore=("data_dir",))
    return run, cfg
