"""Datasets through grain: embedded, TFDS (array_record, no TensorFlow) and image folders.

* `create_dataset(...)`: a checkpointable iterator of host-local numpy batches;
* `prefetch_to_device(it, mesh, size=...)`: global sharded `jax.Array` batches, `size`
  ahead on a background thread, still exactly resumable;
* `spec(...)`: what the model sees; `catalog.lookup(name)`: what is known about a dataset;
* `pairs`: reflow's fixed pairs of noise and teacher samples, written once and read as batches.
"""

from jaxdiff.data import catalog, pairs, synthetic
from jaxdiff.data.pipeline import (KNOWN, DataSpec, create_dataset, dataset_kwargs, dataset_size,
                                   spec)
from jaxdiff.data.prefetch import DevicePrefetchIterator, prefetch_to_device

__all__ = ["catalog", "pairs", "synthetic", "create_dataset", "dataset_kwargs", "spec", "DataSpec", "KNOWN",
           "dataset_size", "prefetch_to_device", "DevicePrefetchIterator"]
