"""Reflow's fixed pairs on disk: noise and the teacher's samples of it, written once, read as a dataset.

A pairs directory (`config.distill.pairs`) holds

    noise.npy   float32 [N, ...]   the prior's noise x_T (or float16: `PairsWriter(dtype=)`)
    x.npy       float32 [N, ...]   the teacher's deterministic sample from it (the same dtype)
    label.npy   int32 [N]          the label the teacher sampled for (num_classes = none), if conditional
    pairs.json  how they were made: num_pairs, shape, teacher, solver, teacher_steps, ...

`PairsWriter` fills the arrays chunk by chunk in `<directory>.partial`, recording after each
chunk how many rows are written, and renames it into place when complete: a directory that
exists is whole, and an interrupted run continues where it stopped. `create_pairs_dataset`
reads them (memory-mapped) as a checkpointable stream of batches like
`pipeline.create_dataset`'s: {"x", "noise"[, "label"]}, x and noise float32 however stored.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Mapping, Sequence

import grain
import numpy as np

from jaxdiff import files
from jaxdiff.data import pipeline
from jaxdiff.errors import DataError

META = "pairs.json"
PARTIAL = ".partial"  # unfinished pairs, beside the directory: <directory>.partial
PROGRESS = "progress.json"


def read_meta(directory: str) -> dict[str, Any] | None:
  """The pairs' `pairs.json`, or None where there are no (complete) pairs."""
  return files.read_json(os.path.join(directory, META))


class PairsWriter:
  """Writes `num_pairs` pairs of `shape` to `directory` in chunks, resumably; `close(meta)` makes them visible.

  `noise` and `x` are stored as `dtype` (float32, or float16 for half the space). The rows go
  to `<directory>.partial`. Each `add` is durable: the arrays are flushed, then that directory's
  `progress.json` (the rows written, and `made`: what made them) is replaced. A writer opened
  again with the same `made`, `num_pairs`, `shape`, `labels` and `dtype` continues after the
  last chunk added (`filled` rows are there); unfinished pairs made otherwise are removed and
  begun again (`discarded` says why). `close` adds `pairs.json` and renames the directory into
  place, so a directory that exists holds every pair.
  """

  def __init__(self, directory: str, *, num_pairs: int, shape: Sequence[int], labels: bool,
               made: Mapping[str, Any] | None = None, dtype: str = "float32"):
    directory = os.path.abspath(directory)
    if os.path.exists(directory):
      meta = read_meta(directory)
      what = (f"already holds {meta.get('num_pairs')} pairs" if meta is not None
              else f"exists but holds no {META}, so it is not a complete set of pairs")
      raise DataError(f"config.distill.pairs={directory!r} {what}; remove it, or point config.distill.pairs at a "
                      f"new directory.")
    self.directory, self.num_pairs = directory, int(num_pairs)
    self.partial = directory + PARTIAL
    # (through JSON, as progress.json holds it: tuples become lists)
    self._progress = json.loads(json.dumps({"made": dict(made or {}), "num_pairs": self.num_pairs,
                                            "shape": list(shape), "labels": bool(labels),
                                            "dtype": np.dtype(dtype).name}))
    specs = {"noise": (np.dtype(dtype), (self.num_pairs, *shape)), "x": (np.dtype(dtype), (self.num_pairs, *shape))}
    if labels:
      specs["label"] = (np.int32, (self.num_pairs,))
    self.filled, self.discarded = 0, None
    if os.path.exists(self.partial):
      progress = files.read_json(os.path.join(self.partial, PROGRESS))
      self.discarded = self._why_not_resume(progress, specs)
      if self.discarded is None:
        self.filled = int(progress["filled"])
      else:
        shutil.rmtree(self.partial)
    mode = "r+" if self.filled else "w+"
    os.makedirs(self.partial, exist_ok=True)
    self._arrays = {name: np.lib.format.open_memmap(os.path.join(self.partial, f"{name}.npy"), mode=mode,
                                                    dtype=dtype, shape=full) for name, (dtype, full) in specs.items()}

  def _why_not_resume(self, progress: dict[str, Any] | None, specs) -> str | None:
    """None if the unfinished pairs in `self.partial` (their `progress.json`: `progress`) continue
    as this writer's; otherwise why not."""
    if progress is None:
      return f"it holds no {PROGRESS} (no chunk was finished)"
    for key, want in self._progress.items():
      have = progress.get(key)
      if key == "made" and isinstance(have, dict) and have != want:
        k = next(k for k in sorted(set(want) | set(have)) if have.get(k) != want.get(k))
        return f"they were made with {k}={have.get(k)!r}, this run has {want.get(k)!r}"
      if have != want:
        return f"they were {key}={have!r}, this run's are {want!r}"
    for name, (dtype, full) in specs.items():
      try:
        arr = np.load(os.path.join(self.partial, f"{name}.npy"), mmap_mode="r")
      except (OSError, ValueError) as e:
        return f"its {name}.npy cannot be read ({e})"
      if arr.shape != full or arr.dtype != dtype:
        return f"its {name}.npy is {arr.dtype}{list(arr.shape)}, not {np.dtype(dtype)}{list(full)}"
    return None

  def add(self, chunk: Mapping[str, np.ndarray]) -> None:
    """Appends the chunk's rows (those beyond `num_pairs` are dropped) and records them as written."""
    n = min(len(chunk["x"]), self.num_pairs - self.filled)
    for name, arr in self._arrays.items():
      arr[self.filled:self.filled + n] = chunk[name][:n]
      arr.flush()
    self.filled += n
    files.write_json(os.path.join(self.partial, PROGRESS), dict(self._progress, filled=self.filled))

  def close(self, meta: Mapping[str, Any]) -> None:
    if self.filled != self.num_pairs:
      raise RuntimeError(f"PairsWriter: {self.filled} of {self.num_pairs} pairs written.")
    for arr in self._arrays.values():
      arr.flush()
    self._arrays.clear()
    files.write_json(os.path.join(self.partial, META), dict(meta, num_pairs=self.num_pairs))
    os.remove(os.path.join(self.partial, PROGRESS))
    os.replace(self.partial, self.directory)

  def discard(self) -> None:
    """Removes the unfinished pairs (a later writer starts from none)."""
    self._arrays.clear()
    shutil.rmtree(self.partial, ignore_errors=True)


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
    row = {n: np.array(a[i]) for n, a in self._arrays.items()}
    for n in ("noise", "x"):  # float16 on disk: the model reads float32
      row[n] = row[n].astype(np.float32, copy=False)
    return row


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
