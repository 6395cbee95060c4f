"""Datasets: embedded (drawn by the package), TFDS without TensorFlow, through grain."""

from jaxdiff.data import synthetic
from jaxdiff.data.pipeline import KNOWN, DataSpec, create_dataset, dataset_size, spec

__all__ = ["synthetic", "create_dataset", "spec", "DataSpec", "KNOWN", "dataset_size"]
