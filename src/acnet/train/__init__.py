"""Training: configs and presets, the engine, distributed helpers."""

from .config import PRESETS, TrainConfig, build_base_model, build_training_model, load_config
from .engine import RunDirError, evaluate, train

__all__ = ["PRESETS", "RunDirError", "TrainConfig", "build_base_model", "build_training_model",
           "evaluate", "load_config", "train"]
