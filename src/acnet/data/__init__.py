"""Datasets and loaders."""

from .datasets import DATASETS, DatasetNotFoundError, ImageData, load_dataset, synthetic
from .loader import TRANSFORMS, InMemoryLoader, apply_transform

__all__ = [
           "DATASETS",
           "TRANSFORMS",
           "DatasetNotFoundError",
           "ImageData",
           "InMemoryLoader",
           "apply_transform",
           "load_dataset",
           "synthetic",
]
