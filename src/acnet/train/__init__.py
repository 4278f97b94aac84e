"""Training: configs and model defaults, the run directory, the engine, distributed helpers."""

from ..evaluation import evaluate
from .config import (
    MODEL_DEFAULTS,
    TrainConfig,
    build_base_model,
    build_training_model,
    resolve,
)
from .engine import train
from .rundir import RunDir, RunDirError, load_config

__all__ = ["MODEL_DEFAULTS", "RunDir", "RunDirError", "TrainConfig", "build_base_model",
           "build_training_model", "evaluate", "load_config", "resolve", "train"]
