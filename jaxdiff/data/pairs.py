"""Reflow's fixed pairs on disk: noise and the teacher's samples of it, written once, read as a dataset.

A pairs directory (`config.distill.pairs`) holds

    noise.npy   float32 [N, ...]   the prior's noise x_T
    x.npy       float32 [N, ...]   the teacher's deterministic sample from it
    label.npy   int32 [N]          the label the teacher sampled for (num_classes = none), if conditional
    pairs.json  how they were made: num_pairs, shape, teacher, solver, teacher_steps, ...

`PairsWriter` fills the arrays chunk by chunk in a temporary directory beside the target and
renames it into place when complete, so a directory that exists is whole (an interrupted run
writes them again). `create_pairs_dataset` reads them (memory-mapped) as a checkpointable
stream of batches like `pipeline.create_dataset`'s: {"x", "noise"[, "label"]}.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any, Mapping, Sequence

import grain
import numpy as np

from jaxdiff.data import pipeline
from jaxdiff.errors import DataError

META = "pairs.json"


def read_meta(directory: str) -> dict[str, Any] | None:
  """The pairs' `pairs.json`, or None where there are no (complete) pairs."""
  path = os.path.join(directory, META)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


class PairsWriter:
  """Writes `num_pairs` pairs of `shape` to `directory` in chunks; `close(meta)` makes them visible."""

  def __init__(self, directory: str, *, num_pairs: int, shape: Sequence[int], labels: bool):
    directory = os.path.abspath(directory)
    if os.path.exists(directory):
      meta = read_meta(directory)
      what = (f"already holds {meta.get('num_pairs')} pairs" if meta is not None
              else f"exists but holds no {META}, so it is not a complete set of pairs")
      raise DataError(f"config.distill.pairs={directory!r} {what}; remove it, or point config.distill.pairs at a "
                      f"new directory.")
    os.makedirs(os.path.dirname(directory), exist_ok=True)
    self.directory, self.num_pairs, self.filled = directory, int(num_pairs), 0
    self._tmp = tempfile.mkdtemp(dir=os.path.dirname(directory), prefix=".tmp-pairs-")
    full = (self.num_pairs, *shape)
    self._arrays = {name: np.lib.format.open_memmap(os.path.join(self._tmp, f"{name}.npy"), mode="w+",
                                                    dtype=np.float32, shape=full) for name in ("noise", "x")}
    if labels:
      self._arrays["label"] = np.lib.format.open_memmap(os.path.join(self._tmp, "label.npy"), mode="w+",
                                                        dtype=np.int32, shape=(self.num_pairs,))

  def add(self, chunk: Mapping[str, np.ndarray]) -> None:
    """Appends the chunk's rows (those beyond `num_pairs` are dropped)."""
    n = min(len(chunk["x"]), self.num_pairs - self.filled)
    for name, arr in self._arrays.items():
      arr[self.filled:self.filled + n] = chunk[name][:n]
    self.filled += n

  def close(self, meta: Mapping[str, Any]) -> None:
    if self.filled != self.num_pairs:
      raise RuntimeError(f"PairsWriter: {self.filled} of {self.num_pairs} pairs written.")
    for arr in self._arrays.values():
      arr.flush()
    self._arrays.clear()
    with open(os.path.join(self._tmp, META), "w") as f:
      json.dump(dict(meta, num_pairs=self.num_pairs), f, indent=2)
    os.replace(self._tmp, self.directory)

  def abort(self) -> None:
    self._arrays.clear()
    shutil.rmtree(self._tmp, ignore_errors=True)


class PairsSource:
  """Random access to a pairs directory's rows: {"x", "noise"[, "label"]} (memory-mapped)."""

  def __init__(self, directory: str, use_labels: bool):
    self.directory, self.use_labels = directory, use_labels
    self._open()

  def _open(self) -> None:
    names = ("noise", "x", "label") if self.use_labels else ("noise", "x")
    for name in names:
      if not os.path.exists(os.path.join(self.directory, f"{name}.npy")):
        raise DataError(f"config.distill.pairs={self.directory!r} has no {name}.npy"
                        + (" (the pairs were made for an unconditional run)" if name == "label" else "")
                        + "; remove the directory to make the pairs again.")
    self._arrays = {n: np.load(os.path.join(self.directory, f"{n}.npy"), mmap_mode="r") for n in names}

  def __getstate__(self):  # grain worker processes open the files themselves
    return {"directory": self.directory, "use_labels": self.use_labels}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._open()

  def __len__(self) -> int:
    return len(self._arrays["x"])

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    return {n: np.array(a[i]) for n, a in self._arrays.items()}


def create_pairs_dataset(directory: str, *, batch_size: int, use_labels: bool, seed: int = 0, shard_index: int = 0,
                         shard_count: int = 1, batch_rows: Sequence[int] | None = None, num_threads: int = 4,
                         prefetch_buffer_size: int = 4, num_workers: int = 0) -> grain.DatasetIterator:
  """The pairs in `directory`, shuffled every epoch from `seed` and repeated, as host-local
  batches {"x", "noise"[, "label"]}; the hosts split them as `pipeline.create_dataset` does."""
  src = PairsSource(directory, use_labels)
  rows = None if batch_rows is None else pipeline.check_rows(batch_rows, batch_size, shard_count)
  global_batch = batch_size * (shard_count if rows is not None else 1)
  if len(src) < global_batch:
    raise DataError(f"config.distill.pairs={directory!r} holds {len(src)} pairs, fewer than a batch "
                    f"({global_batch}); make more (config.distill.num_pairs) in a new directory.")
  ds = grain.MapDataset.source(src)
  if rows is None and shard_count > 1:
    ds = ds[shard_index::shard_count]
  ds = ds.shuffle(seed=seed).repeat(None)
  if rows is not None and shard_count > 1:
    ds = pipeline.BatchRows(ds, rows=rows, global_batch=global_batch)
  return pipeline.batched_iterator(ds, batch_size=batch_size, num_threads=num_threads,
                                   prefetch_buffer_size=max(1, prefetch_buffer_size), num_workers=num_workers)
